"""The content-addressed cache on disk: verified blobs, published model trees, reference links and locks.

Layout (names from loader.contract, relative to the cache root)::

    blobs/sha256/<hex>            verified blob, read-only; model files are hard links to it
    partial/<hex>, <hex>.state    an in-flight download and its resume state (survive a crash; the state is
                                  written through <hex>.state.tmp)
    models/sha256/<hex>/          the published tree of a manifest, read-only; appears by one rename
    meta/<hex>.json               what a model is: refs, manifest, bytes, files (outside the tree, which must
                                  stay identical to what an image volume shows)
    refs/<cache_key(ref)>         symlink -> ../models/sha256/<hex>; replaced atomically when a tag moves
    lastuse/<hex>                 touched on every pull and hit (for gc)
    locks/                        flock files: one per blob, one per model
    tmp/                          staging trees and temp files, on the same filesystem so publish is a rename

Every state a crash can leave is either the old one or the new one: blobs and trees become visible only by
``os.replace``/``os.rename`` after they are complete and verified, and locks are ``flock``s that the kernel drops
when a process dies. Several loaders (pods on one node, or nodes sharing an RWX volume) can use one cache at once.

Nothing in the cache is trusted because of where it sits. Every path is built from a validated
:class:`~loader.digest.Digest`; the cache's own directories must be real directories (a symlink planted for
``locks``, ``blobs/sha256``, ``refs``... is refused, not followed); files are opened with ``O_NOFOLLOW``; a blob
counts as present only when it is a regular, read-only file of the descriptor's size (what a verified publish
leaves); a ``refs/`` link counts only when it points exactly at ``../models/sha256/<hex>``; meta files are parsed
and validated like any other input. Lock waits are bounded (:class:`~loader.errors.LockTimeout`).

Who owns what (README "Who owns the cache"): loaders of different uids may share one cache through one group.
Every directory the loader makes is ``DIR_MODE`` (group-writable and setgid, so what is made inside takes the
directory's group) and every file it later rewrites, touches or locks is ``FILE_MODE``, set explicitly (a umask
of 022 would drop the group's write bit). A directory of the layout that the loader owns is brought to that mode
and to the cache root's group on every start, so a cache an older loader made heals itself; lock files are opened
read-only (flock needs no write access), so a lock file another uid made 0644 still locks. Published blobs and
trees stay read-only for everyone. A permission problem that remains is :class:`CachePermissionError` (exit 9),
naming the loader's uid and groups, the path, and its owner and mode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader import contract
from loader.digest import Digest, hash_file, is_digest
from loader.errors import LoaderError, LockTimeout, NoSpaceError, UsageError
from loader.fsutil import fsync_dir, write_atomic
from loader.reference import Reference, cache_key

META_DIR = "meta"
CACHE_DIRS = ("blobs", contract.BLOBS_DIR, contract.PARTIAL_DIR, "models", contract.MODELS_DIR, contract.REFS_DIR,
              contract.LOCKS_DIR, contract.TMP_DIR, contract.LASTUSE_DIR, META_DIR, contract.PODS_DIR)
_POD_UID = re.compile(r"[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?")  # a Kubernetes UID (RFC 4122 in practice)
MODEL_LOCK_TIMEOUT = 600.0  # publishing or re-verifying one model; a holder that takes longer is stuck
GC_LOCK_TIMEOUT = 900.0  # a pull waiting for a running gc, or gc waiting for running pulls
MAX_META_BYTES = 8 * 1024 * 1024
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
DIR_MODE = 0o2775  # the layout's directories and pods/<uid>: the group creates, renames and removes entries in them
FILE_MODE = 0o664  # locks, lastuse, meta, partial downloads, pods/<uid>/.node: the group rewrites and touches them


class CacheCorrupt(LoaderError):
    """Something in the cache is not what model-loader writes there (a planted symlink, a foreign file type)."""


class CachePermissionError(LoaderError):
    """The loader's uid may not write (or read) a path it needs: a root-owned new claim, or entries another uid
    made without the group's write bit. The message names the uid, the path, its owner and mode, and the fix."""

    exit_code = contract.ExitCode.PERMISSION


