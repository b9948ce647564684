"""The kubelet model (tests/support/kubelet.py) against the behaviours it stands for, and against the webhook's output.

Each behaviour is the one kubelet showed on a real node (issue 15): subPaths resolved afresh through symlinks on
every start, inside the volume only; missing subPaths created as empty directories; ``$(VAR)`` from the env.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from loader import contract
from tests.support.kubelet import MountError, container_env, expand_args, resolve_mount, start_container
from webhook import annotations as ann
from webhook.config import Settings
from webhook.mutate import mutate_pod
from webhook.snapshot import snapshot_from

UID_A = "6f9a3c1e-0b5d-4e27-9c8a-1d2e3f405162"
UID_B = "0d1c2b3a-4f5e-4d6c-8b7a-695847362514"
HEX_1, HEX_2 = "1" * 64, "2" * 64
REF = "registry.example.com/models/phi3:v1"
KEY = contract.pod_entry(REF, "x").rsplit("/", 1)[1]


def cache(tmp_path: Path) -> Path:
    """A cache with two model trees and refs/<key> -> v1's tree, as the loader publishes them."""
    root = tmp_path / "cache"
    for hex_, text in ((HEX_1, "v1"), (HEX_2, "v2")):
        tree = root / contract.MODELS_DIR / hex_
        tree.mkdir(parents=True)
        (tree / "config.json").write_text(text)
    (root / contract.REFS_DIR).mkdir()
    link(root, contract.ref_subpath(REF), HEX_1)
    return root


def link(root: Path, entry: str, hex_: str) -> None:
    """Point ``entry`` (relative to the cache root) at a model tree, replacing it atomically as the loader does."""
    path = root / entry
    path.parent.mkdir(parents=True, exist_ok=True)
    up = "../" * entry.count("/")
    tmp = path.with_name(path.name + ".tmp")
    os.symlink(f"{up}{contract.MODELS_DIR}/{hex_}", tmp)
    os.replace(tmp, path)


def mount(**fields: str) -> dict[str, Any]:
    return {"name": "model-cache", "mountPath": "/models/phi3", "readOnly": True, **fields}


def test_a_subpath_is_resolved_through_symlinks_on_every_start(tmp_path):
    # Issue 15, behaviour 1: the mount of refs/<key> follows the tag on a restart, without any loader.
    root = cache(tmp_path)
    refs = mount(subPath=contract.ref_subpath(REF))
    first = resolve_mount(root, refs, {})
    assert (first, (first / "config.json").read_text()) == (root / contract.MODELS_DIR / HEX_1, "v1")
    link(root, contract.ref_subpath(REF), HEX_2)  # the tag moved
    assert (resolve_mount(root, refs, {}) / "config.json").read_text() == "v2"


def test_a_pinned_entry_keeps_its_digest_when_the_tag_moves(tmp_path):
    root = cache(tmp_path)
    link(root, contract.pod_entry(REF, UID_A), HEX_1)
    pinned = mount(subPathExpr=contract.pod_subpath_expr(REF))
    env = {contract.ENV_POD_UID: UID_A}
    assert resolve_mount(root, pinned, env) == root / contract.MODELS_DIR / HEX_1
    link(root, contract.ref_subpath(REF), HEX_2)
    link(root, contract.pod_entry(REF, UID_B), HEX_2)  # a new pod gets the new digest
    assert resolve_mount(root, pinned, env) == root / contract.MODELS_DIR / HEX_1
    assert resolve_mount(root, pinned, {contract.ENV_POD_UID: UID_B}) == root / contract.MODELS_DIR / HEX_2


def test_a_missing_subpath_is_created_as_an_empty_directory_with_the_volume_mode(tmp_path):
    # Issue 15, behaviour 3: the app starts on an empty directory when its entry is gone.
    root = cache(tmp_path)
    os.chmod(root, 0o751)
    seen = resolve_mount(root, mount(subPathExpr=contract.pod_subpath_expr(REF)), {contract.ENV_POD_UID: UID_A})
    assert seen == root / contract.pod_entry(REF, UID_A)
    assert seen.is_dir() and not seen.is_symlink() and list(seen.iterdir()) == []
    assert {stat.S_IMODE(p.stat().st_mode) for p in (seen, seen.parent)} == {0o751}
    assert resolve_mount(root, mount(subPathExpr=contract.pod_subpath_expr(REF)), {contract.ENV_POD_UID: UID_A}) == seen
    # and a gc that removed the tree leaves refs/<key> dangling: a dangling link cannot be created over
    (root / contract.MODELS_DIR / HEX_1 / "config.json").unlink()
    (root / contract.MODELS_DIR / HEX_1).rmdir()
    with pytest.raises(MountError, match=r"cannot create directory .*: File exists"):
        resolve_mount(root, mount(subPath=contract.ref_subpath(REF)), {})
    assert os.path.islink(root / contract.ref_subpath(REF))


