"""Certificates for the webhook's TLS endpoint: a private CA and a serving certificate signed by it.

The kube-apiserver calls the webhook through its Service, so the serving certificate must name the Service in
every form a client may use (``svc``, ``svc.ns``, ``svc.ns.svc``, ``svc.ns.svc.cluster.local``); the CA
certificate is what goes into the webhook configurations' ``caBundle``. Everything here is pure (bytes in,
bytes out, the clock passed in) so the ``certs`` command, the tests and a self-managing replica share one
implementation. Keys are ECDSA P-256: small, fast handshakes, and accepted by every supported apiserver.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
    now = now or datetime.datetime.now(datetime.timezone.utc)
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
    ca_key: ec.EllipticCurvePrivateKey,
    service: str,
    namespace: str,
    *,
    extra_sans: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A new serving key and certificate signed by an existing CA: (cert PEM, key PEM)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
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