@dataclass(frozen=True)
class CachedModel:
    digest: Digest
    path: Path
    bytes: int
    files: int
    meta: dict[str, Any]


class Cache:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).absolute()
        self.repairs: list[str] = []  # what _place_link found and fixed, for the caller to log as warnings

    # ---- paths -------------------------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / contract.BLOBS_DIR / _hex(digest)

    def partial_path(self, digest: str) -> Path:
        return self.root / contract.PARTIAL_DIR / _hex(digest)

    def model_path(self, digest: str) -> Path:
        return self.root / contract.MODELS_DIR / _hex(digest)

    def meta_path(self, digest: str) -> Path:
        return self.root / META_DIR / f"{_hex(digest)}.json"

    def ref_path(self, ref: Reference | str) -> Path:
        return self.root / contract.REFS_DIR / cache_key(ref)

    def tmp_dir(self) -> Path:
        return self.root / contract.TMP_DIR

    # ---- setup ---------------------------------------------------------------------------------------------------
    def ensure(self) -> Cache:
        """Create the layout, and refuse a cache whose own directories are not real directories. The root and the
        layout's directories this uid owns get DIR_MODE and the root's group (the root: this process's group,
        unless it already has one of this process's groups)."""
        self.root.mkdir(parents=True, exist_ok=True)
        group = _share_dir(self.root, None)
        for d in CACHE_DIRS:
            path = self.root / d
            _mkdir_shared(path)
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                what = f"a symlink to {os.readlink(path)!r}" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise CacheCorrupt(
                    f"cache {self.root}: {d} is {what}; model-loader never makes one, so it refuses to follow it."
                    f" Remove {path} (the cache recreates it) and find out who wrote it")
            _share_dir(path, group, st)
        return self

    # ---- locks ---------------------------------------------------------------------------------------------------
    def _lock_fd(self, name: str) -> int:
        # Read-only: flock needs no write access, so a lock file another uid made 0644 still locks.
        return self.open_file(self.root / contract.LOCKS_DIR / name, os.O_RDONLY | os.O_CREAT)

    @contextlib.contextmanager
    def lock(self, name: str, blocking: bool = True, timeout: float = MODEL_LOCK_TIMEOUT) -> Iterator[bool]:
        """An exclusive flock on locks/<name>. Yields True when held, False when busy and not blocking; a blocking
        wait longer than ``timeout`` seconds raises LockTimeout."""
        fd = self._lock_fd(name)
        try:
            if not _flock(fd, fcntl.LOCK_EX, timeout if blocking else 0.0):
                if blocking:
                    raise LockTimeout(f"lock {name} in cache {self.root} was held by another loader for more than"
                                      f" {timeout:.0f}s; retry later, or look for a stuck model-loader on this node")
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing drops the flock

    @contextlib.contextmanager
    def gc_lock(self, shared: bool = True, timeout: float = GC_LOCK_TIMEOUT) -> Iterator[None]:
        """Pulls hold this shared for their whole run; gc holds it exclusive while it deletes.

        A pull's blobs are referenced by no model until it publishes, and a hit's model must not vanish between
        the lookup and the mount, so gc waits for in-flight pulls and pulls wait for a running gc, each for at
        most ``timeout`` seconds (pulls have a deadline, so a long wait means something is stuck).
        """
        fd = self._lock_fd("gc")
        try:
            if not _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, timeout):
                who = "a running gc" if shared else "running pulls"
                raise LockTimeout(f"cache {self.root}: waited {timeout:.0f}s for {who} (the gc lock); retry later")
            yield
        finally:
            os.close(fd)

    # ---- files ---------------------------------------------------------------------------------------------------
    def open_file(self, path: Path, flags: int, mode: int = FILE_MODE) -> int:
        """os.open that never follows a symlink at ``path`` (a planted link is CacheCorrupt, not followed). With
        O_CREAT, a file this uid owns gets ``mode`` exactly (the umask does not take the group's write bit)."""
        try:
            fd = os.open(path, flags | _NOFOLLOW, mode)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CacheCorrupt(f"cache {self.root}: {path} is a symlink; model-loader never makes one there and"
                                   " refuses to follow it. Remove it") from exc
            raise
        if flags & os.O_CREAT:
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
        return fd

    def open_partial(self, path: Path) -> int:
        return self.open_file(path, os.O_RDWR | os.O_CREAT)

    # ---- blobs ---------------------------------------------------------------------------------------------------
    def has_blob(self, digest: str, size: int) -> bool:
        """A regular, read-only file of the right size: only a verified publish leaves one (symlinks, writable
        files and other sizes do not count, and are replaced by the next verified download)."""
        try:
            st = os.lstat(self.blob_path(digest))
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == size and not st.st_mode & 0o222

    def publish_blob_if_absent(self, path: Path, digest: str, size: int) -> None:
        """Publish a verified private download unless a verified blob appeared meanwhile (the same bytes: ours is
        dropped, so trees keep sharing one inode)."""
        if self.has_blob(digest, size):
            path.unlink(missing_ok=True)
            return
        _chmod_nofollow(path, 0o444)
        os.replace(path, self.blob_path(digest))

    def publish_blob(self, partial: Path, digest: str) -> None:
        """Make a verified partial file the cache's blob: read-only, then renamed into place."""
        _chmod_nofollow(partial, 0o444)
        os.replace(partial, self.blob_path(digest))

    # ---- models --------------------------------------------------------------------------------------------------
    def lookup_digest(self, digest: str) -> CachedModel | None:
        digest = Digest(digest)
        path = self.model_path(digest)
        meta = self.read_meta(digest)
        if meta is None or not _is_real_dir(path):
            return None
        if meta.get("boot_id") != current_boot_id():
            if not self.verify_after_reboot(digest):
                return None
            meta = self.read_meta(digest) or meta
        return CachedModel(digest, path, meta["bytes"], meta["files"], meta)

    def ref_target(self, ref: Reference | str) -> Digest | None:
        """The digest refs/<key> points at, when it is a link model-loader made (``../models/sha256/<hex>``)."""
        return self._link_target(self.ref_path(ref))

    def lookup_ref(self, ref: Reference | str) -> CachedModel | None:
        """The model a reference last resolved to in this cache, without any network."""
        digest = self.ref_target(ref)
        return self.lookup_digest(digest) if digest is not None else None

    def read_meta(self, digest: str) -> dict[str, Any] | None:
        """The model's meta file, validated (None when missing or not what model-loader writes)."""
        digest = Digest(digest)
        try:
            fd = self.open_file(self.meta_path(digest), os.O_RDONLY)
        except (FileNotFoundError, CacheCorrupt):
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_META_BYTES + 1)
        except OSError:
            return None
        return parse_meta(data, digest)

    def update_meta(self, digest: str, change: Any) -> None:
        """Read, change (``change(meta)`` edits it in place) and rewrite a model's meta, under the model lock."""
        digest = Digest(digest)
        with self.lock(f"model-{digest.hex}"):
            meta = self.read_meta(digest)
            if meta is None:
                return
            before = json.dumps(meta, sort_keys=True)
            change(meta)
            after = json.dumps(meta, sort_keys=True)
            if after != before:
                write_atomic(self.meta_path(digest), after.encode(), self.tmp_dir(), FILE_MODE)

    def verify_after_reboot(self, digest: str) -> bool:
        """True when the model's blobs can be trusted on this boot.

        Blobs are published without fsync (see loader.fetch), so a model published before an unclean shutdown is
        hashed again, once, on its first use after the reboot; a torn model is removed so it is pulled again.
        """
        meta = self.read_meta(digest)
        if meta is None:
            return False
        boot = current_boot_id()
        if meta.get("boot_id") == boot:
            return True
        for blob in meta["blobs"]:
            path = self.blob_path(blob)
            try:
                if hash_file(path)[0] != blob:
                    raise ValueError
            except (OSError, ValueError):
                # Without waiting: the caller may hold this very lock (publish_model looks the model up under it),
                # and a busy lock means another loader is on it. Not a hit either way; the next publish replaces it.
                with self.lock(f"model-{_hex(digest)}", blocking=False) as held:
                    if held:
                        self.meta_path(digest).unlink(missing_ok=True)
                        self.remove_tree(self.model_path(digest))
                        path.unlink(missing_ok=True)
                return False
        meta["boot_id"] = boot
        write_atomic(self.meta_path(digest), json.dumps(meta, sort_keys=True).encode(), self.tmp_dir(), FILE_MODE)
        return True

    def new_staging(self) -> Path:
        path = self.tmp_dir() / f"stage-{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def publish_model(self, digest: str, staging: Path, meta: dict[str, Any]) -> Path:
        """Move a complete, verified staging tree to models/sha256/<hex>, then write its meta (what makes it a hit).
        Caller holds the model lock and found no model there: whatever stands at the path is a tree a crashed
        publish or gc left half made or half removed, and goes first. A crash between the rename and the meta
        leaves a tree without meta: not a hit, and removed by the next gc."""
        final = self.model_path(digest)
        if os.path.lexists(final):
            self._discard_tree(final, "orphan")
            self.repairs.append(f"{final.relative_to(self.root)} was a tree without a valid meta (a crashed publish"
                                " or gc); replaced by the verified one")
        _make_read_only(staging, top=False)
        os.rename(staging, final)
        os.chmod(final, 0o555)
        fsync_dir(final.parent)
        write_atomic(self.meta_path(digest), json.dumps(meta, sort_keys=True).encode(), self.tmp_dir(), FILE_MODE)
        return final

    def link_ref(self, ref: Reference | str, digest: str) -> Path:
        """Point refs/<key> at the model, replacing any older target atomically (a moved tag)."""
        link = self.ref_path(ref)
        self._place_link(link, os.path.join("..", contract.MODELS_DIR, _hex(digest)))
        return link

    # ---- pods: what each pod verified, pinned for its whole life (issue 15) ----------------------------------------
    def pod_dir(self, pod_uid: str) -> Path:
        return self.root / contract.PODS_DIR / check_pod_uid(pod_uid)

    def pin(self, ref: Reference | str, digest: str, pod_uid: str, node: str | None) -> Path:
        """pods/<uid>/<key> -> the model: what the pod's app mounts (subPathExpr). Written once per pod and ref;
        a restarted container resolves it to the same digest whatever the tag does meanwhile."""
        pod = self.pod_dir(pod_uid)
        _mkdir_shared(pod.parent)
        _mkdir_shared(pod)
        if not _is_real_dir(pod) or not _is_real_dir(pod.parent):
            raise CacheCorrupt(f"cache {self.root}: {pod} is not a directory model-loader made; remove it")
        if node:
            node_file = pod / contract.POD_NODE_FILE
            if _read_small(node_file) != node:
                write_atomic(node_file, node.encode(), self.tmp_dir(), FILE_MODE)
        link = self.root / contract.pod_entry(ref, pod_uid)
        self._place_link(link, os.path.join("..", "..", contract.MODELS_DIR, _hex(digest)))
        return link

    def pinned(self, ref: Reference | str, pod_uid: str) -> Digest | None:
        """The digest this pod verified for ``ref`` before (a restarted pod's loader), if its entry is intact."""
        return self._link_target(self.root / contract.pod_entry(ref, pod_uid), depth=2)

    def list_pods(self) -> dict[str, tuple[str | None, dict[str, Digest | None]]]:
        """pods/ entries: uid -> (node it runs on, {entry name: model digest or None when not an intact link})."""
        out: dict[str, tuple[str | None, dict[str, Digest | None]]] = {}
        for uid in self._names(contract.PODS_DIR):
            pod = self.root / contract.PODS_DIR / uid
            if not _is_real_dir(pod):
                out[uid] = (None, {})
                continue
            node = _read_small(pod / contract.POD_NODE_FILE)
            entries = {name: self._link_target(pod / name, depth=2) for name in sorted(os.listdir(pod))
                       if name != contract.POD_NODE_FILE}
            out[uid] = (node, entries)
        return out

    def _discard_tree(self, path: Path, why: str) -> None:
        """Move a directory out of the way at once (one rename into tmp/), then remove it, whatever it held."""
        aside = self.tmp_dir() / f"{why}-{uuid.uuid4().hex}"
        os.rename(path, aside)
        self.remove_tree(aside)

    def remove_entry(self, path: Path) -> None:
        """Remove a link gc found broken, or what a kubelet left in its place (an empty directory)."""
        if _is_real_dir(path):
            self.remove_tree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def remove_pod(self, pod_uid: str) -> None:
        self.remove_entry(self.root / contract.PODS_DIR / _one_name(pod_uid))

    def _place_link(self, link: Path, target: str) -> None:
        """Make ``link`` a symlink to ``target``, atomically. Whatever else stands there is repaired, with a note
        in ``self.repairs``: an empty directory (kubelet creates a missing subPath as one), a dangling or foreign
        link, a file. Never a crash on a state the kubelet or a crashed loader can leave."""
        try:
            if os.readlink(link) == target:
                return
        except FileNotFoundError:
            pass
        except OSError:  # EINVAL: not a link
            st = os.lstat(link)
            if stat.S_ISDIR(st.st_mode):
                self._discard_tree(link, "repair")
                self.repairs.append(f"{link.relative_to(self.root)} was a directory (a kubelet creates a missing"
                                    " subPath as an empty one); replaced by the link to the verified model")
            else:
                os.unlink(link)
                self.repairs.append(f"{link.relative_to(self.root)} was a file; replaced by the link to the model")
        tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
        os.symlink(target, tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)

    def add_ref_to_meta(self, digest: str, ref: str) -> None:
        meta = self.read_meta(digest)
        if meta is None or ref in meta["refs"]:
            return

        def add(m: dict[str, Any]) -> None:
            m["refs"] = sorted(set(m["refs"]) | {ref})

        self.update_meta(digest, add)

    def touch(self, digest: str) -> None:
        path = self.root / contract.LASTUSE_DIR / _hex(digest)
        fd = self.open_file(path, os.O_RDONLY | os.O_CREAT)
        try:
            os.utime(fd)
        except PermissionError:
            # Another uid's file without the group's write bit (an older loader's 0644): a new one of ours instead.
            write_atomic(path, b"", self.tmp_dir(), FILE_MODE)
        finally:
            os.close(fd)

    def remove_tree(self, path: Path) -> None:
        """Remove a (read-only) tree: staging leftovers, or a model gc evicts."""
        if not path.exists():
            return
        for dirpath, _dirnames, _ in os.walk(path):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(path, ignore_errors=True)

    # ---- listing: gc and ls read the cache's layout through these, never by directory names of their own ----------
    def _names(self, area: str) -> list[str]:
        try:
            return sorted(os.listdir(self.root / area))
        except FileNotFoundError:
            return []

    def list_blobs(self) -> dict[Digest, Path]:
        return {Digest.from_hex(n, "blobs"): self.root / contract.BLOBS_DIR / n
                for n in self._names(contract.BLOBS_DIR) if is_digest("sha256:" + n)}

    def list_models(self) -> list[Digest]:
        """Published trees (with or without meta)."""
        return [Digest.from_hex(n, "models") for n in self._names(contract.MODELS_DIR) if is_digest("sha256:" + n)]

    def list_metas(self) -> list[Digest]:
        return [Digest.from_hex(n[:-5], "meta") for n in self._names(META_DIR)
                if n.endswith(".json") and is_digest("sha256:" + n[:-5])]

    def list_refs(self) -> dict[str, Digest | None]:
        """refs/ entries: name -> the model it links to, None when it is not a link model-loader made (or a
        temporary one a crashed link_ref left, whose name starts with '.')."""
        out: dict[str, Digest | None] = {}
        for name in self._names(contract.REFS_DIR):
            out[name] = None if name.startswith(".") else self._link_target(self.root / contract.REFS_DIR / name)
        return out

    def list_lastuse(self) -> dict[str, float]:
        """lastuse/ entries: name -> mtime (names are hex digests unless something else wrote there)."""
        out = {}
        for name in self._names(contract.LASTUSE_DIR):
            with contextlib.suppress(FileNotFoundError):
                out[name] = os.lstat(self.root / contract.LASTUSE_DIR / name).st_mtime
        return out

    def list_partials(self) -> dict[Digest, list[Path]]:
        """partial/ files (a download and its state files) by the blob they belong to."""
        out: dict[Digest, list[Path]] = {}
        for name in self._names(contract.PARTIAL_DIR):
            if is_digest("sha256:" + name[:64]):
                out.setdefault(Digest.from_hex(name[:64], "partial"), []).append(
                    self.root / contract.PARTIAL_DIR / name)
        return out

    def list_tmp(self) -> dict[Path, float]:
        out = {}
        for name in self._names(contract.TMP_DIR):
            path = self.root / contract.TMP_DIR / name
            with contextlib.suppress(FileNotFoundError):
                out[path] = os.lstat(path).st_mtime
        return out

    def lastuse_path(self, name: str) -> Path:
        return self.root / contract.LASTUSE_DIR / _one_name(name)

    def ref_link_path(self, name: str) -> Path:
        return self.root / contract.REFS_DIR / _one_name(name)

    def _link_target(self, link: Path, depth: int = 1) -> Digest | None:
        try:
            target = os.readlink(link)
        except OSError:
            return None
        prefix = os.path.join(*([".."] * depth), contract.MODELS_DIR, "")
        hexd = target[len(prefix):] if target.startswith(prefix) else ""
        return Digest("sha256:" + hexd) if is_digest("sha256:" + hexd) else None

    # ---- space ---------------------------------------------------------------------------------------------------
    def check_space(self, needed: int, what: str) -> None:
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if needed > free:
            raise NoSpaceError(
                f"not enough disk space in cache {self.root} for {what}: need {_mb(needed)}, {_mb(free)} free;"
                " free space (model-loader gc) or give the cache volume more room"
            )


