"""gc and ls against caches filled by real pulls from the real registry: what goes, in which order, what stays
byte for byte, what a dry run leaves alone, and gc racing real pulls in other processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loader import contract
from loader.cache import Cache
from loader.cli import main
from loader.gc import Policy, collect, parse_duration, parse_size
from loader.log import NullLogger
from loader.pull import PullOptions, pull
from loader.reference import cache_key
from tests.support.files import tree
from tests.support.oci import file_layer, sha256

LOG = NullLogger()
DAY = 86400
OLD = 1_700_000_000  # 2023-11-14T22:13:20Z


def data(seed: str, size: int) -> bytes:
    """Deterministic bytes, so digests (and the exact outputs below) are the same on every run."""
    block = hashlib.sha256(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def push(pusher, repo: str, tag: str, files: dict[str, bytes]) -> str:
    return pusher.push_artifact(repo, tag, [file_layer(n, b) for n, b in files.items()])


def do_pull(ref: str, cache: Path):
    return pull(ref, PullOptions(cache=cache, progress="none"), LOG)


def set_last_use(cache: Path, digest: str, ts: float) -> None:
    os.utime(cache / contract.LASTUSE_DIR / digest[7:], (ts, ts))


def listing(cache: Path, sub: str) -> list[str]:
    d = cache / sub
    return sorted(os.listdir(d)) if d.exists() else []


def state(cache: Path) -> dict[str, tuple]:
    """Every path in the cache with its type, mode, mtime and content (or link target): a dry run must not move
    any of it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(cache):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if p.is_symlink():
                body = os.readlink(p)
            elif p.is_file():
                body = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                body = None
            out[str(p.relative_to(cache))] = (st.st_mode, st.st_mtime_ns, st.st_nlink, body)
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def models(registry, pusher, tmp_path, request):
    """Four models pulled into a cache: a (3 files, one shared with b), b, c (kept), d. Returns (cache, info)."""
    repo = "gc/" + request.node.name.removeprefix("test_").replace("_", "-")[:40].strip("-")
    shared = data("shared", 400_000)
    files = {
        "a": {"weights.bin": shared, "a.json": data("a", 1_000), "sub/a.txt": data("a2", 2_000)},
        "b": {"weights.bin": shared, "b.json": data("b", 50_000)},
        "c": {"c.bin": data("c", 100_000)},
        "d": {"d.bin": data("d", 300_000)},
    }
    cache = tmp_path / "cache"
    info = {}
    for name, fs in files.items():
        digest = push(pusher, repo, name, fs)
        ref = f"{registry.host}/{repo}:{name}"
        res = do_pull(ref, cache)
        assert res.digest == digest
        info[name] = {"ref": ref, "digest": digest, "files": fs, "bytes": sum(map(len, fs.values()))}
    return cache, info


def set_uses(cache: Path, info: dict, ages: dict[str, float], now: float) -> None:
    for name, age in ages.items():
        set_last_use(cache, info[name]["digest"], now - age)


def model_dirs(cache: Path) -> list[str]:
    return listing(cache, contract.MODELS_DIR)


def blobs_of(info: dict, *names: str) -> list[str]:
    return sorted({sha256(b)[7:] for n in names for b in info[n]["files"].values()})


# --- flag values ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("30m", 1800), ("12h", 43200), ("7d", 604800), ("1h30m", 5400),
                                          ("168h", 604800), ("2w", 1209600), ("45s", 45), ("0.5h", 1800), ("0s", 0)])
def test_durations(text, seconds):
    assert parse_duration(text, "--max-unused") == seconds


@pytest.mark.parametrize("text,size", [("500Mi", 500 * 2**20), ("20G", 20 * 10**9), ("1Ti", 2**40),
                                       ("1048576", 1048576), ("1.5Gi", 3 * 2**29), ("10k", 10_000),
                                       ("10K", 10_000), ("2GB", 2 * 10**9), ("3MiB", 3 * 2**20)])
def test_sizes(text, size):
    assert parse_size(text, "--max-size") == size


DURATION_HELP = "write a number and a unit (s, m, h, d, w), e.g. 30m, 12h, 7d or 1h30m"
SIZE_HELP = ("write a number and an optional unit (K, M, G, T for powers of 1000; Ki, Mi, Gi, Ti for powers of"
             " 1024), e.g. 500Mi, 20G or 1Ti")


