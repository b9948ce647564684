"""OCI values parsed once, where they enter: media types, descriptors, image manifests and indexes.

Pure: bytes or JSON in, frozen values out, or an :class:`~loader.errors.ArtifactError` (exit 8) naming the field,
the value and where it came from. Everything downstream (the copy engine, the cache, the layout) takes these
values and never looks at raw manifest JSON again, so a rule (sha256 only, sizes non-negative and bounded, index
children named by digest) is written once here instead of once per command.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loader.digest import Digest
from loader.errors import ArtifactError

# ---- media types (the only place they are spelled) ------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the distribution spec's recommended limit
MAX_BLOB_SIZE = 1 << 50  # 1 PiB: a larger size is a lie, not a model
MAX_LAYERS = 10_000  # per manifest (or index): bounds what one manifest can make us plan and open
MAX_INDEX_DEPTH = 4  # nested indexes


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what to fetch (digest), how much (size) and what it is (media type, annotations)."""

    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, Any] | None = None

    @classmethod
    def parse(cls, obj: object, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ArtifactError(f"{where}: a descriptor must be a JSON object, got {_short(obj)}")
        digest = Digest.parse(obj.get("digest"), f"{where} (field 'digest')")
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB_SIZE:
            raise ArtifactError(f"{where}: descriptor {digest} has size {_short(size)}; a size is an integer"
                                f" from 0 to {MAX_BLOB_SIZE}")
        mt = obj.get("mediaType", "")
        if not isinstance(mt, str):
            raise ArtifactError(f"{where}: descriptor {digest} has mediaType {_short(mt)}, not a string")
        ann = obj.get("annotations") or {}
        if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
            raise ArtifactError(f"{where}: descriptor {digest} has annotations that are not a string map")
        plat = obj.get("platform")
        if plat is not None and not isinstance(plat, dict):
            raise ArtifactError(f"{where}: descriptor {digest} has a platform that is not an object")
        return cls(mt, digest, size, dict(ann), plat)

    def as_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform is not None:
            d["platform"] = dict(self.platform)
        return d


@dataclass(frozen=True)
class ImageManifest:
    digest: Digest
    media_type: str
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    raw: Mapping[str, Any]  # the parsed JSON, kept for the cache's meta file

    def blobs(self) -> tuple[Descriptor, ...]:
        """Config first, then layers: every blob the manifest references."""
        return ((self.config,) if self.config is not None else ()) + self.layers


@dataclass(frozen=True)
class ImageIndex:
    digest: Digest
    media_type: str
    manifests: tuple[Descriptor, ...]
    raw: Mapping[str, Any]


Manifest = ImageManifest | ImageIndex


def load_json(data: bytes, where: str, limit: int = MAX_MANIFEST_BYTES) -> dict[str, Any]:
    """A JSON object of at most ``limit`` bytes from outside (a manifest, a signature's payload or index), or
    ArtifactError naming ``where``."""
    if len(data) > limit:
        raise ArtifactError(f"{where} is {len(data)} bytes, over the {limit} byte limit")
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ArtifactError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where} is not a JSON object")
    return obj


def parse_manifest(data: bytes, digest: Digest, header_media_type: str, where: str) -> Manifest:
    """Manifest bytes, already verified against ``digest``, as an ImageManifest or an ImageIndex."""
    obj = load_json(data, f"{where}: manifest {digest}")
    mt = obj.get("mediaType") or header_media_type or OCI_MANIFEST
    if not isinstance(mt, str):
        raise ArtifactError(f"{where}: manifest {digest} has mediaType {_short(mt)}, not a string")
    if mt in INDEX_TYPES or ("manifests" in obj and "layers" not in obj):
        children = obj.get("manifests")
        if not isinstance(children, list):
            raise ArtifactError(f"{where}: index {digest} has no manifests list")
        if len(children) > MAX_LAYERS:
            raise ArtifactError(f"{where}: index {digest} lists {len(children)} manifests, over {MAX_LAYERS}")
        descs = tuple(Descriptor.parse(c, f"{where}: index {digest} entry {i}") for i, c in enumerate(children))
        return ImageIndex(digest, mt, descs, obj)
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise ArtifactError(f"{where}: manifest {digest} has no layers list; is it a config-only artifact?")
    if len(layers) > MAX_LAYERS:
        raise ArtifactError(f"{where}: manifest {digest} has {len(layers)} layers, over {MAX_LAYERS}")
    cfg = obj.get("config")
    config = Descriptor.parse(cfg, f"{where}: manifest {digest} config") if cfg is not None else None
    descs = tuple(Descriptor.parse(layer, f"{where}: manifest {digest} layer {i}") for i, layer in enumerate(layers))
    return ImageManifest(digest, mt, config, descs, obj)


def closure(data: bytes, root: Manifest, child: Callable[[Descriptor], tuple[bytes, Manifest]],
            where: str) -> tuple[list[tuple[Digest, str, bytes]], dict[Digest, int]]:
    """Every manifest under ``root`` (children before their parents, each once) and every blob they reference
    (``{digest: size}``). ``child(descriptor)`` fetches an index's child, verified against its digest: the walk
    itself is pure, whatever the store. Nesting deeper than MAX_INDEX_DEPTH is refused."""
    manifests: list[tuple[Digest, str, bytes]] = []
    blobs: dict[Digest, int] = {}
    seen: set[Digest] = set()

    def visit(data: bytes, m: Manifest, depth: int) -> None:
        if depth > MAX_INDEX_DEPTH:
            raise ArtifactError(f"{where}: indexes nested deeper than {MAX_INDEX_DEPTH}")
        if m.digest in seen:
            return
        seen.add(m.digest)
        if isinstance(m, ImageIndex):
            for d in m.manifests:
                child_data, child_m = child(d)
                visit(child_data, child_m, depth + 1)
        else:
            for d in m.blobs():
                blobs.setdefault(d.digest, d.size)
        manifests.append((m.digest, m.media_type, data))

    visit(data, root, 0)
    return manifests, blobs


def node_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def pick_manifest(index: ImageIndex, where: str) -> Descriptor:
    """The manifest of an index to use: a model artifact has no platform, else this node's platform, else the
    first. Children are named by digest (parsed), so a pinned index always gives the same tree."""
    if not index.manifests:
        raise ArtifactError(f"{where}: image index {index.digest} lists no manifests")
    for m in index.manifests:
        if not m.platform:
            return m
    arch = node_arch()
    for m in index.manifests:
        p = m.platform or {}
        if p.get("os") == "linux" and p.get("architecture") == arch:
            return m
    return index.manifests[0]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."
