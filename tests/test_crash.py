"""SIGKILL the loader at random points; the cache must always hold the old state or the new, never a partial
model, and the next pull must resume and finish with the exact bytes."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.files import tree
from tests.support.oci import file_layer, sha256

FILES = {f"shard-{i}.bin": os.urandom(8 << 20) for i in range(3)}
FILES["big.bin"] = os.urandom(72 << 20)  # split into Range requests
FILES["config.json"] = b'{"k": 1}'


def assert_consistent(cache: Path, expected: dict) -> bool:
    """Every published thing is complete and verified. Returns True when the model is published."""
    for blob in (cache / "blobs/sha256").iterdir() if (cache / "blobs/sha256").exists() else []:
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"corrupt published blob {blob.name}"
    models = list((cache / "models/sha256").iterdir()) if (cache / "models/sha256").exists() else []
    assert len(models) <= 1
    for m in models:
        assert tree(m) == expected, "a published model is incomplete"
    refs = list((cache / "refs").iterdir()) if (cache / "refs").exists() else []
    for r in refs:
        if not r.name.startswith("."):
            assert tree(r) == expected, "a ref points at an incomplete model"
    return bool(models)


@pytest.mark.slow
def test_sigkill_at_random_points_then_clean_repull(fresh_registry, tmp_path):
    from tests.support.oci import Pusher

    Pusher(fresh_registry.url).push_artifact("m/crash", "v1", [file_layer(n, d) for n, d in FILES.items()])
    ref = f"{fresh_registry.host}/m/crash:v1"
    rng = random.Random(1234)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "loader.cli", "pull", ref, "--cache", str(cache), "--progress", "none",
           "--concurrency", "2"]
    # Calibrate on this machine, now: kills are spread over one whole pull, start-up included.
    t0 = time.monotonic()
    subprocess.run(cmd[:6] + [str(tmp_path / "calibrate")] + cmd[7:], check=True, capture_output=True)
    span = time.monotonic() - t0
    kills = trials = 0
    while kills < 8 and trials < 40:
        trials += 1
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.95) * span)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if assert_consistent(cache, FILES):
            subprocess.run(["chmod", "-R", "u+w", str(cache)], check=True)
            shutil.rmtree(cache)  # start over so later kills land mid-pull again
    assert kills >= 8, f"only {kills} of {trials} kills landed mid-pull; the test is not exercising crashes"
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert assert_consistent(cache, FILES)
    assert not list((cache / "partial").iterdir()), "partial files left after a successful pull"


@pytest.mark.slow
def test_resume_after_kill_fetches_only_the_rest(fresh_registry, tmp_path):
    """A killed pull's partial blob is resumed, not restarted: the second run logs fetch.resume."""
    from tests.support.oci import Pusher

    data = os.urandom(96 << 20)
    Pusher(fresh_registry.url).push_artifact("m/resume", "v1", [file_layer("w.bin", data)])
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "loader.cli", "pull", f"{fresh_registry.host}/m/resume:v1", "--cache", str(cache),
           "--progress", "none", "--concurrency", "1"]
    partial = cache / "partial" / sha256(data)[7:]
    state = partial.with_name(partial.name + ".state")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    # Kill as soon as the resume state records progress.
    while time.monotonic() < deadline:
        if state.exists() and '"ranges": [[0, ' in state.read_text() and not state.read_text().endswith(", 0]]}"):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not partial.exists():
        pytest.fail("the pull finished before it could be killed; raise the model size")
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "event=fetch.resume" in out.stderr
    assert (cache / "refs").exists() and tree(next((cache / "models/sha256").iterdir())) == {"w.bin": data}