@pytest.mark.parametrize("argv,message", [
    (["--max-unused", "7"], f"--max-unused '7' is not a duration: {DURATION_HELP}"),
    (["--max-unused", "7days"], f"--max-unused '7days' is not a duration: {DURATION_HELP}"),
    (["--max-unused=-1h"], f"--max-unused '-1h' is not a duration: {DURATION_HELP}"),
    (["--max-size", "20X"], f"--max-size '20X' is not a size: {SIZE_HELP}"),
    (["--max-size", "Gi"], f"--max-size 'Gi' is not a size: {SIZE_HELP}"),
], ids=["no-unit", "word-unit", "negative", "bad-unit", "no-number"])
def test_bad_flag_values_name_the_flag_and_an_example(tmp_path, capsys, argv, message):
    (tmp_path / "c").mkdir()
    code, out, err = run_cli(capsys, "gc", "--cache", str(tmp_path / "c"), *argv)
    assert (code, out) == (2, "")
    assert f'error="{message}"' in err.replace('\\"', '"')
    assert listing(tmp_path, "c") == []


# --- eviction ---------------------------------------------------------------------------------------------------


def test_max_unused_keeps_listed_and_recent_models_and_shared_blobs(models, tmp_path, capsys):
    cache, info = models
    now = time.time()
    set_uses(cache, info, {"a": 10 * DAY, "b": 1 * DAY, "c": 30 * DAY, "d": 8 * DAY}, now)
    keep = tmp_path / "models.txt"
    keep.write_text(f"# prefetched\n{info['c']['ref']}   # kept although unused\n\n")
    before_b = tree(cache / contract.MODELS_DIR / info["b"]["digest"][7:])

    code, out, _ = run_cli(capsys, "gc", "--cache", str(cache), "--max-unused", "7d", "--keep-file", str(keep),
                           "--output", "json")
    assert code == 0
    report = json.loads(out)
    # a (oldest first) and d go; c is kept by the list; b is recent.
    assert [(m["digest"], m["refs"], m["bytes"], m["files"], m["reason"]) for m in report["removed_models"]] == [
        (info["a"]["digest"], [info["a"]["ref"]], 403_000, 3, "unused"),
        (info["d"]["digest"], [info["d"]["ref"]], 300_000, 1, "unused"),
    ]
    # The blob a shared with b stays; a's own blobs and d's go.
    assert sorted(b["digest"] for b in report["removed_blobs"]) == sorted(
        f"sha256:{h}" for h in set(blobs_of(info, "a", "d")) - set(blobs_of(info, "b")))
    assert sum(b["bytes"] for b in report["removed_blobs"]) == 1_000 + 2_000 + 300_000
    assert (report["models_before"], report["models_after"]) == (4, 2)
    assert (report["bytes_before"], report["bytes_after"]) == (853_000, 550_000)
    assert report["removed_refs"] == sorted(cache_key(info[n]["ref"]) for n in "ad")
    assert report["removed_partials"] == [] and report["busy_models"] == [] and report["removed_other"] == []

    assert model_dirs(cache) == sorted(info[n]["digest"][7:] for n in "bc")
    assert listing(cache, contract.BLOBS_DIR) == blobs_of(info, "b", "c")
    assert listing(cache, "meta") == sorted(f"{info[n]['digest'][7:]}.json" for n in "bc")
    assert listing(cache, contract.LASTUSE_DIR) == sorted(info[n]["digest"][7:] for n in "bc")
    assert listing(cache, contract.REFS_DIR) == sorted(cache_key(info[n]["ref"]) for n in "bc")
    assert tree(cache / contract.MODELS_DIR / info["b"]["digest"][7:]) == before_b == info["b"]["files"]
    # What is left is still a cache hit, with no network needed.
    hit = pull(info["b"]["ref"], PullOptions(cache=cache, offline=True, progress="none"), LOG)
    assert (hit.cache_hit, hit.digest) == (True, info["b"]["digest"])


def test_max_size_removes_least_recently_used_first(models, tmp_path, capsys):
    cache, info = models
    now = time.time()
    # Use order, oldest first: c (kept), d, a, b. Total 853 kB (the shared blob once).
    set_uses(cache, info, {"c": 40 * DAY, "d": 30 * DAY, "a": 20 * DAY, "b": 10 * DAY}, now)
    keep = tmp_path / "keep.txt"
    keep.write_text(f"{info['c']['ref']}\n")
    code, out, _ = run_cli(capsys, "gc", "--cache", str(cache), "--max-size", "500k", "--keep-file", str(keep),
                           "--output", "json")
    assert code == 0
    report = json.loads(out)
    # Without d 553 kB; without a 550 kB (b still holds the shared blob); without b 100 kB.
    assert [(m["digest"], m["reason"]) for m in report["removed_models"]] == [
        (info["d"]["digest"], "size"), (info["a"]["digest"], "size"), (info["b"]["digest"], "size")]
    assert (report["bytes_before"], report["bytes_after"]) == (853_000, 100_000)
    assert model_dirs(cache) == [info["c"]["digest"][7:]]
    assert listing(cache, contract.BLOBS_DIR) == blobs_of(info, "c")


