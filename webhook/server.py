"""Running the app: uvicorn with one worker on the reloading TLS context, and JSON-lines logging.

One worker because the inventory lives in the process: several workers would each list and watch the whole
cluster. Scale by replicas instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import sys
import time
import traceback
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, TextIO

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from webhook.tls import ReloadingContext

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Receive, Scope, Send

# Longer than the apiserver's idle-connection timeout (90 s), so the apiserver, not us, closes idle keep-alive
# connections: a server-side close racing a new request on the same connection would fail that admission.
KEEP_ALIVE_SECONDS = 120

# httptools (llhttp) accumulates the request line and each header value for as long as their line does not end,
# and uvicorn times nothing out until the headers are complete: a client sending one header forever would grow
# the process without bound, and one trickling them would hold its connection forever. The API server's request
# line and headers are well under 4 KiB; these leave room for anything a client of ours sends.
MAX_HEAD_BYTES = 64 * 1024
HEAD_SECONDS = 10.0
_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"

# Open connections per listener, counted once TLS is up. The API server keeps a pool of HTTP/1.1 connections to
# each replica (one per review in flight, reused): tens, not hundreds. At the limit the connection idle longest
# (between requests, or connected and silent) is closed for the new one (a client retries a request on a reused
# connection that closed before answering), else the one longest in an unfinished request head; when every one is
# in a request past its head, the new one is closed. So idle connections cannot
# crowd the API server out, and busy ones each end within the head and body deadlines. Connections still in
# their TLS handshake are bounded by the file-descriptor limit set in serve (MAX_OPEN_FILES).
MAX_CONNECTIONS = 500
# The probe listener (kubelet's probes, Prometheus): its own few slots, so readiness is answered while an attacker
# holds every admission connection. It serves only PROBE_PATHS.
MAX_PROBE_CONNECTIONS = 16
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Every socket the process may hold: both listeners' connections, those in their TLS handshake (uvloop gives a
# handshake 60 s), the inventory's API connections. Past it accept() fails and the loop pauses accepting briefly.
MAX_OPEN_FILES = 2048


class Slots:
    """The open connections of one listener, at most ``limit``; the idle ones in the order they went idle, and the
    ones sending a request head, in the order they began it."""

    __slots__ = ("evicted", "heads", "idle", "limit", "open", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.idle: OrderedDict[BoundedHttpTools, None] = OrderedDict()
        # A head arrives in one write from the API server; one still arriving is a slow client's (or a slowloris'):
        # evictable after the idle ones, so trickled heads cannot hold every slot.
        self.heads: OrderedDict[BoundedHttpTools, None] = OrderedDict()
        self.evicted = 0  # connections closed for a new one
        self.refused = 0  # new connections closed because every one was in a request (past its head)

    def admit(self) -> bool:
        """Take a slot for a new connection, closing the longest-idle one at the limit, else the one longest in its
        head; False when every connection is in a request past its head."""
        if self.open >= self.limit:
            if not self.idle and not self.heads:
                self.refused += 1
                return False
            victim, _ = (self.idle or self.heads).popitem(last=False)
            victim.release()
            victim.transport.close()
            self.evicted += 1
        self.open += 1
        return True


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on the bytes and the time of a request's head (request line and
    headers), and on the number of open connections. Over ``max_head`` bytes the connection is answered 431 and
    closed; a connection that has not sent a whole head ``head_seconds`` after it opened (or after its first byte,
    for later requests on it) is closed. The check runs after each read is parsed, so at most ``max_head`` plus one
    read (256 KiB from uvloop) is held. The body has its own cap and deadline, in the app. Connections take a
    ``Slots`` slot of their listener (``slots``, or ``probe_slots`` on a port in ``probe_ports``)."""

    max_head = MAX_HEAD_BYTES
    head_seconds = HEAD_SECONDS
    # Set per server by make_server (class attributes of the subclass it makes).
    slots = Slots(MAX_CONNECTIONS)
    probe_slots = Slots(MAX_PROBE_CONNECTIONS)
    probe_ports: frozenset[int] = frozenset()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._slots: Slots | None = None  # the slots it holds one of, while it holds it

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        slots = self.probe_slots if self.server is not None and self.server[1] in self.probe_ports else self.slots
        if not slots.admit():
            transport.close()
            return
        self._slots = slots
        slots.idle[self] = None  # idle until its first byte
        self._head_timer = self.loop.call_later(self.head_seconds, self._head_timeout)

    def release(self) -> None:
        """Give up this connection's slot (once)."""
        if self._slots is not None:
            self._slots.idle.pop(self, None)
            self._slots.heads.pop(self, None)
            self._slots.open -= 1
            self._slots = None

    def data_received(self, data: bytes) -> None:
        if self._slots is not None:
            self._slots.idle.pop(self, None)
            if self._in_head and self not in self._slots.heads:
                self._slots.heads[self] = None  # until on_headers_complete
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_seconds, self._head_timeout)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head and not self.transport.is_closing():
            self._stop_head_timer()
            self.transport.write(_TOO_LARGE)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        if self._slots is not None:
            self._slots.heads.pop(self, None)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # the next bytes start the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for its next request (uvicorn armed the keep-alive timer): evictable, the longest-idle first.
        if self._slots is not None and self.timeout_keep_alive_task is not None and not self.transport.is_closing():
            self._slots.idle[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self.release()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def probe_only(app: ASGIApp, probe_ports: frozenset[int]) -> ASGIApp:
    """``app``, answering 404 on the probe listener for every path but PROBE_PATHS (admission is not served there)."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] == "http" and server is not None and server[1] in probe_ports and scope["path"] not in PROBE_PATHS:
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)

    return guarded


def make_server(
    app: FastAPI,
    tls: ReloadingContext,
    *,
    host: str = "0.0.0.0",
    port: int = 8443,
    probe_port: int | None = None,
    head_seconds: float = HEAD_SECONDS,
    max_head: int = MAX_HEAD_BYTES,
    max_connections: int = MAX_CONNECTIONS,
) -> uvicorn.Server:
    """The server for ``app``; ``probe_port``: the port (as bound) of the probe listener, if there is one."""
    probe_ports = frozenset() if probe_port is None else frozenset({probe_port})
    protocol = type(
        "BoundedHttpTools",
        (BoundedHttpTools,),
        {
            "head_seconds": head_seconds,
            "max_head": max_head,
            "slots": Slots(max_connections),
            "probe_slots": Slots(MAX_PROBE_CONNECTIONS),
            "probe_ports": probe_ports,
        },
    )
    config = uvicorn.Config(
        probe_only(app, probe_ports) if probe_ports else app,
        host=host,
        port=port,
        workers=1,
        loop="uvloop",  # with httptools, about 4x the requests per CPU second of asyncio + h11 (bench/admission.py)
        http=protocol,  # httptools, with bounds on the request head
        ssl_context_factory=lambda _config, _default: tls.context,
        log_config=None,  # configure_logging() owns the handlers
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        server_header=False,
        # The API server connects directly; no proxy's X-Forwarded-* headers are to be believed (and the middleware
        # that reads them costs a layer per request).
        proxy_headers=False,
    )
    return uvicorn.Server(config)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a caller that asked for port 0 learns the port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def limit_open_files(limit: int = MAX_OPEN_FILES) -> int:
    """Lower the soft file-descriptor limit to ``limit`` (never raise it); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(n for n in (soft, limit, hard) if n != resource.RLIM_INFINITY)
    if new != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new
