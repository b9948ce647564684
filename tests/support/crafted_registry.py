"""A registry of a tenant's (or an attacker's) own, on 127.0.0.1: it serves exactly the manifests, headers and blob
bytes a test crafts, including ones no honest registry would (a digest it does not hold, another digest in
``Docker-Content-Digest``, blob bytes that are not the blob, a trickle).

    with CraftedRegistry() as reg:
        reg.manifests[("repo", "v1")] = (body_bytes, media_type)        # by tag or by "sha256:..." key
        reg.head_digest[("repo", "v1")] = "sha256:..."                 # lie in HEAD's Docker-Content-Digest
        reg.blobs["sha256:..."] = b"..."                               # served for any repository, Range honoured
        reg.trickle = {"sha256:...": 2.0}                              # one byte every 2 s for that blob
        reg.trickle = {"repo:tag": 2.0}                                # ... or for that manifest
        reg.trickle_head = {"sha256:...": 2.0}                         # the same for the answer's head
        reg.host, reg.requests

Only what the loader's pull path asks for is implemented: ``/v2/``, manifests (GET/HEAD) and blobs (GET/HEAD with
Range). Everything a test did not craft is a 404 with a distribution error body.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PATH = re.compile(r"^/v2/(?P<repo>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/?]+)$")


@dataclass
class Seen:
    method: str
    path: str
    range: str | None


@dataclass
class CraftedRegistry:
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    head_digest: dict[tuple[str, str], str] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    trickle: dict[str, float] = field(default_factory=dict)
    trickle_head: dict[str, float] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> CraftedRegistry:
        reg = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                reg.requests.append(Seen(self.command, self.path, self.headers.get("Range")))
                if self.path == "/v2/":
                    return self._send(200, b"{}", {"Content-Type": "application/json"}, head)
                m = _PATH.match(self.path)
                if not m:
                    return self._missing(head)
                repo, kind, ref = m["repo"], m["kind"], m["ref"]
                if kind == "manifests":
                    found = reg.manifests.get((repo, ref))
                    if found is None:  # a manifest is also served by its digest, as a registry does
                        found = next((v for (r, _), v in reg.manifests.items()
                                      if r == repo and "sha256:" + hashlib.sha256(v[0]).hexdigest() == ref), None)
                    if found is None:
                        return self._missing(head)
                    body, media_type = found
                    digest = reg.head_digest.get((repo, ref), "sha256:" + hashlib.sha256(body).hexdigest())
                    headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
                    return self._send(200, body, headers, head, key=f"{repo}:{ref}")
                data = reg.blobs.get(ref)
                if data is None:
                    return self._missing(head)
                start, end, status = 0, len(data) - 1, 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and len(data):
                    first, _, last = rng[6:].partition("-")
                    start = int(first)
                    end = min(int(last), len(data) - 1) if last else len(data) - 1
                    status = 206
                headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
                if status == 206:
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                part = data[start:end + 1]
                return self._send(status, part, headers, head, key=ref)

            def _missing(self, head: bool) -> None:
                body = json.dumps({"errors": [{"code": "NAME_UNKNOWN", "message": "not crafted"}]}).encode()
                self._send(404, body, {"Content-Type": "application/json"}, head)

            def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool, key: str = "") -> None:
                """The answer, its head written a byte every ``trickle_head[key]`` s and its body a byte every
                ``trickle[key]`` s when the test asked for either (a HEAD's body is never sent)."""
                lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}"]
                lines += [f"{k}: {v}" for k, v in {**headers, "Content-Length": str(len(body))}.items()]
                try:
                    self._write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), reg.trickle_head.get(key))
                    if not head:
                        self._write(body, reg.trickle.get(key))
                except OSError:
                    self.close_connection = True

            def _write(self, data: bytes, delay: float | None) -> None:
                if delay is None:
                    self.wfile.write(data)
                    return
                for i in range(len(data)):
                    if reg._stop.wait(delay):
                        raise OSError("registry stopped")
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        time.sleep(0)

    def blob_gets(self) -> list[Seen]:
        return [r for r in self.requests if r.method == "GET" and "/blobs/" in r.path]