def test_max_size_stops_once_the_rest_fits(models, capsys):
    cache, info = models
    now = time.time()
    set_uses(cache, info, {"d": 4 * DAY, "c": 3 * DAY, "a": 2 * DAY, "b": 1 * DAY}, now)
    code, out, _ = run_cli(capsys, "gc", "--cache", str(cache), "--max-size", "560k", "--output", "json")
    assert code == 0
    report = json.loads(out)
    assert [(m["digest"], m["reason"]) for m in report["removed_models"]] == [(info["d"]["digest"], "size")]
    assert report["bytes_after"] == 553_000
    assert model_dirs(cache) == sorted(info[n]["digest"][7:] for n in "abc")


def test_unused_then_size(models, capsys):
    cache, info = models
    now = time.time()
    set_uses(cache, info, {"a": 9 * DAY, "b": 3 * DAY, "c": 1 * DAY, "d": 2 * DAY}, now)
    code, out, _ = run_cli(capsys, "gc", "--cache", str(cache), "--max-unused", "1w", "--max-size", "200k",
                           "--output", "json")
    assert code == 0
    assert [(m["digest"], m["reason"]) for m in json.loads(out)["removed_models"]] == [
        (info["a"]["digest"], "unused"), (info["b"]["digest"], "size"), (info["d"]["digest"], "size")]
    assert model_dirs(cache) == [info["c"]["digest"][7:]]


def test_keep_file_by_tag_digest_and_moved_tag(registry, pusher, tmp_path, capsys):
    repo = "gc/keep"
    cache = tmp_path / "cache"
    old = push(pusher, repo, "v1", {"w": data("k-old", 10_000)})
    do_pull(f"{registry.host}/{repo}:v1", cache)
    new = push(pusher, repo, "v1", {"w": data("k-new", 20_000)})  # the tag moves
    do_pull(f"{registry.host}/{repo}:v1", cache)
    pinned = push(pusher, repo, "pinned", {"w": data("k-pin", 30_000)})
    do_pull(f"{registry.host}/{repo}@{pinned}", cache)
    other = push(pusher, repo, "other", {"w": data("k-other", 40_000)})
    do_pull(f"{registry.host}/{repo}:other", cache)
    for d in (old, new, pinned, other):
        set_last_use(cache, d, OLD)
    keep = tmp_path / "keep"
    keep.write_text(f"{registry.host}/{repo}:v1\n{registry.host}/{repo}:pinned@{pinned}\n")
    code, out, _ = run_cli(capsys, "gc", "--cache", str(cache), "--max-unused", "1d", "--keep-file", str(keep))
    assert code == 0
    ref = f"{registry.host}/{repo}"
    # Equal last use: digest order.
    assert out.splitlines() == sorted([
        f"removed {old} {ref}:v1 (10.0 kB, 1 files, last used 2023-11-14T22:13:20Z: unused)",
        f"removed {other} {ref}:other (40.0 kB, 1 files, last used 2023-11-14T22:13:20Z: unused)",
    ]) + [
        "removed 2 models, 2 blobs (50.0 kB), 0 partial downloads (0 B), 0 staging leftovers, 1 ref links;"
        " models 4 -> 2, 100.0 kB -> 50.0 kB on disk",
    ]
    assert model_dirs(cache) == sorted([new[7:], pinned[7:]])


def test_a_bad_keep_file_removes_nothing(models, tmp_path, capsys):
    cache, info = models
    set_uses(cache, info, {n: 100 * DAY for n in "abcd"}, time.time())
    keep = tmp_path / "keep"
    keep.write_text(f"{info['a']['ref']}\nhttp://registry.example.com/x:v1\n")
    before = state(cache)
    code, out, err = run_cli(capsys, "gc", "--cache", str(cache), "--max-unused", "1d", "--keep-file", str(keep))
    assert (code, out) == (2, "")
    assert f"{keep}:2: reference 'http://registry.example.com/x:v1' has a URL scheme" in err
    assert "gc removed nothing" in err
    assert state(cache) == before


