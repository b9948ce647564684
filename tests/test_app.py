"""Transport tests: the real app under real uvicorn, over real TLS on 127.0.0.1, called with httpx verifying the CA.

The decisions themselves are the core's (tested in its own tests); here the question is whether the transport
returns exactly what the core answers, maps errors to the right status, reports readiness and metrics, speaks only
TLS 1.2+, and picks up a rotated certificate without a restart.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import warnings

import httpx
import jsonpatch
import pytest
from cryptography import x509

from tests.support.tls import SecretDir, client_context, new_bundle, peer_certificate
from webhook import admission
from webhook import annotations as ann
from webhook.app import create_app
from webhook.config import load_settings
from webhook.errors import MalformedReview
from webhook.inventory import Inventory
from webhook.server import JsonFormatter, bind, make_server
from webhook.snapshot import EMPTY, snapshot_from
from webhook.tls import ReloadingContext

SETTINGS = load_settings(loader_image="registry.example.com/model-cache/loader:0.1.0")

NODES = [
    {
        "metadata": {"name": "crio-1", "labels": {"pool": "crio"}},
        "status": {"nodeInfo": {"containerRuntimeVersion": "cri-o://1.34.1", "kubeletVersion": "v1.35.0"}},
    },
    {
        "metadata": {"name": "containerd-1", "labels": {"pool": "containerd"}},
        "status": {"nodeInfo": {"containerRuntimeVersion": "containerd://2.0.4", "kubeletVersion": "v1.34.2"}},
    },
]
NAMESPACES = [{"metadata": {"name": "models", "labels": {"model.cache/enabled": "true"}}}]
SYNCED = snapshot_from(NODES, NAMESPACES, synced=True)


def pod(pool: str | None = None, ref: str = "registry.example.com/models/phi3:v1") -> dict:
    spec: dict = {"containers": [{"name": "server", "image": "registry.example.com/app/server:1"}]}
    if pool:
        spec["nodeSelector"] = {"pool": pool}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-7d9f-", "namespace": "models", "annotations": {ann.REF: ref}},
        "spec": spec,
    }


def review(obj, kind: str = "Pod", uid: str = "0b6e2e8a-1f7c-4d8e-9a55-3c1d2b4f6a70", operation: str = "CREATE") -> dict:
    group, _, version = ("apps/v1" if kind != "Pod" else "v1").rpartition("/")
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": kind.lower() + "s"},
            "namespace": "models",
            "operation": operation,
            "object": obj,
        },
    }


class Served:
    """The app on uvicorn in a thread, on a random port, with a Secret-like certificate directory."""

    def __init__(self, inventory: Inventory, secret: SecretDir, readiness=(), settings=SETTINGS, probe=False,
                 **server_kw) -> None:
        self.inventory = inventory
        self.secret = secret
        self.tls = ReloadingContext(secret.cert_file, secret.key_file)
        self.app = create_app(inventory, settings, readiness=readiness)
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        sockets = [self.sock]
        self.probe_port = None
        if probe:  # a probe listener too, as `serve --probe-port` makes
            sockets.append(bind("127.0.0.1", 0))
            self.probe_port = sockets[1].getsockname()[1]
        self.server = make_server(self.app, self.tls, host="127.0.0.1", port=self.port, probe_port=self.probe_port,
                                  **server_kw)
        self.sockets = sockets
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": sockets}, daemon=True)
        self.thread.start()
        started = threading.Event()
        # uvicorn flips `started` once it listens; poll it without timing anything.
        for _ in range(600):
            if self.server.started:
                started.set()
                break
            threading.Event().wait(0.05)
        assert started.is_set(), "uvicorn did not start"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self, ca_pem: bytes | None = None, port: int | None = None) -> httpx.Client:
        return httpx.Client(base_url=f"https://127.0.0.1:{port or self.port}",
                            verify=client_context(ca_pem or self.secret.ca_file.read_bytes()))

    def raw(self, port: int | None = None) -> ssl.SSLSocket:
        """A TLS connection of our own, for requests httpx would not send (stalled, endless, oversized)."""
        sock = socket.create_connection(("127.0.0.1", port or self.port))
        return client_context(self.secret.ca_file.read_bytes()).wrap_socket(sock, server_hostname="127.0.0.1")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def secret(tmp_path) -> SecretDir:
    d = SecretDir(tmp_path / "tls")
    d.rotate(new_bundle())
    return d


@pytest.fixture
def served(secret):
    running = []

    def start(snapshot=SYNCED, **kw) -> Served:
        s = Served(Inventory(snapshot), secret, **kw)
        running.append(s)
        return s

    yield start
    for s in running:
        s.stop()


def decoded_patch(answer: dict) -> list:
    return json.loads(base64.b64decode(answer["response"]["patch"]))


# --- admission over TLS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["crio", "containerd", None], ids=["crio-pool", "containerd-pool", "mixed"])
def test_a_pod_review_gets_exactly_the_core_answer_and_its_patch_applies(served, pool):
    server = served()
    body = review(pod(pool))
    with server.client() as client:
        resp = client.post("/mutate", json=body)

    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    answer = resp.json()
    assert answer == admission.mutate_review(copy.deepcopy(body), SYNCED, SETTINGS)
    assert answer["response"]["uid"] == body["request"]["uid"]
    assert answer["response"]["allowed"] is True
    assert answer["response"]["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(body["request"]["object"], decoded_patch(answer))
    expected_mode = "image-volume" if pool == "crio" else "init-container"
    assert patched["metadata"]["annotations"][ann.STATUS].split(":")[0] == expected_mode


def test_concurrent_replicas_are_each_answered_with_their_own_uid_and_decided_once(served):
    """32 replicas in flight at once, as in a scale-out: each answer is the core's answer for that very review (its
    uid, the same patch), and the snapshot decided the template once."""
    import concurrent.futures

    snapshot = snapshot_from(NODES, NAMESPACES, synced=True)
    server = served(snapshot)
    bodies = []
    for n in range(32):
        replica = pod("containerd")
        replica["metadata"]["managedFields"] = [{"manager": "kube-controller-manager", "operation": "Update",
                                                 "time": f"2026-11-23T10:00:{n:02d}Z", "fieldsType": "FieldsV1"}]
        bodies.append(review(replica, uid=f"uid-{n:02d}"))
    with server.client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: client.post("/mutate", json=b).json(), bodies))
    for body, answer in zip(bodies, answers, strict=True):
        assert answer == admission.mutate_review(copy.deepcopy(body), snapshot_from(NODES, NAMESPACES), SETTINGS)
        assert answer["response"]["uid"] == body["request"]["uid"]
    assert len({a["response"]["patch"] for a in answers}) == 1
    assert len(snapshot.answers) == 1


def test_a_workload_review_on_validate_is_answered_without_a_patch(served):
    server = served()
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "models"},
        "spec": {"template": {"metadata": pod()["metadata"] | {"generateName": None}, "spec": pod()["spec"]}},
    }
    deployment["spec"]["template"]["metadata"] = {"annotations": {ann.REF: "registry.example.com/models/phi3:v1"}}
    body = review(deployment, kind="Deployment")
    with server.client() as client:
        resp = client.post("/validate", json=body)
    assert resp.status_code == 200
    assert resp.json() == admission.validate_review(copy.deepcopy(body), SYNCED, SETTINGS)
    assert resp.json()["response"]["allowed"] is True and "patch" not in resp.json()["response"]


def test_a_denial_is_a_200_with_allowed_false(served):
    server = served()
    body = review(pod(ref="not a reference"))
    with server.client() as client:
        resp = client.post("/mutate", json=body)
    assert resp.status_code == 200
    assert resp.json() == admission.mutate_review(copy.deepcopy(body), SYNCED, SETTINGS)
    assert resp.json()["response"]["allowed"] is False
    assert resp.json()["response"]["status"]["code"] == 403


def test_noop_allows_without_touching_the_object(served):
    server = served()
    with server.client() as client:
        resp = client.post("/noop", json=review(pod()))
    assert resp.status_code == 200
    assert resp.json() == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": "0b6e2e8a-1f7c-4d8e-9a55-3c1d2b4f6a70", "allowed": True},
    }


def test_noop_echoes_only_a_string_uid(served):
    server = served()
    deep = b"[" * 300 + b"]" * 300  # deeper than orjson writes: echoed, it would fail the answer
    with server.client() as client:
        resp = client.post("/noop", content=b'{"apiVersion": ' + deep + b', "request": {"uid": ' + deep + b"}}")
    assert resp.status_code == 200
    assert resp.json() == {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {"uid": "", "allowed": True}}


@pytest.mark.parametrize(
    ("endpoint", "content", "message"),
    [
        pytest.param(
            "/mutate",
            b'{"apiVersion": "admission.k8s.io/v1", "kind": ',
            "malformed AdmissionReview: request body is not JSON: unexpected end of data: line 1 column 47 (char 46)",
            id="truncated-json",
        ),
        pytest.param(
            "/mutate",
            b'{"a": "\xff"}',
            "malformed AdmissionReview: request body is not JSON: it is not valid UTF-8",
            id="not-utf8",
        ),
        pytest.param("/validate", b"[1, 2]", "malformed AdmissionReview: request body must be an AdmissionReview object, got list", id="json-array"),
        pytest.param("/mutate", b"", "malformed AdmissionReview: request body is not JSON: Input is a zero-length, empty document: line 1 column 1 (char 0)", id="empty"),
    ],
)
def test_bodies_that_are_not_json_objects_are_400(served, endpoint, content, message):
    server = served()
    with server.client() as client:
        resp = client.post(endpoint, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json() == {"message": message}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, id="no-request"),
        pytest.param({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": review(pod())["request"]}, id="v1beta1"),
        pytest.param(review({"metadata": {}, "spec": {"containers": "server"}}), id="containers-not-a-list"),
        pytest.param(review(None), id="no-object"),
    ],
)
@pytest.mark.parametrize("endpoint", ["/mutate", "/validate"])
def test_malformed_reviews_are_400_with_the_core_message(served, body, endpoint):
    server = served()
    core = admission.mutate_review if endpoint == "/mutate" else admission.validate_review
    with pytest.raises(MalformedReview) as info:
        core(copy.deepcopy(body), SYNCED, SETTINGS)
    expected = {"message": f"malformed AdmissionReview: {info.value}"}
    with server.client() as client:
        resp = client.post(endpoint, json=body)
    assert resp.status_code == 400
    assert resp.json() == expected


def test_an_unexpected_error_is_logged_with_its_traceback_and_answered_500(secret, monkeypatch, caplog):
    def broken(body, snapshot, settings):
        raise RuntimeError("a bug in the core")

    monkeypatch.setattr(admission, "mutate_review", broken)
    server = Served(Inventory(SYNCED), secret)
    try:
        with caplog.at_level(logging.ERROR, logger="webhook.app"), server.client() as client:
            resp = client.post("/mutate", json=review(pod()))
    finally:
        server.stop()
    assert resp.status_code == 500
    assert resp.json() == {"message": "internal error; see the webhook's log"}
    [record] = [r for r in caplog.records if r.name == "webhook.app"]
    assert record.getMessage() == "unexpected error answering /mutate"
    assert record.exc_info[0] is RuntimeError
    line = json.loads(JsonFormatter().format(record))
    assert sorted(line) == ["error", "level", "logger", "message", "time"]
    assert line["level"] == "error" and line["logger"] == "webhook.app"
    assert line["error"].startswith("Traceback (most recent call last):")
    assert line["error"].endswith("RuntimeError: a bug in the core")


# --- health, readiness, metrics ---------------------------------------------------------------------------------


def test_readyz_is_503_until_the_inventory_has_synced(served):
    server = served(EMPTY)
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        before = client.get("/readyz")
        server.inventory.publish(SYNCED)
        after = client.get("/readyz")
    assert before.status_code == 503
    assert before.json() == {
        "status": "not ready",
        "reason": "the node and namespace inventory has not completed its first list",
    }
    assert after.status_code == 200
    assert after.json() == {"status": "ready", "nodes": 2, "namespaces": 1}


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_count_reviews_by_kind_mode_and_outcome_and_show_the_inventory(served):
    server = served()
    with server.client() as client:
        client.post("/mutate", json=review(pod("crio")))
        client.post("/mutate", json=review(pod("containerd")))
        client.post("/mutate", json=review(pod("containerd")))
        client.post("/mutate", json=review(pod(ref="not a reference")))
        client.post("/mutate", content=b"{")
        client.post("/noop", json=review(pod()))
        resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples = _samples(resp.text)
    reviews = {k: v for k, v in samples.items() if k.startswith("model_cache_reviews_total")}
    assert reviews == {
        'model_cache_reviews_total{kind="Pod",mode="image-volume",outcome="mutated"}': 1.0,
        'model_cache_reviews_total{kind="Pod",mode="init-container",outcome="mutated"}': 2.0,
        'model_cache_reviews_total{kind="Pod",mode="none",outcome="denied"}': 1.0,
        'model_cache_reviews_total{kind="unknown",mode="none",outcome="malformed"}': 1.0,
    }
    assert samples['model_cache_review_duration_seconds_count{endpoint="mutate"}'] == 4.0
    assert samples['model_cache_review_duration_seconds_count{endpoint="noop"}'] == 1.0
    assert {k: v for k, v in samples.items() if k.startswith("model_cache_inventory")} == {
        'model_cache_inventory_nodes{runtime="containerd"}': 1.0,
        'model_cache_inventory_nodes{runtime="cri-o"}': 1.0,
        "model_cache_inventory_namespaces": 1.0,
        "model_cache_inventory_synced": 1.0,
    }


def test_metric_labels_come_from_closed_sets_whatever_kind_the_client_sends(served):
    # request.kind.kind is the client's choice: 40 distinct large kinds must not become 40 series.
    server = served()
    with server.client() as client:
        for i in range(40):
            body = review(pod(), kind=f"{i:04d}" + "K" * 256 * 1024)
            assert client.post("/mutate", json=body).status_code == 200
        client.post("/mutate", json=review(pod("crio"), kind="StatefulSet"))
        resp = client.get("/metrics")
    reviews = {k: v for k, v in _samples(resp.text).items() if k.startswith("model_cache_reviews_total")}
    assert reviews == {
        'model_cache_reviews_total{kind="other",mode="none",outcome="allowed"}': 40.0,
        'model_cache_reviews_total{kind="StatefulSet",mode="none",outcome="allowed"}': 1.0,
    }
    assert len(resp.content) < 64 * 1024


# --- TLS ----------------------------------------------------------------------------------------------------------


def _handshake(port: int, ca_pem: bytes, version: ssl.TLSVersion) -> str:
    ctx = client_context(ca_pem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # offering TLS 1.1 on purpose
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = version
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # let the client offer old protocols, so the refusal is the server's
    with (socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
          ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
        return tls.version()


def _permissive_server(secret: SecretDir) -> tuple[socket.socket, threading.Thread]:
    """A stdlib TLS listener that accepts TLS 1.0+, with the same certificate: the control that shows this
    client really can complete a TLS 1.1 handshake on this machine."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_cert_chain(secret.cert_file, secret.key_file)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    return listener, thread


