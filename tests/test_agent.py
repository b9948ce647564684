"""The node agent (loader/agent.py, ``model-loader agent``): warm labels that follow the cache, and the one process
that prefetches, untaints, labels, serves CSI and stops on SIGTERM. Real registry, real cache, a fake node API
(tests/support/fake_node_api.py: the two node calls, over TLS, with the API server's optimistic concurrency)."""

from __future__ import annotations

import copy
import io
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml

from loader import contract, gc
from loader.agent import LabelSync, label_patch, warm_labels
from loader.cache import Cache
from loader.csi import csi_pb2, csi_pb2_grpc
from loader.log import Logger
from loader.prefetch import NodeApi, NodeApiError
from loader.pull import PullOptions, pull
from tests.support.fake_node_api import FakeNodeApi
from tests.support.files import tree
from tests.support.unmount import unmount_all_under
from tests.test_csi import publish_request
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
    # A name not of model-loader's making, linking a real model: no label (a malformed one would fail every patch).
    digest0 = cache.ref_target(refs[0])
    assert digest0 is not None
    (cache_dir / contract.REFS_DIR / "not a key!").symlink_to(f"../models/sha256/{digest0.hex}")
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
        uid = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
        target = pods / uid / "volumes" / "kubernetes.io~csi" / "model" / "mount"
        target.parent.mkdir(parents=True)
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            info = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30)
            node_stub = csi_pb2_grpc.NodeStub(channel)
            node_info = node_stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=30)
            # A pod's CSI volume of the prefetched model: a hit (the access rule's manifest GET), bind-mounted.
            node_stub.NodePublishVolume(publish_request(ref, uid, target), timeout=60)
            assert tree(target) == files
            node_stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=f"csi-{uid}-model", target_path=str(target)), timeout=60)
            with pytest.raises(grpc.RpcError) as refused:
                node_stub.NodePublishVolume(publish_request(ref, uid, target, readonly=False), timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.name, node_info.node_id) == (contract.CSI_DRIVER, "node-a")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = samples(r.read().decode())
        assert metrics[("model_cache_prefetch_models_cached", ())] == 1
        agent_series = {k: v for k, v in metrics.items() if k[0].startswith("model_cache_agent_")
                        and not k[0].endswith(("_sum", "_bucket"))}
        failures = {("model_cache_agent_pull_failures_total", (("exit", c.name.lower()),)): 0.0
                    for c in contract.ExitCode if c is not contract.ExitCode.OK}
        assert agent_series == {
            **failures,
            ("model_cache_agent_pulls_total", (("result", "pulled"), ("source", "prefetch"))): 1.0,
            ("model_cache_agent_pulls_total", (("result", "hit"), ("source", "prefetch"))): 0.0,
            ("model_cache_agent_pulls_total", (("result", "failed"), ("source", "prefetch"))): 0.0,
            ("model_cache_agent_pulls_total", (("result", "pulled"), ("source", "csi"))): 0.0,
            ("model_cache_agent_pulls_total", (("result", "hit"), ("source", "csi"))): 1.0,
            ("model_cache_agent_pulls_total", (("result", "failed"), ("source", "csi"))): 0.0,
            ("model_cache_agent_pull_duration_seconds_count", (("source", "prefetch"),)): 1.0,
            ("model_cache_agent_pull_duration_seconds_count", (("source", "csi"),)): 1.0,
            ("model_cache_agent_csi_publish_duration_seconds_count", (("code", "OK"),)): 1.0,
            ("model_cache_agent_csi_publish_duration_seconds_count", (("code", "INVALID_ARGUMENT"),)): 1.0,
            ("model_cache_agent_models_cached", ()): 1.0,
            ("model_cache_agent_cache_bytes", ()): 40_000.0,
        }
    finally:
        unmount_all_under(pods)
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


# --- the DaemonSet overlay (manifests/overlays/agent: the prefetch overlay folded into the agent's) --------------

