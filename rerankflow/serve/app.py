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
* ``GET /metrics`` — Prometheus text format (:mod:`rerankflow.serve.metrics`): requests by endpoint
  and status, latency, pairs scored, batch pairs and padded tokens, queue waits.

Errors are ``{"object": "error", "type", "message", "detail"}`` with status 400 (invalid JSON,
too many passages, text too long, over-long pair with ``truncate: NONE``, a query that fills
``max_length``, first-stage scores without a fusion weight), 401 (missing or wrong bearer token), 408
(body slower than ``body_timeout_s``), 413 (body larger than ``max_body_bytes``), 422 (missing fields,
wrong types, empty passage list, ``first_stage_score`` on some passages only) or 503 with ``Retry-After``
(``max_queued_pairs`` reached). A bad request never takes the server down; a client that hangs up has its
queued pairs dropped (logged as 499).

Fusion (a rerankflow extension): when every passage of a ``/v1/ranking`` request carries
``first_stage_score``, the rankings are ordered by ``fused_score`` (see docs/deploy.md) with the weight
``deploy.fusion_weight`` or the export record's ``fusion.weight``.

Dynamic batching (``dynamic_batching: true``): pairs of concurrent requests are queued and
``batch_workers`` worker threads run them through ONNX Runtime in batches of at most
``max_batch_size`` pairs and, when set, ``max_batch_tokens`` padded tokens (pairs x longest pair),
waiting at most ``max_wait_ms`` for a batch to fill. Switched off, every request runs its own
``session.run`` calls in the thread pool as soon as it arrives.

The ``model`` field of requests is accepted and ignored (clients written for a NIM send the NIM's
model id); ``/v1/models`` reports the name this server serves.

Auth: when ``auth_token_env`` names an environment variable, ``/v1/ranking``, ``/v1/rerank``,
``/v1/models`` and ``/metrics`` require ``Authorization: Bearer <its value>``; health endpoints stay open for
probes. The token is read once at start-up and never logged.
"""

from __future__ import annotations

import logging
import time

from starlette.exceptions import HTTPException as StarletteHTTPException

from rerankflow.errors import InputError
from rerankflow.scoring.onnx_scorer import OnnxScorer, find_model_file
from rerankflow.scoring.onnx_session import choose_providers
from rerankflow.scoring.export_record import resolve_text_settings
from rerankflow.serve.api import ApiError, error_response
from rerankflow.serve.batcher import DynamicBatcher
from rerankflow.serve.metrics import ServeMetrics
from rerankflow.serve.routes import ClientGone, Routes
from rerankflow.serve.settings import ServeSettings, read_auth_token

log = logging.getLogger("rerankflow.serve.app")


def build_scorer(settings: ServeSettings) -> OnnxScorer:
    """The scorer the server runs: text settings resolved against the export's record (a mismatch
    with a configured value is an error; the resolved values are written back to ``settings``)."""
    settings.max_length, settings.prompt_template, settings.input_format = resolve_text_settings(
        find_model_file(settings.model), settings.max_length, settings.prompt_template, settings.input_format
    )
    return OnnxScorer(
        settings.model,
        tokenizer=settings.tokenizer,
        max_length=settings.max_length,
        prompt_template=settings.prompt_template,
        input_format=settings.input_format,
        providers=choose_providers(settings.device, key="deploy.device"),
        batch_size=settings.max_batch_size,
        intra_op_threads=settings.intra_op_threads,
        max_padding=settings.max_padding,
        max_batch_tokens=settings.max_batch_tokens,
    )


# ------------------------------------------------------------------ access log middleware
class AccessLogMiddleware:
    """One log line per HTTP request: client, method, path, status, pairs, latency. No headers.

    With ``metrics`` (a :class:`~rerankflow.serve.metrics.ServeMetrics`), the request is also counted, just
    before the last byte of its answer is sent: a client that has its answer finds it counted at /metrics.
    """

    def __init__(self, app, metrics=None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500, "counted": False}

        def count() -> None:
            if self.metrics is not None and not status["counted"]:
                status["counted"] = True
                self.metrics.request_done(scope["path"], status["code"], time.perf_counter() - t0)

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            count()
            ms = (time.perf_counter() - t0) * 1000.0
            client = scope.get("client") or ("-", 0)
            pairs = (scope.get("state") or {}).get("pairs")
            log.info(
                "%s %s %s %d pairs=%s %.1fms",
                client[0], scope["method"], scope["path"], status["code"], "-" if pairs is None else pairs, ms,
            )


# ------------------------------------------------------------------ app
def create_app(settings: ServeSettings, scorer: OnnxScorer | None = None):
    """Build the FastAPI app. Loads the model now (errors surface before the port opens)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    settings.validate()
    token = read_auth_token(settings)
    if scorer is None:
        scorer = build_scorer(settings)
    scorer.score("warm-up", ["warm-up passage"])  # first run allocates; keep it off the first request
    settings.check_batch_tokens(scorer.max_length)  # with the max_length actually served
    model_name = settings.model_name or f"rerankflow/{scorer.model_file.parent.name}"
    live: dict = {}  # the batcher and routes, for the gauges read at scrape time
    metrics = ServeMetrics(
        paths=(),  # set below, once the routes are registered
        queued_pairs=lambda: live["batcher"].queued_pairs if live.get("batcher") else 0,
        admitted_pairs=lambda: live["routes"].admitted_pairs if live.get("routes") else 0,
    )
    batcher = (
        DynamicBatcher(scorer.run, settings.max_batch_size, settings.max_wait_ms, settings.batch_workers, settings.max_padding,
                       max_batch_tokens=settings.max_batch_tokens, observer=metrics)
        if settings.dynamic_batching else None
    )
    live["batcher"] = batcher
    state = {"ready": False}
    if settings.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("binding %s without auth: anyone who can reach this port can use the service", settings.host)

    @asynccontextmanager
    async def lifespan(app):
        if batcher is not None:
            await batcher.start()
        state["ready"] = True
        log.info(  # where it listens is logged once the socket is bound (rerankflow.serve.server)
            "ready to serve %s (%s), dynamic batching %s (max_batch_size %d, max_batch_tokens %s, max_wait_ms %s, "
            "workers %d), auth %s",
            model_name, scorer.model_file, "on" if batcher else "off", settings.max_batch_size,
            settings.max_batch_tokens, settings.max_wait_ms, settings.batch_workers,
            f"on (token from ${settings.auth_token_env})" if token else "off",
        )
        try:
            yield
        finally:
            state["ready"] = False
            if batcher is not None:
                await batcher.stop()
            log.info("server stopped")

    # With auth on, the API description is not served either: it would be the one unauthenticated page.
    app = FastAPI(title="rerankflow ranking service", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None if token else "/openapi.json")
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    app.state.settings = settings
    app.state.scorer = scorer
    app.state.batcher = batcher
    app.state.model_name = model_name
    app.state.metrics = metrics
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(ClientGone, _client_gone)
    fusion_weight = resolve_fusion_weight(settings, scorer)
    routes = Routes(settings, scorer, batcher, token, model_name, state, fusion_weight, metrics=metrics)
    live["routes"] = routes
    app.state.routes = routes
    routes.register(app)
    metrics.paths = frozenset(route.path for route in app.routes)
    return app


