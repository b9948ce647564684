"""Air-gapped bundles: ``export`` refs to an OCI image layout tarball; ``import`` one into a node cache or a registry.

A bundle is a plain (uncompressed) tar of a standard OCI image layout, so ``skopeo copy oci-archive:B.tar:TAG``
and other OCI tools read it too::

    oci-layout                 {"imageLayoutVersion": "1.0.0"}
    index.json                 one entry per exported ref: the ref's top manifest (an index stays an index),
                               annotated org.opencontainers.image.ref.name = the tag and
                               io.containerd.image.name = the full reference
    blobs/sha256/<hex>         every manifest (index children too), config and layer of every ref, once each

Export streams each blob from the registry straight into the tar (one reused buffer, no temp copies), hashing
as it goes: a blob that does not match its digest is fetched once more, then the export fails. The tar is
written beside the output under a temporary name and renamed into place only when complete, so a failed export
leaves no bundle. The small files come first, so a reader meets index.json before the blobs.

Import reads the tar in place (it is seekable: members are located by their headers, never extracted to
arbitrary paths), and verifies every manifest and blob it uses against its digest before anything is published:

* ``--cache DIR`` stages the missing layer blobs in the cache's tmp directory, hashing while copying, then
  publishes them under the cache's blob locks and builds each model exactly as ``pull`` does (the same layout
  functions, the same meta, the ref link), so ``pull --offline REF`` and a tag pull with no registry hit it.
* ``--to REGISTRY[/prefix]`` verifies the whole bundle first, then pushes each ref's blobs (HEAD-skipping what
  the registry has) and manifests, children before parents, to ``REGISTRY/prefix/<original repository>:<tag>``.

A corrupt bundle (a flipped byte) is refused with the blob, the bundle and the two digests named; nothing is
published.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from loader import layout
from loader.cache import Cache
from loader.errors import ArtifactError, AuthError, DigestMismatch, NetworkError, TransientError, UsageError
from loader.reference import Reference, parse
from loader.registry import INDEX_TYPES, MAX_MANIFEST_BYTES, RegistryClient, backoff_delays, retrying

REF_NAME = "org.opencontainers.image.ref.name"
IMAGE_NAME = "io.containerd.image.name"
OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BUF_SIZE = 1 << 20
BLOB_ATTEMPTS = 6  # tries without progress for one blob's stream
MAX_DEPTH = 4  # nested indexes


def _parse(text: str) -> Reference:
    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _hex(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise ArtifactError(f"unsupported digest {digest!r}: only sha256 is supported")
    return hexd


def _is_index(obj: dict, media_type: str) -> bool:
    return media_type in INDEX_TYPES or obj.get("mediaType") in INDEX_TYPES or "manifests" in obj


def _children(obj: dict, what: str) -> list[dict]:
    out = []
    for d in obj.get("manifests") or []:
        if not isinstance(d, dict) or not isinstance(d.get("digest"), str) or not isinstance(d.get("size"), int):
            raise ArtifactError(f"{what}: an index entry has no digest or size")
        out.append(d)
    return out


def _blob_descs(obj: dict, what: str) -> list[dict]:
    """The config and layers an image manifest references."""
    descs = []
    for d in ([obj["config"]] if isinstance(obj.get("config"), dict) else []) + list(obj.get("layers") or []):
        if not isinstance(d, dict) or not isinstance(d.get("digest"), str) or not isinstance(d.get("size"), int):
            raise ArtifactError(f"{what}: a config or layer descriptor has no digest or size")
        descs.append(d)
    return descs


# ---- tar writing ----------------------------------------------------------------------------------------------------
class TarWriter:
    """A minimal streaming tar writer: headers from tarfile (PAX when needed), data written by the caller."""

    def __init__(self, f):
        self.f = f

    def _header(self, name: str, size: int, kind=tarfile.REGTYPE, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mode, info.mtime = size, kind, mode, 0
        self.f.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def add_dir(self, name: str) -> None:
        self._header(name.rstrip("/") + "/", 0, tarfile.DIRTYPE, 0o755)

    def add_bytes(self, name: str, data: bytes) -> None:
        self._header(name, len(data))
        self.f.write(data)
        self._pad(len(data))

    def begin_file(self, name: str, size: int) -> None:
        """Write a header; the caller then writes exactly ``size`` bytes and calls end_file."""
        self._header(name, size)

    def end_file(self, size: int) -> None:
        self._pad(size)

    def rewind(self, offset: int) -> None:
        """Drop everything written from ``offset`` (an entry being written again)."""
        self.f.seek(offset)
        self.f.truncate()

    def close(self) -> None:
        self.f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        pad = (-self.f.tell()) % tarfile.RECORDSIZE
        self.f.write(b"\0" * pad)

    def _pad(self, size: int) -> None:
        pad = (-size) % tarfile.BLOCKSIZE
        if pad:
            self.f.write(b"\0" * pad)


# ---- export ---------------------------------------------------------------------------------------------------------
@dataclass
class RegistryOptions:
    plain_http: bool | None = None
    insecure: bool = False
    credentials: object | None = None
    timeout: float = 30.0
    concurrency: int = 4


@dataclass
class ExportResult:
    bundle: str
    refs: list[tuple[str, str]]  # (ref, manifest digest)
    blobs: int
    bytes: int
    seconds: float

    def as_json(self) -> dict:
        return {"bundle": self.bundle, "refs": [{"ref": r, "digest": d} for r, d in self.refs], "blobs": self.blobs,
                "bytes": self.bytes, "seconds": round(self.seconds, 3)}


def export(refs: list[str], out: str | Path, opts: RegistryOptions, log) -> ExportResult:
    t0 = time.monotonic()
    out = Path(out)
    parsed = [_parse(r) for r in refs]
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.incomplete")
    clients: list[RegistryClient] = []
    try:
        index_entries: list[dict] = []
        manifests: dict[str, bytes] = {}  # digest -> bytes, in the order met
        blobs: dict[str, tuple[int, RegistryClient]] = {}
        results = []
        for ref in parsed:
            client = RegistryClient(ref, plain_http=opts.plain_http, insecure=opts.insecure,
                                    credentials=opts.credentials, timeout=opts.timeout, log=log)
            clients.append(client)
            top = _retrying(lambda: client.get_manifest(ref.reference), log, str(ref))
            if ref.digest and top.digest != ref.digest:
                raise DigestMismatch(f"registry {ref.registry} returned a manifest for {ref} hashing to {top.digest}")
            obj = top.json()
            mt = obj.get("mediaType") or top.media_type or OCI_MANIFEST
            _collect(client, top.data, top.digest, obj, mt, manifests, blobs, log, str(ref), 0)
            ann = {IMAGE_NAME: str(ref)}
            if ref.tag:
                ann[REF_NAME] = ref.tag
            index_entries.append({"mediaType": mt, "digest": top.digest, "size": top.size, "annotations": ann})
            results.append((str(ref), top.digest))
            log.info("export.ref", ref=str(ref), digest=top.digest, media_type=mt)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
        total = 0
        with open(tmp, "wb") as f:
            w = TarWriter(f)
            w.add_bytes("oci-layout", json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode())
            w.add_bytes("index.json", json.dumps(index, indent=2).encode())
            w.add_dir("blobs")
            w.add_dir("blobs/sha256")
            for digest, data in manifests.items():
                w.add_bytes(f"blobs/sha256/{_hex(digest)}", data)
                total += len(data)
            for digest, (size, client) in blobs.items():
                if digest in manifests:
                    continue
                _export_blob(w, client, digest, size, log)
                total += size
            w.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        for c in clients:
            c.close()
    secs = time.monotonic() - t0
    nblobs = len(set(manifests) | set(blobs))
    log.info("export.done", bundle=str(out), refs=len(results), blobs=nblobs, bytes=total, seconds=round(secs, 3))
    return ExportResult(str(out), results, nblobs, total, secs)


def _collect(client, data, digest, obj, mt, manifests, blobs, log, label, depth) -> None:
    if depth > MAX_DEPTH:
        raise ArtifactError(f"{label}: indexes nested deeper than {MAX_DEPTH}")
    manifests.setdefault(digest, data)
    if _is_index(obj, mt):
        for child in _children(obj, label):
            m = _retrying(lambda: client.get_manifest(child["digest"]), log, label)  # verified: fetched by digest
            cobj = m.json()
            _collect(client, m.data, m.digest, cobj, cobj.get("mediaType") or child.get("mediaType") or m.media_type,
                     manifests, blobs, log, label, depth + 1)
        return
    for d in _blob_descs(obj, label):
        _hex(d["digest"])
        blobs.setdefault(d["digest"], (d["size"], client))


def _export_blob(w: TarWriter, client: RegistryClient, digest: str, size: int, log) -> None:
    label = str(client.ref)
    for attempt in (1, 2):
        entry_start = w.f.tell()
        w.begin_file(f"blobs/sha256/{_hex(digest)}", size)
        got = _stream_blob(client, digest, size, w.f.write, log)
        if got == digest:
            w.end_file(size)
            return
        w.rewind(entry_start)  # a wrong byte on the wire: drop the entry and fetch once more
        log.warning("export.digest_mismatch", ref=label, blob=digest, got=got, attempt=attempt)
    raise DigestMismatch(f"blob {digest} of {label} from registry {client.ref.registry} hashed to {got} twice:"
                         " the registry or something between it and this host is corrupting data; no bundle written")


def _stream_blob(client: RegistryClient, digest: str, size: int, write, log) -> str:
    """Write a blob's ``size`` bytes, resuming dropped connections with Range; return the sha256 of what was written."""
    h = hashlib.sha256()
    buf = bytearray(BUF_SIZE)
    mv = memoryview(buf)
    pos = 0
    tries = 0
    delays = backoff_delays(BLOB_ATTEMPTS, base=0.25)
    while pos < size:
        before = pos
        try:
            with client.open_blob(digest, pos) as body:
                skip = pos - body.start  # a registry that ignored Range starts from byte 0
                while pos < size:
                    n = body.readinto(mv[: min(len(buf), size - pos + skip)])
                    if n == 0:
                        raise TransientError(f"registry closed the connection {size - pos} bytes early")
                    chunk = mv[:n]
                    if skip:
                        drop = min(skip, n)
                        skip -= drop
                        chunk = chunk[drop:]
                    if len(chunk):
                        write(chunk)
                        h.update(chunk)
                        pos += len(chunk)
                        client.count_bytes(len(chunk))
        except TransientError as exc:
            tries = 0 if pos > before else tries + 1
            if tries >= BLOB_ATTEMPTS:
                raise NetworkError(f"giving up on blob {digest} of {client.ref} after {tries} attempts: {exc}") from exc
            delay = min(exc.retry_after, 30.0) if exc.retry_after is not None else next(delays, 10.0)
            log.warning("export.retry", ref=str(client.ref), blob=digest[:19], offset=pos, delay_s=delay, error=str(exc))
            time.sleep(delay)
    return "sha256:" + h.hexdigest()


