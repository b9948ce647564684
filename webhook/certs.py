"""Certificates for the webhook's TLS endpoint: a private CA and a serving certificate signed by it.

The kube-apiserver calls the webhook through its Service, so the serving certificate must name the Service in
every form a client may use (``svc``, ``svc.ns``, ``svc.ns.svc``, ``svc.ns.svc.cluster.local``); the CA
certificate is what goes into the webhook configurations' ``caBundle``. Everything here is pure (bytes in,
bytes out, the clock passed in) so the ``certs`` command, the tests and a self-managing replica share one
implementation. Keys are ECDSA P-256: small, fast handshakes, and accepted by every supported apiserver.

:class:`CertManager` is the self-managing mode (the default install): it drives the pure functions through the
API boundary object it is given (``webhook.inventory.ClusterObjects``) to keep a Secret and the caBundle current.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import ipaddress
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from webhook.inventory import ClusterObjects

log = logging.getLogger(__name__)

CA_CERT_FILE = "ca.crt"
TLS_CERT_FILE = "tls.crt"
TLS_KEY_FILE = "tls.key"

DEFAULT_DAYS = 365
# Backdating covers clock skew between the machine that signs and the apiserver that verifies.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True)
class CertBundle:
    """PEM bytes of a CA and the serving certificate it signed (the shape of a ``kubernetes.io/tls`` Secret
    plus ``ca.crt``; ``ca_key`` is kept so a self-managing webhook can renew the leaf without a new CA)."""

    ca_cert: bytes
    ca_key: bytes
    tls_cert: bytes
    tls_key: bytes

    @property
    def ca_bundle(self) -> str:
        """The value for a webhook configuration's ``clientConfig.caBundle``."""
        return ca_bundle(self.ca_cert)


def service_dns_names(service: str, namespace: str) -> list[str]:
    """Every name under which in-cluster clients (the apiserver included) reach ``service`` in ``namespace``."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def ca_bundle(ca_cert_pem: bytes) -> str:
    return base64.b64encode(ca_cert_pem).decode("ascii")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def generate(
    service: str,
    namespace: str,
    *,
    extra_sans: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    now: datetime.datetime | None = None,
) -> CertBundle:
    """A fresh CA and a serving certificate for ``service.namespace`` (plus ``extra_sans``: DNS names or IPs)."""
    if days < 1:
        raise ValueError(f"certificate lifetime must be at least 1 day, got {days}")
    now = now or datetime.datetime.now(datetime.UTC)
    ca_key = _new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"model-cache-ca.{namespace}")])
    # The CA outlives the leaf so a renewed leaf signed by it does not force a caBundle change.
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days * 2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    tls_cert, tls_key = sign_serving(
        ca_cert, ca_key, service, namespace, extra_sans=extra_sans, days=days, now=now
    )
    return CertBundle(
        ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM),
        ca_key=_key_pem(ca_key),
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


def sign_serving(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    service: str,
    namespace: str,
    *,
    extra_sans: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A new serving key and certificate signed by an existing CA: (cert PEM, key PEM)."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = _new_key()
    names = service_dns_names(service, namespace)
    sans = [_san(n) for n in dict.fromkeys([*names, *extra_sans])]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[2])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def renewal_due(cert_pem: bytes, now: datetime.datetime, *, before: datetime.timedelta) -> bool:
    """True when ``cert_pem`` expires within ``before`` of ``now`` (or is not yet valid)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return now < cert.not_valid_before_utc or now + before >= cert.not_valid_after_utc


