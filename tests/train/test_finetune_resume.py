"""Stage 2: kill-and-resume, config-hash guard, two-process (gloo) training, the Snakemake rule."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _finetune_data import write_dataset  # noqa: E402

from rerankflow.config import load_config  # noqa: E402
from rerankflow.train.finetune import run_finetune  # noqa: E402
from rerankflow.train.spec import make_spec  # noqa: E402
from rerankflow.io import write_json  # noqa: E402
from rerankflow.testing import tiny_bert  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = load_config()
RERANKER = {**CONFIG["reranker"], "prompt_template": "question:{query} \n \n passage:{passage}", "max_length": 64}
TOTAL = 60
FT = {**CONFIG["finetune"], "max_steps": TOTAL, "learning_rate": 2e-3, "global_batch_size": 4, "local_batch_size": 2,
      "train_n_passages": 4, "val_every_steps": 40, "checkpoint_every_steps": 10, "keep_checkpoints": 2,
      "val_queries": 4, "small_data_autoscale": False}


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _kill_after_first_checkpoint(proc, ckpt_dir: Path, kill, finished_message: str, timeout: float = 120) -> None:
    """Wait until ``proc`` has written its first ``epoch_*`` checkpoint under ``ckpt_dir``, then ``kill()`` it.

    Asserts the process was still running (``finished_message`` otherwise); kills it in any case.
    """
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt_dir.is_dir() and any(p.name.startswith("epoch_") for p in ckpt_dir.iterdir()):
                break
            time.sleep(0.01)
        assert proc.poll() is None, finished_message
        kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            kill()


def _log(out):
    return [json.loads(line) for line in (Path(out) / "training_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftr")
    train, val, _ = write_dataset(root / "data", n_queries=30, n_neg=5)
    base = tiny_bert(root / "base")
    return root, train, val, base


def test_sigkill_then_rerun_resumes_to_the_same_step_count(data):
    root, train, val, base = data
    out = root / "killed"
    spec = make_spec(train, val, str(base), out, FT, RERANKER, seed=11, device="cpu", threads=1)
    spec_path = root / "spec_killed.json"
    write_json(spec_path, spec)
    cmd = [sys.executable, "-m", "rerankflow.train.finetune", "--spec", str(spec_path)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    _kill_after_first_checkpoint(proc, ckpts, lambda: proc.send_signal(signal.SIGKILL),
                                 "training finished before it could be killed")
    assert not (out / "training_log.jsonl").exists()  # the final log is only written by a finished run
    done = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("epoch_"))
    assert done

    # the rerun (same spec) resumes
    subprocess.run(cmd, env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = _log(out)
    resumes = [r for r in recs if r["event"] == "resume"]
    assert len(resumes) == 1
    k = resumes[0]["from_step"]
    assert 10 <= k < TOTAL and k % 10 == 0
    steps = [r["step"] for r in recs if r["event"] == "train"]
    assert steps == list(range(1, TOTAL + 1))          # each step exactly once: k from the first run, the rest after
    after = recs.index(resumes[0])
    assert [r["step"] for r in recs[after:] if r["event"] == "train"][0] == k + 1
    assert recs[-1]["event"] == "end" and recs[-1]["steps"] == TOTAL
    assert os.readlink(ckpts / "LATEST").endswith(f"_step_{TOTAL}")
    kept = [p.name for p in ckpts.iterdir() if p.name.startswith("epoch_")]
    assert len(kept) <= 3  # keep_checkpoints=2 (+ BEST)

    # resuming is exact: the same run without the kill logs the same losses after step k
    ref_out = root / "uninterrupted"
    spec_ref = dict(spec, out_dir=str(ref_out))
    write_json(root / "spec_ref.json", spec_ref)
    subprocess.run([sys.executable, "-m", "rerankflow.train.finetune", "--spec", str(root / "spec_ref.json")],
                   env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref = {r["step"]: r["loss"] for r in _log(ref_out) if r["event"] == "train"}
    got = {r["step"]: r["loss"] for r in recs if r["event"] == "train"}
    for s in (k + 1, k + 5, TOTAL):
        assert got[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-6), s


def test_changed_config_starts_fresh_and_finished_run_is_not_redone(data, tmp_path):
    root, train, val, base = data
    out = tmp_path / "out"
    ft = dict(FT, max_steps=6, checkpoint_every_steps=3, val_every_steps=3)
    s1 = run_finetune(train, val, str(base), out, ft, RERANKER, seed=1, device="cpu", threads=1, gpus=0)
    assert s1["steps"] == 6
    # same config again: finished checkpoint is found, nothing is trained again
    s2 = run_finetune(train, val, str(base), out, ft, RERANKER, seed=1, device="cpu", threads=1, gpus=0)
    recs = _log(out)
    assert s2["hash"] == s1["hash"] and [r["event"] for r in recs].count("resume") == 1
    assert [r["step"] for r in recs if r["event"] == "train"] == list(range(1, 7))
    # another learning rate: old checkpoints are moved aside, training starts from step 1
    s3 = run_finetune(train, val, str(base), out, dict(ft, learning_rate=1e-4), RERANKER, seed=1, device="cpu",
                      threads=1, gpus=0)
    recs = _log(out)
    assert s3["hash"] != s1["hash"] and not any(r["event"] == "resume" for r in recs)
    assert recs[0]["event"] == "start" and [r["step"] for r in recs if r["event"] == "train"][0] == 1
    superseded = list((out / "superseded").glob("*/epoch_*"))
    assert superseded
    # a changed training file changes the hash too
    data_json = json.loads(Path(train).read_text())
    data_json["data"] = data_json["data"][:-1]
    train2 = tmp_path / "train2.json"
    train2.write_text(json.dumps(data_json))
    s4 = run_finetune(train2, val, str(base), out, dict(ft, learning_rate=1e-4), RERANKER, seed=1, device="cpu",
                      threads=1, gpus=0)
    assert s4["hash"] != s3["hash"]


def test_two_process_gloo_training_writes_one_checkpoint(data, tmp_path):
    root, train, val, base = data
    out = tmp_path / "ddp"
    ft = dict(FT, max_steps=6, checkpoint_every_steps=0, val_every_steps=3, nproc=2)
    summary = run_finetune(train, val, str(base), out, ft, RERANKER, seed=2, device="cpu", threads=2, gpus=0)
    assert summary["steps"] == 6
    recs = _log(out)
    start = recs[0]
    assert start["event"] == "start" and start["world_size"] == 2 and start["grad_accum"] == 1
    assert [r["step"] for r in recs if r["event"] == "train"] == list(range(1, 7))  # rank 0 alone writes
    ckpts = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("epoch_")]
    latest = (out / "checkpoints" / "LATEST").resolve()
    assert latest in [p.resolve() for p in ckpts]
    shards = list(latest.glob("model/consolidated/*.safetensors"))
    assert [s.name for s in shards] == ["model.safetensors"]
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(latest / "model" / "consolidated")
    assert not any(k.startswith("module.") for k in m.state_dict())
    assert [r for r in recs if r["event"] == "val"][0]["val_queries"] == 4  # sharded validation, gathered


SNAKEFILE = """
configfile: "config.yaml"
include: "{common}"
include: "{rules}"
"""


@pytest.mark.skipif(shutil.which("snakemake") is None and not Path(sys.executable).with_name("snakemake").exists(),
                    reason="snakemake not installed")
def test_snakemake_rule_symlink_outputs_and_rerun(data, tmp_path):
    root, train, val, base = data
    wd = tmp_path / "wf"
    prep = wd / "out" / "stage1_prep"
    (prep / "corpus").mkdir(parents=True)
    corpus = json.loads(Path(train).read_text())["corpus"]["path"]
    shutil.copy(corpus, prep / "corpus" / "train.parquet")
    for src, name in ((train, "train_mined.automodel_unrolled.json"), (val, "val.json")):
        obj = json.loads(Path(src).read_text())
        obj["corpus"]["path"] = str(prep / "corpus" / "train.parquet")
        (prep / name).write_text(json.dumps(obj))
    (wd / "Snakefile").write_text(SNAKEFILE.format(common=REPO / "rules" / "common.smk", rules=REPO / "rules" / "finetune.smk"))
    # enough steps after the first checkpoint that the kill lands mid-run even on an idle machine
    ft = dict(FT, max_steps=400, checkpoint_every_steps=20, val_every_steps=200, base_model=str(base))
    (wd / "config.yaml").write_text(json.dumps(load_config({"output_dir": "out", "seed": 1, "device": "cpu",
                                                            "reranker": RERANKER, "finetune": ft})))
    snake = str(Path(sys.executable).with_name("snakemake"))
    target = "out/stage2_finetune/checkpoints/BEST"
    args = [snake, "--cores", "1", "--snakefile", str(wd / "Snakefile"), "-d", str(wd)]
    ck = wd / "out" / "stage2_finetune" / "checkpoints"
    # 1) the job is SIGKILLed (with Snakemake) after its first checkpoint
    proc = subprocess.Popen(args + [target], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _kill_after_first_checkpoint(proc, ck, lambda: os.killpg(proc.pid, signal.SIGKILL),
                                 "the job finished before it could be killed")
    assert not (wd / "out" / "stage2_finetune" / "training_log.jsonl").exists()
    # 2) re-running the workflow resumes from the checkpoint (which Snakemake did not delete)
    subprocess.run(args + ["--unlock"], env=_env(), capture_output=True, check=True)
    r = subprocess.run(args + ["--rerun-incomplete", target], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _log(wd / "out" / "stage2_finetune")
    resumes = [x for x in recs if x["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["from_step"] >= 20
    assert recs[-1]["event"] == "end" and recs[-1]["steps"] == 400
    assert os.path.islink(ck / "BEST") and os.readlink(ck / "LATEST") == recs[-1]["latest"]
    assert recs[-1]["latest"].endswith("_step_400")
    assert (ck / "BEST" / "model" / "consolidated" / "config.json").exists()
    assert (wd / "out" / "logs" / "finetune.log").exists() and (wd / "out" / "logs" / "benchmarks" / "finetune.tsv").exists()
    # 3) the symlink outputs count as up to date
    r = subprocess.run(args + ["-n", target], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0 and "Nothing to be done" in (r.stdout + r.stderr)
    # 4) editing a finetune parameter reruns the rule (params)
    ft["learning_rate"] = 1e-4
    (wd / "config.yaml").write_text(json.dumps(load_config({"output_dir": "out", "seed": 1, "device": "cpu",
                                                            "reranker": RERANKER, "finetune": ft})))
    r = subprocess.run(args + ["-n", target], env=_env(), capture_output=True, text=True)
    assert "finetune" in r.stdout + r.stderr and "Nothing to be done" not in r.stdout + r.stderr
