"""Node inventory parsing, image-volume capability, candidate nodes and the mode decision."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from webhook.config import Settings
from webhook.errors import Denied
from webhook.nodes import Choice, candidate_nodes, choose_mode, is_image_volume_capable
from webhook.snapshot import EMPTY, NodeInfo, Snapshot, Taint, node_from_dict, parse_version, snapshot_from

SETTINGS = Settings()


def node(name, runtime="cri-o", version=(1, 34, 2), kubelet=(1, 35, 0), labels=None, taints=(), unschedulable=False):
    return NodeInfo(name, MappingProxyType(dict(labels or {})), tuple(taints), runtime, version, kubelet, unschedulable)


def snap(*nodes: NodeInfo, synced: bool = True) -> Snapshot:
    return Snapshot(tuple(nodes), {}, synced)


def names(nodes) -> list[str]:
    return [n.name for n in nodes]


# --- parsing -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1.34.2", (1, 34, 2)),
        ("v1.35.0", (1, 35, 0)),
        ("v1.35.0-eks-4f5a2b", (1, 35, 0)),
        ("1.33", (1, 33)),
        ("2.0.1+unknown", (2, 0, 1)),
        ("garbage", None),
        ("", None),
    ],
    ids=["crio", "kubelet", "vendor-suffix", "major-minor", "build-metadata", "garbage", "empty"],
)
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_node_from_dict_reads_everything_the_decision_needs():
    obj = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "gpu-1", "labels": {"pool": "gpu", "model.cache/image-volume": "true"}},
        "spec": {
            "unschedulable": True,
            "taints": [
                {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute", "timeAdded": "2026-11-22T10:00:00Z"},
            ],
        },
        "status": {"nodeInfo": {"containerRuntimeVersion": "CRI-O://1.34.2", "kubeletVersion": "v1.35.1"}},
    }
    assert node_from_dict(obj) == NodeInfo(
        name="gpu-1",
        labels=MappingProxyType({"pool": "gpu", "model.cache/image-volume": "true"}),
        taints=(Taint("dedicated", "gpu", "NoSchedule"), Taint("node.kubernetes.io/not-ready", "", "NoExecute")),
        runtime="cri-o",
        runtime_version=(1, 34, 2),
        kubelet_version=(1, 35, 1),
        unschedulable=True,
    )


def test_node_that_has_not_reported_is_unknown():
    n = node_from_dict({"metadata": {"name": "joining"}})
    assert n == NodeInfo("joining")
    assert (n.runtime, n.runtime_version, n.kubelet_version, n.runtime_text) == ("", None, None, "an unknown runtime")
    assert not is_image_volume_capable(n, SETTINGS)


@pytest.mark.parametrize(
    "obj,message",
    [({"metadata": {}}, "a Node without metadata.name"), ([], "a Node must be a JSON object, not list")],
    ids=["no-name", "not-an-object"],
)
def test_node_from_dict_rejects_nameless(obj, message):
    with pytest.raises(ValueError) as e:
        node_from_dict(obj)
    assert str(e.value) == message


def test_snapshot_from_namespaces_and_nodes():
    s = snapshot_from(
        [{"metadata": {"name": "a"}, "status": {"nodeInfo": {"containerRuntimeVersion": "containerd://2.0.1"}}}],
        [{"metadata": {"name": "ml", "labels": {"model.cache/enabled": "true"}}}, {"metadata": {"name": "bare"}}, {}],
        synced=True,
    )
    assert s == Snapshot((NodeInfo("a", runtime="containerd", runtime_version=(2, 0, 1)),), {"ml": {"model.cache/enabled": "true"}, "bare": {}}, True)
    assert (EMPTY.nodes, dict(EMPTY.namespaces), EMPTY.synced) == ((), {}, False)


# --- capability ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,settings,expected",
    [
        (node("a"), SETTINGS, True),
        (node("a", version=(1, 33, 0)), SETTINGS, True),
        (node("a", version=(1, 32, 9)), SETTINGS, False),
        (node("a", kubelet=(1, 34, 3)), SETTINGS, False),
        (node("a", kubelet=None), SETTINGS, False),
        (node("a", version=None), SETTINGS, False),
        (node("a", runtime="containerd", version=(2, 1, 0)), SETTINGS, False),
        (node("a", runtime="containerd", labels={"model.cache/image-volume": "true"}), SETTINGS, True),
        (node("a", labels={"model.cache/image-volume": "False"}), SETTINGS, False),
        (node("a", labels={"model.cache/image-volume": "maybe"}), SETTINGS, True),
        (node("a", runtime="docker", version=(24, 0)), SETTINGS, False),
        (node("a", version=(1, 33, 1)), Settings(image_volume_min_crio="1.34"), False),
        (node("a", kubelet=(1, 33, 0)), Settings(image_volume_min_kubelet="1.33"), True),
    ],
    ids=[
        "crio-1.34-kubelet-1.35", "crio-1.33", "crio-1.32", "old-kubelet", "kubelet-unknown", "crio-version-unknown",
        "containerd-never", "label-true-wins", "label-false-wins", "label-other-ignored", "docker", "min-crio-setting",
        "min-kubelet-setting",
    ],
)
def test_image_volume_capability(n, settings, expected):
    assert is_image_volume_capable(n, settings) is expected


# --- candidates ----------------------------------------------------------------------------------------------------

FLEET = snap(
    node("a", labels={"pool": "crio", "zone": "z1", "gpus": "8"}),
    node("b", labels={"pool": "crio", "zone": "z2", "gpus": "2"}),
    node("c", runtime="containerd", labels={"pool": "ctrd", "zone": "z1"}),
    node("d", runtime="containerd", labels={"pool": "ctrd", "zone": "z2", "gpus": "x"}),
)


def required(*terms):
    return {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}}}


def expr(key, op, *values):
    e = {"key": key, "operator": op}
    if values:
        e["values"] = list(values)
    return e


@pytest.mark.parametrize(
    "spec,expected",
    [
        ({}, ["a", "b", "c", "d"]),
        ({"nodeName": "c"}, ["c"]),
        ({"nodeName": "zz"}, []),
        ({"nodeSelector": {"pool": "crio"}}, ["a", "b"]),
        ({"nodeSelector": {"pool": "crio", "zone": "z2"}}, ["b"]),
        ({"nodeSelector": {}}, ["a", "b", "c", "d"]),
        (required({"matchExpressions": [expr("zone", "In", "z1")]}), ["a", "c"]),
        (required({"matchExpressions": [expr("zone", "NotIn", "z1")]}), ["b", "d"]),
        (required({"matchExpressions": [expr("gpus", "Exists")]}), ["a", "b", "d"]),
        (required({"matchExpressions": [expr("gpus", "DoesNotExist")]}), ["c"]),
        (required({"matchExpressions": [expr("gpus", "Gt", "4")]}), ["a"]),
        (required({"matchExpressions": [expr("gpus", "Lt", "4")]}), ["b"]),
        (required({"matchExpressions": [expr("gpus", "Gt", "four")]}), []),
        (required({"matchExpressions": [expr("gpus", "Gt", "1", "2")]}), []),
        (required({"matchExpressions": [expr("zone", "In", "z1"), expr("pool", "In", "ctrd")]}), ["c"]),
        (required({"matchExpressions": [expr("pool", "In", "crio")]}, {"matchFields": [expr("metadata.name", "In", "d")]}), ["a", "b", "d"]),
        (required({"matchFields": [expr("metadata.name", "NotIn", "a", "b")]}), ["c", "d"]),
        (required({"matchExpressions": [expr("zone", "In", "z2")], "matchFields": [expr("metadata.name", "In", "b", "c")]}), ["b"]),
        (required({}), []),
        (required(), []),
        (required({"matchExpressions": [expr("zone", "Near", "z1")]}), ["a", "b", "c", "d"]),
        ({"nodeSelector": {"pool": "crio"}, **required({"matchExpressions": [expr("zone", "In", "z2")]})}, ["b"]),
        ({"nodeName": "a", "nodeSelector": {"pool": "ctrd"}}, []),
        ({"affinity": {"podAntiAffinity": {}}}, ["a", "b", "c", "d"]),
    ],
    ids=[
        "no-constraints", "node-name", "node-name-unknown", "selector", "selector-two-labels", "empty-selector",
        "in", "not-in-includes-missing", "exists", "does-not-exist", "gt", "lt", "gt-not-a-number",
        "gt-two-values", "and-within-term", "or-across-terms", "match-fields-not-in", "expressions-and-fields",
        "empty-term-matches-nothing", "no-terms-matches-nothing", "unknown-operator-includes", "selector-and-affinity",
        "node-name-and-selector", "pod-affinity-ignored",
    ],
)
def test_candidate_nodes_scheduling_constraints(spec, expected):
    assert names(candidate_nodes(spec, FLEET)) == expected


NO_SCHEDULE = Taint("dedicated", "gpu", "NoSchedule")
NO_EXECUTE = Taint("dedicated", "gpu", "NoExecute")


@pytest.mark.parametrize(
    "taint,tolerations,candidate",
    [
        (NO_SCHEDULE, [], False),
        (NO_EXECUTE, [], False),
        (Taint("dedicated", "gpu", "PreferNoSchedule"), [], True),
        (NO_SCHEDULE, [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}], True),
        (NO_SCHEDULE, [{"key": "dedicated", "value": "gpu"}], True),
        (NO_SCHEDULE, [{"key": "dedicated", "operator": "Equal", "value": "cpu"}], False),
        (NO_SCHEDULE, [{"key": "dedicated", "operator": "Exists"}], True),
        (NO_SCHEDULE, [{"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}], False),
        (NO_EXECUTE, [{"key": "dedicated", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}], True),
        (NO_SCHEDULE, [{"operator": "Exists"}], True),
        (NO_SCHEDULE, [{"operator": "Exists", "effect": "NoSchedule"}], True),
        (NO_SCHEDULE, [{"key": "other", "operator": "Exists"}], False),
        (Taint("dedicated", "", "NoSchedule"), [{"key": "dedicated", "operator": "Equal"}], True),
        (NO_SCHEDULE, [{"key": "dedicated", "operator": "Gt", "value": "1"}], True),
        (Taint("node.kubernetes.io/not-ready", "", "NoExecute"), [], True),
        (Taint("node.kubernetes.io/unreachable", "", "NoExecute"), [], True),
        (Taint("node.kubernetes.io/memory-pressure", "", "NoSchedule"), [], True),
        (Taint("node.kubernetes.io/disk-pressure", "", "NoSchedule"), [], True),
        (Taint("node.kubernetes.io/pid-pressure", "", "NoSchedule"), [], True),
        (Taint("node.kubernetes.io/network-unavailable", "", "NoSchedule"), [], True),
        (Taint("node.kubernetes.io/unschedulable", "", "NoSchedule"), [], True),
        (Taint("node.cloudprovider.kubernetes.io/uninitialized", "true", "NoSchedule"), [], True),
    ],
    ids=[
        "no-schedule-untolerated", "no-execute-untolerated", "prefer-no-schedule-ignored", "equal", "default-operator-equal",
        "equal-wrong-value", "exists", "wrong-effect", "no-execute-with-seconds", "tolerate-everything",
        "tolerate-every-key-one-effect", "other-key", "empty-value", "unknown-operator-tolerates", "not-ready",
        "unreachable", "memory-pressure", "disk-pressure", "pid-pressure", "network-unavailable", "cordoned-taint",
        "cloud-uninitialized",
    ],
)
def test_taints_against_tolerations(taint, tolerations, candidate):
    fleet = snap(node("t", taints=[taint]), node("free"))
    assert names(candidate_nodes({"tolerations": tolerations}, fleet)) == (["t", "free"] if candidate else ["free"])


def test_every_taint_must_be_tolerated_and_node_name_bypasses_taints():
    fleet = snap(node("t", taints=[NO_SCHEDULE, Taint("spot", "true", "NoExecute")]))
    assert names(candidate_nodes({"tolerations": [{"key": "dedicated", "operator": "Exists"}]}, fleet)) == []
    both = [{"key": "dedicated", "operator": "Exists"}, {"key": "spot", "operator": "Exists"}]
    assert names(candidate_nodes({"tolerations": both}, fleet)) == ["t"]
    assert names(candidate_nodes({"nodeName": "t"}, fleet)) == ["t"]


def test_cordoned_node_is_a_candidate():
    assert names(candidate_nodes({}, snap(node("cordoned", unschedulable=True)))) == ["cordoned"]


# --- the decision --------------------------------------------------------------------------------------------------

CRIO = [node(f"crio-{i}") for i in range(4)]
CTRD = [node(f"ctrd-{i}", runtime="containerd", version=(2, 0, 1)) for i in range(5)]


@pytest.mark.parametrize(
    "mode,fleet,expected",
    [
        ("auto", snap(*CRIO), Choice("image-volume", "all 4 candidate nodes run cri-o 1.34", ())),
        ("auto", snap(CRIO[0]), Choice("image-volume", "the one candidate node runs cri-o 1.34", ())),
        (
            "auto",
            snap(CRIO[0], node("x", version=(1, 33, 0)), node("y", runtime="containerd", labels={"model.cache/image-volume": "true"})),
            Choice("image-volume", "all 3 candidate nodes can mount image volumes: 1 runs cri-o 1.34, 1 runs cri-o 1.33, 1 is labelled model.cache/image-volume=true", ()),
        ),
        ("auto", snap(*CTRD), Choice("init-container", "all 5 candidate nodes run containerd 2.0", ())),
        (
            "auto",
            snap(*CRIO[:3], *CTRD[:2]),
            Choice(
                "init-container",
                "2 of 5 candidate nodes run containerd 2.0",
                ("model.cache: using an init container: 2 of 5 candidate nodes run containerd 2.0 (ctrd-0, ctrd-1);"
                 " pin the pod to capable nodes to get an image volume",),
            ),
        ),
        (
            "auto",
            snap(CRIO[0], CTRD[0]),
            Choice(
                "init-container",
                "1 of 2 candidate nodes runs containerd 2.0",
                ("model.cache: using an init container: 1 of 2 candidate nodes runs containerd 2.0 (ctrd-0);"
                 " pin the pod to capable nodes to get an image volume",),
            ),
        ),
        ("init-container", snap(*CRIO), Choice("init-container", "requested by model.cache/mode", ())),
        ("image-volume", snap(*CRIO), Choice("image-volume", "requested by model.cache/mode; all 4 candidate nodes run cri-o 1.34", ())),
        (
            "auto",
            snap(*CRIO, synced=False),
            Choice("init-container", "the node inventory has not synced yet",
                   ("model.cache: the node inventory has not synced yet; using the init container, which works on every node",)),
        ),
        (
            "auto",
            snap(),
            Choice("init-container", "the node inventory is empty",
                   ("model.cache: the node inventory is empty; using the init container, which works on every node",)),
        ),
        (
            "image-volume",
            snap(),
            Choice("image-volume", "requested by model.cache/mode; not checked: the node inventory is empty",
                   ("model.cache: the node inventory is empty, so whether the pod's node can mount image volumes was not checked",)),
        ),
        (
            "auto",
            snap(node("joining", runtime="", version=None, kubelet=None)),
            Choice("init-container", "the one candidate node runs an unknown runtime", ()),
        ),
    ],
    ids=[
        "all-crio", "one-crio", "capable-for-several-reasons", "all-containerd", "mixed", "mixed-singular",
        "explicit-init", "explicit-image-volume", "not-synced", "empty", "explicit-image-volume-empty", "unknown-runtime",
    ],
)
def test_choose_mode(mode, fleet, expected):
    assert choose_mode(mode, {}, fleet, SETTINGS) == expected


def test_no_candidate_nodes_means_init_container():
    assert choose_mode("auto", {"nodeSelector": {"pool": "scaled-to-zero"}}, snap(*CRIO), SETTINGS) == Choice(
        "init-container",
        "no node in the inventory matches the pod's nodeName, nodeSelector, affinity and tolerations",
        ("model.cache: no node in the inventory matches the pod's nodeName, nodeSelector, affinity and tolerations;"
         " using the init container, which works on every node",),
    )


@pytest.mark.parametrize(
    "fleet,explicit,message",
    [
        (
            snap(*CRIO, CTRD[0]),
            True,
            "model.cache/mode is 'image-volume' but 1 candidate node of 5 cannot mount image volumes: ctrd-0 (containerd"
            " 2.0); set model.cache/mode to auto or init-container, or restrict the pod (nodeSelector, node affinity) to"
            " nodes running cri-o 1.33+ with kubelet 1.35+",
        ),
        (
            snap(*CTRD),
            True,
            "model.cache/mode is 'image-volume' but 5 candidate nodes of 5 cannot mount image volumes: ctrd-0 (containerd"
            " 2.0), ctrd-1 (containerd 2.0), ctrd-2 (containerd 2.0) and 2 more; set model.cache/mode to auto or"
            " init-container, or restrict the pod (nodeSelector, node affinity) to nodes running cri-o 1.33+ with kubelet"
            " 1.35+",
        ),
        (
            snap(node("old", kubelet=(1, 34, 0)), node("off", labels={"model.cache/image-volume": "false"})),
            False,
            "the cluster default mode is image-volume but 2 candidate nodes of 2 cannot mount image volumes: old (kubelet"
            " 1.34, needs 1.35+), off (labelled model.cache/image-volume=false); set model.cache/mode to auto or"
            " init-container, or restrict the pod (nodeSelector, node affinity) to nodes running cri-o 1.33+ with kubelet"
            " 1.35+",
        ),
    ],
    ids=["one-containerd", "and-n-more", "cluster-default"],
)
def test_explicit_image_volume_denied_names_incapable_nodes(fleet, explicit, message):
    with pytest.raises(Denied) as e:
        choose_mode("image-volume", {}, fleet, SETTINGS, explicit=explicit)
    assert e.value.message == message


def test_decisions_are_memoised_per_snapshot_and_constraints():
    fleet = snap(*CRIO, CTRD[0])
    spec = {"nodeSelector": {"pool": "x"}}
    first = choose_mode("auto", {}, fleet, SETTINGS)
    assert choose_mode("auto", {}, fleet, SETTINGS) is first
    choose_mode("auto", spec, fleet, SETTINGS)
    for _ in range(2):  # a memoised denial is raised again, every time
        with pytest.raises(Denied):
            choose_mode("image-volume", {}, fleet, SETTINGS)
    assert len(fleet.memo) == 3
    # A new snapshot starts empty: decisions never outlive the inventory they were made from.
    assert len(snap(*CRIO).memo) == 0
    assert choose_mode("auto", {}, snap(*CRIO), SETTINGS).mode == "image-volume"


def test_remembered_decisions_quote_the_minimum_versions_as_each_settings_wrote_them():
    fleet = snap(node("old", version=(1, 31, 0)))
    for written in ("1.33", "01.33", "1.033"):  # equal versions, written differently
        with pytest.raises(Denied) as denied:
            choose_mode("image-volume", {}, fleet, Settings(image_volume_min_crio=written))
        assert f"needs {written}+" in denied.value.message, denied.value.message


def test_remembered_decisions_tell_apart_constraints_the_fast_key_cannot_write():
    # The memo key is orjson's text of the constraints, but orjson writes NaN as null: a toleration value NaN (only
    # a Python caller, e.g. the preview's YAML, can pass one) must not share the decision of a null one.
    fleet = snap(node("gpu", taints=[Taint("gpu", "", "NoSchedule")]), *CTRD)
    null = {"tolerations": [{"key": "gpu", "operator": "Equal", "value": None}]}
    nan = {"tolerations": [{"key": "gpu", "operator": "Equal", "value": float("nan")}]}
    assert "6 candidate nodes" in choose_mode("auto", null, fleet, SETTINGS).reason
    assert "5 candidate nodes" in choose_mode("auto", nan, fleet, SETTINGS).reason
    # Integers beyond 64 bits (orjson refuses them) are decided too, apart from their neighbours.
    big = {"tolerations": [{"key": "gpu", "operator": "Exists", "tolerationSeconds": 2**70}]}
    assert "6 candidate nodes" in choose_mode("auto", big, fleet, SETTINGS).reason
    assert len(fleet.memo) == 3


@pytest.mark.parametrize(
    "one,other,shared",
    [
        ({"nodeSelector": {"a": "1", "b": "2"}}, {"nodeSelector": {"b": "2", "a": "1"}}, True),
        ({}, {"nodeName": None, "nodeSelector": None, "tolerations": None, "affinity": None}, True),
        ({}, {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}}, False),
        ({"tolerations": [{"key": "a"}]}, {"tolerations": [{"key": "b"}]}, False),
    ],
    ids=["key-order", "absent-is-null", "required-empty-is-not-absent", "tolerations"],
)
def test_constraints_read_alike_share_one_remembered_decision(one, other, shared):
    fleet = snap(*CRIO, CTRD[0])
    choose_mode("auto", one, fleet, SETTINGS)
    choose_mode("auto", other, fleet, SETTINGS)
    assert len(fleet.memo) == (1 if shared else 2)
