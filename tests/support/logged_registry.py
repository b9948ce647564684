"""A real registry (tests/support/registry.py) with Distribution's access log on, and the blob requests it served.

Counting downloads at the registry itself, not in the client under test: each line of the access log is one
request the registry answered (status and bytes written), so "one download" is checked where bytes leave.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.registry import RegistryProcess, free_port

_LINE = re.compile(r'"GET /v2/(?P<repo>[^ ]+)/blobs/(?P<digest>sha256:[0-9a-f]{64}) HTTP/[0-9.]+" (?P<status>\d{3})'
                   r" (?P<bytes>\d+)")


@dataclass(frozen=True)
class BlobGet:
    repo: str
    digest: str
    status: int
    bytes: int


class LoggedRegistry(RegistryProcess):
    def config_text(self) -> str:
        text = super().config_text()
        assert "accesslog: {disabled: true}" in text, "registry.py's config layout changed: update LoggedRegistry"
        return text.replace("accesslog: {disabled: true}", "accesslog: {disabled: false}")

    def blob_gets(self, settle: float = 0.2) -> list[BlobGet]:
        """Every blob GET answered so far (the log is written as each request ends; ``settle`` lets the last
        lines reach the file)."""
        time.sleep(settle)
        assert self.log is not None
        return [BlobGet(m["repo"], m["digest"], int(m["status"]), int(m["bytes"]))
                for m in _LINE.finditer(self.log.read_text(errors="replace"))]


def start_logged_registry() -> LoggedRegistry:
    root = Path(tempfile.mkdtemp(prefix="mc-logged-registry-")) / "data"
    root.mkdir(parents=True)
    reg = LoggedRegistry(root=root, port=free_port(), _owned_root=True)
    reg.start()
    return reg
