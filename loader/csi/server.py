"""The CSI node plugin: Identity and Node services on a unix socket, serving inline ephemeral model volumes.

NodePublishVolume = check the request (request.py), pull through loader.pull into the node cache (the access rule of
``--check-access``, the pod's pin), record the volume (volumes.py), bind-mount the model tree read-only at the
target (mounts.py). NodeUnpublishVolume = unmount, remove the target directory and the record, and the pod's pin
with its last volume. Both are idempotent, and both work after a restart of the agent: the mount is the kernel's
and the record is on disk. Errors map to the spec's codes in codes.py; what kubelet retries is said there.

One call per volume at a time (a second one for the same volume answers ABORTED, the spec's "operation pending");
calls run on a bounded thread pool, and gRPC refuses calls beyond ``max_workers * 4`` with RESOURCE_EXHAUSTED.
At most ``max_workers - RESERVED_WORKERS`` calls wait for pulls at once; one more answers ABORTED at once (its pull
still starts), so a burst of publishes never starves Probe (the liveness check) or unpublishes.
Pulls are capped per pod, per namespace and per node (jobs.py); a call past a cap answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.metadata
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import wrappers_pb2

from loader.cache import Cache
from loader.csi import DRIVER_NAME, csi_pb2, csi_pb2_grpc, mounts
from loader.csi import request as rq
from loader.csi.codes import code_for
from loader.csi.jobs import Job, Jobs, Owner, TooManyJobs
from loader.csi.volumes import Record, Volumes
from loader.errors import LoaderError
from loader.log import Logger
from loader.observe import PublishObserver, PullObserver
from loader.pull import PullOptions, PullResult, pull

DEFAULT_PODS_DIR = "/var/lib/kubelet/pods"
MAX_WAIT = 110.0  # a call without a deadline waits this long for its pull (kubelet's own deadline is 120 s)
MIN_MARGIN, MAX_MARGIN = 1.0, 10.0  # answered this long before the caller's deadline (10% of what it gave)
STATE_DIR_NAME = "volumes"  # beside the socket by default: kubelet's plugin directory, a hostPath that persists
MAX_WORKERS = 16
#: A CSI pull's whole deadline, whatever size the registry claims: a running pull holds one of its pod's 8 slots.
#: A pull cut by it keeps its partial download, and kubelet's retry starts one that resumes it.
PULL_DEADLINE = 1800.0
RESERVED_WORKERS = 2  # never taken by calls waiting for pulls: Probe, NodeUnpublishVolume and the rest still answer


def wait_budget(time_remaining: float | None) -> float:
    """Pure: how long a call may wait for its pull and still answer before the caller's deadline."""
    if time_remaining is None:
        return MAX_WAIT
    margin = min(MAX_MARGIN, max(MIN_MARGIN, time_remaining * 0.1))
    return max(0.0, min(MAX_WAIT, time_remaining - margin))


