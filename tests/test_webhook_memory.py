"""Peak memory of a real webhook process (``model-cache-webhook serve``, TLS on 127.0.0.1) under the attacks a
client can mount on its transport: bodies over the cap, uploads stalled short of it, request heads that never end,
and the worst body under the cap. The peak is the process's VmHWM (/proc/<pid>/status), read after the attack.

The bound, PEAK_MB, is half the Deployment's 512Mi limit (537 MB). The largest cost is a body under the cap that
is parsed: short strings cost ~12 times their text, and objects ~30 times (hence MAX_CONTAINERS, checked before
parsing). Outcomes are asserted, never durations.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.tls import client_context
from webhook.app import MAX_BODY_BYTES, MAX_CONTAINERS
from webhook.cli import main
from webhook.server import MAX_HEAD_BYTES

EXE = shutil.which("model-cache-webhook", path=str(Path(sys.executable).parent))
LOADER = "registry.example.com/model-cache/loader:0.1.0"
NODES = {"apiVersion": "v1", "kind": "List", "items": [{
    "apiVersion": "v1", "kind": "Node", "metadata": {"name": "crio-1", "labels": {"pool": "crio"}},
    "status": {"nodeInfo": {"containerRuntimeVersion": "cri-o://1.34.1", "kubeletVersion": "v1.35.0"}},
}]}
REVIEW = {
    "apiVersion": "admission.k8s.io/v1",
    "kind": "AdmissionReview",
    "request": {
        "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE", "namespace": "models",
        "object": {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "models", "annotations": {"model.cache/ref": "registry.example.com/models/phi3:v1"}},
            "spec": {"containers": [{"name": "server", "image": "registry.example.com/app/server:1"}]},
        },
    },
}
# Half the Deployment's 512Mi limit. Measured peaks (VmHWM, from ~77 MB idle): 91 MB for oversized bodies, 168 MB
# for 20 stalled uploads (MAX_INFLIGHT_BYTES refuses the rest), 83 MB for endless heads, 222 MB for the worst body
# under the cap (7 MiB of two-character strings), 174 MB for objects up to MAX_CONTAINERS.
PEAK_MB = 256


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise AssertionError("no VmHWM in /proc/<pid>/status")


class Webhook:
    """``model-cache-webhook serve`` as a child process, with a CA of its own."""

    def __init__(self, tmp_path: Path, read_seconds: float) -> None:
        assert main(["certs", "--service", "model-cache", "--namespace", "ns", "--out", str(tmp_path / "tls"), "--san", "127.0.0.1"]) == 0
        (tmp_path / "nodes.json").write_text(json.dumps(NODES))
        self.ca = (tmp_path / "tls" / "ca.crt").read_bytes()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "MODEL_CACHE_LOADER_IMAGE": LOADER, "MODEL_CACHE_REVIEW_READ_SECONDS": str(read_seconds)}
        self.log = tmp_path / "serve.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [EXE, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--nodes-file", str(tmp_path / "nodes.json"),
                 "--tls-cert", str(tmp_path / "tls" / "tls.crt"), "--tls-key", str(tmp_path / "tls" / "tls.key")],
                env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
        self.client = httpx.Client(base_url=f"https://127.0.0.1:{self.port}", verify=client_context(self.ca), timeout=60)
        for _ in range(600):  # until it answers; polled, not timed
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if self.client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert self.client.post("/mutate", json=REVIEW).status_code == 200

    def raw(self) -> ssl.SSLSocket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        return client_context(self.ca).wrap_socket(sock, server_hostname="127.0.0.1")

    def peak_mb(self) -> float:
        return _vm_hwm_mb(self.proc.pid)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def webhook(tmp_path):
    started: list[Webhook] = []

    def start(read_seconds: float = 10.0) -> Webhook:
        w = Webhook(tmp_path / str(len(started)), read_seconds)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def _head(length: int | None) -> bytes:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return f"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n{framing}\r\n\r\n".encode()


def _status(conn: ssl.SSLSocket) -> bytes:
    """The status line of the answer, read until the server closes the connection."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data.partition(b"\r\n")[0]


def _objects(size: int) -> bytes:
    """``[{},{},...]`` of ``size`` bytes: the body that costs the most memory per byte to parse."""
    n = (size - 2) // 3
    return b"[" + b"{}," * n + b"{}" + b" " * (size - 2 - 3 * n - 2) + b"]"


def test_oversized_bodies_are_refused_without_growing_the_process(webhook):
    w = webhook()
    baseline = w.peak_mb()
    body = _objects(16 * 1024 * 1024)
    for _ in range(10):
        with w.raw() as conn:  # declared: refused from the Content-Length alone
            conn.sendall(_head(len(body)))
            assert _status(conn) == b"HTTP/1.1 413 Request Entity Too Large"
        with w.raw() as conn:  # chunked: refused at the first byte over, the rest never sent
            conn.sendall(_head(None))
            sent = 0
            while sent <= MAX_BODY_BYTES:
                piece = body[sent:sent + 65536]
                conn.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
                sent += len(piece)
            assert _status(conn) == b"HTTP/1.1 413 Request Entity Too Large"
    assert w.client.post("/mutate", json=REVIEW).status_code == 200
    assert w.peak_mb() <= PEAK_MB, (baseline, w.peak_mb())


