"""The inventory: list+watch against a local fake apiserver (events, bookmarks, 410 relists, failures), and the
NodeList file source."""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest

from tests.support.fake_apiserver import FakeApiServer
from webhook import inventory as inv
from webhook.snapshot import node_from_dict, snapshot_from

WAIT = 30.0  # a generous ceiling for background progress; no test asserts how long anything took


def node(name: str, runtime: str = "cri-o://1.34.1", kubelet: str = "v1.35.0", labels=None, taints=None) -> dict:
    obj = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {},
        "status": {"nodeInfo": {"containerRuntimeVersion": runtime, "kubeletVersion": kubelet}},
    }
    if taints:
        obj["spec"]["taints"] = taints
    return obj


def namespace(name: str, labels=None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def names(snap) -> list[str]:
    return sorted(n.name for n in snap.nodes)


@pytest.fixture
def fake():
    server = FakeApiServer()
    yield server
    server.stop()


@pytest.fixture
def watching(fake, tmp_path):
    """A started WatchingInventory on the fake; stopped after the test."""
    started = []

    def start() -> inv.WatchingInventory:
        inventory = inv.WatchingInventory(inv.api_client(fake.write_kubeconfig(tmp_path / "kubeconfig")))
        inventory.start()
        started.append(inventory)
        return inventory

    yield start
    for inventory in started:
        inventory.stop()


def test_initial_list_publishes_a_synced_snapshot_of_nodes_and_namespaces(fake, watching):
    crio = node("crio-1", labels={"pool": "crio"}, taints=[{"key": "gpu", "value": "true", "effect": "NoSchedule"}])
    containerd = node("containerd-1", runtime="containerd://1.7.22", kubelet="v1.33.4")
    fake.put("nodes", crio)
    fake.put("nodes", containerd)
    fake.put("namespaces", namespace("models", {"model.cache/enabled": "true"}))
    fake.put("namespaces", namespace("default"))

    inventory = watching()
    snap = inventory.wait_for(lambda s: s.synced, WAIT)

    assert snap is not None
    # Node objects as the server stored them (with resourceVersion) go through the core's parser unchanged.
    assert sorted(snap.nodes, key=lambda n: n.name) == [
        node_from_dict(containerd),
        node_from_dict(crio),
    ]
    assert dict(snap.namespaces) == {"default": {}, "models": {"model.cache/enabled": "true"}}
    assert inventory.lists == {"nodes": 1, "namespaces": 1, "csinodes": 1}


def test_large_inventories_are_listed_in_pages(fake, watching):
    for i in range(1201):
        fake.put_silently("nodes", node(f"node-{i:04d}"))
    inventory = watching()
    snap = inventory.wait_for(lambda s: s.synced, WAIT)

    assert names(snap) == [f"node-{i:04d}" for i in range(1201)]
    lists = fake.requests_for("nodes", watch=False)
    assert [(r.params.get("limit"), r.params.get("continue")) for r in lists] == [
        ("500", None),
        ("500", "500:1301"),
        ("500", "1000:1301"),
    ]


def test_not_synced_until_both_resources_have_listed(fake, watching):
    fake.put("nodes", node("n1"))
    fake.hold("namespaces")
    inventory = watching()

    snap = inventory.wait_for(lambda s: len(s.nodes) == 1, WAIT)
    assert snap is not None and snap.synced is False and names(snap) == ["n1"]

    fake.release("namespaces")
    assert inventory.wait_for(lambda s: s.synced, WAIT) is not None


def test_watch_events_add_modify_and_delete_nodes(fake, watching):
    fake.put("nodes", node("n1"))
    fake.put("nodes", node("n2"))
    inventory = watching()
    assert inventory.wait_for(lambda s: s.synced, WAIT) is not None

    fake.put("nodes", node("n3", runtime="containerd://2.0.0"))
    snap = inventory.wait_for(lambda s: names(s) == ["n1", "n2", "n3"], WAIT)
    assert snap is not None
    assert {n.name: n.runtime for n in snap.nodes} == {"n1": "cri-o", "n2": "cri-o", "n3": "containerd"}

    relabelled = node("n1", labels={"model.cache/image-volume": "false"})
    fake.put("nodes", relabelled)
    snap = inventory.wait_for(
        lambda s: any(n.name == "n1" and "model.cache/image-volume" in n.labels for n in s.nodes), WAIT
    )
    assert snap is not None
    assert [n for n in snap.nodes if n.name == "n1"] == [node_from_dict(relabelled)]

    fake.delete("nodes", "n2")
    snap = inventory.wait_for(lambda s: names(s) == ["n1", "n3"], WAIT)
    assert snap is not None and snap.synced

    fake.put("namespaces", namespace("team-a", {"pod-security.kubernetes.io/enforce": "restricted"}))
    snap = inventory.wait_for(lambda s: "team-a" in s.namespaces, WAIT)
    assert dict(snap.namespaces["team-a"]) == {"pod-security.kubernetes.io/enforce": "restricted"}
    fake.delete("namespaces", "team-a")
    assert inventory.wait_for(lambda s: "team-a" not in s.namespaces, WAIT) is not None
    # Events alone: never a second list.
    assert inventory.lists == {"nodes": 1, "namespaces": 1, "csinodes": 1}


def test_node_and_namespace_updates_that_change_nothing_the_decision_reads_keep_the_snapshot(fake, watching):
    """Kubelet heartbeats and status churn must not reset the per-snapshot memos: no new snapshot for them."""
    fake.put("nodes", node("n1"))
    fake.put("namespaces", namespace("team-a", {"model.cache/enabled": "true"}))
    inventory = watching()
    synced = inventory.wait_for(lambda s: s.synced, WAIT)
    assert synced is not None
    published = []
    real_publish = inventory.publish
    inventory.publish = lambda snap: (published.append(snap), real_publish(snap))

    heartbeat = node("n1")
    heartbeat["status"]["conditions"] = [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-23T10:05:00Z"}]
    heartbeat["metadata"]["annotations"] = {"node.alpha.kubernetes.io/ttl": "0"}
    fake.put("nodes", heartbeat)
    fake.put("namespaces", {**namespace("team-a", {"model.cache/enabled": "true"}), "status": {"phase": "Active"}})
    fake.put("nodes", node("n2"))  # a real change, after the others: once it shows, they have been handled
    snap = inventory.wait_for(lambda s: names(s) == ["n1", "n2"], WAIT)
    assert snap is not None
    assert published == [snap]
    assert inventory.snapshot() is snap

    fake.put("nodes", node("n1", labels={"pool": "gpu"}))  # a label is read by affinities: a new snapshot
    assert inventory.wait_for(lambda s: any(n.labels.get("pool") == "gpu" for n in s.nodes), WAIT) is not None
    assert len(published) == 2


def test_relists_and_deletions_that_change_nothing_publish_nothing(fake, tmp_path):
    inventory = inv.WatchingInventory(inv.api_client(fake.write_kubeconfig(tmp_path / "kubeconfig")))  # not started
    published = []
    inventory.publish = published.append
    inventory._replace_namespaces([namespace("team-a")])
    inventory._replace_csinodes([csinode("n1", "model.cache")])
    inventory._replace_nodes([node("n1"), node("n2")])
    assert len(published) == 3 and published[-1].synced
    inventory._replace_nodes([node("n2"), node("n1")])  # the same nodes again (a 410 relist)
    inventory._replace_namespaces([namespace("team-a")])
    inventory._replace_csinodes([csinode("n1", "model.cache"), csinode("n2")])
    inventory._node_event("DELETED", node("gone"))
    inventory._namespace_event("DELETED", namespace("gone"))
    inventory._csinode_event("DELETED", csinode("gone", "model.cache"))
    inventory._csinode_event("MODIFIED", csinode("n2", "ebs.csi.aws.com"))  # still no agent there
    inventory._node_event("MODIFIED", {"metadata": {}})  # unreadable: ignored with a warning
    inventory._csinode_event("MODIFIED", {"metadata": {}})
    assert len(published) == 3
    inventory._replace_nodes([node("n1")])  # n2 went while the watch was down
    assert len(published) == 4 and names(published[-1]) == ["n1"] and published[-1].agents == {"n1"}


def test_a_list_keeps_only_what_the_inventory_reads_of_each_node():
    full = node("n1", labels={"pool": "gpu"}, taints=[{"key": "gpu", "value": "x", "effect": "NoSchedule"}])
    full["metadata"].update(uid="u1", resourceVersion="7", annotations={"a": "b"}, managedFields=[{"manager": "kubelet"}])
    full["spec"].update(unschedulable=True, podCIDR="10.0.0.0/24")
    full["status"].update(images=[{"names": [f"registry.example.com/img:{i}"], "sizeBytes": i} for i in range(100)],
                          conditions=[{"type": "Ready", "status": "True"}], capacity={"cpu": "8"})
    slim = inv._slim(full)
    assert slim == {
        "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1", "pool": "gpu"}},
        "spec": {"taints": [{"key": "gpu", "value": "x", "effect": "NoSchedule"}], "unschedulable": True},
        "status": {"nodeInfo": {"containerRuntimeVersion": "cri-o://1.34.1", "kubeletVersion": "v1.35.0"}},
    }
    assert node_from_dict(slim) == node_from_dict(full)
    assert inv._slim(namespace("team-a", {"x": "y"})) == {"metadata": {"name": "team-a", "labels": {"x": "y"}}}
    # What the readers refuse stays refusable.
    assert inv._slim("not an object") == "not an object"
    assert inv._slim({"metadata": "bad"}) == {"metadata": "bad"}


