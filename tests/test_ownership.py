"""Who owns the cache (issue 14): real ``model-loader`` processes under real uids against real directories owned
as kubelet and an NFS claim leave them.

The tests run as root (CI does) and start each loader through ``setpriv`` with the uid, gid and capabilities the
webhook gives it: uid 65532 for `pod` and `pvc:` caches; uid 0 **without capabilities** (bounding set emptied, as
``capabilities: {drop: [ALL]}`` does) for the `node` cache. The story they hold: one group (65532) for every
writer; the loader makes directories 2775 (setgid) and mutable files 0664 whatever its umask, heals the layout
directories it owns, locks through read-only descriptors; what remains is exit 9 naming uid, path and owner.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from loader import contract
from loader.cache import CACHE_DIRS, DIR_MODE, FILE_MODE
from tests.support.oci import file_layer

ROOT = Path(__file__).resolve().parent.parent
LOADER = 65532  # MODEL_CACHE_LOADER_RUN_AS_USER's default, and the group every writer shares
NO_CAPS = ["--bounding-set=-all", "--inh-caps=-all"]  # what `capabilities: {drop: [ALL]}` leaves a process
# The one-time fix README "Troubleshooting" gives for exit 9 (as root, on the node or in a Job mounting the claim):
# the cache's group for everything, group-writable setgid directories and group-writable files, except published
# blobs and trees, which stay read-only.
FIX = (
    'chgrp -hR "$GID" "$CACHE" && find "$CACHE" \\( -path "$CACHE/blobs/sha256/*" -o -path "$CACHE/models/sha256/*" \\)'
    ' -prune -o -type d -exec chmod 2775 {} + -o -type f -exec chmod 0664 {} +'
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts loaders under other uids: only root may (CI is root)")


@pytest.fixture
def area() -> Iterator[Path]:
    """A scratch directory every uid can reach (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="model-cache-own-"))
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def loader(uid: int, gid: int, area: Path, *argv: str) -> tuple[int, str, str]:
    """Run model-loader as uid:gid with no supplementary groups (and, as uid 0, no capabilities): the exit code,
    its stdout, and what it left in its termination log."""
    log = area / f"termination-{uid}"
    log.write_text("")
    os.chmod(log, 0o666)
    env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1", "MODEL_LOADER_TERMINATION_LOG": str(log)}
    caps = NO_CAPS if uid == 0 else []
    done = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *caps, sys.executable, "-m", "loader.cli",
         *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, log.read_text()


def pull(uid: int, gid: int, area: Path, cache: Path, ref: str, *extra: str) -> tuple[int, dict | None, str]:
    code, out, term = loader(uid, gid, area, "pull", ref, "--cache", str(cache), "--output", "json",
                             "--progress", "none", *extra)
    return code, (json.loads(out) if code == 0 else None), term


def owners(cache: Path) -> dict[str, tuple[int, int, str]]:
    """uid, gid and mode of the cache root, its layout directories and every file the loader rewrites or locks."""
    out = {".": _owner(cache)}
    for d in CACHE_DIRS:
        out[d] = _owner(cache / d)
    for d in (contract.LOCKS_DIR, contract.LASTUSE_DIR, "meta", contract.PODS_DIR):
        for path in sorted((cache / d).rglob("*")):
            if not path.is_symlink():
                out[str(path.relative_to(cache))] = _owner(path)
    return out


def _owner(path: Path) -> tuple[int, int, str]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, f"{stat.S_IMODE(st.st_mode):04o}"


def push_models(registry, pusher, *names: str) -> dict[str, str]:
    """One small model per name, each with blobs of its own (models sharing a blob: the protected_hardlinks test)."""
    refs = {}
    for name in names:
        pusher.push_artifact(f"own/{name}", "v1", [file_layer("w.bin", f"weights of {name}".encode())],
                             config=f'{{"model": "{name}"}}'.encode())
        refs[name] = f"{registry.host}/own/{name}:v1"
    return refs


def test_the_shared_modes_are_the_documented_ones():
    assert (DIR_MODE, FILE_MODE) == (0o2775, 0o664)


def test_root_without_capabilities_is_held_to_the_mode_bits(area):
    # The premise of every test below: setpriv's uid 0 with an empty bounding set cannot write what it does not own.
    theirs = area / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, LOADER, LOADER)
    probe = subprocess.run(["setpriv", "--reuid=0", "--regid=0", "--clear-groups", *NO_CAPS, "sh", "-c",
                            f"grep CapEff /proc/self/status; touch {theirs}/x"], capture_output=True, text=True)
    assert probe.stdout == "CapEff:\t0000000000000000\n"
    assert probe.returncode == 1 and "Permission denied" in probe.stderr


