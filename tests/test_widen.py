"""How many connections a pull uses (loader.fetch): half of ``--concurrency`` to begin with, and the rest only
while connections turn out slow. Real registry, real proxies: the throttling proxy (a per-connection cap) and the
fault proxy (which records every request)."""

from __future__ import annotations

import io
import os

import pytest

from loader import fetch
from loader.fetch import MiB, Range, worth_splitting
from loader.log import Logger
from loader.pull import PullOptions, pull
from tests.support.faultproxy import FaultProxy
from tests.support.files import tree
from tests.support.oci import file_layer, sha256
from tests.support.throttle import ThrottleProxy

BLOB = os.urandom(24 * MiB)
MB = 1_000_000


@pytest.fixture(scope="module")
def model(registry, pusher) -> str:
    return pusher.push_artifact("widen/model", "v1", [file_layer("w.bin", BLOB)])


def _pull(host: str, cache, concurrency: int) -> tuple[object, str]:
    stream = io.StringIO()
    opts = PullOptions(cache=cache, progress="none", concurrency=concurrency, plain_http=True)
    res = pull(f"{host}/widen/model:v1", opts, Logger(stream, level="debug"))
    return res, stream.getvalue()


@pytest.mark.parametrize(("left", "rate", "seconds"), [
    (100 * MiB, None, 0.0),  # not measured yet: never split on a guess
    (100 * MiB, 1e9, 0.0),  # 0.1 s to go: a new request and a second read for hashing would not pay
    (100 * MiB, 50e6, 100 * MiB / 50e6),  # 2.1 s to go
    (32 * MiB, 250e6, 0.0),  # a loopback range: 0.13 s to go
    (32 * MiB, 100e6, 32 * MiB / 100e6),  # 0.34 s to go
    (8 * MiB, 1e6, 8 * MiB / 1e6),  # the smallest range that splits: two halves of STEAL_MIN
    (8 * MiB - 1, 1e3, 0.0),  # a half would be under STEAL_MIN, however slow
    (16 * MiB, 0.0, 16 * MiB / 1.0),  # nothing arrived since the first byte: as slow as can be
])
def test_worth_splitting(left, rate, seconds):
    assert worth_splitting(left, rate) == pytest.approx(seconds)


@pytest.mark.parametrize(("left", "rate", "wider"), [
    (100 * MiB, None, False),  # not measured yet
    (100 * MiB, 500e6, False),  # 0.2 s to go on loopback: more connections would only cost CPU
    (100 * MiB, 50e6, True),  # 2.1 s at four connections capped at 12.5 MB/s
    (1 << 30, 0.0, True),  # nothing since the first byte
])
def test_worth_widening(left, rate, wider):
    assert fetch.worth_widening(left, rate) is wider


def test_a_range_rate_is_measured_from_its_first_byte_after_the_probe():
    r = Range(0, 0, 64 * MiB, done=8 * MiB)
    assert r.rate(100.0) is None  # no byte yet
    r.began, r.base = 100.0, 8 * MiB
    r.done = 9 * MiB
    assert r.rate(100.0 + fetch.PROBE_SECONDS / 2) is None
    assert r.rate(102.0) == pytest.approx(MiB / 2.0)


def test_slow_connections_get_company(model, registry, tmp_path):
    """One blob, one range in the first plan, two workers to begin with, and a registry that gives each connection
    3 MB/s: the pull takes all four workers, and the idle ones take over halves of the running range; every byte
    arrives once and the blob verifies."""
    with ThrottleProxy(registry.url, rate=3 * MB) as proxy:
        res, log = _pull(proxy.host, tmp_path / "cache", concurrency=4)
        stats = proxy.stats()
    assert tree(res.path) == {"w.bin": BLOB}
    assert stats.peak_active >= 3, stats
    assert "event=fetch.widen" in log and log.count("event=fetch.split") >= 2, log
    # Every byte of the blob crossed once, plus what was in flight on a range when it was shortened.
    assert len(BLOB) <= stats.bytes_down <= len(BLOB) + (4 << 20)


def test_a_fast_registry_gets_one_request_per_planned_range(model, registry, tmp_path):
    """On loopback the same blob takes a few hundredths of a second on one connection: another connection would
    cost a request and a second read of half of it for hashing, so the pull neither widens nor splits."""
    with FaultProxy(registry.url) as proxy:
        res, log = _pull(proxy.host, tmp_path / "cache", concurrency=4)
        requests = proxy.blob_requests(sha256(BLOB))
    assert tree(res.path) == {"w.bin": BLOB}
    assert [(r.range, r.body_bytes) for r in requests] == [(f"bytes=0-{len(BLOB) - 1}", len(BLOB))]
    assert "event=fetch.split" not in log and "event=fetch.widen" not in log


@pytest.mark.parametrize("value", ["0", "65", "100000"])
def test_concurrency_is_bounded_everywhere_it_is_set(value, tmp_path, capsys, monkeypatch):
    """One bound (contract.MAX_CONCURRENCY) for the flag, the loader's setting and the webhook's: each worker is a
    thread with a 1 MiB buffer and a connection, so --concurrency 100000 is refused, not attempted."""
    from pydantic import ValidationError

    from loader import cli, contract
    from loader.config import LoaderSettings, SettingsError
    from webhook.config import Settings

    for argv in (["pull", "127.0.0.1:1/m:v1"], ["import", str(tmp_path / "none.tar")]):
        assert cli.main([*argv, "--cache", str(tmp_path), "--concurrency", value]) == 2
        assert capsys.readouterr().err.endswith(
            f'error="--concurrency {value} must be between 1 and {contract.MAX_CONCURRENCY} (connections per loader)"\n')
    with pytest.raises(SettingsError, match="CONCURRENCY"):
        LoaderSettings.from_env({"MODEL_LOADER_CONCURRENCY": value})
    monkeypatch.setenv("MODEL_CACHE_LOADER_CONCURRENCY", value)
    with pytest.raises(ValidationError, match="loader_concurrency"):
        Settings()
    assert os.listdir(tmp_path) == []


def test_concurrency_at_the_bound_is_taken(monkeypatch):
    from loader import contract
    from loader.config import LoaderSettings
    from webhook.config import Settings

    assert LoaderSettings.from_env({"MODEL_LOADER_CONCURRENCY": str(contract.MAX_CONCURRENCY)}).concurrency == 64
    monkeypatch.setenv("MODEL_CACHE_LOADER_CONCURRENCY", "64")
    assert Settings().loader_concurrency == 64


def test_a_model_of_more_files_than_workers_widens_while_it_waits_for_blob_slots(registry, pusher, tmp_path):
    """Six files, concurrency 4: the pull holds four blobs open and waits for a slot for the other two, and looks at
    its connections while it waits (review, seventh session: it only did once every blob was open, so a many-file
    model on a capped registry ran on half its workers until the end)."""
    files = {f"part-{i}.bin": os.urandom(2 * MiB) for i in range(6)}
    pusher.push_artifact("widen/many", "v1", [file_layer(n, d) for n, d in files.items()])
    with ThrottleProxy(registry.url, rate=1 * MB) as proxy:
        stream = io.StringIO()
        opts = PullOptions(cache=tmp_path / "cache", progress="none", concurrency=4, plain_http=True)
        res = pull(f"{proxy.host}/widen/many:v1", opts, Logger(stream, level="debug"))
        stats = proxy.stats()
    assert tree(res.path) == files
    assert stats.peak_active >= 4, stats  # four workers (and the idle connection that fetched the manifest)
    assert "event=fetch.widen" in stream.getvalue()
