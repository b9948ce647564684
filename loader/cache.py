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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from loader import contract
from loader.digest import Digest
from loader.errors import NoSpaceError
from loader.reference import Reference, cache_key

META_DIR = "meta"


@dataclass(frozen=True)
class CachedModel:
    digest: str
    path: Path
    bytes: int
    files: int


class Cache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()

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
    def ensure(self) -> "Cache":
        for d in (contract.BLOBS_DIR, contract.PARTIAL_DIR, contract.MODELS_DIR, contract.REFS_DIR, contract.LOCKS_DIR,
                  contract.TMP_DIR, contract.LASTUSE_DIR, META_DIR):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        return self

    # ---- locks ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, blocking: bool = True):
        """An exclusive flock on locks/<name>. Yields True when held, False when busy and not blocking."""
        path = self.root / contract.LOCKS_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing drops the flock

    @contextlib.contextmanager
    def gc_lock(self, shared: bool = True):
        """Pulls hold this shared for their whole run; gc holds it exclusive while it deletes.

        A pull's blobs are referenced by no model until it publishes, and a hit's model must not vanish between
        the lookup and the mount, so gc waits for in-flight pulls and pulls wait for a running gc.
        """
        path = self.root / contract.LOCKS_DIR / "gc"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- blobs ---------------------------------------------------------------------------------------------------
    def has_blob(self, digest: str, size: int) -> bool:
        try:
            return self.blob_path(digest).stat().st_size == size
        except FileNotFoundError:
            return False

    def publish_blob(self, partial: Path, digest: str) -> None:
        """Make a verified partial file the cache's blob: read-only, durable, then renamed into place."""
        os.chmod(partial, 0o444)
        os.replace(partial, self.blob_path(digest))

    # ---- models --------------------------------------------------------------------------------------------------
    def lookup_digest(self, digest: str) -> CachedModel | None:
        path = self.model_path(digest)
        meta = self.read_meta(digest)
        if meta is None or not path.is_dir():
            return None
        if meta.get("boot_id") != current_boot_id() and not self.verify_after_reboot(digest):
            return None
        return CachedModel(digest, path, meta.get("bytes", 0), meta.get("files", 0))

    def lookup_ref(self, ref: Reference | str) -> CachedModel | None:
        """The model a reference last resolved to in this cache, without any network."""
        try:
            target = os.readlink(self.ref_path(ref))
        except OSError:
            return None
        name = os.path.basename(target)
        if len(name) != 64:
            return None
        return self.lookup_digest(f"sha256:{name}")

    def read_meta(self, digest: str) -> dict | None:
        try:
            return json.loads(self.meta_path(digest).read_text())
        except (OSError, ValueError):
            return None

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
        for blob in meta.get("blobs", []):
            path = self.blob_path(blob)
            try:
                if _sha256_file(path) != blob:
                    raise ValueError
            except (OSError, ValueError):
                with self.lock(f"model-{_hex(digest)}"):
                    self.remove_tree(self.model_path(digest))
                    self.meta_path(digest).unlink(missing_ok=True)
                    path.unlink(missing_ok=True)
                return False
        meta["boot_id"] = boot
        _write_atomic(self.meta_path(digest), json.dumps(meta, sort_keys=True).encode(), self.tmp_dir())
        return True

    def new_staging(self) -> Path:
        path = self.tmp_dir() / f"stage-{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def publish_model(self, digest: str, staging: Path, meta: dict) -> Path:
        """Move a complete, verified staging tree to models/sha256/<hex>. Caller holds the model lock."""
        final = self.model_path(digest)
        _write_atomic(self.meta_path(digest), json.dumps(meta, sort_keys=True).encode(), self.tmp_dir())
        _make_read_only(staging, top=False)
        os.rename(staging, final)
        os.chmod(final, 0o555)
        _fsync_dir(final.parent)
        return final

    def link_ref(self, ref: Reference | str, digest: str) -> Path:
        """Point refs/<key> at the model, replacing any older target atomically (a moved tag)."""
        link = self.ref_path(ref)
        target = os.path.join("..", contract.MODELS_DIR, _hex(digest))
        try:
            if os.readlink(link) == target:
                return link
        except OSError:
            pass
        tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
        os.symlink(target, tmp)
        os.replace(tmp, link)
        _fsync_dir(link.parent)
        return link

    def add_ref_to_meta(self, digest: str, ref: str) -> None:
        meta = self.read_meta(digest)
        if meta is not None and ref not in meta.get("refs", []):
            meta["refs"] = sorted(set(meta.get("refs", [])) | {ref})
            _write_atomic(self.meta_path(digest), json.dumps(meta, sort_keys=True).encode(), self.tmp_dir())

    def touch(self, digest: str) -> None:
        path = self.root / contract.LASTUSE_DIR / _hex(digest)
        try:
            os.utime(path)
        except FileNotFoundError:
            path.touch()

    def remove_tree(self, path: Path) -> None:
        """Remove a (read-only) tree: staging leftovers, or a model gc evicts."""
        if not path.exists():
            return
        for dirpath, dirnames, _ in os.walk(path):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(path, ignore_errors=True)

    def clean_stale_staging(self, older_than: float = 3600) -> None:
        """Staging trees of crashed loaders. Only old ones: a live loader may be staging right now."""
        now = time.time()
        for p in self.tmp_dir().glob("stage-*"):
            try:
                if now - p.stat().st_mtime > older_than:
                    self.remove_tree(p)
            except FileNotFoundError:
                pass

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


def _sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(mv[:n])
    return "sha256:" + h.hexdigest()


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


def _write_atomic(path: Path, data: bytes, tmpdir: Path) -> None:
    tmp = tmpdir / f".{path.name}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_read_only(root: Path, top: bool) -> None:
    # Bottom-up so a directory is made read-only after its children. Files that are hard links to blobs are
    # already 0444. The top stays writable until it has been renamed (a rename across parents needs it).
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o222:
                os.chmod(p, 0o444 | (st.st_mode & 0o111 and 0o555))
        if dirpath != str(root) or top:
            os.chmod(dirpath, 0o555)
