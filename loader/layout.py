"""Artifact -> files on disk: the same tree CRI-O shows when it mounts the artifact as an image volume.

Each layer becomes one file named by its ``org.opencontainers.image.title`` annotation (or ModelPack's
``org.cncf.model.filepath``); a layer with neither is skipped, as CRI-O skips it. Directory layers (tar,
tar+gzip, tar+zstd, as ``oras push`` makes for a directory with ``io.deis.oras.content.unpack``, and ModelPack's
``.tar`` media types) are extracted instead. Names and tar entries that are absolute, contain ``..``, pass through
a symlink, or are devices are refused before anything is published.

``plan()`` is pure (manifest JSON -> entries); ``materialize()`` does the I/O into a staging directory.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import zstandard

from loader.errors import ArtifactError

TITLE = "org.opencontainers.image.title"
MODELPACK_FILEPATH = "org.cncf.model.filepath"
ORAS_UNPACK = "io.deis.oras.content.unpack"
MODELPACK_PREFIX = "application/vnd.cncf.model."
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

Kind = Literal["file", "tar"]
Compression = Literal["none", "gzip", "zstd"]


@dataclass(frozen=True)
class Entry:
    name: str  # relative POSIX path inside the model tree
    kind: Kind
    digest: str
    size: int
    media_type: str
    compression: Compression = "none"


def layer_entries(manifest: dict, ref: str) -> list[Entry]:
    """Turn an image manifest into the files it should become. Raises ArtifactError for anything unsafe."""
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ArtifactError(f"{ref}: manifest has no layers list; is it an image index or a config-only artifact?")
    entries: list[Entry] = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ArtifactError(f"{ref}: layer {i} is not an object")
        ann = layer.get("annotations") or {}
        name = ann.get(TITLE) or ann.get(MODELPACK_FILEPATH)
        if not name:
            continue
        digest, size, mt = layer.get("digest"), layer.get("size"), layer.get("mediaType", "")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
            raise ArtifactError(f"{ref}: layer {name!r} has digest {digest!r}; only sha256 digests are supported")
        if not isinstance(size, int) or size < 0:
            raise ArtifactError(f"{ref}: layer {name!r} has an invalid size {size!r}")
        clean = safe_name(name, f"{ref}: layer title")
        kind, comp = _kind(mt, ann)
        entries.append(Entry(clean, kind, digest, size, mt, comp))
    _check_collisions(entries, ref)
    return entries


def safe_name(name: str, what: str) -> str:
    """Validate a relative path from an untrusted artifact and return it normalised."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ArtifactError(f"{what} {name!r} is empty or not a string")
    if name.startswith("/") or name.startswith("\\"):
        raise ArtifactError(f"{what} {name!r} is an absolute path: artifacts may only name relative paths")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise ArtifactError(f"{what} {name!r} contains '..': artifacts may not name paths outside the model")
    clean = posixpath.normpath(name)
    if clean in (".", ""):
        raise ArtifactError(f"{what} {name!r} names the model root itself")
    return clean


def _kind(media_type: str, ann: dict) -> tuple[Kind, Compression]:
    mt = media_type.lower()
    comp: Compression = "gzip" if mt.endswith("gzip") else "zstd" if mt.endswith("zstd") else "none"
    if str(ann.get(ORAS_UNPACK, "")).lower() == "true":
        return "tar", comp
    if mt.startswith(MODELPACK_PREFIX) and (".tar" in mt or mt.endswith("tar")):
        return "tar", comp
    return "file", "none"


def _check_collisions(entries: list[Entry], ref: str) -> None:
    files = {e.name for e in entries if e.kind == "file"}
    seen: set[str] = set()
    for e in entries:
        if e.kind == "file":
            if e.name in seen:
                raise ArtifactError(f"{ref}: two layers are both named {e.name!r}")
            seen.add(e.name)
            parent = posixpath.dirname(e.name)
            while parent:
                if parent in files:
                    raise ArtifactError(f"{ref}: {parent!r} is both a file and the directory of {e.name!r}")
                parent = posixpath.dirname(parent)


# ---- materialise ----------------------------------------------------------------------------------------------
def materialize(entries: list[Entry], staging: Path, blob_path: Callable[[str], Path], ref: str) -> tuple[int, int]:
    """Build the model tree in ``staging`` from verified blobs. Returns (bytes, files) of the tree."""
    total_bytes = total_files = 0
    for e in entries:
        if e.kind == "file":
            dest = _safe_parent(staging, e.name, ref)
            if os.path.lexists(dest):
                raise ArtifactError(f"{ref}: {e.name!r} is written by two layers")
            os.link(blob_path(e.digest), dest)  # no copy: the tree shares the blob's inode
            total_bytes += e.size
            total_files += 1
        else:
            b, f = _extract_tar(blob_path(e.digest), e, staging, ref)
            total_bytes += b
            total_files += f
    return total_bytes, total_files


