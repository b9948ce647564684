"""One pull, start to finish: resolve the reference, use the cache when it can, else fetch, verify and publish.

The decisions (is this a hit, may we fall back to the cache, which manifest of an index) are small functions;
the sequence below is the only place that combines the registry, the fetch engine and the cache.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from loader import layout
from loader.cache import Cache, current_boot_id
from loader.errors import ArtifactError, NetworkError, UsageError
from loader.fetch import Blob, Fetcher
from loader.progress import Progress
from loader.reference import Reference, parse
from loader.registry import INDEX_TYPES, RegistryClient, retrying


@dataclass
class PullOptions:
    cache: Path
    concurrency: int = 8
    plain_http: bool | None = None  # None: plain HTTP only for loopback registries
    insecure: bool = False
    credentials: object | None = None  # loader.credentials.DockerConfig
    mirrors: dict[str, list[str]] = field(default_factory=dict)  # registry host -> mirror URLs
    offline: bool = False
    timeout: float = 30.0
    progress: str = "auto"
    progress_interval: float = 5.0
    # Ask the registry even for a cached digest, so a pod on a shared node cache cannot read a private model
    # it has no credentials for just by knowing its digest. An unreachable registry still falls back to the cache.
    check_access: bool = False


@dataclass
class PullResult:
    ref: str
    digest: str
    path: str
    bytes: int
    files: int
    seconds: float
    cache_hit: bool
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"ref": self.ref, "digest": self.digest, "path": self.path, "bytes": self.bytes, "files": self.files,
                "seconds": round(self.seconds, 3), "cache_hit": self.cache_hit}


def pull(text: str, opts: PullOptions, log) -> PullResult:
    t0 = time.monotonic()
    try:
        ref = parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    cache = Cache(opts.cache).ensure()
    with cache.gc_lock(shared=True):
        return _pull(ref, cache, opts, log, t0)


def _pull(ref: Reference, cache: Cache, opts: PullOptions, log, t0: float) -> PullResult:
    label = str(ref)

    def hit(model, warnings=()) -> PullResult:
        cache.link_ref(ref, model.digest)
        cache.add_ref_to_meta(model.digest, label)
        cache.touch(model.digest)
        res = PullResult(label, model.digest, str(model.path), model.bytes, model.files, time.monotonic() - t0, True,
                         list(warnings))
        log.info("pull.hit", ref=label, digest=model.digest, path=res.path, seconds=round(res.seconds, 3))
        return res

    # A digest names immutable content: a cached copy needs no network at all (unless access is to be proven).
    if ref.digest and (opts.offline or not opts.check_access):
        model = cache.lookup_digest(ref.digest)
        if model:
            return hit(model)
    if opts.offline:
        model = cache.lookup_ref(ref)
        if model:
            return hit(model)
        raise NetworkError(f"{label} is not in cache {cache.root} and --offline forbids the registry: pull it once"
                           " online, or import a bundle (model-loader import)")

    with RegistryClient(ref, plain_http=opts.plain_http, insecure=opts.insecure, credentials=opts.credentials,
                        mirrors=opts.mirrors.get(ref.registry, []), timeout=opts.timeout, log=log) as client:
        return _pull_online(ref, client, cache, opts, log, t0, hit)


def _pull_online(ref: Reference, client: RegistryClient, cache: Cache, opts: PullOptions, log, t0: float, hit):
    label = str(ref)
    cached_digest = cache.lookup_digest(ref.digest) if ref.digest else None
    if not ref.digest or cached_digest:
        # One HEAD re-checks the tag (or, with check_access, the cached digest) and proves these credentials may
        # read it.
        try:
            head = _retrying(lambda: client.head_manifest(ref.reference), log, label)
        except NetworkError as exc:
            model = cached_digest or cache.lookup_ref(ref)
            if model is None:
                raise
            msg = f"registry {ref.registry} unreachable ({exc}); using the cached copy {model.digest}"
            log.warning("pull.registry_unreachable", ref=label, digest=model.digest, error=str(exc))
            return hit(model, [msg])
        model = cached_digest or cache.lookup_digest(head.digest)
        if model:
            return hit(model)
        digest = head.digest
    else:
        digest = ref.digest

    top = _retrying(lambda: client.get_manifest(digest), log, label)
    manifest = top.json()
    media_type = manifest.get("mediaType") or top.media_type
    image = manifest
    if media_type in INDEX_TYPES or "manifests" in manifest:
        child = pick_manifest(manifest, label)
        image = _retrying(lambda: client.get_manifest(child["digest"]), log, label).json()
    entries = layout.layer_entries(image, label)  # refuses unsafe names before any byte is fetched
    if not entries:
        raise ArtifactError(f"{label}: no layer has an {layout.TITLE} or {layout.MODELPACK_FILEPATH} annotation,"
                            " so the model would be empty; push files with titles (model-loader push, oras push)")
    blobs = [Blob(e.digest, e.size) for e in entries]
    fetcher = Fetcher(client, cache, concurrency=opts.concurrency, log=log, label=label)
    missing = fetcher.missing(blobs)
    resumable = fetcher.resumable_bytes(missing)
    need = sum(b.size for b in missing) - resumable + sum(e.size for e in entries if e.kind == "tar")
    cache.check_space(need, f"{label} ({len(missing)} blobs)")
    total = sum(b.size for b in missing)
    log.info("pull.start", ref=label, digest=digest, blobs=len(missing), bytes=total, resumed_bytes=resumable or None,
             concurrency=opts.concurrency)
    with Progress(log, label, total, already=resumable, mode=opts.progress, interval=opts.progress_interval) as prog:
        fetcher.progress = prog
        fetcher.fetch(blobs)

    model = publish_model(cache, digest, entries, image, media_type, [label], label)
    cache.link_ref(ref, digest)
    cache.add_ref_to_meta(digest, label)
    cache.touch(digest)
    secs = time.monotonic() - t0
    log.info("pull.done", ref=label, digest=digest, path=str(model.path), bytes=model.bytes, files=model.files,
             seconds=round(secs, 3), mbps=round(total / secs / 1e6, 1) if secs else None,
             fetched_bytes=client.bytes_received)
    return PullResult(label, digest, str(model.path), model.bytes, model.files, secs, False)


def publish_model(cache: Cache, digest: str, entries, image: dict, media_type: str, refs: list[str], label: str):
    """Materialise a model's tree from its verified blobs and publish it, under the model lock, unless another
    loader already has; the published model. Shared by pull (after its fetch) and bundle import."""
    with cache.lock(f"model-{digest[7:]}"):
        model = cache.lookup_digest(digest)
        if model is None:
            staging = cache.new_staging()
            try:
                nbytes, nfiles = layout.materialize(entries, staging, cache.blob_path, label)
                meta = {"digest": digest, "refs": refs, "bytes": nbytes, "files": nfiles, "manifest": image,
                        "media_type": media_type, "blobs": sorted({e.digest for e in entries}),
                        "created": time.time(), "boot_id": current_boot_id()}
                cache.publish_model(digest, staging, meta)
            finally:
                cache.remove_tree(staging)
            model = cache.lookup_digest(digest)
    return model


def pick_manifest(index: dict, label: str) -> dict:
    """Choose the manifest of an index: a model artifact has no platform, else this node's platform."""
    manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict) and isinstance(m.get("digest"), str)]
    if not manifests:
        raise ArtifactError(f"{label}: image index lists no manifests")
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    for m in manifests:
        if not m.get("platform"):
            return m
    for m in manifests:
        p = m["platform"]
        if p.get("os") == "linux" and p.get("architecture") == arch:
            return m
    return manifests[0]


def _retrying(fn, log, label):
    return retrying(fn, log, "manifest.retry", ref=label)
