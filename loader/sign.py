"""Signatures in a registry: find them for a digest (verification, export), and push them (``model-loader sign``).

In the registry client's terms (loader.registry): manifests by tag or digest, the referrers API, small blobs. The
decisions (what a signature manifest holds, whether a payload signs the digest, whether a key verifies it) are in
loader.signing, which is pure; this module only fetches and pushes.

Where signatures are looked for, in this order, stopping at the first that verifies:

1. the OCI 1.1 referrers API (``GET /v2/<name>/referrers/<digest>``), manifests with cosign's signature
   artifactType; when the registry answers 404 (no referrers API: Distribution 2.8), the OCI 1.1 fallback tag
   ``sha256-<hex>`` (an index of the referrers, kept by the clients that push them);
2. cosign's tag scheme, ``sha256-<hex>.sig`` in the same repository.

The search reads a :class:`SignatureSource`: a registry repository (:class:`RegistrySignatures`) or a bundle's copy
of one (loader.bundle), so ``pull`` and ``import`` verify with the same search, and ``export`` carries exactly what
that search finds (:func:`find`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from loader import oci, retry, signing
from loader.digest import Digest
from loader.errors import ArtifactError, NotFoundError
from loader.registry import RegistryClient
from loader.signing import Candidate, Policy, Verified
from loader.upload import Uploader, bytes_source

T = TypeVar("T")
#: Every kind of signature the search knows (what export carries).
ALL_KINDS = (signing.COSIGN_SIG_ARTIFACT, signing.SIGSTORE_BUNDLE)
_SIGNATURE_TAG = re.compile(r"sha256-[0-9a-f]{64}(\.sig)?")


def sig_tag(digest: Digest) -> str:
    """cosign's tag for the signatures of ``digest``: ``sha256-<hex>.sig``."""
    return f"sha256-{digest.hex}.sig"


def referrers_tag(digest: Digest) -> str:
    """OCI 1.1's referrers fallback tag of ``digest``: ``sha256-<hex>``."""
    return f"sha256-{digest.hex}"


def is_signature_tag(tag: str | None) -> bool:
    """A tag the search reads (cosign's ``.sig`` tag or the referrers fallback tag), not a model's."""
    return tag is not None and _SIGNATURE_TAG.fullmatch(tag) is not None


class SignatureSource(Protocol):
    """Where the search reads: one repository's referrers, manifests and small blobs."""

    def referrers(self, digest: Digest) -> bytes | None:
        """The referrers API's index for ``digest``; None when there is no referrers API."""

    def manifest(self, reference: str) -> tuple[bytes, str] | None:
        """A manifest by tag or digest (verified against the digest): (bytes, media type); None when absent."""

    def small_blob(self, digest: Digest, size: int) -> bytes:
        """A small blob, whole, checked against ``digest`` and ``size`` (ArtifactError or NotFoundError if not)."""


class RegistrySignatures:
    """A registry repository as a SignatureSource, every request retried under the small-request policy."""

    def __init__(self, client: RegistryClient, log: Any, label: str):
        self.client, self.log, self.label = client, log, label

    def referrers(self, digest: Digest) -> bytes | None:
        return _retrying(lambda: self.client.get_referrers(digest), self.log, self.label)

    def manifest(self, reference: str) -> tuple[bytes, str] | None:
        try:
            m = _retrying(lambda: self.client.get_manifest(reference), self.log, self.label)
        except NotFoundError:
            return None
        assert m.data is not None
        return m.data, m.media_type

    def small_blob(self, digest: Digest, size: int) -> bytes:
        """A small blob (a payload or a bundle, its size bounded by the parser), whole, checked against its digest."""

        def read() -> bytes:
            # Whole, bounded in bytes and in time (a payload trickled a byte at a time inside the socket timeout
            # would otherwise hold the pull that verifies it).
            return self.client.open_blob(digest, size=size).read_all(size, f"the {size}-byte signature blob {digest}")

        data = _retrying(read, self.log, self.label)
        if len(data) != size or Digest.of(data) != digest:
            raise ArtifactError(f"the registry served {len(data)} bytes hashing to {Digest.of(data)} for a"
                                f" {size}-byte blob {digest}")
        return data


@dataclass(frozen=True)
class SignatureManifest:
    """A signature manifest the search found for a digest: where, its bytes, and its kind (artifactType)."""

    where: str  # "referrers", "referrers-tag" or "tag" (signing.WHERE)
    digest: Digest
    media_type: str
    data: bytes
    artifact_type: str


