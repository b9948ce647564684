"""Artifact -> files on disk: the tree CRI-O shows when it mounts the artifact as an image volume, where it can be.

Names are chosen exactly as CRI-O chooses them (``artifactName`` in its ``internal/ociartifact``): a layer is named
by its ``org.opencontainers.image.title`` whenever that key is present, even when its value is empty; only a
layer without the key is named by ModelPack's ``org.cncf.model.filepath``. A layer with neither, or with an empty
name, is skipped as CRI-O skips it, and named in a warning (``layout.layer_skipped``). Raw layers become one file
each; directory layers (tar, tar+gzip, tar+zstd, as ``oras push`` makes for a directory with
``io.deis.oras.content.unpack``, and ModelPack's ``.tar`` media types) are extracted, where an image volume shows
the tar itself. One mode rule for every layer kind: files are read-only and never executable (``FILE_MODE``,
0444: a raw layer's file is the cache's blob, and a tar entry's executable bit is dropped, as an image volume
keeps none), directories are published 0555. Names the cache cannot take (``..``, absolute, two layers of one
name, a name that is both a file and a directory) refuse the whole artifact, where an image volume would place
or shadow them; docs/architecture.md ("The same tree on both paths") lists every remaining difference.

:func:`select_layers` is pure (manifest -> entries and skipped layers, digests parsed with
:class:`~loader.digest.Digest`); :func:`materialize` does the I/O into a staging directory.

A tar layer is hostile input written into a directory that sits inside a cache many tenants share, so
extraction never resolves a path through the filesystem's own name lookup:

* Every entry is created relative to a directory file descriptor reached from the staging root one component at a
  time with ``O_NOFOLLOW``: no entry is written, and no hard-link source is found, through a symlink, and no entry
  replaces an existing one (``O_EXCL``, ``mkdirat``, ``symlinkat`` and ``linkat`` all refuse to).
* A symlink may only climb at the start of its target: ``../../x/y`` is fine when the link sits at least two
  directories below the layer's root, ``a/../b`` is refused. The kernel resolves ``a`` before the ``..`` that
  follows it, so a later ``a -> .`` would turn a lexically harmless ``a/a/../..`` into a way out; with ``..`` only
  at the start, every step of every link's resolution stays inside the root whatever the other links are (each
  link starts from the real directory it sits in, climbs no higher than the root, then only descends, through
  directories or links that obey the same rule). After the last layer every link is also resolved the way the
  kernel would, against the finished tree and without following anything, which refuses loops and over-long
  chains as well.
* Hard-link sources must be regular files already in the tree; devices, fifos, sparse files, absolute names,
  ``..``, NUL and non-UTF-8 names are refused, and the number of entries, the length of names, their depth and the
  size of tar extension headers are bounded (``MAX_*`` below, and in loader.tarlayer).
* Expanded bytes are charged to an :class:`ExpansionBudget` as they are written (and, from the tar headers, before
  any is), which stops with :class:`~loader.errors.NoSpaceError` (exit 6) while the filesystem still has its
  reserve; an ENOSPC or EDQUOT that happens anyway becomes the same error, never a traceback.

Every refusal is an :class:`~loader.errors.ArtifactError` (exit 8) naming the reference, the layer, the entry and
what is wrong with it.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from loader.digest import Digest
from loader.errors import ArtifactError, NoSpaceError
from loader.oci import MAX_LAYERS, Descriptor, ImageManifest

if TYPE_CHECKING:
    import tarfile

    from loader.tarlayer import TarReader

TITLE = "org.opencontainers.image.title"
MODELPACK_FILEPATH = "org.cncf.model.filepath"
ORAS_UNPACK = "io.deis.oras.content.unpack"
MODELPACK_PREFIX = "application/vnd.cncf.model."

# ---- bounds on what one artifact can make us do ------------------------------------------------------------------
MAX_TAR_ENTRIES = 200_000  # tar entries (files, dirs, links) in one model, over all its layers; checked before writing
MAX_NAME_BYTES = 4095  # a name or symlink target, UTF-8 encoded (PATH_MAX less the NUL)
MAX_COMPONENT_BYTES = 255  # one path component (NAME_MAX)
MAX_DEPTH = 128  # path components in a name or symlink target; bounds the directory walk per entry
MAX_SYMLINK_HOPS = 40  # links inside links, as the kernel's MAXSYMLINKS

# ---- the expansion budget --------------------------------------------------------------------------------------
CHECK_EVERY = 4 << 20  # re-read statvfs at least this often while writing, so other writers are seen
BLOCK = 4096  # what a directory, and the tail of a file, may take on disk beyond its bytes
DEFAULT_RESERVE_MAX = 128 << 20  # the default reserve: 1/32 of the filesystem, at most this
DEFAULT_RESERVE_FRACTION = 32

_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE = 16  # directory fds kept open per tree (the last directories written to)

#: Every regular file of a model tree, whatever its layer kind: read-only, never executable. A raw layer's file is a
#: hard link to the cache's blob (0444, shared by every model that has it), so no other rule could hold for raw
#: layers; tar entries follow it (an executable bit in a tar is dropped), as an image volume keeps no executable
#: bit either (it shows every file 0644).
FILE_MODE = 0o444

Kind = Literal["file", "tar"]
Compression = Literal["none", "gzip", "zstd"]


@dataclass(frozen=True)
class Entry:
    name: str  # relative POSIX path inside the model tree
    kind: Kind
    digest: Digest
    size: int
    media_type: str
    compression: Compression = "none"


@dataclass(frozen=True)
class Skipped:
    """A layer no file is made for, as an image volume makes none: why, for the warning."""

    index: int  # position in the manifest's layers
    digest: Digest
    media_type: str
    reason: str


def layer_name(annotations: Mapping[str, str]) -> str | None:
    """The name CRI-O gives a layer: its title whenever the key is present (even empty: an empty title is not
    replaced by the filepath), else its ModelPack filepath, else None."""
    if TITLE in annotations:
        return annotations[TITLE]
    return annotations.get(MODELPACK_FILEPATH)


def select_layers(manifest: Mapping[str, Any] | ImageManifest, ref: str) -> tuple[list[Entry], list[Skipped]]:
    """Turn an image manifest (its JSON, or an :class:`~loader.oci.ImageManifest`) into the files it should become,
    and the layers skipped because the runtime would give them no name.

    Every layer is parsed as a descriptor (so a digest that is not ``sha256:<64 lowercase hex>`` is refused, exit 8,
    even on a layer that is skipped); raises ArtifactError for any name the cache cannot take (:func:`check_names`).
    """
    if isinstance(manifest, ImageManifest):
        descriptors: Sequence[Descriptor] = manifest.layers
    else:
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise ArtifactError(f"{ref}: manifest has no layers list; is it an image index or a config-only artifact?")
        if len(layers) > MAX_LAYERS:
            raise ArtifactError(f"{ref}: manifest has {len(layers)} layers, over the limit of {MAX_LAYERS}")
        descriptors = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise ArtifactError(f"{ref}: layer {i} is not an object")
            descriptors.append(Descriptor.parse(layer, f"{ref}: layer {i}"))
    named: list[tuple[str, Descriptor]] = []
    skipped: list[Skipped] = []
    for i, d in enumerate(descriptors):
        name = layer_name(d.annotations)
        if not name:
            why = (f"no {TITLE} or {MODELPACK_FILEPATH} annotation" if name is None else
                   f"its {TITLE} annotation is empty: a title names the layer whenever present, even empty (its"
                   f" {MODELPACK_FILEPATH} is not used), and an empty name cannot be mounted"
                   if TITLE in d.annotations else
                   f"its {MODELPACK_FILEPATH} annotation is empty, and an empty name cannot be mounted")
            skipped.append(Skipped(i, d.digest, d.media_type, why))
            continue
        named.append((name, d))
    kinds = [_kind(d.media_type, d.annotations) for _, d in named]
    clean = check_names([(name, kind) for (name, _), (kind, _) in zip(named, kinds, strict=True)], ref)
    entries = [Entry(c, kind, d.digest, d.size, d.media_type, comp)
               for c, (_, d), (kind, comp) in zip(clean, named, kinds, strict=True)]
    return entries, skipped


class _Warns(Protocol):
    def warning(self, event: str, **fields: Any) -> None: ...


def layer_entries(manifest: Mapping[str, Any] | ImageManifest, ref: str, *, log: _Warns | None = None) -> list[Entry]:
    """:func:`select_layers`' entries; each skipped layer is logged (``layout.layer_skipped``) on ``log``."""
    entries, skipped = select_layers(manifest, ref)
    if log is not None:
        for s in skipped:
            log.warning("layout.layer_skipped", ref=ref, layer=s.index, digest=str(s.digest),
                        media_type=s.media_type, reason=s.reason)
    return entries