def test_a_claim_as_nfs_leaves_it_is_exit_9_naming_uid_path_and_owner_until_it_has_the_group(area, registry, pusher):
    refs = push_models(registry, pusher, "nfs")
    claim = area / "claim"  # a new RWX claim: root-owned 0755, and NFS ignores fsGroup
    claim.mkdir(mode=0o755)
    code, _, term = pull(LOADER, LOADER, area, claim, refs["nfs"])
    assert code == contract.ExitCode.PERMISSION == 9
    assert term == (
        f"CachePermissionError: permission denied on {claim}/blobs: its directory {claim} is owned by uid 0 gid 0"
        f" mode 0755; model-loader runs as uid {LOADER} gid {LOADER} (groups {LOADER}). Every loader that writes one"
        " cache needs write access to it through one group (README, Troubleshooting: \"Exit 9\"): give the cache"
        " that group once, or set the pod's fsGroup where the volume supports it\n"
    )
    assert list(claim.iterdir()) == []  # nothing half made
    # What kubelet does for a pod's fsGroup on a volume that supports it (or the one-time fix on one that does not):
    # the group, and group-writable setgid directories. The same pull then works, and what it makes is shared.
    os.chown(claim, 0, LOADER)
    os.chmod(claim, 0o2775)
    code, out, _ = pull(LOADER, LOADER, area, claim, refs["nfs"])
    assert code == 0 and out is not None and out["cache_hit"] is False
    dirs = {d: (LOADER, LOADER, "2775") for d in CACHE_DIRS}
    assert owners(claim) == {
        ".": (0, LOADER, "2775"),
        **dirs,
        "locks/gc": (LOADER, LOADER, "0664"),
        f"locks/model-{out['digest'][7:]}": (LOADER, LOADER, "0664"),
        **{f"locks/blob-{h}": (LOADER, LOADER, "0664") for h in _blob_hexes(claim)},
        f"lastuse/{out['digest'][7:]}": (LOADER, LOADER, "0664"),
        f"meta/{out['digest'][7:]}.json": (LOADER, LOADER, "0664"),
    }


def test_a_pod_cache_emptydir_takes_the_loader_as_it_is(area, registry, pusher):
    refs = push_models(registry, pusher, "pod")
    cache = area / "empty-dir"  # kubelet makes an emptyDir root-owned 0777 (no fsGroup)
    cache.mkdir()
    os.chmod(cache, 0o777)
    code, out, _ = pull(LOADER, LOADER, area, cache, refs["pod"], "--pod-uid", "pod-1")
    assert code == 0 and out is not None and out["cache_hit"] is False
    got = owners(cache)
    assert got.pop(".") == (0, 0, "0777")  # not the loader's to change
    assert got == {k: (LOADER, LOADER, "2775" if (cache / k).is_dir() else "0664") for k in got}


def test_uid_0_and_uid_65532_loaders_share_a_node_cache_through_one_group(area, registry, pusher):
    refs = push_models(registry, pusher, "a", "b", "c")
    cache = area / "node-cache"  # hostPath DirectoryOrCreate: kubelet makes it root-owned 0755
    cache.mkdir(mode=0o755)
    # The node loader (uid 0, no capabilities, group 65532) pulls first: it owns the root, so it gives it the group.
    code, a, _ = pull(0, LOADER, area, cache, refs["a"], "--pod-uid", "pod-1")
    assert code == 0 and a is not None and a["cache_hit"] is False
    assert _owner(cache) == (0, LOADER, "2775")
    # A uid-65532 loader (a `pvc:`-style pod, or the prefetcher) hits what uid 0 published and pulls its own model.
    code, hit, _ = pull(LOADER, LOADER, area, cache, refs["a"], "--pod-uid", "pod-2")
    assert code == 0 and hit is not None and (hit["cache_hit"], hit["digest"]) == (True, a["digest"])
    code, b, _ = pull(LOADER, LOADER, area, cache, refs["b"])
    assert code == 0 and b is not None and b["cache_hit"] is False
    # And back: uid 0 hits what 65532 published and pulls a third.
    code, hit, _ = pull(0, LOADER, area, cache, refs["b"], "--pod-uid", "pod-3")
    assert code == 0 and hit is not None and (hit["cache_hit"], hit["digest"]) == (True, b["digest"])
    code, c, _ = pull(0, LOADER, area, cache, refs["c"])
    assert code == 0 and c is not None and c["cache_hit"] is False
    got = owners(cache)
    # Every directory 2775 with the shared group, every mutable file 0664 with it, whoever made it.
    assert {k: (gid, mode) for k, (_, gid, mode) in got.items()} == {
        k: (LOADER, "2775" if (cache / k).is_dir() else "0664") for k in got}
    assert {k for k in got if (cache / k).is_dir()} == {".", *CACHE_DIRS, "pods/pod-1", "pods/pod-2", "pods/pod-3"}
    made_by = {a["digest"]: 0, b["digest"]: LOADER, c["digest"]: 0}
    for digest, uid in made_by.items():
        assert got[f"meta/{digest[7:]}.json"][0] == uid
        assert _owner(cache / contract.MODELS_DIR / digest[7:]) == (uid, LOADER, "0555")
    assert got["locks/gc"] == (0, LOADER, "0664")  # made by uid 0, locked by both since
    assert {k: v for k, v in got.items() if k.startswith("pods/")} == {
        "pods/pod-1": (0, LOADER, "2775"), "pods/pod-2": (LOADER, LOADER, "2775"), "pods/pod-3": (0, LOADER, "2775")}


