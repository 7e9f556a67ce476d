"""The workflow through Snakemake: the tiny pipeline, the DAG, rerun triggers, lint."""

import hashlib
import json
import re

import pytest
import yaml

from conftest import REPO, TEST_CORPUS, run_snakemake

PREP_TARGET = "output/tiny/stage1_prep/train_mined.automodel_unrolled.json"
EVAL_TARGET = "output/tiny/stage3_eval/eval_results.json"


def tiny_config(tmp_path, **overrides):
    cfg = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    cfg["corpus"]["dir"] = str(TEST_CORPUS)
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    text = yaml.safe_dump(cfg)
    # one file per variant: a dry run with changed settings must not rewrite the config of the real run
    path = tmp_path / f"tiny-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
    path.write_text(text)
    return path


def planned_rules(proc) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    rules = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            rules[m.group(1)] = int(m.group(2))
    return rules


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny pipeline's default target (stages 0-4), run once for this module."""
    wd = tmp_path_factory.mktemp("wf")
    cfg = tiny_config(wd)
    run_snakemake(wd, configfile=cfg)
    return wd, cfg


def test_stages_0_and_1_outputs(tiny_run):
    wd, _ = tiny_run
    out = wd / "output/tiny"
    manifest = json.loads((out / "stage0_sdg/generation_result.json").read_text())
    assert manifest["output_file"] == "tiny.jsonl" and manifest["num_documents"] == 12
    assert len((out / "stage0_sdg/tiny.jsonl").read_text().splitlines()) == 12
    summary = json.loads((out / "stage1_prep/prep_summary.json").read_text())
    assert summary["queries_per_split"]["train"] >= 10 and summary["queries_per_split"]["test"] >= 3
    unrolled = json.loads((out / "stage1_prep/train_mined.automodel_unrolled.json").read_text())
    assert len(unrolled["data"]) == summary["unrolled_records"]
    assert all(len(r["neg_doc"]) == 4 for r in unrolled["data"])
    for f in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        assert (out / "stage1_prep/eval_beir" / f).exists()
    for rule in ("sdg", "prep"):
        assert (out / "logs" / f"{rule}.log").exists()
        assert (out / "logs/benchmarks" / f"{rule}.tsv").read_text().startswith("s\th:m:s")
    assert list((out / "cache/embeddings").glob("*.npy")), "embedding cache written"


def test_stages_2_to_4_outputs(tiny_run):
    wd, _ = tiny_run
    out = wd / "output/tiny"
    best = out / "stage2_finetune/checkpoints/BEST"
    assert best.is_symlink() and (best / "model/consolidated/config.json").exists()
    log = [json.loads(line) for line in (out / "stage2_finetune/training_log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "val" for e in log) and log[-1]["event"] == "end"
    results = json.loads((out / "stage3_eval/eval_results.json").read_text())
    assert {"first_stage", "base", "finetuned"} <= set(results)
    assert 0.0 <= results["finetuned"]["NDCG"]["NDCG@10"] <= 1.0 and "MRR@10" in results["finetuned"]["MRR"]
    # stage 2 validated on first-stage candidates, so the checkpoint carries a fusion weight: system "fused"
    assert [c["to"] for c in results["comparisons"]] == ["base", "finetuned", "fused"]
    assert results["meta"]["fusion"]["weight"] is not None
    for f in ("per_query.json", "runs/finetuned.trec", "eval_table.tsv", "ndcg_plot.png"):
        assert (out / "stage3_eval" / f).exists(), f
    parity = json.loads((out / "stage4_export/parity.json").read_text())
    assert parity["max_abs_diff"] < 1e-3 and parity["pairs"] > 0
    assert (out / "stage4_export/onnx/model.onnx").exists() and (out / "stage4_export/onnx_int8/model.onnx").exists()
    for rule in ("import_base_model", "finetune", "evaluate", "export_onnx"):
        assert (out / "logs/benchmarks" / f"{rule}.tsv").exists(), rule


def test_nothing_planned_when_nothing_changed(tiny_run):
    wd, cfg = tiny_run
    assert planned_rules(run_snakemake(wd, "-n", configfile=cfg)) == {}
    # the same settings listed in another key order are the same config
    data = yaml.safe_load(cfg.read_text())
    data = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v) for k, v in reversed(list(data.items()))}
    reordered = wd / "tiny-reordered.yaml"
    reordered.write_text(yaml.safe_dump(data, sort_keys=False))
    assert planned_rules(run_snakemake(wd, "-n", configfile=reordered)) == {}


