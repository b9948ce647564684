"""Start Debian's CNCF Distribution registry (`/usr/bin/docker-registry`) on 127.0.0.1 with a random port.

Real registry, real HTTP: nothing here mocks the registry. Used by the pytest fixtures and by the demo and
benchmarks, which is why it lives outside conftest.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RegistryProcess:
    root: Path
    port: int
    proc: subprocess.Popen | None = None
    extra_config: str = ""
    log: Path | None = None
    _owned_root: bool = field(default=False, repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def config_text(self) -> str:
        return (
            "version: 0.1\n"
            "log: {level: error, accesslog: {disabled: true}}\n"
            "storage:\n"
            f"  filesystem: {{rootdirectory: {self.root}}}\n"
            "  delete: {enabled: true}\n"
            "  maintenance: {uploadpurging: {enabled: false}}\n"
            f"http: {{addr: 127.0.0.1:{self.port}}}\n" + self.extra_config
        )

    def start(self, timeout: float = 20.0) -> RegistryProcess:
        if not os.path.exists(REGISTRY_BIN):
            raise RuntimeError(f"{REGISTRY_BIN} is missing: run `make setup` (apt-get install -y docker-registry)")
        cfg = self.root.parent / f"registry-{self.port}.yml"
        cfg.write_text(self.config_text())
        self.log = self.root.parent / f"registry-{self.port}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as e:  # 401 when auth is configured: it is up
                if e.code == 401:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("registry did not become ready in time")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._owned_root:
            shutil.rmtree(self.root.parent, ignore_errors=True)


def start_registry(root: Path | None = None, port: int | None = None, extra_config: str = "") -> RegistryProcess:
    owned = root is None
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="mc-registry-")) / "data"
    root.mkdir(parents=True, exist_ok=True)
    reg = RegistryProcess(root=root, port=port or free_port(), extra_config=extra_config, _owned_root=owned)
    return reg.start()
