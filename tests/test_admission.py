"""The admission seam: whole AdmissionReview responses, workload validation, previews, settings, and properties.

The properties are the webhook's safety promise under ``failurePolicy: Fail``: for any body a client can send,
``mutate_review`` and ``validate_review`` either answer or raise MalformedReview (HTTP 400), never anything else,
and every patch they answer with applies to the submitted pod and yields exactly the mutated pod.
"""

from __future__ import annotations

import base64
import copy
import json
import sys
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.k8s_validate import assert_valid
from webhook import annotations as ann
from webhook.admission import Decision, decide, mutate_object, mutate_review, validate_review
from webhook.config import Settings, load_settings
from webhook.errors import ConfigError, Denied, MalformedReview
from webhook.snapshot import snapshot_from

SETTINGS = Settings()
CRIO = {"containerRuntimeVersion": "cri-o://1.34.2", "kubeletVersion": "v1.35.0"}
CTRD = {"containerRuntimeVersion": "containerd://2.0.1", "kubeletVersion": "v1.35.0"}


def fresh_snapshot():
    """The test inventory as a new Snapshot (so with no remembered decisions or answers)."""
    return snapshot_from(
        [
            {"metadata": {"name": "crio-a", "labels": {"pool": "crio"}}, "status": {"nodeInfo": CRIO}},
            {"metadata": {"name": "ctrd-a", "labels": {"pool": "ctrd"}}, "status": {"nodeInfo": CTRD}},
        ],
        [
            {"metadata": {"name": "ml", "labels": {ann.ENABLED_LABEL: "true", ann.PSA_ENFORCE_LABEL: "restricted"}}},
            {"metadata": {"name": "open", "labels": {ann.ENABLED_LABEL: "true"}}},
        ],
    )


# Shared by the tests, as the webhook shares one snapshot between reviews: its remembered answers are exercised.
SNAPSHOT = fresh_snapshot()
REF = "registry.example.com/models/phi3:v1"
SUBPATH_EXPR = "pods/$(MODEL_CACHE_POD_UID)/registry.example.com_models_phi3_v1-81650e9a5e875dcd"
POD_UID_ENV = {"name": "MODEL_CACHE_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A pod as a ReplicaSet controller submits it: generateName, no name, no namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "chat-6c5-", "annotations": {ann.REF: REF, **(annotations or {})}},
        "spec": {"containers": [{"name": "server", "image": "registry.example.com/vllm:1"}], **spec},
    }


def review(obj: Any, kind: str = "Pod", operation: str = "CREATE", namespace: str = "ml", **request: Any) -> dict[str, Any]:
    group, version = {"Pod": ("", "v1"), "Job": ("batch", "v1"), "CronJob": ("batch", "v1")}.get(kind, ("apps", "v1"))
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": kind.lower() + "s"},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "operation": operation,
            "namespace": namespace,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "dryRun": False,
            **request,
        },
    }


def decode(response: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(base64.b64decode(response["response"]["patch"]))


ALLOWED = {
    "apiVersion": "admission.k8s.io/v1",
    "kind": "AdmissionReview",
    "response": {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True},
}


def denied(message: str) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "allowed": False,
            "status": {"code": 403, "message": message, "reason": "Forbidden"},
        },
    }


# --- mutate_review -------------------------------------------------------------------------------------------------


def test_generate_name_pod_in_restricted_namespace_gets_the_whole_patch():
    p = pod(nodeSelector={"pool": "ctrd"})
    response = mutate_review(review(p), SNAPSHOT, SETTINGS)
    warning = (
        "model.cache: namespace 'ml' enforces Pod Security 'restricted' (no hostPath): using a per-pod emptyDir cache;"
        " set model.cache/cache: pvc:<claim> to share one"
    )
    assert {k: v for k, v in response["response"].items() if k != "patch"} == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
        "patchType": "JSONPatch",
        "warnings": [warning],
        "auditAnnotations": {"mode": "init-container"},
    }
    loader = {
        "name": "model-loader",
        "image": "ghcr.io/model-cache/loader:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "command": ["model-loader"],
        "args": ["pull", REF, "--cache", "/cache", "--pod-uid", "$(MODEL_CACHE_POD_UID)", "--node-name",
                 "$(MODEL_CACHE_NODE_NAME)", "--output", "text", "--concurrency", "8"],
        "env": [POD_UID_ENV, {"name": "MODEL_CACHE_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "2", "memory": "512Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "model-cache", "mountPath": "/cache"}],
    }
    assert decode(response) == [
        {"op": "add", "path": "/metadata/annotations/model.cache~1injected",
         "value": "init-container: the one candidate node runs containerd 2.0; cache pod"},
        {"op": "add", "path": "/spec/containers/0/env",
         "value": [POD_UID_ENV, {"name": "MODEL_PATH", "value": "/models/phi3"}, {"name": "MODEL_PATH_PHI3", "value": "/models/phi3"}]},
        {"op": "add", "path": "/spec/containers/0/volumeMounts",
         "value": [{"name": "model-cache", "mountPath": "/models/phi3", "subPathExpr": SUBPATH_EXPR, "readOnly": True}]},
        {"op": "add", "path": "/spec/initContainers", "value": [loader]},
        {"op": "add", "path": "/spec/volumes", "value": [{"name": "model-cache", "emptyDir": {}}]},
    ]
    patched = jsonpatch.apply_patch(p, decode(response))
    assert patched == mutate_object(p, SNAPSHOT.namespaces["ml"], SNAPSHOT, SETTINGS)[0]
    assert_valid(patched)


