"""Pulls that outlive the call that asked for them.

kubelet gives NodePublishVolume a deadline (2 minutes) that a large model's first download can outlast. Each
publish therefore runs its pull as a job, keyed by everything that decides the pull's outcome (volume, target,
reference, pod, a digest of the secret), and waits for it only as long as the call's deadline allows. A call that
runs out answers ABORTED while the job goes on; kubelet retries the call with the same arguments, which finds the
same job and either waits again or takes its result. A finished job is kept until a call takes its result, or
for ``keep`` seconds (a pod deleted meanwhile never calls again).

Jobs for one reference run one at a time: the second waits for the first to finish downloading, then its own pull
is a cache hit (with the access proof its own credentials owe). The cache's blob locks would also keep two
downloads apart, but this way the waiting costs a parked thread, not a lock poll per blob.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
MAX_JOBS = 256  # jobs held at once (running or unclaimed): more volumes than a node mounts at once
KEEP_SECONDS = 900.0


class TooManyJobs(RuntimeError):
    """MAX_JOBS jobs are running or unclaimed; the caller should come back later."""


@dataclass
class Job(Generic[T]):
    key: tuple[str, ...]
    group: str  # jobs of one group (a reference) run one after another
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    future: Future[T] = field(default_factory=Future)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Jobs(Generic[T]):
    def __init__(self, max_jobs: int = MAX_JOBS, keep: float = KEEP_SECONDS) -> None:
        self.max_jobs, self.keep = max_jobs, keep
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, ...], Job[T]] = {}
        self._groups: dict[str, tuple[threading.Lock, int]] = {}  # group -> (lock, jobs using it)

    def start(self, key: tuple[str, ...], group: str, work: Callable[[], T]) -> Job[T]:
        """The job for ``key``: the one already running or finished, or a new one running ``work``."""
        with self._lock:
            self._expire()
            job = self._jobs.get(key)
            if job is not None:
                return job
            if len(self._jobs) >= self.max_jobs:
                raise TooManyJobs(f"{len(self._jobs)} pulls are running or waiting to be claimed")
            job = Job(key, group)
            self._jobs[key] = job
            lock, users = self._groups.get(group, (threading.Lock(), 0))
            self._groups[group] = (lock, users + 1)
        threading.Thread(target=self._run, args=(job, lock, work), name=f"pull-{group[:40]}", daemon=True).start()
        return job

    def _run(self, job: Job[T], lock: threading.Lock, work: Callable[[], T]) -> None:
        try:
            with lock:
                result = work()
        except Exception as exc:  # noqa: BLE001 - handed to the call that claims the job, which maps it
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
        finally:
            with self._lock:
                job.finished = time.monotonic()
                lock_, users = self._groups[job.group]
                if users <= 1:
                    del self._groups[job.group]
                else:
                    self._groups[job.group] = (lock_, users - 1)

    def claim(self, job: Job[T]) -> None:
        """The job's result was delivered: forget it (the next call with its key starts afresh)."""
        with self._lock:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    def running(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.finished is None)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, j in self._jobs.items() if j.finished is not None and now - j.finished > self.keep]:
            del self._jobs[key]
