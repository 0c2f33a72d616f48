"""Dynamic batching: concurrent requests wait a short window and run as one batch on one worker thread.

Requests carry a key (what to compute, with which options); a batch holds requests of one key, up
to ``max_batch``, collected for at most ``window_s`` after its first request arrived, and only while
other requests are on their way (``with batcher.coming():`` around reading and decoding one): a lone
request runs at once instead of waiting the window out. The model runs
on a single thread, so a batch never overlaps another (attention capture hooks see one forward).
A full queue refuses at once (``QueueFull``: 503); a request not answered in time gets
``TimeoutError`` (504) and is dropped from the queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """Every place in the queue is taken: answer 503 and ask the client to retry."""


@dataclass
class _Job:
    item: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """``await batcher.submit(key, item, timeout)`` -> ``run(key, items)[i]`` for that item."""

    def __init__(self, run: Callable[[Hashable, list[Any]], list[Any]], *, max_batch: int = 16,
                 window_s: float = 0.005, max_queue: int = 64) -> None:
        self.run, self.max_batch, self.window_s, self.max_queue = run, max_batch, window_s, max_queue
        self._queues: dict[Hashable, deque[_Job]] = {}
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitlab-model")
        self._task: asyncio.Task | None = None
        self.arriving = 0  # requests inside `coming()`: being read or decoded, soon submitted
        self.batches = 0  # batches run so far
        self.items = 0  # items in them

    @property
    def pending(self) -> int:
        """Requests waiting for the model (not counting the batch that is running)."""
        return sum(len(q) for q in self._queues.values())

    def start(self) -> None:
        """Start the collecting loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop collecting; waiting requests fail with ``QueueFull``; the worker thread ends."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for queue in self._queues.values():
            for job in queue:
                if not job.future.done():
                    job.future.set_exception(QueueFull("the server is shutting down"))
            queue.clear()
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def coming(self):
        """Around the work before ``submit`` (reading, decoding): a batch's window waits only while
        such requests exist. Leave it just before ``submit``, with no ``await`` in between."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            self._arrived.set()  # a window waiting for this request re-checks

    async def submit(self, key: Hashable, item: Any, timeout: float) -> Any:
        """Queue ``item`` under ``key`` and wait for its result; QueueFull or TimeoutError."""
        if self.pending >= self.max_queue:
            raise QueueFull(f"{self.pending} requests are waiting (max_queue {self.max_queue})")
        job = _Job(item, asyncio.get_running_loop().create_future())
        self._queues.setdefault(key, deque()).append(job)
        self._arrived.set()
        return await asyncio.wait_for(job.future, timeout)  # on timeout the future is cancelled: skipped

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._arrived.clear()
                await self._arrived.wait()
            key, queue = min(((k, q) for k, q in self._queues.items() if q), key=lambda kq: kq[1][0].arrived)
            deadline = queue[0].arrived + self.window_s  # an old first request (the worker was busy) goes now
            while len(queue) < self.max_batch and self.arriving and (left := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            jobs = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
            if not queue:
                del self._queues[key]  # keys come from request options: keep only those waiting
            jobs = [j for j in jobs if not j.future.done()]  # timed out or abandoned while queued
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.run, key, [j.item for j in jobs])
            except Exception as err:  # a failed batch fails its requests, never the loop
                results = [err] * len(jobs)
            self.batches, self.items = self.batches + 1, self.items + len(jobs)
            for job, result in zip(jobs, results):
                if job.future.done():
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
