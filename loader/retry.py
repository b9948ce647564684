"""The one retry policy: bounded attempts, Retry-After honoured up to a cap, jittered backoff, an overall deadline,
and a minimum rate below which a transfer counts as stalled.

Transports never retry on their own; the callers that move bytes (the copy engine, small manifest requests,
uploads) ask a :class:`Retrier` whether and how long to wait after a :class:`~loader.errors.TransientError`.
Everything here is pure arithmetic on numbers handed in (attempt counts, byte counts, monotonic times), so the
rules are tested without a network; the sleeping is done by the caller (``stop.wait(delay)``) so it stays
interruptible.

The rules, and why:

* **Attempts are bounded per unit of work** (a range, a manifest, an upload). An attempt that made *real*
  progress (at least ``progress_bytes``) resets the count; a registry that trickles a byte now and then does not,
  or it could hold a blob lock for ever.
* **Retry-After is honoured up to ``max_retry_after``**: a server may ask for a pause, not for the pod's life.
* **Backoff is exponential with jitter** (0.5x-1x), so N loaders hitting one registry do not retry in lockstep.
* **An overall deadline** bounds the whole operation; a wait that would cross it is not started.
* **A minimum rate**: a transfer that stays below ``min_rate`` bytes/s for ``rate_window`` seconds is cut and
  counted as a failed attempt (a stall). The socket timeout alone cannot see a trickle.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loader.errors import DeadlineExceeded, NetworkError, TransientError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # tries without progress before giving up
    base_delay: float = 0.25
    max_delay: float = 10.0
    max_retry_after: float = 30.0
    progress_bytes: int = 1 << 20  # an attempt that moved this much resets the attempt count
    deadline: float = 3600.0  # seconds for the whole operation
    min_rate: float = 64 * 1024  # bytes/s; below it for rate_window seconds is a stall
    rate_window: float = 30.0

    def delay(self, tries: int, retry_after: float | None, rng: random.Random | None = None) -> float:
        """Seconds to wait before try number ``tries + 1`` (``tries`` >= 1 failures so far)."""
        if retry_after is not None:
            return max(0.0, min(self.max_retry_after, retry_after))
        r = rng.random() if rng is not None else random.random()
        backoff: float = self.base_delay * 2.0 ** (tries - 1)
        return min(self.max_delay, backoff) * (0.5 + r / 2)


SMALL_REQUESTS = RetryPolicy(attempts=4, base_delay=0.25, deadline=300.0)


@dataclass
class Deadline:
    """An absolute point in monotonic time shared by everything one operation does."""

    at: float
    what: str

    @classmethod
    def after(cls, seconds: float, what: str, now: float | None = None) -> Deadline:
        return cls((time.monotonic() if now is None else now) + seconds, what)

    def left(self, now: float | None = None) -> float:
        return self.at - (time.monotonic() if now is None else now)

    def check(self, now: float | None = None) -> None:
        if self.left(now) <= 0:
            raise DeadlineExceeded(f"{self.what} did not finish within its deadline; the partial download is kept"
                                   " and resumes on the next pull")


@dataclass
class Attempts:
    """Failure bookkeeping for one unit of work under a policy."""

    policy: RetryPolicy
    what: str
    deadline: Deadline | None = None
    hint: str = ""  # appended to the final error: what was kept, what to do
    tries: int = 0
    _rng: random.Random = field(default_factory=random.Random)

    def failed(self, exc: TransientError, progressed: int = 0, now: float | None = None) -> float:
        """Record a failed try that moved ``progressed`` bytes; the delay to wait, or raise NetworkError /
        DeadlineExceeded when the policy says stop."""
        if progressed >= self.policy.progress_bytes:
            self.tries = 0
        self.tries += 1
        if self.tries >= self.policy.attempts:
            raise NetworkError(f"giving up on {self.what} after {self.tries} failed attempts without progress: {exc}."
                               + (f" {self.hint}" if self.hint else ""))
        delay = self.policy.delay(self.tries, exc.retry_after, self._rng)
        if self.deadline is not None and self.deadline.left(now) < delay:
            raise DeadlineExceeded(f"giving up on {self.what}: the next retry (in {delay:.1f}s) would pass the"
                                   f" deadline of {self.deadline.what}; last error: {exc}."
                                   + (f" {self.hint}" if self.hint else ""))
        return delay


class RateWatch:
    """Cuts a transfer that stays below the policy's minimum rate for a whole window.

    ``add(n)`` after each read; it raises TransientError (a stall, retried like a dropped connection) when the
    bytes moved in the last ``rate_window`` seconds are fewer than ``min_rate * rate_window``.
    """

    def __init__(self, policy: RetryPolicy, what: str, now: float | None = None):
        self.policy = policy
        self.what = what
        self._window_start = time.monotonic() if now is None else now
        self._window_bytes = 0

    def add(self, n: int, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        self._window_bytes += n
        elapsed = t - self._window_start
        if elapsed >= self.policy.rate_window:
            if self._window_bytes < self.policy.min_rate * elapsed:
                rate = self._window_bytes / elapsed if elapsed else 0.0
                raise TransientError(f"{self.what} is trickling at {rate:.0f} B/s, under the minimum of"
                                     f" {self.policy.min_rate:.0f} B/s for {elapsed:.0f}s; cut and retried")
            self._window_start, self._window_bytes = t, 0


def call(fn: Callable[[], T], policy: RetryPolicy, what: str, log: Any = None, event: str = "retry",
         stop: threading.Event | None = None, **fields: object) -> T:
    """``fn()``, one small request, retried on TransientError under ``policy``; each retry is logged as ``event``.
    After the last attempt a NetworkError (``<last error> (after N attempts)``), or DeadlineExceeded."""
    attempts = Attempts(policy, what, Deadline.after(policy.deadline, what))
    while True:
        try:
            return fn()
        except TransientError as exc:
            try:
                delay = attempts.failed(exc)
            except DeadlineExceeded:
                raise
            except NetworkError as final:
                raise NetworkError(f"{exc} (after {attempts.tries} attempts)") from final
            if log is not None:
                log.warning(event, **fields, attempt=attempts.tries, delay_s=round(delay, 2), error=str(exc))
            if stop is not None:
                if stop.wait(delay):
                    raise
            else:
                time.sleep(delay)
