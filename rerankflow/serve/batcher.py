"""Dynamic batching: pairs of concurrent requests share ONNX Runtime runs (:class:`DynamicBatcher`)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from rerankflow.scoring.onnx_scorer import Encoded, plan_chunks
from rerankflow.serve.api import ApiError

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """What the batcher reports (:class:`rerankflow.serve.metrics.ServeMetrics` records it)."""

    def batch_started(self, pairs: int, padded_tokens: int, queue_waits_s: Sequence[float]) -> None:
        """A batch of ``pairs`` pairs (``padded_tokens`` = pairs x longest pair) goes to a worker; each of its
        chunks waited ``queue_waits_s`` seconds in the queue."""

    def batch_scored(self, pairs: int) -> None:
        """A batch's ``pairs`` pairs were run through the model."""


class _NoObserver:
    def batch_started(self, pairs: int, padded_tokens: int, queue_waits_s: Sequence[float]) -> None:
        pass

    def batch_scored(self, pairs: int) -> None:
        pass


@dataclass
class _Chunk:
    """Pairs of one request queued together (a :func:`plan_chunks` chunk) and the future of their logits."""

    items: list
    fut: asyncio.Future
    longest: int = 0
    queued_at: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.longest = max((len(e) for e in self.items), default=0)


def fits(pairs: int, longest: int, chunk_pairs: int, chunk_longest: int, max_pairs: int, max_tokens: int | None) -> bool:
    """Whether a chunk may join a batch of ``pairs`` pairs whose longest has ``longest`` tokens: the batch stays
    within ``max_pairs`` pairs and, unless ``max_tokens`` is None, ``max_tokens`` padded tokens (pairs x longest
    pair, as TEI counts a padded batch). An empty batch takes any chunk."""
    if pairs == 0:
        return True
    n = pairs + chunk_pairs
    return n <= max_pairs and (max_tokens is None or n * max(longest, chunk_longest) <= max_tokens)


class DynamicBatcher:
    """Gather pairs of concurrent requests into batches for ``workers`` worker threads.

    ``submit(items)`` sorts ``items`` by length, splits them into chunks exactly as
    :meth:`OnnxScorer.run` would (:func:`plan_chunks`: at most ``max_batch_size`` pairs and, when
    ``max_batch_tokens`` is set, at most that many padded tokens each) and queues them. When a worker is
    free, the loop takes the oldest chunk, waits up to ``max_wait_ms`` for more (stopping early once the
    queued chunks fill a batch), packs whole chunks in arrival order while the batch stays within
    ``max_batch_size`` pairs and ``max_batch_tokens`` padded tokens (pairs x the batch's longest pair, as
    TEI counts it; None: no token budget), and hands them to ``run_fn`` in a worker thread. A request
    larger than the budget is therefore split into chunks that each fit it; a single pair longer than the
    budget (only possible when ``max_batch_tokens`` < ``max_length``, which the server refuses) would run
    alone. Results come back in each request's order. ``observer`` (a :class:`BatchObserver`) is told of
    every batch: its pairs, padded tokens and queue waits, and when it has been scored.

    Cancelling a ``submit`` (the route cancels it when the client disconnects, see
    :meth:`rerankflow.serve.routes.Routes.score`) removes that request's queued chunks at once: they
    are never scored and no longer count in :attr:`queued_pairs`. A chunk already handed to a worker
    finishes (ONNX Runtime cannot be interrupted) and its result is dropped. How many pairs may wait
    is bounded by the route's admission (``deploy.max_queued_pairs``), not here.
    """

    def __init__(
        self, run_fn: Callable[[list[Encoded]], np.ndarray], max_batch_size: int, max_wait_ms: float,
        workers: int, max_padding: float, max_batch_tokens: int | None = None, observer: BatchObserver | None = None,
    ):
        self.run_fn = run_fn
        self.max_padding = float(max_padding)
        self.max_batch_size = int(max_batch_size)
        self.max_batch_tokens = None if max_batch_tokens is None else int(max_batch_tokens)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.workers = max(1, int(workers))
        self.observer = observer or _NoObserver()
        self._pending: collections.deque[_Chunk] = collections.deque()
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
            fut = self._pending.popleft().fut
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
        lengths = [len(items[i]) for i in order]
        for chunk in plan_chunks(lengths, self.max_batch_size, self.max_padding, self.max_batch_tokens):
            fut = loop.create_future()
            self._pending.append(_Chunk([items[order[j]] for j in chunk], fut))
            futs.append(fut)
        self._wakeup.set()
        try:
            parts = await asyncio.gather(*futs)
        except BaseException:  # cancelled (client gone) or a batch failed: nothing of this request stays queued
            for f in futs:
                f.cancel()
            self._drop_done()
            raise
        out = np.empty(len(items), dtype=np.float32)
        if parts:
            out[order] = np.concatenate(parts)
        return out

    @property
    def queued_pairs(self) -> int:
        """Pairs waiting for a worker (cancelled requests' chunks are removed when they are cancelled)."""
        return sum(len(c.items) for c in self._pending)

    def _drop_done(self) -> None:
        if any(c.fut.done() for c in self._pending):
            self._pending = collections.deque(c for c in self._pending if not c.fut.done())

    def _batch_is_full(self) -> bool:
        """Whether the queued chunks already fill a batch: packing them stops at a chunk that does not fit,
        or at ``max_batch_size`` pairs."""
        pairs = longest = 0
        for c in self._pending:
            if c.fut.done():
                continue
            if not fits(pairs, longest, len(c.items), c.longest, self.max_batch_size, self.max_batch_tokens):
                return True
            pairs, longest = pairs + len(c.items), max(longest, c.longest)
        return pairs >= self.max_batch_size

    async def _next_batch(self) -> list[_Chunk]:
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = loop.time() + self.max_wait_s
        while not self._batch_is_full():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch: list[_Chunk] = []
        pairs = longest = 0
        while self._pending:
            c = self._pending[0]
            if c.fut.done():  # the client went away
                self._pending.popleft()
                continue
            if not fits(pairs, longest, len(c.items), c.longest, self.max_batch_size, self.max_batch_tokens):
                break
            batch.append(self._pending.popleft())
            pairs, longest = pairs + len(c.items), max(longest, c.longest)
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

    async def _run(self, batch: list[_Chunk]) -> None:
        loop = asyncio.get_running_loop()
        flat = [x for c in batch for x in c.items]
        started = time.perf_counter()
        self.observer.batch_started(len(flat), len(flat) * max(c.longest for c in batch),
                                    [started - c.queued_at for c in batch])
        try:
            scores = await loop.run_in_executor(self._executor, self.run_fn, flat)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            log.exception("batch of %d pairs failed", len(flat))
            for c in batch:
                if not c.fut.done():
                    c.fut.set_exception(exc)
            return
        finally:
            self._slots.release()
        self.batches += 1
        self.pairs += len(flat)
        self.observer.batch_scored(len(flat))
        offset = 0
        for c in batch:
            if not c.fut.done():
                c.fut.set_result(scores[offset:offset + len(c.items)])
            offset += len(c.items)
