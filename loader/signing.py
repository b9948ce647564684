"""Model signatures, pure: keys and policies, cosign signature manifests and payloads, and the verdict.

No network and no cache here: loader.sign finds signatures in a registry (and pushes them), loader.pull asks
:func:`check` for a verdict before anything is published. Every value from outside (a signature manifest, a
referrers index, a simple-signing payload, a base64 annotation, a PEM key) is parsed into a typed value at the
boundary, bounded in size and count, or refused with a message naming where it came from.

Formats (cosign's SIGNATURE_SPEC, and OCI 1.1 referrers):

* A signature manifest is an OCI image manifest whose layers are simple-signing payloads
  (``application/vnd.dev.cosign.simplesigning.v1+json``), each with its base64 signature in the layer annotation
  ``dev.cosignproject.cosign/signature``. Found at the tag ``sha256-<hex>.sig`` of the signed digest, or as a
  referrer (``subject``) with artifactType ``application/vnd.dev.cosign.artifact.sig.v1+json``.
* The payload is JSON; ``critical.image.docker-manifest-digest`` must equal the digest being verified and
  ``critical.type`` must be ``cosign container image signature``. Keys are matched case-insensitively, as Go's
  encoding/json (which cosign uses) does; two spellings of one key are refused as ambiguous.
* Signature schemes: ECDSA (DER signature) over SHA-256 for P-256, SHA-384 (or SHA-256, as older cosign) for
  P-384, SHA-512 for P-521; Ed25519 over the payload itself; RSA PKCS#1 v1.5 or PSS over SHA-256.

A policy's fingerprint names what a verification trusted (the keys' fingerprints, the identities, the trusted
root's digest); the cache records it with the model, so a hit under the same policy needs no second verification.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loader.contract import ExitCode
from loader.digest import Digest
from loader.errors import ArtifactError, LoaderError, UsageError
from loader.oci import load_json
from loader.policy import Rule, rule_for

# ---- formats (the only place they are spelled) --------------------------------------------------------------
SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
COSIGN_SIG_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
COSIGN_TYPE = "cosign container image signature"
SIGSTORE_BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"  # a referrer's artifactType and its layer's type
IN_TOTO = "application/vnd.in-toto+json"
OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"

# ---- bounds --------------------------------------------------------------------------------------------------
MAX_SIGNATURE_MANIFEST = 256 * 1024  # one signature manifest (cosign appends a layer per signature)
MAX_REFERRERS_INDEX = 4 * 1024 * 1024
MAX_SIGNATURE_LAYERS = 64  # simple-signing layers looked at per signature manifest
MAX_SIGNATURE_MANIFESTS = 16  # signature referrers looked at per digest
MAX_PAYLOAD = 64 * 1024  # one simple-signing payload
MAX_SIGNATURE_B64 = 4096  # one base64 signature (RSA-4096 is 684 characters)
MAX_KEY_PEM = 16 * 1024
MAX_KEYS = 64
MAX_IDENTITIES = 64
MAX_PROBLEMS = 5  # what a refusal lists of what did not match
MAX_BUNDLE = 256 * 1024  # one Sigstore bundle (a certificate chain, a log entry, an envelope)
MAX_TRUSTED_ROOT = 4 * 1024 * 1024
MAX_SUBJECTS = 256  # in-toto statement subjects looked at
MODEL_SIGNATURE_FILE = "model.sig"  # OpenSSF model signing's signature file, at the top of the model's tree


class SignatureError(LoaderError):
    """A policy requires a signature and none over the model's digest verifies (exit 10). The message names the
    reference, the digest and what did not match."""

    exit_code = ExitCode.SIGNATURE


# ---- keys ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublicKey:
    """A verification key: its kind, its fingerprint (``sha256:`` of the DER SubjectPublicKeyInfo, what the cache
    records and ``--output json`` reports), where it came from, and the loaded key."""

    kind: str  # ecdsa-p256, ecdsa-p384, ecdsa-p521, ed25519, rsa-<bits>
    fingerprint: Digest
    source: str
    key: Any = field(repr=False, compare=False)


def load_public_key(pem: bytes, source: str) -> PublicKey:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if len(pem) > MAX_KEY_PEM:
        raise UsageError(f"public key {source} is {len(pem)} bytes, over {MAX_KEY_PEM}: not a PEM public key")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"public key {source} is not a PEM public key (-----BEGIN PUBLIC KEY-----): {exc}") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384", "secp521r1": "ecdsa-p521"}
        if key.curve.name not in curves:
            raise UsageError(f"public key {source} is on curve {key.curve.name}; P-256, P-384 or P-521 only")
        kind = curves[key.curve.name]
    elif isinstance(key, ed25519.Ed25519PublicKey):
        kind = "ed25519"
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise UsageError(f"public key {source} is RSA-{key.key_size}; 2048 bits at least")
        kind = f"rsa-{key.key_size}"
    else:
        raise UsageError(f"public key {source} is a {type(key).__name__}; ECDSA, Ed25519 or RSA only")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return PublicKey(kind, Digest.of(der), source, key)


def keys_from_base64(text: str, where: str) -> list[PublicKey]:
    """``--verify-key-data``: base64 PEM public keys joined by ``,`` (whitespace ignored)."""
    out = []
    for i, part in enumerate(p for p in text.replace("\n", "").split(",") if p.strip()):
        try:
            pem = base64.b64decode(part.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(f"{where}: entry {i} is not base64 (of a PEM public key)") from None
        out.append(load_public_key(pem, f"{where}[{i}]"))
    return out


def verify_with(key: PublicKey, payload: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``key``'s over ``payload`` under one of the schemes cosign uses for its kind."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    k = key.key
    attempts: list[Any]
    if key.kind == "ed25519":
        attempts = [lambda: k.verify(signature, payload)]
    elif key.kind.startswith("ecdsa-"):
        by_curve: dict[str, list[hashes.HashAlgorithm]] = {
            "ecdsa-p256": [hashes.SHA256()], "ecdsa-p384": [hashes.SHA384(), hashes.SHA256()],
            "ecdsa-p521": [hashes.SHA512()]}
        algs = by_curve[key.kind]
        attempts = [lambda h=h: k.verify(signature, payload, ec.ECDSA(h)) for h in algs]
    else:
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
        attempts = [lambda: k.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256()),
                    lambda: k.verify(signature, payload, pss, hashes.SHA256())]
    for attempt in attempts:
        try:
            attempt()
            return True
        except (InvalidSignature, ValueError):
            continue
    return False


# ---- private keys (model-loader sign) ------------------------------------------------------------------------
def load_private_key(pem: bytes, source: str, password: bytes | None = None) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        key = serialization.load_pem_private_key(pem, password)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        hint = (" (cosign's own encrypted key format is not read: export it with `cosign import-key-pair`'s"
                " inverse, or make a PEM key with openssl)" if b"SIGSTORE" in pem[:64] else "")
        raise UsageError(f"private key {source} is not a PEM private key{hint}: {exc}") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise UsageError(f"private key {source} is on curve {key.curve.name}; P-256, P-384 or P-521 only")
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        raise UsageError(f"private key {source} is a {type(key).__name__}; ECDSA, Ed25519 or RSA only")
    return key


def sign_payload(private_key: Any, payload: bytes) -> bytes:
    """A signature cosign verifies with the matching public key: ECDSA (hash by curve), Ed25519, RSA PKCS#1 v1.5."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding

    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        sig: bytes = private_key.sign(payload)
        return sig
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        h = {"secp384r1": hashes.SHA384(), "secp521r1": hashes.SHA512()}.get(private_key.curve.name, hashes.SHA256())
        sig = private_key.sign(payload, ec.ECDSA(h))
        return sig
    sig = private_key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    return sig


