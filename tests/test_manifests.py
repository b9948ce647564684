"""The install manifests: every kustomization renders, every object is valid Kubernetes, and the properties an
admin trusts us on (least-privilege RBAC, opt-in webhook scope, restricted pods, wiring between Service,
container and webhook configurations) hold in every overlay.

Rendering shells out to `kubectl kustomize` (kubectl with its built-in kustomize must be on PATH). Validation
uses kubernetes-validate's strict schemas, which reject unknown fields; cert-manager's kinds are not in those
schemas, so their shape is asserted here instead.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import celpy
import jsonpatch
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from webhook import annotations, certs
from webhook.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
NAMESPACE = "model-cache-system"
NAME = "model-cache"
TLS_SECRET = "model-cache-tls"
TLS_MOUNT = "/etc/model-cache/tls"
POD_LABELS = {"app.kubernetes.io/name": "model-cache", "app.kubernetes.io/component": "webhook"}
K8S_VERSIONS = ["1.33", "1.37"]
CERT_MANAGER_API = "cert-manager.io/v1"

# Every kustomization (not Component) under manifests/, by id. test_every_kustomization_is_listed keeps this
# in step with the tree, so a new overlay cannot escape these tests.
KUSTOMIZATIONS = {
    "default": MANIFESTS,
    "base": MANIFESTS / "base",
    "cert-manager": MANIFESTS / "overlays" / "cert-manager",
    "manual-certs": MANIFESTS / "overlays" / "manual-certs",
    "pvc-cache": MANIFESTS / "overlays" / "pvc-cache",
    "pvc-cache-claim": MANIFESTS / "overlays" / "pvc-cache" / "claim",
    "agent": MANIFESTS / "overlays" / "agent",
}
# The ones that install the webhook (the claim is a per-namespace add-on).
INSTALLS = ["default", "base", "cert-manager", "manual-certs", "pvc-cache"]
SELF_MANAGED = ["default", "base", "pvc-cache"]
EXTERNAL_CERTS = ["cert-manager", "manual-certs"]


@functools.cache
def render(kid: str) -> tuple[dict, ...]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZATIONS[kid])], capture_output=True, text=True, check=True
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def objects(kid: str, kind: str) -> list[dict]:
    return [o for o in render(kid) if o["kind"] == kind]


def one(kid: str, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects(kid, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kid}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def webhook_container(kid: str) -> dict:
    [container] = one(kid, "Deployment", NAME)["spec"]["template"]["spec"]["containers"]
    return container


def settings(kid: str) -> dict[str, str]:
    """The MODEL_CACHE_* environment the webhook container gets: the generated ConfigMap plus literal env."""
    container = webhook_container(kid)
    [source] = container["envFrom"]
    env = dict(one(kid, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container["env"]:
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


# --- rendering and schema validation ---------------------------------------------------------------------------


def test_every_kustomization_is_listed():
    found = {
        p.parent
        for p in MANIFESTS.rglob("kustomization.yaml")
        if yaml.safe_load(p.read_text())["kind"] == "Kustomization"
    }
    assert found == set(KUSTOMIZATIONS.values())


def test_default_install_is_the_base():
    assert render("default") == render("base")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kid", sorted(KUSTOMIZATIONS))
def test_every_core_object_validates_strictly(kid, version):
    core = [o for o in render(kid) if o["apiVersion"] != CERT_MANAGER_API]
    assert core
    validated = [(o["kind"], o["metadata"]["name"], kubernetes_validate.validate(o, version, strict=True)) for o in core]
    assert validated == [(o["kind"], o["metadata"]["name"], version) for o in core]


def test_strict_validation_rejects_unknown_fields():
    # Guards the test above: a field a schema does not have (reinvocationPolicy exists only on mutating
    # webhooks) must fail, or "validates strictly" proves nothing.
    config = yaml.safe_load(yaml.safe_dump(one("base", "ValidatingWebhookConfiguration")))
    config["webhooks"][0]["reinvocationPolicy"] = "IfNeeded"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(config, "1.37", strict=True)


@pytest.mark.parametrize("kid", sorted(KUSTOMIZATIONS))
def test_only_cert_manager_brings_custom_kinds(kid):
    custom = sorted((o["kind"], o["metadata"]["name"]) for o in render(kid) if o["apiVersion"] == CERT_MANAGER_API)
    expected = {
        "cert-manager": [
            ("Certificate", "model-cache-ca"),
            ("Certificate", "model-cache-serving"),
            ("Issuer", "model-cache-ca"),
            ("Issuer", "model-cache-selfsigned"),
        ]
    }
    assert custom == expected.get(kid, [])


def test_kinds_installed():
    assert sorted((o["kind"], o["metadata"]["name"]) for o in render("base")) == [
        ("ClusterRole", "model-cache-inventory"),
        ("ClusterRole", "model-cache-self-certs"),
        ("ClusterRoleBinding", "model-cache-inventory"),
        ("ClusterRoleBinding", "model-cache-self-certs"),
        ("ConfigMap", settings_configmap_name("base")),
        ("Deployment", NAME),
        ("MutatingWebhookConfiguration", NAME),
        ("Namespace", NAMESPACE),
        ("PodDisruptionBudget", NAME),
        ("Role", "model-cache-self-certs"),
        ("RoleBinding", "model-cache-self-certs"),
        ("Service", NAME),
        ("ServiceAccount", NAME),
        ("ValidatingWebhookConfiguration", NAME),
    ]


def settings_configmap_name(kid: str) -> str:
    [cm] = objects(kid, "ConfigMap")
    assert cm["metadata"]["name"].startswith("model-cache-settings-")  # content hash: a change rolls the pods
    return cm["metadata"]["name"]


@pytest.mark.parametrize("kid", INSTALLS)
def test_namespaced_objects_live_in_the_webhook_namespace(kid):
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
                      "ValidatingWebhookConfiguration"}
    for o in render(kid):
        expected = None if o["kind"] in cluster_scoped else NAMESPACE
        assert o["metadata"].get("namespace") == expected, (o["kind"], o["metadata"]["name"])


# --- RBAC ------------------------------------------------------------------------------------------------------

INVENTORY_RULES = [{"apiGroups": [""], "resources": ["nodes", "namespaces"], "verbs": ["get", "list", "watch"]},
                   {"apiGroups": ["storage.k8s.io"], "resources": ["csinodes"], "verbs": ["get", "list", "watch"]}]
SELF_CERT_CLUSTER_RULES = [
    {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
        "resourceNames": [NAME],
        "verbs": ["get", "update", "patch"],
    }
]
SELF_CERT_SECRET_RULES = [
    {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [TLS_SECRET], "verbs": ["get", "update", "patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
]


def rbac(kid: str) -> dict[tuple[str, str], list[dict]]:
    return {
        (o["kind"], o["metadata"]["name"]): o["rules"] for o in render(kid) if o["kind"] in ("Role", "ClusterRole")
    }


def bindings(kid: str) -> dict[tuple[str, str], tuple[dict, list[dict], str | None]]:
    return {
        (o["kind"], o["metadata"]["name"]): (o["roleRef"], o["subjects"], o["metadata"].get("namespace"))
        for o in render(kid)
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
    }


SERVICE_ACCOUNT = [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]


def role_ref(kind: str, name: str) -> dict:
    return {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}


@pytest.mark.parametrize("kid", SELF_MANAGED)
def test_rbac_self_managed_is_exactly_inventory_plus_own_certificate_objects(kid):
    assert rbac(kid) == {
        ("ClusterRole", "model-cache-inventory"): INVENTORY_RULES,
        ("ClusterRole", "model-cache-self-certs"): SELF_CERT_CLUSTER_RULES,
        ("Role", "model-cache-self-certs"): SELF_CERT_SECRET_RULES,
    }
    assert bindings(kid) == {
        ("ClusterRoleBinding", "model-cache-inventory"): (
            role_ref("ClusterRole", "model-cache-inventory"), SERVICE_ACCOUNT, None),
        ("ClusterRoleBinding", "model-cache-self-certs"): (
            role_ref("ClusterRole", "model-cache-self-certs"), SERVICE_ACCOUNT, None),
        ("RoleBinding", "model-cache-self-certs"): (
            role_ref("Role", "model-cache-self-certs"), SERVICE_ACCOUNT, NAMESPACE),
    }


@pytest.mark.parametrize("kid", EXTERNAL_CERTS)
def test_rbac_with_external_certificates_is_read_only(kid):
    assert rbac(kid) == {("ClusterRole", "model-cache-inventory"): INVENTORY_RULES}
    assert bindings(kid) == {
        ("ClusterRoleBinding", "model-cache-inventory"): (
            role_ref("ClusterRole", "model-cache-inventory"), SERVICE_ACCOUNT, None),
    }


@pytest.mark.parametrize("kid", INSTALLS)
def test_the_pods_run_as_the_bound_service_account(kid):
    spec = one(kid, "Deployment", NAME)["spec"]["template"]["spec"]
    account = one(kid, "ServiceAccount", NAME)
    assert (spec["serviceAccountName"], account["metadata"]["namespace"]) == (NAME, NAMESPACE)


@pytest.mark.parametrize("kid", SELF_MANAGED)
def test_rbac_names_match_the_objects_and_settings(kid):
    # resourceNames are only least-privilege if they name the real objects.
    env = settings(kid)
    assert one(kid, "MutatingWebhookConfiguration")["metadata"]["name"] == env["MODEL_CACHE_WEBHOOK_CONFIGURATION"]
    assert one(kid, "ValidatingWebhookConfiguration")["metadata"]["name"] == env["MODEL_CACHE_WEBHOOK_CONFIGURATION"]
    assert SELF_CERT_CLUSTER_RULES[0]["resourceNames"] == [env["MODEL_CACHE_WEBHOOK_CONFIGURATION"]]
    assert SELF_CERT_SECRET_RULES[0]["resourceNames"] == [env["MODEL_CACHE_TLS_SECRET"]]
    assert one(kid, "Service")["metadata"]["name"] == env["MODEL_CACHE_SERVICE_NAME"]


# --- webhook configurations ------------------------------------------------------------------------------------

NAMESPACE_SELECTOR = {
    "matchExpressions": [
        {"key": annotations.ENABLED_LABEL, "operator": "In", "values": ["true"]},
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NAMESPACE]},
    ]
}
POD_MATCH = "has(object.metadata.annotations) && 'model.cache/ref' in object.metadata.annotations"
WORKLOAD_MATCH = (
    "request.kind.kind == 'Pod' ? true\n"
    ": request.kind.kind == 'CronJob'\n"
    "? (has(object.spec.jobTemplate.spec) &&\n"
    "   has(object.spec.jobTemplate.spec.template.metadata) &&\n"
    "   has(object.spec.jobTemplate.spec.template.metadata.annotations) &&\n"
    "   'model.cache/ref' in object.spec.jobTemplate.spec.template.metadata.annotations)\n"
    ": (has(object.spec.template) &&\n"
    "   has(object.spec.template.metadata) &&\n"
    "   has(object.spec.template.metadata.annotations) &&\n"
    "   'model.cache/ref' in object.spec.template.metadata.annotations)"
)
MUTATING_WEBHOOKS = [
    {
        "name": "pods.model.cache",
        "admissionReviewVersions": ["v1"],
        "clientConfig": {"service": {"name": NAME, "namespace": NAMESPACE, "path": "/mutate", "port": 443}},
        "rules": [
            {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"],
             "scope": "Namespaced"}
        ],
        "namespaceSelector": NAMESPACE_SELECTOR,
        "matchConditions": [{"name": "has-model-ref", "expression": POD_MATCH}],
        "sideEffects": "None",
        "timeoutSeconds": 5,
        "reinvocationPolicy": "IfNeeded",
        "failurePolicy": "Fail",
        "matchPolicy": "Equivalent",
    }
]
VALIDATING_WEBHOOKS = [
    {
        "name": "workloads.model.cache",
        "admissionReviewVersions": ["v1"],
        "clientConfig": {"service": {"name": NAME, "namespace": NAMESPACE, "path": "/validate", "port": 443}},
        "rules": [
            {"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
             "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"], "scope": "Namespaced"},
            {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
             "resources": ["jobs", "cronjobs"], "scope": "Namespaced"},
            {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"],
             "resources": ["pods/ephemeralcontainers"], "scope": "Namespaced"},
        ],
        "namespaceSelector": NAMESPACE_SELECTOR,
        "matchConditions": [{"name": "has-model-ref", "expression": WORKLOAD_MATCH}],
        "sideEffects": "None",
        "timeoutSeconds": 5,
        "failurePolicy": "Fail",
        "matchPolicy": "Equivalent",
    }
]


@pytest.mark.parametrize("kid", INSTALLS)
def test_webhook_configurations_exactly(kid):
    # No caBundle in the manifests: whoever manages certificates fills it in, and re-applying keeps it.
    assert one(kid, "MutatingWebhookConfiguration", NAME)["webhooks"] == MUTATING_WEBHOOKS
    assert one(kid, "ValidatingWebhookConfiguration", NAME)["webhooks"] == VALIDATING_WEBHOOKS


def sent_to_webhook(kind: str, obj: dict, configuration: str) -> bool:
    """Whether the API server would call the webhook for this object, as far as matchConditions decide.

    cel-python is more lenient than the API server's cel-go in one way: has(a.b.c) with a.b absent is false
    here and an error there. The expressions guard every optional step, so both agree on these cases.
    """
    [hook] = one("base", configuration, NAME)["webhooks"]
    env = celpy.Environment()
    activation = {"object": celpy.json_to_cel(obj), "request": celpy.json_to_cel({"kind": {"kind": kind}})}
    results = [env.program(env.compile(c["expression"])).evaluate(activation) for c in hook["matchConditions"]]
    assert all(isinstance(r, celpy.celtypes.BoolType) for r in results), results
    return all(results)


REF = {annotations.REF: "registry.example.com/models/phi3:v1"}


def template(annotations: dict | None) -> dict:
    meta = {"labels": {"app": "x"}} if annotations is None else {"annotations": annotations}
    return {"metadata": meta, "spec": {"containers": [{"name": "app", "image": "app"}]}}


@pytest.mark.parametrize(
    "kind, obj, expected",
    [
        ("Pod", {"metadata": {"annotations": REF}}, True),
        ("Pod", {"metadata": {"annotations": {"model.cache/mode": "auto"}}}, False),
        ("Pod", {"metadata": {"generateName": "app-"}}, False),
    ],
    ids=["annotated", "other-annotations", "no-annotations"],
)
def test_pod_match_condition(kind, obj, expected):
    assert sent_to_webhook(kind, obj, "MutatingWebhookConfiguration") is expected


@pytest.mark.parametrize(
    "kind, obj, expected",
    [
        ("Deployment", {"spec": {"template": template(REF)}}, True),
        ("StatefulSet", {"spec": {"template": template(REF)}}, True),
        ("DaemonSet", {"spec": {"template": template(REF)}}, True),
        ("ReplicaSet", {"spec": {"template": template(REF)}}, True),
        ("Job", {"spec": {"template": template(REF)}}, True),
        ("Deployment", {"spec": {"template": template({"other": "x"})}}, False),
        ("Deployment", {"spec": {"template": template(None)}}, False),
        ("Deployment", {"metadata": {"annotations": REF}, "spec": {"template": template(None)}}, False),
        ("Deployment", {"spec": {"template": {"spec": {}}}}, False),
        ("ReplicaSet", {"spec": {"replicas": 0}}, False),
        ("CronJob", {"spec": {"jobTemplate": {"spec": {"template": template(REF)}}}}, True),
        ("CronJob", {"spec": {"jobTemplate": {"metadata": {"annotations": REF}, "spec": {"template": template(None)}}}},
         False),
        ("CronJob", {"spec": {"jobTemplate": {"metadata": {}}}}, False),
        ("Pod", {"metadata": {}, "spec": {"ephemeralContainers": [{"name": "debugger"}]}}, True),
    ],
    ids=["deployment", "statefulset", "daemonset", "replicaset", "job", "other-annotations", "no-annotations",
         "annotation-on-workload-not-template", "template-without-metadata", "replicaset-without-template",
         "cronjob", "cronjob-annotation-on-job-template", "cronjob-without-job-spec", "ephemeral-containers"],
)
def test_workload_match_condition(kind, obj, expected):
    assert sent_to_webhook(kind, obj, "ValidatingWebhookConfiguration") is expected


@pytest.mark.parametrize("kid", INSTALLS)
def test_webhook_scope_excludes_its_own_namespace(kid):
    own = one(kid, "Deployment", NAME)["metadata"]["namespace"]
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        [hook] = one(kid, kind, NAME)["webhooks"]
        [excluded] = [e for e in hook["namespaceSelector"]["matchExpressions"] if e["operator"] == "NotIn"]
        assert excluded["key"] == "kubernetes.io/metadata.name"
        assert {own, "kube-system"} <= set(excluded["values"])


@pytest.mark.parametrize("kid", INSTALLS)
def test_webhooks_reach_the_service_port(kid):
    service = one(kid, "Service", NAME)
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        [hook] = one(kid, kind, NAME)["webhooks"]
        ref = hook["clientConfig"]["service"]
        assert (ref["name"], ref["namespace"]) == (service["metadata"]["name"], service["metadata"]["namespace"])
        assert ref["port"] in [p["port"] for p in service["spec"]["ports"]]


@pytest.mark.parametrize("kid", SELF_MANAGED + ["manual-certs"])
def test_no_ca_injection_annotation_without_cert_manager(kid):
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        assert "annotations" not in one(kid, kind, NAME)["metadata"]


# --- the Deployment --------------------------------------------------------------------------------------------

POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "fsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.mark.parametrize("kid", INSTALLS)
def test_pods_are_restricted(kid):
    spec = one(kid, "Deployment", NAME)["spec"]["template"]["spec"]
    assert spec["securityContext"] == POD_SECURITY
    assert "initContainers" not in spec
    assert [c["securityContext"] for c in spec["containers"]] == [CONTAINER_SECURITY]
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    assert all("hostPath" not in v for v in spec["volumes"])


@pytest.mark.parametrize("kid", INSTALLS)
def test_namespace_enforces_restricted_pod_security(kid):
    labels = one(kid, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("kid", INSTALLS)
def test_deployment_is_highly_available(kid):
    deployment = one(kid, "Deployment", NAME)
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert spec["selector"] == {"matchLabels": POD_LABELS}
    assert spec["template"]["metadata"]["labels"] == POD_LABELS
    assert spec["template"]["spec"]["affinity"] == {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                    "labelSelector": {"matchLabels": POD_LABELS}}}
            ]
        }
    }
    pdb = one(kid, "PodDisruptionBudget", NAME)
    assert pdb["spec"] == {"minAvailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                           "selector": {"matchLabels": POD_LABELS}}


@pytest.mark.parametrize("kid", INSTALLS)
def test_resources_are_bounded(kid):
    assert webhook_container(kid)["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }


def probe(path: str, **timing) -> dict:
    return {"httpGet": {"scheme": "HTTPS", "port": "probes", "path": path}, **timing}


@pytest.mark.parametrize("kid", INSTALLS)
def test_probes_are_https_on_the_probe_port(kid):
    container = webhook_container(kid)
    assert container["ports"] == [{"name": "https", "containerPort": 8443, "protocol": "TCP"},
                                  {"name": "probes", "containerPort": 8081, "protocol": "TCP"}]
    assert container["startupProbe"] == probe("/healthz", periodSeconds=5, failureThreshold=36)
    assert container["livenessProbe"] == probe("/healthz", periodSeconds=10, timeoutSeconds=2, failureThreshold=3)
    assert container["readinessProbe"] == probe("/readyz", periodSeconds=5, timeoutSeconds=2, failureThreshold=2)


@pytest.mark.parametrize("kid", INSTALLS)
def test_service_443_maps_to_the_container_port(kid):
    service = one(kid, "Service", NAME)
    container = webhook_container(kid)
    assert service["spec"]["selector"] == POD_LABELS
    [port] = service["spec"]["ports"]
    assert (port["port"], port["protocol"]) == (443, "TCP")
    [target] = [p for p in container["ports"] if port["targetPort"] in (p["name"], p["containerPort"])]
    assert target["containerPort"] == 8443


@pytest.mark.parametrize("kid", INSTALLS)
def test_serve_command_line(kid):
    container = webhook_container(kid)
    assert container["image"] == "ghcr.io/model-cache/webhook:0.1.0"
    assert "command" not in container  # the image's ENTRYPOINT is the console script
    assert container["args"] == [
        "serve", "--host", "0.0.0.0", "--port", "8443", "--probe-port", "8081",
        "--tls-cert", f"{TLS_MOUNT}/tls.crt", "--tls-key", f"{TLS_MOUNT}/tls.key",
    ]


@pytest.mark.parametrize("kid", INSTALLS)
def test_certificate_secret_mounted_read_only(kid):
    spec = one(kid, "Deployment", NAME)["spec"]["template"]["spec"]
    container = webhook_container(kid)
    assert container["volumeMounts"] == [
        {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    # Missing at first start when the webhook creates it; required when it comes from outside.
    optional = kid in SELF_MANAGED
    assert spec["volumes"] == [
        {"name": "tls", "secret": {"secretName": TLS_SECRET, "defaultMode": 0o440, "optional": optional}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]


NAMESPACE_FIELD = {"fieldRef": {"fieldPath": "metadata.namespace"}}
BASE_SETTINGS = {
    "MODEL_CACHE_LOADER_IMAGE": "ghcr.io/model-cache/loader:0.1.0",
    "MODEL_CACHE_MANAGE_CERTS": "true",
    "MODEL_CACHE_TLS_SECRET": TLS_SECRET,
    "MODEL_CACHE_SERVICE_NAME": NAME,
    "MODEL_CACHE_WEBHOOK_CONFIGURATION": NAME,
    "MODEL_CACHE_NAMESPACE": NAMESPACE_FIELD,
    "TMPDIR": "/tmp",
    "MALLOC_MMAP_THRESHOLD_": "131072",
}


@pytest.mark.parametrize(
    "kid, expected",
    [
        ("default", BASE_SETTINGS),
        ("base", BASE_SETTINGS),
        ("cert-manager", {**BASE_SETTINGS, "MODEL_CACHE_MANAGE_CERTS": "false"}),
        ("manual-certs", {**BASE_SETTINGS, "MODEL_CACHE_MANAGE_CERTS": "false"}),
        ("pvc-cache", {**BASE_SETTINGS, "MODEL_CACHE_DEFAULT_CACHE": "pvc:model-cache"}),
    ],
)
def test_settings(kid, expected):
    assert settings(kid) == expected


@pytest.mark.parametrize("kid", INSTALLS)
def test_settings_are_known_to_the_webhook(kid):
    # Settings ignores unknown MODEL_CACHE_* variables, so a misspelt name here would silently do nothing.
    names = {name for name in settings(kid) if name.startswith("MODEL_CACHE_")}
    fields = {f"MODEL_CACHE_{field.upper()}" for field in Settings.model_fields}
    assert names - fields == set()


@pytest.mark.parametrize("kid", INSTALLS)
def test_settings_load_as_the_webhook_reads_them(kid, monkeypatch):
    for name in [n for n in os.environ if n.startswith("MODEL_CACHE_")]:
        monkeypatch.delenv(name)
    for name, value in settings(kid).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    loaded = load_settings()
    assert (loaded.loader_image, loaded.default_cache) == (
        "ghcr.io/model-cache/loader:0.1.0",
        "pvc:model-cache" if kid == "pvc-cache" else "node",
    )


def test_match_conditions_use_the_annotation_key_from_code():
    assert POD_MATCH.count(f"'{annotations.REF}'") == 1
    assert WORKLOAD_MATCH.count(f"'{annotations.REF}'") == 2


# --- overlays --------------------------------------------------------------------------------------------------


def test_cert_manager_chain():
    issuers = {o["metadata"]["name"]: o["spec"] for o in objects("cert-manager", "Issuer")}
    certs = {o["metadata"]["name"]: o["spec"] for o in objects("cert-manager", "Certificate")}
    assert issuers == {"model-cache-selfsigned": {"selfSigned": {}}, "model-cache-ca": {"ca": {"secretName": "model-cache-ca"}}}
    ca_issuer = {"group": "cert-manager.io", "kind": "Issuer", "name": "model-cache-ca"}
    assert certs == {
        "model-cache-ca": {
            "isCA": True,
            "commonName": "model-cache-ca.model-cache-system",
            "secretName": issuers["model-cache-ca"]["ca"]["secretName"],
            "duration": "43800h",
            "renewBefore": "8760h",
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Never"},
            "issuerRef": {"group": "cert-manager.io", "kind": "Issuer", "name": "model-cache-selfsigned"},
        },
        "model-cache-serving": {
            "secretName": TLS_SECRET,
            "dnsNames": [NAME, f"{NAME}.{NAMESPACE}", f"{NAME}.{NAMESPACE}.svc", f"{NAME}.{NAMESPACE}.svc.cluster.local"],
            "duration": "2160h",
            "renewBefore": "720h",
            "usages": ["server auth", "digital signature"],
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "issuerRef": ca_issuer,
        },
    }


def test_cert_manager_injects_the_serving_ca_into_both_configurations():
    [serving] = [c for c in objects("cert-manager", "Certificate") if c["spec"]["secretName"] == TLS_SECRET]
    source = f"{serving['metadata']['namespace']}/{serving['metadata']['name']}"
    assert source == "model-cache-system/model-cache-serving"
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        assert one("cert-manager", kind, NAME)["metadata"]["annotations"] == {"cert-manager.io/inject-ca-from": source}


def test_pvc_claim_matches_the_default_cache_setting():
    [claim] = render("pvc-cache-claim")
    assert settings("pvc-cache")["MODEL_CACHE_DEFAULT_CACHE"] == f"pvc:{claim['metadata']['name']}"
    # No namespace: it is applied once per app namespace with -n.
    assert "namespace" not in claim["metadata"]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "volumeMode": "Filesystem",
        "resources": {"requests": {"storage": "500Gi"}},
    }


def test_overlays_change_only_what_they_say():
    def strip(kid: str, kinds: set[str]) -> list[dict]:
        return [o for o in render(kid) if o["kind"] not in kinds]

    # Apart from settings (ConfigMap + its hashed name in the Deployment), RBAC, certificates and the Secret
    # volume's optional flag, every overlay renders the base's objects unchanged.
    varying = {"ConfigMap", "Deployment", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Issuer",
               "Certificate", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
    for kid in ("cert-manager", "manual-certs", "pvc-cache"):
        assert strip(kid, varying) == strip("base", varying)



# --- the node agent's registry settings (the registry-ca component, a plain-HTTP patch) ---------------------------

AGENT_PLAIN_HTTP_PATCH = """\
  - target: {kind: DaemonSet, name: model-cache-agent}
    patch: |-
      - {op: add, path: /spec/template/spec/containers/0/args/-, value: --plain-http-registry}
      - {op: add, path: /spec/template/spec/containers/0/args/-, value: registry.internal:5000}
