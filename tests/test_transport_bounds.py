"""Every read of an answer is bounded as a whole, not only per socket read (loader.transport).

A hostile server on 127.0.0.1 (a raw socket of our own: these answers are ones no HTTP server library would send)
trickles the parts of an answer that http.client reads inside its own loops, each byte well inside the per-read
timeout: a redirect's or a 401's body being discarded (``read(n)`` fills n bytes), a chunked body's size line, a
chunked body's endless trailer. Each used to hold the caller for as long as the server liked (a 64 KiB discard at a
byte every 29 s: 22 days); each now ends at its deadline (shortened here) with the error naming what was slow.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from loader import transport
from loader.digest import Digest
from loader.errors import TransientError

LONG = 600.0  # how long each hostile script would go on if nothing cut it (seconds)


def _trickle(conn: socket.socket, data: bytes, stop: threading.Event, every: float = 0.1) -> None:
    for i in range(len(data)):
        if stop.wait(every):
            return
        conn.sendall(data[i:i + 1])


def _answer_each(conn: socket.socket, stop: threading.Event, answer: bytes) -> None:
    """The same answer to every request on the connection (the first one was read by the server already)."""
    conn.sendall(answer)
    while not stop.is_set() and conn.recv(65536):
        conn.sendall(answer)


SCRIPTS: dict[str, Callable[[socket.socket, threading.Event], None]] = {
    "redirect-body": lambda c, stop: (
        c.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /v2/elsewhere\r\nContent-Length: 65536\r\n\r\n"),
        _trickle(c, b"a" * 65536, stop)),
    "401-body": lambda c, stop: (
        c.sendall(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"r\"\r\nContent-Length: 65536\r\n\r\n"),
        _trickle(c, b"a" * 65536, stop)),
    "chunk-size-line": lambda c, stop: (
        c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        _trickle(c, b"1;" + b"e" * 65000, stop)),
    # A chunk size of "-1": http.client's int(line, 16) takes it, and read(n) then reads until the connection
    # closes, all of it in memory; a read1 gives back more than the buffer it fills.
    "negative-chunk": lambda c, stop: (
        c.sendall(b"HTTP/1.1 302 Found\r\nLocation: /v2/next\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n"),
        [c.sendall(b"x" * 65536) for _ in iter(stop.is_set, True)]),
    "negative-chunk-200": lambda c, stop: (
        c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n"),
        [c.sendall(b"x" * 65536) for _ in iter(stop.is_set, True)]),
    # Informational answers before the real one, for every request on the connection (a CDN's 103 Early Hints).
    "early-hints": lambda c, stop: _answer_each(c, stop, b"HTTP/1.1 102 Processing\r\n\r\n"
                                                b"HTTP/1.1 103 Early Hints\r\nLink: </v2/>; rel=preload\r\n\r\n"
                                                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"),
    "chunk-trailer-flood": lambda c, stop: (
        c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"),
        [c.sendall(b"X-T: y\r\n" * 512) for _ in iter(stop.is_set, True)]),
}


@pytest.fixture
def hostile() -> Iterator[Callable[[str], int]]:
    """Serves one script per connection (every connection of the test gets the same one); returns its port."""
    stop = threading.Event()
    listeners: list[socket.socket] = []

    def start(name: str) -> int:
        ls = socket.create_server(("127.0.0.1", 0))
        listeners.append(ls)

        def conn_loop() -> None:
            while not stop.is_set():
                try:
                    c, _ = ls.accept()
                except OSError:
                    return
                threading.Thread(target=serve_one, args=(c,), daemon=True).start()

        def serve_one(c: socket.socket) -> None:
            with c:
                try:
                    c.recv(65536)
                    SCRIPTS[name](c, stop)
                except OSError:
                    pass

        threading.Thread(target=conn_loop, daemon=True).start()
        return int(ls.getsockname()[1])

    yield start
    stop.set()
    for ls in listeners:
        ls.close()


def _outcome(call: Callable[[], object]) -> object:
    """What ``call`` returned or raised; a thread so that a regression fails the test instead of hanging it."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(call())
        except Exception as exc:  # noqa: BLE001  asserted on by the caller
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(LONG / 10)
    assert out, f"still reading after {LONG / 10:g} s: nothing bounded the read"
    return out[0]


