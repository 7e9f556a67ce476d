"""The built-in ranking service: a FastAPI app over :class:`~rerankflow.scoring.onnx_scorer.OnnxScorer`.

Endpoints (all JSON):

* ``POST /v1/ranking`` — NVIDIA NIM shape. Request ``{"model"?, "query": {"text"}, "passages":
  [{"text"}], "truncate"?: "NONE"|"END"}``; response ``{"rankings": [{"index", "logit"}], "usage"}``
  sorted by logit, highest first. ``truncate`` defaults to ``settings.default_truncate``
  (``NONE``, as in NIM): a pair longer than ``max_length`` tokens is then a 400; ``END`` cuts the
  end of the pair (the passage), exactly as training did. Pairs are tokenized in the model's
  ``input_format`` (the export's record: the prompt template as one text, or a sentence pair).
* ``POST /v1/rerank`` (also ``/v2/rerank`` and ``/rerank``) — Cohere/Infinity shape. Request
  ``{"model"?, "query": str, "documents": [str | {"text"}], "top_n"?, "return_documents"?: bool, "truncate"?: "NONE"|"END" (default END)}``;
  response ``{"object": "rerank", "model", "results": [{"index", "relevance_score", "document"?:
  {"text"}}], "usage"}`` with ``relevance_score = sigmoid(logit)``, highest first, at most ``top_n``.
* ``GET /v1/health/live``, ``GET /v1/health/ready`` (503 until the model is loaded and the
  batcher runs, and again while shutting down), ``GET /v1/models`` (with the ``max_length`` and
  ``input_format`` the model is served with).

Errors are ``{"object": "error", "type", "message", "detail"}`` with status 400 (invalid JSON,
too many passages, text too long, over-long pair with ``truncate: NONE``), 401 (missing or wrong
bearer token), 413 (body larger than ``max_body_bytes``) or 422 (missing fields, wrong types,
empty passage list). A bad request never takes the server down.

Dynamic batching (``dynamic_batching: true``): pairs of concurrent requests are queued and
``batch_workers`` worker threads run them through ONNX Runtime in batches of at most
``max_batch_size`` pairs, waiting at most ``max_wait_ms`` for a batch to fill. Switched off, every request runs its own
``session.run`` calls in the thread pool as soon as it arrives.

The ``model`` field of requests is accepted and ignored (clients written for a NIM send the NIM's
model id); ``/v1/models`` reports the name this server serves.

Auth: when ``auth_token_env`` names an environment variable, ``/v1/ranking``, ``/v1/rerank`` and
``/v1/models`` require ``Authorization: Bearer <its value>``; health endpoints stay open for
probes. The token is read once at start-up and never logged.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Literal, Sequence

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from rerankflow.errors import InputError
from rerankflow.formatting import INPUT_FORMATS
from rerankflow.scoring.onnx_scorer import Encoded, OnnxScorer, find_model_file, plan_chunks, resolve_text_settings, sigmoid

log = logging.getLogger("rerankflow.serve.app")

LIVE_BODY = {"object": "health.response", "message": "Service is live.", "status": "live"}
READY_BODY = {"object": "health.response", "message": "Service is ready.", "status": "ready"}


@dataclass
class ServeSettings:
    """Everything the server needs; the ``deploy`` and ``reranker`` config sections map onto it."""

    model: str
    tokenizer: str | None = None
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_length: int | None = None  # None: the export's record (rerankflow_export.json), else 512
    prompt_template: str | None = None  # None: the export's record, else the default template
    input_format: str | None = None  # None: the export's record (no key there: template), else template
    device: str = "cpu"
    intra_op_threads: int = 0
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    batch_workers: int = 1
    max_padding: float = 0.25
    dynamic_batching: bool = True
    max_passages: int = 512
    max_body_bytes: int = 16 * 1024 * 1024
    max_text_chars: int = 20000
    default_truncate: str = "NONE"
    auth_token_env: str | None = None
    graceful_timeout_s: float = 10.0
    log_level: str = "info"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServeSettings":
        """Build from a flat dict, ignoring keys that are not settings (e.g. the ``nim`` block)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_config(cls, deploy: dict, reranker: dict, model: str | os.PathLike, **overrides) -> "ServeSettings":
        """Settings from the ``deploy`` and shared ``reranker`` config sections."""
        d = {k: v for k, v in deploy.items() if k not in ("model", "port", "host")}
        d.update(
            model=str(model),
            host=deploy.get("host", "127.0.0.1"),
            port=int(deploy.get("port", 8000)),
            max_length=reranker.get("max_length"),
            prompt_template=reranker.get("prompt_template"),
            input_format=reranker.get("input_format"),
        )
        d.update(overrides)
        return cls.from_dict(d)

    def validate(self) -> "ServeSettings":
        for name in ("max_batch_size", "batch_workers", "max_passages", "max_body_bytes", "max_text_chars"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)!r}", key=f"deploy.{name}")
        if self.max_wait_ms < 0:
            raise InputError(f"must be >= 0, got {self.max_wait_ms!r}", key="deploy.max_wait_ms")
        if self.default_truncate not in ("NONE", "END"):
            raise InputError(f"must be NONE or END, got {self.default_truncate!r}", key="deploy.default_truncate")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise InputError(f"must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}", key="reranker.input_format")
        return self

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ request models
class _Text(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: StrictStr


class _Query(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: StrictStr = Field(min_length=1)


class RankingRequest(BaseModel):
    """NIM ``/v1/ranking`` request."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    query: _Query
    passages: list[_Text] = Field(min_length=1)
    truncate: Literal["NONE", "END"] | None = None


class RerankRequest(BaseModel):
    """Cohere/Infinity ``/v1/rerank`` request."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    query: StrictStr = Field(min_length=1)
    documents: list[StrictStr | _Text] = Field(min_length=1)
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    truncate: Literal["NONE", "END"] | None = None


class ApiError(Exception):
    """An error answered to the client as ``{"object": "error", ...}`` with ``status``."""

    def __init__(self, status: int, kind: str, message: str, detail: Any = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.detail = status, kind, message, detail


# ------------------------------------------------------------------ dynamic batching
class DynamicBatcher:
    """Gather pairs of concurrent requests into batches for ``workers`` worker threads.

    ``submit(items)`` sorts ``items`` by length, splits them into chunks exactly as
    :meth:`OnnxScorer.run` would (:func:`plan_chunks`) and queues them. When a worker is free, the loop takes the oldest chunk,
    waits up to ``max_wait_ms`` for more (stopping early once ``max_batch_size`` pairs are
    queued), packs whole chunks in arrival order up to ``max_batch_size`` pairs and hands them
    to ``run_fn`` in a worker thread. Chunks of clients that went away are skipped. Results
    come back in each request's order.
    """

    def __init__(
        self, run_fn: Callable[[list[Encoded]], np.ndarray], max_batch_size: int, max_wait_ms: float,
        workers: int = 1, max_padding: float = 0.25,
    ):
        self.run_fn = run_fn
        self.max_padding = float(max_padding)
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.workers = max(1, int(workers))
        self._pending: collections.deque = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="rerankflow-batcher")
        self.batches = 0
        self.pairs = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._task = asyncio.create_task(self._loop(), name="rerankflow-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._inflight:  # batches already running finish and answer their requests
            await asyncio.gather(*self._inflight, return_exceptions=True)
        while self._pending:
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(ApiError(503, "unavailable", "server is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, items: Sequence[Encoded]) -> np.ndarray:
        if not self.running:
            raise ApiError(503, "unavailable", "server is not ready")
        loop = asyncio.get_running_loop()
        # chunk in length order, as OnnxScorer.run does: chunks are then identical to direct
        # scoring of the same request, and rows of similar length share a padded batch
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        futs = []
        for chunk in plan_chunks([len(items[i]) for i in order], self.max_batch_size, self.max_padding):
            fut = loop.create_future()
            self._pending.append(([items[order[j]] for j in chunk], fut))
            futs.append(fut)
        self._wakeup.set()
        try:
            parts = await asyncio.gather(*futs)
        except asyncio.CancelledError:
            for f in futs:
                f.cancel()
            raise
        out = np.empty(len(items), dtype=np.float32)
        if parts:
            out[order] = np.concatenate(parts)
        return out

    def _queued_pairs(self) -> int:
        return sum(len(items) for items, _ in self._pending)

    async def _next_batch(self) -> list:
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = loop.time() + self.max_wait_s
        while self._queued_pairs() < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch, n = [], 0
        while self._pending and n + len(self._pending[0][0]) <= self.max_batch_size:
            items, fut = self._pending.popleft()
            if fut.done():  # the client went away
                continue
            batch.append((items, fut))
            n += len(items)
        return batch

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()  # a worker is free: now gather its batch
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: list) -> None:
        loop = asyncio.get_running_loop()
        flat = [x for items, _ in batch for x in items]
        try:
            scores = await loop.run_in_executor(self._executor, self.run_fn, flat)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            log.exception("batch of %d pairs failed", len(flat))
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        finally:
            self._slots.release()
        self.batches += 1
        self.pairs += len(flat)
        offset = 0
        for items, fut in batch:
            if not fut.done():
                fut.set_result(scores[offset:offset + len(items)])
            offset += len(items)


# ------------------------------------------------------------------ access log middleware
class AccessLogMiddleware:
    """One log line per HTTP request: client, method, path, status, pairs, latency. No headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            ms = (time.perf_counter() - t0) * 1000.0
            client = scope.get("client") or ("-", 0)
            pairs = (scope.get("state") or {}).get("pairs")
            log.info(
                "%s %s %s %d pairs=%s %.1fms",
                client[0], scope["method"], scope["path"], status["code"], "-" if pairs is None else pairs, ms,
            )


# ------------------------------------------------------------------ app
def _error_response(exc: ApiError):
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    body = {"object": "error", "type": exc.kind, "message": exc.message, "detail": exc.detail if exc.detail is not None else exc.message}
    return JSONResponse(status_code=exc.status, content=body, headers=headers)


def _validation_detail(err: ValidationError) -> list[dict]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors(include_url=False, include_input=False)]


def _read_token(settings: ServeSettings) -> str | None:
    if not settings.auth_token_env:
        return None
    token = os.environ.get(settings.auth_token_env, "")
    if not token:
        raise InputError(
            f"auth is configured but environment variable {settings.auth_token_env} is unset or empty; "
            "export the token there or set auth_token_env to null",
            key="deploy.auth_token_env",
        )
    return token


def create_app(settings: ServeSettings, scorer: OnnxScorer | None = None):
    """Build the FastAPI app. Loads the model now (errors surface before the port opens)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from contextlib import asynccontextmanager

    settings.validate()
    token = _read_token(settings)
    if scorer is None:
        settings.max_length, settings.prompt_template, settings.input_format = resolve_text_settings(
            find_model_file(settings.model), settings.max_length, settings.prompt_template, settings.input_format
        )
        scorer = OnnxScorer(
            settings.model,
            tokenizer=settings.tokenizer,
            max_length=settings.max_length,
            prompt_template=settings.prompt_template,
            input_format=settings.input_format,
            device=settings.device,
            batch_size=settings.max_batch_size,
            intra_op_threads=settings.intra_op_threads,
            max_padding=settings.max_padding,
        )
    scorer.score("warm-up", ["warm-up passage"])  # first run allocates; keep it off the first request
    model_name = settings.model_name or f"rerankflow/{scorer.model_file.parent.name}"
    created = int(time.time())
    batcher = (
        DynamicBatcher(scorer.run, settings.max_batch_size, settings.max_wait_ms, settings.batch_workers, settings.max_padding)
        if settings.dynamic_batching else None
    )
    state = {"ready": False}
    if settings.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("binding %s without auth: anyone who can reach this port can use the service", settings.host)

    @asynccontextmanager
    async def lifespan(app):
        if batcher is not None:
            await batcher.start()
        state["ready"] = True
        log.info(
            "serving %s (%s) on http://%s:%s, dynamic batching %s (max_batch_size %d, max_wait_ms %s, workers %d), auth %s",
            model_name, scorer.model_file, settings.host, settings.port,
            "on" if batcher else "off", settings.max_batch_size, settings.max_wait_ms, settings.batch_workers,
            f"on (token from ${settings.auth_token_env})" if token else "off",
        )
        try:
            yield
        finally:
            state["ready"] = False
            if batcher is not None:
                await batcher.stop()
            log.info("server stopped")

    app = FastAPI(title="rerankflow ranking service", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(AccessLogMiddleware)
    app.state.settings = settings
    app.state.scorer = scorer
    app.state.batcher = batcher
    app.state.model_name = model_name

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error_response(ApiError(500, "internal_error", f"internal error: {type(exc).__name__}"))

    def check_auth(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise ApiError(401, "unauthorized", "invalid bearer token")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise ApiError(413, "payload_too_large", f"request body of {length} bytes exceeds max_body_bytes={settings.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise ApiError(413, "payload_too_large", f"request body exceeds max_body_bytes={settings.max_body_bytes}")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise ApiError(400, "invalid_request", "empty request body; expected a JSON object")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting or integers
            raise ApiError(400, "invalid_json", f"request body is not valid JSON: {str(exc)[:200]}") from None

    def parse(model_cls, body: Any, list_key: str):
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_request", f"expected a JSON object, got {type(body).__name__}")
        items = body.get(list_key)
        if isinstance(items, list) and len(items) > settings.max_passages:
            raise ApiError(400, "too_many_passages", f"{list_key} has {len(items)} entries; at most max_passages={settings.max_passages} per request")
        try:
            return model_cls.model_validate(body)
        except ValidationError as err:
            detail = _validation_detail(err)
            first = detail[0]
            msg = f"invalid request: {'.'.join(str(x) for x in first['loc']) or 'body'}: {first['msg']}"
            if len(detail) > 1:
                msg += f" (and {len(detail) - 1} more)"
            raise ApiError(422, "invalid_request", msg, detail) from None

    def check_text_sizes(query: str, texts: Sequence[str], list_key: str) -> None:
        limit = settings.max_text_chars
        if len(query) > limit:
            raise ApiError(400, "text_too_long", f"query has {len(query)} characters; at most max_text_chars={limit}")
        for i, t in enumerate(texts):
            if len(t) > limit:
                raise ApiError(400, "text_too_long", f"{list_key}[{i}] has {len(t)} characters; at most max_text_chars={limit}")

    async def score(request: Request, query: str, texts: list[str], truncate: str, list_key: str):
        check_text_sizes(query, texts, list_key)
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
        if batcher is not None:
            logits = await batcher.submit(encoded)
        else:
            logits = await run_in_threadpool(scorer.run, encoded)
        order = np.argsort(-logits, kind="stable")
        return logits, order, sum(len(e) for e in encoded)

    @app.get("/v1/health/live")
    async def live():
        return LIVE_BODY

    @app.get("/v1/health/ready")
    async def ready():
        ok = state["ready"] and (batcher is None or batcher.running)
        if not ok:
            return JSONResponse(status_code=503, content={"object": "health.response", "message": "Service is not ready.", "status": "not_ready"})
        return READY_BODY

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "rerankflow",
                      "max_length": scorer.max_length, "input_format": scorer.input_format}],
        }

    @app.post("/v1/ranking")
    async def ranking(request: Request):
        check_auth(request)
        req = parse(RankingRequest, await read_json(request), "passages")
        texts = [p.text for p in req.passages]
        logits, order, tokens = await score(request, req.query.text, texts, req.truncate or settings.default_truncate, "passages")
        return {
            "rankings": [{"index": int(i), "logit": float(logits[i])} for i in order],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.post("/v1/rerank")
    @app.post("/v2/rerank", include_in_schema=False)  # Cohere v2 clients
    @app.post("/rerank", include_in_schema=False)  # Infinity clients
    async def rerank(request: Request):
        check_auth(request)
        req = parse(RerankRequest, await read_json(request), "documents")
        texts = [d if isinstance(d, str) else d.text for d in req.documents]
        logits, order, tokens = await score(request, req.query, texts, req.truncate or "END", "documents")
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
            "model": model_name,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return app


def configure_logging(level: str = "info") -> None:
    """Log lines with a UTC timestamp to stderr (the deploy rule redirects it to a file)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.Formatter.converter = time.gmtime


def build_server(settings: ServeSettings, scorer: OnnxScorer | None = None):
    """A ``uvicorn.Server`` for the app (call ``.run()``, or ``.serve()`` in a loop/thread)."""
    import uvicorn

    app = create_app(settings, scorer)
    logging.getLogger("uvicorn.access").disabled = True  # AccessLogMiddleware writes the one line per request
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=int(settings.port),
        access_log=False,
        log_config=None,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
        limit_concurrency=None,
        server_header=False,
    )
    return uvicorn.Server(config)


def run_server(settings: ServeSettings) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (graceful: in-flight requests finish)."""
    configure_logging(settings.log_level)
    server = build_server(settings)
    server.run()
    if not server.started:
        raise SystemExit(f"server did not start on {settings.host}:{settings.port} (port in use?)")


def load_settings_file(path: str | os.PathLike) -> dict:
    """Read a JSON settings file written by :mod:`rerankflow.deploy.service`."""
    from rerankflow.io import read_json

    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError("expected a JSON object of server settings", path=path)
    return data


class ThreadedServer:
    """Run the service in a background thread of this process (tests, notebooks, benchmarks).

    ``with ThreadedServer(settings) as srv: httpx.get(srv.url + "/v1/health/ready")``; leaving
    the block shuts the server down gracefully.
    """

    def __init__(self, settings: ServeSettings, scorer: OnnxScorer | None = None, start_timeout_s: float = 60.0):
        import threading

        self.settings = settings
        self.server = build_server(settings, scorer)
        self.thread = threading.Thread(target=self.server.run, name="rerankflow-server", daemon=True)
        self.start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "") else "127.0.0.1"
        return f"http://{host}:{self.settings.port}"

    @property
    def app(self):
        return self.server.config.app

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > self.start_timeout_s or not self.thread.is_alive():
                self.server.should_exit = True
                raise RuntimeError(f"server did not start on {self.settings.host}:{self.settings.port}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.settings.graceful_timeout_s + 10)
