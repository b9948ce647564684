"""The same tree on every path. For each artifact shape, pushed to a real registry: the exact tree model-loader pull
publishes (names, bytes, modes) and the tree an image volume shows, computed by :func:`image_volume_tree` from the
runtime's documented rules; where the two differ, the difference is a row of docs/architecture.md's table ("The
same tree on both paths"), named by the case."""

from __future__ import annotations

import gzip
import io
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from loader import layout
from loader.errors import ArtifactError
from loader.log import Logger, NullLogger
from loader.pull import PullOptions, pull
from tests.support.oci import FILEPATH, TITLE, UNPACK, Layer, sha256

LOG = NullLogger()
MP = "application/vnd.cncf.model"
ORAS_FILE = "application/vnd.oci.image.layer.v1.tar"  # oras' type for a raw file, despite the name
ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"

Tree = dict[str, tuple[int, bytes | None]]  # relative path -> (mode, bytes), or (mode, None) for a directory


# ---- the image volume, from the runtime's rules ------------------------------------------------------------------
def secure_join(name: str) -> str:
    """Where a name lands inside the mount: CRI-O joins it with filepath-securejoin, which on a path that does not
    exist yet is lexical, with '..' stopping at the root (so '../x' and '/x' are both 'x'). '' is the mount root."""
    out: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if out:
                out.pop()
        elif part not in ("", "."):
            out.append(part)
    return "/".join(out)


def image_volume_tree(layers: list[Layer]) -> Tree | str:
    """What CRI-O shows for an artifact mounted as an image volume: each layer's blob, bind-mounted read-only as a
    file named by its title when that key is present (even empty), else by its org.cncf.model.filepath, joined
    inside the mount; a layer with no name, or an empty one, is skipped (with a warning in CRI-O's log); a later
    layer of the same name is mounted over an earlier one. A blob shows 0644 and the directories the runtime
    creates for nested names 0755. A string: the container cannot be created, and why."""
    mounts: dict[str, bytes] = {}
    for layer in layers:
        ann = layer.annotations
        name = ann[TITLE] if TITLE in ann else ann.get(FILEPATH, "")
        if not name:
            continue
        dest = secure_join(name)
        if not dest:
            return f"{name!r} names the mount itself, which is a directory: a file cannot be mounted on it"
        mounts[dest] = layer.data
    for dest in mounts:
        parent = dest.rpartition("/")[0]
        while parent:
            if parent in mounts:
                return f"{parent!r} is mounted as a file and is needed as the directory of {dest!r}"
            parent = parent.rpartition("/")[0]
    return with_dirs(mounts, 0o644, 0o755)


def with_dirs(files: dict[str, bytes], file_mode: int, dir_mode: int) -> Tree:
    out: Tree = {}
    for rel, data in files.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            out["/".join(parts[:i])] = (dir_mode, None)
        out[rel] = (file_mode, data)
    return out


def loader(files: dict[str, bytes]) -> Tree:
    """model-loader's tree: every file 0444 (layout.FILE_MODE), whatever its layer kind; directories 0555."""
    return with_dirs(files, 0o444, 0o555)


def volume(files: dict[str, bytes]) -> Tree:
    return with_dirs(files, 0o644, 0o755)


def read_tree(root: Path) -> Tree:
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = p.relative_to(root).as_posix()
            assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), rel
            out[rel] = (stat.S_IMODE(st.st_mode), None if stat.S_ISDIR(st.st_mode) else p.read_bytes())
    return out