def vendor_version() -> str:
    try:
        return importlib.metadata.version("model-cache")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class Refusal(Exception):
    """A call's answer other than OK: a gRPC code and the message for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclasses.dataclass(frozen=True)
class Settings:
    cache_dir: Path
    node_name: str
    pods_dir: str = DEFAULT_PODS_DIR
    state_dir: Path | None = None
    pull: PullOptions | None = None  # registry settings (CAs, plain-HTTP hosts, mirrors, concurrency, timeout)


class Plugin:
    """What the two services do, apart from gRPC: a Refusal or a result."""

    def __init__(self, settings: Settings, state_dir: Path, log: Logger, max_waiting: int,
                 on_pull: PullObserver | None = None, on_publish: PublishObserver | None = None) -> None:
        self.settings, self.log = settings, log
        self.on_pull, self.on_publish = on_pull, on_publish  # the node agent's metrics
        self._waiting = threading.BoundedSemaphore(max_waiting)
        # Resolved once: kubelet resolves its root directory (/var/lib/kubelet may be a symlink to another disk),
        # so the targets it sends, and the mount table, name the real path. The admin's own symlink is trusted;
        # below it, nothing is followed (open_beneath).
        self.pods_dir = os.path.realpath(settings.pods_dir)
        self.cache = Cache(settings.cache_dir)
        self.volumes = Volumes(state_dir)
        self.jobs: Jobs[PullResult] = Jobs()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        base = settings.pull or PullOptions(cache=settings.cache_dir)
        self._pull_base = dataclasses.replace(base, cache=settings.cache_dir, check_access=True, progress="none",
                                              offline=False, node_name=settings.node_name,
                                              deadline=PULL_DEADLINE)

    # ---- health -------------------------------------------------------------------------------------------------
    def check_usable(self) -> None:
        """The cache and the state directory exist, are what model-loader makes, and can be written."""
        try:
            self.cache.ensure()
            self.volumes.ensure()
        except (LoaderError, OSError) as exc:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"the node cache is not usable: {exc}") from exc
        for path in (self.cache.root, self.volumes.root):
            if not os.access(path, os.W_OK):
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, f"{path} is not writable by the agent")

    # ---- one call per volume ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def volume_call(self, volume_id: str) -> Iterator[None]:
        with self._busy_lock:
            if volume_id in self._busy:
                raise Refusal(grpc.StatusCode.ABORTED, f"another call for volume {volume_id} is in flight; retry"
                                                       " when it has answered")
            self._busy.add(volume_id)
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy.discard(volume_id)

    # ---- publish ------------------------------------------------------------------------------------------------
    def publish(self, req: rq.Publish, budget: float) -> None:
        rec = self.volumes.get(req.volume_id)
        if rec is not None and (rec.target, rec.ref, rec.pod_uid) != (req.target, str(req.ref), req.pod.uid):
            raise Refusal(grpc.StatusCode.ALREADY_EXISTS,
                          f"volume {req.volume_id} is published at {rec.target} with {rec.ref} for pod {rec.pod};"
                          f" this call asks for {req.ref} at {req.target} for pod {req.pod}: unpublish it first")
        self._check_target(req.target)
        here = mounts.mount_at(req.target)
        if rec is not None and here is not None and self._shows(req.target, here, rec.digest):
            self.log.info("csi.publish.exists", volume=req.volume_id, ref=rec.ref, digest=rec.digest, pod=rec.pod)
            return

        res = self._pull(req, budget)
        if here is not None:
            if self._shows(req.target, here, res.digest):  # mounted by a call whose record was lost: adopt it
                self.volumes.put(self._record(req, res))
                return
            raise Refusal(grpc.StatusCode.ALREADY_EXISTS,
                          f"target {req.target} already has a mount ({here.fs_type} {here.root}) that is not"
                          f" {req.ref} ({res.digest}) read-only; unpublish the volume that owns it first")
        self.volumes.put(self._record(req, res))  # before the mount: a restarted agent can always undo it
        try:
            parent = self._make_target(req.target)
        except Refusal:
            self.volumes.remove(req.volume_id)  # as for a failed mount: nothing was mounted, a retry starts over
            raise
        try:
            mounts.bind_read_only(res.path, parent, req.target)
        except OSError as exc:
            self.volumes.remove(req.volume_id)  # nothing to undo: a retry starts over, the pin waits for gc
            hint = (" (the agent needs CAP_SYS_ADMIN in the host's mount namespace: run it privileged)"
                    if exc.errno in (errno.EPERM, errno.EACCES) else "")
            raise Refusal(grpc.StatusCode.INTERNAL, f"{exc}{hint}") from exc
        finally:
            os.close(parent)
        done = mounts.mount_at(req.target)
        if done is None or not self._shows(req.target, done, res.digest):
            mounts.unmount(req.target)
            raise Refusal(grpc.StatusCode.INTERNAL, f"the bind mount of {res.path} at {req.target} is not the"
                                                    " read-only model tree after mounting; undone")
        self.log.info("csi.publish.done", volume=req.volume_id, ref=str(req.ref), digest=res.digest,
                      pod=str(req.pod), target=req.target, cache_hit=res.cache_hit, seconds=round(res.seconds, 3))

    def _pull(self, req: rq.Publish, budget: float) -> PullResult:
        opts = dataclasses.replace(self._pull_base, credentials=req.credentials, pod_uid=req.pod.uid)
        try:
            job = self.jobs.start(req.job_key, str(req.ref), Owner(req.pod.uid, req.pod.namespace, req.pod.name),
                                  lambda: self._observed_pull(str(req.ref), opts))
        except TooManyJobs as exc:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later") from exc
        waits = self._waiting.acquire(blocking=False)  # no free slot: do not wait at all, the pull goes on
        try:
            res = job.future.result(timeout=budget if waits else 0.0)
        except futures.TimeoutError:
            self.log.info("csi.publish.pending", volume=req.volume_id, ref=str(req.ref), pod=str(req.pod),
                          seconds=round(job.elapsed(), 1))
            why = "" if waits else " (the most calls that may wait for pulls at once already do)"
            raise Refusal(grpc.StatusCode.ABORTED,
                          f"still pulling {req.ref} for pod {req.pod} ({job.elapsed():.0f}s so far){why}; the pull"
                          " goes on, and this call completes when it is retried after the pull has finished") from None
        except LoaderError as exc:
            self.jobs.claim(job)
            code = code_for(exc, had_credentials=req.credentials is not None)
            self.log.warning("csi.publish.failed", volume=req.volume_id, ref=str(req.ref), pod=str(req.pod),
                             code=code.name, error=str(exc))
            raise Refusal(code, str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - a bug in the pull: INTERNAL, logged, never a hung volume
            self._claim_failed(job, req, exc)
        finally:
            if waits:
                self._waiting.release()
        self.jobs.claim(job)
        return res

    def _observed_pull(self, ref: str, opts: PullOptions) -> PullResult:
        """pull(), with on_pull told of the outcome (in the job's thread: a pull outlives the call that began it)."""
        started = time.monotonic()
        try:
            res = pull(ref, opts, self.log)
        except LoaderError as exc:
            if self.on_pull is not None:
                self.on_pull(ref, time.monotonic() - started, None, exc)
            raise
        if self.on_pull is not None:
            self.on_pull(ref, time.monotonic() - started, res, None)
        return res

    def _claim_failed(self, job: Job[PullResult], req: rq.Publish, exc: Exception) -> NoReturn:
        self.jobs.claim(job)
        self.log.error("csi.publish.failed", volume=req.volume_id, ref=str(req.ref), pod=str(req.pod),
                       code="INTERNAL", error=f"{type(exc).__name__}: {exc}")
        raise Refusal(grpc.StatusCode.INTERNAL, f"pulling {req.ref} failed unexpectedly: {type(exc).__name__}:"
                                                f" {exc}") from exc

    def _record(self, req: rq.Publish, res: PullResult) -> Record:
        return Record(req.volume_id, req.target, str(req.ref), res.digest, req.pod.uid, str(req.pod))

    def _shows(self, target: str, mount: mounts.Mount, digest: str) -> bool:
        return mount.read_only and mounts.same_tree(target, str(self.cache.model_path(digest)))

    def _check_target(self, target: str) -> None:
        if not mounts.resolves_under(target, self.pods_dir):
            self._leads_out(target)

    def _leads_out(self, target: str, component: str = "") -> NoReturn:
        at = f" ({component!r})" if component else ""
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f"target_path {target!r} leads out of the kubelet pods directory {self.pods_dir} through a"
                      f" symlink{at}; the plugin publishes only inside it, through no symlink")

    def _make_target(self, target: str) -> int:
        """Make the target (or find it an empty directory) in its parent, opened from the pods directory with no
        symlink followed; the parent's descriptor, for the mount (the caller closes it)."""
        parent_path, name = os.path.split(target)
        try:
            parent = mounts.open_beneath(self.pods_dir, parent_path)
        except mounts.NotBeneath as exc:
            self._leads_out(target, exc.component)
        except (FileNotFoundError, NotADirectoryError):
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the parent of target_path {target} does not exist; kubelet creates it before"
                          " publishing") from None
        try:
            self._make_in(parent, name, target)
        except BaseException:
            os.close(parent)
            raise
        return parent

    @staticmethod
    def _make_in(parent: int, name: str, target: str) -> None:
        try:
            os.mkdir(name, 0o750, dir_fd=parent)
            return
        except FileExistsError:
            pass
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError:  # a file, a symlink (ENOTDIR, ELOOP)
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"target_path {target} exists and is not a directory") from None
        try:
            if os.listdir(fd):
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                              f"target_path {target} is a directory with files in it; the plugin mounts only on an"
                              " empty one (kubelet leaves it empty)")
        finally:
            os.close(fd)

    # ---- unpublish ----------------------------------------------------------------------------------------------
    def unpublish(self, req: rq.Unpublish) -> None:
        self._check_target(req.target)
        unmounted = 0
        while mounts.mount_at(req.target) is not None:  # a stack (a lost record, a racing caller): take them all
            try:
                if not mounts.unmount(req.target):
                    break
            except mounts.MountError as exc:
                raise Refusal(grpc.StatusCode.INTERNAL, f"{exc}: the volume is still in use; kubelet retries"
                                                        " once the pod's containers are gone") from exc
            unmounted += 1
        try:
            os.rmdir(req.target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise Refusal(grpc.StatusCode.INTERNAL, f"target_path {req.target} was unmounted but cannot be removed:"
                                                    f" {exc.strerror}") from exc
        rec = self.volumes.get(req.volume_id)
        if rec is not None and rec.target == req.target:
            self.volumes.remove(req.volume_id)
            if not self.volumes.of_pod(rec.pod_uid):
                self.cache.remove_pod(rec.pod_uid)  # the pod's last volume: its pins go (gc may evict later)
        self.log.info("csi.unpublish.done", volume=req.volume_id, target=req.target, unmounted=unmounted,
                      pod=rec.pod if rec is not None else None)


# ---- the gRPC services ---------------------------------------------------------------------------------------------
def _answer(context: grpc.ServicerContext, refusal: Refusal) -> NoReturn:
    context.abort(refusal.code, refusal.message)


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: Any) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=vendor_version())

    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                              context: Any) -> csi_pb2.GetPluginCapabilitiesResponse:
        # A node-only plugin: no controller service, no topology. Kubelet needs neither for ephemeral volumes.
        return csi_pb2.GetPluginCapabilitiesResponse()

    def Probe(self, request: csi_pb2.ProbeRequest, context: Any) -> csi_pb2.ProbeResponse:
        try:
            self.plugin.check_usable()
        except Refusal as r:
            _answer(context, r)
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin

    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest, context: Any) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self.plugin.settings.node_name)

    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest,
                            context: Any) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse()  # no staging, no stats, no expansion

    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                          context: Any) -> csi_pb2.NodePublishVolumeResponse:
        started, code = time.monotonic(), "INTERNAL"  # until the call knows better (a bug escapes as INTERNAL)
        try:
            refusal = self._publish(request, context)
            code = "OK" if refusal is None else refusal.code.name
            if refusal is not None:
                _answer(context, refusal)
        finally:
            if self.plugin.on_publish is not None:
                self.plugin.on_publish(time.monotonic() - started, code)
        return csi_pb2.NodePublishVolumeResponse()

    def _publish(self, request: csi_pb2.NodePublishVolumeRequest, context: Any) -> Refusal | None:
        """Publish; None when done, else the Refusal to answer."""
        try:
            req = rq.parse_publish(
                volume_id=request.volume_id, target_path=request.target_path,
                staging_target_path=request.staging_target_path, readonly=request.readonly,
                capability=_capability(request), volume_context=dict(request.volume_context),
                secrets=dict(request.secrets), pods_dir=self.plugin.pods_dir)
            with self.plugin.volume_call(req.volume_id):
                self.plugin.publish(req, wait_budget(context.time_remaining()))
        except rq.InvalidArgument as exc:
            self.plugin.log.warning("csi.publish.invalid", volume=request.volume_id[:256], error=str(exc))
            return Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Refusal as r:
            return r
        return None

    def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest,
                            context: Any) -> csi_pb2.NodeUnpublishVolumeResponse:
        try:
            req = rq.parse_unpublish(volume_id=request.volume_id, target_path=request.target_path,
                                     pods_dir=self.plugin.pods_dir)
            with self.plugin.volume_call(req.volume_id):
                self.plugin.unpublish(req)
        except rq.InvalidArgument as exc:
            _answer(context, Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        except Refusal as r:
            _answer(context, r)
        return csi_pb2.NodeUnpublishVolumeResponse()


def _capability(request: csi_pb2.NodePublishVolumeRequest) -> rq.CapabilityView | None:
    if not request.HasField("volume_capability"):
        return None
    cap = request.volume_capability
    kind = cap.WhichOneof("access_type")
    mount = cap.mount
    return rq.CapabilityView(kind, mount.fs_type, tuple(mount.mount_flags))


# ---- serving -------------------------------------------------------------------------------------------------------
class Running:
    """A started plugin: ``stop()`` ends it (mounts stay: they are the kernel's), ``wait()`` blocks until then."""

    def __init__(self, server: grpc.Server, plugin: Plugin, socket_path: str) -> None:
        self.server, self.plugin, self.socket_path = server, plugin, socket_path

    def stop(self, grace: float | None = 5.0) -> None:
        self.server.stop(grace).wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def wait(self) -> None:
        self.server.wait_for_termination()


def serve(socket_path: str, cache_dir: str | os.PathLike[str], node_name: str,
          kubelet_pods_dir: str = DEFAULT_PODS_DIR, *, state_dir: str | os.PathLike[str] | None = None,
          pull_options: PullOptions | None = None, log: Logger | None = None,
          max_workers: int = MAX_WORKERS, on_pull: PullObserver | None = None,
          on_publish: PublishObserver | None = None) -> Running:
    """Start the Identity and Node services on ``socket_path`` (a stale socket file there is replaced) and return.

    ``state_dir`` holds the volume records (default: ``volumes/`` beside the socket, kubelet's plugin directory,
    which persists across agent restarts). ``pull_options`` carries registry settings; the access rule, the pin
    and the cache are always the plugin's own."""
    log = log or Logger()
    if not node_name:
        raise ValueError("node_name is empty: pass the node's name (the downward API's spec.nodeName)")
    if not os.path.isabs(socket_path) or not os.path.isabs(kubelet_pods_dir):
        raise ValueError(f"socket {socket_path!r} and pods directory {kubelet_pods_dir!r} must be absolute paths")
    state = Path(state_dir) if state_dir is not None else Path(socket_path).parent / STATE_DIR_NAME
    settings = Settings(Path(cache_dir).absolute(), node_name, kubelet_pods_dir, state, pull_options)
    if max_workers <= RESERVED_WORKERS:
        raise ValueError(f"max_workers {max_workers} must be more than {RESERVED_WORKERS}")
    plugin = Plugin(settings, state, log, max_waiting=max_workers - RESERVED_WORKERS, on_pull=on_pull,
                    on_publish=on_publish)
    try:
        plugin.check_usable()
    except Refusal as r:
        raise ValueError(r.message) from None
    os.makedirs(os.path.dirname(socket_path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # what a killed agent left; kubelet reconnects to the new one
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="csi"),
                         maximum_concurrent_rpcs=max_workers * 4)
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(plugin), server)
    csi_pb2_grpc.add_NodeServicer_to_server(NodeService(plugin), server)
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    os.chmod(socket_path, 0o600)  # kubelet (root) only
    log.info("csi.serving", driver=DRIVER_NAME, socket=socket_path, node=node_name, cache=str(settings.cache_dir),
             pods_dir=kubelet_pods_dir, state_dir=str(state), version=vendor_version())
    return Running(server, plugin, socket_path)
