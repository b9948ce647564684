"""One pull, start to finish: resolve the reference, use the cache when it can, else fetch, verify and publish.

The decisions (is this a hit, may we fall back to the cache, which manifest of an index) are small functions;
the sequence below is the only place that combines the registry, the fetch engine and the cache.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loader import layout, oci, retry
from loader.access import (
    ANONYMOUS,
    Source,
    add_source,
    hit_proof,
    identity_of,
    identity_via_mirrors,
    may_fall_back,
    possession_failures,
    sources_of,
)
from loader.cache import GC_LOCK_TIMEOUT, Cache, CachedModel, check_pod_uid, record_verification, verification
from loader.digest import Digest
from loader.errors import ArtifactError, AuthError, NetworkError, UsageError
from loader.fetch import BLOB_POLICY, LOCK_STALL, Blob, Fetcher
from loader.progress import Progress
from loader.publish import publish_model, verify_staged_tree
from loader.reference import Reference, parse, speaks_plain_http
from loader.registry import RegistryClient
from loader.retry import RetryPolicy

if TYPE_CHECKING:  # loader.signing is imported only by a pull with a policy: a warm start without one pays nothing
    from loader.signing import Policy, PolicyTable, Verified

T = TypeVar("T")


@dataclass
class PullOptions:
    cache: Path
    concurrency: int = 8
    plain_http: bool | None = None  # None: plain HTTP only for loopback registries
    insecure: bool = False
    credentials: Any = None  # loader.credentials.DockerConfig
    mirrors: dict[str, list[str]] = field(default_factory=dict)  # registry host -> mirror URLs
    offline: bool = False
    timeout: float = 30.0
    progress: str = "auto"
    progress_interval: float = 5.0
    # Ask the registry even for a cached digest, so a pod on a shared node cache cannot read a private model
    # it has no credentials for just by knowing its digest. An unreachable registry still falls back to the cache.
    check_access: bool = False
    # Bounds (loader.retry): the blob-transfer policy (attempts, minimum rate, deadline), how long to wait on a
    # blob lock whose holder writes nothing, and on the cache's gc lock.
    policy: RetryPolicy = BLOB_POLICY
    lock_stall: float = LOCK_STALL
    gc_lock_timeout: float = GC_LOCK_TIMEOUT
    # Seconds for the whole pull, from its start (None: the download's own deadline, scaled with its size). The CSI
    # plugin sets one: a registry may claim any size, and a running pull holds one of its pod's few slots.
    deadline: float | None = None
    # Issue 15: the pod this pull is for (downward API metadata.uid) and its node. Each model is pinned for the
    # pod's life (pods/<uid>/<key>); a restarted pod's loader re-verifies the pinned digest, not the tag.
    pod_uid: str | None = None
    node_name: str | None = None
    ca_files: tuple[str, ...] = ()  # extra CAs for registries (--ca-file)
    plain_http_registries: frozenset[str] = frozenset()  # registries spoken to over plain HTTP (--plain-http-registry)
    # Issue 13: a model is served only once a signature over its digest verifies under this policy (--verify-key...);
    # a hit the cache records as verified under the same policy is not verified again.
    signature_policy: Policy | None = None
    # The cluster's policy by reference prefix (--signature-policy, the webhook's MODEL_CACHE_SIGNATURE_POLICY): when
    # set, the policy of each pull is its reference's rule (replacing signature_policy).
    signature_table: PolicyTable | None = None

    @property
    def signatures_required(self) -> bool:
        return self.signature_policy is not None and self.signature_policy.required

    def is_plain_http(self, ref: Reference) -> bool:
        if self.plain_http is not None:
            return self.plain_http
        return speaks_plain_http(ref.registry, self.plain_http_registries)


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
    fetched_bytes: int = 0  # blob bytes this loader downloaded (another loader may have fetched the rest)
    stale: bool = False  # the registry was unreachable: the cached copy was served without re-checking the tag
    pinned: bool = False  # a restarted pod: the digest its first loader verified, whatever the tag says now
    verified: Verified | None = None  # what verified the model's signature (a policy was set)

    def as_json(self) -> dict[str, Any]:
        out = {"ref": self.ref, "digest": self.digest, "path": self.path, "bytes": self.bytes, "files": self.files,
               "seconds": round(self.seconds, 3), "cache_hit": self.cache_hit, "fetched_bytes": self.fetched_bytes,
               "stale": self.stale, "pinned": self.pinned}
        if self.verified is not None:
            out["verified"] = self.verified.as_json()
        return out


def pull(text: str, opts: PullOptions, log: Any) -> PullResult:
    t0 = time.monotonic()
    try:
        ref = parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if opts.pod_uid is not None:
        check_pod_uid(opts.pod_uid)
    if opts.signature_table is not None:
        opts = dataclasses.replace(opts, signature_policy=opts.signature_table.for_ref(ref.registry, ref.repository))
    cache = Cache(opts.cache).ensure()
    with cache.gc_lock(shared=True, timeout=opts.gc_lock_timeout):
        res = _pull(ref, cache, opts, log, t0)
        if opts.pod_uid is not None:  # under the gc lock: gc sees the pin before it could judge the model unused
            cache.pin(ref, res.digest, opts.pod_uid, opts.node_name)
    for note in cache.repairs:
        log.warning("cache.repaired", ref=str(ref), repair=note)
        res.warnings.append(note)
    return res


class _Hit:
    """What a cache hit does, for one pull: link the ref (unless the pod is pinned to an older digest), record the
    use (and the source that proved access)."""

    def __init__(self, ref: Reference, cache: Cache, log: Any, t0: float, pinned: bool = False):
        self.ref, self.cache, self.log, self.t0, self.pinned = ref, cache, log, t0, pinned

    def __call__(self, model: CachedModel, warnings: Sequence[str] = (), source: Source | None = None,
                 stale: bool = False, fetched: int = 0, verified: Verified | None = None) -> PullResult:
        label = str(self.ref)
        if not self.pinned:
            self.cache.link_ref(self.ref, model.digest)
        # One read-modify-write of the meta for every record, and none when the meta the lookup read has them.
        new_verification = verified is not None and not verified.recorded
        if (label not in model.meta["refs"] or (source is not None and source not in sources_of(model.meta))
                or new_verification):
            def record(meta: dict[str, Any]) -> None:
                meta["refs"] = sorted(set(meta["refs"]) | {label})
                if source is not None:
                    add_source(meta, source)
                if verified is not None and new_verification:
                    record_verification(meta, verified.policy, verified.record(time.time()))

            self.cache.update_meta(model.digest, record)
        self.cache.touch(model.digest)
        res = PullResult(label, model.digest, str(model.path), model.bytes, model.files, time.monotonic() - self.t0,
                         True, list(warnings), fetched_bytes=fetched, stale=stale, pinned=self.pinned,
                         verified=verified)
        self.log.info("pull.hit", ref=label, digest=model.digest, path=res.path, seconds=round(res.seconds, 3),
                      stale=stale or None, pinned=self.pinned or None)
        return res


def _pull(name: Reference, cache: Cache, opts: PullOptions, log: Any, t0: float) -> PullResult:
    label = str(name)
    # A restarted pod: its first loader pinned a digest; verify and serve that one, not what the tag says now.
    pinned = cache.pinned(name, opts.pod_uid) if opts.pod_uid is not None else None
    ref = Reference(name.registry, name.repository, name.tag, pinned) if pinned is not None else name
    if pinned is not None:
        log.info("pull.pinned", ref=label, digest=pinned, pod_uid=opts.pod_uid)
    hit = _Hit(name, cache, log, t0, pinned=pinned is not None)

    # A digest names immutable content: a cached copy needs no network at all (unless access is to be proven).
    if ref.digest and (opts.offline or not opts.check_access):
        model = cache.lookup_digest(ref.digest)
        if model and (not opts.signatures_required or _recorded(model, opts)):
            return hit(model, verified=_recorded(model, opts))
    if opts.offline:
        model = cache.lookup_ref(ref)
        if model:
            if opts.signatures_required and not _recorded(model, opts):
                from loader.signing import SignatureError

                raise SignatureError(f"{label}: the cached model {model.digest} was never verified under this"
                                     " signature policy, and --offline forbids fetching its signatures; pull it"
                                     " once online")
            return hit(model, verified=_recorded(model, opts))
        raise NetworkError(f"{label} is not in cache {cache.root} and --offline forbids the registry: pull it once"
                           " online, or import a bundle (model-loader import)")

    with RegistryClient(ref, plain_http=opts.is_plain_http(ref), insecure=opts.insecure, credentials=opts.credentials,
                        mirrors=opts.mirrors.get(ref.registry, []), timeout=opts.timeout, log=log,
                        ca_files=opts.ca_files) as client:
        creds = opts.credentials.credentials_for(ref.registry) if opts.credentials is not None else None
        tls = not opts.is_plain_http(ref) and not opts.insecure  # TLS vouches for the registry's identity
        identity = identity_of(ref.registry, creds)
        if identity == ANONYMOUS and opts.mirrors.get(ref.registry):
            identity = identity_via_mirrors(opts.mirrors[ref.registry],
                                            opts.credentials.credentials_for if opts.credentials is not None else None)
        source = Source(ref.registry, ref.repository, identity, tls)
        return _pull_online(ref, client, cache, opts, log, t0, hit, source, label)


def _fallback(exc: NetworkError, model: CachedModel | None, ref: Reference, source: Source, opts: PullOptions,
              hit: _Hit, log: Any) -> PullResult:
    """The registry cannot be reached: the cached copy, if the access rule grants it to this pod."""
    if model is None:
        raise exc
    if opts.signatures_required and not _recorded(model, opts):
        raise NetworkError(f"registry {ref.registry} is unreachable ({exc}) and the cached copy of {ref}"
                           f" ({model.digest}) was never verified under this signature policy; the pod starts once"
                           " the registry answers and a signature verifies") from exc
    # A restarted pod's pin was written only after this very pod proved access to that digest: it keeps it.
    if opts.check_access and not hit.pinned and not may_fall_back(sources_of(model.meta), ref, source.identity):
        raise NetworkError(
            f"registry {ref.registry} is unreachable ({exc}) and the cached copy of {ref} ({model.digest}) is not"
            f" given out in its place: this shared cache has no record that these credentials, or anonymous access,"
            f" read {ref.registry}/{ref.repository}. The pod starts once the registry answers"
        ) from exc
    msg = f"registry {ref.registry} unreachable ({exc}); using the cached copy {model.digest}"
    log.warning("pull.registry_unreachable", ref=str(hit.ref), digest=model.digest, error=str(exc))
    return hit(model, [msg], stale=True, verified=_recorded(model, opts))


def _pull_online(ref: Reference, client: RegistryClient, cache: Cache, opts: PullOptions, log: Any, t0: float,
                 hit: _Hit, source: Source, label: str) -> PullResult:
    top = None
    if ref.digest:
        digest = Digest.parse(ref.digest, f"reference {label}")
        model = cache.lookup_digest(digest)
    else:
        # The tag, re-checked: a HEAD when a hit needs nothing more (Docker Hub does not count HEADs against pull
        # limits); with --check-access, or when the tag was never pulled here, the manifest itself, whose bytes name
        # the digest (and prove the registry serves them), in one round trip instead of a HEAD and a GET.
        try:
            if opts.check_access or cache.ref_target(ref) is None:  # (no link: a miss, most likely)
                top = _retrying(lambda: client.get_manifest(ref.reference), log, label)
                found = top.digest
            else:
                found = _retrying(lambda: client.head_manifest(ref.reference), log, label).digest
        except NetworkError as exc:
            return _fallback(exc, cache.lookup_ref(ref), ref, source, opts, hit, log)
        digest = Digest.parse(found, f"registry {ref.registry}: the digest of {label}")
        model = cache.lookup_digest(digest)
    # Before anything is served or published: a signature over the digest, unless this policy verified it before.
    verified = _require_signature(client, cache, digest, model, opts, log, label)
    if model and not ref.digest and not opts.check_access:
        return hit(model, verified=verified)

    if top is None:
        # The manifest, by digest (its bytes are verified against it): the first part of every access proof.
        try:
            top = _retrying(lambda: client.get_manifest(digest), log, label)
        except NetworkError as exc:
            return _fallback(exc, model if ref.digest else None, ref, source, opts, hit, log)
    assert top.data is not None
    manifest = oci.parse_manifest(top.data, digest, top.media_type, f"{label}")
    if isinstance(manifest, oci.ImageIndex):
        child = oci.pick_manifest(manifest, label)
        got = _retrying(lambda: client.get_manifest(child.digest), log, label)
        assert got.data is not None
        image = oci.parse_manifest(got.data, child.digest, child.media_type or got.media_type, label)
        if not isinstance(image, oci.ImageManifest):
            raise ArtifactError(f"{label}: index {digest} names another index ({child.digest}) as its model; nested"
                                " indexes are not supported for models")
    else:
        image = manifest
    entries = layout.layer_entries(dict(image.raw), label, log=log)  # refuses unsafe names before any byte is fetched
    if not entries:
        raise ArtifactError(f"{label}: no layer has an {layout.TITLE} or {layout.MODELPACK_FILEPATH} annotation,"
                            " so the model would be empty; push files with titles (model-loader push, oras push)")
    blobs = _unique([Blob(Digest(e.digest), e.size) for e in entries])

    verify_only: set[Digest] = set()
    proven: set[Digest] = set()
    if opts.check_access:
        if model is not None and hit_proof(sources_of(model.meta), ref, source.tls) == "manifest":
            return hit(model, source=source, verified=verified)
        present = [(b.digest, b.size) for b in blobs if cache.has_blob(b.digest, b.size)]
        verify_only = set(possession_failures(client, present, cache.blob_path, opts.policy))
        proven = {d for d, _ in present} - verify_only
        if verify_only:
            log.info("pull.prove_by_download", ref=label, blobs=len(verify_only),
                     reason="the registry did not serve the cached bytes of these blobs")
        elif model is not None:
            return hit(model, source=source, verified=verified)

    fetcher = Fetcher(client, cache, concurrency=opts.concurrency, log=log, label=label,
                      source_name=ref.registry, policy=opts.policy, lock_stall=opts.lock_stall)
    missing = fetcher.missing(blobs, verify_only)
    resumable = fetcher.resumable_bytes(missing)
    need = sum(b.size for b in missing) - resumable + sum(e.size for e in entries if e.kind == "tar")
    cache.check_space(need, f"{label} ({len(missing)} blobs)")
    total = sum(b.size for b in missing)
    log.info("pull.start", ref=label, digest=digest, blobs=len(missing), bytes=total, resumed_bytes=resumable or None,
             concurrency=opts.concurrency)
    with Progress(log, label, total, already=resumable, mode=opts.progress, interval=opts.progress_interval) as prog:
        fetcher.progress = prog
        fetcher.fetch(blobs, verify_only=verify_only, deadline=None if opts.deadline is None
                      else retry.Deadline(t0 + opts.deadline, f"the pull of {label}"))
    if opts.check_access:
        _prove_the_rest(client, fetcher, cache, blobs, proven, opts, log, label)

    if model is not None:  # every blob this pod could not show is now downloaded and verified from its registry
        return hit(model, source=source, fetched=client.bytes_received, verified=verified)
    if opts.signatures_required and verified is None:  # an OpenSSF model signature: on the files, before publish
        assert opts.signature_policy is not None
        verified = verify_staged_tree(cache, entries, digest, opts.signature_policy, label)
    model = publish_model(cache, digest, entries, dict(image.raw), image.media_type, [label], label, [source])
    if verified is not None:
        cache.update_meta(digest, lambda meta: record_verification(meta, verified.policy, verified.record(time.time())))
    if not hit.pinned:
        cache.link_ref(hit.ref, digest)
    cache.add_ref_to_meta(digest, label)
    cache.touch(digest)
    secs = time.monotonic() - t0
    log.info("pull.done", ref=label, digest=digest, path=str(model.path), bytes=model.bytes, files=model.files,
             seconds=round(secs, 3), mbps=round(total / secs / 1e6, 1) if secs else None,
             fetched_bytes=client.bytes_received)
    return PullResult(label, digest, str(model.path), model.bytes, model.files, secs, False,
                      fetched_bytes=client.bytes_received, pinned=hit.pinned, verified=verified)


def _recorded(model: CachedModel | None, opts: PullOptions) -> Verified | None:
    """The cache's record that this very policy verified the model before (None: no policy, or no record)."""
    if model is None or opts.signature_policy is None or not opts.signature_policy.required:
        return None
    from loader.signing import Verified

    rec = verification(model.meta, opts.signature_policy.fingerprint)
    return Verified.from_record(opts.signature_policy.fingerprint, rec) if rec is not None else None