def test_tls_1_2_and_1_3_are_served_and_1_1_is_refused_by_the_server(served, secret):
    server = served()
    ca = secret.ca_file.read_bytes()
    assert _handshake(server.port, ca, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert _handshake(server.port, ca, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"

    listener, thread = _permissive_server(secret)
    try:
        assert _handshake(listener.getsockname()[1], ca, ssl.TLSVersion.TLSv1_1) == "TLSv1.1"
    finally:
        thread.join(10)
        listener.close()
    with pytest.raises(ssl.SSLError):
        _handshake(server.port, ca, ssl.TLSVersion.TLSv1_1)
    # The refusal did not hurt the server.
    assert _handshake(server.port, ca, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_a_rotated_certificate_is_served_on_new_connections_without_a_restart(served, secret):
    server = served()
    first_ca = secret.ca_file.read_bytes()
    first_cert = x509.load_pem_x509_certificate((secret.root / "tls.crt").read_bytes())
    with server.client(first_ca) as client:
        assert client.post("/mutate", json=review(pod("crio"))).status_code == 200
    assert peer_certificate("127.0.0.1", server.port, first_ca) == first_cert

    rotated = new_bundle()
    secret.rotate(rotated)  # kubelet's symlink swap

    assert peer_certificate("127.0.0.1", server.port, rotated.ca_cert) == x509.load_pem_x509_certificate(rotated.tls_cert)
    with server.client(rotated.ca_cert) as client:
        resp = client.post("/mutate", json=review(pod("crio")))
    assert resp.status_code == 200 and resp.json()["response"]["allowed"] is True
    # The old CA no longer verifies what is served.
    with pytest.raises(httpx.ConnectError), server.client(first_ca) as client:
        client.get("/healthz")
    assert server.tls.reloads == 1
    assert server.thread.is_alive()


# --- anything a client can send: never a 5xx ----------------------------------------------------------------------

from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hyp_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _containers(inner):
    # Named, not a lambda: see tests/test_patch.py.
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20), _containers, max_leaves=25
)


def _mangled_review(draw_value, path_choice: int) -> dict:
    body = review(pod("crio"))
    targets = [
        (body, "request"),
        (body["request"], "object"),
        (body["request"], "uid"),
        (body["request"], "kind"),
        (body["request"]["object"], "metadata"),
        (body["request"]["object"], "spec"),
        (body["request"]["object"]["metadata"], "annotations"),
        (body["request"]["object"]["spec"], "containers"),
        (body["request"]["object"]["spec"]["containers"][0], "name"),
        (body["request"]["object"]["metadata"]["annotations"], ann.REF),
        (body["request"]["object"]["metadata"]["annotations"], ann.MODE),
        (body["request"]["object"]["metadata"]["annotations"], ann.CONTAINERS),
    ]
    parent, key = targets[path_choice % len(targets)]
    parent[key] = draw_value
    return body


def test_no_client_input_gets_a_5xx(served):
    server = served()
    client = server.client()

    @hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        kind=st.sampled_from(["bytes", "json", "review"]),
        endpoint=st.sampled_from(["/mutate", "/validate"]),
        raw=st.binary(max_size=200),
        value=_json,
        where=st.integers(min_value=0, max_value=11),
    )
    def check(kind, endpoint, raw, value, where):
        if kind == "bytes":
            content = raw
        elif kind == "json":
            content = json.dumps(value).encode()
        else:
            content = json.dumps(_mangled_review(value, where)).encode()
        resp = client.post(endpoint, content=content, headers={"content-type": "application/json"})
        assert resp.status_code in (200, 400), resp.text
        if resp.status_code == 200:
            answer = resp.json()
            assert answer["kind"] == "AdmissionReview" and isinstance(answer["response"]["allowed"], bool)
        else:
            assert resp.json()["message"].startswith("malformed AdmissionReview: ")

    try:
        check()
    finally:
        client.close()


