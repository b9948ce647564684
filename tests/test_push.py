"""push against the real registry: push-pull round trips byte for byte, the manifests it writes, skipped and
mounted blobs, retries, refusals, flat memory on a large file, and oras-py reading what it pushes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests
import zstandard

from loader import push as P
from loader.errors import ArtifactError, UsageError
from loader.log import Logger, NullLogger
from loader.oci import MAX_LAYERS
from loader.pull import PullOptions, pull
from tests.support.faultproxy import FaultProxy
from tests.support.files import make_tree as files_make_tree
from tests.support.files import tree
from tests.support.oci import OCI_MANIFEST, sha256

LOG = NullLogger()
MiB = 1 << 20


MODEL = {
    "model-00001-of-00002.safetensors": os.urandom(3 * MiB + 123),  # > the 1 MiB test chunk: PATCH, PATCH, PUT
    "model-00002-of-00002.safetensors": os.urandom(200_000),
    "config.json": b'{"architectures": ["Phi3ForCausalLM"]}',
    "tokenizer.json": b'{"model": {"type": "BPE"}}',
    "tokenizer.model": b"\x00sentencepiece",
    "README.md": b"# phi\n",
    "LICENSE": b"MIT\n",
    "modeling_phi.py": b"class Phi: pass\n",
    "empty.bin": b"",
    "same-as-config.json": b'{"architectures": ["Phi3ForCausalLM"]}',  # identical bytes: one blob, two layers
    "onnx/model.onnx": os.urandom(5000),
    "onnx/deep/er/notes.txt": "naïve ünïcode\n".encode(),
}
MP = "application/vnd.cncf.model"
KINDS = {  # what classify() makes of each file
    "model-00001-of-00002.safetensors": "weight", "model-00002-of-00002.safetensors": "weight",
    "config.json": "weight.config", "tokenizer.json": "weight.config", "tokenizer.model": "weight.config",
    "README.md": "doc", "LICENSE": "doc", "modeling_phi.py": "code", "empty.bin": "weight",
    "same-as-config.json": "weight.config", "onnx/model.onnx": "weight", "onnx/deep/er/notes.txt": "weight.config",
}


def make_tree(root: Path, files: dict[str, bytes] = MODEL) -> Path:
    return files_make_tree(root, files)


def opts(**kw) -> P.PushOptions:
    return P.PushOptions(progress="none", chunk_size=kw.pop("chunk_size", 1 * MiB), **kw)


def get_json(registry, repo: str, ref: str, accept: str = OCI_MANIFEST) -> dict:
    r = requests.get(f"{registry.url}/v2/{repo}/manifests/{ref}", headers={"Accept": accept})
    r.raise_for_status()
    return r.json()


def get_blob(registry, repo: str, digest: str) -> bytes:
    r = requests.get(f"{registry.url}/v2/{repo}/blobs/{digest}")
    r.raise_for_status()
    return r.content


def one_file_tar(blob: bytes) -> list[tuple[str, bytes]]:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf]


@pytest.mark.parametrize("fmt", ["modelpack", "oras"])
@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_push_then_pull_gives_the_identical_tree(fmt, compress, registry, tmp_path):
    src = make_tree(tmp_path / "model")
    repo = f"push/rt-{fmt}-{compress}"
    res = P.push(src, f"{registry.host}/{repo}:v1", opts(format=fmt, compress=compress), LOG)

    pulled = pull(f"{registry.host}/{repo}:v1", PullOptions(cache=tmp_path / "cache", progress="none"), LOG)
    assert tree(Path(pulled.path)) == MODEL
    assert pulled.digest == res.digest and pulled.bytes == sum(map(len, MODEL.values()))
    assert pulled.files == len(MODEL)

    manifest = get_json(registry, repo, "v1")
    assert sha256(requests.get(f"{registry.url}/v2/{repo}/manifests/v1",
                               headers={"Accept": OCI_MANIFEST}).content) == res.digest
    names = sorted(MODEL)
    # Layers are in path order, one per file, titled with the relative path.
    layers = manifest["layers"]
    assert [layer["annotations"]["org.opencontainers.image.title"] for layer in layers] == names
    for layer, rel in zip(layers, names, strict=True):
        if compress == "none":
            assert layer["digest"] == sha256(MODEL[rel]) and layer["size"] == len(MODEL[rel])
        else:
            blob = get_blob(registry, repo, layer["digest"])
            assert layer["digest"] == sha256(blob) and layer["size"] == len(blob)
            assert one_file_tar(blob) == [(rel, MODEL[rel])]
        if fmt == "modelpack":
            kind = KINDS[rel]
            assert layer["mediaType"] == f"{MP}.{kind}.v1." + ("raw" if compress == "none" else "tar+zstd")
            assert layer["annotations"] == {"org.opencontainers.image.title": rel, "org.cncf.model.filepath": rel}
        else:
            assert layer["mediaType"] == ("application/vnd.oci.image.layer.v1.tar" if compress == "none"
                                          else "application/vnd.oci.image.layer.v1.tar+zstd")
            assert layer["annotations"] == ({"org.opencontainers.image.title": rel} if compress == "none" else
                                            {"org.opencontainers.image.title": rel, "io.deis.oras.content.unpack": "true"})

    config = get_blob(registry, repo, manifest["config"]["digest"])
    if fmt == "modelpack":
        diff_ids = []
        for layer, rel in zip(layers, names, strict=True):
            if compress == "none":
                diff_ids.append(sha256(MODEL[rel]))
            else:  # the DiffID is the hash of the uncompressed tar
                diff_ids.append(sha256(zstandard.ZstdDecompressor().stream_reader(
                    io.BytesIO(get_blob(registry, repo, layer["digest"]))).read()))
        assert json.loads(config) == {"descriptor": {"name": f"rt-{fmt}-{compress}"},
                                      "config": {"format": "safetensors"},
                                      "modelfs": {"type": "layers", "diffIds": diff_ids}}
        expected_config_desc = {"mediaType": "application/vnd.cncf.model.config.v1+json",
                                "digest": sha256(config), "size": len(config)}
        artifact_type = "application/vnd.cncf.model.manifest.v1+json"
    else:
        assert config == b"{}"
        expected_config_desc = {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"), "size": 2}
        artifact_type = "application/vnd.unknown.artifact.v1"
    assert manifest == {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                        "config": expected_config_desc, "layers": layers}

    # The result: every file listed with what happened; identical bytes uploaded once.
    assert [(f.rel, f.size) for f in res.pushed] == [(n, len(MODEL[n])) for n in names]
    actions = {f.rel: f.action for f in res.pushed}
    if compress == "none":  # config.json and same-as-config.json hold the same bytes: whichever came second
        dup = [r for r, a in actions.items() if a == "duplicate"]
        assert len(dup) == 1 and dup[0] in ("config.json", "same-as-config.json")
        assert sorted(actions.values()) == ["duplicate"] + ["uploaded"] * (len(MODEL) - 1)
    else:  # the tar entries carry the names: every blob differs
        assert set(actions.values()) == {"uploaded"}
    assert (res.files, res.bytes) == (len(MODEL), sum(map(len, MODEL.values())))
    assert res.warnings == ([P.ZSTD_WARNING] if compress == "zstd" else [])


def test_same_directory_pushes_to_the_same_digest(registry, tmp_path):
    """No timestamps in the config or the tars: a re-push of unchanged files is a no-op for the registry."""
    src = make_tree(tmp_path / "m")
    a = P.push(src, f"{registry.host}/push/repro:a", opts(compress="zstd"), LOG)
    b = P.push(src, f"{registry.host}/push/repro:b", opts(compress="zstd"), LOG)
    assert a.digest == b.digest
    assert b.uploaded_bytes == 0


def _blob_writes(proxy: FaultProxy) -> list[tuple[str, str, int]]:
    return [(r.method, r.path.split("?")[0].rsplit("/", 2)[-2], r.status) for r in proxy.requests
            if "/blobs/uploads/" in r.path]


def test_second_push_skips_every_blob_the_registry_has(registry, tmp_path):
    src = make_tree(tmp_path / "m")
    with FaultProxy(registry.url) as proxy:
        ref = f"{proxy.host}/push/again:v1"
        first = P.push(src, ref, opts(), LOG)
        distinct = len({sha256(d) for d in MODEL.values()}) + 1  # + the config
        assert (first.skipped_blobs, first.mounted_blobs) == (0, 0)
        # 11 distinct blobs; the 3 MiB file goes up as 3 PATCHes of 1 MiB and a closing PUT.
        writes = _blob_writes(proxy)
        assert sorted(m for m, _, _ in writes) == sorted(["POST"] * distinct + ["PATCH"] * 3 + ["PUT"] * distinct)
        config_size = get_json(registry, "push/again", "v1")["config"]["size"]
        assert first.uploaded_bytes == sum(len(d) for d in {sha256(d): d for d in MODEL.values()}.values()) + config_size

        proxy.reset_counters()
        second = P.push(src, ref, opts(), LOG)
        assert second.digest == first.digest
        assert (second.skipped_blobs, second.mounted_blobs, second.uploaded_bytes) == (distinct, 0, 0)
        assert {f.action for f in second.pushed} == {"exists", "duplicate"}
        assert _blob_writes(proxy) == []
        heads = [r for r in proxy.requests if r.method == "HEAD"]
        assert len(heads) == distinct and {r.status for r in heads} == {200}
        assert [(r.method, r.path) for r in proxy.requests if "/manifests/" in r.path] == [
            ("PUT", "/v2/push/again/manifests/v1")]


def test_cross_repository_mount_is_used(registry, tmp_path):
    src = make_tree(tmp_path / "m")
    P.push(src, f"{registry.host}/push/mount-src:v1", opts(format="oras"), LOG)
    with FaultProxy(registry.url) as proxy:
        res = P.push(src, f"{proxy.host}/push/mount-dst:v1", opts(format="oras", mount_from="push/mount-src"), LOG)
        posts = [r for r in proxy.requests if r.method == "POST"]
        assert all("mount=sha256" in r.path and "from=push%2Fmount-src" in r.path for r in posts)
        assert {r.status for r in posts} == {201}
        assert not [r for r in proxy.requests if r.method in ("PATCH",) or
                    (r.method == "PUT" and "/blobs/" in r.path)]
    distinct = len({sha256(d) for d in MODEL.values()})
    # The empty config blob is the same in both repositories: mounted too.
    assert (res.mounted_blobs, res.skipped_blobs, res.uploaded_bytes) == (distinct + 1, 0, 0)
    pulled = pull(f"{registry.host}/push/mount-dst:v1", PullOptions(cache=tmp_path / "c", progress="none"), LOG)
    assert tree(Path(pulled.path)) == MODEL


@pytest.mark.parametrize("count,match,resumed", [
    (3, "/blobs/uploads/", False),  # the first three upload requests, whatever they are: POSTs retried
    (1, "_state=", True),  # the first request into an open session: a PATCH of the 3 MiB file, resumed
], ids=["any-upload-request", "patch-resumed-from-registry-offset"])
def test_transient_upload_failures_are_retried(count, match, resumed, registry, tmp_path):
    src = make_tree(tmp_path / "m")
    with FaultProxy(registry.url) as proxy:
        proxy.set_faults(status_503=count, status_503_match=match, retry_after="0")
        res = P.push(src, f"{proxy.host}/push/retry-{count}:v1", opts(concurrency=1), LOG)
        assert proxy.faults_injected["503"] == count
        status_checks = [r for r in proxy.requests if r.method == "GET" and "/blobs/uploads/" in r.path]
        assert [r.status for r in status_checks] == ([204] if resumed else [])
    pulled = pull(f"{registry.host}/push/retry-{count}:v1", PullOptions(cache=tmp_path / "c", progress="none"), LOG)
    assert pulled.digest == res.digest and tree(Path(pulled.path)) == MODEL


def test_symlink_inside_is_pushed_as_its_target_and_empty_dirs_are_named(registry, tmp_path):
    src = make_tree(tmp_path / "m", {"weights/a.safetensors": b"A" * 100, "config.json": b"{}"})
    os.symlink("weights/a.safetensors", src / "alias.safetensors")
    (src / "empty" / "nested").mkdir(parents=True)
    res = P.push(src, f"{registry.host}/push/links:v1", opts(), LOG)
    assert res.warnings == ["empty directories are not pushed (a per-file artifact cannot hold them): empty/nested"]
    pulled = pull(f"{registry.host}/push/links:v1", PullOptions(cache=tmp_path / "c", progress="none"), LOG)
    assert tree(Path(pulled.path)) == {"weights/a.safetensors": b"A" * 100, "alias.safetensors": b"A" * 100,
                                       "config.json": b"{}"}


def test_executable_files_are_named_in_a_warning_and_pulled_without_their_bit(registry, tmp_path):
    files = {f"bin/tool{i}": b"#!/bin/sh\n" for i in range(10)} | {"run.sh": b"#!/bin/sh\necho hi\n", "w.bin": b"w"}
    src = make_tree(tmp_path / "m", files)
    for rel in files:
        if rel != "w.bin":
            os.chmod(src / rel, 0o755)
    out = io.StringIO()
    res = P.push(src, f"{registry.host}/push/exec:v1", opts(), Logger(out))
    warning = ("11 executable files will not be executable on either path (model-loader makes every file 0444, an"
               " image volume shows 0644): bin/tool0, bin/tool1, bin/tool2, bin/tool3, bin/tool4, bin/tool5,"
               " bin/tool6, bin/tool7 and 3 more; run them through an interpreter (sh run.sh) or put them in the"
               " container image")
    assert res.warnings == [warning]
    assert [line.split(" ", 1)[1] for line in out.getvalue().splitlines() if "level=warning" in line] == [
        f'level=warning event=push.warning ref={registry.host}/push/exec:v1 warning="{warning}"']
    pulled = pull(f"{registry.host}/push/exec:v1", PullOptions(cache=tmp_path / "c", progress="none"), LOG)
    assert tree(Path(pulled.path)) == files
    assert {rel: stat.S_IMODE(os.stat(Path(pulled.path) / rel).st_mode) for rel in files} == dict.fromkeys(files, 0o444)


def test_one_executable_file_is_named_alone(tmp_path):
    f = P.LocalFile("run.sh", tmp_path / "run.sh", 3, executable=True)
    assert P.path_warnings([f, P.LocalFile("w.bin", tmp_path / "w.bin", 1)], "zstd") == [
        P.ZSTD_WARNING,
        "1 executable file will not be executable on either path (model-loader makes every file 0444, an image"
        " volume shows 0644): run.sh; run it through an interpreter (sh run.sh) or put it in the container image"]


def _escape(src: Path, tmp: Path) -> None:
    (tmp / "outside").write_bytes(b"secret")
    os.symlink("../outside", src / "leak.bin")


def _dir_link(src: Path, tmp: Path) -> None:
    (src / "d").mkdir()
    (src / "d" / "f").write_bytes(b"x")
    os.symlink("d", src / "dlink")


def _fifo(src: Path, tmp: Path) -> None:
    os.mkfifo(src / "pipe")


def _dangling(src: Path, tmp: Path) -> None:
    os.symlink("nowhere", src / "dangling")


def _backslash_dots(src: Path, tmp: Path) -> None:
    (src / "..\\evil.bin").write_bytes(b"x")  # one file; the loader reads '\\' as a separator, so '..' climbs


def _too_many_files(src: Path, tmp: Path) -> None:
    for i in range(MAX_LAYERS):  # with config.json: one more than a manifest may have
        (src / f"f{i:05}").write_bytes(b"")


@pytest.mark.parametrize("setup,fragment", [
    (_escape, "leak.bin: is a symlink to '../outside', outside the directory"),
    (_dir_link, "dlink: is a symlink to a directory"),
    (_fifo, "pipe: is a special file (fifo, socket or device)"),
    (_dangling, "dangling: is a dangling symlink to 'nowhere'"),
    (_backslash_dots, "m: layer name '..\\\\evil.bin' contains '..': artifacts may not name paths outside the"
                      " model; model-loader pull would refuse the artifact, so"),
    (_too_many_files, f"m holds {MAX_LAYERS + 1} files, one layer each, and model-loader pull refuses a manifest"
                      f" of more than {MAX_LAYERS} layers;"),
], ids=["symlink-escapes", "symlink-to-dir", "fifo", "dangling", "name-the-loader-refuses", "too-many-layers"])
def test_unpushable_entries_are_refused_before_any_upload(setup, fragment, registry, tmp_path):
    src = make_tree(tmp_path / "m", {"config.json": b"{}"})
    setup(src, tmp_path)
    with FaultProxy(registry.url) as proxy:
        with pytest.raises(ArtifactError) as e:
            P.push(src, f"{proxy.host}/push/refused:v1", opts(), LOG)
        assert proxy.requests == []
    assert fragment in str(e.value) and str(e.value).endswith("nothing was pushed")


@pytest.mark.parametrize("ref,args,fragment", [
    ("{host}/push/x@sha256:" + "0" * 64, {}, "give a tag, not a digest"),
    ("{host}/push/x:v1", {"mount_from": "other.example.com/repo"}, "names another registry"),
    ("Bad Ref", {}, "reference 'Bad Ref'"),
], ids=["digest-ref", "mount-other-registry", "bad-ref"])
def test_usage_errors(ref, args, fragment, registry, tmp_path):
    src = make_tree(tmp_path / "m", {"a": b"a"})
    with pytest.raises(UsageError) as e:
        P.push(src, ref.format(host=registry.host), opts(**args), LOG)
    assert fragment in str(e.value)


def test_empty_directory_is_refused(tmp_path):
    (tmp_path / "m" / "sub").mkdir(parents=True)
    with pytest.raises(UsageError, match="holds no files to push"):
        P.push(tmp_path / "m", "127.0.0.1:1/x/y:v1", opts(), LOG)


@pytest.mark.parametrize("rel,kind", [
    ("model.safetensors", "weight"), ("x/pytorch_model.bin", "weight"), ("m.gguf", "weight"), ("w.pt", "weight"),
    ("w.pth", "weight"), ("m.onnx", "weight"), ("blob.unknown", "weight"), ("config.json", "weight.config"),
    ("generation_config.json", "weight.config"), ("tokenizer.model", "weight.config"), ("vocab.txt", "weight.config"),
    ("merges.txt", "weight.config"), ("tokenizer_config.json", "weight.config"), ("README.md", "doc"),
    ("LICENSE", "doc"), ("LICENSE.txt", "doc"), ("docs/guide.rst", "doc"), ("modeling.py", "code"),
    ("run.sh", "code"),
])
def test_classify(rel, kind):
    assert P.classify(rel) == kind


def test_cli_json_output(registry, tmp_path):
    src = make_tree(tmp_path / "m", {"w.safetensors": b"w" * 1000, "config.json": b"{}"})
    cmd = [sys.executable, "-m", "loader.cli", "push", str(src), f"{registry.host}/push/cli:v1", "--output", "json",
           "--progress", "none"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    obj = json.loads(out.stdout)
    assert set(obj) == {"ref", "digest", "bytes", "files", "seconds", "uploaded_bytes", "skipped_blobs",
                        "mounted_blobs"}
    config = get_blob(registry, "push/cli", get_json(registry, "push/cli", "v1")["config"]["digest"])
    assert (obj["ref"], obj["bytes"], obj["files"], obj["skipped_blobs"], obj["mounted_blobs"]) == (
        f"{registry.host}/push/cli:v1", 1002, 2, 0, 0)
    assert obj["uploaded_bytes"] == 1002 + len(config)
    assert obj["digest"] == sha256(requests.get(f"{registry.url}/v2/push/cli/manifests/v1",
                                                headers={"Accept": OCI_MANIFEST}).content)
    text = subprocess.run(cmd[:-4] + ["--progress", "none"], capture_output=True, text=True, check=True).stdout
    assert text.splitlines() == [
        f"  exists    config.json  0.0 MB  {MP}.weight.config.v1.raw",
        f"  exists    w.safetensors  0.0 MB  {MP}.weight.v1.raw",
        f"pushed {registry.host}/push/cli:v1@{obj['digest']} (2 files, 0.0 MB; uploaded 0.0 MB,"
        " 3 blobs already present, 0 mounted) in " + text.splitlines()[-1].rsplit(" in ", 1)[1],
    ]


def test_oras_py_pulls_an_oras_push(registry, tmp_path):
    import oras.client

    src = make_tree(tmp_path / "m")
    P.push(src, f"{registry.host}/push/oras-py:v1", opts(format="oras"), LOG)
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    out = tmp_path / "oras-out"
    files = client.pull(target=f"{registry.host}/push/oras-py:v1", outdir=str(out))
    assert sorted(Path(f).relative_to(out).as_posix() for f in files) == sorted(MODEL)
    assert tree(out) == MODEL


@pytest.mark.slow
def test_large_file_push_keeps_memory_flat(registry, tmp_path):
    """300 MB in one file: peak RSS of the whole loader process stays under 150 MB."""
    size = 300 * 1000 * 1000
    src = tmp_path / "big"
    src.mkdir()
    with open(src / "model.safetensors", "wb") as f:
        f.truncate(size)  # sparse: reads as zeros without using disk here
    (src / "config.json").write_bytes(b"{}")
    cmd = [sys.executable, "-m", "loader.cli", "push", str(src), f"{registry.host}/push/big:v1", "--output", "json",
           "--progress", "none", "--chunk-size", "32"]
    from tests.support.rss import run_measured

    proc, peak_mb = run_measured(cmd)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err.decode()
    assert peak_mb < 150, f"peak RSS {peak_mb:.0f} MB"
    print(f"push of 300 MB: peak RSS {peak_mb:.0f} MB")
    obj = json.loads(out)
    assert (obj["bytes"], obj["files"]) == (size + 2, 2)
    h = hashlib.sha256()
    zeros = bytes(8 * MiB)
    left = size
    while left:
        h.update(zeros[: min(left, len(zeros))])
        left -= min(left, len(zeros))
    layers = get_json(registry, "push/big", "v1")["layers"]
    assert [(ly["annotations"]["org.opencontainers.image.title"], ly["digest"], ly["size"]) for ly in layers] == [
        ("config.json", sha256(b"{}"), 2), ("model.safetensors", "sha256:" + h.hexdigest(), size)]


def _creds(reg, tmp_path: Path, user: str = "alice"):
    """Credentials of a token registry user (password ``<user>-pw``), read from a docker config file as a pod's
    would be."""
    import base64

    from loader.credentials import load_docker_configs

    cfg = tmp_path / f"docker-{user}"
    cfg.mkdir()
    auth = base64.b64encode(f"{user}:{user}-pw".encode()).decode()
    (cfg / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    return load_docker_configs([str(cfg)], {})


def test_push_with_token_auth_asks_for_pull_and_push(tmp_path):
    from loader.errors import AuthError
    from tests.support.auth_registry import start_token_registry

    src = make_tree(tmp_path / "m", {"w.safetensors": os.urandom(10_000), "config.json": b"{}"})
    with start_token_registry({"alice": "alice-pw"}, acl={"alice": {"*": ["pull", "push"]}}) as reg:
        creds = _creds(reg, tmp_path)
        ref = f"{reg.host}/private/pushed:v1"
        res = P.push(src, ref, opts(credentials=creds), LOG)
        issued = reg.token_server.issued
        assert {(t.subject, t.requested, t.access) for t in issued} == {
            ("alice", ("repository:private/pushed:pull,push",), (("private/pushed", ("pull", "push")),))}
        pulled = pull(ref, PullOptions(cache=tmp_path / "c", progress="none", credentials=creds), LOG)
        assert pulled.digest == res.digest and tree(Path(pulled.path)) == tree(src)

        with pytest.raises(AuthError) as e:
            P.push(src, f"{reg.host}/private/anon:v1", opts(), LOG)
        assert str(e.value).startswith(f"push to {reg.host}/private/anon:v1 refused: registry {reg.host} refused")
        assert str(e.value).endswith(f"Pushing needs credentials allowed to push to {reg.host}/private/anon"
                                     " (docker login, or --docker-config)")


def test_cross_repository_mount_with_token_auth_asks_one_token_for_both_repositories(tmp_path):
    """A token registry links the blob only when one token grants push on the target and pull on the source."""
    from tests.support.auth_registry import start_token_registry

    src = make_tree(tmp_path / "m")
    with start_token_registry({"alice": "alice-pw"}, acl={"alice": {"*": ["pull", "push"]}}) as reg:
        creds = _creds(reg, tmp_path)
        P.push(src, f"{reg.host}/private/mount-src:v1", opts(format="oras", credentials=creds), LOG)
        before = len(reg.token_server.issued)
        res = P.push(src, f"{reg.host}/private/mount-dst:v1",
                     opts(format="oras", credentials=creds, mount_from="private/mount-src"), LOG)
        issued = reg.token_server.issued[before:]
        assert {(t.subject, t.requested, t.access) for t in issued} == {
            ("alice", ("repository:private/mount-dst:pull,push", "repository:private/mount-src:pull"),
             (("private/mount-dst", ("pull", "push")), ("private/mount-src", ("pull",))))}
        distinct = len({sha256(d) for d in MODEL.values()})
        assert (res.mounted_blobs, res.skipped_blobs, res.uploaded_bytes) == (distinct + 1, 0, 0)
        pulled = pull(f"{reg.host}/private/mount-dst:v1",
                      PullOptions(cache=tmp_path / "c", progress="none", credentials=creds), LOG)
        assert tree(Path(pulled.path)) == MODEL


def test_mount_refused_for_the_source_falls_back_to_an_upload(tmp_path):
    """Credentials that may push to the target but not read --mount-from's repository still push: the token
    service grants the allowed subset, the registry refuses the mount, the blobs are uploaded."""
    from tests.support.auth_registry import start_token_registry

    src = make_tree(tmp_path / "m")
    acl = {"bob": {"*": ["pull", "push"]}, "alice": {"private/only-mine": ["pull", "push"]}}
    with start_token_registry({"alice": "alice-pw", "bob": "bob-pw"}, acl=acl) as reg:
        P.push(src, f"{reg.host}/private/bobs:v1", opts(format="oras", credentials=_creds(reg, tmp_path, "bob")), LOG)
        alice = _creds(reg, tmp_path)
        res = P.push(src, f"{reg.host}/private/only-mine:v1",
                     opts(format="oras", credentials=alice, mount_from="private/bobs"), LOG)
        distinct = len({sha256(d) for d in MODEL.values()})
        assert (res.mounted_blobs, res.skipped_blobs) == (0, 0)
        actions = [f.action for f in res.pushed]
        assert (actions.count("uploaded"), actions.count("duplicate")) == (distinct, len(MODEL) - distinct)
        pulled = pull(f"{reg.host}/private/only-mine:v1",
                      PullOptions(cache=tmp_path / "c", progress="none", credentials=alice), LOG)
        assert tree(Path(pulled.path)) == MODEL



# ---- scratch space: a read-only root with no /cache ----------------------------------------------------------------
# The loader image's environment: a read-only root filesystem, and TMPDIR on a cache volume (/cache/tmp) that a push
# has no reason to mount. The script runs in a mount namespace of its own (the test's mounts stay as they are):
# every mount becomes read-only, each of $VOLUMES a writable bind mount of itself (what mounting a volume there
# gives a container), and the probe prints which places are writable before the loader starts.
READ_ONLY_ROOT = r"""
set -e
for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do mount -o remount,bind,ro "$m" 2>/dev/null || :; done
for v in $VOLUMES; do mount --bind "$v" "$v"; mount -o remount,bind,rw "$v"; done
for p in / /tmp /var/tmp "$PWD" $PROBE; do if touch "$p/.probe" 2>/dev/null; then rm "$p/.probe"; echo "$p"; fi; done
echo "--"
exec "$@"
"""
SCRATCH_MODEL = {"w.safetensors": b"w" * 70_000, "config.json": b"{}", "sub/tokenizer.json": b'{"t": 1}'}


@dataclasses.dataclass
class ReadOnlyPush:
    code: int
    writable: list[str]  # what the probe found writable
    out: dict | None  # --output json
    stderr: str

    @property
    def error(self) -> str:
        """The error of the loader's ``event=failed`` line (logfmt: the last field, quoted)."""
        [line] = [line for line in self.stderr.splitlines() if " level=error event=failed " in line]
        quoted = line.split(" error=", 1)[1]
        assert quoted.startswith('"') and quoted.endswith('"'), line
        return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), quoted[1:-1])

    @property
    def scratch(self) -> list[str]:
        """The scratch directories the push made (its push.scratch log lines)."""
        return [line.split(" dir=", 1)[1] for line in self.stderr.splitlines() if " event=push.scratch " in line]


