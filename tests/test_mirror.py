"""--mirror HOST=URL: a real pull-through mirror (a second docker-registry with proxy.remoteurl) is tried first;
a dead or failing mirror falls back to the registry itself."""

from __future__ import annotations

import io
import os

import pytest

from loader.log import Logger
from loader.pull import PullOptions, pull
from tests.support.faultproxy import FaultProxy
from tests.support.files import tree
from tests.support.oci import Pusher, file_layer
from tests.support.registry import free_port, start_registry

DATA = {"w.bin": os.urandom(4 << 20), "tok/t.json": b"{}"}


@pytest.fixture(scope="module")
def upstream_and_mirror():
    upstream = start_registry()
    Pusher(upstream.url).push_artifact("models/m", "v1", [file_layer(n, d) for n, d in DATA.items()])
    mirror = start_registry(extra_config=f"proxy: {{remoteurl: {upstream.url}}}\n")
    yield upstream, mirror
    mirror.cleanup()
    upstream.cleanup()


def run(ref, cache, mirrors):
    stream = io.StringIO()
    res = pull(ref, PullOptions(cache=cache, progress="none", plain_http=True, mirrors=mirrors), Logger(stream))
    return res, stream.getvalue()


def test_mirror_is_used_first(upstream_and_mirror, tmp_path):
    upstream, mirror = upstream_and_mirror
    with FaultProxy(upstream.url) as up, FaultProxy(mirror.url) as mp:
        res, log = run(f"{up.host}/models/m:v1", tmp_path, {up.host: [mp.url]})
        assert tree(res.path) == DATA
        assert up.requests == []  # nothing reached the registry itself
        assert len(mp.blob_requests()) == 2
        assert all(f"ns={up.host}".replace(":", "%3A") in r.path for r in mp.requests)
        assert "mirror.fallback" not in log


def test_dead_mirror_falls_back_to_registry(upstream_and_mirror, tmp_path):
    upstream, _ = upstream_and_mirror
    dead = f"http://127.0.0.1:{free_port()}"
    with FaultProxy(upstream.url) as up:
        res, log = run(f"{up.host}/models/m:v1", tmp_path, {up.host: [dead]})
        assert tree(res.path) == DATA
        assert len(up.blob_requests()) == 2
        assert f"event=mirror.fallback mirror={dead[7:]} registry={up.host}" in log


def test_failing_mirror_falls_back_per_request(upstream_and_mirror, tmp_path):
    upstream, mirror = upstream_and_mirror
    with FaultProxy(upstream.url) as up, FaultProxy(mirror.url) as mp:
        mp.set_faults(status_503=100, status_503_match="/blobs/", retry_after="0")
        res, log = run(f"{up.host}/models/m:v1", tmp_path, {up.host: [mp.url]})
        assert tree(res.path) == DATA
        assert len(up.blob_requests()) == 2 and "mirror.fallback" in log


class _LyingMirror:
    """A mirror that has no manifests (404: those fall back per request) and answers every blob GET with 100 bytes
    and a Content-Range saying the blob is 100 bytes long: a broken cache, not the registry's truth."""

    def __init__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body: bool):
                if "/blobs/" not in self.path:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", "bytes 0-99/100")
                self.send_header("Content-Length", "100")
                self.end_headers()
                if body:
                    self.wfile.write(b"x" * 100)

            def do_GET(self):
                self._answer(True)

            def do_HEAD(self):
                self._answer(False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_mirror_reporting_another_blob_size_falls_back_to_registry(upstream_and_mirror, tmp_path):
    upstream, _ = upstream_and_mirror
    liar = _LyingMirror()
    try:
        with FaultProxy(upstream.url) as up:
            res, log = run(f"{up.host}/models/m:v1", tmp_path, {up.host: [liar.url]})
            assert tree(res.path) == DATA
            assert len(up.blob_requests()) == 2  # both blobs from the registry: the mirror was passed over
            fallbacks = [line for line in log.splitlines() if "event=mirror.fallback" in line and "reports 100 bytes" in line]
            # Then the mirror is dead for the rest of the pull (both blobs may have asked it before either saw why).
            assert len(fallbacks) in (1, 2)
    finally:
        liar.close()


def test_a_mirror_urls_password_never_reaches_the_output(upstream_and_mirror, tmp_path):
    """--mirror with user:password@ (a live mirror, then a dead one): the CLI's output names the mirror by
    host:port only."""
    import subprocess
    import sys

    upstream, mirror = upstream_and_mirror
    secret = "mirror-pw-never-shown"
    dead = f"127.0.0.1:{free_port()}"
    with FaultProxy(upstream.url) as up, FaultProxy(mirror.url) as mp:
        for mirror_host, cache in ((mp.host, "c1"), (dead, "c2")):
            cmd = [sys.executable, "-m", "loader.cli", "pull", f"{up.host}/models/m:v1", "--progress", "none",
                   "--cache", str(tmp_path / cache), "--mirror", f"{up.host}=http://mu:{secret}@{mirror_host}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            assert secret not in out.stderr and secret not in out.stdout
        assert mp.requests
        assert f"event=mirror.fallback mirror={dead} registry={up.host}" in out.stderr
