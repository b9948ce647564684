"""export / import against real registries: bundles that skopeo reads, imports into a cache that serve pulls with
no registry at all, imports into another registry, and corrupt bundles refused with nothing published."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests

from loader import bundle as B
from loader import push as P
from loader.errors import ArtifactError, DigestMismatch, UsageError
from loader.log import NullLogger
from loader.pull import PullOptions, pull
from tests.support.files import make_tree, tree
from tests.support.oci import OCI_INDEX, OCI_MANIFEST, Pusher, file_layer, sha256

LOG = NullLogger()
ACCEPT = f"{OCI_MANIFEST}, {OCI_INDEX}"

MODEL_A = {"model.safetensors": os.urandom(2 << 20), "config.json": b'{"a": 1}', "sub/dir/tokenizer.json": b"{}"}
MODEL_B = {"weights.gguf": os.urandom(300_000), "README.md": b"# b\n", "config.json": b'{"a": 1}'}
INDEXED = {"w.bin": b"indexed weights", "c.json": b"{}"}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "loader.cli", *args], capture_output=True, text=True)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def manifest_bytes(registry_url: str, repo: str, ref: str) -> bytes:
    r = requests.get(f"{registry_url}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT})
    r.raise_for_status()
    return r.content


def seed(reg, tmp_path: Path, prefix: str) -> dict[str, str]:
    """Three refs in ``reg``: a ModelPack push, a zstd ORAS push, and an index over a titled artifact."""
    a = P.push(make_tree(tmp_path / "a", MODEL_A), f"{reg.host}/{prefix}/a:v1",
               P.PushOptions(progress="none"), LOG).digest
    b = P.push(make_tree(tmp_path / "b", MODEL_B), f"{reg.host}/{prefix}/b:v2",
               P.PushOptions(progress="none", format="oras", compress="zstd"), LOG).digest
    pusher = Pusher(reg.url)
    child = pusher.push_artifact(f"{prefix}/idx", "child", [file_layer(n, d) for n, d in INDEXED.items()])
    size = len(pusher.manifest_bytes(f"{prefix}/idx", child))
    idx = pusher.push_index(f"{prefix}/idx", "v3", [(child, size, None)])
    return {f"{reg.host}/{prefix}/a:v1": a, f"{reg.host}/{prefix}/b:v2": b, f"{reg.host}/{prefix}/idx:v3": idx,
            "child": child}


TREES = {"a:v1": MODEL_A, "b:v2": MODEL_B, "idx:v3": INDEXED}


def test_export_writes_a_standard_oci_layout(registry, tmp_path):
    digests = seed(registry, tmp_path, "bundle/layout")
    refs = [r for r in digests if r != "child"]
    out = tmp_path / "models.tar"
    res = B.export(refs, out, B.RegistryOptions(), LOG)
    assert res.refs == [(r, digests[r]) for r in refs]
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "models.tar"]  # no temporary file left beside it

    with tarfile.open(out) as tf:
        names = tf.getnames()
        assert names[:4] == ["oci-layout", "index.json", "blobs", "blobs/sha256"]
        assert [tf.getmember(n).isdir() for n in names[:4]] == [False, False, True, True]
        assert json.loads(tf.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads(tf.extractfile("index.json").read())
        blobs = {"sha256:" + n.rsplit("/", 1)[1]: tf.extractfile(n).read() for n in names[4:]}
    entries = []
    for r in refs:
        data = manifest_bytes(registry.url, r.split("/", 1)[1].rsplit(":", 1)[0], r.rsplit(":", 1)[1])
        mt = OCI_INDEX if r.endswith("idx:v3") else OCI_MANIFEST
        entries.append({"mediaType": mt, "digest": sha256(data), "size": len(data),
                        "annotations": {"io.containerd.image.name": r,
                                        "org.opencontainers.image.ref.name": r.rsplit(":", 1)[1]}})
    assert index == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}

    # Every blob is named by its digest, once, and the set is exactly what the refs reference.
    assert len(names[4:]) == len(blobs)
    assert all(sha256(data) == d for d, data in blobs.items())
    expected = set()
    for r, d in list(digests.items()):
        repo = "bundle/layout/idx" if r == "child" else r.split("/", 1)[1].rsplit(":", 1)[0]
        m = json.loads(manifest_bytes(registry.url, repo, d))
        expected.add(d)
        expected |= {x["digest"] for x in m.get("layers", []) + ([m["config"]] if "config" in m else [])}
    assert set(blobs) == expected
    assert res.blobs == len(expected) and res.bytes == sum(map(len, blobs.values()))


def test_export_then_import_serves_pulls_with_no_registry(fresh_registry, tmp_path):
    digests = seed(fresh_registry, tmp_path, "air")
    refs = [r for r in digests if r != "child"]
    bundle = tmp_path / "air.tar"
    cli("export", *refs, "-o", str(bundle), "--output", "json")
    fresh_registry.stop()

    cache = tmp_path / "cache"
    out = cli("import", str(bundle), "--cache", str(cache), "--output", "json")
    imported = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(o["ref"], o["digest"], o["source"]) for o in imported] == [(r, digests[r], r) for r in refs]
    for o, r in zip(imported, refs, strict=True):
        files = TREES[r.rsplit("/", 1)[1]]
        assert o["path"] == str(cache / "models/sha256" / digests[r][7:])
        assert (o["bytes"], o["files"]) == (sum(map(len, files.values())), len(files))
        assert tree(Path(o["path"])) == files

    for r in refs:
        offline = json.loads(cli("pull", r, "--cache", str(cache), "--offline", "--output", "json",
                                 "--progress", "none").stdout)
        assert (offline["digest"], offline["cache_hit"]) == (digests[r], True)
        # A tag pull re-checks the registry, finds it down, and serves the imported copy with a warning.
        down = cli("pull", r, "--cache", str(cache), "--output", "json", "--progress", "none", "--timeout", "2")
        assert json.loads(down.stdout)["cache_hit"] is True and json.loads(down.stdout)["digest"] == digests[r]
        assert f"warning: registry {fresh_registry.host} unreachable" in down.stderr
        by_digest = pull(f"{r.rsplit(':', 1)[0]}@{digests[r]}", PullOptions(cache=cache, progress="none"), LOG)
        assert by_digest.cache_hit and tree(Path(by_digest.path)) == TREES[r.rsplit("/", 1)[1]]

    # Importing again publishes nothing new and changes nothing.
    again = cli("import", str(bundle), "--cache", str(cache), "--output", "json")
    assert [json.loads(line)["path"] for line in again.stdout.splitlines()] == [o["path"] for o in imported]
    assert os.listdir(cache / "tmp") == []


def test_skopeo_reads_the_bundle(registry, tmp_path):
    digests = seed(registry, tmp_path, "bundle/skopeo")
    refs = [r for r in digests if r != "child"]
    bundle = tmp_path / "b.tar"
    B.export(refs, bundle, B.RegistryOptions(), LOG)
    for r in refs[:2]:
        tag = r.rsplit(":", 1)[1]
        out = tmp_path / f"skopeo-{tag}"
        subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{bundle}:{tag}", f"dir:{out}"], check=True,
                       capture_output=True)
        repo = r.split("/", 1)[1].rsplit(":", 1)[0]
        data = manifest_bytes(registry.url, repo, tag)
        assert (out / "manifest.json").read_bytes() == data
        m = json.loads(data)
        want = {d["digest"][7:]: requests.get(f"{registry.url}/v2/{repo}/blobs/{d['digest']}").content
                for d in m["layers"] + [m["config"]]}
        got = {n: (out / n).read_bytes() for n in os.listdir(out) if n not in ("manifest.json", "version")}
        assert got == want


def test_import_to_another_registry_keeps_repository_paths(registry, fresh_registry, tmp_path):
    digests = seed(registry, tmp_path, "bundle/to")
    refs = [r for r in digests if r != "child"]
    bundle = tmp_path / "to.tar"
    B.export(refs, bundle, B.RegistryOptions(), LOG)
    out = cli("import", str(bundle), "--to", f"{fresh_registry.host}/mirror", "--output", "json")
    pushed = [json.loads(line) for line in out.stdout.splitlines()]
    targets = [f"{fresh_registry.host}/mirror/{r.split('/', 1)[1]}" for r in refs]
    assert pushed == [{"ref": t, "digest": digests[r], "source": r} for t, r in zip(targets, refs, strict=True)]
    for t, r in zip(targets, refs, strict=True):
        repo, tag = t.split("/", 1)[1].rsplit(":", 1)
        src_repo = r.split("/", 1)[1].rsplit(":", 1)[0]
        assert manifest_bytes(fresh_registry.url, repo, tag) == manifest_bytes(registry.url, src_repo, tag)
        got = pull(t, PullOptions(cache=tmp_path / "cache", progress="none"), LOG)
        assert (got.digest, got.cache_hit) == (digests[r], False)
        assert tree(Path(got.path)) == TREES[r.rsplit("/", 1)[1]]
    # The index's child went along, under its digest.
    assert sha256(manifest_bytes(fresh_registry.url, "mirror/bundle/to/idx", digests["child"])) == digests["child"]
    # A second import finds every blob there already.
    again = B.import_to_registry(bundle, f"{fresh_registry.host}/mirror", B.RegistryOptions(), LOG)
    assert [r.ref for r in again] == targets


def _flip(bundle: Path, member: str, offset: int = 10) -> None:
    with tarfile.open(bundle) as tf:
        pos = tf.getmember(member).offset_data + offset
    with open(bundle, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("what", ["layer", "manifest"])
def test_corrupt_bundle_is_refused_and_nothing_is_published(what, registry, fresh_registry, tmp_path):
    digests = seed(registry, tmp_path, f"bundle/corrupt-{what}")
    ref = next(r for r in digests if r.endswith("/a:v1"))
    bundle = tmp_path / "c.tar"
    B.export([ref], bundle, B.RegistryOptions(), LOG)
    m = json.loads(manifest_bytes(registry.url, f"bundle/corrupt-{what}/a", "v1"))
    layer = next(x for x in m["layers"] if x["size"] > 1000)
    target = layer["digest"] if what == "layer" else digests[ref]
    _flip(bundle, f"blobs/sha256/{target[7:]}")

    cache = tmp_path / "cache"
    out = cli("import", str(bundle), "--cache", str(cache), check=False)
    assert out.returncode == int(DigestMismatch.exit_code), out.stderr
    kind = "blob" if what == "layer" else "manifest"
    assert f"{bundle}: {kind} {target} hashes to sha256:" in out.stderr
    assert "the bundle is corrupt" in out.stderr and "nothing was imported" in out.stderr
    for d in ("blobs/sha256", "models/sha256", "refs", "tmp", "partial"):
        assert os.listdir(cache / d) == [], d

    with pytest.raises(DigestMismatch):
        B.import_to_registry(bundle, f"{fresh_registry.host}/mirror", B.RegistryOptions(), LOG)
    assert requests.get(f"{fresh_registry.url}/v2/_catalog").json() == {"repositories": []}


def test_export_refuses_a_blob_the_registry_corrupted(fresh_registry, tmp_path):
    digest = P.push(make_tree(tmp_path / "m", {"w.bin": b"x" * 5000}), f"{fresh_registry.host}/bad/m:v1",
                    P.PushOptions(progress="none"), LOG).digest
    blob = fresh_registry.blob_path(sha256(b"x" * 5000))
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DigestMismatch) as e:
        B.export([f"{fresh_registry.host}/bad/m:v1"], out / "b.tar", B.RegistryOptions(), LOG)
    assert f"blob {sha256(b'x' * 5000)} of {fresh_registry.host}/bad/m:v1" in str(e.value)
    assert "hashed to" in str(e.value) and "twice" in str(e.value) and digest
    assert os.listdir(out) == []


def test_not_a_bundle(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(ArtifactError, match="is not a readable \\(uncompressed\\) tar bundle"):
        B.import_to_cache(junk, tmp_path / "c", LOG)
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tf:
        tf.add(junk, "junk")
    with pytest.raises(ArtifactError, match="has no oci-layout: it is not an OCI image layout bundle"):
        B.import_to_cache(plain, tmp_path / "c", LOG)


@pytest.mark.parametrize("target,name,tag,expected", [
    ("reg.local:5000", "src.io/models/phi:v1", "v1", "reg.local:5000/models/phi:v1"),
    ("reg.local:5000/mirror/x", "src.io/models/phi:v1", "v1", "reg.local:5000/mirror/x/models/phi:v1"),
    ("reg.local:5000/only", None, "v9", "reg.local:5000/only:v9"),
    ("reg.local:5000/only", None, None, "reg.local:5000/only@sha256:" + "a" * 64),
], ids=["registry", "prefix", "no-name-prefix-is-repo", "no-tag-by-digest"])
def test_target_ref(target, name, tag, expected):
    e = B.BundleRef(name, tag, "sha256:" + "a" * 64, OCI_MANIFEST, 10)
    assert str(B.target_ref(target, e)) == expected


def test_target_ref_without_a_repository_is_a_usage_error():
    with pytest.raises(UsageError, match="give --to REGISTRY/REPOSITORY"):
        B.target_ref("reg.local:5000", B.BundleRef(None, "v1", "sha256:" + "a" * 64, OCI_MANIFEST, 10))
