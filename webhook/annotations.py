"""The annotation contract between app teams, cluster admins and the webhook, defined once.

On a pod (or a workload's pod template):

``model.cache/ref``
    One OCI reference or a comma-separated list. Each entry is ``REF`` or ``name=REF``; the name defaults to the
    last path segment of the repository (``registry.example.com/models/phi3:v1`` -> ``phi3``). Names must be
    unique in the pod.
``model.cache/mount-path``
    Absolute directory under which each model is mounted read-only at ``<mount-path>/<name>`` (default
    ``/models``, see ``Settings.default_mount_path``).
``model.cache/containers``
    Comma-separated container names that get the models (default: every app container in ``spec.containers``).
    Init containers and native sidecars may be named too; the loader runs before all of them.
``model.cache/mode``
    ``auto`` (default), ``image-volume``, ``csi`` or ``init-container``. ``auto`` takes an image volume when every
    node the pod may run on can mount one, else a CSI volume of the node agent when every such node runs it, else
    the init container.
``model.cache/cache``
    ``node`` (default: a hostPath shared by every pod on the node), ``pod`` (an emptyDir) or ``pvc:<claim>``.
    Init-container mode only (the CSI path always uses the agent's node cache).
``model.cache/injected`` (written by the webhook)
    ``<mode>: <one-line reason>``, e.g. ``init-container: 2 of 5 candidate nodes run containerd 2.0``. A pod that
    carries it is returned unchanged, which makes the mutation idempotent under reinvocation and re-admission.

On a namespace: ``model.cache/enabled=true`` opts the namespace in (the webhook's namespaceSelector).

On a node: ``model.cache/image-volume=true|false`` overrides the runtime/kubelet version check.

Environment variables in target containers: every model gets ``MODEL_PATH_<NAME>`` (the name upper-cased, every
character that is not a letter or digit replaced by ``_``), and a pod with exactly one model also gets
``MODEL_PATH``. The value is the model's directory, ``<mount-path>/<name>``. A variable the container already
defines is left as the app team wrote it (their value wins) and the webhook says so in a warning.
"""

from __future__ import annotations

import re
from typing import Final, Literal

PREFIX: Final = "model.cache/"

REF: Final = "model.cache/ref"
MOUNT_PATH: Final = "model.cache/mount-path"
CONTAINERS: Final = "model.cache/containers"
MODE: Final = "model.cache/mode"
CACHE: Final = "model.cache/cache"
STATUS: Final = "model.cache/injected"

ENABLED_LABEL: Final = "model.cache/enabled"
IMAGE_VOLUME_LABEL: Final = "model.cache/image-volume"

#: Keys an app team may set; anything else under PREFIX on a pod is most likely a typo and draws a warning.
USER_KEYS: Final = (REF, MOUNT_PATH, CONTAINERS, MODE, CACHE)

# Pod Security Admission: namespaces enforcing these levels reject hostPath volumes.
PSA_ENFORCE_LABEL: Final = "pod-security.kubernetes.io/enforce"
PSA_NO_HOSTPATH_LEVELS: Final = frozenset({"baseline", "restricted"})

Mode = Literal["auto", "image-volume", "csi", "init-container"]
Path = Literal["image-volume", "csi", "init-container"]  # what a pod actually gets
MODES: Final[tuple[Mode, ...]] = ("auto", "image-volume", "csi", "init-container")
IMAGE_VOLUME: Final = "image-volume"
CSI: Final = "csi"
INIT_CONTAINER: Final = "init-container"
AUTO: Final = "auto"

CACHE_NODE: Final = "node"
CACHE_POD: Final = "pod"
CACHE_PVC_PREFIX: Final = "pvc:"

ENV_SINGLE: Final = "MODEL_PATH"
ENV_PREFIX: Final = "MODEL_PATH_"

_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")

#: What may surround a value or a list entry and is dropped: ASCII whitespace only (``str.strip()`` would also drop
#: Unicode separators and the C1 control NEL, letting them pass as if they were not there).
SPACE: Final = " \t\r\n"
#: Control characters (C0, DEL, C1) and the Unicode line separators; no annotation value may carry one, except the
#: ASCII whitespace in SPACE between list entries (a YAML block scalar ends in a newline).
CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
#: In a single value such as a path, after SPACE is stripped from its ends, none at all.
ANY_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHOWN = 80


def shown(value: str) -> str:
    """A value for a message: its repr, cut to a readable length (the rest is counted, never echoed)."""
    if len(value) <= _SHOWN:
        return repr(value)
    return f"{value[:_SHOWN]!r}... ({len(value)} characters)"


def env_name(model_name: str) -> str:
    """``MODEL_PATH_<NAME>``: ``phi-3.5`` -> ``MODEL_PATH_PHI_3_5``."""
    return ENV_PREFIX + _NOT_ALNUM.sub("_", model_name).upper()

# PVC names are DNS-1123 subdomains.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def parse_cache(value: str) -> tuple[str, str | None]:
    """``node`` -> ("node", None), ``pod`` -> ("pod", None), ``pvc:NAME`` -> ("pvc", NAME).

    Raises ValueError with a message that says what is accepted; callers add which annotation or setting it was.
    """
    v = value.strip(SPACE)
    if v in (CACHE_NODE, CACHE_POD):
        return v, None
    if v.startswith(CACHE_PVC_PREFIX):
        claim = v[len(CACHE_PVC_PREFIX) :].strip(SPACE)
        if len(claim) <= 253 and _DNS_SUBDOMAIN.fullmatch(claim):
            return "pvc", claim
        raise ValueError(
            f"claim name {shown(claim)} is not a valid PersistentVolumeClaim name (lowercase letters, digits, '-' and '.')"
        )
    raise ValueError("use node, pod or pvc:<claim-name>")
