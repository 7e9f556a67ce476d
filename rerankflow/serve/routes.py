"""The HTTP endpoints of the ranking service, bound to one scorer, batcher and settings (:class:`Routes`)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, Sequence

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from rerankflow.scoring.onnx_scorer import OnnxScorer, sigmoid
from rerankflow.serve.api import LIVE_BODY, NOT_READY_BODY, READY_BODY, ApiError, RankingRequest, RerankRequest, validation_detail
from rerankflow.serve.batcher import DynamicBatcher
from rerankflow.serve.metrics import METRICS_PATH, ServeMetrics
from rerankflow.serve.settings import ServeSettings

log = logging.getLogger("rerankflow.serve.app")


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone (its request body must already be read).

    After the body, the server's ``receive`` only answers ``http.disconnect`` (when the client hangs up
    or the response is complete), so waiting on it costs nothing while the request is scored.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def count_words(text: str | tuple[str, str]) -> int:
    """Whitespace-separated words of a tokenizer input: a lower bound of its tokens for every subword
    tokenizer we serve (WordPiece, BPE, SentencePiece split at least at whitespace)."""
    return sum(len(t.split()) for t in text) if isinstance(text, tuple) else len(text.split())


class Routes:
    """Request handling: auth, body limits, validation, scoring (batched or direct) and the answers.

    ``state["ready"]`` is flipped by the app's lifespan; ``/v1/health/ready`` reports it (and the
    batcher's liveness).
    """

    def __init__(self, settings: ServeSettings, scorer: OnnxScorer, batcher: DynamicBatcher | None,
                 token: str | None, model_name: str, state: dict, fusion_weight: float | None = None,
                 metrics: ServeMetrics | None = None):
        self.settings, self.scorer, self.batcher, self.token = settings, scorer, batcher, token
        self.model_name, self.state = model_name, state
        self.fusion_weight = fusion_weight  # settings.fusion_weight, else the export record's; None: no fusion
        self.created = int(time.time())
        self.admitted_pairs = 0  # pairs of requests being tokenized, queued or scored (bounded by max_queued_pairs)
        self.cancelled_requests = 0  # requests whose client went away before their answer (their queued pairs dropped)
        self.metrics = metrics if metrics is not None else ServeMetrics(paths=())

    def register(self, app) -> None:
        """Add every endpoint to the FastAPI ``app``."""
        app.get("/v1/health/live")(self.live)
        app.get("/v1/health/ready")(self.ready)
        app.get("/v1/models")(self.models)
        app.get(METRICS_PATH, include_in_schema=False)(self.metrics_text)
        app.post("/v1/ranking")(self.ranking)
        app.post("/v1/rerank")(self.rerank)
        app.post("/v2/rerank", include_in_schema=False)(self.rerank)  # Cohere v2 clients
        app.post("/rerank", include_in_schema=False)(self.rerank)  # Infinity clients

    # ------------------------------------------------------------------ request checks
    def check_auth(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "invalid bearer token")

    async def read_json(self, request: Request) -> Any:
        # A JSON API only takes JSON: a browser may send text/plain or a form cross-site without a CORS
        # preflight, so anything else is refused before the body is read.
        content_type = request.headers.get("content-type", "")
        mime = content_type.split(";")[0].strip().lower()
        if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type must be application/json, got {content_type or 'none'}")
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, "payload_too_large", f"request body of {length} bytes exceeds max_body_bytes={limit}")
        chunks, size = [], 0
        timeout_s = float(self.settings.body_timeout_s)
        try:
            async with asyncio.timeout(timeout_s):  # a slow (or stalled) body must not hold a connection forever
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, "payload_too_large", f"request body exceeds max_body_bytes={limit}")
                    chunks.append(chunk)
        except ClientDisconnect:  # hung up in the middle of its body: nobody to answer, not a server error
            self.cancelled_requests += 1
            raise ClientGone() from None
        except TimeoutError:
            raise ApiError(408, "request_timeout", f"request body not received within body_timeout_s={timeout_s:g} s "
                                                   f"({size} bytes arrived)", headers={"Connection": "close"}) from None
        raw = b"".join(chunks)
        if not raw.strip():
            raise ApiError(400, "invalid_request", "empty request body; expected a JSON object")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting or integers
            raise ApiError(400, "invalid_json", f"request body is not valid JSON: {str(exc)[:200]}") from None

    def parse(self, model_cls, body: Any, list_key: str):
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_request", f"expected a JSON object, got {type(body).__name__}")
        items = body.get(list_key)
        limit = self.settings.max_passages
        if isinstance(items, list) and len(items) > limit:
            raise ApiError(400, "too_many_passages", f"{list_key} has {len(items)} entries; at most max_passages={limit} per request")
        try:
            return model_cls.model_validate(body)
        except ValidationError as err:
            detail = validation_detail(err)
            first = detail[0]
            msg = f"invalid request: {'.'.join(str(x) for x in first['loc']) or 'body'}: {first['msg']}"
            if len(detail) > 1:
                msg += f" (and {len(detail) - 1} more)"
            raise ApiError(422, "invalid_request", msg, detail) from None

    def check_texts(self, query: str, texts: Sequence[str], list_key: str) -> None:
        """Sizes within ``max_text_chars`` and text that is valid Unicode, checked before any tokenizing.

        JSON may carry a lone UTF-16 surrogate (``"\\ud800"``) that Python decodes into a ``str`` no tokenizer
        accepts: it is the client's error (422 naming the field), never a 500 that drops the connection.
        """
        limit = self.settings.max_text_chars
        named = [("query", query)] + [(f"{list_key}[{i}]", t) for i, t in enumerate(texts)]
        for name, text in named:
            if len(text) > limit:
                where = f"{name} has {len(text)} characters; at most max_text_chars={limit}"
                raise ApiError(400, "text_too_long", where)
        for name, text in named:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(422, "invalid_request", f"{name} is not valid Unicode text: a lone surrogate "
                                                       f"(U+{ord(text[exc.start]):04X}) at character {exc.start}") from None

    # ------------------------------------------------------------------ scoring
    def check_lengths(self, query: str, texts: Sequence[str], truncate: str, list_key: str) -> None:
        """Token-length errors found cheaply, before the request's pairs are tokenized.

        A query that fills ``max_length`` on its own (with an empty passage) leaves no room for any passage:
        every pair would be cut to the same tokens and get the same logit, so it is a 400 in either truncate
        mode. With ``truncate: NONE``, pairs whose word count alone exceeds ``max_length`` (a word is at least
        one token) are refused after counting the tokens of at most five of them, not of the whole request.
        """
        scorer = self.scorer
        limit = scorer.max_length
        (query_tokens,) = scorer.count_tokens([scorer.format(query, "")])
        if query_tokens >= limit:
            raise ApiError(400, "query_too_long",
                           f"query has {query_tokens} tokens with the prompt (and an empty passage); max_length={limit} "
                           "leaves no room for a passage: shorten the query")
        if truncate == "NONE":
            over = [i for i, t in enumerate(texts) if count_words(scorer.format(query, t)) > limit]
            if over:
                self.raise_too_long(query, texts, over, list_key)

    def raise_too_long(self, query: str, texts: Sequence[str], over: list[int], list_key: str) -> None:
        scorer = self.scorer
        counts = scorer.count_tokens([scorer.format(query, texts[i]) for i in over[:5]])
        shown = ", ".join(f"{list_key}[{i}] ({c} tokens)" for i, c in zip(over, counts))
        raise ApiError(
            400, "input_too_long",
            f"{len(over)}{'+' if len(over) > 5 else ''} query+passage pair(s) exceed the model's max_length={scorer.max_length} "
            f"tokens: {shown}{' ...' if len(over) > 5 else ''}; send \"truncate\": \"END\" to truncate them",
        )

    def admit(self, n_pairs: int) -> None:
        """Take ``n_pairs`` from the ``max_queued_pairs`` budget, or answer 503 with ``Retry-After``."""
        limit = self.settings.max_queued_pairs
        if self.admitted_pairs and self.admitted_pairs + n_pairs > limit:
            raise ApiError(503, "overloaded",
                           f"server busy: {self.admitted_pairs} pairs queued or being scored, this request adds {n_pairs} "
                           f"(max_queued_pairs={limit}); retry after {self.settings.retry_after_s} s",
                           headers={"Retry-After": str(int(self.settings.retry_after_s))})
        self.admitted_pairs += n_pairs

    async def run_scoring(self, encoded) -> np.ndarray:
        if self.batcher is not None:
            return await self.batcher.submit(encoded)
        # without the batcher: the scorer's own chunks, one thread-pool call each, so that a cancelled request
        # (client gone) stops after the chunk that is running
        scorer = self.scorer
        logits = np.empty(len(encoded), dtype=np.float32)
        for rows in scorer.plan(encoded):
            chunk = [encoded[i] for i in rows]
            self.metrics.batch_started(len(chunk), len(chunk) * max(len(e) for e in chunk), ())
            logits[rows] = await run_in_threadpool(scorer.run_chunk, chunk)
            self.metrics.batch_scored(len(chunk))
        return logits

    async def until_scored_or_gone(self, request: Request, coro):
        """Await ``coro``; if the client disconnects first, cancel it (its queued pairs are dropped) and
        raise :class:`ClientGone`."""
        work = asyncio.ensure_future(coro)
        watch = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
            watch.cancel()
        if work.cancelled() or (not work.done()):
            self.cancelled_requests += 1
            log.info("client %s went away: %d pairs of its request dropped", (request.client or ("-",))[0],
                     getattr(request.state, "pairs", 0))
            raise ClientGone()
        return work.result()

    async def score(self, request: Request, query: str, texts: list[str], truncate: str, list_key: str):
        """``(logits, order best first, tokens)``; over-long pairs are a 400 with ``truncate: NONE``."""
        scorer = self.scorer
        self.check_texts(query, texts, list_key)
        self.check_lengths(query, texts, truncate, list_key)
        self.admit(len(texts))
        try:
            encoded = await run_in_threadpool(scorer.encode_pairs, query, texts)
            if truncate == "NONE":
                over = [i for i, e in enumerate(encoded) if e.truncated]
                if over:
                    self.raise_too_long(query, texts, over, list_key)
            request.state.pairs = len(encoded)
            logits = await self.until_scored_or_gone(request, self.run_scoring(encoded))
        finally:
            self.admitted_pairs -= len(texts)
        order = np.argsort(-logits, kind="stable")
        return logits, order, sum(len(e) for e in encoded)

    # ------------------------------------------------------------------ endpoints
    async def live(self):
        return LIVE_BODY

    async def ready(self):
        from fastapi.responses import JSONResponse

        if not (self.state["ready"] and (self.batcher is None or self.batcher.running)):
            return JSONResponse(status_code=503, content=NOT_READY_BODY)
        return READY_BODY

    async def metrics_text(self, request: Request):
        """Prometheus text format of :class:`~rerankflow.serve.metrics.ServeMetrics` (bearer token as for the API)."""
        from fastapi.responses import Response

        self.check_auth(request)
        return Response(content=self.metrics.exposition(), media_type=self.metrics.content_type)

    async def models(self, request: Request):
        self.check_auth(request)
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "rerankflow",
                      "max_length": self.scorer.max_length, "input_format": self.scorer.input_format,
                      "fusion_weight": self.fusion_weight}],
        }

    def first_stage_scores(self, passages) -> list[float] | None:
        """The passages' ``first_stage_score`` values (all of them) or None (none); some is a 422, and scores
        without a fusion weight are a 400."""
        given = [i for i, p in enumerate(passages) if p.first_stage_score is not None]
        if not given:
            return None
        if len(given) < len(passages):
            missing = next(i for i, p in enumerate(passages) if p.first_stage_score is None)
            raise ApiError(422, "invalid_request",
                           f"invalid request: passages.{missing}.first_stage_score: missing; send first_stage_score "
                           f"with every passage or with none ({len(given)} of {len(passages)} passages carry it)")
        if self.fusion_weight is None:
            raise ApiError(400, "fusion_unavailable",
                           "passages carry first_stage_score but this model has no fusion weight: the export record "
                           "holds none (no weight was chosen on validation) and deploy.fusion_weight is null; "
                           "send the passages without first_stage_score, or set deploy.fusion_weight")
        return [float(p.first_stage_score) for p in passages]

    async def ranking(self, request: Request):
        self.check_auth(request)
        req = self.parse(RankingRequest, await self.read_json(request), "passages")
        texts = [p.text for p in req.passages]
        first_stage = self.first_stage_scores(req.passages)
        truncate = req.truncate or self.settings.default_truncate
        logits, order, tokens = await self.score(request, req.query.text, texts, truncate, "passages")
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        if first_stage is None:
            return {"rankings": [{"index": int(i), "logit": float(logits[i])} for i in order], "usage": usage}
        from rerankflow.scoring.fusion import fuse_with_first_stage

        keys = [f"{i:09d}" for i in range(len(texts))]  # ties in the fused score keep passage order
        fused = fuse_with_first_stage(dict(zip(keys, map(float, logits))), dict(zip(keys, first_stage)), self.fusion_weight)
        return {
            "rankings": [{"index": int(k), "logit": float(logits[int(k)]), "fused_score": float(v)} for k, v in fused.items()],
            "usage": usage,
        }

    async def rerank(self, request: Request):
        self.check_auth(request)
        req = self.parse(RerankRequest, await self.read_json(request), "documents")
        texts = [d if isinstance(d, str) else d.text for d in req.documents]
        logits, order, tokens = await self.score(request, req.query, texts, req.truncate or "END", "documents")
        scores = sigmoid(logits)
        top = order[: req.top_n] if req.top_n else order
        results = []
        for i in top:
            r = {"index": int(i), "relevance_score": float(scores[i])}
            if req.return_documents:
                r["document"] = {"text": texts[i]}
            results.append(r)
        return {
            "object": "rerank",
            "id": str(uuid.uuid4()),
            "model": self.model_name,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