@pytest.fixture(autouse=True)
def short_bounds(monkeypatch):
    monkeypatch.setattr(transport, "HEAD_SECONDS", 1.0)
    monkeypatch.setattr(transport, "BODY_SECONDS", 1.0)


@pytest.mark.parametrize("name", ["redirect-body", "401-body"])
def test_a_trickled_body_being_discarded_is_cut_at_the_body_deadline(hostile, name):
    """A redirect's body is discarded before the redirect is followed, a 401's before credentials are looked up:
    at most BODY_SECONDS of it is read, then the connection is dropped (never reused) and the caller goes on."""
    port = hostile(name)
    t = transport.Transport(timeout=5.0)
    try:
        if name == "redirect-body":
            got = _outcome(lambda: t.request("GET", f"http://127.0.0.1:{port}/v2/", {}))
            # Followed after each cut: every hop is the same script, so it ends as a redirect loop, and only then.
            assert isinstance(got, transport.ProtocolError), got
            assert f"registry 127.0.0.1:{port} redirected more than {transport.MAX_REDIRECTS} times" in str(got)
        else:
            resp = t.request("GET", f"http://127.0.0.1:{port}/v2/", {})
            assert resp.status == 401
            assert _outcome(resp.discard) is None
            assert t._conns == set()  # not read to its end: the connection was dropped, not pooled
    finally:
        t.close()


@pytest.mark.parametrize("name", ["chunk-size-line", "chunk-trailer-flood"])
def test_a_chunked_small_body_is_cut_at_the_body_deadline_inside_http_clients_loops(hostile, name):
    port = hostile(name)
    t = transport.Transport(timeout=5.0)
    try:
        resp = t.request("GET", f"http://127.0.0.1:{port}/v2/m/manifests/v1", {})
        err = _outcome(lambda: resp.read_body(4 << 20, "the manifest of m:v1"))
        assert isinstance(err, TransientError), err
        assert f"registry 127.0.0.1:{port} sent the manifest of m:v1 too slowly" in str(err), str(err)
        assert t._conns == set()
    finally:
        t.close()


def test_a_chunked_blob_read_returns_within_the_socket_timeout_however_its_size_line_trickles(hostile):
    """The engine reads a blob with Response.readinto and applies its minimum rate between reads; a chunked answer
    whose size line trickles used to keep one readinto call (and so the engine) waiting for the whole line."""
    port = hostile("chunk-size-line")
    t = transport.Transport(timeout=1.0)
    try:
        resp = t.request("GET", f"http://127.0.0.1:{port}/v2/m/blobs/sha256:" + "a" * 64, {})
        err = _outcome(lambda: resp.readinto(bytearray(1 << 20)))
        assert isinstance(err, TransientError), err
        assert "sent the framing of its chunked body too slowly" in str(err), str(err)
    finally:
        t.close()


