"""A model of what kubelet does with a container's volume mounts when it starts the container.

kubelet cannot run in the tests, and the pinned mounts of issue 15 depend on two of its behaviours, both seen on a
real node (kubelet 1.36, containerd). This module stands for them, and only for them; it follows kubelet's code
(``pkg/kubelet/kubelet_pods.go`` ``makeMounts`` and ``makeEnvironmentVariables``, ``pkg/volume/util/subpath``
``subpath_linux.go``, ``third_party/forked/golang/expansion``):

(a) **On every (re)start a subPath is resolved afresh, through symlinks, inside the volume.** ``subPathExpr`` is
    expanded first from the container's environment (``$(VAR)``; a variable that is undefined or empty fails the
    start: "missing value for VAR"); the result, like a ``subPath``, must be relative and free of ``..``. The path
    is then resolved through every symlink (``EvalSymlinks``: the host's view, so an absolute link target is a
    host path) and must stay inside the volume, itself resolved; the directory (or file) it reaches is what the
    container sees. Nothing is remembered between starts: a link replaced between two starts of one container
    gives the second start the new target.
(b) **A missing subPath is created as an empty directory** (``SafeMakeDir``), component by component, with the
    volume root's permission bits, owned by kubelet (root; here: whoever runs the test). Existing components are
    followed through symlinks, and nothing is created unless the existing part resolves inside the volume. An
    entry that exists but does not resolve (a dangling symlink) cannot be created over: the start fails.

A failed start is ``MountError`` (kubelet: ``CreateContainerConfigError`` or "failed to prepare subPath"). Not
modelled: the read-only bind mount itself (do not write through a returned path to test read-only), the volume
plugins (a volume is a directory you pass in), service-link environment variables, ``envFrom``.

Interface: ``resolve_mount(volume_root, mount, env)`` for one volumeMount; ``container_env(pod, container)`` for a
container's environment as kubelet computes it (values, ``$(VAR)`` references to earlier variables, the downward
API's ``fieldRef``); ``start_container(pod, name, volumes)`` for all of a container's mounts at once;
``expand_args(args, env)`` for the ``$(VAR)`` expansion of command and args (an undefined variable stays as written).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["MountError", "container_env", "expand", "expand_args", "resolve_mount", "start_container"]


class MountError(Exception):
    """kubelet refused to start the container: the mount could not be prepared."""


# --- $(VAR) expansion (third_party/forked/golang/expansion/expand.go) ----------------------------------------------


def _read_name(rest: str) -> tuple[str, bool, int]:
    """tryReadVariableName: (what was read, whether it is a variable name, how many characters it used)."""
    if rest[0] == "$":  # $$: an escaped operator
        return "$", False, 1
    if rest[0] == "(":
        closer = rest.find(")", 1)
        if closer != -1:
            return rest[1:closer], True, closer + 1
        return "$(", False, 1  # an incomplete reference is kept as written
    return "$" + rest[0], False, 1  # a '$' that starts no expression


def expand(text: str, mapping: Callable[[str], str]) -> str:
    """Expand ``$(VAR)`` in ``text`` with ``mapping``; ``$$`` is a literal ``$``; anything else is kept."""
    out: list[str] = []
    checkpoint = cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            read, is_var, advance = _read_name(text[cursor + 1 :])
            out.append(mapping(read) if is_var else read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


def _keep_undefined(env: Mapping[str, str]) -> Callable[[str], str]:
    """MappingFuncFor: a defined variable's value; an undefined one stays ``$(NAME)``."""
    return lambda name: env.get(name, f"$({name})")


def expand_args(args: list[str], env: Mapping[str, str]) -> list[str]:
    """A container's command or args as kubelet passes them to the runtime."""
    mapping = _keep_undefined(env)
    return [expand(arg, mapping) for arg in args]


# --- the container's environment (makeEnvironmentVariables) -----------------------------------------------------

#: The downward API fields the model knows: what the webhook injects and what a test pod is likely to use.
_FIELDS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "metadata.uid": lambda pod: pod["metadata"]["uid"],
    "metadata.name": lambda pod: pod["metadata"]["name"],
    "metadata.namespace": lambda pod: pod["metadata"]["namespace"],
    "spec.nodeName": lambda pod: pod["spec"]["nodeName"],
    "spec.serviceAccountName": lambda pod: pod["spec"].get("serviceAccountName", "default"),
}


