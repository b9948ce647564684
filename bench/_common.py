"""Shared benchmark plumbing: a scratch directory that is always removed, a synthetic model generated and pushed by
streaming from disk (never whole in memory), and a child-process runner that measures wall time and the child's
own peak RSS (os.wait4: per-child rusage, so one contender's memory never leaks into another's figure)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import oci  # the bench runs with the repository root on sys.path (bench/pull.py)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
ARTIFACT_TYPE = "application/vnd.example.model.v1"
LAYER_TYPE = "application/octet-stream"
TITLE = "org.opencontainers.image.title"
EMPTY_JSON = b"{}"

CHUNK = 4 << 20  # generation and hashing block: large enough that os.urandom/hashlib run at full speed


def scratch_dir(base: Path) -> Path:
    """A fresh directory under `base` (same disk as the repo by default; `.bench/` is gitignored)."""
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="pull-", dir=base))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def compile_loader() -> None:
    """Byte-compiles the loader's own modules before anything is timed, as its image does (pip compiles the wheel
    at install). A working tree otherwise starts every run by compiling them from source: the checkout's .pyc go
    stale with each edit, and a machine with PYTHONDONTWRITEBYTECODE=1 (this one) never rewrites them, which
    cost the loader ~55 ms per start here (0.20 -> 0.145 s for a 5 MB pull) that no peer pays (oras-py, the
    floor and the tools run from compiled site-packages or native code). py_compile writes regardless of that
    variable; the .pyc check their sources' mtimes, so an edit between runs is still picked up."""
    import compileall

    root = Path(__file__).resolve().parent.parent
    if not compileall.compile_dir(str(root / "loader"), quiet=1):
        raise RuntimeError(f"{root / 'loader'} does not compile")


def install_interrupt_handlers() -> None:
    """SIGINT and SIGTERM both unwind as KeyboardInterrupt, so every `finally` (registry stop, temp dir removal)
    runs. SIGINT is set explicitly because a shell starts background jobs with it ignored."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# --- the synthetic model -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Blob:
    name: str  # file name (the title annotation)
    path: Path  # where it sits on disk before the push
    digest: str
    size: int

    def descriptor(self) -> dict:
        return {"mediaType": LAYER_TYPE, "digest": self.digest, "size": self.size, "annotations": {TITLE: self.name}}


def _write_random(path: Path, size: int) -> Blob:
    h = hashlib.sha256()
    left = size
    with open(path, "wb") as f:
        while left:
            chunk = os.urandom(min(CHUNK, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return Blob(path.name, path, "sha256:" + h.hexdigest(), size)


def _write_bytes(path: Path, data: bytes) -> Blob:
    path.write_bytes(data)
    return Blob(path.name, path, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def small_files(seed_dir: Path) -> list[Blob]:
    """The config files a Hugging Face style model carries; tokenizer.json is about 1 MB as real ones are."""
    config = {"architectures": ["BenchForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
              "vocab_size": 32000, "torch_dtype": "bfloat16"}
    vocab = {f"tok{i:05d}_{os.urandom(4).hex()}": i for i in range(32000)}
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab}}
    generation = {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.7, "top_p": 0.9}
    return [
        _write_bytes(seed_dir / "config.json", json.dumps(config, indent=2).encode()),
        _write_bytes(seed_dir / "tokenizer.json", json.dumps(tokenizer).encode()),
        _write_bytes(seed_dir / "generation_config.json", json.dumps(generation, indent=2).encode()),
    ]


def generate_model(seed_dir: Path, size_mib: int, files: int) -> list[Blob]:
    """Small config files first, then `files` random weight shards summing to `size_mib` MiB."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    total = size_mib << 20
    sizes = [total // files + (1 if i < total % files else 0) for i in range(files)]
    blobs = small_files(seed_dir)
    for i, size in enumerate(sizes, 1):
        blobs.append(_write_random(seed_dir / f"model-{i:05d}-of-{files:05d}.safetensors", size))
    return blobs


def manifest_for(layers: list[Blob]) -> bytes:
    """The shape `oras push --artifact-type ... file...` makes, so every peer can pull it."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_CONFIG, "digest": "sha256:" + hashlib.sha256(EMPTY_JSON).hexdigest(),
                   "size": len(EMPTY_JSON), "data": "e30="},
        "layers": [b.descriptor() for b in layers],
        "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
    }
    return json.dumps(manifest, indent=2).encode()


class Pusher(oci.Pusher):
    """The tests' pusher, with the model's files streamed from disk (a file object with its Content-Length)."""

    def push(self, repo: str, tag: str, layers: list[Blob]) -> str:
        """Pushes the empty config, every layer and the manifest; returns the manifest digest."""
        self.upload(repo, "sha256:" + hashlib.sha256(EMPTY_JSON).hexdigest(), EMPTY_JSON, len(EMPTY_JSON))
        for b in layers:
            with open(b.path, "rb") as f:
                self.upload(repo, b.digest, f, b.size)
        body = manifest_for(layers)
        r = self.s.put(f"{self.base}/v2/{repo}/manifests/{tag}", data=body, headers={"Content-Type": OCI_MANIFEST})
        if r.status_code != 201:
            raise RuntimeError(f"manifest push answered {r.status_code}: {r.text[:300]}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if r.headers.get("Docker-Content-Digest", digest) != digest:
            raise RuntimeError(f"registry digest {r.headers['Docker-Content-Digest']} != {digest}")
        return digest


# --- measuring a child process ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_kib: int  # the child's own peak RSS and that of the descendants it reaped (KiB on Linux)
    cpu_seconds: float  # user + system time of the child and the descendants it reaped
    returncode: int
    stdout: str
    stderr: str

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_kib * 1024 / 1e6


GNU_TIME = "/usr/bin/time"


def run_measured(argv: list[str], cwd: Path | None = None, env: dict | None = None) -> Run:
    """Wall time from spawn to reap, interpreter start included; stdout/stderr go to files so a full pipe can
    never stall the child while we sit in wait4.

    Peak RSS comes from GNU time (`%M`, its child's ru_maxrss from wait4) when it is installed. Our own wait4 is
    only the fallback: a child spawned straight from this interpreter starts life with our memory as its
    high-water mark (Python spawns with vfork, and exec keeps the old mm's peak), so it never reads below the
    benchmark's own RSS (about 45 MB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(prefix="rss-") as rss_file:
        timed = os.access(GNU_TIME, os.X_OK)
        cmd = [GNU_TIME, "-f", "%M %U %S", "-o", rss_file.name, *argv] if timed else argv
        t0 = time.perf_counter()
        # Own process group: on interrupt the whole pipeline (GNU time, bash, every curl) goes, not just the top.
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        reaped = False
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            reaped = True
        finally:
            if not reaped:  # interrupted: do not leave it running
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; Popen must not wait again
        rss_kib, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
        if timed:
            # GNU time writes "Command exited with non-zero status N" on a line before the figures on failure.
            last = Path(rss_file.name).read_text().strip().splitlines()[-1:]
            fields = last[0].split() if last else []
            if len(fields) == 3 and fields[0].isdigit():
                rss_kib = int(fields[0])
        out.seek(0)
        err.seek(0)
        return Run(seconds, rss_kib, cpu, proc.returncode, out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"))
