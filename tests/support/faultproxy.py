"""A fault-injecting HTTP proxy between a client under test and a real registry, on 127.0.0.1.

It forwards every request to the upstream registry unchanged (the client's Host header too, so the registry's
Location headers point back at the proxy) and streams the answer back, closing the connection after each
response. Blob GETs (paths with ``/blobs/sha256:``) can be broken on purpose, with faults a test sets and
changes at run time::

    with FaultProxy(registry.url) as proxy:
        proxy.set_faults(reset_after_bytes=4096, reset_count=2)      # cut the first two blob bodies after 4 KiB
        proxy.set_faults(flip_byte_at=10, flip_digest=d, flip_once=True)
        proxy.set_faults(status_503=3)                               # next 3 requests: 503, Retry-After: 1
        proxy.set_faults(stall_after_bytes=0, stall_seconds=30)      # headers, then silence, then a cut
        ... proxy.url, proxy.bytes_by_digest, proxy.total_blob_bytes, proxy.requests ...

Offsets of ``flip_byte_at`` are positions in the blob, so a flip lands on the same byte whether the client asks
for the whole blob or a Range of it. Body-byte counters count what was handed to the kernel for the client; a
reset waits (briefly) for those bytes to leave before it sends the RST, so the counters are what the client
could have received. Range requests, 206 answers, HEAD and manifests pass through byte for byte.
"""

from __future__ import annotations

import fcntl
import random
import re
import socket
import struct
import termios
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, replace
from http.client import HTTPConnection, HTTPException
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

BLOB_RE = re.compile(r"/blobs/(sha256:[0-9a-f]{64})")
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
     "transfer-encoding", "upgrade", "proxy-connection"}
)
CHUNK = 64 * 1024
DRAIN_WAIT_SECONDS = 2.0  # how long a reset waits for already-sent bytes to leave before the RST


@dataclass
class Faults:
    """What to break. ``*_count`` None means every matching blob response; a number means the next that many.

    reset: cut the body after ``reset_after_bytes`` bytes of a response (RST, or FIN with reset_style="fin"),
        for the next ``reset_count`` blob responses, or each with ``reset_probability`` (seeded).
    flip: XOR 0xFF into the byte at blob offset ``flip_byte_at`` of ``flip_digest`` (any blob if None);
        ``flip_once`` stops after the first flipped response.
    503: answer the next ``status_503`` requests (any request whose path contains ``status_503_match``) with
        503 and ``Retry-After: retry_after``.
    stall: after ``stall_after_bytes`` bytes, send nothing for ``stall_seconds``, then cut the connection.
    """

    reset_after_bytes: int | None = None
    reset_count: int | None = None
    reset_probability: float | None = None
    reset_style: Literal["rst", "fin"] = "rst"
    flip_byte_at: int | None = None
    flip_digest: str | None = None
    flip_once: bool = False
    status_503: int = 0
    status_503_match: str = ""
    retry_after: str = "1"
    stall_after_bytes: int | None = None
    stall_seconds: float = 30.0
    stall_count: int | None = None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    range: str | None  # the Range header as sent
    status: int  # what the client was answered (0: nothing, the upstream failed and we could not answer)
    body_bytes: int  # body bytes handed to the client
    fault: str | None = None  # "reset", "flip", "503", "stall", "upstream-error"


@dataclass
class _Plan:
    cut_at: int | None = None
    cut_kind: str | None = None  # "reset" | "stall"
    flip_at: int | None = None  # offset within the blob


class FaultProxy:
    def __init__(self, upstream_url: str, seed: int = 0):
        up = urllib.parse.urlsplit(upstream_url)
        if up.scheme != "http" or not up.hostname:
            raise ValueError(f"FaultProxy forwards to http://host:port only, not {upstream_url!r}")
        self.upstream_host = up.hostname
        self.upstream_port = up.port or 80
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._faults = Faults()
        self._stopping = threading.Event()
        self.requests: list[RequestRecord] = []
        self.bytes_by_digest: Counter[str] = Counter()
        self.total_bytes = 0  # body bytes of every response
        self.faults_injected: Counter[str] = Counter()
        self.errors: list[str] = []  # unexpected handler errors (a test may assert it is empty)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        handler = type("_BoundHandler", (_Handler,), {"proxy": self})
        self._server = _Server(("127.0.0.1", 0), handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes stalled responses
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the proxy first"
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # --- configuration and counters ----------------------------------------------------------------------------
    def set_faults(self, **kwargs) -> None:
        """Replace every fault with these (fields of Faults); no arguments clears them all."""
        with self._lock:
            self._faults = Faults(**kwargs)

    def update_faults(self, **kwargs) -> None:
        """Change some faults, keep the others."""
        with self._lock:
            self._faults = replace(self._faults, **kwargs)

    @property
    def faults(self) -> Faults:
        with self._lock:
            return replace(self._faults)

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes_by_digest.clear()
            self.total_bytes = 0
            self.faults_injected.clear()

    @property
    def total_blob_bytes(self) -> int:
        with self._lock:
            return sum(self.bytes_by_digest.values())

    def blob_requests(self, digest: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [
                r for r in self.requests
                if r.method == "GET" and (m := BLOB_RE.search(r.path)) and (digest is None or m.group(1) == digest)
            ]

    # --- decisions (under the lock; no I/O) ----------------------------------------------------------------------
    def _take_503(self, path: str) -> bool:
        with self._lock:
            f = self._faults
            if f.status_503 > 0 and f.status_503_match in path:
                f.status_503 -= 1
                self.faults_injected["503"] += 1
                return True
            return False

    def _plan_blob(self, digest: str) -> _Plan:
        plan = _Plan()
        with self._lock:
            f = self._faults
            if f.reset_after_bytes is not None:
                if f.reset_probability is not None:
                    hit = self._rng.random() < f.reset_probability
                elif f.reset_count is None:
                    hit = True
                else:
                    hit = f.reset_count > 0
                    if hit:
                        f.reset_count -= 1
                if hit:
                    plan.cut_at, plan.cut_kind = f.reset_after_bytes, "reset"
            if (plan.cut_kind is None and f.stall_after_bytes is not None
                    and (f.stall_count is None or f.stall_count > 0)):
                if f.stall_count is not None:
                    f.stall_count -= 1
                plan.cut_at, plan.cut_kind = f.stall_after_bytes, "stall"
            if f.flip_byte_at is not None and (f.flip_digest is None or f.flip_digest == digest):
                plan.flip_at = f.flip_byte_at
        return plan

    def _flipped(self) -> None:
        with self._lock:
            self.faults_injected["flip"] += 1
            if self._faults.flip_once:
                self._faults.flip_byte_at = None

    def _count(self, digest: str | None, n: int) -> None:
        with self._lock:
            self.total_bytes += n
            if digest:
                self.bytes_by_digest[digest] += n

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append(rec)
            if rec.fault in ("reset", "stall"):
                self.faults_injected[rec.fault] += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, handler, proxy: FaultProxy):
        self.proxy = proxy
        super().__init__(addr, handler)

    def handle_error(self, request, client_address) -> None:
        import sys

        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError)):
            self.proxy.errors.append(repr(exc))


