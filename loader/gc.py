"""Cache eviction and inventory: what the cache holds (``ls``), what may go (``gc``), and removing it safely.

Three steps, kept apart so the decision can be tested without a disk:

* :func:`scan` reads the cache into an :class:`Inventory` (models with their refs, last use and the inodes they
  hold; loose blobs, partial downloads, staging leftovers, dangling links). Storage is counted per inode, so a
  blob shared by two models, or a model file hard-linked to its blob, is counted once.
* :func:`plan` is pure: models unused for longer than ``max_unused`` go, then the least recently used until the
  models fit in ``max_size``; models the keep list names never go.
* :func:`collect` removes them, then whatever no remaining model needs. It holds the cache's gc lock exclusively
  while it scans, decides and deletes: every pull holds that lock shared for its whole run, so gc waits for
  in-flight pulls (whose blobs no model references yet) and new pulls wait for gc. Inside it, each model and blob
  is removed under its own ``model-<hex>`` / ``blob-<hex>`` lock taken without waiting, as pull takes them; a busy
  one is skipped, so a writer that does not use the gc lock is never undercut either.

Removal order keeps every crash state consistent: a model loses its ``refs/`` links first (no new lookup finds
it), then its meta (it stops being a cache hit), then its tree; a tree left without meta is removed by the next gc.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loader.cache import GC_LOCK_TIMEOUT, Cache
from loader.digest import Digest
from loader.errors import UsageError
from loader.reference import ReferenceError, cache_key, parse

if TYPE_CHECKING:
    from loader.log import Logger

STALE_PARTIAL = 24 * 3600.0  # an interrupted download this old is not going to be resumed
STALE_TMP = 3600.0  # staging trees and temp files of a crashed loader (a live one finishes well within this)

Inode = tuple[int, int]


# ---- flag values -------------------------------------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SIZE_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
               "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([kKMGTP]i?)?B?$")


def parse_duration(text: str, flag: str) -> float:
    """``30m``, ``12h``, ``7d``, ``1h30m`` -> seconds."""
    s = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise UsageError(f"{flag} {text!r} is not a duration: write a number and a unit (s, m, h, d, w),"
                         " e.g. 30m, 12h, 7d or 1h30m")
    return total


def parse_size(text: str, flag: str) -> int:
    """``500Mi``, ``20G``, ``1Ti``, ``1048576`` -> bytes (Kubernetes quantity suffixes; a trailing B is allowed)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise UsageError(f"{flag} {text!r} is not a size: write a number and an optional unit (K, M, G, T for"
                         " powers of 1000; Ki, Mi, Gi, Ti for powers of 1024), e.g. 500Mi, 20G or 1Ti")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])


def human(n: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# ---- the models list (prefetch's --models-file, gc's --keep-file) -------------------------------------------------


def parse_models_list(text: str, source: str) -> tuple[list[str], list[str]]:
    """One reference per line; ``#`` starts a comment. Returns (canonical refs in order, error messages)."""
    refs: list[str] = []
    errors: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            ref = str(parse(line))
        except ReferenceError as exc:
            errors.append(f"{source}:{n}: {exc}")
            continue
        if ref not in refs:
            refs.append(ref)
    return refs, errors


def read_keep_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"--keep-file {path!r} cannot be read: {exc.strerror}") from exc
    refs, errors = parse_models_list(text, path)
    if errors:
        # A typo must not turn a kept model into an evictable one: refuse to run rather than guess.
        raise UsageError("; ".join(errors) + " (fix the keep file; gc removed nothing)")
    return refs


# ---- inventory -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    digest: str
    path: str
    refs: tuple[str, ...]  # refs whose refs/ link points here now
    former_refs: tuple[str, ...]  # refs recorded in its meta that now point elsewhere (a moved tag)
    bytes: int  # size of the tree as the app sees it
    files: int
    last_use: float
    blobs: frozenset[str]
    inodes: frozenset[Inode]  # storage it holds: the tree's files and its blobs


