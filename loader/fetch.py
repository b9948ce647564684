"""The download engine: parallel, verified, resumable fetching of blobs into the cache.

How a pull spends its time on a 2-core node decides the design:

* Work is a queue of *range tasks*: a blob smaller than the target chunk is one task, a large blob, when there are
  fewer blobs than workers, is split into HTTP Range requests. The queue hands out every blob's first range
  before any blob's second (``Range.index`` orders it), so a range usually starts where its blob's hashing stands
  and hashes as it arrives too.
* A pull starts with half of ``concurrency`` workers and adds the rest only while they pay: every TICK, once
  connections have been measured for PROBE_SECONDS, when what is left would take over WIDEN_SECONDS at their
  rate (``worth_widening``). Against a registry whose connections are slow (a per-connection cap, a long path)
  every worker is soon busy; on a fast link where the node's CPU is the limit, more connections would only add
  ranges hashed a second time from the page cache and threads contending for the GIL (bench/pull.py,
  bench/shaped.py; docs/benchmarks.md). Once all workers run and nothing is queued, every TICK an idle worker gets
  the second half of the running range with the longest time left at its own rate, while that is over
  SPLIT_SECONDS (``worth_splitting``): the end of a download is not one slow connection alone while the others
  idle. The ticks run on the pull's own thread, also while it waits for a blob slot.
  Each worker reads with ``readinto`` into its own reused buffer and ``pwrite``s at the offset, so memory stays at
  ``concurrency`` buffers whatever the model size, and the GIL is released for every recv, write and hash.
* Every byte is hashed. A range that starts where its blob's hashing stands (a blob's first range, and the next
  range a worker goes on with) hashes its bytes as they arrive; the other ranges are hashed from the page cache in
  order as soon as the ranges before them are complete, so hashing overlaps the download instead of following it.
  A blob whose sha256 does not match its descriptor is fetched once more from scratch, then the pull fails; a
  registry that reports another size than the descriptor's (Content-Range total, or a 416 past the real end) fails
  it at once, as asking again cannot help (a mirror that does is passed over for the registry). A mismatching file
  is never published.
* A dropped connection resumes from the last byte written (a Range request); failures back off exponentially and
  honour ``Retry-After``; a stalled socket times out. Retries are bounded by attempts without progress.
* ``partial/<hex>`` is sized up front (the pull checks free space before any download) and ``partial/<hex>.state`` records
  each range's progress, written after the data it describes, so a SIGKILLed loader's successor resumes.
* Blob data is not fsynced: waiting for a GiB to reach the disk would cost as much as the download. A SIGKILL
  loses nothing (the page cache survives it); what only a power loss could tear is caught by re-verifying a
  model's blobs on its first use after a reboot (``Cache.verify_after_reboot``).
* Each blob is fetched under an exclusive ``flock`` on ``locks/blob-<hex>``: N loaders pulling one model fetch
  each blob once. Blobs another process holds are deferred until the end, then waited for, but only while the
  holder downloads at a fair rate (``share_rate`` over each ``lock_stall`` window): a stalled, trickling or
  lying holder (another tenant's registry) is not waited for; the waiter downloads the blob privately into tmp/
  and publishes it if it verifies.
* Bounded resources: at most ``concurrency`` blobs are open at once (one partial file descriptor and one lock
  descriptor each), whatever the number of files in the model; memory is one buffer per worker.
* One retry policy (loader.retry): attempts per range reset only by real progress (a trickle does not), a
  minimum rate per connection, Retry-After honoured up to a cap, and one deadline for the whole fetch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Set
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loader.cache import Cache, is_no_space, no_space
from loader.digest import Digest
from loader.errors import DigestMismatch, LoaderError, RangeNotSatisfiable, TransientError
from loader.retry import Attempts, Deadline, RateWatch, RetryPolicy

MiB = 1 << 20
MIN_CHUNK = 16 * MiB  # below this a Range split costs more in requests than it gains
STEAL_MIN = 4 * MiB  # an idle worker takes over half of a running range only when both halves are at least this
PROBE_SECONDS = 0.05  # a connection's rate is judged after this long since its first byte
WIDEN_SECONDS = 1.0  # the other half of the workers start only when what is left would take longer at that rate
SPLIT_SECONDS = 0.25  # a range is split only when it would take longer than this at its own rate: four first
#                       bytes of a 60 ms round trip, while a range on loopback (~250 MB/s) has at most ~0.15 s left
TICK = 0.05  # how often the pull looks at its connections' rates
BUF_SIZE = 1 * MiB
STATE_EVERY = 32 * MiB  # resume granularity after a crash
LOCK_STALL = 120.0  # the window over which a blob lock holder's progress is judged
SHARE_RATE = 1 << 20  # bytes/s: a holder slower than this over a window is not waited for (a private download)
PRIVATE = "private"
LOCK_POLL = 0.5

#: The blob-transfer policy: 6 tries without progress per range, at least 64 KiB/s per connection over 30 s,
#: Retry-After up to 60 s. The deadline is per fetch, scaled with its size (see fetch_deadline).
BLOB_POLICY = RetryPolicy(attempts=6, max_retry_after=60.0)
DEADLINE_BASE = 1800.0  # seconds, plus the model's bytes at DEADLINE_RATE
DEADLINE_RATE = 1e6  # bytes/s: a 10 GB model gets 30 min + 2.8 h


def fetch_deadline(nbytes: int) -> float:
    return DEADLINE_BASE + nbytes / DEADLINE_RATE


class BlobBody(Protocol):
    start: int
    total: int | None

    def readinto(self, buf: memoryview) -> int: ...
    def __enter__(self) -> BlobBody: ...
    def __exit__(self, *exc: object) -> None: ...


class BlobSource(Protocol):
    """Where blobs come from: a registry repository (with its mirrors), or an OCI layout bundle."""

    def open_blob(self, digest: str, start: int = 0, end: int | None = None, size: int | None = None) -> BlobBody: ...
    def count_bytes(self, n: int) -> None: ...


@dataclass
class Range:
    index: int
    start: int
    end: int  # exclusive
    done: int = 0  # bytes written from start
    started: bool = False  # a worker has taken it (in this process)
    began: float | None = None  # monotonic time of its first byte in this process: its rate is measured from there
    base: int = 0  # ``done`` at ``began``

    def rate(self, now: float) -> float | None:
        """Bytes per second since its first byte, once PROBE_SECONDS have passed; None before."""
        if self.began is None or now - self.began < PROBE_SECONDS:
            return None
        return (self.done - self.base) / (now - self.began)

    @property
    def complete(self) -> bool:
        return self.start + self.done >= self.end


@dataclass
class BlobJob:
    digest: Digest
    size: int
    partial: Path
    state: Path
    ranges: list[Range]
    fd: int
    attempt: int = 0
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    hashed_upto: int = 0
    hashing: bool = False
    inline: Range | None = None  # the range allowed to hash as it downloads
    lock: threading.Lock = field(default_factory=threading.Lock)
    since_state: int = 0
    finished: bool = False
    lock_stack: ExitStack | None = None
    resumed: bool = False  # bytes on disk from an earlier loader (maybe another tenant's): not this pull's own
    private: bool = False  # downloaded beside a slow lock holder, in tmp/, without the blob lock


@dataclass(frozen=True)
class Blob:
    digest: Digest
    size: int


def plan_ranges(size: int, target_chunk: int) -> list[tuple[int, int]]:
    """Split a blob into about-equal, MiB-aligned ranges no bigger than ~1.5x the target."""
    if size <= target_chunk * 1.5:
        return [(0, size)]
    n = math.ceil(size / target_chunk)
    chunk = math.ceil(size / n / MiB) * MiB
    return [(s, min(size, s + chunk)) for s in range(0, size, chunk)]


def target_chunk(total: int, concurrency: int) -> int:
    """About two ranges per worker: a worker that finishes early takes another range, so the end of a download is
    not one slow connection running alone (measured on a shaped link: bench/shaped.py, docs/benchmarks.md)."""
    return max(MIN_CHUNK, math.ceil(total / max(1, 2 * concurrency)))


def worth_widening(left: int, rate: float | None) -> bool:
    """Whether ``left`` bytes would take over WIDEN_SECONDS at the pull's measured rate (all connections)."""
    return rate is not None and left / max(rate, 1.0) > WIDEN_SECONDS


