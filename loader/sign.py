"""Signatures in a registry: find them for a digest (verification), and push them (``model-loader sign``).

In the registry client's terms (loader.registry): manifests by tag or digest, the referrers API, small blobs. The
decisions (what a signature manifest holds, whether a payload signs the digest, whether a key verifies it) are in
loader.signing, which is pure; this module only fetches and pushes.

Where signatures are looked for, in this order, stopping at the first that verifies:

1. the OCI 1.1 referrers API (``GET /v2/<name>/referrers/<digest>``), manifests with cosign's signature
   artifactType; when the registry answers 404 (no referrers API: Distribution 2.8), the OCI 1.1 fallback tag
   ``sha256-<hex>`` (an index of the referrers, kept by the clients that push them);
2. cosign's tag scheme, ``sha256-<hex>.sig`` in the same repository.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from loader import oci, retry, signing
from loader.digest import Digest
from loader.errors import ArtifactError, NotFoundError
from loader.registry import RegistryClient
from loader.signing import Candidate, Policy, Verified
from loader.upload import Uploader, bytes_source

T = TypeVar("T")


def sig_tag(digest: Digest) -> str:
    """cosign's tag for the signatures of ``digest``: ``sha256-<hex>.sig``."""
    return f"sha256-{digest.hex}.sig"


def referrers_tag(digest: Digest) -> str:
    """OCI 1.1's referrers fallback tag of ``digest``: ``sha256-<hex>``."""
    return f"sha256-{digest.hex}"


def verify(client: RegistryClient, policy: Policy, digest: Digest, label: str, log: Any) -> Verified:
    """The signature that verifies ``digest`` under ``policy``, or SignatureError (nothing verifies)."""
    looked: list[str] = []
    problems: list[str] = []
    found = _signatures(client, policy, digest, label, log, looked, problems)
    verified = signing.check(found, policy, digest, label, looked, problems)
    log.info("pull.signature_verified", ref=label, digest=digest, signer=verified.signer, where=verified.where,
             signature=verified.signature, policy=verified.policy)
    return verified


def _signatures(client: RegistryClient, policy: Policy, digest: Digest, label: str, log: Any, looked: list[str],
                problems: list[str]) -> Iterator[Candidate]:
    """Signatures the policy can verify, lazily: cosign signatures when it names keys, Sigstore bundles when it
    names identities."""
    kinds = ((signing.COSIGN_SIG_ARTIFACT,) if policy.keys else ()) + (
        (signing.SIGSTORE_BUNDLE,) if policy.identities else ())
    index = _retrying(lambda: client.get_referrers(digest), log, label)
    where = "referrers"
    looked.append("the referrers API")
    if index is None:
        where = "referrers-tag"
        looked[-1] = f"the referrers API (absent) and tag {referrers_tag(digest)}"
        index = _manifest_or_none(client, referrers_tag(digest), log, label)
    if index is not None:
        try:
            manifests = signing.parse_referrers(index, digest, kinds, f"{where} of {label}")
        except ArtifactError as exc:
            problems.append(str(exc))
            manifests = []
        for m, artifact_type in manifests:
            data = _manifest_or_none(client, m, log, label)
            if data is None:
                problems.append(f"referrer {m} is listed but the registry has no such manifest")
            elif artifact_type == signing.SIGSTORE_BUNDLE:
                yield from _bundles(client, data, Digest.of(data), where, label, log, problems)
            else:
                yield from _candidates(client, data, Digest.of(data), where, label, log, problems)
    if not policy.keys:  # cosign's tag holds key signatures only
        return
    looked.append(f"tag {sig_tag(digest)}")
    data = _manifest_or_none(client, sig_tag(digest), log, label)
    if data is not None:
        yield from _candidates(client, data, Digest.of(data), "tag", label, log, problems)


def _bundles(client: RegistryClient, data: bytes, manifest: Digest, where: str, label: str, log: Any,
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
            bundle = _small_blob(client, digest, size, log, label)
        except (ArtifactError, NotFoundError) as exc:
            problems.append(f"bundle {manifest} ({where}): layer {digest}: {exc}")
            continue
        yield Candidate(where, manifest, bundle, kind="bundle")


def _candidates(client: RegistryClient, data: bytes, manifest: Digest, where: str, label: str, log: Any,
                problems: list[str]) -> Iterator[Candidate]:
    try:
        layers, skipped = signing.parse_signature_manifest(data, f"signature manifest {manifest} ({where})")
    except ArtifactError as exc:
        problems.append(str(exc))
        return
    problems.extend(skipped)
    for layer in layers:
        try:
            payload = _small_blob(client, layer.payload, layer.size, log, label)
        except (ArtifactError, NotFoundError) as exc:
            problems.append(f"signature {manifest} ({where}): payload {layer.payload}: {exc}")
            continue
        yield Candidate(where, manifest, payload, layer.signature)


def _manifest_or_none(client: RegistryClient, reference: str, log: Any, label: str) -> bytes | None:
    try:
        m = _retrying(lambda: client.get_manifest(reference), log, label)
    except NotFoundError:
        return None
    return m.data


def _small_blob(client: RegistryClient, digest: Digest, size: int, log: Any, label: str) -> bytes:
    """A small blob (a payload or a bundle, its size bounded by the parser), whole, checked against its digest."""

    def read() -> bytes:
        buf = bytearray(size + 1)
        mv = memoryview(buf)
        n = 0
        resp = client.open_blob(digest, size=size)
        try:
            while n < len(buf):
                k = resp.readinto(mv[n:])
                if not k:
                    break
                n += k
        finally:
            resp.close(reusable=n <= size)
        return bytes(buf[:n])

    data = _retrying(read, log, label)
    if len(data) != size or Digest.of(data) != digest:
        raise ArtifactError(f"the registry served {len(data)}+ bytes hashing to {Digest.of(data)} for a {size}-byte"
                            f" blob {digest}")
    return data


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
            _add_to_referrers_tag(client, digest, Digest(sig), len(data), log)
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


def _add_to_referrers_tag(client: RegistryClient, subject: Digest, sig: Digest, size: int, log: Any) -> None:
    """OCI 1.1's client side of the referrers fallback: list the new referrer in the index at ``sha256-<hex>``."""
    old = _manifest_or_none(client, referrers_tag(subject), log, "sign")
    entries: list[Any] = []
    if old is not None:
        try:
            entries = [m for m in json.loads(old).get("manifests", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            entries = []
    entry = {"mediaType": oci.OCI_MANIFEST, "digest": str(sig), "size": size,
             "artifactType": signing.COSIGN_SIG_ARTIFACT}
    if any(m.get("digest") == str(sig) for m in entries):
        return
    index = _json({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [*entries, entry]})
    _retrying(lambda: client.put_manifest(referrers_tag(subject), index, oci.OCI_INDEX), log, "sign")


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _retrying(fn: Callable[[], T], log: Any, label: str) -> T:
    return retry.call(fn, retry.SMALL_REQUESTS, label, log, "signature.retry", ref=label)