def check_names(layers: Sequence[tuple[str, Kind]], ref: str) -> list[str]:
    """The names of an artifact's named layers (name, kind), each checked by :func:`safe_name` and normalised, and
    together checked for collisions: two file layers of one name, or a name that is both a file and the directory
    of another. Shared by the loader and ``model-loader push`` (which refuses, before uploading, what the loader
    would refuse). An image volume would place ``..`` and absolute names inside the mount and let the last of two
    layers of one name win; the cache refuses the whole artifact (exit 8) instead."""
    clean = [safe_name(name, f"{ref}: layer name") for name, _ in layers]
    _check_collisions([(c, kind) for c, (_, kind) in zip(clean, layers, strict=True)], ref)
    return clean


def safe_name(name: object, what: str) -> str:
    """Validate a relative path from an untrusted artifact and return it normalised."""
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{what} {name!r} is empty or not a string")
    if "\x00" in name:
        raise ArtifactError(f"{what} {name!r} contains a NUL byte")
    if name.startswith("/") or name.startswith("\\"):
        raise ArtifactError(f"{what} {name!r} is an absolute path: artifacts may only name relative paths")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise ArtifactError(f"{what} {name!r} contains '..': artifacts may not name paths outside the model")
    clean = posixpath.normpath(name)
    if clean in (".", ""):
        raise ArtifactError(f"{what} {name!r} names the model root itself")
    _check_encoded(clean, what, "name")
    return clean


