"""The shared node cache between tenants who do not trust each other, and registries that lie.

Each hostile case runs the pull exactly as the webhook injects it for a shared cache (``--check-access``), then
asserts the exit code and that nothing changed: the whole cache tree (every path, mode, size, content, link
target; lock files aside, which are empty and made on demand) and a sentinel directory outside the cache.
Real parts: Distribution registries (one demanding credentials), a crafted registry of the attacker's own
(tests/support/crafted_registry.py), the loader's own pull code and CLI.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loader import credentials as creds_mod
from loader.cache import Cache, CacheCorrupt
from loader.errors import LoaderError, LockTimeout
from loader.log import Logger
from loader.pull import PullOptions, pull
from loader.reference import cache_key
from loader.retry import RetryPolicy
from tests.support.auth_registry import session_for, start_htpasswd_registry
from tests.support.crafted_registry import CraftedRegistry
from tests.support.files import snapshot, tree
from tests.support.oci import EMPTY_CONFIG, OCI_INDEX, OCI_MANIFEST, Pusher, file_layer, sha256
from tests.support.registry import free_port

FILES = {"weights.bin": os.urandom(300_000), "config.json": b'{"tenant": "victim"}'}
VICTIM_USER, VICTIM_PW = "victim", "victim-secret"
MALLORY_USER, MALLORY_PW = "mallory", "mallory-secret"


# ---- helpers -------------------------------------------------------------------------------------------------
def docker_config(tmp: Path, host: str, user: str, pw: str) -> creds_mod.DockerConfig:
    import base64

    path = tmp / f"config-{user}.json"
    auth = base64.b64encode(f"{user}:{pw}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return creds_mod.load_docker_configs([str(path)], {})


def run(ref: str, cache: Path, **kw) -> tuple:
    stream = io.StringIO()
    opts = dict(progress="none", concurrency=4, check_access=True)
    opts.update(kw)
    res = pull(ref, PullOptions(cache=cache, **opts), Logger(stream))
    return res, stream.getvalue()


def refused(ref: str, cache: Path, **kw) -> LoaderError:
    with pytest.raises(LoaderError) as e:
        run(ref, cache, **kw)
    return e.value


def manifest_bytes(layers: list[dict], config: dict | None = None) -> bytes:
    cfg = config or {"mediaType": EMPTY_CONFIG, "digest": sha256(b"{}"), "size": 2}
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": layers}).encode()


# ---- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def private():
    """A registry that demands credentials, holding the victim's private model."""
    reg = start_htpasswd_registry({VICTIM_USER: VICTIM_PW, MALLORY_USER: MALLORY_PW})
    try:
        p = Pusher(reg.url, session=session_for(reg, auth=(VICTIM_USER, VICTIM_PW)))
        digest = p.push_artifact("victim/private", "v1", [file_layer(n, d) for n, d in FILES.items()])
        reg.digest = digest  # type: ignore[attr-defined]
        reg.manifest = p.manifest_bytes("victim/private", "v1")  # type: ignore[attr-defined]
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def warm(private, tmp_path):
    """A node cache where the victim's pod pulled its model, a sentinel outside it, and the victim's config."""
    cache = tmp_path / "cache"
    sentinel = tmp_path / "outside"
    sentinel.mkdir()
    (sentinel / "secret.txt").write_bytes(b"not part of any cache")
    victim = docker_config(tmp_path, private.host, VICTIM_USER, VICTIM_PW)
    res, _ = run(f"{private.host}/victim/private:v1", cache, credentials=victim)
    assert tree(res.path) == FILES and not res.cache_hit
    before = (snapshot(cache), snapshot(sentinel))
    return cache, sentinel, victim, before


def unchanged(warm) -> None:
    cache, sentinel, _, before = warm
    assert (snapshot(cache), snapshot(sentinel)) == before


# ---- the access rule -------------------------------------------------------------------------------------------
def test_digest_on_an_unreachable_host_gets_nothing(private, warm):
    cache = warm[0]
    err = refused(f"127.0.0.1:{free_port()}/victim/private@{private.digest}", cache)
    assert err.exit_code == 7 and "is not given out" in str(err)
    unchanged(warm)


