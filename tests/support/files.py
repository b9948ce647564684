"""Model trees on disk as the tests compare them: build one from a dict, read one back into a dict."""

from __future__ import annotations

import os
from pathlib import Path


def tree(path: str | Path) -> dict[str, bytes | str]:
    """Every entry under path: files -> bytes, symlinks -> 'link:<target>', empty dirs -> 'dir'."""
    out: dict[str, bytes | str] = {}
    root = Path(path)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = f"link:{os.readlink(p)}" if p.is_symlink() else p.read_bytes()
        if not dirnames and not filenames and Path(dirpath) != root:
            out[str(Path(dirpath).relative_to(root))] = "dir"
    return out


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (relative path -> bytes) under root; returns root."""
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root