@pytest.mark.parametrize("first, second", [(0, LOADER), (LOADER, 0)], ids=["uid0-then-65532", "65532-then-uid0"])
def test_another_uids_partial_download_is_downloaded_again_not_resumed(area, registry, pusher, first, second):
    """A loader killed after its last byte leaves partial/<hex> with a state saying every range is done. A loader of
    another uid resumed it, hashed it, and could not publish it: making the blob read-only is for its owner alone
    (EPERM, exit 9, at every pull until the owner came back or gc removed it after 24 h; review, seventh session).
    Now it downloads the blob itself; the other uid's partial is replaced (the group may remove it)."""
    refs = push_models(registry, pusher, "seed", "xuid")
    cache = area / "cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, first, LOADER)
    code, _, _ = pull(first, LOADER, area, cache, refs["seed"])
    assert code == 0
    data = b"weights of xuid"
    hexd = __import__("hashlib").sha256(data).hexdigest()
    partial = cache / contract.PARTIAL_DIR / hexd
    partial.write_bytes(data)
    partial.with_name(hexd + ".state").write_text(json.dumps(
        {"digest": f"sha256:{hexd}", "size": len(data), "ranges": [[0, len(data), len(data)]]}))
    for path in (partial, partial.with_name(hexd + ".state")):
        os.chown(path, first, LOADER)
        os.chmod(path, 0o664)
    code, res, term = pull(second, LOADER, area, cache, refs["xuid"])
    assert code == 0 and res is not None, term
    assert (Path(res["path"]) / "w.bin").read_bytes() == data
    assert _owner(cache / "blobs/sha256" / hexd) == (second, LOADER, "0444")
    assert sorted(os.listdir(cache / contract.PARTIAL_DIR)) == []


@pytest.mark.parametrize("first, second", [(0, LOADER), (LOADER, 0)], ids=["uid0-then-65532", "65532-then-uid0"])
def test_a_model_sharing_a_blob_another_uid_published_gets_a_copy_of_it(area, registry, pusher, first, second):
    # fs.protected_hardlinks (on by default, and here) lets a process hard-link only a file it owns or may write
    # (or with CAP_FOWNER, which the injected loader drops): a blob another uid published is neither (0444, theirs), so
    # the second model's tree gets a copy of it (EPERM is handled like EMLINK), not exit 9.
    assert Path("/proc/sys/fs/protected_hardlinks").read_text() == "1\n"
    shared, own = b"tokenizer shared by both models", {"a": b"weights of a", "b": b"weights of b"}
    refs = {}
    for name in ("a", "b"):
        pusher.push_artifact(f"own/shared-{name}", "v1",
                             [file_layer("tokenizer.json", shared), file_layer("w.bin", own[name])],
                             config=f'{{"model": "{name}"}}'.encode())
        refs[name] = f"{registry.host}/own/shared-{name}:v1"
    cache = area / "node-cache"
    cache.mkdir(mode=0o755)
    os.chown(cache, 0, LOADER)
    os.chmod(cache, 0o2775)
    code, a, _ = pull(first, LOADER, area, cache, refs["a"])
    assert code == 0 and a is not None and a["cache_hit"] is False
    code, b, term = pull(second, LOADER, area, cache, refs["b"])
    assert code == 0 and b is not None and b["cache_hit"] is False, term
    blobs = {p.read_bytes(): os.lstat(p) for p in (cache / contract.BLOBS_DIR).iterdir()}
    assert {data: st.st_uid for data, st in blobs.items() if data in (shared, *own.values())} == {
        shared: first, own["a"]: first, own["b"]: second}
    trees = {name: Path(out["path"]) for name, out in (("a", a), ("b", b))}
    for name, tree in trees.items():
        # The whole tree, exact: same bytes and modes whichever way each file got there.
        assert {str(p.relative_to(tree)): (p.read_bytes(), f"{stat.S_IMODE(os.lstat(p).st_mode):04o}")
                for p in tree.rglob("*")} == {"tokenizer.json": (shared, "0444"), "w.bin": (own[name], "0444")}
        # A model's own blob is linked into its tree (one inode); the shared one is linked only where its owner
        # pulled, copied where the other uid did.
        assert os.lstat(tree / "w.bin").st_ino == blobs[own[name]].st_ino
    assert os.lstat(trees["a"] / "tokenizer.json").st_ino == blobs[shared].st_ino
    copy = os.lstat(trees["b"] / "tokenizer.json")
    assert copy.st_ino != blobs[shared].st_ino and copy.st_nlink == 1 and copy.st_uid == second