def test_digest_claimed_by_a_registry_that_answers_head_200_gets_nothing(private, warm):
    with CraftedRegistry() as evil:
        evil.manifests[("evil/m", private.digest)] = (b'{"not": "the manifest"}', OCI_MANIFEST)
        evil.head_digest[("evil/m", private.digest)] = private.digest
        err = refused(f"{evil.host}/evil/m@{private.digest}", warm[0])
    assert err.exit_code in (5, 7) and private.digest in str(err)
    unchanged(warm)


def test_tag_whose_docker_content_digest_names_the_victims_model_gets_nothing(private, warm):
    with CraftedRegistry() as evil:
        evil.manifests[("evil/m", "v1")] = (b"{}", OCI_MANIFEST)
        evil.head_digest[("evil/m", "v1")] = private.digest
        err = refused(f"{evil.host}/evil/m:v1", warm[0])
    # The tag is fetched with its manifest (one round trip): bytes that do not hash to the header's digest.
    assert err.exit_code == 7 and "under Docker-Content-Digest " + private.digest in str(err)
    unchanged(warm)


@pytest.mark.parametrize("blobs", ["absent", "lying"])
def test_the_victims_manifest_bytes_without_its_blobs_get_nothing(private, warm, blobs):
    """The attacker knows the manifest (and so every layer digest) but not the weights."""
    with CraftedRegistry() as evil:
        evil.manifests[("evil/m", "v1")] = (private.manifest, OCI_MANIFEST)
        evil.blobs[sha256(b"{}")] = b"{}"
        if blobs == "lying":
            for data in FILES.values():
                evil.blobs[sha256(data)] = os.urandom(len(data))
        err = refused(f"{evil.host}/evil/m:v1", warm[0])
        proofs = [r for r in evil.blob_gets() if r.range and r.range.startswith("bytes=")]
    assert err.exit_code == (4 if blobs == "absent" else 5)
    assert proofs, "no proof of possession was asked for"
    unchanged(warm)


def test_a_new_manifest_over_the_victims_layer_digests_gets_nothing(private, warm):
    """Blob-level: another manifest (a digest the cache does not hold) naming the victim's layers."""
    layers = [{"mediaType": "application/octet-stream", "digest": sha256(d), "size": len(d),
               "annotations": {"org.opencontainers.image.title": "stolen-" + n}} for n, d in FILES.items()]
    body = manifest_bytes(layers)
    with CraftedRegistry() as evil:
        evil.manifests[("evil/m", "v1")] = (body, OCI_MANIFEST)
        evil.blobs[sha256(b"{}")] = b"{}"
        err = refused(f"{evil.host}/evil/m:v1", warm[0])
    assert err.exit_code == 4
    unchanged(warm)


@pytest.mark.parametrize("who", ["anonymous", "other-credentials"])
def test_the_victims_exact_reference_made_unreachable_gets_nothing(private, warm, tmp_path, who):
    """hostAliases can point the victim's registry name anywhere: an outage proves nothing. Here the very
    registry stops; only the identity that read the model gets the cached copy."""
    cache = warm[0]
    kw = {} if who == "anonymous" else {"credentials": docker_config(tmp_path, private.host, MALLORY_USER,
                                                                      MALLORY_PW)}
    private.registry.stop()
    try:
        for ref in (f"{private.host}/victim/private:v1", f"{private.host}/victim/private@{private.digest}"):
            err = refused(ref, cache, **kw)
            assert err.exit_code == 7 and "is not given out" in str(err)
        unchanged(warm)
        res, log = run(f"{private.host}/victim/private:v1", cache, credentials=warm[2])
        assert res.cache_hit and tree(res.path) == FILES and "pull.registry_unreachable" in log
    finally:
        private.registry.start()


def test_mallory_with_her_own_credentials_on_the_same_registry_is_refused_by_the_registry(private, warm, tmp_path):
    mallory = docker_config(tmp_path, private.host, MALLORY_USER, MALLORY_PW)
    # htpasswd grants every user every repository: the registry itself says yes, so the cache does too.
    res, _ = run(f"{private.host}/victim/private:v1", warm[0], credentials=mallory)
    assert res.cache_hit and tree(res.path) == FILES