# --- answers remembered per snapshot ----------------------------------------------------------------------------


def _replica(n: int, **metadata: Any) -> dict[str, Any]:
    """Replica ``n`` of one ReplicaSet, as the API server sends it to mutating admission: the field manager has
    stamped managedFields with the time of this create."""
    p = pod(nodeSelector={"pool": "ctrd"})
    p["metadata"]["managedFields"] = [{
        "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
        "time": f"2026-11-23T10:00:{n:02d}Z", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:generateName": {}}, "f:spec": {"f:containers": {'k:{"name":"server"}': {".": {}}}}},
    }]
    p["metadata"].update(metadata)
    return p


def test_replicas_of_one_template_are_decided_twice_then_answered_from_memory_with_their_own_uid(monkeypatch):
    from webhook import admission

    decided = []
    real = admission._mutate_answer
    monkeypatch.setattr(admission, "_mutate_answer", lambda *a: decided.append(a[0]) or real(*a))
    snap = fresh_snapshot()
    answers = [
        mutate_review(review(_replica(n, uid=f"pod-{n}", creationTimestamp=f"2026-11-23T10:00:{n:02d}Z"), uid=f"uid-{n}"), snap, SETTINGS)
        for n in range(5)
    ]
    assert decided == ["uid-0", "uid-1"]  # kept on its second miss (webhook/memo.py: one-off pods never are)
    assert len(snap.answers) == 1
    # Sharing is right because no answer names a pod: each pod's UID reaches its containers through the downward
    # API (kubelet fills the fieldRef in when the container starts), never through the patch.
    ops = json.dumps(decode(answers[-1]))
    assert not [n for n in range(5) if f'"pod-{n}"' in ops] and json.dumps(POD_UID_ENV) in ops
    for n, answer in enumerate(answers):
        assert answer == mutate_review(review(_replica(n), uid=f"uid-{n}"), fresh_snapshot(), SETTINGS)  # as if afresh
    assert "patch" in answers[-1]["response"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p, r: (p, r, Settings(loader_image="registry.example.com/loader:2")), id="other settings"),
        pytest.param(lambda p, r: (p, {**r, "namespace": "open"}, SETTINGS), id="other namespace"),
        pytest.param(lambda p, r: ({**p, "metadata": {**p["metadata"], "name": "chat-0"}}, r, SETTINGS), id="a name"),
        pytest.param(
            lambda p, r: ({**p, "metadata": {**p["metadata"], "annotations": {ann.REF: REF, ann.MOUNT_PATH: "/m"}}}, r, SETTINGS),
            id="other annotations",
        ),
        pytest.param(lambda p, r: ({**p, "spec": {**p["spec"], "nodeSelector": {"pool": "crio"}}}, r, SETTINGS), id="other spec"),
        pytest.param(lambda p, r: ({**p, "spec": {**p["spec"], "nodeSelector": {"pool": "ctrd"}}}, r, SETTINGS), id="same spec"),
        # The patch lists its operations in the order of the pod's top-level keys.
        pytest.param(lambda p, r: ({"spec": p["spec"], **{k: v for k, v in p.items() if k != "spec"}}, r, SETTINGS),
                     id="spec before metadata"),
    ],
)
def test_a_remembered_answer_is_only_given_to_a_pod_that_would_get_it_anyway(change):
    snap = fresh_snapshot()
    p = _replica(1)
    body = review(p)
    mutate_review(body, snap, SETTINGS)
    mutate_review(body, snap, SETTINGS)
    assert len(snap.answers) == 1
    p2, request, cfg = change(copy.deepcopy(p), copy.deepcopy(body["request"]))
    body2 = {**body, "request": {**request, "object": p2, "uid": "uid-2"}}
    assert mutate_review(body2, snap, cfg) == mutate_review(copy.deepcopy(body2), fresh_snapshot(), cfg)


