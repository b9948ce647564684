"""A throttling TCP proxy in front of a real registry: a per-connection rate cap and a first-byte latency.

Loopback is as fast as the CPU; this puts back what a real registry link costs, one connection at a time::

    with ThrottleProxy(registry.url, rate=12.5e6, latency=0.030) as proxy:   # 12.5 MB/s per connection, 30 ms
        ... pull from proxy.url ...
        proxy.set(rate=None)              # change it at run time (open connections follow at their next chunk)
        proxy.stats()                     # connections, peak concurrent, bytes each way
        proxy.records()                   # per closed connection: opened, first/last byte down, closed, bytes
        proxy.reset_stats()               # both, from now on

What it does, byte for byte (it never parses HTTP, so Range requests, 206 answers, keep-alive, HEAD and uploads
pass through untouched):

* **rate** (bytes/s, None = no cap) is a token bucket per connection and per direction: each connection on its
  own may move at most ``rate`` bytes/s each way, so N connections may move N x rate together (an aggregate cap
  belongs to the link: ``tests/support/netns.py`` puts ``tbf`` on one).
* **latency** (seconds) delays every chunk the client sends by that much before it reaches the upstream (a delay
  line, not stop-and-wait: an upload streams at full rate, late by ``latency``), so the first byte of every
  response arrives at least ``latency`` after its request was sent: a round trip. A new connection pays it once
  more before its first byte goes upstream (the TCP handshake's round trip).

One thread per direction plus one for the delay line per connection; ``recv_into``/``sendall`` release the GIL,
so 16 connections at 12.5 MB/s each cost a few percent of a core. ``ThrottleProxy(..., sock=s)`` serves on a
listening socket made elsewhere (in another network namespace: ``netns.Link.listen``); the proxy's own
connections to the upstream are made from the thread that started it.

Run by hand: ``python -m tests.support.throttle http://127.0.0.1:5000 --rate-mbs 12.5 --latency-ms 30``.
"""

from __future__ import annotations

import argparse
import queue
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

BUF = 256 * 1024  # largest read when unthrottled
MIN_READ = 16 * 1024  # smallest read when throttled
BURST_SECONDS = 0.01  # a throttled read is at most this many seconds of the rate (10 ms: 125 KB at 12.5 MB/s)
QUEUE_CHUNKS = 64  # delay line bound: a client that sends faster than the upstream takes is held back
CONNECT_TIMEOUT = 10.0
_KEEP: float = float("nan")  # set(): leave this setting as it is


@dataclass(frozen=True)
class Shape:
    rate: float | None = None  # bytes/s per connection and direction; None: no cap
    latency: float = 0.0  # seconds added before each client chunk reaches the upstream


@dataclass(frozen=True)
class Stats:
    connections: int  # accepted since the last reset
    active: int  # open now
    peak_active: int  # most open at once since the last reset
    bytes_down: int  # upstream -> client
    bytes_up: int  # client -> upstream
    errors: int  # connections that ended in a socket error (reset, upstream refused)


@dataclass(frozen=True)
class ConnRecord:
    """One finished connection, times from time.monotonic(): where a run spends its time (start-up, tails)."""

    opened: float  # accepted
    first_down: float | None  # first byte from the upstream forwarded to the client (None: never)
    last_down: float | None  # last such byte
    closed: float
    bytes_down: int
    bytes_up: int


class _Tally:
    """One connection's counters, each written by one thread only."""

    def __init__(self) -> None:
        self.first_down: float | None = None
        self.last_down: float | None = None
        self.down = 0
        self.up = 0


