"""The download engine: parallel, verified, resumable fetching of blobs into the cache.

How a pull spends its time on a 2-core node decides the design:

* Work is a queue of *range tasks* served by ``concurrency`` threads. A blob smaller than the target chunk is one
  task; a large blob, when there are fewer blobs than workers, is split into HTTP Range requests fetched at once.
  Each worker reads with ``readinto`` into its own reused buffer and ``pwrite``s at the offset, so memory stays at
  ``concurrency`` buffers whatever the model size, and the GIL is released for every recv, write and hash.
* Every byte is hashed. The first range of a blob hashes its bytes as they arrive; the other ranges are hashed
  from the page cache in order as soon as the ranges before them are complete, so hashing overlaps the download
  instead of following it. A blob whose sha256 does not match its descriptor is fetched once more from scratch,
  then the pull fails; a registry that reports another size than the descriptor's (Content-Range total, or a 416
  past the real end) fails it at once, as asking again cannot help (a mirror that does is passed over for the
  registry). A mismatching file is never published.
* A dropped connection resumes from the last byte written (a Range request); failures back off exponentially and
  honour ``Retry-After``; a stalled socket times out. Retries are bounded by attempts without progress.
* ``partial/<hex>`` is sized up front (the pull checks free space before any download) and ``partial/<hex>.state`` records
  each range's progress, written after the data it describes, so a SIGKILLed loader's successor resumes.
* Blob data is not fsynced: waiting for a GiB to reach the disk would cost as much as the download. A SIGKILL
  loses nothing (the page cache survives it); what only a power loss could tear is caught by re-verifying a
  model's blobs on its first use after a reboot (``Cache.verify_after_reboot``).
* Each blob is fetched under an exclusive ``flock`` on ``locks/blob-<hex>``: N loaders pulling one model fetch
  each blob once. Blobs another process holds are deferred until the end, then waited for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import random
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from loader.cache import Cache, is_no_space, no_space
from loader.errors import DigestMismatch, LoaderError, NetworkError, TransientError

MiB = 1 << 20
MIN_CHUNK = 32 * MiB  # below this a Range split costs more in requests than it gains
BUF_SIZE = 1 * MiB
STATE_EVERY = 32 * MiB  # resume granularity after a crash
MAX_TRIES_WITHOUT_PROGRESS = 6
MAX_RETRY_AFTER = 60.0


@dataclass
class Range:
    index: int
    start: int
    end: int  # exclusive
    done: int = 0  # bytes written from start

    @property
    def complete(self) -> bool:
        return self.start + self.done >= self.end


@dataclass
class BlobJob:
    digest: str
    size: int
    partial: Path
    state: Path
    ranges: list[Range]
    fd: int
    attempt: int = 0
    hasher: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    hashed_upto: int = 0
    hashing: bool = False
    inline: Range | None = None  # the range allowed to hash as it downloads
    lock: threading.Lock = field(default_factory=threading.Lock)
    since_state: int = 0
    finished: bool = False
    lock_stack: ExitStack | None = None


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


def plan_ranges(size: int, target_chunk: int) -> list[tuple[int, int]]:
    """Split a blob into about-equal, MiB-aligned ranges no bigger than ~1.5x the target."""
    if size <= target_chunk * 1.5:
        return [(0, size)]
    n = math.ceil(size / target_chunk)
    chunk = math.ceil(size / n / MiB) * MiB
    return [(s, min(size, s + chunk)) for s in range(0, size, chunk)]


def target_chunk(total: int, concurrency: int) -> int:
    return max(MIN_CHUNK, math.ceil(total / max(1, concurrency)))


class _Pool:
    """A queue of callables served by N threads; the first exception stops the rest and is re-raised."""

    def __init__(self, n: int, stop: threading.Event):
        self.q: queue.Queue = queue.Queue()
        self.cv = threading.Condition()
        self.pending = 0
        self.error: BaseException | None = None
        self.stop = stop
        self.threads = [threading.Thread(target=self._work, name=f"fetch-{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def submit(self, fn) -> None:
        with self.cv:
            self.pending += 1
        self.q.put(fn)

    def _work(self) -> None:
        while True:
            fn = self.q.get()
            if fn is None:
                return
            try:
                if not self.stop.is_set():
                    fn()
            except BaseException as exc:  # handed to the caller of wait()
                with self.cv:
                    if self.error is None:
                        self.error = exc
                self.stop.set()
            finally:
                with self.cv:
                    self.pending -= 1
                    self.cv.notify_all()

    def wait(self) -> None:
        with self.cv:
            while self.pending:
                self.cv.wait()
        if self.error:
            raise self.error

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()


class Fetcher:
    def __init__(self, client, cache: Cache, *, concurrency: int = 8, log=None, progress=None, label: str = ""):
        self.client = client
        self.cache = cache
        self.concurrency = max(1, concurrency)
        self.log = log
        self.progress = progress
        self.label = label
        self._stop = threading.Event()
        self._local = threading.local()

    # ---- public --------------------------------------------------------------------------------------------------
    def missing(self, blobs: list[Blob]) -> list[Blob]:
        seen, out = set(), []
        for b in blobs:
            if b.digest not in seen and not self.cache.has_blob(b.digest, b.size):
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

    def fetch(self, blobs: list[Blob]) -> None:
        """Make every blob present and verified in the cache, or raise."""
        todo = self.missing(blobs)
        if not todo:
            return
        self._stop = threading.Event()
        self._jobs: list[BlobJob] = []
        total_missing = sum(b.size for b in todo)
        chunk = target_chunk(total_missing, self.concurrency)
        pool = _Pool(min(self.concurrency, max(1, sum(len(plan_ranges(b.size, chunk)) for b in todo))), self._stop)
        deferred: list[Blob] = []
        try:
            # Largest first, so the long tail is a small blob, not a big one.
            for b in sorted(todo, key=lambda b: -b.size):
                job = self._start_job(b, chunk, blocking=False)
                if job is None:
                    if not self.cache.has_blob(b.digest, b.size):
                        deferred.append(b)
                    continue
                self._submit_job(pool, job)
            pool.wait()
            # Blobs other loaders were fetching: wait for their locks (in parallel), then fetch what is still missing.
            for b in deferred:
                pool.submit(lambda b=b: self._after_wait(pool, b, chunk))
            pool.wait()
        finally:
            self._stop.set()
            pool.close()
            for job in self._jobs:
                self._abandon(job)

    # ---- jobs ----------------------------------------------------------------------------------------------------
    def _after_wait(self, pool: _Pool, b: Blob, chunk: int) -> None:
        job = self._start_job(b, chunk, blocking=True)
        if job is not None:
            self._submit_job(pool, job)

    def _start_job(self, b: Blob, chunk: int, blocking: bool, attempt: int = 0) -> BlobJob | None:
        stack = ExitStack()
        held = stack.enter_context(self.cache.lock(f"blob-{b.digest[7:]}", blocking=blocking))
        if not held or self.cache.has_blob(b.digest, b.size):
            stack.close()
            return None
        try:
            job = self._open_job(b, chunk, attempt)
        except BaseException:
            stack.close()
            raise
        job.lock_stack = stack
        return job

    def _open_job(self, b: Blob, chunk: int, attempt: int) -> BlobJob:
        partial = self.cache.partial_path(b.digest)
        state_path = partial.with_name(partial.name + ".state")
        ranges = _load_state(partial, b) if attempt == 0 else None
        resumed = ranges is not None
        if not resumed:
            for p in (partial, *_state_files(state_path)):
                p.unlink(missing_ok=True)
            ranges = [Range(i, s, e) for i, (s, e) in enumerate(plan_ranges(b.size, chunk))]
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not resumed:
                _preallocate(fd, b.size, self.cache, b.digest)
        except BaseException:
            os.close(fd)
            raise
        job = BlobJob(b.digest, b.size, partial, state_path, ranges, fd, attempt=attempt)
        self._jobs.append(job)
        if not resumed:
            job.inline = ranges[0]
            job.hashing = True  # owned by the first range until it completes
            self._save_state(job)
        elif self.log:
            done = sum(r.done for r in ranges)
            self.log.info("fetch.resume", ref=self.label, blob=b.digest, bytes_on_disk=done, size=b.size)
        return job

    def _submit_job(self, pool: _Pool, job: BlobJob) -> None:
        if job.size == 0 or all(r.complete for r in job.ranges):
            job.inline, job.hashing = None, False
            pool.submit(lambda: self._hash_forward(pool, job))
            return
        if job.inline is None:
            # Resumed: hash what is already on disk while the rest downloads.
            pool.submit(lambda: self._hash_forward(pool, job))
        for r in job.ranges:
            if not r.complete:
                pool.submit(lambda r=r: self._run_range(pool, job, r))

    def _run_range(self, pool: _Pool, job: BlobJob, r: Range) -> None:
        tries = 0
        client = self.client
        buf = self._buffer()
        mv = memoryview(buf)
        while not r.complete:
            if self._stop.is_set():
                return
            pos = r.start + r.done
            before = r.done
            try:
                with client.open_blob(job.digest, pos, r.end - 1, size=job.size) as body:
                    if body.total is not None and body.total != job.size:
                        raise self._size_mismatch(client, job, body.total)
                    skip = pos - body.start  # a server that ignored Range sends from byte 0
                    while r.start + r.done < r.end:
                        if self._stop.is_set():
                            return
                        want = min(len(buf), r.end - (r.start + r.done) + skip) if skip else min(len(buf), r.end - (r.start + r.done))
                        n = body.readinto(mv[:want])
                        if n == 0:
                            raise TransientError(f"registry closed the connection {r.end - r.start - r.done} bytes early")
                        client.count_bytes(n)
                        chunk = mv[:n]
                        if skip:
                            drop = min(skip, n)
                            skip -= drop
                            chunk = chunk[drop:]
                            if not len(chunk):
                                continue
                        n = len(chunk)
                        off = r.start + r.done
                        try:
                            os.pwrite(job.fd, chunk, off)
                        except OSError as exc:
                            if is_no_space(exc):
                                raise no_space(exc, self.cache, job.digest) from exc
                            raise
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
            except TransientError as exc:
                real = getattr(exc, "blob_size", None)  # a 416: the blob is shorter than this range
                if real is not None and real != job.size:
                    raise self._size_mismatch(client, job, real) from exc
                if r.done > before:
                    tries = 0
                tries += 1
                if tries >= MAX_TRIES_WITHOUT_PROGRESS:
                    with job.lock:
                        self._save_state(job)
                    raise NetworkError(
                        f"giving up on blob {job.digest} of {self.label} after {tries} failed attempts without progress:"
                        f" {exc}. The partial download is kept and resumes on the next pull."
                    ) from exc
                delay = _delay(tries, exc.retry_after)
                if self.log:
                    self.log.warning("fetch.retry", ref=self.label, blob=job.digest[:19], offset=r.start + r.done,
                                     attempt=tries, delay_s=round(delay, 2), error=str(exc))
                if self._stop.wait(delay):
                    return
        with job.lock:
            self._save_state(job)
        if job.inline is r:
            with job.lock:
                job.inline = None
                job.hashing = False
        self._hash_forward(pool, job)

    def _size_mismatch(self, client, job: BlobJob, real: int) -> DigestMismatch:
        # Deterministic, so not retried: the same request gets the same answer until the artifact is fixed.
        return DigestMismatch(
            f"registry {client.ref.registry} serves blob {job.digest} of {self.label} as {real} bytes, but the"
            f" manifest's descriptor says {job.size}: the manifest does not describe its blobs; push the model"
            " again (model-loader push) so the manifest is rebuilt from the files. Nothing was published"
        )

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

    def _finish(self, pool: _Pool, job: BlobJob) -> None:
        got = "sha256:" + job.hasher.hexdigest()
        with job.lock:
            job.finished = True
        if got == job.digest:
            os.close(job.fd)
            job.fd = -1
            self.cache.publish_blob(job.partial, job.digest)
            for p in _state_files(job.state):
                p.unlink(missing_ok=True)
            job.lock_stack.close()
            return
        os.close(job.fd)
        job.fd = -1
        job.partial.unlink(missing_ok=True)
        for p in _state_files(job.state):
            p.unlink(missing_ok=True)
        if job.attempt == 0:
            if self.log:
                self.log.warning("fetch.digest_mismatch", ref=self.label, blob=job.digest, got=got, action="refetch")
            if self.progress:
                self.progress.add(-job.size)
            try:
                fresh = self._open_job(Blob(job.digest, job.size), target_chunk(job.size, self.concurrency), attempt=1)
            except BaseException:
                job.lock_stack.close()
                raise
            fresh.lock_stack, job.lock_stack = job.lock_stack, None
            self._submit_job(pool, fresh)
            return
        job.lock_stack.close()
        raise DigestMismatch(
            f"blob {job.digest} of {self.label} from registry {self.client.ref.registry} hashed to {got} twice:"
            " the registry or something between it and this node is corrupting data; nothing was published"
        )

    def _abandon(self, job: BlobJob) -> None:
        """On failure, keep the partial file and its state for the next pull; drop the lock."""
        if job.fd >= 0:
            try:
                with job.lock:
                    self._save_state(job)
            except OSError:
                pass
            os.close(job.fd)
            job.fd = -1
        if job.lock_stack is not None:
            job.lock_stack.close()

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _buffer(self, size: int = BUF_SIZE) -> bytearray:
        key = f"buf{size}"
        buf = getattr(self._local, key, None)
        if buf is None:
            buf = bytearray(size)
            setattr(self._local, key, buf)
        return buf

    def _save_state(self, job: BlobJob) -> None:
        if job.fd < 0 or job.finished:
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
        if r.start != pos or r.end <= r.start and b.size or not 0 <= r.done <= r.end - r.start:
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


def _delay(tries: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(MAX_RETRY_AFTER, retry_after)
    return min(10.0, 0.25 * 2 ** (tries - 1)) * (0.5 + random.random() / 2)
