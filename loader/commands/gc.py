"""``model-loader gc``: evict models by last use and size, then remove what no remaining model needs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from loader import contract
from loader.config import LoaderSettings

if TYPE_CHECKING:
    from loader.commands.common import SubParsers
    from loader.log import Logger

NAME = "gc"


def add_parser(sub: SubParsers, settings: LoaderSettings) -> None:
    p = sub.add_parser(NAME, help="remove unused models, unreferenced blobs and stale downloads from the cache",
                       description="Remove models unused for longer than --max-unused, then the least recently used"
                                   " until the models fit in --max-size, then blobs no remaining model references,"
                                   " stale partial downloads and staging leftovers. Safe while pulls run.")
    p.add_argument(contract.FLAG_CACHE, required=True, metavar="DIR", help="cache directory")
    p.add_argument("--max-unused", metavar="DURATION", help="remove models unused for longer than this (30m, 12h, 7d)")
    p.add_argument("--max-size", metavar="SIZE",
                   help="then remove least recently used models until the rest fit (500Mi, 20G, 1Ti)")
    p.add_argument("--keep-file", metavar="FILE",
                   help="models never to remove: one ref per line, # comments (the prefetch models list)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed; change nothing")
    p.add_argument("--pods-dir", metavar="DIR",
                   help="kubelet's pod directories (/var/lib/kubelet/pods, read-only): pins of pods no longer there are"
                        " removed first. Without it no pin is removed, and a pinned model is never evicted")
    p.add_argument(contract.FLAG_NODE_NAME, metavar="NODE",
                   help="this node's name (downward API spec.nodeName): on a claim shared by nodes, judge only the"
                        " pins this node's pods made")
    p.add_argument("--wait", metavar="DURATION", default="15m",
                   help="how long to wait for running pulls to finish before giving up (exit 7; default 15m)")
    p.add_argument(contract.FLAG_OUTPUT, choices=["text", "json"], default="text")


def run(args: argparse.Namespace, settings: LoaderSettings, log: Logger) -> int:
    from loader import gc
    from loader.cache import Cache
    from loader.errors import UsageError

    policy = gc.Policy(
        max_unused=gc.parse_duration(args.max_unused, "--max-unused") if args.max_unused is not None else None,
        max_size=gc.parse_size(args.max_size, "--max-size") if args.max_size is not None else None,
    )
    keep = gc.read_keep_file(args.keep_file) if args.keep_file else []
    if not Path(args.cache).is_dir():
        raise UsageError(f"{contract.FLAG_CACHE} {args.cache!r} is not a directory")
    cache = Cache(args.cache)
    wait = gc.parse_duration(args.wait, "--wait")
    report = gc.collect(cache, policy, keep, log, dry_run=args.dry_run, lock_timeout=wait, pods_dir=args.pods_dir,
                        node=args.node_name)
    if args.output == "json":
        print(json.dumps(report.as_json()), flush=True)
    else:
        print("\n".join(report.text()), flush=True)
    return 0