def public_key_of(private_key: Any) -> PublicKey:
    from cryptography.hazmat.primitives import serialization

    pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return load_public_key(pem, "the signing key")


# ---- policy --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """A keyless signer: the OIDC issuer and the certificate's subject (SAN), both matched exactly."""

    issuer: str
    subject: str

    @classmethod
    def parse(cls, text: str, where: str) -> Identity:
        issuer, sep, subject = text.partition("=")
        if not sep or not issuer.strip() or not subject.strip() or len(text) > 1024:
            raise UsageError(f"{where} {text[:100]!r} is not ISSUER=SUBJECT, e.g."
                             " https://token.actions.githubusercontent.com=https://github.com/org/repo/.github/"
                             "workflows/release.yml@refs/heads/main")
        return cls(issuer.strip(), subject.strip())


@dataclass(frozen=True)
class Policy:
    """What a model must be signed by: any one of ``keys``, or (keyless) any one of ``identities`` under the
    trusted root. ``trusted_root`` holds the root's bytes (read once, at start-up)."""

    keys: tuple[PublicKey, ...] = ()
    identities: tuple[Identity, ...] = ()
    trusted_root: bytes | None = field(default=None, repr=False)
    trusted_root_source: str | None = None
    # OpenSSF model signing: the tree's MODEL_SIGNATURE_FILE, over every file, by one of ``keys`` (ECDSA), checked
    # on the tree after download and before publish, instead of a signature over the manifest digest.
    model_signature: bool = False

    def __post_init__(self) -> None:
        if len(self.keys) > MAX_KEYS:
            raise UsageError(f"{len(self.keys)} verification keys, over {MAX_KEYS}")
        if len(self.identities) > MAX_IDENTITIES:
            raise UsageError(f"{len(self.identities)} identities, over {MAX_IDENTITIES}")

    @property
    def required(self) -> bool:
        return bool(self.keys or self.identities)

    @property
    def fingerprint(self) -> Digest:
        """Stable over the policy's meaning: the same keys and identities in any order, from any file, give the
        same fingerprint; any other key, identity or trusted root gives another."""
        doc = {"keys": sorted({k.fingerprint for k in self.keys}),
               "identities": sorted({(i.issuer, i.subject) for i in self.identities}),
               "trusted_root": Digest.of(self.trusted_root) if self.trusted_root is not None and self.identities
               else None}
        if self.model_signature:
            doc["model_signature"] = MODEL_SIGNATURE_FILE
        return Digest.of(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())

    def describe(self) -> str:
        parts = [f"key {k.fingerprint[:19]}... ({k.kind}, {k.source})" for k in self.keys]
        parts += [f"identity {i.subject} from {i.issuer}" for i in self.identities]
        what = "; ".join(parts) or "nothing"
        return f"an OpenSSF model signature {MODEL_SIGNATURE_FILE} by {what}" if self.model_signature else what


