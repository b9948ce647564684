"""Loader settings, read once at start-up from the environment (prefix ``MODEL_LOADER_``); flags override them.

This is the only place the loader reads the environment. ``DOCKER_CONFIG`` keeps its docker-wide name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LoaderSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODEL_LOADER_", extra="ignore")

    concurrency: int = Field(8, ge=1, le=64, description="parallel downloads (blobs and ranges)")
    timeout: float = Field(30.0, gt=0, description="seconds a connection may stall before it is retried")
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    progress_interval: float = Field(5.0, gt=0, description="seconds between progress lines in a pod log")
    termination_log: str = "/dev/termination-log"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    docker_config: str | None = Field(None, validation_alias="DOCKER_CONFIG")
    home: str | None = Field(None, validation_alias="HOME")
