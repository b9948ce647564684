"""The pod mutation, table-driven over pod fixtures and node fleets, asserting the whole mutated pod.

Inputs live in tests/fixtures/pods/*.yaml (pods) and fleets.yaml (Node objects); the expected result of each case
(the whole pod, the warnings and the status annotation) is tests/fixtures/pods/expected/<case>.yaml. After an
intended change, regenerate with ``python -m tests.test_mutate`` and review the diff like code.
"""

from __future__ import annotations

import base64
import copy
import json
import pathlib
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from loader import contract
from tests.support.k8s_validate import assert_valid_pod
from webhook import annotations as ann
from webhook.config import Settings, parse_quantity
from webhook.errors import Denied
from webhook.mutate import mutate_pod, unique_name
from webhook.patch import applies, make_patch
from webhook.snapshot import Snapshot, snapshot_from

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "pods"
EXPECTED = FIXTURES / "expected"
FLEETS: dict[str, list[dict[str, Any]]] = yaml.safe_load((FIXTURES / "fleets.yaml").read_text())
RESTRICTED = {ann.ENABLED_LABEL: "true", ann.PSA_ENFORCE_LABEL: "restricted"}
SIGNING_KEY = ("-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEvrMXqTsGchTx6schpf3vGVMXRMzS\n"
               "RuGqH2srMPsjnIRg2nevgV0vHR/FPBC+Piv7RCdHWcrQJhSSXWYCbkFANw==\n-----END PUBLIC KEY-----\n")
SIGNING_POLICY = json.dumps([
    {"prefix": "registry.example.com/models", "keys": [SIGNING_KEY]},
    {"prefix": "registry.example.com/models/scratch"},
    {"prefix": "ghcr.io/other", "keys": [SIGNING_KEY]},
])
KEYLESS_POLICY = json.dumps([{"prefix": "registry.example.com",
                              "identities": ["https://token.actions.githubusercontent.com=https://github.com/acme/m"]}])
TRUSTED_ROOT = base64.b64encode(b'{"mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1"}').decode()
BASELINE = {ann.ENABLED_LABEL: "true", ann.PSA_ENFORCE_LABEL: "baseline"}
PRIVILEGED = {ann.ENABLED_LABEL: "true", ann.PSA_ENFORCE_LABEL: "privileged"}


def load_pod(name: str) -> dict[str, Any]:
    return yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())


def fleet(name: str, synced: bool = True, agents: tuple[str, ...] = (), warm: dict[str, list[str]] | None = None) -> Snapshot:
    """A fleet; ``agents`` names the nodes whose CSINode lists the node agent's driver ("*": all of them); ``warm``
    maps node names to the references their agent holds warm (labelled as the agent labels them)."""
    nodes = copy.deepcopy(FLEETS[name]) if name != "none" else []
    for node in nodes:
        for ref in (warm or {}).get(node["metadata"]["name"], ()):
            node["metadata"]["labels"][contract.warm_label(ref)] = "true"
    if agents == ("*",):
        agents = tuple(n["metadata"]["name"] for n in nodes)
    csinodes = [{"kind": "CSINode", "metadata": {"name": a}, "spec": {"drivers": [{"name": contract.CSI_DRIVER}]}}
                for a in agents]
    return snapshot_from(nodes, [], synced=synced, csinodes=csinodes)