def _safe_parent(root: Path, name: str, ref: str) -> Path:
    """Create the parent directories of ``name`` under root, refusing to pass through symlinks or files."""
    cur = root
    parts = name.split("/")
    for part in parts[:-1]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(f"{ref}: {name!r} would be written through the symlink {str(cur.relative_to(root))!r}")
        if not stat.S_ISDIR(st.st_mode):
            raise ArtifactError(f"{ref}: {name!r} needs {str(cur.relative_to(root))!r} to be a directory, but it is a file")
    return cur / parts[-1]


def _open_decompressed(path: Path, comp: Compression):
    raw = open(path, "rb")
    head = raw.read(4)
    raw.seek(0)
    if comp == "gzip" or head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if comp == "zstd" or head == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20), raw
    return raw, raw


def _extract_tar(blob: Path, e: Entry, staging: Path, ref: str) -> tuple[int, int]:
    # A tar whose entries all live under the layer's name (oras directories, modctl's one-file tars) is
    # extracted at the root; any other tar is extracted into a directory named by the layer.
    names = _tar_names(blob, e, ref)
    prefix = e.name
    under = all(n == prefix or n.startswith(prefix + "/") for n in names)
    base = staging if under else staging / prefix
    if not under:
        _safe_parent(staging, prefix + "/x", ref)
    total_bytes = total_files = 0
    stream, raw = _open_decompressed(blob, e.compression)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for m in tf:
                if m.isdir() and posixpath.normpath(m.name) == ".":
                    continue  # "./" from `tar -C dir .`
                name = safe_name(m.name, f"{ref}: tar entry in layer {e.name!r}")
                if m.isdev() or m.isfifo():
                    raise ArtifactError(f"{ref}: layer {e.name!r} contains the device or fifo {m.name!r}; refused")
                if m.isdir():
                    _safe_parent(base, name + "/x", ref)  # makes the directory, refusing an escape
                    continue
                dest = _safe_parent(base, name, ref)
                if os.path.lexists(dest):
                    raise ArtifactError(f"{ref}: {name!r} in layer {e.name!r} is written twice")
                if m.issym():
                    _check_link_target(base, name, m.linkname, ref, e.name)
                    os.symlink(m.linkname, dest)
                    total_files += 1
                elif m.islnk():
                    target = safe_name(m.linkname, f"{ref}: hard link target in layer {e.name!r}")
                    src = base / target
                    if not src.is_file() or src.is_symlink():
                        raise ArtifactError(f"{ref}: hard link {name!r} in layer {e.name!r} points at {target!r}, which is not an extracted file")
                    os.link(src, dest)
                    total_files += 1
                elif m.isfile():
                    src = tf.extractfile(m)
                    with open(dest, "xb") as out:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                        out.flush()
                        os.fsync(out.fileno())  # unlike blobs, extracted files cannot be re-verified after a crash
                    os.chmod(dest, 0o555 if m.mode & 0o111 else 0o444)
                    total_bytes += m.size
                    total_files += 1
                else:
                    raise ArtifactError(f"{ref}: layer {e.name!r} has the unsupported tar entry type of {m.name!r}")
    except (tarfile.TarError, EOFError, zstandard.ZstdError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, (gzip.BadGzipFile,)) and exc.errno:
            raise
        raise ArtifactError(f"{ref}: layer {e.name!r} ({e.media_type}) is not a readable tar archive: {exc}") from exc
    finally:
        raw.close()
    return total_bytes, total_files


def _tar_names(blob: Path, e: Entry, ref: str) -> list[str]:
    stream, raw = _open_decompressed(blob, e.compression)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            return [n for n in (posixpath.normpath(m.name) for m in tf) if n != "."]
    except (tarfile.TarError, EOFError, zstandard.ZstdError, gzip.BadGzipFile) as exc:
        raise ArtifactError(f"{ref}: layer {e.name!r} ({e.media_type}) is not a readable tar archive: {exc}") from exc
    finally:
        raw.close()


def _check_link_target(base: Path, name: str, target: str, ref: str, layer: str) -> None:
    if target.startswith("/"):
        raise ArtifactError(f"{ref}: symlink {name!r} in layer {layer!r} points at the absolute path {target!r}; refused")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if resolved == ".." or resolved.startswith("../"):
        raise ArtifactError(f"{ref}: symlink {name!r} in layer {layer!r} escapes the model through {target!r}; refused")
