"""``model-loader csi``: the CSI node plugin (loader/csi/server.py) on a unix socket, until SIGTERM."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from loader import contract
from loader.commands.common import SubParsers, check_concurrency, parse_mirrors, registry_settings
from loader.config import LoaderSettings
from loader.errors import UsageError

if TYPE_CHECKING:
    from loader.log import Logger

NAME = "csi"


def add_parser(sub: SubParsers, settings: LoaderSettings) -> None:
    p = sub.add_parser(NAME, help="serve inline CSI volumes (driver model.cache) from the node cache")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="unix socket to serve on (kubelet's plugins/model.cache/csi.sock)")
    p.add_argument(contract.FLAG_CACHE, required=True, metavar="DIR", help="the node cache directory")
    p.add_argument(contract.FLAG_NODE_NAME, required=True, metavar="NODE", help="this node's name (spec.nodeName)")
    p.add_argument("--pods-dir", default="/var/lib/kubelet/pods", metavar="DIR",
                   help="kubelet's pods directory: every target path must lie under it (default %(default)s)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where volume records persist across restarts (default: volumes/ beside the socket)")
    p.add_argument(contract.FLAG_CONCURRENCY, type=int, default=settings.concurrency, metavar="N",
                   help=f"parallel transfers per pull (default {settings.concurrency})")
    p.add_argument(contract.FLAG_CA_FILE, action="append", default=[], metavar="PEM",
                   help="also trust these CA certificates for registries (repeatable)")
    p.add_argument(contract.FLAG_PLAIN_HTTP_REGISTRY, action="append", default=[], metavar="HOST[:PORT]",
                   help="speak plain HTTP to this registry (repeatable; localhost and 127.0.0.1 always are)")
    p.add_argument(contract.FLAG_MIRROR, action="append", default=[], metavar="HOST=URL",
                   help="try URL first for registry HOST (repeatable)")
    p.add_argument("--timeout", type=float, default=settings.timeout, metavar="SECONDS",
                   help=f"stall timeout per registry connection (default {settings.timeout:g})")


def run(args: argparse.Namespace, settings: LoaderSettings, log: Logger) -> int:
    from loader.csi.server import serve
    from loader.pull import PullOptions

    check_concurrency(args.concurrency)
    ca_files, plain_hosts = registry_settings(args)
    opts = PullOptions(cache=Path(args.cache), concurrency=args.concurrency, ca_files=ca_files,
                       plain_http_registries=plain_hosts, mirrors=parse_mirrors(args.mirror), timeout=args.timeout)
    try:
        running = serve(args.socket, args.cache, args.node_name, args.pods_dir, state_dir=args.state_dir,
                        pull_options=opts, log=log)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("csi.stopping", signal=signal.Signals(signum).name)
        running.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    running.wait()
    return 0
