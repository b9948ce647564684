"""One small record per published volume, on disk: what an agent restarted since the publish needs to unpublish it.

NodeUnpublishVolume carries only the volume id and the target path; which pod the volume belonged to (whose pin
goes with its last volume) and which model it showed are in the record, written before the bind mount is made
and removed after it is gone. The mount itself is the kernel's (mounts.py reads it back), so the pair survives
a restart of the agent. Records hold no secret. Each is ``<state dir>/<sha256(volume id)>.json``, written to a
temporary name and renamed, so a crash leaves the old record or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from loader.fsutil import fsync_dir, write_atomic

MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Record:
    volume_id: str
    target: str
    ref: str
    digest: str
    pod_uid: str
    pod: str  # namespace/name, for logs


def parse_record(data: bytes) -> Record | None:
    """Pure: a record file's bytes, or None when they are not one model-loader wrote."""
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    names = [f for f in Record.__dataclass_fields__]
    if set(obj) != set(names) or not all(isinstance(obj[n], str) and obj[n] for n in names):
        return None
    return Record(**obj)


class Volumes:
    def __init__(self, state_dir: str | os.PathLike[str]):
        self.root = Path(state_dir)

    def ensure(self) -> Volumes:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self

    def _path(self, volume_id: str) -> Path:
        return self.root / f"{hashlib.sha256(volume_id.encode()).hexdigest()}.json"

    def get(self, volume_id: str) -> Record | None:
        rec = self._read(self._path(volume_id))
        return rec if rec is not None and rec.volume_id == volume_id else None

    def put(self, rec: Record) -> None:
        write_atomic(self._path(rec.volume_id), json.dumps(asdict(rec), sort_keys=True).encode(), self.root, 0o600)
        fsync_dir(self.root)

    def remove(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(volume_id))
        fsync_dir(self.root)

    def all(self) -> list[Record]:
        out = []
        for name in sorted(os.listdir(self.root)):
            if name.endswith(".json") and not name.startswith("."):
                rec = self._read(self.root / name)
                if rec is not None:
                    out.append(rec)
        return out

    def of_pod(self, pod_uid: str) -> list[Record]:
        return [r for r in self.all() if r.pod_uid == pod_uid]

    def _read(self, path: Path) -> Record | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            return parse_record(f.read(MAX_RECORD_BYTES + 1))