def test_pods_too_large_to_remember_are_decided_every_time():
    from webhook.memo import KEY_MAX_BYTES

    snap = fresh_snapshot()
    big = _replica(1)
    big["spec"]["containers"][0]["env"] = [{"name": f"V{i}", "value": "x" * 100} for i in range(KEY_MAX_BYTES // 100)]
    first = mutate_review(review(big, uid="uid-1"), snap, SETTINGS)
    mutate_review(review(big, uid="uid-2"), snap, SETTINGS)
    second = mutate_review(review(big, uid="uid-2"), snap, SETTINGS)
    assert len(snap.answers) == 0
    assert second == mutate_review(review(big, uid="uid-2"), fresh_snapshot(), SETTINGS)
    assert {**first, "response": {**first["response"], "uid": "uid-2"}} == second


def test_a_caller_editing_its_answer_does_not_change_the_next_one():
    snap = fresh_snapshot()
    mutate_review(review(_replica(1)), snap, SETTINGS)
    first = mutate_review(review(_replica(1)), snap, SETTINGS)  # the answer that is kept
    first["response"]["allowed"] = False
    first["response"].pop("patch")
    second = mutate_review(review(_replica(2)), snap, SETTINGS)
    assert second == mutate_review(review(_replica(2)), fresh_snapshot(), SETTINGS)


def test_malformed_pods_are_not_remembered_and_stay_malformed():
    snap = fresh_snapshot()
    bad = review({**pod(), "spec": "not an object"})
    for _ in range(2):
        with pytest.raises(MalformedReview, match=r"request\.object\.spec"):
            mutate_review(bad, snap, SETTINGS)
    assert len(snap.answers) == 0


def test_image_volume_patch_in_open_namespace():
    response = mutate_review(review(pod(nodeSelector={"pool": "crio"}), namespace="open"), SNAPSHOT, SETTINGS)
    assert "warnings" not in response["response"]
    assert decode(response) == [
        {"op": "add", "path": "/metadata/annotations/model.cache~1injected",
         "value": "image-volume: the one candidate node runs cri-o 1.34"},
        {"op": "add", "path": "/spec/containers/0/volumeMounts",
         "value": [{"name": "model-phi3", "mountPath": "/models/phi3", "readOnly": True}]},
        {"op": "add", "path": "/spec/containers/0/env",
         "value": [{"name": "MODEL_PATH", "value": "/models/phi3"}, {"name": "MODEL_PATH_PHI3", "value": "/models/phi3"}]},
        {"op": "add", "path": "/spec/volumes",
         "value": [{"name": "model-phi3", "image": {"reference": REF, "pullPolicy": "IfNotPresent"}}]},
    ]


def test_namespace_missing_from_inventory_assumes_no_pod_security():
    response = mutate_review(review(pod(nodeSelector={"pool": "ctrd"}), namespace="new-ns"), SNAPSHOT, SETTINGS)
    assert "warnings" not in response["response"]
    assert decode(response)[0]["value"] == "init-container: the one candidate node runs containerd 2.0; cache node"


def test_denial_response():
    response = mutate_review(review(pod({ann.MODE: "turbo"})), SNAPSHOT, SETTINGS)
    assert response == denied("model.cache/mode is 'turbo': use auto, image-volume, csi or init-container")


@pytest.mark.parametrize(
    "body",
    [
        review(pod(), operation="UPDATE"),
        review(None, operation="DELETE"),
        review({"kind": "Binding"}, kind="Binding"),
        review(pod(), subResource="ephemeralcontainers"),
        review({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {"containers": []}}),
        review(pod({ann.STATUS: "init-container: earlier"})),
    ],
    ids=["update", "delete", "other-kind", "subresource", "no-annotations", "already-mutated"],
)
def test_mutate_passes_through_untouched(body):
    assert mutate_review(body, SNAPSHOT, SETTINGS) == ALLOWED


def _deep(n: int) -> Any:
    value: Any = "x"
    for _ in range(n):
        value = [value]
    return value


@pytest.mark.parametrize(
    "body,message",
    [
        ([], "the body must be a JSON object (an AdmissionReview), not list"),
        ({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": review(pod())["request"]},
         "not an admission.k8s.io/v1 AdmissionReview: apiVersion: Input should be 'admission.k8s.io/v1'"),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
         "not an admission.k8s.io/v1 AdmissionReview: request: Field required"),
        ({**review(pod()), "request": {**review(pod())["request"], "uid": 7}},
         "not an admission.k8s.io/v1 AdmissionReview: request.uid: Input should be a valid string"),
        ({**review(pod()), "request": {**review(pod())["request"], "operation": "PATCH"}},
         "not an admission.k8s.io/v1 AdmissionReview: request.operation: Input should be 'CREATE', 'UPDATE', 'DELETE' or"
         " 'CONNECT'"),
        ({**review(pod()), "request": {**review(pod())["request"], "object": "pod"}},
         "not an admission.k8s.io/v1 AdmissionReview: request.object: Input should be a valid dictionary"),
        (review(None), "request.object is missing from a CREATE review"),
        (review({**pod(), "spec": {"containers": "server"}}), "request.object.spec.containers: Input should be a valid list"),
        (review({**pod(), "spec": {"containers": [{"name": 1}], "tolerations": [{"key": None, "value": 5}]}}),
         "request.object.spec.containers.0.name: Input should be a valid string; request.object.spec.tolerations.0.value:"
         " Input should be a valid string"),
        (review({**pod(), "metadata": {"annotations": {ann.REF: ["a"]}}}),
         "request.object.metadata.annotations.model.cache/ref: Input should be a valid string"),
    ],
    ids=[
        "not-an-object", "v1beta1", "no-request", "uid-not-string", "bad-operation", "object-not-object",
        "create-without-object", "containers-not-list", "several-bad-fields", "annotation-not-string",
    ],
)
def test_malformed_reviews(body, message):
    for review_fn in (mutate_review, validate_review):
        with pytest.raises(MalformedReview) as e:
            review_fn(body, SNAPSHOT, SETTINGS)
        assert str(e.value) == message


def test_deep_fields_the_decision_does_not_read_cost_nothing_and_change_nothing():
    # Reviews are not walked whole: a deep field the decision never reads (JSON parsing bounds the depth) is
    # carried along untouched, and the answer is the one for the pod without it.
    plain = mutate_review(review(pod(nodeSelector={"pool": "crio"})), SNAPSHOT, SETTINGS)
    deep_pod = pod(nodeSelector={"pool": "crio"})
    deep_pod["spec"]["x"] = _deep(500)
    assert mutate_review(review(deep_pod), SNAPSHOT, SETTINGS) == plain
    assert "patch" in plain["response"]


def test_nesting_too_deep_for_the_interpreter_is_a_malformed_review():
    # The one place a review compares user subtrees: an UPDATE denied for a problem the old template already had.
    # Two equal, separately built trees deeper than the recursion limit make that comparison run out of stack.
    def deployment() -> dict[str, Any]:
        template = pod({ann.MODE: "turbo"})
        template["spec"]["x"] = _deep(sys.getrecursionlimit() + 50)
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "open"},
                "spec": {"template": {"metadata": template["metadata"], "spec": template["spec"]}}}

    body = review(deployment(), kind="Deployment", operation="UPDATE")
    body["request"]["oldObject"] = deployment()
    with pytest.raises(MalformedReview) as e:
        validate_review(body, SNAPSHOT, SETTINGS)
    assert str(e.value) == "the AdmissionReview is nested too deeply"


