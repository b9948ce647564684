"""A thin stand-in for kube-apiserver's list/watch of nodes, namespaces and CSINodes, on 127.0.0.1 over plain HTTP.

There is no apiserver on these machines, and the inventory's reflector is exactly the part that needs one. This
speaks the protocol the reflector relies on and nothing more:

* ``GET /api/v1/{nodes,namespaces}`` and ``/apis/storage.k8s.io/v1/csinodes`` list, with ``limit``/``continue`` pagination and ``metadata.resourceVersion``;
* ``?watch=1&resourceVersion=N`` streams newline-delimited JSON events (chunked) after ``N``: ADDED, MODIFIED,
  DELETED, BOOKMARK (only when ``allowWatchBookmarks``); a version older than the compaction point gets an
  ERROR event with code 410, as the real server does; :meth:`FakeApiServer.expire` also cuts open watches
  with that ERROR, as a watch-cache reset does;
* ``timeoutSeconds`` ends a watch normally.

Tests drive it with :meth:`put`, :meth:`delete`, :meth:`bookmark`, :meth:`expire` and :meth:`fail_next`, and
inspect :attr:`requests`.

Any other path is a plain object store for the few objects the webhook itself reads and writes (its certificate
Secret, its webhook configurations): GET, POST to the collection (409 when the name exists) and PUT with
optimistic concurrency (409 when ``metadata.resourceVersion`` is stale), as the real server does.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

RESOURCES = {"nodes": ("Node", "NodeList"), "namespaces": ("Namespace", "NamespaceList"),
             "csinodes": ("CSINode", "CSINodeList")}
#: Where each resource is listed and watched.
PATHS = {"/api/v1/nodes": "nodes", "/api/v1/namespaces": "namespaces", "/apis/storage.k8s.io/v1/csinodes": "csinodes"}


@dataclass
class _Resource:
    objects: dict[str, dict] = field(default_factory=dict)
    log: list[tuple[int, str, dict]] = field(default_factory=list)  # (resourceVersion, type, object)
    compacted: int = 0  # watches from before this version get 410
    epoch: int = 0  # bumped by expire(): open watches end with 410
    ended: int = 0  # bumped by end_watches(): open watches end normally
    held: threading.Event = field(default_factory=threading.Event)  # set = lists answer; clear = they wait


@dataclass(frozen=True)
class Request:
    resource: str
    watch: bool
    resource_version: str | None
    params: dict[str, str]


class FakeApiServer:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rv = 100
        self._state = {name: _Resource() for name in RESOURCES}
        for state in self._state.values():
            state.held.set()
        self._failures: dict[tuple[str, bool], list[int]] = {}
        self._store: dict[str, dict] = {}  # other objects by their path (Secrets, webhook configurations)
        self._store_failures: dict[tuple[str, str], list[int]] = {}
        self.writes: list[tuple[str, str]] = []  # (method, path) of every POST/PUT to the store
        self._stopping = False
        self.requests: list[Request] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- driving it -------------------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def put(self, resource: str, obj: dict) -> int:
        """Create or update an object; watchers see ADDED or MODIFIED. Returns the new resourceVersion."""
        with self._cond:
            obj = copy.deepcopy(obj)
            kind = RESOURCES[resource][0]
            obj.setdefault("apiVersion", "v1")
            obj.setdefault("kind", kind)
            rv = self._next_rv()
            obj.setdefault("metadata", {})["resourceVersion"] = str(rv)
            state = self._state[resource]
            name = obj["metadata"]["name"]
            event = "MODIFIED" if name in state.objects else "ADDED"
            state.objects[name] = obj
            state.log.append((rv, event, obj))
            self._cond.notify_all()
            return rv

    def delete(self, resource: str, name: str) -> int:
        with self._cond:
            state = self._state[resource]
            obj = copy.deepcopy(state.objects.pop(name))
            rv = self._next_rv()
            obj["metadata"]["resourceVersion"] = str(rv)
            state.log.append((rv, "DELETED", obj))
            self._cond.notify_all()
            return rv

    def bookmark(self, resource: str) -> int:
        """Advance the version with no change and tell watchers (that asked for bookmarks) where it stands."""
        with self._cond:
            rv = self._next_rv()
            kind = RESOURCES[resource][0]
            marker = {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}}
            self._state[resource].log.append((rv, "BOOKMARK", marker))
            self._cond.notify_all()
            return rv

    def expire(self, resource: str) -> None:
        """Compact history: open watches get ERROR 410 and every version up to now becomes too old."""
        with self._cond:
            state = self._state[resource]
            state.compacted = self._rv
            state.log.clear()
            state.epoch += 1
            self._cond.notify_all()

    def end_watches(self, resource: str) -> None:
        """End open watches normally, as the server-side timeout does; clients resume from their last version."""
        with self._cond:
            self._state[resource].ended += 1
            self._cond.notify_all()

    def hold(self, resource: str) -> None:
        """Make list requests for ``resource`` wait until :meth:`release`."""
        self._state[resource].held.clear()

    def release(self, resource: str) -> None:
        self._state[resource].held.set()

    def wait_for_request(self, predicate, timeout: float = 30.0) -> Request | None:
        """The first request matching ``predicate``, waiting for it to arrive (None after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for r in self.requests:
                    if predicate(r):
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def put_silently(self, resource: str, obj: dict) -> None:
        """Change state without an event (as if the event had been compacted away): only a relist sees it."""
        with self._cond:
            obj = copy.deepcopy(obj)
            obj.setdefault("apiVersion", "v1")
            obj.setdefault("kind", RESOURCES[resource][0])
            obj.setdefault("metadata", {})["resourceVersion"] = str(self._next_rv())
            self._state[resource].objects[obj["metadata"]["name"]] = obj

    def fail_next(self, resource: str, *, watch: bool, status: int) -> None:
        """Answer the next list (or watch) request for ``resource`` with HTTP ``status``."""
        with self._cond:
            self._failures.setdefault((resource, watch), []).append(status)

    def requests_for(self, resource: str, *, watch: bool) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.resource == resource and r.watch == watch]

    # --- plain objects (GET/POST/PUT with resourceVersion conflicts) ------------------------------------

    def store_put(self, path: str, obj: dict) -> dict:
        """Seed or overwrite the object at ``path`` (e.g. /api/v1/namespaces/ns/secrets/name)."""
        with self._cond:
            obj = copy.deepcopy(obj)
            obj.setdefault("metadata", {})["resourceVersion"] = str(self._next_rv())
            self._store[path] = obj
            return copy.deepcopy(obj)

    def store_get(self, path: str) -> dict | None:
        with self._cond:
            return copy.deepcopy(self._store.get(path))

    def fail_next_store(self, method: str, path: str, status: int) -> None:
        """Answer the next ``method`` request on ``path`` with HTTP ``status`` (e.g. a stale 404 to force a race)."""
        with self._cond:
            self._store_failures.setdefault((method, path), []).append(status)

    def _store_request(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        with self._cond:
            pending = self._store_failures.get((method, path))
            if pending:
                code = pending.pop(0)
                return code, _status(code, "Injected", f"injected failure {code}")
            if method == "GET":
                if path not in self._store:
                    return 404, _status(404, "NotFound", f"{path} not found")
                return 200, copy.deepcopy(self._store[path])
            self.writes.append((method, path))
            if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
                return 400, _status(400, "BadRequest", "body must be an object with metadata.name")
            if method == "POST":
                path = f"{path}/{body['metadata']['name']}"
                if path in self._store:
                    return 409, _status(409, "AlreadyExists", f"{path} already exists")
                code = 201
            else:  # PUT
                if path not in self._store:
                    return 404, _status(404, "NotFound", f"{path} not found")
                stored_rv = self._store[path]["metadata"]["resourceVersion"]
                if body["metadata"].get("resourceVersion") != stored_rv:
                    return 409, _status(409, "Conflict", "the object has been modified; please apply your changes to the latest version")
                code = 200
            obj = copy.deepcopy(body)
            obj["metadata"]["resourceVersion"] = str(self._next_rv())
            self._store[path] = obj
            return code, copy.deepcopy(obj)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "not-checked"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for state in self._state.values():
            state.held.set()
        self._server.shutdown()
        self._server.server_close()

    # --- serving ----------------------------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # http.server's naming
                url = urlsplit(self.path)
                params = {k: v[-1] for k, v in parse_qs(url.query).items()}
                resource = PATHS.get(url.path.rstrip("/"))
                if resource is None:
                    self._json(*fake._store_request("GET", url.path.rstrip("/"), None))
                    return
                watch = params.get("watch") in ("1", "true")
                with fake._cond:
                    fake.requests.append(Request(resource, watch, params.get("resourceVersion"), params))
                    fake._cond.notify_all()
                    pending = fake._failures.get((resource, watch))
                    status = pending.pop(0) if pending else None
                    # A watch ends on expire()/end_watches() calls made after it was recorded, not before.
                    marks = (fake._state[resource].epoch, fake._state[resource].ended)
                if status is not None:
                    self._json(status, _status(status, "Injected", f"injected failure {status}"))
                elif watch:
                    self._watch(resource, params, marks)
                else:
                    self._list(resource, params)

            def _write(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except ValueError:
                    body = None
                self._json(*fake._store_request(method, urlsplit(self.path).path.rstrip("/"), body))

            def do_POST(self) -> None:
                self._write("POST")

            def do_PUT(self) -> None:
                self._write("PUT")

            def _json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _list(self, resource: str, params: dict[str, str]) -> None:
                fake._state[resource].held.wait(60)
                with fake._cond:
                    items = [copy.deepcopy(o) for _, o in sorted(fake._state[resource].objects.items())]
                    rv = fake._rv
                start, list_rv = 0, rv
                if params.get("continue"):
                    start_s, rv_s = params["continue"].split(":")
                    start, list_rv = int(start_s), int(rv_s)
                limit = int(params.get("limit") or 0) or len(items) or 1
                page = items[start : start + limit]
                meta: dict = {"resourceVersion": str(list_rv)}
                if start + limit < len(items):
                    meta["continue"] = f"{start + limit}:{list_rv}"
                self._json(
                    200, {"kind": RESOURCES[resource][1], "apiVersion": "v1", "metadata": meta, "items": page}
                )

            def _chunk(self, event: dict) -> None:
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _watch(self, resource: str, params: dict[str, str], marks: tuple[int, int]) -> None:
                since = int(params.get("resourceVersion") or 0)
                bookmarks = params.get("allowWatchBookmarks") in ("true", "1")
                deadline = time.monotonic() + float(params.get("timeoutSeconds") or 1800)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                state = fake._state[resource]
                try:
                    epoch, ended = marks
                    with fake._cond:
                        gone = since < state.compacted or state.epoch != epoch
                    if gone:
                        self._chunk(_gone(since, state.compacted))
                    else:
                        while True:
                            with fake._cond:
                                while True:
                                    if fake._stopping:
                                        return
                                    if state.epoch != epoch:
                                        gone = True
                                        break
                                    fresh = [e for e in state.log if e[0] > since]
                                    left = deadline - time.monotonic()
                                    if fresh or left <= 0 or state.ended != ended:
                                        break
                                    fake._cond.wait(left)
                            if gone:
                                self._chunk(_gone(since, state.compacted))
                                break
                            if not fresh:
                                break  # timeoutSeconds or end_watches(): a normal end
                            for rv, kind, obj in fresh:
                                since = rv
                                if kind != "BOOKMARK" or bookmarks:
                                    self._chunk({"type": kind, "object": obj})
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away: nothing to clean up
                self.close_connection = True

        return Handler


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _gone(since: int, compacted: int) -> dict:
    return {"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {since} ({compacted})")}