def _send(conn: ssl.SSLSocket, data: bytes) -> bool:
    """Whether ``data`` was sent: a server that has answered and closed resets the rest."""
    try:
        conn.sendall(data)
    except OSError:
        return False
    return True


def _outcome(conn: ssl.SSLSocket) -> bytes:
    try:
        return _status(conn)
    except OSError:
        return b"reset"


def test_stalled_uploads_are_cut_at_the_deadline_and_hold_bounded_memory(webhook):
    from webhook.app import MAX_INFLIGHT_BYTES

    w = webhook(read_seconds=3.0)
    baseline = w.peak_mb()
    short = MAX_BODY_BYTES - 1_000_000
    conns = [w.raw() for _ in range(20)]
    try:
        for conn in conns:
            _send(conn, _head(MAX_BODY_BYTES) + b" " * short)  # and the last megabyte never comes
        assert w.client.post("/mutate", json=REVIEW).status_code == 200  # answered meanwhile
        outcomes = [_outcome(c) for c in conns]
    finally:
        for conn in conns:
            conn.close()
    timed_out = outcomes.count(b"HTTP/1.1 408 Request Timeout")
    assert 0 < timed_out <= MAX_INFLIGHT_BYTES // short
    assert sorted(set(outcomes) - {b"HTTP/1.1 408 Request Timeout"}) in (
        [], [b"HTTP/1.1 503 Service Unavailable"], [b"HTTP/1.1 503 Service Unavailable", b"reset"], [b"reset"]
    )
    assert w.peak_mb() <= PEAK_MB, (baseline, w.peak_mb())


def test_endless_request_heads_are_cut_at_the_head_limit(webhook):
    w = webhook()
    baseline = w.peak_mb()
    conns = [w.raw() for _ in range(20)]
    try:
        for conn in conns:
            conn.sendall(b"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\nx-endless: " + b"a" * (MAX_HEAD_BYTES - 4096))
        assert w.client.post("/mutate", json=REVIEW).status_code == 200  # answered meanwhile
        for conn in conns:  # then over the limit, one TLS record at a time until the server answers
            for _ in range(16):
                conn.sendall(b"a" * 1024)
        assert [_status(c) for c in conns] == [b"HTTP/1.1 431 Request Header Fields Too Large"] * 20
    finally:
        for conn in conns:
            conn.close()
    assert w.peak_mb() <= PEAK_MB, (baseline, w.peak_mb())


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(_objects(MAX_BODY_BYTES), 400, id="objects-over-the-count"),
        pytest.param(
            b"[" + b"{}," * (MAX_CONTAINERS - 2) + b"{}" + b" " * (MAX_BODY_BYTES - 3 * MAX_CONTAINERS) + b"]", 400,
            id="objects-at-the-count",
        ),
        pytest.param(b"[" + b'"ab",' * (MAX_BODY_BYTES // 5 - 1) + b'"ab"]', 400, id="short-strings"),
        pytest.param(b"[" + b"1.5," * (MAX_BODY_BYTES // 4 - 2) + b"1.5]", 400, id="floats"),
    ],
)
def test_the_worst_bodies_under_the_cap(webhook, body, status):
    w = webhook()
    baseline = w.peak_mb()
    assert len(body) <= MAX_BODY_BYTES
    resp = w.client.post("/mutate", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status
    assert w.client.post("/mutate", json=REVIEW).status_code == 200
    assert w.peak_mb() <= PEAK_MB, (baseline, w.peak_mb())


def test_a_connection_flood_holds_bounded_memory_and_the_process_recovers(webhook):
    """More silent TLS connections than MAX_CONNECTIONS (the oldest make room for the newer ones, and a review on a
    new connection is answered), then as many sockets that never start TLS as the descriptor limit allows: the
    process stays under the bound and answers again once they are gone. (While every descriptor is taken new
    connections wait in the kernel's backlog or fail: what keeps other clients out is the NetworkPolicy component.)"""
    from webhook.server import MAX_CONNECTIONS, MAX_OPEN_FILES

    w = webhook()
    baseline = w.peak_mb()
    silent = [w.raw() for _ in range(MAX_CONNECTIONS + 100)]  # TLS up, not one byte sent: idle, so evictable
    plain: list[socket.socket] = []
    try:
        assert w.client.post("/mutate", json=REVIEW).status_code == 200
        closed = 0
        for conn in silent[:100]:  # the 100 oldest made room for the newer ones
            conn.settimeout(30)
            try:
                closed += conn.recv(1) == b""
            except (ConnectionError, ssl.SSLError):
                closed += 1
        assert closed == 100
        plain += [socket.create_connection(("127.0.0.1", w.port)) for _ in range(MAX_OPEN_FILES)]  # never TLS
        with w.raw() as probe:  # a round trip through the server: it has accepted what it can
            probe.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            _outcome(probe)
    except OSError:
        pass  # the descriptors ran out first on one side or the other: the flood is as big as it gets
    finally:
        for conn in silent + plain:
            conn.close()
    peak = w.peak_mb()
    for _ in range(600):  # polled until the server has noticed the closes; not timed
        try:
            if w.client.post("/mutate", json=REVIEW).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    assert w.client.post("/mutate", json=REVIEW).status_code == 200
    assert peak <= PEAK_MB, (baseline, peak)