def _range_start(status: int, content_range: str | None) -> int:
    """Blob offset of the first body byte: 0 for a 200, the start of ``Content-Range: bytes S-E/T`` for a 206."""
    if status == 206 and content_range:
        m = re.match(r"\s*bytes\s+(\d+)-", content_range)
        if m:
            return int(m.group(1))
    return 0


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # tests read counters, not logs
        pass

    def do_GET(self):
        self._forward()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else None

    def _forward(self) -> None:
        p = self.proxy
        self.close_connection = True
        method, path, rng = self.command, self.path, self.headers.get("Range")
        body = self._read_body()
        if p._take_503(path):
            msg = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by FaultProxy"}]}'
            self.send_response(503)
            self.send_header("Retry-After", p.faults.retry_after)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(msg)))
            self.send_header("Connection", "close")
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(msg)
            p._record(RequestRecord(method, path, rng, 503, 0, "503"))
            return

        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        upstream = HTTPConnection(p.upstream_host, p.upstream_port, timeout=60)
        try:
            try:
                upstream.request(method, path, body=body, headers=headers)
                resp = upstream.getresponse()
            except (OSError, HTTPException) as exc:
                msg = f"FaultProxy: upstream failed: {exc}".encode()
                self.send_response(502)
                self.send_header("Content-Length", str(len(msg)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(msg)
                p._record(RequestRecord(method, path, rng, 502, 0, "upstream-error"))
                return
            self._relay(method, path, rng, resp)
        finally:
            upstream.close()

    def _relay(self, method: str, path: str, rng: str | None, resp) -> None:
        p = self.proxy
        m = BLOB_RE.search(path)
        # Only a successful blob body is blob content: a 404's or 416's error JSON is not counted or broken.
        digest = m.group(1) if (m and method == "GET" and 200 <= resp.status < 300) else None
        plan = p._plan_blob(digest) if digest else _Plan()

        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Connection", "close")
        # The record (and the byte counts) are written before the last byte the client waits for, never after: a
        # test reads them as soon as its client has the answer, and the client may have it before this thread
        # runs again (a manifest PUT's empty 201 went unrecorded in one run of the suite).
        if method == "HEAD" or resp.length == 0:
            p._record(RequestRecord(method, path, rng, resp.status, 0, None))
            self.end_headers()
            return
        self.end_headers()

        sent, fault, recorded = 0, None, False
        pos = _range_start(resp.status, resp.getheader("Content-Range"))
        while True:
            if plan.cut_at is not None and sent >= plan.cut_at:
                fault = plan.cut_kind
                break
            want = CHUNK if plan.cut_at is None else min(CHUNK, plan.cut_at - sent)
            chunk = resp.read(want)
            if not chunk:
                break
            if plan.flip_at is not None and pos <= plan.flip_at < pos + len(chunk):
                i = plan.flip_at - pos
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                plan.flip_at = None
                p._flipped()
                fault = "flip"
            sent += len(chunk)
            pos += len(chunk)
            p._count(digest, len(chunk))
            if resp.length == 0 and (plan.cut_at is None or sent < plan.cut_at):  # the last chunk, delivered whole
                p._record(RequestRecord(method, path, rng, resp.status, sent, fault))
                recorded = True
            self.wfile.write(chunk)
        if not recorded:
            p._record(RequestRecord(method, path, rng, resp.status, sent, fault))
        if fault == "stall":
            p._stopping.wait(p.faults.stall_seconds)
            self._cut("fin")
        elif fault == "reset":
            self._cut(p.faults.reset_style)

    def _cut(self, style: str) -> None:
        sock = self.connection
        try:
            if style == "rst":
                _wait_drained(sock, DRAIN_WAIT_SECONDS)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # linger 0: the peer gets a RST, not a FIN
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _wait_drained(sock: socket.socket, limit: float) -> None:
    """Wait until the kernel has no unacknowledged bytes for this socket, so a RST does not discard them."""
    deadline = time.monotonic() + limit
    buf = bytearray(4)
    while time.monotonic() < deadline:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
        if struct.unpack("i", buf)[0] == 0:
            return
        time.sleep(0.005)