# ---- what verified -------------------------------------------------------------------------------------------
#: Where a signature was found: the referrers API, OCI 1.1's fallback tag sha256-<hex>, cosign's .sig tag, or (an
#: OpenSSF model signature) the model's own tree.
WHERE = ("referrers", "referrers-tag", "tag", "model-signature")


@dataclass(frozen=True)
class Verified:
    """What verified a model: the policy, the key (or identity), where the signature was found, and the signature
    manifest's digest. ``recorded``: taken from the cache's record of an earlier verification."""

    policy: Digest
    signer: str  # a key fingerprint, or "identity:<issuer>=<subject>"
    where: str
    signature: Digest
    recorded: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "signer": self.signer, "where": self.where, "signature": self.signature,
                "recorded": self.recorded}

    def record(self, at: float) -> dict[str, Any]:
        """What the cache's meta keeps under the policy's fingerprint."""
        return {"signer": self.signer, "where": self.where, "signature": self.signature, "at": at}

    @classmethod
    def from_record(cls, policy: Digest, rec: Mapping[str, Any]) -> Verified:
        return cls(policy, str(rec["signer"]), str(rec["where"]), Digest(rec["signature"]), recorded=True)


# ---- signature manifests, referrers, payloads -----------------------------------------------------------------
@dataclass(frozen=True)
class SignatureLayer:
    """One simple-signing layer: the payload blob to fetch and its decoded signature."""

    payload: Digest
    size: int
    signature: bytes


@dataclass(frozen=True)
class Candidate:
    """One signature found for a digest, its payload fetched and verified against its descriptor: a cosign
    simple-signing payload and its signature, or (``kind`` "bundle") a Sigstore bundle, whole, in ``payload``."""

    where: str
    manifest: Digest  # the signature manifest
    payload: bytes
    signature: bytes = b""
    kind: str = "cosign"


