"""The CSI node plugin (loader/csi) over a real unix socket with a real gRPC client, against real registries, with
real bind mounts (the tests run as root).

kubelet is played by the test: it creates the target's parent directory under a "kubelet pods directory" in
tmp_path, as kubelet does (pods/<uid>/volumes/kubernetes.io~csi/<name>/mount), and sends what kubelet sends for an
inline ephemeral volume with podInfoOnMount. Every mount made under tmp_path is taken down in teardown, even
after a failure.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from loader import contract
from loader.access import PROOF_BYTES
from loader.cache import Cache
from loader.csi import DRIVER_NAME, csi_pb2, csi_pb2_grpc, mounts
from loader.csi.jobs import Jobs, Limits, Owner, TooManyJobs
from loader.csi.server import Refusal, Running, serve, wait_budget
from loader.log import Logger
from tests.support.auth_registry import session_for, start_htpasswd_registry
from tests.support.files import tree
from tests.support.logged_registry import LoggedRegistry, start_logged_registry
from tests.support.oci import Pusher, file_layer
from tests.support.throttle import ThrottleProxy
from tests.support.unmount import unmount_all_under

UID_A = "0f8fad5b-d9cb-469f-a165-70867728950e"
UID_B = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
UID_C = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
FILES = {"config.json": b'{"architectures": ["Phi3"]}', "model.safetensors": os.urandom(200_000) + b"end",
         "tokenizer/tokenizer.json": b'{"model": {"type": "BPE"}}'}
OTHER = {"other.bin": b"another model"}
MOUNT = "csi"


# ---- the node: a plugin on a socket, a kubelet pods dir, a cache --------------------------------------------------
@dataclass
class Node:
    root: Path
    sockdir: Path
    running: Running | None = None
    channel: grpc.Channel | None = None
    log_lines: list[str] = field(default_factory=list)

    @property
    def socket(self) -> str:
        return str(self.sockdir / "csi.sock")

    @property
    def pods(self) -> Path:
        return self.root / "kubelet" / "pods"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def state(self) -> Path:
        return self.sockdir / "volumes"

    def start(self, max_workers: int = 16) -> Node:
        stream = _Lines(self.log_lines)
        self.running = serve(self.socket, self.cache, "node-a", str(self.pods), log=Logger(stream),
                             max_workers=max_workers)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        return self

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.running is not None:
            self.running.stop()
            self.running = None

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        assert self.channel is not None
        return csi_pb2_grpc.NodeStub(self.channel)

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        assert self.channel is not None
        return csi_pb2_grpc.IdentityStub(self.channel)

    def target(self, uid: str, name: str = "model") -> Path:
        """What kubelet gives: pods/<uid>/volumes/kubernetes.io~csi/<name>/mount, its parent made."""
        parent = self.pods / uid / "volumes" / "kubernetes.io~csi" / name
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    def publish(self, ref: str, uid: str, name: str = "model", timeout: float = 60.0, **kw: object) -> None:
        self.node.NodePublishVolume(publish_request(ref, uid, self.target(uid, name), name=name, **kw),
                                    timeout=timeout)

    def unpublish(self, uid: str, name: str = "model", volume_id: str | None = None) -> None:
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id or f"csi-{uid}-{name}", target_path=str(self.target(uid, name))), timeout=30)

    def mounted(self) -> list[str]:
        """Mount points under this node's root, in mount order."""
        with open(mounts.MOUNTINFO) as f:
            table = mounts.parse_mountinfo(f.read())
        return [m.mount_point for m in table if m.mount_point.startswith(str(self.root) + "/")]


class _Lines:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def write(self, s: str) -> None:
        self.lines.append(s)

    def flush(self) -> None:
        pass


def publish_request(ref: str, uid: str, target: Path | str, *, volume_id: str | None = None, readonly: bool = True,
                    secret: dict[str, str] | None = None, context: dict[str, str] | None = None,
                    capability: csi_pb2.VolumeCapability | None = None, staging: str = "",
                    name: str = "model") -> csi_pb2.NodePublishVolumeRequest:
    """What kubelet sends for `csi: {driver: model.cache, readOnly: true, volumeAttributes: {ref: REF}}`."""
    ctx = {"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.uid": uid,
           "csi.storage.k8s.io/pod.namespace": "team-a", "csi.storage.k8s.io/pod.name": f"app-{uid[:4]}",
           "csi.storage.k8s.io/serviceAccount.name": "default", "ref": ref}
    if context is not None:
        ctx = context
    cap = capability if capability is not None else csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id or f"csi-{uid}-{name}", target_path=str(target), staging_target_path=staging,
        volume_capability=cap, readonly=readonly, secrets=secret or {}, volume_context=ctx)


def dockerconfig(host: str, user: str, password: str) -> dict[str, str]:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {".dockerconfigjson": json.dumps({"auths": {host: {"auth": auth}}})}