def write_bundle(bundle: CertBundle, out_dir: Path) -> dict[str, Path]:
    """Write ``ca.crt``, ``tls.crt`` and ``tls.key`` (0600) into ``out_dir``, each atomically.

    The CA key is not written: the manual path regenerates everything on rotation, and a CA key on disk is one
    more secret to guard.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        CA_CERT_FILE: (bundle.ca_cert, 0o644),
        TLS_CERT_FILE: (bundle.tls_cert, 0o644),
        TLS_KEY_FILE: (bundle.tls_key, 0o600),
    }
    written = {}
    for name, (data, mode) in files.items():
        target = out_dir / name
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".incomplete")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written[name] = target
    return written


# --- self-managed certificates ------------------------------------------------------------------------------
#
# Like Gatekeeper's cert-controller: the webhook keeps its CA and serving certificate in a Secret of its own
# namespace, creates them when missing, renews them before expiry and patches the CA into its two webhook
# configurations. Replicas agree through the Secret: every write carries the resourceVersion it read (or is a
# create), so of two replicas racing, one write wins and the other gets a conflict, reads the winner and uses it.
# The Secret's ``ca.crt`` is the trust bundle: the signing CA first, then the previous CA until it expires, so
# replicas still serving a leaf of the old CA stay trusted while kubelet projects the new Secret to them.

SECRET_CA_KEY = "ca.key"
_PEM_END = b"-----END CERTIFICATE-----"


@dataclasses.dataclass(frozen=True)
class SelfManaged:
    """Where the webhook keeps and publishes its certificates."""

    namespace: str
    secret: str
    service: str
    webhook_configuration: str
    days: int = DEFAULT_DAYS
    renew_before: datetime.timedelta = datetime.timedelta(days=30)


def split_pem(bundle_pem: bytes) -> list[bytes]:
    """The certificates of a PEM bundle, each as its own PEM block."""
    out = []
    for block in bundle_pem.split(_PEM_END)[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            out.append(block[start:] + _PEM_END + b"\n")
    return out


def bundle_from_secret(secret: dict[str, Any] | None) -> CertBundle | None:
    """The bundle a Secret holds, or None when it lacks a key or a key is not base64."""
    data = (secret or {}).get("data") or {}
    try:
        parts = {k: base64.b64decode(data[k], validate=True) for k in (CA_CERT_FILE, SECRET_CA_KEY, TLS_CERT_FILE, TLS_KEY_FILE)}
    except (KeyError, TypeError, ValueError):
        return None
    return CertBundle(parts[CA_CERT_FILE], parts[SECRET_CA_KEY], parts[TLS_CERT_FILE], parts[TLS_KEY_FILE])


def secret_body(bundle: CertBundle, cfg: SelfManaged, existing: dict[str, Any] | None) -> dict[str, Any]:
    """The Secret to write: a ``kubernetes.io/tls`` Secret plus ``ca.crt`` and ``ca.key``; an update carries the
    resourceVersion it replaces (optimistic concurrency) and keeps the metadata others put there."""
    meta = dict((existing or {}).get("metadata") or {})
    meta.update({"name": cfg.secret, "namespace": cfg.namespace})
    meta.setdefault("labels", {"app.kubernetes.io/name": "model-cache", "app.kubernetes.io/component": "webhook"})

    def encode(b: bytes) -> str:
        return base64.b64encode(b).decode("ascii")

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {k: v for k, v in meta.items() if k in ("name", "namespace", "labels", "annotations", "resourceVersion")},
        "type": "kubernetes.io/tls",
        "data": {
            CA_CERT_FILE: encode(bundle.ca_cert),
            SECRET_CA_KEY: encode(bundle.ca_key),
            TLS_CERT_FILE: encode(bundle.tls_cert),
            TLS_KEY_FILE: encode(bundle.tls_key),
        },
    }


def chains_to(leaf_pem: bytes, trust_pem: bytes) -> bool:
    """True when ``leaf_pem`` (its first certificate) was signed by one of the CAs in ``trust_pem``."""
    try:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        cas = [x509.load_pem_x509_certificate(p) for p in split_pem(trust_pem)]
    except ValueError:
        return False
    for ca in cas:
        try:
            leaf.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


# Certificate key types that have public numbers. Any other (Ed25519, ...; DH cannot be in a certificate) is never
# one this module made: comparing it raises AttributeError, which _usable takes as "not usable".
_NUMBERED_KEYS = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, dsa.DSAPublicKey)
_ISSUER_KEYS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, dsa.DSAPrivateKey)


def _same_key(private_key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """The certificate carries the public half of ``private_key`` (compared by public numbers)."""
    mine, theirs = private_key.public_key(), cert.public_key()
    if not isinstance(mine, _NUMBERED_KEYS) or not isinstance(theirs, _NUMBERED_KEYS):
        raise AttributeError(f"cannot compare {type(mine).__name__} and {type(theirs).__name__} keys")
    same: bool = mine.public_numbers() == theirs.public_numbers()
    return same


def _usable(bundle: CertBundle, cfg: SelfManaged, now: datetime.datetime) -> tuple[bool, bool]:
    """(CA usable, leaf usable) for ``bundle`` at ``now``."""
    try:
        ca_pems = split_pem(bundle.ca_cert)
        ca = x509.load_pem_x509_certificate(ca_pems[0])
        ca_key = serialization.load_pem_private_key(bundle.ca_key, None)
        ca_ok = (
            _same_key(ca_key, ca)
            and not renewal_due(ca_pems[0], now, before=cfg.renew_before)
        )
    except (ValueError, IndexError, TypeError, AttributeError):
        return False, False
    try:
        leaf = x509.load_pem_x509_certificate(bundle.tls_cert)
        key = serialization.load_pem_private_key(bundle.tls_key, None)
        names = set(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
        leaf_ok = (
            _same_key(key, leaf)
            and set(service_dns_names(cfg.service, cfg.namespace)) <= names
            and chains_to(bundle.tls_cert, ca_pems[0])
            and not renewal_due(bundle.tls_cert, now, before=cfg.renew_before)
        )
    except (ValueError, TypeError, AttributeError, x509.ExtensionNotFound):
        leaf_ok = False
    return ca_ok, leaf_ok


def plan(existing: CertBundle | None, cfg: SelfManaged, now: datetime.datetime) -> CertBundle | None:
    """What the Secret should hold next: None when ``existing`` is fine as it is.

    A leaf that is due (or names the wrong service, or does not match its key) is re-signed by the same CA, so
    the caBundle does not change; a CA that is due is replaced, and the old one stays in the trust bundle until
    it expires.
    """
    if existing is None:
        return generate(cfg.service, cfg.namespace, days=cfg.days, now=now)
    ca_ok, leaf_ok = _usable(existing, cfg, now)
    if ca_ok and leaf_ok:
        return None
    if ca_ok:
        ca = x509.load_pem_x509_certificate(split_pem(existing.ca_cert)[0])
        ca_key = serialization.load_pem_private_key(existing.ca_key, None)
        assert isinstance(ca_key, _ISSUER_KEYS)  # _usable matched it with the CA certificate's key
        cert, key = sign_serving(ca, ca_key, cfg.service, cfg.namespace, days=cfg.days, now=now)
        return dataclasses.replace(existing, tls_cert=cert, tls_key=key)
    fresh = generate(cfg.service, cfg.namespace, days=cfg.days, now=now)
    still_valid = []
    for pem in split_pem(existing.ca_cert)[:1]:  # the CA being replaced; older ones have expired by now
        try:
            if x509.load_pem_x509_certificate(pem).not_valid_after_utc > now:
                still_valid.append(pem)
        except ValueError:
            pass
    return dataclasses.replace(fresh, ca_cert=fresh.ca_cert + b"".join(still_valid))


def with_ca_bundle(configuration: dict[str, Any], ca_bundle_b64: str) -> dict[str, Any] | None:
    """``configuration`` with every webhook's ``clientConfig.caBundle`` set, or None if all already are."""
    webhooks = configuration.get("webhooks") or []
    if all((w.get("clientConfig") or {}).get("caBundle") == ca_bundle_b64 for w in webhooks):
        return None
    updated = dict(configuration)
    updated["webhooks"] = [
        {**w, "clientConfig": {**(w.get("clientConfig") or {}), "caBundle": ca_bundle_b64}} for w in webhooks
    ]
    return updated


