"""Tar layers as a hostile artifact would write them: any name, type, link target or header, in any order.

``TarLayer`` writes each member's header with ``TarInfo.tobuf`` (so pax headers, GNU long names and types tarfile
would never produce from a directory are all possible) and the data padded to 512 bytes, then compresses the
whole. ``bomb`` streams a layer of zeros through the compressor, so a layer that expands to gigabytes costs the
test kilobytes of memory.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections.abc import Iterator

import zstandard

BLOCK = 512


class TarLayer:
    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self.fmt = fmt
        self.members: list[tuple[bytes, bytes]] = []  # (header bytes, data)

    # ---- members ---------------------------------------------------------------------------------------------
    def add(self, info: tarfile.TarInfo, data: bytes = b"", fmt: int | None = None) -> TarLayer:
        info.mtime = info.mtime or 0
        header = info.tobuf(self.fmt if fmt is None else fmt, "utf-8", "surrogateescape")
        self.members.append((header, data))
        return self

    def raw(self, header: bytes, data: bytes = b"") -> TarLayer:
        """A header already encoded (an extension header chain, say)."""
        self.members.append((header, data))
        return self

    def file(self, name: str, data: bytes = b"x", mode: int = 0o644, pax: dict[str, str] | None = None) -> TarLayer:
        info = _info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        if pax:
            info.pax_headers = dict(pax)
        return self.add(info, data)

    def dir(self, name: str, mode: int = 0o755) -> TarLayer:
        return self.add(_info(name, tarfile.DIRTYPE, mode))

    def symlink(self, name: str, target: str) -> TarLayer:
        info = _info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        return self.add(info)

    def hardlink(self, name: str, target: str) -> TarLayer:
        info = _info(name, tarfile.LNKTYPE, 0o644)
        info.linkname = target
        return self.add(info)

    def device(self, name: str, kind: bytes = tarfile.CHRTYPE) -> TarLayer:
        info = _info(name, kind, 0o666)
        info.devmajor, info.devminor = 1, 3  # /dev/null
        return self.add(info)

    def fifo(self, name: str) -> TarLayer:
        return self.add(_info(name, tarfile.FIFOTYPE, 0o644))

    def gnu_sparse(self, name: str, data: bytes = b"x") -> TarLayer:
        """An old-GNU sparse member (type 'S'), as ``tar --sparse --format=gnu`` writes one."""
        info = _info(name, tarfile.GNUTYPE_SPARSE, 0o644)
        info.size = len(data)
        return self.add(info, data, fmt=tarfile.GNU_FORMAT)

    def pax_sparse(self, name: str, data: bytes = b"x", real_size: int = 1 << 30) -> TarLayer:
        """A GNU pax sparse member (format 0.1): ``real_size`` bytes on disk from ``data`` bytes in the archive."""
        return self.file(name, data, pax={"GNU.sparse.map": f"0,{len(data)}", "GNU.sparse.size": str(real_size)})

    def pax_chain(self, n: int) -> TarLayer:
        """``n`` extended headers in a row (tarfile reads such a chain by recursion)."""
        for i in range(n):
            record = _pax_record("comment", f"header {i}")
            info = _info(f"PaxHeader/{i}", tarfile.XHDTYPE, 0o644)
            info.size = len(record)
            self.raw(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), record)
        return self

    # ---- output ----------------------------------------------------------------------------------------------
    def tar(self) -> bytes:
        return b"".join(_chunks(self.members))

    def bytes(self, compress: str | None = None) -> bytes:
        return compressed(self.tar(), compress)


def compressed(raw: bytes, compress: str | None) -> bytes:
    if compress == "gzip":
        return gzip.compress(raw, mtime=0)
    if compress == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    assert compress is None, compress
    return raw


def bomb(files: dict[str, int], compress: str = "zstd") -> bytes:
    """A tar of files of zeros (name -> size), compressed as it is generated."""
    out = io.BytesIO()
    if compress == "zstd":
        z = zstandard.ZstdCompressor(level=3).compressobj()
        write, finish = (lambda b: out.write(z.compress(b))), (lambda: out.write(z.flush()))
    else:
        g = zlib.compressobj(9, zlib.DEFLATED, 31)
        write, finish = (lambda b: out.write(g.compress(b))), (lambda: out.write(g.flush()))
    zeros = bytes(1 << 20)
    for name, size in files.items():
        info = _info(name, tarfile.REGTYPE, 0o644)
        info.size = size
        write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict"))
        left = size + (-size % BLOCK)
        while left:
            n = min(left, len(zeros))
            write(zeros[:n])
            left -= n
    write(bytes(2 * BLOCK))
    finish()
    return out.getvalue()


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    return info


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _chunks(members: list[tuple[bytes, bytes]]) -> Iterator[bytes]:
    for header, data in members:
        yield header
        yield data
        yield bytes(-len(data) % BLOCK)
    yield bytes(2 * BLOCK)
