"""The one digest type: ``sha256:`` followed by 64 lowercase hex digits, validated before it names anything.

Digests arrive from outside (manifests, indexes, bundle ``index.json`` and blob names, registry headers, the
command line, the cache's own meta files) and end up as file names in a cache that many tenants share. A
digest string that only *looks* like one (the right prefix and length, but ``/`` or ``.`` inside) would name
another tenant's file, so nothing builds a cache path from a ``str``: paths take a :class:`Digest`, and the only
ways to get one are :meth:`Digest.parse` (at a boundary, naming where the value came from) and
:meth:`Digest.of` (hashing bytes we hold). As containerd's ``blobPath`` calls ``dgst.Validate()`` first.

``Digest`` subclasses ``str`` so it serialises, logs and compares as the text it is; the type is what mypy checks.
"""

from __future__ import annotations

import hashlib
import os

from loader.errors import ArtifactError
from loader.reference import DIGEST_RE as _RE

ALGORITHM = "sha256"


class InvalidDigest(ArtifactError):
    """A value that should be a sha256 digest is not one (exit 8). The message names the value and its source."""


class Digest(str):
    """A validated ``sha256:<64 lowercase hex>`` digest."""

    __slots__ = ()

    def __new__(cls, value: str) -> Digest:
        if isinstance(value, Digest):
            return value
        if not isinstance(value, str) or not _RE.fullmatch(value):
            raise InvalidDigest(f"digest {value!r} is not sha256: followed by 64 lowercase hex digits")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, value: object, where: str) -> Digest:
        """``value`` as a Digest, or InvalidDigest naming ``where`` it came from (a descriptor, a file, a header)."""
        if isinstance(value, Digest):
            return value
        if not isinstance(value, str) or not _RE.fullmatch(value):
            shown = value if not isinstance(value, str) or len(value) <= 100 else value[:100] + "..."
            raise InvalidDigest(
                f"{where}: digest {shown!r} is not sha256: followed by 64 lowercase hex digits; only sha256 digests"
                " are supported, and anything else is refused before it can name a file"
            )
        return str.__new__(cls, value)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        return str.__new__(cls, "sha256:" + hashlib.sha256(data).hexdigest())

    @classmethod
    def from_hex(cls, hexd: str, where: str) -> Digest:
        """A digest from a bare hex file name (``blobs/sha256/<hex>``), validated like any other."""
        return cls.parse(f"{ALGORITHM}:{hexd}", where)

    @classmethod
    def from_hasher(cls, h: hashlib._Hash) -> Digest:
        return str.__new__(cls, "sha256:" + h.hexdigest())

    @property
    def hex(self) -> str:
        return self[7:]

    @property
    def short(self) -> str:
        """For logs: ``sha256:`` and the first 12 hex digits."""
        return self[:19]


HASH_READ = 4 << 20


def hash_file(path: str | os.PathLike[str]) -> tuple[Digest, int]:
    """The sha256 digest and size of a file, read once with one reused buffer, never through a symlink at
    ``path`` (the cache's re-verification and push's hashing both read this way)."""
    h = hashlib.sha256()
    buf = bytearray(HASH_READ)
    mv = memoryview(buf)
    total = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while n := os.readv(fd, [buf]):
            h.update(mv[:n])
            total += n
    finally:
        os.close(fd)
    return Digest.from_hasher(h), total


def is_digest(value: object) -> bool:
    return isinstance(value, str) and _RE.fullmatch(value) is not None