def test_a_bookmark_moves_the_resume_point_of_the_next_watch(fake, watching):
    fake.put("nodes", node("n1"))
    inventory = watching()
    assert inventory.wait_for(lambda s: s.synced, WAIT) is not None
    first_watch = fake.wait_for_request(lambda r: r.resource == "nodes" and r.watch)
    assert first_watch.params["allowWatchBookmarks"] == "true"

    marker = fake.bookmark("nodes")
    fake.end_watches("nodes")  # as the server-side timeout would

    resumed = fake.wait_for_request(lambda r: r.resource == "nodes" and r.watch and r.resource_version == str(marker))
    assert resumed is not None
    assert inventory.lists == {"nodes": 1, "namespaces": 1, "csinodes": 1}


def test_410_gone_during_a_watch_relists_and_picks_up_changes_whose_events_were_lost(fake, watching):
    fake.put("nodes", node("n1"))
    fake.put("nodes", node("n2"))
    inventory = watching()
    assert inventory.wait_for(lambda s: s.synced, WAIT) is not None

    # Changes whose events the server no longer has: only a relist can see them.
    fake.put_silently("nodes", node("n3"))
    fake.put_silently("nodes", node("n1", runtime="containerd://1.7.0"))
    fake.expire("nodes")

    snap = inventory.wait_for(lambda s: names(s) == ["n1", "n2", "n3"], WAIT)
    assert snap is not None and snap.synced
    assert {n.name: n.runtime for n in snap.nodes} == {"n1": "containerd", "n2": "cri-o", "n3": "cri-o"}
    assert inventory.lists == {"nodes": 2, "namespaces": 1, "csinodes": 1}

    # The relist's version is the new resume point, and events flow again.
    fake.put("nodes", node("n4"))
    assert inventory.wait_for(lambda s: "n4" in names(s), WAIT) is not None


