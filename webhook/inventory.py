"""The node and namespace inventory: the only module that talks to the Kubernetes API.

The admission path must never call the apiserver (an admission that waits on the apiserver can deadlock it), so
the inventory is kept in memory and published as an immutable :class:`~webhook.snapshot.Snapshot`. Reading the
current snapshot is one attribute read; writers build a new snapshot and swap the reference.

Two sources feed it:

* :class:`WatchingInventory`: one background thread per resource (nodes, namespaces, CSINodes) runs the reflector
  protocol: a paginated LIST gives the state and a resourceVersion, then a WATCH from that version streams
  ADDED / MODIFIED / DELETED / BOOKMARK events. A watch that ends normally (server timeout) resumes from the
  last version seen; ``410 Gone`` (as an HTTP status or an ERROR event: the version was compacted away) means
  events were lost, so the thread lists again and replaces its state wholesale; any other failure backs off
  exponentially and retries. ``synced`` turns true once all initial lists have landed and stays true through
  relists (a slightly stale inventory still beats none).
* :func:`load_file`: a NodeList (or a v1 List of Nodes and Namespaces) from YAML or JSON, for offline use, the
  preview CLI and the demo; it is synced from the start.

Objects are handled as plain dicts (``_preload_content=False``): deserialising 5000 nodes into client models
would cost far more than the webhook ever reads from them. A list keeps only the fields the inventory reads of
each page's objects (``_slim``), and updates that change none of them publish no new snapshot, so kubelet status
churn does not empty the per-snapshot memos.

:class:`ClusterObjects` is the other use of the API: reading and writing the webhook's own certificate Secret and
webhook configurations for self-managed certificates (``webhook.certs.CertManager`` decides what to write).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from webhook.snapshot import EMPTY, Snapshot, node_from_dict, runs_agent, snapshot_from

if TYPE_CHECKING:
    import urllib3

log = logging.getLogger(__name__)

NODES = "nodes"
NAMESPACES = "namespaces"
CSINODES = "csinodes"  # which nodes run the node agent (its CSI driver registered with kubelet)

_LIST_PAGE = 500
_WATCH_SECONDS = 300  # server-side watch timeout; the apiserver caps it anyway
_READ_TIMEOUT = _WATCH_SECONDS + 30  # client-side: a silent connection is dead, not idle
_CONNECT_TIMEOUT = 10
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0


class Gone(Exception):
    """The resourceVersion we hold is too old (410): events were lost and the resource must be listed again."""


class Inventory:
    """Holds the current snapshot. The base class is a static inventory; subclasses feed it."""

    def __init__(self, snapshot: Snapshot = EMPTY) -> None:
        self._snapshot = snapshot
        self._changed = threading.Condition()

    def snapshot(self) -> Snapshot:
        # A single reference read: atomic under the GIL, never blocks on a writer.
        return self._snapshot

    def publish(self, snapshot: Snapshot) -> None:
        with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[Snapshot], bool], timeout: float) -> Snapshot | None:
        """Block until ``predicate(snapshot)`` holds (returns that snapshot) or ``timeout`` passes (None).

        For start-up code and tests; the admission path never waits.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self._snapshot):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return self._snapshot

    def start(self) -> None:
        """Start feeding the inventory (no-op for a static one)."""

    def stop(self) -> None:
        """Stop feeding the inventory (no-op for a static one)."""


# --- file source -------------------------------------------------------------------------------------------


