"""Pure reasoning over the node inventory: where could this pod ever run, and can all of those nodes mount images.

A mutating webhook runs before the scheduler, so it cannot know the node. It can know the set of nodes the pod
is allowed on (``spec.nodeName``, ``nodeSelector``, required node affinity, taints against tolerations) and take
the image-volume path only when every one of them can mount an OCI artifact. Every rule here errs towards
*including* a node, because a wrongly included node costs an init container while a wrongly excluded one can
hand a pod a volume its node cannot mount:

- the taints Kubernetes sets for transient conditions (not-ready, unreachable, pressure, network-unavailable,
  cordoning, cloud-provider initialisation) and cordoning itself do not remove a node: a joining or recovering
  node is exactly where a scaled-out replica lands;
- operators this code does not know (a newer Kubernetes may add some) match instead of excluding.

Image-volume capable: CRI-O 1.33+ (it mounts OCI artifacts as files) with a 1.35+ kubelet (the ImageVolume gate
is on by default), unless the node label ``model.cache/image-volume=true|false`` says otherwise. containerd
cannot mount non-image artifacts, whatever its version.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import orjson

from loader import contract
from webhook import annotations as ann
from webhook.config import Settings
from webhook.errors import Denied
from webhook.snapshot import NodeInfo, Snapshot, Taint

TRANSIENT_TAINTS = frozenset(
    {
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/memory-pressure",
        "node.kubernetes.io/disk-pressure",
        "node.kubernetes.io/pid-pressure",
        "node.kubernetes.io/network-unavailable",
        "node.kubernetes.io/unschedulable",
        "node.cloudprovider.kubernetes.io/uninitialized",  # a joining node until the cloud controller is done
    }
)
BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
CRIO = "cri-o"
CONTAINERD = "containerd"
NAMES_IN_MESSAGES = 3  # then "and N more"
_MEMO_LIMIT = 4096


class Choice(NamedTuple):
    mode: str  # ann.IMAGE_VOLUME, ann.CSI or ann.INIT_CONTAINER
    reason: str  # one line, recorded in the STATUS annotation
    warnings: tuple[str, ...]


# --- capability --------------------------------------------------------------------------------------------------


class _Why(NamedTuple):
    """Why a node can or cannot mount image volumes, phrased so counts can be put in front of it."""

    singular: str  # "runs containerd 2.0"
    plural: str  # "run containerd 2.0"
    short: str  # "containerd 2.0", for per-node lists


def _version_text(v: tuple[int, ...] | None) -> str:
    return ".".join(str(p) for p in v[:2]) if v else "(version unknown)"


def _assess(node: NodeInfo, settings: Settings) -> tuple[bool, _Why]:
    label = node.labels.get(ann.IMAGE_VOLUME_LABEL, "").strip().lower()
    if label in ("true", "false"):
        text = f"labelled {ann.IMAGE_VOLUME_LABEL}={label}"
        return label == "true", _Why(f"is {text}", f"are {text}", text)
    runtime = node.runtime_text
    if node.runtime != CRIO:
        return False, _Why(f"runs {runtime}", f"run {runtime}", runtime)
    if node.runtime_version is None or node.runtime_version[:2] < settings.min_crio:
        text = f"cri-o {_version_text(node.runtime_version)}"
        return False, _Why(f"runs {text}", f"run {text}", f"{text}, needs {settings.image_volume_min_crio}+")
    if node.kubelet_version is None or node.kubelet_version[:2] < settings.min_kubelet:
        text = f"kubelet {_version_text(node.kubelet_version)}"
        return False, _Why(f"runs {text}", f"run {text}", f"{text}, needs {settings.image_volume_min_kubelet}+")
    return True, _Why(f"runs {runtime}", f"run {runtime}", runtime)


def is_image_volume_capable(node: NodeInfo, settings: Settings) -> bool:
    """True when the node's runtime and kubelet can mount an OCI artifact as a volume (or the admin says so)."""
    return _assess(node, settings)[0]


# --- candidates --------------------------------------------------------------------------------------------------


class _Req(NamedTuple):
    """One matchExpressions/matchFields entry, compiled once per pod rather than once per node."""

    on_name: bool  # a matchFields entry on metadata.name (the only field Kubernetes supports)
    key: str
    op: str
    values: frozenset[str]
    number: int | None  # the single integer operand of Gt/Lt, None when it is not one