def test_the_preview_refuses_documents_nested_deeper_than_it_writes_back():
    deep = {**pod(), "spec": {"x": _deep(70), "containers": []}}
    with pytest.raises(MalformedReview) as e:
        mutate_object(deep, None, SNAPSHOT, SETTINGS)
    assert str(e.value) == "the object is nested more than 64 levels deep"


# --- validate_review -----------------------------------------------------------------------------------------------


def _with_template(kind: str, template: dict[str, Any]) -> dict[str, Any]:
    api = {"Job": "batch/v1", "CronJob": "batch/v1", "ReplicationController": "v1"}.get(kind, "apps/v1")
    obj: dict[str, Any] = {"apiVersion": api, "kind": kind, "metadata": {"name": "chat", "namespace": "open"}}
    if kind == "CronJob":
        obj["spec"] = {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template}}}
    elif kind in ("Job", "ReplicationController"):
        obj["spec"] = {"template": template}
    else:
        obj["spec"] = {"selector": {"matchLabels": {"app": "chat"}}, "template": template}
    return obj


def _template(annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    p = pod(annotations, **spec)
    return {"metadata": {"labels": {"app": "chat"}, "annotations": p["metadata"]["annotations"]}, "spec": p["spec"]}


KINDS = ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "ReplicationController"]