# ---- artifact shapes ---------------------------------------------------------------------------------------------
def tar_of(entries: dict[str, tuple[bytes | None, int]], compress: str | None = None) -> bytes:
    """A tar of path -> (bytes, mode), or (None, mode) for a directory; gzip or zstd compressed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, (data, mode) in entries.items():
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 0, mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if compress == "gzip":
        return gzip.compress(raw, mtime=0)
    if compress == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    return raw


def mp(kind: str, name: str, data: bytes, fmt: str = "raw") -> Layer:
    """A layer as model-loader push and modctl make it: ModelPack type, title and filepath both the name."""
    return Layer(data, f"{MP}.{kind}.v1.{fmt}", {TITLE: name, FILEPATH: name})


def raw(name: str, data: bytes) -> Layer:
    return Layer(data, ORAS_FILE, {TITLE: name})


WEIGHTS = os.urandom(200_000)
CONFIG = b'{"architectures": ["Phi3ForCausalLM"], "n": 1}'
RUN = b"#!/bin/sh\nexec python serve.py\n"
TOKENIZER = b'{"model": {"type": "BPE"}}'
VOCAB = b"a\nb\n"
ZSTD_CONFIG = tar_of({"config.json": (CONFIG, 0o644)}, "zstd")
ZSTD_RUN = tar_of({"run.sh": (RUN, 0o755)}, "zstd")
TOKENIZER_DIR = {"tokenizer/": (None, 0o755), "tokenizer/tokenizer.json": (TOKENIZER, 0o644),
                 "tokenizer/sub/vocab.txt": (VOCAB, 0o644)}
TOKENIZER_TAR = tar_of(TOKENIZER_DIR)
TOKENIZER_TGZ = tar_of(TOKENIZER_DIR, "gzip")
CONFIG_TAR = tar_of({"config.json": (CONFIG, 0o644)})
UNTITLED = Layer(b"no name", "application/octet-stream")
UNRELATED = Layer(b"a description only", "application/octet-stream", {"org.opencontainers.image.description": "x"})
EMPTY_TITLE = Layer(b"title empty, filepath set", f"{MP}.weight.v1.raw", {TITLE: "", FILEPATH: "fp.txt"})
EMPTY_FILEPATH = Layer(b"filepath empty", f"{MP}.weight.v1.raw", {FILEPATH: ""})


@dataclass(frozen=True)
class Case:
    layers: list[Layer]
    loader: Tree | str  # the published tree, or a fragment of the refusal (exit 8)
    volume: Tree | str  # what image_volume_tree must compute: the tree, or why the container cannot be created
    skipped: list[tuple[int, str]]  # layers the loader skips (index, the start of the reason), as the runtime does
    difference: str  # "none", or the docs/architecture.md table row that explains the difference (beyond modes)


CASES: dict[str, Case] = {
    "raw-modelpack": Case(
        [mp("weight", "model.safetensors", WEIGHTS), mp("weight.config", "config.json", CONFIG),
         mp("weight", "empty.bin", b""), mp("code", "run.sh", RUN)],
        loader({"model.safetensors": WEIGHTS, "config.json": CONFIG, "empty.bin": b"", "run.sh": RUN}),
        volume({"model.safetensors": WEIGHTS, "config.json": CONFIG, "empty.bin": b"", "run.sh": RUN}),
        [], "none"),
    "raw-oras": Case(
        [raw("model.safetensors", WEIGHTS), raw("tokenizer/tokenizer.json", TOKENIZER)],
        loader({"model.safetensors": WEIGHTS, "tokenizer/tokenizer.json": TOKENIZER}),
        volume({"model.safetensors": WEIGHTS, "tokenizer/tokenizer.json": TOKENIZER}),
        [], "none"),
    "zstd": Case(  # what model-loader push --compress zstd makes; run.sh is 0755 in its tar
        [mp("weight.config", "config.json", ZSTD_CONFIG, "tar+zstd"), mp("code", "run.sh", ZSTD_RUN, "tar+zstd")],
        loader({"config.json": CONFIG, "run.sh": RUN}),
        volume({"config.json": ZSTD_CONFIG, "run.sh": ZSTD_RUN}),
        [], "tar-layers"),
    "tar-directory": Case(
        [Layer(TOKENIZER_TAR, "application/vnd.oci.image.layer.v1.tar", {TITLE: "tokenizer", UNPACK: "true"})],
        loader({"tokenizer/tokenizer.json": TOKENIZER, "tokenizer/sub/vocab.txt": VOCAB}),
        volume({"tokenizer": TOKENIZER_TAR}),
        [], "tar-layers"),
    "tar+gzip-directory": Case(  # what oras push DIR makes
        [Layer(TOKENIZER_TGZ, "application/vnd.oci.image.layer.v1.tar+gzip", {TITLE: "tokenizer", UNPACK: "true"})],
        loader({"tokenizer/tokenizer.json": TOKENIZER, "tokenizer/sub/vocab.txt": VOCAB}),
        volume({"tokenizer": TOKENIZER_TGZ}),
        [], "tar-layers"),
    "modelpack-tar": Case(  # what modctl build --raw=false makes: an uncompressed one-file tar
        [Layer(CONFIG_TAR, f"{MP}.weight.config.v1.tar", {FILEPATH: "config.json"})],
        loader({"config.json": CONFIG}),
        volume({"config.json": CONFIG_TAR}),
        [], "tar-layers"),
    "untitled": Case(
        [UNTITLED, raw("w.bin", WEIGHTS), UNRELATED],
        loader({"w.bin": WEIGHTS}), volume({"w.bin": WEIGHTS}),
        [(0, "no org.opencontainers.image.title or org.cncf.model.filepath annotation"),
         (2, "no org.opencontainers.image.title or org.cncf.model.filepath annotation")], "none"),
    "empty-title": Case(
        [EMPTY_TITLE, EMPTY_FILEPATH, raw("w.bin", WEIGHTS)],
        loader({"w.bin": WEIGHTS}), volume({"w.bin": WEIGHTS}),
        [(0, "its org.opencontainers.image.title annotation is empty: a title names the layer whenever present"),
         (1, "its org.cncf.model.filepath annotation is empty")], "none"),
    "title-and-filepath": Case(
        [Layer(CONFIG, f"{MP}.weight.config.v1.raw", {TITLE: "a.json", FILEPATH: "b.json"})],
        loader({"a.json": CONFIG}), volume({"a.json": CONFIG}),
        [], "none"),
    "nested-names": Case(
        [raw("a/b/c.bin", b"c"), raw("a/d.bin", b"d"), raw("./e.bin", b"e"), raw("x//y/./z.bin", b"z"),
         mp("doc", "docs/deep/er/README.md", b"# hi")],
        loader({"a/b/c.bin": b"c", "a/d.bin": b"d", "e.bin": b"e", "x/y/z.bin": b"z", "docs/deep/er/README.md": b"# hi"}),
        volume({"a/b/c.bin": b"c", "a/d.bin": b"d", "e.bin": b"e", "x/y/z.bin": b"z", "docs/deep/er/README.md": b"# hi"}),
        [], "none"),
    "duplicates": Case(
        [raw("w.bin", b"first"), raw("w.bin", b"second")],
        "two layers are both named 'w.bin'", volume({"w.bin": b"second"}),
        [], "duplicate-names"),
    "dotdot": Case(
        [raw("../escape.txt", b"up"), raw("w.bin", WEIGHTS)],
        "layer name '../escape.txt' contains '..'", volume({"escape.txt": b"up", "w.bin": WEIGHTS}),
        [], "names-outside"),
    "absolute": Case(
        [raw("/abs.txt", b"abs")],
        "layer name '/abs.txt' is an absolute path", volume({"abs.txt": b"abs"}),
        [], "names-outside"),
    "file-and-directory": Case(
        [raw("a", b"file"), raw("a/b", b"under")],
        "'a' is both a file and the directory of 'a/b'",
        "'a' is mounted as a file and is needed as the directory of 'a/b'",
        [], "file-and-directory"),
}


def repo_of(case: str) -> str:
    return "same/" + case.replace("+", "-")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_the_loader_tree_and_the_image_volume_tree(case: str, registry, pusher, tmp_path: Path) -> None:
    c = CASES[case]
    pusher.push_artifact(repo_of(case), "v1", c.layers)
    ref = f"{registry.host}/{repo_of(case)}:v1"
    cache = tmp_path / "cache"

    assert image_volume_tree(c.layers) == c.volume
    manifest = {"layers": [layer.descriptor() for layer in c.layers]}
    if isinstance(c.loader, str):
        with pytest.raises(ArtifactError) as e:
            pull(ref, PullOptions(cache=cache, progress="none"), LOG)
        assert e.value.exit_code == 8 and c.loader in str(e.value)
        models = cache / "models/sha256"
        assert not models.exists() or not any(models.iterdir())
        with pytest.raises(ArtifactError, match=re.escape(c.loader)):
            layout.select_layers(manifest, ref)
        assert c.skipped == []
        return
    out = io.StringIO()
    res = pull(ref, PullOptions(cache=cache, progress="none"), Logger(out))
    assert read_tree(Path(res.path)) == c.loader
    # The pull said which layers it skipped (layout.layer_skipped, one line each).
    said = [line for line in out.getvalue().splitlines() if "event=layout.layer_skipped" in line]
    assert [int(re.search(r" layer=(\d+) ", line).group(1)) for line in said] == [i for i, _ in c.skipped]
    assert stat.S_IMODE(os.stat(res.path).st_mode) == 0o555
    assert res.files == sum(1 for _, data in c.loader.values() if data is not None)

    # Which layers were skipped, and why: the same layers the runtime skips.
    _, skipped = layout.select_layers(manifest, ref)
    assert [s.index for s in skipped] == [i for i, _ in c.skipped]
    for s, (i, reason) in zip(skipped, c.skipped, strict=True):
        assert s.reason.startswith(reason), (i, s.reason)
        assert s.digest == sha256(c.layers[i].data)

    # Beyond modes (0444/0555 here, 0644/0755 on an image volume), the trees agree exactly when no row says otherwise.
    assert isinstance(c.volume, dict)
    same = {k: v[1] for k, v in c.loader.items()} == {k: v[1] for k, v in c.volume.items()}
    assert same == (c.difference == "none")


def test_every_difference_is_a_row_of_the_architecture_table() -> None:
    text = ARCHITECTURE.read_text()
    section = text[text.index("## The same tree on both paths"):]
    section = section[:section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    rows = set(re.findall(r"^\| `([a-z-]+)` \|", section, re.M))
    assert {c.difference for c in CASES.values()} - {"none"} <= rows
    assert {"modes", "skipped-layers"} <= rows


def test_skipped_layers_are_logged() -> None:
    layers = CASES["untitled"].layers[:1] + CASES["empty-title"].layers
    manifest = {"layers": [layer.descriptor() for layer in layers]}
    out = io.StringIO()
    entries = layout.layer_entries(manifest, "r.example/m:v1", log=Logger(out))
    assert [e.name for e in entries] == ["w.bin"]
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == [
        f"level=warning event=layout.layer_skipped ref=r.example/m:v1 layer={i} digest={sha256(layers[i].data)}"
        f" media_type={layers[i].media_type} reason=\"{reason}\""
        for i, reason in [
            (0, "no org.opencontainers.image.title or org.cncf.model.filepath annotation"),
            (1, "its org.opencontainers.image.title annotation is empty: a title names the layer whenever present,"
                " even empty (its org.cncf.model.filepath is not used), and an empty name cannot be mounted"),
            (2, "its org.cncf.model.filepath annotation is empty, and an empty name cannot be mounted"),
        ]
    ]


@pytest.mark.parametrize("annotations,name", [
    ({TITLE: "t", FILEPATH: "f"}, "t"),
    ({TITLE: "", FILEPATH: "f"}, ""),
    ({FILEPATH: "f"}, "f"),
    ({FILEPATH: ""}, ""),
    ({"other": "x"}, None),
    ({}, None),
], ids=["title-wins", "empty-title-wins", "filepath", "empty-filepath", "unrelated", "none"])
def test_layer_name_is_chosen_as_the_runtime_chooses_it(annotations: dict[str, str], name: str | None) -> None:
    assert layout.layer_name(annotations) == name
    # The model holds the layer exactly when the runtime mounts it (a name, not empty).
    volume_tree = image_volume_tree([Layer(b"x", "application/octet-stream", annotations)])
    assert volume_tree == (volume({name: b"x"}) if name else {})
    entries, skipped = layout.select_layers({"layers": [Layer(b"x", "application/octet-stream", annotations)
                                                        .descriptor()]}, "r")
    assert ([e.name for e in entries], len(skipped)) == (([name], 0) if name else ([], 1))