@pytest.fixture
def make_node(tmp_path) -> Iterator:
    """Nodes on tmp_path (the socket in a short directory of its own: a unix socket path has at most 107 bytes)."""
    made: list[Node] = []

    def make(start: bool = True, name: str = "node") -> Node:
        sockdir = Path(tempfile.mkdtemp(prefix="csi-", dir="/tmp"))
        node = Node(tmp_path / f"{name}{len(made)}", sockdir)
        node.pods.mkdir(parents=True)
        made.append(node)
        return node.start() if start else node

    yield make
    for node in made:
        try:
            node.stop()
        finally:
            unmount_all_under(node.root)
            shutil.rmtree(node.sockdir, ignore_errors=True)


@pytest.fixture
def node(make_node) -> Node:
    return make_node()


@pytest.fixture(scope="module")
def model(registry) -> tuple[str, str]:
    p = Pusher(registry.url)
    digest = p.push_artifact("csi/model", "v1", [file_layer(n, d) for n, d in FILES.items()])
    p.push_artifact("csi/other", "v1", [file_layer(n, d) for n, d in OTHER.items()])
    return f"{registry.host}/csi/model:v1", digest


def code_of(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value.code(), e.value.details()


# ---- identity ------------------------------------------------------------------------------------------------------
def test_identity_and_node_info(node):
    info = node.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
    assert (info.name, info.vendor_version) == (DRIVER_NAME, "0.1.0")
    assert list(node.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), timeout=10)
                .capabilities) == []
    probe = node.identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
    assert probe.HasField("ready") and probe.ready.value is True
    assert node.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10).node_id == "node-a"
    assert list(node.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=10).capabilities) == []
    assert oct(os.stat(node.socket).st_mode & 0o777) == "0o600"


def test_probe_fails_when_the_cache_is_not_usable(node):
    refs = node.cache / contract.REFS_DIR
    shutil.rmtree(refs)
    refs.write_text("not a directory")
    code, msg = code_of(node.identity.Probe, csi_pb2.ProbeRequest(), timeout=10)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "refs is not a directory" in msg


# ---- publish and unpublish -----------------------------------------------------------------------------------------
def test_publish_mounts_the_exact_tree_read_only_and_unpublish_takes_it_away(node, model):
    ref, digest = model
    target = node.target(UID_A)
    node.publish(ref, UID_A)
    assert tree(target) == FILES
    assert node.mounted() == [str(target)]
    with open(mounts.MOUNTINFO) as f:
        m = mounts.mount_at(str(target), mounts.parse_mountinfo(f.read()))
    assert m is not None and {"ro", "nosuid", "nodev", "noexec"} <= m.options
    for attempt in (lambda: (target / "new.txt").write_bytes(b"x"),
                    lambda: (target / "config.json").write_bytes(b"x"),
                    lambda: (target / "tokenizer").rmdir()):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    cache = Cache(node.cache)
    assert cache.pinned(ref, UID_A) == digest  # the pod's pin, as the init-container path writes it
    assert os.path.samefile(target, cache.model_path(digest))

    node.unpublish(UID_A)
    assert node.mounted() == [] and not target.exists() and target.parent.is_dir()
    assert not (node.cache / contract.PODS_DIR / UID_A).exists()  # the pod's last volume: its pin went
    assert tree(cache.model_path(digest)) == FILES  # the cached model stays for the next pod
    assert os.listdir(node.state) == []
    node.unpublish(UID_A)  # idempotent: a missing target is fine


def test_publish_is_idempotent_and_refuses_another_model_at_the_target(node, model, registry):
    ref, _ = model
    node.publish(ref, UID_A)
    node.publish(ref, UID_A)  # the same volume and target: OK, nothing stacked
    assert node.mounted() == [str(node.target(UID_A))]
    other = f"{registry.host}/csi/other:v1"
    code, msg = code_of(node.publish, other, UID_A)  # same volume id, another model
    assert code == grpc.StatusCode.ALREADY_EXISTS and ref in msg and other in msg
    code, msg = code_of(node.publish, other, UID_A, volume_id="csi-another-volume")  # another volume, same target
    assert code == grpc.StatusCode.ALREADY_EXISTS and "already has a mount" in msg
    assert node.mounted() == [str(node.target(UID_A))] and tree(node.target(UID_A)) == FILES


def test_two_volumes_of_one_pod_keep_its_pin_until_the_last_goes(node, model, registry):
    ref, digest = model
    other = f"{registry.host}/csi/other:v1"
    node.publish(ref, UID_A, name="one")
    node.publish(other, UID_A, name="two")
    assert (tree(node.target(UID_A, "one")), tree(node.target(UID_A, "two"))) == (FILES, OTHER)
    node.unpublish(UID_A, "one")
    assert Cache(node.cache).pinned(other, UID_A) is not None and Cache(node.cache).pinned(ref, UID_A) == digest
    node.unpublish(UID_A, "two")
    assert not (node.cache / contract.PODS_DIR / UID_A).exists() and node.mounted() == []


def test_paths_with_spaces_are_read_back_from_the_mount_table(make_node, model):
    """mountinfo writes a space as \\040: the plugin finds its own mount again (idempotency, unpublish)."""
    ref, _ = model
    node = make_node(name="a node ")
    node.publish(ref, UID_A)
    node.publish(ref, UID_A)
    assert node.mounted() == [str(node.target(UID_A))] and tree(node.target(UID_A)) == FILES
    node.unpublish(UID_A)
    assert node.mounted() == [] and not node.target(UID_A).exists()