def verify(client: RegistryClient, policy: Policy, digest: Digest, label: str, log: Any) -> Verified:
    """The signature in the registry that verifies ``digest`` under ``policy``, or SignatureError."""
    return verify_in(RegistrySignatures(client, log, label), policy, digest, label, log)


def verify_in(source: SignatureSource, policy: Policy, digest: Digest, label: str, log: Any,
              event: str = "pull.signature_verified", then: str = "pull again") -> Verified:
    """The signature in ``source`` that verifies ``digest`` under ``policy``, or SignatureError (nothing verifies;
    ``then`` is the refusal's advice after signing)."""
    looked: list[str] = []
    problems: list[str] = []
    kinds = ((signing.COSIGN_SIG_ARTIFACT,) if policy.keys else ()) + (
        (signing.SIGSTORE_BUNDLE,) if policy.identities else ())
    found = _signatures(source, find(source, kinds, digest, label, looked, problems), problems)
    verified = signing.check(found, policy, digest, label, looked, problems, then)
    log.info(event, ref=label, digest=digest, signer=verified.signer, where=verified.where,
             signature=verified.signature, policy=verified.policy)
    return verified


def find(source: SignatureSource, kinds: Sequence[str], digest: Digest, label: str, looked: list[str],
         problems: list[str]) -> Iterator[SignatureManifest]:
    """The signature manifests of ``digest`` of the given kinds, lazily, in search order: referrers (the API, else
    the fallback tag), then cosign's tag (key signatures only). ``looked`` and ``problems`` are filled as it goes."""
    index = source.referrers(digest)
    where = "referrers"
    looked.append("the referrers API")
    if index is None:
        where = "referrers-tag"
        looked[-1] = f"the referrers API (absent) and tag {referrers_tag(digest)}"
        got = source.manifest(referrers_tag(digest))
        index = got[0] if got is not None else None
    if index is not None:
        try:
            manifests = signing.parse_referrers(index, digest, kinds, f"{where} of {label}")
        except ArtifactError as exc:
            problems.append(str(exc))
            manifests = []
        for m, artifact_type in manifests:
            got = source.manifest(m)
            if got is None:
                problems.append(f"referrer {m} is listed but there is no such manifest")
            else:
                yield SignatureManifest(where, Digest.of(got[0]), got[1], got[0], artifact_type)
    if signing.COSIGN_SIG_ARTIFACT not in kinds:  # cosign's tag holds key signatures only
        return
    looked.append(f"tag {sig_tag(digest)}")
    got = source.manifest(sig_tag(digest))
    if got is not None:
        yield SignatureManifest("tag", Digest.of(got[0]), got[1], got[0], signing.COSIGN_SIG_ARTIFACT)


def _signatures(source: SignatureSource, manifests: Iterator[SignatureManifest],
                problems: list[str]) -> Iterator[Candidate]:
    """The signatures the found manifests hold, lazily: Sigstore bundles, cosign payloads with their signatures."""
    for m in manifests:
        if m.artifact_type == signing.SIGSTORE_BUNDLE:
            yield from _bundles(source, m.data, m.digest, m.where, problems)
        else:
            yield from _candidates(source, m.data, m.digest, m.where, problems)


def _bundles(source: SignatureSource, data: bytes, manifest: Digest, where: str,
             problems: list[str]) -> Iterator[Candidate]:
    try:
        layers = signing.parse_bundle_manifest(data, f"bundle manifest {manifest} ({where})")
    except ArtifactError as exc:
        problems.append(str(exc))
        return
    if not layers:
        problems.append(f"bundle manifest {manifest} ({where}) has no {signing.SIGSTORE_BUNDLE} layer")
    for digest, size in layers:
        try:
            bundle = source.small_blob(digest, size)
        except (ArtifactError, NotFoundError) as exc:
            problems.append(f"bundle {manifest} ({where}): layer {digest}: {exc}")
            continue
        yield Candidate(where, manifest, bundle, kind="bundle")


def _candidates(source: SignatureSource, data: bytes, manifest: Digest, where: str,
                problems: list[str]) -> Iterator[Candidate]:
    try:
        layers, skipped = signing.parse_signature_manifest(data, f"signature manifest {manifest} ({where})")
    except ArtifactError as exc:
        problems.append(str(exc))
        return
    problems.extend(skipped)
    for layer in layers:
        try:
            payload = source.small_blob(layer.payload, layer.size)
        except (ArtifactError, NotFoundError) as exc:
            problems.append(f"signature {manifest} ({where}): payload {layer.payload}: {exc}")
            continue
        yield Candidate(where, manifest, payload, layer.signature)