class _Bucket:
    """A token bucket that may go into debt: take(n) returns at once while tokens last, else sleeps until the
    debt is paid. The rate is read at every call, so a change applies from the next chunk."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.t = time.monotonic()

    def take(self, n: int, rate: float | None) -> None:
        now = time.monotonic()
        if rate is None:
            self.tokens, self.t = 0.0, now
            return
        self.tokens = min(max(MIN_READ, rate * BURST_SECONDS), self.tokens + (now - self.t) * rate) - n
        self.t = now
        if self.tokens < 0:
            time.sleep(-self.tokens / rate)


def read_size(rate: float | None) -> int:
    if rate is None:
        return BUF
    return int(min(BUF, max(MIN_READ, rate * BURST_SECONDS)))


class ThrottleProxy:
    def __init__(self, upstream: str | tuple[str, int], *, rate: float | None = None, latency: float = 0.0,
                 listen: tuple[str, int] = ("127.0.0.1", 0), sock: socket.socket | None = None):
        if isinstance(upstream, str):
            up = urllib.parse.urlsplit(upstream)
            if not up.hostname:
                raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
            upstream = (up.hostname, up.port or 80)
        self.upstream = upstream
        self._listen_addr = listen
        self._sock = sock
        self._shape = Shape()
        self.set(rate=rate, latency=latency)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()  # both sockets of every open connection
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.reset_stats()

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> ThrottleProxy:
        if self._sock is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(self._listen_addr)
            s.listen(128)
            self._sock = s
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="throttle-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # wakes every pump; each closes its own sockets
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> ThrottleProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None, "start() the proxy first"
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def host(self) -> str:
        h, p = self.address
        return f"{h}:{p}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # --- settings and counters ---------------------------------------------------------------------------------
    def set(self, *, rate: float | None = _KEEP, latency: float = _KEEP) -> None:
        """Change the rate (bytes/s per connection, None: no cap) and/or the latency (seconds) at run time."""
        r = self._shape.rate if rate is _KEEP else rate
        lat = self._shape.latency if latency is _KEEP else latency
        if r is not None and r <= 0:
            raise ValueError("rate must be positive (or None for no cap)")
        if lat < 0:
            raise ValueError("latency must be >= 0")
        self._shape = Shape(r, float(lat))  # one assignment: readers see the old shape or the new one

    @property
    def shape(self) -> Shape:
        return self._shape

    def reset_stats(self) -> None:
        with self._lock:
            self._connections = 0
            self._peak = len(self._conns) // 2
            self._down = 0
            self._up = 0
            self._errors = 0
            self._records: list[ConnRecord] = []

    def records(self) -> list[ConnRecord]:
        """Connections closed since the last reset, in the order they closed."""
        with self._lock:
            return list(self._records)

    def stats(self) -> Stats:
        with self._lock:
            active = len(self._conns) // 2
            return Stats(self._connections, active, self._peak, self._down, self._up, self._errors)

    # --- the work ----------------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            accepted = time.monotonic()
            threading.Thread(target=self._serve, args=(client, accepted), name="throttle-conn", daemon=True).start()

    def _serve(self, client: socket.socket, accepted: float) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=CONNECT_TIMEOUT)
        except OSError:
            with self._lock:
                self._errors += 1
            client.close()
            return
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._conns.update((client, upstream))
            self._connections += 1
            self._peak = max(self._peak, len(self._conns) // 2)
        ready = accepted + self._shape.latency  # the handshake's round trip
        tally = _Tally()
        line: queue.Queue[tuple[float, bytes | None]] = queue.Queue(QUEUE_CHUNKS)
        failed = threading.Event()
        threads = [
            threading.Thread(target=self._read_client, args=(client, upstream, line, ready, failed), daemon=True),
            threading.Thread(target=self._write_upstream, args=(upstream, line, client, failed, tally), daemon=True),
        ]
        for t in threads:
            t.start()
        self._pump_down(upstream, client, failed, tally)
        for t in threads:
            t.join()
        with self._lock:
            self._conns.discard(client)
            self._conns.discard(upstream)
            if failed.is_set():
                self._errors += 1
            self._records.append(ConnRecord(accepted, tally.first_down, tally.last_down, time.monotonic(),
                                            tally.down, tally.up))
        client.close()
        upstream.close()

    @staticmethod
    def _abort(a: socket.socket, b: socket.socket, failed: threading.Event) -> None:
        failed.set()
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _read_client(self, client: socket.socket, upstream: socket.socket,
                     line: queue.Queue[tuple[float, bytes | None]], ready: float, failed: threading.Event) -> None:
        """Client -> delay line: each chunk stamped with the time it may leave."""
        try:
            while True:
                data = client.recv(BUF)
                release = max(time.monotonic(), ready) + self._shape.latency
                if not self._put(line, (release, data or None), failed) or not data:
                    return
        except OSError:
            self._abort(client, upstream, failed)
            self._put(line, (0.0, None), failed)

    @staticmethod
    def _put(line: queue.Queue[tuple[float, bytes | None]], item: tuple[float, bytes | None],
             failed: threading.Event) -> bool:
        """Blocks while the delay line is full; gives up once the connection has failed (the writer is gone)."""
        while True:
            try:
                line.put(item, timeout=0.2)
                return True
            except queue.Full:
                if failed.is_set():
                    return False

    def _write_upstream(self, upstream: socket.socket, line: queue.Queue[tuple[float, bytes | None]],
                        client: socket.socket, failed: threading.Event, tally: _Tally) -> None:
        """Delay line -> upstream, each chunk at its release time, under the upload bucket."""
        bucket = _Bucket()
        try:
            while True:
                release, data = line.get()
                if data is None:
                    if not failed.is_set():
                        upstream.shutdown(socket.SHUT_WR)  # the client's half-close, passed on
                    return
                wait = release - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                view = memoryview(data)
                while view:
                    rate = self._shape.rate
                    piece = view[:read_size(rate)]
                    bucket.take(len(piece), rate)
                    upstream.sendall(piece)
                    tally.up += len(piece)
                    with self._lock:
                        self._up += len(piece)
                    view = view[len(piece):]
        except OSError:
            self._abort(client, upstream, failed)

    def _pump_down(self, upstream: socket.socket, client: socket.socket, failed: threading.Event,
                   tally: _Tally) -> None:
        """Upstream -> client under the download bucket; reads no more than the bucket allows, so the upstream
        is held back by TCP flow control, not by our memory."""
        bucket = _Bucket()
        buf = bytearray(BUF)
        view = memoryview(buf)
        try:
            while True:
                rate = self._shape.rate
                n = upstream.recv_into(view[:read_size(rate)])
                if not n:
                    client.shutdown(socket.SHUT_WR)
                    return
                bucket.take(n, rate)
                if tally.first_down is None:
                    tally.first_down = time.monotonic()
                client.sendall(view[:n])
                tally.last_down = time.monotonic()
                tally.down += n
                with self._lock:
                    self._down += n
        except OSError:
            self._abort(client, upstream, failed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A throttling TCP proxy (per-connection rate cap, latency).")
    p.add_argument("upstream", help="http://host:port of the registry")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on (default 127.0.0.1:0)")
    p.add_argument("--rate-mbs", type=float, default=0.0, help="MB/s (10^6) per connection; 0: no cap")
    p.add_argument("--latency-ms", type=float, default=0.0, help="first-byte latency per request (ms)")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    proxy = ThrottleProxy(args.upstream, rate=args.rate_mbs * 1e6 or None, latency=args.latency_ms / 1000,
                          listen=(host, int(port)))
    with proxy:
        print(f"{proxy.url} -> {args.upstream} ({proxy.shape})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
