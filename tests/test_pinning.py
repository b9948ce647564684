"""Issue 15, the loader's side: a running pod keeps its model.

Each pull for a pod pins the model it verified at ``pods/<uid>/<key>`` (the app mounts it with ``subPathExpr``);
a restarted pod's loader serves the pinned digest whatever the tag says now; gc never removes a pinned model and
removes the pins of pods gone from the node; what a kubelet leaves where a link should be (it creates a missing
subPath as an empty directory) is repaired, never a crash; registry CAs and plain-HTTP registries are settings;
termination messages say what really happened. Real registries, the loader's own code and CLI; the kubelet's
subPath resolution is modelled by ``os.path.realpath`` inside the volume (see tests/support/kubelet.py for the
faithful model the webhook tests use).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loader import contract
from loader.cache import Cache
from loader.commands.pull import describe
from loader.errors import LoaderError
from loader.gc import Policy, collect
from loader.log import Logger
from loader.pull import PullOptions, PullResult, pull
from loader.reference import parse
from loader.registry import RegistryClient
from tests.support.auth_registry import session_for, start_htpasswd_registry
from tests.support.files import tree
from tests.support.oci import Pusher, file_layer

UID_1 = "0f8fad5b-d9cb-469f-a165-70867728950e"
UID_2 = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


def run(ref: str, cache: Path, **kw) -> tuple[PullResult, str]:
    stream = io.StringIO()
    opts = dict(progress="none", concurrency=4)
    opts.update(kw)
    return pull(ref, PullOptions(cache=cache, **opts), Logger(stream)), stream.getvalue()


def app_sees(cache: Path, ref: str, uid: str) -> Path:
    """What an app container's subPathExpr pods/$(MODEL_CACHE_POD_UID)/<key> resolves to at a (re)start."""
    path = Path(os.path.realpath(cache / contract.pod_entry(ref, uid)))
    assert path.is_relative_to(cache.resolve()), path
    return path


def test_a_restarted_pod_keeps_the_digest_it_verified_after_the_tag_moves(registry, pusher, tmp_path):
    cache = tmp_path / "cache"
    ref = f"{registry.host}/pin/model:v1"
    a = pusher.push_artifact("pin/model", "v1", [file_layer("config.json", b'{"v": 1}')])
    first, _ = run(ref, cache, pod_uid=UID_1, node_name="node-a")
    assert first.digest == a and tree(app_sees(cache, ref, UID_1)) == {"config.json": b'{"v": 1}'}

    b = pusher.push_artifact("pin/model", "v1", [file_layer("config.json", b'{"v": 2}')])  # the tag moves
    restarted, log = run(ref, cache, pod_uid=UID_1, node_name="node-a")
    assert (restarted.digest, restarted.pinned) == (a, True) and "event=pull.pinned" in log
    assert tree(app_sees(cache, ref, UID_1)) == {"config.json": b'{"v": 1}'}
    assert Cache(cache).ref_target(ref) == a  # a pinned pull does not move the tag's link back or forth

    new_pod, _ = run(ref, cache, pod_uid=UID_2, node_name="node-a")
    assert (new_pod.digest, new_pod.pinned) == (b, False)
    assert tree(app_sees(cache, ref, UID_2)) == {"config.json": b'{"v": 2}'}
    assert tree(app_sees(cache, ref, UID_1)) == {"config.json": b'{"v": 1}'}  # still, for the older pod
    assert Cache(cache).ref_target(ref) == b
    assert (cache / "pods" / UID_1 / ".node").read_text() == "node-a"


def test_a_bad_pod_uid_is_a_usage_error_before_anything_is_written(tmp_path):
    with pytest.raises(LoaderError) as e:
        run("r.example.com/m:v1", tmp_path / "cache", pod_uid="../../etc", offline=True)
    assert e.value.exit_code == 2 and "--pod-uid '../../etc'" in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_gc_keeps_what_running_pods_pin_and_drops_the_pins_of_gone_pods(registry, pusher, tmp_path):
    cache = tmp_path / "cache"
    ref = f"{registry.host}/pin/gc:v1"
    a = pusher.push_artifact("pin/gc", "v1", [file_layer("w.bin", b"a" * 100)])
    run(ref, cache, pod_uid=UID_1, node_name="node-a")
    b = pusher.push_artifact("pin/gc", "v1", [file_layer("w.bin", b"b" * 100)])
    run(ref, cache, pod_uid=UID_2, node_name="node-a")
    kubelet_pods = tmp_path / "kubelet-pods"
    (kubelet_pods / UID_1).mkdir(parents=True)
    (kubelet_pods / UID_2).mkdir()
    log = Logger(io.StringIO())
    evict_all = Policy(max_unused=0.0, max_size=0)

    # Both pods run: nothing they pin goes, however old or large.
    report = collect(Cache(cache), evict_all, [], log, pods_dir=kubelet_pods, node="node-a", now=4e9)
    assert (report.evicted, report.pods, report.in_use) == ([], [], sorted([a, b]))
    # Without knowing which pods run, gc removes no pin and no pinned model.
    report = collect(Cache(cache), evict_all, [], log, now=4e9)
    assert (report.evicted, report.pods) == ([], [])

    # The first pod is gone from the node: its pin goes, then its model (unused); the second stays.
    (kubelet_pods / UID_1).rmdir()
    report = collect(Cache(cache), evict_all, [], log, pods_dir=kubelet_pods, node="node-a", now=4e9)
    assert report.pods == [UID_1] and [e.model.digest for e in report.evicted] == [a]
    assert sorted(os.listdir(cache / "pods")) == [UID_2] and os.listdir(cache / "models/sha256") == [b[7:]]
    assert tree(app_sees(cache, ref, UID_2)) == {"w.bin": b"b" * 100}


def test_gc_on_a_shared_claim_judges_only_its_own_nodes_pods(registry, pusher, tmp_path):
    cache = tmp_path / "cache"
    ref = f"{registry.host}/pin/shared:v1"
    pusher.push_artifact("pin/shared", "v1", [file_layer("w.bin", b"s" * 10)])
    run(ref, cache, pod_uid=UID_1, node_name="node-b")  # a pod on another node, same claim
    empty = tmp_path / "no-pods"
    empty.mkdir()
    report = collect(Cache(cache), Policy(max_unused=0.0), [], Logger(io.StringIO()), pods_dir=empty, node="node-a",
                     now=4e9)
    assert (report.pods, report.evicted) == ([], [])
    assert os.listdir(cache / "pods") == [UID_1]


@pytest.mark.parametrize("where", ["ref", "pod"])
@pytest.mark.parametrize("what", ["empty-dir", "dangling-link", "file"])
def test_what_a_kubelet_or_a_crash_leaves_at_an_entry_is_repaired_with_a_warning(registry, pusher, tmp_path,
                                                                                   where, what):
    cache = tmp_path / "cache"
    ref = f"{registry.host}/pin/heal:v1"
    pusher.push_artifact("pin/heal", "v1", [file_layer("w.bin", b"h" * 10)])
    Cache(cache).ensure()
    entry = cache / (contract.ref_subpath(ref) if where == "ref" else contract.pod_entry(ref, UID_1))
    entry.parent.mkdir(parents=True, exist_ok=True)
    if what == "empty-dir":
        entry.mkdir()  # what a kubelet makes for a missing subPath
    elif what == "dangling-link":
        os.symlink("../models/sha256/" + "0" * 64, entry)
    else:
        entry.write_bytes(b"")
    res, log = run(ref, cache, pod_uid=UID_1)
    assert tree(app_sees(cache, ref, UID_1)) == {"w.bin": b"h" * 10}
    assert tree(cache / contract.ref_subpath(ref)) == {"w.bin": b"h" * 10}
    if what != "dangling-link":
        assert "event=cache.repaired" in log and any("was a" in w for w in res.warnings)
    assert sorted(os.listdir(cache / "tmp")) == []


def test_gc_repairs_an_empty_directory_at_a_ref_instead_of_dying(tmp_path):
    cache = Cache(tmp_path / "cache").ensure()
    (cache.root / "refs" / "some-ref-key").mkdir()
    report = collect(cache, Policy(max_unused=0.0), [], Logger(io.StringIO()))
    assert report.refs == ["some-ref-key"] and os.listdir(cache.root / "refs") == []


