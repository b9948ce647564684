"""Issue 11: what a pod can reach after it is admitted, and what its template is judged against.

* ``kubectl debug`` adds an ephemeral container to a running pod through an UPDATE of ``pods/ephemeralcontainers``;
  the mutating webhook never sees it. The validating webhook reviews it (manifests/base/webhooks.yaml,
  ``ephemeral.model.cache``): a debug container must not mount the node cache or any volume the injected loader
  mounts (cache, CA bundle, pull secrets), while every other mount stays allowed.
* The API server adds the service account token mount before the mutating webhook sees a pod; a pod template is
  validated without it, so the webhook judges templates as their pods will be (item 7).
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_admission import ALLOWED, REF, decode, denied, fresh_snapshot, pod, review
from webhook import annotations as ann
from webhook.admission import mutate_review, validate_review
from webhook.config import Settings

SETTINGS = Settings(registry_ca_configmap="registry-ca")
SNAPSHOT = fresh_snapshot()
DEBUG_FIX = (
    " a debug container must not mount the shared cache or the loader's credentials; remove the mount and read the"
    " model through the app container instead (kubectl debug --target=APP, then /proc/PID/root/MOUNT_PATH)"
)


def mutated(**spec: Any) -> dict[str, Any]:
    """A pod of namespace ``open`` (node cache allowed) as the API server stores it after the mutating webhook."""
    original = pod(
        volumes=[{"name": "scratch", "emptyDir": {}}],
        imagePullSecrets=[{"name": "regcred"}],
        nodeSelector={"pool": "ctrd"},
        **spec,
    )
    response = mutate_review(review(original, namespace="open"), SNAPSHOT, SETTINGS)
    assert response["response"]["allowed"], response
    return jsonpatch.apply_patch(original, decode(response))


def debug(pod_: dict[str, Any], *containers: dict[str, Any]) -> dict[str, Any]:
    """The UPDATE of pods/ephemeralcontainers that ``kubectl debug`` sends for ``containers``."""
    new = copy.deepcopy(pod_)
    new["spec"]["ephemeralContainers"] = [*(pod_["spec"].get("ephemeralContainers") or ()), *containers]
    return review(
        new,
        operation="UPDATE",
        namespace="open",
        subResource="ephemeralcontainers",
        oldObject=pod_,
        resource={"group": "", "version": "v1", "resource": "pods"},
    )


def debugger(*mounts: str, devices: tuple[str, ...] = (), name: str = "debugger-x7k") -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": "busybox:1.36", "targetContainerName": "server"}
    if mounts:
        container["volumeMounts"] = [{"name": m, "mountPath": f"/mnt/{i}"} for i, m in enumerate(mounts)]
    if devices:
        container["volumeDevices"] = [{"name": d, "devicePath": f"/dev/x{i}"} for i, d in enumerate(devices)]
    return container


def test_the_mutated_pod_has_the_volumes_these_tests_name():
    p = mutated()
    assert [v["name"] for v in p["spec"]["volumes"]] == ["scratch", "model-cache", "model-cache-ca", "model-cache-pull-regcred"]
    assert p["spec"]["volumes"][1]["hostPath"] == {"path": "/var/lib/model-cache", "type": "DirectoryOrCreate"}
    assert [m["name"] for m in p["spec"]["initContainers"][0]["volumeMounts"]] == [
        "model-cache", "model-cache-ca", "model-cache-pull-regcred"]


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("model-cache", "a hostPath volume (the node cache /var/lib/model-cache)"),
        ("model-cache-ca", "a volume the model loader mounts"),
        ("model-cache-pull-regcred", "a volume the model loader mounts"),
    ],
)
def test_a_debug_container_mounting_a_loader_volume_is_denied_naming_the_field(name, what):
    response = validate_review(debug(mutated(), debugger("scratch", name)), SNAPSHOT, SETTINGS)
    assert response == denied(f"spec.ephemeralContainers[0].volumeMounts[1].name is '{name}', {what}:{DEBUG_FIX}")


def test_a_debug_container_attaching_the_cache_as_a_device_is_denied():
    response = validate_review(debug(mutated(), debugger(devices=("model-cache",))), SNAPSHOT, SETTINGS)
    assert response == denied(
        "spec.ephemeralContainers[0].volumeDevices[0].name is 'model-cache', a hostPath volume (the node cache"
        f" /var/lib/model-cache):{DEBUG_FIX}"
    )


def test_a_debug_container_with_other_mounts_or_none_is_allowed():
    p = mutated()
    assert validate_review(debug(p, debugger()), SNAPSHOT, SETTINGS) == ALLOWED
    assert validate_review(debug(p, debugger("scratch")), SNAPSHOT, SETTINGS) == ALLOWED


def test_only_the_added_debug_container_is_judged():
    # One admitted before this webhook existed keeps working; the new one is judged on its own mounts.
    p = mutated()
    p["spec"]["ephemeralContainers"] = [debugger("model-cache", name="old-debugger")]
    assert validate_review(debug(p, debugger("scratch")), SNAPSHOT, SETTINGS) == ALLOWED
    response = validate_review(debug(p, debugger("model-cache-ca")), SNAPSHOT, SETTINGS)
    assert response == denied(
        f"spec.ephemeralContainers[1].volumeMounts[0].name is 'model-cache-ca', a volume the model loader mounts:{DEBUG_FIX}"
    )


def test_removing_the_annotations_after_creation_changes_nothing():
    # Pod annotations stay writable; the loader's volumes are found from the init container that runs it.
    p = mutated()
    p["metadata"]["annotations"] = {}
    response = validate_review(debug(p, debugger("model-cache")), SNAPSHOT, SETTINGS)
    assert response["response"]["allowed"] is False


@pytest.mark.parametrize(
    ("path", "relation"),
    [
        ("/var/lib/model-cache", "the node cache"),
        ("/var/lib/model-cache/blobs", "inside the node cache"),
        ("/var/lib", "a parent of the node cache"),
        ("var/lib//model-cache/", "the node cache"),
    ],
)
def test_a_debug_container_mounting_any_hostpath_at_the_cache_is_denied(path, relation):
    # A pod admitted without the webhook (say, before the namespace was enabled) with such a volume.
    p = pod(volumes=[{"name": "host", "hostPath": {"path": path}}])
    response = validate_review(debug(p, debugger("host")), SNAPSHOT, SETTINGS)
    assert response == denied(
        f"spec.ephemeralContainers[0].volumeMounts[0].name is 'host', a hostPath volume ({relation}"
        f" /var/lib/model-cache):{DEBUG_FIX}"
    )


def test_a_hostpath_beside_the_cache_is_allowed():
    p = pod(volumes=[{"name": "host", "hostPath": {"path": "/var/lib/model-cache-old"}}])
    assert validate_review(debug(p, debugger("host")), SNAPSHOT, SETTINGS) == ALLOWED


def test_other_pod_updates_and_subresources_are_not_judged():
    p = mutated()
    new = copy.deepcopy(p)
    new["spec"]["ephemeralContainers"] = [debugger("model-cache")]
    for request in ({"subResource": "status"}, {}):
        assert validate_review(review(new, operation="UPDATE", namespace="open", oldObject=p, **request),
                               SNAPSHOT, SETTINGS) == ALLOWED


def test_a_malformed_ephemeral_review_is_refused():
    from webhook.errors import MalformedReview

    body = review(None, operation="UPDATE", namespace="open", subResource="ephemeralcontainers")
    with pytest.raises(MalformedReview, match=r"request\.object is missing"):
        validate_review(body, SNAPSHOT, SETTINGS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mounts=st.lists(st.sampled_from(["model-cache", "model-cache-ca", "model-cache-pull-regcred", "scratch", "nope"]),
                    max_size=3),
    devices=st.lists(st.sampled_from(["model-cache", "scratch"]), max_size=1),
)
def test_property_no_admitted_debug_container_reaches_a_loader_volume(mounts, devices):
    p = mutated()
    loader_volumes = {m["name"] for m in p["spec"]["initContainers"][0]["volumeMounts"]}
    response = validate_review(debug(p, debugger(*mounts, devices=tuple(devices))), SNAPSHOT, SETTINGS)
    assert response["response"]["allowed"] is not bool(loader_volumes & {*mounts, *devices})


# --- item 7: the service account token's mount path -----------------------------------------------------------


SA_MESSAGE = (
    "model 'serviceaccount' would be mounted at /var/run/secrets/kubernetes.io/serviceaccount, where Kubernetes"
    " mounts the service account token in every container; set model.cache/mount-path to another directory,"
    " rename the model with name=REF in model.cache/ref, or set spec.automountServiceAccountToken: false"
)
SA_ANNOTATIONS = {ann.REF: f"serviceaccount={REF}", ann.MOUNT_PATH: "/var/run/secrets/kubernetes.io"}


def deployment(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "chat"},
        "spec": {"template": {"metadata": {"annotations": SA_ANNOTATIONS}, "spec": spec}},
    }


def test_a_template_with_a_model_at_the_token_path_is_denied_as_its_pods_would_be():
    spec = {"containers": [{"name": "server", "image": "registry.example.com/vllm:1"}]}
    assert validate_review(review(deployment(spec), kind="Deployment", namespace="open"), SNAPSHOT, SETTINGS) == denied(SA_MESSAGE)
    # Its pods, as the API server sends them: the token volume already mounted there.
    created = pod(SA_ANNOTATIONS, volumes=[{"name": "kube-api-access-x1", "projected": {"sources": []}}])
    created["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}]
    assert mutate_review(review(created, namespace="open"), SNAPSHOT, SETTINGS) == denied(SA_MESSAGE)


def test_a_pod_without_the_token_may_put_a_model_there():
    spec = {"automountServiceAccountToken": False, "nodeSelector": {"pool": "ctrd"},
            "containers": [{"name": "server", "image": "registry.example.com/vllm:1"}]}
    response = validate_review(review(deployment(spec), kind="Deployment", namespace="open"), SNAPSHOT, SETTINGS)
    assert response == ALLOWED
    created = pod(SA_ANNOTATIONS, automountServiceAccountToken=False, nodeSelector={"pool": "ctrd"})
    patched = jsonpatch.apply_patch(created, decode(mutate_review(review(created, namespace="open"), SNAPSHOT, SETTINGS)))
    mounts = patched["spec"]["containers"][0]["volumeMounts"]
    assert [(m["mountPath"], m.get("readOnly")) for m in mounts] == [("/var/run/secrets/kubernetes.io/serviceaccount", True)]


def test_a_malformed_old_object_is_not_a_crash():
    # oldObject comes from the client like the rest: names that are not strings are no names.
    p = mutated()
    old = copy.deepcopy(p)
    old["spec"]["ephemeralContainers"] = [{"name": {}}, "x", {"name": ["a"]}]
    body = debug(p, debugger("model-cache"))
    body["request"]["oldObject"] = old
    response = validate_review(body, SNAPSHOT, SETTINGS)
    assert response["response"]["allowed"] is False
    old["spec"]["ephemeralContainers"] = {"not": "a list"}
    assert validate_review(body, SNAPSHOT, SETTINGS)["response"]["allowed"] is False