def worth_splitting(left: int, rate: float | None) -> float:
    """How long a running range would still take at its measured rate, when splitting it is worth a new request
    (it takes over SPLIT_SECONDS, and each half would be at least STEAL_MIN); 0.0 when it is not, or not measured
    yet."""
    if rate is None or left < 2 * STEAL_MIN:
        return 0.0
    seconds = left / max(rate, 1.0)
    return seconds if seconds > SPLIT_SECONDS else 0.0


class _Pool:
    """A queue of callables served by ``width`` threads (``widen`` raises it to ``size``), lowest ``order`` first
    and in order of submission among equals; the first exception stops the rest and is re-raised. Threads start
    when a task would otherwise wait for one."""

    def __init__(self, size: int, width: int, stop: threading.Event):
        self.q: queue.PriorityQueue[tuple[float, int, Callable[[], object] | None]] = queue.PriorityQueue()
        self.cv = threading.Condition()
        self.seq = 0
        self.pending = 0  # submitted and not finished: queued or running
        self.error: BaseException | None = None
        self.stop = stop
        self.size = size
        self.width = min(width, size)
        self.threads: list[threading.Thread] = []

    def submit(self, fn: Callable[[], object], order: float = 0) -> None:
        with self.cv:
            self.pending += 1
            self.seq += 1
            self.q.put((order, self.seq, fn))
            self._start_threads()

    def widen(self) -> None:
        with self.cv:
            self.width = self.size
            self._start_threads()

    def idle(self) -> int:
        """Threads that would start a task submitted now."""
        with self.cv:
            return max(0, self.width - self.pending)

    def _start_threads(self) -> None:  # under self.cv
        while len(self.threads) < min(self.pending, self.width):
            t = threading.Thread(target=self._work, name=f"fetch-{len(self.threads)}", daemon=True)
            self.threads.append(t)
            t.start()

    def _work(self) -> None:
        while True:
            fn = self.q.get()[2]
            if fn is None:
                return
            try:
                if not self.stop.is_set():
                    fn()
            except BaseException as exc:  # noqa: BLE001  handed to the caller of wait(), who raises it
                with self.cv:
                    if self.error is None:
                        self.error = exc
                self.stop.set()
            finally:
                with self.cv:
                    self.pending -= 1
                    self.cv.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """True when every task has finished (raising the first error), False when ``timeout`` passed first."""
        with self.cv:
            if self.pending and not self.cv.wait_for(lambda: not self.pending, timeout):
                return False
        if self.error:
            raise self.error
        return True

    def close(self) -> None:
        with self.cv:
            self.size = self.width = 0  # no thread starts after this
            threads = list(self.threads)
            for _ in threads:
                self.seq += 1
                self.q.put((-math.inf, self.seq, None))  # before any task still queued
        for t in threads:
            t.join()