def _compile(req: Mapping[str, Any], fields: bool) -> _Req:
    key, op = req.get("key") or "", req.get("operator") or ""
    vals: Sequence[Any] = req.get("values") or ()
    number = None
    if op in ("Gt", "Lt") and len(vals) == 1:
        try:
            number = int(vals[0])
        except ValueError:
            number = None
    return _Req(fields, key, op, frozenset(vals), number)


def _compile_terms(pod_spec: Mapping[str, Any]) -> list[tuple[_Req, ...]] | None:
    affinity = pod_spec.get("affinity") or {}
    node_affinity = affinity.get("nodeAffinity") or {}
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return None
    compiled = []
    for term in required.get("nodeSelectorTerms") or ():
        reqs = tuple(_compile(e, False) for e in term.get("matchExpressions") or ()) + tuple(
            _compile(f, True) for f in term.get("matchFields") or ()
        )
        if reqs:  # Kubernetes: an empty term matches no node, so it can be dropped from the OR
            compiled.append(reqs)
    return compiled


def _requirement(req: _Req, node: NodeInfo) -> bool:
    if req.on_name:
        value: str | None = node.name if req.key == "metadata.name" else None
    else:
        value = node.labels.get(req.key)
    op = req.op
    if op == "In":
        return value is not None and value in req.values
    if op == "NotIn":
        return value is None or value not in req.values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt"):
        # As the scheduler does: exactly one integer operand and an integer label, else no match.
        if value is None or req.number is None:
            return False
        try:
            have = int(value)
        except ValueError:
            return False
        return have > req.number if op == "Gt" else have < req.number
    return True  # an operator newer than this code: include the node


def _matches(terms: list[tuple[_Req, ...]], node: NodeInfo) -> bool:
    for term in terms:
        for req in term:
            if not _requirement(req, node):
                break
        else:
            return True
    return False


def _tolerates(tol: Mapping[str, Any], taint: Taint) -> bool:
    # Kubernetes' Toleration.ToleratesTaint, except that an unknown operator tolerates (see the module docstring).
    effect = tol.get("effect") or ""
    if effect and effect != taint.effect:
        return False
    key = tol.get("key") or ""
    if key and key != taint.key:
        return False
    op = tol.get("operator") or "Equal"
    if op == "Equal":
        return (tol.get("value") or "") == taint.value
    return True  # Exists, or an operator newer than this code


def candidate_nodes(pod_spec: Mapping[str, Any], snapshot: Snapshot) -> tuple[NodeInfo, ...]:
    """The nodes in the snapshot this pod could ever run on (see the module docstring for what is ignored)."""
    node_name = pod_spec.get("nodeName") or ""
    selector = tuple((pod_spec.get("nodeSelector") or {}).items())
    terms = _compile_terms(pod_spec)
    tolerations = pod_spec.get("tolerations") or ()
    tolerated: dict[Taint, bool] = {}  # nodes share taints; decide each distinct taint once
    out = []
    for node in snapshot.nodes:
        if node_name and node.name != node_name:
            continue
        if selector:
            labels = node.labels
            if any(labels.get(k) != v for k, v in selector):
                continue
        if terms is not None and not _matches(terms, node):
            continue
        # A pod bound with nodeName bypasses the scheduler, so taints do not keep it off that node.
        if node.taints and not node_name:
            ok = True
            for taint in node.taints:
                if taint.effect not in BLOCKING_EFFECTS or taint.key in TRANSIENT_TAINTS:
                    continue
                verdict = tolerated.get(taint)
                if verdict is None:
                    verdict = tolerated[taint] = any(_tolerates(tol, taint) for tol in tolerations)
                if not verdict:
                    ok = False
                    break
            if not ok:
                continue
        out.append(node)
    return tuple(out)


_AGENT = _Why("runs the model-cache node agent", "run the model-cache node agent", "node agent")
_NO_AGENT = _Why("does not run the model-cache node agent", "do not run the model-cache node agent", "no agent")


