"""The first-stage choice on a tiny hand-made corpus, with real components (bm25s, the packaged MiniLM)."""

from __future__ import annotations

import pytest

from rerankflow.config import load_config
from rerankflow.errors import InputError
from rerankflow.retrieval.bm25 import BM25Settings, bm25_retrieve
from rerankflow.retrieval.first_stage import FirstStage, check_first_stage_config
from rerankflow.retrieval.fusion import convex_fusion, reciprocal_rank_fusion, truncate
from rerankflow.retrieval.retriever import Retriever
from rerankflow.retrieval.trec_run import write_trec_run

CORPUS = {
    "d-bee": {"title": "Honeybees", "text": "A honeybee colony keeps its hive warm in winter by shivering."},
    "d-tide": {"title": "Tides", "text": "Ocean tides rise and fall because the moon pulls on the water."},
    "d-volc": {"title": "Volcanoes", "text": "Lava erupts from a volcano when magma pressure builds up below."},
    "d-bread": {"title": "Bread", "text": "Yeast makes bread dough rise by releasing carbon dioxide gas."},
    "d-moon": {"title": "The Moon", "text": "The moon orbits the earth about once every twenty seven days."},
    "d-hive": {"title": "Beekeeping", "text": "Beekeepers open the hive in spring to check the bees and honey."},
}
QUERIES = {"q1": "why do tides rise and fall", "q2": "how do bees keep the hive warm", "q3": "what makes dough rise"}


def section(tmp_path, **over) -> dict:
    # dense unless a test says otherwise: the tests here are about each first stage, not the default
    retrieval = {"cache_dir": str(tmp_path / "cache"), "max_length": 128, "first_stage": "dense"}
    retrieval.update(over)
    return load_config({"retrieval": retrieval})["retrieval"]


def stage(tmp_path, **over) -> FirstStage:
    return FirstStage.from_config(section(tmp_path, **over), device="cpu")


def test_dense_is_the_retriever(tmp_path):
    run, info = stage(tmp_path).retrieve(CORPUS, QUERIES, top_k=3)
    direct, _ = Retriever.from_config(section(tmp_path), device="cpu").retrieve(CORPUS, QUERIES, 3)
    assert run == direct
    assert info["first_stage"] == "dense" and "embed_corpus_s" in info and info["total_s"] >= 0
    assert next(iter(run["q1"])) == "d-tide" and next(iter(run["q2"])) in {"d-bee", "d-hive"}


def test_bm25_is_bm25s_with_the_section_settings(tmp_path):
    fs = stage(tmp_path, first_stage="bm25", bm25={"k1": 1.2})
    run, info = fs.retrieve(CORPUS, QUERIES, top_k=2)
    direct, _ = bm25_retrieve(CORPUS, QUERIES, 2, BM25Settings(1.2, 0.75, "english", "en"), None)
    assert run == direct and info["first_stage"] == "bm25"
    assert list(run["q3"])[0] == "d-bread" and all(len(d) <= 2 for d in run.values())
    assert list((tmp_path / "cache").glob("bm25-*")), "index cached under retrieval.cache_dir"
    assert fs.retrieve(CORPUS, QUERIES, top_k=2)[1]["cache_hit"] is True
    assert fs.settings() == {"kind": "bm25", "bm25": {"k1": 1.2, "b": 0.75, "stemmer": "english", "stopwords": "en"}}


@pytest.mark.parametrize("method", ["rrf", "convex"])
def test_hybrid_is_the_fusion_of_the_single_runs(tmp_path, method):
    hybrid = {"method": method, "rrf_k": 10, **({"weights": [0.3, 0.7]} if method == "convex" else {})}
    run, info = stage(tmp_path, first_stage="hybrid", hybrid=hybrid).retrieve(CORPUS, QUERIES, top_k=3)
    bm25, _ = stage(tmp_path, first_stage="bm25").retrieve(CORPUS, QUERIES, top_k=3)
    dense, _ = stage(tmp_path).retrieve(CORPUS, QUERIES, top_k=3)
    fused = reciprocal_rank_fusion([bm25, dense], 10) if method == "rrf" else convex_fusion([bm25, dense], [0.3, 0.7])
    assert run == truncate(fused, 3)
    assert info["first_stage"] == "hybrid" and set(info["sources"]) == {"bm25", "dense"}
    assert info["sources"]["dense"]["first_stage"] == "dense"


