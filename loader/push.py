"""Package a model directory as an OCI artifact and push it: one layer per file, streamed from disk.

``model-loader push DIR REF`` walks DIR, makes every regular file one layer titled with its relative POSIX path
(``org.opencontainers.image.title``, and ModelPack's ``org.cncf.model.filepath``), and pushes the blobs, a config
and the manifest. Per-file layers are what CRI-O mounts as files and what lets ``model-loader pull`` fetch in
parallel; ``pull`` of the pushed artifact gives back the identical tree, byte for byte.

Formats:

* ``modelpack`` (default): artifactType ``application/vnd.cncf.model.manifest.v1+json``, a ModelPack config
  (``descriptor``, ``config``, ``modelfs.diffIds``) and ModelPack layer media types chosen by file name
  (weights, weight configs such as config.json and tokenizer files, docs, code).
* ``oras``: what ``oras push`` makes for files: the empty config, artifactType
  ``application/vnd.unknown.artifact.v1`` (or ``--artifact-type``), layers ``application/vnd.oci.image.layer.v1.tar``
  holding the raw file bytes (that media type is oras' default for a file, not a tar).

With ``--compress zstd`` each layer is a one-entry tar of the file (the entry named by the file's relative path)
compressed with zstd, typed as a ModelPack ``.tar+zstd`` type (or, for oras, ``...layer.v1.tar+zstd`` with
``io.deis.oras.content.unpack``). ``pull`` extracts it at the model root, so the tree is the same; but an image
volume (CRI-O) mounts the compressed blob itself under the file's name, so the command warns.

The two paths differ in ways the command can see before it uploads, and it says so (:func:`path_warnings`, one
warning each, also logged as ``push.warning``): tar layers (``--compress zstd``), and executable files, whose bit
neither path keeps (the loader makes every file 0444, ``layout.FILE_MODE``; an image volume shows 0644). What the
loader would refuse is refused before anything is uploaded, by the loader's own rules (:func:`check_loadable`):
names (``layout.check_names``) and more layers than a manifest may have (``oci.MAX_LAYERS``). The full list of
differences is in docs/architecture.md ("The same tree on both paths").

How it moves bytes: files are hashed in one pass (the digest must be known before the registry can be asked
whether it has the blob), then uploads stream from disk in chunks (PATCH, ``CHUNK_SIZE`` each, the last chunk in
the closing PUT) with one small reused buffer per request, so memory stays flat whatever the file size. Blobs the
registry already has are skipped (HEAD); ``--mount-from REPO`` asks for a cross-repository mount first. Layers
upload in parallel, largest first; identical files upload once.

Scratch space: only ``--compress zstd`` writes before it uploads (each compressed layer, removed once uploaded),
in a scratch directory made at the first such layer (:class:`Scratch`): in ``--tmp-dir`` when given, else beside
DIR (its parent: the volume the model is on), else in TMPDIR. A push without compression writes nothing locally,
so it runs under a read-only root with no ``/cache`` (the loader image's TMPDIR) at all.

Refused before anything is uploaded: symlinks that leave DIR or point at directories, and special files (fifos,
sockets, devices). A symlink to a file inside DIR is pushed as that file's content under the link's name. Empty
directories cannot be expressed by per-file layers and are named in a warning. Nothing is skipped silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import zstandard

from loader import layout, oci, retry
from loader.digest import hash_file
from loader.errors import ArtifactError, AuthError, LoaderError, UsageError
from loader.progress import Progress
from loader.reference import Reference, parse
from loader.registry import RegistryClient
from loader.upload import CHUNK_SIZE, Uploader, bytes_source, file_source, push_auth_error, run_parallel

MiB = 1 << 20
BUF_SIZE = MiB
ZSTD_LEVEL = 3
T = TypeVar("T")

OCI_MANIFEST = oci.OCI_MANIFEST
OCI_EMPTY = oci.OCI_EMPTY
OCI_EMPTY_DATA = b"{}"
ORAS_ARTIFACT_TYPE = "application/vnd.unknown.artifact.v1"
ORAS_FILE = "application/vnd.oci.image.layer.v1.tar"  # oras' default for a file: the raw bytes, despite the name
ORAS_FILE_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MODELPACK_ARTIFACT_TYPE = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"

Format = Literal["modelpack", "oras"]
Compress = Literal["none", "zstd"]
Kind = Literal["weight", "weight.config", "doc", "code"]

ZSTD_WARNING = ("--compress zstd stores each file as a zstd-compressed tar: model-loader pull restores the files,"
                " but an image volume (CRI-O) mounts the compressed bytes under each file's name, not the file")
EXEC_WARNING = ("{n} executable file{s} will not be executable on either path (model-loader makes every file 0444,"
                " an image volume shows 0644): {names}; run {them} through an interpreter (sh run.sh) or put {them}"
                " in the container image")
NAMED_AT_MOST = 8  # files named one by one in a warning; the rest are counted

# ---- which ModelPack type a file is (by name only, so the choice is predictable) -------------------------------
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".gguf", ".ggml", ".pt", ".pth", ".onnx", ".ckpt", ".h5", ".hdf5",
                   ".msgpack", ".tflite", ".pb", ".npz", ".npy", ".ot", ".mlmodel", ".engine", ".plan", ".pdparams",
                   ".nemo", ".keras", ".llamafile", ".mar", ".params", ".caffemodel", ".joblib", ".pkl", ".pickle"}
CONFIG_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".txt", ".model",
                   ".tiktoken", ".vocab", ".spm", ".jinja", ".j2"}
DOC_SUFFIXES = {".md", ".markdown", ".rst", ".pdf", ".html", ".htm", ".adoc", ".png", ".jpg", ".jpeg", ".gif",
                ".svg", ".webp"}
DOC_STEMS = {"readme", "license", "licence", "notice", "copying", "authors", "changelog", "citation",
             "model_card", "modelcard", "use_policy"}
CODE_SUFFIXES = {".py", ".ipynb", ".sh", ".js", ".ts", ".c", ".cc", ".cpp", ".h", ".hpp", ".cu", ".cuh", ".go",
                 ".rs", ".java", ".lua", ".r", ".jl", ".swift", ".rb"}
FORMAT_BY_SUFFIX = {".safetensors": "safetensors", ".gguf": "gguf", ".ggml": "ggml", ".onnx": "onnx",
                    ".pt": "pytorch", ".pth": "pytorch", ".bin": "pytorch", ".ckpt": "pytorch", ".h5": "keras",
                    ".keras": "keras", ".tflite": "tflite", ".pb": "tensorflow", ".msgpack": "flax",
                    ".nemo": "nemo", ".pdparams": "paddle"}


def classify(rel: str) -> Kind:
    """The ModelPack kind of a file, from its name. Unknown binaries count as weights: they are the payload."""
    base = posixpath.basename(rel).lower()
    stem, suffix = posixpath.splitext(base)
    if stem in DOC_STEMS or base in DOC_STEMS or suffix in DOC_SUFFIXES:
        return "doc"
    if suffix in CODE_SUFFIXES:
        return "code"
    if suffix in WEIGHT_SUFFIXES:
        return "weight"
    if suffix in CONFIG_SUFFIXES or base.startswith(("tokenizer", "vocab", "merges", "spiece")):
        return "weight.config"
    return "weight"


def media_type(kind: Kind, fmt: Format, compress: Compress) -> str:
    if fmt == "oras":
        return ORAS_FILE_ZSTD if compress == "zstd" else ORAS_FILE
    return f"application/vnd.cncf.model.{kind}.v1." + ("tar+zstd" if compress == "zstd" else "raw")


# ---- the plan (pure) ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalFile:
    rel: str  # relative POSIX path: the layer's title and the path pull recreates
    path: Path  # what to read (a symlink's target inside DIR)
    size: int
    executable: bool = False


@dataclass(frozen=True)
class LayerSpec:
    file: LocalFile
    media_type: str
    archive: bool  # True: a zstd-compressed one-entry tar of the file
    annotations: dict[str, str]


def plan(files: list[LocalFile], fmt: Format, compress: Compress) -> list[LayerSpec]:
    specs = []
    for f in sorted(files, key=lambda f: f.rel):
        ann = {layout.TITLE: f.rel}
        if fmt == "modelpack":
            ann[layout.MODELPACK_FILEPATH] = f.rel
        elif compress == "zstd":
            ann[layout.ORAS_UNPACK] = "true"
        specs.append(LayerSpec(f, media_type(classify(f.rel), fmt, compress), compress == "zstd", ann))
    return specs


def path_warnings(files: list[LocalFile], compress: Compress) -> list[str]:
    """What will look different on the two paths (image volume, model-loader's tree), known before any upload."""
    out = []
    if compress == "zstd":
        out.append(ZSTD_WARNING)
    executable = sorted(f.rel for f in files if f.executable)
    if executable:
        names = ", ".join(executable[:NAMED_AT_MOST])
        if len(executable) > NAMED_AT_MOST:
            names += f" and {len(executable) - NAMED_AT_MOST} more"
        one = len(executable) == 1
        out.append(EXEC_WARNING.format(n=len(executable), s="" if one else "s", names=names,
                                       them="it" if one else "them"))
    return out


def check_loadable(files: list[LocalFile], root: Path) -> None:
    """Refuse what model-loader pull would refuse anyway, by its own rules, before anything is uploaded: every name
    (``layout.check_names``: relative, no ``..``, within the filesystem's limits, no collisions) and the number of
    layers (``oci.MAX_LAYERS``)."""
    if len(files) > oci.MAX_LAYERS:
        raise ArtifactError(f"{root} holds {len(files)} files, one layer each, and model-loader pull refuses a manifest"
                            f" of more than {oci.MAX_LAYERS} layers; nothing was pushed")
    try:
        layout.check_names([(f.rel, "file") for f in files], str(root))
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; model-loader pull would refuse the artifact, so nothing was pushed") from None


def model_format(files: list[LocalFile]) -> str | None:
    """The ModelPack ``config.format``: the format holding the most weight bytes."""
    by: dict[str, int] = {}
    for f in files:
        fmt = FORMAT_BY_SUFFIX.get(posixpath.splitext(f.rel.lower())[1])
        if fmt:
            by[fmt] = by.get(fmt, 0) + f.size
    return max(sorted(by), key=lambda k: by[k]) if by else None


def modelpack_config(name: str, fmt: str | None, diff_ids: list[str]) -> bytes:
    """The ModelPack config (schema/config-schema.json of modelpack/model-spec). No createdAt: pushing the same
    directory twice gives the same manifest digest."""
    cfg = {"descriptor": {"name": name}, "config": {"format": fmt} if fmt else {},
           "modelfs": {"type": "layers", "diffIds": diff_ids}}
    return json.dumps(cfg, separators=(",", ":")).encode()


def build_manifest(fmt: Format, config: dict[str, Any], layers: list[dict[str, Any]],
                   artifact_type: str | None) -> dict[str, Any]:
    m = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
         "artifactType": artifact_type or (MODELPACK_ARTIFACT_TYPE if fmt == "modelpack" else ORAS_ARTIFACT_TYPE),
         "config": config, "layers": layers}
    return m


