"""Tar layers written by an attacker, extracted by ``layout.materialize`` into a staging directory of a real cache.

Each test builds a small world on disk: a cache root holding another tenant's blob and published model and a
writable file (what a read-only chmod through an escaped link would hit), the staging directory inside the cache,
and a sentinel directory outside the cache standing for the node. Every hostile layer is refused with the right
error and exit code, and the whole world outside the staging directory is compared before and after: names,
types, modes, link counts, sizes, times and bytes. Honest layers give exact trees and modes. The disk-full tests
mount a real tmpfs (root only).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loader import contract, layout
from loader.digest import Digest, InvalidDigest
from loader.errors import ArtifactError, LoaderError, NoSpaceError
from loader.oci import parse_manifest
from tests.support.files import tree
from tests.support.hostile_tar import TarLayer, bomb

REF = "reg.example/tenant-b/model:v1"
TAR_MT = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPES = {None: TAR_MT, "gzip": TAR_MT + "+gzip", "zstd": TAR_MT + "+zstd"}
VICTIM = b"tenant A's private weights"
VICTIM_HEX = hashlib.sha256(VICTIM).hexdigest()
T = TarLayer


# ---- the world on disk -----------------------------------------------------------------------------------------
@dataclass
class World:
    base: Path
    cache: Path = field(init=False)
    staging: Path = field(init=False)
    outside: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cache = self.base / "cache"
        self.outside = self.base / "outside"
        (self.outside / "sub").mkdir(parents=True)
        (self.outside / "secret").write_bytes(b"node secret")
        os.chmod(self.outside / "secret", 0o600)
        (self.outside / "sub" / "writable").write_bytes(b"writable node file")
        for d in ("blobs/sha256", "models/sha256", "refs", "locks", "tmp", "meta"):
            (self.cache / d).mkdir(parents=True)
        victim = self.blob(VICTIM)
        model = self.cache / "models/sha256" / VICTIM_HEX
        model.mkdir()
        os.link(victim, model / "w.bin")
        os.chmod(model, 0o555)
        (self.cache / "writable-sentinel").write_bytes(b"must stay writable")
        self.staging = self.cache / contract.TMP_DIR / "stage-test"
        self.staging.mkdir()

    def blob(self, data: bytes) -> Path:
        path = self.blob_path(Digest.of(data))
        if not path.exists():
            path.write_bytes(data)
            os.chmod(path, 0o444)
        return path

    def blob_path(self, digest: str) -> Path:
        return self.cache / "blobs/sha256" / Digest.parse(digest, "test").hex

    def snapshot(self) -> dict[str, tuple[Any, ...]]:
        """Everything outside the staging directory, as (type, mode, links, size, mtime, bytes or target)."""
        out: dict[str, tuple[Any, ...]] = {}
        for top in (self.cache, self.outside):
            for dirpath, dirnames, filenames in os.walk(top):
                if Path(dirpath) == self.staging.parent:
                    dirnames.remove(self.staging.name)
                for name in [".", *dirnames, *filenames]:
                    p = Path(dirpath) / name
                    st = os.lstat(p)
                    if stat.S_ISREG(st.st_mode):
                        content: Any = hashlib.sha256(p.read_bytes()).hexdigest()
                    elif stat.S_ISLNK(st.st_mode):
                        content = os.readlink(p)
                    else:
                        content = None
                    out[str(p.relative_to(self.base))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                          st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ino, content)
        return out

    def inodes_outside(self) -> set[tuple[int, int]]:
        found = set()
        for top in (self.cache, self.outside):
            for dirpath, dirnames, filenames in os.walk(top):
                if Path(dirpath) == self.staging.parent:
                    dirnames.remove(self.staging.name)
                for name in filenames:
                    st = os.lstat(Path(dirpath) / name)
                    found.add((st.st_dev, st.st_ino))
        return found

    def inodes_staged(self) -> set[tuple[int, int]]:
        found = set()
        for dirpath, _, filenames in os.walk(self.staging):
            for name in filenames:
                st = os.lstat(Path(dirpath) / name)
                found.add((st.st_dev, st.st_ino))
        return found


def tar_layer(title: str, tar: TarLayer | bytes, compress: str | None = None, kind: str = "tar") -> dict[str, Any]:
    return {"title": title, "tar": tar, "compress": compress, "kind": kind}


def file_layer(title: str, data: bytes) -> dict[str, Any]:
    return {"title": title, "tar": data, "compress": None, "kind": "file"}


def descriptors(world: World, layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for spec in layers:
        tar = spec["tar"]
        data = tar.bytes(spec["compress"]) if isinstance(tar, TarLayer) else tar
        world.blob(data)
        ann = {layout.TITLE: spec["title"]}
        mt = "application/octet-stream"
        if spec["kind"] == "tar":
            ann[layout.ORAS_UNPACK] = "true"
            mt = MEDIA_TYPES[spec["compress"]]
        out.append({"mediaType": mt, "digest": str(Digest.of(data)), "size": len(data), "annotations": ann})
    return out


def materialize(world: World, layers: list[dict[str, Any]], **kw: Any) -> tuple[int, int]:
    entries = layout.layer_entries({"layers": descriptors(world, layers)}, REF)
    return layout.materialize(entries, world.staging, world.blob_path, REF, **kw)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# ---- hostile layers ------------------------------------------------------------------------------------------
# With a -> ., from a layer extracted into staging/m (entries not under the title "m"): UP is the cache root (the
# reported chain), UP4 the world's base, where the sentinel directory "outside" is.
UP = "a/a/a/../../.."
UP4 = "a/a/a/a/../../../.."


def _pax(name: str, kind: bytes, **pax: str) -> TarLayer:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.pax_headers = pax
    return T().add(info)


def _chain(n: int) -> TarLayer:
    t = T().file("m/end", b"end")
    for i in range(n):
        t.symlink(f"m/l{i}", f"l{i + 1}" if i + 1 < n else "end")
    return t


def _many(n: int, under: str = "m/d") -> TarLayer:
    t = T()
    for i in range(n):
        t.file(f"{under}/f{i:03}", b"")
    return t


@dataclass(frozen=True)
class Case:
    layers: list[dict[str, Any]]
    error: type[LoaderError]
    fragment: str
    entry: str | None = None  # the entry the message must name
    kw: Callable[[World], dict[str, Any]] = lambda world: {}


HOSTILE: dict[str, Case] = {
    **{
        f"symlink-chain-then-hardlink-to-cache-blob-{c or 'plain'}": Case(
            [tar_layer("m", T().symlink("a", ".").symlink("up", UP).hardlink("x", f"up/blobs/sha256/{VICTIM_HEX}"), c)],
            ArtifactError, f"is a symlink to {UP!r}, which could escape the model", "up")
        for c in (None, "gzip", "zstd")
    },
    "symlink-chain-declared-before-its-link": Case(
        [tar_layer("m", T().symlink("up", UP4).symlink("a", ".").hardlink("x", "up/outside/secret"))],
        ArtifactError, "could escape the model", "up"),
    "symlink-chain-then-file-written-through-it": Case(
        [tar_layer("m", T().symlink("a", ".").symlink("up", UP4).file("up/outside/planted", b"pwned"), "zstd")],
        ArtifactError, "could escape the model", "up"),
    "symlink-chain-split-over-two-layers": Case(
        [tar_layer("m", T().symlink("m/a", "."), "gzip"),
         tar_layer("m", T().symlink("m/up", UP).hardlink("m/x", f"m/up/blobs/sha256/{VICTIM_HEX}"))],
        ArtifactError, "could escape the model", "m/up"),
    "hardlink-through-a-symlink-to-dot": Case(
        [tar_layer("m", T().symlink("m/a", ".").file("m/f").hardlink("m/h", "m/a/f"))],
        ArtifactError, "would be reached through the symlink 'm/a'", "m/h"),
    "symlink-absolute": Case(
        [tar_layer("m", T().symlink("m/l", "/etc/passwd"))], ArtifactError, "absolute path '/etc/passwd'", "m/l"),
    "symlink-climbs-past-the-root": Case(
        [tar_layer("m", T().symlink("m/l", "../../outside"), "zstd")], ArtifactError, "escapes the model", "m/l"),
    "symlink-climbs-past-a-layer-root": Case(
        [tar_layer("tok", T().symlink("l", "../w"))], ArtifactError, "escapes the model", "l"),
    "symlink-dotdot-after-a-name": Case(
        [tar_layer("m", T().dir("m/d").symlink("m/l", "d/../.."))], ArtifactError, "could escape the model", "m/l"),
    "symlink-loop": Case(
        [tar_layer("m", T().symlink("m/l1", "l2").symlink("m/l2", "l1"))], ArtifactError, "part of a loop", "m/l1"),
    "symlink-to-itself": Case(
        [tar_layer("m", T().symlink("m/l", "l"), "gzip")], ArtifactError, "part of a loop", "m/l"),
    "symlink-chain-of-41": Case(
        [tar_layer("m", _chain(41))], ArtifactError, "chain of more than 40 links"),
    "symlink-target-empty": Case(
        [tar_layer("m", T().symlink("m/l", ""))], ArtifactError, "is empty or contains a NUL byte", "m/l"),
    "symlink-target-with-nul": Case(
        [tar_layer("m", _pax("m/l", tarfile.SYMTYPE, linkpath="ok\x00/../../etc"))], ArtifactError,
        "is empty or contains a NUL byte", "m/l"),
    "hardlink-to-a-symlink": Case(
        [tar_layer("m", T().file("m/f").symlink("m/l", "f").hardlink("m/h", "m/l"))],
        ArtifactError, "which is a symlink", "m/h"),
    "hardlink-to-a-directory": Case(
        [tar_layer("m", T().dir("m/d").hardlink("m/h", "m/d"))], ArtifactError, "which is a directory", "m/h"),
    "hardlink-to-nothing": Case(
        [tar_layer("m", T().hardlink("m/h", "m/nothing"))], ArtifactError, "which is nothing extracted yet", "m/h"),
    "hardlink-dotdot": Case(
        [tar_layer("m", T().hardlink("m/h", f"../../blobs/sha256/{VICTIM_HEX}"))], ArtifactError, "contains '..'", "m/h"),
    "hardlink-absolute": Case(
        [tar_layer("m", T().hardlink("m/h", "/etc/passwd"))], ArtifactError, "is an absolute path", "m/h"),
    "file-under-a-dir-symlink": Case(
        [tar_layer("m", T().dir("m/d").symlink("m/s", "d").file("m/s/x"), "zstd")],
        ArtifactError, "would be written through the symlink 'm/s'", "m/s/x"),
    "dir-under-a-dir-symlink": Case(
        [tar_layer("m", T().symlink("m/s", ".").dir("m/s/d"))],
        ArtifactError, "would be written through the symlink 'm/s'", "m/s/d"),
    "file-replaces-a-symlink": Case(
        [tar_layer("m", T().file("m/f").symlink("m/l", "f").file("m/l", b"replaced"))],
        ArtifactError, "is written twice", "m/l"),
    "symlink-replaces-a-file": Case(
        [tar_layer("m", T().file("m/f").symlink("m/f", "g"))], ArtifactError, "is written twice", "m/f"),
    "dir-replaces-a-symlink": Case(
        [tar_layer("m", T().symlink("m/l", ".").dir("m/l"))],
        ArtifactError, "would be written through the symlink 'm/l'", "m/l"),
    "hardlink-replaces-a-file": Case(
        [tar_layer("m", T().file("m/f").file("m/g").hardlink("m/g", "m/f"))], ArtifactError, "is written twice", "m/g"),
    "duplicate-file": Case(
        [tar_layer("m", T().file("m/f", b"1").file("m/f", b"2"), "gzip")], ArtifactError, "is written twice", "m/f"),
    "file-under-a-file": Case(
        [tar_layer("m", T().file("m/f").file("m/f/x"))], ArtifactError, "needs 'm/f' to be a directory", "m/f/x"),
    "parent-is-a-symlink-from-an-earlier-layer": Case(
        [tar_layer("m", T().symlink("m/l", ".")), tar_layer("m/l/sub", T().file("m/l/sub/x"), "zstd")],
        ArtifactError, "would be written through the symlink 'm/l'", "m/l/sub/x"),
    "file-layer-through-a-symlink-from-a-tar": Case(
        [tar_layer("m", T().symlink("m/l", ".")), file_layer("m/l/w.bin", b"weights")],
        ArtifactError, "would be written through the symlink 'm/l'", "m/l/w.bin"),
    "char-device": Case([tar_layer("m", T().device("m/null"))], ArtifactError, "is a device or fifo", "m/null"),
    "block-device": Case(
        [tar_layer("m", T().device("m/sda", tarfile.BLKTYPE))], ArtifactError, "is a device or fifo", "m/sda"),
    "fifo": Case([tar_layer("m", T().fifo("m/pipe"), "gzip")], ArtifactError, "is a device or fifo", "m/pipe"),
    "absolute-name": Case(
        [tar_layer("m", T().file("/etc/cron.d/x"))], ArtifactError, "is an absolute path", "/etc/cron.d/x"),
    "dotdot-name": Case([tar_layer("m", T().file("m/../../x"))], ArtifactError, "contains '..'", "m/../../x"),
    "nul-in-a-pax-name": Case(
        [tar_layer("m", _pax("m/a\x00b", tarfile.REGTYPE, path="m/a\x00/../../b"))], ArtifactError, "contains a NUL byte"),
    "non-utf8-name": Case([tar_layer("m", T().file("m/caf\udce9"))], ArtifactError, "is not valid UTF-8"),
    "name-over-path-max": Case(
        [tar_layer("m", T().file("m/" + "/".join(["n" * 200] * 25)))], ArtifactError, "bytes long, over 4095"),
    "component-over-name-max": Case(
        [tar_layer("m", T().file("m/" + "n" * 300))], ArtifactError, "is longer than 255 bytes"),
    "name-too-deep": Case(
        [tar_layer("m", T().file("m/" + "d/" * 200 + "f"))], ArtifactError, "components, over 128"),
    "hard-link-to-a-file-layer": Case(
        [file_layer("w.bin", b"weights"), tar_layer("cfg", T().hardlink("cfg/w", "w.bin"))], ArtifactError,
        "a file of another layer (one of the cache's shared blobs)", "cfg/w"),
    "gnu-sparse-file": Case([tar_layer("m", T().gnu_sparse("m/s"))], ArtifactError, "is a GNU sparse file", "m/s"),
    "pax-sparse-file": Case(
        [tar_layer("m", T().pax_sparse("m/s", b"data", 1 << 40), "zstd")], ArtifactError, "is a GNU sparse file", "m/s"),
    "pax-header-of-2-mib": Case(
        [tar_layer("m", T().file("m/f", pax={"comment": "x" * (2 << 20)}), "zstd")],
        ArtifactError, "has an extension header of 2097"),
    "pax-header-chain": Case(
        [tar_layer("m", T().pax_chain(50).file("m/f"))], ArtifactError, "more than 16 extension headers in a row"),
    "not-a-tar": Case([tar_layer("m", b"no tar at all" * 100)], ArtifactError, "is not a readable tar archive"),
    "corrupt-gzip": Case(
        [tar_layer("m", T().file("m/f", os.urandom(4096)).bytes("gzip")[:40] + b"\x00garbage" * 64, "gzip")],
        ArtifactError, "is not a readable tar archive"),
    "truncated-zstd": Case(
        [tar_layer("m", T().file("m/f", os.urandom(1 << 16)).bytes("zstd")[: 1 << 15], "zstd")],
        ArtifactError, "is not a readable tar archive"),
    "too-many-entries": Case(
        [tar_layer("m", T().dir("m").dir("m/d"), "gzip"), tar_layer("m/d", _many(99), "zstd")],
        ArtifactError, "past 100 tar entries", kw=lambda world: {"max_entries": 100}),
    "zstd-bomb-over-the-budget": Case(
        [tar_layer("m", bomb({"m/w.bin": 64 << 20}), "zstd")],
        NoSpaceError, "budget of 1.0 MB", "m/w.bin",
        kw=lambda world: {"budget": layout.ExpansionBudget(world.staging, REF, limit=1_000_000)}),
    "gzip-bomb-of-many-files-over-the-budget": Case(
        [tar_layer("m", bomb({f"m/f{i}": 1 << 20 for i in range(16)}, "gzip"), "gzip")],
        NoSpaceError, "budget of 8.0 MB", kw=lambda world: {"budget": layout.ExpansionBudget(world.staging, REF,
                                                                                            limit=8_000_000)}),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_layer_is_refused_and_nothing_outside_staging_changes(case: str, world: World) -> None:
    spec = HOSTILE[case]
    descs = descriptors(world, spec.layers)  # the blobs are in the cache before the snapshot
    before, outside_inodes = world.snapshot(), world.inodes_outside()
    entries = layout.layer_entries({"layers": descs}, REF)
    with pytest.raises(LoaderError) as e:
        layout.materialize(entries, world.staging, world.blob_path, REF, **spec.kw(world))
    assert type(e.value) is spec.error, e.value
    assert e.value.exit_code == spec.error.exit_code == (6 if spec.error is NoSpaceError else 8)
    msg = str(e.value)
    assert spec.fragment in msg
    assert msg.startswith(REF) and "layer '" in msg, msg
    if spec.entry is not None:
        assert repr(spec.entry) in msg, msg
    if case == "hard-link-to-a-file-layer":  # the file layer before it linked its blob into staging: one more link
        key = str(world.blob_path(Digest.of(b"weights")).relative_to(world.base))
        kind, mode, nlink, *rest = before[key]
        before[key] = (kind, mode, nlink + 1, *rest)
    assert world.snapshot() == before
    if case != "hard-link-to-a-file-layer":
        assert not world.inodes_staged() & outside_inodes
    assert sorted(os.listdir(world.base)) == ["cache", "outside"]


def test_escape_chain_is_refused_even_though_each_target_is_lexically_inside(world: World) -> None:
    """The defect as reported: ``up -> a/a/a/../../..`` normalises to ``.``, but the kernel resolves each ``a``
    before the ``..`` after it. The link is refused before it exists, so nothing can be reached through it."""
    assert os.path.normpath(UP) == "."  # what the old lexical check saw: nothing wrong
    descs = descriptors(world, [tar_layer("m", T().symlink("a", ".").symlink("up", UP).hardlink("x", "up/writable-sentinel"))])
    before = world.snapshot()
    with pytest.raises(ArtifactError):
        layout.materialize(layout.layer_entries({"layers": descs}, REF), world.staging, world.blob_path, REF)
    assert tree(world.staging) == {"m/a": "link:."}  # the harmless first link, and nothing after it
    assert world.snapshot() == before


# ---- honest layers ---------------------------------------------------------------------------------------------
B1 = bytes(range(256)) * 40
LONG = "n" * 200
HONEST: dict[str, tuple[list[dict[str, Any]], dict[str, bytes | str]]] = {
    "nested-dirs": (
        [tar_layer("m", T().dir("m").file("m/a.txt", b"A").dir("m/sub").file("m/sub/b.bin", B1)
                   .file("m/sub/deeper/c", b"C").dir("m/empty"))],
        {"m/a.txt": b"A", "m/sub/b.bin": B1, "m/sub/deeper/c": b"C", "m/empty": "dir"}),
    "symlinks-to-siblings": (
        [tar_layer("t", T().file("t/real.json", b"{}").symlink("t/alias.json", "real.json")
                   .symlink("t/sub/up.json", "../real.json").symlink("t/sub/here", "./../sub")
                   .symlink("t/dir-link", "sub").symlink("t/dangling", "not-there"))],
        {"t/real.json": b"{}", "t/alias.json": "link:real.json", "t/sub/up.json": "link:../real.json",
         "t/sub/here": "link:./../sub", "t/dir-link": "link:sub", "t/dangling": "link:not-there"}),
    "hardlink-to-an-earlier-file": (
        [tar_layer("m", T().file("m/f", b"shared").hardlink("m/sub/g", "m/f"))],
        {"m/f": b"shared", "m/sub/g": b"shared"}),
    "executable-bits": (
        [tar_layer("m", T().file("m/run.sh", b"#!/bin/sh\n", 0o755).file("m/owner-x", b"x", 0o700)
                   .file("m/data", b"d", 0o600).file("m/world-w", b"w", 0o666))],
        {"m/run.sh": b"#!/bin/sh\n", "m/owner-x": b"x", "m/data": b"d", "m/world-w": b"w"}),  # all 0444: see below
    "long-pax-names": (
        [tar_layer("m", T().file(f"m/{LONG}/{LONG}.json", b"long"))], {f"m/{LONG}/{LONG}.json": b"long"}),
    "not-under-the-title": (
        [tar_layer("tok", T().file("a.txt", b"A").file("d/b.txt", b"B").symlink("d/c", "../a.txt"))],
        {"tok/a.txt": b"A", "tok/d/b.txt": b"B", "tok/d/c": "link:../a.txt"}),
    "dot-slash-names": (
        [tar_layer("m", T().dir("./").file("./a", b"a").dir("./d/").file("./d/b", b"b"))],
        {"m/a": b"a", "m/d/b": b"b"}),
}


@pytest.mark.parametrize("compress", [None, "gzip", "zstd"], ids=["plain", "gzip", "zstd"])
@pytest.mark.parametrize("case", list(HONEST), ids=list(HONEST))
def test_honest_layer_gives_the_exact_tree(case: str, compress: str | None, world: World) -> None:
    layers, expected = HONEST[case]
    layers = [dict(spec, compress=compress) if spec["kind"] == "tar" else spec for spec in layers]
    descs = descriptors(world, layers)
    before = world.snapshot()
    nbytes, nfiles = layout.materialize(layout.layer_entries({"layers": descs}, REF), world.staging,
                                        world.blob_path, REF)
    assert tree(world.staging) == expected
    assert nfiles == sum(1 for v in expected.values() if v != "dir")
    inodes: dict[int, int] = {}  # bytes count once per inode: a hard link adds none
    for rel, v in expected.items():
        if isinstance(v, bytes):
            inodes[os.stat(world.staging / rel).st_ino] = len(v)
    assert nbytes == sum(inodes.values())
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, dirnames, filenames in os.walk(world.staging):
        for d in dirnames:
            st = os.lstat(Path(dirpath) / d)
            if stat.S_ISDIR(st.st_mode):
                assert stat.S_IMODE(st.st_mode) == 0o755 & ~umask
        for f in filenames:
            p = Path(dirpath) / f
            rel = str(p.relative_to(world.staging))
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                # One mode rule for every layer kind (layout.FILE_MODE): a tar's executable and write bits
                # are dropped, as a raw layer's file (the cache's 0444 blob) has none.
                assert stat.S_IMODE(st.st_mode) == 0o444, rel
    # Extraction changed nothing outside staging; a file layer only adds links to its own blob.
    assert world.snapshot() == before
    if case == "hardlink-to-an-earlier-file":
        assert os.stat(world.staging / "m/f").st_ino == os.stat(world.staging / "m/sub/g").st_ino
    assert not world.inodes_staged() & world.inodes_outside()


# ---- digests -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("digest", [
    "sha256:" + ("../../refs/x/" + "./" * 40)[:60] + "w.bi",
    "sha256:" + "A" * 64,
    "sha512:" + "a" * 64,
    "sha256:" + "a" * 63,
    12,
], ids=["path-shaped", "uppercase", "sha512", "short", "not-a-string"])
@pytest.mark.parametrize("titled", [True, False], ids=["titled", "untitled"])
def test_layer_digests_are_parsed_with_the_digest_type(digest: object, titled: bool) -> None:
    ann = {layout.TITLE: "w.bin"} if titled else {}
    manifest = {"layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": 1, "annotations": ann}]}
    with pytest.raises(InvalidDigest) as e:
        layout.layer_entries(manifest, REF)
    assert e.value.exit_code == 8
    assert str(e.value).startswith(f"{REF}: layer 0")


def test_layer_entries_takes_the_manifest_json_or_the_parsed_manifest() -> None:
    d = Digest.of(b"w")
    raw = (b'{"schemaVersion": 2, "layers": [{"mediaType": "application/octet-stream", "digest": "' + d.encode()
           + b'", "size": 1, "annotations": {"org.opencontainers.image.title": "./w.bin"}}]}')
    from_json = layout.layer_entries(json.loads(raw), REF)
    from_parsed = layout.layer_entries(parse_manifest(raw, Digest.of(raw), "", REF), REF)
    assert from_json == from_parsed == [layout.Entry("w.bin", "file", d, 1, "application/octet-stream")]
    assert type(from_json[0].digest) is Digest


# ---- a real small disk -----------------------------------------------------------------------------------------
@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    assert mounted.returncode == 0, f"root could not mount the test's tmpfs: {mounted.stderr.strip()}"
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("layer", [
    tar_layer("m", bomb({"m/w.bin": 32 << 20}), "zstd"),
    tar_layer("m", bomb({f"m/f{i}": 1 << 20 for i in range(12)}, "gzip"), "gzip"),
], ids=["zstd-one-32-mib-file", "gzip-twelve-1-mib-files"])
@pytest.mark.needs_root
@pytest.mark.skipif(os.geteuid() != 0, reason="fills a real disk: a tmpfs it mounts, and only root may mount one")
def test_bomb_on_a_small_disk_stops_before_the_disk_is_full(layer: dict[str, Any], tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "size=8m") as disk:
        world = World(disk)
        descs = descriptors(world, [layer])
        before = world.snapshot()
        with pytest.raises(NoSpaceError) as e:
            layout.materialize(layout.layer_entries({"layers": descs}, REF), world.staging, world.blob_path, REF)
        msg = str(e.value)
        assert e.value.exit_code == 6
        assert msg.startswith(REF) and "layer 'm'" in msg and str(disk) in msg and "model-loader gc" in msg, msg
        reserve = layout.default_reserve(8 << 20)
        assert free_bytes(disk) >= reserve > 0  # stopped with the reserve still free
        assert world.snapshot() == before


@pytest.mark.needs_root
@pytest.mark.skipif(os.geteuid() != 0, reason="fills a real disk: a tmpfs it mounts, and only root may mount one")
def test_enospc_during_extraction_is_no_space_error_not_a_traceback(tmp_path: Path) -> None:
    """Out of inodes (bytes to spare): the kernel's ENOSPC becomes NoSpaceError (exit 6) naming the entry."""
    with tmpfs(tmp_path / "disk", "size=8m,nr_inodes=64") as disk:
        world = World(disk)
        descs = descriptors(world, [tar_layer("m", _many(200, "m"), "zstd")])
        before = world.snapshot()
        with pytest.raises(NoSpaceError) as e:
            layout.materialize(layout.layer_entries({"layers": descs}, REF), world.staging, world.blob_path, REF)
        msg = str(e.value)
        assert e.value.exit_code == 6 and isinstance(e.value.__cause__, OSError)
        assert msg.startswith(REF) and "in layer 'm'" in msg and "filled up" in msg and "model-loader gc" in msg, msg
        assert world.snapshot() == before


