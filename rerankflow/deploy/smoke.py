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


def build_smoke_request(eval_dir: str | os.PathLike, n_passages: int,
                        first_stage: tuple[str, dict[str, float]] | None = None) -> dict:
    """The smoke request: the first judged query of ``eval_dir`` and passages of the corpus.

    With ``first_stage`` (``(query id, {doc id: score})``, the first stage's candidates of that query, best
    first: :func:`rerankflow.retrieval.first_stage.first_query_candidates`) the passages are its top
    ``n_passages``, in first-stage order, with their ``first_stage_scores`` (a relevant passage the first stage
    missed replaces the last one, so the smoke test can still see it moved up). Without it: the query's
    relevant passages after other corpus passages, so that a working reranker has to move them up.

    Returns ``{"query_id", "query", "doc_ids", "passages", "relevant"}`` (+ ``first_stage_scores``); passage
    texts are ``title + " " + text``, as eval reads them.
    """
    from rerankflow.beir import load_beir, passage_text

    corpus, queries, qrels = load_beir(eval_dir, missing_docs_ok=True)
    if not queries:
        raise InputError("no query with relevance judgements; cannot build a smoke request", path=eval_dir)
    qid = next(iter(queries))
    relevant = [d for d, s in qrels.get(qid, {}).items() if s > 0 and d in corpus]
    scores = None
    if first_stage is not None:
        fs_qid, fs_scores = first_stage
        if fs_qid != qid:
            raise InputError(f"first-stage candidates are for query {fs_qid!r}, the smoke query is {qid!r}", path=eval_dir)
        doc_ids = list(fs_scores)[: max(2, n_passages)]
        if relevant and not set(relevant) & set(doc_ids):
            doc_ids[-1] = relevant[0]
        low = min(fs_scores.values())
        scores = [float(fs_scores.get(d, low)) for d in doc_ids]
        rel = [d for d in doc_ids if d in set(relevant)]
    else:
        n_rel = min(len(relevant), max(1, n_passages // 2))
        others = [d for d in corpus if d not in set(relevant)][: max(1, n_passages - n_rel)]
        doc_ids = others + relevant[:n_rel]
        rel = relevant[:n_rel]
    out = {
        "query_id": qid,
        "query": queries[qid],
        "doc_ids": doc_ids,
        "passages": [passage_text(corpus[d]) for d in doc_ids],
        "relevant": rel,
    }
    if scores is not None:
        out["first_stage_scores"] = scores
    return out


def run_smoke(url: str, smoke: dict, headers: dict | None = None, timeout_s: float = 120.0, *,
              check_fusion: bool = True) -> dict:
    """Send the smoke request to ``/v1/models``, ``/v1/ranking`` and ``/v1/rerank``; assert sane answers.

    With ``check_fusion`` (rerankflow's own server), a smoke request that carries ``first_stage_scores`` and a
    model that reports a ``fusion_weight`` are also checked end to end: the same passages sent with their
    ``first_stage_score`` must come back ordered as :func:`rerankflow.scoring.fusion.fuse_with_first_stage`
    orders the served logits. Raises ``RuntimeError`` naming what was wrong. Returns a summary with the served
    logits (and ``fused``).
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
        weight = models[0].get("fusion_weight") if models else None
        fused = None
        if check_fusion and weight is not None and smoke.get("first_stage_scores"):
            fused = _check_fused(c, model_id, smoke, {x["index"]: float(x["logit"]) for x in rankings}, float(weight))
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
        "first_stage_scores": smoke.get("first_stage_scores"),
        "fused": fused,
    }


def _check_fused(client, model_id, smoke: dict, logits: dict[int, float], weight: float) -> dict:
    """POST the smoke passages with their first-stage scores; the order must be the local fusion's."""
    from rerankflow.scoring.fusion import fuse_with_first_stage

    scores = smoke["first_stage_scores"]
    body = {"model": model_id, "query": {"text": smoke["query"]}, "truncate": "END",
            "passages": [{"text": p, "first_stage_score": s} for p, s in zip(smoke["passages"], scores)]}
    r = client.post("/v1/ranking", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"smoke POST /v1/ranking with first_stage_score answered {r.status_code}: {r.text[:300]}")
    served = [x["index"] for x in r.json().get("rankings", [])]
    expected = fuse_with_first_stage({str(i): v for i, v in logits.items()}, {str(i): s for i, s in enumerate(scores)}, weight)
    fused_scores = {int(d): s for d, s in expected.items()}
    got = [fused_scores[i] for i in served] if sorted(served) == sorted(fused_scores) else None
    if got is None or any(a < b - 1e-6 for a, b in zip(got, got[1:])):
        raise RuntimeError(f"smoke /v1/ranking with first_stage_score: served order {served} is not the fusion's "
                           f"(weight {weight}) order {[int(d) for d in expected]}")
    return {"weight": weight, "ranking_doc_ids": [smoke["doc_ids"][i] for i in served]}


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