def size_mismatch(source: str, digest: Digest, size: int, label: str, real: int) -> DigestMismatch:
    # Deterministic, so not retried: the same request gets the same answer until the artifact is fixed.
    return DigestMismatch(
        f"registry {source} serves blob {digest} of {label} as {real} bytes, but the manifest's descriptor says"
        f" {size}: the manifest does not describe its blobs; push the model again (model-loader push) so the"
        " manifest is rebuilt from the files. Nothing was published"
    )


def transfer(source: BlobSource, digest: Digest, size: int, start: int, end: int,
             write: Callable[[memoryview, int], None], buf: bytearray, *, attempts: Attempts, policy: RetryPolicy,
             stop: threading.Event | None, log: Any, label: str, source_name: str, event: str = "fetch.retry",
             end_of: Callable[[], int] | None = None) -> bool:
    """Deliver bytes [start, end) of a blob to ``write(chunk, offset)``, in order, resuming a dropped or stalled
    connection with a Range request from the last byte delivered; the one read loop of every blob download
    (pull's ranges, export's streams, import's reads from a bundle). False when ``stop`` was set.

    Retries follow ``attempts`` (its policy and deadline); each connection must keep ``policy.min_rate``. A source
    that reports another total size than ``size`` fails at once (DigestMismatch): asking again cannot help.
    ``end_of``, when given, is read before every read: the end may move down while the transfer runs (another
    worker took over the rest of the range), and nothing past it is delivered.
    """
    mv = memoryview(buf)
    pos = start

    def current_end() -> int:
        return end_of() if end_of is not None else end

    while pos < current_end():
        if stop is not None and stop.is_set():
            return False
        if attempts.deadline is not None:
            attempts.deadline.check()
        before = pos
        try:
            with source.open_blob(digest, pos, end - 1, size=size) as body:
                if body.total is not None and body.total != size:
                    raise size_mismatch(source_name, digest, size, label, body.total)
                watch = RateWatch(policy, f"blob {digest.short} from {source_name}")
                skip = pos - body.start  # a server that ignored Range sends from byte 0
                while pos < (stop_at := current_end()):
                    if stop is not None and stop.is_set():
                        return False
                    if attempts.deadline is not None:  # a fast-enough trickle must not outlive it either
                        attempts.deadline.check()
                    n = body.readinto(mv[:min(len(buf), stop_at - pos + skip)])
                    if n == 0:
                        raise TransientError(f"{source_name} closed the connection {stop_at - pos} bytes early")
                    source.count_bytes(n)
                    watch.add(n)
                    chunk = mv[:n]
                    if skip:
                        drop = min(skip, n)
                        skip -= drop
                        chunk = chunk[drop:]
                        if not len(chunk):
                            continue
                    chunk = chunk[: max(0, current_end() - pos)]  # the end may have moved down meanwhile
                    if len(chunk):
                        write(chunk, pos)
                        pos += len(chunk)
        except TransientError as exc:
            if isinstance(exc, RangeNotSatisfiable) and exc.blob_size is not None and exc.blob_size != size:
                raise size_mismatch(source_name, digest, size, label, exc.blob_size) from exc
            delay = attempts.failed(exc, progressed=pos - before)
            if log:
                log.warning(event, ref=label, blob=digest.short, offset=pos, attempt=attempts.tries,
                            delay_s=round(delay, 2), error=str(exc))
            if stop is not None:
                if stop.wait(delay):
                    return False
            else:
                time.sleep(delay)
    return True