def parse_signature_manifest(data: bytes, where: str) -> tuple[list[SignatureLayer], list[str]]:
    """The simple-signing layers of a signature manifest (at most MAX_SIGNATURE_LAYERS), and what was skipped and
    why (other media types, missing or malformed signatures)."""
    obj = load_json(data, where, MAX_SIGNATURE_MANIFEST)
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise ArtifactError(f"{where} has no layers list")
    out: list[SignatureLayer] = []
    skipped: list[str] = []
    for i, layer in enumerate(layers[:MAX_SIGNATURE_LAYERS]):
        at = f"{where} layer {i}"
        if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLESIGNING:
            skipped.append(f"{at} is not a {SIMPLESIGNING} layer")
            continue
        digest = Digest.parse(layer.get("digest"), f"{at} (field 'digest')")
        size = layer.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_PAYLOAD:
            skipped.append(f"{at} has payload size {str(size)[:20]}, not 0 to {MAX_PAYLOAD}")
            continue
        ann = layer.get("annotations")
        b64 = ann.get(SIGNATURE_ANNOTATION) if isinstance(ann, dict) else None
        if not isinstance(b64, str) or not b64:
            skipped.append(f"{at} has no {SIGNATURE_ANNOTATION} annotation")
            continue
        if len(b64) > MAX_SIGNATURE_B64:
            skipped.append(f"{at} has a {len(b64)}-character signature, over {MAX_SIGNATURE_B64}")
            continue
        try:
            sig = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            skipped.append(f"{at}: its {SIGNATURE_ANNOTATION} annotation is not base64")
            continue
        out.append(SignatureLayer(digest, size, sig))
    if len(layers) > MAX_SIGNATURE_LAYERS:
        skipped.append(f"{where} has {len(layers)} layers; only the first {MAX_SIGNATURE_LAYERS} were looked at")
    return out, skipped


def parse_referrers(data: bytes, subject: Digest, artifact_types: Sequence[str], where: str) -> list[tuple[Digest, str]]:
    """The manifests of a referrers index (the API's answer, or the fallback tag's index) whose artifactType is one
    of ``artifact_types``, as (digest, artifactType), at most MAX_SIGNATURE_MANIFESTS, in the order listed."""
    obj = load_json(data, where, MAX_REFERRERS_INDEX)
    manifests = obj.get("manifests")
    if not isinstance(manifests, list):
        raise ArtifactError(f"{where} (referrers of {subject}) has no manifests list")
    out: list[tuple[Digest, str]] = []
    for i, m in enumerate(manifests):
        if not isinstance(m, dict) or m.get("artifactType") not in artifact_types:
            continue
        out.append((Digest.parse(m.get("digest"), f"{where} entry {i}"), str(m["artifactType"])))
        if len(out) >= MAX_SIGNATURE_MANIFESTS:
            break
    return out


def parse_bundle_manifest(data: bytes, where: str) -> list[tuple[Digest, int]]:
    """The bundle layers of a Sigstore bundle referrer (cosign's new bundle format): (digest, size) each."""
    obj = load_json(data, where, MAX_SIGNATURE_MANIFEST)
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise ArtifactError(f"{where} has no layers list")
    out = []
    for i, layer in enumerate(layers[:MAX_SIGNATURE_LAYERS]):
        if not isinstance(layer, dict) or layer.get("mediaType") != SIGSTORE_BUNDLE:
            continue
        size = layer.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BUNDLE:
            raise ArtifactError(f"{where} layer {i} has bundle size {str(size)[:20]}, not 0 to {MAX_BUNDLE}")
        out.append((Digest.parse(layer.get("digest"), f"{where} layer {i} (field 'digest')"), size))
    return out


def _field(obj: Mapping[str, Any], name: str, where: str) -> Any:
    """``obj[name]`` matched case-insensitively, as Go's encoding/json does; two spellings are ambiguous."""
    found = [k for k in obj if k.lower() == name]
    if len(found) > 1:
        raise ArtifactError(f"{where} spells {name!r} {len(found)} ways ({', '.join(sorted(found))}): ambiguous")
    return obj[found[0]] if found else None


@dataclass(frozen=True)
class Payload:
    """A simple-signing payload: the digest it signs and the reference it names (informative only)."""

    digest: Digest
    docker_reference: str | None


def parse_payload(data: bytes, where: str) -> Payload:
    obj = load_json(data, where, MAX_PAYLOAD)
    critical = _field(obj, "critical", where)
    if not isinstance(critical, dict):
        raise ArtifactError(f"{where} has no 'critical' object")
    kind = _field(critical, "type", f"{where} critical")
    if kind != COSIGN_TYPE:
        raise ArtifactError(f"{where} has critical.type {str(kind)[:80]!r}, not {COSIGN_TYPE!r}")
    image = _field(critical, "image", f"{where} critical")
    if not isinstance(image, dict):
        raise ArtifactError(f"{where} has no critical.image object")
    digest = Digest.parse(_field(image, "docker-manifest-digest", f"{where} critical.image"),
                          f"{where} critical.image.docker-manifest-digest")
    identity = _field(critical, "identity", f"{where} critical")
    ref = _field(identity, "docker-reference", f"{where} critical.identity") if isinstance(identity, dict) else None
    return Payload(digest, ref if isinstance(ref, str) else None)