def _require_signature(client: RegistryClient, cache: Cache, digest: Digest, model: CachedModel | None,
                       opts: PullOptions, log: Any, label: str) -> Verified | None:
    """None when no signature is required; the cache's record when this policy verified the model before; else
    the signature that verifies it now (SignatureError, exit 10, when none does: nothing is published). An OpenSSF
    model signature is checked on the files: on a cached tree now, else (None) after the download, before publish."""
    policy = opts.signature_policy
    if policy is None or not policy.required:
        return None
    recorded = _recorded(model, opts)
    if recorded is not None:
        return recorded
    from loader import sign, signing

    if policy.model_signature:
        if model is None:
            return None
        return signing.verify_model_signature(model.path, policy, digest, label, cache.tmp_dir())
    return sign.verify(client, policy, digest, label, log)


def _prove_the_rest(client: RegistryClient, fetcher: Fetcher, cache: Cache, blobs: list[Blob], proven: set[Digest],
                    opts: PullOptions, log: Any, label: str) -> None:
    """Every blob this pull uses must be proven from the pod's registry: shown before the fetch, or downloaded and
    verified by this pull. What the fetch took from elsewhere (a blob another loader published while this one
    waited for its lock, a partial download another loader left) is proven now, or downloaded in full."""
    unproven = [b for b in blobs if b.digest not in proven and b.digest not in fetcher.downloaded]
    if not unproven:
        return
    failed = set(possession_failures(client, [(b.digest, b.size) for b in unproven], cache.blob_path, opts.policy))
    if not failed:
        return
    log.info("pull.prove_by_download", ref=label, blobs=len(failed),
             reason="blobs this pull did not download itself, and the registry did not serve their cached bytes")
    fetcher.fetch([b for b in unproven if b.digest in failed], verify_only=failed)
    missing = failed - fetcher.downloaded
    if missing:  # cannot happen: a verify-only blob is always downloaded in full; refuse rather than trust
        raise AuthError(f"{label}: the registry did not prove it holds {sorted(missing)[0]}; nothing is served")


def _unique(blobs: list[Blob]) -> list[Blob]:
    seen: set[str] = set()
    out = []
    for b in blobs:
        if b.digest not in seen:
            seen.add(b.digest)
            out.append(b)
    return out


def _retrying(fn: Callable[[], T], log: Any, label: str) -> T:
    return retry.call(fn, retry.SMALL_REQUESTS, label, log, "manifest.retry", ref=label)
