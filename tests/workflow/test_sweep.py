"""Sweeps through Snakemake (issue 18): a two-variant sweep over the tiny pipeline, run once for the module.

The shared upstream (SDG, prep, the base model import, the base evaluation with the first stage) is
planned and built once; each variant trains and evaluates in its own folder; the summary's rows are
the variants' own files; the choice is made on validation; adding a grid value runs that variant
only, removing one deletes nothing; the chosen variant exports by name; through profiles/slurm the
variants are independent Slurm jobs that run side by side.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TEST_CORPUS, run_snakemake

sys.path.insert(0, str(Path(__file__).parent))
from test_slurm import (  # noqa: E402  (the real-Slurm fixture and helpers of tests/workflow/test_slurm.py)
    DEFAULT_PROFILE,
    cluster,  # noqa: F401  (a pytest fixture, used by name)
    fitted_profile,
    needs_slurm,
    scontrol_job,
    submitted_jobs,
    workflow_env,
)

SWEEP = "output/tiny/sweeps/tiny"
SUMMARY = f"{SWEEP}/summary.json"
LRS = [1.0e-5, 3.0e-5]
IDS = ["learning_rate=1e-05", "learning_rate=3e-05"]


def sweep_config(wd: Path, learning_rates=None, **sweep_keys) -> Path:
    """tests/config/tiny.yaml + tests/config/sweep.yaml as one file, with another grid or sweep keys when given."""
    cfg = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    for section, values in yaml.safe_load((REPO / "tests/config/sweep.yaml").read_text()).items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    cfg["corpus"]["dir"] = str(TEST_CORPUS)
    if learning_rates is not None:
        cfg["sweep"]["grid"] = {"learning_rate": learning_rates}
    cfg["sweep"].update(sweep_keys)
    text = yaml.safe_dump(cfg)
    path = wd / f"sweep-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
    path.write_text(text)
    return path


def job_stats(proc) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table ({} when nothing is to be done)."""
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    stats = {}
    for line in out.split("Job stats:", 1)[1].splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            stats[m.group(1)] = int(m.group(2))
    return stats


def planned_variants(proc, rule: str) -> list[str]:
    """The variant ids of a dry run's ``rule`` jobs."""
    out = proc.stdout + proc.stderr
    return sorted(re.findall(r"rule %s:\n(?:    .*\n)*?    wildcards: name=\w+, variant=(\S+)" % rule, out))


def variant_dir(wd: Path, vid: str) -> Path:
    return wd / SWEEP / "variants" / vid


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("sweep")
    cfg = sweep_config(wd)
    plan = run_snakemake(wd, "-n", SUMMARY, configfile=cfg)
    t0 = time.monotonic()
    run_snakemake(wd, SUMMARY, configfile=cfg)
    seconds = time.monotonic() - t0
    print(f"\ntwo-variant sweep over the tiny pipeline: {seconds:.1f} s", file=sys.stderr)
    return {"wd": wd, "cfg": cfg, "plan": plan, "seconds": seconds}


def test_shared_upstream_is_planned_once_and_each_variant_once(sweep_run):
    assert job_stats(sweep_run["plan"]) == {"sdg": 1, "prep": 1, "import_base_model": 1, "sweep_base_eval": 1,
                                            "sweep_finetune": 2, "sweep_evaluate": 2, "sweep_summary": 1}
    assert planned_variants(sweep_run["plan"], "sweep_finetune") == IDS
    assert planned_variants(sweep_run["plan"], "sweep_evaluate") == IDS


def test_each_variant_has_its_own_checkpoints_results_and_logs(sweep_run):
    wd = sweep_run["wd"]
    weights = set()
    for vid in IDS:
        d = variant_dir(wd, vid)
        best = d / "stage2_finetune/checkpoints/BEST"
        assert best.is_symlink() and (best / "model/consolidated/config.json").is_file()
        weights.add(hashlib.sha256((best / "model/consolidated/model.safetensors").read_bytes()).hexdigest())
        results = json.loads((d / "stage3_eval/eval_results.json").read_text())
        assert results["meta"]["models"]["finetuned"] == f"{SWEEP}/variants/{vid}/stage2_finetune/checkpoints/BEST"
        for f in ("finetune", "evaluate"):
            assert (wd / "output/tiny/logs/sweeps/tiny" / vid / f"{f}.log").is_file()
            assert (wd / "output/tiny/logs/benchmarks/sweeps/tiny" / vid / f"{f}.tsv").is_file()
    assert len(weights) == 2, "two learning rates trained two different models"


