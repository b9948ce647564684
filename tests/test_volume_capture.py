"""Property: no pod, whatever it names, gets the node cache anywhere but its model's subPath, read-only.

Issue 11 (item 3): a container ``volumeMount`` naming a volume the pod never declared (``model-cache``) used to
resolve, after mutation, to the node cache hostPath, read-write and without subPath. Here hypothesis builds pods
whose containers, init containers and ephemeral containers mount and attach (``volumeDevices``) names drawn from a
small alphabet holding the injected names, beside hostPath volumes at the node cache, inside it, above it and next
to it, and sends each through the webhook's own entry point (``mutate_review``; the patch applied as the API server
applies it). Each review either is denied (``validate_review`` agrees, and a pod that references the cache is
always denied, naming the field) or yields a pod in which

- no reference the pod made resolves to a volume the webhook injected;
- the cache volume is mounted only by the loader (at its own ``/cache``) and by the targeted containers, only at a
  model's directory with that model's ``subPathExpr``, read-only, never as a device;
- image volumes are mounted only in the targeted containers, read-only;
- no hostPath volume points at, into or above the node cache but the injected one.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jsonpatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader import contract
from loader.reference import parse
from tests.test_admission import decode, fresh_snapshot, review
from webhook import annotations as ann
from webhook.admission import mutate_review, validate_review
from webhook.config import Settings

# crio-a (pool=crio, can mount image volumes), ctrd-a (pool=ctrd, runs the node agent: the CSI path); ml is restricted
SNAPSHOT = dataclasses.replace(fresh_snapshot(), agents=frozenset({"ctrd-a"}))
SETTINGS = [Settings(), Settings(registry_ca_configmap="registry-ca", node_cache_path="/mnt/nvme/models")]
REFS = {"phi3": "registry.example.com/models/phi3:v1", "embed": "registry.example.com/models/bge:v2"}
KINDS = ("containers", "initContainers", "ephemeralContainers")
CONTAINER_NAMES = {
    "containers": ["server", "side", "app"],
    "initContainers": ["init-a", "init-b"],
    "ephemeralContainers": ["debug-a", "debug-b"],
}
#: Names a pod may use: the ones the webhook injects (and their suffixed forms), an image-volume name, others.
VOLUME_NAMES = ["model-cache", "model-cache-2", "model-cache-ca", "model-cache-pull-regcred", "model-phi3",
                "model-phi3-2", "data", "tmp"]
MOUNT_PATHS = ["/data", "/cache", "/models", "/models/phi3", "/srv/m/embed", "/var/lib/model-cache"]


def _host_paths(cache: str) -> list[str]:
    """The cache path, spelled several ways, its children and parents, and paths beside it."""
    parent = cache.rsplit("/", 1)[0] or "/"
    return [cache, cache + "/", cache + "/blobs/sha256", "/" + cache, cache + "/../" + cache.rsplit("/", 1)[1],
            cache.lstrip("/"), parent, "/", cache + "-old", parent + "/x", "/srv/data"]


def _parts(path: str) -> tuple[str, ...]:
    """A host path as the node resolves it (relative from kubelet's working directory, /), as components."""
    out: list[str] = []
    for part in path.split("/"):
        if part == "..":
            out = out[:-1]
        elif part not in ("", "."):
            out.append(part)
    return tuple(out)


def _touches_cache(path: str, cache: str) -> bool:
    a, b = _parts(path), _parts(cache)
    return a[: len(b)] == b or b[: len(a)] == a


@st.composite
def pods(draw: st.DrawFn, cache_path: str) -> dict[str, Any]:
    # Half the pods draw only from names and paths a pod may use freely (image-volume names included), so that many
    # get through to be checked after mutation; the other half from everything.
    hostile = draw(st.booleans())
    names = st.sampled_from(VOLUME_NAMES if hostile else VOLUME_NAMES[4:])
    paths = _host_paths(cache_path)
    spec: dict[str, Any] = {}
    for kind in KINDS:
        count = draw(st.integers(1 if kind == "containers" else 0, len(CONTAINER_NAMES[kind])))
        containers = []
        for name in CONTAINER_NAMES[kind][:count]:
            container: dict[str, Any] = {"name": name, "image": "registry.example.com/app:1"}
            mounts = draw(st.lists(st.fixed_dictionaries(
                {"name": names, "mountPath": st.sampled_from(MOUNT_PATHS)},
                optional={"readOnly": st.booleans()}), max_size=3))
            devices = draw(st.lists(st.fixed_dictionaries(
                {"name": names, "devicePath": st.sampled_from(["/dev/a", "/dev/b"])}),
                max_size=2))
            if mounts:
                container["volumeMounts"] = mounts
            if devices:
                container["volumeDevices"] = devices
            containers.append(container)
        if containers:
            spec[kind] = containers
    volumes = []
    for name in draw(st.lists(st.sampled_from(VOLUME_NAMES), unique=True, max_size=4)):
        path = draw(st.one_of(st.none(), st.sampled_from(paths if hostile else paths[-3:])))
        volumes.append({"name": name, "emptyDir": {}} if path is None else {"name": name, "hostPath": {"path": path}})
    if volumes:
        spec["volumes"] = volumes
    if draw(st.booleans()):
        spec["imagePullSecrets"] = [{"name": "regcred"}]
    if draw(st.booleans()):
        spec["nodeSelector"] = {"pool": draw(st.sampled_from(["crio", "ctrd"]))}
    annotations = {ann.REF: ", ".join(f"{n}={REFS[n]}" for n in draw(st.sampled_from([["phi3"], ["phi3", "embed"]])))}
    annotations.update(draw(st.fixed_dictionaries({}, optional={
        ann.MODE: st.sampled_from(ann.MODES),
        ann.CACHE: st.sampled_from(["node", "pod", "pvc:store"]),
        ann.MOUNT_PATH: st.sampled_from(["/models", "/srv/m"]),
        ann.CONTAINERS: st.sampled_from(["server", "server,init-a", "side", "server,side"]),
    })))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "p-", "annotations": annotations},
            "spec": spec}


