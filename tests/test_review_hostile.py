"""A hostile review of the shared cache (issue 10): attacks a tenant, a registry of its own and a racing loader can
mount on a node cache, each asserting the SAFE behaviour (a failing test is a defect).

The pulls run as the webhook injects them for a shared cache (``--check-access``). The victim's bytes come from a
registry of the victim's own that the attacker never talks to; the attacker knows the victim's layer digests and
sizes (the threat model: "may know other tenants' references and digests") and runs a registry of its own
(tests/support/crafted_registry.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loader.cache import Cache
from loader.errors import LoaderError
from loader.log import Logger
from loader.pull import PullOptions, pull
from loader.retry import RetryPolicy
from tests.support.crafted_registry import CraftedRegistry
from tests.support.files import snapshot, tree
from tests.support.oci import OCI_MANIFEST, TITLE, UNPACK, sha256
from tests.support.registry import free_port

SECRET = os.urandom(40_000)  # the victim's private weights
CONFIG = b'{"tenant": "victim", "api_key": "victim-only"}'
VICTIM_FILES = {"weights.bin": SECRET, "config.json": CONFIG}
EMPTY = b"{}"
FAST_STALL = RetryPolicy(attempts=2, base_delay=0.05, rate_window=1.0, min_rate=1000)  # a trickle is cut in ~2 s


# ---- helpers -----------------------------------------------------------------------------------------------------
def layer(name: str, data: bytes, **extra: str) -> dict:
    return {"mediaType": "application/octet-stream", "digest": sha256(data), "size": len(data),
            "annotations": {TITLE: name, **extra}}


def manifest(layers: list[dict], note: str = "") -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(EMPTY), "size": 2},
           "layers": layers}
    if note:
        doc["annotations"] = {"note": note}
    return json.dumps(doc).encode()


def serve(reg: CraftedRegistry, repo: str, tag: str, files: dict[str, bytes], note: str = "") -> bytes:
    body = manifest([layer(n, d) for n, d in files.items()], note)
    reg.manifests[(repo, tag)] = (body, OCI_MANIFEST)
    reg.blobs[sha256(EMPTY)] = EMPTY
    for d in files.values():
        reg.blobs[sha256(d)] = d
    return body


def run(ref: str, cache: Path, **kw):
    opts = dict(progress="none", concurrency=4, check_access=True)
    opts.update(kw)
    return pull(ref, PullOptions(cache=cache, **opts), Logger(io.StringIO()))


def outcome(ref: str, cache: Path, **kw):
    """The pull's result, or the error it ended with (a LoaderError, or anything else: a crash)."""
    try:
        return run(ref, cache, **kw)
    except Exception as exc:  # noqa: BLE001  the tests assert on what it was
        return exc


def wait_until_downloading(partial: Path, whose: str) -> None:
    """Until a blob's partial file has bytes on disk (a download under way), at most 20 s."""
    deadline = time.monotonic() + 20
    while not (partial.exists() and partial.stat().st_blocks) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert partial.exists(), f"{whose} download never started"


def trees_holding(cache: Path, data: bytes) -> list[str]:
    """Every published model tree (by digest hex) with a file whose bytes are ``data``."""
    found = []
    models = cache / "models" / "sha256"
    for hexd in sorted(os.listdir(models)) if models.is_dir() else []:
        if data in tree(models / hexd).values():
            found.append(hexd)
    return found


def attacker_manifest_over(files: dict[str, bytes]) -> bytes:
    """A manifest of the attacker's own naming the victim's layer digests and sizes (no bytes needed)."""
    return manifest([layer("stolen-" + n, d) for n, d in files.items()], note="mallory")


@pytest.fixture
def victim_registry():
    with CraftedRegistry() as reg:
        reg.digest = sha256(serve(reg, "victim/private", "v1", VICTIM_FILES))  # type: ignore[attr-defined]
        yield reg


@pytest.fixture
def registry_files_slowly():
    """An honest registry behind a 0.5 MB/s per-connection cap (a blob lock holder under the 1 MiB/s share rate)."""
    from tests.support.throttle import ThrottleProxy

    files = {"w.bin": os.urandom(3 << 20)}
    with CraftedRegistry() as reg:
        serve(reg, "honest/m", "v1", files)
        with ThrottleProxy(f"http://{reg.host}", rate=500_000) as proxy:
            yield proxy.host, files