def test_parse_mountinfo():
    text = ("22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
            "43 22 254:0 /var/cache/models/sha256/ab /var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/my\\040vol/mount"
            " ro,nosuid,nodev,noexec,relatime shared:1 master:2 - ext4 /dev/vda rw\n"
            "44 22 0:5 / /odd rw - tmpfs\n"
            "not a mountinfo line\n")
    assert mounts.parse_mountinfo(text) == [
        mounts.Mount("/", "/", "254:0", frozenset({"rw", "relatime"}), "ext4"),
        mounts.Mount("/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/my vol/mount", "/var/cache/models/sha256/ab",
                     "254:0", frozenset({"ro", "nosuid", "nodev", "noexec", "relatime"}), "ext4"),
        mounts.Mount("/odd", "/", "0:5", frozenset({"rw"}), "tmpfs"),
    ]


# ---- arguments ------------------------------------------------------------------------------------------------------
def _mount_capability() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())


def _ctx(**change: str | None) -> dict[str, str]:
    ctx = {"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.uid": UID_A,
           "csi.storage.k8s.io/pod.namespace": "team-a", "csi.storage.k8s.io/pod.name": "app",
           "csi.storage.k8s.io/serviceAccount.name": "default", "ref": "REF"}
    for k, v in change.items():
        key = {"ephemeral": "csi.storage.k8s.io/ephemeral", "uid": "csi.storage.k8s.io/pod.uid"}.get(k, k)
        if v is None:
            ctx.pop(key, None)
        else:
            ctx[key] = v
    return ctx