# ---- the directory (I/O) ----------------------------------------------------------------------------------------
def scan(root: Path) -> tuple[list[LocalFile], list[str]]:
    """Every file under root, and the empty directories (which per-file layers cannot carry). Raises for anything
    that cannot be pushed faithfully, naming it."""
    try:
        real_root = Path(os.path.realpath(root))
        if not real_root.is_dir():
            raise UsageError(f"{root} is not a directory: push takes the model's directory")
    except OSError as exc:
        raise UsageError(f"cannot read {root}: {exc}") from exc
    files: list[LocalFile] = []
    empty: list[str] = []

    def refuse(rel: str, why: str) -> None:
        raise ArtifactError(f"{root}/{rel}: {why}; nothing was pushed")

    for dirpath, dirnames, filenames in os.walk(real_root, onerror=_walk_error):
        dirnames.sort()
        here = Path(dirpath)
        rel_dir = here.relative_to(real_root).as_posix()
        if not dirnames and not filenames and here != real_root:
            empty.append(rel_dir)
        for name in list(dirnames) + sorted(filenames):
            p = here / name
            rel = (p.relative_to(real_root)).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                refuse(rel, "the name is not valid UTF-8, so it cannot be a layer title")
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                target = Path(os.path.realpath(p))
                if target != real_root and real_root not in target.parents:
                    refuse(rel, f"is a symlink to {os.readlink(p)!r}, outside the directory (copy the file in,"
                                " e.g. cp -rL, to push its content)")
                try:
                    tst = os.stat(p)
                except OSError:
                    refuse(rel, f"is a dangling symlink to {os.readlink(p)!r}")
                if stat.S_ISDIR(tst.st_mode):
                    refuse(rel, "is a symlink to a directory; per-file layers cannot express it (replace it by"
                                " the directory or its files)")
                if not stat.S_ISREG(tst.st_mode):
                    refuse(rel, "is a symlink to a special file")
                files.append(LocalFile(rel, target, tst.st_size, bool(tst.st_mode & 0o111)))
                if name in dirnames:
                    dirnames.remove(name)
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                refuse(rel, "is a special file (fifo, socket or device); only regular files can be pushed")
            files.append(LocalFile(rel, p, st.st_size, bool(st.st_mode & 0o111)))
    if not files:
        raise UsageError(f"{root} holds no files to push")
    check_loadable(files, root)
    return files, sorted(empty)