def test_dry_run_prints_and_changes_nothing(models, tmp_path, capsys):
    cache, info = models
    set_uses(cache, info, {"a": 10 * DAY, "b": 10 * DAY, "c": 1 * DAY, "d": 10 * DAY}, time.time())
    stale = cache / contract.PARTIAL_DIR / ("e" * 64)
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (OLD, OLD))
    os.symlink("../models/sha256/" + "f" * 64, cache / contract.REFS_DIR / "dangling-0123456789abcdef")
    before = state(cache)

    code, out, _ = run_cli(capsys, "gc", "--cache", str(cache), "--max-unused", "7d", "--dry-run", "--output", "json")
    assert code == 0
    assert state(cache) == before
    report = json.loads(out)
    assert report["dry_run"] is True
    assert [m["digest"] for m in report["removed_models"]] == sorted(
        (info[n]["digest"] for n in "abd"), key=lambda d: d)  # equal last use: digest order
    assert sorted(b["digest"] for b in report["removed_blobs"]) == [f"sha256:{h}" for h in blobs_of(info, "a", "b", "d")]
    assert report["removed_partials"] == [{"digest": "sha256:" + "e" * 64, "bytes": 1000}]
    assert report["removed_refs"] == sorted([cache_key(info[n]["ref"]) for n in "abd"] + ["dangling-0123456789abcdef"])

    code, out, _ = run_cli(capsys, "gc", "--cache", str(cache), "--max-unused", "7d", "--dry-run")
    assert code == 0
    assert state(cache) == before
    assert out.splitlines()[-1] == (
        "would remove 3 models, 5 blobs (753.0 kB), 1 partial downloads (1.0 kB), 0 staging leftovers,"
        " 4 ref links; models 4 -> 1, 853.0 kB -> 100.0 kB on disk")
    assert all(line.startswith("would remove sha256:") for line in out.splitlines()[:-1])

    # The real run does what the dry run said.
    code, out, _ = run_cli(capsys, "gc", "--cache", str(cache), "--max-unused", "7d", "--output", "json")
    real = json.loads(out)
    assert {k: v for k, v in real.items() if k != "dry_run"} == {k: v for k, v in report.items() if k != "dry_run"}
    assert model_dirs(cache) == [info["c"]["digest"][7:]]


def test_leftovers(models, tmp_path, capsys):
    """Stale partials (unless their blob lock is held), staging trees and temp files of crashed loaders, dangling
    and temporary links, lastuse files of vanished models, trees without meta and meta without a tree."""
    cache, info = models
    c = Cache(cache)
    now = time.time()
    partial = cache / contract.PARTIAL_DIR
    stale, held, fresh = "1" * 64, "2" * 64, "3" * 64
    for hexd, age in ((stale, 2 * DAY), (held, 2 * DAY), (fresh, 3600)):
        for name, size in ((hexd, 5000), (f"{hexd}.state", 50)):
            (partial / name).write_bytes(b"p" * size)
            os.utime(partial / name, (now - age, now - age))
    old_stage = c.new_staging()
    (old_stage / "d").mkdir()
    (old_stage / "d" / "f").write_bytes(b"f")
    os.chmod(old_stage / "d" / "f", 0o444)
    os.chmod(old_stage / "d", 0o555)
    os.utime(old_stage, (now - 2 * 3600, now - 2 * 3600))
    new_stage = c.new_staging()
    old_tmp_file = cache / contract.TMP_DIR / ".x.json.abcd1234"
    old_tmp_file.write_text("{}")
    os.utime(old_tmp_file, (OLD, OLD))
    refs = cache / contract.REFS_DIR
    os.symlink("../models/sha256/" + "4" * 64, refs / "gone-0123456789abcdef")
    os.symlink(f"../models/sha256/{info['a']['digest'][7:]}", refs / ".tmp-link.abcd1234")
    (cache / contract.LASTUSE_DIR / ("5" * 64)).touch()
    orphan_tree = cache / contract.MODELS_DIR / ("6" * 64)
    orphan_tree.mkdir()
    (orphan_tree / "f").write_bytes(b"o")
    os.chmod(orphan_tree, 0o555)
    (cache / "meta" / f"{'7' * 64}.json").write_text("{}")
    before_models = model_dirs(cache)

    with c.lock(f"blob-{held}"):  # a pull is downloading this one right now
        code, out, _ = run_cli(capsys, "gc", "--cache", str(cache), "--output", "json")
    assert code == 0
    report = json.loads(out)
    assert report["removed_models"] == []
    assert report["removed_blobs"] == []
    assert report["removed_partials"] == [{"digest": f"sha256:{stale}", "bytes": 5050}]
    assert report["removed_tmp"] == sorted([old_stage.name, old_tmp_file.name])
    assert report["removed_refs"] == [".tmp-link.abcd1234", "gone-0123456789abcdef"]
    assert report["removed_other"] == [f"models/sha256/{'6' * 64}", f"meta/{'7' * 64}.json", f"lastuse/{'5' * 64}"]
    assert listing(cache, contract.PARTIAL_DIR) == sorted([held, f"{held}.state", fresh, f"{fresh}.state"])
    assert listing(cache, contract.TMP_DIR) == [new_stage.name]
    assert listing(cache, contract.REFS_DIR) == sorted(cache_key(info[n]["ref"]) for n in "abcd")
    assert model_dirs(cache) == sorted(set(before_models) - {"6" * 64})
    assert listing(cache, "meta") == sorted(f"{info[n]['digest'][7:]}.json" for n in "abcd")
    for n in "abcd":
        assert tree(cache / contract.MODELS_DIR / info[n]["digest"][7:]) == info[n]["files"]