"""


def agent_with_registry_settings(tmp_path: Path) -> list[dict]:
    """The overlay an admin writes (manifests/overlays/agent/README.md): the component plus the patch."""
    rel = os.path.relpath(KUSTOMIZATIONS["agent"], tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel}]\ncomponents: [{rel}/registry-ca]\npatches:\n{AGENT_PLAIN_HTTP_PATCH}"
    )
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_the_plain_http_patch_is_the_one_the_readme_shows():
    readme = (KUSTOMIZATIONS["agent"] / "README.md").read_text()
    assert AGENT_PLAIN_HTTP_PATCH in readme


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_agent_registry_settings_validate_and_reach_the_loader(tmp_path, version):
    from loader import contract
    from loader.cli import build_parser
    from loader.commands import agent
    from loader.config import LoaderSettings
    from tests.support.kubelet import expand_args

    objs = agent_with_registry_settings(tmp_path)
    plain = [o for o in render("agent")]
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [(o["kind"], o["metadata"]["name"]) for o in plain]
    for o in objs:
        assert kubernetes_validate.validate(o, version, strict=True) == version
    [ds] = [o for o in objs if o["kind"] == "DaemonSet"]
    [before] = [o for o in plain if o["kind"] == "DaemonSet"]
    spec, old = ds["spec"]["template"]["spec"], before["spec"]["template"]["spec"]
    [c, registrar], [c0, registrar0] = spec["containers"], old["containers"]
    assert registrar == registrar0
    ca_file = f"{contract.CA_MOUNT}/{contract.CA_BUNDLE_KEY}"
    assert c["args"] == [*c0["args"], contract.FLAG_CA_FILE, ca_file, contract.FLAG_PLAIN_HTTP_REGISTRY,
                         "registry.internal:5000"]
    assert c["volumeMounts"] == [*c0["volumeMounts"], {"name": "registry-ca", "mountPath": contract.CA_MOUNT,
                                                       "readOnly": True}]
    # The ConfigMap is looked up in the DaemonSet's own namespace; optional, so a missing one is the loader's
    # message (naming the file), not a pod stuck in ContainerCreating.
    assert spec["volumes"] == [*old["volumes"], {"name": "registry-ca", "configMap": {
        "name": "model-cache-registry-ca", "items": [{"key": contract.CA_BUNDLE_KEY, "path": contract.CA_BUNDLE_KEY}],
        "optional": True}}]
    assert {k: v for k, v in c.items() if k not in ("args", "volumeMounts")} == {
        k: v for k, v in c0.items() if k not in ("args", "volumeMounts")}
    args = build_parser(LoaderSettings(), [agent]).parse_args(expand_args(c["args"], {"NODE_NAME": "node-a"}))
    assert (args.ca_file, args.plain_http_registry) == ([ca_file], ["registry.internal:5000"])


# --- certs/generate.sh (the manual certificate path) ------------------------------------------------------------

GENERATE = ROOT / "certs" / "generate.sh"
SERVICE_NAMES = [NAME, f"{NAME}.{NAMESPACE}", f"{NAME}.{NAMESPACE}.svc", f"{NAME}.{NAMESPACE}.svc.cluster.local"]


def run_generate(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the script with the installed model-cache-webhook and a kubectl that renders locally (create
    --dry-run is real kubectl) and records every call that would touch a cluster."""
    bindir, log = tmp_path / "bin", tmp_path / "kubectl.log"
    bindir.mkdir()
    real = shutil.which("kubectl")
    fake = bindir / "kubectl"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = create ]; then exec {real} "$@"; fi\nprintf "%s\\n" "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(GENERATE), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    return done, log


