"""Running the app: uvicorn with one worker on the reloading TLS context, and JSON-lines logging.

One worker because the inventory lives in the process: several workers would each list and watch the whole
cluster. Scale by replicas instead.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING, TextIO

import uvicorn

from webhook.tls import ReloadingContext

if TYPE_CHECKING:
    from fastapi import FastAPI

# Longer than the apiserver's idle-connection timeout (90 s), so the apiserver, not us, closes idle keep-alive
# connections: a server-side close racing a new request on the same connection would fail that admission.
KEEP_ALIVE_SECONDS = 120


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


def make_server(app: FastAPI, tls: ReloadingContext, *, host: str = "0.0.0.0", port: int = 8443) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=1,
        loop="uvloop",  # with httptools, about 4x the requests per CPU second of asyncio + h11 (bench/admission.py)
        http="httptools",
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