def test_a_chunk_size_that_is_not_hex_digits_is_refused_wherever_it_is_read(hostile):
    """"-1" (or "+1", "1_0") as a chunk size: refused as broken framing, never read as "until the connection closes"
    (a discarded redirect body would be held in memory whole) nor handed on as more bytes than a read asked for (a
    ValueError, a traceback, exit 1). The connection is dropped, never pooled."""
    redirect = hostile("negative-chunk")
    t = transport.Transport(timeout=5.0)
    try:
        got = _outcome(lambda: t.request("GET", f"http://127.0.0.1:{redirect}/v2/", {}))
        assert isinstance(got, transport.ProtocolError), got  # each hop's body dropped at its first chunk: a loop
        assert f"registry 127.0.0.1:{redirect} redirected more than {transport.MAX_REDIRECTS} times" in str(got)
        assert t._conns == set()
        port = hostile("negative-chunk-200")
        resp = t.request("GET", f"http://127.0.0.1:{port}/v2/m/manifests/v1", {})
        err = _outcome(lambda: resp.read_body(4 << 20, "the manifest of m:v1"))
        assert isinstance(err, TransientError) and "IncompleteRead" in str(err), err
        resp = t.request("GET", f"http://127.0.0.1:{port}/v2/m/blobs/sha256:" + "a" * 64, {})
        err = _outcome(lambda: resp.readinto(bytearray(300)))
        assert isinstance(err, TransientError) and "IncompleteRead" in str(err), err
        resp.close()  # as the engine does after a failed read
        assert t._conns == set()
    finally:
        t.close()


def test_a_trickled_signature_blob_is_cut_at_the_body_deadline(tmp_path):
    """A cosign payload or Sigstore bundle (a small blob read whole before a pull may publish) trickled a byte at a
    time used to hold the verifying pull, and a CSI publish slot, for as long as the registry liked."""
    from loader.errors import NetworkError
    from loader.log import Logger
    from loader.reference import parse
    from loader.registry import RegistryClient
    from loader.sign import RegistrySignatures
    from tests.support.crafted_registry import CraftedRegistry
    from tests.support.oci import sha256

    payload = b'{"critical": {"image": {"docker-manifest-digest": "sha256:' + b"0" * 64 + b'"}}}'
    with CraftedRegistry() as reg:
        reg.blobs[sha256(payload)] = payload
        reg.trickle[sha256(payload)] = 0.2  # ~100 bytes: 20 s a try
        with RegistryClient(parse(f"{reg.host}/m/model:v1"), timeout=5.0) as client:
            source = RegistrySignatures(client, Logger(io.StringIO()), "m/model:v1")
            err = _outcome(lambda: source.small_blob(Digest.parse(sha256(payload), "test"), len(payload)))
    assert isinstance(err, NetworkError), err
    assert f"sent the {len(payload)}-byte signature blob {sha256(payload)} too slowly" in str(err), str(err)


def test_a_small_body_read_whole_gives_its_connection_back():
    """The bounds cost no connection: a manifest read to its Content-Length goes back to the pool (with its
    socket's own timeout again) and the next request uses it; http.client's read1 never marks such a body finished,
    so every manifest used to cost a new connection."""
    from tests.support.crafted_registry import CraftedRegistry

    with CraftedRegistry() as reg:
        reg.manifests[("m", "v1")] = (b'{"a": 1}', "application/json")
        t = transport.Transport(timeout=5.0)
        try:
            seen = []
            for _ in range(3):
                resp = t.request("GET", f"http://{reg.host}/v2/m/manifests/v1", {})
                assert resp.read_body(1000, "the manifest of m:v1") == b'{"a": 1}'
                (conn,) = t._conns
                assert conn.sock is not None and conn.sock.gettimeout() == 5.0
                seen.append(conn)
            assert seen[0] is seen[1] is seen[2]
        finally:
            t.close()


def test_informational_answers_before_the_real_one_are_skipped_and_the_connection_stays_in_step(hostile):
    """http.client skips 100 Continue only: a 102 or a 103 Early Hints passed for the final answer, and the real
    one stayed on the pooled connection, to be read by the next request as its own answer."""
    port = hostile("early-hints")
    t = transport.Transport(timeout=5.0)
    try:
        for _ in range(3):
            resp = t.request("GET", f"http://127.0.0.1:{port}/v2/m/manifests/v1", {})
            assert (resp.status, resp.read_body(100, "the manifest of m:v1")) == (200, b"{}")
        assert len(t._conns) == 1  # one connection, in step, reused for all three
    finally:
        t.close()
