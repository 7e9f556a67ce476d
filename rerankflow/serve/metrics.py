"""Prometheus metrics of the ranking service (:class:`ServeMetrics`), exposed at ``GET /metrics``.

Each app has its own ``prometheus_client`` registry, so several servers in one process (tests,
benchmarks) count apart. Series (all prefixed ``rerankflow_``):

* ``requests_total{path, status}`` — HTTP requests answered, by endpoint and status code (``/metrics``
  scrapes themselves are not counted; a path the service does not serve is counted as ``other``);
* ``request_duration_seconds{path}`` — histogram of request latency, from the first byte of the
  request to the last of the answer;
* ``pairs_scored_total`` — (query, passage) pairs run through the model;
* ``batch_pairs`` and ``batch_padded_tokens`` — histograms of the batches handed to ONNX Runtime:
  pairs, and pairs x longest pair (the quantity ``max_batch_tokens`` bounds, as TEI counts it);
* ``queue_wait_seconds`` — histogram of the time a request's chunk waited for a batch (dynamic
  batching only: without it nothing queues in the service);
* ``queued_pairs`` and ``admitted_pairs`` — gauges read at scrape time: pairs waiting for a worker,
  and pairs admitted against ``max_queued_pairs`` (tokenizing, queued or being scored).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "rerankflow_"
METRICS_PATH = "/metrics"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServeMetrics:
    """The service's counters and histograms in a registry of their own; :meth:`exposition` renders them.

    ``paths`` are the endpoints the app serves (the ``path`` label takes only these values and
    ``other``); ``queued_pairs`` and ``admitted_pairs`` are read when /metrics is scraped.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, paths: Iterable[str], queued_pairs: Callable[[], float] = lambda: 0,
                 admitted_pairs: Callable[[], float] = lambda: 0):
        self.paths = frozenset(paths)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "HTTP requests answered, by endpoint and status code",
                                ("path", "status"), registry=r)
        self.latency = Histogram(PREFIX + "request_duration_seconds", "Request latency in seconds, by endpoint",
                                 ("path",), buckets=LATENCY_BUCKETS, registry=r)
        self.pairs = Counter(PREFIX + "pairs_scored", "(query, passage) pairs run through the model", registry=r)
        self.batch_pairs = Histogram(PREFIX + "batch_pairs", "Pairs per batch handed to ONNX Runtime",
                                     buckets=PAIR_BUCKETS, registry=r)
        self.batch_tokens = Histogram(PREFIX + "batch_padded_tokens",
                                      "Padded tokens per batch (pairs x longest pair; bounded by max_batch_tokens)",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.queue_wait = Histogram(PREFIX + "queue_wait_seconds",
                                    "Seconds a request's chunk waited in the dynamic batcher's queue",
                                    buckets=QUEUE_BUCKETS, registry=r)
        Gauge(PREFIX + "queued_pairs", "Pairs waiting for a batch worker", registry=r).set_function(queued_pairs)
        Gauge(PREFIX + "admitted_pairs", "Pairs admitted against max_queued_pairs (tokenizing, queued or scored)",
              registry=r).set_function(admitted_pairs)

    def path_label(self, path: str) -> str:
        """``path`` when the app serves it, else ``other`` (a scanner's random paths must not grow the series)."""
        return path if path in self.paths else "other"

    def request_done(self, path: str, status: int, seconds: float) -> None:
        """Count one answered request (not a /metrics scrape) and observe its latency."""
        if path == METRICS_PATH:
            return
        label = self.path_label(path)
        self.requests.labels(path=label, status=str(int(status))).inc()
        self.latency.labels(path=label).observe(seconds)

    # the batcher's observer (rerankflow.serve.batcher.BatchObserver); the direct path calls them too
    def batch_started(self, pairs: int, padded_tokens: int, queue_waits_s: Sequence[float]) -> None:
        self.batch_pairs.observe(pairs)
        self.batch_tokens.observe(padded_tokens)
        for w in queue_waits_s:
            self.queue_wait.observe(max(0.0, w))

    def batch_scored(self, pairs: int) -> None:
        self.pairs.inc(pairs)

    def exposition(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)