@dataclass(frozen=True)
class Inventory:
    models: tuple[Model, ...]  # most recently used first
    sizes: dict[Inode, int]  # bytes of every inode below
    blobs: dict[str, Inode]  # every blob file: digest -> inode
    links: dict[str, str]  # refs/<name> -> hex it points at ("" when it is not a model link)
    partials: dict[str, tuple[int, float]]  # hex -> (bytes, newest mtime) of partial/<hex>*
    tmp: dict[str, float]  # tmp/<name> -> mtime
    orphan_trees: tuple[str, ...]  # models/sha256/<hex> without meta (a gc crashed mid-removal)
    orphan_metas: tuple[str, ...]  # meta/<hex>.json without a tree (a publish crashed before its rename)
    lastuse: tuple[str, ...]  # hex of every lastuse file
    # pods/<uid>/: the node each pod runs on (None when unrecorded) and the models its entries pin (hex; "" for an
    # entry that is not an intact link). A pinned model is in use while its pod exists: never evicted.
    pods: dict[str, tuple[str | None, tuple[str, ...]]] = field(default_factory=dict)

    def disk_bytes(self, models: Iterable[Model]) -> int:
        """Bytes the given models hold on disk, each shared inode counted once."""
        held: set[Inode] = set()
        for m in models:
            held |= m.inodes
        return sum(self.sizes[i] for i in held)

    def unreferenced_bytes(self) -> int:
        """Blobs and partial downloads no model holds: what gc would take without evicting anything."""
        held: set[Inode] = set()
        for m in self.models:
            held |= m.inodes
        loose = {i for i in self.blobs.values() if i not in held}
        return sum(self.sizes[i] for i in loose) + sum(b for b, _ in self.partials.values())


def _stat_inode(path: str | Path, sizes: dict[Inode, int]) -> Inode | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    ino = (st.st_dev, st.st_ino)
    sizes[ino] = st.st_size
    return ino


def scan(cache: Cache) -> Inventory:
    """Read the cache through its own listing API (loader.cache owns the layout; gc never builds a path)."""
    sizes: dict[Inode, int] = {}

    blobs: dict[str, Inode] = {}
    for digest, path in cache.list_blobs().items():
        ino = _stat_inode(path, sizes)
        if ino:
            blobs[digest] = ino

    links = {name: (target.hex if target is not None else "") for name, target in cache.list_refs().items()}
    linked: dict[str, set[str]] = {}
    for name, hexd in links.items():
        linked.setdefault(hexd, set()).add(name)

    lastuse = cache.list_lastuse()
    trees = cache.list_models()
    metas = {d.hex for d in cache.list_metas()}
    models, orphan_trees = [], []
    for digest in trees:
        meta = cache.read_meta(digest) if digest.hex in metas else None
        path = cache.model_path(digest)
        if meta is None:
            orphan_trees.append(digest.hex)
            continue
        inodes = set()
        for dirpath, _, filenames in os.walk(path):
            for f in filenames:
                ino = _stat_inode(os.path.join(dirpath, f), sizes)
                if ino:
                    inodes.add(ino)
        model_blobs = frozenset(str(b) for b in meta["blobs"])
        inodes |= {blobs[b] for b in model_blobs if b in blobs}
        here = linked.get(digest.hex, set())
        recorded = sorted(set(meta["refs"]))
        current = tuple(r for r in recorded if _key(r) in here)
        former = tuple(r for r in recorded if r not in current)
        last = lastuse.get(digest.hex) or meta.get("created") or path.stat().st_mtime
        models.append(Model(digest, str(path), current, former, int(meta["bytes"]), int(meta["files"]),
                            float(last), model_blobs, frozenset(inodes)))
    models.sort(key=lambda m: (-m.last_use, m.digest))

    partials: dict[str, tuple[int, float]] = {}
    for digest, files in cache.list_partials().items():
        for part in files:
            try:
                st = os.lstat(part)
            except FileNotFoundError:
                continue
            size, newest = partials.get(digest.hex, (0, 0.0))
            partials[digest.hex] = (size + st.st_size, max(newest, st.st_mtime))

    tmp = {path.name: mtime for path, mtime in cache.list_tmp().items()}
    tree_hexes = {d.hex for d in trees}
    pods = {uid: (node, tuple(d.hex if d is not None else "" for d in entries.values()))
            for uid, (node, entries) in cache.list_pods().items()}
    return Inventory(tuple(models), sizes, blobs, links, partials, tmp, tuple(orphan_trees),
                     tuple(sorted(metas - tree_hexes)), tuple(sorted(lastuse)), pods)