def current_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def no_space(exc: OSError, cache: Cache, what: str) -> NoSpaceError:
    st = os.statvfs(cache.root)
    return NoSpaceError(
        f"disk full in cache {cache.root} while writing {what} ({_mb(st.f_bavail * st.f_frsize)} free):"
        " free space (model-loader gc) or give the cache volume more room"
    )


def is_no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _hex(digest: str) -> str:
    # Every cache path is built through here: Digest() refuses anything but sha256:<64 lowercase hex> (exit 8).
    return Digest(digest).hex


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def check_pod_uid(uid: str) -> str:
    """A pod UID as the downward API gives it: lowercase letters, digits and '-' (a UUID), one path component."""
    if not isinstance(uid, str) or not _POD_UID.fullmatch(uid):
        raise UsageError(f"{contract.FLAG_POD_UID} {uid!r} is not a pod UID (lowercase letters, digits and '-', as"
                         " the downward API's metadata.uid gives it)")
    return uid


def _read_small(path: Path, limit: int = 256) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        return os.read(fd, limit).decode("utf-8", "replace").strip() or None
    finally:
        os.close(fd)


def _one_name(name: str) -> str:
    """A name read from one of the cache's directories: one path component, nothing else."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a cache entry name: {name!r}")
    return name


def _flock(fd: int, op: int, timeout: float) -> bool:
    """flock with a bounded wait: True when taken, False when still busy after ``timeout`` seconds."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if timeout <= 0:
            return False
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        delay = min(0.5, delay * 2)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _mkdir_shared(path: Path) -> bool:
    """mkdir with DIR_MODE exactly (the umask does not take the group's bits); False when it already existed."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    os.chmod(path, DIR_MODE)
    return True


def _share_dir(path: Path, group: int | None, st: os.stat_result | None = None) -> int:
    """Give a directory this uid owns DIR_MODE and ``group`` (None, for the cache root: this process's group unless
    it already has one of this process's groups); a directory of another uid is left alone. The group the
    directory has afterwards."""
    st = os.lstat(path) if st is None else st
    if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode):
        return st.st_gid
    mine = {os.getegid(), *os.getgroups()}
    wanted = st.st_gid if group is None and st.st_gid in mine else (os.getegid() if group is None else group)
    if wanted != st.st_gid and wanted in mine:
        os.chown(path, -1, wanted, follow_symlinks=False)  # the owner may give its file any group it is in
    if stat.S_IMODE(st.st_mode) != DIR_MODE or wanted != st.st_gid:
        os.chmod(path, DIR_MODE)  # after the chown: a chmod keeps setgid only on a group of ours
    return wanted if wanted in mine else st.st_gid


def permission_problem(exc: PermissionError) -> CachePermissionError:
    """What a PermissionError means, for whoever fixes it: the loader's uid and groups, the path, and the owner
    and mode of that path or, when it does not exist, of the directory it was to be made in."""
    path = exc.filename
    if path is None:
        return CachePermissionError(f"permission denied ({exc.strerror}) running as {_whoami()}; {_FIX}")
    path = os.fsdecode(path)
    target = path if os.path.lexists(path) else os.path.dirname(path.rstrip("/")) or "/"
    try:
        st = os.lstat(target)
        owner = f"owned by uid {st.st_uid} gid {st.st_gid} mode {stat.S_IMODE(st.st_mode):04o}"
    except OSError as err:
        owner = f"not readable ({err.strerror})"
    where = f"{path}: it is {owner}" if target == path else f"{path}: its directory {target} is {owner}"
    return CachePermissionError(f"permission denied on {where}; model-loader runs as {_whoami()}. {_FIX}")


_FIX = ("Every loader that writes one cache needs write access to it through one group (README, Troubleshooting:"
        " \"Exit 9\"): give the cache that group once, or set the pod's fsGroup where the volume supports it")


def _whoami() -> str:
    groups = ",".join(str(g) for g in sorted({os.getegid(), *os.getgroups()}))
    return f"uid {os.geteuid()} gid {os.getegid()} (groups {groups})"


def _chmod_nofollow(path: str | Path, mode: int) -> None:
    """chmod that never acts through a symlink (Linux has no lchmod): on an O_NOFOLLOW descriptor."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def parse_meta(data: bytes, digest: Digest) -> dict[str, Any] | None:
    """A meta file as written by publish_model, validated: None when it is not one (a torn or foreign file)."""
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("digest") != digest:
        return None
    refs, blobs = meta.get("refs", []), meta.get("blobs", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        return None
    if not isinstance(blobs, list) or not all(is_digest(b) for b in blobs):
        return None
    for key in ("bytes", "files"):
        if not isinstance(meta.get(key, 0), int) or meta.get(key, 0) < 0:
            return None
    sources = meta.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(x, dict) for x in sources):
        return None
    meta["blobs"] = [Digest(b) for b in blobs]
    meta.setdefault("refs", [])
    meta.setdefault("bytes", 0)
    meta.setdefault("files", 0)
    meta.setdefault("sources", [])
    if "verified" in meta:  # a malformed record is no record: the model is verified again, not refused
        verified = meta["verified"]
        meta["verified"] = ({p: v for p, v in verified.items() if _is_verification(p, v)}
                            if isinstance(verified, dict) else {})
    return meta


# ---- signature verifications (issue 13): what verified a model, by the fingerprint of the policy that required it --
#: Policies recorded per model; the oldest record goes first (a shared cache serves tenants with different policies).
MAX_VERIFICATIONS = 16


def _is_verification(policy: object, rec: object) -> bool:
    return (is_digest(policy) and isinstance(rec, dict) and isinstance(rec.get("signer"), str)
            and isinstance(rec.get("where"), str) and is_digest(rec.get("signature"))
            and isinstance(rec.get("at"), (int, float)))


def verification(meta: dict[str, Any], policy: str) -> dict[str, Any] | None:
    """The record of the verification of this model under ``policy`` (a policy fingerprint), if one was made."""
    rec = meta.get("verified", {}).get(policy)
    return rec if isinstance(rec, dict) else None


def record_verification(meta: dict[str, Any], policy: str, rec: dict[str, Any]) -> None:
    """Record that ``policy`` verified this model (``rec``: signer, where, signature, at), keeping the newest
    MAX_VERIFICATIONS policies. For update_meta."""
    verified = dict(meta.get("verified") or {})
    verified[policy] = rec
    newest = sorted(verified.items(), key=lambda kv: kv[1].get("at", 0), reverse=True)[:MAX_VERIFICATIONS]
    meta["verified"] = dict(sorted(newest))


def _make_read_only(root: Path, top: bool) -> None:
    # Bottom-up so a directory is made read-only after its children. Files that are hard links to blobs are
    # already 0444. The top stays writable until it has been renamed (a rename across parents needs it). Never
    # through a symlink: a link in the tree pointing elsewhere must not turn another file read-only.
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o222:
                _chmod_nofollow(p, 0o444 | (0o111 if st.st_mode & 0o111 else 0))
        if dirpath != str(root) or top:
            _chmod_nofollow(dirpath, 0o555)
