"""The HTTP endpoints of the ranking service, bound to one scorer, batcher and settings (:class:`Routes`)."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from typing import Any, Sequence

import numpy as np
from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from rerankflow.scoring.onnx_scorer import OnnxScorer, sigmoid
from rerankflow.serve.api import LIVE_BODY, NOT_READY_BODY, READY_BODY, ApiError, RankingRequest, RerankRequest, validation_detail
from rerankflow.serve.batcher import DynamicBatcher
from rerankflow.serve.settings import ServeSettings


class Routes:
    """Request handling: auth, body limits, validation, scoring (batched or direct) and the answers.

    ``state["ready"]`` is flipped by the app's lifespan; ``/v1/health/ready`` reports it (and the
    batcher's liveness).
    """

    def __init__(self, settings: ServeSettings, scorer: OnnxScorer, batcher: DynamicBatcher | None,
                 token: str | None, model_name: str, state: dict):
        self.settings, self.scorer, self.batcher, self.token = settings, scorer, batcher, token
        self.model_name, self.state = model_name, state
        self.created = int(time.time())

    def register(self, app) -> None:
        """Add every endpoint to the FastAPI ``app``."""
        app.get("/v1/health/live")(self.live)
        app.get("/v1/health/ready")(self.ready)
        app.get("/v1/models")(self.models)
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
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "payload_too_large", f"request body exceeds max_body_bytes={limit}")
            chunks.append(chunk)
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
    async def score(self, request: Request, query: str, texts: list[str], truncate: str, list_key: str):
        """``(logits, order best first, tokens)``; over-long pairs are a 400 with ``truncate: NONE``."""
        scorer = self.scorer
        self.check_texts(query, texts, list_key)
        encoded = await run_in_threadpool(scorer.encode_pairs, query, texts)
        if truncate == "NONE":
            over = [i for i, e in enumerate(encoded) if e.truncated]
            if over:
                counts = await run_in_threadpool(scorer.count_tokens, [scorer.format(query, texts[i]) for i in over[:5]])
                shown = ", ".join(f"{list_key}[{i}] ({c} tokens)" for i, c in zip(over, counts))
                raise ApiError(
                    400, "input_too_long",
                    f"{len(over)} query+passage pair(s) exceed the model's max_length={scorer.max_length} tokens: {shown}"
                    f"{' ...' if len(over) > 5 else ''}; send \"truncate\": \"END\" to truncate them",
                )
        request.state.pairs = len(encoded)
        if self.batcher is not None:
            logits = await self.batcher.submit(encoded)
        else:
            logits = await run_in_threadpool(scorer.run, encoded)
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

    async def models(self, request: Request):
        self.check_auth(request)
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "rerankflow",
                      "max_length": self.scorer.max_length, "input_format": self.scorer.input_format}],
        }

    async def ranking(self, request: Request):
        self.check_auth(request)
        req = self.parse(RankingRequest, await self.read_json(request), "passages")
        texts = [p.text for p in req.passages]
        truncate = req.truncate or self.settings.default_truncate
        logits, order, tokens = await self.score(request, req.query.text, texts, truncate, "passages")
        return {
            "rankings": [{"index": int(i), "logit": float(logits[i])} for i in order],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
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