def test_changed_eval_param_reruns_eval_only(tiny_run):
    wd, _ = tiny_run
    plan = planned_rules(run_snakemake(wd, "-n", configfile=tiny_config(wd, eval={"k_values": [1, 5], "bootstrap_samples": 300})))
    assert set(plan) == {"evaluate", "all"}
    # eval.top_k also sets how many first-stage candidates prep lists per val query (stage 2 validates on them)
    plan = planned_rules(run_snakemake(wd, "-n", configfile=tiny_config(wd, eval={"top_k": 8, "k_values": [1, 5]})))
    assert {"prep", "finetune", "evaluate"} <= set(plan) and "sdg" not in plan
    plan = planned_rules(run_snakemake(wd, "-n", configfile=tiny_config(wd, finetune={"learning_rate": 1e-5})))
    assert {"finetune", "evaluate", "export_onnx"} <= set(plan) and not {"sdg", "prep", "import_base_model"} & set(plan)


def test_changed_job_size_reruns_nothing(tiny_run):
    """finetune.mem_mb/runtime/threads size the job (resources), they are not params: nothing re-runs."""
    wd, _ = tiny_run
    for change in ({"mem_mb": 12000}, {"runtime": 30}, {"mem_mb": 4000, "runtime": 600, "threads": 1}):
        plan = planned_rules(run_snakemake(wd, "-n", configfile=tiny_config(wd, finetune=change)))
        assert plan == {}, (change, plan)
    plan = planned_rules(run_snakemake(wd, "-n", configfile=tiny_config(wd, finetune={"learning_rate": 3e-5})))
    assert "finetune" in plan


def job_files(proc) -> dict[str, dict[str, str]]:
    """Rule -> {"log": ..., "benchmark": ...} of every job listed by a dry run."""
    jobs, rule = {}, None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            rule = m.group(1)
            jobs[rule] = {}
            continue
        m = re.match(r"^(log|benchmark): (.+)$", line.strip())
        if rule and m:
            jobs[rule][m.group(1)] = m.group(2)
    return jobs


def test_each_output_dir_keeps_its_own_logs(tmp_path):
    """Two configs that differ in output_dir never write the same log or benchmark file."""
    seen = {}
    for out in ("output/a", "output/b"):
        data = {**yaml.safe_load(tiny_config(tmp_path).read_text()), "output_dir": out}
        cfg = tmp_path / f"tiny-{out.replace('/', '_')}.yaml"
        cfg.write_text(yaml.safe_dump(data))
        jobs = job_files(run_snakemake(tmp_path, "-n", "all", f"{out}/stage5_deploy/endpoint.json", configfile=cfg))
        jobs.pop("all", None)
        assert {"sdg", "prep", "finetune", "evaluate", "export_onnx", "deploy"} <= set(jobs)
        for rule, files in jobs.items():
            assert files["log"] == f"{out}/logs/{rule}.log", (rule, files)
            assert files["benchmark"] == f"{out}/logs/benchmarks/{rule}.tsv", (rule, files)
        seen[out] = {f for files in jobs.values() for f in files.values()}
    assert not seen["output/a"] & seen["output/b"]


def test_deploy_target_is_in_the_dag(tiny_run):
    wd, cfg = tiny_run
    plan = planned_rules(run_snakemake(wd, "-n", "output/tiny/stage5_deploy/endpoint.json", configfile=cfg))
    assert set(plan) == {"deploy"}


def test_changed_prep_param_reruns_prep_not_sdg(tiny_run):
    wd, _ = tiny_run
    cfg2 = tiny_config(wd, prep={"hard_negatives_to_mine": 3})
    plan = planned_rules(run_snakemake(wd, "-n", configfile=cfg2))
    assert {"prep", "finetune", "evaluate", "export_onnx"} <= set(plan)
    assert "sdg" not in plan and "write_default_corpus" not in plan
    cfg3 = tiny_config(wd, sdg={"num_pairs": 2})
    plan = planned_rules(run_snakemake(wd, "-n", PREP_TARGET, configfile=cfg3))
    assert {"sdg", "prep"} <= set(plan)


def test_dry_run_of_embedded_default_shows_all_six_stages(tmp_path):
    plan = planned_rules(run_snakemake(tmp_path, "-n", "all", "output/rerank/stage5_deploy/endpoint.json"))
    assert {"write_default_corpus", "sdg", "prep", "import_base_model", "finetune", "evaluate", "export_onnx",
            "deploy"} <= set(plan)


def test_lint_is_clean(tmp_path):
    proc = run_snakemake(tmp_path, "--lint", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Lints for rule" not in out and "Lints for snakefile" not in out, out[-3000:]