def test_deeply_nested_json_is_a_400(served):
    server = served()
    with server.client() as client:
        resp = client.post("/mutate", content=b"[" * 100_000 + b"]" * 100_000)
    assert resp.status_code == 400
    assert resp.json() == {"message": "malformed AdmissionReview: request body is nested too deeply to be an AdmissionReview"}


def _head(length: int | None = None) -> bytes:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return f"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n{framing}\r\n\r\n".encode()


def _response(conn: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """(status line, everything after it) read until the server closes the connection."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    status, _, rest = data.partition(b"\r\n")
    return status, rest


def test_an_oversized_body_is_refused_with_413(served):
    from webhook.app import MAX_BODY_BYTES

    server = served()
    with server.client() as client:
        resp = client.post("/mutate", content=b" " * (MAX_BODY_BYTES + 1))
        assert client.get("/healthz").status_code == 200
    assert resp.status_code == 413
    assert resp.json() == {"message": f"malformed AdmissionReview: the body is larger than {MAX_BODY_BYTES} bytes"}


def test_a_body_denser_in_objects_than_any_review_is_refused_before_it_is_parsed(served):
    from webhook.app import MAX_CONTAINERS

    server = served()
    with server.client() as client:
        resp = client.post("/mutate", content=b"[" + b"{}," * MAX_CONTAINERS + b"{}]")
    assert resp.status_code == 400
    assert resp.json() == {
        "message": f"malformed AdmissionReview: the body holds {MAX_CONTAINERS + 2} JSON objects and arrays; at most"
        f" {MAX_CONTAINERS} are accepted (one per 8 bytes of the body cap), far more than the API server's JSON ever holds"
    }


def test_a_declared_oversized_body_is_refused_before_a_byte_of_it_is_sent(served):
    from webhook.app import MAX_BODY_BYTES

    server = served()
    with server.raw() as conn:
        conn.sendall(_head(MAX_BODY_BYTES + 1))  # and no body: the answer cannot wait for it
        status, rest = _response(conn)  # the connection is closed after the answer
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert rest.endswith(f'{{"message":"malformed AdmissionReview: the body is larger than {MAX_BODY_BYTES} bytes"}}'.encode())


def test_a_chunked_body_is_refused_at_the_first_byte_over_the_cap(served):
    from webhook.app import MAX_BODY_BYTES

    server = served()
    piece = b" " * 65536
    with server.raw() as conn:
        conn.sendall(_head())
        left = MAX_BODY_BYTES + 1
        while left:  # no terminating chunk: only counting, not the end of the body, can answer this
            data = piece[:left]
            conn.sendall(b"%x\r\n%b\r\n" % (len(data), data))
            left -= len(data)
        status, rest = _response(conn)
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert b"connection: close" in rest


def test_a_stalled_body_is_cut_at_the_deadline_while_other_reviews_are_answered(served):
    settings = load_settings(loader_image=SETTINGS.loader_image, review_read_seconds=0.5)
    server = served(settings=settings)
    body = review(pod("crio"))
    with server.raw() as stalled, server.client() as client:
        stalled.sendall(_head(1_000_000) + b'{"apiVersion": "admission.k8s.io/v1", ')  # and nothing more
        answered = client.post("/mutate", json=body)
        status, rest = _response(stalled)
    assert answered.status_code == 200
    assert answered.json() == admission.mutate_review(copy.deepcopy(body), SYNCED, settings)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert rest.endswith(b'{"message":"malformed AdmissionReview: the body did not arrive within 0.5 s"}')


def test_a_header_line_that_never_ends_is_refused_at_the_head_limit(served):
    server = served(max_head=1024)
    with server.raw() as conn, server.client() as client:
        conn.sendall(b"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\nx-endless: " + b"a" * 2048)  # one read
        status, rest = _response(conn)
        assert client.get("/healthz").status_code == 200
    assert (status, rest) == (b"HTTP/1.1 431 Request Header Fields Too Large", b"content-length: 0\r\nconnection: close\r\n\r\n")


def test_a_trickled_head_is_cut_at_its_deadline(served):
    server = served(head_seconds=0.3)
    with server.raw() as conn, server.client() as client:
        conn.sendall(b"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: a")  # and nothing more
        assert _response(conn) == (b"", b"")  # closed without an answer
        assert client.get("/healthz").status_code == 200


def test_a_denial_is_logged_with_the_object_and_the_message(served, caplog):
    server = served()
    body = review(pod(ref="not a reference"))
    with caplog.at_level(logging.INFO, logger="webhook.app"), server.client() as client:
        answer = client.post("/mutate", json=body).json()
    [record] = [r for r in caplog.records if r.name == "webhook.app"]
    assert record.getMessage() == (
        f"denied Pod models/web-7d9f-* on /mutate (uid {body['request']['uid']}): {answer['response']['status']['message']}"
    )


def test_readiness_checks_add_their_reasons(secret):
    state = {"reason": "the served certificate is not signed by the published caBundle yet"}
    inventory = Inventory(EMPTY)
    server = Served(inventory, secret, readiness=[lambda: state["reason"]])
    try:
        with server.client() as client:
            both = client.get("/readyz")
            inventory.publish(SYNCED)
            cert_only = client.get("/readyz")
            state["reason"] = None
            ready = client.get("/readyz")
    finally:
        server.stop()
    assert (both.status_code, both.json()) == (
        503,
        {
            "status": "not ready",
            "reason": "the node and namespace inventory has not completed its first list; "
            "the served certificate is not signed by the published caBundle yet",
        },
    )
    assert (cert_only.status_code, cert_only.json()) == (
        503,
        {"status": "not ready", "reason": "the served certificate is not signed by the published caBundle yet"},
    )
    assert (ready.status_code, ready.json()) == (200, {"status": "ready", "nodes": 2, "namespaces": 1})


# --- connections: a bounded number, idle ones make room, probes on a listener of their own ----------------------


def _exchange(conn: ssl.SSLSocket, path: str = "/healthz") -> bytes:
    """One keep-alive GET on ``conn``; its status line (the connection stays open)."""
    conn.sendall(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    [length] = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    while len(body) < length:
        body += conn.recv(65536)
    return head.split(b"\r\n")[0]


def _closed(conn: ssl.SSLSocket) -> bool:
    """Whether the server closed ``conn`` without sending anything (blocks until it does one or the other)."""
    try:
        return conn.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def _slots(server: Served):
    protocol = server.server.config.http
    return protocol.slots, protocol.probe_slots


def test_at_the_connection_limit_the_longest_idle_connection_makes_room(served):
    server = served(max_connections=4)
    conns = [server.raw() for _ in range(4)]
    try:
        for conn in conns:  # each answered once, then idle in this order
            assert _exchange(conn) == b"HTTP/1.1 200 OK"
        body = review(pod("crio"))
        with server.client() as client:  # a fifth: the first idle one is closed for it
            answered = client.post("/mutate", json=body)
        assert answered.json() == admission.mutate_review(copy.deepcopy(body), SYNCED, SETTINGS)
        assert _closed(conns[0])
        assert [_exchange(conn) for conn in conns[1:]] == [b"HTTP/1.1 200 OK"] * 3
    finally:
        for conn in conns:
            conn.close()
    slots, _ = _slots(server)
    assert (slots.evicted, slots.refused) == (1, 0)


def test_connections_trickling_a_head_make_room_and_cannot_lock_others_out(served):
    # A slowloris: every slot holds a connection that sent part of a head. A new one takes the oldest's slot.
    server = served(max_connections=3)
    heads = [server.raw() for _ in range(3)]
    try:
        for conn in heads:
            conn.sendall(b"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        body = review(pod("crio"))
        with server.client() as client:
            answered = client.post("/mutate", json=body)
        assert answered.json() == admission.mutate_review(copy.deepcopy(body), SYNCED, SETTINGS)
        assert _closed(heads[0])
    finally:
        for conn in heads:
            conn.close()
    slots, _ = _slots(server)
    assert (slots.evicted, slots.refused) == (1, 0)


def test_when_every_connection_is_busy_a_new_one_is_refused_and_probes_are_still_answered(served):
    server = served(max_connections=3, probe=True)
    busy = [server.raw() for _ in range(3)]
    try:
        for conn in busy:  # each past its head, in the middle of a body: not idle, not evictable
            conn.sendall(_head(1_000) + b'{"apiVersion": ')
        with server.raw() as refused:
            assert _closed(refused)
        with server.client(port=server.probe_port) as probes:
            assert probes.get("/readyz").json() == {"status": "ready", "nodes": 2, "namespaces": 1}
            assert probes.get("/healthz").status_code == 200
            assert probes.get("/metrics").status_code == 200
    finally:
        for conn in busy:
            conn.close()
    slots, probe_slots = _slots(server)
    assert (slots.evicted, slots.refused, probe_slots.refused) == (0, 1, 0)
    # Once the busy ones are gone their slots are free again (polled: their close reaches the server in its time).
    for _ in range(600):
        if slots.open == 0:
            break
        threading.Event().wait(0.05)
    with server.client() as client:
        assert client.get("/healthz").status_code == 200


def test_the_probe_listener_serves_only_probes_and_metrics(served):
    server = served(probe=True)
    with server.client(port=server.probe_port) as probes:
        assert probes.post("/mutate", json=review(pod("crio"))).status_code == 404
        assert probes.post("/validate", json=review(pod("crio"))).status_code == 404
        assert probes.get("/docs").status_code == 404
        assert [probes.get(p).status_code for p in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]
    with server.client() as client:  # the admission listener serves everything, probes included
        assert client.post("/mutate", json=review(pod("crio"))).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_a_silent_connection_is_closed_at_the_head_deadline(served):
    server = served(head_seconds=0.3)
    with server.raw() as conn:  # connected, TLS up, and not one byte of a request
        assert _response(conn) == (b"", b"")
    slots, _ = _slots(server)
    for _ in range(600):
        if slots.open == 0:
            break
        threading.Event().wait(0.05)
    assert slots.open == 0


def test_the_file_descriptor_limit_is_lowered_never_raised():
    code = (
        "import resource; from webhook.server import limit_open_files;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (2048, 8192));"
        "print(limit_open_files(4096), limit_open_files(1000), limit_open_files(5000),"
        " resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2048", "1000", "1000", "(1000,", "8192)"]


def test_a_client_that_leaves_mid_body_is_counted_not_logged_as_a_server_error(served, caplog):
    server = served()
    malformed = 'model_cache_reviews_total{kind="unknown",mode="none",outcome="malformed"}'

    def count(client: httpx.Client) -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(malformed):
                return float(line.split()[-1])
        return 0.0

    with caplog.at_level(logging.INFO), server.client() as client:
        before = count(client)
        with server.raw() as conn:
            conn.sendall(_head(100_000) + b'{"apiVersion": "admission.k8s.io/v1", ')  # and it leaves
        for _ in range(600):  # polled until the server has seen the disconnect; not timed
            if count(client) == before + 1:
                break
            threading.Event().wait(0.05)
        assert count(client) == before + 1
        assert client.get("/healthz").status_code == 200
    assert not [r for r in caplog.records if r.exc_info or "Exception in ASGI application" in r.getMessage()]


def test_repeated_refusals_are_logged_once_per_interval_with_a_count():
    from webhook.app import Throttled

    every = Throttled(3600)
    assert [every.due(), every.due(), every.due()] == [0, None, None]
    every.next = 0.0  # the interval has passed
    assert every.due() == 2
    assert every.due() is None