# --- the decision ------------------------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _grouped(nodes: Sequence[tuple[NodeInfo, _Why]], total: int, all_capable: bool) -> str:
    """"all 4 candidate nodes run cri-o 1.34" / "2 of 5 candidate nodes run containerd 2.0" / mixed reasons."""
    groups = Counter(why for _, why in nodes)
    k = len(nodes)
    if k == total == 1:
        head, verb_plural = "the one candidate node", False
    elif k == total:
        head, verb_plural = f"all {total} candidate nodes", True
    else:
        head, verb_plural = f"{k} of {total} candidate nodes", k != 1
    if len(groups) == 1:
        (why,) = groups
        return f"{head} {why.plural if verb_plural else why.singular}"
    parts = ", ".join(f"{n} {why.plural if n != 1 else why.singular}" for why, n in groups.most_common())
    what = "can" if all_capable else "cannot"
    return f"{head} {what} mount image volumes: {parts}"


def _names(nodes: Sequence[tuple[NodeInfo, _Why]], detail: bool = True) -> str:
    shown = ", ".join(f"{node.name} ({why.short})" if detail else node.name for node, why in nodes[:NAMES_IN_MESSAGES])
    rest = len(nodes) - NAMES_IN_MESSAGES
    return f"{shown} and {rest} more" if rest > 0 else shown