# ---- 1. a crashed loader's partial download ----------------------------------------------------------------------
def test_a_complete_partial_left_by_a_killed_victim_loader_is_not_taken_without_proof(tmp_path):
    """A victim loader SIGKILLed between its last write and the rename (OOM, pod deleted, node drain) leaves
    partial/<hex> and its state with every range done; gc keeps it for 24 h (STALE_PARTIAL). The attacker names
    the victim's layer digest and size in a manifest of its own: the blob is not in blobs/, so no proof of
    possession is asked for; the fetcher resumes the victim's partial, finds nothing left to download, hashes it,
    publishes it and links it into the attacker's tree. Its registry never served a byte of the blob."""
    cache = Cache(tmp_path / "cache").ensure()
    digest = sha256(SECRET)
    partial = cache.partial_path(digest)
    partial.write_bytes(SECRET)
    partial.with_name(partial.name + ".state").write_text(json.dumps(
        {"digest": digest, "size": len(SECRET), "ranges": [[0, len(SECRET), len(SECRET)]]}))
    with CraftedRegistry() as evil:
        evil.manifests[("mallory/m", "v1")] = (attacker_manifest_over({"weights.bin": SECRET}), OCI_MANIFEST)
        evil.blobs[sha256(EMPTY)] = EMPTY
        got = outcome(f"{evil.host}/mallory/m:v1", cache.root)
        asked = [r for r in evil.blob_gets() if digest[7:] in r.path]
    assert asked, "the pull never asked the attacker's registry for the blob it claims"  # (it holds none: 404)
    assert isinstance(got, LoaderError), f"exit 0 for a pod that never proved it holds {digest}: {got}"
    assert trees_holding(cache.root, SECRET) == []


# ---- 2. two loaders racing on one blob ---------------------------------------------------------------------------
def test_a_blob_another_tenant_is_downloading_is_not_taken_without_proof(tmp_path, victim_registry):
    """The attacker starts while the victim's first pull is downloading: the victim's blob is not in blobs/ yet,
    so no proof is asked; the attacker's fetcher waits on the blob lock, sees the blob appear when the victim
    publishes it, skips it (``_wanted`` is False) and builds its own model over the victim's bytes."""
    cache = tmp_path / "cache"
    victim_registry.trickle[sha256(SECRET)] = 0.00008  # ~3 s for the victim's 40 kB: a slow link
    victim: list[object] = []
    t = threading.Thread(target=lambda: victim.append(outcome(f"{victim_registry.host}/victim/private:v1", cache)))
    t.start()
    partial = cache / "partial" / sha256(SECRET)[7:]
    deadline = time.monotonic() + 30
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert partial.exists(), "the victim's download never started"
    with CraftedRegistry() as evil:
        evil.manifests[("mallory/m", "v1")] = (attacker_manifest_over({"weights.bin": SECRET}), OCI_MANIFEST)
        evil.blobs[sha256(EMPTY)] = EMPTY
        got = outcome(f"{evil.host}/mallory/m:v1", cache)
    t.join(60)
    assert victim and not isinstance(victim[0], LoaderError), victim
    assert (cache / "blobs/sha256" / sha256(SECRET)[7:]).exists(), "the race was not exercised"
    assert isinstance(got, LoaderError), f"exit 0 for a pod that never proved it holds the victim's blob: {got}"
    assert trees_holding(cache, SECRET) == [victim_registry.digest[7:]]


