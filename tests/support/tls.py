"""TLS helpers for transport tests: certificates laid out like a mounted Secret, client contexts, peer certs."""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

from cryptography import x509

from webhook import certs

LOCAL_SANS = ("127.0.0.1", "localhost")


class SecretDir:
    """A directory laid out the way kubelet projects a Secret volume: ``tls.crt -> ..data/tls.crt`` and
    ``..data -> ..<timestamp>``; :meth:`rotate` writes a new timestamped directory and swaps ``..data``
    atomically with a rename, exactly as kubelet's atomic writer does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._generation = 0
        for name in (certs.CA_CERT_FILE, certs.TLS_CERT_FILE, certs.TLS_KEY_FILE):
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)

    @property
    def cert_file(self) -> Path:
        return self.root / certs.TLS_CERT_FILE

    @property
    def key_file(self) -> Path:
        return self.root / certs.TLS_KEY_FILE

    @property
    def ca_file(self) -> Path:
        return self.root / certs.CA_CERT_FILE

    def rotate(self, bundle: certs.CertBundle) -> None:
        self._generation += 1
        version = self.root / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self._generation}"
        certs.write_bundle(bundle, version)
        tmp_link = self.root / "..data_tmp"
        tmp_link.symlink_to(version.name)
        os.replace(tmp_link, self.root / "..data")


def new_bundle(service: str = "model-cache", namespace: str = "model-cache-system") -> certs.CertBundle:
    return certs.generate(service, namespace, extra_sans=LOCAL_SANS)


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    return ctx


def peer_certificate(host: str, port: int, ca_pem: bytes) -> x509.Certificate:
    """The certificate the server presents on a new connection, verified against ``ca_pem``."""
    ctx = client_context(ca_pem)
    with socket.create_connection((host, port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