def test_gc_skips_a_model_another_process_holds(models, capsys):
    cache, info = models
    set_uses(cache, info, {n: 10 * DAY for n in "abcd"}, time.time())
    with Cache(cache).lock(f"model-{info['d']['digest'][7:]}"):
        report = collect(Cache(cache), Policy(max_unused=DAY), [], LOG)
    assert report.busy == [info["d"]["digest"]]
    assert [e.model.digest for e in report.evicted] == sorted(info[n]["digest"] for n in "abc")
    assert model_dirs(cache) == [info["d"]["digest"][7:]]
    assert listing(cache, contract.BLOBS_DIR) == blobs_of(info, "d")
    assert tree(cache / contract.MODELS_DIR / info["d"]["digest"][7:]) == info["d"]["files"]


# --- ls ---------------------------------------------------------------------------------------------------------


def test_ls_text_and_json(registry, pusher, tmp_path, capsys):
    repo = "gc/ls"
    cache = tmp_path / "cache"
    shared = data("ls-shared", 1_500_000)
    one = push(pusher, repo, "one", {"w.bin": shared, "config.json": data("ls-1", 2_000)})
    two = push(pusher, repo, "two", {"w.bin": shared, "x/y.txt": data("ls-2", 500)})
    do_pull(f"{registry.host}/{repo}:one", cache)
    do_pull(f"{registry.host}/{repo}:two", cache)
    do_pull(f"{registry.host}/{repo}@{two}", cache)
    set_last_use(cache, one, OLD)
    set_last_use(cache, two, OLD + 3600)
    (cache / contract.PARTIAL_DIR / ("9" * 64)).write_bytes(b"z" * 700)
    ref = f"{registry.host}/{repo}"

    code, out, _ = run_cli(capsys, "ls", "--cache", str(cache))
    assert code == 0
    assert out.splitlines() == [
        "DIGEST" + " " * 17 + "SIZE  FILES  LAST USE" + " " * 14 + "REFS",
        f"{two[:19]}  1.5 MB      2  2023-11-14T23:13:20Z  {ref}:two, {ref}@{two}",
        f"{one[:19]}  1.5 MB      2  2023-11-14T22:13:20Z  {ref}:one",
        "2 models, 1.5 MB on disk (shared blobs counted once);"
        " 700 B in blobs and downloads no model uses (model-loader gc removes them)",
    ]

    code, out, _ = run_cli(capsys, "ls", "--cache", str(cache), "--output", "json")
    assert code == 0
    assert json.loads(out) == {
        "models": [
            {"digest": two, "refs": [f"{ref}:two", f"{ref}@{two}"], "former_refs": [],
             "path": str(cache / contract.MODELS_DIR / two[7:]), "bytes": 1_500_500, "files": 2,
             "last_use": "2023-11-14T23:13:20Z"},
            {"digest": one, "refs": [f"{ref}:one"], "former_refs": [],
             "path": str(cache / contract.MODELS_DIR / one[7:]), "bytes": 1_502_000, "files": 2,
             "last_use": "2023-11-14T22:13:20Z"},
        ],
        "totals": {"models": 2, "bytes": 1_502_500, "unreferenced_bytes": 700},
    }