def test_first_stage_and_base_are_computed_once_and_shared(sweep_run):
    wd = sweep_run["wd"]
    base = json.loads((wd / SWEEP / "base/stage3_eval/eval_results.json").read_text())
    assert base["meta"]["timings"]["base"]["scored_pairs"] > 0 and "finetuned" not in base
    run_file = f"{SWEEP}/base/stage3_eval/runs/first_stage.trec"
    for vid in IDS:
        results = json.loads((variant_dir(wd, vid) / "stage3_eval/eval_results.json").read_text())
        assert "base" not in results, "a variant never re-scores the base"
        assert results["meta"]["first_stage"]["kind"] == "run"
        assert results["meta"]["first_stage"]["run"]["run_file"] == run_file  # the one first-stage run
        assert results["first_stage"] == base["first_stage"]


def test_summary_rows_are_the_variants_files_and_the_choice_is_made_on_validation(sweep_run):
    wd = sweep_run["wd"]
    summary = json.loads((wd / SUMMARY).read_text())
    assert [r["id"] for r in summary["variants"]] == IDS
    vals = {}
    for row in summary["variants"]:
        d = variant_dir(wd, row["id"])
        results = json.loads((d / "stage3_eval/eval_results.json").read_text())
        training = json.loads((d / "stage2_finetune/training_summary.json").read_text())
        assert row["test"]["NDCG@10"] == results["finetuned"]["NDCG"]["NDCG@10"]
        assert row["test"]["MRR@10"] == results["finetuned"]["MRR"]["MRR@10"]
        assert row["val"]["best"] == training["best_val_ndcg@10"] is not None
        assert row["val"]["best_checkpoint"] == training["best"]
        assert row["train"]["pairs_per_s"] == training["pairs_per_s"] and row["train"]["wall_s"] > 0
        assert row["vs_base"]["metric"] == "NDCG@10" and row["vs_base"]["ci_low"] <= row["vs_base"]["delta"] <= row["vs_base"]["ci_high"]
        vals[row["id"]] = training["best_val_ndcg@10"]
    best_val = max(vals.values())
    assert summary["chosen"] == next(v for v in IDS if vals[v] == best_val)  # highest validation, ties: earlier
    assert [r["chosen"] for r in summary["variants"]].count(True) == 1
    md = (wd / SWEEP / "summary.md").read_text()
    assert f"Chosen on validation: **`{summary['chosen']}`**" in md
    assert (wd / SWEEP / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert len((wd / SWEEP / "summary.tsv").read_text().splitlines()) == 1 + 2 + len(IDS)


def test_nothing_is_stale_after_the_run(sweep_run):
    wd, cfg = sweep_run["wd"], sweep_run["cfg"]
    assert job_stats(run_snakemake(wd, "-n", SUMMARY, configfile=cfg)) == {}
    assert job_stats(run_snakemake(wd, "-n", "sweep", configfile=cfg)) == {}


def test_adding_a_grid_value_runs_only_the_new_variant(sweep_run):
    wd = sweep_run["wd"]
    cfg = sweep_config(wd, [*LRS, 5.0e-5])
    plan = run_snakemake(wd, "-n", SUMMARY, configfile=cfg)
    assert job_stats(plan) == {"sweep_finetune": 1, "sweep_evaluate": 1, "sweep_summary": 1}
    assert planned_variants(plan, "sweep_finetune") == planned_variants(plan, "sweep_evaluate") == ["learning_rate=5e-05"]
    kept = {p: p.stat().st_mtime_ns for vid in IDS for p in (variant_dir(wd, vid) / "stage2_finetune/training_summary.json",
                                                               variant_dir(wd, vid) / "stage3_eval/eval_results.json")}
    run_snakemake(wd, SUMMARY, configfile=cfg)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    summary = json.loads((wd / SUMMARY).read_text())
    assert [r["id"] for r in summary["variants"]] == [*IDS, "learning_rate=5e-05"]


def test_removing_a_grid_value_deletes_nothing(sweep_run):
    wd = sweep_run["wd"]
    cfg = sweep_config(wd, [LRS[1]])
    assert job_stats(run_snakemake(wd, "-n", SUMMARY, configfile=cfg)) == {"sweep_summary": 1}
    run_snakemake(wd, SUMMARY, configfile=cfg)
    assert [r["id"] for r in json.loads((wd / SUMMARY).read_text())["variants"]] == [IDS[1]]
    for vid in IDS:
        assert (variant_dir(wd, vid) / "stage2_finetune/checkpoints/BEST/model/consolidated/config.json").is_file()
        assert (variant_dir(wd, vid) / "stage3_eval/eval_results.json").is_file()


def test_the_chosen_variant_exports_by_name(sweep_run):
    wd = sweep_run["wd"]
    target = f"{SWEEP}/stage4_export/onnx/model.onnx"
    # a variant named in sweep.export needs only its own checkpoint (no summary)
    named = sweep_config(wd, LRS, export=IDS[1])
    assert job_stats(run_snakemake(wd, "-n", target, configfile=named)) == {"sweep_export_onnx": 1}
    # best = the variant the summary chose on validation
    cfg = sweep_config(wd, LRS)
    run_snakemake(wd, target, configfile=cfg)
    chosen = json.loads((wd / SUMMARY).read_text())["chosen"]
    record = json.loads((wd / SWEEP / "stage4_export/variant.json").read_text())
    assert record["variant"] == chosen and record["export"] == "best"
    assert record["checkpoint"] == f"{SWEEP}/variants/{chosen}/stage2_finetune/checkpoints/BEST"
    parity = json.loads((wd / SWEEP / "stage4_export/parity.json").read_text())
    assert parity["pairs"] > 0 and parity["max_abs_diff"] < 1e-3
    # served by name too (dry run: the deploy rule takes the sweep's export)
    deploy = run_snakemake(wd, "-n", f"{SWEEP}/stage5_deploy/endpoint.json", configfile=cfg)
    assert job_stats(deploy) == {"sweep_deploy": 1}


def test_settings_a_sweep_cannot_vary_stop_the_run_with_the_key(sweep_run, tmp_path):
    wd = sweep_run["wd"]
    cfg = yaml.safe_load(sweep_config(tmp_path).read_text())
    for grid, words in (({"prep.quality_threshold": [5.0]}, "sweep.grid.prep.quality_threshold"),
                        ({"learnin_rate": [1.0e-5]}, "sweep.grid.learnin_rate")):
        cfg["sweep"]["grid"] = grid
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(cfg))
        proc = run_snakemake(wd, "-n", SUMMARY, configfile=bad, check=False)
        assert proc.returncode != 0 and words in proc.stdout + proc.stderr
    proc = run_snakemake(wd, "-n", "output/tiny/sweeps/other/summary.json", configfile=sweep_run["cfg"], check=False)
    assert proc.returncode != 0 and "not the configured sweep.name" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- through profiles/slurm (real local Slurm)