def _manifest_or_none(client: RegistryClient, reference: str, log: Any, label: str) -> bytes | None:
    got = RegistrySignatures(client, log, label).manifest(reference)
    return got[0] if got is not None else None


# ---- pushing (model-loader sign) -----------------------------------------------------------------------------
def push_signature(client: RegistryClient, target: RegistryManifest, payload: bytes, signature: bytes,
                   referrers: bool, log: Any) -> tuple[str, Digest]:
    """Push one signature of ``target`` (digest, media type, size): as a layer of cosign's ``.sig`` tag manifest
    (kept layers of earlier signatures, as cosign appends), or as an OCI 1.1 referrer (``subject``), listed in the
    fallback tag's index when the registry has no referrers API. Returns (where, the signature manifest's digest)."""
    digest = target.digest
    up = Uploader(client, log=log)
    layer = signing.signature_layer(payload, signature)
    up.ensure(layer["digest"], len(payload), bytes_source(payload), "signature payload")
    if referrers:
        empty = b"{}"
        up.ensure(str(Digest.of(empty)), len(empty), bytes_source(empty), "empty config")
        manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "artifactType": signing.COSIGN_SIG_ARTIFACT,
                    "config": {"mediaType": oci.OCI_EMPTY, "digest": str(Digest.of(empty)), "size": len(empty)},
                    "layers": [layer],
                    "subject": {"mediaType": target.media_type, "digest": str(digest), "size": target.size}}
        data = _json(manifest)
        sig = _retrying(lambda: client.put_manifest(str(Digest.of(data)), data, oci.OCI_MANIFEST), log, "sign")
        if _retrying(lambda: client.get_referrers(digest), log, "sign") is None:
            add_to_referrers_tag(client, digest, Digest(sig), len(data), signing.COSIGN_SIG_ARTIFACT, log)
            return "referrers-tag", Digest(sig)
        return "referrers", Digest(sig)
    layers: list[dict[str, Any]] = []
    old = _manifest_or_none(client, sig_tag(digest), log, "sign")
    if old is not None:
        try:
            obj = json.loads(old)
            layers = [x for x in obj.get("layers", []) if isinstance(x, dict)][: signing.MAX_SIGNATURE_LAYERS - 1]
        except (ValueError, AttributeError):
            layers = []  # not a signature manifest: replaced
    if layer not in layers:
        layers.append(layer)
    config = signing.signature_config(layers)
    up.ensure(str(Digest.of(config)), len(config), bytes_source(config), "signature config")
    manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                "config": {"mediaType": signing.OCI_IMAGE_CONFIG, "size": len(config), "digest": str(Digest.of(config))},
                "layers": layers}
    data = _json(manifest)
    sig = _retrying(lambda: client.put_manifest(sig_tag(digest), data, oci.OCI_MANIFEST), log, "sign")
    return "tag", Digest(sig)


class RegistryManifest:
    """What a signature names of its subject: digest, media type and size (a HEAD's answer)."""

    def __init__(self, digest: Digest, media_type: str, size: int):
        self.digest, self.media_type, self.size = digest, media_type, size


def add_to_referrers_tag(client: RegistryClient, subject: Digest, sig: Digest, size: int, artifact_type: str,
                        log: Any) -> None:
    """OCI 1.1's client side of the referrers fallback: list the new referrer in the index at ``sha256-<hex>``."""
    old = _manifest_or_none(client, referrers_tag(subject), log, "sign")
    entries: list[Any] = []
    if old is not None:
        try:
            entries = [m for m in json.loads(old).get("manifests", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            entries = []
    entry = {"mediaType": oci.OCI_MANIFEST, "digest": str(sig), "size": size, "artifactType": artifact_type}
    if any(m.get("digest") == str(sig) for m in entries):
        return
    index = _json({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [*entries, entry]})
    _retrying(lambda: client.put_manifest(referrers_tag(subject), index, oci.OCI_INDEX), log, "sign")


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _retrying(fn: Callable[[], T], log: Any, label: str) -> T:
    return retry.call(fn, retry.SMALL_REQUESTS, label, log, "signature.retry", ref=label)