def push_read_only(src: Path, ref: str, *flags: str, volumes: tuple[Path, ...] = ()) -> ReadOnlyPush:
    """``model-loader push --compress zstd`` as the loader image runs it: all read-only except ``volumes``."""
    env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": "/cache/tmp",
           "VOLUMES": " ".join(map(str, volumes)), "PROBE": f"{src} {src.parent} {src.parent.parent}"}
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", READ_ONLY_ROOT, "sh",
           sys.executable, "-m", "loader.cli", "push", str(src), ref, "--output", "json", "--progress", "none",
           *flags]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    writable, _, out = done.stdout.partition("--\n")
    assert "Traceback" not in done.stderr, done.stderr
    return ReadOnlyPush(done.returncode, writable.split(), json.loads(out) if done.returncode == 0 else None,
                        done.stderr)


def pulls_back(registry, ref: str, digest: str, tmp_path: Path) -> bool:
    pulled = pull(ref, PullOptions(cache=tmp_path / "cache", progress="none"), LOG)
    return tree(Path(pulled.path)) == SCRATCH_MODEL and pulled.digest == digest


ROOT = Path(__file__).resolve().parent.parent
NEEDS_MOUNTS = pytest.mark.skipif(os.geteuid() != 0, reason="remounts in a mount namespace of its own: only root may")