def container_env(pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
    """The environment kubelet gives ``container`` of ``pod`` (a pod as bound: ``metadata.uid`` and
    ``spec.nodeName`` set). A value's ``$(VAR)`` refers to variables defined before it; a later duplicate wins."""
    if container.get("envFrom"):
        raise NotImplementedError("envFrom is not modelled")
    env: dict[str, str] = {}
    for var in container.get("env") or ():
        if "valueFrom" in var:
            ref = var["valueFrom"].get("fieldRef")
            if ref is None or ref["fieldPath"] not in _FIELDS:
                raise NotImplementedError(f"env {var['name']}: only fieldRef {sorted(_FIELDS)} is modelled")
            try:
                env[var["name"]] = str(_FIELDS[ref["fieldPath"]](pod))
            except KeyError as exc:
                raise MountError(f"env {var['name']}: the pod has no {ref['fieldPath']} (is it bound?)") from exc
        else:
            value = var.get("value", "")
            env[var["name"]] = expand(value, _keep_undefined(env)) if value else ""
    return env


# --- subPath and subPathExpr (makeMounts, subpath_linux.go) --------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _safe_make_dir(volume_root: Path, parts: list[str]) -> None:
    """SafeMakeDir: create the missing tail of ``parts`` under the volume, never outside it."""
    base = Path(os.path.realpath(volume_root))
    existing, missing = volume_root, parts
    for i, part in enumerate(parts):  # findExistingPrefix: open each component, following symlinks
        if not os.path.exists(existing / part):
            missing = parts[i:]
            break
        existing = existing / part
    else:
        return
    try:
        real = Path(os.path.realpath(existing, strict=True))
    except OSError as exc:
        raise MountError(f"error opening directory {existing}: {exc}") from exc
    if not _inside(real, base):
        raise MountError(f"path {existing} is outside of allowed base {volume_root}")
    perm = stat.S_IMODE(os.stat(volume_root).st_mode)
    current = real
    for part in missing:
        current = current / part
        try:
            os.mkdir(current, perm)  # mkdirat: an existing entry, a dangling symlink included, is EEXIST
            os.chmod(current, perm)  # Fchmod: the umask does not apply
        except OSError as exc:
            raise MountError(f"cannot create directory {current}: {exc.strerror}") from exc


def resolve_mount(volume_root: Path, mount: Mapping[str, Any], env: Mapping[str, str]) -> Path:
    """What the container sees at ``mount["mountPath"]`` when kubelet starts it now: a path inside
    ``volume_root`` (the volume as kubelet holds it on the node). Call it again for every (re)start."""
    sub_path: str = mount.get("subPath") or ""
    expr: str = mount.get("subPathExpr") or ""
    if sub_path and expr:
        raise MountError("subPath and subPathExpr are mutually exclusive")  # the API server's validation
    if expr:
        missing: set[str] = set()

        def value(name: str) -> str:
            if not env.get(name):
                missing.add(name)
            return env.get(name, "")

        sub_path = expand(expr, value)
        if missing:
            raise MountError(f"missing value for {', '.join(sorted(missing))}")
    if not sub_path:
        return Path(os.path.realpath(volume_root))
    if sub_path.startswith("/"):
        raise MountError(f"error SubPath `{sub_path}` must not be an absolute path")
    if ".." in sub_path.split("/"):
        raise MountError(f"unable to provision SubPath `{sub_path}`: must not contain '..'")
    parts = [p for p in sub_path.split("/") if p and p != "."]
    path = volume_root.joinpath(*parts)
    if not os.path.exists(path):  # stat follows symlinks: a dangling link counts as missing
        _safe_make_dir(volume_root, parts)
    try:
        resolved = Path(os.path.realpath(path, strict=True))
    except OSError as exc:
        raise MountError(f"error resolving symlinks in {path}: {exc}") from exc
    root = Path(os.path.realpath(volume_root))
    if not _inside(resolved, root):
        raise MountError(f"subpath {resolved} not within volume path {root}")
    return resolved


def start_container(pod: Mapping[str, Any], name: str, volumes: Mapping[str, Path]) -> dict[str, Path]:
    """Start container ``name`` of ``pod`` (containers or init containers): ``{mountPath: what it sees}`` for each
    of its volumeMounts, resolved afresh. ``volumes`` maps the pod's volume names to directories."""
    spec = pod["spec"]
    [container] = [c for key in ("initContainers", "containers") for c in spec.get(key) or () if c["name"] == name]
    env = container_env(pod, container)
    seen = {}
    for mount in container.get("volumeMounts") or ():
        if mount["name"] not in volumes:
            raise MountError(f"volume {mount['name']!r} of container {name!r} is not given")
        seen[mount["mountPath"]] = resolve_mount(volumes[mount["name"]], mount, env)
    return seen