def _check_encoded(path: str, what: str, noun: str) -> None:
    """UTF-8 (tarfile hands undecodable bytes over as surrogates), and within the filesystem's limits."""
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ArtifactError(f"{what} {path!r}: the {noun} is not valid UTF-8") from None
    if len(raw) > MAX_NAME_BYTES:
        raise ArtifactError(f"{what} {path[:100]!r}...: the {noun} is {len(raw)} bytes long, over {MAX_NAME_BYTES}")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise ArtifactError(f"{what} {path[:100]!r}...: the {noun} has {len(parts)} components, over {MAX_DEPTH}")
    for part in parts:
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ArtifactError(f"{what} {path[:100]!r}: the component {part[:40]!r}... is longer than"
                                f" {MAX_COMPONENT_BYTES} bytes")


def _kind(media_type: str, ann: Mapping[str, str]) -> tuple[Kind, Compression]:
    mt = media_type.lower()
    comp: Compression = "gzip" if mt.endswith("gzip") else "zstd" if mt.endswith("zstd") else "none"
    if str(ann.get(ORAS_UNPACK, "")).lower() == "true":
        return "tar", comp
    if mt.startswith(MODELPACK_PREFIX) and (".tar" in mt or mt.endswith("tar")):
        return "tar", comp
    return "file", "none"


def _check_collisions(layers: list[tuple[str, Kind]], ref: str) -> None:
    files = {name for name, kind in layers if kind == "file"}
    seen: set[str] = set()
    for name, kind in layers:
        if kind == "file":
            if name in seen:
                raise ArtifactError(f"{ref}: two layers are both named {name!r}")
            seen.add(name)
            parent = posixpath.dirname(name)
            while parent:
                if parent in files:
                    raise ArtifactError(f"{ref}: {parent!r} is both a file and the directory of {name!r}")
                parent = posixpath.dirname(parent)