@pytest.mark.needs_root
@NEEDS_MOUNTS
def test_push_without_compression_writes_nothing_locally(registry, tmp_path):
    src = make_tree(tmp_path / "models" / "m", SCRATCH_MODEL)
    ref = f"{registry.host}/push/ro-plain:v1"
    res = push_read_only(src, ref)
    assert res.writable == []  # not /, /tmp, /var/tmp, the working directory, the model, beside it, above it
    assert res.code == 0, res.stderr
    assert res.scratch == []  # no scratch directory made, so no TMPDIR needed
    assert res.out is not None and pulls_back(registry, ref, res.out["digest"], tmp_path)


@pytest.mark.needs_root
@NEEDS_MOUNTS
def test_compressed_push_with_nowhere_to_write_says_which_directory_to_give(registry, tmp_path):
    src = make_tree(tmp_path / "models" / "m", SCRATCH_MODEL)
    res = push_read_only(src, f"{registry.host}/push/ro-nowhere:v1", "--compress", "zstd")
    assert (res.writable, res.code) == ([], 2)
    tried = ["/cache/tmp", "/tmp", "/var/tmp", "/usr/tmp", str(ROOT)]  # tempfile's candidates: TMPDIR first
    assert res.error == (
        "--compress zstd writes each compressed layer to a scratch file before uploading it, and no"
        f" scratch directory could be made ({src.parent}: Read-only file system; TMPDIR: No usable temporary"
        f" directory found in {tried}): give --tmp-dir DIR, a writable directory with room for --concurrency"
        " compressed files (in a container, a mounted volume such as an emptyDir)"
    )
    assert requests.get(f"{registry.url}/v2/push/ro-nowhere/manifests/v1").status_code == 404
    # --tmp-dir names one place, and only that one is tried: a read-only one is the same exit 2, naming it.
    res = push_read_only(src, f"{registry.host}/push/ro-nowhere:v1", "--compress", "zstd", "--tmp-dir",
                         str(tmp_path / "models"))
    assert res.code == 2 and f"could be made ({tmp_path / 'models'}: Read-only file system): give" in res.error


