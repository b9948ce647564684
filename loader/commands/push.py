"""``model-loader push DIR REF``: package a model directory as an OCI artifact, one layer per file.

    model-loader push ./phi3 registry.example.com/models/phi3:v1 [--format modelpack|oras]
        [--compress none|zstd] [--mount-from REPO] [--artifact-type TYPE] [--chunk-size MIB]
        [--concurrency N] [--tmp-dir DIR] [--plain-http] [--docker-config PATH] [--output text|json]

Prints each file with what happened to its blob (uploaded, exists, mounted, duplicate) and the manifest digest;
``--output json`` prints one object: ref, digest, bytes, files, seconds, uploaded_bytes, skipped_blobs,
mounted_blobs. ModelPack by default; ``--format oras`` writes what ``oras push`` writes. Warnings (on stderr)
name what will look different on an image volume and in model-loader's tree: ``--compress zstd`` (an image volume
shows the compressed tars) and executable files (neither path keeps the bit). Names model-loader pull would
refuse are refused before any upload (exit 8). Only ``--compress zstd`` writes locally (each compressed layer,
until it is uploaded): in ``--tmp-dir`` when given, else beside DIR, else in TMPDIR; exit 2 names what it tried
when none is writable. See loader.push for the details.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loader.commands.common import (
    SubParsers,
    add_registry_flags,
    check_concurrency,
    load_credentials,
    registry_settings,
)
from loader.config import LoaderSettings
from loader.errors import UsageError

if TYPE_CHECKING:
    from loader.log import Logger

NAME = "push"


def add_parser(sub: SubParsers, settings: LoaderSettings) -> None:
    p = sub.add_parser(NAME, help="push a model directory as an OCI artifact (one layer per file)")
    p.add_argument("directory", metavar="DIR", help="the model directory")
    p.add_argument("ref", metavar="REF", help="host[:port]/repo[:tag]")
    p.add_argument("--format", choices=["modelpack", "oras"], default="modelpack",
                   help="ModelPack media types and config (default), or plain ORAS artifact layers")
    p.add_argument("--compress", choices=["none", "zstd"], default="none",
                   help="zstd: each file as a compressed one-file tar (pull restores it; image volumes do not)")
    p.add_argument("--mount-from", metavar="REPO", help="repository on the same registry to mount blobs from")
    p.add_argument("--artifact-type", metavar="TYPE", help="manifest artifactType (default by --format)")
    p.add_argument("--chunk-size", type=int, default=64, metavar="MIB",
                   help="upload large files in PATCH chunks of this many MiB; 0 sends each file in one PUT")
    p.add_argument("--tmp-dir", type=Path, metavar="DIR",
                   help="where --compress zstd writes compressed layers until they are uploaded (default: beside"
                        " the model directory, else TMPDIR)")
    add_registry_flags(p, settings)
    p.add_argument("--output", choices=["text", "json"], default="text")
    p.add_argument("--progress", choices=["auto", "bar", "log", "none"], default=settings.progress)


def run(args: argparse.Namespace, settings: LoaderSettings, log: Logger) -> int:
    from loader.push import MiB, PushOptions, push

    check_concurrency(args.concurrency)
    if args.chunk_size < 0:
        raise UsageError(f"--chunk-size {args.chunk_size} must be 0 or more")
    ca_files, plain_hosts = registry_settings(args)
    opts = PushOptions(
        format=args.format,
        compress=args.compress,
        concurrency=args.concurrency,
        plain_http=args.plain_http,
        ca_files=ca_files,
        plain_http_registries=plain_hosts,
        insecure=args.insecure_skip_tls_verify,
        credentials=load_credentials(args.docker_config, settings),
        timeout=args.timeout,
        mount_from=args.mount_from,
        artifact_type=args.artifact_type,
        chunk_size=args.chunk_size * MiB,
        progress=args.progress,
        progress_interval=settings.progress_interval,
        tmp_dir=args.tmp_dir,
    )
    res = push(args.directory, args.ref, opts, log)
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(res.as_json()), flush=True)
        return 0
    for f in res.pushed:
        print(f"  {f.action:9} {f.rel}  {f.size / 1e6:.1f} MB  {f.media_type}")
    print(f"pushed {res.ref}@{res.digest} ({res.files} files, {res.bytes / 1e6:.1f} MB; uploaded"
          f" {res.uploaded_bytes / 1e6:.1f} MB, {res.skipped_blobs} blobs already present,"
          f" {res.mounted_blobs} mounted) in {res.seconds:.2f}s", flush=True)
    return 0