OVERLAY = Path(__file__).resolve().parent.parent / "manifests" / "overlays" / "agent"
NODE_KINDS = ["CSIDriver", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Namespace", "ServiceAccount"]


def render(path: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def overlay(kind: str, name: str | None = None) -> dict:
    [found] = [o for o in render(OVERLAY) if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


@pytest.mark.parametrize("version", ["1.33", "1.37"])
def test_overlay_validates_strictly(version):
    objs = render(OVERLAY)
    assert sorted(o["kind"] for o in objs) == NODE_KINDS
    assert [(o["kind"], o["metadata"]["name"], kubernetes_validate.validate(o, version, strict=True))
            for o in objs] == [(o["kind"], o["metadata"]["name"], version) for o in objs]
    example = yaml.safe_load((OVERLAY / "crio-image-volumes.yaml").read_text())
    assert kubernetes_validate.validate(example, version, strict=True) == version


def test_the_csi_driver_is_inline_ephemeral_with_pod_info_and_never_chowned():
    driver = overlay("CSIDriver")
    assert driver["metadata"]["name"] == contract.CSI_DRIVER
    assert driver["spec"] == {"attachRequired": False, "podInfoOnMount": True, "volumeLifecycleModes": ["Ephemeral"],
                              "fsGroupPolicy": "None", "requiresRepublish": False, "storageCapacity": False}


def test_the_daemonset():
    ds = overlay("DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    agent_c, registrar = spec["containers"]
    assert ds["metadata"]["namespace"] == overlay("Namespace")["metadata"]["name"] == "model-cache-agent"
    assert overlay("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert agent_c["image"] == "ghcr.io/model-cache/loader:0.1.0"
    assert agent_c["args"] == [
        "agent", "--cache", "/cache", "--models-file", "/etc/model-cache/models.txt", "--interval", "10m",
        "--untaint", "$(NODE_NAME):model.cache/warming", "--warm-labels", "--metrics-port", "9090", "--gc-max-unused",
        "168h", "--pods-dir", "/var/lib/kubelet/pods", "--node-name", "$(NODE_NAME)", "--csi-socket", "/csi/csi.sock"]
    # Every flag is one the agent really has (parsed by its own parser, $(VAR) as kubelet would leave it).
    from loader.cli import build_parser
    from loader.commands import agent as agent_command
    from loader.config import LoaderSettings

    parsed = build_parser(LoaderSettings(), [agent_command]).parse_args(agent_c["args"])
    assert (parsed.csi_socket, parsed.warm_labels, parsed.node_name) == ("/csi/csi.sock", True, "$(NODE_NAME)")
    assert agent_c["env"][0] == {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    assert agent_c["securityContext"] == {
        "privileged": True, "readOnlyRootFilesystem": True, "runAsNonRoot": False, "runAsUser": 0,
        "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    assert {"key": WARMING, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    mounts = {m["name"]: m for m in agent_c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts == {
        "cache": {"name": "cache", "mountPath": "/cache"},
        "models": {"name": "models", "mountPath": "/etc/model-cache", "readOnly": True},
        # kubelet names CSI targets by host paths: the same path inside, and mounts propagate back to the host.
        "kubelet-pods": {"name": "kubelet-pods", "mountPath": "/var/lib/kubelet/pods", "mountPropagation": "Bidirectional"},
        "plugin-dir": {"name": "plugin-dir", "mountPath": "/csi"},
    }
    assert volumes["cache"]["hostPath"] == {"path": contract.DEFAULT_NODE_CACHE, "type": "DirectoryOrCreate"}
    assert volumes["kubelet-pods"]["hostPath"] == {"path": "/var/lib/kubelet/pods", "type": "Directory"}
    assert volumes["plugin-dir"]["hostPath"] == {"path": f"/var/lib/kubelet/plugins/{contract.CSI_DRIVER}",
                                                 "type": "DirectoryOrCreate"}
    assert volumes["registration-dir"]["hostPath"] == {"path": "/var/lib/kubelet/plugins_registry", "type": "Directory"}
    # The registrar tells kubelet where the agent's socket is on the host: the plugin dir's hostPath + the socket.
    assert registrar["image"] == "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.18.1"
    assert registrar["args"] == ["--csi-address=/csi/csi.sock",
                                 f"--kubelet-registration-path=/var/lib/kubelet/plugins/{contract.CSI_DRIVER}/csi.sock",
                                 "--health-port=9809"]
    assert {m["name"]: m["mountPath"] for m in registrar["volumeMounts"]} == {"plugin-dir": "/csi",
                                                                               "registration-dir": "/registration"}
    assert registrar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    cm = overlay("ConfigMap")
    assert volumes["models"]["configMap"] == {"name": cm["metadata"]["name"]}
    assert cm["metadata"]["name"] == "model-cache-agent-models"  # no hash: a list change restarts nothing
    assert cm["data"] == {"models.txt": (OVERLAY / "models.txt").read_text()}
    assert gc.parse_models_list(cm["data"]["models.txt"], "models.txt") == (["registry.example.com/models/phi3:v1"], [])
    assert agent_c["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert agent_c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent_c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert registrar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "registrar"}
    assert spec["serviceAccountName"] == overlay("ServiceAccount")["metadata"]["name"]


def test_rbac_is_get_and_patch_on_nodes_only():
    sa = overlay("ServiceAccount")
    assert overlay("ClusterRole")["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    binding = overlay("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": overlay("ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


def with_component(tmp_path: Path) -> list[dict]:
    rel = os.path.relpath(OVERLAY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{rel}]\ncomponents: [{rel}/restrict-node]\n")
    return render(tmp_path)


@pytest.mark.parametrize("version", ["1.33", "1.37"])
def test_restrict_node_component_validates(tmp_path, version):
    objs = with_component(tmp_path)
    assert sorted(o["kind"] for o in objs) == sorted(
        [*NODE_KINDS, "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"])
    for o in objs:
        assert kubernetes_validate.validate(o, version, strict=True) == version


def admitted(policy: dict, user: dict, old: dict, new: dict) -> list[str]:
    """Evaluate the policy's CEL as the API server would for an UPDATE: [] when admitted, else the messages."""
    import celpy

    env = celpy.Environment()
    act = {"request": celpy.json_to_cel({"userInfo": user, "operation": "UPDATE"}),
           "object": celpy.json_to_cel(new), "oldObject": celpy.json_to_cel(old)}
    spec = policy["spec"]
    if not all(env.program(env.compile(m["expression"])).evaluate(act) for m in spec["matchConditions"]):
        return ["not matched"]
    variables = {v["name"]: env.program(env.compile(v["expression"])).evaluate(act) for v in spec.get("variables", [])}
    act["variables"] = celpy.celtypes.MapType({celpy.celtypes.StringType(k): v for k, v in variables.items()})
    out = []
    for v in spec["validations"]:
        result = env.program(env.compile(v["expression"])).evaluate(act)
        assert isinstance(result, celpy.celtypes.BoolType), result
        if not result:
            out.append(v["message"])
    return out


def with_labels(n: dict, **labels: str) -> dict:
    out = copy.deepcopy(n)
    out["metadata"]["labels"].update(labels)
    return out


def test_restrict_node_policy_admits_only_the_taint_removal_and_warm_labels_on_its_own_node(tmp_path):
    objs = with_component(tmp_path)
    [policy] = [o for o in objs if o["kind"] == "ValidatingAdmissionPolicy"]
    [binding] = [o for o in objs if o["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert (binding["spec"]["policyName"], binding["spec"]["validationActions"]) == (policy["metadata"]["name"], ["Deny"])
    sa = overlay("ServiceAccount")["metadata"]
    me = {"username": f"system:serviceaccount:{sa['namespace']}:{sa['name']}",
          "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}
    old = node("node-a", [GPU_TAINT, *WARMING_TAINTS])
    good = node("node-a", [GPU_TAINT])
    only = node("node-a", WARMING_TAINTS)
    untainted = {**only, "spec": {k: v for k, v in only["spec"].items() if k != "taints"}}
    relabelled = with_labels(node("node-a", [GPU_TAINT]), pool="on-demand")
    cordoned = node("node-a", [GPU_TAINT])
    cordoned["spec"]["unschedulable"] = True
    annotated = node("node-a", [GPU_TAINT])
    annotated["metadata"]["annotations"] = {"x": "y"}
    taints_msg = "the agent may only remove the model.cache/warming taint"
    labels_msg = "the agent may change only warm.model.cache/ labels"
    warm_msg = 'warm.model.cache/ labels are "true", at most 64 of them'
    other_msg = "the agent may not change a node's annotations or schedulability"
    w1, w2 = "warm.model.cache/0123456789abcdef", "warm.model.cache/fedcba9876543210"
    assert admitted(policy, me, old, good) == []
    assert admitted(policy, me, only, untainted) == []
    # Warm labels: added, replaced, removed; with the taint untouched.
    warm_old = with_labels(good, **{w1: "true"})
    assert admitted(policy, me, good, warm_old) == []
    assert admitted(policy, me, warm_old, with_labels(good, **{w2: "true"})) == []
    assert admitted(policy, me, warm_old, good) == []
    assert admitted(policy, me, good, with_labels(good, **{w1: "yes"})) == [warm_msg]
    many = with_labels(good, **{f"warm.model.cache/{i:016x}": "true" for i in range(65)})
    assert admitted(policy, me, good, many) == [warm_msg]
    assert admitted(policy, me, old, node("node-a", [*WARMING_TAINTS[:1]])) == [taints_msg]
    assert admitted(policy, me, old, node("node-a", [GPU_TAINT, *WARMING_TAINTS, {"key": "x", "effect": "NoSchedule"}])
                    ) == [taints_msg]
    assert admitted(policy, me, old, relabelled) == [labels_msg]
    assert admitted(policy, me, good, with_labels(good, **{"warm.model.cache.evil/x": "true"})) == [labels_msg]
    assert admitted(policy, me, old, cordoned) == [other_msg]
    assert admitted(policy, me, good, annotated) == [other_msg]
    assert admitted(policy, me, node("node-b", [GPU_TAINT, *WARMING_TAINTS]), node("node-b", [GPU_TAINT])) == [
        "the agent may change only the node its pod runs on"]
    assert admitted(policy, {"username": me["username"]}, old, good) == [
        "the agent may change only the node its pod runs on"]
    assert admitted(policy, {"username": "system:node:node-a"}, old, node("node-a", [])) == ["not matched"]
    spec_msg = "the agent may not change a node's owners, finalizers or spec beyond the warming taint"
    owned = copy.deepcopy(good)
    owned["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "u"}]
    final = copy.deepcopy(good)
    final["metadata"]["finalizers"] = ["example.com/hold"]
    for field, value in (("podCIDR", "10.0.0.0/24"), ("podCIDRs", ["10.0.0.0/24"]), ("providerID", "fake://x"),
                         ("configSource", {"configMap": {"name": "x"}})):
        changed = copy.deepcopy(good)
        changed["spec"][field] = value
        assert admitted(policy, me, good, changed) == [spec_msg], field
    assert admitted(policy, me, good, owned) == [spec_msg]
    assert admitted(policy, me, good, final) == [spec_msg]


def test_the_signature_policy_component_gives_the_agent_the_policy_file(tmp_path):
    from loader.cli import build_parser
    from loader.commands import agent as agent_command
    from loader.commands.common import signature_table
    from loader.config import LoaderSettings
    from loader.policy import parse_rules

    rel = os.path.relpath(OVERLAY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources: [{rel}]\ncomponents: [{rel}/signature-policy]\n")
    objs = render(tmp_path)
    for o in objs:
        assert kubernetes_validate.validate(o, "1.37", strict=True) == "1.37"
    [ds] = [o for o in objs if o["kind"] == "DaemonSet"]
    [cm] = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("model-cache-agent-signature")]
    container = ds["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-2:] == ["--signature-policy", "/etc/model-cache/signature/policy.json"]
    assert {"name": "signature-policy", "mountPath": "/etc/model-cache/signature", "readOnly": True} in container[
        "volumeMounts"]
    assert {"name": "signature-policy", "configMap": {"name": cm["metadata"]["name"]}} in ds["spec"]["template"][
        "spec"]["volumes"]
    # The file as kubelet would project it, read by the agent's own flags into a table of loaded keys.
    (tmp_path / "policy.json").write_text(cm["data"]["policy.json"])
    args = build_parser(LoaderSettings(), [agent_command]).parse_args(
        [*container["args"][:-1], str(tmp_path / "policy.json")])
    table = signature_table(args)
    assert table is not None
    assert [rule.prefix for rule, _ in table.rules] == [r.prefix for r in parse_rules(cm["data"]["policy.json"], "p")]
    assert table.for_ref("registry.example.com", "models/phi3") is not None
    assert table.for_ref("registry.example.com", "models/scratch/x") is None