class Fetcher:
    def __init__(self, client: BlobSource, cache: Cache, *, concurrency: int = 8, log: Any = None,
                 progress: Any = None, label: str = "", source_name: str = "",
                 policy: RetryPolicy = BLOB_POLICY, lock_stall: float = LOCK_STALL, share_rate: float = SHARE_RATE):
        self.client = client
        self.cache = cache
        self.concurrency = max(1, concurrency)
        self.log = log
        self.progress = progress
        self.label = label
        self.source_name = source_name or getattr(getattr(client, "ref", None), "registry", "the registry")
        self.policy = policy
        self.lock_stall = lock_stall
        self.share_rate = share_rate
        self.deadline: Deadline | None = None
        self._stop = threading.Event()
        self._local = threading.local()
        self._jobs: list[BlobJob] = []
        self._jobs_lock = threading.Lock()
        self._inflight: dict[int, tuple[BlobJob, Range]] = {}  # ranges being downloaded, for _widen
        # For the pull's rate (_widen): its first byte's time, the bytes fetched in jobs already closed, and all.
        self._first_byte: float | None = None
        self._closed_bytes = 0
        self._total = 0  # bytes of the blobs this fetch downloads
        self.verify_only: frozenset[Digest] = frozenset()
        # Blobs whose every byte this Fetcher downloaded from its source and verified: the access rule's proof that
        # the source holds them. Blobs it skipped (present, or published meanwhile by another loader) and blobs it
        # finished from another loader's partial download are not in it.
        self.downloaded: set[Digest] = set()

    # ---- public --------------------------------------------------------------------------------------------------
    def missing(self, blobs: list[Blob], verify_only: Set[Digest] = frozenset()) -> list[Blob]:
        """What fetch() downloads: blobs not in the cache, and those to verify again (``verify_only``)."""
        seen: set[str] = set()
        out = []
        for b in blobs:
            if b.digest not in seen and (b.digest in verify_only or not self.cache.has_blob(b.digest, b.size)):
                seen.add(b.digest)
                out.append(b)
        return out

    def resumable_bytes(self, blobs: list[Blob]) -> int:
        """Bytes already on disk in partial files from an earlier, interrupted pull."""
        n = 0
        for b in blobs:
            st = _load_state(self.cache.partial_path(b.digest), b)
            if st:
                n += sum(r.done for r in st)
        return n

    def fetch(self, blobs: list[Blob], deadline: Deadline | None = None,
              verify_only: Set[Digest] = frozenset()) -> None:
        """Make every blob present and verified in the cache, or raise.

        Blobs in ``verify_only`` are downloaded and verified even though the cache has them (a pod proving it can
        read them from its registry); their download is then dropped, the cached file is kept as it is."""
        self.verify_only = frozenset(verify_only)
        todo = self.missing(blobs, self.verify_only)
        if not todo:
            return
        total_missing = sum(b.size for b in todo)
        self.deadline = deadline or Deadline.after(fetch_deadline(total_missing), f"the download of {self.label}")
        self._stop = stop = threading.Event()
        self._jobs = []
        self._first_byte, self._closed_bytes, self._total = None, 0, total_missing
        chunk = target_chunk(total_missing, self.concurrency)
        pool = _Pool(self.concurrency, math.ceil(self.concurrency / 2), stop)
        # At most `concurrency` blobs open at once: each holds a lock fd and a partial fd until it finishes.
        slots = threading.BoundedSemaphore(self.concurrency)
        deferred: list[Blob] = []
        batch: list[BlobJob] = []  # opened, not yet queued: queued together, every first range before any second

        def submit_batch() -> None:  # the open blobs download while the next one waits for a slot
            self._submit_jobs(pool, batch)
            batch.clear()

        try:
            # Largest first, so the long tail is a small blob, not a big one.
            for b in sorted(todo, key=lambda b: -b.size):
                if not self._take_slot(pool, slots, stop, before_waiting=submit_batch):
                    break
                job = self._start_job(b, chunk, slots, wait=False)
                if job is None:
                    if self._wanted(b):
                        deferred.append(b)
                    continue
                batch.append(job)
            submit_batch()
            # Blobs other loaders were fetching: wait for their locks (in parallel, on all the workers: a wait is not a
            # connection), then fetch what is still missing.
            if deferred:
                pool.widen()
            for b in deferred:
                if not self._take_slot(pool, slots, stop):
                    break
                # After the ranges already queued: a worker waiting for a lock does not hold them up.
                pool.submit(functools.partial(self._after_wait, pool, b, chunk, slots), order=math.inf)
            while not pool.wait(TICK):
                self._widen(pool)
        finally:
            stop.set()
            pool.close()
            with self._jobs_lock:
                jobs = list(self._jobs)
            for job in jobs:
                self._abandon(job)

    # ---- jobs ----------------------------------------------------------------------------------------------------
    def _wanted(self, b: Blob) -> bool:
        return b.digest in self.verify_only or not self.cache.has_blob(b.digest, b.size)

    def _take_slot(self, pool: _Pool, slots: threading.Semaphore, stop: threading.Event,
                   before_waiting: Callable[[], None] | None = None) -> bool:
        """Take a blob slot (at most ``concurrency`` blobs open); when none is free, call ``before_waiting``, then
        wait, looking at the connections meanwhile. False when the pull stopped."""
        if not slots.acquire(blocking=False):
            if before_waiting is not None:
                before_waiting()
            while not slots.acquire(timeout=TICK):
                if stop.is_set():
                    return False
                self._widen(pool)
        if stop.is_set():
            slots.release()
            return False
        return True

    def _after_wait(self, pool: _Pool, b: Blob, chunk: int, slots: threading.Semaphore) -> None:
        job = self._start_job(b, chunk, slots, wait=True)
        if job is not None:
            self._submit_jobs(pool, [job])

    def _start_job(self, b: Blob, chunk: int, slots: threading.Semaphore, wait: bool) -> BlobJob | None:
        """Lock the blob and open its partial file; None (slot released) when another loader has it or had it."""
        stack = ExitStack()
        stack.callback(slots.release)
        try:
            held: bool | str = self._try_lock(b, stack)
            if not held and wait:
                held = self._wait_for_lock(b, stack)
            if not held or not self._wanted(b):
                stack.close()
                return None
            job = self._open_private_job(b, chunk) if held == PRIVATE else self._open_job(b, chunk, attempt=0)
        except BaseException:
            stack.close()
            raise
        job.lock_stack = stack
        return job

    def _try_lock(self, b: Blob, stack: ExitStack) -> bool:
        """Take the blob's lock without waiting; when held, ``stack`` owns it."""
        attempt = ExitStack()
        if attempt.enter_context(self.cache.lock(f"blob-{b.digest.hex}", blocking=False)):
            stack.enter_context(attempt)
            return True
        attempt.close()
        return False

    def _wait_for_lock(self, b: Blob, stack: ExitStack) -> bool | str:
        """Wait for another loader's lock on a blob while that loader downloads it at a fair rate (its partial file
        grows by at least ``share_rate`` bytes/s over each ``lock_stall`` window). Otherwise (it stalls, trickles,
        or is another tenant's slow or lying registry) stop waiting: PRIVATE, download it privately. True when the
        lock was taken, False when the blob is no longer wanted (the holder published it)."""
        partial = self.cache.partial_path(b.digest)
        window_start, window_bytes = time.monotonic(), _allocated(partial)
        while True:
            if self._stop.is_set():
                return False
            if not self._wanted(b):
                return False
            if self._try_lock(b, stack):
                return True
            declared = _declared_size(partial)
            if declared not in (None, 0, b.size):
                # The holder downloads this digest as another size: one of the two descriptors lies (another
                # tenant's manifest can name any digest with any size). Never wait for that one.
                if self.log:
                    self.log.warning("fetch.lock_other_size", ref=self.label, blob=b.digest.short, size=b.size,
                                     holder_size=declared, action="downloading it privately instead of waiting")
                return PRIVATE
            now = time.monotonic()
            if now - window_start >= self.lock_stall:
                grown = _allocated(partial) - window_bytes
                if grown < self.share_rate * (now - window_start):
                    if self.log:
                        self.log.warning("fetch.lock_slow", ref=self.label, blob=b.digest.short,
                                         holder_rate=round(grown / (now - window_start)),
                                         action="downloading it privately instead of waiting")
                    return PRIVATE
                window_start, window_bytes = now, _allocated(partial)
            if self.deadline is not None:
                self.deadline.check(now)
            self._stop.wait(LOCK_POLL)

    def _open_private_job(self, b: Blob, chunk: int, attempt: int = 0) -> BlobJob:
        """A download of its own, beside another loader's slow one: a partial file in tmp/ (no lock, no resume
        state), published only if it verifies and the blob is still absent."""
        path = self.cache.tmp_dir() / f"ingest-{b.digest.hex[:16]}-{uuid.uuid4().hex}"
        fd = self.cache.open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            _preallocate(fd, b.size, self.cache, b.digest)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        ranges = [Range(i, s, e) for i, (s, e) in enumerate(plan_ranges(b.size, chunk))]
        job = BlobJob(b.digest, b.size, path, path.with_name(path.name + ".state"), ranges, fd, attempt=attempt,
                      private=True)
        with self._jobs_lock:
            self._jobs.append(job)
        job.inline = ranges[0]
        job.hashing = True
        return job

    def _open_job(self, b: Blob, chunk: int, attempt: int) -> BlobJob:
        partial = self.cache.partial_path(b.digest)
        state_path = partial.with_name(partial.name + ".state")
        # A download to prove access starts from scratch: resuming would count another loader's bytes as its own.
        # Another uid's partial (tenants' loaders may run as different users of the cache's group) is not resumed
        # either: publishing makes a blob read-only, which only its owner may do (it failed with EPERM at every
        # pull, the state saying the blob was complete).
        resumable = attempt == 0 and b.digest not in self.verify_only and _owned(partial)
        ranges = _load_state(partial, b) if resumable else None
        resumed = ranges is not None
        if ranges is None:
            for p in (partial, *_state_files(state_path)):
                p.unlink(missing_ok=True)
            ranges = [Range(i, s, e) for i, (s, e) in enumerate(plan_ranges(b.size, chunk))]
        fd = self.cache.open_partial(partial)
        try:
            if not resumed:
                _preallocate(fd, b.size, self.cache, b.digest)
        except BaseException:
            os.close(fd)
            raise
        job = BlobJob(b.digest, b.size, partial, state_path, ranges, fd, attempt=attempt, resumed=resumed)
        with self._jobs_lock:
            self._jobs.append(job)
        if not resumed:
            job.inline = ranges[0]
            job.hashing = True  # owned by the first range until it completes
            self._save_state(job)
        elif self.log:
            done = sum(r.done for r in ranges)
            self.log.info("fetch.resume", ref=self.label, blob=b.digest, bytes_on_disk=done, size=b.size)
        return job

    def _submit_jobs(self, pool: _Pool, jobs: list[BlobJob]) -> None:
        """Queue the jobs' ranges, every job's first range before any job's second (and so on): each worker then
        starts a blob of its own and goes on with that blob's next range, hashing every range as it arrives."""
        todo: list[tuple[BlobJob, Range]] = []
        for job in jobs:
            if job.size == 0 or all(r.complete for r in job.ranges):
                job.inline, job.hashing = None, False
                pool.submit(functools.partial(self._hash_forward, pool, job))
                continue
            if job.inline is None:
                # Resumed: hash what is already on disk while the rest downloads.
                pool.submit(functools.partial(self._hash_forward, pool, job))
            todo += [(job, r) for r in job.ranges if not r.complete]
        for job, r in sorted(todo, key=lambda t: t[1].index):
            pool.submit(functools.partial(self._run_range, pool, job, r), order=r.index)

    def _run_range(self, pool: _Pool, job: BlobJob, r: Range | None) -> None:
        """Fetch a range, then go on with the next range of the same blob if no worker has taken it yet: it starts
        where the blob's hashing stands, so it is hashed as it arrives rather than read back from the page cache
        (when every blob has a worker, each fetches its blob in order)."""
        while r is not None:
            with job.lock:
                if r.started or job.finished:
                    return
                r.started = True
                if job.inline is None and not job.hashing and job.hashed_upto == r.start + r.done:
                    job.inline, job.hashing = r, True  # everything before it is hashed: hash as it arrives
            if not self._fetch_range(job, r):
                return
            self._hash_forward(pool, job)
            with job.lock:
                r = next((x for x in job.ranges if x.start == r.end and not x.started), None)

    def _fetch_range(self, job: BlobJob, r: Range) -> bool:
        """Download a range into the blob's partial file; False when the pull was stopped first."""
        attempts = Attempts(self.policy, f"blob {job.digest} of {self.label}", self.deadline,
                            hint="The partial download is kept and resumes on the next pull.")

        def write(chunk: memoryview, off: int) -> None:
            try:
                os.pwrite(job.fd, chunk, off)
            except OSError as exc:
                if is_no_space(exc):
                    raise no_space(exc, self.cache, job.digest) from exc
                raise
            n = len(chunk)
            if r.began is None:
                r.began, r.base = time.monotonic(), r.done
                if self._first_byte is None:  # two threads may both set it, microseconds apart
                    self._first_byte = r.began
            if job.inline is r:
                job.hasher.update(chunk)
                job.hashed_upto = off + n
            r.done += n
            if self.progress:
                self.progress.add(n)
            job.since_state += n
            if job.since_state >= STATE_EVERY:
                with job.lock:
                    job.since_state = 0
                    self._save_state(job)

        with self._jobs_lock:
            self._inflight[id(r)] = (job, r)
        try:
            done = transfer(self.client, job.digest, job.size, r.start + r.done, r.end, write, self._buffer(),
                            attempts=attempts, policy=self.policy, stop=self._stop, log=self.log, label=self.label,
                            source_name=self.source_name, end_of=lambda: r.end)
        except LoaderError:
            with job.lock:
                self._save_state(job)
            raise
        finally:
            with self._jobs_lock:
                self._inflight.pop(id(r), None)
        if not done:
            return False
        with job.lock:
            self._save_state(job)
            if job.inline is r:
                job.inline = None
                job.hashing = False
        return True

    def _widen(self, pool: _Pool) -> None:
        """Every TICK: all workers once the connections turn out slow (``worth_widening``); then, with nothing
        queued, idle workers take over halves of running ranges that would still take long (``worth_splitting``):
        on a shared link connections get unequal shares, and the end of a download is then not one slow connection
        running alone while the others idle (bench/shaped.py)."""
        now = time.monotonic()
        with self._jobs_lock:
            flights = [(job, r, r.rate(now)) for job, r in self._inflight.values()]
            live = [r for job in self._jobs for r in job.ranges]
        if pool.width < pool.size:
            got = self._closed_bytes + sum(r.done - r.base for r in live if r.began is not None)
            left = self._total - got  # blobs not opened yet included; resumed bytes make it an overestimate
            first = self._first_byte
            rate = got / (now - first) if first is not None and now - first >= PROBE_SECONDS else None
            if worth_widening(left, rate):
                pool.widen()
                if self.log:
                    self.log.debug("fetch.widen", ref=self.label, workers=pool.size, bytes_left=left)
            return
        for _ in range(pool.idle() if pool.q.empty() else 0):
            seconds, job, r = max(((worth_splitting(r.end - r.start - r.done, rate), job, r)
                                   for job, r, rate in flights), key=lambda f: f[0], default=(0.0, None, None))
            if not seconds or job is None or r is None or not self._split(pool, job, r):
                return
            if self.log:
                self.log.debug("fetch.split", ref=self.label, blob=job.digest.short, at=r.end,
                               seconds_left=round(seconds, 2))

    def _split(self, pool: _Pool, job: BlobJob, r: Range) -> bool:
        """An idle worker takes over the second half of a running range."""
        with job.lock:
            pos = r.start + r.done
            mid = math.ceil((pos + (r.end - pos) // 2) / MiB) * MiB
            if mid - pos < STEAL_MIN or r.end - mid < STEAL_MIN or job.finished:
                return False
            new = Range(len(job.ranges), mid, r.end)
            r.end = mid  # the other worker stops there (transfer reads the end before every read)
            job.ranges.append(new)
            job.ranges.sort(key=lambda x: x.start)
            self._save_state(job)
        pool.submit(functools.partial(self._run_range, pool, job, new))  # order 0: splits happen with nothing queued
        return True

    def _hash_forward(self, pool: _Pool, job: BlobJob) -> None:
        """Hash every complete range that follows what is hashed; finish the blob when all of it is."""
        buf = self._buffer()  # the same buffer the thread downloads with: memory stays one buffer per worker
        with job.lock:
            if job.hashing or job.finished:
                return
            job.hashing = True
        try:
            while True:
                with job.lock:
                    nxt = next((r for r in job.ranges if r.start <= job.hashed_upto < r.end), None)
                    if nxt is None or not nxt.complete:
                        if job.hashed_upto >= job.size:
                            break
                        job.hashing = False
                        return
                pos = job.hashed_upto
                mv = memoryview(buf)
                while pos < nxt.end:
                    n = os.preadv(job.fd, [mv[: min(len(buf), nxt.end - pos)]], pos)
                    if n <= 0:
                        raise LoaderError(f"short read of {job.partial} at {pos}")
                    job.hasher.update(mv[:n])
                    pos += n
                job.hashed_upto = pos
        except BaseException:
            with job.lock:
                job.hashing = False
            raise
        self._finish(pool, job)

    def _close_job(self, job: BlobJob) -> None:
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1
        with self._jobs_lock:
            if job in self._jobs:
                self._jobs.remove(job)
                self._closed_bytes += sum(r.done - r.base for r in job.ranges if r.began is not None)

    def _finish(self, pool: _Pool, job: BlobJob) -> None:
        got = Digest.from_hasher(job.hasher)
        with job.lock:
            job.finished = True
        stack = job.lock_stack
        assert stack is not None
        hashed = os.fstat(job.fd) if job.fd >= 0 else None
        self._close_job(job)
        if got == job.digest:
            with stack:  # the blob's lock and slot, whatever publishing meets
                if not _same_file(hashed, job.partial):
                    # Only this loader writes its partial (the blob's lock, or a private name in tmp/); a path that
                    # now names another file is never published in its place, whatever that file holds.
                    raise DigestMismatch(
                        f"the partial download of blob {job.digest} of {self.label} ({job.partial}) was replaced"
                        " while it downloaded: something else writes into this cache; nothing was published. Pull"
                        " again")
                if not job.resumed:
                    self.downloaded.add(job.digest)
                if job.digest in self.verify_only or (job.private and self.cache.has_blob(job.digest, job.size)):
                    job.partial.unlink()  # proven; the cached file (identical, and hard-linked by trees) stays
                elif job.private:
                    self.cache.publish_blob_if_absent(job.partial, job.digest, job.size)
                else:
                    self.cache.publish_blob(job.partial, job.digest)
                for p in _state_files(job.state):
                    p.unlink(missing_ok=True)
            return
        job.partial.unlink(missing_ok=True)
        for p in _state_files(job.state):
            p.unlink(missing_ok=True)
        if not self._wanted(Blob(job.digest, job.size)):
            # A lock holder published it meanwhile (verified): this pull needs no copy of its own; what it proves
            # about its registry is the access rule's to ask (it is not in self.downloaded).
            if self.log:
                self.log.warning("fetch.digest_mismatch", ref=self.label, blob=job.digest, got=got,
                                 action="none: another loader published it meanwhile")
            stack.close()
            return
        if job.attempt == 0:
            if self.log:
                self.log.warning("fetch.digest_mismatch", ref=self.label, blob=job.digest, got=got, action="refetch")
            if self.progress:
                self.progress.add(-job.size)
            try:
                b, chunk = Blob(job.digest, job.size), target_chunk(job.size, self.concurrency)
                # A private download is fetched again privately: partial/<hex> belongs to the lock's holder.
                reopen = self._open_private_job if job.private else self._open_job
                fresh = reopen(b, chunk, attempt=1)
            except BaseException:
                stack.close()
                raise
            fresh.lock_stack, job.lock_stack = stack, None
            self._submit_jobs(pool, [fresh])
            return
        stack.close()
        raise DigestMismatch(
            f"blob {job.digest} of {self.label} from registry {self.source_name} hashed to {got} twice:"
            " the registry or something between it and this node is corrupting data; nothing was published"
        )

    def _abandon(self, job: BlobJob) -> None:
        """On failure, keep the partial file and its state for the next pull; drop the lock and the slot. A
        download that was only to verify a cached blob is not kept: the cache has the blob."""
        if (job.digest in self.verify_only or job.private) and job.lock_stack is not None:
            self._close_job(job)
            for p in (job.partial, *_state_files(job.state)):
                p.unlink(missing_ok=True)
        if job.fd >= 0:
            try:
                with job.lock:
                    self._save_state(job)
            except OSError:
                pass
        self._close_job(job)
        if job.lock_stack is not None:
            job.lock_stack.close()
            job.lock_stack = None

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _buffer(self, size: int = BUF_SIZE) -> bytearray:
        key = f"buf{size}"
        buf = getattr(self._local, key, None)
        if buf is None:
            buf = bytearray(size)
            setattr(self._local, key, buf)
        return buf

    def _save_state(self, job: BlobJob) -> None:
        if job.fd < 0 or job.finished or job.private:
            return
        data = json.dumps({"digest": job.digest, "size": job.size,
                           "ranges": [[r.start, r.end, r.done] for r in job.ranges]}).encode()
        tmp = _state_files(job.state)[1]
        tmp.write_bytes(data)
        os.replace(tmp, job.state)


def _state_files(state: Path) -> tuple[Path, Path]:
    """A blob's resume state and the file it is written through. One fixed temporary name is enough: only the
    holder of the blob's lock writes it, under job.lock; a kill between the write and the rename leaves it, and
    whoever next finishes or restarts the blob removes it with the state."""
    return state, state.with_name(state.name + ".tmp")


def _load_state(partial: Path, b: Blob) -> list[Range] | None:
    state = partial.with_name(partial.name + ".state")
    try:
        obj = json.loads(state.read_text())
        if obj["digest"] != b.digest or obj["size"] != b.size or partial.stat().st_size != b.size:
            return None
        ranges = [Range(i, int(s), int(e), int(d)) for i, (s, e, d) in enumerate(obj["ranges"])]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    pos = 0
    for r in ranges:  # the ranges must tile the blob exactly
        if r.start != pos or (r.end <= r.start and b.size) or not 0 <= r.done <= r.end - r.start:
            return None
        pos = r.end
    return ranges if pos == b.size else None


def _preallocate(fd: int, size: int, cache: Cache, digest: str) -> None:
    """Size the partial file (sparse). Not posix_fallocate: on ext4 it creates unwritten extents whose conversion
    doubled the kernel time of a pull here; the free-space check before the download fails early instead, and a
    write that still hits ENOSPC is reported as NoSpaceError."""
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space(exc, cache, f"blob {digest} ({size} bytes)") from exc
        raise


def _owned(path: Path) -> bool:
    """Whether ``path`` is missing or this process's user owns it."""
    try:
        return os.lstat(path).st_uid == os.geteuid()
    except FileNotFoundError:
        return True


def _same_file(st: os.stat_result | None, path: Path) -> bool:
    """Whether ``path`` still names the file ``st`` describes (a blob's partial, as hashed)."""
    if st is None:
        return True  # nothing was open: an empty blob, or one verified from a complete earlier download
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _declared_size(partial: Path) -> int | None:
    """The size a lock holder gave its partial file (it is sized up front to its descriptor's size)."""
    try:
        return os.stat(partial).st_size
    except OSError:
        return None


def _allocated(partial: Path) -> int:
    """Bytes a lock holder has written into its (sparse) partial file; the file gone counts as nothing."""
    try:
        return os.stat(partial).st_blocks * 512
    except OSError:
        return 0
