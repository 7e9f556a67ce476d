"""Dynamic batching: pairs of concurrent requests share ONNX Runtime runs (:class:`DynamicBatcher`)."""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from rerankflow.scoring.onnx_scorer import Encoded, plan_chunks
from rerankflow.serve.api import ApiError

log = logging.getLogger(__name__)


class DynamicBatcher:
    """Gather pairs of concurrent requests into batches for ``workers`` worker threads.

    ``submit(items)`` sorts ``items`` by length, splits them into chunks exactly as
    :meth:`OnnxScorer.run` would (:func:`plan_chunks`) and queues them. When a worker is free, the loop takes the oldest chunk,
    waits up to ``max_wait_ms`` for more (stopping early once ``max_batch_size`` pairs are
    queued), packs whole chunks in arrival order up to ``max_batch_size`` pairs and hands them
    to ``run_fn`` in a worker thread. Results come back in each request's order.

    Cancelling a ``submit`` (the route cancels it when the client disconnects, see
    :meth:`rerankflow.serve.routes.Routes.score`) removes that request's queued chunks at once: they
    are never scored and no longer count in :attr:`queued_pairs`. A chunk already handed to a worker
    finishes (ONNX Runtime cannot be interrupted) and its result is dropped. How many pairs may wait
    is bounded by the route's admission (``deploy.max_queued_pairs``), not here.
    """

    def __init__(
        self, run_fn: Callable[[list[Encoded]], np.ndarray], max_batch_size: int, max_wait_ms: float,
        workers: int, max_padding: float,
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
        return sum(len(items) for items, _ in self._pending)

    _queued_pairs = queued_pairs.fget

    def _drop_done(self) -> None:
        if any(fut.done() for _, fut in self._pending):
            self._pending = collections.deque((items, fut) for items, fut in self._pending if not fut.done())

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
