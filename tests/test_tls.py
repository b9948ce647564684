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

NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)


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


# --- self-managed certificates against the fake apiserver ---------------------------------------------------------

import threading as _threading  # noqa: E402
import time as _time  # noqa: E402

from tests.support.fake_apiserver import FakeApiServer  # noqa: E402
from webhook import inventory as inv  # noqa: E402

NS, SECRET, SVC, CONFIG = "model-cache-system", "model-cache-tls", "model-cache", "model-cache"
SECRET_PATH = f"/api/v1/namespaces/{NS}/secrets/{SECRET}"
CONFIG_PATHS = {
    kind: f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/{CONFIG}" for kind in ("mutating", "validating")
}
CFG = certs.SelfManaged(namespace=NS, secret=SECRET, service=SVC, webhook_configuration=CONFIG)


def _webhook_configuration(kind: str) -> dict:
    names = ["pods.model.cache"] if kind == "mutating" else ["workloads.model.cache", "pods.model.cache"]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": f"{kind.capitalize()}WebhookConfiguration",
        "metadata": {"name": CONFIG},
        "webhooks": [
            {"name": n, "clientConfig": {"service": {"name": SVC, "namespace": NS, "path": f"/{kind[:-3]}e", "port": 443}}, "sideEffects": "None",
             "admissionReviewVersions": ["v1"], "aFieldFromANewerKubernetes": {"kept": True}}
            for n in names
        ],
    }


class _Clock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest.fixture
def cluster(tmp_path):
    fake = FakeApiServer()
    for kind, path in CONFIG_PATHS.items():
        fake.store_put(path, _webhook_configuration(kind))
    objects = inv.ClusterObjects(inv.api_client(fake.write_kubeconfig(tmp_path / "kubeconfig")))
    fake.objects = objects
    yield fake
    fake.stop()


def _stored_bundle(fake) -> certs.CertBundle:
    bundle = certs.bundle_from_secret(fake.store_get(SECRET_PATH))
    assert bundle is not None
    return bundle


def _ca_bundles(fake) -> list[str]:
    return [w["clientConfig"].get("caBundle") for p in CONFIG_PATHS.values() for w in fake.store_get(p)["webhooks"]]


def test_first_replica_creates_the_secret_and_publishes_the_ca_in_both_configurations(cluster):
    manager = certs.CertManager(cluster.objects, CFG, clock=_Clock(NOW))
    bundle = manager.reconcile()

    secret = cluster.store_get(SECRET_PATH)
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["name"] == SECRET and secret["metadata"]["namespace"] == NS
    assert sorted(secret["data"]) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    assert _stored_bundle(cluster) == bundle
    _load(bundle.tls_cert).verify_directly_issued_by(_load(bundle.ca_cert))
    assert _ca_bundles(cluster) == [bundle.ca_bundle] * 3
    # Nothing else in the configurations changed.
    for kind, path in CONFIG_PATHS.items():
        stored = cluster.store_get(path)
        for w in stored["webhooks"]:
            del w["clientConfig"]["caBundle"]
        del stored["metadata"]["resourceVersion"]
        assert stored == _webhook_configuration(kind)
    assert manager.ready_reason(bundle.tls_cert) is None
    assert manager.ready_reason(new_bundle().tls_cert) == (
        "the served certificate is not signed by the published caBundle yet (kubelet has not projected the Secret)"
    )


def test_a_second_replica_adopts_the_existing_secret_without_writing(cluster):
    first = certs.CertManager(cluster.objects, CFG, clock=_Clock(NOW)).reconcile()
    writes = list(cluster.writes)
    second = certs.CertManager(cluster.objects, CFG, clock=_Clock(NOW + datetime.timedelta(days=1))).reconcile()
    assert second == first
    assert cluster.writes == writes


def test_two_replicas_racing_to_create_agree_on_one_ca(cluster):
    first = certs.CertManager(cluster.objects, CFG, clock=_Clock(NOW)).reconcile()
    # The second replica read before the first one's create landed: it sees no Secret, its create conflicts.
    cluster.fail_next_store("GET", SECRET_PATH, 404)
    second = certs.CertManager(cluster.objects, CFG, clock=_Clock(NOW)).reconcile()
    assert second == first == _stored_bundle(cluster)
    assert [w for w in cluster.writes if w[1].startswith("/api/")] == [
        ("POST", f"/api/v1/namespaces/{NS}/secrets"),
        ("POST", f"/api/v1/namespaces/{NS}/secrets"),  # the loser's, answered 409
    ]
    assert _ca_bundles(cluster) == [first.ca_bundle] * 3