def _walk_error(exc: OSError) -> None:
    raise LoaderError(f"cannot read {exc.filename}: {exc.strerror}") from exc


def compress_file(f: LocalFile, tmpdir: Path) -> tuple[Path, str, int, str]:
    """Write a zstd-compressed one-entry tar of ``f`` to a temp file: (path, digest, size, diff_id).

    The tar is deterministic (mtime 0, uid/gid 0, no user names) and zstd runs single-threaded, so the same file
    gives the same blob on every push and a re-push finds it already in the registry.
    """
    info = tarfile.TarInfo(f.rel)
    info.size = f.size
    info.mode = 0o755 if f.executable else 0o644
    info.mtime = 0
    info.type = tarfile.REGTYPE
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    tar_hash, blob_hash = hashlib.sha256(), hashlib.sha256()
    comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    fd, name = tempfile.mkstemp(dir=tmpdir, suffix=".tar.zst")
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            def emit(raw: bytes | memoryview) -> None:
                nonlocal size
                tar_hash.update(raw)
                z = comp.compress(raw)
                if z:
                    blob_hash.update(z)
                    out.write(z)
                    size += len(z)

            emit(header)
            buf = bytearray(BUF_SIZE)
            mv = memoryview(buf)
            done = 0
            with open(f.path, "rb", buffering=0) as src:
                while n := src.readinto(buf):
                    emit(mv[:n])
                    done += n
            if done != f.size:
                raise LoaderError(f"{f.rel} changed size while being pushed ({f.size} -> {done} bytes)")
            pad = (-done) % tarfile.BLOCKSIZE
            emit(b"\0" * (pad + 2 * tarfile.BLOCKSIZE))  # padding, then the two zero blocks that end a tar
            z = comp.flush()
            blob_hash.update(z)
            out.write(z)
            size += len(z)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name), "sha256:" + blob_hash.hexdigest(), size, "sha256:" + tar_hash.hexdigest()


