"""Pure: what kubelet sends to NodePublishVolume and NodeUnpublishVolume, checked field by field into typed values.

Every field is checked here, at the boundary, before anything touches the cache, the registry or the mount table.
A refusal is :class:`InvalidArgument` whose message names the field, the value (secrets never: only their keys)
and the fix; the server answers it with INVALID_ARGUMENT, which the spec's error table says the caller must fix
before retrying.

What an inline ephemeral volume looks like (``volumes[].csi`` in a pod, CSIDriver with ``podInfoOnMount: true``)::

    volume_context   csi.storage.k8s.io/ephemeral: "true", csi.storage.k8s.io/pod.{uid,namespace,name},
                     csi.storage.k8s.io/serviceAccount.name, and ours: ref (the model reference)
    secrets          the data of nodePublishSecretRef: one docker-config secret (.dockerconfigjson, or the legacy
                     .dockercfg), parsed in memory as the loader parses a mounted pull secret, never written out
    readonly         must be true (a model tree is read-only; ``readOnly: true`` in the pod's csi volume)
    target_path      absolute, normalised, under the kubelet pods directory the server was given
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from loader import contract, credentials
from loader.cache import check_pod_uid
from loader.csi import DRIVER_NAME
from loader.errors import UsageError
from loader.reference import Reference, parse

# volume_context keys kubelet sets (podInfoOnMount, ephemeral) and the one attribute of ours.
EPHEMERAL = "csi.storage.k8s.io/ephemeral"
POD_UID = "csi.storage.k8s.io/pod.uid"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_NAME = "csi.storage.k8s.io/pod.name"
SERVICE_ACCOUNT = "csi.storage.k8s.io/serviceAccount.name"
KUBELET_PREFIX = "csi.storage.k8s.io/"  # others kubelet may add (serviceAccount.tokens): not ours to judge
REF = contract.CSI_ATTR_REF
ATTRIBUTES = (REF,)  # volumeAttributes a pod may set

# The secret: one docker-config Secret (kubernetes.io/dockerconfigjson; kubernetes.io/dockercfg is the legacy type).
SECRET_KEYS = {".dockerconfigjson": False, ".dockercfg": True}  # key -> legacy format
MAX_SECRET_BYTES = 1 << 20  # a Secret's own limit is 1 MiB
MAX_VOLUME_ID = 256  # kubelet's ephemeral ids are "csi-" + 64 hex
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_FIX_POD_INFO = f"set podInfoOnMount: true on the CSIDriver {DRIVER_NAME} (kubelet then passes the pod's identity)"


class InvalidArgument(ValueError):
    """A request field the plugin cannot serve. The message names the field, the value and the fix."""


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 120 else f"{value[:120]!r}... ({len(value)} characters)"


@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    service_account: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Publish:
    """A NodePublishVolume call, checked. ``credentials`` is the parsed secret (None: anonymous);
    ``secret_digest`` tells two secrets apart in memory and is never written anywhere."""

    volume_id: str
    target: str
    ref: Reference
    pod: PodInfo
    credentials: credentials.DockerConfig | None = field(default=None, compare=False, repr=False)
    secret_digest: str = field(default="", repr=False)

    @property
    def job_key(self) -> tuple[str, ...]:
        """Two calls with this key ask for the very same pull (same volume, target, model, pod and secret)."""
        return (self.volume_id, self.target, str(self.ref), self.pod.uid, self.secret_digest)


@dataclass(frozen=True)
class Unpublish:
    volume_id: str
    target: str


# ---- the fields ----------------------------------------------------------------------------------------------------
def check_volume_id(value: str) -> str:
    if not value:
        raise InvalidArgument("volume_id is empty: the CO must name the volume (kubelet always does)")
    if len(value) > MAX_VOLUME_ID or not value.isprintable():
        raise InvalidArgument(f"volume_id {_shown(value)} is not a volume id this plugin accepts: at most"
                              f" {MAX_VOLUME_ID} printable characters (kubelet's are csi-<64 hex>)")
    return value


def check_target_path(value: str, pods_dir: str) -> str:
    """Absolute, already normal (no '..', '.', '//' or trailing '/'), strictly under ``pods_dir``. Lexical only:
    the server checks that no symlink on the way leads out (mounts.resolves_under, then mounts.open_beneath)."""
    if not value:
        raise InvalidArgument("target_path is empty: the CO must give the path to publish at")
    if not value.startswith("/"):
        raise InvalidArgument(f"target_path {_shown(value)} is not absolute: the spec asks for an absolute path")
    if "\0" in value or posixpath.normpath(value) != value or value.startswith("//"):
        raise InvalidArgument(f"target_path {_shown(value)} is not a normal path (it has '..', '.', '//' or a"
                              f" trailing '/'); give {posixpath.normpath(value)!r} form paths")
    if not value.startswith(pods_dir.rstrip("/") + "/"):
        raise InvalidArgument(f"target_path {_shown(value)} is not under the kubelet pods directory {pods_dir};"
                              " start the plugin with --pods-dir set to kubelet's <root-dir>/pods")
    return value


def pod_info(context: Mapping[str, str]) -> PodInfo:
    uid = context.get(POD_UID, "")
    if not uid:
        raise InvalidArgument(f"volume_context has no {POD_UID}: {_FIX_POD_INFO}")
    try:
        check_pod_uid(uid)
    except UsageError:
        raise InvalidArgument(f"volume_context {POD_UID} {_shown(uid)} is not a pod UID (lowercase letters, digits"
                              " and '-'); it must be kubelet's metadata.uid of the pod") from None
    values = {}
    for key, grammar, limit in ((POD_NAMESPACE, _DNS_LABEL, 63), (POD_NAME, _DNS_SUBDOMAIN, 253),
                                (SERVICE_ACCOUNT, _DNS_SUBDOMAIN, 253)):
        value = context.get(key, "")
        if not value:
            raise InvalidArgument(f"volume_context has no {key}: {_FIX_POD_INFO}")
        if len(value) > limit or not grammar.fullmatch(value):
            raise InvalidArgument(f"volume_context {key} {_shown(value)} is not a Kubernetes name; it must be what"
                                  " kubelet passes for the pod")
        values[key] = value
    return PodInfo(uid, values[POD_NAMESPACE], values[POD_NAME], values[SERVICE_ACCOUNT])


def reference(context: Mapping[str, str]) -> Reference:
    text = context.get(REF, "")
    if not text:
        raise InvalidArgument(f"volume_context has no {REF!r}: set volumeAttributes: {{ref: REGISTRY/REPO:TAG}} on"
                              f" the pod's csi volume (driver {DRIVER_NAME})")
    try:
        return parse(text)
    except ValueError as exc:
        raise InvalidArgument(f"volume_context {REF} {_shown(text)} is not a model reference: {exc}") from None


def check_context(context: Mapping[str, str]) -> None:
    if context.get(EPHEMERAL) != "true":
        raise InvalidArgument(
            f"volume_context {EPHEMERAL} is {_shown(context.get(EPHEMERAL, ''))}, not 'true': {DRIVER_NAME} serves"
            " only inline ephemeral volumes (a pod's volumes[].csi); give the model in the pod, not in a"
            " PersistentVolume, and keep volumeLifecycleModes: [Ephemeral] on the CSIDriver")
    unknown = sorted(k for k in context if not k.startswith(KUBELET_PREFIX) and k not in ATTRIBUTES)
    if unknown:
        raise InvalidArgument(f"volume_context has attributes {DRIVER_NAME} does not know: {unknown}; the only"
                              f" volumeAttributes are {list(ATTRIBUTES)}")


def docker_config(secrets: Mapping[str, str]) -> tuple[credentials.DockerConfig | None, str]:
    """The nodePublishSecretRef's data as one docker config (None without a secret), and a digest of it for
    telling calls apart in memory. Parsed exactly as loader.credentials parses a mounted pull secret; credential
    helpers (credHelpers, credsStore) are refused: a tenant's secret does not choose programs on the node."""
    if not secrets:
        return None, ""
    keys = sorted(secrets)
    known = [k for k in keys if k in SECRET_KEYS]
    if len(known) != 1 or len(keys) != 1:
        raise InvalidArgument(
            f"secrets has the keys {keys}: nodePublishSecretRef must name one docker-config Secret (type"
            " kubernetes.io/dockerconfigjson, key .dockerconfigjson; or the legacy .dockercfg) and nothing else;"
            " make a Secret with only that key (kubectl create secret docker-registry)")
    key = known[0]
    text = secrets[key]
    if len(text) > MAX_SECRET_BYTES:
        raise InvalidArgument(f"secrets[{key!r}] is {len(text)} bytes, more than a Secret can hold")
    label = f"nodePublishSecretRef key {key}"
    try:
        cfg = credentials.parse_config(label, text, legacy=SECRET_KEYS[key])
    except credentials.DockerConfigError as exc:  # names the label and the position, never the content
        raise InvalidArgument(f"secrets: {exc}") from None
    if cfg.cred_helpers or cfg.creds_store:
        raise InvalidArgument(f"secrets: {label} names credential helpers (credHelpers or credsStore); the node"
                              " agent runs none for a pod: put the registry's credentials in \"auths\"")
    digest = hashlib.sha256(f"{key}\0{text}".encode()).hexdigest()
    return credentials.DockerConfig(files=(cfg,)), digest