WRONG = {
    "readonly-false": (dict(readonly=False), "readonly is false"),
    "no-ref": (dict(context=_ctx(ref=None)), "volume_context has no 'ref'"),
    "bad-ref": (dict(context=_ctx(ref="Not A Ref")), "volume_context ref 'Not A Ref' is not a model reference"),
    "not-ephemeral": (dict(context=_ctx(ephemeral=None)), "serves only inline ephemeral volumes"),
    "no-pod-info": (dict(context=_ctx(uid=None)), "set podInfoOnMount: true"),
    "bad-pod-uid": (dict(context=_ctx(uid="../../etc")), "is not a pod UID"),
    "unknown-attribute": (dict(context=_ctx(reference="x")), "does not know: ['reference']"),
    "block": (dict(capability=csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume())),
              "access_type is block, not mount"),
    "fs-type": (dict(capability=csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(
        fs_type="ext4"))), "mount.fs_type is 'ext4'"),
    "staging": (dict(staging="/var/lib/kubelet/plugins/x"), "no STAGE_UNSTAGE_VOLUME capability"),
    "two-secret-keys": (dict(secret={".dockerconfigjson": "{}", "token": "t"}),
                        "secrets has the keys ['.dockerconfigjson', 'token']"),
    "secret-not-json": (dict(secret={".dockerconfigjson": "{not json"}),
                        "nodePublishSecretRef key .dockerconfigjson: not valid JSON"),
    "secret-helpers": (dict(secret={".dockerconfigjson": json.dumps({"credHelpers": {"r.example": "evil"}})}),
                       "names credential helpers"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_arguments_are_invalid_argument_naming_the_field_and_nothing_is_touched(node, model, case):
    ref, _ = model
    kw, fragment = WRONG[case]
    if "context" in kw:
        kw = dict(kw, context={k: (ref if v == "REF" else v) for k, v in kw["context"].items()})
    target = node.target(UID_A)
    code, msg = code_of(node.node.NodePublishVolume, publish_request(ref, UID_A, target, **kw), timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in msg, msg
    if case.startswith("secret"):
        assert "{not json" not in msg and "evil" not in msg  # never a secret's content
    assert not target.exists() and node.mounted() == [] and os.listdir(node.state) == []
    assert os.listdir(node.cache / contract.MODELS_DIR) == []


@pytest.mark.parametrize("target,fragment", [
    ("relative/mount", "is not absolute"),
    ("{pods}/{uid}/volumes/../../../etc", "is not a normal path"),
    ("{root}/elsewhere/mount", "is not under the kubelet pods directory"),
    ("", "target_path is empty"),
], ids=["relative", "dotdot", "outside", "empty"])
def test_bad_target_paths_are_refused(node, model, target, fragment):
    ref, _ = model
    path = target.format(pods=node.pods, uid=UID_A, root=node.root)
    for call, req in ((node.node.NodePublishVolume, publish_request(ref, UID_A, path)),
                      (node.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(volume_id="v",
                                                                                          target_path=path))):
        code, msg = code_of(call, req, timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in msg
    code, msg = code_of(node.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
        target_path=str(node.target(UID_A))), timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "volume_id is empty" in msg


def test_a_pods_dir_behind_a_symlink_is_resolved_once_at_start(make_node, model):
    """/var/lib/kubelet on another disk through a symlink: kubelet resolves its root directory, so the targets it
    sends are under the real path, while the admin starts the plugin with the configured one (--pods-dir). The
    plugin resolves --pods-dir once at start (the admin's own symlink, trusted) and publishes, checks and unpublishes
    at the targets kubelet gives; no symlink below it is followed, as before."""
    node = make_node(start=False)
    real = node.root / "data" / "kubelet" / "pods"
    real.mkdir(parents=True)
    node.pods.rmdir()
    node.pods.symlink_to(real)
    node.start()
    ref, _ = model
    parent = real / UID_A / "volumes" / "kubernetes.io~csi" / "model"
    parent.mkdir(parents=True)
    target = parent / "mount"
    node.node.NodePublishVolume(publish_request(ref, UID_A, target), timeout=60)
    assert tree(target) == FILES
    assert node.mounted() == [str(target)]
    node.node.NodePublishVolume(publish_request(ref, UID_A, target), timeout=60)  # idempotent: found as published
    assert node.mounted() == [str(target)]
    node.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=f"csi-{UID_A}-model", target_path=str(target)), timeout=30)
    assert node.mounted() == [] and not target.exists()


def test_a_symlink_out_of_the_pods_dir_is_refused(node, model):
    ref, _ = model
    outside = node.root / "outside"
    outside.mkdir()
    (node.pods / UID_A).symlink_to(outside)
    code, msg = code_of(node.publish, ref, UID_A)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "through a symlink" in msg
    assert list(outside.rglob("*")) == [outside / "volumes", outside / "volumes" / "kubernetes.io~csi",
                                        outside / "volumes" / "kubernetes.io~csi" / "model"]  # what the test made
    assert node.mounted() == []



def test_a_symlinked_component_of_the_targets_parent_is_refused_and_nothing_is_mounted_outside(node, model):
    ref, _ = model
    outside = node.root / "outside"
    outside.mkdir()
    csi = node.pods / UID_A / "volumes" / "kubernetes.io~csi"
    csi.mkdir(parents=True)
    (csi / "model").symlink_to(outside)
    code, msg = code_of(node.publish, ref, UID_A)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "through a symlink" in msg
    assert list(outside.iterdir()) == [] and node.mounted() == []


def test_a_symlink_that_stays_inside_the_pods_dir_is_refused_too(node, model):
    """A symlink resolving inside the pods directory passes the check by path; the mount walks the parent without
    following any, so it is refused all the same, and nothing is made or mounted where it points."""
    ref, _ = model
    inside = node.pods / UID_B / "elsewhere"
    inside.mkdir(parents=True)
    csi = node.pods / UID_A / "volumes" / "kubernetes.io~csi"
    csi.mkdir(parents=True)
    (csi / "model").symlink_to(inside)
    code, msg = code_of(node.publish, ref, UID_A)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "through a symlink ('model')" in msg
    assert list(inside.iterdir()) == [] and node.mounted() == [] and os.listdir(node.state) == []


def test_a_component_swapped_for_a_symlink_after_the_check_is_refused_at_the_mount(node):
    """The race the walk closes: every component is a directory when the request is checked, then one becomes a
    symlink to a directory outside the pods dir before the target is made."""
    assert node.running is not None
    plugin = node.running.plugin
    target = node.target(UID_A)
    plugin._check_target(str(target))  # passes: no symlink yet
    csi = target.parent.parent
    outside = node.root / "outside"
    (outside / "model").mkdir(parents=True)
    csi.rename(node.root / "moved")
    csi.symlink_to(outside)
    with pytest.raises(Refusal) as e:
        plugin._make_target(str(target))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "through a symlink ('kubernetes.io~csi')" in e.value.message
    assert list(outside.rglob("*")) == [outside / "model"] and node.mounted() == []


@pytest.mark.parametrize("kind,fragment", [
    ("file", "exists and is not a directory"),
    ("symlink", "exists and is not a directory"),
    ("full", "is a directory with files in it"),
    ("no parent", "does not exist; kubelet creates it"),
])
def test_a_target_that_is_not_an_empty_directory_is_a_failed_precondition(node, model, kind, fragment):
    ref, _ = model
    target = node.target(UID_A)
    empty = node.pods / UID_B / "empty"
    empty.mkdir(parents=True)
    if kind == "file":
        target.write_text("x")
    elif kind == "symlink":
        target.symlink_to(empty)
    elif kind == "full":
        target.mkdir()
        (target / "f").write_text("x")
    else:
        target.parent.rmdir()
    code, msg = code_of(node.node.NodePublishVolume, publish_request(ref, UID_A, target), timeout=60)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and fragment in msg
    assert node.mounted() == [] and list(empty.iterdir()) == [] and os.listdir(node.state) == []

def test_open_beneath_walks_each_component_without_following_a_symlink(tmp_path):
    root, out = tmp_path / "pods", tmp_path / "out"
    (root / "a" / "b").mkdir(parents=True)
    out.mkdir()
    (root / "a" / "out").symlink_to(out)
    (root / "a" / "in").symlink_to(root / "a" / "b")
    (root / "a" / "file").write_text("x")
    (tmp_path / "alias").symlink_to(root)
    fds = len(os.listdir("/proc/self/fd"))
    for base in (root, tmp_path / "alias"):  # the root itself is the admin's path: a symlink there is followed
        fd = mounts.open_beneath(str(base), str(base / "a" / "b"))
        try:
            assert os.path.samestat(os.fstat(fd), os.stat(root / "a" / "b"))
        finally:
            os.close(fd)
    for path, component in ((root / "a" / "out", "out"), (root / "a" / "out" / "x", "out"),
                            (root / "a" / "in" / "x", "in")):
        with pytest.raises(mounts.NotBeneath) as e:
            os.close(mounts.open_beneath(str(root), str(path)))
        assert e.value.component == component
    with pytest.raises(FileNotFoundError):
        os.close(mounts.open_beneath(str(root), str(root / "a" / "missing")))
    with pytest.raises(NotADirectoryError):
        os.close(mounts.open_beneath(str(root), str(root / "a" / "file")))
    assert len(os.listdir("/proc/self/fd")) == fds  # every descriptor the walks opened is closed
    assert mounts.names_below("/k/pods/u/v", "/k/pods") == ["u", "v"] and mounts.names_below("/k/pods", "/k/pods") == []
    for bad in ("/k/podsx/u", "/k/pods/u/../v", "/k/pods/u//v", "/elsewhere"):
        with pytest.raises(mounts.NotBeneath):
            mounts.names_below(bad, "/k/pods")

# ---- loader errors ---------------------------------------------------------------------------------------------------
def test_a_missing_model_is_not_found_with_the_loaders_message(node, registry):
    ref = f"{registry.host}/csi/absent:v1"
    code, msg = code_of(node.publish, ref, UID_A)
    assert code == grpc.StatusCode.NOT_FOUND and "csi/absent" in msg
    assert node.mounted() == [] and not node.target(UID_A).exists()
    node.publish(f"{registry.host}/csi/other:v1", UID_A)  # the failed job is gone: a good ref for the volume works
    assert tree(node.target(UID_A)) == OTHER


@pytest.fixture(scope="module")
def private():
    reg = start_htpasswd_registry({"victim": "victim-secret", "mallory": "mallory-secret"})
    try:
        p = Pusher(reg.url, session=session_for(reg, auth=("victim", "victim-secret")))
        reg.digest = p.push_artifact("victim/private", "v1", [file_layer(n, d) for n, d in FILES.items()])
        yield reg
    finally:
        reg.stop()


def test_another_tenant_is_refused_as_the_access_rule_says(node, private):
    ref = f"{private.host}/victim/private:v1"
    node.publish(ref, UID_A, secret=dockerconfig(private.host, "victim", "victim-secret"))
    assert tree(node.target(UID_A)) == FILES
    # Another pod on the node, with the victim's exact reference: no credentials, then wrong ones.
    code, msg = code_of(node.publish, ref, UID_B)
    assert code == grpc.StatusCode.UNAUTHENTICATED and private.host in msg
    code, msg = code_of(node.publish, ref, UID_C, secret=dockerconfig(private.host, "victim", "guessed"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and private.host in msg and "guessed" not in msg
    assert node.mounted() == [str(node.target(UID_A))]
    assert sorted(os.listdir(node.cache / contract.PODS_DIR)) == [UID_A]  # no pin for the refused pods
    assert not any(secret in line for line in node.log_lines for secret in ("victim-secret", "guessed"))
    assert not node.target(UID_B).exists() and not node.target(UID_C).exists()


# ---- one download for many pods ------------------------------------------------------------------------------------
@pytest.fixture
def logged() -> Iterator[LoggedRegistry]:
    reg = start_logged_registry()
    yield reg
    reg.cleanup()


def test_concurrent_publishes_of_one_model_share_one_download(node, logged):
    files = {f"shard-{i}.bin": os.urandom(300_000) for i in range(3)}
    layers = [file_layer(n, d) for n, d in files.items()]
    Pusher(logged.url).push_artifact("shared/model", "v1", layers)
    uids = [UID_A, UID_B, UID_C]
    with ThrottleProxy(logged.url, rate=200_000) as proxy:  # the download takes a while: the calls overlap
        ref = f"{proxy.host}/shared/model:v1"
        calls = [node.node.NodePublishVolume.future(publish_request(ref, uid, node.target(uid)), timeout=60)
                 for uid in uids]
        for call in calls:
            call.result()
    assert [tree(node.target(uid)) for uid in uids] == [files] * 3
    events = Counter(line.split(" event=")[1].split(" ")[0] for line in node.log_lines if " event=" in line)
    assert (events["pull.start"], events["pull.hit"], events["csi.publish.done"]) == (1, 2, 3)
    gets = [g for g in logged.blob_gets() if g.repo == "shared/model"]
    # The loader asks for every blob with a Range (206 answers), so downloads are counted in bytes served: each
    # blob's bytes once; the other pods proved access with a window of PROOF_BYTES of each blob (plain HTTP: proof
    # of possession), no more.
    served = Counter()
    for g in gets:
        if g.bytes > PROOF_BYTES:
            served[g.digest] += g.bytes
    assert served == Counter({layer.descriptor()["digest"]: len(layer.data) for layer in layers})
    proofs = [g for g in gets if g.bytes <= PROOF_BYTES]
    assert len(proofs) == 2 * len(layers) and all(g.status == 206 for g in proofs)


# ---- a pull longer than kubelet's deadline -------------------------------------------------------------------------
def test_a_pull_past_the_deadline_is_aborted_then_a_retry_completes_it(node, logged):
    weights = os.urandom(3 << 20)
    layer = file_layer("weights.bin", weights)
    Pusher(logged.url).push_artifact("slow/model", "v1", [layer])
    with ThrottleProxy(logged.url, rate=100_000) as proxy:  # 3 MB (one range) at 100 KB/s: far past 3 s
        ref = f"{proxy.host}/slow/model:v1"
        req = publish_request(ref, UID_A, node.target(UID_A))
        code, msg = code_of(node.node.NodePublishVolume, req, timeout=3.0)
        assert code == grpc.StatusCode.ABORTED and "still pulling" in msg
        code, msg = code_of(node.node.NodePublishVolume, req, timeout=3.0)  # kubelet's retry: the same pull goes on
        assert code == grpc.StatusCode.ABORTED and "still pulling" in msg
        assert node.mounted() == []
        proxy.set(rate=None)
        node.node.NodePublishVolume(req, timeout=120)
    assert tree(node.target(UID_A)) == {"weights.bin": weights}
    served = sum(g.bytes for g in logged.blob_gets() if g.digest == layer.descriptor()["digest"])
    assert served == len(weights)  # one download that went on, never restarted
    assert sum("csi.publish.pending" in line for line in node.log_lines) == 2


def _wait_for_log(node: Node, event: str) -> None:
    deadline = time.monotonic() + 60
    while not any(f"event={event}" in line for line in list(node.log_lines)):
        assert time.monotonic() < deadline, node.log_lines
        time.sleep(0.05)


def test_calls_waiting_for_pulls_never_take_the_last_workers(make_node, logged):
    """With 3 workers, one call may wait for a pull: a second publish answers ABORTED at once (its pull queued
    behind the first), and Probe still answers while the first waits."""
    node = make_node(start=False).start(max_workers=3)
    weights = os.urandom(1 << 20)
    Pusher(logged.url).push_artifact("burst/model", "v1", [file_layer("w.bin", weights)])
    with ThrottleProxy(logged.url, rate=50_000) as proxy:
        ref = f"{proxy.host}/burst/model:v1"
        first = node.node.NodePublishVolume.future(publish_request(ref, UID_A, node.target(UID_A)), timeout=60)
        _wait_for_log(node, "pull.start")
        code, msg = code_of(node.publish, ref, UID_B, timeout=30)
        assert code == grpc.StatusCode.ABORTED and "already do" in msg
        assert node.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value is True
        proxy.set(rate=None)
        first.result()
        node.publish(ref, UID_B)
    assert tree(node.target(UID_A)) == tree(node.target(UID_B)) == {"w.bin": weights}


def test_wait_budget_keeps_a_margin_before_the_callers_deadline():
    assert [wait_budget(t) for t in (None, 120.0, 10.0, 2.0, 0.3)] == [110.0, 110.0, 9.0, 1.0, 0.0]


# ---- restart -------------------------------------------------------------------------------------------------------
def test_after_a_restart_the_mount_still_reads_and_unpublish_works(make_node, model):
    ref, _ = model
    node = make_node()
    target = node.target(UID_A)
    node.publish(ref, UID_A)
    node.stop()
    assert tree(target) == FILES  # a kernel bind mount: no agent needed
    node.start()  # a new process would see the same: the socket, the state dir and the mount table
    node.publish(ref, UID_A)  # kubelet re-publishing after the restart: recognised, nothing stacked
    assert node.mounted() == [str(target)] and tree(target) == FILES
    node.unpublish(UID_A)
    assert node.mounted() == [] and not target.exists()
    assert not (node.cache / contract.PODS_DIR / UID_A).exists()


def test_a_lost_mount_or_a_lost_record_is_repaired_by_the_next_publish(node, model):
    """What a crash between the record and the mount leaves (a record, no mount), and a state directory wiped
    under a live mount (a mount, no record): kubelet's retry makes both whole again."""
    ref, _ = model
    target = node.target(UID_A)
    node.publish(ref, UID_A)
    subprocess.run(["umount", str(target)], check=True)
    node.publish(ref, UID_A)
    assert node.mounted() == [str(target)] and tree(target) == FILES
    for name in os.listdir(node.state):
        os.unlink(node.state / name)
    node.publish(ref, UID_A)  # the mount is this model, read-only: adopted, its record written again
    assert node.mounted() == [str(target)] and len(os.listdir(node.state)) == 1
    node.unpublish(UID_A)
    assert node.mounted() == [] and not (node.cache / contract.PODS_DIR / UID_A).exists()


# ---- the command line ----------------------------------------------------------------------------------------------
def _agent(node: Node) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loader.cli", "csi", "--socket", node.socket, "--cache",
                             str(node.cache), "--node-name", "node-b", "--pods-dir", str(node.pods)],
                            stderr=subprocess.PIPE, text=True)


def _stopped(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def test_the_csi_subcommand_serves_until_sigterm_and_a_new_process_unpublishes(make_node, model):
    ref, _ = model
    node = make_node(start=False)
    req = publish_request(ref, UID_A, node.target(UID_A))
    for round_ in ("first", "restarted"):
        proc = _agent(node)
        try:
            with grpc.insecure_channel(f"unix://{node.socket}") as channel:
                grpc.channel_ready_future(channel).result(timeout=60)
                stub = csi_pb2_grpc.NodeStub(channel)
                assert stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10).node_id == "node-b"
                stub.NodePublishVolume(req, timeout=60)  # the restarted agent finds the mount: OK, nothing stacked
                assert node.mounted() == [str(node.target(UID_A))] and tree(node.target(UID_A)) == FILES
                if round_ == "restarted":
                    stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                        volume_id=req.volume_id, target_path=req.target_path), timeout=30)
        finally:
            err = _stopped(proc)
        assert "event=csi.serving" in err and "event=csi.stopping" in err
        done = "event=csi.publish.done" if round_ == "first" else "event=csi.publish.exists"
        assert done in err, err
    assert node.mounted() == [] and not node.target(UID_A).exists()
    assert not (node.cache / contract.PODS_DIR / UID_A).exists()


