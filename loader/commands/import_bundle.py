"""``model-loader import BUNDLE.tar (--cache DIR | --to REGISTRY[/prefix])``: load an exported bundle.

    model-loader import models.tar --cache /var/lib/model-cache
    model-loader import models.tar --to registry.local:5000/mirror [--plain-http] [--docker-config PATH]
    model-loader import models.tar --cache /var/lib/model-cache --verify-key cosign.pub   (or the keyless flags,
        or --signature-policy: the verify flags pull takes)

``--cache`` puts every model straight into a node cache (every digest verified, published as a pull would), so
``pull --offline REF`` and tag pulls hit it with no registry at all. ``--to`` pushes every ref of the bundle to
``REGISTRY/prefix/<original repository>:<tag>``, with the signatures the bundle carries. A corrupt bundle is
refused and nothing is published. With a signature policy, every model must verify from the signatures inside the
bundle, offline, before anything is published or pushed (exit 10 otherwise); ``--cache`` records the verification
as pull does. With ``--output json`` one object per ref: ref, digest, source (and path, bytes, files for --cache;
signatures pushed for --to, when any; verified when a policy was set). See loader.bundle.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from loader.commands.common import (
    SubParsers,
    add_registry_flags,
    add_verify_flags,
    check_concurrency,
    registry_options,
    signature_policy,
    signature_table,
)
from loader.config import LoaderSettings

if TYPE_CHECKING:
    from loader.log import Logger

NAME = "import"


def add_parser(sub: SubParsers, settings: LoaderSettings) -> None:
    p = sub.add_parser(NAME, help="load a bundle from model-loader export into a node cache or a registry")
    p.add_argument("bundle", metavar="BUNDLE.tar")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--cache", metavar="DIR", help="node cache directory to load the models into")
    where.add_argument("--to", metavar="REGISTRY[/prefix]", help="registry (and path prefix) to push every ref to")
    add_registry_flags(p, settings)
    add_verify_flags(p)
    p.add_argument("--output", choices=["text", "json"], default="text")


def run(args: argparse.Namespace, settings: LoaderSettings, log: Logger) -> int:
    from loader.bundle import Verification, import_to_cache, import_to_registry

    # Keys and roots loaded and checked before the bundle is opened or the cache touched.
    table = signature_table(args)
    policy = signature_policy(args)
    verification = Verification(policy, table) if policy is not None or table is not None else None
    check_concurrency(args.concurrency)
    if args.cache:
        results = import_to_cache(args.bundle, args.cache, log, concurrency=args.concurrency,
                                  verification=verification)
    else:
        opts = registry_options(args, settings)
        results = import_to_registry(args.bundle, args.to, opts, log, verification=verification)
    for r in results:
        if args.output == "json":
            print(json.dumps(r.as_json()), flush=True)
        elif r.path is not None:
            print(f"{r.ref} -> {r.path} ({r.files} files, {r.bytes / 1e6:.1f} MB)", flush=True)
        else:
            print(f"{r.source} -> {r.ref}@{r.digest}", flush=True)
        for w in r.warnings:
            print(f"warning: {w}", file=sys.stderr)
    return 0