# ---- the requests ------------------------------------------------------------------------------------------------
def parse_publish(*, volume_id: str, target_path: str, staging_target_path: str, readonly: bool,
                  capability: CapabilityView | None, volume_context: Mapping[str, str], secrets: Mapping[str, str],
                  pods_dir: str) -> Publish:
    vid = check_volume_id(volume_id)
    target = check_target_path(target_path, pods_dir)
    if staging_target_path:
        raise InvalidArgument(f"staging_target_path {_shown(staging_target_path)} is set, but {DRIVER_NAME} has no"
                              " STAGE_UNSTAGE_VOLUME capability: the CO must not stage its volumes")
    check_capability(capability)
    if not readonly:
        raise InvalidArgument(f"readonly is false: a model is mounted read-only; set readOnly: true on the pod's"
                              f" csi volume (driver {DRIVER_NAME})")
    check_context(volume_context)
    ref = reference(volume_context)
    pod = pod_info(volume_context)
    creds, digest = docker_config(secrets)
    return Publish(vid, target, ref, pod, creds, digest)


def parse_unpublish(*, volume_id: str, target_path: str, pods_dir: str) -> Unpublish:
    return Unpublish(check_volume_id(volume_id), check_target_path(target_path, pods_dir))


@dataclass(frozen=True)
class CapabilityView:
    """The parts of a VolumeCapability that matter here (the server fills it from the message)."""

    access_type: str | None  # "mount", "block" or None when unset
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()


def check_capability(cap: CapabilityView | None) -> None:
    if cap is None:
        raise InvalidArgument("volume_capability is missing: the spec requires it (kubelet always sends one)")
    if cap.access_type != "mount":
        raise InvalidArgument(f"volume_capability access_type is {cap.access_type or 'unset'}, not mount:"
                              f" {DRIVER_NAME} publishes a directory tree, never a block device")
    if cap.fs_type:
        raise InvalidArgument(f"volume_capability mount.fs_type is {_shown(cap.fs_type)}: a model tree is a bind"
                              " mount of the node cache, it has no filesystem type; drop fsType from the csi volume")
    if cap.mount_flags:
        raise InvalidArgument(f"volume_capability mount.mount_flags has {len(cap.mount_flags)} entries: the plugin"
                              " takes none (the mount is always read-only, nosuid, nodev, noexec); drop mountOptions")