@pytest.mark.needs_root
@pytest.mark.skipif(os.geteuid() != 0, reason="fills a real disk: a tmpfs it mounts, and only root may mount one")
def test_budget_rereads_free_space_and_stops_with_the_reserve_left(tmp_path: Path) -> None:
    """Charged chunk by chunk while writing, with another tenant filling the same disk in between."""
    chunk, reserve, every = 64 << 10, 1 << 20, 256 << 10
    with tmpfs(tmp_path / "disk", "size=8m") as disk:
        budget = layout.ExpansionBudget(disk, REF, reserve, check_every=every)
        written = 0
        with open(disk / "extracted", "wb") as out, pytest.raises(NoSpaceError) as e:
            while True:
                budget.charge(chunk, "layer 'm' entry 'w.bin'")
                out.write(bytes(chunk))
                out.flush()
                written += chunk
                if written == 2 << 20:
                    (disk / "other-tenant").write_bytes(bytes(3 << 20))
        assert e.value.exit_code == 6
        assert f"{REF}: layer 'm' entry 'w.bin' needs 0.1 MB more" in str(e.value)
        assert budget.charged == written
        # Seen within one re-read of the other tenant's write; never below the reserve by more than that.
        assert free_bytes(disk) >= reserve - every
        assert written <= (8 << 20) - (3 << 20) - reserve + every