def test_loader_errors_map_to_the_specs_codes():
    from loader import errors
    from loader.cache import CacheCorrupt
    from loader.csi.codes import code_for
    from loader.digest import InvalidDigest

    table = [(errors.AuthError("x"), True, grpc.StatusCode.PERMISSION_DENIED),
             (errors.AuthError("x"), False, grpc.StatusCode.UNAUTHENTICATED),
             (errors.NotFoundError("x"), True, grpc.StatusCode.NOT_FOUND),
             (errors.NoSpaceError("x"), False, grpc.StatusCode.RESOURCE_EXHAUSTED),
             (errors.UsageError("x"), False, grpc.StatusCode.INVALID_ARGUMENT),
             (errors.ArtifactError("x"), False, grpc.StatusCode.INVALID_ARGUMENT),
             (InvalidDigest("x"), False, grpc.StatusCode.INVALID_ARGUMENT),
             (errors.DigestMismatch("x"), False, grpc.StatusCode.DATA_LOSS),
             (errors.RejectedError("x", 400, "DENIED"), False, grpc.StatusCode.FAILED_PRECONDITION),
             (errors.NetworkError("x"), False, grpc.StatusCode.UNAVAILABLE),
             (errors.DeadlineExceeded("x"), False, grpc.StatusCode.UNAVAILABLE),
             (errors.LockTimeout("x"), False, grpc.StatusCode.UNAVAILABLE),
             (errors.ConnectError("x"), False, grpc.StatusCode.UNAVAILABLE),
             (CacheCorrupt("x"), False, grpc.StatusCode.INTERNAL),
             (errors.LoaderError("x"), False, grpc.StatusCode.INTERNAL)]
    assert [code_for(e, creds) for e, creds, _ in table] == [c for _, _, c in table]


