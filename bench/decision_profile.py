"""The cost of a fresh admission decision, in process: the ``/mutate*`` series of bench/admission.py without the
transport, so that the decision's own parts can be timed and profiled.

    .venv/bin/python bench/decision_profile.py [--reviews 3000] [--nodes 10] [--repeat 5] [--profile] [--top 30]

Builds the distinct pods of bench/admission.py (``make_reviews(..., distinct=True)``: 40 templates, every pod
with its own name, so no answer is ever remembered) and a ``make_nodes`` inventory, parses the bodies up front
(orjson, as the app does), and then times ``admission.mutate_review`` over them on a fresh snapshot each repeat
(the decision memo warm after the first template of each kind, as on a server). Prints the median microseconds
per review over the repeats, and the time of each stage of a decision on the same pods (the envelope, the memo
key, the shape check, ``plan_pod``'s checks, the mutation, the patch, the response encoding), each measured alone.
``--profile`` runs cProfile over one pass and prints the ``--top`` functions by their own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.admission import make_nodes, make_reviews  # noqa: E402
from webhook import admission, mutate  # noqa: E402
from webhook.config import Settings  # noqa: E402
from webhook.patch import make_patch  # noqa: E402
from webhook.snapshot import Snapshot, snapshot_from  # noqa: E402


def _snapshot(nodes: dict[str, Any]) -> Snapshot:
    return snapshot_from(nodes["items"], [{"metadata": {"name": "models", "labels": {}}}])


def _per_review(fn: Callable[[], object], count: int, repeat: int) -> float:
    """Median microseconds per review of ``fn`` (one pass over ``count`` reviews) over ``repeat`` passes."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviews", type=int, default=3000)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    settings = Settings(loader_image="registry.example.com/model-cache/loader:0.1.0")
    nodes = make_nodes(args.nodes, random.Random(1))
    raw = make_reviews(args.reviews, seed=8, distinct=True)
    bodies = [orjson.loads(b) for b in raw]
    pods = [b["request"]["object"] for b in bodies]
    snap = _snapshot(nodes)
    n = len(bodies)

    def whole() -> None:
        s = _snapshot(nodes)
        for body in bodies:
            admission.mutate_review(body, s, settings)

    def envelope() -> None:
        for body in bodies:
            admission.parse_review(body)

    def key() -> None:
        for pod in pods:
            admission._answer_key(pod, "models")

    def shape() -> None:
        for pod in pods:
            admission._check_shape(pod, "request.object")

    def plan() -> None:
        for pod in pods:
            mutate.plan_pod(pod, settings, snap)

    def checks() -> None:
        for pod in pods:
            spec = pod["spec"]
            mutate.check_bounds(pod["metadata"]["annotations"], spec)
            mutate.check_volume_references(spec, settings)

    outcomes = [mutate.mutate_pod(pod, "models", None, snap, settings) for pod in pods]

    def mutation() -> None:
        for pod in pods:
            mutate.mutate_pod(pod, "models", None, snap, settings)

    def patch() -> None:
        for pod, outcome in zip(pods, outcomes, strict=True):
            make_patch(pod, outcome.pod)

    patches = [make_patch(pod, outcome.pod) for pod, outcome in zip(pods, outcomes, strict=True)]

    def respond() -> None:
        for body, ops, outcome in zip(bodies, patches, outcomes, strict=True):
            orjson.dumps(admission._respond(body["request"]["uid"], ops=ops, warnings=outcome.warnings, mode=outcome.mode))

    sizes = sorted(len(b) for b in raw)
    print(f"{n} distinct reviews ({sizes[0] / 1024:.1f}-{sizes[-1] / 1024:.1f} KB), {args.nodes} nodes, median of "
          f"{args.repeat} passes, microseconds per review:")
    stages = [("mutate_review (whole, fresh snapshot)", whole), ("  envelope (parse_review)", envelope),
              ("  memo key (_answer_key)", key), ("  shape check (POD_SHAPE)", shape),
              ("  plan_pod (bounds, references, plan, choose_mode)", plan),
              ("    check_bounds + check_volume_references", checks),
              ("  mutate_pod (plan_pod + injectors)", mutation), ("  make_patch", patch),
              ("  response (_respond + orjson.dumps)", respond)]
    for label, fn in stages:
        print(f"{label:<52} {_per_review(fn, n, args.repeat):8.1f}")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        whole()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
