"""Proof that a deployed service answers: readiness polling and the smoke request built from the eval data."""

from __future__ import annotations

import math
import os
import time
from typing import Callable

from rerankflow.errors import InputError


def auth_headers(deploy_cfg: dict) -> dict:
    """``Authorization: Bearer <token>`` when ``deploy.auth_token_env`` names a variable, else ``{}``."""
    env = deploy_cfg.get("auth_token_env")
    if not env:
        return {}
    token = os.environ.get(env, "")
    if not token:
        raise InputError(f"auth is on but environment variable {env} is unset or empty", key="deploy.auth_token_env")
    return {"Authorization": f"Bearer {token}"}


def build_smoke_request(eval_dir: str | os.PathLike, n_passages: int) -> dict:
    """First query of ``eval_beir`` with its relevant passages and others from the corpus.

    Returns ``{"query_id", "query", "doc_ids", "passages", "relevant"}`` (passage texts are
    ``title + " " + text``, as eval reads them). Non-relevant passages come first so that a
    working reranker has to move the relevant ones up.
    """
    from rerankflow.beir import load_beir, passage_text

    corpus, queries, qrels = load_beir(eval_dir)
    if not queries:
        raise InputError("no query with relevance judgements; cannot build a smoke request", path=eval_dir)
    qid = next(iter(queries))
    relevant = [d for d, s in qrels.get(qid, {}).items() if s > 0 and d in corpus]
    n_rel = min(len(relevant), max(1, n_passages // 2))
    others = [d for d in corpus if d not in set(relevant)][: max(1, n_passages - n_rel)]
    doc_ids = others + relevant[:n_rel]
    return {
        "query_id": qid,
        "query": queries[qid],
        "doc_ids": doc_ids,
        "passages": [passage_text(corpus[d]) for d in doc_ids],
        "relevant": relevant[:n_rel],
    }


def run_smoke(url: str, smoke: dict, headers: dict | None = None, timeout_s: float = 120.0) -> dict:
    """Send the smoke request to ``/v1/models``, ``/v1/ranking`` and ``/v1/rerank``; assert sane answers.

    Raises ``RuntimeError`` naming what was wrong. Returns a summary with the served logits.
    """
    import httpx

    headers = headers or {}
    with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as c:
        r = c.get("/v1/models")
        if r.status_code != 200:
            raise RuntimeError(f"GET /v1/models answered {r.status_code}: {r.text[:300]}")
        models = r.json().get("data") or []
        model_id = models[0]["id"] if models else None
        body = {"model": model_id, "query": {"text": smoke["query"]}, "passages": [{"text": p} for p in smoke["passages"]], "truncate": "END"}
        t0 = time.perf_counter()
        r = c.post("/v1/ranking", json=body)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if r.status_code != 200:
            raise RuntimeError(f"smoke POST /v1/ranking answered {r.status_code}: {r.text[:300]}")
        rankings = r.json().get("rankings")
        n = len(smoke["passages"])
        if not isinstance(rankings, list) or sorted(x.get("index") for x in rankings) != list(range(n)):
            raise RuntimeError(f"smoke /v1/ranking: rankings are not a permutation of the {n} passages: {rankings!r:.300}")
        logits = [x.get("logit") for x in rankings]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in logits):
            raise RuntimeError(f"smoke /v1/ranking: non-finite logits {logits}")
        if any(a < b for a, b in zip(logits, logits[1:])):
            raise RuntimeError(f"smoke /v1/ranking: rankings not sorted by logit: {logits}")
        r2 = c.post("/v1/rerank", json={"model": model_id, "query": smoke["query"], "documents": smoke["passages"], "top_n": n})
        rerank_ok = r2.status_code == 200 and [x["index"] for x in r2.json().get("results", [])] == [x["index"] for x in rankings]
    by_index = {x["index"]: float(x["logit"]) for x in rankings}
    order = [x["index"] for x in rankings]
    rel_idx = [smoke["doc_ids"].index(d) for d in smoke["relevant"]]
    return {
        "passed": True,
        "query_id": smoke["query_id"],
        "n_passages": n,
        "model_id": model_id,
        "latency_ms": round(latency_ms, 1),
        "ranking_doc_ids": [smoke["doc_ids"][i] for i in order],
        "logits": [by_index[i] for i in range(n)],
        "best_relevant_rank": (min(order.index(i) for i in rel_idx) + 1) if rel_idx else None,
        "rerank_api_agrees": bool(rerank_ok),
    }


def wait_ready(url: str, timeout_s: float, *, alive: Callable[[], str | None] | None = None, interval_s: float = 0.5, headers: dict | None = None) -> float:
    """Poll ``url/v1/health/ready`` until 200; returns seconds waited.

    ``alive()`` returns a reason string when the server died (checked every poll), so a crash
    fails fast instead of waiting out the timeout.
    """
    import httpx

    t0 = time.monotonic()
    last = "no answer yet"
    while True:
        if alive is not None:
            dead = alive()
            if dead:
                raise RuntimeError(f"server exited before it was ready: {dead}")
        try:
            r = httpx.get(f"{url}/v1/health/ready", timeout=5.0, headers=headers or {})
            if r.status_code == 200:
                return time.monotonic() - t0
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        waited = time.monotonic() - t0
        if waited > timeout_s:
            raise TimeoutError(f"{url}/v1/health/ready not ready after {timeout_s:.0f}s (last: {last})")
        time.sleep(interval_s)
