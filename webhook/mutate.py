"""Pure: read a pod's model.cache annotations into a plan, and rewrite the pod so the models are mounted.

``mutate_pod(pod, namespace_labels, snapshot, settings)`` returns an ``Outcome`` (the new pod, warnings, the
mode and the reason) or raises ``Denied``. It never changes its argument: the new pod copies only the dicts and
lists the injectors change and shares everything else with the input, so the patch computed from the two touches
only what the injectors touched, and finding it skips the shared subtrees by identity.

The injectors are small and each does one thing: the model volumes (image mode) or the cache and pull-secret
volumes plus the loader init container (init mode), the read-only mounts, the environment variables, and the
status annotation. The status annotation is the idempotency check for all of them: a pod that carries it is
returned unchanged (``reinvocationPolicy: IfNeeded`` calls the webhook twice).

Pinning (issue 15): kubelet resolves a subPath afresh on every container (re)start, so the app must not mount
the ``refs/`` link a tag move replaces. In init mode every target container mounts ``pods/<pod-uid>/<key>``
(``contract.pod_subpath_expr``: a ``subPathExpr`` over ``MODEL_CACHE_POD_UID``, which the webhook sets from the
downward API's ``metadata.uid``), the link the pod's own loader wrote to the digest it verified. The variable is
reserved: a target container that defines it is refused, in either mode, since its own value would point the
mount at another pod's entry. The loader gets the UID and ``spec.nodeName`` the same way and receives them as
``--pod-uid $(MODEL_CACHE_POD_UID) --node-name $(MODEL_CACHE_NODE_NAME)`` (kubelet expands ``$(VAR)`` in args).
Nothing here depends on the UID itself, so answers stay shareable between replicas (webhook/memo.py).

Bounded work: a pod over the ceilings (``MAX_CONTAINERS`` and the rest) is denied before anything is planned, and
every name is found in O(1) amortised probes (``Namer``), so a review costs time linear in its size. Nothing the
pod names becomes a path: pull secrets are mounted at their position, never at their (validated) name.

Nothing the pod references may capture an injected volume (issue 11): injected volumes never take a name the pod
uses anywhere (``spec.volumes``, and the ``volumeMounts`` and ``volumeDevices`` of containers, init containers and
ephemeral containers), so a reference to a volume the pod does not define stays dangling and the API server
refuses the pod, rather than resolving to the node cache (the whole cache, writable, without subPath). Before
that, a pod is denied, naming the field, when it references the node cache itself: a container (of any kind) that
mounts an undefined volume named like the injected ones (``model-cache``, ``model-cache-*``), or a hostPath volume
at the node cache path, inside it or above it (compared after normalising the path; the webhook cannot see host
symlinks, which is one more reason the namespace's Pod Security level should refuse hostPath). So the app only
ever sees its model's subPath, read-only; the loader alone mounts the cache whole.

Security choice for the loader: with the ``node`` cache the hostPath directory is created by kubelet owned by
root (``DirectoryOrCreate``), so there the loader runs as uid 0 with every capability dropped, no privilege
escalation, a read-only root filesystem and the RuntimeDefault seccomp profile (root without capabilities can
write only to what root owns). With ``pod`` (emptyDir, world-writable) and ``pvc`` caches it runs as
``settings.loader_run_as_user`` with ``runAsNonRoot``, which also satisfies the ``restricted`` Pod Security level;
a claim used as a cache must be writable by that uid (or by the pod's fsGroup).
"""

from __future__ import annotations

import json
import math
import operator
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from loader import contract
from loader.policy import Rule, rule_for, under_prefix
from loader.reference import Reference, ReferenceError, parse, speaks_plain_http
from webhook import annotations as ann
from webhook.config import Settings, parse_quantity
from webhook.errors import Denied
from webhook.nodes import Choice, choose_mode
from webhook.snapshot import Snapshot

LOADER_NAME = "model-loader"
CACHE_VOLUME = "model-cache"
PULL_SECRET_VOLUME = "model-cache-pull-"
CA_VOLUME = "model-cache-ca"
MODEL_VOLUME = "model-"
#: Where the API server mounts the service account token in every container (unless the pod opts out).
SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
LOADER_OUTPUT = "text"  # the loader's progress format in `kubectl logs`
#: The keys of the two pull-secret types (kubernetes.io/dockerconfigjson, legacy kubernetes.io/dockercfg) and the
#: file each becomes in the secret's directory: the names the loader looks for in a --docker-config directory.
PULL_SECRET_ITEMS = ({"key": ".dockerconfigjson", "path": "config.json"}, {"key": ".dockercfg", "path": ".dockercfg"})

#: Ceilings on what one review makes the webhook process. A pod over one is denied with a message naming the limit
#: and the field, never processed slowly: with ``failurePolicy: Fail`` a slow review stalls every pod creation.
#: Kubernetes sets none of these (only the 1.5 MiB object size), so each is chosen far above real pods: sidecar-
#: heavy pods run a dozen or two containers and a hundred-odd volumes (one projected token per sidecar, configs,
#: secrets), and clusters give a pod one to a few pull secrets.
MAX_CONTAINERS = 256  # containers + initContainers + ephemeralContainers
MAX_VOLUMES = 1024  # spec.volumes
MAX_PULL_SECRETS = 256  # spec.imagePullSecrets (not validated by Kubernetes at all)
#: Each model.cache/* annotation value: 32 references of the longest kind (255 before the tag, a 128-character
#: tag, a digest and a 63-character name) fit in 16 KiB.
MAX_ANNOTATION_CHARS = 16 * 1024
MAX_WARNED = 8  # unknown model.cache/* annotations warned about one by one
#: Models per pod, and models x target containers: each pair is one mount and one env var in the target, so the patch
#: grows with the product, not with the review (256 targets x 458 short references in 16 KiB: a 53 MB patch after
#: 0.54 s on the event loop; bench/admission.py --attacks ceiling-pods). Real pods mount a few models in a few containers.
MAX_MODELS = 32
MAX_MODEL_MOUNTS = 1024
#: Secret names are DNS-1123 subdomains (what the API server requires of a Secret's name), matched whole.
_SECRET_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
_MODEL_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_NOT_DNS = re.compile(r"[^a-z0-9-]+")
_NAME = operator.itemgetter("name")  # containers, env vars and volumes: a pod has hundreds of them
_CONTAINER_KEYS = ("containers", "initContainers", "ephemeralContainers")
_REFERENCE_FIELDS = ("volumeMounts", "volumeDevices")  # where a container names a volume
_QOS_RESOURCES = ("cpu", "memory")  # the resources Kubernetes derives a pod's QoS class from


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    """An env var from the downward API: kubelet fills it in when the container starts."""
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