@pytest.mark.parametrize("kind", KINDS)
def test_workload_with_bad_annotation_is_denied_at_apply(kind):
    obj = _with_template(kind, _template({ann.REF: "registry.example.com/models/phi3:v1,registry.example.com/x/phi3:v2"}))
    assert validate_review(review(obj, kind=kind, namespace="open"), SNAPSHOT, SETTINGS) == denied(
        "model.cache/ref gives two models the name 'phi3' (registry.example.com/models/phi3:v1 and"
        " registry.example.com/x/phi3:v2); name them apart with name=REF, e.g. phi3-2=registry.example.com/x/phi3:v2"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_workload_whose_container_sets_the_pod_uid_variable_is_denied_at_apply(kind):
    template = _template({})
    template["spec"]["containers"][0]["env"] = [{"name": "MODEL_CACHE_POD_UID", "value": "9f1c0c1e-other-pod"}]
    obj = _with_template(kind, template)
    assert validate_review(review(obj, kind=kind, namespace="open"), SNAPSHOT, SETTINGS) == denied(
        "container 'server' defines the environment variable MODEL_CACHE_POD_UID, which model.cache reserves: the"
        " webhook sets it to the pod's UID so that the container mounts the model its own loader verified; remove"
        " MODEL_CACHE_POD_UID from the container's env"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_workload_with_good_annotation_is_allowed_with_soft_warnings(kind):
    obj = _with_template(kind, _template({}))
    before = copy.deepcopy(obj)
    assert validate_review(review(obj, kind=kind, namespace="open"), SNAPSHOT, SETTINGS) == {
        **ALLOWED,
        "response": {
            **ALLOWED["response"],
            "warnings": [
                "model.cache: using an init container: 1 of 2 candidate nodes runs containerd 2.0 (ctrd-a);"
                " pin the pod to capable nodes to get an image volume"
            ],
        },
    }
    assert obj == before


def test_validate_pod_and_explicit_image_volume_denial():
    body = review(pod({ann.MODE: "image-volume"}), namespace="open")
    assert validate_review(body, SNAPSHOT, SETTINGS) == denied(
        "model.cache/mode is 'image-volume' but 1 candidate node of 2 cannot mount image volumes: ctrd-a (containerd"
        " 2.0); set model.cache/mode to auto or init-container, or restrict the pod (nodeSelector, node affinity) to"
        " nodes running cri-o 1.33+ with kubelet 1.35+"
    )
    assert mutate_review(body, SNAPSHOT, SETTINGS) == validate_review(body, SNAPSHOT, SETTINGS)


_CAPTURE_FIX = "mount a volume of spec.volumes instead (model.cache mounts each model read-only at model.cache/mount-path)"
CACHE_CAPTURES = [
    ("hostpath-parent", {"volumes": [{"name": "host", "hostPath": {"path": "/var/lib/", "type": "Directory"}}]},
     "spec.volumes[0].hostPath.path is '/var/lib/' (volume 'host'), which is a parent of the node cache"
     " /var/lib/model-cache: a pod must not reach the shared cache itself; remove the volume (model.cache mounts each"
     " model read-only at model.cache/mount-path) or use another host directory"),
    ("dangling-cache-mount", {"containers": [{"name": "server", "image": "registry.example.com/vllm:1",
                                              "volumeMounts": [{"name": "model-cache", "mountPath": "/cache"}]}]},
     "spec.containers[0].volumeMounts[0].name is 'model-cache', a volume the pod does not define and a name"
     f" model.cache gives the volumes it injects (the node cache among them); {_CAPTURE_FIX}"),
    ("ephemeral-device", {"ephemeralContainers": [{"name": "debug", "image": "busybox",
                                                   "volumeDevices": [{"name": "model-cache", "devicePath": "/dev/c"}]}]},
     "spec.ephemeralContainers[0].volumeDevices[0].name is 'model-cache', a volume the pod does not define and a name"
     f" model.cache gives the volumes it injects (the node cache among them); {_CAPTURE_FIX}"),
]


@pytest.mark.parametrize("namespace", ["ml", "open"])
@pytest.mark.parametrize("spec,message", [c[1:] for c in CACHE_CAPTURES], ids=[c[0] for c in CACHE_CAPTURES])
def test_a_pod_that_references_the_node_cache_is_denied_by_both_reviews(spec, message, namespace):
    body = review(pod(**spec), namespace=namespace)
    before = copy.deepcopy(body)
    assert mutate_review(body, SNAPSHOT, SETTINGS) == denied(message)
    assert mutate_review(body, SNAPSHOT, SETTINGS) == denied(message)  # and so when remembered
    assert validate_review(body, SNAPSHOT, SETTINGS) == denied(message)
    assert body == before


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec,message", [c[1:] for c in CACHE_CAPTURES], ids=[c[0] for c in CACHE_CAPTURES])
def test_workload_whose_template_references_the_node_cache_is_denied_at_apply(spec, message, kind):
    obj = _with_template(kind, _template({}, **spec))
    assert validate_review(review(obj, kind=kind, namespace="open"), SNAPSHOT, SETTINGS) == denied(message)


def test_update_that_keeps_a_broken_template_warns_instead_of_denying():
    obj = _with_template("Deployment", _template({ann.MODE: "image-volume"}))
    scaled = copy.deepcopy(obj)
    scaled["spec"]["replicas"] = 5
    scaled["spec"]["template"]["metadata"]["labels"]["rollout"] = "2"  # not what the decision reads
    body = review(scaled, kind="Deployment", operation="UPDATE", namespace="open", oldObject=obj)
    response = validate_review(body, SNAPSHOT, SETTINGS)
    assert response["response"]["allowed"] is True
    (warning,) = response["response"]["warnings"]
    assert warning == (
        "model.cache: model.cache/mode is 'image-volume' but 1 candidate node of 2 cannot mount image volumes: ctrd-a"
        " (containerd 2.0); set model.cache/mode to auto or init-container, or restrict the pod (nodeSelector, node"
        " affinity) to nodes running cri-o 1.33+..."
    )
    assert len(warning) == 256  # the API server may cut longer ones; we cut visibly
    changed = copy.deepcopy(obj)
    changed["spec"]["template"]["metadata"]["annotations"][ann.REF] = "registry.example.com/models/phi3:v2"
    body = review(changed, kind="Deployment", operation="UPDATE", namespace="open", oldObject=obj)
    assert validate_review(body, SNAPSHOT, SETTINGS)["response"]["allowed"] is False


def test_validate_allows_deletions_and_objects_being_deleted():
    obj = _with_template("Deployment", _template({ann.MODE: "turbo"}))
    assert validate_review(review(obj, kind="Deployment", operation="DELETE", oldObject=obj), SNAPSHOT, SETTINGS) == ALLOWED
    obj["metadata"]["deletionTimestamp"] = "2026-11-22T10:00:00Z"
    assert validate_review(review(obj, kind="Deployment", operation="UPDATE", oldObject=obj), SNAPSHOT, SETTINGS) == ALLOWED
    assert validate_review(review({"kind": "Service"}, kind="Service"), SNAPSHOT, SETTINGS) == ALLOWED
    no_template = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {}}
    assert validate_review(review(no_template, kind="Deployment"), SNAPSHOT, SETTINGS) == ALLOWED


def test_template_carrying_the_status_annotation_is_warned():
    obj = _with_template("Deployment", _template({ann.STATUS: "image-volume: copied"}))
    assert validate_review(review(obj, kind="Deployment", namespace="open"), SNAPSHOT, SETTINGS)["response"]["warnings"] == [
        "model.cache: the pod template carries model.cache/injected, so its pods will not get their models; remove"
        " that annotation from the template"
    ]


# --- previews (model-cache-webhook mutate -f FILE) -----------------------------------------------------------------


def test_mutate_object_workload_template_and_list():
    deployment = _with_template("Deployment", _template({}, nodeSelector={"pool": "crio"}))
    cron = _with_template("CronJob", _template({}, nodeSelector={"pool": "ctrd"}))
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "chat"}}
    listing = {"apiVersion": "v1", "kind": "List", "items": [deployment, cron, svc]}
    before = copy.deepcopy(listing)
    new, warnings, decisions = mutate_object(listing, {}, SNAPSHOT, SETTINGS)
    assert listing == before
    assert warnings == []
    assert decisions == [
        Decision("Deployment/chat", "image-volume", "the one candidate node runs cri-o 1.34"),
        Decision("CronJob/chat", "init-container", "the one candidate node runs containerd 2.0; cache node"),
        Decision("Service/chat", "unchanged", "not a Pod or a workload with a pod template"),
    ]
    expected_deployment = copy.deepcopy(deployment)
    expected_deployment["spec"]["template"] = mutate_object(
        {"apiVersion": "v1", "kind": "Pod", **deployment["spec"]["template"]}, {}, SNAPSHOT, SETTINGS
    )[0]
    del expected_deployment["spec"]["template"]["apiVersion"], expected_deployment["spec"]["template"]["kind"]
    assert new["items"][0] == expected_deployment
    assert new["items"][2] is svc
    for item in new["items"][:2]:
        assert_valid(item)
    assert [str(d) for d in decide(listing, {}, SNAPSHOT, SETTINGS)] == [
        "Deployment/chat: image-volume (the one candidate node runs cri-o 1.34)",
        "CronJob/chat: init-container (the one candidate node runs containerd 2.0; cache node)",
        "Service/chat: unchanged (not a Pod or a workload with a pod template)",
    ]


