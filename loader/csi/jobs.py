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

Any pod can ask for CSI volumes, so running jobs are capped per pod and per namespace (a tenant's volumes against
a registry that never answers cannot take the node's every slot), and for the node. Finished, unclaimed jobs count
against no cap: when the node's bound needs room, the oldest finished ones are dropped (a later call for one
starts it again, a cache hit).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
MAX_JOBS = 256  # jobs held at once (running or unclaimed) on the node: more volumes than a node mounts at once
MAX_PER_POD = 8  # running jobs of one pod (by UID)
MAX_PER_NAMESPACE = 32  # running jobs of one namespace (a tenant)
KEEP_SECONDS = 900.0


class TooManyJobs(RuntimeError):
    """A cap on running jobs is reached (the pod's, the namespace's or the node's); the caller retries later."""


@dataclass(frozen=True)
class Limits:
    total: int = MAX_JOBS
    per_pod: int = MAX_PER_POD
    per_namespace: int = MAX_PER_NAMESPACE


@dataclass(frozen=True)
class Owner:
    """The pod a job pulls for: its UID and namespace are what the caps count; ``name`` is for messages."""

    uid: str
    namespace: str
    name: str


@dataclass
class Job(Generic[T]):
    key: tuple[str, ...]
    group: str  # jobs of one group (a reference) run one after another
    owner: Owner
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    future: Future[T] = field(default_factory=Future)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def make_room(held: Iterable[Job[T]], owner: Owner, limits: Limits) -> list[Job[T]]:
    """Pure: the finished jobs to drop so that one more job of ``owner`` fits (oldest first); TooManyJobs when a cap
    on running jobs is reached."""
    jobs = list(held)
    running = [j for j in jobs if j.finished is None]
    of_pod = sum(1 for j in running if j.owner.uid == owner.uid)
    if of_pod >= limits.per_pod:
        raise TooManyJobs(f"pod {owner.namespace}/{owner.name} (uid {owner.uid}) has {of_pod} pulls running, the"
                          f" most one pod may have at once ({limits.per_pod})")
    of_namespace = sum(1 for j in running if j.owner.namespace == owner.namespace)
    if of_namespace >= limits.per_namespace:
        raise TooManyJobs(f"namespace {owner.namespace} has {of_namespace} pulls running, the most one namespace may"
                          f" have at once ({limits.per_namespace})")
    if len(running) >= limits.total:
        raise TooManyJobs(f"{len(running)} pulls are running on this node, the most it runs at once ({limits.total})")
    finished = sorted((j for j in jobs if j.finished is not None), key=lambda j: (j.finished or 0.0))
    return finished[:max(0, len(jobs) + 1 - limits.total)]


class Jobs(Generic[T]):
    def __init__(self, limits: Limits = Limits(), keep: float = KEEP_SECONDS) -> None:
        self.limits, self.keep = limits, keep
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, ...], Job[T]] = {}
        self._groups: dict[str, tuple[threading.Lock, int]] = {}  # group -> (lock, jobs using it)

    def start(self, key: tuple[str, ...], group: str, owner: Owner, work: Callable[[], T]) -> Job[T]:
        """The job for ``key``: the one already running or finished, or a new one running ``work`` (TooManyJobs
        when ``owner``, its namespace or the node already runs as many as its cap)."""
        with self._lock:
            self._expire()
            job = self._jobs.get(key)
            if job is not None:
                return job
            for old in make_room(self._jobs.values(), owner, self.limits):
                del self._jobs[old.key]
            job = Job(key, group, owner)
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
            self._finish(job)
            job.future.set_exception(exc)
        else:
            self._finish(job)
            job.future.set_result(result)

    def _finish(self, job: Job[T]) -> None:
        """Before its result shows: a job whose future is done never counts as running."""
        with self._lock:
            job.finished = time.monotonic()
            lock, users = self._groups[job.group]
            if users <= 1:
                del self._groups[job.group]
            else:
                self._groups[job.group] = (lock, users - 1)

    def claim(self, job: Job[T]) -> None:
        """The job's result was delivered: forget it (the next call with its key starts afresh)."""
        with self._lock:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    def running(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.finished is None)

    def held(self) -> list[tuple[str, ...]]:
        """The keys of the jobs held (running or finished and unclaimed), oldest first."""
        with self._lock:
            return list(self._jobs)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, j in self._jobs.items() if j.finished is not None and now - j.finished > self.keep]:
            del self._jobs[key]