def parse_inventory_documents(
    docs: list[Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Split loaded YAML/JSON documents into (nodes, namespaces, csinodes).

    Accepts NodeList / NamespaceList / CSINodeList / v1 List documents (items without a ``kind`` inside a NodeList
    are nodes) and bare Node, Namespace and CSINode documents; anything else is an error, so a wrong file is not
    silently empty.
    """
    nodes: list[dict[str, Any]] = []
    namespaces: list[dict[str, Any]] = []
    csinodes: list[dict[str, Any]] = []

    def add(obj: Any, default_kind: str | None, where: str) -> None:
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
        kind = obj.get("kind") or default_kind
        if kind == "Node":
            nodes.append(obj)
        elif kind == "Namespace":
            namespaces.append(obj)
        elif kind == "CSINode":
            csinodes.append(obj)
        elif kind in ("List", "NodeList", "NamespaceList", "CSINodeList"):
            items = obj.get("items") or []
            if not isinstance(items, list):
                raise ValueError(f"{where}: 'items' must be a list")
            inner = {"NodeList": "Node", "NamespaceList": "Namespace", "CSINodeList": "CSINode"}.get(kind)
            for i, item in enumerate(items):
                add(item, inner, f"{where} items[{i}]")
        else:
            raise ValueError(
                f"{where}: expected a Node, a Namespace, a CSINode or a list of them, got kind {kind!r}"
            )

    for i, doc in enumerate(docs):
        if doc is not None:
            add(doc, None, f"document {i + 1}")
    return nodes, namespaces, csinodes


def load_file(path: str | Path) -> Snapshot:
    """A synced snapshot from a NodeList file (YAML or JSON; may also carry Namespaces)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        docs = [json.loads(text)]  # `kubectl get nodes -o json`: ~20x faster than YAML, and a fraction of its memory
    except ValueError:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML or JSON: {exc}") from exc
    try:
        nodes, namespaces, csinodes = parse_inventory_documents(docs)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return snapshot_from(nodes, namespaces, synced=True, csinodes=csinodes)


def static(snapshot: Snapshot) -> Inventory:
    return Inventory(snapshot)


# --- the apiserver source ----------------------------------------------------------------------------------


def api_client(kubeconfig: str | Path | None = None) -> k8s_client.ApiClient:
    """An API client from a kubeconfig file, or from the pod's service account when none is given."""
    if kubeconfig is not None:
        client: k8s_client.ApiClient = k8s_config.new_client_from_config(config_file=str(kubeconfig))
        return client
    configuration = k8s_client.Configuration()
    k8s_config.load_incluster_config(client_configuration=configuration)
    return k8s_client.ApiClient(configuration)


def _labels(obj: dict[str, Any]) -> Mapping[str, str]:
    return types.MappingProxyType({str(k): str(v) for k, v in ((obj.get("metadata") or {}).get("labels") or {}).items()})


def _node_infos(items: list[Any]) -> dict[str, Any]:
    """Name -> NodeInfo, skipping (with a warning) objects that are not nodes, so one bad object cannot stall the
    watch by failing on every replay."""
    out = {}
    for obj in items:
        try:
            out[_name(obj)] = node_from_dict(obj)
        except ValueError as exc:
            log.warning("ignoring a node object the inventory cannot read: %s", exc)
    return out


def _slim(obj: Any) -> Any:
    """The parts of a Node or Namespace the inventory reads (node_from_dict, _labels, _name); anything else as is."""
    if not isinstance(obj, dict):
        return obj  # _node_infos reports it
    out: dict[str, Any] = {}
    for part, keys in (("metadata", ("name", "labels")), ("spec", ("taints", "unschedulable", "drivers")),
                       ("status", ("nodeInfo",))):
        value = obj.get(part)
        if isinstance(value, dict):
            out[part] = {k: value[k] for k in keys if k in value}
        elif value is not None:
            out[part] = value  # malformed: left for the reader to refuse
    return out


def _agent_of(obj: Any) -> tuple[str, bool] | None:
    """runs_agent() of a CSINode object, None (with a warning) for one the inventory cannot read."""
    seen = runs_agent(obj) if isinstance(obj, dict) else None
    if seen is None:
        log.warning("ignoring a CSINode object the inventory cannot read: %.200r", obj)
    return seen


def _name(obj: dict[str, Any]) -> str:
    name: str = (obj.get("metadata") or {}).get("name", "")
    return name


def _resource_version(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


def _lines(resp: urllib3.HTTPResponse) -> Iterator[bytes]:
    """Newline-delimited records of a streaming (chunked) response, yielded as soon as each is complete."""
    buffer = bytearray()
    for chunk in resp.stream(amt=None, decode_content=True):
        start = len(buffer)
        buffer += chunk
        if buffer.find(b"\n", start) < 0:
            continue  # a large object spread over many chunks: do not rescan it each time
        *complete, rest = bytes(buffer).split(b"\n")
        buffer = bytearray(rest)
        for line in complete:
            if line.strip():
                yield line
    if buffer.strip():
        yield bytes(buffer)


class _Reflector:
    """List + watch of one resource, feeding ``on_replace`` (full state) and ``on_event`` (one change)."""

    def __init__(
        self,
        api: k8s_client.ApiClient,
        resource: str,
        on_replace: Callable[[list[Any]], None],
        on_event: Callable[[str, dict[str, Any]], None],
        stopping: threading.Event,
    ) -> None:
        self.resource = resource
        core = k8s_client.CoreV1Api(api)
        # With _preload_content=False these return the raw urllib3 response, not the model they are declared to.
        self._list: Callable[..., Any] = {
            NODES: core.list_node,
            NAMESPACES: core.list_namespace,
            CSINODES: k8s_client.StorageV1Api(api).list_csi_node,
        }[resource]
        self._on_replace = on_replace
        self._on_event = on_event
        self._stopping = stopping
        self._response: urllib3.HTTPResponse | None = None
        self._response_lock = threading.Lock()
        self.lists = 0  # how many full lists completed (the first, then one per relist)

    # -- protocol ------------------------------------------------------------------------------------------

    def list_all(self) -> str:
        """Paginated LIST; replaces the state; returns the list's resourceVersion."""
        items: list[Any] = []  # malformed objects too: _node_infos reports them
        token = None
        while True:
            kwargs: dict[str, Any] = {"limit": _LIST_PAGE}
            if token:
                kwargs["_continue"] = token
            resp: urllib3.HTTPResponse = self._list(
                **kwargs, _preload_content=False, _request_timeout=(_CONNECT_TIMEOUT, 60)
            )
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            # Keep what the inventory reads and drop the rest page by page: whole Node objects (image lists,
            # conditions) of a 5000-node cluster would be hundreds of MB at once.
            items.extend(_slim(o) for o in body.get("items") or [])
            meta = body.get("metadata") or {}
            del body
            token = meta.get("continue")
            if not token:
                self._on_replace(items)
                self.lists += 1
                version: str = meta.get("resourceVersion", "")
                return version

    def watch(self, resource_version: str) -> str:
        """One WATCH from ``resource_version`` until the server ends it; returns the last version seen.

        Raises :class:`Gone` when the version is too old, ``ApiException`` / urllib3 errors on failure.
        """
        try:
            resp: urllib3.HTTPResponse = self._list(
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=_WATCH_SECONDS,
                _preload_content=False,
                _request_timeout=(_CONNECT_TIMEOUT, _READ_TIMEOUT),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise Gone(str(exc.reason)) from exc
            raise
        with self._response_lock:
            self._response = resp
        try:
            if self._stopping.is_set():  # stop() came while the request was in flight: interrupt() missed it
                return resource_version
            for line in _lines(resp):
                if self._stopping.is_set():
                    break
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", "resource version too old"))
                    raise ApiException(status=obj.get("code", 0), reason=obj.get("message", "watch error"))
                resource_version = _resource_version(obj) or resource_version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._on_event(kind, obj)
                # BOOKMARK only advances the version, so a restarted watch does not replay or hit 410.
        finally:
            with self._response_lock:
                self._response = None
            resp.release_conn()
        return resource_version

    # -- the thread ----------------------------------------------------------------------------------------

    def run(self) -> None:
        backoff = _BACKOFF_FIRST
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self.list_all()
                resource_version = self.watch(resource_version)
                backoff = _BACKOFF_FIRST
            except Gone as exc:
                log.info("watch %s: %s; listing again", self.resource, exc)
                resource_version = None
            except Exception as exc:  # noqa: BLE001 - any failure of the API or the network: back off, retry
                if self._stopping.is_set():
                    break
                log.warning("watch %s failed, retrying in %.1fs: %s", self.resource, backoff, exc)
                self._stopping.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def interrupt(self) -> None:
        with self._response_lock:
            if self._response is not None:
                self._response.shutdown()


class WatchingInventory(Inventory):
    """An inventory kept current by list+watch of nodes and namespaces."""

    def __init__(self, api: k8s_client.ApiClient) -> None:
        super().__init__(EMPTY)
        self._api = api
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._nodes: dict[str, Any] = {}
        self._namespaces: dict[str, Mapping[str, str]] = {}
        self._agents: set[str] = set()
        self._listed: set[str] = set()
        self._reflectors = [
            _Reflector(api, NODES, self._replace_nodes, self._node_event, self._stopping),
            _Reflector(api, NAMESPACES, self._replace_namespaces, self._namespace_event, self._stopping),
            _Reflector(api, CSINODES, self._replace_csinodes, self._csinode_event, self._stopping),
        ]
        self._threads: list[threading.Thread] = []

    @property
    def lists(self) -> dict[str, int]:
        """Completed full lists per resource (1 after start-up; more after relists)."""
        return {r.resource: r.lists for r in self._reflectors}

    # -- state updates (reflector threads) ---------------------------------------------------------------

    def _publish_locked(self) -> None:
        self.publish(
            Snapshot(
                nodes=tuple(self._nodes.values()),
                namespaces=types.MappingProxyType(dict(self._namespaces)),
                synced=self._listed == {NODES, NAMESPACES, CSINODES},
                agents=frozenset(self._agents),
            )
        )

    # A new snapshot only when something the decision reads changed. Kubelets update their Node objects every few
    # minutes (conditions, heartbeats, images): 5000 nodes make ~17 such events a second, and each new snapshot
    # starts with empty memos (decisions per constraint, whole answers).

    def _replace_nodes(self, items: list[Any]) -> None:
        fresh = _node_infos(items)
        with self._lock:
            if fresh == self._nodes and NODES in self._listed:
                return
            self._nodes = fresh
            self._listed.add(NODES)
            self._publish_locked()

    def _node_event(self, kind: str, obj: dict[str, Any]) -> None:
        with self._lock:
            if kind == "DELETED":
                if self._nodes.pop(_name(obj), None) is None:
                    return
            else:
                changed = {k: v for k, v in _node_infos([obj]).items() if self._nodes.get(k) != v}
                if not changed:
                    return
                self._nodes.update(changed)
            self._publish_locked()

    def _replace_namespaces(self, items: list[Any]) -> None:
        fresh = {_name(o): _labels(o) for o in items}
        with self._lock:
            if fresh == self._namespaces and NAMESPACES in self._listed:
                return
            self._namespaces = fresh
            self._listed.add(NAMESPACES)
            self._publish_locked()

    def _namespace_event(self, kind: str, obj: dict[str, Any]) -> None:
        with self._lock:
            name = _name(obj)
            if kind == "DELETED":
                if self._namespaces.pop(name, None) is None:
                    return
            else:
                labels = _labels(obj)
                if self._namespaces.get(name) == labels:
                    return
                self._namespaces[name] = labels
            self._publish_locked()

    def _replace_csinodes(self, items: list[Any]) -> None:
        fresh = {name for name, listed in filter(None, map(_agent_of, items)) if listed}
        with self._lock:
            if fresh == self._agents and CSINODES in self._listed:
                return
            self._agents = fresh
            self._listed.add(CSINODES)
            self._publish_locked()

    def _csinode_event(self, kind: str, obj: dict[str, Any]) -> None:
        seen = _agent_of(obj)
        if seen is None:
            return
        name, listed = seen
        with self._lock:
            if (name in self._agents) == (listed and kind != "DELETED"):
                return
            if listed and kind != "DELETED":
                self._agents.add(name)
            else:
                self._agents.discard(name)
            self._publish_locked()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        for reflector in self._reflectors:
            thread = threading.Thread(target=reflector.run, name=f"inventory-{reflector.resource}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        for reflector in self._reflectors:
            reflector.interrupt()
        for thread in self._threads:
            thread.join(timeout)
        self._api.close()


# --- the webhook's own objects (self-managed certificates) -------------------------------------------------


class Conflict(Exception):
    """A create or update lost a race (409): someone else wrote the object first; read it again."""


class ClusterObjects:
    """Reads and writes of the few objects the webhook owns: its certificate Secret and its two webhook
    configurations (RBAC grants exactly these, by name). Objects are plain dicts sent as they are: going through
    the client's typed models would drop any field this client version does not know, and a replace would then
    erase it from the cluster. Writes of a stale version raise :class:`Conflict`, which is how replicas agree on
    one CA."""

    WEBHOOK_KINDS = ("mutating", "validating")
    Conflict = Conflict  # so callers catch it without importing this module

    def __init__(self, api: k8s_client.ApiClient) -> None:
        self._api = api

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, *, missing_ok: bool = False) -> dict[str, Any] | None:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = self._api.param_serialize(
            method, path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        resp = self._api.call_api(*request, _request_timeout=(_CONNECT_TIMEOUT, 30))
        data: bytes = resp.read()
        if resp.status == 404 and missing_ok:
            return None
        if resp.status == 409:
            raise Conflict(f"{method} {path}: {data.decode(errors='replace')}")
        if not 200 <= resp.status <= 299:
            raise ApiException(status=resp.status, reason=f"{method} {path}: {data.decode(errors='replace')}")
        obj: dict[str, Any] | None = json.loads(data)
        return obj

    @staticmethod
    def _secrets(namespace: str) -> str:
        return f"/api/v1/namespaces/{namespace}/secrets"

    @staticmethod
    def _configuration(kind: str, name: str) -> str:
        return f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/{name}"

    def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._request("GET", f"{self._secrets(namespace)}/{name}", missing_ok=True)

    def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return self._request("POST", self._secrets(namespace), body)

    def replace_secret(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return self._request("PUT", f"{self._secrets(namespace)}/{name}", body)

    def read_webhook_configuration(self, kind: str, name: str) -> dict[str, Any] | None:
        return self._request("GET", self._configuration(kind, name), missing_ok=True)

    def replace_webhook_configuration(self, kind: str, name: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return self._request("PUT", self._configuration(kind, name), body)
