"""Immutable views of the cluster that the admission path reads: nodes and namespace labels.

The inventory thread (inventory.py) builds a fresh ``Snapshot`` from Node and Namespace JSON objects as the API
returns them and publishes it by swapping one reference; requests read whichever snapshot was current when they
started, so they never see a half-updated inventory and never wait on the API server.

Versions are parsed here, once per node update, not once per admission: ``cri-o://1.34.2`` -> ("cri-o", (1, 34, 2)),
kubelet ``v1.35.0-eks-4f5a`` -> (1, 35, 0).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from loader import contract
from webhook.memo import AnswerMemo, DecisionMemo

_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")
_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str
    effect: str  # NoSchedule, PreferNoSchedule or NoExecute


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the webhook needs to know about one node to decide where a pod could run and what it can mount."""

    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    taints: tuple[Taint, ...] = ()
    runtime: str = ""  # "cri-o", "containerd", "docker", ... ("" when the node has not reported yet)
    runtime_version: tuple[int, ...] | None = None
    kubelet_version: tuple[int, ...] | None = None
    unschedulable: bool = False  # cordoned; recorded for reporting, it does not remove a candidate

    @property
    def fields(self) -> Mapping[str, str]:
        """The node fields that ``matchFields`` may select on (Kubernetes supports only metadata.name)."""
        return {"metadata.name": self.name}

    @property
    def runtime_text(self) -> str:
        """``cri-o 1.34``: the runtime and its major.minor, as messages show it."""
        if not self.runtime:
            return "an unknown runtime"
        if self.runtime_version is None:
            return self.runtime
        return f"{self.runtime} " + ".".join(str(p) for p in self.runtime_version[:2])


@dataclass(frozen=True, slots=True)
class Snapshot:
    nodes: tuple[NodeInfo, ...]
    namespaces: Mapping[str, Mapping[str, str]]  # namespace name -> labels
    synced: bool
    # Nodes that run the node agent: their CSINode object lists model-cache's CSI driver (kubelet registers it
    # once the agent's node-driver-registrar has).
    agents: frozenset[str] = frozenset()
    # Decisions per distinct scheduling constraint, filled lazily by nodes.choose_mode. Pods of one Deployment share
    # their constraints, so a 5000-node inventory is scanned once per snapshot and template, not once per pod.
    # Not part of the value: equality and repr ignore it.
    # Bounded in bytes (webhook/memo.py, DecisionMemo).
    memo: DecisionMemo = field(default_factory=DecisionMemo, compare=False, repr=False, hash=False)
    # Whole answers per recurring pod (webhook/memo.py), filled lazily by admission.mutate_review. Not part of the
    # value either.
    answers: AnswerMemo = field(default_factory=AnswerMemo, compare=False, repr=False, hash=False)
    # The warm-model labels (contract.warm_label) some node carries: the node agent sets one per model its node
    # holds complete. Derived from ``nodes`` once per snapshot.
    warm: frozenset[str] = field(init=False, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        prefix = contract.WARM_LABEL_PREFIX
        object.__setattr__(self, "warm", frozenset(k for n in self.nodes for k in n.labels if k.startswith(prefix)))


EMPTY = Snapshot((), MappingProxyType({}), False)


def parse_version(text: str) -> tuple[int, ...] | None:
    """Leading ``[v]MAJOR.MINOR[.PATCH]`` of a version string, or None when there is none."""
    m = _VERSION.match(text.strip())
    if not m:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str_map(value: object) -> Mapping[str, str]:
    return MappingProxyType({str(k): str(v) for k, v in _dict(value).items()})


def node_from_dict(d: Mapping[str, Any]) -> NodeInfo:
    """A NodeInfo from a Kubernetes Node object (JSON as the API returns it).

    Missing fields are tolerated (a node that has just registered has no nodeInfo yet: unknown runtime, which is
    never image-volume capable). A node without a name raises ValueError.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"a Node must be a JSON object, not {type(d).__name__}")
    meta, spec, status = _dict(d.get("metadata")), _dict(d.get("spec")), _dict(d.get("status"))
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a Node without metadata.name")
    taints = tuple(
        Taint(str(t.get("key") or ""), str(t.get("value") or ""), str(t.get("effect") or ""))
        for t in spec.get("taints") or ()
        if isinstance(t, dict)
    )
    info = _dict(status.get("nodeInfo"))
    runtime_text = str(info.get("containerRuntimeVersion") or "")
    runtime, sep, version = runtime_text.partition("://")
    if not sep:
        runtime, version = "", ""
    return NodeInfo(
        name=name,
        labels=_str_map(meta.get("labels")),
        taints=taints,
        runtime=runtime.lower(),
        runtime_version=parse_version(version) if version else None,
        kubelet_version=parse_version(str(info.get("kubeletVersion") or "")),
        unschedulable=spec.get("unschedulable") is True,
    )


def runs_agent(csinode: Mapping[str, Any]) -> tuple[str, bool] | None:
    """(node name, whether its CSINode lists model-cache's CSI driver) of a CSINode object, None without a name."""
    meta, spec = _dict(csinode.get("metadata")), _dict(csinode.get("spec"))
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    drivers = spec.get("drivers")
    listed = isinstance(drivers, list) and any(_dict(d).get("name") == contract.CSI_DRIVER for d in drivers)
    return name, listed


def snapshot_from(
    nodes: Sequence[Mapping[str, Any]],
    namespaces: Sequence[Mapping[str, Any]],
    synced: bool = True,
    csinodes: Sequence[Mapping[str, Any]] = (),
) -> Snapshot:
    """A Snapshot from Node, Namespace and CSINode objects (as in the ``items`` of their lists)."""
    ns: dict[str, Mapping[str, str]] = {}
    for obj in namespaces:
        meta = _dict(obj.get("metadata")) if isinstance(obj, Mapping) else {}
        name = meta.get("name")
        if isinstance(name, str) and name:
            ns[name] = _str_map(meta.get("labels"))
    agents = frozenset(name for name, listed in filter(None, map(runs_agent, csinodes)) if listed)
    return Snapshot(tuple(node_from_dict(n) for n in nodes), MappingProxyType(ns), synced, agents)
