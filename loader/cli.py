"""``model-loader``: the command line. Parses flags, reads settings once, runs the command, maps errors to exit
codes (loader.contract.ExitCode) with one clear message each."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from loader import contract
from loader.config import LoaderSettings, SettingsError
from loader.errors import LoaderError, UsageError
from loader.log import Logger


def build_parser(settings: LoaderSettings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=contract.PROGRAM, description="Pull OCI model artifacts into a shared cache.")
    sub = p.add_subparsers(dest="command", required=True)
    pull = sub.add_parser(contract.PULL, help="pull models into the cache (parallel, verified, resumable)")
    pull.add_argument("refs", nargs="+", metavar="REF", help="host[:port]/repo[:tag][@sha256:...]")
    pull.add_argument(contract.FLAG_CACHE, required=True, metavar="DIR", help="cache directory (shared by pods)")
    pull.add_argument(contract.FLAG_CONCURRENCY, type=int, default=settings.concurrency, metavar="N",
                      help=f"parallel downloads (default {settings.concurrency})")
    pull.add_argument(contract.FLAG_PLAIN_HTTP, action="store_true", default=None,
                      help="use plain HTTP (default only for localhost/127.0.0.1 registries)")
    pull.add_argument(contract.FLAG_INSECURE, action="store_true", help="do not verify the registry's TLS certificate")
    pull.add_argument(contract.FLAG_DOCKER_CONFIG, action="append", default=[], metavar="PATH",
                      help="docker config file or directory (repeatable; default $DOCKER_CONFIG or ~/.docker)")
    pull.add_argument(contract.FLAG_MIRROR, action="append", default=[], metavar="HOST=URL",
                      help="try URL first for registry HOST, then the registry itself (repeatable)")
    pull.add_argument(contract.FLAG_OFFLINE, action="store_true", help="never touch the network; use the cache only")
    pull.add_argument(contract.FLAG_OUTPUT, choices=["text", "json"], default="text")
    pull.add_argument("--timeout", type=float, default=settings.timeout, metavar="SECONDS",
                      help=f"stall timeout per connection (default {settings.timeout:g})")
    pull.add_argument("--progress", choices=["auto", "bar", "log", "none"], default=settings.progress)
    return p


def parse_mirrors(values: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in values:
        host, sep, url = v.partition("=")
        if not sep or not host or not url:
            raise UsageError(f"{contract.FLAG_MIRROR} {v!r} is not HOST=URL, e.g. registry.example.com=http://127.0.0.1:30020")
        out.setdefault(host.strip(), []).append(url.strip())
    return out


def _load_credentials(paths: list[str], settings: LoaderSettings):
    from loader import credentials

    env = {k: v for k, v in (("DOCKER_CONFIG", settings.docker_config), ("HOME", settings.home),
                             ("PATH", settings.path)) if v}
    try:
        return credentials.load_docker_configs(paths or None, env)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def cmd_pull(args, settings: LoaderSettings, log: Logger) -> int:
    from loader.pull import PullOptions, pull

    if args.concurrency < 1:
        raise UsageError(f"{contract.FLAG_CONCURRENCY} {args.concurrency} must be at least 1")
    opts = PullOptions(
        cache=Path(args.cache),
        concurrency=args.concurrency,
        plain_http=args.plain_http,
        insecure=args.insecure_skip_tls_verify,
        credentials=None if args.offline else _load_credentials(args.docker_config, settings),
        mirrors=parse_mirrors(args.mirror),
        offline=args.offline,
        timeout=args.timeout,
        progress=args.progress,
        progress_interval=settings.progress_interval,
    )
    results = []
    for ref in args.refs:
        res = pull(ref, opts, log)
        results.append(res)
        if args.output == "json":
            print(json.dumps(res.as_json()), flush=True)
        else:
            kind = "cache hit" if res.cache_hit else f"pulled {res.bytes / 1e6:.1f} MB in {res.seconds:.2f}s"
            print(f"{res.ref} -> {res.path} ({res.files} files, {kind})", flush=True)
        for w in res.warnings:
            print(f"warning: {w}", file=sys.stderr)
    _termination_summary(settings.termination_log, results)
    return 0


def _termination_summary(path: str, results) -> None:
    """kubectl shows this in the pod status (terminationMessagePath); only when running where the file exists."""
    if not path or not os.path.exists(path):
        return
    parts = [f"{r.ref}@{r.digest[:19]} {'hit' if r.cache_hit else 'pulled'} {r.bytes / 1e6:.0f}MB {r.files} files"
             f" {r.seconds:.1f}s" for r in results]
    try:
        with open(path, "w") as f:
            f.write(("loaded " + "; ".join(parts))[:4000] + "\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    try:
        settings = LoaderSettings.from_env()
    except SettingsError as exc:
        print(f"model-loader: invalid setting: {exc}", file=sys.stderr)
        return contract.ExitCode.USAGE
    log = Logger(level=settings.log_level)
    args = build_parser(settings).parse_args(argv)
    try:
        if args.command == contract.PULL:
            return cmd_pull(args, settings, log)
    except LoaderError as exc:
        log.error("failed", command=args.command, exit_code=int(exc.exit_code), error=str(exc))
        _termination_failure(settings.termination_log, exc)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    return contract.ExitCode.USAGE


def _termination_failure(path: str, exc: LoaderError) -> None:
    if path and os.path.exists(path):
        try:
            with open(path, "w") as f:
                f.write(f"{type(exc).__name__}: {exc}"[:4000] + "\n")
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