def _scheduling_key(pod_spec: Mapping[str, Any]) -> bytes | str:
    """What candidate_nodes reads of a pod, as one value equal for equal constraints (dict key order aside).

    orjson with sorted keys (a tenth of json's time); json, whose text orjson never writes, for what orjson cannot
    write exactly: integers beyond 64 bits (TypeError) and float NaN or infinities (orjson writes them as ``null``,
    so any ``null`` goes the slow way; absent fields are normalised to what candidate_nodes reads them as, so real
    pods have none).
    """
    affinity = pod_spec.get("affinity") or {}
    required = (affinity.get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    # None and {} differ for the required affinity (no term vs no matching term), not for the others.
    parts = [pod_spec.get("nodeName") or "", pod_spec.get("nodeSelector") or {}, [required] if required is not None else [],
             pod_spec.get("tolerations") or []]
    try:
        key = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        key = b"null"
    if b"null" not in key:
        return key
    return json.dumps(parts, sort_keys=True, separators=(",", ":"))


def choose_mode(mode: str, pod_spec: Mapping[str, Any], snapshot: Snapshot, settings: Settings, explicit: bool = True,
                signed: bool = False) -> Choice:
    """Pick the path for a pod: returns Choice(mode, reason, warnings), or raises Denied.

    ``mode`` is what was asked for (auto, image-volume or init-container); ``explicit`` says whether the pod's
    annotation asked (True) or the cluster default did, which only changes the wording. ``auto`` takes the image
    volume only when every candidate node is capable. An explicit ``image-volume`` is denied when some candidate
    is not; when the inventory cannot tell (not synced, empty, no node matches: a pool scaled to zero) the
    request is honoured with a warning, because denying would block scale-from-zero pools. ``signed``: some model
    must be signed (the cluster's signature policy), so ``auto`` never takes the image volume (the runtime checks
    no signature); the caller denies an explicit ``image-volume`` for such a pod, naming the model.
    """
    # The settings' version strings, not their parsed values: the messages quote them as written.
    key = (mode, explicit, signed, settings.agent_enforces_signatures, settings.image_volume_min_crio,
           settings.image_volume_min_kubelet, _scheduling_key(pod_spec))
    memo = snapshot.memo
    hit = memo.get(key)
    if hit is None:
        try:
            hit = _choose(mode, pod_spec, snapshot, settings, explicit, signed)
        except Denied as exc:
            hit = exc
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()
        memo[key] = hit
    if isinstance(hit, Denied):
        raise Denied(hit.message)
    return hit


def _choose(mode: str, pod_spec: Mapping[str, Any], snapshot: Snapshot, settings: Settings, explicit: bool,
            signed: bool) -> Choice:
    asked = f"requested by {ann.MODE}" if explicit else f"the cluster default mode is {mode}"
    if mode == ann.INIT_CONTAINER:
        return Choice(ann.INIT_CONTAINER, asked, ())

    if not snapshot.synced:
        unknown = "the node inventory has not synced yet"
    elif not snapshot.nodes:
        unknown = "the node inventory is empty"
    else:
        candidates = candidate_nodes(pod_spec, snapshot)
        unknown = "" if candidates else "no node in the inventory matches the pod's nodeName, nodeSelector, affinity and tolerations"
    if unknown:
        if mode == ann.IMAGE_VOLUME:
            return Choice(
                ann.IMAGE_VOLUME,
                f"{asked}; not checked: {unknown}",
                (f"model.cache: {unknown}, so whether the pod's node can mount image volumes was not checked",),
            )
        if mode == ann.CSI:
            return Choice(
                ann.CSI,
                f"{asked}; not checked: {unknown}",
                (f"model.cache: {unknown}, so whether the pod's node runs the node agent was not checked",),
            )
        return Choice(
            ann.INIT_CONTAINER,
            unknown,
            (f"model.cache: {unknown}; using the init container, which works on every node",),
        )

    # Nodes of one pool share a signature: assess each distinct signature once.
    seen: dict[tuple[Any, ...], tuple[bool, _Why]] = {}
    assessed = []
    for node in candidates:
        sig = (node.labels.get(ann.IMAGE_VOLUME_LABEL), node.runtime, node.runtime_version, node.kubelet_version)
        verdict = seen.get(sig)
        if verdict is None:
            verdict = seen[sig] = _assess(node, settings)
        assessed.append((node, *verdict))
    capable = [(node, why) for node, ok, why in assessed if ok]
    incapable = [(node, why) for node, ok, why in assessed if not ok]
    total = len(candidates)
    without_agent = [(node, _NO_AGENT) for node in candidates if node.name not in snapshot.agents]

    unenforced = signed and not settings.agent_enforces_signatures
    if mode == ann.CSI:
        if unenforced:
            where = f"{ann.MODE} is 'csi'" if explicit else "the cluster default mode is csi"
            raise Denied(
                f"{where}, but a model of this pod must be signed (the cluster's signature policy) and the node agents"
                " are not declared to enforce that policy (MODEL_CACHE_AGENT_ENFORCES_SIGNATURES); set"
                f" {ann.MODE} to auto or init-container (the loader verifies the signature), or give every agent the"
                " signature-policy component and set that setting"
            )
        if without_agent:
            where = f"{ann.MODE} is 'csi'" if explicit else "the cluster default mode is csi"
            raise Denied(
                f"{where} but {_plural(len(without_agent), 'candidate node')} of {total} do not run the model-cache"
                f" node agent: {_names(without_agent, detail=False)}; set {ann.MODE} to auto or init-container, or"
                " restrict the pod (nodeSelector, node affinity) to nodes running the agent (their CSINode lists"
                f" the {contract.CSI_DRIVER} driver)"
            )
        return Choice(ann.CSI, f"{asked}; {_grouped([(n, _AGENT) for n in candidates], total, True)}", ())

    if not incapable and not signed:
        reason = _grouped(capable, total, all_capable=True)
        return Choice(ann.IMAGE_VOLUME, f"{asked}; {reason}" if mode == ann.IMAGE_VOLUME else reason, ())

    if incapable:
        reason = _grouped(incapable, total, all_capable=False)
    else:
        reason = "the cluster's signature policy requires a signature, which an image volume does not check"
    if mode == ann.IMAGE_VOLUME:
        where = f"{ann.MODE} is 'image-volume'" if explicit else "the cluster default mode is image-volume"
        raise Denied(
            f"{where} but {_plural(len(incapable), 'candidate node')} of {total} cannot mount image volumes: "
            f"{_names(incapable)}; set {ann.MODE} to auto or init-container, or restrict the pod (nodeSelector,"
            f" node affinity) to nodes running cri-o {settings.image_volume_min_crio}+ with kubelet"
            f" {settings.image_volume_min_kubelet}+"
        )
    if not without_agent and not unenforced:
        # Every candidate runs the node agent: its CSI volume, which needs no hostPath, init container or secret
        # volume (so restricted namespaces keep the shared node cache).
        agents = _grouped([(n, _AGENT) for n in candidates], total, True)
        return Choice(ann.CSI, f"{reason}; {agents}", ())
    warnings: tuple[str, ...] = ()
    if capable and incapable and not signed:
        # A mixed set is actionable: the app team can narrow the pod to the capable pool.
        warnings = (
            f"model.cache: using an init container: {reason} ({_names(incapable, detail=False)});"
            " pin the pod to capable nodes to get an image volume",
        )
    return Choice(ann.INIT_CONTAINER, reason, warnings)
