"""Blob uploads: make blobs present in one registry repository (skip what it has, mount, or a chunked upload),
for every command that writes to a registry (push, import --to).

Sources are ``(offset, length) -> pieces`` callables (a file region, or bytes in memory), so the same upload
reads a model file, a zstd temp file or a bundle member. Retries follow the one policy (loader.retry): a failed
upload restarts with a fresh session, Retry-After honoured up to its cap, within a deadline.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from loader import retry
from loader.errors import (
    AuthError,
    DeadlineExceeded,
    LoaderError,
    NetworkError,
    RegistryError,
    RejectedError,
    TransientError,
)
from loader.progress import Progress
from loader.reference import Reference
from loader.registry import RegistryClient
from loader.retry import Attempts, Deadline, RetryPolicy

MiB = 1 << 20
CHUNK_SIZE = 64 * MiB  # PATCH size for large blobs; 0 sends every blob in one streamed PUT
BUF_SIZE = 1 * MiB
#: Whole-blob restarts (a fresh upload session) before giving up.
UPLOAD_POLICY = RetryPolicy(attempts=4, base_delay=0.5)
T = TypeVar("T")


Source = Callable[[int, int], Iterator[memoryview | bytes]]  # (offset, length) -> the bytes, in pieces


def file_source(path: Path, base: int = 0) -> Source:
    """Bytes of a file from ``base`` (a tar member's data offset, or 0), streamed with one 1 MiB buffer."""

    def read(offset: int, length: int) -> Iterator[memoryview]:
        buf = bytearray(min(BUF_SIZE, max(1, length)))
        mv = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            pos, left = base + offset, length
            while left:
                n = os.preadv(f.fileno(), [mv[: min(len(buf), left)]], pos)
                if n <= 0:
                    raise LoaderError(f"{path} is shorter than expected while uploading (changed during the push?)")
                yield mv[:n]
                pos += n
                left -= n

    return read


def bytes_source(data: bytes) -> Source:
    def read(offset: int, length: int) -> Iterator[bytes]:
        yield data[offset:offset + length]

    return read


class Uploader:
    """Makes blobs present in one repository: skip (HEAD), mount, or a chunked upload with retries."""

    def __init__(self, client: RegistryClient, *, chunk_size: int = CHUNK_SIZE, mount_from: str | None = None,
                 log: Any = None, progress: Progress | None = None, stop: threading.Event | None = None):
        self.client = client
        self.chunk_size = chunk_size
        self.mount_from = mount_from
        self.mount_refused = False  # set once a mount is refused: later blobs go straight to an upload
        self.log = log
        self.progress = progress
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._done: dict[str, threading.Event] = {}
        self.counts = {"exists": 0, "mounted": 0, "uploaded": 0}  # distinct blobs, by what happened to them

    def ensure(self, digest: str, size: int, source: Source, what: str) -> str:
        """Upload one blob unless the registry has it. Returns "exists", "mounted", "uploaded" or "duplicate"."""
        with self._lock:
            found = self._done.get(digest)
            first = found is None
            ev = self._done[digest] = threading.Event() if found is None else found
        if not first:
            ev.wait()  # the same bytes as another file of this push: uploaded once
            return "duplicate"
        try:
            action = self._ensure(digest, size, source, what)
        except BaseException:
            with self._lock:
                del self._done[digest]
            ev.set()
            raise
        with self._lock:
            self.counts[action] += 1
        ev.set()
        return action

    def _start(self, digest: str, what: str) -> str | None:
        """Open an upload session, or None when the blob was mounted from ``mount_from``."""
        if self.mount_from and not self.mount_refused:
            try:
                return _retrying(lambda: self.client.start_upload(digest, self.mount_from), self.log, what)
            except AuthError as exc:
                # The mount only saves an upload: credentials that may push here but not read the source
                # repository get the blob uploaded instead (a plain upload that is refused too fails the push).
                self.mount_refused = True
                if self.log:
                    self.log.warning("push.mount_refused", source=self.mount_from, error=str(exc),
                                     hint="uploading instead; the credentials may not pull the source repository")
        return _retrying(self.client.start_upload, self.log, what)

    def _ensure(self, digest: str, size: int, source: Source, what: str) -> str:
        if _retrying(lambda: self.client.blob_size(digest), self.log, what) is not None:
            return "exists"
        attempts = Attempts(UPLOAD_POLICY, f"uploading {what} ({digest}) to {self.client.ref}",
                            Deadline.after(UPLOAD_POLICY.deadline, what))
        for attempt in range(1, UPLOAD_POLICY.attempts + 1):
            if self.stop.is_set():
                raise LoaderError("push stopped")
            sent = _Counter()
            try:
                location = self._start(digest, what)
                if location is None:
                    return "mounted"
                self._send(location, digest, size, source, sent)
                return "uploaded"
            except TransientError as exc:
                if self.progress:
                    self.progress.add(-sent.n)
                try:
                    delay = attempts.failed(exc)  # a fresh session each time: no attempt counts as progress
                except DeadlineExceeded:
                    raise
                except NetworkError as final:
                    raise NetworkError(f"uploading {what} ({digest}) to {self.client.ref} failed {attempt} times:"
                                       f" {exc}") from final
                if self.log:
                    self.log.warning("push.retry", blob=digest[:19], file=what, attempt=attempt, delay_s=delay,
                                     error=str(exc))
                time.sleep(delay)
            except RegistryError as exc:
                if isinstance(exc, RejectedError) and exc.code in {"DIGEST_INVALID", "SIZE_INVALID"}:
                    raise RegistryError(f"registry {self.client.ref.registry} rejected {what}: its bytes no longer"
                                        f" hash to {digest} (was it modified during the push?): {exc}") from exc
                raise
        raise AssertionError("unreachable")

    def _send(self, location: str, digest: str, size: int, source: Source, sent: _Counter) -> None:
        """Stream a blob into an open session: PATCH chunks, the last bytes in the closing PUT.

        A chunk that fails is resumed from the offset the registry reports for the session; when the registry
        cannot say (the session's state is stale after a half-written chunk), the TransientError restarts the
        whole blob with a fresh session.
        """
        client, chunk = self.client, self.chunk_size
        offset = 0
        tries = 0
        while chunk and size - offset > chunk:
            if self.stop.is_set():
                raise LoaderError("push stopped")
            mark = sent.n
            try:
                location = client.upload_chunk(location, self._body(source, offset, chunk, sent), offset, chunk)
                offset += chunk
                tries = 0
            except TransientError:
                tries += 1
                if tries >= 3:
                    raise
                if self.progress:
                    self.progress.add(mark - sent.n)
                sent.n = mark
                got = client.upload_offset(location)  # a TransientError here restarts the blob
                if not 0 <= got <= size or got % chunk:
                    raise TransientError(f"registry reports {got} bytes of an upload sent in {chunk} byte chunks") from None
                offset = got
        client.finish_upload(location, digest, self._body(source, offset, size - offset, sent), size - offset)

    def _body(self, source: Source, offset: int, length: int, sent: _Counter) -> Callable[[], Iterator[memoryview | bytes]]:
        def body() -> Iterator[memoryview | bytes]:
            for piece in source(offset, length):
                n = len(piece)
                sent.n += n
                self.client.count_sent(n)
                if self.progress:
                    self.progress.add(n)
                yield piece

        return body


@dataclass
class _Counter:
    n: int = 0


def run_parallel(tasks: list[Callable[[], object]], concurrency: int, stop: threading.Event) -> None:
    """Run tasks on ``concurrency`` threads; on the first failure, set ``stop`` (running uploads end at their next
    chunk), drop the queued tasks and raise that failure."""
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="upload") as pool:
        futures = [pool.submit(t) for t in tasks]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        error = next((e for e in (f.exception() for f in done) if e is not None), None)
        if error is not None:
            stop.set()
            for f in futures:
                f.cancel()
            raise error


def _retrying(fn: Callable[[], T], log: Any, what: str) -> T:
    return retry.call(fn, retry.SMALL_REQUESTS, what, log, "push.retry", file=what)


def push_auth_error(ref: Reference, exc: AuthError) -> AuthError:
    # The registry module words refusals for pulls; a push needs push rights, which pull secrets rarely grant.
    return AuthError(f"push to {ref} refused: {exc}. Pushing needs credentials allowed to push to"
                     f" {ref.registry}/{ref.repository} (docker login, or --docker-config)")
