"""The node agent: everything model-cache does per node, in one process (``model-loader agent``, one DaemonSet).

It is the prefetcher (:mod:`loader.prefetch`: the models list re-read every round, the startup taint removed once
every listed model is local, gc after each round, ``/metrics`` ``/healthz`` ``/readyz``) plus:

* the CSI node plugin (:mod:`loader.csi.server`) on kubelet's plugin socket, serving inline ``model.cache``
  volumes from the same node cache;
* metrics (:class:`AgentMetrics`): pulls and hits by source, pull duration, failures by exit class, CSI publish
  latency, the models and bytes the cache holds;
* warm labels: the node carries ``warm.model.cache/<hash>`` (:func:`loader.contract.warm_label`) for each model
  its cache holds complete, at most ``limit`` of them (the most recently used), so the webhook can prefer warm
  nodes. They follow the cache: a pull adds one, gc's eviction removes it, within ``label_interval``.

:func:`warm_labels` (what the node should carry) and :func:`label_patch` (the merge patch that gets it there) are
pure; :class:`LabelSync` reads the cache and talks to the node API (:class:`loader.prefetch.NodeApi`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from prometheus_client import Counter, Gauge, Histogram

from loader import contract
from loader.cache import Cache
from loader.errors import LoaderError
from loader.prefetch import Metrics, NodeApi, NodeApiError, Prefetcher, Round

if TYPE_CHECKING:
    from loader.log import Logger
    from loader.observe import PullObserver
    from loader.pull import PullResult

#: The shape of a refs/ entry's name (loader.reference.cache_key: readable part, '-', 16 hex); anything else in
#: refs/ was not made by model-loader and names no label (one bad label would get every patch refused).
_CACHE_KEY = re.compile(r"[A-Za-z0-9_.-]+-[0-9a-f]{16}")
#: Warm labels per node at most: a node object is read by every scheduler pass and every watch; keep it small.
MAX_WARM_LABELS = 64
LABEL_INTERVAL = 30.0  # seconds between label syncs (a sync that changes nothing sends nothing)
LABEL_ATTEMPTS = 5


# ---- what the node should say ------------------------------------------------------------------------------------


def warm_labels(cache: Cache, limit: int = MAX_WARM_LABELS) -> dict[str, str]:
    """The warm labels for the models ``cache`` holds complete (a ``refs/`` link to a published tree), the ``limit``
    most recently used first. Read through the cache's listing API; nothing is built from file contents."""
    published = {d.hex for d in cache.list_models()}
    lastuse = cache.list_lastuse()
    held = [(lastuse.get(target.hex, 0.0), name) for name, target in cache.list_refs().items()
            if target is not None and target.hex in published and _CACHE_KEY.fullmatch(name)]
    held.sort(key=lambda item: (-item[0], item[1]))
    out: dict[str, str] = {}
    for _, name in held:
        label = contract.warm_label_of_key(name)
        if label not in out:
            out[label] = "true"
            if len(out) == limit:
                break
    return out


def label_patch(node: Mapping[str, Any], want: Mapping[str, str]) -> dict[str, Any] | None:
    """A JSON merge patch setting the node's warm labels to exactly ``want`` (others untouched), guarded by the
    resourceVersion read; None when they already are."""
    meta = node.get("metadata") or {}
    have = {k: v for k, v in (meta.get("labels") or {}).items() if k.startswith(contract.WARM_LABEL_PREFIX)}
    if have == dict(want):
        return None
    change: dict[str, str | None] = {k: None for k in have if k not in want}
    change.update({k: v for k, v in want.items() if have.get(k) != v})
    return {"metadata": {"resourceVersion": meta.get("resourceVersion"), "labels": change}}


# ---- keeping it so -----------------------------------------------------------------------------------------------


@dataclass
class LabelSync:
    """Keeps one node's warm labels equal to what its cache holds."""

    api: NodeApi
    node: str
    cache: Cache
    log: Logger
    limit: int = MAX_WARM_LABELS
    last: dict[str, str] | None = None  # what the node was last set to (None: not known yet)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sync(self) -> bool:
        """Bring the labels up to date; True when a patch was sent. Raises NodeApiError when the API refuses.
        One at a time (the label thread and the prefetch rounds both call it)."""
        with self._lock:
            return self._sync()

    def _sync(self) -> bool:
        want = warm_labels(self.cache, self.limit)
        if want == self.last:
            return False
        path = f"/api/v1/nodes/{quote(self.node, safe='')}"
        for attempt in range(1, LABEL_ATTEMPTS + 1):
            status, node = self.api.request("GET", path)
            if status != 200 or node is None:
                raise NodeApiError(f"cannot get node {self.node} to set its warm labels: HTTP {status}")
            patch = label_patch(node, want)
            if patch is None:
                self.last = want
                return False
            status, body = self.api.request("PATCH", path, patch, "application/merge-patch+json")
            if status == 200:
                self.last = want
                self.log.info("agent.labels", node=self.node, warm=len(want), attempt=attempt)
                return True
            if status != 409:
                message = (body or {}).get("message", "")
                raise NodeApiError(f"cannot patch node {self.node}'s warm labels: HTTP {status}"
                                   + (f" ({message})" if message else "")
                                   + (": apply the agent's ClusterRole and ValidatingAdmissionPolicy" if status == 403
                                      else ""))
        raise NodeApiError(f"node {self.node} kept changing: {LABEL_ATTEMPTS} label patches conflicted")

    def run(self, stop: threading.Event, interval: float = LABEL_INTERVAL) -> None:
        """Sync every ``interval`` until ``stop`` (the prefetch rounds sync too, the first one at the end of the
        first round); failures are logged and retried next time."""
        while not stop.wait(interval):
            self.sync_logged()

    def sync_logged(self) -> None:
        """sync(), with a failure logged (and the next sync reading the node afresh) instead of raised."""
        try:
            self.sync()
        except (LoaderError, OSError) as exc:
            self.log.warning("agent.labels_failed", node=self.node, error=str(exc))
            self.last = None


