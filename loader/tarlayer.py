"""Reading a tar layer as a stream: decompression (gzip, zstd, or none, by media type or magic bytes) and tarfile
with bounded extension headers. What is done with the entries (names, links, the space budget) is loader.layout's.

A module of its own so that only a pull with a tar layer imports tarfile, gzip and zstandard (~6 ms of start-up).
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

MAX_EXTENSION_HEADER_BYTES = 1 << 20  # one pax or GNU long-name header (tarfile reads each into memory)
MAX_EXTENSION_CHAIN = 16  # extension headers before one entry (tarfile reads a chain by recursion)
_CHUNK = 1 << 20


class Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


class _Stream(Protocol):
    """What tarfile.open wants of a stream (the decompressors have all of it)."""

    def read(self, size: int, /) -> bytes: ...
    def write(self, b: bytes, /) -> object: ...
    def tell(self) -> int: ...
    def seek(self, pos: int, /) -> object: ...
    def close(self) -> object: ...


class TarLimit(tarfile.TarError):
    """An extension header over our bounds. Not a HeaderError, so tarfile passes it on unchanged."""


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole into memory, and a chain of them by recursion: bound both
    before it does (``_proc_member`` is where tarfile dispatches on the header type)."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in EXTENSION_TYPES:
            chain = getattr(tf, "_model_cache_chain", 0) + 1
            tf._model_cache_chain = chain  # type: ignore[attr-defined]  # reset by the member the chain belongs to
            if self.size > MAX_EXTENSION_HEADER_BYTES:
                raise TarLimit(f"an extension header of {self.size} bytes, over {MAX_EXTENSION_HEADER_BYTES}")
            if chain > MAX_EXTENSION_CHAIN:
                raise TarLimit(f"more than {MAX_EXTENSION_CHAIN} extension headers in a row")
        else:
            tf._model_cache_chain = 0  # type: ignore[attr-defined]
        proc: Callable[[tarfile.TarFile], tarfile.TarInfo] = super()._proc_member  # type: ignore[misc]
        return proc(tf)


EXTENSION_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)
UNREADABLE = (tarfile.TarError, EOFError, zstandard.ZstdError, zlib.error, gzip.BadGzipFile)


def open_decompressed(path: Path, comp: str | None) -> tuple[_Stream, BinaryIO]:
    raw = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")
    head = raw.read(4)
    raw.seek(0)
    if comp == "gzip" or head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if comp == "zstd" or head == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=_CHUNK), raw
    return raw, raw


class TarReader:
    """One streaming pass over a tar layer (``with`` it, iterate members, ``extractfile`` the current one)."""

    def __init__(self, blob: Path, compression: str | None) -> None:
        self.stream, self.raw = open_decompressed(blob, compression)
        try:
            # Closed in __exit__, with the streams under it.
            self.tf = tarfile.open(fileobj=self.stream, mode="r|", tarinfo=_BoundedTarInfo)  # noqa: SIM115
        except BaseException:
            self.raw.close()
            raise

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.tf.close()
            self.stream.close()
        finally:
            self.raw.close()

    def __iter__(self) -> TarReader:
        return self

    def __next__(self) -> tarfile.TarInfo:
        m = self.tf.next()
        if m is None:
            raise StopIteration
        # A stream keeps every member it has read (public, but not in the stubs); we never ask tarfile to resolve a
        # link, so nothing needs them, and a layer of many entries would otherwise hold them all in memory.
        self.tf.members.clear()  # type: ignore[attr-defined]
        return m

    def data(self, m: tarfile.TarInfo) -> Readable:
        f = self.tf.extractfile(m)
        assert f is not None
        return f