def test_ls_shows_a_moved_tag_and_an_empty_cache(registry, pusher, tmp_path, capsys):
    repo = "gc/ls-moved"
    cache = tmp_path / "cache"
    old = push(pusher, repo, "v1", {"w": data("m-old", 100)})
    do_pull(f"{registry.host}/{repo}:v1", cache)
    new = push(pusher, repo, "v1", {"w": data("m-new", 200)})
    do_pull(f"{registry.host}/{repo}:v1", cache)
    set_last_use(cache, old, OLD)
    set_last_use(cache, new, OLD + 60)
    code, out, _ = run_cli(capsys, "ls", "--cache", str(cache))
    assert out.splitlines() == [
        "DIGEST" + " " * 16 + "SIZE  FILES  LAST USE" + " " * 14 + "REFS",
        f"{new[:19]}  200 B      1  2023-11-14T22:14:20Z  {registry.host}/{repo}:v1",
        f"{old[:19]}  100 B      1  2023-11-14T22:13:20Z  (was {registry.host}/{repo}:v1)",
        "2 models, 300 B on disk (shared blobs counted once)",
    ]
    (tmp_path / "empty").mkdir()
    code, out, _ = run_cli(capsys, "ls", "--cache", str(tmp_path / "empty"))
    assert (code, out) == (0, "DIGEST  SIZE  FILES  LAST USE  REFS\n0 models, 0 B on disk (shared blobs counted once)\n")


# --- gc while pulls run -----------------------------------------------------------------------------------------


def test_gc_racing_pulls_in_other_processes(registry, pusher, tmp_path):
    """Pulls in subprocesses while gc runs in a loop in a thread here, and this thread keeps re-pulling old
    "victim" models that share blobs with the models being pulled and marking them long unused, so each gc round
    evicts a model and tries to delete blobs that in-flight pulls have just found present or are linking. One
    victim is also pulled by the subprocesses (a hit that must keep it alive). Every pull succeeds, byte for byte."""
    repo = "gc/race"
    cache = tmp_path / "cache"
    shared = [data(f"race-shared-{i}", 3_000_000) for i in range(3)]
    victims, targets = {}, {}
    for i in range(3):
        fs = {"shared.bin": shared[i], "own.bin": data(f"race-victim-{i}", 1_000_000)}
        victims[f"{registry.host}/{repo}:victim{i}"] = (push(pusher, repo, f"victim{i}", fs), fs)
    for i in range(6):
        fs = {"shared.bin": shared[i % 3], "own.bin": data(f"race-target-{i}", 4_000_000),
              "cfg/config.json": data(f"race-cfg-{i}", 300)}
        targets[f"{registry.host}/{repo}:target{i}"] = (push(pusher, repo, f"target{i}", fs), fs)
    revived, *churned = victims
    wanted = {**targets, revived: victims[revived]}

    def revive(ref: str) -> None:
        do_pull(ref, cache)
        set_last_use(cache, victims[ref][0], OLD)

    for ref in victims:
        revive(ref)
    done = threading.Event()
    rounds = []

    def gc_loop() -> None:
        while not done.is_set() or not rounds:
            rounds.append(collect(Cache(cache), Policy(max_unused=DAY), [], LOG))

    procs = []
    for ref in list(wanted) * 2:  # two loaders per ref, as two pods on one node
        cmd = [sys.executable, "-m", "loader.cli", "pull", ref, "--cache", str(cache), "--progress", "none",
               "--concurrency", "2", "--output", "json"]
        procs.append((ref, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    gc_thread = threading.Thread(target=gc_loop)
    gc_thread.start()
    try:
        while any(p.poll() is None for _, p in procs):
            for ref in churned:
                revive(ref)
    finally:
        done.set()
        gc_thread.join()
    results = []
    for ref, p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err.decode()
        results.append((ref, json.loads(out)["digest"]))
    assert results == [(ref, wanted[ref][0]) for ref in list(wanted) * 2]
    assert rounds and all(r.busy == [] for r in rounds)

    collect(Cache(cache), Policy(max_unused=DAY), [], LOG)
    assert model_dirs(cache) == sorted(d[7:] for d, _ in wanted.values())
    for digest, fs in wanted.values():
        assert tree(cache / contract.MODELS_DIR / digest[7:]) == fs
    assert listing(cache, contract.BLOBS_DIR) == sorted({sha256(b)[7:] for _, fs in wanted.values() for b in fs.values()})
    assert listing(cache, contract.PARTIAL_DIR) == []
    assert listing(cache, contract.TMP_DIR) == []
    assert listing(cache, contract.REFS_DIR) == sorted(cache_key(r) for r in wanted)
