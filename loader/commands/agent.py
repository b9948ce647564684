"""``model-loader agent``: the node agent (loader/agent.py), the one DaemonSet per node: prefetch, CSI, warm labels."""

from __future__ import annotations

import argparse
import dataclasses
import threading
from typing import TYPE_CHECKING

from loader.commands.common import SubParsers
from loader.commands.prefetch import add_prefetch_flags, prefetch_config, serve_until_term
from loader.config import LoaderSettings

if TYPE_CHECKING:
    from loader.log import Logger

NAME = "agent"
DEFAULT_INTERVAL = 600.0  # seconds between prefetch rounds (and gc) without --interval


def add_parser(sub: SubParsers, settings: LoaderSettings) -> None:
    p = sub.add_parser(
        NAME, help="the node agent: prefetch, the CSI node plugin, warm node labels, gc and metrics",
        description="Everything model-cache does per node, in one process: keep listed models warm (as prefetch),"
                    " serve inline CSI volumes of the model.cache driver from the node cache, label the node for"
                    " the models it holds, remove the startup taint once warm, gc after each round.")
    add_prefetch_flags(p, settings, list_required=False)  # without --interval: a round every 10m
    p.add_argument("--csi-socket", metavar="PATH",
                   help="serve the CSI node plugin on this unix socket (kubelet's plugins/model.cache/csi.sock)")
    p.add_argument("--csi-state-dir", metavar="DIR",
                   help="where CSI volume records persist across restarts (default: volumes/ beside the socket)")
    p.add_argument("--warm-labels", action="store_true",
                   help="label this node (--node-name) warm.model.cache/<hash>=true for each model it holds")
    p.add_argument("--warm-label-limit", type=int, default=64, metavar="N",
                   help="at most N warm labels, the most recently used models (default %(default)s)")
    p.add_argument("--label-interval", metavar="DURATION", default="30s",
                   help="how often the labels are brought up to date (default %(default)s)")


def run(args: argparse.Namespace, settings: LoaderSettings, log: Logger) -> int:
    from loader import agent, gc, prefetch
    from loader.cache import Cache
    from loader.errors import UsageError

    cfg, opts = prefetch_config(args, settings)
    if cfg.interval is None:  # the agent serves until stopped: it never does just one round
        cfg = dataclasses.replace(cfg, interval=DEFAULT_INTERVAL)
    label_interval = gc.parse_duration(args.label_interval, "--label-interval")
    if label_interval <= 0:
        raise UsageError(f"--label-interval {args.label_interval!r} must be longer than 0, e.g. 30s")
    if not 1 <= args.warm_label_limit <= 1000:
        raise UsageError(f"--warm-label-limit {args.warm_label_limit} must be between 1 and 1000")
    if (args.warm_labels or args.csi_socket) and not args.node_name:
        raise UsageError("--warm-labels and --csi-socket need --node-name (the downward API's spec.nodeName)")
    node_api = prefetch.NodeApi.from_settings(settings) if cfg.untaint or args.warm_labels else None
    stop = threading.Event()
    worker = agent.AgentPrefetcher(cfg, opts, log, node_api=node_api, stop=stop)
    metrics = worker.agent_metrics = agent.AgentMetrics(worker.metrics)
    worker.on_pull = metrics.observer("prefetch")
    threads = []
    if args.warm_labels:
        assert node_api is not None
        worker.labels = agent.LabelSync(node_api, args.node_name, Cache(opts.cache).ensure(), log,
                                        limit=args.warm_label_limit)
        threads.append(threading.Thread(target=worker.labels.run, args=(stop, label_interval), name="labels",
                                        daemon=True))
    log.info("agent.start", node=args.node_name, models_file=args.models_file, refs=len(args.ref) or None,
             interval=args.interval, untaint=args.untaint, csi_socket=args.csi_socket, warm_labels=args.warm_labels,
             metrics_port=args.metrics_port or None, cache=str(opts.cache))
    csi = None
    if args.csi_socket:
        from loader.csi.server import serve

        try:
            csi = serve(args.csi_socket, args.cache, args.node_name, args.pods_dir or "/var/lib/kubelet/pods",
                        state_dir=args.csi_state_dir, pull_options=opts, log=log, on_pull=metrics.observer("csi"),
                        on_publish=metrics.published)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    for thread in threads:
        thread.start()
    try:
        return serve_until_term(args, worker, stop, log)
    finally:
        stop.set()
        if csi is not None:
            csi.stop()