# ---- the expansion budget ------------------------------------------------------------------------------------------
def default_reserve(fs_bytes: int) -> int:
    """Space left free for everyone else on the cache's filesystem: 1/32 of it, at most 128 MiB."""
    return min(DEFAULT_RESERVE_MAX, fs_bytes // DEFAULT_RESERVE_FRACTION)


class ExpansionBudget:
    """What extraction may still write on the filesystem of ``root``, charged as it is written.

    ``charge(n, where)`` is called before ``n`` bytes are written. It keeps the free space it last read with
    ``os.statvfs`` and reads it again after every ``check_every`` bytes, or as soon as its estimate says the write
    would eat into ``reserve`` (``None``: :func:`default_reserve` of the filesystem's size), and raises
    :class:`~loader.errors.NoSpaceError` (exit 6) then, while the disk still has the reserve. ``limit``, when set,
    caps the bytes charged whatever the free space (a per-model cap). ``what`` names what is being written (the
    reference), ``where`` the layer and entry. :meth:`precheck` refuses bytes declared ahead (tar headers) before
    any is written; :meth:`disk_full` turns an ENOSPC/EDQUOT that happened anyway into the same error.
    """

    def __init__(self, root: Path, what: str, reserve: int | None = None, *, limit: int | None = None,
                 check_every: int = CHECK_EVERY) -> None:
        self.root = Path(root)
        self.what = what
        self.limit = limit
        self.check_every = check_every
        self.charged = 0  # bytes charged so far
        self._reserve = reserve
        self._free: int | None = None  # f_bavail bytes at the last statvfs
        self._since = 0  # bytes charged since then

    @property
    def reserve(self) -> int:
        if self._reserve is None:
            self._read_free()
        assert self._reserve is not None
        return self._reserve

    def _read_free(self) -> int:
        st = os.statvfs(self.root)
        if self._reserve is None:
            self._reserve = default_reserve(st.f_blocks * st.f_frsize)
        self._free = st.f_bavail * st.f_frsize
        self._since = 0
        return self._free

    def room(self) -> int:
        """Bytes that may still be written now (a fresh statvfs), never negative."""
        room = self._read_free() - self.reserve
        if self.limit is not None:
            room = min(room, self.limit - self.charged)
        return max(room, 0)

    def precheck(self, n: int, where: str) -> int:
        """Refuse ``n`` more bytes announced ahead of writing them when they cannot fit now; else the room now."""
        room = self.room()
        if n > room:
            raise self._refusal(where, n)
        return room

    def charge(self, n: int, where: str) -> None:
        if n <= 0:
            return
        if self.limit is not None and self.charged + n > self.limit:
            raise self._refusal(where, n)
        self.charged += n
        self._since += n
        if self._free is None or self._since >= self.check_every or self._free - self._since < self.reserve:
            free = self._read_free()
            self._since = n  # what was charged before is on disk, and in ``free``; these n bytes are not yet
            if free - n < self.reserve:
                self.charged -= n
                raise self._refusal(where, n)

    def disk_full(self, where: str, exc: OSError) -> NoSpaceError:
        free = self._read_free()
        return NoSpaceError(
            f"{self.what}: the disk of {self.root} filled up ({exc.strerror}) while writing {where}, {_mb(free)}"
            " free now: free space (model-loader gc) or give the cache volume more room"
        )

    def _refusal(self, where: str, n: int) -> NoSpaceError:
        if self.limit is not None and self.charged + n > self.limit:
            return NoSpaceError(
                f"{self.what}: {where} would take the model past its budget of {_mb(self.limit)} of expanded"
                f" bytes ({_mb(self.charged)} written, {_mb(n)} more wanted); refused as a decompression bomb."
                " If the model really is that large, raise the budget"
            )
        free = self._free if self._free is not None else self._read_free()
        return NoSpaceError(
            f"{self.what}: {where} needs {_mb(n)} more, but the filesystem of {self.root} has {_mb(free)} free and"
            f" {_mb(self.reserve)} of it is kept in reserve so the disk never fills ({_mb(self.charged)} extracted"
            " so far): free space (model-loader gc) or give the cache volume more room"
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _is_no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


# ---- materialise ----------------------------------------------------------------------------------------------
def materialize(entries: Sequence[Entry], staging: Path, blob_path: Callable[[Digest], Path], ref: str, *,
                budget: ExpansionBudget | None = None, max_entries: int = MAX_TAR_ENTRIES) -> tuple[int, int]:
    """Build the model tree in ``staging`` from verified blobs. Returns (bytes, files) of the tree.

    ``budget`` is charged every byte tar layers expand to (file layers are hard links to their blobs and cost
    nothing); by default it is an :class:`ExpansionBudget` on the staging directory's filesystem with the default
    reserve. ``max_entries`` bounds the tar entries of the whole model. Raises ArtifactError (exit 8) for anything
    unsafe and NoSpaceError (exit 6) when the tree would not fit; ``staging`` may then hold a partial tree, which
    the caller removes.
    """
    if budget is None:
        budget = ExpansionBudget(staging, ref)
    tree = _Tree.open_root(staging)
    symlinks: list[tuple[str, str]] = []  # (path from the staging root, who for messages)
    counter = _Counter(max_entries)
    total_bytes = total_files = 0
    try:
        for e in entries:
            where = f"layer {e.name!r}"
            try:
                if e.kind == "file":
                    _link_blob(tree, e, blob_path(e.digest), ref, budget)
                    total_bytes += e.size
                    total_files += 1
                else:
                    b, f = _extract_tar(tree, blob_path(e.digest), e, ref, budget, counter, symlinks)
                    total_bytes += b
                    total_files += f
            except OSError as exc:
                if _is_no_space(exc):
                    raise budget.disk_full(where, exc) from exc
                raise
        _check_symlinks(tree.fd, symlinks)
    finally:
        tree.close()
    return total_bytes, total_files


# Why link(2) may refuse a blob, and the copy is made instead:
_UNLINKABLE = {
    # The blob's inode has as many links as its filesystem allows (many models share it).
    errno.EMLINK: "the blob has too many links",
    # fs.protected_hardlinks (on by default): only the blob's owner, or a process that may write it or holds
    # CAP_FOWNER, may link it; a blob another uid published (0444) is neither, whatever the shared group.
    errno.EPERM: "the blob is another uid's and fs.protected_hardlinks refuses the link",
}


def _link_blob(tree: _Tree, e: Entry, blob: Path, ref: str, budget: ExpansionBudget) -> None:
    who = f"{ref}: layer {e.name!r}"
    st = os.lstat(blob)
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{who}: the cache's blob {blob} is not a regular file; refused")
    parent, leaf = tree.parent(e.name, who)
    try:
        os.link(blob, leaf, dst_dir_fd=parent, follow_symlinks=False)  # no copy: the tree shares the blob's inode
    except FileExistsError:
        raise ArtifactError(f"{ref}: {e.name!r} is written by two layers") from None
    except OSError as exc:
        why = _UNLINKABLE.get(exc.errno or 0)
        if why is None:
            raise
        # A link the kernel refuses for a reason no loader can change: a copy instead, charged like extracted
        # bytes. Never a failure another tenant can cause.
        budget.charge(st.st_size, f"layer {e.name!r} (a copy: {why})")
        _copy_into(blob, parent, leaf)
        return
    tree.shared.add((st.st_dev, st.st_ino))


def _copy_into(src: Path, parent: int, leaf: str) -> None:
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _copy_fd(fd_in, parent, leaf, str(src))
    finally:
        os.close(fd_in)


def _copy_fd(fd_in: int, parent: int, leaf: str, who: str) -> None:
    """Copy an open file to a new file ``leaf`` in ``parent`` (never through a link), keeping its mode."""
    st = os.fstat(fd_in)
    try:
        fd_out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         stat.S_IMODE(st.st_mode) | 0o200, dir_fd=parent)
    except FileExistsError:
        raise ArtifactError(_written_twice(who)) from None
    try:
        done = 0
        while done < st.st_size:
            n = os.copy_file_range(fd_in, fd_out, st.st_size - done, done, done)
            if n <= 0:
                raise OSError(errno.EIO, f"short copy for {who}")
            done += n
        os.fchmod(fd_out, stat.S_IMODE(st.st_mode))
        os.fsync(fd_out)
    finally:
        os.close(fd_out)


class _Counter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.n = 0


class _Tree:
    """A directory reached without following links, and the directories under it, by file descriptor.

    Paths handed in are safe names (relative, no ``..``), and every component is opened with ``O_NOFOLLOW``
    relative to its parent's fd, so nothing is ever reached through a symlink, whatever the tree holds. The last
    few directories used stay open: tar entries come grouped by directory.
    """

    def __init__(self, fd: int, prefix: str, shared: set[tuple[int, int]] | None = None) -> None:
        self.fd = fd
        self.prefix = prefix  # this tree's path from the staging root, for messages ("" for the root)
        # Inodes of the cache's blobs linked into the tree (file layers): shared by every model that has the file,
        # so a tar layer may not hard-link to them (it could use up their link count for every tenant).
        self.shared: set[tuple[int, int]] = shared if shared is not None else set()
        self._dirs: OrderedDict[str, int] = OrderedDict()

    @classmethod
    def open_root(cls, staging: Path) -> _Tree:
        return cls(os.open(staging, _DIR_FLAGS), "")

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        os.close(self.fd)

    def subtree(self, rel: str, who: str, budget: ExpansionBudget) -> _Tree:
        """A new tree for the directory ``rel`` (created when missing); the caller closes it."""
        fd = self.dir(rel, who, create=True, budget=budget)
        return _Tree(os.dup(fd), posixpath.join(self.prefix, rel), self.shared)

    def parent(self, name: str, who: str, create: bool = True, budget: ExpansionBudget | None = None
               ) -> tuple[int, str]:
        """(fd of the directory that holds ``name``, the last component). The fd is borrowed: do not close it."""
        head, _, leaf = name.rpartition("/")
        return (self.dir(head, who, create, budget) if head else self.fd), leaf

    def dir(self, rel: str, who: str, create: bool, budget: ExpansionBudget | None = None) -> int:
        """The fd of directory ``rel``, walked from the deepest directory already open; missing ones are made
        (``create``) or refused. Borrowed: valid until the next call makes room for another."""
        if not rel:
            return self.fd
        fd = self._dirs.get(rel)
        if fd is not None:
            self._dirs.move_to_end(rel)
            return fd
        parts = rel.split("/")
        start, cur = 0, self.fd
        for i in range(len(parts) - 1, 0, -1):
            known = self._dirs.get("/".join(parts[:i]))
            if known is not None:
                start, cur = i, known
                break
        opened: list[int] = []
        try:
            for i in range(start, len(parts)):
                cur = self._open_dir(cur, parts, i, who, create, budget)
                opened.append(cur)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        for fd in opened[:-1]:
            os.close(fd)
        self._dirs[rel] = cur
        while len(self._dirs) > _FD_CACHE:
            os.close(self._dirs.popitem(last=False)[1])
        return cur

    def _open_dir(self, parent: int, parts: list[str], i: int, who: str, create: bool,
                  budget: ExpansionBudget | None) -> int:
        part = parts[i]
        for _ in range(2):
            try:
                return os.open(part, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise ArtifactError(f"{who}: {self._rel(parts, i)!r} does not exist") from None
                if budget is not None:
                    budget.charge(BLOCK, who)
                try:
                    os.mkdir(part, 0o755, dir_fd=parent)
                except FileExistsError:
                    pass  # made since: open it (or find out what it is)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(part, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    how = "written" if create else "reached"
                    raise ArtifactError(f"{who} would be {how} through the symlink {self._rel(parts, i)!r};"
                                        " refused") from None
                raise ArtifactError(f"{who} needs {self._rel(parts, i)!r} to be a directory, but it is a file;"
                                    " refused") from None
        raise ArtifactError(f"{who}: {self._rel(parts, i)!r} keeps changing while it is created")

    @staticmethod
    def _rel(parts: list[str], i: int) -> str:
        return "/".join(parts[: i + 1])


# ---- tar layers ------------------------------------------------------------------------------------------------
def _extract_tar(root: _Tree, blob: Path, e: Entry, ref: str, budget: ExpansionBudget, counter: _Counter,
                 symlinks: list[tuple[str, str]]) -> tuple[int, int]:
    # A tar whose entries all live under the layer's name (oras directories, modctl's one-file tars) is
    # extracted at the root; any other tar is extracted into a directory named by the layer.
    # Here, not at the top: tarfile, gzip and zstandard cost ~6 ms of every loader's start, and most models have no
    # tar layer.
    from loader import tarlayer

    layer = f"layer {e.name!r}"
    try:
        names = _scan(blob, e, ref, budget, counter)
        prefix = e.name
        under = all(n == prefix or n.startswith(prefix + "/") for n in names)
        del names
        base = root if under else root.subtree(prefix, f"{ref}: {layer}", budget)
        try:
            return _extract_into(base, blob, e, ref, budget, symlinks)
        finally:
            if base is not root:
                base.close()
    except tarlayer.TarLimit as exc:
        raise ArtifactError(f"{ref}: {layer} ({e.media_type}) has {exc}; refused") from None
    except tarlayer.UNREADABLE as exc:
        raise ArtifactError(f"{ref}: {layer} ({e.media_type}) is not a readable tar archive: {exc}") from exc


def _scan(blob: Path, e: Entry, ref: str, budget: ExpansionBudget, counter: _Counter) -> list[str]:
    """First pass: the entry names (to place the layer), the entry count, and the bytes the headers announce,
    refused against the budget before anything is written or the rest of a bomb is even decompressed."""
    names: list[str] = []
    declared, room = 0, -1
    from loader.tarlayer import TarReader

    with TarReader(blob, e.compression) as tar:
        for m in tar:
            counter.n += 1
            if counter.n > counter.limit:
                raise ArtifactError(f"{ref}: layer {e.name!r} brings the model past {counter.limit} tar entries"
                                    f" (at {m.name[:200]!r}); refused")
            n = posixpath.normpath(m.name)
            if n != ".":
                names.append(n)
            declared += _disk_bytes(m)
            if declared > room:  # statvfs only when the known room is used up
                room = budget.precheck(declared, f"layer {e.name!r} (up to its entry {m.name[:200]!r})")
    return names


def _disk_bytes(m: tarfile.TarInfo) -> int:
    """What an entry will take on disk, as the budget counts it."""
    if m.isdir():
        return BLOCK
    if m.isreg() and m.sparse is None:
        return m.size + (-m.size % BLOCK)
    return 0


def _extract_into(base: _Tree, blob: Path, e: Entry, ref: str, budget: ExpansionBudget,
                  symlinks: list[tuple[str, str]]) -> tuple[int, int]:
    total_bytes = total_files = 0
    from loader.tarlayer import TarReader

    with TarReader(blob, e.compression) as tar:
        for m in tar:
            if m.isdir() and posixpath.normpath(m.name) == ".":
                continue  # "./" from `tar -C dir .`
            name = safe_name(m.name, f"{ref}: layer {e.name!r}: tar entry")
            who = f"{ref}: {name!r} in layer {e.name!r}"
            try:
                if m.isdev() or m.isfifo():
                    raise ArtifactError(f"{who} is a device or fifo; refused")
                if m.sparse is not None or m.type == b"S":  # tarfile.GNUTYPE_SPARSE
                    raise ArtifactError(f"{who} is a GNU sparse file; refused (repack without --sparse)")
                if m.isdir():
                    base.dir(name, who, create=True, budget=budget)  # refuses a symlink or a file in the way
                    continue
                parent, leaf = base.parent(name, who, budget=budget)
                if m.issym():
                    _check_symlink_target(name, m.linkname, who)
                    budget.charge(BLOCK if len(m.linkname) >= 60 else 0, who)  # longer targets take a block
                    try:
                        os.symlink(m.linkname, leaf, dir_fd=parent)  # symlinkat never replaces an entry
                    except FileExistsError:
                        raise ArtifactError(_written_twice(who)) from None
                    symlinks.append((posixpath.join(base.prefix, name), who))
                elif m.islnk():
                    total_bytes += _hard_link(base, parent, leaf, m.linkname, who, budget)
                elif m.isreg():
                    total_bytes += _write_file(tar, m, parent, leaf, who, budget)
                else:
                    raise ArtifactError(f"{who} has the unsupported tar entry type {m.type!r}; refused")
            except OSError as exc:
                if _is_no_space(exc):
                    raise budget.disk_full(f"{name!r} in layer {e.name!r}", exc) from exc
                if exc.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
                    raise ArtifactError(f"{who} cannot be created here: {exc.strerror}") from exc
                raise
            total_files += 1
    return total_bytes, total_files


def _written_twice(who: str) -> str:
    return f"{who} is written twice: an entry of that name already exists, and entries never replace one another; refused"


def _write_file(tar: TarReader, m: tarfile.TarInfo, parent: int, leaf: str, who: str, budget: ExpansionBudget) -> int:
    budget.charge(-m.size % BLOCK, who)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC  # O_EXCL: never through a link
    try:
        fd = os.open(leaf, flags, 0o600, dir_fd=parent)
    except FileExistsError:
        raise ArtifactError(_written_twice(who)) from None
    try:
        src = tar.data(m)
        written = 0
        while chunk := src.read(_CHUNK):
            budget.charge(len(chunk), who)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            written += len(chunk)
        os.fsync(fd)  # unlike blobs, extracted files cannot be re-verified after a crash
        os.fchmod(fd, FILE_MODE)  # whatever the tar says: one rule for every layer kind (FILE_MODE)
    finally:
        os.close(fd)
    return written


def _check_symlink_target(name: str, target: str, who: str) -> None:
    """The rule that keeps every link inside the layer's root (see the module docstring): relative, ``..`` only
    at the start, and no more of them than the directories above the link."""
    what = f"{who} is a symlink to {target!r}, which"
    if not target or "\x00" in target:
        raise ArtifactError(f"{what} is empty or contains a NUL byte; refused")
    if target.startswith("/"):
        raise ArtifactError(f"{who} is a symlink that points at the absolute path {target!r}; refused")
    _check_encoded(target, who, "symlink target")
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    if ".." in parts[ups:]:
        raise ArtifactError(f"{what} could escape the model: a '..' after a name climbs from wherever that name"
                            " leads (a symlink can lead anywhere), so '..' is allowed only at the start of a target;"
                            " refused")
    if ups > name.count("/"):
        raise ArtifactError(f"{what} escapes the model: it climbs {ups} directories from a link"
                            f" {name.count('/')} below the root; refused")


def _hard_link(base: _Tree, parent: int, leaf: str, linkname: str, who: str, budget: ExpansionBudget) -> int:
    """Link ``leaf`` to a regular file already in the tree; the bytes it adds (0, or a copy's size)."""
    target = safe_name(linkname, f"{who} is a hard link, and its target")
    # One more directory in the fd cache evicts only the least recently used one, never ``parent`` (used last).
    src_dir, src_leaf = base.parent(target, f"{who} (a hard link to {target!r})", create=False)
    try:
        st = os.stat(src_leaf, dir_fd=src_dir, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        kind = ("nothing extracted yet" if st is None else "a symlink" if stat.S_ISLNK(st.st_mode)
                else "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file")
        raise ArtifactError(f"{who} is a hard link to {target!r}, which is {kind}: a hard link may only name a"
                            " regular file already in the model, reached without following a symlink; refused")
    if (st.st_dev, st.st_ino) in base.shared:
        # A file of a file layer: its inode is the cache's blob, shared by every model with that file. Links to it
        # from a tar would spend that inode's link count (65,000 on ext4) for every tenant, and copies would turn
        # a few bytes of tar into any amount of disk. Refused: a tar's hard links name files of the same tar.
        raise ArtifactError(f"{who} is a hard link to {target!r}, a file of another layer (one of the cache's"
                            " shared blobs); a hard link in a tar layer may only name a file of the same layer;"
                            " put the file in the tar, or drop the link")
    try:
        os.link(src_leaf, leaf, src_dir_fd=src_dir, dst_dir_fd=parent, follow_symlinks=False)
    except FileExistsError:
        raise ArtifactError(_written_twice(who)) from None
    return 0


def _check_symlinks(root: int, links: list[tuple[str, str]]) -> None:
    """Resolve every link of the finished tree the way the kernel would, without following anything: refuse a
    link whose resolution leaves the root at any step (the target rule already prevents it), loops and chains
    deeper than the kernel follows (a link's resolution is remembered, so a chain is measured from the first link
    that reaches it). Dangling links are allowed: a tree can honestly hold one."""
    memo: dict[str, tuple[str, ...] | None] = {}  # link -> the real directory it resolves to (None: not a dir)
    active: set[str] = set()

    def resolve(link: str, who: str, depth: int) -> tuple[str, ...] | None:
        if link in memo:
            return memo[link]
        if link in active or depth >= MAX_SYMLINK_HOPS:
            raise ArtifactError(f"{who}: the symlink {link!r} is part of a loop or of a chain of more than"
                                f" {MAX_SYMLINK_HOPS} links; refused")
        active.add(link)
        target = os.readlink(link, dir_fd=root)
        if target.startswith("/"):
            raise ArtifactError(f"{who}: the symlink {link!r} points at the absolute path {target!r}; refused")
        pos = link.split("/")[:-1]
        result: tuple[str, ...] | None = None
        parts = [p for p in target.split("/") if p not in ("", ".")]
        for part in parts:
            if part == "..":
                if not pos:
                    raise ArtifactError(f"{who}: the symlink {link!r} -> {target!r} leaves the model; refused")
                pos.pop()
                continue
            path = "/".join(pos + [part])  # every component but the last is a real directory: nothing is followed
            try:
                st = os.stat(path, dir_fd=root, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                break
            if stat.S_ISLNK(st.st_mode):
                inner = resolve(path, who, depth + 1)
                if inner is None:
                    break
                pos = list(inner)
            elif stat.S_ISDIR(st.st_mode):
                pos.append(part)
            else:
                break  # a file: the end of the resolution (or ENOTDIR for the kernel)
        else:
            result = tuple(pos)
        active.discard(link)
        memo[link] = result
        return result

    for link, who in links:
        resolve(link, who, 0)