def test_a_leaf_near_expiry_is_re_signed_by_the_same_ca_and_the_ca_bundle_stays(cluster):
    clock = _Clock(NOW)
    manager = certs.CertManager(cluster.objects, CFG, clock=clock)
    first = manager.reconcile()
    writes = len(cluster.writes)
    clock.now = NOW + datetime.timedelta(days=340)  # 25 days left on the 365-day leaf
    renewed = manager.reconcile()

    assert renewed.ca_cert == first.ca_cert and renewed.ca_key == first.ca_key
    assert renewed.tls_cert != first.tls_cert and renewed.tls_key != first.tls_key
    _load(renewed.tls_cert).verify_directly_issued_by(_load(first.ca_cert))
    assert _stored_bundle(cluster) == renewed
    assert cluster.writes[writes:] == [("PUT", SECRET_PATH)]  # no caBundle change needed
    assert manager.ready_reason(first.tls_cert) is None  # replicas still on the old leaf stay trusted


def test_a_ca_near_expiry_is_replaced_and_both_cas_are_trusted_during_the_switch(cluster):
    clock = _Clock(NOW)
    manager = certs.CertManager(cluster.objects, CFG, clock=clock)
    first = manager.reconcile()
    clock.now = NOW + datetime.timedelta(days=710)  # the CA (730 days) is within 30 days of expiry
    rotated = manager.reconcile()

    cas = certs.split_pem(rotated.ca_cert)
    assert len(cas) == 2 and cas[1] == first.ca_cert
    assert cas[0] != first.ca_cert
    _load(rotated.tls_cert).verify_directly_issued_by(_load(cas[0]))
    assert _ca_bundles(cluster) == [rotated.ca_bundle] * 3
    assert manager.ready_reason(rotated.tls_cert) is None
    assert manager.ready_reason(first.tls_cert) is None


def test_a_write_conflict_is_resolved_by_reading_again(cluster):
    clock = _Clock(NOW)
    manager = certs.CertManager(cluster.objects, CFG, clock=clock)
    manager.reconcile()
    clock.now = NOW + datetime.timedelta(days=340)
    cluster.fail_next_store("PUT", SECRET_PATH, 409)
    renewed = manager.reconcile()
    assert _stored_bundle(cluster) == renewed
    assert [w for w in cluster.writes if w[0] == "PUT" and w[1] == SECRET_PATH] == [("PUT", SECRET_PATH)]


def test_a_secret_for_another_service_is_replaced(cluster):
    cluster.store_put(SECRET_PATH, certs.secret_body(certs.generate("other", NS, now=NOW), CFG, None))
    bundle = certs.CertManager(cluster.objects, CFG, clock=_Clock(NOW)).reconcile()
    san = _load(bundle.tls_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == certs.service_dns_names(SVC, NS)


def test_a_missing_webhook_configuration_keeps_the_replica_unready(tmp_path):
    fake = FakeApiServer()
    try:
        objects = inv.ClusterObjects(inv.api_client(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        manager = certs.CertManager(objects, CFG, clock=_Clock(NOW))
        bundle = manager.reconcile()
        assert manager.ready_reason(bundle.tls_cert) == "mutating webhook configuration 'model-cache' not found"
    finally:
        fake.stop()


def test_serve_start_up_waits_for_kubelet_to_project_the_secret(cluster, tmp_path):
    from webhook.cli import _bootstrap_certs

    mounted = SecretDir(tmp_path / "mounted")  # the optional Secret volume: empty until kubelet projects it
    manager = certs.CertManager(cluster.objects, CFG)
    result: list = []
    thread = _threading.Thread(
        target=lambda: result.append(_bootstrap_certs(manager, mounted.cert_file, mounted.key_file, _time.monotonic() + 120)),
        daemon=True,
    )
    thread.start()
    for _ in range(600):
        if cluster.store_get(SECRET_PATH) is not None:
            break
        _time.sleep(0.05)
    assert thread.is_alive()  # the Secret exists but nothing is mounted yet
    mounted.rotate(_stored_bundle(cluster))  # kubelet's projection
    thread.join(60)
    assert result == [None]
    reloading = ReloadingContext(mounted.cert_file, mounted.key_file)
    assert manager.ready_reason(reloading.cert_pem) is None