def _retrying(fn, log, label):
    return retrying(fn, log, "manifest.retry", ref=label)


# ---- reading a bundle -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundleRef:
    name: str | None  # the full reference (io.containerd.image.name), when the bundle carries it
    tag: str | None  # org.opencontainers.image.ref.name
    digest: str
    media_type: str
    size: int

    @property
    def label(self) -> str:
        return self.name or self.tag or self.digest


class Bundle:
    """An OCI image layout tarball opened for reading in place. Every read of a manifest or blob is verified."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._tf = tarfile.open(self.path, "r:")
        except (OSError, tarfile.TarError) as exc:
            raise ArtifactError(f"{self.path} is not a readable (uncompressed) tar bundle: {exc}") from exc
        try:
            try:
                members = self._tf.getmembers()
            except (OSError, tarfile.TarError) as exc:
                raise ArtifactError(f"{self.path} is not a readable (uncompressed) tar bundle: {exc}") from exc
            self._read_layout(members)
        except BaseException:
            self._tf.close()
            raise

    def _read_layout(self, members: list[tarfile.TarInfo]) -> None:
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            name = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and not m.issparse():
                self.members[name] = m
        try:
            layout_info = json.loads(self._small("oci-layout", 4096))
            self.index = json.loads(self._small("index.json", MAX_MANIFEST_BYTES))
        except ValueError as exc:
            raise ArtifactError(f"{self.path}: oci-layout or index.json is not valid JSON: {exc}") from exc
        if not isinstance(layout_info, dict) or layout_info.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
            raise ArtifactError(f"{self.path}: oci-layout is {layout_info!r}, expected imageLayoutVersion 1.0.0")
        if not isinstance(self.index, dict):
            raise ArtifactError(f"{self.path}: index.json is not a JSON object")

    def close(self) -> None:
        self._tf.close()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _small(self, name: str, limit: int) -> bytes:
        m = self.members.get(name)
        if m is None:
            raise ArtifactError(f"{self.path} has no {name}: it is not an OCI image layout bundle (model-loader export)")
        if m.size > limit:
            raise ArtifactError(f"{self.path}: {name} is {m.size} bytes, over the {limit} byte limit")
        return self._tf.extractfile(m).read()

    def refs(self) -> list[BundleRef]:
        out = []
        for d in _children(self.index, f"{self.path}: index.json"):
            ann = d.get("annotations") or {}
            _hex(d["digest"])
            out.append(BundleRef(ann.get(IMAGE_NAME), ann.get(REF_NAME), d["digest"],
                                 d.get("mediaType") or OCI_MANIFEST, d["size"]))
        if not out:
            raise ArtifactError(f"{self.path}: index.json lists no manifests")
        return out

    def member(self, digest: str, size: int | None = None) -> tarfile.TarInfo:
        m = self.members.get(f"blobs/sha256/{_hex(digest)}")
        if m is None:
            raise ArtifactError(f"{self.path} is missing blob {digest}: the bundle is incomplete; export it again")
        if size is not None and m.size != size:
            raise DigestMismatch(f"{self.path}: blob {digest} is {m.size} bytes, but its descriptor says {size};"
                                 " the bundle is corrupt, nothing was imported")
        return m

    def manifest(self, digest: str, size: int | None = None) -> tuple[bytes, dict]:
        m = self.member(digest, size)
        if m.size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{self.path}: manifest {digest} is {m.size} bytes, over the limit")
        data = self._tf.extractfile(m).read()
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest:
            raise DigestMismatch(f"{self.path}: manifest {digest} hashes to {got}; the bundle is corrupt,"
                                 " nothing was imported")
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise ArtifactError(f"{self.path}: manifest {digest} is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise ArtifactError(f"{self.path}: manifest {digest} is not a JSON object")
        return data, obj

    def copy_blob(self, digest: str, size: int, write=None) -> None:
        """Read a blob (writing it with ``write`` when given) and check its sha256; raise DigestMismatch if not."""
        m = self.member(digest, size)
        h = hashlib.sha256()
        buf = bytearray(BUF_SIZE)
        mv = memoryview(buf)
        with open(self.path, "rb", buffering=0) as f:
            pos, left = m.offset_data, size
            while left:
                n = os.preadv(f.fileno(), [mv[: min(len(buf), left)]], pos)
                if n <= 0:
                    raise ArtifactError(f"{self.path} is truncated inside blob {digest}")
                h.update(mv[:n])
                if write:
                    write(mv[:n])
                pos += n
                left -= n
        got = "sha256:" + h.hexdigest()
        if got != digest:
            raise DigestMismatch(f"{self.path}: blob {digest} hashes to {got}; the bundle is corrupt (damaged in"
                                 " transfer?), nothing was imported: export it again")

    def closure(self, digest: str, media_type: str, size: int | None, label: str, depth: int = 0):
        """Every manifest (children first) and blob a ref needs: ([(digest, media type, bytes)], {digest: size})."""
        if depth > MAX_DEPTH:
            raise ArtifactError(f"{label}: indexes nested deeper than {MAX_DEPTH}")
        data, obj = self.manifest(digest, size)
        mt = obj.get("mediaType") or media_type
        manifests, blobs = [], {}
        if _is_index(obj, mt):
            for child in _children(obj, label):
                cm, cb = self.closure(child["digest"], child.get("mediaType") or OCI_MANIFEST, child["size"], label,
                                      depth + 1)
                manifests += [m for m in cm if m[0] not in {x[0] for x in manifests}]
                blobs.update(cb)
        else:
            for d in _blob_descs(obj, label):
                _hex(d["digest"])
                blobs[d["digest"]] = d["size"]
        manifests.append((digest, mt, data))
        return manifests, blobs


# ---- import into a cache --------------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    ref: str  # the ref as published (cache) or as pushed (registry)
    digest: str
    source: str  # the ref as the bundle names it
    path: str | None = None  # the model directory (cache)
    bytes: int = 0
    files: int = 0
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        d = {"ref": self.ref, "digest": self.digest, "source": self.source}
        if self.path is not None:
            d.update(path=self.path, bytes=self.bytes, files=self.files)
        return d


def import_to_cache(bundle_path: str | Path, cache_dir: str | Path, log) -> list[ImportResult]:
    from loader.pull import pick_manifest  # the same platform choice a pull makes

    cache = Cache(cache_dir).ensure()
    with Bundle(bundle_path) as b, cache.gc_lock(shared=True):
        plans = []
        for e in b.refs():
            label = e.label
            data, top = b.manifest(e.digest, e.size)
            media_type = top.get("mediaType") or e.media_type
            image = top
            if _is_index(top, media_type):
                child = pick_manifest(top, label)
                _, image = b.manifest(child["digest"], child.get("size"))
            entries = layout.layer_entries(image, label)  # refuses unsafe names before anything is written
            if not entries:
                raise ArtifactError(f"{label}: no layer has an {layout.TITLE} or {layout.MODELPACK_FILEPATH}"
                                    " annotation, so the model would be empty")
            if isinstance(image.get("config"), dict):
                cfg = image["config"]
                if f"blobs/sha256/{_hex(cfg['digest'])}" in b.members:
                    b.copy_blob(cfg["digest"], cfg["size"])
            plans.append((e, media_type, image, entries))

        need: dict[str, int] = {}
        for _, _, _, entries in plans:
            for en in entries:
                need[en.digest] = en.size
        missing = {d: s for d, s in need.items() if not cache.has_blob(d, s)}
        # As pull estimates it: the missing blobs, plus room for what tar layers extract to (at least their size).
        extracted = sum(en.size for _, _, _, entries in plans for en in entries if en.kind == "tar")
        cache.check_space(sum(missing.values()) + extracted, f"bundle {b.path} ({len(missing)} blobs)")
        log.info("import.start", bundle=str(b.path), refs=len(plans), blobs=len(missing), bytes=sum(missing.values()))
        staged: dict[str, Path] = {}
        try:
            for digest, size in missing.items():
                tmp = cache.tmp_dir() / f"import-{uuid.uuid4().hex}"
                staged[digest] = tmp
                with open(tmp, "wb") as out:
                    b.copy_blob(digest, size, out.write)
            # Every blob verified: only now does anything become visible in the cache.
            for digest, tmp in staged.items():
                with cache.lock(f"blob-{_hex(digest)}"):
                    if cache.has_blob(digest, need[digest]):
                        tmp.unlink()
                    else:
                        cache.publish_blob(tmp, digest)
        finally:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)

        results = []
        for e, media_type, image, entries in plans:
            results.append(_publish_model(cache, e, media_type, image, entries, log))
        return results


def _publish_model(cache: Cache, e: BundleRef, media_type: str, image: dict, entries, log) -> ImportResult:
    """What pull does after its fetch: materialise, publish under the model lock, link the ref, record use."""
    from loader.pull import publish_model

    digest, label = e.digest, e.label
    ref = _ref_of(e)
    model = publish_model(cache, digest, entries, image, media_type, [str(ref)] if ref else [], label)
    warnings = []
    if ref is not None:
        cache.link_ref(ref, digest)
        cache.add_ref_to_meta(digest, str(ref))
    else:
        warnings.append(f"bundle entry {label} carries no full image name ({IMAGE_NAME}): imported by digest"
                        f" only; pull it as REPO@{digest}")
    cache.touch(digest)
    log.info("import.model", ref=str(ref) if ref else None, digest=digest, path=str(model.path), bytes=model.bytes,
             files=model.files)
    return ImportResult(str(ref) if ref else digest, digest, label, str(model.path), model.bytes, model.files,
                        warnings)


def _ref_of(e: BundleRef) -> Reference | None:
    for text in (e.name, e.tag if e.tag and "/" in e.tag else None):
        if text:
            try:
                return parse(text)
            except ValueError:
                continue
    return None


# ---- import into a registry -----------------------------------------------------------------------------------------
def target_ref(target: str, e: BundleRef) -> Reference:
    """Where a bundle entry goes under ``REGISTRY[/prefix]``: the original repository path below the prefix,
    the same tag. An entry without a full name goes to the prefix itself as the repository."""
    host, _, prefix = target.strip().rstrip("/").partition("/")
    if not host or "://" in target:
        raise UsageError(f"--to {target!r} is not REGISTRY[/prefix], e.g. registry.local:5000/mirror")
    src = _ref_of(e)
    if src is not None:
        repo = f"{prefix}/{src.repository}" if prefix else src.repository
    elif prefix:
        repo = prefix
    else:
        raise UsageError(f"bundle entry {e.label} has no repository name; give --to REGISTRY/REPOSITORY")
    tag = e.tag if e.tag and "/" not in e.tag else (src.tag if src else None)
    text = f"{host}/{repo}" + (f":{tag}" if tag else f"@{e.digest}")
    ref = _parse(text)
    if ref.registry != host:
        raise UsageError(f"--to {target!r}: {host!r} is not a registry host[:port]")
    return ref


def import_to_registry(bundle_path: str | Path, target: str, opts: RegistryOptions, log) -> list[ImportResult]:
    from loader.push import push_auth_error

    with Bundle(bundle_path) as b:
        jobs = []
        for e in b.refs():
            dest = target_ref(target, e)
            manifests, blobs = b.closure(e.digest, e.media_type, e.size, e.label)
            jobs.append((e, dest, manifests, blobs))
        # Verify everything before the first upload: a corrupt bundle leaves the registry untouched.
        verified: set[str] = set()
        for _, _, _, blobs in jobs:
            for digest, size in blobs.items():
                if digest not in verified:
                    b.copy_blob(digest, size)
                    verified.add(digest)
        results = []
        for e, dest, manifests, blobs in jobs:
            try:
                results.append(_push_entry(b, e, dest, manifests, blobs, opts, log))
            except AuthError as exc:
                raise push_auth_error(dest, exc) from exc
        return results


def _push_entry(b: Bundle, e: BundleRef, dest: Reference, manifests, blobs, opts: RegistryOptions, log):
    """One ref into the target registry: its blobs in parallel, then its manifests, children before parents."""
    from loader.push import Uploader, file_source, run_parallel

    with RegistryClient(dest, plain_http=opts.plain_http, insecure=opts.insecure, credentials=opts.credentials,
                        timeout=opts.timeout, log=log, actions="pull,push") as client:
        up = Uploader(client, log=log)
        run_parallel([lambda d=d, s=s: up.ensure(d, s, file_source(b.path, b.member(d).offset_data), d)
                      for d, s in sorted(blobs.items(), key=lambda kv: -kv[1])], opts.concurrency, up.stop)
        for digest, mt, data in manifests:
            reference = digest if digest != e.digest else (dest.tag or digest)
            _retrying(lambda: client.put_manifest(reference, data, mt), log, str(dest))
        log.info("import.pushed", source=e.label, ref=str(dest), digest=e.digest, blobs=len(blobs),
                 uploaded=up.counts["uploaded"], skipped=up.counts["exists"])
    return ImportResult(str(dest), e.digest, e.label)
