"""Flags and helpers shared by the subcommands that talk to a registry (pull, push, prefetch, export, import)."""

from __future__ import annotations

from loader import contract
from loader.config import LoaderSettings
from loader.errors import UsageError


def add_registry_flags(p, settings: LoaderSettings) -> None:
    p.add_argument(contract.FLAG_CONCURRENCY, type=int, default=settings.concurrency, metavar="N",
                   help=f"parallel transfers (default {settings.concurrency})")
    p.add_argument(contract.FLAG_PLAIN_HTTP, action="store_true", default=None,
                   help="use plain HTTP (default only for localhost/127.0.0.1 registries)")
    p.add_argument(contract.FLAG_INSECURE, action="store_true", help="do not verify the registry's TLS certificate")
    p.add_argument(contract.FLAG_DOCKER_CONFIG, action="append", default=[], metavar="PATH",
                   help="docker config file or directory (repeatable; default $DOCKER_CONFIG or ~/.docker)")
    p.add_argument("--timeout", type=float, default=settings.timeout, metavar="SECONDS",
                   help=f"stall timeout per connection (default {settings.timeout:g})")


def check_concurrency(n: int) -> None:
    if n < 1:
        raise UsageError(f"{contract.FLAG_CONCURRENCY} {n} must be at least 1")


def parse_mirrors(values: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in values:
        host, sep, url = v.partition("=")
        if not sep or not host or not url:
            raise UsageError(f"{contract.FLAG_MIRROR} {v!r} is not HOST=URL, e.g. registry.example.com=http://127.0.0.1:30020")
        out.setdefault(host.strip(), []).append(url.strip())
    return out


def load_credentials(paths: list[str], settings: LoaderSettings):
    from loader import credentials

    env = {k: v for k, v in (("DOCKER_CONFIG", settings.docker_config), ("HOME", settings.home),
                             ("PATH", settings.path)) if v}
    try:
        return credentials.load_docker_configs(paths or None, env)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