# ---- metrics ---------------------------------------------------------------------------------------------------

#: Pull durations from a warm hit (a manifest GET) to a cold pull of a large model.
PULL_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
#: A CSI publish answers within kubelet's deadline (about 2 minutes), ABORTED while the pull goes on.
PUBLISH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
#: The gRPC codes a publish may answer (docs/csi.md); anything else is counted as "other".
PUBLISH_CODES = frozenset({"OK", "ABORTED", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
                           "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "DATA_LOSS",
                           "UNAVAILABLE", "INTERNAL"})


class AgentMetrics:
    """The agent's own series, in the prefetcher's registry (one /metrics): pulls by source and result, their
    duration, failures by exit class, CSI publish latency by answer, and what the cache holds. Labels come from
    closed sets only (sources, results, exit-code names, gRPC codes), never from a reference."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.pulls = Counter("model_cache_agent_pulls", "Pulls by source (prefetch, csi) and result (pulled, hit,"
                             " failed)", ["source", "result"], registry=r)
        self.pull_seconds = Histogram("model_cache_agent_pull_duration_seconds", "Duration of a pull, by source",
                                      ["source"], buckets=PULL_BUCKETS, registry=r)
        self.failures = Counter("model_cache_agent_pull_failures", "Failed pulls by exit class (the loader's exit"
                                " code name)", ["exit"], registry=r)
        self.publish_seconds = Histogram("model_cache_agent_csi_publish_duration_seconds", "NodePublishVolume"
                                         " latency, by the code answered", ["code"], buckets=PUBLISH_BUCKETS,
                                         registry=r)
        self.models = Gauge("model_cache_agent_models_cached", "Models the node cache holds complete", registry=r)
        self.bytes = Gauge("model_cache_agent_cache_bytes", "Bytes of the models the node cache holds (as the apps"
                           " see them; shared blobs counted per model)", registry=r)
        for source in ("prefetch", "csi"):
            for result in ("pulled", "hit", "failed"):
                self.pulls.labels(source, result)
            self.pull_seconds.labels(source)
        for code in contract.ExitCode:
            if code is not contract.ExitCode.OK:
                self.failures.labels(code.name.lower())

    def observer(self, source: str) -> PullObserver:
        def observe(ref: str, seconds: float, result: PullResult | None, error: LoaderError | None) -> None:
            self.pull_seconds.labels(source).observe(seconds)
            if error is not None:
                self.pulls.labels(source, "failed").inc()
                self.failures.labels(contract.ExitCode(error.exit_code).name.lower()).inc()
            elif result is not None:
                self.pulls.labels(source, "hit" if result.cache_hit else "pulled").inc()
        return observe

    def published(self, seconds: float, code: str) -> None:
        self.publish_seconds.labels(code if code in PUBLISH_CODES else "other").observe(seconds)

    def measure_cache(self, cache: Cache) -> None:
        """The models-cached and bytes gauges, from the cache's listing and its models' records."""
        models = cache.list_models()
        total = 0
        for digest in models:
            meta = cache.read_meta(digest)
            if meta is not None and isinstance(meta.get("bytes"), int):
                total += meta["bytes"]
        self.models.set(len(models))
        self.bytes.set(total)


class AgentPrefetcher(Prefetcher):
    """The prefetcher whose every step ends with a label sync (so a round's pulls and gc show at once)."""

    labels: LabelSync | None = None
    agent_metrics: AgentMetrics | None = None

    def step(self) -> Round:
        rnd = super().step()
        if self.labels is not None:
            self.labels.sync_logged()
        if self.agent_metrics is not None:
            try:
                self.agent_metrics.measure_cache(Cache(self.opts.cache))
            except (LoaderError, OSError) as exc:
                self.log.warning("agent.measure_failed", error=str(exc))
        return rnd