def test_410_as_the_http_status_of_a_watch_request_also_relists(fake, watching):
    fake.put("nodes", node("n1"))
    fake.fail_next("nodes", watch=True, status=410)
    inventory = watching()
    assert inventory.wait_for(lambda s: s.synced, WAIT) is not None
    relisted = fake.wait_for_request(
        lambda r: r.resource == "nodes" and not r.watch and len(fake.requests_for("nodes", watch=False)) >= 2
    )
    assert relisted is not None
    fake.put("nodes", node("n2"))
    assert inventory.wait_for(lambda s: names(s) == ["n1", "n2"], WAIT) is not None


def test_failing_requests_are_retried_with_backoff(fake, watching):
    fake.put("nodes", node("n1"))
    fake.fail_next("nodes", watch=False, status=500)
    fake.fail_next("nodes", watch=True, status=503)
    inventory = watching()

    assert inventory.wait_for(lambda s: s.synced, WAIT) is not None
    fake.put("nodes", node("n2"))
    assert inventory.wait_for(lambda s: names(s) == ["n1", "n2"], WAIT) is not None
    statuses = [r.resource_version for r in fake.requests_for("nodes", watch=False)]
    assert len(statuses) == 2  # the failed list, then the one that worked
    assert inventory.lists == {"nodes": 1, "namespaces": 1, "csinodes": 1}


def test_stop_ends_the_watch_threads(fake, tmp_path):
    fake.put("nodes", node("n1"))
    inventory = inv.WatchingInventory(inv.api_client(fake.write_kubeconfig(tmp_path / "kubeconfig")))
    inventory.start()
    assert inventory.wait_for(lambda s: s.synced, WAIT) is not None
    inventory.stop()
    assert [t.is_alive() for t in inventory._threads] == [False, False, False]


# --- the file source ------------------------------------------------------------------------------------------


