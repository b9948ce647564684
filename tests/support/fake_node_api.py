"""A stand-in for the two node calls of ``prefetch --untaint``: ``GET`` and ``PATCH /api/v1/nodes/NAME``, over TLS
on 127.0.0.1 with a CA of its own, checking the bearer token as the API server does.

PATCH accepts ``application/merge-patch+json`` (RFC 7386: objects merge, lists and scalars replace, null
deletes) with the API server's optimistic concurrency: a ``metadata.resourceVersion`` in the patch that is not the
stored one is answered 409 Conflict. :meth:`FakeNodeApi.concurrent_writes` makes another writer change the node just
before each of the next N PATCHes, which is how a test provokes the conflict a busy node really sees.
"""

from __future__ import annotations

import copy
import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.tls import new_bundle
from webhook import certs

PREFIX = "/api/v1/nodes/"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    content_type: str | None
    body: dict | None
    status: int


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def status_body(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}


class FakeNodeApi:
    def __init__(self, workdir: Path, token: str = "test-token") -> None:
        self.token = token
        self.nodes: dict[str, dict] = {}
        self.requests: list[Request] = []
        self._rv = 100
        self._writes_before_patch = 0
        self._lock = threading.Lock()
        bundle = new_bundle()
        paths = certs.write_bundle(bundle, workdir / "tls")
        self.ca_file = paths[certs.CA_CERT_FILE]
        self.token_file = workdir / "token"
        self.token_file.write_text(token + "\n")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(paths[certs.TLS_CERT_FILE], paths[certs.TLS_KEY_FILE])
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # ---- test controls -------------------------------------------------------------------------------------------
    def put(self, node: dict) -> None:
        with self._lock:
            node = copy.deepcopy(node)
            node.setdefault("metadata", {})["resourceVersion"] = self._next_rv()
            self.nodes[node["metadata"]["name"]] = node

    def get(self, name: str) -> dict:
        with self._lock:
            return copy.deepcopy(self.nodes[name])

    def concurrent_writes(self, n: int) -> None:
        """Before each of the next ``n`` PATCHes, another writer adds a label (bumping resourceVersion)."""
        self._writes_before_patch = n

    def env(self) -> dict[str, str]:
        """What the loader reads in a pod, pointing here."""
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port),
                "MODEL_LOADER_KUBE_TOKEN_FILE": str(self.token_file), "MODEL_LOADER_KUBE_CA_FILE": str(self.ca_file)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- the server ----------------------------------------------------------------------------------------------
    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _serve(self, method: str, path: str, auth: str | None, ctype: str | None, raw: bytes) -> tuple[int, dict]:
        if auth != f"Bearer {self.token}":
            return 401, status_body(401, "Unauthorized", "Unauthorized")
        if not path.startswith(PREFIX) or "/" in path[len(PREFIX):]:
            return 404, status_body(404, "NotFound", f"no route {path}")
        name = path[len(PREFIX):]
        with self._lock:
            node = self.nodes.get(name)
            if node is None:
                return 404, status_body(404, "NotFound", f'nodes "{name}" not found')
            if method == "GET":
                return 200, copy.deepcopy(node)
            if ctype != "application/merge-patch+json":
                return 415, status_body(415, "UnsupportedMediaType", f"unsupported patch type {ctype}")
            if self._writes_before_patch:
                self._writes_before_patch -= 1
                labels = node["metadata"].setdefault("labels", {})
                labels[f"other-writer/{self._rv}"] = "true"
                node["metadata"]["resourceVersion"] = self._next_rv()
            patch = json.loads(raw)
            want = (patch.get("metadata") or {}).get("resourceVersion")
            if want is not None and want != node["metadata"]["resourceVersion"]:
                return 409, status_body(409, "Conflict", f'Operation cannot be fulfilled on nodes "{name}": the'
                                                         " object has been modified; please apply your changes to"
                                                         " the latest version and try again")
            new = merge_patch(node, patch)
            new["metadata"]["resourceVersion"] = self._next_rv()
            self.nodes[name] = new
            return 200, copy.deepcopy(new)

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _do(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ctype = self.headers.get("Content-Type")
                status, body = api._serve(self.command, self.path, self.headers.get("Authorization"), ctype, raw)
                api.requests.append(Request(self.command, self.path, ctype if raw else None,
                                            json.loads(raw) if raw else None, status))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = _do

            def log_message(self, *args) -> None:
                pass

        return Handler