# ---- 3. a bundle that names blobs it does not carry --------------------------------------------------------------
def _bundle(path: Path, name: str, body: bytes, blobs: dict[str, bytes]) -> None:
    def add(tf: tarfile.TarFile, member: str, data: bytes) -> None:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    index = {"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(body), "size": len(body),
                                                 "annotations": {"io.containerd.image.name": name}}]}
    with tarfile.open(path, "w") as tf:
        add(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add(tf, "index.json", json.dumps(index).encode())
        add(tf, f"blobs/sha256/{sha256(body)[7:]}", body)
        for data in blobs.values():
            add(tf, f"blobs/sha256/{sha256(data)[7:]}", data)


@pytest.mark.parametrize("which", ["own-manifest", "victims-manifest"])
def test_a_bundle_without_the_blobs_it_names_imports_nothing_from_other_tenants(tmp_path, victim_registry, which):
    """An air-gap bundle (handed to the admin by a tenant) that names the victim's layer digests but carries none
    of them: import --cache skips blobs the cache already has (Fetcher.missing) without reading them from the
    bundle. With a manifest of its own it publishes a new model over the victim's bytes; with the victim's
    manifest (the model is already published) publish_model still adds the bundle's source. Either way the
    model is recorded as read *anonymously* from the registry the bundle names, and a pod naming that reference
    on a dead host (hostAliases, or just a closed port) gets the victim's bytes with exit 0."""
    cache = tmp_path / "cache"
    run(f"{victim_registry.host}/victim/private:v1", cache)
    name = f"127.0.0.1:{free_port()}/mallory/public:v1"  # nobody listens there: the outage is the attacker's
    bundle = tmp_path / "gift.tar"
    body = (attacker_manifest_over(VICTIM_FILES) if which == "own-manifest"
            else victim_registry.manifests[("victim/private", "v1")][0])
    _bundle(bundle, name, body, {"config": EMPTY})
    proc = subprocess.run([sys.executable, "-m", "loader.cli", "import", str(bundle), "--cache", str(cache)],
                          capture_output=True, text=True, timeout=60)
    got = outcome(name, cache)
    assert isinstance(got, LoaderError), f"a pod got the victim's bytes through a bundle that never held them: {got}"
    assert proc.returncode != 0, "import --cache published a model from blobs the bundle does not carry"
    assert trees_holding(cache, SECRET) == [victim_registry.digest[7:]]


# ---- 4. publish atomicity after a killed gc ----------------------------------------------------------------------
def test_a_tree_left_half_removed_by_a_killed_gc_is_never_served(tmp_path, victim_registry):
    """gc removes a model as refs, then meta, then the tree (loader/gc.py _remove_model). Killed inside
    remove_tree, it leaves models/sha256/<hex> with some files gone and no meta. The next pull of that digest
    writes the meta *before* its rename (Cache.publish_model), the rename fails (ENOTEMPTY: exit 1, traceback),
    and from then on the half tree has a meta: every later pull is a cache hit on a model missing files."""
    cache_dir = tmp_path / "cache"
    ref = f"{victim_registry.host}/victim/private@{victim_registry.digest}"
    first = run(ref, cache_dir)
    cache = Cache(cache_dir)
    model = Path(first.path)
    # What a gc killed mid-removal leaves: ref link and meta gone, directories made writable, a file removed.
    for link in (cache_dir / "refs").iterdir():
        link.unlink()
    cache.meta_path(victim_registry.digest).unlink()
    os.chmod(model, 0o755)
    (model / "weights.bin").unlink()

    second = outcome(ref, cache_dir)
    third = outcome(ref, cache_dir)
    assert not isinstance(third, BaseException), third
    assert tree(third.path) == VICTIM_FILES, "a model missing files is served as a cache hit"
    assert not isinstance(second, BaseException), second


# ---- 5. one tenant's slow download holds another tenant's pull ---------------------------------------------------
class SlowRegistry:
    """The attacker's registry: serves a manifest and, for one blob, endless junk at ``rate`` bytes/s (above the
    loader's minimum rate, so never "stalled") for a declared ``size`` (a lie the loader cannot check up front)."""

    def __init__(self, manifests: dict[tuple[str, str], bytes], blob: str, size: int, rate: int,
                 chunked: bool = False) -> None:
        self.manifests, self.blob, self.size, self.rate = manifests, blob, size, rate
        self.chunked = chunked  # one byte per chunk, ``rate`` chunks a second (Transfer-Encoding: chunked)
        self.stop = threading.Event()
        reg = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(False)

            def do_GET(self) -> None:
                self._serve(True)

            def _serve(self, body: bool) -> None:
                path = self.path
                for (repo, tag), data in reg.manifests.items():
                    if path in (f"/v2/{repo}/manifests/{tag}", f"/v2/{repo}/manifests/{sha256(data)}"):
                        return self._send(200, data, {"Content-Type": OCI_MANIFEST,
                                                      "Docker-Content-Digest": sha256(data)}, body)
                if path == "/v2/":
                    return self._send(200, b"{}", {"Content-Type": "application/json"}, body)
                if path.endswith(f"/blobs/{sha256(EMPTY)}"):
                    return self._send(200, EMPTY, {}, body)
                if not path.endswith(f"/blobs/{reg.blob}"):
                    return self._send(404, b"{}", {"Content-Type": "application/json"}, body)
                start = int((self.headers.get("Range") or "bytes=0-")[6:].partition("-")[0] or 0)
                if reg.chunked:
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        while body and not reg.stop.wait(1 / reg.rate):
                            self.wfile.write(b"1\r\nx\r\n")
                            self.wfile.flush()
                    except OSError:
                        pass
                    self.close_connection = True
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{reg.size - 1}/{reg.size}")
                self.send_header("Content-Length", str(reg.size - start))
                self.end_headers()
                chunk = b"\0" * (reg.rate // 20)
                try:
                    while body and not reg.stop.wait(0.05):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_tenant_downloading_a_blob_slowly_does_not_starve_another_tenants_pull(tmp_path, victim_registry):
    """Blob locks are keyed by digest alone. The attacker names the victim's layer digest with a made-up size
    (64 MiB: the partial file is sparse, so the free-space check passes) and serves junk at 320 kB/s, well above
    the 64 KiB/s minimum rate. The victim's pull waits on the lock while the attacker's partial keeps growing: it
    never gives up after lock_stall and ends only at its own deadline (30 min + size at 1 MB/s), then the kubelet
    retries into the same wait, for as long as the attacker keeps a pod downloading (64 MiB here is 3.5 min; a
    declared 100 GB is ~4 days). The victim's own registry would have served its 40 kB in milliseconds."""
    cache = tmp_path / "cache"
    digest = sha256(SECRET)
    body = manifest([{"mediaType": "application/octet-stream", "digest": digest, "size": 64 << 20,
                      "annotations": {TITLE: "w.bin"}}])
    evil = SlowRegistry({("mallory/m", "v1"): body}, digest, 64 << 20, 320_000)
    attacker: list[object] = []
    victim: list[object] = []
    a = threading.Thread(target=lambda: attacker.append(outcome(
        f"{evil.host}/mallory/m:v1", cache, policy=RetryPolicy(attempts=1))))
    a.start()
    try:
        wait_until_downloading(cache / "partial" / digest[7:], "the attacker's")
        t0 = time.monotonic()
        v = threading.Thread(target=lambda: victim.append(outcome(
            f"{victim_registry.host}/victim/private:v1", cache, lock_stall=2.0)))
        v.start()
        v.join(12)
        waited = time.monotonic() - t0
    finally:
        evil.close()
        a.join(60)
    v.join(60)
    assert victim and not isinstance(victim[0], BaseException), victim
    assert waited < 12, f"the victim's pull was held {waited:.0f}s (and counting) by another tenant's download"


def test_a_private_download_that_fails_its_digest_is_fetched_again_privately(tmp_path, registry_files_slowly):
    """An honest loader holds a blob's lock and downloads it slowly (under 1 MiB/s, so a waiter stops waiting);
    another tenant's manifest names the same digest and size on a registry that serves zeros. That pull downloads
    privately into tmp/, hashes wrong, and fetched again: into partial/<hex>, the holder's file, without the lock
    (review, seventh session). The holder then published the file at that path, which was no longer the one it
    had hashed: zeros in blobs/ for every tenant. Now the second try is private too, and a partial that names
    another file than the one hashed is never published."""
    host, files = registry_files_slowly
    data = files["w.bin"]
    digest = sha256(data)
    cache = tmp_path / "cache"
    sentinel = tmp_path / "outside"
    sentinel.mkdir()
    (sentinel / "keep").write_bytes(b"untouched")
    honest: list[object] = []
    holder = threading.Thread(target=lambda: honest.append(outcome(f"{host}/honest/m:v1", cache, check_access=False)))
    with CraftedRegistry() as evil:
        serve(evil, "mallory/m", "v1", files)
        evil.blobs[digest] = bytes(len(data))  # the right size, and zeros
        holder.start()
        try:
            wait_until_downloading(cache / "partial" / digest[7:], "the honest")
            mallory = outcome(f"{evil.host}/mallory/m:v1", cache, lock_stall=0.5, check_access=False)
        finally:
            holder.join(60)
    assert isinstance(mallory, LoaderError) and "hashed to" in str(mallory) and "twice" in str(mallory), mallory
    assert honest and not isinstance(honest[0], BaseException), honest
    assert tree(honest[0].path) == files  # type: ignore[union-attr]
    assert (cache / "blobs/sha256" / digest[7:]).read_bytes() == data
    assert sorted(os.listdir(cache / "partial")) == [] and sorted(os.listdir(cache / "tmp")) == []
    assert trees_holding(cache, data) == [Path(honest[0].path).name]  # type: ignore[union-attr]
    assert tree(sentinel) == {"keep": b"untouched"}


def test_a_chunked_trickle_is_cut_by_the_minimum_rate(tmp_path):
    """transport.Response.readinto reads one socket read at a time so that RateWatch sees a trickle, except for a
    chunked body: there it calls HTTPResponse.readinto, which loops until the buffer (up to 1 MiB, or the rest of
    the range) is full. A registry answering with Transfer-Encoding: chunked and a one-byte chunk just inside the
    socket timeout is never measured: it holds the blob lock (keyed by digest: another tenant's pull of the same
    blob gives up with LockTimeout, exit 7, every time) and the gc lock for as long as it likes."""
    cache = tmp_path / "cache"
    digest = sha256(SECRET)
    body = manifest([layer("w.bin", SECRET)])
    evil = SlowRegistry({("mallory/m", "v1"): body}, digest, len(SECRET), 20, chunked=True)
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(outcome(f"{evil.host}/mallory/m:v1", cache, policy=FAST_STALL)))
    t0 = time.monotonic()
    t.start()
    try:
        t.join(8)
        took = time.monotonic() - t0
    finally:
        evil.close()
        t.join(60)
    assert took < 8, (f"a 20 B/s chunked trickle held the blob lock {took:.0f}s under a policy whose minimum rate is"
                      f" {FAST_STALL.min_rate:.0f} B/s over {FAST_STALL.rate_window:.0f}s")
    assert done and isinstance(done[0], LoaderError) and "trickling" in str(done[0]), done


# ---- 6. the hard-link count of a shared blob ---------------------------------------------------------------------
def _hardlink_tar(target: str, n: int) -> bytes:
    import gzip

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(n):
            info = tarfile.TarInfo(f"d/h{i}")
            info.type = tarfile.LNKTYPE
            info.linkname = target
            tf.addfile(info)
    return gzip.compress(buf.getvalue(), compresslevel=1, mtime=0)


def test_a_tenant_cannot_use_up_the_hard_links_of_a_blob_other_tenants_share(tmp_path, victim_registry):
    """Model files are hard links to their blobs. A tar layer may hard-link to a file already in the tree, and a
    file layer is one: a model whose file layer 'd/LICENSE' is a common blob (a license text, a tokenizer that
    many models ship) and whose tar layer 'd' holds 64,998 hard links to it brings the blob's inode to ext4's
    65,000 (MAX_TAR_ENTRIES is 200,000). Every other tenant's pull of any model with that file then fails in
    materialize (os.link: EMLINK, exit 1 with a traceback) for as long as the attacker keeps its model used."""
    cache = tmp_path / "cache"
    license_text = b"Apache License, Version 2.0 " * 400
    # The attack needs the filesystem's link limit (ext4: 65,000) of links; the refusal comes at the first one, so
    # a few show it on any filesystem (no skip where the limit is higher).
    tar = _hardlink_tar("d/LICENSE", 100)
    with CraftedRegistry() as evil:
        body = manifest([layer("d/LICENSE", license_text),
                         {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(tar),
                          "size": len(tar), "annotations": {TITLE: "d", UNPACK: "true"}}])
        evil.manifests[("mallory/m", "v1")] = (body, OCI_MANIFEST)
        evil.blobs.update({sha256(EMPTY): EMPTY, sha256(license_text): license_text, sha256(tar): tar})
        mine = outcome(f"{evil.host}/mallory/m:v1", cache)
    # Refused: a tar's hard links may only name files of the same tar, never a shared blob's inode.
    assert isinstance(mine, LoaderError) and mine.exit_code == 8 and "shared blobs" in str(mine)
    assert os.stat(cache / "blobs/sha256" / sha256(license_text)[7:]).st_nlink == 1
    serve(victim_registry, "victim/other", "v1", {**VICTIM_FILES, "LICENSE": license_text})
    got = outcome(f"{victim_registry.host}/victim/other:v1", cache)
    assert not isinstance(got, BaseException), f"another tenant's pull fails: {got!r}"
    assert tree(got.path)["LICENSE"] == license_text


# ---- 7. the proof of possession is a transfer too ----------------------------------------------------------------
def test_a_trickled_proof_of_possession_is_cut_like_any_transfer(tmp_path):
    """possession_failures reads its 64-byte window with no minimum rate and no deadline: a registry sending one
    byte just inside the socket timeout (30 s) keeps a pull in the proof for ~30 min per cached blob of the model,
    holding the cache's gc lock (shared) all along, so gc on the node gives up (--wait) every time it runs."""
    cache = tmp_path / "cache"
    with CraftedRegistry() as evil:
        files = {"a.bin": os.urandom(5000)}
        serve(evil, "mallory/m", "v1", files)
        run(f"{evil.host}/mallory/m:v1", cache)  # its own model, cached: the next pull proves possession
        evil.trickle[sha256(files["a.bin"])] = 0.15  # 64 bytes in ~10 s
        done: list[object] = []
        t0 = time.monotonic()
        t = threading.Thread(target=lambda: done.append(outcome(f"{evil.host}/mallory/m:v1", cache,
                                                                policy=FAST_STALL)))
        t.start()
        t.join(5)
        took = time.monotonic() - t0
        t.join(30)
    assert took < 5, (f"the proof ran {took:.0f}s at 7 B/s under a policy whose minimum rate is"
                      f" {FAST_STALL.min_rate:.0f} B/s")


# ---- 8. who can write the sources record -------------------------------------------------------------------------
def test_another_tenant_cannot_push_the_victims_source_out_of_the_record(tmp_path):
    """add_source keeps the last 64 sources and never moves one it already has, so the first (the victim's, with
    its identity) is dropped first. A tenant that holds the same bytes (an open-weights model the victim mirrors
    privately) proves possession from 64 repositories of its own registry: the victim's record is gone, and the
    outage fallback the rule grants to the identity that read the model is refused to the victim."""
    from loader import credentials as creds_mod

    cache = tmp_path / "cache"
    files = {"weights.bin": os.urandom(8000)}
    cfg = tmp_path / "victim.json"
    with CraftedRegistry() as mine:
        serve(mine, "victim/private", "v1", files)
        import base64

        cfg.write_text(json.dumps({"auths": {mine.host: {"auth": base64.b64encode(b"victim:pw").decode()}}}))
        victim = creds_mod.load_docker_configs([str(cfg)], {})
        ref = f"{mine.host}/victim/private:v1"
        first = run(ref, cache, credentials=victim)
        recorded = Cache(cache).read_meta(first.digest)["sources"]
        assert [s["identity"].startswith("pbkdf2:") for s in recorded] == [True]  # the victim's identity
        with CraftedRegistry() as evil:
            for i in range(64):
                serve(evil, f"mallory/m{i}", "v1", files)
            for i in range(64):
                assert run(f"{evil.host}/mallory/m{i}:v1", cache).cache_hit
    # The victim's registry is down now (a real outage): its own identity read this model before.
    got = outcome(ref, cache, credentials=victim)
    assert not isinstance(got, BaseException), f"the victim's own outage fallback is refused: {got}"
    assert tree(got.path) == files


# ---- 10. the identity recorded for a model read through a mirror -------------------------------------------------
def test_a_model_read_with_a_mirrors_credentials_is_not_recorded_as_anonymous(tmp_path):
    """prefetch (the node agent) pulls with --mirror; a pull-through mirror of a private registry asks for its
    own credentials (user:password in the --mirror URL, or the mirror's docker-config entry). pull.py fingerprints
    only ``credentials_for(ref.registry)``: with none for the registry itself the model is recorded as read
    *anonymously* from registry/repository, and the outage fallback then gives it to any pod naming that
    reference (hostAliases makes the outage; pods get no --mirror)."""
    from tests.support.hostile_registry import FakeRegistry, HostileServer, require_basic

    registry = f"127.0.0.1:{free_port()}"  # the private upstream: reached only through the mirror here
    ref = f"{registry}/victim/private:v1"
    body = manifest([layer(n, d) for n, d in VICTIM_FILES.items()])
    fake = FakeRegistry(manifests={"v1": body, sha256(body): body},
                        blobs={sha256(d): d for d in [EMPTY, *VICTIM_FILES.values()]})
    cache = tmp_path / "cache"
    with HostileServer() as mirror:
        fake.serve(mirror, "victim/private", wrap=lambda r: require_basic("node-agent", "mirror-secret", r))
        url = f"http://node-agent:mirror-secret@{mirror.host}"
        warm = run(ref, cache, check_access=False, mirrors={registry: [url]})  # what prefetch does
        assert not warm.cache_hit and tree(warm.path) == VICTIM_FILES
    got = outcome(ref, cache)  # a tenant's pod: no credentials, no mirror, the registry "down"
    assert isinstance(got, LoaderError), f"a pod without any credential got a model read with the mirror's: {got}"
    assert got.exit_code == 7


# ---- 11. a plain-HTTP registry impersonated through hostAliases --------------------------------------------------
def test_a_tenant_impersonating_a_plain_http_registry_does_not_repoint_the_victims_tag(tmp_path, monkeypatch):
    """Plain HTTP is allowed for loopback and admin-listed registries, and nothing vouches for who answers there:
    a pod's hostAliases can point the victim's registry name at the attacker's server. The attacker then pulls
    the victim's exact tag: its server answers with a model of its own, which is published and recorded as read
    anonymously from the victim's registry/repository, and link_ref repoints the shared refs/<key> (what the
    victim's app mounts) at it. The victim's next pull during an outage gets the attacker's files: may_fall_back
    ignores that the recorded source came over plain HTTP."""
    import tests.support.crafted_registry as crafted

    cache = tmp_path / "cache"
    port = free_port()
    bind = crafted.ThreadingHTTPServer
    monkeypatch.setattr(crafted, "ThreadingHTTPServer", lambda _addr, handler: bind(("127.0.0.1", port), handler))
    ref = f"127.0.0.1:{port}/victim/private:v1"
    victim_pod = "5e1b0c9a-0000-4000-8000-00000000000a"
    with CraftedRegistry() as real:
        serve(real, "victim/private", "v1", VICTIM_FILES)
        mine = run(ref, cache, pod_uid=victim_pod)
    poison = {"weights.bin": b"attacker weights", "config.json": b'{"exfiltrate": true}'}
    with CraftedRegistry() as impostor:  # the same name, answered by the attacker's server (hostAliases)
        serve(impostor, "victim/private", "v1", poison)
        outcome(ref, cache)
    got = outcome(ref, cache)  # a new pod of the victim's, its registry down for a moment
    assert isinstance(got, LoaderError) or tree(got.path) == VICTIM_FILES, "the victim was served the attacker's files"
    # refs/<key> is only the tag's last resolution on this node (an impostor over plain HTTP can move it); what the
    # victim's running pod mounts is its pin (issue 15), which nothing but its own loader writes: a restart of that
    # pod, registry down, gets the digest it verified.
    restarted = outcome(ref, cache, pod_uid=victim_pod)
    assert not isinstance(restarted, BaseException) and restarted.digest == mine.digest, restarted
    assert tree(Path(os.path.realpath(cache / "pods" / victim_pod / os.listdir(cache / "pods" / victim_pod)[-1]))) \
        == VICTIM_FILES


# ---- what held: relatives of the attacks above that the access rule refuses (regression coverage) ----------------
@pytest.mark.parametrize("case", ["zero-size", "duplicate-wrong-size-first", "as-tar-layer",
                                  "victims-manifest-wrong-window"])
def test_relatives_that_hold(tmp_path, victim_registry, case):
    """A size that lies (0, or a wrong size listed first for a duplicate digest), the victim's blob as a tar layer,
    the victim's own manifest with junk blobs: each refused, the victim's blobs, tree, meta and refs unchanged."""
    cache = tmp_path / "cache"
    mine = run(f"{victim_registry.host}/victim/private:v1", cache)
    before = snapshot(cache)
    d = sha256(SECRET)
    junk = os.urandom(len(SECRET))
    layers = [layer("stolen.bin", SECRET)]
    body = None
    if case == "zero-size":
        layers = [{**layers[0], "size": 0}]
    elif case == "duplicate-wrong-size-first":
        layers = [{**layers[0], "size": len(SECRET) + 1, "annotations": {TITLE: "a.bin"}}, layers[0]]
    elif case == "as-tar-layer":
        layers = [{**layers[0], "annotations": {TITLE: "dir", UNPACK: "true"}}]
    elif case == "victims-manifest-wrong-window":
        body = victim_registry.manifests[("victim/private", "v1")][0]  # the victim's very model digest
    body = body or manifest(layers)
    with CraftedRegistry() as evil:
        evil.manifests[("mallory/m", "v1")] = (body, OCI_MANIFEST)
        evil.blobs.update({sha256(EMPTY): EMPTY, d: junk, sha256(CONFIG): os.urandom(len(CONFIG))})
        got = outcome(f"{evil.host}/mallory/m:v1", cache)
        proofs = [r for r in evil.blob_gets() if r.range]
    assert isinstance(got, LoaderError), got
    assert got.exit_code in (4, 5, 8), got
    assert trees_holding(cache, SECRET) == [mine.digest[7:]]
    assert {k: v for k, v in snapshot(cache).items() if k.startswith(("blobs", "models", "meta", "refs"))} == {
        k: v for k, v in before.items() if k.startswith(("blobs", "models", "meta", "refs"))}
    if case == "victims-manifest-wrong-window":
        assert proofs, "no proof of possession was asked for"


def test_a_trickled_manifest_is_cut_at_the_body_deadline(tmp_path, monkeypatch):
    """A registry sending its manifest a byte at a time, each well inside the socket's per-read timeout, used to hold
    the pull for as long as it liked (a 4 MiB manifest at one byte a second: weeks). The whole body has a deadline
    (transport.BODY_SECONDS, here shortened): the pull fails as a network error, the cache untouched."""
    from loader import transport
    from loader.errors import NetworkError

    monkeypatch.setattr(transport, "BODY_SECONDS", 1.0)
    cache = tmp_path / "cache"
    Cache(cache).ensure()
    with CraftedRegistry() as reg:
        serve(reg, "slow/model", "v1", {"w.bin": b"weights"})
        reg.trickle["slow/model:v1"] = 0.05  # ~ 400 bytes of manifest: 20 s, past the deadline
        before = snapshot(cache)
        err = outcome(f"{reg.host}/slow/model:v1", cache, policy=FAST_STALL)
        assert isinstance(err, NetworkError), err
        assert "too slowly" in str(err), str(err)  # cut by the body deadline, not by the end of the trickle
        assert snapshot(cache) == before


@pytest.mark.parametrize("what", ["manifest", "blob"])
def test_a_trickled_answer_head_is_cut_at_the_head_deadline(tmp_path, monkeypatch, what):
    """A registry sending the status line and headers of its answer a byte at a time, each inside the socket's
    per-read timeout (100 header lines of 64 KiB would take years), is cut when the head is not complete
    transport.HEAD_SECONDS (here shortened) after the request: the pull fails as a network error naming the head,
    the cache untouched. The same for a manifest's answer and a blob's."""
    from loader import transport
    from loader.errors import NetworkError

    monkeypatch.setattr(transport, "HEAD_SECONDS", 1.0)
    cache = tmp_path / "cache"
    Cache(cache).ensure()
    with CraftedRegistry() as reg:
        serve(reg, "slow/model", "v1", {"w.bin": b"weights"})
        key = "slow/model:v1" if what == "manifest" else sha256(b"weights")
        reg.trickle_head[key] = 0.05  # a head of ~150 bytes: 7 s, past the deadline
        before = snapshot(cache)
        err = outcome(f"{reg.host}/slow/model:v1", cache, policy=FAST_STALL)
        assert isinstance(err, NetworkError), err
        assert "sent the head of its answer too slowly: not complete 1 s after the request" in str(err), str(err)
        if what == "manifest":
            assert snapshot(cache) == before
        else:  # the manifest's head came whole; only the blob's was cut, and its partial (kept for a resume) is empty
            assert [r.method for r in reg.requests if "/blobs/" in r.path] == ["GET"] * FAST_STALL.attempts
            kept = ("blobs", "models", "meta", "refs")
            assert {k: v for k, v in snapshot(cache).items() if k.startswith(kept)} == {
                k: v for k, v in before.items() if k.startswith(kept)}
            partial = cache / "partial" / sha256(b"weights")[7:]
            assert partial.read_bytes() in (b"", bytes(7))  # no byte of the body ever arrived
