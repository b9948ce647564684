"""Crafting OCI image layout tarballs in tests: read an exported bundle whole (small test models only), change
its index.json and blobs, write it back as a plain tar, the way a hostile or broken bundle would arrive."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any


def read(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(index.json, {digest: bytes}) of a bundle."""
    with tarfile.open(path) as tf:
        index = json.loads(tf.extractfile("index.json").read())  # type: ignore[union-attr]
        blobs = {"sha256:" + m.name.rsplit("/", 1)[1]: tf.extractfile(m).read()  # type: ignore[union-attr]
                 for m in tf.getmembers() if m.isfile() and m.name.startswith("blobs/sha256/")}
    return index, blobs


def write(path: Path, index: dict[str, Any], blobs: dict[str, bytes]) -> None:
    """A bundle as export lays it out: oci-layout, index.json, then every blob under blobs/sha256/<hex>."""

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add(tf, "index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(tf, f"blobs/sha256/{digest.split(':')[1]}", data)


def blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data
