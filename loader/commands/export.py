"""``model-loader export REF [REF ...] -o BUNDLE.tar``: write an OCI image layout tarball for air-gapped sites.

    model-loader export registry.example.com/models/phi3:v1 registry.example.com/models/bge:v2 -o models.tar
        [--no-with-signatures] [--plain-http] [--insecure-skip-tls-verify] [--docker-config PATH]
        [--output text|json]

The bundle holds each ref's manifests (an index and its children too) and blobs, each verified while it streams
from the registry; index.json names each ref by its tag (org.opencontainers.image.ref.name) and its full
reference (io.containerd.image.name). ``skopeo copy oci-archive:models.tar:v1 ...`` reads it; ``model-loader
import`` loads it into a node cache or another registry. See loader.bundle.

Each ref's signatures travel with it by default (``--with-signatures``): cosign's ``sha256-<hex>.sig`` tag and the
OCI 1.1 referrers (as the fallback tag ``sha256-<hex>``), found as ``pull --verify-key`` finds them. On by default
because an air-gapped site cannot fetch them later, and an import under a signature policy refuses a model whose
signatures stayed behind; they cost a few small requests and a few KB per model. ``--no-with-signatures`` leaves
them out (a bundle for a site that requires none).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from loader.commands.common import (
    SubParsers,
    add_registry_flags,
    check_concurrency,
    registry_options,
)
from loader.config import LoaderSettings

if TYPE_CHECKING:
    from loader.log import Logger

NAME = "export"


def add_parser(sub: SubParsers, settings: LoaderSettings) -> None:
    p = sub.add_parser(NAME, help="write refs to an OCI image layout tarball (for air-gapped sites)")
    p.add_argument("refs", nargs="+", metavar="REF", help="host[:port]/repo[:tag][@sha256:...]")
    p.add_argument("-o", "--bundle", required=True, metavar="BUNDLE.tar", help="the tarball to write")
    p.add_argument("--with-signatures", action=argparse.BooleanOptionalAction, default=True,
                   help="carry each ref's signatures (cosign's .sig tag, referrers) in the bundle (default: on)")
    add_registry_flags(p, settings)
    p.add_argument("--output", choices=["text", "json"], default="text")


def run(args: argparse.Namespace, settings: LoaderSettings, log: Logger) -> int:
    from loader.bundle import export

    check_concurrency(args.concurrency)
    opts = registry_options(args, settings)
    res = export(args.refs, args.bundle, opts, log, with_signatures=args.with_signatures)
    if args.output == "json":
        print(json.dumps(res.as_json()), flush=True)
        return 0
    for ref, digest in res.refs:
        print(f"  {ref}@{digest}")
    print(f"exported {len(res.refs)} refs to {res.bundle} ({res.blobs} blobs, {res.bytes / 1e6:.1f} MB)"
          f"{f', {res.signatures} signatures' if res.signatures else ''} in {res.seconds:.2f}s", flush=True)
    return 0
