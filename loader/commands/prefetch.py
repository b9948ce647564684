"""``model-loader prefetch``: keep listed models in a node cache (the prefetch DaemonSet's command)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from loader import contract
from loader.commands.common import (
    SubParsers,
    add_registry_flags,
    add_verify_flags,
    check_concurrency,
    load_credentials,
    parse_mirrors,
    registry_settings,
    signature_policy,
    signature_table,
)
from loader.config import LoaderSettings

if TYPE_CHECKING:
    from loader import prefetch
    from loader.log import Logger
    from loader.pull import PullOptions

NAME = "prefetch"


class _Terminated(BaseException):
    """Raised from the SIGTERM handler so an in-flight pull stops now (its partial download resumes later)."""


def add_parser(sub: SubParsers, settings: LoaderSettings) -> None:
    p = sub.add_parser(NAME, help="pull listed models into a node cache, and keep them current",
                       description="Pull every listed model into the cache; with --interval keep re-checking tags"
                                   " and re-reading the models file. The node agent (model-loader agent) does the"
                                   " same and more.")
    add_prefetch_flags(p, settings, list_required=True)


def add_prefetch_flags(p: argparse.ArgumentParser, settings: LoaderSettings, list_required: bool) -> None:
    """The flags of prefetch, which the node agent (commands/agent.py) shares."""
    p.add_argument(contract.FLAG_CACHE, required=True, metavar="DIR", help="cache directory (the node's hostPath)")
    src = p.add_mutually_exclusive_group(required=list_required)
    src.add_argument("--ref", action="extend", nargs="+", default=[], metavar="REF",
                     help="models to keep (repeatable)")
    src.add_argument("--models-file", metavar="FILE",
                     help="one ref per line, # comments; re-read every round (a mounted ConfigMap)")
    p.add_argument("--interval", metavar="DURATION", help="run a round every DURATION (10m, 1h); default: once")
    p.add_argument("--untaint", metavar="NODE:TAINT_KEY",
                   help="after the first round in which every model succeeded, remove this taint from NODE")
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="serve /metrics, /healthz and /readyz on PORT (default 0: off)")
    p.add_argument("--metrics-address", default="0.0.0.0", metavar="ADDR", help="address to serve them on")
    p.add_argument("--gc-max-unused", metavar="DURATION", help="after each round, gc models unused this long")
    p.add_argument("--gc-max-size", metavar="SIZE", help="after each round, gc least recently used models to fit")
    p.add_argument("--pods-dir", metavar="DIR",
                   help="kubelet's pod directories (/var/lib/kubelet/pods, read-only), for gc: pins of pods no longer"
                        " there are removed; without it no pin is removed")
    p.add_argument(contract.FLAG_NODE_NAME, metavar="NODE", help="this node's name (downward API spec.nodeName)")
    add_registry_flags(p, settings)
    p.add_argument(contract.FLAG_MIRROR, action="append", default=[], metavar="HOST=URL",
                   help="try URL first for registry HOST, then the registry itself (repeatable)")
    add_verify_flags(p)


def run(args: argparse.Namespace, settings: LoaderSettings, log: Logger) -> int:
    from loader import prefetch

    cfg, opts = prefetch_config(args, settings)
    node_api = prefetch.NodeApi.from_settings(settings) if cfg.untaint else None
    stop = threading.Event()
    worker = prefetch.Prefetcher(cfg, opts, log, node_api=node_api, stop=stop)
    log.info("prefetch.start", models_file=args.models_file, refs=len(args.ref) or None, interval=args.interval,
             untaint=args.untaint, metrics_port=args.metrics_port or None, cache=str(opts.cache))
    return serve_until_term(args, worker, stop, log)


def prefetch_config(args: argparse.Namespace, settings: LoaderSettings) -> tuple[prefetch.Config, PullOptions]:
    """The prefetch configuration and pull options from prefetch's flags (UsageError for bad values)."""
    from loader import gc, prefetch
    from loader.errors import UsageError
    from loader.pull import PullOptions

    check_concurrency(args.concurrency)
    interval = gc.parse_duration(args.interval, "--interval") if args.interval is not None else None
    if interval is not None and interval <= 0:
        raise UsageError(f"--interval {args.interval!r} must be longer than 0, e.g. 10m")
    if not 0 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port {args.metrics_port} is not a port number (0 turns metrics off), e.g. 9090")
    policy = None
    if args.gc_max_unused is not None or args.gc_max_size is not None:
        policy = gc.Policy(
            max_unused=gc.parse_duration(args.gc_max_unused, "--gc-max-unused") if args.gc_max_unused else None,
            max_size=gc.parse_size(args.gc_max_size, "--gc-max-size") if args.gc_max_size else None,
        )
    untaint = prefetch.parse_untaint(args.untaint) if args.untaint is not None else None
    cfg = prefetch.Config(refs=tuple(args.ref), models_file=args.models_file, interval=interval, untaint=untaint,
                          gc_policy=policy, pods_dir=args.pods_dir, node=args.node_name)
    ca_files, plain_hosts = registry_settings(args)
    opts = PullOptions(
        cache=Path(args.cache),
        concurrency=args.concurrency,
        plain_http=args.plain_http,
        ca_files=ca_files,
        plain_http_registries=plain_hosts,
        insecure=args.insecure_skip_tls_verify,
        credentials=load_credentials(args.docker_config, settings),
        mirrors=parse_mirrors(args.mirror),
        timeout=args.timeout,
        progress=settings.progress,
        progress_interval=settings.progress_interval,
        signature_policy=signature_policy(args),
        signature_table=signature_table(args),
    )
    return cfg, opts


def serve_until_term(args: argparse.Namespace, worker: prefetch.Prefetcher, stop: threading.Event, log: Logger) -> int:
    """Run ``worker`` (with its status server on --metrics-port) until it ends or SIGTERM comes."""
    from loader import prefetch
    from loader.errors import UsageError

    server = None
    if args.metrics_port:
        try:
            server = prefetch.StatusServer(worker.metrics, worker.ready, args.metrics_address, args.metrics_port)
        except OSError as exc:
            raise UsageError(f"--metrics-port {args.metrics_port}: cannot listen on"
                             f" {args.metrics_address}:{args.metrics_port}: {exc.strerror}") from exc
        server.start()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return worker.run()
    except _Terminated:
        log.info("prefetch.stopped", rounds=worker.rounds, signal="SIGTERM")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server:
            server.close()