def test_a_tenant_holding_the_same_model_on_its_own_registry_proves_possession(private, warm, registry):
    """Honest sharing: the same bytes pushed to another registry are a hit after a proof of a few bytes each."""
    p = Pusher(registry.url)
    digest = p.push_artifact("tenant-b/model", "v1", [file_layer(n, d) for n, d in FILES.items()])
    assert digest == private.digest
    stream = io.StringIO()
    res = pull(f"{registry.host}/tenant-b/model:v1", PullOptions(cache=warm[0], progress="none", check_access=True),
               Logger(stream))
    assert res.cache_hit and tree(res.path) == FILES
    meta = Cache(warm[0]).read_meta(digest)
    assert {(s["registry"], s["repository"]) for s in meta["sources"]} == {
        (private.host, "victim/private"), (registry.host, "tenant-b/model")}


def test_without_check_access_a_private_cache_is_used_as_before(private, warm):
    """The pod cache (not shared) is pulled without --check-access: a digest hit needs no network."""
    res, _ = run(f"127.0.0.1:{free_port()}/victim/private@{private.digest}", warm[0], check_access=False)
    assert res.cache_hit


# ---- digests that would be paths ------------------------------------------------------------------------------
def _pad(text: str) -> str:
    return "sha256:" + (text + "/" * 64)[:64]


@pytest.mark.parametrize("bad", [
    _pad("../../refs/KEY/./././././././.././"),
    _pad("////////////////////////////////tmp/x/file"),
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha512:" + "a" * 64,
    "sha256:" + "a" * 63 + "\n",
], ids=["dotdot-into-refs", "slashes-to-tmp", "uppercase", "short", "sha512", "newline"])
def test_layer_digests_that_are_not_digests_are_refused(warm, bad):
    cache = warm[0]
    bad = bad.replace("KEY", os.listdir(cache / "refs")[0][:20])
    layers = [{"mediaType": "application/octet-stream", "digest": bad, "size": 10,
               "annotations": {"org.opencontainers.image.title": "w.bin"}}]
    with CraftedRegistry() as evil:
        evil.manifests[("evil/m", "v1")] = (manifest_bytes(layers), OCI_MANIFEST)
        err = refused(f"{evil.host}/evil/m:v1", cache)
        assert not evil.blob_gets()
    assert err.exit_code == 8 and repr(bad)[1:20] in str(err)
    unchanged(warm)


def test_an_index_child_named_by_a_tag_is_refused(warm):
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [{"mediaType": OCI_MANIFEST, "digest": "v1", "size": 10}]}).encode()
    with CraftedRegistry() as evil:
        evil.manifests[("evil/m", "idx")] = (index, OCI_INDEX)
        err = refused(f"{evil.host}/evil/m:idx", warm[0])
    assert err.exit_code == 8 and "'v1'" in str(err)
    unchanged(warm)


# ---- nothing in the cache is trusted by position -----------------------------------------------------------------
def test_a_planted_symlink_for_a_cache_directory_is_refused(tmp_path, registry, pusher):
    pusher.push_artifact("tenant/m", "v1", [file_layer("a.bin", b"a" * 100)])
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    (cache / "blobs").mkdir(parents=True)
    os.symlink(outside, cache / "blobs/sha256")
    with pytest.raises(CacheCorrupt) as e:
        run(f"{registry.host}/tenant/m:v1", cache, check_access=False)
    assert "blobs/sha256 is a symlink" in str(e.value) and e.value.exit_code == 1
    assert os.listdir(outside) == []


@pytest.mark.parametrize("plant", ["symlink-outside", "writable-wrong-bytes"])
def test_a_planted_blob_is_not_taken_for_a_verified_one(tmp_path, registry, pusher, plant):
    data = os.urandom(5000)
    pusher.push_artifact("tenant/planted", "v1", [file_layer("w.bin", data)])
    cache = Cache(tmp_path / "cache").ensure()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * len(data))
    blob = cache.blob_path(sha256(data))
    if plant == "symlink-outside":
        os.symlink(outside, blob)
    else:
        blob.write_bytes(b"y" * len(data))
    res, _ = run(f"{registry.host}/tenant/planted:v1", cache.root, check_access=False)
    assert tree(res.path) == {"w.bin": data}
    assert not blob.is_symlink() and blob.read_bytes() == data and oct(blob.stat().st_mode & 0o777) == "0o444"
    assert outside.read_bytes() == b"x" * len(data) and oct(outside.stat().st_mode & 0o777) == "0o644"