def test_load_file_reads_a_yaml_list_of_nodes_and_namespaces(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text(
        """
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Node
    metadata: {name: crio-1, labels: {pool: crio}}
    status: {nodeInfo: {containerRuntimeVersion: "cri-o://1.34.0", kubeletVersion: v1.35.1}}
  - apiVersion: v1
    kind: Namespace
    metadata: {name: models, labels: {model.cache/enabled: "true"}}
---
apiVersion: v1
kind: Node
metadata: {name: containerd-1}
status: {nodeInfo: {containerRuntimeVersion: "containerd://1.7.22", kubeletVersion: v1.33.0}}
"""
    )
    snap = inv.load_file(path)
    expected = snapshot_from(
        [
            {
                "metadata": {"name": "crio-1", "labels": {"pool": "crio"}},
                "status": {"nodeInfo": {"containerRuntimeVersion": "cri-o://1.34.0", "kubeletVersion": "v1.35.1"}},
            },
            {
                "metadata": {"name": "containerd-1"},
                "status": {"nodeInfo": {"containerRuntimeVersion": "containerd://1.7.22", "kubeletVersion": "v1.33.0"}},
            },
        ],
        [{"metadata": {"name": "models", "labels": {"model.cache/enabled": "true"}}}],
        synced=True,
    )
    assert snap == expected


def test_load_file_reads_a_json_node_list_whose_items_have_no_kind(tmp_path):
    path = tmp_path / "nodes.json"
    items = [{"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "NodeList", "items": items}))
    assert inv.load_file(path) == snapshot_from(items, [], synced=True)
    assert inv.load_file(path).namespaces == MappingProxyType({})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("kind: Pod\nmetadata: {name: p}\n", "document 1: expected a Node, a Namespace, a CSINode or a list of them, got kind 'Pod'", id="wrong-kind"),
        pytest.param("kind: List\nitems: {a: 1}\n", "document 1: 'items' must be a list", id="items-not-list"),
        pytest.param("kind: NodeList\nitems: [3]\n", "document 1 items[0]: expected an object, got int", id="item-not-object"),
        pytest.param("kind: Node\nmetadata: {}\n", "a Node without metadata.name", id="nameless-node"),
    ],
)
def test_load_file_refuses_what_is_not_an_inventory(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        inv.load_file(path)
    assert message in str(info.value)


# --- CSINodes: where the node agent runs ------------------------------------------------------------------------


def csinode(name: str, *drivers: str) -> dict:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSINode",
        "metadata": {"name": name},
        "spec": {"drivers": [{"name": d, "nodeID": name, "topologyKeys": None} for d in drivers]},
    }


def test_csinodes_listing_the_driver_mark_agent_nodes_and_follow_events(fake, watching):
    fake.put("nodes", node("n1"))
    fake.put("nodes", node("n2"))
    fake.put("csinodes", csinode("n1", "model.cache", "ebs.csi.aws.com"))
    fake.put("csinodes", csinode("n2", "ebs.csi.aws.com"))
    fake.hold("csinodes")
    inventory = watching()
    snap = inventory.wait_for(lambda s: len(s.nodes) == 2, WAIT)
    assert snap is not None and snap.synced is False  # not before CSINodes have listed too
    fake.release("csinodes")
    snap = inventory.wait_for(lambda s: s.synced, WAIT)
    assert snap is not None and snap.agents == frozenset({"n1"})

    fake.put("csinodes", csinode("n2", "ebs.csi.aws.com", "model.cache"))  # the agent registered on n2
    assert inventory.wait_for(lambda s: s.agents == {"n1", "n2"}, WAIT) is not None
    fake.put("csinodes", csinode("n1", "ebs.csi.aws.com"))  # and unregistered on n1
    assert inventory.wait_for(lambda s: s.agents == {"n2"}, WAIT) is not None
    fake.delete("csinodes", "n2")
    assert inventory.wait_for(lambda s: s.agents == frozenset(), WAIT) is not None
    assert inventory.lists == {"nodes": 1, "namespaces": 1, "csinodes": 1}


def test_a_file_inventory_takes_csinodes_beside_nodes(tmp_path):
    path = tmp_path / "fleet.yaml"
    items = [node("n1"), node("n2"), csinode("n1", "model.cache")]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    snap = inv.load_file(path)
    assert snap == snapshot_from(items[:2], [], synced=True, csinodes=items[2:])
    assert snap.agents == frozenset({"n1"})
    path.write_text(json.dumps({"kind": "CSINodeList", "items": [{"metadata": {"name": "n9"}, "spec": {}}]}))
    assert inv.load_file(path).agents == frozenset()