def gone_pods(inv: Inventory, live: set[str] | None, node: str | None) -> list[str]:
    """Pods whose entries may go: not among ``live`` (the pods on this node), and recorded on this node (or on no
    node). Without a live set nothing is judged gone: gc cannot tell, so every pin stays. On a claim shared by
    nodes, a pod pinned from another node is that node's gc's to judge."""
    if live is None:
        return []
    return sorted(uid for uid, (pod_node, _) in inv.pods.items()
                  if uid not in live and (pod_node is None or node is None or pod_node == node))


def in_use(inv: Inventory, gone: Iterable[str] = ()) -> set[str]:
    """Digests of the models pinned by pods that still exist."""
    skip = set(gone)
    return {f"sha256:{hexd}" for uid, (_, hexes) in inv.pods.items() if uid not in skip for hexd in hexes if hexd}


def live_pods_from(pods_dir: str | Path) -> set[str]:
    """The pods on this node, from kubelet's pod directories (``/var/lib/kubelet/pods/<uid>``): present from before
    a pod's first container starts until kubelet has cleaned it up after the pod is gone. Read-only, and no API
    access needed (see docs/architecture.md for why this source)."""
    try:
        return {name for name in os.listdir(pods_dir) if os.path.isdir(os.path.join(pods_dir, name))}
    except OSError as exc:
        raise UsageError(f"--pods-dir {str(pods_dir)!r} cannot be read ({exc.strerror}): mount kubelet's pod"
                         " directory (/var/lib/kubelet/pods) read-only, or leave --pods-dir out (then no pin is"
                         " ever removed)") from exc


def _key(ref: str) -> str:
    try:
        return cache_key(ref)
    except ReferenceError:
        return ""


def resolve_keep(inv: Inventory, refs: list[str]) -> set[str]:
    """The digests the keep list protects. A digest ref names its model; a tag names the model its refs/ link
    points at, or, when that link is gone, the most recently used model whose meta records the ref."""
    keep: set[str] = set()
    by_hex = {m.digest[7:]: m for m in inv.models}
    for text in refs:
        ref = parse(text)
        if ref.digest:
            keep.add(ref.digest)
            continue
        target = inv.links.get(cache_key(ref), "")
        if target in by_hex:
            keep.add(by_hex[target].digest)
            continue
        label = str(ref)
        for m in inv.models:  # most recently used first
            if label in m.refs or label in m.former_refs:
                keep.add(m.digest)
                break
    return keep


# ---- the decision ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    max_unused: float | None = None  # seconds
    max_size: int | None = None  # bytes the models may hold


@dataclass(frozen=True)
class Eviction:
    model: Model
    reason: str  # "unused" or "size"


def plan(inv: Inventory, keep: set[str], policy: Policy, now: float) -> list[Eviction]:
    out: list[Eviction] = []
    lru = sorted(inv.models, key=lambda m: (m.last_use, m.digest))
    rest = list(lru)
    if policy.max_unused is not None:
        for m in lru:
            if m.digest not in keep and now - m.last_use > policy.max_unused:
                out.append(Eviction(m, "unused"))
                rest.remove(m)
    if policy.max_size is not None:
        for m in list(rest):
            if inv.disk_bytes(rest) <= policy.max_size:
                break
            if m.digest not in keep:
                out.append(Eviction(m, "size"))
                rest.remove(m)
    return out


# ---- doing it --------------------------------------------------------------------------------------------------