def pem_certs(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data)


def test_generate_writes_secret_and_ca_bundle_patch(tmp_path):
    done, log = run_generate(tmp_path, "--out", "out")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "wrote out/ca.crt out/tls.crt out/tls.key out/secret.yaml out/cabundle-patch.json",
        "install with:",
        "  kubectl patch mutatingwebhookconfiguration model-cache --type=json --patch-file out/cabundle-patch.json",
        "  kubectl patch validatingwebhookconfiguration model-cache --type=json --patch-file out/cabundle-patch.json",
        "  kubectl apply -f out/secret.yaml",
    ]
    assert not log.exists()  # nothing touched a cluster
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "ca-bundle.pem", "ca.crt", "cabundle-patch.json", "secret.yaml", "tls.crt", "tls.key"]
    assert (out / "tls.key").stat().st_mode & 0o077 == 0

    secret = yaml.safe_load((out / "secret.yaml").read_text())
    for version in K8S_VERSIONS:
        assert kubernetes_validate.validate(secret, version, strict=True) == version
    assert secret == {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": TLS_SECRET, "namespace": NAMESPACE, "creationTimestamp": None},
        "data": {
            "tls.crt": base64.b64encode((out / "tls.crt").read_bytes()).decode(),
            "tls.key": base64.b64encode((out / "tls.key").read_bytes()).decode(),
        },
    }
    # The Secret is the one the Deployment mounts.
    [volume] = [v for v in one("manual-certs", "Deployment", NAME)["spec"]["template"]["spec"]["volumes"]
                if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]

    ca_pem = (out / "ca.crt").read_bytes()
    patch = json.loads((out / "cabundle-patch.json").read_text())
    assert patch == [{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": certs.ca_bundle(ca_pem)}]

    # The patch applies to the installed configurations, which stay valid and now trust exactly this CA, and the
    # serving certificate is signed by it for every name of the Service.
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        patched = jsonpatch.apply_patch(one("manual-certs", kind, NAME), patch)
        for version in K8S_VERSIONS:
            assert kubernetes_validate.validate(patched, version, strict=True) == version
        assert base64.b64decode(patched["webhooks"][0]["clientConfig"]["caBundle"]) == ca_pem
    [ca] = pem_certs(ca_pem)
    [leaf] = pem_certs((out / "tls.crt").read_bytes())
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == SERVICE_NAMES


def test_generate_apply_rotates_with_both_cas_trusted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, _ = run_generate(tmp_path / "a", "--out", "old")
    assert first.returncode == 0, first.stderr
    old_ca = tmp_path / "a" / "old" / "ca.crt"
    done, log = run_generate(tmp_path / "b", "--out", "new", "--also-trust", str(old_ca), "--apply")
    assert done.returncode == 0, done.stderr
    kubectl = "kubectl"  # the fake one, first on PATH
    # The caBundle widens before the Secret changes, so the pods' old and new certificates are both trusted.
    assert log.read_text().splitlines() == [
        "patch mutatingwebhookconfiguration model-cache --type=json --patch-file new/cabundle-patch.json",
        "patch validatingwebhookconfiguration model-cache --type=json --patch-file new/cabundle-patch.json",
        "apply -f new/secret.yaml",
    ]
    assert done.stdout.splitlines() == [
        "wrote new/ca.crt new/tls.crt new/tls.key new/secret.yaml new/cabundle-patch.json",
        f"+ {kubectl} patch mutatingwebhookconfiguration model-cache --type=json --patch-file new/cabundle-patch.json",
        f"+ {kubectl} patch validatingwebhookconfiguration model-cache --type=json --patch-file new/cabundle-patch.json",
        f"+ {kubectl} apply -f new/secret.yaml",
        "once every webhook pod serves the new certificate (the pods re-read it within about two minutes),"
        " drop the old CA:",
        f"  {kubectl} patch mutatingwebhookconfiguration model-cache --type=json"
        " --patch-file new/cabundle-final-patch.json",
        f"  {kubectl} patch validatingwebhookconfiguration model-cache --type=json"
        " --patch-file new/cabundle-final-patch.json",
    ]
    new = tmp_path / "b" / "new"
    new_ca = (new / "ca.crt").read_bytes()

    def bundle(name: str) -> bytes:
        [op] = json.loads((new / name).read_text())
        return base64.b64decode(op["value"])

    assert bundle("cabundle-patch.json") == new_ca + old_ca.read_bytes()
    assert bundle("cabundle-final-patch.json") == new_ca
    assert pem_certs(new_ca) != pem_certs(old_ca.read_bytes())


@pytest.mark.parametrize("args", [["--bogus"], ["--out"], ["--also-trust", "missing.crt"]],
                         ids=["unknown", "missing-value", "missing-ca"])
def test_generate_rejects_bad_arguments(tmp_path, args):
    done, log = run_generate(tmp_path, *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert not log.exists() and not (tmp_path / "out").exists()


# --- the network-policy component ---------------------------------------------------------------------------------

NETWORK_POLICY = MANIFESTS / "components" / "network-policy"


def network_policy_overlay(tmp_path: Path) -> list[dict]:
    """The overlay the component's kustomization.yaml shows (its commented example, uncommented, paths adjusted)."""
    text = (NETWORK_POLICY / "kustomization.yaml").read_text()
    example = "\n".join(line[4:] for line in text.splitlines() if line.startswith("#   "))
    base, component = os.path.relpath(MANIFESTS / "base", tmp_path), os.path.relpath(NETWORK_POLICY, tmp_path)
    example = example.replace("[../../base]          # or the remote base", f"[{base}]")
    example = example.replace("[../../components/network-policy]", f"[{component}]")
    (tmp_path / "kustomization.yaml").write_text(example + "\n")
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.parametrize("kid", INSTALLS)
def test_no_install_restricts_the_network_by_default(kid):
    assert [o for o in render(kid) if o["kind"] == "NetworkPolicy"] == []


def test_the_network_policy_admits_the_api_server_on_the_serving_port_and_anyone_on_the_probe_port(tmp_path):
    objs = network_policy_overlay(tmp_path)
    [policy] = [o for o in objs if o["kind"] == "NetworkPolicy"]
    for version in K8S_VERSIONS:
        assert kubernetes_validate.validate(policy, version, strict=True) == version
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert policy["spec"] == {
        "podSelector": {"matchLabels": POD_LABELS},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/28"}}], "ports": [{"port": "https", "protocol": "TCP"}]},
            {"ports": [{"port": "probes", "protocol": "TCP"}]},
        ],
    }
    # The named ports are the container's; the Service reaches the one the API server is admitted on; the probes
    # use the other.
    [deployment] = [o for o in objs if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"https": 8443, "probes": 8081}
    [service] = [o for o in objs if o["kind"] == "Service"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["https"]
    assert {container[p]["httpGet"]["port"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {"probes"}
    # Everything else is the base, unchanged.
    assert [o for o in objs if o["kind"] != "NetworkPolicy"] == list(render("base"))
