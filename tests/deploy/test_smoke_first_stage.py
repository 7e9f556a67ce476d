"""The deploy smoke request built from the first stage's candidates (issue 14, item 1)."""

import pytest

from rerankflow.beir import write_beir
from rerankflow.config import load_config
from rerankflow.deploy.smoke import build_smoke_request
from rerankflow.errors import InputError
from rerankflow.retrieval.first_stage import first_query_candidates


@pytest.fixture
def beir(tmp_path):
    corpus = {"d0": {"title": "", "text": "honey bees make honey from nectar"},
              "d1": {"title": "", "text": "bees live in a hive"},
              "d2": {"title": "", "text": "the moon pulls the tides"},
              "d3": {"title": "", "text": "honey keeps for years"},
              "d4": {"title": "", "text": "lava flows from volcanoes"}}
    return write_beir(tmp_path / "b", corpus, {"q1": "how do bees make honey", "q2": "what moves tides"},
                      {"q1": {"d0": 1}, "q2": {"d2": 1}})


def test_smoke_request_sends_the_first_stage_candidates(beir, tmp_path):
    retrieval = load_config({"retrieval": {"first_stage": "bm25", "cache_dir": str(tmp_path / "cache")}})["retrieval"]
    qid, cands = first_query_candidates(beir, retrieval, 3, device="cpu")
    assert qid == "q1" and list(cands)[0] == "d0" and len(cands) <= 3 and "d2" not in cands
    smoke = build_smoke_request(beir, 3, (qid, cands))
    assert smoke["doc_ids"] == list(cands) and smoke["first_stage_scores"] == list(cands.values())
    assert smoke["relevant"] == ["d0"] and smoke["passages"][0].endswith("honey bees make honey from nectar")
    # a relevant passage the first stage missed replaces the last candidate, so the smoke test can see it
    missed = build_smoke_request(beir, 2, ("q1", {"d3": 2.0, "d1": 1.0}))
    assert missed["doc_ids"] == ["d3", "d0"] and missed["relevant"] == ["d0"] and missed["first_stage_scores"] == [2.0, 1.0]
    with pytest.raises(InputError, match="candidates are for query 'q2'"):
        build_smoke_request(beir, 2, ("q2", {"d2": 1.0}))
    plain = build_smoke_request(beir, 4)
    assert "first_stage_scores" not in plain and plain["doc_ids"][-1] == "d0"
