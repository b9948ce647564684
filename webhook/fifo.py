"""Reviews in arrival order, with the sockets read every few reviews: the webhook's answer to a long latency tail.

Why: an event loop reads every socket that is ready, then runs every request it read before it looks at the
sockets again. Under a steady load (the API server keeps N reviews in flight) that makes batches of ~N reviews.
A review that arrives just after the loop looked waits for the whole batch in progress *and* then for its place
in the next one: about twice the median latency, for a few percent of reviews (bench/admission.py measured p99
~2.2x p50 at concurrency 32, for the no-op endpoint as much as for /mutate).

``FifoRunner.run(fn)`` queues ``fn`` and runs queued functions one after another in one worker task, yielding to
the loop after every ``per_poll`` of them, so the loop reads new arrivals at least that often and they join the
queue behind the ones already waiting. A review then waits for the reviews ahead of it and at most ``per_poll``
more. ``per_poll`` 4: yielding after every review (1) cost ~25% more CPU per review in the loop's own
bookkeeping; 4 gave as low a p99 for less (bench/admission.py, interleaved A/B; docs/benchmarks.md).

The functions are plain CPU work on the loop's thread (admission reviews read memory only); they must not block.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

PER_POLL = 4


class FifoRunner:
    """Runs functions in the order they were submitted, on the running loop, ``per_poll`` between two yields."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_poll: int = PER_POLL) -> None:
        self._loop = loop
        self._per_poll = max(1, per_poll)
        self._queue: collections.deque[tuple[Callable[[], Any], asyncio.Future[Any]]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None

    async def run(self, fn: Callable[[], T]) -> T:
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.append((fn, future))
        if self._worker is None or self._worker.done():
            self._worker = self._loop.create_task(self._work())
        return await future

    async def _work(self) -> None:
        try:
            await self._drain()
        except BaseException:
            # Cancelled (the loop is shutting down) or worse: nobody will run what is queued, so say so to the
            # callers rather than leave them waiting.
            while self._queue:
                self._queue.popleft()[1].cancel()
            raise

    async def _drain(self) -> None:
        done = 0
        while self._queue:
            fn, future = self._queue.popleft()
            if future.done():  # the caller went away (cancelled): nobody wants the answer
                continue
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises it
                future.set_exception(exc)
            except BaseException:
                future.cancel()
                raise
            else:
                future.set_result(result)
            done += 1
            if done % self._per_poll == 0:
                await asyncio.sleep(0)  # let the loop read the sockets: new arrivals queue behind the waiting ones