def _references(spec: dict[str, Any]) -> list[tuple[str, int, str, int, str]]:
    return [(kind, i, field, j, ref["name"])
            for kind in KINDS for i, c in enumerate(spec.get(kind) or ())
            for field in ("volumeMounts", "volumeDevices") for j, ref in enumerate(c.get(field) or ())]


def _expected_denial_field(spec: dict[str, Any], cache_path: str) -> str | None:
    """The field a denial must name when the pod itself references the node cache, else None."""
    for i, volume in enumerate(spec.get("volumes") or ()):
        if "hostPath" in volume and _touches_cache(volume["hostPath"]["path"], cache_path):
            return f"spec.volumes[{i}].hostPath.path is "
    defined = {v["name"] for v in spec.get("volumes") or ()}
    for kind, i, field, j, name in _references(spec):
        if name not in defined and (name == "model-cache" or name.startswith("model-cache-")):
            return f"spec.{kind}[{i}].{field}[{j}].name is "
    return None


def _check_mutated(before: dict[str, Any], after: dict[str, Any], cfg: Settings) -> None:
    annotations = before["metadata"]["annotations"]
    spec, new = before["spec"], after["spec"]
    models = {}
    for entry in annotations[ann.REF].split(", "):
        name, ref = entry.split("=")
        models[name] = parse(ref)
    base = annotations.get(ann.MOUNT_PATH, cfg.default_mount_path).rstrip("/")
    targets = (set(annotations[ann.CONTAINERS].split(",")) if ann.CONTAINERS in annotations
               else {c["name"] for c in spec["containers"]})
    own = {v["name"] for v in spec.get("volumes") or ()}
    injected = {v["name"]: v for v in new["volumes"] if v["name"] not in own}
    assert injected
    assert [v for v in new["volumes"] if v["name"] in own] == spec.get("volumes", [])

    # No reference the pod made resolves to an injected volume.
    assert not {ref[-1] for ref in _references(spec)} & set(injected)

    mode = after["metadata"]["annotations"][ann.STATUS].split(":")[0]
    loaders = [c for c in new.get("initContainers") or () if c["image"] == cfg.loader_image]
    assert len(loaders) == (mode == ann.INIT_CONTAINER)
    cache_name = None
    if loaders:
        (cache_name,) = [m["name"] for m in loaders[0]["volumeMounts"] if m["mountPath"] == contract.CACHE_MOUNT]
        assert cache_name in injected

    for kind in KINDS:
        for container in new.get(kind) or ():
            is_loader = bool(loaders) and container is loaders[0]
            for device in container.get("volumeDevices") or ():
                assert device["name"] not in injected
            for mount in container.get("volumeMounts") or ():
                if mount["name"] not in injected:
                    continue
                if is_loader:
                    if mount["name"] == cache_name:
                        assert mount == {"name": cache_name, "mountPath": contract.CACHE_MOUNT}  # its own, writable
                    else:
                        assert mount["readOnly"] is True
                    continue
                assert kind != "ephemeralContainers" and container["name"] in targets
                assert mount["readOnly"] is True and "subPath" not in mount
                model = mount["mountPath"][len(base) + 1:]
                assert mount["mountPath"] == f"{base}/{model}" and model in models
                if mount["name"] == cache_name:
                    assert mount["subPathExpr"] == contract.pod_subpath_expr(models[model])
                else:  # an image volume or the node agent's CSI volume holds the model itself, read-only
                    volume = injected[mount["name"]]
                    assert "subPathExpr" not in mount
                    assert "image" in volume or volume["csi"]["readOnly"] is True
                    if "csi" in volume:
                        assert volume["csi"]["volumeAttributes"] == {contract.CSI_ATTR_REF: str(models[model])}

    # No hostPath reaches the node cache but the injected one.
    reaching = [v["name"] for v in new["volumes"]
                if "hostPath" in v and _touches_cache(v["hostPath"]["path"], cfg.node_cache_path)]
    assert reaching in ([], [cache_name])
    if reaching:
        assert injected[cache_name]["hostPath"]["path"] == cfg.node_cache_path


@given(data=st.data(), which=st.integers(0, 1), namespace=st.sampled_from(["ml", "open"]))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_no_mutated_pod_mounts_the_node_cache_outside_its_models_subpath_or_writable(data, which, namespace):
    cfg = SETTINGS[which]
    pod = data.draw(pods(cfg.node_cache_path))
    before = copy.deepcopy(pod)
    body = review(pod, namespace=namespace)
    result = mutate_review(body, SNAPSHOT, cfg)["response"]
    assert pod == before
    validated = validate_review(body, SNAPSHOT, cfg)["response"]
    assert validated["allowed"] == result["allowed"]
    field = _expected_denial_field(pod["spec"], cfg.node_cache_path)
    if not result["allowed"]:
        message = result["status"]["message"]
        assert validated["status"]["message"] == message
        if field is not None:
            assert message.startswith(field)
        return
    assert field is None
    after = jsonpatch.apply_patch(pod, decode({"response": result}))
    _check_mutated(pod, after, cfg)