@dataclass(frozen=True)
class Case:
    id: str
    pod: str
    fleet: str
    annotations: dict[str, str] = field(default_factory=dict)  # added to (or, with None, removed from) the pod's
    spec: dict[str, Any] = field(default_factory=dict)  # merged into the pod's spec
    namespace_labels: dict[str, str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    synced: bool = True
    agents: tuple[str, ...] = ()  # nodes running the node agent ("*": every node of the fleet)
    warm: dict[str, list[str]] = field(default_factory=dict)  # node -> references its agent holds warm

    def inputs(self) -> tuple[dict[str, Any], Snapshot, Settings]:
        pod = load_pod(self.pod)
        pod["metadata"]["annotations"].update(self.annotations)
        pod["spec"].update(copy.deepcopy(self.spec))
        return pod, fleet(self.fleet, self.synced, self.agents, self.warm), Settings(**self.settings)


CASES = [
    Case("single-all-crio", "single", "crio"),
    Case("single-all-containerd", "single", "containerd"),
    Case("single-mixed-fleet", "single", "mixed"),
    Case("single-recovering-node-still-counts", "single", "recovering"),
    Case("single-tainted-crio-pool-excluded", "single", "tainted"),
    Case("single-labelled-overrides", "single", "labelled"),
    Case("single-node-name-containerd", "single", "mixed", spec={"nodeName": "ctrd-a"}),
    Case("single-node-name-unknown-node", "single", "crio", spec={"nodeName": "elsewhere"}),
    Case("gpu-crio-tolerated-pool", "gpu-crio", "tainted"),
    Case("gpu-crio-selector-in-mixed-pool", "gpu-crio", "mixed"),
    Case("affinity-crio-pool-in-mixed-fleet", "affinity-crio", "mixed"),
    Case("selector-hostname-narrows-mixed-fleet", "single", "mixed", spec={"nodeSelector": {"kubernetes.io/hostname": "crio-b"}}),
    Case("affinity-not-in-narrows-mixed-fleet", "single", "mixed", spec={"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["crio"]},
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["crio-old", "kubelet-old"]}]}]}}}}),
    Case("affinity-all-crio", "affinity-crio", "crio"),
    Case("daemonset-match-fields", "daemonset-pod", "mixed"),
    Case("tolerate-all-tainted-fleet", "tolerate-all", "tainted"),
    Case("multi-all-crio", "multi", "crio"),
    Case("multi-all-containerd", "multi", "containerd"),
    Case("mode-init-container-on-crio", "single", "crio", annotations={ann.MODE: "init-container"}),
    Case("mode-image-volume-on-crio", "single", "crio", annotations={ann.MODE: " image-volume ", ann.CACHE: "pod"}),
    Case("mode-image-volume-unsynced", "single", "crio", annotations={ann.MODE: "image-volume"}, synced=False),
    Case("default-mode-init-container", "single", "crio", settings={"default_mode": "init-container"}),
    Case("cache-pod", "single", "containerd", annotations={ann.CACHE: "pod"}),
    Case("cache-pvc", "single", "containerd", annotations={ann.CACHE: "pvc:model-store"}),
    Case("psa-restricted-downgrades-node-cache", "single", "containerd", namespace_labels=RESTRICTED),
    Case("psa-baseline-downgrades-node-cache", "single", "containerd", namespace_labels=BASELINE),
    Case("psa-privileged-keeps-node-cache", "single", "containerd", namespace_labels=PRIVILEGED),
    Case("psa-restricted-pvc", "single", "containerd", annotations={ann.CACHE: "pvc:model-store"}, namespace_labels=RESTRICTED),
    Case("psa-restricted-image-volume", "single", "crio", namespace_labels=RESTRICTED),
    Case("inventory-not-synced", "single", "crio", synced=False),
    Case("inventory-empty", "single", "none"),
    Case("custom-settings", "single", "containerd", settings={
        "loader_image": "mirror.internal:5000/model-cache/loader:0.1.0", "node_cache_path": "/mnt/nvme/models",
        "default_mount_path": "/weights", "loader_cpu_request": "100m", "loader_cpu_limit": "1",
        "loader_memory_request": "128Mi", "loader_memory_limit": "1Gi", "loader_concurrency": 16,
        "allowed_registries": ["registry.example.com/models"]}),
    Case("registry-ca-and-plain-http", "single", "containerd", annotations={ann.CACHE: "pvc:model-store"}, settings={
        "registry_ca_configmap": "registry-ca", "plain_http_registries": ["registry.internal:5000", "10.0.0.5"]}),
    # References to volumes the pod does not define (a mount, a device of an init container) must not capture the
    # injected model volume: it takes a name neither uses, and both stay dangling for the API server to refuse.
    Case("dangling-references-not-captured", "single", "crio", spec={
        "containers": [{"name": "server", "image": "registry.example.com/serving/vllm:0.6.3",
                        "volumeMounts": [{"name": "model-phi3", "mountPath": "/data"}]}],
        "initContainers": [{"name": "warm", "image": "registry.example.com/tools/warm:1",
                            "volumeDevices": [{"name": "model-phi3-2", "devicePath": "/dev/xvda"}]}]}),
    Case("guaranteed-pod-stays-guaranteed", "guaranteed", "containerd"),
    # The app and sidecar hold 300m + 100m CPU and 200Mi + 128Mi: the loader gets that, so the footprint stays.
    Case("guaranteed-small-app-footprint-kept", "guaranteed", "containerd", spec={"containers": [{
        "name": "server", "image": "registry.example.com/serving/small:1",
        "resources": {"limits": {"cpu": "300m", "memory": "200Mi"}}}]}),
    Case("unknown-annotation-warned", "single", "crio", annotations={"model.cache/refs": "x", "model.cache/cache_": "pod"}),
    Case("hub-short-reference", "single", "crio", annotations={ann.REF: "ollama/llama3"}),
    # Issue 12: the node agent's CSI volume, when every candidate runs the agent and not every one mounts images.
    Case("csi-all-containerd-run-the-agent", "single", "containerd", agents=("*",)),
    Case("csi-restricted-namespace-keeps-the-node-cache", "single", "containerd", agents=("*",),
         namespace_labels=RESTRICTED),
    Case("csi-mixed-fleet-all-agents", "multi", "mixed", agents=("*",),
         spec={"imagePullSecrets": [{"name": "regcred"}, {"name": "mirror-cred"}]}),
    Case("csi-image-volume-wins-where-all-mount-images", "single", "crio", agents=("*",)),
    Case("csi-one-node-without-agent-gets-the-init-container", "single", "containerd", agents=("ctrd-a", "ctrd-b")),
    Case("mode-csi-explicit", "single", "containerd", agents=("*",), annotations={ann.MODE: "csi", ann.CACHE: "pod"}),
    Case("mode-csi-unsynced", "single", "containerd", annotations={ann.MODE: "csi"}, synced=False),
    Case("csi-without-pull-secrets", "single", "containerd", agents=("*",), spec={"imagePullSecrets": None}),
    # Warm placement: a preferred node affinity toward nodes whose agent holds the model (appended to the pod's own).
    Case("csi-prefers-warm-nodes", "multi", "containerd", agents=("*",),
         warm={"ctrd-a": ["registry.example.com/models/phi3:v1"], "ctrd-b": ["registry.example.com/models/phi3:v1",
               "registry.example.com/models/llama:v9"]}),
    Case("node-cache-prefers-warm-nodes", "affinity-crio", "mixed", warm={"crio-a": ["registry.example.com/models/llama-3-8b:q4"]},
         annotations={ann.MODE: "init-container"}),
    Case("pod-cache-ignores-warm-nodes", "single", "containerd", annotations={ann.CACHE: "pod"},
         warm={"ctrd-a": ["registry.example.com/models/phi3:v1"]}),
    Case("warm-affinity-off", "single", "containerd", settings={"warm_affinity_weight": 0},
         warm={"ctrd-a": ["registry.example.com/models/phi3:v1"]}),
    # Issue 13: models the cluster's signature policy covers never take an image volume (the runtime checks no
    # signature); the loader gets the rules its models match.
    Case("signed-model-on-crio-takes-the-loader", "multi", "crio", settings={"signature_policy": SIGNING_POLICY}),
    Case("signed-model-on-crio-with-agents-takes-csi", "single", "crio", agents=("*",),
         settings={"signature_policy": SIGNING_POLICY, "agent_enforces_signatures": True}),
    # Agents everywhere, but not declared to enforce the policy: the loader, which the webhook hands the policy.
    Case("signed-model-with-unenforcing-agents-takes-the-loader", "single", "crio", agents=("*",),
         settings={"signature_policy": SIGNING_POLICY}),
    # Spelt with the default port: one registry, one rule (not an image volume past the policy).
    Case("signed-model-spelt-with-the-default-port", "single", "crio", annotations={
        ann.REF: "registry.example.com:443/models/phi3:v1"}, settings={"signature_policy": SIGNING_POLICY}),
    Case("exempt-prefix-keeps-the-image-volume", "single", "crio", annotations={
        ann.REF: "registry.example.com/models/scratch/phi3:v1"}, settings={"signature_policy": SIGNING_POLICY}),
    Case("keyless-identity-passes-the-trusted-root", "single", "containerd", settings={
        "signature_policy": KEYLESS_POLICY, "trusted_root": TRUSTED_ROOT}),
]
IDS = [c.id for c in CASES]


