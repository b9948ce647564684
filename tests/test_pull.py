"""Pull against the real registry: the tree on disk, byte for byte, for every artifact shape; refusals; hits."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from loader import contract
from loader.cache import Cache
from loader.errors import ArtifactError, DigestMismatch, NetworkError, NotFoundError, UsageError
from loader.log import NullLogger
from loader.pull import PullOptions, pull
from tests.support.files import tree
from tests.support.oci import FILEPATH, TITLE, UNPACK, Layer, file_layer, sha256, tar_bytes

LOG = NullLogger()
MP = "application/vnd.cncf.model"


def do_pull(ref: str, cache: Path, **kw):
    return pull(ref, PullOptions(cache=cache, progress="none", **kw), LOG)


def _add_symlink(tf: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tf.addfile(info)


def _add_device(tf: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    tf.addfile(info)


def _add_file(tf: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


WEIGHTS = os.urandom(3 << 20) + b"end"
CONFIG = b'{"architectures": ["Phi3"]}'
TOKENIZER = b'{"model": {"type": "BPE"}}'


def _tar_dir(compress):
    return tar_bytes({"tokenizer/": None, "tokenizer/tokenizer.json": TOKENIZER, "tokenizer/sub/vocab.txt": b"a\nb\n"},
                     compress)


CASES = {
    "raw": (
        [file_layer("model.safetensors", WEIGHTS), file_layer("config.json", CONFIG),
         file_layer("tokenizer/tokenizer.json", TOKENIZER), Layer(b"no title", "application/octet-stream")],
        {"model.safetensors": WEIGHTS, "config.json": CONFIG, "tokenizer/tokenizer.json": TOKENIZER},
    ),
    "tar": (
        [file_layer("config.json", CONFIG),
         Layer(_tar_dir(None), "application/vnd.oci.image.layer.v1.tar", {TITLE: "tokenizer", UNPACK: "true"})],
        {"config.json": CONFIG, "tokenizer/tokenizer.json": TOKENIZER, "tokenizer/sub/vocab.txt": b"a\nb\n"},
    ),
    "tar+gzip": (
        [Layer(_tar_dir("gzip"), "application/vnd.oci.image.layer.v1.tar+gzip", {TITLE: "tokenizer", UNPACK: "true"})],
        {"tokenizer/tokenizer.json": TOKENIZER, "tokenizer/sub/vocab.txt": b"a\nb\n"},
    ),
    "tar+zstd": (
        [Layer(_tar_dir("zstd"), "application/vnd.oci.image.layer.v1.tar+zstd", {TITLE: "tokenizer", UNPACK: "true"})],
        {"tokenizer/tokenizer.json": TOKENIZER, "tokenizer/sub/vocab.txt": b"a\nb\n"},
    ),
    "tar-not-under-title": (
        [Layer(tar_bytes({"a.txt": b"A", "d/b.txt": b"B"}, "gzip"), "application/vnd.oci.image.layer.v1.tar+gzip",
               {TITLE: "bundle", UNPACK: "true"})],
        {"bundle/a.txt": b"A", "bundle/d/b.txt": b"B"},
    ),
    "modelpack": (
        [file_layer("model.safetensors", WEIGHTS, f"{MP}.weight.v1.raw", key=FILEPATH),
         Layer(tar_bytes({"config.json": CONFIG}), f"{MP}.weight.config.v1.tar", {FILEPATH: "config.json"}),
         Layer(tar_bytes({"docs/README.md": b"# hi"}, "zstd"), f"{MP}.doc.v1.tar+zstd", {FILEPATH: "docs/README.md"})],
        {"model.safetensors": WEIGHTS, "config.json": CONFIG, "docs/README.md": b"# hi"},
    ),
    "tar-with-inner-symlink": (
        [Layer(tar_bytes({"t/real.json": TOKENIZER}, extra=lambda tf: _add_symlink(tf, "t/alias.json", "real.json")),
               "application/vnd.oci.image.layer.v1.tar", {TITLE: "t", UNPACK: "true"})],
        {"t/real.json": TOKENIZER, "t/alias.json": "link:real.json"},
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_tree_is_byte_exact(case, registry, pusher, tmp_path):
    layers, expected = CASES[case]
    digest = pusher.push_artifact(f"trees/{case.replace('+', '-')}", "v1", layers)
    res = do_pull(f"{registry.host}/trees/{case.replace('+', '-')}:v1", tmp_path)
    assert tree(res.path) == expected
    assert res.digest == digest and not res.cache_hit
    assert res.path == str(tmp_path / "models/sha256" / digest[7:])
    assert res.files == len(expected)
    # The ref link is what the webhook mounts: it must resolve to the same tree.
    link = tmp_path / contract.ref_subpath(f"{registry.host}/trees/{case.replace('+', '-')}:v1")
    assert os.readlink(link) == f"../models/sha256/{digest[7:]}"
    assert tree(link) == expected
    # Read-only, and raw files share the blob's inode (no copy).
    for rel in expected:
        p = Path(res.path) / rel
        if not p.is_symlink():
            assert not os.stat(p).st_mode & 0o222, rel
    assert not os.stat(res.path).st_mode & 0o222
    if case == "raw":
        blob = tmp_path / "blobs/sha256" / sha256(WEIGHTS)[7:]
        assert os.stat(blob).st_ino == os.stat(Path(res.path) / "model.safetensors").st_ino


def test_index_resolves_to_the_platformless_manifest(registry, pusher, tmp_path):
    repo = "trees/index"
    d_model = pusher.push_artifact(repo, "model", [file_layer("w.bin", b"weights")])
    n_model = len(pusher.manifest_bytes(repo, d_model))
    d_other = pusher.push_artifact(repo, "other", [file_layer("w.bin", b"other")])
    n_other = len(pusher.manifest_bytes(repo, d_other))
    idx = pusher.push_index(repo, "v1", [(d_other, n_other, {"os": "windows", "architecture": "arm"}),
                                         (d_model, n_model, None)])
    res = do_pull(f"{registry.host}/{repo}:v1", tmp_path)
    assert tree(res.path) == {"w.bin": b"weights"}
    assert res.digest == idx


HOSTILE = {
    "absolute-title": ([file_layer("/etc/passwd", b"x")], "is an absolute path"),
    "dotdot-title": ([file_layer("a/../../escape", b"x")], "contains '..'"),
    "duplicate-title": ([file_layer("a", b"x"), file_layer("a", b"y")], "two layers are both named 'a'"),
    "file-and-dir": ([file_layer("a", b"x"), file_layer("a/b", b"y")], "'a' is both a file and the directory of 'a/b'"),
    "tar-absolute": ([Layer(tar_bytes({}, extra=lambda tf: _add_file(tf, "/abs")), "application/vnd.oci.image.layer.v1.tar",
                            {TITLE: "d", UNPACK: "true"})], "is an absolute path"),
    "tar-dotdot": ([Layer(tar_bytes({}, extra=lambda tf: _add_file(tf, "d/../../x")), "application/vnd.oci.image.layer.v1.tar",
                          {TITLE: "d", UNPACK: "true"})], "contains '..'"),
    "tar-device": ([Layer(tar_bytes({"d/ok": b"1"}, extra=lambda tf: _add_device(tf, "d/null")),
                          "application/vnd.oci.image.layer.v1.tar", {TITLE: "d", UNPACK: "true"})], "device or fifo"),
    "tar-symlink-escape": ([Layer(tar_bytes({}, extra=lambda tf: _add_symlink(tf, "d/l", "../../etc")),
                                  "application/vnd.oci.image.layer.v1.tar", {TITLE: "d", UNPACK: "true"})], "escapes the model"),
    "tar-symlink-absolute": ([Layer(tar_bytes({}, extra=lambda tf: _add_symlink(tf, "d/l", "/etc")),
                                    "application/vnd.oci.image.layer.v1.tar", {TITLE: "d", UNPACK: "true"})], "absolute path '/etc'"),
    "tar-through-symlink": ([Layer(tar_bytes({}, extra=lambda tf: (_add_symlink(tf, "d/l", "."), _add_file(tf, "d/l/x"))),
                                   "application/vnd.oci.image.layer.v1.tar", {TITLE: "d", UNPACK: "true"})], "through the symlink 'd/l'"),
    "no-titles": ([Layer(b"anonymous")], "no layer has an org.opencontainers.image.title"),
    "bad-tar": ([Layer(b"not a tar at all" * 100, "application/vnd.oci.image.layer.v1.tar", {TITLE: "d", UNPACK: "true"})],
                "is not a readable tar archive"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_unsafe_artifacts_are_refused_and_nothing_is_published(case, registry, pusher, tmp_path):
    layers, message = HOSTILE[case]
    pusher.push_artifact(f"hostile/{case}", "v1", layers)
    with pytest.raises(ArtifactError) as e:
        do_pull(f"{registry.host}/hostile/{case}:v1", tmp_path)
    assert message in str(e.value)
    assert f"hostile/{case}:v1" in str(e.value)
    assert os.listdir(tmp_path / "models/sha256") == []
    assert os.listdir(tmp_path / "refs") == []
    assert os.listdir(tmp_path / "tmp") == []
    assert not (tmp_path.parent / "etc").exists() and not Path("/abs").exists()


def test_digest_ref_hit_needs_no_network(fresh_registry, tmp_path):
    from tests.support.oci import Pusher

    d = Pusher(fresh_registry.url).push_artifact("m/x", "v1", [file_layer("w", b"123")])
    first = do_pull(f"{fresh_registry.host}/m/x@{d}", tmp_path)
    fresh_registry.stop()
    again = do_pull(f"{fresh_registry.host}/m/x@{d}", tmp_path)
    assert again.cache_hit and again.path == first.path and again.warnings == []
    assert tree(again.path) == {"w": b"123"}


def test_tag_hit_with_registry_down_uses_cache_with_warning(fresh_registry, tmp_path):
    from tests.support.oci import Pusher

    Pusher(fresh_registry.url).push_artifact("m/x", "v1", [file_layer("w", b"123")])
    ref = f"{fresh_registry.host}/m/x:v1"
    first = do_pull(ref, tmp_path)
    fresh_registry.stop()
    again = do_pull(ref, tmp_path)
    assert again.cache_hit and again.path == first.path
    assert len(again.warnings) == 1 and "unreachable" in again.warnings[0] and first.digest in again.warnings[0]
    offline = do_pull(ref, tmp_path, offline=True)
    assert offline.cache_hit and offline.path == first.path and offline.warnings == []


def test_offline_miss_and_registry_down_miss_fail_clearly(fresh_registry, tmp_path):
    ref = f"{fresh_registry.host}/m/absent:v1"
    with pytest.raises(NetworkError, match=r"not in cache .* --offline"):
        do_pull(ref, tmp_path, offline=True)
    fresh_registry.stop()
    with pytest.raises(NetworkError, match=r"could not connect to registry 127\.0\.0\.1:\d+"):
        do_pull(ref, tmp_path)


def test_moved_tag_republishes_and_old_tree_survives(registry, pusher, tmp_path):
    ref = f"{registry.host}/m/moving:v1"
    pusher.push_artifact("m/moving", "v1", [file_layer("w", b"old")])
    old = do_pull(ref, tmp_path)
    pusher.push_artifact("m/moving", "v1", [file_layer("w", b"new")])
    new = do_pull(ref, tmp_path)
    assert not new.cache_hit and new.digest != old.digest
    assert tree(tmp_path / contract.ref_subpath(ref)) == {"w": b"new"}
    assert tree(old.path) == {"w": b"old"}  # pods that started on the old tree keep it


def test_not_found(registry, tmp_path):
    with pytest.raises(NotFoundError) as e:
        do_pull(f"{registry.host}/m/never:v1", tmp_path)
    assert f"{registry.host}/m/never:v1" in str(e.value) and "check the repository and tag" in str(e.value)


def test_bad_reference_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="repository 'Bad/Name'"):
        do_pull("r.io/Bad/Name:v1", tmp_path)


def test_corrupt_blob_in_registry_is_refetched_once_then_refused(fresh_registry, tmp_path):
    from tests.support.oci import Pusher

    data = os.urandom(1 << 20)
    Pusher(fresh_registry.url).push_artifact("m/x", "v1", [file_layer("w", data), file_layer("ok", b"fine")])
    blob = fresh_registry.blob_path(sha256(data))
    raw = bytearray(blob.read_bytes())
    raw[12345] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with pytest.raises(DigestMismatch) as e:
        do_pull(f"{fresh_registry.host}/m/x:v1", tmp_path)
    assert sha256(data) in str(e.value) and "twice" in str(e.value) and "nothing was published" in str(e.value)
    assert os.listdir(tmp_path / "models/sha256") == [] and os.listdir(tmp_path / "refs") == []
    assert not (tmp_path / "blobs/sha256" / sha256(data)[7:]).exists()
    assert not (tmp_path / "partial" / sha256(data)[7:]).exists()


@pytest.mark.parametrize("delta", [+1000, -1000, +40 * (1 << 20)], ids=["1000-larger", "1000-smaller", "40MiB-larger"])
def test_descriptor_size_that_lies_is_refused_at_once(delta, registry, pusher, tmp_path):
    """A manifest whose layer size disagrees with the blob fails on the first answer (Content-Range total, or the
    416 of a range past the real end), names both sizes, and publishes nothing: no retries of a certain failure."""
    data = os.urandom(50_000)
    pusher.push_blob("m/liar", data)
    cfg = pusher.push_blob("m/liar", b"{}")
    layer = file_layer("w.bin", data).descriptor() | {"size": len(data) + delta}
    pusher.push_manifest("m/liar", "v1", {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cfg, "size": 2}, "layers": [layer]})
    with pytest.raises(DigestMismatch) as e:
        do_pull(f"{registry.host}/m/liar:v1", tmp_path, concurrency=4)
    assert str(e.value) == (
        f"registry {registry.host} serves blob {sha256(data)} of {registry.host}/m/liar:v1 as {len(data)} bytes, but"
        f" the manifest's descriptor says {len(data) + delta}: the manifest does not describe its blobs; push the"
        " model again (model-loader push) so the manifest is rebuilt from the files. Nothing was published")
    assert os.listdir(tmp_path / "models/sha256") == [] and os.listdir(tmp_path / "refs") == []
    assert not (tmp_path / "blobs/sha256" / sha256(data)[7:]).exists()


def test_large_blob_is_split_into_ranges_and_verified(registry, pusher, tmp_path):
    from loader import fetch

    data = os.urandom(3 * fetch.MIN_CHUNK + 12345)
    pusher.push_artifact("m/big", "v1", [file_layer("big.bin", data)])
    res = do_pull(f"{registry.host}/m/big:v1", tmp_path, concurrency=4)
    assert hashlib.sha256((Path(res.path) / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    M = 1 << 20
    assert fetch.plan_ranges(len(data), fetch.target_chunk(len(data), 4)) == [
        (0, 13 * M), (13 * M, 26 * M), (26 * M, 39 * M), (39 * M, len(data))]


@pytest.mark.parametrize("resumable", [True, False], ids=["state-kept", "state-gone"])
def test_a_state_write_cut_by_a_kill_leaves_nothing_behind_after_the_next_pull(resumable, registry, pusher, tmp_path):
    """A kill between writing partial/<hex>.state.tmp and renaming it over .state leaves the temporary file; the
    pull that finishes the blob (resuming it or starting it over) removes it with the state."""
    data = os.urandom(300_000)
    pusher.push_artifact("m/statetmp", "v1", [file_layer("w.bin", data)])
    cache = Cache(tmp_path)
    partial = cache.partial_path(sha256(data))
    partial.parent.mkdir(parents=True, exist_ok=True)
    if resumable:  # half of the blob arrived, its state was saved, then a later save was cut
        partial.write_bytes(data[:150_000] + bytes(len(data) - 150_000))
        partial.with_name(partial.name + ".state").write_text(json.dumps(
            {"digest": sha256(data), "size": len(data), "ranges": [[0, len(data), 150_000]]}))
    partial.with_name(partial.name + ".state.tmp").write_text('{"digest": "sha256:')
    res = do_pull(f"{registry.host}/m/statetmp:v1", tmp_path)
    assert tree(res.path) == {"w.bin": data}
    assert sorted(p.name for p in (tmp_path / contract.PARTIAL_DIR).iterdir()) == []


def test_cli_json_output_and_termination_log(registry, pusher, tmp_path, monkeypatch):
    d = pusher.push_artifact("m/cli", "v1", [file_layer("w", b"abc"), file_layer("c.json", b"{}")])
    term = tmp_path / "termination-log"
    term.write_text("")
    env = {**os.environ, "MODEL_LOADER_TERMINATION_LOG": str(term)}
    cmd = [sys.executable, "-m", "loader.cli", "pull", f"{registry.host}/m/cli:v1", "--cache", str(tmp_path / "c"),
           "--output", "json", "--progress", "none"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    obj = json.loads(out.stdout)
    assert set(obj) == {"ref", "digest", "path", "bytes", "files", "seconds", "cache_hit", "fetched_bytes", "stale",
                        "pinned"}
    assert obj["ref"] == f"{registry.host}/m/cli:v1" and obj["digest"] == d and obj["bytes"] == 5
    assert obj["files"] == 2 and obj["cache_hit"] is False and obj["fetched_bytes"] == 5  # the layers (the config is not fetched)
    assert (obj["stale"], obj["pinned"]) == (False, False)
    assert obj["path"] == str(tmp_path / "c/models/sha256" / d[7:])
    assert term.read_text().startswith(f"loaded {registry.host}/m/cli:v1@{d[:19]} 2 files, downloaded 0.0 MB in ")
    again = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout)
    assert again["cache_hit"] is True and again["path"] == obj["path"] and again["fetched_bytes"] == 0
    assert term.read_text().startswith(f"loaded {registry.host}/m/cli:v1@{d[:19]} 2 files, cache hit in ")


def test_cli_exit_code_survives_closed_or_gone_output_streams(registry, pusher, tmp_path):
    """The console script ends with os._exit after flushing (loader.cli.entry): a stream closed from the start (None
    in Python) or a reader that went away must not turn the command's own exit code into a traceback (review,
    seventh session)."""
    pusher.push_artifact("m/streams", "v1", [file_layer("w", b"abc")])
    cache = tmp_path / "c"
    base = [sys.executable, "-m", "loader.cli"]
    pull_ok = [*base, "pull", f"{registry.host}/m/streams:v1", "--cache", str(cache), "--progress", "none"]
    unreachable = [*base, "pull", "127.0.0.1:1/m/x:v1", "--cache", str(cache), "--timeout", "1", "--progress", "none"]
    ls = [*base, "ls", "--cache", str(cache)]
    assert subprocess.run(pull_ok, capture_output=True, check=False).returncode == 0
    bar = [*pull_ok, "--progress", "bar", "--pod-uid", "p1"]  # a progress bar with nowhere to draw it
    for cmd, code in ((ls, 0), (unreachable, int(contract.ExitCode.NETWORK)), (bar, 0)):
        for closed in ("1>&-", "2>&-"):  # stdout closed, stderr closed
            done = subprocess.run(["bash", "-c", 'exec "$@" ' + closed, "-", *cmd], capture_output=True, text=True,
                                  check=False)
            assert (done.returncode, "Traceback" in done.stderr) == (code, False), (cmd, closed, done.stderr)
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first line: every write is EPIPE
    done = subprocess.run(ls, stdout=w, stderr=subprocess.PIPE, text=True, check=False)
    os.close(w)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize(
    "args,code,fragment",
    [
        (["r.io/Bad:v1"], contract.ExitCode.USAGE, "repository 'Bad'"),
        (["{host}/m/none:v1"], contract.ExitCode.NOT_FOUND, "has no manifest"),
        (["127.0.0.1:1/m/x:v1", "--timeout", "1"], contract.ExitCode.NETWORK, "could not connect to registry 127.0.0.1:1"),
        (["{host}/m/x:v1", "--mirror", "nonsense"], contract.ExitCode.USAGE, "--mirror 'nonsense' is not HOST=URL"),
    ],
    ids=["bad-ref", "not-found", "unreachable", "bad-mirror"],
)
def test_cli_exit_codes(args, code, fragment, registry, tmp_path):
    cmd = [sys.executable, "-m", "loader.cli", "pull", *[a.format(host=registry.host) for a in args],
           "--cache", str(tmp_path), "--progress", "none"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == code, out.stderr
    assert fragment in out.stderr


# The one skip in the suite, stated in the README (Development: tests that need root). CI runs as root.
@pytest.mark.skipif(os.geteuid() != 0, reason="fills a real disk: an 8 MB tmpfs it mounts, and only root may mount one")
def test_full_disk_fails_early_with_numbers_and_keeps_cache_intact(registry, pusher, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert mounted.returncode == 0, f"root could not mount the test's tmpfs: {mounted.stderr.strip()}"
    try:
        pusher.push_artifact("m/small", "v1", [file_layer("w", b"small model")])
        small = do_pull(f"{registry.host}/m/small:v1", mnt)
        pusher.push_artifact("m/huge", "v1", [file_layer("w", os.urandom(12 << 20))])
        from loader.errors import NoSpaceError

        with pytest.raises(NoSpaceError) as e:
            do_pull(f"{registry.host}/m/huge:v1", mnt)
        msg = str(e.value)
        assert "need 12.6 MB" in msg and "MB free" in msg and str(mnt) in msg and "model-loader gc" in msg
        assert tree(small.path) == {"w": b"small model"}
        assert os.listdir(mnt / "models/sha256") == [small.digest[7:]]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_first_use_after_unclean_reboot_reverifies_and_repairs(registry, pusher, tmp_path):
    """Blobs are published without fsync; a model from an earlier boot is hashed again before it is trusted."""
    data = os.urandom(1 << 20)
    ref = f"{registry.host}/m/reboot:v1"
    pusher.push_artifact("m/reboot", "v1", [file_layer("w", data)])
    first = do_pull(ref, tmp_path)
    cache = Cache(tmp_path)
    meta_path = cache.meta_path(first.digest)

    def pretend_reboot():
        meta = json.loads(meta_path.read_text())
        meta["boot_id"] = "an-earlier-boot"
        meta_path.write_text(json.dumps(meta))

    pretend_reboot()  # intact blobs: a hit, and the model is marked as verified on this boot
    again = do_pull(ref, tmp_path)
    assert again.cache_hit and json.loads(meta_path.read_text())["boot_id"] != "an-earlier-boot"

    pretend_reboot()  # a torn blob (what a power loss can leave): the model is dropped and pulled again
    blob = cache.blob_path(sha256(data))
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.write(b"\0" * 4096)
    repaired = do_pull(ref, tmp_path)
    assert not repaired.cache_hit and tree(repaired.path) == {"w": data}


def test_cli_missing_pull_secret_mount_is_a_warning_not_a_failure(registry, pusher, tmp_path):
    """Pull secrets are mounted optional: true; a deleted secret leaves its path absent."""
    pusher.push_artifact("m/nosecret", "v1", [file_layer("w", b"public")])
    cmd = [sys.executable, "-m", "loader.cli", "pull", f"{registry.host}/m/nosecret:v1", "--cache", str(tmp_path),
           "--progress", "none", "--docker-config", str(tmp_path / "gone")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"event=docker_config.missing path={tmp_path / 'gone'}" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("size_mb", [64, 384], ids=["64MB", "384MB"])
def test_pull_memory_stays_flat(size_mb, registry, pusher, tmp_path):
    """Peak RSS of the whole loader process does not grow with the model: fixed buffers per worker."""
    from tests.support.rss import run_measured

    half = size_mb // 2  # two files of repeated 1 MiB patterns: cheap to build, still verified byte by byte
    pusher.push_artifact(f"m/mem{size_mb}", "v1", [file_layer("w.bin", os.urandom(1 << 20) * half),
                                                    file_layer("w2.bin", os.urandom(1 << 20) * half)])
    cmd = [sys.executable, "-m", "loader.cli", "pull", f"{registry.host}/m/mem{size_mb}:v1", "--cache", str(tmp_path),
           "--progress", "none", "--concurrency", "8"]
    proc, peak_mb = run_measured(cmd)
    assert proc.returncode == 0, proc.stderr.decode()
    assert peak_mb < 150, f"peak RSS {peak_mb:.0f} MB for a {size_mb} MB model"


def test_a_whole_pull_deadline_cuts_a_trickle_inside_one_range_and_the_next_pull_resumes(registry, pusher, tmp_path):
    """PullOptions.deadline (the CSI plugin sets one): a registry trickling fast enough never trips the minimum-rate
    rule, but the pull ends at its deadline, checked before every read; its partial download stays, and the next
    pull resumes it (the bytes already there are not fetched again)."""
    from loader.errors import DeadlineExceeded
    from tests.support.throttle import ThrottleProxy

    weights = os.urandom(3 << 20)
    pusher.push_artifact("deadline/model", "v1", [file_layer("w.bin", weights)])
    cache = tmp_path / "cache"
    with ThrottleProxy(registry.url, rate=100_000) as proxy:  # 3 MB in one range at 100 KB/s: ~30 s
        ref = f"{proxy.host}/deadline/model:v1"
        with pytest.raises(DeadlineExceeded):
            pull(ref, PullOptions(cache=cache, progress="none", deadline=2.0), NullLogger())
        assert any((cache / contract.PARTIAL_DIR).iterdir())  # the partial download (sparse, with its state) stays
        assert not (cache / contract.MODELS_DIR).exists() or not any((cache / contract.MODELS_DIR).iterdir())
        proxy.set(rate=None)
        res = pull(ref, PullOptions(cache=cache, progress="none", deadline=60.0), NullLogger())
    assert tree(Path(res.path)) == {"w.bin": weights}
    assert res.fetched_bytes < len(weights)  # resumed: the part kept was not downloaded again
