"""Prometheus metrics of the webhook: what it decided, how long it took, what inventory it decided with.

Each app owns its :class:`Metrics` (its own registry), so tests and several apps in one process do not share
counters. Inventory gauges are computed at scrape time from the current snapshot rather than updated by the
watch threads: the scrape is rare, node events are not, and the numbers can never disagree with what the
admission path saw.
"""

from __future__ import annotations

from collections import Counter as _Tally
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from webhook.snapshot import NodeInfo, Snapshot

# Sub-millisecond to the apiserver's 10 s webhook timeout ceiling.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


#: The ``kind`` label's values: a closed set, since ``request.kind.kind`` is whatever the client sent (40 reviews
#: with distinct 4 MB kinds would otherwise keep 40 series of 4 MB labels, and every scrape would carry them).
KINDS = frozenset(
    {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "ReplicationController"}
)
OTHER_KIND = "other"
NO_KIND = "unknown"  # a review without a kind (malformed)


def kind_label(kind: object) -> str:
    """``kind`` as the label: itself when in KINDS, ``unknown`` when missing, else ``other``."""
    if not kind:
        return NO_KIND
    return kind if isinstance(kind, str) and kind in KINDS else OTHER_KIND


def node_runtime(node: NodeInfo) -> str:
    """The runtime name of a snapshot node for the gauge label (``cri-o``, ``containerd``, ``unknown``)."""
    return node.runtime or "unknown"


class _InventoryCollector:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self._snapshot()
        nodes = GaugeMetricFamily(
            "model_cache_inventory_nodes", "Nodes in the inventory, by container runtime.", labels=["runtime"]
        )
        for runtime, count in sorted(_Tally(node_runtime(n) for n in snap.nodes).items()):
            nodes.add_metric([runtime], count)
        yield nodes
        yield GaugeMetricFamily(
            "model_cache_inventory_namespaces", "Namespaces in the inventory.", value=len(snap.namespaces)
        )
        yield GaugeMetricFamily(
            "model_cache_inventory_synced",
            "1 once the node and namespace inventory has completed its initial list.",
            value=1 if snap.synced else 0,
        )


class Metrics:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        self.reviews = Counter(
            "model_cache_reviews",
            "Admission reviews answered, by object kind, chosen mode and outcome.",
            ["kind", "mode", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "model_cache_review_duration_seconds",
            "Time to answer an admission review, from body received to response serialised (waiting included).",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_InventoryCollector(snapshot))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
