"""The throttling proxy (tests/support/throttle.py) and the shaped link (tests/support/netns.py) in front of the
real registry: the per-connection cap, the latency and the link's tbf hold roughly, and bytes pass untouched.

Timing bounds are generous on purpose (the machine is shared): each asserts a lower bound the shaping must force
(a 4 MB download through a 2 MB/s cap cannot take less than ~2 s) or an upper bound several times above the ideal.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import threading
import time

import pytest
import requests

from tests.support import netns
from tests.support.oci import Pusher, sha256
from tests.support.throttle import ThrottleProxy

REPO = "throttle/blobs"
BLOB = os.urandom(8 << 20)
MB = 1_000_000


@pytest.fixture(scope="module")
def blob(registry, pusher) -> str:
    return pusher.push_blob(REPO, BLOB)


@pytest.fixture
def proxy(registry):
    with ThrottleProxy(registry.url) as p:
        yield p


def fetch(url: str, digest: str, start: int = 0, end: int | None = None) -> tuple[bytes, float]:
    """GET a range of the blob on a fresh connection: (body, seconds)."""
    headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
    t0 = time.perf_counter()
    r = requests.get(f"{url}/v2/{REPO}/blobs/{digest}", headers=headers, timeout=60)
    r.raise_for_status()
    return r.content, time.perf_counter() - t0


def test_rate_cap_holds(proxy, blob):
    proxy.set(rate=2 * MB)
    body, seconds = fetch(proxy.url, blob, 0, 4 * MB)
    assert body == BLOB[:4 * MB]
    assert seconds >= 1.5, f"4 MB through a 2 MB/s cap took {seconds:.2f} s"
    assert proxy.stats().bytes_down >= 4 * MB


def test_cap_is_per_connection(proxy, blob):
    """Four connections at 0.5 MB/s each move 1 MB apiece in about 2 s together, not the 8 s of a shared cap."""
    proxy.set(rate=0.5 * MB)
    results: dict[int, tuple[bytes, float]] = {}

    def one(i: int) -> None:
        results[i] = fetch(proxy.url, blob, i * MB, (i + 1) * MB)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - t0
    for i in range(4):
        body, seconds = results[i]
        assert body == BLOB[i * MB:(i + 1) * MB]
        assert seconds >= 1.5, f"connection {i}: 1 MB at 0.5 MB/s took {seconds:.2f} s"
    assert total < 6.0, f"four capped connections took {total:.2f} s together: the cap looks shared"
    assert proxy.stats().peak_active >= 2


def test_latency_per_request(proxy, blob):
    """Every request on a kept-alive connection waits `latency` for its first byte; a new connection once more."""
    proxy.set(latency=0.1)
    host, port = proxy.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    waits = []
    try:
        for _ in range(4):
            t0 = time.perf_counter()
            conn.request("GET", f"/v2/{REPO}/blobs/{blob}", headers={"Range": "bytes=0-99"})
            r = conn.getresponse()
            waits.append(time.perf_counter() - t0)
            assert r.status == 206
            assert r.read() == BLOB[:100]
    finally:
        conn.close()
    assert proxy.stats().connections == 1, "the requests were meant to share one connection"
    assert waits[0] >= 0.18, f"first request on a new connection: {waits[0]:.3f} s (handshake + request)"
    assert all(w >= 0.09 for w in waits[1:]), f"per-request waits {waits}"
    proxy.set(latency=0.0)
    _, seconds = fetch(proxy.url, blob, 0, 100)
    assert seconds < sum(waits), "latency 0 should answer faster than four delayed requests"


def test_range_and_status_pass_through(proxy, blob):
    proxy.set(rate=4 * MB, latency=0.02)
    url = f"{proxy.url}/v2/{REPO}/blobs/{blob}"
    r = requests.get(url, headers={"Range": "bytes=1000-1999999"}, timeout=30)
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 1000-1999999/{len(BLOB)}"
    assert r.content == BLOB[1000:2_000_000]
    r = requests.get(url, headers={"Range": "bytes=-4096"}, timeout=30)
    assert r.status_code == 206 and r.content == BLOB[-4096:]
    # Distribution's 416 carries the blob's Content-Length with a 33-byte body: read the status line only.
    with requests.get(url, headers={"Range": f"bytes={len(BLOB) + 10}-"}, timeout=30, stream=True) as r:
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(BLOB)}"
    r = requests.head(url, timeout=30)
    assert r.status_code == 200 and r.headers.get("Accept-Ranges") == "bytes"
    assert int(r.headers["Content-Length"]) == len(BLOB)


def test_whole_blob_bytes_exact_and_upload_through_delay_line(proxy, registry, blob):
    proxy.set(latency=0.03)
    body, _ = fetch(proxy.url, blob)
    assert hashlib.sha256(body).hexdigest() == blob.split(":")[1]
    # An upload streams through the delay line (late by the latency, not stop-and-wait per chunk).
    data = os.urandom(3 << 20)
    proxy.set(rate=8 * MB)
    t0 = time.perf_counter()
    Pusher(proxy.url).upload(REPO, sha256(data), data, len(data))
    assert time.perf_counter() - t0 < 10.0
    assert proxy.stats().bytes_up >= len(data)
    r = requests.get(f"{registry.url}/v2/{REPO}/blobs/{sha256(data)}", timeout=30)
    assert r.content == data


def test_settings_change_at_run_time_and_unthrottled_headroom(proxy, blob):
    """Unthrottled, eight connections together run far above the caps the benchmark sets (8 x 12.5 MB/s): the
    proxy is not what limits a shaped run."""
    proxy.set(rate=1 * MB, latency=0.05)
    proxy.set(rate=None, latency=0.0)
    assert proxy.shape.rate is None and proxy.shape.latency == 0.0
    done: list[int] = []

    def one(i: int) -> None:
        body, _ = fetch(proxy.url, blob, i * MB, (i + 1) * MB)
        done.append(len(body))

    rounds = 4
    t0 = time.perf_counter()
    for _ in range(rounds):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    rate = sum(done) / (time.perf_counter() - t0)
    assert sum(done) == rounds * 8 * MB
    assert rate > 40 * MB, f"unthrottled pass-through only {rate / MB:.0f} MB/s"


def test_invalid_settings_refused(proxy):
    with pytest.raises(ValueError):
        proxy.set(rate=0)
    with pytest.raises(ValueError):
        proxy.set(latency=-1)


# --- the shaped link (root only) ------------------------------------------------------------------------------

needs_link = pytest.mark.skipif(netns.available() is not None, reason=f"shaped link: {netns.available()}")


@needs_link
def test_link_caps_the_aggregate_and_is_removed(registry, blob, tmp_path):
    """tbf at 80 mbit (10 MB/s): four unthrottled connections together take >= ~0.8 s for 8 MB; without the tbf
    the same is much faster; bytes are exact; the namespaces are gone after close()."""
    with netns.Link(rate_mbit=80) as link:
        proxy = ThrottleProxy(registry.url, sock=link.listen()).start()
        try:
            url = f"http://{link.server_addr}:{proxy.address[1]}/v2/{REPO}/blobs/{blob}"

            def curl_all() -> float:
                quarter = len(BLOB) // 4
                t0 = time.perf_counter()
                procs = [subprocess.Popen(link.client_argv(
                    ["curl", "-sSf", "-o", str(tmp_path / f"part{i}"), "-r",
                     f"{i * quarter}-{(i + 1) * quarter - 1}", url])) for i in range(4)]
                assert [p.wait(60) for p in procs] == [0] * 4
                seconds = time.perf_counter() - t0
                assert b"".join((tmp_path / f"part{i}").read_bytes() for i in range(4)) == BLOB
                return seconds

            shaped = curl_all()
            assert shaped >= 0.6, f"8 MB over a 10 MB/s link took {shaped:.2f} s"
            assert proxy.stats().peak_active >= 2
            assert "tbf" in link.qdisc()
            link.set_rate(None)
            assert "tbf" not in link.qdisc()
            unshaped = curl_all()
            assert unshaped < shaped, f"without tbf {unshaped:.2f} s, with {shaped:.2f} s"
        finally:
            proxy.stop()
        names = (link.server_ns, link.client_ns)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(n in listed for n in names)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names), listed


@needs_link
def test_link_listen_socket_lives_in_the_server_namespace(registry):
    """The listening socket is on the veth address, which the root namespace does not have."""
    with netns.Link(rate_mbit=None) as link:
        sock = link.listen()
        try:
            assert sock.getsockname()[0] == link.server_addr
            r = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
            assert link.server_addr not in r
        finally:
            sock.close()