# ---- the generated modules -------------------------------------------------------------------------------------------
def test_the_committed_modules_are_what_the_proto_generates(tmp_path):
    from tests.support.csi_codegen import OUTPUTS, ROOT, generate

    fresh = generate(tmp_path)
    assert sorted(fresh) == sorted(OUTPUTS)
    for name, data in fresh.items():
        assert (ROOT / "loader/csi" / name).read_bytes() == data, f"loader/csi/{name} is stale: regenerate it"


def test_one_call_per_volume_at_a_time(node, logged):
    """A second call for a volume while the first is in flight is ABORTED (the spec's "operation pending")."""
    Pusher(logged.url).push_artifact("busy/model", "v1", [file_layer("w.bin", os.urandom(1 << 20))])
    with ThrottleProxy(logged.url, rate=50_000) as proxy:
        req = publish_request(f"{proxy.host}/busy/model:v1", UID_A, node.target(UID_A))
        first = node.node.NodePublishVolume.future(req, timeout=60)
        _wait_for_log(node, "pull.start")  # the first call is pulling
        code, msg = code_of(node.node.NodePublishVolume, req, timeout=10)
        assert code == grpc.StatusCode.ABORTED and "another call for volume" in msg
        proxy.set(rate=None)
        first.result()
    assert node.mounted() == [str(node.target(UID_A))]