@pytest.mark.needs_root
@NEEDS_MOUNTS
@pytest.mark.parametrize("where", ["tmp-dir", "beside"])
def test_compressed_push_writes_its_scratch_in_tmp_dir_or_beside_the_model(where, registry, tmp_path):
    src = make_tree(tmp_path / "models" / "m", SCRATCH_MODEL)
    ref = f"{registry.host}/push/ro-{where}:v1"
    if where == "tmp-dir":  # an emptyDir mounted for it
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        res = push_read_only(src, ref, "--compress", "zstd", "--tmp-dir", str(scratch), volumes=(scratch,))
        assert res.writable == []  # (the probe does not look at the scratch volume)
    else:  # the model's volume is writable: the scratch goes beside the model, on that volume
        scratch = src.parent
        res = push_read_only(src, ref, "--compress", "zstd", volumes=(scratch,))
        assert res.writable == [str(src), str(src.parent)]
    assert res.code == 0, res.stderr
    [made] = res.scratch
    assert Path(made).parent == scratch and Path(made).name.startswith(".model-loader-push-")
    assert sorted(p.name for p in scratch.iterdir()) == ([] if where == "tmp-dir" else ["m"])  # removed after
    assert res.out is not None and pulls_back(registry, ref, res.out["digest"], tmp_path)