def test_a_refs_link_pointing_anywhere_else_is_not_a_hit(tmp_path):
    cache = Cache(tmp_path / "cache").ensure()
    ref = "registry.example.com/m:v1"
    os.symlink("../../../etc", cache.ref_path(ref))
    err = refused(ref, cache.root, offline=True)
    assert err.exit_code == 7 and "not in cache" in str(err)


def test_a_meta_file_with_a_path_for_a_blob_deletes_nothing_after_a_reboot(warm, private):
    cache_dir, sentinel = warm[0], warm[1]
    cache = Cache(cache_dir)
    meta_path = cache.meta_path(private.digest)
    meta = json.loads(meta_path.read_text())
    meta["boot_id"] = "an-earlier-boot"
    meta["blobs"].append("sha256:" + ("../../../outside/secret.txt" + "/" * 64)[:64])
    meta_path.write_text(json.dumps(meta))
    assert cache.lookup_digest(private.digest) is None  # not a model model-loader wrote: not a hit
    assert (sentinel / "secret.txt").read_bytes() == b"not part of any cache"
    assert cache.model_path(private.digest).is_dir()


# ---- bounds ------------------------------------------------------------------------------------------------------
FAST_STALL = RetryPolicy(attempts=2, base_delay=0.05, rate_window=1.0, min_rate=1000, deadline=60)


def test_a_trickling_registry_is_cut_and_does_not_hold_other_tenants(tmp_path, registry, pusher):
    data = os.urandom(20_000)
    digest = pusher.push_artifact("tenant/honest", "v1", [file_layer("w.bin", data)])
    cache = tmp_path / "cache"
    with CraftedRegistry() as evil:
        body = manifest_bytes([file_layer("w.bin", data).descriptor()])
        evil.manifests[("evil/m", "v1")] = (body, OCI_MANIFEST)
        evil.blobs[sha256(data)] = data
        evil.blobs[sha256(b"{}")] = b"{}"
        evil.trickle[sha256(data)] = 0.3
        errors: list[BaseException] = []

        def slow() -> None:
            try:
                run(f"{evil.host}/evil/m:v1", cache, policy=FAST_STALL, check_access=False)
            except BaseException as exc:  # noqa: BLE001  the test asserts on what it was
                errors.append(exc)

        t = threading.Thread(target=slow)
        t.start()
        lock = cache / "locks" / f"blob-{sha256(data)[7:]}"
        while not lock.exists() and t.is_alive():
            threading.Event().wait(0.05)
        # Another tenant pulls the same blob meanwhile: it waits for the lock, not for ever.
        try:
            res, _ = run(f"{registry.host}/tenant/honest:v1", cache, lock_stall=0.5, check_access=False)
            waited = None
        except LockTimeout as exc:
            waited = exc
        t.join(60)
    assert errors and "trickling" in str(errors[0]) and errors[0].exit_code == 7
    if waited is not None:
        assert waited.exit_code == 7 and "has not written a byte" in str(waited)
    res, _ = run(f"{registry.host}/tenant/honest:v1", cache, check_access=False)
    assert tree(res.path) == {"w.bin": data} and res.digest == digest