def test_decide_reports_denials_and_untouched_pods():
    assert decide(pod({ann.CONTAINERS: "nope"}), None, SNAPSHOT, SETTINGS) == [
        Decision("Pod/chat-6c5-*", "denied", "model.cache/containers names 'nope', not a container of this pod; containers: server")
    ]
    with pytest.raises(Denied):
        mutate_object(pod({ann.CONTAINERS: "nope"}), None, SNAPSHOT, SETTINGS)
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}
    assert mutate_object(plain, None, SNAPSHOT, SETTINGS) == (plain, [], [Decision("Pod/p", "unchanged", "no model.cache/ref annotation")])
    with pytest.raises(MalformedReview) as e:
        mutate_object({"kind": "Pod", "spec": {"containers": {}}}, None, SNAPSHOT, SETTINGS)
    assert str(e.value) == "Pod.spec.containers: Input should be a valid list"


# --- settings ------------------------------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("MODEL_CACHE_ALLOWED_REGISTRIES", "Registry.Example.com, ghcr.io/acme/ ,10.0.0.5:5000")
    monkeypatch.setenv("MODEL_CACHE_LOADER_CONCURRENCY", "4")
    s = load_settings()
    assert (s.allowed_registries, s.loader_concurrency) == (["registry.example.com", "ghcr.io/acme", "10.0.0.5:5000"], 4)
    monkeypatch.setenv("MODEL_CACHE_ALLOWED_REGISTRIES", '["r.example.com"]')
    assert load_settings().allowed_registries == ["r.example.com"]
    assert (s.registry_ca_configmap, s.plain_http_registries) == ("", [])
    monkeypatch.setenv("MODEL_CACHE_REGISTRY_CA_CONFIGMAP", " registry-ca ")
    monkeypatch.setenv("MODEL_CACHE_PLAIN_HTTP_REGISTRIES", "Registry.Internal:5000, 10.0.0.5 ,registry.internal:5000,")
    s = load_settings()
    assert (s.registry_ca_configmap, s.plain_http_registries) == ("registry-ca", ["registry.internal:5000", "10.0.0.5"])
    monkeypatch.setenv("MODEL_CACHE_PLAIN_HTTP_REGISTRIES", '["[fd00::5]:5000"]')
    assert load_settings().plain_http_registries == ["[fd00::5]:5000"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"loader_cpu_request": "3"}, "MODEL_CACHE_SETTINGS: loader_cpu_request 3 is larger than loader_cpu_limit 2"),
        ({"loader_memory_limit": "lots"}, "MODEL_CACHE_LOADER_MEMORY_LIMIT: 'lots' is not a Kubernetes quantity (e.g. 250m, 2, 256Mi, 1Gi)"),
        ({"loader_image": "Loader:1"}, "MODEL_CACHE_LOADER_IMAGE: loader_image: reference 'Loader:1' has repository 'library/Loader': use"
         " lowercase letters, digits and separators ('.', '_', '__', '-') between '/'-separated components"),
        ({"node_cache_path": "var/lib"}, "MODEL_CACHE_NODE_CACHE_PATH: 'var/lib' must be a normalised absolute path other than / (e.g."
         " /var/lib/model-cache)"),
        ({"default_cache": "disk"}, "MODEL_CACHE_DEFAULT_CACHE: default_cache 'disk': use node, pod or pvc:<claim-name>"),
        ({"default_mode": "fast"}, "MODEL_CACHE_DEFAULT_MODE: Input should be 'auto', 'image-volume', 'csi' or 'init-container'"),
        ({"allowed_registries": ["https://r.io"]}, "MODEL_CACHE_ALLOWED_REGISTRIES: allowed_registries entry 'https://r.io' is not host,"
         " host:port or host/repository-prefix (e.g. registry.example.com, 10.0.0.5:5000, ghcr.io/acme)"),
        ({"loader_run_as_user": 0}, "MODEL_CACHE_LOADER_RUN_AS_USER: Input should be greater than or equal to 1"),
        ({"image_volume_min_crio": "1.33.0"}, "MODEL_CACHE_IMAGE_VOLUME_MIN_CRIO: '1.33.0' is not a MAJOR.MINOR version such as 1.33"),
        ({"registry_ca_configmap": "Registry_CA"}, "MODEL_CACHE_REGISTRY_CA_CONFIGMAP: 'Registry_CA' is not a ConfigMap name (a"
         " DNS subdomain: lower case letters, digits, '-' and '.', e.g. registry-ca); leave it empty for none"),
        ({"registry_ca_configmap": "x" * 254}, f"MODEL_CACHE_REGISTRY_CA_CONFIGMAP: '{'x' * 254}' is not a ConfigMap name (a"
         " DNS subdomain: lower case letters, digits, '-' and '.', e.g. registry-ca); leave it empty for none"),
        ({"plain_http_registries": "registry.internal/models"}, "MODEL_CACHE_PLAIN_HTTP_REGISTRIES: plain_http_registries"
         " entry 'registry.internal/models' is not host or host:port (e.g. registry.internal, 10.0.0.5:5000)"),
        ({"plain_http_registries": "http://registry.internal"}, "MODEL_CACHE_PLAIN_HTTP_REGISTRIES: plain_http_registries"
         " entry 'http://registry.internal' is not host or host:port (e.g. registry.internal, 10.0.0.5:5000)"),
        ({"plain_http_registries": "[r.internal"}, "MODEL_CACHE_PLAIN_HTTP_REGISTRIES: '[r.internal' is neither a JSON list"
         " nor a comma-separated list: Expecting value: line 1 column 2 (char 1)"),
    ],
    ids=["request-over-limit", "bad-quantity", "bad-image", "relative-cache", "bad-cache", "bad-mode", "bad-registry",
         "root-uid", "bad-version", "bad-configmap", "long-configmap", "plain-http-with-path", "plain-http-with-scheme",
         "plain-http-bad-json"],
)
def test_bad_settings_stop_start_up(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_settings(**overrides)
    assert str(e.value) == f"invalid model-cache settings: {message}"


# --- properties ----------------------------------------------------------------------------------------------------

TOKENS = st.sampled_from(
    [REF, "registry.example.com/models/bge:v2", "x=registry.example.com/a:v1", "docker.io/a", "=", ",", " ", "/", ":",
     "@sha256:", "a" * 64, "pvc:", "node", "pod", "auto", "image-volume", "init-container", "server", "side", "/models",
     "..", "..", "-", "Ü", "phi3", "PHI3", "\x00", "localhost:5000/m"]
)
ANNOTATION_VALUES = st.one_of(st.text(max_size=30), st.lists(TOKENS, max_size=6).map("".join))
VALID_REFS = st.sampled_from(
    [REF, "embed=registry.example.com/models/bge@sha256:" + "b" * 64, "docker.io/a", "ghcr.io/x/phi3:v2",
     "localhost:5000/m", "m.2=registry.example.com/m:v1"]
)
REF_ENTRIES = st.one_of(VALID_REFS, VALID_REFS, VALID_REFS, ANNOTATION_VALUES)
ANNOTATIONS = st.fixed_dictionaries(
    {ann.REF: st.one_of(
        st.lists(VALID_REFS, min_size=1, max_size=3, unique=True).map(", ".join),
        st.lists(VALID_REFS, min_size=1, max_size=3, unique=True).map(", ".join),
        st.lists(REF_ENTRIES, min_size=1, max_size=3).map(", ".join),
    )},
    optional={
        ann.MODE: st.one_of(st.sampled_from(ann.MODES), st.sampled_from(ann.MODES), st.sampled_from(ann.MODES), ANNOTATION_VALUES),
        ann.CACHE: st.one_of(st.sampled_from(["node", "pod", "pvc:store", "pvc:"]), st.sampled_from(["node", "pod", "pvc:store", "pvc:"]), st.sampled_from(["node", "pod", "pvc:store", "pvc:"]), ANNOTATION_VALUES),
        ann.MOUNT_PATH: st.one_of(st.sampled_from(["/models", "/srv/m/", "/models/phi3/..", "/"]), st.sampled_from(["/models", "/srv/m/", "/models/phi3/..", "/"]), st.sampled_from(["/models", "/srv/m/", "/models/phi3/..", "/"]), ANNOTATION_VALUES),
        ann.CONTAINERS: st.one_of(st.sampled_from(["server", "server,side", "init", "side, ,"]), st.sampled_from(["server", "server,side", "init", "side, ,"]), st.sampled_from(["server", "server,side", "init", "side, ,"]), ANNOTATION_VALUES),
        "model.cache/other": ANNOTATION_VALUES,
        "unrelated": ANNOTATION_VALUES,
    },
)
PROPERTY_SETTINGS = [SETTINGS, Settings(allowed_registries=["registry.example.com"], default_mode="image-volume")]


def _property_pod(annotations: dict[str, str], variant: int) -> dict[str, Any]:
    p = pod()
    p["metadata"]["annotations"] = annotations
    spec = p["spec"]
    if variant & 1:
        spec["containers"].append({"name": "side", "image": "x", "env": [{"name": "MODEL_PATH", "value": "/x"}],
                                   "volumeMounts": [{"name": "model-cache", "mountPath": "/models/phi3"}]})
        spec["volumes"] = [{"name": "model-cache", "emptyDir": {}}]
    if variant & 2:
        spec["imagePullSecrets"] = [{"name": "regcred"}, {}]
        spec["initContainers"] = [{"name": "init", "image": "x"}]
    if variant & 4:
        spec["nodeSelector"] = {"pool": "crio"}
    return p


@given(
    annotations=ANNOTATIONS,
    status=st.one_of(st.none(), st.none(), st.none(), ANNOTATION_VALUES),
    variant=st.integers(0, 7),
    which=st.integers(0, 1),
    namespace=st.sampled_from(["ml", "open", ""]),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_annotations_answer_and_patches_apply(annotations, status, variant, which, namespace):
    cfg = PROPERTY_SETTINGS[which]
    if status is not None:
        annotations = {**annotations, ann.STATUS: status}
    p = _property_pod(annotations, variant)
    before = copy.deepcopy(p)
    response = mutate_review(review(p, namespace=namespace), SNAPSHOT, cfg)
    assert p == before
    result = response["response"]
    labels = SNAPSHOT.namespaces.get(namespace) if namespace else None
    if result["allowed"]:
        expected = mutate_object(p, labels, SNAPSHOT, cfg)[0]
        patched = jsonpatch.apply_patch(p, decode(response)) if "patch" in result else p
        assert patched == expected
        if "patch" in result:
            assert_valid(patched, versions=("1.37.0",))
            assert mutate_review(review(patched, namespace=namespace), SNAPSHOT, cfg) == ALLOWED  # idempotent
    else:
        assert result["status"]["code"] == 403 and result["status"]["message"]
        with pytest.raises(Denied):
            mutate_object(p, labels, SNAPSHOT, cfg)
    validate_review(review(p, namespace=namespace), SNAPSHOT, cfg)


def _containers(children):
    # Named, not a lambda: see tests/test_patch.py.
    return st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8), _containers, max_leaves=10
)