# ---- scratch space --------------------------------------------------------------------------------------------------
SCRATCH_PREFIX = ".model-loader-push-"


def scratch_places(directory: Path, tmp_dir: Path | None) -> list[Path | None]:
    """Where a push may make its scratch directory, in order; None is the system's (TMPDIR, by tempfile's rules).

    ``--tmp-dir`` alone when given (a directory the user chose does not silently become another). Else beside the
    directory being pushed: a container mounts the model's volume anyway, while its root may be read-only and the
    loader image's TMPDIR (/cache/tmp) exists only where a cache is mounted; then TMPDIR.
    """
    if tmp_dir is not None:
        return [tmp_dir]
    return [directory.resolve().parent, None]


class Scratch:
    """One push's scratch directory, made at its first use (a push that compresses nothing makes none) in the
    first of ``places`` where one can be made, and removed with its contents when the push ends."""

    def __init__(self, places: list[Path | None], log: Any) -> None:
        self._places = places
        self._log = log
        self._lock = threading.Lock()
        self._path: Path | None = None

    def path(self) -> Path:
        with self._lock:  # layers compress in parallel: the first one makes it
            if self._path is None:
                self._path = self._make()
            return self._path

    def _make(self) -> Path:
        tried = []
        for place in self._places:
            try:
                path = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=place))
            except OSError as exc:  # read-only, not ours, missing; for None: "No usable temporary directory"
                tried.append(f"{place if place is not None else 'TMPDIR'}: {exc.strerror or exc}")
                continue
            self._log.info("push.scratch", dir=str(path))
            return path
        raise UsageError(
            "--compress zstd writes each compressed layer to a scratch file before uploading it, and no scratch"
            f" directory could be made ({'; '.join(tried)}): give --tmp-dir DIR, a writable directory with room for"
            " --concurrency compressed files (in a container, a mounted volume such as an emptyDir)")

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)