@dataclass
class Report:
    dry_run: bool
    models_before: int
    bytes_before: int  # bytes the models hold, shared inodes once
    evicted: list[Eviction] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # digests skipped because another process held their lock
    blobs: list[tuple[str, int]] = field(default_factory=list)
    partials: list[tuple[str, int]] = field(default_factory=list)
    tmp: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # orphan trees and metas, lastuse files
    pods: list[str] = field(default_factory=list)  # UIDs of gone pods whose pins were removed
    in_use: list[str] = field(default_factory=list)  # digests kept because a running pod pins them
    models_after: int = 0
    bytes_after: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "models_before": self.models_before,
            "models_after": self.models_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "removed_models": [
                {"digest": e.model.digest, "refs": list(e.model.refs), "former_refs": list(e.model.former_refs),
                 "bytes": e.model.bytes, "files": e.model.files, "last_use": iso(e.model.last_use),
                 "reason": e.reason}
                for e in self.evicted
            ],
            "busy_models": self.busy,
            "removed_blobs": [{"digest": d, "bytes": n} for d, n in self.blobs],
            "removed_partials": [{"digest": d, "bytes": n} for d, n in self.partials],
            "removed_tmp": self.tmp,
            "removed_refs": self.refs,
            "removed_other": self.other,
            "removed_pods": self.pods,
            "in_use": self.in_use,
        }

    def text(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        lines = []
        for e in self.evicted:
            refs = ", ".join(e.model.refs or e.model.former_refs) or "(no ref)"
            why = "unused" if e.reason == "unused" else "least recently used, over --max-size"
            lines.append(f"{verb} {e.model.digest} {refs} ({human(e.model.bytes)}, {e.model.files} files,"
                         f" last used {iso(e.model.last_use)}: {why})")
        for d in self.busy:
            lines.append(f"skipped {d}: another process holds its lock")
        lines.append(
            f"{verb} {len(self.evicted)} models, {len(self.blobs)} blobs ({human(sum(n for _, n in self.blobs))}),"
            f" {len(self.partials)} partial downloads ({human(sum(n for _, n in self.partials))}),"
            f" {len(self.tmp)} staging leftovers, {len(self.refs)} ref links;"
            f" models {self.models_before} -> {self.models_after},"
            f" {human(self.bytes_before)} -> {human(self.bytes_after)} on disk")
        return lines


def collect(cache: Cache, policy: Policy, keep_refs: list[str], log: Logger, dry_run: bool = False,
            now: float | None = None, lock_timeout: float = GC_LOCK_TIMEOUT, pods_dir: str | Path | None = None,
            node: str | None = None) -> Report:
    """Evict by ``policy`` and remove what no remaining model needs. ``dry_run`` takes no lock and changes nothing.
    Waits at most ``lock_timeout`` seconds for running pulls (LockTimeout, exit 7, after that). Models pinned by a
    pod that exists are never removed; with ``pods_dir`` (kubelet's pod directories) the pins of pods gone from
    this ``node`` are removed first."""
    if dry_run:
        return _collect(cache, policy, keep_refs, log, True, now, pods_dir, node)
    cache.ensure()
    with cache.gc_lock(shared=False, timeout=lock_timeout):
        return _collect(cache, policy, keep_refs, log, False, now, pods_dir, node)


def _collect(cache: Cache, policy: Policy, keep_refs: list[str], log: Logger, dry_run: bool,
             now: float | None, pods_dir: str | Path | None, node: str | None) -> Report:
    inv = scan(cache)  # inside the lock: what in-flight pulls published while gc waited is seen
    now = time.time() if now is None else now
    live = live_pods_from(pods_dir) if pods_dir is not None else None  # inside the lock too: a pin comes after
    gone_uids = gone_pods(inv, live, node)
    used = in_use(inv, gone_uids)
    keep = resolve_keep(inv, keep_refs) | used
    evictions = plan(inv, keep, policy, now)
    report = Report(dry_run, len(inv.models), inv.disk_bytes(inv.models))
    report.in_use = sorted(used)
    for uid in gone_uids:
        if not dry_run:
            cache.remove_pod(uid)
        report.pods.append(uid)
        log.info("gc.pod", pod_uid=uid, dry_run=dry_run or None)

    gone: set[str] = set()
    for e in evictions:
        if dry_run or _remove_model(cache, inv, e.model.digest[7:]):
            report.evicted.append(e)
            gone.add(e.model.digest)
            log.info("gc.model", digest=e.model.digest, refs=",".join(e.model.refs) or None, bytes=e.model.bytes,
                     reason=e.reason, last_use=iso(e.model.last_use), dry_run=dry_run or None)
        else:
            report.busy.append(e.model.digest)
            log.warning("gc.model_busy", digest=e.model.digest)
    remaining = [m for m in inv.models if m.digest not in gone]
    report.models_after = len(remaining)
    report.bytes_after = inv.disk_bytes(remaining)

    # Blobs no remaining model references.
    needed = set().union(*(m.blobs for m in remaining)) if remaining else set()
    for digest, ino in sorted(inv.blobs.items()):
        if digest in needed:
            continue
        if dry_run or _locked_unlink(cache, f"blob-{digest[7:]}", [cache.blob_path(digest)]):
            report.blobs.append((digest, inv.sizes[ino]))

    # Partial downloads nobody resumed for a day, whose blob lock is free (no one is downloading them now).
    for hexd, (size, newest) in sorted(inv.partials.items()):
        if now - newest <= STALE_PARTIAL:
            continue
        files = cache.list_partials().get(Digest.from_hex(hexd, "partial"), [])
        if dry_run or _locked_unlink(cache, f"blob-{hexd}", files):
            report.partials.append((f"sha256:{hexd}", size))

    for name, mtime in sorted(inv.tmp.items()):
        if now - mtime > STALE_TMP:
            if not dry_run:
                _remove_any(cache, cache.tmp_dir() / name)
            report.tmp.append(name)

    # Links to models that are gone (evicted above, or never published), and temp links of a crashed link_ref.
    present = {m.digest[7:] for m in remaining}
    for name, hexd in sorted(inv.links.items()):
        if hexd in present and not name.startswith("."):
            continue
        if not dry_run:
            cache.remove_entry(cache.ref_link_path(name))
        report.refs.append(name)

    for hexd in inv.orphan_trees:
        tree = cache.model_path(Digest.from_hex(hexd, "models"))
        if dry_run or _locked(cache, f"model-{hexd}", partial(cache.remove_tree, tree)):
            report.other.append(str(tree.relative_to(cache.root)))
    for hexd in inv.orphan_metas:
        meta = cache.meta_path(Digest.from_hex(hexd, "meta"))
        if dry_run or _locked(cache, f"model-{hexd}", partial(meta.unlink, missing_ok=True)):
            report.other.append(str(meta.relative_to(cache.root)))
    known = {m.digest[7:] for m in inv.models}  # an evicted model's lastuse went with it
    for hexd in inv.lastuse:
        if hexd not in known:
            path = cache.lastuse_path(hexd)
            if not dry_run:
                path.unlink(missing_ok=True)
            report.other.append(str(path.relative_to(cache.root)))

    log.info("gc.done", dry_run=dry_run or None, models_removed=len(report.evicted), blobs_removed=len(report.blobs),
             partials_removed=len(report.partials), tmp_removed=len(report.tmp), refs_removed=len(report.refs),
             bytes_before=report.bytes_before, bytes_after=report.bytes_after)
    return report


def _remove_model(cache: Cache, inv: Inventory, hexd: str) -> bool:
    def remove() -> None:
        for name, target in inv.links.items():
            if target == hexd:
                cache.ref_link_path(name).unlink(missing_ok=True)
        cache.meta_path(f"sha256:{hexd}").unlink(missing_ok=True)
        cache.remove_tree(cache.model_path(f"sha256:{hexd}"))
        cache.lastuse_path(hexd).unlink(missing_ok=True)

    return _locked(cache, f"model-{hexd}", remove)


def _locked(cache: Cache, lock: str, fn: Callable[[], object]) -> bool:
    with cache.lock(lock, blocking=False) as held:
        if held:
            fn()
        return held


def _locked_unlink(cache: Cache, lock: str, paths: list[Path]) -> bool:
    def unlink() -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    return _locked(cache, lock, unlink)


def _remove_any(cache: Cache, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        cache.remove_tree(path)
    else:
        path.unlink(missing_ok=True)