def _slurm_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


@needs_slurm
def test_variants_run_as_parallel_slurm_jobs(sweep_run, cluster, tmp_path):  # noqa: F811
    """Two new variants through the committed profile: each variant's training and evaluation is its
    own Slurm job, and the two trainings run at the same time. The shared upstream is up to date."""
    wd = sweep_run["wd"]
    new = ["learning_rate=7e-05", "learning_rate=9e-05"]
    cfg = sweep_config(wd, [*LRS, 7.0e-5, 9.0e-5])
    prof = fitted_profile(tmp_path / "profile", cluster)
    kept = {p: p.stat().st_mtime_ns for vid in IDS for p in (variant_dir(wd, vid) / "stage3_eval/eval_results.json",)}
    t0 = time.monotonic()
    # targets before --configfile, which takes several values
    res = subprocess.run(["timeout", "-k", "10", "600", sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                          "-d", str(wd), "--profile", str(prof), "--workflow-profile", str(DEFAULT_PROFILE), SUMMARY,
                          "--configfile", str(cfg)], cwd=wd, env=workflow_env(cluster.env()), capture_output=True, text=True)
    seconds = time.monotonic() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"rc {res.returncode}:\n{out[-8000:]}\n{cluster.logs_tail()}"
    jobs = submitted_jobs(out)
    by_rule: dict[str, list[dict]] = {}
    for jobid in jobs:
        info = scontrol_job(cluster, jobid)
        assert info["JobState"] == "COMPLETED", info
        # the job's comment: rule_<rule>_wildcards_<wildcard values>
        by_rule.setdefault(info["Comment"].removeprefix("rule_").split("_wildcards_")[0], []).append(info)
    # only the two new variants ran, each training and each evaluation its own Slurm job (the summary is local)
    assert {r: len(v) for r, v in by_rule.items()} == {"sweep_finetune": 2, "sweep_evaluate": 2}, out[-4000:]
    summary = json.loads((wd / SUMMARY).read_text())
    assert [r["id"] for r in summary["variants"]] == [*IDS, *new]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    a, b = ((_slurm_time(j["StartTime"]), _slurm_time(j["EndTime"])) for j in by_rule["sweep_finetune"])
    assert max(a[0], b[0]) < min(a[1], b[1]), f"the two trainings did not overlap: {a}, {b}"
    print(f"\ntwo variants through Slurm: {seconds:.1f} s; trainings overlapped {min(a[1], b[1]) - max(a[0], b[0]):.0f} s",
          file=sys.stderr)