# ---- caps on running pulls: one tenant cannot take the node's every slot -------------------------------------------
class SilentRegistry:
    """A "registry" on 127.0.0.1 that accepts connections and never answers; ``close()`` drops them all (the pulls
    waiting on it then fail)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        if self._thread.is_alive():
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
            self.sock.close()
            self._thread.join()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentRegistry]:
    reg = SilentRegistry()
    yield reg
    reg.close()


def _uid(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-000000000000"


def _pod_ctx(uid: str, namespace: str, ref: str) -> dict[str, str]:
    return {"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.uid": uid,
            "csi.storage.k8s.io/pod.namespace": namespace, "csi.storage.k8s.io/pod.name": f"app-{uid[:8]}",
            "csi.storage.k8s.io/serviceAccount.name": "default", "ref": ref}


def _publish_to(node: Node, ref: str, uid: str, namespace: str, name: str, timeout: float = 60.0) -> None:
    node.node.NodePublishVolume(publish_request(ref, uid, node.target(uid, name), name=name,
                                                context=_pod_ctx(uid, namespace, ref)), timeout=timeout)


def _hang(node: Node, silent: SilentRegistry, pods: list[tuple[str, str]], volumes: int) -> None:
    """Each pod (uid, namespace) publishes ``volumes`` volumes of models on the silent registry, one repository
    each, the pod's calls at once (fewer than the call threads): every call answers ABORTED "still pulling" and its
    pull stays running."""
    for uid, namespace in pods:
        calls = []
        for v in range(volumes):
            ref = f"{silent.host}/hang/{uid[:8]}-{v}:v1"
            req = publish_request(ref, uid, node.target(uid, f"m{v}"), name=f"m{v}",
                                  context=_pod_ctx(uid, namespace, ref))
            calls.append(node.node.NodePublishVolume.future(req, timeout=1.5))
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call.result()
            assert e.value.code() == grpc.StatusCode.ABORTED and "still pulling" in e.value.details()
    assert node.running is not None and node.running.plugin.jobs.running() == len(pods) * volumes


def test_one_pods_hanging_pulls_stop_at_its_cap_and_other_pods_still_publish(node, model, silent):
    uid = _uid(1)
    _hang(node, silent, [(uid, "team-a")], 8)
    ref = f"{silent.host}/hang/ninth:v1"
    code, msg = code_of(_publish_to, node, ref, uid, "team-a", "m8", timeout=30)
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"pod team-a/app-{uid[:8]} (uid {uid}) has 8 pulls running, the most one pod may have at"
                           " once (8); retry later")
    other = _uid(2)  # another pod of the same namespace
    _publish_to(node, model[0], other, "team-a", "model")
    assert tree(node.target(other, "model")) == FILES
    assert node.mounted() == [str(node.target(other, "model"))]


def test_one_namespaces_hanging_pulls_stop_at_its_cap_and_other_namespaces_still_publish(node, model, silent):
    _hang(node, silent, [(_uid(i), "greedy") for i in range(1, 5)], 8)  # 4 pods x 8: the namespace's 32
    fifth = _uid(5)
    code, msg = code_of(_publish_to, node, f"{silent.host}/hang/more:v1", fifth, "greedy", "m0", timeout=30)
    assert (code, msg) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "namespace greedy has 32 pulls running, the most one namespace may have at once (32);"
                           " retry later")
    other = _uid(6)
    _publish_to(node, model[0], other, "team-b", "model")
    assert tree(node.target(other, "model")) == FILES


def test_finished_unclaimed_pulls_count_against_no_cap(node, model, silent):
    """The silent registry goes away: the pod's 8 pulls fail with no call to claim them, and its next volume
    publishes."""
    uid = _uid(1)
    _hang(node, silent, [(uid, "team-a")], 8)
    silent.close()
    assert node.running is not None
    jobs = node.running.plugin.jobs
    deadline = time.monotonic() + 120
    while jobs.running():
        assert time.monotonic() < deadline, node.log_lines
        time.sleep(0.1)
    assert len(jobs.held()) == 8  # finished, unclaimed
    _publish_to(node, model[0], uid, "team-a", "model")
    assert tree(node.target(uid, "model")) == FILES
    assert len(jobs.held()) == 8


def test_the_nodes_bound_drops_the_oldest_finished_jobs_first():
    jobs: Jobs[str] = Jobs(Limits(total=3, per_pod=3, per_namespace=3))
    owner = Owner(UID_A, "team-a", "app")
    done = [jobs.start((k,), k, owner, lambda k=k: k) for k in ("k1", "k2", "k3")]
    assert [j.future.result(timeout=30) for j in done] == ["k1", "k2", "k3"]
    release = threading.Event()
    k4 = jobs.start(("k4",), "k4", owner, lambda: str(release.wait()))
    assert jobs.held() == [("k2",), ("k3",), ("k4",)]  # k1, the oldest finished, made room
    assert jobs.start(("k2",), "k2", owner, lambda: "again") is done[1]  # held: no room needed
    k1 = jobs.start(("k1",), "k1", owner, lambda: str(release.wait()))
    assert jobs.held() == [("k3",), ("k4",), ("k1",)]
    jobs.start(("k5",), "k5", owner, lambda: str(release.wait()))
    assert jobs.held() == [("k4",), ("k1",), ("k5",)] and jobs.running() == 3
    with pytest.raises(TooManyJobs) as e:
        jobs.start(("k6",), "k6", Owner(UID_B, "team-b", "other"), lambda: "k6")
    assert str(e.value) == "3 pulls are running on this node, the most it runs at once (3)"
    release.set()
    assert [k4.future.result(timeout=30), k1.future.result(timeout=30)] == ["True", "True"]