def resolve_fusion_weight(settings: ServeSettings, scorer: OnnxScorer) -> float | None:
    """``deploy.fusion_weight`` when set, else the weight of the export record's ``fusion`` entry, else None."""
    from rerankflow.scoring.export_record import EXPORT_INFO, read_export_info
    from rerankflow.scoring.fusion import METHOD, check_fusion_weight

    if settings.fusion_weight is not None:
        return check_fusion_weight(settings.fusion_weight, where="deploy.fusion_weight")
    fusion = read_export_info(scorer.model_file).get("fusion")
    if not fusion:
        return None
    path = scorer.model_file.parent / EXPORT_INFO
    if not isinstance(fusion, dict) or "weight" not in fusion:
        raise InputError("the 'fusion' entry must be an object with a 'weight' (or null)", path=path)
    if fusion.get("method", METHOD) != METHOD:
        raise InputError(f"unknown fusion method {fusion.get('method')!r}; expected {METHOD!r}", path=path)
    if fusion["weight"] is None:
        return None
    return check_fusion_weight(fusion["weight"], where=f"{path}: fusion.weight")


async def _api_error(request, exc: ApiError):
    return error_response(exc)


async def _client_gone(request, exc: ClientGone):
    """Nobody is left to read it; the status is for the access log (nginx's "client closed request")."""
    return error_response(ApiError(499, "client_closed_request", "client closed the connection before the answer"))


HTTP_ERROR_KINDS = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request, exc):
    """Starlette's own errors (unknown path, wrong method) in the documented error shape; headers such as
    ``Allow`` are kept."""
    kind = HTTP_ERROR_KINDS.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    response = error_response(ApiError(exc.status_code, kind, message))
    response.headers.update(exc.headers or {})
    return response


async def _internal_error(request, exc: Exception):
    log.exception("internal error on %s", request.url.path)
    return error_response(ApiError(500, "internal_error", f"internal error: {type(exc).__name__}"))
