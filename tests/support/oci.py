"""A raw OCI pusher for tests: builds exactly the manifests a test needs (custom media types, indexes, tar
layers, hostile names) and pushes them with plain HTTP requests, independent of the code under test."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field

import requests
import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"
UNPACK = "io.deis.oras.content.unpack"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Layer:
    data: bytes
    media_type: str = "application/octet-stream"
    annotations: dict = field(default_factory=dict)

    def descriptor(self) -> dict:
        d = {"mediaType": self.media_type, "digest": sha256(self.data), "size": len(self.data)}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


def file_layer(name: str, data: bytes, media_type: str = "application/octet-stream", key: str = TITLE) -> Layer:
    return Layer(data, media_type, {key: name})


def tar_bytes(entries: dict[str, bytes | None], compress: str | None = None, extra=None) -> bytes:
    """entries: path -> bytes (a file) or None (a directory). extra: callable(tarfile) to add hostile members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(data))
        if extra:
            extra(tf)
    raw = buf.getvalue()
    if compress == "gzip":
        return gzip.compress(raw, mtime=0)
    if compress == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


class Pusher:
    def __init__(self, base_url: str, auth: tuple[str, str] | None = None, session: requests.Session | None = None):
        self.base = base_url.rstrip("/")
        self.s = session or requests.Session()
        if auth:
            self.s.auth = auth

    def upload(self, repo: str, digest: str, body, size: int | None = None) -> None:
        """A monolithic upload (POST, then PUT with the digest); ``body`` bytes or a file object streamed with
        ``size`` as its Content-Length."""
        r = self.s.post(f"{self.base}/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.base + loc
        sep = "&" if "?" in loc else "?"
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        r = self.s.put(f"{loc}{sep}digest={digest}", data=body, headers=headers)
        if r.status_code != 201:
            raise RuntimeError(f"blob upload {digest} answered {r.status_code}: {r.text[:300]}")

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        if self.s.head(f"{self.base}/v2/{repo}/blobs/{digest}").status_code != 200:
            self.upload(repo, digest, data)
        return digest

    def push_manifest(self, repo: str, ref: str, manifest: dict, media_type: str | None = None) -> str:
        body = json.dumps(manifest, separators=(",", ":")).encode()
        mt = media_type or manifest.get("mediaType", OCI_MANIFEST)
        r = self.s.put(f"{self.base}/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": mt})
        if r.status_code >= 300:
            raise RuntimeError(f"manifest push failed {r.status_code}: {r.text}")
        return sha256(body)

    def push_artifact(
        self,
        repo: str,
        tag: str,
        layers: list[Layer],
        artifact_type: str | None = "application/vnd.example.model.v1",
        config: bytes = b"{}",
        config_media_type: str = EMPTY_CONFIG,
        annotations: dict | None = None,
    ) -> str:
        for layer in layers:
            self.push_blob(repo, layer.data)
        cfg_digest = self.push_blob(repo, config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_media_type, "digest": cfg_digest, "size": len(config)},
            "layers": [layer.descriptor() for layer in layers],
        }
        if artifact_type:
            manifest["artifactType"] = artifact_type
        if annotations:
            manifest["annotations"] = annotations
        return self.push_manifest(repo, tag, manifest)

    def push_index(self, repo: str, tag: str, manifests: list[tuple[str, int, dict | None]]) -> str:
        """manifests: (digest, size, platform or None)."""
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d, "size": n, **({"platform": p} if p else {})}
                for d, n, p in manifests
            ],
        }
        return self.push_manifest(repo, tag, index)

    def manifest_bytes(self, repo: str, ref: str) -> bytes:
        r = self.s.get(
            f"{self.base}/v2/{repo}/manifests/{ref}", headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}
        )
        r.raise_for_status()
        return r.content
