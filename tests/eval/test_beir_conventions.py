"""Stage 3 follows BEIR's evaluation conventions, on a tiny BEIR folder built here (BM25 first stage: no model).

* ``eval.ignore_identical_ids``: a retrieved document whose id is the query's id is not counted (ArguAna's
  queries are corpus documents, so each query retrieves itself first);
* qrels targets missing from the corpus: a warning with their count, kept in the qrels as BEIR keeps them.
"""

from __future__ import annotations

import json
import logging

import pytest

from rerankflow.beir import write_beir
from rerankflow.config import load_config
from rerankflow.eval.evaluate import evaluate

ARGUMENTS = {
    "a1": "School uniforms reduce bullying because every pupil wears the same clothes.",
    "a2": "Uniforms do not stop bullying; pupils find other differences such as shoes and phones.",
    "b1": "Nuclear power is clean because reactors emit no carbon dioxide while running.",
    "b2": "Nuclear waste stays dangerous for thousands of years, so nuclear power is not clean.",
    "c1": "Homework helps pupils practise what they learned in class.",
    "c2": "Too much homework leaves pupils no time to rest, which harms learning.",
}
# each query is an argument of the corpus; its relevant document is the counter-argument
QRELS = {"a1": {"a2": 1}, "b1": {"b2": 1}, "c1": {"c2": 1}}


def config(tmp_path, **eval_over):
    cfg = load_config({
        "retrieval": {"first_stage": "bm25", "cache_dir": str(tmp_path / "cache")},
        "eval": {"top_k": 5, "k_values": [1, 5], "comparison_metric": "NDCG@5", "bootstrap_samples": 100, "eval_base": False,
                 "eval_finetuned": False, **eval_over},
    })
    return cfg["eval"], cfg["retrieval"], cfg["reranker"]


def run(tmp_path, data, name, **eval_over):
    eval_cfg, retrieval_cfg, reranker_cfg = config(tmp_path, **eval_over)
    out = tmp_path / name
    evaluate(data, out, eval_cfg=eval_cfg, retrieval_cfg=retrieval_cfg, reranker_cfg=reranker_cfg, device="cpu", seed=0)
    return json.loads((out / "eval_results.json").read_text()), (out / "runs" / "first_stage.trec").read_text()


@pytest.fixture
def arguana_like(tmp_path):
    corpus = {d: {"title": "", "text": t} for d, t in ARGUMENTS.items()}
    return write_beir(tmp_path / "beir", corpus, {q: ARGUMENTS[q] for q in QRELS}, QRELS)


def test_identical_ids_are_dropped_from_every_run_before_metrics(tmp_path, arguana_like):
    kept, kept_run = run(tmp_path, arguana_like, "kept", ignore_identical_ids=False)
    dropped, dropped_run = run(tmp_path, arguana_like, "dropped", ignore_identical_ids=True)
    # with the query itself retrieved first, no query has its counter-argument at rank 1
    assert kept["first_stage"]["NDCG"]["NDCG@1"] == 0.0
    assert any(line.split()[:3] == ["a1", "Q0", "a1"] for line in kept_run.splitlines())
    # BEIR's convention: the query's own document is not counted; the counter-argument comes first
    assert dropped["first_stage"]["NDCG"]["NDCG@1"] == 1.0
    assert not any(line.split()[0] == line.split()[2] for line in dropped_run.splitlines())
    fs = dropped["meta"]["first_stage"]
    assert fs["ignore_identical_ids"] is True and fs["identical_ids_dropped"] == 3
    assert kept["meta"]["first_stage"]["identical_ids_dropped"] == 0


def test_default_is_to_ignore_identical_ids():
    assert load_config()["eval"]["ignore_identical_ids"] is True


def test_qrels_targets_missing_from_the_corpus_are_a_counted_warning(tmp_path, arguana_like, caplog):
    qrels = arguana_like / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + "c1\tgone-1\t1\nb1\tgone-2\t1\n")
    with caplog.at_level(logging.WARNING):
        res, _ = run(tmp_path, arguana_like, "missing")
    assert res["meta"]["counts"]["qrels_targets_missing_from_corpus"] == 2
    warned = [r.getMessage() for r in caplog.records if "not in the corpus" in r.getMessage()]
    assert warned and "2 qrels targets" in warned[0] and "test.tsv" in warned[0]
    # kept in the qrels, as BEIR keeps them: b1 and c1 now have two relevant documents, one unretrievable
    assert res["first_stage"]["Recall"]["Recall@5"] == pytest.approx((1 + 0.5 + 0.5) / 3, abs=1e-4)


def test_results_record_the_first_stage(tmp_path, arguana_like):
    res, _ = run(tmp_path, arguana_like, "meta")
    fs = res["meta"]["first_stage"]
    assert fs["kind"] == "bm25" and fs["bm25"] == {"k1": 1.5, "b": 0.75, "stemmer": "english", "stopwords": "en"}
    assert res["meta"]["timings"]["first_stage"]["first_stage"] == "bm25"
    assert res["meta"]["models"]["retrieval_model"] is None and res["meta"]["prefixes"] is None
