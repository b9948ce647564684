"""The one pure seam: an AdmissionReview (a dict parsed from JSON) in, the AdmissionReview response dict out.

``mutate_review`` answers the mutating webhook for Pods (a JSON patch); ``validate_review`` answers the validating
webhook for Pods and workloads (Deployment, StatefulSet, DaemonSet, Job, CronJob, ReplicaSet, ...) by running the
same decision on the pod template and throwing the result away, so a bad annotation fails at ``kubectl apply``
instead of in ReplicaSet events. Both read only their arguments: the inventory snapshot and the settings.

Errors: a body that is not a well-formed AdmissionReview v1 raises ``MalformedReview`` (the app answers 400); a
policy denial is a normal response with ``allowed: false``, status code 403 and a message that names the
annotation, the value and the fix. Nothing else escapes for any client input (property-tested). A mutated pod's
response also carries ``auditAnnotations: {"mode": ...}`` (the audit log shows ``pods.model.cache/mode``; the
metrics read it too).

Speed (bench/admission.py): the review reads only the envelope, the shape of the fields the decision uses and
those fields; the new pod shares every untouched subtree with the submitted one, so the patch walks only what
changed. Nothing walks the whole body per request.

``mutate_object`` and ``decide`` serve the ``model-cache-webhook mutate -f FILE`` preview: the same mutation on a
Pod, a workload's pod template, or each item of a List.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from webhook import annotations as ann
from webhook.config import Settings
from webhook.errors import Denied, MalformedReview
from webhook.models import (
    ADMISSION_API_VERSION,
    ADMISSION_KIND,
    POD_SHAPE,
    AdmissionResponse,
    AdmissionReview,
    AdmissionReviewResponse,
    shape_error,
)
from webhook.mutate import check_ephemeral_containers, mutate_pod
from webhook.patch import make_patch
from webhook.snapshot import Snapshot

DENIED_CODE = 403
WARNING_LIMIT = 256
MAX_DEPTH = 64  # real pods nest ~15 levels; deeper documents would only exercise recursion limits
#: Metadata the decision never reads and that differs between replicas of one template (the API server's field
#: manager stamps managedFields with the time of each create); left out of the memo key.
VOLATILE_METADATA = frozenset({"managedFields", "uid", "creationTimestamp", "resourceVersion", "generation", "selfLink"})
#: The Pod subresource ``kubectl debug`` updates to add a debug container.
EPHEMERAL_CONTAINERS = "ephemeralcontainers"
#: The response's audit annotation with the path a mutated pod got (the audit log shows ``pods.model.cache/mode``).
AUDIT_MODE = "mode"

#: Where each kind keeps its pod template (None: the object is the pod).
TEMPLATE_PATHS: dict[str, tuple[str, ...] | None] = {
    "Pod": None,
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "PodTemplate": ("template",),
}


@dataclass(frozen=True, slots=True)
class Decision:
    """One line for the CLI and the demo: what happened to one pod (template) and why."""

    object: str  # "Deployment/web", "Pod/web-7d9f-*"
    mode: str  # image-volume, init-container, unchanged or denied
    reason: str

    def __str__(self) -> str:
        return f"{self.object}: {self.mode} ({self.reason})"


# --- envelope ----------------------------------------------------------------------------------------------------


def _check_depth(value: Any, where: str) -> None:
    # For the preview's YAML documents, which yaml.safe_dump writes back recursively. Iterative, so a hostile
    # document cannot make this check itself hit the recursion limit. Reviews skip it: see _bounded.
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise MalformedReview(f"{where} is nested more than {MAX_DEPTH} levels deep")
        nxt = []
        for item in level:
            for v in item.values() if isinstance(item, dict) else item:
                if isinstance(v, (dict, list)):
                    nxt.append(v)
        level = nxt


def parse_review(body: Any) -> AdmissionReview:
    """The review envelope, or MalformedReview naming the first bad fields."""
    if not isinstance(body, dict):
        raise MalformedReview(f"the body must be a JSON object (an AdmissionReview), not {type(body).__name__}")
    try:
        return AdmissionReview.model_validate(body)
    except ValidationError as exc:
        raise MalformedReview(f"not an admission.k8s.io/v1 AdmissionReview: {shape_error(exc, '')}") from exc


def _check_shape(obj: Mapping[str, Any], where: str) -> None:
    try:
        POD_SHAPE.validate_python(obj)
    except ValidationError as exc:
        raise MalformedReview(shape_error(exc, where)) from exc


def _respond(
    uid: str, allowed: bool = True, ops: list[dict[str, Any]] | None = None, warnings: tuple[str, ...] | list[str] = (),
    message: str | None = None, mode: str | None = None,
) -> AdmissionReviewResponse:
    response: AdmissionResponse = {"uid": uid, "allowed": allowed}
    if ops:
        response["patch"] = base64.b64encode(_json(ops)).decode()
        response["patchType"] = "JSONPatch"
    if warnings:
        response["warnings"] = [_short(w) for w in warnings]
    if message is not None:
        response["status"] = {"code": DENIED_CODE, "reason": "Forbidden", "message": message}
    if mode is not None:
        response["auditAnnotations"] = {AUDIT_MODE: mode}
    return {"apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND, "response": response}


def _json(value: Any) -> bytes:
    # orjson: a third of json's time for a patch. It refuses what only a Python caller can hand over (integers
    # beyond 64 bits, lone surrogates; the app's parser lets neither in), and json writes those.
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


def _short(warning: str) -> str:
    # The API server may truncate warnings over 256 characters; cut them ourselves so the cut is visible.
    return warning if len(warning) <= WARNING_LIMIT else warning[: WARNING_LIMIT - 3] + "..."


def _namespace(request_namespace: str | None, obj: Mapping[str, Any]) -> str:
    # Controllers create pods with the namespace only in the request; objects in a file carry it in metadata.
    return request_namespace or (obj.get("metadata") or {}).get("namespace") or ""


def _labels(snapshot: Snapshot, namespace: str) -> Mapping[str, str] | None:
    return snapshot.namespaces.get(namespace) if namespace else None


def _bounded(
    review_fn: Callable[[Any, Snapshot, Settings], AdmissionReviewResponse],
) -> Callable[[Any, Snapshot, Settings], AdmissionReviewResponse]:
    """A review function for which nesting too deep for the interpreter is a malformed review, not a crash.

    Reviews are not walked whole up front (that walk cost as much as parsing the JSON): the decision reads a
    few fields of fixed depth, the patch touches only what the injectors built, and JSON parsing has its own
    limit (the app answers 400 beyond it). What is left is a comparison of user subtrees (an UPDATE's
    old and new pod templates), which on a body just under the parser's limit could run out of stack; that too
    is the client's malformed input.
    """

    @functools.wraps(review_fn)
    def review(body: Any, snapshot: Snapshot, settings: Settings) -> AdmissionReviewResponse:
        try:
            return review_fn(body, snapshot, settings)
        except RecursionError as exc:
            raise MalformedReview("the AdmissionReview is nested too deeply") from exc

    return review


# --- the two reviews ---------------------------------------------------------------------------------------------


@_bounded
def mutate_review(body: Any, snapshot: Snapshot, settings: Settings) -> AdmissionReviewResponse:
    """Answer a mutating AdmissionReview for a Pod: the patch that mounts its models, or a denial."""
    review = parse_review(body)
    req = review.request
    if req.operation != "CREATE" or req.kind.kind != "Pod" or req.sub_resource:
        return _respond(req.uid)  # pods are mutated once, when created; anything else passes untouched
    pod = req.object
    if pod is None:
        raise MalformedReview("request.object is missing from a CREATE review")
    key = _answer_key(pod, req.namespace)
    if key is not None:
        hit = snapshot.answers.get(key, settings)
        if hit is not None:
            return {**hit, "response": {**hit["response"], "uid": req.uid}}
    answer = _mutate_answer(req.uid, pod, req.namespace, snapshot, settings)
    if key is not None:
        snapshot.answers.put(key, settings, answer)
        # A remembered answer is shared by every hit: the caller gets its own top levels (the rest is read-only).
        return {**answer, "response": {**answer["response"]}}
    return answer


def _mutate_answer(
    uid: str, pod: dict[str, Any], request_namespace: str | None, snapshot: Snapshot, settings: Settings
) -> AdmissionReviewResponse:
    _check_shape(pod, "request.object")
    namespace = _namespace(request_namespace, pod)
    try:
        outcome = mutate_pod(pod, namespace, _labels(snapshot, namespace), snapshot, settings)
    except Denied as exc:
        return _respond(uid, allowed=False, message=exc.message)
    if outcome.mode is None:
        return _respond(uid, warnings=outcome.warnings)
    return _respond(uid, ops=make_patch(pod, outcome.pod), warnings=outcome.warnings, mode=outcome.mode)


def _answer_key(pod: Mapping[str, Any], request_namespace: str | None) -> bytes | None:
    """What a pod's answer depends on besides the snapshot and the settings, as bytes; None: do not remember.

    The answer reads the request's namespace, the pod's metadata (its shape is checked; the decision reads the annotations)
    and its spec; the patch touches only those; every other field is shared with the new pod and never read. So
    pods equal in all of that but VOLATILE_METADATA get the same answer, apart from the review uid.

    The bytes are the JSON of those values (orjson: ~10 us for a 20 KB pod), so equal bytes mean equal values (for
    what JSON can carry: orjson writes a float NaN as null, which only a Python caller can pass; the app's parser
    refuses NaN).
    """
    meta, spec = pod.get("metadata"), pod.get("spec")
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        return None  # not a pod the API server would send; decide it afresh
    meta = {k: v for k, v in meta.items() if k not in VOLATILE_METADATA}
    try:
        # The top-level keys too: the patch lists its operations in their order.
        return orjson.dumps((request_namespace, list(pod), meta, spec))
    except TypeError:  # an integer beyond 64 bits, nesting beyond orjson's limit: decide it afresh
        return None


def _template_of(obj: Mapping[str, Any], kind: str, where: str) -> Mapping[str, Any] | None:
    path = TEMPLATE_PATHS[kind]
    node: Any = obj
    for i, key in enumerate(path or ()):
        node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            return None
        if not isinstance(node, Mapping):
            raise MalformedReview(f"{where}.{'.'.join(path[: i + 1])} must be an object")  # type: ignore[index]
    template: Mapping[str, Any] = node
    return template


def _object(value: object) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def _relevant(template: Mapping[str, Any]) -> tuple[Any, Any]:
    """What the decision reads from a pod template: its model.cache annotations and its spec."""
    annotations = _object(_object(template.get("metadata")).get("annotations"))
    return {k: v for k, v in annotations.items() if k.startswith(ann.PREFIX)}, template.get("spec")


@_bounded
def validate_review(body: Any, snapshot: Snapshot, settings: Settings) -> AdmissionReviewResponse:
    """Answer a validating AdmissionReview for a Pod or workload: allowed (with warnings) or denied; never a patch.

    An UPDATE that leaves the template's model.cache annotations and spec unchanged is not denied for a problem it already had (say, the inventory
    changed under an explicit image-volume request): the message comes back as a warning, so scaling, rollout
    bookkeeping and finalizer removal keep working. Objects being deleted are always allowed.
    """
    review = parse_review(body)
    req = review.request
    kind = req.kind.kind
    if kind == "Pod" and req.sub_resource == EPHEMERAL_CONTAINERS and req.operation == "UPDATE":
        return _validate_ephemeral(req.uid, req.object, req.old_object, settings)
    if req.operation not in ("CREATE", "UPDATE") or kind not in TEMPLATE_PATHS or req.sub_resource:
        return _respond(req.uid)
    obj = req.object
    if obj is None:
        raise MalformedReview(f"request.object is missing from a {req.operation} review")
    meta = obj.get("metadata")
    if isinstance(meta, Mapping) and meta.get("deletionTimestamp"):
        return _respond(req.uid)
    template = _template_of(obj, kind, "request.object")
    if template is None:
        return _respond(req.uid)
    _check_shape(template, "request.object" + "".join(f".{k}" for k in TEMPLATE_PATHS[kind] or ()))
    namespace = _namespace(req.namespace, obj)
    warnings: list[str] = []
    pod = {"metadata": template.get("metadata") or {}, "spec": template.get("spec") or {}}
    if kind != "Pod" and ann.STATUS in (pod["metadata"].get("annotations") or {}):
        warnings.append(
            f"model.cache: the pod template carries {ann.STATUS}, so its pods will not get their models;"
            " remove that annotation from the template"
        )
    try:
        outcome = mutate_pod(pod, namespace, _labels(snapshot, namespace), snapshot, settings)
    except Denied as exc:
        if req.operation == "UPDATE" and req.old_object is not None and kind in TEMPLATE_PATHS:
            old_template = _template_of(req.old_object, kind, "request.oldObject")
            if old_template is not None and _relevant(old_template) == _relevant(template):
                return _respond(req.uid, warnings=[*warnings, f"model.cache: {exc.message}"])
        return _respond(req.uid, allowed=False, message=exc.message)
    return _respond(req.uid, warnings=[*warnings, *outcome.warnings])


def _validate_ephemeral(
    uid: str, pod: dict[str, Any] | None, old_pod: dict[str, Any] | None, settings: Settings
) -> AdmissionReviewResponse:
    """An UPDATE of pods/ephemeralcontainers (``kubectl debug``): denied when a new ephemeral container mounts the
    node cache or a volume of the injected loader (check_ephemeral_containers)."""
    if pod is None:
        raise MalformedReview("request.object is missing from an UPDATE review")
    _check_shape(pod, "request.object")
    spec = _object(pod.get("spec"))
    old_spec = _object(_object(old_pod).get("spec"))
    try:
        check_ephemeral_containers(spec, old_spec, settings)
    except Denied as exc:
        return _respond(uid, allowed=False, message=exc.message)
    return _respond(uid)


# --- previews ----------------------------------------------------------------------------------------------------


def _ident(obj: Mapping[str, Any], kind: str) -> str:
    meta = _object(obj.get("metadata"))
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "(unnamed)")
    return f"{kind}/{name}"


def mutate_object(
    obj: dict[str, Any], namespace_labels: Mapping[str, str] | None, snapshot: Snapshot, settings: Settings
) -> tuple[dict[str, Any], list[str], list[Decision]]:
    """Mutate a Pod, a workload's pod template, or every item of a List, as the webhook would.

    Returns (new object, warnings, one Decision per pod or template). The argument is not changed. Raises Denied
    when the webhook would deny, and MalformedReview when the object is not shaped like a Kubernetes object.
    """
    if not isinstance(obj, dict):
        raise MalformedReview(f"expected a Kubernetes object, got {type(obj).__name__}")
    _check_depth(obj, "the object")
    kind = obj.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List") and isinstance(obj.get("items"), list)):
        new = dict(obj)
        items, warnings, decisions = [], [], []
        for item in obj.get("items") or ():
            m, w, d = mutate_object(item, namespace_labels, snapshot, settings)
            items.append(m)
            warnings += w
            decisions += d
        new["items"] = items
        return new, warnings, decisions
    if not isinstance(kind, str) or kind not in TEMPLATE_PATHS:
        return obj, [], [Decision(_ident(obj, str(kind)), "unchanged", "not a Pod or a workload with a pod template")]
    template = _template_of(obj, kind, kind)
    if template is None:
        return obj, [], [Decision(_ident(obj, kind), "unchanged", "no pod template")]
    _check_shape(template, kind)
    namespace = _namespace(None, obj)
    pod = dict(template) if kind == "Pod" else {"metadata": template.get("metadata") or {}, "spec": template.get("spec") or {}}
    outcome = mutate_pod(pod, namespace, namespace_labels, snapshot, settings)
    decision = Decision(_ident(obj, kind), outcome.mode or "unchanged", outcome.reason)
    if outcome.mode is None:
        return obj, list(outcome.warnings), [decision]
    if kind == "Pod":
        return outcome.pod, list(outcome.warnings), [decision]
    new = _replace_template(obj, TEMPLATE_PATHS[kind] or (), {**template, "metadata": outcome.pod["metadata"], "spec": outcome.pod["spec"]})
    return new, list(outcome.warnings), [decision]


def _replace_template(obj: Mapping[str, Any], path: tuple[str, ...], template: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the value at ``path`` replaced, copying only the dicts along the path."""
    if not path:
        return template
    head, *rest = path
    return {**obj, head: _replace_template(obj[head], tuple(rest), template)}


def decide(
    obj: dict[str, Any], namespace_labels: Mapping[str, str] | None, snapshot: Snapshot, settings: Settings
) -> list[Decision]:
    """One Decision per pod or pod template in ``obj``; a denial is a Decision with mode "denied" and its message."""
    try:
        return mutate_object(obj, namespace_labels, snapshot, settings)[2]
    except Denied as exc:
        return [Decision(_ident(obj, str(obj.get("kind"))), "denied", exc.message)]
