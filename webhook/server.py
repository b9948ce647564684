"""Running the app: uvicorn with one worker on the reloading TLS context, and JSON-lines logging.

One worker because the inventory lives in the process: several workers would each list and watch the whole
cluster. Scale by replicas instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, TextIO

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from webhook.tls import ReloadingContext

if TYPE_CHECKING:
    from fastapi import FastAPI

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


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on the bytes and the time of a request's head (request line and
    headers): over ``max_head`` bytes the connection is answered 431 and closed, after ``head_seconds`` since its
    first byte it is closed. The check runs after each read is parsed, so at most ``max_head`` plus one read
    (256 KiB from uvloop) is held. The body has its own cap and deadline, in the app."""

    max_head = MAX_HEAD_BYTES
    head_seconds = HEAD_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
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
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # the next bytes start the next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
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


def make_server(
    app: FastAPI,
    tls: ReloadingContext,
    *,
    host: str = "0.0.0.0",
    port: int = 8443,
    head_seconds: float = HEAD_SECONDS,
    max_head: int = MAX_HEAD_BYTES,
) -> uvicorn.Server:
    protocol = type("BoundedHttpTools", (BoundedHttpTools,), {"head_seconds": head_seconds, "max_head": max_head})
    config = uvicorn.Config(
        app,
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
