"""An OCI 1.1 referrers API in front of a real registry (Distribution 2.8 has none), on 127.0.0.1.

Every request goes through to the registry unchanged (Host included, so the registry's Location headers name the
proxy), except ``GET /v2/<name>/referrers/<digest>``, which the proxy answers itself: an image index of the
manifests with that ``subject`` pushed through it (``artifactType`` from the manifest, or its config's media type),
as a registry with the API would. A manifest PUT with a subject is answered with the ``OCI-Subject`` header.

    with ReferrersProxy(registry.url) as proxy:
        proxy.host                      # 127.0.0.1:PORT, for refs
        proxy.referrers                 # {subject digest: [descriptor, ...]}
        proxy.requests                  # [(method, path), ...]
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_REFERRERS = re.compile(r"^/v2/(?P<repo>.+)/referrers/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)$")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}


@dataclass
class ReferrersProxy:
    upstream: str  # http://127.0.0.1:PORT
    referrers: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ReferrersProxy:
        proxy = self
        up = urllib.parse.urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._handle()

            def do_HEAD(self) -> None:
                self._handle()

            def do_PUT(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def do_PATCH(self) -> None:
                self._handle()

            def do_DELETE(self) -> None:
                self._handle()

            def _handle(self) -> None:
                proxy.requests.append((self.command, self.path))
                path = urllib.parse.urlsplit(self.path).path
                m = _REFERRERS.match(path)
                if m and self.command == "GET":
                    return self._answer_referrers(m["repo"], m["digest"])
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                extra: dict[str, str] = {}
                mm = _MANIFEST.match(path)
                if self.command == "PUT" and mm:
                    extra = proxy._record(mm["repo"], body, self.headers.get("Content-Type", ""))
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST", "PATCH")
                                 else None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read() if self.command != "HEAD" else b""
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    for k, v in extra.items():
                        if 200 <= resp.status < 300:
                            self.send_header(k, v)
                    length_header = resp.getheader("Content-Length")
                    self.send_header("Content-Length", length_header if self.command == "HEAD" and length_header
                                     else str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            def _answer_referrers(self, repo: str, digest: str) -> None:
                index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": list(proxy.referrers.get((repo, digest), []))}
                data = json.dumps(index).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _record(self, repo: str, body: bytes, media_type: str) -> dict[str, str]:
        try:
            manifest = json.loads(body)
        except ValueError:
            return {}
        subject = manifest.get("subject") if isinstance(manifest, dict) else None
        if not isinstance(subject, dict) or not isinstance(subject.get("digest"), str):
            return {}
        desc = {"mediaType": manifest.get("mediaType", media_type),
                "digest": "sha256:" + hashlib.sha256(body).hexdigest(), "size": len(body),
                "artifactType": manifest.get("artifactType") or (manifest.get("config") or {}).get("mediaType")}
        found = self.referrers.setdefault((repo, subject["digest"]), [])
        if desc not in found:
            found.append(desc)
        return {"OCI-Subject": subject["digest"]}

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