def run(case: Case) -> dict[str, Any]:
    pod, snapshot, settings = case.inputs()
    outcome = mutate_pod(pod, "ml", case.namespace_labels, snapshot, settings)
    return {"status": outcome.status, "warnings": list(outcome.warnings), "pod": outcome.pod}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mutated_pod_is_exactly_as_expected(case):
    expected = yaml.safe_load((EXPECTED / f"{case.id}.yaml").read_text())
    assert run(case) == expected


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mutated_pod_is_valid_for_every_supported_kubernetes(case):
    assert_valid_pod(run(case)["pod"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_idempotent_and_input_untouched(case):
    pod, snapshot, settings = case.inputs()
    before = copy.deepcopy(pod)
    once = mutate_pod(pod, "ml", case.namespace_labels, snapshot, settings)
    assert pod == before
    twice = mutate_pod(once.pod, "ml", case.namespace_labels, snapshot, settings)
    assert twice.pod == once.pod
    assert (twice.mode, twice.warnings) == (None, ())
    assert twice.reason == f"already mutated ({once.status})"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_patch_turns_the_pod_into_the_mutated_pod(case):
    # The webhook does not re-apply its patches per request: this is the round-trip check, on every fixture.
    pod, snapshot, settings = case.inputs()
    outcome = mutate_pod(pod, "ml", case.namespace_labels, snapshot, settings)
    ops = make_patch(pod, outcome.pod)
    assert applies(pod, ops, outcome.pod)
    assert not [op for op in ops if op["op"] == "remove"]  # the injectors only add (or rewrite a list whole)


def qos_class(spec: dict[str, Any]) -> str:
    """A pod's QoS class as Kubernetes computes it (pkg/apis/core/helper/qos GetPodQOS) after the API server's
    defaulting (a request left out defaults to its limit); init containers count, only cpu and memory matter."""
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    guaranteed = True
    for c in [*(spec.get("containers") or ()), *(spec.get("initContainers") or ())]:
        res = c.get("resources") or {}
        lim = {k: parse_quantity(str(v)) for k, v in (res.get("limits") or {}).items() if k in ("cpu", "memory")}
        req = {k: parse_quantity(str(v)) for k, v in (res.get("requests") or {}).items() if k in ("cpu", "memory")}
        req = {**lim, **req}
        for k, v in req.items():
            if v > 0:
                requests[k] = requests.get(k, 0) + v
        for k, v in lim.items():
            if v > 0:
                limits[k] = limits.get(k, 0) + v
        if {k for k, v in lim.items() if v > 0} != {"cpu", "memory"}:
            guaranteed = False
    if not requests and not limits:
        return "BestEffort"
    if guaranteed and all(limits.get(k) == v for k, v in requests.items()):
        return "Guaranteed"
    return "Burstable"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_loader_keeps_the_pods_qos_class_unless_it_was_best_effort(case):
    # Any loader request or limit makes a BestEffort pod Burstable (documented); Guaranteed stays Guaranteed.
    out = run(case)
    before, after = qos_class(case.inputs()[0]["spec"]), qos_class(out["pod"]["spec"])
    assert after == ("Burstable" if before == "BestEffort" and out["status"].startswith("init") else before)


def test_guaranteed_fixture_is_guaranteed():
    assert qos_class(load_pod("guaranteed")["spec"]) == "Guaranteed"
    assert qos_class(load_pod("single")["spec"]) == "Burstable"


def _uid_env(value: str | None = None) -> dict[str, Any]:
    if value is None:
        return {"name": contract.ENV_POD_UID, "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}
    return {"name": contract.ENV_POD_UID, "value": value}


@pytest.mark.parametrize(
    "fleet_name,env",
    [("containerd", _uid_env("0b0c1d2e-3f40-4152-8364-758697a8b9ca")), ("crio", _uid_env("x")), ("containerd", _uid_env())],
    ids=["init-container-other-pods-uid", "image-volume-too", "even-the-downward-api"],
)
def test_a_container_that_sets_the_pod_uid_variable_itself_is_refused(fleet_name, env):
    # Its own value would point subPathExpr pods/$(MODEL_CACHE_POD_UID)/<key> at another pod's pinned entry. Refused
    # in image-volume mode too, so that a workload admitted today is not refused when its candidate nodes change.
    pod = load_pod("single")
    pod["spec"]["containers"][0]["env"].append(env)
    with pytest.raises(Denied) as e:
        mutate_pod(pod, "ml", None, fleet(fleet_name), Settings())
    assert e.value.message == (
        "container 'server' defines the environment variable MODEL_CACHE_POD_UID, which model.cache reserves: the"
        " webhook sets it to the pod's UID so that the container mounts the model its own loader verified; remove"
        " MODEL_CACHE_POD_UID from the container's env"
    )


def test_a_container_without_the_model_may_define_the_variable():
    pod = load_pod("multi")
    pod["spec"]["containers"][1]["env"] = [_uid_env("anything")]  # metrics: not in model.cache/containers
    outcome = mutate_pod(pod, "ml", None, fleet("containerd"), Settings())
    metrics = outcome.pod["spec"]["containers"][1]
    assert (metrics.get("volumeMounts"), metrics["env"]) == (None, [_uid_env("anything")])


def test_every_model_mount_is_pinned_by_the_downward_api_uid():
    # The invariant behind the fixtures: in init mode, every container that mounts the cache volume mounts only
    # pods/$(MODEL_CACHE_POD_UID)/<key>, read-only, and takes the UID from metadata.uid; the loader gets the UID
    # and the node name from the downward API, as the args it expands.
    for case in CASES:
        out = run(case)
        if not out["status"].startswith("init-container"):
            continue
        spec = out["pod"]["spec"]
        loader = spec["initContainers"][0]
        cache = loader["volumeMounts"][0]["name"]
        assert loader["env"][:2] == [_uid_env(), {"name": contract.ENV_NODE_NAME, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
        # Beyond the downward API, only the signature policy's values (public keys and a trusted root: not secret).
        assert {e["name"] for e in loader["env"][2:]} <= {contract.ENV_SIGNATURE_POLICY, contract.ENV_TRUSTED_ROOT}
        args = loader["args"]
        assert args[args.index("--pod-uid") + 1] == "$(MODEL_CACHE_POD_UID)", case.id
        assert args[args.index("--node-name") + 1] == "$(MODEL_CACHE_NODE_NAME)", case.id
        users = [c for key in ("containers", "initContainers") for c in spec.get(key) or ()
                 if c is not loader and any(m["name"] == cache for m in c.get("volumeMounts") or ())]
        assert users, case.id
        for c in users:
            assert _uid_env() in c["env"], case.id
            for m in c["volumeMounts"]:
                if m["name"] == cache:
                    assert set(m) == {"name", "mountPath", "subPathExpr", "readOnly"} and m["readOnly"] is True
                    assert m["subPathExpr"].startswith("pods/$(MODEL_CACHE_POD_UID)/"), case.id


@pytest.mark.parametrize(
    "plain_http", [["registry.internal:5000"], ["10.0.0.5", "Registry.Internal"], ["[fd00::5]:5000"]], ids=str
)
def test_the_loader_parses_the_injected_command_line_as_kubelet_passes_it(plain_http):
    # The contract from the other side: model-loader's own parser and checks accept exactly what the webhook
    # writes, once kubelet has expanded $(VAR) from the downward API.
    import argparse

    from loader.cli import build_parser
    from loader.commands import pull
    from loader.commands.common import registry_settings
    from loader.config import LoaderSettings
    from tests.support.kubelet import container_env, expand_args

    settings = Settings(registry_ca_configmap="registry-ca", plain_http_registries=plain_http)
    pod = mutate_pod(load_pod("multi"), "ml", None, fleet("containerd"), settings).pod
    pod = {**pod, "metadata": {**pod["metadata"], "uid": "6f9a3c1e-0b5d-4e27-9c8a-1d2e3f405162"},
           "spec": {**pod["spec"], "nodeName": "ctrd-a"}}
    loader = pod["spec"]["initContainers"][0]
    argv = expand_args(loader["command"] + loader["args"], container_env(pod, loader))
    assert argv[0] == contract.PROGRAM
    args = build_parser(LoaderSettings(), [pull]).parse_args(argv[1:])
    assert (args.command, args.refs, args.cache) == (contract.PULL, [
        "registry.example.com/models/phi3:v1",
        "registry.example.com/models/bge-small@sha256:5f4b1c1a7f0e0c9f2d9fd0c0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e",
    ], contract.CACHE_MOUNT)
    assert (args.pod_uid, args.node_name) == ("6f9a3c1e-0b5d-4e27-9c8a-1d2e3f405162", "ctrd-a")
    assert (args.ca_file, args.check_access, args.concurrency) == ([f"{contract.CA_MOUNT}/{contract.CA_BUNDLE_KEY}"], True, 8)
    assert args.docker_config == ["/run/model-cache/docker/0", "/run/model-cache/docker/1"]
    hosts = [h.lower() for h in plain_http]
    assert registry_settings(argparse.Namespace(ca_file=[], plain_http_registry=args.plain_http_registry)) == (
        (), frozenset(hosts))


def test_pod_without_ref_is_left_alone():
    pod = load_pod("single")
    del pod["metadata"]["annotations"][ann.REF]
    outcome = mutate_pod(pod, "ml", None, fleet("crio"), Settings())
    assert (outcome.pod, outcome.mode, outcome.warnings, outcome.reason) == (pod, None, (), "no model.cache/ref annotation")


def test_pod_security_restricted_loader_is_non_root():
    outcome = mutate_pod(load_pod("single"), "ml", RESTRICTED, fleet("containerd"), Settings(loader_run_as_user=1001))
    loader = outcome.pod["spec"]["initContainers"][0]
    assert loader["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 1001,
        "runAsGroup": 1001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert [v for v in outcome.pod["spec"]["volumes"] if v["name"] == "model-cache"] == [{"name": "model-cache", "emptyDir": {}}]


@pytest.mark.parametrize(
    "base,taken,expected",
    [
        ("model-cache", set(), "model-cache"),
        ("model-cache", {"model-cache"}, "model-cache-2"),
        ("model-cache", {"model-cache", "model-cache-2"}, "model-cache-3"),
        ("model-cache-pull-team.registry_creds", set(), "model-cache-pull-team-registry-creds"),
        ("model-Phi-3.5", set(), "model-phi-3-5"),
        ("x" * 70, set(), "x" * 63),
        ("x" * 70, {"x" * 63}, "x" * 61 + "-2"),
        ("---", set(), "model"),
    ],
    ids=["free", "taken", "taken-twice", "dots-underscores", "case-and-dots", "long", "long-taken", "nothing-left"],
)
def test_unique_volume_names_are_dns_labels(base, taken, expected):
    assert unique_name(base, set(taken)) == expected


# --- denials: every message, exactly ------------------------------------------------------------------------------

DIGEST = "sha256:" + "a" * 64
DENIALS = [
    ("empty-ref", {ann.REF: " , "}, {}, "model.cache/ref is empty: set it to a model reference such as registry.example.com/models/phi3:v1"),
    ("bad-reference", {ann.REF: "registry.example.com/Models/phi3:v1"}, {},
     "model.cache/ref: reference 'registry.example.com/Models/phi3:v1' has repository 'Models/phi3': use lowercase"
     " letters, digits and separators ('.', '_', '__', '-') between '/'-separated components"),
    ("url-scheme", {ann.REF: "https://registry.example.com/m:v1"}, {},
     "model.cache/ref: reference 'https://registry.example.com/m:v1' has a URL scheme: drop it and write"
     " host/repository:tag (plain HTTP is chosen with --plain-http, or automatically for localhost)"),
    ("duplicate-names", {ann.REF: "r.example.com/a/phi3:v1,r.example.com/b/phi3:v2"}, {},
     "model.cache/ref gives two models the name 'phi3' (r.example.com/a/phi3:v1 and r.example.com/b/phi3:v2); name"
     " them apart with name=REF, e.g. phi3-2=r.example.com/b/phi3:v2"),
    ("duplicate-explicit-names", {ann.REF: f"m=r.example.com/a:v1, m=r.example.com/b@{DIGEST}"}, {},
     f"model.cache/ref gives two models the name 'm' (r.example.com/a:v1 and r.example.com/b@{DIGEST}); name them"
     f" apart with name=REF, e.g. m-2=r.example.com/b@{DIGEST}"),
    ("env-collision", {ann.REF: "phi-3=r.example.com/a:v1,phi_3=r.example.com/b:v1"}, {},
     "model.cache/ref: model names 'phi-3' and 'phi_3' both give the environment variable MODEL_PATH_PHI_3; rename"
     " one with name=REF"),
    ("empty-name", {ann.REF: "=r.example.com/a:v1"}, {},
     "model.cache/ref: '=r.example.com/a:v1' has an empty name before '='; write name=REF, e.g. phi3=r.example.com/a:v1"),
    ("bad-name", {ann.REF: "my model=r.example.com/a:v1"}, {},
     "model.cache/ref: model name 'my model' cannot be a directory name here: use 1-63 letters, digits, '.', '_' or"
     " '-', starting and ending with a letter or digit (set it with name=REF)"),
    ("registry-not-allowed", {ann.REF: "evil.example.net/models/phi3:v1"}, {"allowed_registries": ["registry.example.com", "ghcr.io/acme"]},
     "model.cache/ref: 'evil.example.net/models/phi3:v1' is in registry evil.example.net, which is not allowed in this"
     " cluster (allowed: registry.example.com, ghcr.io/acme); push the model to an allowed registry or ask the cluster"
     " admin to extend MODEL_CACHE_ALLOWED_REGISTRIES"),
    ("registry-prefix-not-matched", {ann.REF: "ghcr.io/acmecorp/phi3:v1"}, {"allowed_registries": ["ghcr.io/acme"]},
     "model.cache/ref: 'ghcr.io/acmecorp/phi3:v1' is in registry ghcr.io, which is not allowed in this cluster"
     " (allowed: ghcr.io/acme); push the model to an allowed registry or ask the cluster admin to extend"
     " MODEL_CACHE_ALLOWED_REGISTRIES"),
    ("unknown-mode", {ann.MODE: "fast"}, {}, "model.cache/mode is 'fast': use auto, image-volume, csi or init-container"),
    ("unknown-cache", {ann.CACHE: "disk"}, {}, "model.cache/cache is 'disk': use node, pod or pvc:<claim-name>"),
    ("bad-claim", {ann.CACHE: "pvc:Models"}, {},
     "model.cache/cache is 'pvc:Models': claim name 'Models' is not a valid PersistentVolumeClaim name (lowercase"
     " letters, digits, '-' and '.')"),
    ("relative-mount-path", {ann.MOUNT_PATH: "models"}, {},
     "model.cache/mount-path is 'models': use an absolute directory other than / without '..', such as /models"),
    ("root-mount-path", {ann.MOUNT_PATH: "/"}, {},
     "model.cache/mount-path is '/': use an absolute directory other than / without '..', such as /models"),
    ("dotdot-mount-path", {ann.MOUNT_PATH: "/models/../etc"}, {},
     "model.cache/mount-path is '/models/../etc': use an absolute directory other than / without '..', such as /models"),
    ("unknown-container", {ann.CONTAINERS: "server,sidecar"}, {},
     "model.cache/containers names 'sidecar', not a container of this pod; containers: server"),
    ("no-container", {ann.CONTAINERS: " , "}, {},
     "model.cache/containers is ' , ', which names no container; containers: server"),
]


def _pod_with(annotations: dict[str, str]) -> dict[str, Any]:
    pod = load_pod("single")
    pod["metadata"]["annotations"].update(annotations)
    return pod


@pytest.mark.parametrize(
    "annotations,settings,message",
    [d[1:] for d in DENIALS],
    ids=[d[0] for d in DENIALS],
)
def test_denial_messages(annotations, settings, message):
    with pytest.raises(Denied) as e:
        mutate_pod(_pod_with(annotations), "ml", None, fleet("crio"), Settings(**settings))
    assert e.value.message == message


def test_denial_when_a_container_already_mounts_the_model_path():
    pod = _pod_with({ann.REF: "hf=r.example.com/a:v1", ann.MOUNT_PATH: "/srv"})
    pod["spec"]["containers"][0]["volumeMounts"].append({"name": "tmp", "mountPath": "/srv/hf/"})
    with pytest.raises(Denied) as e:
        mutate_pod(pod, "ml", None, fleet("crio"), Settings())
    assert e.value.message == (
        "container 'server' already mounts volume 'tmp' at /srv/hf, where model 'hf' would go; set"
        " model.cache/mount-path to another directory or rename the model with name=REF in model.cache/ref"
    )


# --- a pod that references the node cache itself (issue 11) -------------------------------------------------------

_FIX = "mount a volume of spec.volumes instead (model.cache mounts each model read-only at model.cache/mount-path)"
_HOST_FIX = ("a pod must not reach the shared cache itself; remove the volume (model.cache mounts each model read-only"
             " at model.cache/mount-path) or use another host directory")


def _host_volume(path: str) -> dict[str, Any]:
    return {"volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "host", "hostPath": {"path": path}}]}


def _ref_in(key: str, where: str, name: str) -> dict[str, Any]:
    ref = {"name": name, "mountPath": "/c"} if where == "volumeMounts" else {"name": name, "devicePath": "/dev/c"}
    return {key: [{"name": "c", "image": "x", where: [ref]}]}


CACHE_REFERENCES = [
    ("hostpath-cache", _host_volume("/var/lib/model-cache"), {},
     f"spec.volumes[1].hostPath.path is '/var/lib/model-cache' (volume 'host'), which is the node cache"
     f" /var/lib/model-cache: {_HOST_FIX}"),
    ("hostpath-cache-unnormalised", _host_volume("//var/lib/./x/../model-cache/"), {},
     f"spec.volumes[1].hostPath.path is '//var/lib/./x/../model-cache/' (volume 'host'), which is the node cache"
     f" /var/lib/model-cache: {_HOST_FIX}"),
    ("hostpath-inside-cache", _host_volume("/var/lib/model-cache/blobs/sha256"), {},
     f"spec.volumes[1].hostPath.path is '/var/lib/model-cache/blobs/sha256' (volume 'host'), which is inside the node"
     f" cache /var/lib/model-cache: {_HOST_FIX}"),
    ("hostpath-parent", _host_volume("/var/lib"), {},
     f"spec.volumes[1].hostPath.path is '/var/lib' (volume 'host'), which is a parent of the node cache"
     f" /var/lib/model-cache: {_HOST_FIX}"),
    ("hostpath-root", _host_volume("/"), {},
     f"spec.volumes[1].hostPath.path is '/' (volume 'host'), which is a parent of the node cache"
     f" /var/lib/model-cache: {_HOST_FIX}"),
    ("hostpath-relative", _host_volume("var/lib/model-cache"), {},
     f"spec.volumes[1].hostPath.path is 'var/lib/model-cache' (volume 'host'), which is the node cache"
     f" /var/lib/model-cache: {_HOST_FIX}"),
    ("hostpath-custom-cache-path", _host_volume("/mnt/nvme"), {"node_cache_path": "/mnt/nvme/models"},
     f"spec.volumes[1].hostPath.path is '/mnt/nvme' (volume 'host'), which is a parent of the node cache"
     f" /mnt/nvme/models: {_HOST_FIX}"),
    ("mount-cache-volume", _ref_in("containers", "volumeMounts", "model-cache"), {},
     f"spec.containers[0].volumeMounts[0].name is 'model-cache', a volume the pod does not define and a name"
     f" model.cache gives the volumes it injects (the node cache among them); {_FIX}"),
    ("init-mount-suffixed-cache-volume", _ref_in("initContainers", "volumeMounts", "model-cache-2"), {},
     f"spec.initContainers[0].volumeMounts[0].name is 'model-cache-2', a volume the pod does not define and a name"
     f" model.cache gives the volumes it injects (the node cache among them); {_FIX}"),
    ("ephemeral-mount-pull-secret-volume", _ref_in("ephemeralContainers", "volumeMounts", "model-cache-pull-regcred"), {},
     f"spec.ephemeralContainers[0].volumeMounts[0].name is 'model-cache-pull-regcred', a volume the pod does not"
     f" define and a name model.cache gives the volumes it injects (the node cache among them); {_FIX}"),
    ("device-ca-volume", _ref_in("containers", "volumeDevices", "model-cache-ca"), {},
     f"spec.containers[0].volumeDevices[0].name is 'model-cache-ca', a volume the pod does not define and a name"
     f" model.cache gives the volumes it injects (the node cache among them); {_FIX}"),
]


@pytest.mark.parametrize("fleet_name", ["containerd", "crio"])
@pytest.mark.parametrize("spec,settings,message", [c[1:] for c in CACHE_REFERENCES], ids=[c[0] for c in CACHE_REFERENCES])
def test_a_pod_that_references_the_node_cache_itself_is_denied(spec, settings, message, fleet_name):
    # Whatever the path (init container or image volume) and the cache chosen: the reference alone is refused.
    pod = load_pod("single")
    pod["spec"].update(copy.deepcopy(spec))
    for cache in ("node", "pod"):
        pod["metadata"]["annotations"][ann.CACHE] = cache
        with pytest.raises(Denied) as e:
            mutate_pod(pod, "ml", None, fleet(fleet_name), Settings(**settings))
        assert e.value.message == message


@pytest.mark.parametrize(
    "spec",
    [
        _host_volume("/var/lib/model-cache-other"),  # a sibling whose name starts like the cache's
        _host_volume("/var/lib/model"),
        _host_volume("/srv/models"),
        {"volumes": [{"name": "model-cache", "emptyDir": {}}], **_ref_in("initContainers", "volumeMounts", "model-cache")},
        _ref_in("ephemeralContainers", "volumeMounts", "model-cachex"),
    ],
    ids=["sibling-prefix", "other-prefix", "elsewhere", "own-volume-so-named", "name-only-starts-alike"],
)
def test_host_paths_beside_the_cache_and_its_own_volumes_are_not_denied(spec):
    pod = load_pod("single")
    pod["spec"].update(copy.deepcopy(spec))
    pod["spec"].setdefault("volumes", []).append({"name": "tmp", "emptyDir": {}})
    outcome = mutate_pod(pod, "ml", None, fleet("containerd"), Settings())
    assert outcome.mode == ann.INIT_CONTAINER
    cache = outcome.pod["spec"]["initContainers"][0]["volumeMounts"][0]["name"]
    assert cache not in {v["name"] for v in pod["spec"]["volumes"]}


@pytest.mark.parametrize("key", ["containers", "initContainers", "ephemeralContainers"])
@pytest.mark.parametrize("where", ["volumeMounts", "volumeDevices"])
def test_injected_model_volumes_take_no_name_any_container_references(key, where):
    pod = load_pod("single")
    extra = _ref_in(key, where, "model-phi3")[key][0]
    pod["spec"].setdefault(key, []).append(extra)
    outcome = mutate_pod(pod, "ml", None, fleet("crio"), Settings())
    assert outcome.mode == ann.IMAGE_VOLUME
    assert [v["name"] for v in outcome.pod["spec"]["volumes"]] == ["tmp", "model-phi3-2"]
    assert outcome.pod["spec"]["containers"][0]["volumeMounts"][-1]["name"] == "model-phi3-2"


def test_unknown_container_lists_init_containers_too():
    pod = load_pod("multi")
    pod["metadata"]["annotations"][ann.CONTAINERS] = "app,warmup,nope"
    with pytest.raises(Denied) as e:
        mutate_pod(pod, "ml", None, fleet("crio"), Settings())
    assert e.value.message == (
        "model.cache/containers names 'warmup', 'nope', not a container of this pod; containers: app, metrics;"
        " init containers: migrate, embedder"
    )


def test_explicit_image_volume_on_incapable_candidates_is_denied():
    pod = _pod_with({ann.MODE: "image-volume"})
    with pytest.raises(Denied) as e:
        mutate_pod(pod, "ml", None, fleet("mixed"), Settings())
    assert e.value.message == (
        "model.cache/mode is 'image-volume' but 4 candidate nodes of 6 cannot mount image volumes: ctrd-a"
        " (containerd 2.0), ctrd-b (containerd 2.0), crio-old (cri-o 1.32, needs 1.33+) and 1 more; set"
        " model.cache/mode to auto or init-container, or restrict the pod (nodeSelector, node affinity) to nodes"
        " running cri-o 1.33+ with kubelet 1.35+"
    )


def test_explicit_csi_where_a_candidate_lacks_the_agent_is_denied():
    pod = _pod_with({ann.MODE: "csi"})
    with pytest.raises(Denied) as e:
        mutate_pod(pod, "ml", None, fleet("mixed", agents=("crio-a", "crio-b")), Settings())
    assert e.value.message == (
        "model.cache/mode is 'csi' but 4 candidate nodes of 6 do not run the model-cache node agent: ctrd-a, ctrd-b,"
        " crio-old and 1 more; set model.cache/mode to auto or init-container, or restrict the pod (nodeSelector,"
        " node affinity) to nodes running the agent (their CSINode lists the model.cache driver)"
    )


def test_a_signed_model_on_an_image_volume_is_denied_naming_it():
    pod = _pod_with({ann.MODE: "image-volume"})
    with pytest.raises(Denied) as e:
        mutate_pod(pod, "ml", None, fleet("crio"), Settings(signature_policy=SIGNING_POLICY))
    assert e.value.message == (
        "model.cache/mode is 'image-volume', but model 'phi3' (registry.example.com/models/phi3:v1) must be signed (the"
        " cluster's signature policy for registry.example.com/models) and an image volume is mounted by the container"
        " runtime, which checks no signature; set model.cache/mode to auto, csi or init-container (the node agent or"
        " the loader verifies the signature)"
    )
    default = Settings(signature_policy=SIGNING_POLICY, default_mode="image-volume")
    with pytest.raises(Denied, match=r"^the cluster default mode is image-volume, but model 'phi3'"):
        mutate_pod(_pod_with({}), "ml", None, fleet("crio"), default)


def test_explicit_csi_for_a_signed_model_needs_agents_that_enforce_the_policy():
    pod = _pod_with({ann.MODE: "csi"})
    with pytest.raises(Denied) as e:
        mutate_pod(pod, "ml", None, fleet("crio", agents=("*",)), Settings(signature_policy=SIGNING_POLICY))
    assert e.value.message == (
        "model.cache/mode is 'csi', but a model of this pod must be signed (the cluster's signature policy) and the"
        " node agents are not declared to enforce that policy (MODEL_CACHE_AGENT_ENFORCES_SIGNATURES); set"
        " model.cache/mode to auto or init-container (the loader verifies the signature), or give every agent the"
        " signature-policy component and set that setting")
    enforcing = Settings(signature_policy=SIGNING_POLICY, agent_enforces_signatures=True)
    assert mutate_pod(pod, "ml", None, fleet("crio", agents=("*",)), enforcing).mode == ann.CSI


def test_the_csi_path_is_admissible_under_restricted_pod_security():
    """What the CSI path adds passes the restricted profile's volume and container rules: only csi volumes, no
    init container, no host namespaces or privileges (the app's own containers are the app team's business)."""
    case = next(c for c in CASES if c.id == "csi-restricted-namespace-keeps-the-node-cache")
    pod, snapshot, settings = case.inputs()
    out = mutate_pod(pod, "ml", RESTRICTED, snapshot, settings).pod
    added = out["spec"]["volumes"][len(pod["spec"].get("volumes") or ()):]
    restricted_volume_types = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                               "projected", "secret"}
    assert [set(v) - {"name"} for v in added] == [{"csi"}]
    assert {k for v in out["spec"]["volumes"] for k in v if k != "name"} <= restricted_volume_types
    assert out["spec"].get("initContainers") == pod["spec"].get("initContainers")
    for key in ("hostNetwork", "hostPID", "hostIPC", "securityContext"):
        assert out["spec"].get(key) == pod["spec"].get(key)
    assert [c.get("securityContext") for c in out["spec"]["containers"]] == [
        c.get("securityContext") for c in pod["spec"]["containers"]]


def main() -> None:
    """Regenerate tests/fixtures/pods/expected/ from the current code (review the diff before committing)."""
    EXPECTED.mkdir(exist_ok=True)
    for case in CASES:
        text = yaml.safe_dump(run(case), sort_keys=False, width=120)
        (EXPECTED / f"{case.id}.yaml").write_text(f"# {case.id}: generated by python -m tests.test_mutate; reviewed\n{text}")


if __name__ == "__main__":
    main()


@pytest.mark.parametrize(("allowed", "ref", "ok"), [
    ("registry.example.com", "registry.example.com:443/models/phi3:v1", True),   # the default port: one registry
    ("Registry.Example.com:443/models", "registry.example.com/models/phi3:v1", True),
    ("docker.io/library", "index.docker.io/library/phi3:v1", True),             # Docker Hub's aliases
    ("registry-1.docker.io", "docker.io/acme/phi3:v1", True),
    ("registry.example.com", "registry.example.com:5000/models/phi3:v1", False),  # another port: another registry
    ("registry.example.com/models", "registry.example.com/modelsx/phi3:v1", False),
    ("ghcr.io/acme", "ghcr.io/acme/team/phi3:v1", True),
    # Over plain http 443 is not the default port: another service, so the port must be as written.
    ("localhost", "localhost:443/models/phi3:v1", False),
    ("localhost:443", "localhost/models/phi3:v1", False),
    ("127.0.0.1/models", "127.0.0.1:443/models/phi3:v1", False),
    ("reg.internal", "reg.internal:443/models/phi3:v1", False),  # reg.internal:443 is listed as plain http below
    ("localhost:5000", "LOCALHOST:5000/models/phi3:v1", True),
    ("localhost", "LOCALHOST:443/models/phi3:v1", False),       # loopback whatever the case: plain http
    ("reg.internal:443", "REG.INTERNAL:443/models/phi3:v1", True),  # listed as plain http, compared without case
    ("reg.internal:443", "reg.internal/models/phi3:v1", False),  # https on 443 is not the plain http one listed
    ("plain.internal", "plain.internal:443/models/phi3:v1", False),  # the entry is plain http (port 80), the ref https
])
def test_allowed_registries_compare_hosts_as_the_signature_policy_does(allowed, ref, ok):
    """MODEL_CACHE_ALLOWED_REGISTRIES and the signature policy answer "is this model under this prefix" with one
    function (loader.policy.under_prefix): case, the default port and Docker Hub's aliases name one registry, so an
    admin's allow-list neither refuses `registry.example.com:443/...` nor needs every alias listed. Registries the
    loader speaks plain http to (loopback, MODEL_CACHE_PLAIN_HTTP_REGISTRIES) keep their port: naming `localhost`
    admits no `localhost:443`."""
    settings = Settings(allowed_registries=[allowed], plain_http_registries=["reg.internal:443", "plain.internal"])
    pod = load_pod("single")
    pod["metadata"]["annotations"][ann.REF] = ref
    if ok:
        outcome = mutate_pod(pod, "ml", None, fleet("none"), settings)
        assert ref in json.dumps(outcome.pod)  # accepted: the loader is told to pull it
    else:
        with pytest.raises(Denied, match="which is not allowed in this cluster"):
            mutate_pod(pod, "ml", None, fleet("none"), settings)