def make_payload(digest: Digest, docker_reference: str) -> bytes:
    """The simple-signing payload cosign writes for ``digest`` (compact JSON, cosign's field order)."""
    doc = {"critical": {"identity": {"docker-reference": docker_reference},
                        "image": {"docker-manifest-digest": str(digest)}, "type": COSIGN_TYPE},
           "optional": None}
    return json.dumps(doc, separators=(",", ":")).encode()


def signature_config(layers: Sequence[Mapping[str, Any]]) -> bytes:
    """The image config cosign gives a signature manifest: empty but for the layers' diff_ids."""
    doc = {"architecture": "", "config": {}, "created": "0001-01-01T00:00:00Z",
           "history": [{"created": "0001-01-01T00:00:00Z"}], "os": "",
           "rootfs": {"type": "layers", "diff_ids": [str(layer["digest"]) for layer in layers]}}
    return json.dumps(doc, separators=(",", ":")).encode()


def signature_layer(payload: bytes, signature: bytes) -> dict[str, Any]:
    return {"mediaType": SIMPLESIGNING, "size": len(payload), "digest": str(Digest.of(payload)),
            "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()}}


# ---- the verdict ---------------------------------------------------------------------------------------------
def check(candidates: Iterable[Candidate], policy: Policy, digest: Digest, label: str,
          looked: Sequence[str] = (), problems: list[str] | None = None, then: str = "pull again") -> Verified:
    """The first candidate whose payload signs ``digest`` and whose signature verifies with one of the policy's
    keys; else SignatureError naming the reference, the digest and what did not match (at most MAX_PROBLEMS
    reasons). ``candidates`` is consumed lazily, so the search stops at the first signature that verifies.
    ``looked`` names where signatures were looked for, ``problems`` what was refused while finding them: both are
    filled by the finder while ``candidates`` is consumed, and read once it is exhausted. ``then``: what the
    refusal advises after signing (import: export again with the signatures)."""
    found = 0
    seen: list[str] = problems if problems is not None else []
    for c in candidates:
        found += 1
        if c.kind == "bundle":
            try:
                signer = verify_bundle(c.payload, policy, digest)
            except ArtifactError as exc:
                seen.append(f"bundle {c.manifest} ({c.where}): {exc}")
                continue
            return Verified(policy.fingerprint, signer, c.where, c.manifest)
        try:
            payload = parse_payload(c.payload, f"signature {c.manifest} ({c.where}) payload")
        except ArtifactError as exc:
            seen.append(str(exc))
            continue
        if payload.digest != digest:
            seen.append(f"signature {c.manifest} ({c.where}) signs {payload.digest}, not {digest}")
            continue
        for key in policy.keys:
            if verify_with(key, c.payload, c.signature):
                return Verified(policy.fingerprint, key.fingerprint, c.where, c.manifest)
        seen.append(f"signature {c.manifest} ({c.where}) verifies with none of the policy's keys")
    where = f" (looked in {', '.join(looked)})" if looked else ""
    if not found and not seen:
        what = f"no signature found{where}"
    else:
        what = f"{found} signature(s) found{where}, none verifies: " + "; ".join(seen[:MAX_PROBLEMS])
        if len(seen) > MAX_PROBLEMS:
            what += f"; and {len(seen) - MAX_PROBLEMS} more"
    raise SignatureError(f"{label}: model {digest} is not signed as the policy requires ({policy.describe()}):"
                         f" {what}. Nothing was published; sign it (model-loader sign {label} --key KEY, or cosign"
                         f" sign) and {then}")


# ---- keyless: Sigstore bundles ---------------------------------------------------------------------------------
_verifiers: dict[Digest, Any] = {}  # sigstore Verifier per trusted root (its digest)


@dataclass(frozen=True)
class PolicyTable:
    """The cluster's signature policy by reference prefix (loader/policy.py), keys loaded once: the policy a pull of a
    reference must satisfy is its longest matching rule's, None when no rule asks for a signature."""

    rules: tuple[tuple[Rule, Policy], ...] = ()

    @classmethod
    def build(cls, rules: Sequence[Rule], trusted_root: bytes | None, trusted_root_source: str | None,
              where: str) -> PolicyTable:
        """Each rule's Policy (UsageError for a key that does not load, or identities without a trusted root)."""
        if trusted_root is None and any(rule.identities for rule in rules):
            raise UsageError(f"{where} names keyless identities but no trusted root was given: add"
                             " --trusted-root (or --trusted-root-data)")
        built = []
        for i, rule in enumerate(rules):
            keys = tuple(load_public_key(pem.encode(), f"{where}[{i}].keys[{j}]") for j, pem in enumerate(rule.keys))
            identities = tuple(Identity.parse(v, f"{where}[{i}].identities") for v in rule.identities)
            built.append((rule, Policy(keys=keys, identities=identities,
                                       trusted_root=trusted_root if identities else None,
                                       trusted_root_source=trusted_root_source if identities else None)))
        return cls(tuple(built))

    def for_ref(self, registry: str, repository: str) -> Policy | None:
        rule = rule_for(registry, repository, [r for r, _ in self.rules])
        if rule is None or not rule.required:
            return None
        return next(p for r, p in self.rules if r is rule)


def load_trusted_root(data: bytes, source: str) -> Any:
    """A Sigstore trusted root JSON (``--trusted-root``) as sigstore's TrustedRoot; UsageError when it is not one."""
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import TrustedRoot
    from sigstore_models.trustroot.v1 import TrustedRoot as TrustedRootMessage

    if len(data) > MAX_TRUSTED_ROOT:
        raise UsageError(f"trusted root {source} is {len(data)} bytes, over {MAX_TRUSTED_ROOT}")
    try:
        root = TrustedRoot(TrustedRootMessage.from_json(data))
        root.get_fulcio_certs()
        root.rekor_keyring(_verify_purpose())
        root.ct_keyring(_verify_purpose())
    except (SigstoreError, ValueError) as exc:
        raise UsageError(f"trusted root {source} is not a usable Sigstore trusted root (certificate authorities,"
                         f" transparency log and CT log keys): {str(exc)[:300]}") from None
    return root


def _verify_purpose() -> Any:
    from sigstore._internal.trust import KeyringPurpose

    return KeyringPurpose.VERIFY


def verify_bundle(data: bytes, policy: Policy, digest: Digest) -> str:
    """``identity:<issuer>=<subject>`` of the first policy identity the bundle verifies for, offline, against the
    policy's trusted root: the certificate chains to its CA at the log's integrated time, carries a valid SCT, its
    log entry's inclusion proof, checkpoint and promise verify with the log key, and the signature covers ``digest``
    (a DSSE in-toto statement with the digest among its subjects, or a message signature over the manifest, whose
    sha256 is the digest). ArtifactError naming what did not match otherwise."""
    from sigstore.errors import Error as SigstoreError
    from sigstore.hashes import Hashed
    from sigstore.models import Bundle
    from sigstore.verify import Verifier
    from sigstore.verify.policy import Identity as IdentityPolicy
    from sigstore_models.common.v1 import HashAlgorithm

    if not policy.identities or policy.trusted_root is None:
        raise ArtifactError("a keyless Sigstore bundle, and the policy names no identity to verify it for")
    if len(data) > MAX_BUNDLE:
        raise ArtifactError(f"{len(data)} bytes, over the {MAX_BUNDLE} byte limit")
    try:
        bundle = Bundle.from_json(data)
    except (SigstoreError, ValueError) as exc:
        raise ArtifactError(f"not a Sigstore bundle: {str(exc)[:200]}") from None
    root_digest = Digest.of(policy.trusted_root)
    verifier = _verifiers.get(root_digest)
    if verifier is None:
        verifier = _verifiers[root_digest] = Verifier(
            trusted_root=load_trusted_root(policy.trusted_root, policy.trusted_root_source or "(policy)"))
    dsse = bundle._inner.dsse_envelope is not None  # sigstore has no public accessor for the content's kind
    problems = []
    for ident in policy.identities:
        try:
            if dsse:
                payload_type, payload = verifier.verify_dsse(bundle, IdentityPolicy(identity=ident.subject,
                                                                                  issuer=ident.issuer))
                _check_statement(payload_type, payload, digest)
            else:
                verifier.verify_artifact(Hashed(algorithm=HashAlgorithm.SHA2_256, digest=bytes.fromhex(digest.hex)),
                                         bundle, IdentityPolicy(identity=ident.subject, issuer=ident.issuer))
            return f"identity:{ident.issuer}={ident.subject}"
        except (SigstoreError, ValueError) as exc:
            problems.append(f"not for {ident.subject} from {ident.issuer} ({str(exc)[:200]})")
        except ArtifactError as exc:
            problems.append(str(exc))
            break  # the statement names another digest: the same for every identity
    raise ArtifactError("; ".join(problems))


def _check_statement(payload_type: str, payload: bytes, digest: Digest) -> None:
    """A verified DSSE payload must be an in-toto statement with ``digest`` among its subjects."""
    if payload_type != IN_TOTO:
        raise ArtifactError(f"its DSSE payload is {payload_type[:80]!r}, not an in-toto statement ({IN_TOTO})")
    obj = load_json(payload, "its in-toto statement", MAX_BUNDLE)
    subjects = obj.get("subject")
    if not isinstance(subjects, list):
        raise ArtifactError("its in-toto statement has no subject list")
    named = []
    for s in subjects[:MAX_SUBJECTS]:
        d = s.get("digest") if isinstance(s, dict) else None
        hexd = d.get("sha256") if isinstance(d, dict) else None
        if hexd == digest.hex:
            return
        if isinstance(hexd, str):
            named.append(f"sha256:{hexd[:64]}")
    raise ArtifactError(f"it signs {', '.join(named[:3]) or 'no sha256 subject'}, not {digest}")


# ---- OpenSSF model signing: a signature file over the model's files -------------------------------------------
def verify_model_signature(tree: Path, policy: Policy, digest: Digest, label: str, scratch: Path) -> Verified:
    """The tree's MODEL_SIGNATURE_FILE (a model-signing bundle over every other file) verified with one of the
    policy's ECDSA keys, and every file of the tree hashed against it (an extra, missing or changed file fails);
    SignatureError naming the reference, the digest and the files or keys that did not match. ``scratch``: a
    directory for the key files model-signing reads (it takes paths)."""
    import tempfile

    import model_signing
    from cryptography.exceptions import InvalidSignature

    sig = tree / MODEL_SIGNATURE_FILE
    try:
        st = os.lstat(sig)
    except FileNotFoundError:
        st = None
    problems: list[str] = []
    if st is None or not stat.S_ISREG(st.st_mode):
        problems.append(f"the model has no {MODEL_SIGNATURE_FILE} file (a regular file at the top of its tree)")
    elif st.st_size > MAX_BUNDLE:
        problems.append(f"its {MODEL_SIGNATURE_FILE} is {st.st_size} bytes, over {MAX_BUNDLE}")
    else:
        keys = [k for k in policy.keys if k.kind.startswith("ecdsa-")]
        if not keys:
            problems.append("the policy has no ECDSA key, and model-signing verifies with ECDSA keys only")
        for key in keys:
            with tempfile.TemporaryDirectory(dir=scratch, prefix="model-sig-") as tmp:
                pem = Path(tmp) / "key.pub"
                pem.write_bytes(_pem(key))
                try:
                    config = model_signing.verifying.Config()  # type: ignore[no-untyped-call]
                    config.use_elliptic_key_verifier(public_key=pem).verify(tree, sig)
                except (ValueError, LookupError, TypeError, OSError, InvalidSignature) as exc:  # what model-signing raises for a bad,
                    #                      foreign or malformed signature file (KeyError for a missing field)
                    problems.append(f"key {key.fingerprint[:19]}...: {_mismatch(str(exc))[:400]}")
                    continue
            return Verified(policy.fingerprint, key.fingerprint, "model-signature", Digest.of(sig.read_bytes()))
    raise SignatureError(f"{label}: model {digest} is not signed as the policy requires ({policy.describe()}): "
                         + "; ".join(problems[:MAX_PROBLEMS]) + ". Nothing was published; sign the model's files"
                         f" (model_signing sign key --private_key KEY --signature DIR/{MODEL_SIGNATURE_FILE} DIR)"
                         " and push it again")


def _mismatch(text: str) -> str:
    """model-signing's message, readable: its list of differences joined, without the digests' reprs."""
    import ast

    _, sep, rest = text.partition("Signature mismatch: ")
    if sep:
        try:
            diffs = ast.literal_eval(rest)
        except (ValueError, SyntaxError):
            return text
        if isinstance(diffs, list):
            return "the files do not match the signature: " + "; ".join(str(d).split(": Expected ", 1)[0]
                                                                      for d in diffs)
    return text


def _pem(key: PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pem: bytes = key.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem
