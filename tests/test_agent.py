"""The node agent (loader/agent.py, ``model-loader agent``): warm labels that follow the cache, and the one process
that prefetches, untaints, labels, serves CSI and stops on SIGTERM. Real registry, real cache, a fake node API
(tests/support/fake_node_api.py: the two node calls, over TLS, with the API server's optimistic concurrency)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest

from loader import contract, gc
from loader.agent import LabelSync, label_patch, warm_labels
from loader.cache import Cache
from loader.csi import csi_pb2, csi_pb2_grpc
from loader.log import Logger
from loader.prefetch import NodeApi, NodeApiError
from loader.pull import PullOptions, pull
from tests.support.fake_node_api import FakeNodeApi
from tests.support.files import tree
from tests.test_prefetch import GPU_TAINT, WARMING, WARMING_TAINTS, data, free_port, node, push, samples

LOG = Logger(io.StringIO())


def label(ref: str) -> str:
    return contract.warm_label(ref)


@pytest.fixture
def node_api(tmp_path):
    api = FakeNodeApi(tmp_path / "api")
    yield api
    api.close()


def api_for(fake: FakeNodeApi) -> NodeApi:
    env = fake.env()
    return NodeApi(env["KUBERNETES_SERVICE_HOST"], int(env["KUBERNETES_SERVICE_PORT"]),
                   env["MODEL_LOADER_KUBE_TOKEN_FILE"], env["MODEL_LOADER_KUBE_CA_FILE"])


# --- what the node should carry -----------------------------------------------------------------------------------


def test_warm_labels_follow_what_the_cache_holds(registry, pusher, tmp_path):
    cache_dir = tmp_path / "cache"
    refs = [f"{registry.host}/agent/warm-{i}:v1" for i in range(3)]
    for i, ref in enumerate(refs):
        push(pusher, f"agent/warm-{i}", "v1", {"w.bin": data(f"warm-{i}", 10_000 + i)})
        pull(ref, PullOptions(cache=cache_dir, progress="none"), LOG)
    cache = Cache(cache_dir)
    for i, ref in enumerate(refs):  # last used: warm-2 longest ago, warm-0 most recently
        digest = cache.ref_target(ref)
        assert digest is not None
        os.utime(cache.lastuse_path(digest.hex), (1_800_000_000 - i * 100, 1_800_000_000 - i * 100))
    assert warm_labels(cache) == {label(r): "true" for r in refs}
    assert list(warm_labels(cache, limit=2)) == [label(refs[0]), label(refs[1])]

    # A link that is not a model's (something else wrote it) and a dangling one count for nothing.
    (cache_dir / contract.REFS_DIR / "stray-0123456789abcdef").symlink_to("../blobs/sha256/" + "0" * 64)
    (cache_dir / contract.REFS_DIR / "gone-fedcba9876543210").symlink_to("../models/sha256/" + "1" * 64)
    assert warm_labels(cache) == {label(r): "true" for r in refs}

    # gc evicts warm-2 (least recently used, beyond the size): its label goes with it.
    sizes = 10_000 + 10_001
    gc.collect(cache, gc.Policy(max_size=sizes), [], LOG, now=1_800_000_100)
    assert warm_labels(cache) == {label(refs[0]): "true", label(refs[1]): "true"}


def test_the_label_patch_sets_exactly_the_warm_labels_and_nothing_else():
    node_obj = {"metadata": {"resourceVersion": "7", "labels": {
        "pool": "gpu", "warm.model.cache/aaaaaaaaaaaaaaaa": "true", "warm.model.cache/bbbbbbbbbbbbbbbb": "true"}}}
    want = {"warm.model.cache/bbbbbbbbbbbbbbbb": "true", "warm.model.cache/cccccccccccccccc": "true"}
    assert label_patch(node_obj, want) == {"metadata": {"resourceVersion": "7", "labels": {
        "warm.model.cache/aaaaaaaaaaaaaaaa": None, "warm.model.cache/cccccccccccccccc": "true"}}}
    assert label_patch(node_obj, {"warm.model.cache/aaaaaaaaaaaaaaaa": "true",
                                  "warm.model.cache/bbbbbbbbbbbbbbbb": "true"}) is None
    assert label_patch({"metadata": {"resourceVersion": "8"}}, {}) is None
    assert label_patch({"metadata": {"resourceVersion": "9"}}, want) == {
        "metadata": {"resourceVersion": "9", "labels": want}}


def test_label_sync_patches_only_on_change_and_retries_conflicts(registry, pusher, tmp_path, node_api):
    ref = f"{registry.host}/agent/sync:v1"
    push(pusher, "agent/sync", "v1", {"w.bin": data("sync", 5_000)})
    cache_dir = tmp_path / "cache"
    pull(ref, PullOptions(cache=cache_dir, progress="none"), LOG)
    n = node("node-a", [GPU_TAINT])
    n["metadata"]["labels"]["warm.model.cache/0000000000000000"] = "true"  # a model gc evicted while we were down
    node_api.put(n)
    sync = LabelSync(api_for(node_api), "node-a", Cache(cache_dir), LOG)
    node_api.concurrent_writes(2)  # two writers race the first two patches: read again, patch again
    assert sync.sync() is True
    got = node_api.get("node-a")["metadata"]["labels"]
    assert {k: v for k, v in got.items() if not k.startswith("other-writer/")} == {
        "pool": "spot", label(ref): "true"}
    assert len([k for k in got if k.startswith("other-writer/")]) == 2  # the other writers' labels stayed
    patches = len([r for r in node_api.requests if r.method == "PATCH"])
    assert sync.sync() is False  # nothing changed: not even a GET
    assert len([r for r in node_api.requests if r.method == "PATCH"]) == patches


def test_label_sync_explains_a_refusal(tmp_path, node_api):
    cache = Cache(tmp_path / "cache").ensure()
    (tmp_path / "cache" / contract.REFS_DIR).mkdir(exist_ok=True)
    sync = LabelSync(api_for(node_api), "no-such-node", cache, LOG)
    with pytest.raises(NodeApiError, match="cannot get node no-such-node to set its warm labels: HTTP 404"):
        sync.sync()


# --- the command --------------------------------------------------------------------------------------------------


def agent(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loader.cli", "agent", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_ready(proc: subprocess.Popen, port: int) -> None:
    for _ in range(1200):  # polled, not timed
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read() if proc.stderr else "agent exited")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise AssertionError("the agent never became ready")


def test_the_agent_prefetches_untaints_labels_serves_csi_and_stops_on_sigterm(registry, pusher, tmp_path, node_api):
    ref = f"{registry.host}/agent/cli:v1"
    files = {"w.bin": data("agent-cli", 40_000)}
    digest = push(pusher, "agent/cli", "v1", files)
    node_api.put(node("node-a", [GPU_TAINT, *WARMING_TAINTS]))
    cache, pods, sock = tmp_path / "cache", tmp_path / "pods", tmp_path / "plugin" / "csi.sock"
    pods.mkdir()
    sock.parent.mkdir()
    port = free_port()
    proc = agent("--cache", str(cache), "--ref", ref, "--node-name", "node-a", "--untaint", f"node-a:{WARMING}",
                 "--warm-labels", "--label-interval", "1h", "--csi-socket", str(sock), "--pods-dir", str(pods),
                 "--metrics-port", str(port), "--metrics-address", "127.0.0.1", "--gc-max-unused", "168h",
                 env=node_api.env())
    try:
        wait_ready(proc, port)
        assert tree(cache / contract.MODELS_DIR / digest[7:]) == files
        for _ in range(600):  # the labels follow the round (polled)
            labels = node_api.get("node-a")["metadata"]["labels"]
            if label(ref) in labels:
                break
            time.sleep(0.1)
        got = node_api.get("node-a")
        assert got["spec"]["taints"] == [GPU_TAINT]
        assert got["metadata"]["labels"] == {"pool": "spot", label(ref): "true"}
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            info = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30)
            node_info = csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=30)
        assert (info.name, node_info.node_id) == (contract.CSI_DRIVER, "node-a")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = samples(r.read().decode())
        assert metrics[("model_cache_prefetch_models_cached", ())] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, ""), err
    events = [line.split(" ")[2] for line in err.splitlines()]
    assert events[0] == "event=agent.start"
    assert [e for e in events if e in ("event=prefetch.round", "event=prefetch.untaint", "event=gc.done",
                                       "event=agent.labels", "event=prefetch.stopped")] == [
        "event=prefetch.round", "event=prefetch.untaint", "event=gc.done", "event=agent.labels",
        "event=prefetch.stopped"]


@pytest.mark.parametrize(("args", "message"), [
    (["--warm-labels"], "--warm-labels and --csi-socket need --node-name"),
    (["--node-name", "n", "--label-interval", "0s"], "--label-interval '0s' must be longer than 0"),
    (["--node-name", "n", "--warm-label-limit", "0"], "--warm-label-limit 0 must be between 1 and 1000"),
])
def test_bad_agent_flags_exit_2_with_the_fix(tmp_path, args, message):
    done = subprocess.run([sys.executable, "-m", "loader.cli", "agent", "--cache", str(tmp_path / "c"), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