@dataclass(frozen=True, slots=True)
class Model:
    name: str  # directory under the mount path
    ref: Reference

    @property
    def env(self) -> str:
        return ann.env_name(self.name)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the annotations ask for, validated."""

    models: tuple[Model, ...]
    mount_path: str
    containers: tuple[str, ...]  # target container names, resolved against the pod
    mode: str
    mode_explicit: bool
    cache: str  # node, pod or pvc
    claim: str | None
    cache_explicit: bool
    # Each model with the signature-policy rule its reference matches (the longest prefix); models no rule matches
    # are left out. Read once here; the decision and the loader's arguments both use it.
    rules: tuple[tuple[Model, Rule], ...] = ()

    def path(self, model: Model) -> str:
        return posixpath.join(self.mount_path, model.name)


@dataclass(frozen=True, slots=True)
class Outcome:
    pod: dict[str, Any]
    warnings: tuple[str, ...]
    mode: str | None  # image-volume, csi or init-container; None when the pod was left alone
    reason: str  # one line: why this mode (and which cache), or why the pod was left alone

    @property
    def status(self) -> str:
        """The STATUS annotation value: ``<mode>: <reason>``."""
        return f"{self.mode}: {self.reason}"


# --- reading the annotations -------------------------------------------------------------------------------------


def _registry_allowed(ref: Reference, settings: Settings) -> bool:
    """Under an entry of MODEL_CACHE_ALLOWED_REGISTRIES, spoken to as the loader will: an entry names a scheme too
    (plain http for a loopback or listed host, else https), so naming `reg.internal` (listed as plain http, port 80)
    admits no `reg.internal:443` (https, another service)."""
    if not settings.allowed_registries:
        return True
    plain = settings.plain_http_registries
    https = not speaks_plain_http(ref.registry, plain)

    def admits(entry: str) -> bool:
        entry_https = not speaks_plain_http(entry.partition("/")[0], plain)
        return entry_https == https and under_prefix(entry, ref.registry, ref.repository, https=https)

    return any(admits(entry) for entry in settings.allowed_registries)


def read_models(value: str, settings: Settings) -> tuple[Model, ...]:
    """Parse ``model.cache/ref``: ``REF[,REF...]`` where each REF may be ``name=REF``."""
    entries = [e.strip(ann.SPACE) for e in value.split(",")]
    entries = [e for e in entries if e]
    if not entries:
        raise Denied(f"{ann.REF} is empty: set it to a model reference such as registry.example.com/models/phi3:v1")
    if len(entries) > MAX_MODELS:
        raise Denied(
            f"{ann.REF} names {len(entries)} models, over this webhook's limit of {MAX_MODELS} (model.cache processes no"
            " pod beyond it); split the pod or remove models it does not use"
        )
    models: list[Model] = []
    for entry in entries:
        name, eq, text = entry.partition("=")
        if not eq:
            name, text = "", entry
        name, text = name.strip(ann.SPACE), text.strip(ann.SPACE)
        try:
            ref = parse(text)
        except ReferenceError as exc:
            raise Denied(f"{ann.REF}: {exc}") from exc
        if not _registry_allowed(ref, settings):
            raise Denied(
                f"{ann.REF}: {ann.shown(text)} is in registry {ref.registry}, which is not allowed in this cluster"
                f" (allowed: {', '.join(settings.allowed_registries)}); push the model to an allowed registry"
                " or ask the cluster admin to extend MODEL_CACHE_ALLOWED_REGISTRIES"
            )
        if eq and not name:
            raise Denied(f"{ann.REF}: {ann.shown(entry)} has an empty name before '='; write name=REF, e.g. phi3=" + text)
        name = name or ref.name
        if not _MODEL_NAME.fullmatch(name):
            raise Denied(
                f"{ann.REF}: model name {ann.shown(name)} cannot be a directory name here: use 1-63 letters, digits, '.',"
                f" '_' or '-', starting and ending with a letter or digit (set it with name=REF)"
            )
        models.append(Model(name, ref))
    seen: dict[str, Model] = {}
    envs: dict[str, Model] = {}
    for m in models:
        if m.name in seen:
            raise Denied(
                f"{ann.REF} gives two models the name {m.name!r} ({seen[m.name].ref} and {m.ref}); name them apart"
                f" with name=REF, e.g. {m.name}-2={m.ref}"
            )
        if m.env in envs:
            raise Denied(
                f"{ann.REF}: model names {envs[m.env].name!r} and {m.name!r} both give the environment variable"
                f" {m.env}; rename one with name=REF"
            )
        seen[m.name] = envs[m.env] = m
    return tuple(models)


def _read_mount_path(annotations: Mapping[str, str], settings: Settings) -> str:
    raw = annotations.get(ann.MOUNT_PATH)
    if raw is None:
        return settings.default_mount_path
    value = raw.strip(ann.SPACE)
    parts = value.split("/")
    bad = ann.ANY_CONTROL.search(value)
    if bad:
        raise Denied(
            f"{ann.MOUNT_PATH} is {ann.shown(raw)}, which contains the control character {bad.group()!r}: use an"
            " absolute directory of printable characters, such as /models"
        )
    if not value.startswith("/") or ".." in parts or posixpath.normpath(value) in ("/", "//"):
        raise Denied(
            f"{ann.MOUNT_PATH} is {ann.shown(raw)}: use an absolute directory other than / without '..', such as"
            " /models"
        )
    return posixpath.normpath(value)


def _container_names(spec: Mapping[str, Any], key: str) -> list[str]:
    return list(map(_NAME, spec.get(key) or ()))


def _read_containers(annotations: Mapping[str, str], spec: Mapping[str, Any]) -> tuple[str, ...]:
    app = _container_names(spec, "containers")
    raw = annotations.get(ann.CONTAINERS)
    if raw is None:
        return tuple(app)
    init = _container_names(spec, "initContainers")
    known = set(app) | set(init)
    names = list(dict.fromkeys(n.strip(ann.SPACE) for n in raw.split(",") if n.strip(ann.SPACE)))
    listing = f"containers: {', '.join(app) or '(none)'}" + (f"; init containers: {', '.join(init)}" if init else "")
    if not names:
        raise Denied(f"{ann.CONTAINERS} is {ann.shown(raw)}, which names no container; {listing}")
    unknown = [n for n in names if n not in known]
    if unknown:
        which = ", ".join(ann.shown(n) for n in unknown[:MAX_WARNED]) + (" and more" if len(unknown) > MAX_WARNED else "")
        raise Denied(f"{ann.CONTAINERS} names {which}, not a container of this pod; {listing}")
    return tuple(names)


def read_plan(annotations: Mapping[str, str], spec: Mapping[str, Any], settings: Settings) -> tuple[Plan, tuple[str, ...]]:
    """Validate every model.cache annotation of a pod; Denied on the first bad one. Returns (plan, warnings)."""
    unknown = [key for key in annotations if key.startswith(ann.PREFIX) and key not in ann.USER_KEYS and key != ann.STATUS]
    known = ", ".join(k.removeprefix(ann.PREFIX) for k in ann.USER_KEYS)
    # One warning per key up to a few, then a count: a pod may carry thousands of keys, the response stays small.
    warnings = tuple(f"model.cache: unknown annotation {key} ignored (known: {known})" for key in unknown[:MAX_WARNED])
    if len(unknown) > MAX_WARNED:
        warnings += (f"model.cache: {len(unknown) - MAX_WARNED} more unknown model.cache annotations ignored",)
    for key in ann.USER_KEYS:
        raw = annotations.get(key)
        bad = ann.CONTROL.search(raw) if raw is not None else None
        if bad:
            raise Denied(
                f"{key} is {ann.shown(raw or '')}, which contains the control character {bad.group()!r}: write the"
                " value with printable characters only (commas, spaces and newlines may separate list entries)"
            )
    models = read_models(annotations.get(ann.REF, ""), settings)
    mount_path = _read_mount_path(annotations, settings)
    containers = _read_containers(annotations, spec)
    if len(models) * len(containers) > MAX_MODEL_MOUNTS:
        raise Denied(
            f"{ann.REF} and {ann.CONTAINERS}: {len(models)} models in {len(containers)} containers are"
            f" {len(models) * len(containers)} mounts, over this webhook's limit of {MAX_MODEL_MOUNTS}; list only the"
            f" containers that read the models in {ann.CONTAINERS}"
        )

    raw_mode = annotations.get(ann.MODE)
    mode = settings.default_mode if raw_mode is None else raw_mode.strip(ann.SPACE)
    if mode not in ann.MODES:
        raise Denied(f"{ann.MODE} is {ann.shown(raw_mode or '')}: use auto, image-volume, csi or init-container")

    raw_cache = annotations.get(ann.CACHE)
    try:
        cache, claim = ann.parse_cache(settings.default_cache if raw_cache is None else raw_cache)
    except ValueError as exc:
        raise Denied(f"{ann.CACHE} is {ann.shown(raw_cache or '')}: {exc}") from exc

    plan = Plan(models, mount_path, containers, mode, raw_mode is not None, cache, claim, raw_cache is not None,
                _matched_rules(models, settings))
    return plan, warnings


# --- small helpers over the raw dict -----------------------------------------------------------------------------


def _dns_label(text: str) -> str:
    return _NOT_DNS.sub("-", text.lower()).strip("-")


class Namer:
    """DNS-label names not in ``taken``, each found in O(1) amortised probes.

    A free stem is used as it is (``model-cache``); a taken one gets ``-<n>`` from one counter shared by every stem
    of this namer, so no suffix is ever tried twice. A probe that fails has hit a taken name ending in ``-<n>``, and
    each taken name ends in one such suffix: all the failed probes together number at most ``len(taken)``, whatever
    the names are (thousands of pull secrets that differ only in case or separators map to one stem; probing
    ``base-2``, ``base-3``, ... per stem made that quadratic). ``probes`` counts the membership tests, for tests.
    """

    __slots__ = ("_next", "probes", "taken")

    def __init__(self, taken: set[str]) -> None:
        self.taken = taken
        self._next = 2
        self.probes = 0

    def name(self, base: str) -> str:
        stem = _dns_label(base)[:63].rstrip("-") or "model"
        name = stem
        self.probes += 1
        while name in self.taken:
            suffix = f"-{self._next}"
            self._next += 1
            name = stem[: 63 - len(suffix)].rstrip("-") + suffix
            self.probes += 1
        self.taken.add(name)
        return name


def unique_name(base: str, taken: set[str]) -> str:
    """A DNS label from ``base`` not in ``taken`` (then added to it): ``base``, else ``base-2``, ``base-3``, ...
    (one name; several names from one set: a ``Namer``)."""
    return Namer(taken).name(base)


def _over(field: str, count: int, limit: int, what: str) -> Denied:
    return Denied(
        f"{field} has {count} {what}, over this webhook's limit of {limit} (model.cache processes no pod beyond"
        f" it); split the pod or remove {what} it does not use"
    )


def check_bounds(annotations: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
    """Deny, naming the field and the limit, a pod with more than the webhook processes (see MAX_CONTAINERS)."""
    for key in ann.USER_KEYS:
        value = annotations.get(key)
        if isinstance(value, str) and len(value) > MAX_ANNOTATION_CHARS:
            raise Denied(
                f"{key} is {len(value)} characters long, over this webhook's limit of {MAX_ANNOTATION_CHARS}:"
                f" {ann.shown(value)}; shorten it"
            )
    containers = sum(len(spec.get(key) or ()) for key in _CONTAINER_KEYS)
    if containers > MAX_CONTAINERS:
        raise _over("spec.containers, spec.initContainers and spec.ephemeralContainers", containers, MAX_CONTAINERS,
                    "containers")
    volumes = len(spec.get("volumes") or ())
    if volumes > MAX_VOLUMES:
        raise _over("spec.volumes", volumes, MAX_VOLUMES, "volumes")
    secrets = len(spec.get("imagePullSecrets") or ())
    if secrets > MAX_PULL_SECRETS:
        raise _over("spec.imagePullSecrets", secrets, MAX_PULL_SECRETS, "entries")
    for i, ref in enumerate(spec.get("imagePullSecrets") or ()):
        name = ref.get("name")
        if name and not (len(name) <= 253 and _SECRET_NAME.fullmatch(name)):
            raise Denied(
                f"spec.imagePullSecrets[{i}].name is {ann.shown(name)}, which cannot be a Secret's name (a DNS"
                " subdomain: up to 253 lowercase letters, digits, '-' and '.'); name the pull secret as it is"
                " called in the namespace"
            )


def pull_secret_names(spec: Mapping[str, Any]) -> list[str]:
    """The pod's pull-secret names, first occurrence of each (entries without a name are skipped, as kubelet does)."""
    return list(dict.fromkeys(s["name"] for s in spec.get("imagePullSecrets") or () if s.get("name")))