def _retrying(fn: Callable[[], T], log: Any, what: str) -> T:
    return retry.call(fn, retry.SMALL_REQUESTS, what, log, "push.retry", file=what)


# ---- the push ------------------------------------------------------------------------------------------------------
@dataclass
class PushOptions:
    format: Format = "modelpack"
    compress: Compress = "none"
    concurrency: int = 4
    plain_http: bool | None = None
    insecure: bool = False
    credentials: Any = None  # loader.credentials.DockerConfig
    timeout: float = 30.0
    mount_from: str | None = None
    artifact_type: str | None = None
    chunk_size: int = CHUNK_SIZE
    progress: str = "auto"
    progress_interval: float = 5.0
    ca_files: tuple[str, ...] = ()
    plain_http_registries: frozenset[str] = frozenset()
    tmp_dir: Path | None = None  # where compressed layers are written before upload (scratch_places)


@dataclass
class PushedFile:
    rel: str
    size: int
    media_type: str
    digest: str
    action: str  # uploaded | exists | mounted | duplicate


@dataclass
class PushResult:
    ref: str
    digest: str
    bytes: int
    files: int
    seconds: float
    uploaded_bytes: int
    skipped_blobs: int
    mounted_blobs: int
    pushed: list[PushedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "digest": self.digest, "bytes": self.bytes, "files": self.files,
                "seconds": round(self.seconds, 3), "uploaded_bytes": self.uploaded_bytes,
                "skipped_blobs": self.skipped_blobs, "mounted_blobs": self.mounted_blobs}


def push(directory: str | Path, text: str, opts: PushOptions, log: Any) -> PushResult:
    t0 = time.monotonic()
    try:
        ref = parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if ref.digest:
        raise UsageError(f"push {text!r}: give a tag, not a digest; the digest is computed and printed")
    if opts.format not in ("modelpack", "oras") or opts.compress not in ("none", "zstd"):
        raise UsageError(f"unknown --format {opts.format!r} or --compress {opts.compress!r}")
    mount_from = _mount_repo(opts.mount_from, ref)
    files, empty = scan(Path(directory))
    specs = plan(files, opts.format, opts.compress)
    warnings = path_warnings(files, opts.compress)
    if empty:
        warnings.append(f"empty directories are not pushed (a per-file artifact cannot hold them): {', '.join(empty)}")
    for w in warnings:
        log.warning("push.warning", ref=str(ref), warning=w)
    total = sum(f.size for f in files)
    log.info("push.start", ref=str(ref), dir=str(directory), files=len(files), bytes=total, format=opts.format,
             compress=opts.compress)

    try:
        with Scratch(scratch_places(Path(directory), opts.tmp_dir), log) as scratch:
            return _push(ref, files, specs, total, warnings, mount_from, scratch, opts, log, t0)
    except AuthError as exc:
        raise push_auth_error(ref, exc) from exc


