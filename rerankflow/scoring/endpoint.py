"""Client of a served ranking endpoint (NVIDIA NIM shape), scoring a first-stage run.

:class:`EndpointRanker` sends a query's candidates to ``POST /v1/ranking``
(``{"model", "query": {"text"}, "passages": [{"text"}], "truncate"}`` ->
``{"rankings": [{"index", "logit"}]}``) in batches of ``batch_size`` passages, with up to
``concurrency`` requests in flight, retrying 429/5xx/timeouts with backoff. It returns **raw logits**,
comparable with :class:`rerankflow.scoring.cross_encoder.CrossEncoderScorer`'s.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from rerankflow.beir import passage_text

log = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """The ranking endpoint could not be reached or answered something unusable."""


def ranking_url(endpoint: str) -> str:
    """Accept a base URL (``http://host:8000``, ``.../v1``) or the full ``.../v1/ranking`` URL."""
    url = endpoint.rstrip("/")
    if url.endswith("/ranking") or url.endswith("/reranking"):
        return url
    if url.endswith("/v1"):
        return url + "/ranking"
    return url + "/v1/ranking"


class EndpointRanker:
    """Client of a served ``POST /v1/ranking`` (NVIDIA NIM request/response shape).

    ``api_key_env`` names an environment variable whose value is sent as a bearer token; the
    key itself is never logged or written anywhere.
    """

    RETRY_STATUS = {408, 429, 500, 502, 503, 504}

    def __init__(self, endpoint: str, model: str, *, batch_size: int, concurrency: int, timeout: float,
                 truncate: str, retries: int, api_key_env: str | None):
        import httpx

        self.url = ranking_url(endpoint)
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.concurrency = max(1, int(concurrency))
        self.truncate = truncate
        self.retries = int(retries)
        headers = {"accept": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise EndpointError(f"eval.endpoint_api_key_env names {api_key_env!r}, which is not set in the environment")
            headers["authorization"] = f"Bearer {key}"
        self._client = httpx.Client(timeout=timeout, headers=headers,
                                    limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))

    def close(self):
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def rank(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """Logits of ``passages`` for ``query`` in one request, aligned with ``passages``."""
        import httpx

        body = {"model": self.model, "query": {"text": query}, "passages": [{"text": p} for p in passages],
                "truncate": self.truncate}
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                resp = self._client.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if attempt == self.retries:
                    raise EndpointError(f"POST {self.url} failed after {attempt + 1} attempts: {exc!r}") from None
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status_code in self.RETRY_STATUS and attempt < self.retries:
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status_code != 200:
                raise EndpointError(f"POST {self.url} answered HTTP {resp.status_code}: {resp.text[:300]}")
            return self._parse(resp, len(passages))
        raise EndpointError(f"POST {self.url}: no answer")  # pragma: no cover

    def _parse(self, resp, n: int) -> np.ndarray:
        try:
            rankings = resp.json()["rankings"]
            scores = np.full(n, np.nan, dtype=np.float64)
            for r in rankings:
                scores[int(r["index"])] = float(r["logit"])
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise EndpointError(f"POST {self.url}: response is not {{'rankings': [{{'index', 'logit'}}]}} for {n} passages ({exc!r}): {resp.text[:300]}") from None
        if np.isnan(scores).any():
            missing = [int(i) for i in np.flatnonzero(np.isnan(scores))[:5]]
            raise EndpointError(f"POST {self.url}: response lacks rankings for passage indexes {missing} (of {n})")
        return scores.astype(np.float32)

    def rerank_run(self, run, queries, corpus, desc: str = "endpoint") -> dict:
        """Score every candidate of ``run`` through the endpoint; returns ``{qid: {doc_id: logit}}``."""
        jobs = []
        for qid, docs in run.items():
            dids = list(docs)
            for start in range(0, len(dids), self.batch_size):
                chunk = dids[start:start + self.batch_size]
                jobs.append((qid, chunk))
        out: dict[str, dict[str, float]] = {qid: {} for qid in run}

        def work(job):
            qid, chunk = job
            return qid, chunk, self.rank(queries[qid], [passage_text(corpus[d]) for d in chunk])

        from tqdm.auto import tqdm

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for qid, chunk, scores in tqdm(pool.map(work, jobs), total=len(jobs), desc=desc, unit="req", mininterval=2.0):
                for did, s in zip(chunk, scores):
                    out[qid][did] = float(s)
        return out


def discover_endpoint_model(endpoint: str, timeout: float) -> str:
    """The first model id a served endpoint lists under ``GET /v1/models``."""
    import httpx

    url = ranking_url(endpoint).rsplit("/", 1)[0] + "/models"
    try:
        resp = httpx.get(url, timeout=timeout)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except Exception as exc:
        raise EndpointError(f"eval.endpoint_model is not set and GET {url} did not name a model ({exc!r}); "
                            "set eval.endpoint_model") from None
