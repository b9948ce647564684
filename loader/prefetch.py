"""Keep listed models warm in a node cache: the engine of ``model-loader prefetch`` (run as a DaemonSet).

A *round* re-reads the models list (a mounted ConfigMap changes in place, so it is read every round), pulls every
model through :func:`loader.pull.pull` (a cached tag costs one manifest HEAD; a moved tag pulls the new digest
and moves its ``refs/`` link) and records the outcome in Prometheus metrics. After the first round in which every
model succeeded, ``--untaint`` removes the node's startup taint, so pods land only once their models are local.
An optional gc follows each round, keeping every listed model.

The node API is reached with plain ``http.client`` and the pod's service-account token rather than the
kubernetes package: two requests do not justify the import time and image size. :class:`NodeApi` is the only
code here that speaks to the API server; :func:`taint_removal_patch` decides the patch and is pure.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from loader import gc
from loader.cache import Cache
from loader.errors import LoaderError, UsageError
from loader.observe import PullObserver
from loader.pull import PullOptions, PullResult, pull

if TYPE_CHECKING:
    from loader.config import LoaderSettings
    from loader.log import Logger

RETRY_BEFORE_FIRST_SUCCESS = 30.0  # seconds: a node still warming retries a failed round sooner than --interval
UNTAINT_ATTEMPTS = 5


class NodeApiError(LoaderError):
    """The API server refused or could not be reached while removing the startup taint."""


# ---- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Untaint:
    node: str
    key: str


def parse_untaint(text: str) -> Untaint:
    node, sep, key = text.partition(":")
    if not sep or not node or not key or "=" in key:
        raise UsageError(f"--untaint {text!r} is not NODE:TAINT_KEY, e.g. $(NODE_NAME):model.cache/warming"
                         " (NODE from the downward API, spec.nodeName; the taint's key only, any effect)")
    return Untaint(node, key)


@dataclass(frozen=True)
class Config:
    refs: tuple[str, ...] = ()  # --ref values, when there is no models file
    models_file: str | None = None
    interval: float | None = None  # None: one round, then exit
    untaint: Untaint | None = None
    gc_policy: gc.Policy | None = None
    pods_dir: str | None = None  # kubelet's pod directories: gc removes the pins of pods gone from this node
    node: str | None = None


def load_models(cfg: Config) -> tuple[list[str], list[str]]:
    """(refs, errors) for this round."""
    if cfg.models_file is None:
        return gc.parse_models_list("\n".join(cfg.refs), "--ref")
    try:
        text = Path(cfg.models_file).read_text()
    except OSError as exc:
        return [], [f"{cfg.models_file}: cannot read the models file: {exc.strerror}"]
    return gc.parse_models_list(text, cfg.models_file)


# ---- metrics and health ----------------------------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.listed = Gauge("model_cache_prefetch_models_listed", "Models in the prefetch list, last round",
                            registry=r)
        self.cached = Gauge("model_cache_prefetch_models_cached",
                            "Listed models present in the node cache after the last round", registry=r)
        self.bytes = Gauge("model_cache_prefetch_bytes", "Bytes of the listed models in the node cache", registry=r)
        self.last_success = Gauge("model_cache_prefetch_last_success_timestamp_seconds",
                                  "Unix time the last round in which every listed model succeeded ended", registry=r)
        self.failures = Counter("model_cache_prefetch_failures", "Failed pulls (and unreadable list lines) by ref",
                                ["ref"], registry=r)
        self.rounds = Counter("model_cache_prefetch_rounds", "Rounds by result", ["result"], registry=r)
        self.pulled = Counter("model_cache_prefetch_pulled_bytes", "Bytes of models pulled (not cache hits)",
                              registry=r)
        self.duration = Histogram("model_cache_prefetch_round_duration_seconds", "Duration of a round", registry=r,
                                  buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400))
        self.warm = Gauge("model_cache_prefetch_node_warm",
                          "1 once a round has succeeded for every model (and the startup taint is gone)", registry=r)
        for result in ("success", "failure"):
            self.rounds.labels(result)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StatusServer:
    """``/metrics`` (Prometheus text), ``/healthz`` (the process serves) and ``/readyz`` (warm: a round has
    succeeded for every model, and the taint is gone when --untaint was asked) on one small threaded server."""

    def __init__(self, metrics: Metrics, ready: threading.Event, address: str, port: int) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok = outer.ready.is_set()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"warming\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds would drown the round logs
                pass

        self.metrics = metrics
        self.ready = ready
        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="status", daemon=True)

    def start(self) -> StatusServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- the node API ------------------------------------------------------------------------------------------------


class NodeApi:
    """GET and PATCH of one node with the pod's service-account token, over TLS verified against the
    service-account CA. The token is re-read for every request: bound tokens are rotated by kubelet."""

    def __init__(self, host: str, port: int, token_file: str, ca_file: str, timeout: float = 15.0) -> None:
        self.host, self.port, self.token_file, self.timeout = host.strip("[]"), port, token_file, timeout
        try:
            self.ctx = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise NodeApiError(f"cannot load the service-account CA {ca_file}: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: LoaderSettings) -> NodeApi:
        host, port = settings.kubernetes_service_host, settings.kubernetes_service_port
        if not host or not port:
            raise UsageError("--untaint needs the in-cluster API server, but KUBERNETES_SERVICE_HOST/PORT are not"
                             " set: run it in a pod (the node agent DaemonSet), or drop --untaint")
        try:
            return cls(host, int(port), settings.kube_token_file, settings.kube_ca_file)
        except ValueError:
            raise UsageError(f"KUBERNETES_SERVICE_PORT={port!r} is not a port number") from None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                content_type: str = "application/json") -> tuple[int, dict[str, Any] | None]:
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise NodeApiError(f"cannot read the service-account token {self.token_file}: {exc.strerror}"
                               " (automountServiceAccountToken must be true for --untaint)") from exc
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.ctx)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise NodeApiError(f"API server {self.host}:{self.port} unreachable for {method} {path}: {exc}") from exc
        finally:
            conn.close()
        try:
            obj = json.loads(raw) if raw else None
        except ValueError:
            obj = None
        return resp.status, obj if isinstance(obj, dict) else None


def taint_removal_patch(node: dict[str, Any], key: str) -> dict[str, Any] | None:
    """A JSON merge patch that removes every taint with ``key`` (any effect) and leaves the others as they are,
    guarded by the resourceVersion that was read (the API server answers 409 if the node changed since).
    None when the node has no such taint."""
    taints = (node.get("spec") or {}).get("taints") or []
    kept = [t for t in taints if t.get("key") != key]
    if len(kept) == len(taints):
        return None
    # A merge patch replaces a list whole, so the patch carries every taint to keep; null drops the field.
    return {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}, "spec": {"taints": kept or None}}


def remove_taint(api: NodeApi, target: Untaint, log: Logger, attempts: int = UNTAINT_ATTEMPTS) -> bool:
    """Remove the taint from the node. True when this call removed it, False when it was already gone."""
    path = f"/api/v1/nodes/{quote(target.node, safe='')}"
    for attempt in range(1, attempts + 1):
        status, node = api.request("GET", path)
        if status != 200 or node is None:
            raise NodeApiError(_explain(status, node, "get", target))
        patch = taint_removal_patch(node, target.key)
        if patch is None:
            log.info("prefetch.untaint", node=target.node, taint=target.key, result="absent")
            return False
        status, body = api.request("PATCH", path, patch, "application/merge-patch+json")
        if status == 200:
            log.info("prefetch.untaint", node=target.node, taint=target.key, result="removed", attempt=attempt)
            return True
        if status != 409:
            raise NodeApiError(_explain(status, body, "patch", target))
        log.warning("prefetch.untaint_conflict", node=target.node, attempt=attempt)  # the node changed: read again
    raise NodeApiError(f"node {target.node} kept changing: {attempts} patches removing taint {target.key} conflicted")


def _explain(status: int, body: dict[str, Any] | None, verb: str, target: Untaint) -> str:
    msg = (body or {}).get("message", "")
    hint = {
        401: "the API server rejected the service-account token",
        403: f"the service account may not {verb} nodes: apply the ClusterRole and binding from"
             " manifests/overlays/agent (and check any ValidatingAdmissionPolicy on nodes)",
        404: f"there is no node {target.node!r}: --untaint must name this pod's own node (spec.nodeName via the"
             " downward API, $(NODE_NAME))",
    }.get(status, "unexpected answer")
    return f"cannot {verb} node {target.node} to remove taint {target.key}: HTTP {status}: {hint}" + (
        f" ({msg})" if msg else "")


# ---- rounds ------------------------------------------------------------------------------------------------------


@dataclass
class Round:
    number: int
    refs: list[str]
    errors: list[str] = field(default_factory=list)  # unreadable list lines or file
    results: dict[str, PullResult] = field(default_factory=dict)
    failures: dict[str, LoaderError] = field(default_factory=dict)
    seconds: float = 0.0
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and not self.failures and not self.stopped

    def exit_code(self) -> int:
        if self.errors:
            return int(UsageError.exit_code)
        return int(next(iter(self.failures.values())).exit_code) if self.failures else 0


class Prefetcher:
    def __init__(self, cfg: Config, opts: PullOptions, log: Logger, metrics: Metrics | None = None,
                 node_api: NodeApi | None = None, stop: threading.Event | None = None) -> None:
        if cfg.untaint and node_api is None:
            raise UsageError("--untaint needs the node API")
        self.cfg, self.opts, self.log = cfg, opts, log
        self.metrics = metrics or Metrics()
        self.node_api = node_api
        self.stop = stop or threading.Event()
        self.ready = threading.Event()  # warm: a full round succeeded (and the taint is gone)
        self.rounds = 0
        self.untainted = False
        # Told of every pull (ref, seconds, result or error): the node agent's metrics.
        self.on_pull: PullObserver | None = None

    def round(self) -> Round:
        """Pull every listed model once."""
        self.rounds += 1
        t0 = time.monotonic()
        refs, errors = load_models(self.cfg)
        rnd = Round(self.rounds, refs, errors)
        for e in errors:
            self.log.error("prefetch.bad_list", error=e)
            self.metrics.failures.labels(e.split(": ", 1)[0]).inc()
        for ref in refs:
            if self.stop.is_set():
                rnd.stopped = True
                break
            started = time.monotonic()
            try:
                res = pull(ref, self.opts, self.log)
            except LoaderError as exc:
                if self.on_pull is not None:
                    self.on_pull(ref, time.monotonic() - started, None, exc)
                rnd.failures[ref] = exc
                self.metrics.failures.labels(ref).inc()
                self.log.error("prefetch.pull_failed", ref=ref, exit_code=int(exc.exit_code), error=str(exc))
                continue
            if self.on_pull is not None:
                self.on_pull(ref, time.monotonic() - started, res, None)
            rnd.results[ref] = res
            if not res.cache_hit:
                self.metrics.pulled.inc(res.bytes)
        rnd.seconds = time.monotonic() - t0
        m = self.metrics
        m.listed.set(len(refs))
        m.cached.set(len(rnd.results))
        m.bytes.set(sum(r.bytes for r in rnd.results.values()))
        m.rounds.labels("success" if rnd.ok else "failure").inc()
        m.duration.observe(rnd.seconds)
        if rnd.ok:
            m.last_success.set(time.time())
        self.log.info("prefetch.round", round=rnd.number, models=len(refs),
                      pulled=sum(not r.cache_hit for r in rnd.results.values()),
                      cached=sum(r.cache_hit for r in rnd.results.values()),
                      failed=len(rnd.failures) + len(errors), ok=rnd.ok, seconds=round(rnd.seconds, 3))
        return rnd

    def step(self) -> Round:
        """A round, then the taint once warm, then gc; ready (/readyz) once all three are done the first time, so
        nothing that watches readiness (a rollout, a test) stops the agent in the middle of its first gc."""
        rnd = self.round()
        warmed = rnd.ok and not self.ready.is_set()
        if warmed and self.cfg.untaint and not self.untainted:
            assert self.node_api is not None  # __init__ refuses --untaint without one
            remove_taint(self.node_api, self.cfg.untaint, self.log)
            self.untainted = True
        if self.cfg.gc_policy and not rnd.errors and not rnd.stopped:
            # Never with a list that failed to read: its models would not be protected.
            gc.collect(Cache(self.opts.cache), self.cfg.gc_policy, rnd.refs, self.log, pods_dir=self.cfg.pods_dir,
                       node=self.cfg.node)
        if warmed:
            self.ready.set()
            self.metrics.warm.set(1)
        return rnd

    def run(self) -> int:
        """One step without --interval (its exit code); else steps until ``stop`` is set (0)."""
        if self.cfg.interval is None:
            rnd = self.step()
            return 0 if rnd.stopped else rnd.exit_code()
        while not self.stop.is_set():
            try:
                rnd = self.step()
                ok = rnd.ok
            except (LoaderError, OSError) as exc:  # untaint or gc trouble: log it, try again next round
                self.log.error("prefetch.step_failed", error=str(exc))
                ok = False
            wait = self.cfg.interval
            if not ok and not self.ready.is_set():
                wait = min(wait, RETRY_BEFORE_FIRST_SUCCESS)
            self.stop.wait(wait)
        self.log.info("prefetch.stopped", rounds=self.rounds)
        return 0
