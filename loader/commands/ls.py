"""``model-loader ls``: the models in a cache, their refs, size, file count and last use, with totals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loader import contract
from loader.config import LoaderSettings

if TYPE_CHECKING:
    from loader.commands.common import SubParsers
    from loader.gc import Inventory
    from loader.log import Logger

NAME = "ls"


def add_parser(sub: SubParsers, settings: LoaderSettings) -> None:
    p = sub.add_parser(NAME, help="list the models in a cache")
    p.add_argument(contract.FLAG_CACHE, required=True, metavar="DIR", help="cache directory")
    p.add_argument(contract.FLAG_OUTPUT, choices=["text", "json"], default="text")


def run(args: argparse.Namespace, settings: LoaderSettings, log: Logger) -> int:
    from loader import gc
    from loader.cache import Cache
    from loader.errors import UsageError

    if not Path(args.cache).is_dir():
        raise UsageError(f"{contract.FLAG_CACHE} {args.cache!r} is not a directory")
    inv = gc.scan(Cache(args.cache))
    if args.output == "json":
        print(json.dumps(as_json(inv)), flush=True)
    else:
        print("\n".join(as_text(inv)), flush=True)
    return 0


def as_json(inv: Inventory) -> dict[str, Any]:
    from loader.gc import iso

    return {
        "models": [
            {"digest": m.digest, "refs": list(m.refs), "former_refs": list(m.former_refs), "path": m.path,
             "bytes": m.bytes, "files": m.files, "last_use": iso(m.last_use)}
            for m in inv.models
        ],
        "totals": {"models": len(inv.models), "bytes": inv.disk_bytes(inv.models),
                   "unreferenced_bytes": inv.unreferenced_bytes()},
    }


def as_text(inv: Inventory) -> list[str]:
    from loader.gc import human, iso

    rows = [("DIGEST", "SIZE", "FILES", "LAST USE", "REFS")]
    for m in inv.models:
        refs = ", ".join(m.refs) if m.refs else "(was " + ", ".join(m.former_refs) + ")" if m.former_refs else "-"
        rows.append((m.digest[:19], human(m.bytes), str(m.files), iso(m.last_use), refs))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}".rstrip()
             for r in rows]
    total = f"{len(inv.models)} models, {human(inv.disk_bytes(inv.models))} on disk (shared blobs counted once)"
    loose = inv.unreferenced_bytes()
    if loose:
        total += f"; {human(loose)} in blobs and downloads no model uses (model-loader gc removes them)"
    return lines + [total]