# ---- registry settings -----------------------------------------------------------------------------------------
def test_a_private_ca_given_with_ca_file_is_trusted_and_only_then(tmp_path):
    """A TLS registry whose CA is in no system store: the pull fails without the bundle, succeeds with it."""
    import base64

    from loader import credentials

    reg = start_htpasswd_registry({"u": "pw"}, tls=True)
    try:
        p = Pusher(reg.url, session=session_for(reg, auth=("u", "pw")))
        digest = p.push_artifact("ca/model", "v1", [file_layer("w.bin", b"tls")])
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {reg.host: {"auth": base64.b64encode(b"u:pw").decode()}}}))
        creds = credentials.load_docker_configs([str(config)], {})
        ref = f"{reg.host}/ca/model:v1"
        with pytest.raises(LoaderError) as e:
            run(ref, tmp_path / "c", plain_http=False, credentials=creds)
        assert e.value.exit_code == 7 and "certificate" in str(e.value).lower()
        res, _ = run(ref, tmp_path / "c", plain_http=False, credentials=creds, ca_files=(str(reg.ca_path),))
        assert res.digest == digest and tree(res.path) == {"w.bin": b"tls"}
    finally:
        reg.stop()


def test_plain_http_registries_are_a_setting_and_checked(tmp_path):
    opts = PullOptions(cache=tmp_path, plain_http_registries=frozenset({"registry.internal:5000"}))
    assert opts.is_plain_http(parse("registry.internal:5000/m:v1")) is True
    assert opts.is_plain_http(parse("registry.example.com/m:v1")) is False
    assert opts.is_plain_http(parse("localhost:5000/m:v1")) is True
    # Hosts without case, as DNS compares them (the webhook's allow-list decides the scheme with the same function).
    assert opts.is_plain_http(parse("LOCALHOST:5000/m:v1")) is True
    assert opts.is_plain_http(parse("Registry.Internal:5000/m:v1")) is True
    assert opts.is_plain_http(parse("registry.internal:5001/m:v1")) is False
    with RegistryClient(parse("REGISTRY.internal:5000/m:v1"), plain_http_registries={"registry.internal:5000"}) as c:
        assert c.upstream.scheme == "http"
    with RegistryClient(parse("registry.internal:5000/m:v1"), plain_http_registries={"registry.internal:5000"}) as c:
        assert c.upstream.scheme == "http"
    with RegistryClient(parse("registry.example.com/m:v1"), plain_http_registries={"registry.internal:5000"}) as c:
        assert c.upstream.scheme == "https"
    bad = subprocess.run([sys.executable, "-m", "loader.cli", "pull", "r.example.com/m:v1", "--cache", str(tmp_path),
                          "--plain-http-registry", "http://x/y"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--plain-http-registry 'http://x/y' is not a registry host[:port]" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "loader.cli", "pull", "r.example.com/m:v1", "--cache",
                              str(tmp_path), "--ca-file", "/run/model-cache/ca/ca.crt"], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "MODEL_CACHE_REGISTRY_CA_CONFIGMAP" in missing.stderr


# ---- termination messages ---------------------------------------------------------------------------------------
def _result(**kw) -> PullResult:
    base = dict(ref="r.io/m:v1", digest="sha256:" + "a" * 64, path="/c", bytes=300_000_000, files=4, seconds=1.5,
                cache_hit=False)
    base.update(kw)
    return PullResult(**base)


@pytest.mark.parametrize("kw,text", [
    (dict(cache_hit=True), "cache hit in 1.50s"),
    (dict(fetched_bytes=300_000_000), "downloaded 300.0 MB in 1.50s"),
    (dict(fetched_bytes=0), "downloaded 0.0 of 300.0 MB, the rest already on the node in 1.50s"),
    (dict(fetched_bytes=100_000_000), "downloaded 100.0 of 300.0 MB, the rest already on the node in 1.50s"),
    (dict(cache_hit=True, stale=True), "STALE cached copy: registry unreachable, tag not re-checked in 1.50s"),
    (dict(cache_hit=True, pinned=True), "cache hit, pinned digest of this pod in 1.50s"),
], ids=["hit", "download", "all-shared", "part-shared", "stale", "pinned"])
def test_termination_messages_say_what_happened(kw, text):
    assert describe(_result(**kw)) == text


def test_a_stale_fallback_is_flagged_in_the_termination_message(fresh_registry, tmp_path):
    Pusher(fresh_registry.url).push_artifact("pin/stale", "v1", [file_layer("w.bin", b"x")])
    cache = tmp_path / "cache"
    term = tmp_path / "termination-log"
    term.write_text("")
    env = {**os.environ, "MODEL_LOADER_TERMINATION_LOG": str(term)}
    cmd = [sys.executable, "-m", "loader.cli", "pull", f"{fresh_registry.host}/pin/stale:v1", "--cache", str(cache),
           "--progress", "none"]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=120)
    fresh_registry.stop()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=120)
    assert "STALE cached copy: registry unreachable, tag not re-checked" in term.read_text()
    assert "warning: registry" in out.stderr
