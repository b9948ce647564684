"""Pure parsing of OCI references: ``host[:port]/repo[:tag][@sha256:hex]``.

The grammar follows the distribution reference grammar (docker/distribution ``reference``): the first path
component is a registry host when it contains a ``.`` or a ``:`` or is ``localhost``; otherwise the reference is
on Docker Hub. Both the webhook (to validate annotations and build mount paths) and the loader import this
module, so a reference means the same thing on both sides.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"

# Every grammar here is ASCII-only (no \w or \d: they accept other scripts' letters and digits) and is matched
# whole with fullmatch (``$`` matches before a final newline, so ``match`` with ``$`` lets one through).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: The one digest syntax (loader.digest.Digest uses it too): sha256 and 64 lowercase hex, matched whole (``$`` would
#: let a trailing newline through).
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
_HOST_RE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?"
)
_SPACE = " \t\r\n"
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]"}


def _host_of(registry: str) -> str:
    if registry.startswith("["):
        return registry.split("]")[0] + "]"
    return registry.rsplit(":", 1)[0] if ":" in registry else registry


def speaks_plain_http(registry: str, plain_http_registries: Collection[str]) -> bool:
    """Whether the loader speaks plain HTTP to ``registry`` (host[:port]) when not told otherwise: a loopback host
    (as docker and containerd assume), or one of ``plain_http_registries`` (--plain-http-registry,
    MODEL_CACHE_PLAIN_HTTP_REGISTRIES). Hosts compared without case, as DNS does: the loader and the webhook's
    allow-list decide with this one function."""
    r = registry.lower()
    return _host_of(r) in _LOOPBACK_HOSTS or r in {p.lower() for p in plain_http_registries}


def _shown(value: str) -> str:
    """A value for a message: its repr, cut to a readable length (a reference may come from a pod)."""
    return repr(value) if len(value) <= 80 else f"{value[:80]!r}... ({len(value)} characters)"


class ReferenceError(ValueError):
    """A reference string that is not a valid OCI reference. The message names the value and the fix."""


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str  # host[:port] as written (docker.io for Docker Hub)
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        """The host without the port (brackets kept for IPv6)."""
        return _host_of(self.registry)

    @property
    def endpoint_host(self) -> str:
        """Where the registry API lives (Docker Hub's API is not on docker.io itself)."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        """The last path segment of the repository: the default model name in a pod."""
        return self.repository.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def parse(text: str) -> Reference:
    """Parse ``text`` into a Reference, or raise ReferenceError naming what is wrong and how to fix it."""
    raw = text
    text = text.strip(_SPACE)  # ASCII whitespace only: str.strip() also drops Unicode separators and NEL
    if not text:
        raise ReferenceError("empty reference: write host/repository:tag, e.g. registry.example.com/models/phi3:v1")
    if "://" in text:
        raise ReferenceError(
            f"reference {_shown(raw)} has a URL scheme: drop it and write host/repository:tag"
            " (plain HTTP is chosen with --plain-http, or automatically for localhost)"
        )
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not DIGEST_RE.fullmatch(digest):
            raise ReferenceError(
                f"reference {_shown(raw)} has digest {_shown(digest)}: a digest is sha256: followed by 64 lowercase hex digits"
            )
    # A tag is after the last ':' that comes after the last '/' (a ':' before it is a port).
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise ReferenceError(
                f"reference {_shown(raw)} has tag {_shown(tag)}: a tag is up to 128 ASCII letters, digits, '_', '.' or '-'"
                " and does not start with '.' or '-'"
            )
    parts = text.split("/", 1)
    if len(parts) == 2 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost" or parts[0].startswith("[")):
        registry, repository = parts
        if not _HOST_RE.fullmatch(registry):
            raise ReferenceError(f"reference {_shown(raw)} has registry host {_shown(registry)}, which is not a valid host[:port]")
    else:
        registry, repository = DOCKER_HUB, text
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _REPOSITORY_RE.fullmatch(repository):
        raise ReferenceError(
            f"reference {_shown(raw)} has repository {_shown(repository)}: use lowercase letters, digits and separators"
            " ('.', '_', '__', '-') between '/'-separated components"
        )
    if len(f"{registry}/{repository}") > 255:
        raise ReferenceError(f"reference {_shown(raw)} is longer than 255 characters before the tag")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)


_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")


def cache_key(ref: Reference | str) -> str:
    """The one name a reference has in a cache: a readable prefix plus a hash of the canonical form.

    The webhook builds the pod's mount path from this (``refs/<key>`` in the cache volume), and the loader
    publishes there, so both must import this function rather than re-derive it. It is a single path
    component, stable across versions, and distinct for distinct references.
    """
    if isinstance(ref, str):
        ref = parse(ref)
    canonical = str(ref)
    readable = _UNSAFE.sub("_", f"{ref.registry}/{ref.repository}" + (f"_{ref.tag}" if ref.tag else "")).strip("_.")
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return f"{readable[:96]}-{digest}"