def _copy_for_edit(pod: Mapping[str, Any], targets: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of the pod in which exactly the dicts the injectors edit are new objects; the rest is shared.

    Copying a 30 KB pod deeply costs more than the whole decision, and sharing the untouched subtrees also lets
    the patch diff skip them by identity. The injectors only ever assign new lists and dicts into these copies;
    they never edit a shared list in place, so the input pod stays as it was.
    """
    new = dict(pod)
    new["metadata"] = dict(pod.get("metadata") or {})
    spec = new["spec"] = dict(pod.get("spec") or {})
    wanted = set(targets)
    for key in ("containers", "initContainers"):
        if spec.get(key):
            spec[key] = [dict(c) if c["name"] in wanted else c for c in spec[key]]
    return new, spec


def _targets(spec: dict[str, Any], names: tuple[str, ...]) -> list[dict[str, Any]]:
    wanted = set(names)
    return [c for key in ("containers", "initContainers") for c in spec.get(key) or () if c["name"] in wanted]


def _check_reserved_env(targets: list[dict[str, Any]]) -> None:
    for container in targets:
        if contract.ENV_POD_UID in map(_NAME, container.get("env") or ()):
            raise Denied(
                f"container {container['name']!r} defines the environment variable {contract.ENV_POD_UID}, which"
                " model.cache reserves: the webhook sets it to the pod's UID so that the container mounts the model"
                f" its own loader verified; remove {contract.ENV_POD_UID} from the container's env"
            )


def _volume_references(spec: Mapping[str, Any]) -> Iterator[tuple[str, int, str, int, str]]:
    """Every place a container names a volume, as (container key, index, field, index, name): the volumeMounts and
    volumeDevices of containers, init containers and ephemeral containers.

    Only the containers' names and mounts are shape-checked before the decision (webhook/models.py); anything else
    that is not a list of objects with a string name names no volume here (the API server refuses it anyway).
    """
    for key in _CONTAINER_KEYS:
        containers = spec.get(key)
        if not isinstance(containers, list):
            continue
        for i, container in enumerate(containers):
            if not isinstance(container, dict):
                continue
            for field in _REFERENCE_FIELDS:
                refs = container.get(field)
                if not isinstance(refs, list):
                    continue
                for j, ref in enumerate(refs):
                    name = ref.get("name") if isinstance(ref, dict) else None
                    if isinstance(name, str):
                        yield key, i, field, j, name


def _taken_volume_names(spec: Mapping[str, Any]) -> set[str]:
    """Volume names an injected volume must not take: the pod's volumes and every name a container of any kind
    mounts or attaches (a reference to a volume the pod does not define would otherwise capture the injected one)."""
    taken = set(map(_NAME, spec.get("volumes") or ()))
    taken.update(ref[-1] for ref in _volume_references(spec))
    return taken


def _injected_name(name: str) -> bool:
    """Whether ``name`` is one the webhook gives the volumes it injects in init mode (cache, CA, pull secrets)."""
    return name == CACHE_VOLUME or name.startswith(CACHE_VOLUME + "-")


def _host_path(path: str) -> str:
    """A hostPath as the node resolves it, for comparison: absolute (a relative one is taken from kubelet's working
    directory, ``/``), ``.``/``..``/repeated slashes folded."""
    return "/" + posixpath.normpath("/" + path).lstrip("/")


def _relation(path: str, cache: str) -> str | None:
    """How a (normalised) host path relates to the (normalised) node cache path, or None when they are apart."""
    if path == cache:
        return "the node cache"
    if path.startswith(cache + "/"):
        return "inside the node cache"
    if cache.startswith(path.rstrip("/") + "/"):
        return "a parent of the node cache"
    return None


def check_volume_references(spec: Mapping[str, Any], settings: Settings) -> None:
    """Deny, naming the field, a pod that references the node cache itself: a hostPath volume at, inside or above
    ``settings.node_cache_path``, or a container (any kind) that mounts an injected volume name it does not define.

    Linear in the pod's volumes and references (the pod passed check_bounds before)."""
    cache = _host_path(settings.node_cache_path)
    defined = set()
    for i, volume in enumerate(spec.get("volumes") or ()):
        defined.add(volume["name"])
        host = volume.get("hostPath")
        path = host.get("path") if isinstance(host, dict) else None
        if not isinstance(path, str):
            continue
        relation = _relation(_host_path(path), cache)
        if relation is not None:
            raise Denied(
                f"spec.volumes[{i}].hostPath.path is {ann.shown(path)} (volume {ann.shown(volume['name'])}), which is"
                f" {relation} {settings.node_cache_path}: a pod must not reach the shared cache itself; remove the"
                f" volume (model.cache mounts each model read-only at {ann.MOUNT_PATH}) or use another host directory"
            )
    for key, i, field, j, name in _volume_references(spec):
        if name not in defined and _injected_name(name):
            raise Denied(
                f"spec.{key}[{i}].{field}[{j}].name is {ann.shown(name)}, a volume the pod does not define and a name"
                " model.cache gives the volumes it injects (the node cache among them); mount a volume of"
                f" spec.volumes instead (model.cache mounts each model read-only at {ann.MOUNT_PATH})"
            )


def _loader_volumes(spec: Mapping[str, Any]) -> set[str]:
    """The volumes an injected loader mounts (the cache, the CA, pull secrets): those of every init container that
    runs the loader program. Judged by what the pod runs, not by its annotations, which stay writable after
    creation (volumes and init containers do not)."""
    names: set[str] = set()
    for container in spec.get("initContainers") or ():
        if isinstance(container, dict) and container.get("command") == [contract.PROGRAM]:
            names.update(
                m["name"] for m in container.get("volumeMounts") or () if isinstance(m, dict) and isinstance(m.get("name"), str)
            )
    return names


def check_ephemeral_containers(spec: Mapping[str, Any], old_spec: Mapping[str, Any], settings: Settings) -> None:
    """Deny, naming the field, an ephemeral container added to a running pod that mounts the node cache (a hostPath
    volume at, inside or above it) or any volume the injected loader mounts (the cache, the CA bundle, pull
    secrets): a debug container must not reach more than the pod's containers do. It can read the app's model
    through the app container's filesystem (``kubectl debug --target=APP``: ``/proc/<app pid>/root/<mount path>``).

    Only containers that ``old_spec`` does not have are judged (an UPDATE of pods/ephemeralcontainers adds them;
    the ones already there were admitted before). Linear in the pod's volumes and references."""
    previous = old_spec.get("ephemeralContainers")
    old = {c["name"] for c in previous if isinstance(c, dict) and isinstance(c.get("name"), str)} if isinstance(
        previous, list) else set()
    cache = _host_path(settings.node_cache_path)
    guarded: dict[str, str] = {name: "a volume the model loader mounts" for name in _loader_volumes(spec)}
    for volume in spec.get("volumes") or ():
        if not isinstance(volume, dict) or not isinstance(volume.get("name"), str):
            continue
        host = volume.get("hostPath")
        path = host.get("path") if isinstance(host, dict) else None
        relation = _relation(_host_path(path), cache) if isinstance(path, str) else None
        if relation is not None:
            guarded[volume["name"]] = f"a hostPath volume ({relation} {settings.node_cache_path})"
    if not guarded:
        return
    for key, i, field, j, name in _volume_references(spec):
        if key != "ephemeralContainers" or name not in guarded:
            continue
        container = spec["ephemeralContainers"][i]
        if container.get("name") in old:
            continue
        raise Denied(
            f"spec.ephemeralContainers[{i}].{field}[{j}].name is {ann.shown(name)}, {guarded[name]}: a debug"
            " container must not mount the shared cache or the loader's credentials; remove the mount and read the"
            " model through the app container instead (kubectl debug --target=APP, then /proc/PID/root/MOUNT_PATH)"
        )


def _check_mount_paths(spec: Mapping[str, Any], targets: list[dict[str, Any]], plan: Plan) -> None:
    model_at = {plan.path(model): model for model in plan.models}
    # The API server's ServiceAccount admission adds this mount to every container before any webhook sees the pod,
    # so a pod template (validated without it) must be judged as its pods will be.
    model = model_at.get(SERVICE_ACCOUNT_PATH)
    if model is not None and spec.get("automountServiceAccountToken") is not False:
        raise Denied(
            f"model {model.name!r} would be mounted at {SERVICE_ACCOUNT_PATH}, where Kubernetes mounts the service"
            f" account token in every container; set {ann.MOUNT_PATH} to another directory, rename the model with"
            f" name=REF in {ann.REF}, or set spec.automountServiceAccountToken: false"
        )
    for container in targets:
        for mount in container.get("volumeMounts") or ():
            model = model_at.get(posixpath.normpath(mount["mountPath"]))
            if model is not None:
                raise Denied(
                    f"container {container['name']!r} already mounts volume {mount['name']!r} at"
                    f" {plan.path(model)}, where model {model.name!r} would go; set {ann.MOUNT_PATH} to another"
                    f" directory or rename the model with name=REF in {ann.REF}"
                )


# --- injectors ---------------------------------------------------------------------------------------------------


def _add_mounts(targets: list[dict[str, Any]], mounts: list[dict[str, Any]]) -> None:
    for container in targets:
        container["volumeMounts"] = [*(container.get("volumeMounts") or ()), *(dict(m) for m in mounts)]


def _add_env(targets: list[dict[str, Any]], plan: Plan) -> list[str]:
    wanted = [(m.env, plan.path(m)) for m in plan.models]
    if len(plan.models) == 1:
        wanted.insert(0, (ann.ENV_SINGLE, plan.path(plan.models[0])))
    warnings = []
    for container in targets:
        env = list(container.get("env") or ())
        have = set(map(_NAME, env))
        kept = [name for name, _ in wanted if name in have]
        if kept:
            warnings.append(
                f"model.cache: container {container['name']!r} already sets {', '.join(kept)}; left as the pod"
                " defines it"
            )
        env.extend({"name": name, "value": value} for name, value in wanted if name not in have)
        container["env"] = env
    return warnings


def _inject_image_volumes(spec: dict[str, Any], targets: list[dict[str, Any]], plan: Plan) -> None:
    names = Namer(_taken_volume_names(spec))
    volumes, mounts = [], []
    for model in plan.models:
        name = names.name(MODEL_VOLUME + model.name)
        volumes.append({"name": name, "image": {"reference": str(model.ref), "pullPolicy": "IfNotPresent"}})
        mounts.append({"name": name, "mountPath": plan.path(model), "readOnly": True})
    spec["volumes"] = [*(spec.get("volumes") or ()), *volumes]
    _add_mounts(targets, mounts)


def _prefer_warm(spec: dict[str, Any], plan: Plan, snapshot: Snapshot, settings: Settings) -> None:
    """A preferred node affinity term (weight ``settings.warm_affinity_weight``) per model some node holds warm
    (its node agent's label), appended to the pod's own; models no node holds add nothing."""
    labels = [contract.warm_label(m.ref) for m in plan.models]
    warm = [label for label in dict.fromkeys(labels) if label in snapshot.warm]
    if not warm or settings.warm_affinity_weight == 0:
        return
    affinity = dict(spec.get("affinity") or {})
    node_affinity = dict(affinity.get("nodeAffinity") or {})
    key = "preferredDuringSchedulingIgnoredDuringExecution"
    node_affinity[key] = [
        *(node_affinity.get(key) or ()),
        *({"weight": settings.warm_affinity_weight, "preference": {"matchExpressions": [{"key": label, "operator": "Exists"}]}}
          for label in warm),
    ]
    affinity["nodeAffinity"] = node_affinity
    spec["affinity"] = affinity


def _plural_is(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _inject_csi(spec: dict[str, Any], targets: list[dict[str, Any]], plan: Plan) -> list[str]:
    """One inline CSI volume of the node agent per model, mounted read-only in the targets; returns warnings.

    The agent pulls with the pod's first imagePullSecret (a CSI volume names one nodePublishSecretRef), applies the
    shared cache's access rule, pins the digest for the pod (its uid comes with podInfoOnMount) and bind-mounts
    the model's tree read-only: no hostPath, no init container, no secret volume in the pod."""
    secrets = pull_secret_names(spec)
    warnings = []
    if len(secrets) > 1:
        warnings.append(
            f"model.cache: the CSI path pulls with one secret: {secrets[0]!r} (the first imagePullSecret);"
            f" {_plural_is(len(secrets) - 1, 'other is', 'others are')} not used for models"
        )
    names = Namer(_taken_volume_names(spec))
    volumes, mounts = [], []
    for model in plan.models:
        name = names.name(MODEL_VOLUME + model.name)
        csi: dict[str, Any] = {
            "driver": contract.CSI_DRIVER,
            "readOnly": True,
            "volumeAttributes": {contract.CSI_ATTR_REF: str(model.ref)},
        }
        if secrets:
            csi["nodePublishSecretRef"] = {"name": secrets[0]}
        volumes.append({"name": name, "csi": csi})
        mounts.append({"name": name, "mountPath": plan.path(model), "readOnly": True})
    spec["volumes"] = [*(spec.get("volumes") or ()), *volumes]
    _add_mounts(targets, mounts)
    return warnings


def loader_security_context(as_root: bool, settings: Settings) -> dict[str, Any]:
    uid = 0 if as_root else settings.loader_run_as_user
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": not as_root,
        "runAsUser": uid,
        # One group for every writer of a cache, whatever its uid: the loader makes directories setgid 2775 and
        # mutable files 0664 for it (docs/operations.md, "Who owns the cache (exit 9)").
        "runAsGroup": settings.loader_run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _cache_volume(name: str, cache: str, claim: str | None, settings: Settings) -> dict[str, Any]:
    if cache == ann.CACHE_NODE:
        return {"name": name, "hostPath": {"path": settings.node_cache_path, "type": "DirectoryOrCreate"}}
    if cache == ann.CACHE_POD:
        return {"name": name, "emptyDir": {}}
    return {"name": name, "persistentVolumeClaim": {"claimName": claim}}


def _quantity(value: object) -> Decimal | None:
    """A quantity from a pod spec as a number, or None when it is not one (the API server refuses those)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    try:
        return parse_quantity(str(value))
    except ValueError:
        return None


def _guaranteed_container(container: Mapping[str, Any]) -> dict[str, Decimal] | None:
    """A container's cpu and memory limits when it qualifies for the Guaranteed class (both limits set, requests
    equal to them or unset, which defaults them to the limits); else None."""
    resources = container.get("resources")
    if not isinstance(resources, dict):
        return None
    limits, requests = resources.get("limits"), resources.get("requests") or {}
    if not isinstance(limits, dict) or not isinstance(requests, dict):
        return None
    out = {}
    for name in _QOS_RESOURCES:
        limit = _quantity(limits.get(name))
        if limit is None or limit <= 0 or (name in requests and _quantity(requests[name]) != limit):
            return None
        out[name] = limit
    return out


def _guaranteed_limits(spec: Mapping[str, Any]) -> dict[str, Decimal] | None:
    """For a pod of QoS class Guaranteed (every container, init containers included, qualifies), the sum of the
    limits of what runs beside the app (app containers and native sidecars), per resource; None for any other pod.
    Pod-level ``spec.resources`` decide the class themselves: None."""
    if spec.get("resources") or not spec.get("containers"):
        return None
    total = dict.fromkeys(_QOS_RESOURCES, Decimal(0))
    for key in ("containers", "initContainers"):
        for container in spec.get(key) or ():
            limits = _guaranteed_container(container)
            if limits is None:
                return None
            if key == "containers" or container.get("restartPolicy") == "Always":
                for name in _QOS_RESOURCES:
                    total[name] += limits[name]
    return total


def _format_quantity(resource: str, value: Decimal) -> str:
    if resource == "cpu":
        milli = math.ceil(value * 1000)
        return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"
    size = math.ceil(value)
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def loader_resources(spec: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The loader's requests and limits: the settings; for a Guaranteed pod, requests equal to limits.

    Any container whose requests differ from its limits makes a pod Burstable (init containers count), and a
    Guaranteed pod has reasons to be one (exclusive CPUs under the static CPU manager policy, last to be evicted).
    So there the loader gets, per resource, what the app and its sidecars hold (they are charged that anyway, so
    the pod's footprint does not grow), at least the loader's request and at most its limit, as request and limit.
    """
    settings_of = {
        "cpu": (settings.loader_cpu_request, settings.loader_cpu_limit),
        "memory": (settings.loader_memory_request, settings.loader_memory_limit),
    }
    app = _guaranteed_limits(spec)
    if app is None:
        return {
            "requests": {name: settings_of[name][0] for name in _QOS_RESOURCES},
            "limits": {name: settings_of[name][1] for name in _QOS_RESOURCES},
        }
    both: dict[str, str] = {}
    for name in _QOS_RESOURCES:
        request, limit = settings_of[name]
        value = min(parse_quantity(limit), max(parse_quantity(request), app[name]))
        if value == parse_quantity(limit):
            both[name] = limit
        elif value == parse_quantity(request):
            both[name] = request
        else:
            both[name] = _format_quantity(name, value)
    return {"requests": dict(both), "limits": dict(both)}


def _inject_loader(
    spec: dict[str, Any], targets: list[dict[str, Any]], plan: Plan, cache: str, settings: Settings
) -> None:
    names = Namer(_taken_volume_names(spec))
    cache_name = names.name(CACHE_VOLUME)
    volumes = [_cache_volume(cache_name, cache, plan.claim, settings)]
    loader_mounts: list[dict[str, Any]] = [{"name": cache_name, "mountPath": contract.CACHE_MOUNT}]
    config_args: list[str] = []
    if settings.registry_ca_configmap:
        vol = names.name(CA_VOLUME)
        # optional: a namespace without the ConfigMap gets a loader that says which file is missing, rather than a
        # pod stuck in ContainerCreating with only an event to tell why.
        volumes.append(
            {
                "name": vol,
                "configMap": {
                    "name": settings.registry_ca_configmap,
                    "items": [{"key": contract.CA_BUNDLE_KEY, "path": contract.CA_BUNDLE_KEY}],
                    "optional": True,
                },
            }
        )
        loader_mounts.append({"name": vol, "mountPath": contract.CA_MOUNT, "readOnly": True})
        config_args += [contract.FLAG_CA_FILE, posixpath.join(contract.CA_MOUNT, contract.CA_BUNDLE_KEY)]
    for host in settings.plain_http_registries:
        config_args += [contract.FLAG_PLAIN_HTTP_REGISTRY, host]
    for index, secret in enumerate(pull_secret_names(spec)):
        vol = names.name(PULL_SECRET_VOLUME + secret)
        # optional: the kubelet pulls images without a pull secret that is missing, so the loader must not wedge
        # the pod in ContainerCreating for one either. With optional, the kubelet also skips whichever of the two
        # keys the secret lacks; the loader reads the directory and skips it, with a warning, when it is empty.
        volumes.append(
            {
                "name": vol,
                "secret": {"secretName": secret, "items": [dict(item) for item in PULL_SECRET_ITEMS], "optional": True},
            }
        )
        # The directory is the secret's position, never its name: nothing the pod writes becomes a path.
        directory = posixpath.join(contract.DOCKER_CONFIG_MOUNT, str(index))
        loader_mounts.append({"name": vol, "mountPath": directory, "readOnly": True})
        config_args += [contract.FLAG_DOCKER_CONFIG, directory]

    container_names = {name for key in _CONTAINER_KEYS for name in map(_NAME, spec.get(key) or ())}
    refs = list(dict.fromkeys(str(m.ref) for m in plan.models))
    policy_args, policy_env = _policy_for_loader(plan, settings)
    loader = {
        "name": unique_name(LOADER_NAME, container_names),
        "image": settings.loader_image,
        "imagePullPolicy": "IfNotPresent",
        "command": [contract.PROGRAM],
        "args": [
            contract.PULL,
            *refs,
            contract.FLAG_CACHE,
            contract.CACHE_MOUNT,
            # kubelet expands $(VAR) from the container's env (below) when it starts the container.
            contract.FLAG_POD_UID,
            f"$({contract.ENV_POD_UID})",
            contract.FLAG_NODE_NAME,
            f"$({contract.ENV_NODE_NAME})",
            contract.FLAG_OUTPUT,
            LOADER_OUTPUT,
            contract.FLAG_CONCURRENCY,
            str(settings.loader_concurrency),
            *([contract.FLAG_CHECK_ACCESS] if settings.loader_check_access and cache != ann.CACHE_POD else []),
            *config_args,
            *policy_args,
        ],
        "env": [_field_env(contract.ENV_POD_UID, "metadata.uid"), _field_env(contract.ENV_NODE_NAME, "spec.nodeName"),
                *policy_env],
        "resources": loader_resources(spec, settings),
        "securityContext": loader_security_context(cache == ann.CACHE_NODE, settings),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": loader_mounts,
    }
    # First among the init containers: later init containers and native sidecars may read the model.
    spec["initContainers"] = [loader, *(spec.get("initContainers") or ())]
    spec["volumes"] = [*(spec.get("volumes") or ()), *volumes]
    # Each target mounts the pod's own pinned entry, pods/$(MODEL_CACHE_POD_UID)/<key>: the UID comes from the
    # downward API (no target defines the name itself: _check_reserved_env).
    for container in targets:
        container["env"] = [*(container.get("env") or ()), _field_env(contract.ENV_POD_UID, "metadata.uid")]
    _add_mounts(
        targets,
        [
            {
                "name": cache_name,
                "mountPath": plan.path(m),
                "subPathExpr": contract.pod_subpath_expr(m.ref),
                "readOnly": True,
            }
            for m in plan.models
        ],
    )


def _effective_cache(plan: Plan, namespace: str, namespace_labels: Mapping[str, str] | None) -> tuple[str, list[str]]:
    level = (namespace_labels or {}).get(ann.PSA_ENFORCE_LABEL, "")
    if plan.cache == ann.CACHE_NODE and level in ann.PSA_NO_HOSTPATH_LEVELS:
        where = f"namespace {namespace!r}" if namespace else "the namespace"
        return ann.CACHE_POD, [
            f"model.cache: {where} enforces Pod Security {level!r} (no hostPath): using a per-pod emptyDir cache;"
            f" set {ann.CACHE}: pvc:<claim> to share one"
        ]
    return plan.cache, []


# --- the whole mutation ------------------------------------------------------------------------------------------


def _cache_text(cache: str, claim: str | None) -> str:
    return f"pvc:{claim}" if cache == "pvc" else cache


def plan_pod(
    pod: Mapping[str, Any], settings: Settings, snapshot: Snapshot
) -> tuple[Plan, Choice, tuple[str, ...]] | None:
    """The plan and the chosen path for a pod, or None when the pod asks for nothing or was already mutated."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if ann.STATUS in annotations or ann.REF not in annotations:
        return None
    spec = pod.get("spec") or {}
    check_bounds(annotations, spec)
    check_volume_references(spec, settings)
    plan, warnings = read_plan(annotations, spec, settings)
    signed = [(m, rule) for m, rule in plan.rules if rule.required]
    if signed and plan.mode == ann.IMAGE_VOLUME:
        model, rule = signed[0]
        where = f"{ann.MODE} is 'image-volume'" if plan.mode_explicit else "the cluster default mode is image-volume"
        raise Denied(
            f"{where}, but model {model.name!r} ({model.ref}) must be signed (the cluster's signature policy for"
            f" {rule.prefix}) and an image volume is mounted by the container runtime, which checks no signature; set"
            f" {ann.MODE} to auto, csi or init-container (the node agent or the loader verifies the signature)"
        )
    choice = choose_mode(plan.mode, spec, snapshot, settings, explicit=plan.mode_explicit, signed=bool(signed))
    return plan, choice, warnings


def _matched_rules(models: tuple[Model, ...], settings: Settings) -> tuple[tuple[Model, Rule], ...]:
    """Each model with the signature-policy rule its reference matches (the longest prefix), models no rule matches
    left out."""
    out = []
    for model in models:
        rule = rule_for(model.ref.registry, model.ref.repository, settings.signature_policy)
        if rule is not None:
            out.append((model, rule))
    return tuple(out)


def _policy_for_loader(plan: Plan, settings: Settings) -> tuple[list[str], list[dict[str, Any]]]:
    """The loader's arguments and env for the pod's models' signature rules: the rules they match (exempting ones
    too, so the loader's longest-prefix choice is the webhook's) as inline JSON, and the trusted root when a rule
    names keyless identities. Nothing when no model needs a signature."""
    rules = list(dict.fromkeys(rule for _, rule in plan.rules))
    if not any(rule.required for rule in rules):
        return [], []
    doc = [{"prefix": r.prefix, **({"keys": list(r.keys)} if r.keys else {}),
            **({"identities": list(r.identities)} if r.identities else {})} for r in rules]
    args = [contract.FLAG_SIGNATURE_POLICY_DATA, f"$({contract.ENV_SIGNATURE_POLICY})"]
    env: list[dict[str, Any]] = [{"name": contract.ENV_SIGNATURE_POLICY, "value": json.dumps(doc, separators=(",", ":"))}]
    if any(r.identities for r in rules):
        args += [contract.FLAG_TRUSTED_ROOT_DATA, f"$({contract.ENV_TRUSTED_ROOT})"]
        env.append({"name": contract.ENV_TRUSTED_ROOT, "value": settings.trusted_root})
    return args, env


def mutate_pod(
    pod: dict[str, Any], namespace: str, namespace_labels: Mapping[str, str] | None, snapshot: Snapshot, settings: Settings
) -> Outcome:
    """Rewrite a pod (a dict shaped like a Pod, e.g. from request.object) so its models are mounted.

    The argument is never changed; the result shares the subtrees it did not change with it, so treat both as
    read-only (deep-copy before editing either).

    ``namespace_labels`` is None when the namespace is not in the inventory: then no Pod Security restriction is
    assumed. Raises Denied for invalid annotations or an impossible explicit image-volume request.
    """
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if ann.STATUS in annotations:
        return Outcome(pod, (), None, f"already mutated ({annotations[ann.STATUS]})")
    planned = plan_pod(pod, settings, snapshot)
    if planned is None:
        return Outcome(pod, (), None, f"no {ann.REF} annotation")
    plan, choice, plan_warnings = planned

    new, spec = _copy_for_edit(pod, plan.containers)
    targets = _targets(spec, plan.containers)
    _check_mount_paths(spec, targets, plan)
    _check_reserved_env(targets)
    warnings = [*plan_warnings, *choice.warnings]

    if choice.mode == ann.IMAGE_VOLUME:
        if plan.cache_explicit and plan.mode_explicit:
            warnings.append(f"model.cache: {ann.CACHE} is ignored: the model is mounted as an image volume")
        _inject_image_volumes(spec, targets, plan)
        reason = choice.reason
    elif choice.mode == ann.CSI:
        if plan.cache_explicit and plan.mode_explicit:
            warnings.append(f"model.cache: {ann.CACHE} is ignored: the node agent mounts the model from its node cache")
        warnings += _inject_csi(spec, targets, plan)
        _prefer_warm(spec, plan, snapshot, settings)
        reason = choice.reason
    else:
        cache, psa_warnings = _effective_cache(plan, namespace, namespace_labels)
        warnings += psa_warnings
        _inject_loader(spec, targets, plan, cache, settings)
        if cache == ann.CACHE_NODE:
            _prefer_warm(spec, plan, snapshot, settings)
        reason = f"{choice.reason}; cache {_cache_text(cache, plan.claim)}"
    warnings += _add_env(targets, plan)

    outcome = Outcome(new, tuple(warnings), choice.mode, reason)
    meta = new["metadata"]
    meta["annotations"] = {**(meta.get("annotations") or {}), ann.STATUS: outcome.status}
    return outcome
