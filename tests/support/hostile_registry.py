"""A server that answers what a test tells it to: crafted statuses, headers, bodies, redirects and challenges, on
127.0.0.1, over plain http or TLS. It plays a lying registry, a mirror, a token realm or blob storage, and records
every request it receives (method, path, headers, body), so a test can assert where ``Authorization`` went, and
that nothing arrived where nothing should.

    with HostileServer(tls=True) as reg:
        reg.on("GET", r"/v2/m/manifests/.*", Answer(302, {"Location": "http://127.0.0.1:1/x"}))
        reg.url, reg.host, reg.requests, reg.authorizations()

Routes are tried newest first; a route's answer is an ``Answer`` or a function of the request (``Seen``) that
returns one. Unrouted requests get a distribution-style 404. ``require_basic`` and ``require_bearer`` wrap a
route so it answers 401 with a challenge until the request carries the expected credentials.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import re
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.auth_registry import TLSFiles, make_tls_files

_TLS: TLSFiles | None = None
_TLS_LOCK = threading.Lock()


def _tls_files() -> TLSFiles:
    """One throwaway certificate (127.0.0.1, localhost) per test process: key generation is the slow part."""
    global _TLS
    with _TLS_LOCK:
        if _TLS is None:
            workdir = Path(tempfile.mkdtemp(prefix="mc-hostile-tls-"))
            atexit.register(shutil.rmtree, workdir, True)
            _TLS = make_tls_files(workdir)
        return _TLS


@dataclass(frozen=True)
class Seen:
    """One request as the server received it. Header names are lower-cased."""

    method: str
    path: str  # with the query
    headers: Mapping[str, str]
    body: bytes

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    def text(self) -> str:
        """Everything the client sent, as text, to search for a secret anywhere in it."""
        return " ".join([self.method, self.path, *(f"{k}: {v}" for k, v in self.headers.items()),
                         self.body.decode("latin-1")])


@dataclass
class Answer:
    status: int = 200
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = ()
    body: bytes = b""
    content_length: bool = True  # False: no Content-Length, the body ends when the connection closes

    def header_items(self) -> list[tuple[str, str]]:
        items = self.headers.items() if isinstance(self.headers, Mapping) else self.headers
        return list(items)


Route = Answer | Callable[[Seen], Answer]


def json_answer(status: int, doc: object, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(doc).encode())


def error_answer(status: int, code: str, message: str = "", headers: Mapping[str, str] | None = None) -> Answer:
    return json_answer(status, {"errors": [{"code": code, "message": message or code.lower()}]}, headers)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def require_basic(user: str, password: str, then: Route, realm: str = "hostile") -> Callable[[Seen], Answer]:
    want = basic(user, password)

    def answer(seen: Seen) -> Answer:
        if seen.authorization != want:
            return error_answer(401, "UNAUTHORIZED", headers={"WWW-Authenticate": f'Basic realm="{realm}"'})
        return then(seen) if callable(then) else then

    return answer


def require_bearer(token: str, realm: str, then: Route, service: str = "hostile") -> Callable[[Seen], Answer]:
    def answer(seen: Seen) -> Answer:
        if seen.authorization != f"Bearer {token}":
            challenge = f'Bearer realm="{realm}",service="{service}"'
            return error_answer(401, "UNAUTHORIZED", headers={"WWW-Authenticate": challenge})
        return then(seen) if callable(then) else then

    return answer


@dataclass
class _Route:
    method: str | None
    pattern: re.Pattern[str]
    answer: Route


class HostileServer:
    def __init__(self, tls: bool = False) -> None:
        self.tls = tls
        self.requests: list[Seen] = []
        self.routes: list[_Route] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # --- set-up --------------------------------------------------------------------------------------------
    def on(self, method: str | None, pattern: str, answer: Route) -> HostileServer:
        """Answer requests whose path (query included) matches ``pattern`` (re.fullmatch) and method ``method``
        (None: any) with ``answer``. Later routes win."""
        with self._lock:
            self.routes.insert(0, _Route(method, re.compile(pattern), answer))
        return self

    def start(self) -> HostileServer:
        handler = type("_BoundHandler", (_Handler,), {"hostile": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]  # kept after stop(): tests name a server that went away
        if self.tls:
            files = _tls_files()
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(files.cert_path), str(files.key_path))
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="hostile", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests read -----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._port, "start() the server first"
        return self._port

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self.requests)

    def authorizations(self) -> list[str | None]:
        return [s.authorization for s in self.seen()]

    def everything_received(self) -> str:
        return "\n".join(s.text() for s in self.seen())

    # --- serving -------------------------------------------------------------------------------------------
    def _answer_for(self, seen: Seen) -> Answer:
        with self._lock:
            self.requests.append(seen)
            routes = list(self.routes)
        for r in routes:
            if (r.method is None or r.method == seen.method) and r.pattern.fullmatch(seen.path):
                return r.answer(seen) if callable(r.answer) else r.answer
        return error_answer(404, "NOT_FOUND", f"nothing at {seen.path}")


class _Handler(BaseHTTPRequestHandler):
    hostile: HostileServer  # bound by HostileServer.start
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self._body())
        answer = self.hostile._answer_for(seen)
        self.send_response(answer.status)
        items = answer.header_items()
        names = {k.lower() for k, _ in items}
        if answer.content_length and "content-length" not in names:
            self.send_header("Content-Length", str(len(answer.body)))
        if not answer.content_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        for k, v in items:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and answer.body:
            try:
                self.wfile.write(answer.body)
            except OSError:
                self.close_connection = True  # the client stopped reading: what a bounded reader does

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


@dataclass
class FakeRegistry:
    """Honest content on a HostileServer: manifests by tag and digest, blobs with Range, for tests that need a
    registry to redirect from or a mirror to lie about it. Register with ``serve(server, repo)``."""

    manifests: dict[str, bytes] = field(default_factory=dict)  # tag or digest -> bytes
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes
    media_type: str = "application/vnd.oci.image.manifest.v1+json"

    def manifest_answer(self, seen: Seen) -> Answer:
        ref = seen.path.split("?", 1)[0].rsplit("/", 1)[-1]
        data = self.manifests.get(ref)
        if data is None:
            return error_answer(404, "MANIFEST_UNKNOWN")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return Answer(200, {"Content-Type": self.media_type, "Docker-Content-Digest": digest}, data)

    def blob_answer(self, seen: Seen) -> Answer:
        digest = seen.path.split("?", 1)[0].rsplit("/", 1)[-1]
        data = self.blobs.get(digest)
        if data is None:
            return error_answer(404, "BLOB_UNKNOWN")
        rng = seen.headers.get("range")
        if rng:
            first_s, _, last_s = rng.removeprefix("bytes=").partition("-")
            first, last = int(first_s), int(last_s) if last_s else len(data) - 1
            return Answer(206, {"Content-Range": f"bytes {first}-{last}/{len(data)}"}, data[first:last + 1])
        return Answer(200, {"Content-Type": "application/octet-stream"}, data)

    def serve(self, server: HostileServer, repo: str, wrap: Callable[[Route], Route] = lambda r: r) -> None:
        server.on(None, rf"/v2/{re.escape(repo)}/manifests/[^/?]+(\?.*)?", wrap(self.manifest_answer))
        server.on(None, rf"/v2/{re.escape(repo)}/blobs/sha256:[0-9a-f]{{64}}(\?.*)?", wrap(self.blob_answer))