def test_run_file_restricted_to_asked_queries_and_cut_to_top_k(tmp_path):
    path = write_trec_run(tmp_path / "mine.trec", {"q1": {"d-moon": 3.0, "d-tide": 2.0, "d-bee": 1.0},
                                                   "q2": {"d-hive": 5.0}, "q9": {"d-volc": 1.0}}, "es")
    fs = stage(tmp_path, first_stage="run", run_file=str(path))
    run, info = fs.retrieve(CORPUS, {"q1": QUERIES["q1"], "q2": QUERIES["q2"]}, top_k=2)
    assert run == {"q1": {"d-moon": 3.0, "d-tide": 2.0}, "q2": {"d-hive": 5.0}}
    assert info["first_stage"] == "run" and fs.settings()["run"]["run_file"] == str(path)
    with pytest.raises(InputError, match=r"mine\.trec.*'q3'"):
        fs.retrieve(CORPUS, QUERIES, top_k=2)


def test_run_file_bad_line_and_unknown_document_name_file_and_line(tmp_path):
    path = tmp_path / "bad.trec"
    path.write_text("q1 Q0 d-tide 1 2.0 es\nq1 Q0 d-moon two 1.0 es\n")
    fs = stage(tmp_path, first_stage="run", run_file=str(path))
    with pytest.raises(InputError, match=r"bad\.trec:2: .*rank 'two'"):
        fs.retrieve(CORPUS, QUERIES, top_k=2)
    path.write_text("q1 Q0 d-tide 1 2.0 es\nq2 Q0 d-nowhere 1 1.0 es\n")
    with pytest.raises(InputError, match=r"bad\.trec:2: .*'d-nowhere'"):
        fs.retrieve(CORPUS, QUERIES, top_k=2)


@pytest.mark.parametrize("over, key", [
    ({"first_stage": "run"}, "retrieval.run_file"),
    ({"first_stage": "run", "run_file": "/no/such.trec"}, "retrieval.run_file"),
    ({"first_stage": "hybrid", "hybrid": {"sources": ["bm25", "run"]}}, "retrieval.run_file"),
    ({"first_stage": "hybrid", "hybrid": {"method": "convex"}}, "retrieval.hybrid.weights"),
    ({"first_stage": "hybrid", "hybrid": {"method": "convex", "weights": [1.0]}}, "retrieval.hybrid.weights"),
    ({"first_stage": "hybrid", "hybrid": {"method": "convex", "weights": [0.5, 0.6]}}, "retrieval.hybrid.weights"),
    ({"first_stage": "bm25", "bm25": {"stemmer": "klingon"}}, "retrieval.bm25.stemmer"),
])
def test_cross_key_checks_name_the_key(tmp_path, over, key):
    with pytest.raises(InputError, match=f"config key '{key}'"):
        check_first_stage_config(section(tmp_path, **over))


def test_valid_choices_pass_and_the_default_is_hybrid(tmp_path):
    default = load_config({})["retrieval"]
    assert default["first_stage"] == "hybrid" and default["hybrid"]["sources"] == ["bm25", "dense"]
    assert default["hybrid"]["method"] == "rrf"
    check_first_stage_config(default)
    check_first_stage_config(section(tmp_path))
    check_first_stage_config(section(tmp_path, first_stage="hybrid",
                                     hybrid={"method": "convex", "weights": [0.25, 0.75]}))
    # a run file that is not used needs no checking
    check_first_stage_config(section(tmp_path, first_stage="bm25", run_file="/no/such.trec"))