def test_a_file_subpath_is_the_file(tmp_path):
    root = cache(tmp_path)
    seen = resolve_mount(root, mount(subPath=f"{contract.ref_subpath(REF)}/config.json"), {})
    assert seen == root / contract.MODELS_DIR / HEX_1 / "config.json"


def test_no_subpath_is_the_whole_volume(tmp_path):
    root = cache(tmp_path)
    assert resolve_mount(root, {"name": "model-cache", "mountPath": "/cache"}, {}) == root


@pytest.mark.parametrize("absolute", [True, False], ids=["absolute-link", "climbing-link"])
def test_a_link_out_of_the_volume_fails_the_start_and_creates_nothing(tmp_path, absolute):
    root = cache(tmp_path)
    outside = tmp_path / "outside"
    (outside / "models").mkdir(parents=True)
    (root / contract.PODS_DIR).mkdir()
    # pods/<uid> planted as a link out of the volume: the missing <key> under it must not be created out there.
    os.symlink(outside if absolute else "../../outside", root / contract.PODS_DIR / UID_A)
    with pytest.raises(MountError, match="is outside of allowed base"):
        resolve_mount(root, mount(subPathExpr=contract.pod_subpath_expr(REF)), {contract.ENV_POD_UID: UID_A})
    assert [p.name for p in outside.iterdir()] == ["models"]
    # An existing target out of the volume is refused too.
    with pytest.raises(MountError, match="not within volume path"):
        resolve_mount(root, mount(subPath=f"{contract.PODS_DIR}/{UID_A}/models"), {})


def test_the_volume_itself_may_be_reached_through_a_link(tmp_path):
    real = cache(tmp_path)
    alias = tmp_path / "alias"
    os.symlink(real, alias)
    link(real, contract.pod_entry(REF, UID_A), HEX_1)
    assert resolve_mount(alias, mount(subPathExpr=contract.pod_subpath_expr(REF)), {contract.ENV_POD_UID: UID_A}) == (
        real / contract.MODELS_DIR / HEX_1
    )