def _corrupt(value: Any, data: st.DataObject, depth: int = 0) -> Any:
    """Replace one randomly chosen subtree of ``value`` with random JSON."""
    if depth > 8 or data.draw(st.integers(0, 4)) == 0 or not isinstance(value, (dict, list)) or not value:
        return data.draw(JSON)
    value = copy.copy(value)
    if isinstance(value, dict):
        key = data.draw(st.sampled_from(sorted(value)))
        if data.draw(st.booleans()) and depth > 0:
            del value[key]
        else:
            value[key] = _corrupt(value[key], data, depth + 1)
    else:
        i = data.draw(st.integers(0, len(value) - 1))
        value[i] = _corrupt(value[i], data, depth + 1)
    return value


@given(data=st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_malformed_reviews_raise_only_malformed_review(data):
    base = review(_property_pod({ann.REF: REF, ann.CONTAINERS: "server"}, data.draw(st.integers(0, 7))))
    if data.draw(st.booleans()):
        base = review(_with_template("Deployment", _template({})), kind="Deployment")
    body = _corrupt(base, data)
    for review_fn in (mutate_review, validate_review):
        try:
            response = review_fn(body, SNAPSHOT, SETTINGS)
        except MalformedReview as exc:
            assert str(exc)
        else:
            assert set(response) == {"apiVersion", "kind", "response"}
            json.dumps(response)
            if "patch" in response["response"]:
                obj = body["request"]["object"]
                patched = jsonpatch.apply_patch(obj, decode(response))
                assert patched[ "metadata"]["annotations"][ann.STATUS]


# --- the pure core stays pure --------------------------------------------------------------------------------------

PURE = ["annotations", "snapshot", "memo", "nodes", "mutate", "patch", "errors", "models", "admission"]
IO_MODULES = {"os", "socket", "subprocess", "kubernetes", "fastapi", "starlette", "uvicorn", "httpx", "requests",
              "urllib", "http", "threading", "asyncio", "webhook.inventory", "webhook.app", "webhook.cli"}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io(module):
    import ast
    import pathlib

    source = (pathlib.Path(__file__).parent.parent / "webhook" / f"{module}.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    roots = {name.split(".")[0] for name in imported} | imported
    assert roots & IO_MODULES == set()


def test_patches_are_written_even_with_what_only_a_python_caller_can_pass():
    from webhook.admission import _json

    assert _json([{"op": "add", "path": "/a", "value": 1}]) == b'[{"op":"add","path":"/a","value":1}]'
    assert _json({"n": 2**70}) == b'{"n":1180591620717411303424}'  # beyond orjson's 64 bits
    assert json.loads(_json({"s": "\ud800"})) == {"s": "\ud800"}  # a lone surrogate: orjson refuses it
