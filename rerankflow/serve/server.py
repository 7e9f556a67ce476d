"""Running the service: uvicorn in the foreground (:func:`run_server`, the ``rerankflow serve``
command) or in a background thread of this process (:class:`ThreadedServer`: tests, notebooks,
benchmarks). SIGINT/SIGTERM shut it down gracefully: in-flight requests finish."""

from __future__ import annotations

import logging
import time

from rerankflow.scoring.onnx_scorer import OnnxScorer
from rerankflow.serve.app import create_app
from rerankflow.serve.settings import ServeSettings


def configure_logging(level: str) -> None:
    """Log lines with a UTC timestamp to stderr (the deploy rule redirects it to a file)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.Formatter.converter = time.gmtime


log = logging.getLogger("rerankflow.serve.app")


def _listening_server_class():
    import uvicorn

    class ListeningServer(uvicorn.Server):
        """``uvicorn.Server`` that says where it listens only once the socket is bound: a taken port logs no
        "listening" line, and ``port: 0`` logs the port the system chose."""

        bound: tuple[str, int] | None = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and self.servers and self.servers[0].sockets:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                self.bound = (host, int(port))
                log.info("listening on http://%s:%d", host, port)

    return ListeningServer


def _header_timeout_protocol_class(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for a request's headers.

    uvicorn closes idle keep-alive connections (``timeout_keep_alive``) but waits forever for the first
    bytes of a connection and for the rest of headers sent slowly. Here a timer starts when a connection
    opens, and when a new request's first bytes arrive on a kept-alive one; it is cancelled once the
    request's headers are complete. When it fires the connection is closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer = None
        _cycle_when_armed = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._cycle_when_armed = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()  # the first bytes of a new request on a kept-alive connection
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._cycle_when_armed:
                self._cancel_header_timer()  # the request's headers are complete: its cycle has started

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                client = "%s:%d" % self.client if self.client else "-"
                log.info("%s: no complete request headers within header_timeout_s=%g s; connection closed",
                         client, header_timeout_s)
                self.transport.close()

    return HeaderTimeoutH11Protocol


def build_server(settings: ServeSettings, scorer: OnnxScorer | None = None):
    """A ``uvicorn.Server`` for the app (call ``.run()``, or ``.serve()`` in a loop/thread); once started,
    ``.bound`` is the ``(host, port)`` it listens on."""
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
        http=_header_timeout_protocol_class(float(settings.header_timeout_s)),
        timeout_keep_alive=float(settings.keep_alive_timeout_s),
        limit_concurrency=settings.limit_concurrency,
        server_header=False,
    )
    return _listening_server_class()(config)


def run_server(settings: ServeSettings) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (graceful: in-flight requests finish).

    uvicorn re-raises the signal it caught once it has shut down; for SIGINT that is a KeyboardInterrupt,
    which the ``rerankflow serve`` command turns into one line and exit status 130 (no traceback).
    """
    configure_logging(settings.log_level)
    server = build_server(settings)
    server.run()
    if not server.started:
        raise SystemExit(f"server did not start on {settings.host}:{settings.port} (port in use?)")


class ThreadedServer:
    """Run the service in a background thread of this process (tests, notebooks, benchmarks).

    ``with ThreadedServer(settings) as srv: httpx.get(srv.url + "/v1/health/ready")``; leaving
    the block shuts the server down gracefully.
    """

    def __init__(self, settings: ServeSettings, scorer: OnnxScorer | None = None, start_timeout_s: float = 60.0):
        import threading

        self.settings = settings
        self.server = build_server(settings, scorer)
        self.thread = threading.Thread(target=self._run, name="rerankflow-server", daemon=True)
        self.start_timeout_s = start_timeout_s

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits when it cannot bind (it has logged why); __enter__ reports it
            pass

    @property
    def url(self) -> str:
        """Where the server listens (the bound port: ``port: 0`` asks the system for a free one)."""
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "") else "127.0.0.1"
        port = self.server.bound[1] if self.server.bound else self.settings.port
        return f"http://{host}:{port}"

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
