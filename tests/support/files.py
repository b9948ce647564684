"""Model trees on disk as the tests compare them: build one from a dict, read one back into a dict, and snapshot a
whole cache (or a sentinel directory) to assert that nothing changed."""

from __future__ import annotations

import hashlib
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


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under root as (mode, size, sha256 of the content or 'link:<target>' or 'dir'). Lock files are
    left out: they are empty and made on demand, and a refused pull may leave one."""
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if rel.startswith("locks" + os.sep):
                continue
            st = os.lstat(p)
            if os.path.islink(p):
                what = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                what = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            else:
                what = "dir"
            out[rel] = (st.st_mode, st.st_size if what != "dir" else 0, what)
    return out