def _push(ref: Reference, files: list[LocalFile], specs: list[LayerSpec], total: int, warnings: list[str],
          mount_from: str | None, scratch: Scratch, opts: PushOptions, log: Any, t0: float) -> PushResult:
    with RegistryClient(ref, plain_http=opts.plain_http, insecure=opts.insecure, credentials=opts.credentials,
                        timeout=opts.timeout, log=log, actions="pull,push", ca_files=opts.ca_files,
                        plain_http_registries=opts.plain_http_registries,
                        extra_scopes=(f"repository:{mount_from}:pull",) if mount_from else ()) as client, \
            Progress(log, str(ref), total, mode=opts.progress, interval=opts.progress_interval) as prog:
        stop = threading.Event()
        up = Uploader(client, chunk_size=opts.chunk_size, mount_from=mount_from, log=log,
                      progress=prog if opts.compress == "none" else None, stop=stop)
        results: dict[str, tuple[dict[str, Any], str, PushedFile]] = {}

        def one(spec: LayerSpec) -> None:
            f = spec.file
            if spec.archive:
                path, digest, size, diff_id = compress_file(f, scratch.path())
                try:
                    action = up.ensure(digest, size, file_source(path), f.rel)
                finally:
                    path.unlink(missing_ok=True)
                prog.add(f.size)
            else:
                digest, size = hash_file(f.path)
                if size != f.size:
                    raise LoaderError(f"{f.rel} changed size while being pushed ({f.size} -> {size} bytes)")
                diff_id = digest
                action = up.ensure(digest, size, file_source(f.path), f.rel)
                if action != "uploaded":
                    prog.add(size)
            desc = {"mediaType": spec.media_type, "digest": digest, "size": size, "annotations": spec.annotations}
            log.info("push.file", ref=str(ref), file=f.rel, bytes=f.size, media_type=spec.media_type, digest=digest,
                     action=action)
            results[f.rel] = (desc, diff_id, PushedFile(f.rel, f.size, spec.media_type, digest, action))

        run_parallel([functools.partial(one, s) for s in sorted(specs, key=lambda s: -s.file.size)], opts.concurrency,
                     stop)

        layers = [results[s.file.rel][0] for s in specs]
        if opts.format == "modelpack":
            config = modelpack_config(ref.name, model_format(files), [results[s.file.rel][1] for s in specs])
            config_type = MODELPACK_CONFIG
        else:
            config, config_type = OCI_EMPTY_DATA, OCI_EMPTY
        cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
        up.progress = None
        up.ensure(cdigest, len(config), bytes_source(config), "config")
        manifest = build_manifest(opts.format, {"mediaType": config_type, "digest": cdigest, "size": len(config)},
                                  layers, opts.artifact_type)
        data = json.dumps(manifest, separators=(",", ":")).encode()
        digest = _retrying(lambda: client.put_manifest(ref.tag or "latest", data, OCI_MANIFEST), log, "manifest")
        sent = client.bytes_sent
    secs = time.monotonic() - t0
    pushed = [results[s.file.rel][2] for s in specs]
    res = PushResult(str(ref), digest, total, len(files), secs, sent, up.counts["exists"], up.counts["mounted"],
                     pushed, warnings)
    log.info("push.done", ref=str(ref), digest=digest, files=len(files), bytes=total, uploaded_bytes=sent,
             skipped_blobs=res.skipped_blobs, mounted_blobs=res.mounted_blobs, seconds=round(secs, 3))
    return res


def _mount_repo(value: str | None, ref: Reference) -> str | None:
    """``--mount-from`` takes a repository on the same registry, with or without the registry in front."""
    if not value:
        return None
    repo = value.split("@", 1)[0]
    if repo.startswith(f"{ref.registry}/"):
        repo = repo[len(ref.registry) + 1:]
    elif "/" in repo and ("." in repo.split("/", 1)[0] or ":" in repo.split("/", 1)[0]):
        raise UsageError(f"--mount-from {value!r} names another registry than {ref.registry}; mounts work only"
                         " within one registry")
    if ":" in repo.rsplit("/", 1)[-1]:
        repo = repo.rsplit(":", 1)[0]
    return repo
