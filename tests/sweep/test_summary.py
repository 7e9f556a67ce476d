"""rerankflow.sweep.summary: rows from each variant's files, the choice made on validation only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rerankflow.eval.metrics import aggregate
from rerankflow.io import write_json, write_jsonl
from rerankflow.sweep.summary import choose, exported_variant, summarize, write_summary

K = [1, 10]
QIDS = [f"q{i}" for i in range(8)]


def per_query(ndcg10: list[float]) -> dict:
    return {q: {"NDCG@1": v, "NDCG@10": v, "MRR@1": v, "MRR@10": v, "Recall@1": v, "Recall@10": 1.0,
                "MAP@1": v, "MAP@10": v, "P@1": v, "P@10": v / 10} for q, v in zip(QIDS, ndcg10)}


def eval_files(d, systems: dict) -> dict:
    results = {s: aggregate(pq, K) for s, pq in systems.items()}
    results["meta"] = {"k_values": K, "counts": {"queries_evaluated": len(QIDS)}, "models": {"base": "base-model"},
                       "timings": {s: {"scored_pairs": 80} for s in systems}}
    write_json(d / "eval_results.json", results)
    write_json(d / "per_query.json", {"systems": systems})
    return results


def training_files(d, val: list[float], best: float | None):
    log = [{"event": "start", "time": 100.0}]
    log += [{"event": "val", "step": 2 * (i + 1), "val_ndcg@10": v} for i, v in enumerate(val)]
    log += [{"event": "end", "time": 130.5}]
    write_jsonl(d / "training_log.jsonl", log)
    write_json(d / "training_summary.json", {"steps": 2 * len(val), "best": "epoch_0_step_2", "best_val_ndcg@10": best,
                                             "pairs_per_s": 3.5, "stopped_early": False})


FIRST = per_query([0.3] * 8)
BASE = per_query([0.5] * 8)


@pytest.fixture()
def sweep_dirs(tmp_path):
    """Variant A: best on validation, worse on test. Variant B: worse on validation, best on test."""
    base = tmp_path / "base"
    base.mkdir()
    eval_files(base, {"first_stage": FIRST, "base": BASE})
    dirs = {}
    for vid, val, test in (("lr=A", [0.70, 0.80], [0.55] * 8), ("lr=B", [0.60, 0.75], [0.9] * 8)):
        t, e = tmp_path / vid / "train", tmp_path / vid / "eval"
        t.mkdir(parents=True)
        e.mkdir(parents=True)
        training_files(t, val, max(val))
        eval_files(e, {"first_stage": FIRST, "finetuned": per_query(test)})
        dirs[vid] = {"training": str(t), "eval": str(e)}
    variants = [{"id": "lr=A", "settings": {"finetune.learning_rate": 1e-5}},
                {"id": "lr=B", "settings": {"finetune.learning_rate": 2e-5}}]
    return base, variants, dirs


def run(sweep_dirs):
    base, variants, dirs = sweep_dirs
    return summarize("s", variants, base, dirs, metric="NDCG@10", bootstrap_samples=200, confidence=0.95, seed=1)


def test_the_choice_is_made_on_validation_never_on_test(sweep_dirs):
    s = run(sweep_dirs)
    rows = {r["id"]: r for r in s["variants"]}
    assert rows["lr=B"]["test"]["NDCG@10"] > rows["lr=A"]["test"]["NDCG@10"]  # test prefers B ...
    assert rows["lr=A"]["val"]["best"] > rows["lr=B"]["val"]["best"]          # ... validation prefers A
    assert s["chosen"] == "lr=A" and rows["lr=A"]["chosen"] and not rows["lr=B"]["chosen"]
    # B against the chosen A: a paired test-set comparison, reported only
    assert rows["lr=B"]["vs_chosen"]["delta"] == pytest.approx(0.35) and rows["lr=A"]["vs_chosen"] is None


def test_choose_reads_validation_only_and_ties_go_to_the_earlier_variant():
    rows = [{"id": "a", "val": {"best": 0.8}, "test": {"NDCG@10": 0.1}},
            {"id": "b", "val": {"best": 0.8}, "test": {"NDCG@10": 0.9}},
            {"id": "c", "val": {"best": None}, "test": {"NDCG@10": 1.0}}]
    assert choose(rows) == "a"
    assert choose([{"id": "c", "val": {"best": None}}]) is None


def test_rows_hold_each_variants_metrics_comparisons_and_training(sweep_dirs):
    s = run(sweep_dirs)
    _base, _variants, dirs = sweep_dirs
    for row in s["variants"]:
        results = json.loads(Path(dirs[row["id"]]["eval"], "eval_results.json").read_text())
        assert row["test"]["NDCG@10"] == results["finetuned"]["NDCG"]["NDCG@10"]
        assert row["test"]["MRR@10"] == results["finetuned"]["MRR"]["MRR@10"]
        assert row["vs_base"]["a"] == pytest.approx(0.5) and row["vs_base"]["n_queries"] == 8
        assert row["train"] == {"steps": 4, "wall_s": 30.5, "pairs_per_s": 3.5, "resumed": False, "stopped_early": False}
        assert row["val"]["best_step"] == 4 and row["same_first_stage_as_base"]
    assert s["base"]["test"]["NDCG@10"] == pytest.approx(0.5) and s["first_stage"]["test"]["NDCG@10"] == pytest.approx(0.3)
    assert not s["warnings"]


def test_summary_files(sweep_dirs, tmp_path):
    s = run(sweep_dirs)
    out = {k: tmp_path / f"summary.{k}" for k in ("json", "md", "tsv", "png")}
    write_summary(s, json_path=out["json"], md_path=out["md"], tsv_path=out["tsv"], png_path=out["png"])
    assert json.loads(out["json"].read_text())["chosen"] == "lr=A"
    md = out["md"].read_text()
    assert "Chosen on validation: **`lr=A`**" in md and "| **lr=A** | **CHOSEN (validation)**" in md
    tsv = [line.split("\t") for line in out["tsv"].read_text().splitlines()]
    assert [r[0] for r in tsv] == ["variant", "first_stage", "base", "lr=A", "lr=B"]
    assert out["png"].read_bytes()[:4] == b"\x89PNG"


def test_export_best_is_the_chosen_variant():
    assert exported_variant("best", {"chosen": "lr=A"}) == "lr=A"
    assert exported_variant("lr=B", None) == "lr=B"
    with pytest.raises(ValueError, match="chose no variant"):
        exported_variant("best", {"chosen": None})