@pytest.mark.parametrize(
    "fields,env,message",
    [
        ({"subPathExpr": "pods/$(MODEL_CACHE_POD_UID)/k"}, {}, "missing value for MODEL_CACHE_POD_UID"),
        ({"subPathExpr": "pods/$(MODEL_CACHE_POD_UID)/k"}, {contract.ENV_POD_UID: ""}, "missing value for MODEL_CACHE_POD_UID"),
        ({"subPathExpr": "$(B)/$(A)"}, {}, "missing value for A, B"),
        ({"subPathExpr": "pods/$(U)/k"}, {"U": "../../etc"}, "unable to provision SubPath `pods/../../etc/k`: must not contain '..'"),
        ({"subPathExpr": "$(U)/k"}, {"U": "/etc"}, "error SubPath `/etc/k` must not be an absolute path"),
        ({"subPath": "refs/../../x"}, {}, "unable to provision SubPath `refs/../../x`: must not contain '..'"),
        ({"subPath": "/var/lib"}, {}, "error SubPath `/var/lib` must not be an absolute path"),
        ({"subPath": "a", "subPathExpr": "b"}, {}, "subPath and subPathExpr are mutually exclusive"),
    ],
    ids=["undefined", "empty", "two-undefined", "value-climbs", "value-absolute", "climbs", "absolute", "both"],
)
def test_refused_subpaths_fail_the_start_and_create_nothing(tmp_path, fields, env, message):
    root = cache(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(MountError) as e:
        resolve_mount(root, mount(**fields), env)
    assert str(e.value) == message
    assert sorted(p for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "expr,expected",
    [
        ("pods/$(U)/k", "pods/u-1/k"),
        ("pods/$$(U)/k", "pods/$(U)/k"),  # $$ escapes
        ("pods/$(U", "pods/$(U"),  # an incomplete reference is kept
        ("a$b/$(U)$", "a$b/u-1$"),  # a '$' that starts nothing is kept
        ("$(U)$(U)", "u-1u-1"),
    ],
)
def test_subpathexpr_expansion(tmp_path, expr, expected):
    root = tmp_path / "v"
    root.mkdir()
    assert resolve_mount(root, mount(subPathExpr=expr), {"U": "u-1"}) == root / expected


def test_args_keep_undefined_variables_as_written():
    env = {contract.ENV_POD_UID: UID_A, "EMPTY": ""}
    assert expand_args(["--pod-uid", "$(MODEL_CACHE_POD_UID)", "$(NOPE)", "$$(MODEL_CACHE_POD_UID)", "x$(EMPTY)y"], env) == [
        "--pod-uid", UID_A, "$(NOPE)", "$(MODEL_CACHE_POD_UID)", "xy"]


def test_container_env_values_refer_to_earlier_variables_only():
    pod = {"metadata": {"uid": UID_A, "name": "p", "namespace": "ml"}, "spec": {"nodeName": "node-a"}}
    container = {"name": "c", "env": [
        {"name": "LATER_REF", "value": "$(NODE)-x"},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "BOTH", "value": "$(NODE)/$(UID)"},
        {"name": "EMPTY"},
    ]}
    assert container_env(pod, container) == {
        "LATER_REF": "$(NODE)-x", "NODE": "node-a", "UID": UID_A, "BOTH": f"node-a/{UID_A}", "EMPTY": ""}
    with pytest.raises(MountError, match=r"has no spec\.nodeName"):
        container_env({**pod, "spec": {}}, container)
    with pytest.raises(NotImplementedError):
        container_env(pod, {"name": "c", "envFrom": [{"configMapRef": {"name": "x"}}]})


# --- the webhook's output, started by the model ---------------------------------------------------------------------


def injected_pod(uid: str) -> dict[str, Any]:
    """The pod the webhook makes (init-container path, node cache), bound to node-a by the scheduler."""
    node = {"metadata": {"name": "node-a", "labels": {}}, "status": {"nodeInfo": {
        "containerRuntimeVersion": "containerd://2.0.1", "kubeletVersion": "v1.36.0"}}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "chat-0", "annotations": {ann.REF: REF}},
           "spec": {"containers": [{"name": "server", "image": "registry.example.com/vllm:1"}]}}
    out = mutate_pod(pod, "ml", None, snapshot_from([node], []), Settings()).pod
    return {**out, "metadata": {**out["metadata"], "uid": uid}, "spec": {**out["spec"], "nodeName": "node-a"}}


def test_the_injected_pod_mounts_its_own_entry_and_its_loader_is_told_where(tmp_path):
    root = cache(tmp_path)
    pod = injected_pod(UID_A)
    loader = pod["spec"]["initContainers"][0]
    args = expand_args(loader["args"], container_env(pod, loader))
    assert args[args.index("--pod-uid") : args.index("--pod-uid") + 4] == ["--pod-uid", UID_A, "--node-name", "node-a"]
    assert start_container(pod, loader["name"], {"model-cache": root}) == {contract.CACHE_MOUNT: root}
    link(root, contract.pod_entry(REF, UID_A), HEX_1)  # what the loader writes
    assert start_container(pod, "server", {"model-cache": root}) == {"/models/phi3": root / contract.MODELS_DIR / HEX_1}
    link(root, contract.ref_subpath(REF), HEX_2)  # the tag moves; the app container restarts
    assert start_container(pod, "server", {"model-cache": root}) == {"/models/phi3": root / contract.MODELS_DIR / HEX_1}
    # Another pod of the same template gets the same patch, and its own entry.
    other = injected_pod(UID_B)
    assert other["spec"] == pod["spec"]
    link(root, contract.pod_entry(REF, UID_B), HEX_2)
    assert start_container(other, "server", {"model-cache": root}) == {"/models/phi3": root / contract.MODELS_DIR / HEX_2}
