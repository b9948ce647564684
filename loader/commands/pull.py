"""``model-loader pull``: what the injected init container runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
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
    from loader.log import Logger
    from loader.pull import PullResult

NAME = contract.PULL


def add_parser(sub: SubParsers, settings: LoaderSettings) -> None:
    p = sub.add_parser(NAME, help="pull models into the cache (parallel, verified, resumable)")
    p.add_argument("refs", nargs="+", metavar="REF", help="host[:port]/repo[:tag][@sha256:...]")
    p.add_argument(contract.FLAG_CACHE, required=True, metavar="DIR", help="cache directory (shared by pods)")
    add_registry_flags(p, settings)
    add_verify_flags(p)
    p.add_argument(contract.FLAG_MIRROR, action="append", default=[], metavar="HOST=URL",
                   help="try URL first for registry HOST, then the registry itself (repeatable)")
    p.add_argument(contract.FLAG_OFFLINE, action="store_true", help="never touch the network; use the cache only")
    p.add_argument(contract.FLAG_CHECK_ACCESS, action="store_true",
                   help="prove these credentials may read a digest even when it is cached (shared node caches);"
                        " an unreachable registry still falls back to the cache")
    p.add_argument(contract.FLAG_POD_UID, metavar="UID",
                   help="pin each model for this pod (pods/UID/<key>): a restarted pod gets the digest it verified"
                        " first, whatever the tag says now (the webhook passes the downward API's metadata.uid)")
    p.add_argument(contract.FLAG_NODE_NAME, metavar="NODE",
                   help="the node the pod runs on, recorded with its pins (gc on a shared claim judges only its own)")
    p.add_argument(contract.FLAG_OUTPUT, choices=["text", "json"], default="text")
    p.add_argument("--progress", choices=["auto", "bar", "log", "none"], default=settings.progress)


def run(args: argparse.Namespace, settings: LoaderSettings, log: Logger) -> int:
    from loader.pull import PullOptions, pull

    check_concurrency(args.concurrency)
    ca_files, plain_hosts = registry_settings(args)
    policy = signature_policy(args)
    opts = PullOptions(
        cache=Path(args.cache),
        concurrency=args.concurrency,
        plain_http=args.plain_http,
        ca_files=ca_files,
        plain_http_registries=plain_hosts,
        insecure=args.insecure_skip_tls_verify,
        credentials=None if args.offline else load_credentials(args.docker_config, settings, log),
        mirrors=parse_mirrors(args.mirror),
        offline=args.offline,
        timeout=args.timeout,
        progress=args.progress,
        progress_interval=settings.progress_interval,
        check_access=args.check_access,
        pod_uid=args.pod_uid,
        node_name=args.node_name,
        signature_policy=policy,
        signature_table=signature_table(args),
    )
    results: list[PullResult] = []
    for ref in args.refs:
        res = pull(ref, opts, log)
        results.append(res)
        if args.output == "json":
            print(json.dumps(res.as_json()), flush=True)
        else:
            print(f"{res.ref} -> {res.path} ({res.files} files, {describe(res)})", flush=True)
        for w in res.warnings:
            print(f"warning: {w}", file=sys.stderr)
    termination_summary(settings.termination_log, results)
    return 0


def describe(r: PullResult) -> str:
    """What happened, in words that do not mislead: a stale fallback is flagged, a download says how much this
    loader fetched (another loader on the node may have fetched the rest)."""
    if r.stale:
        what = "STALE cached copy: registry unreachable, tag not re-checked"
    elif r.cache_hit:
        what = "cache hit"
    elif r.fetched_bytes >= r.bytes:
        what = f"downloaded {r.fetched_bytes / 1e6:.1f} MB"
    else:
        what = f"downloaded {r.fetched_bytes / 1e6:.1f} of {r.bytes / 1e6:.1f} MB, the rest already on the node"
    if r.pinned:
        what += ", pinned digest of this pod"
    if r.verified is not None:
        what += f", signed by {r.verified.signer[:19]}... ({r.verified.where}"
        what += ", verified before)" if r.verified.recorded else ")"
    return f"{what} in {r.seconds:.2f}s"


def termination_summary(path: str, results: list[PullResult]) -> None:
    """kubectl shows this in the pod status (terminationMessagePath); only when running where the file exists."""
    if not path or not os.path.exists(path):
        return
    parts = [f"{r.ref}@{r.digest[:19]} {r.files} files, {describe(r)}" for r in results]
    try:
        with open(path, "w") as f:
            f.write(("loaded " + "; ".join(parts))[:4000] + "\n")
    except OSError:
        pass
