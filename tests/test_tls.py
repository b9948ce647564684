"""Certificates (webhook.certs) and the reloading TLS context (webhook.tls), with real handshakes on 127.0.0.1."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.tls import SecretDir, new_bundle, peer_certificate
from webhook import certs
from webhook.tls import ReloadingContext

NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.timezone.utc)


def _load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_serving_certificate_names_the_service_in_every_form_and_chains_to_the_ca():
    bundle = certs.generate("model-cache", "model-cache-system", extra_sans=["127.0.0.1", "localhost"], now=NOW, days=30)
    ca, leaf = _load(bundle.ca_cert), _load(bundle.tls_cert)

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [
        x509.DNSName("model-cache"),
        x509.DNSName("model-cache.model-cache-system"),
        x509.DNSName("model-cache.model-cache-system.svc"),
        x509.DNSName("model-cache.model-cache-system.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    leaf.verify_directly_issued_by(ca)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(
        ca=True, path_length=0
    )
    assert leaf.not_valid_before_utc == NOW - datetime.timedelta(minutes=5)
    assert leaf.not_valid_after_utc == NOW + datetime.timedelta(days=30)
    # The CA outlives the leaf, so renewing the leaf keeps the caBundle.
    assert ca.not_valid_after_utc == NOW + datetime.timedelta(days=60)
    assert base64.b64decode(bundle.ca_bundle) == bundle.ca_cert


def test_a_renewed_leaf_from_the_same_ca_verifies_with_the_old_ca_bundle():
    bundle = certs.generate("svc", "ns", now=NOW)
    ca = _load(bundle.ca_cert)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert_pem, key_pem = certs.sign_serving(ca, load_pem_private_key(bundle.ca_key, None), "svc", "ns", now=NOW)
    _load(cert_pem).verify_directly_issued_by(ca)
    assert cert_pem != bundle.tls_cert and key_pem != bundle.tls_key


@pytest.mark.parametrize(
    ("offset", "due"),
    [
        pytest.param(datetime.timedelta(days=0), False, id="fresh"),
        pytest.param(datetime.timedelta(days=300), False, id="65-days-left"),
        pytest.param(datetime.timedelta(days=336), True, id="29-days-left"),
        pytest.param(datetime.timedelta(days=400), True, id="expired"),
        pytest.param(datetime.timedelta(minutes=-10), True, id="not-yet-valid"),
    ],
)
def test_renewal_is_due_within_the_margin_before_expiry(offset, due):
    bundle = certs.generate("svc", "ns", now=NOW, days=365)
    assert certs.renewal_due(bundle.tls_cert, NOW + offset, before=datetime.timedelta(days=30)) is due


def test_write_bundle_writes_the_three_files_with_a_private_key_mode(tmp_path):
    bundle = certs.generate("svc", "ns", now=NOW)
    written = certs.write_bundle(bundle, tmp_path / "out")
    assert written == {
        "ca.crt": tmp_path / "out" / "ca.crt",
        "tls.crt": tmp_path / "out" / "tls.crt",
        "tls.key": tmp_path / "out" / "tls.key",
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert (tmp_path / "out" / "ca.crt").read_bytes() == bundle.ca_cert
    assert (tmp_path / "out" / "tls.crt").read_bytes() == bundle.tls_cert
    assert (tmp_path / "out" / "tls.key").read_bytes() == bundle.tls_key
    assert (tmp_path / "out" / "tls.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / "tls.crt").stat().st_mode & 0o777 == 0o644


def test_lifetime_below_one_day_is_refused():
    with pytest.raises(ValueError, match="at least 1 day, got 0"):
        certs.generate("svc", "ns", days=0)


class _HandshakeServer:
    """A bare TLS listener: accepts, completes the handshake, closes. Enough to see which certificate is served."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.ctx = ctx
        self.errors: list[Exception] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)  # wait for the client to close
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(exc)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def secret_dir(tmp_path):
    d = SecretDir(tmp_path / "tls")
    first = new_bundle()
    d.rotate(first)
    d.first = first
    return d


def test_a_rotated_secret_is_served_on_the_next_connection_without_a_restart(secret_dir):
    reloading = ReloadingContext(secret_dir.cert_file, secret_dir.key_file)
    server = _HandshakeServer(reloading.context)
    try:
        first = peer_certificate("127.0.0.1", server.port, secret_dir.first.ca_cert)
        assert first == _load(secret_dir.first.tls_cert)

        second_bundle = new_bundle()
        secret_dir.rotate(second_bundle)
        second = peer_certificate("127.0.0.1", server.port, second_bundle.ca_cert)
        assert second == _load(second_bundle.tls_cert)
        # And it stays on the new one (the swap is not a one-connection affair).
        assert peer_certificate("127.0.0.1", server.port, second_bundle.ca_cert) == second
        assert reloading.reloads == 1
    finally:
        server.close()


def test_a_half_written_rotation_keeps_serving_the_loaded_certificate(secret_dir, tmp_path):
    reloading = ReloadingContext(secret_dir.cert_file, secret_dir.key_file)
    old_context = reloading.current
    other = new_bundle()
    # A writer that replaced the certificate but not yet the key: the pair does not match.
    target = (secret_dir.root / "..data").resolve()
    (target / "tls.crt").write_bytes(other.tls_cert)
    assert reloading.reload_if_changed() is old_context
    assert reloading.reloads == 0
    server = _HandshakeServer(reloading.context)
    try:
        assert peer_certificate("127.0.0.1", server.port, secret_dir.first.ca_cert) == _load(secret_dir.first.tls_cert)
        # Once the key lands, the next handshake picks the pair up.
        (target / "tls.key").write_bytes(other.tls_key)
        assert peer_certificate("127.0.0.1", server.port, other.ca_cert) == _load(other.tls_cert)
        assert reloading.reloads == 1
    finally:
        server.close()


def test_missing_files_at_start_fail_loudly(tmp_path):
    with pytest.raises(FileNotFoundError):
        ReloadingContext(tmp_path / "nope.crt", tmp_path / "nope.key")
