"""Two durable-write primitives every on-disk record of the loader uses (the cache's meta and pins, the CSI plugin's
volume records): one copy of each."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def write_atomic(path: Path, data: bytes, tmpdir: Path, mode: int) -> None:
    """Replace ``path`` with ``data`` whole: written and fsynced beside it under a unique name in ``tmpdir`` (same
    filesystem), then renamed over it. ``mode`` is set explicitly (whatever the umask); never through a symlink."""
    tmp = tmpdir / f".{path.name}.{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