class CertManager:
    """Keeps the certificate Secret and the webhook configurations' caBundle current, through ``cluster``
    (an :class:`webhook.inventory.ClusterObjects`; this module does no I/O of its own)."""

    _ATTEMPTS = 5

    def __init__(self, cluster: ClusterObjects, cfg: SelfManaged, *,
                 clock: Callable[[], datetime.datetime] | None = None) -> None:
        self._cluster = cluster
        self.cfg = cfg
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self.published: bytes | None = None  # the trust bundle both webhook configurations carry
        self.problem: str | None = "the certificate Secret has not been reconciled yet"

    def reconcile(self) -> CertBundle:
        """Make the Secret hold a usable bundle and publish its CAs; returns the bundle in the Secret."""
        bundle = self._ensure_secret()
        self._publish()
        return bundle

    def _ensure_secret(self) -> CertBundle:
        cfg = self.cfg
        for _ in range(self._ATTEMPTS):
            secret = self._cluster.read_secret(cfg.namespace, cfg.secret)
            current = bundle_from_secret(secret)
            wanted = plan(current, cfg, self._clock())
            if wanted is None:
                return current  # type: ignore[return-value]
            body = secret_body(wanted, cfg, secret)
            try:
                if secret is None:
                    self._cluster.create_secret(cfg.namespace, body)
                else:
                    self._cluster.replace_secret(cfg.namespace, cfg.secret, body)
            except self._cluster.Conflict as exc:
                log.info("certificate Secret %s/%s changed under us (%s); reading it again", cfg.namespace, cfg.secret, exc)
                continue
            action = "created" if secret is None else ("renewed the serving certificate in" if wanted.ca_key == current.ca_key else "rotated the CA in")  # type: ignore[union-attr]
            log.info("%s certificate Secret %s/%s", action, cfg.namespace, cfg.secret)
            return wanted
        raise RuntimeError(f"certificate Secret {cfg.namespace}/{cfg.secret} kept changing: {self._ATTEMPTS} write conflicts in a row")

    def _publish(self) -> None:
        cfg = self.cfg
        # Publish what the Secret holds now, not what this replica last wrote: a slower replica must not put back
        # an older bundle over a newer one.
        bundle = bundle_from_secret(self._cluster.read_secret(cfg.namespace, cfg.secret))
        if bundle is None:
            self.problem = f"certificate Secret {cfg.namespace}/{cfg.secret} disappeared"
            return
        b64 = ca_bundle(bundle.ca_cert)
        for kind in self._cluster.WEBHOOK_KINDS:
            for _ in range(self._ATTEMPTS):
                configuration = self._cluster.read_webhook_configuration(kind, cfg.webhook_configuration)
                if configuration is None:
                    self.problem = f"{kind} webhook configuration {cfg.webhook_configuration!r} not found"
                    log.warning("cannot publish the caBundle: %s", self.problem)
                    return
                updated = with_ca_bundle(configuration, b64)
                if updated is None:
                    break
                try:
                    self._cluster.replace_webhook_configuration(kind, cfg.webhook_configuration, updated)
                    log.info("published the caBundle in the %s webhook configuration %s", kind, cfg.webhook_configuration)
                    break
                except self._cluster.Conflict:
                    continue
            else:
                self.problem = f"{kind} webhook configuration kept changing while publishing the caBundle"
                return
        self.published = bundle.ca_cert
        self.problem = None

    def ready_reason(self, served_cert_pem: bytes | None) -> str | None:
        """None when the certificate being served is trusted through the published caBundle; else why not."""
        if self.problem is not None:
            return self.problem
        if served_cert_pem is None or self.published is None or not chains_to(served_cert_pem, self.published):
            return "the served certificate is not signed by the published caBundle yet (kubelet has not projected the Secret)"
        return None

    def run(self, stopping: threading.Event, interval: float) -> None:
        """Reconcile every ``interval`` seconds until ``stopping`` is set; failures are logged and retried."""
        while not stopping.wait(interval):
            try:
                self.reconcile()
            except Exception as exc:  # noqa: BLE001 - the API may fail in many ways; the next round retries
                self.problem = f"certificate reconcile failed: {exc}"
                log.warning("certificate reconcile failed, retrying in %.0fs: %s", interval, exc)