def test_a_model_of_many_files_pulls_under_a_small_file_descriptor_limit(tmp_path, registry, pusher):
    files = {f"shard-{i:03d}.bin": os.urandom(1000 + i) for i in range(300)}
    pusher.push_artifact("tenant/many", "v1", [file_layer(n, d) for n, d in files.items()])
    cache = tmp_path / "cache"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.run([sys.executable, "-m", "loader.cli", "pull", f"{registry.host}/tenant/many:v1",
                           "--cache", str(cache), "--progress", "none", "--concurrency", "8"],
                          preexec_fn=limit, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    key = cache_key(f"{registry.host}/tenant/many:v1")
    assert tree(cache / "refs" / key) == files
    assert os.listdir(cache / "partial") == []


def test_a_pull_waits_for_a_running_gc_for_a_bounded_time(tmp_path, registry, pusher):
    pusher.push_artifact("tenant/gc", "v1", [file_layer("a.bin", b"a")])
    cache = Cache(tmp_path / "cache").ensure()
    with cache.gc_lock(shared=False):
        err = refused(f"{registry.host}/tenant/gc:v1", cache.root, gc_lock_timeout=0.3)
    assert isinstance(err, LockTimeout) and err.exit_code == 7 and "running gc" in str(err)


def test_gc_waits_for_running_pulls_for_a_bounded_time(tmp_path):
    cache = Cache(tmp_path / "cache").ensure()
    with cache.gc_lock(shared=True):  # a pull in progress
        proc = subprocess.run([sys.executable, "-m", "loader.cli", "gc", "--cache", str(cache.root), "--max-size",
                               "0", "--wait", "1s"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7 and "running pulls" in proc.stderr and "Traceback" not in proc.stderr


# ---- end to end: a bomb, and bundles whose digests are paths ------------------------------------------------------
@pytest.mark.needs_root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs as a real full disk: only root may")
def test_a_zstd_bomb_stops_before_the_cache_disk_is_full(tmp_path, registry, pusher):
    from tests.support.oci import UNPACK, Layer, tar_bytes

    bomb = tar_bytes({"m/weights.bin": bytes(64 << 20)}, compress="zstd")  # a few KB expanding to 64 MiB
    assert len(bomb) < 100_000
    pusher.push_artifact("tenant/bomb", "v1", [Layer(bomb, "application/vnd.oci.image.layer.v1.tar+zstd",
                                                      {"org.opencontainers.image.title": "m", UNPACK: "true"})])
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "loader.cli", "pull", f"{registry.host}/tenant/bomb:v1",
                               "--cache", str(mnt), "--progress", "none"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 6, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "tenant/bomb" in proc.stderr
        st = os.statvfs(mnt)
        assert st.f_bavail * st.f_frsize > 512 << 10  # the reserve is still free for everyone else
        assert os.listdir(mnt / "models/sha256") == [] and os.listdir(mnt / "refs") == []
        assert os.listdir(mnt / "tmp") == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _bundle(path: Path, index_entries: list[dict], blobs: dict[str, bytes]) -> None:
    import tarfile

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tf:
        add(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add(tf, "index.json", json.dumps({"schemaVersion": 2, "manifests": index_entries}).encode())
        for name, data in blobs.items():
            add(tf, f"blobs/sha256/{name}", data)


@pytest.mark.parametrize("where", ["index.json", "layer"])
def test_a_bundle_whose_digests_are_paths_imports_nothing(warm, where):
    cache_dir, sentinel = warm[0], warm[1]
    bad = _pad("../../../outside/secret.txt/")
    bundle = sentinel.parent / "evil.tar"
    if where == "index.json":
        _bundle(bundle, [{"mediaType": OCI_MANIFEST, "digest": bad, "size": 10}], {})
    else:
        body = manifest_bytes([{"mediaType": "application/octet-stream", "digest": bad, "size": 21,
                                "annotations": {"org.opencontainers.image.title": "w.bin"}}])
        _bundle(bundle, [{"mediaType": OCI_MANIFEST, "digest": sha256(body), "size": len(body),
                          "annotations": {"io.containerd.image.name": "evil.example/m:v1"}}],
                {sha256(body)[7:]: body, sha256(b"{}")[7:]: b"{}"})
    snap = snapshot(sentinel)
    proc = subprocess.run([sys.executable, "-m", "loader.cli", "import", str(bundle), "--cache", str(cache_dir)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 8, proc.stderr[-2000:]
    assert "is not sha256: followed by 64 lowercase hex digits" in proc.stderr and "Traceback" not in proc.stderr
    unchanged(warm)
    assert snapshot(sentinel) == snap
