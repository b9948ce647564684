"""Loader settings, read once at start-up from the environment (prefix ``MODEL_LOADER_``); flags override them.

This is the only place the loader reads the environment. ``DOCKER_CONFIG``, ``HOME`` and ``PATH`` keep their usual names.

Why not pydantic-settings, as the webhook uses: importing it costs ~200 ms on a 2-core node, and the loader's
warm start (a pod whose model is already cached) must finish in well under half a second including interpreter
start. The handful of typed fields below are validated here with the same strictness: a bad value stops the
loader before it touches the cache, with a message naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from loader import contract

PREFIX = "MODEL_LOADER_"
_CHOICES = {
    "progress": ("auto", "bar", "log", "none"),
    "log_level": ("debug", "info", "warning", "error"),
}
_RANGES = {"concurrency": (1, contract.MAX_CONCURRENCY), "timeout": (0.001, 3600.0),
           "progress_interval": (0.01, 3600.0)}
#: Where a failed command leaves its one-line reason: kubelet's default terminationMessagePath, which the pod
#: status shows. The loader alone writes it (the webhook leaves the containers' default), so it is not in contract.
TERMINATION_LOG = "/dev/termination-log"


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class LoaderSettings:
    concurrency: int = 8  # parallel downloads (blobs and ranges)
    timeout: float = 30.0  # seconds a connection may stall before it is retried
    progress: str = "auto"  # bar on a terminal, periodic log lines otherwise
    progress_interval: float = 5.0  # seconds between progress lines in a pod log
    termination_log: str = TERMINATION_LOG
    log_level: str = "info"
    docker_config: str | None = None  # from DOCKER_CONFIG
    home: str | None = None  # from HOME
    path: str | None = None  # from PATH: where docker-credential-* helpers are found
    # The in-cluster API server, for `prefetch --untaint` (kubelet sets these two in every pod).
    kubernetes_service_host: str | None = None  # from KUBERNETES_SERVICE_HOST
    kubernetes_service_port: str | None = None  # from KUBERNETES_SERVICE_PORT
    kube_token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # re-read per request (rotates)
    kube_ca_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LoaderSettings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("docker_config", "home", "path", "kubernetes_service_host", "kubernetes_service_port"):
                values[f.name] = env.get(f.name.upper()) or None
                continue
            key = PREFIX + f.name.upper()
            if key not in env:
                continue
            raw = env[key].strip()
            kind: type[Any] = type(f.default)
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{key}={raw!r} is not a valid {kind.__name__}") from None
            if f.name in _CHOICES and value not in _CHOICES[f.name]:
                raise SettingsError(f"{key}={raw!r} must be one of {', '.join(_CHOICES[f.name])}")
            if f.name in _RANGES:
                lo, hi = _RANGES[f.name]
                if not lo <= value <= hi:
                    raise SettingsError(f"{key}={raw!r} must be between {lo:g} and {hi:g}")
            values[f.name] = value
        return cls(**values)