def test_a_cache_an_older_loader_left_is_exit_9_until_the_documented_fix(area, registry, pusher):
    refs = push_models(registry, pusher, "old", "new")
    cache = area / "old-cache"
    cache.mkdir(mode=0o755)
    code, old, _ = pull(0, 0, area, cache, refs["old"])
    assert code == 0 and old is not None
    # What a loader before this change left (uid 0, umask 022): root's group, 0755 directories, 0644 files.
    for path in [cache, *cache.rglob("*")]:
        if path.is_symlink() or path.is_relative_to(cache / contract.MODELS_DIR / old["digest"][7:]):
            continue
        if path.is_dir():
            os.chmod(path, 0o755)
        elif stat.S_IMODE(path.stat().st_mode) & 0o200:
            os.chmod(path, 0o644)
    assert owners(cache)["locks/gc"] == (0, 0, "0644")
    code, _, term = pull(LOADER, LOADER, area, cache, refs["old"])
    assert code == 9
    # The hit's first write: lastuse/ is root's 0755 (its lock files still lock: they are opened read-only).
    assert re.fullmatch(
        rf"CachePermissionError: permission denied on {cache}/tmp/\.{old['digest'][7:]}\.[0-9a-f]{{8}}: its directory"
        rf" {cache}/tmp is owned by uid 0 gid 0 mode 0755; model-loader runs as uid {LOADER} gid {LOADER} \(groups"
        rf" {LOADER}\)\. Every loader .*fsGroup where the volume supports it\n", term), term
    # The fix README gives, run once as root; then both the hit and a new pull work under uid 65532.
    subprocess.run(["sh", "-c", FIX], env={"PATH": os.environ["PATH"], "CACHE": str(cache), "GID": str(LOADER)},
                   check=True)
    # A lock file and a lastuse file another uid made 0644 (the issue's `locks/gc`) no longer stop anyone.
    os.chmod(cache / contract.LOCKS_DIR / "gc", 0o644)
    os.chmod(cache / contract.LASTUSE_DIR / old["digest"][7:], 0o644)
    code, hit, _ = pull(LOADER, LOADER, area, cache, refs["old"])
    assert code == 0 and hit is not None and (hit["cache_hit"], hit["digest"]) == (True, old["digest"])
    assert _owner(cache / contract.LASTUSE_DIR / old["digest"][7:]) == (LOADER, LOADER, "0664")  # replaced, ours
    assert _owner(cache / contract.LOCKS_DIR / "gc") == (0, LOADER, "0644")  # locked through, untouched
    code, new, _ = pull(LOADER, LOADER, area, cache, refs["new"])
    assert code == 0 and new is not None and new["cache_hit"] is False
    assert all(gid == LOADER for _, gid, _ in owners(cache).values())
    # Published content kept its read-only modes through the fix.
    assert _owner(cache / contract.MODELS_DIR / old["digest"][7:]) == (0, LOADER, "0555")
    assert {stat.S_IMODE(p.stat().st_mode) for p in (cache / contract.BLOBS_DIR).iterdir()} == {0o444}


def test_readme_gives_the_fix_the_tests_run():
    readme = (ROOT / "README.md").read_text()
    operations = (ROOT / "docs" / "operations.md").read_text()
    for text in (readme, operations):
        assert "exit 9" in text.lower() and "Who owns the cache" in text
    assert FIX in operations


def _blob_hexes(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / contract.BLOBS_DIR).iterdir())

