"""Air-gapped bundles: ``export`` refs to an OCI image layout tarball; ``import`` one into a node cache or a registry.

A bundle is a plain (uncompressed) tar of a standard OCI image layout, so ``skopeo copy oci-archive:B.tar:TAG``
and other OCI tools read it too::

    oci-layout                 {"imageLayoutVersion": "1.0.0"}
    index.json                 one entry per exported ref: the ref's top manifest (an index stays an index),
                               annotated org.opencontainers.image.ref.name = the tag and
                               io.containerd.image.name = the full reference
    blobs/sha256/<hex>         every manifest (index children too), config and layer of every ref, once each

Signatures travel with their models (``export --with-signatures``, the default): what the verification search
(loader.sign) finds for a ref's digest, in the places a registry keeps them, so ``import`` runs the same search on
the bundle, offline. cosign's tag ``sha256-<hex>.sig`` becomes an index.json entry of that tag (its manifest, config
and payloads in blobs/); the referrers (cosign key signatures, Sigstore bundles) become OCI 1.1's fallback tag
``sha256-<hex>``: an index of the referrer manifests, written by export (a tarball has no referrers API). Both
entries carry io.containerd.image.name = <repository>:<tag>, which ties them to their model's repository.

The bundle is a content store like a registry repository: :class:`Bundle` reads it (``open_blob`` serves any
byte range of a member, so the copy engine reads it exactly as it reads a registry), :class:`TarWriter` writes it.

Export streams each blob from the registry straight into the tar with the engine's read loop (loader.fetch.transfer:
one reused buffer, Range resume, the one retry policy with its minimum rate), hashing as it goes: a blob that does
not match its digest is fetched once more, then the export fails. The tar is written beside the output under a
temporary name and renamed into place only when complete, so a failed export leaves no bundle. The small files
come first, so a reader meets index.json before the blobs.

Import reads the tar in place (members are located by their headers, never extracted to arbitrary paths; every
digest in index.json, in a manifest or in a member name is parsed as a :class:`~loader.digest.Digest` first) and
verifies every manifest and blob it uses against its digest before anything is published:

* ``--cache DIR`` copies the missing layer blobs into the cache with pull's own engine (:class:`loader.fetch.Fetcher`:
  the same verifying ingest, blob locks, bounds and progress), then builds each model exactly as ``pull`` does (the
  same layout functions, the same meta, the ref link), so ``pull --offline REF`` and a tag pull with no registry
  hit it. An imported model is recorded as read anonymously from the registry and repository the bundle names it
  by (an admin imported it under that name): the shared cache's outage fallback grants it to pods naming that
  reference, and online pods prove possession against their registry (docs/architecture.md).
* ``--to REGISTRY[/prefix]`` verifies the whole bundle first, then pushes each ref's blobs (HEAD-skipping what
  the registry has) and manifests, children before parents, to ``REGISTRY/prefix/<original repository>:<tag>``,
  and its signatures beside it: the ``.sig`` tag as is, each referrer by digest (listed in the target's fallback
  tag when the target has no referrers API), so ``pull --verify-key`` verifies against the target.

With a signature policy (the verify flags, as pull takes them) each model is verified from the signatures inside
the bundle before anything is published or pushed: one that does not verify stops the import (exit 10, naming
the ref, the digest and what did not match) and nothing is imported. ``--cache`` records the verification in the
model's meta as pull does, so a later pull under the same policy hits with no signature request.

A corrupt bundle (a flipped byte) is refused with the blob, the bundle and the two digests named; nothing is
published.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from loader import layout, oci, retry, sign
from loader.access import ANONYMOUS, Source
from loader.cache import Cache, record_verification
from loader.digest import Digest
from loader.errors import ArtifactError, AuthError, DigestMismatch, UsageError
from loader.fetch import BLOB_POLICY, Blob, Fetcher, transfer
from loader.publish import publish_model, verify_staged_tree
from loader.reference import Reference, parse
from loader.registry import RegistryClient
from loader.retry import Attempts, Deadline
from loader.upload import Uploader, file_source, push_auth_error, run_parallel

if TYPE_CHECKING:
    from loader.signing import Policy, PolicyTable, Verified

REF_NAME = "org.opencontainers.image.ref.name"
IMAGE_NAME = "io.containerd.image.name"
OCI_LAYOUT_VERSION = "1.0.0"
BUF_SIZE = 1 << 20
T = TypeVar("T")


def _parse(text: str) -> Reference:
    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _retrying(fn: Callable[[], T], log: Any, label: str) -> T:
    return retry.call(fn, retry.SMALL_REQUESTS, label, log, "manifest.retry", ref=label)


# ---- tar writing ----------------------------------------------------------------------------------------------------
class TarWriter:
    """A minimal streaming tar writer: headers from tarfile (PAX when needed), data written by the caller."""

    def __init__(self, f: BinaryIO):
        self.f = f

    def _header(self, name: str, size: int, kind: bytes = tarfile.REGTYPE, mode: int = 0o644) -> None:
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
    credentials: Any = None
    timeout: float = 30.0
    concurrency: int = 4
    ca_files: tuple[str, ...] = ()
    plain_http_registries: frozenset[str] = frozenset()

    def client(self, ref: Reference, log: Any, actions: str = "pull") -> RegistryClient:
        """The one place export and import open a repository."""
        return RegistryClient(ref, plain_http=self.plain_http, insecure=self.insecure, credentials=self.credentials,
                              timeout=self.timeout, log=log, actions=actions, ca_files=self.ca_files,
                              plain_http_registries=self.plain_http_registries)


@dataclass
class ExportResult:
    bundle: str
    refs: list[tuple[str, str]]  # (ref, manifest digest)
    blobs: int
    bytes: int
    seconds: float
    signatures: int = 0  # signature manifests carried (cosign's .sig tags and referrers; in the JSON when any)

    def as_json(self) -> dict[str, Any]:
        out = {"bundle": self.bundle, "refs": [{"ref": r, "digest": d} for r, d in self.refs], "blobs": self.blobs,
               "bytes": self.bytes, "seconds": round(self.seconds, 3)}
        if self.signatures:
            out["signatures"] = self.signatures
        return out


def export(refs: list[str], out: str | Path, opts: RegistryOptions, log: Any,
           with_signatures: bool = True) -> ExportResult:
    t0 = time.monotonic()
    out = Path(out)
    parsed = [_parse(r) for r in refs]
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.incomplete")
    clients: list[RegistryClient] = []
    try:
        index_entries: list[dict[str, Any]] = []
        manifests: dict[Digest, bytes] = {}  # digest -> bytes, in the order met
        blobs: dict[Digest, tuple[int, RegistryClient]] = {}
        results: list[tuple[str, str]] = []
        searched: set[tuple[str, str, Digest]] = set()  # (registry, repository, digest) whose signatures are in
        signatures = 0
        for ref in parsed:
            client = opts.client(ref, log)
            clients.append(client)
            label = str(ref)
            top = _retrying(functools.partial(client.get_manifest, ref.reference), log, label)
            digest = Digest.parse(top.digest, f"registry {ref.registry}: the digest of {label}")
            if ref.digest and digest != ref.digest:
                raise DigestMismatch(f"registry {ref.registry} returned a manifest for {ref} hashing to {digest}")
            assert top.data is not None
            parsed_top = oci.parse_manifest(top.data, digest, top.media_type, label)

            def child(d: oci.Descriptor, client: RegistryClient = client,
                      label: str = label) -> tuple[bytes, oci.Manifest]:
                got = _retrying(functools.partial(client.get_manifest, d.digest), log, label)  # verified by digest
                assert got.data is not None
                return got.data, oci.parse_manifest(got.data, d.digest, d.media_type or got.media_type, label)

            ref_manifests, ref_blobs = oci.closure(top.data, parsed_top, child, label)
            for mdigest, _, mdata in ref_manifests:
                manifests.setdefault(mdigest, mdata)
            for bdigest, size in ref_blobs.items():
                blobs.setdefault(bdigest, (size, client))
            ann = {IMAGE_NAME: label}
            if ref.tag:
                ann[REF_NAME] = ref.tag
            index_entries.append({"mediaType": parsed_top.media_type, "digest": str(digest), "size": len(top.data),
                                  "annotations": ann})
            results.append((label, str(digest)))
            log.info("export.ref", ref=label, digest=digest, media_type=parsed_top.media_type)
            if with_signatures and (ref.registry, ref.repository, digest) not in searched:
                searched.add((ref.registry, ref.repository, digest))
                sig_entries, sig_manifests, sig_blobs, n = _signatures_of(client, ref, digest, log)
                signatures += n
                index_entries.extend(sig_entries)
                for mdigest, mdata in sig_manifests.items():
                    manifests.setdefault(mdigest, mdata)
                for bdigest, size in sig_blobs.items():
                    blobs.setdefault(bdigest, (size, client))
        index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": index_entries}
        total = 0
        with open(tmp, "wb") as f:
            w = TarWriter(f)
            w.add_bytes("oci-layout", json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode())
            w.add_bytes("index.json", json.dumps(index, indent=2).encode())
            w.add_dir("blobs")
            w.add_dir("blobs/sha256")
            for mdigest, data in manifests.items():
                w.add_bytes(f"blobs/sha256/{mdigest.hex}", data)
                total += len(data)
            for bdigest, (size, client) in blobs.items():
                if bdigest in manifests:
                    continue
                _export_blob(w, client, bdigest, size, log)
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
    log.info("export.done", bundle=str(out), refs=len(results), blobs=nblobs, bytes=total, seconds=round(secs, 3),
             signatures=signatures)
    return ExportResult(str(out), results, nblobs, total, secs, signatures)


def _signatures_of(client: RegistryClient, ref: Reference, digest: Digest,
                   log: Any) -> tuple[list[dict[str, Any]], dict[Digest, bytes], dict[Digest, int], int]:
    """What the verification search (loader.sign.find) finds for ``digest`` in the registry, every kind, as bundle
    content: (index.json entries, manifests, blobs, signature manifests carried). cosign's tag stays a tag; the
    referrers become the fallback tag's index, since a bundle has no referrers API."""
    label = str(ref)
    name = f"{ref.registry}/{ref.repository}"
    found = sign.find(sign.RegistrySignatures(client, log, label), sign.ALL_KINDS, digest, label, [], [])
    entries: list[dict[str, Any]] = []
    manifests: dict[Digest, bytes] = {}
    blobs: dict[Digest, int] = {}
    referrers: list[dict[str, Any]] = []
    for m in found:
        try:
            parsed = oci.parse_manifest(m.data, m.digest, m.media_type, f"signature {m.digest} of {label}")
            if isinstance(parsed, oci.ImageIndex):
                raise ArtifactError("an index, not a signature manifest")
        except ArtifactError as exc:  # not carried: import would refuse it anyway
            log.warning("export.signature_skipped", ref=label, signature=m.digest, reason=str(exc))
            continue
        manifests[m.digest] = m.data
        for d in parsed.blobs():
            blobs.setdefault(d.digest, d.size)
        desc = {"mediaType": parsed.media_type, "digest": str(m.digest), "size": len(m.data)}
        if m.where == "tag":
            entries.append(_tag_entry(desc, name, sign.sig_tag(digest)))
        else:
            referrers.append({**desc, "artifactType": m.artifact_type})
    if referrers:
        index = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": referrers},
                           separators=(",", ":")).encode()
        manifests[Digest.of(index)] = index
        entries.append(_tag_entry({"mediaType": oci.OCI_INDEX, "digest": str(Digest.of(index)), "size": len(index)},
                                  name, sign.referrers_tag(digest)))
    n = len(manifests) - (1 if referrers else 0)
    if n:
        log.info("export.signatures", ref=label, digest=digest, signatures=n)
    return entries, manifests, blobs, n


def _tag_entry(desc: dict[str, Any], name: str, tag: str) -> dict[str, Any]:
    return {**desc, "annotations": {IMAGE_NAME: f"{name}:{tag}", REF_NAME: tag}}


def _export_blob(w: TarWriter, client: RegistryClient, digest: Digest, size: int, log: Any) -> None:
    label = str(client.ref)
    got = digest
    for attempt in (1, 2):
        entry_start = w.f.tell()
        w.begin_file(f"blobs/sha256/{digest.hex}", size)
        h = hashlib.sha256()

        def write(chunk: memoryview, _offset: int, h: Any = h) -> None:
            w.f.write(chunk)
            h.update(chunk)

        attempts = Attempts(BLOB_POLICY, f"blob {digest} of {label}", Deadline.after(BLOB_POLICY.deadline, label))
        transfer(client, digest, size, 0, size, write, bytearray(BUF_SIZE), attempts=attempts, policy=BLOB_POLICY,
                 stop=None, log=log, label=label, source_name=client.ref.registry, event="export.retry")
        got = Digest.from_hasher(h)
        if got == digest:
            w.end_file(size)
            return
        w.rewind(entry_start)  # a wrong byte on the wire: drop the entry and fetch once more
        log.warning("export.digest_mismatch", ref=label, blob=digest, got=got, attempt=attempt)
    raise DigestMismatch(f"blob {digest} of {label} from registry {client.ref.registry} hashed to {got} twice:"
                         " the registry or something between it and this host is corrupting data; no bundle written")


# ---- reading a bundle -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundleRef:
    name: str | None  # the full reference (io.containerd.image.name), when the bundle carries it
    tag: str | None  # org.opencontainers.image.ref.name
    digest: Digest
    media_type: str
    size: int

    @property
    def label(self) -> str:
        return self.name or self.tag or self.digest


class _MemberBody:
    """Bytes [start, end] of a bundle member, read with pread: what open_blob returns (like a registry's body)."""

    def __init__(self, fd: int, base: int, start: int, end: int, total: int):
        self._fd, self._pos, self._end = fd, base + start, base + end + 1
        self.start: int = start
        self.total: int | None = total

    def readinto(self, buf: memoryview) -> int:
        n = os.preadv(self._fd, [buf[: max(0, min(len(buf), self._end - self._pos))]], self._pos)
        self._pos += n
        return n

    def __enter__(self) -> _MemberBody:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Bundle:
    """An OCI image layout tarball opened for reading in place. Every read of a manifest or blob is verified."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._tf = tarfile.open(self.path, "r:")  # noqa: SIM115  open for the Bundle's life; close() closes it
        except (OSError, tarfile.TarError) as exc:
            raise ArtifactError(f"{self.path} is not a readable (uncompressed) tar bundle: {exc}") from exc
        try:
            try:
                members = self._tf.getmembers()
            except (OSError, tarfile.TarError) as exc:
                raise ArtifactError(f"{self.path} is not a readable (uncompressed) tar bundle: {exc}") from exc
            self._read_layout(members)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self._tf.close()
            raise
        self.bytes_read = 0

    def _read_layout(self, members: list[tarfile.TarInfo]) -> None:
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            name = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and not m.issparse():
                self.members[name] = m
        try:
            layout_info = json.loads(self._small("oci-layout", 4096))
            index = json.loads(self._small("index.json", oci.MAX_MANIFEST_BYTES))
        except ValueError as exc:
            raise ArtifactError(f"{self.path}: oci-layout or index.json is not valid JSON: {exc}") from exc
        if not isinstance(layout_info, dict) or layout_info.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
            raise ArtifactError(f"{self.path}: oci-layout is {layout_info!r}, expected imageLayoutVersion 1.0.0")
        if not isinstance(index, dict):
            raise ArtifactError(f"{self.path}: index.json is not a JSON object")
        self.index: dict[str, Any] = index

    def close(self) -> None:
        os.close(self._fd)
        self._tf.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _small(self, name: str, limit: int) -> bytes:
        m = self.members.get(name)
        if m is None:
            raise ArtifactError(f"{self.path} has no {name}: it is not an OCI image layout bundle (model-loader export)")
        if m.size > limit:
            raise ArtifactError(f"{self.path}: {name} is {m.size} bytes, over the {limit} byte limit")
        f = self._tf.extractfile(m)
        assert f is not None
        return f.read()

    def _entries(self) -> list[BundleRef]:
        children = self.index.get("manifests")
        if not isinstance(children, list):
            raise ArtifactError(f"{self.path}: index.json has no manifests list")
        out = []
        for i, obj in enumerate(children):
            d = oci.Descriptor.parse(obj, f"{self.path}: index.json entry {i}")
            out.append(BundleRef(d.annotations.get(IMAGE_NAME), d.annotations.get(REF_NAME), d.digest,
                                 d.media_type or oci.OCI_MANIFEST, d.size))
        return out

    def refs(self) -> list[BundleRef]:
        """The models: every index.json entry but the signatures' tags."""
        out = [e for e in self._entries() if not sign.is_signature_tag(e.tag)]
        if not out:
            raise ArtifactError(f"{self.path}: index.json lists no manifests")
        return out

    def member(self, digest: Digest, size: int | None = None) -> tarfile.TarInfo:
        m = self.members.get(f"blobs/sha256/{Digest(digest).hex}")
        if m is None:
            raise ArtifactError(f"{self.path} is missing blob {digest}: the bundle is incomplete; export it again")
        if size is not None and m.size != size:
            raise DigestMismatch(f"{self.path}: blob {digest} is {m.size} bytes, but its descriptor says {size};"
                                 " the bundle is corrupt, nothing was imported")
        return m

    # -- the blob-source interface the copy engine reads (loader.fetch.BlobSource) --
    def open_blob(self, digest: str, start: int = 0, end: int | None = None, size: int | None = None) -> _MemberBody:
        m = self.member(Digest(digest), size)
        last = m.size - 1 if end is None else min(end, m.size - 1)
        return _MemberBody(self._fd, m.offset_data, start, last, m.size)

    def count_bytes(self, n: int) -> None:
        self.bytes_read += n

    def manifest(self, digest: Digest, media_type: str, size: int | None, label: str) -> tuple[bytes, oci.Manifest]:
        data = self.manifest_bytes(digest, size)
        return data, oci.parse_manifest(data, digest, media_type, f"{label} in {self.path}")

    def manifest_bytes(self, digest: Digest, size: int | None) -> bytes:
        """A manifest's bytes, bounded and verified against its digest (not parsed)."""
        m = self.member(digest, size)
        if m.size > oci.MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{self.path}: manifest {digest} is {m.size} bytes, over the limit")
        data = os.pread(self._fd, m.size, m.offset_data)
        got = Digest.of(data)
        if got != digest:
            raise DigestMismatch(f"{self.path}: manifest {digest} hashes to {got}; the bundle is corrupt,"
                                 " nothing was imported")
        return data

    def small_blob(self, digest: Digest, size: int) -> bytes:
        """A small blob (a signature payload or bundle, its size bounded by the parser), whole, verified."""
        m = self.member(digest)
        if m.size != size:
            raise ArtifactError(f"{self.path}: blob {digest} is {m.size} bytes, its descriptor says {size}")
        data = os.pread(self._fd, size, m.offset_data)
        if Digest.of(data) != digest:
            raise ArtifactError(f"{self.path}: blob {digest} hashes to {Digest.of(data)}")
        return data

    def signatures(self, ref: Reference | None) -> dict[str, BundleRef]:
        """The signature entries (cosign's ``.sig`` tags, referrers fallback tags) of ``ref``'s repository, by tag
        (``ref`` None: the entries that name no repository). Each must point at a manifest or an index."""
        out: dict[str, BundleRef] = {}
        for e in self._entries():
            if not sign.is_signature_tag(e.tag) or _repository(e) != _repository_of(ref):
                continue
            if e.media_type not in oci.MANIFEST_TYPES:
                raise ArtifactError(f"{self.path}: signature entry {e.label} has media type {e.media_type[:100]!r},"
                                    " not a manifest or an index: the bundle is malformed, nothing was imported")
            assert e.tag is not None
            out.setdefault(e.tag, e)
        return out

    def verify_blob(self, digest: Digest, size: int) -> None:
        """Read a blob with the engine's read loop and check its sha256; DigestMismatch if not."""
        h = hashlib.sha256()
        attempts = Attempts(BLOB_POLICY, f"blob {digest} of {self.path}")
        transfer(self, digest, size, 0, size, lambda chunk, _off: h.update(chunk), bytearray(BUF_SIZE),
                 attempts=attempts, policy=BLOB_POLICY, stop=None, log=None, label=str(self.path),
                 source_name=str(self.path))
        got = Digest.from_hasher(h)
        if got != digest:
            raise DigestMismatch(f"{self.path}: blob {digest} hashes to {got}; the bundle is corrupt (damaged in"
                                 " transfer?), nothing was imported: export it again")

    def closure(self, digest: Digest, media_type: str, size: int | None,
                label: str) -> tuple[list[tuple[Digest, str, bytes]], dict[Digest, int]]:
        """Every manifest (children first) and blob a ref needs: ([(digest, media type, bytes)], {digest: size})."""
        data, m = self.manifest(digest, media_type, size, label)
        return oci.closure(data, m, lambda d: self.manifest(d.digest, d.media_type or oci.OCI_MANIFEST, d.size, label),
                           label)

    def image(self, e: BundleRef) -> oci.ImageManifest:
        """The model manifest of a bundle entry: the entry itself, or the index child a pull would choose."""
        _, top = self.manifest(e.digest, e.media_type, e.size, e.label)
        if isinstance(top, oci.ImageIndex):
            child = oci.pick_manifest(top, e.label)
            _, top = self.manifest(child.digest, child.media_type or oci.OCI_MANIFEST, child.size, e.label)
            if not isinstance(top, oci.ImageManifest):
                raise ArtifactError(f"{e.label}: index {e.digest} names another index as its model")
        return top


class BundleSignatures:
    """One repository's signatures in a bundle, as the verification search reads them (loader.sign.SignatureSource):
    tags are its index.json signature entries, digests its members, every read verified; no referrers API (export
    writes the referrers as the fallback tag's index)."""

    def __init__(self, bundle: Bundle, ref: Reference | None):
        self.bundle = bundle
        self.tags = bundle.signatures(ref)

    def referrers(self, digest: Digest) -> bytes | None:
        return None

    def manifest(self, reference: str) -> tuple[bytes, str] | None:
        e = self.tags.get(reference)
        if e is not None:
            return self.bundle.manifest_bytes(e.digest, e.size), e.media_type
        if not reference.startswith("sha256:"):
            return None
        digest = Digest.parse(reference, f"{self.bundle.path}: a signature's digest")
        if f"blobs/sha256/{digest.hex}" not in self.bundle.members:
            return None
        data = self.bundle.manifest_bytes(digest, None)
        try:
            declared = json.loads(data).get("mediaType")
        except (ValueError, AttributeError):
            declared = None
        return data, declared if isinstance(declared, str) else oci.OCI_MANIFEST

    def small_blob(self, digest: Digest, size: int) -> bytes:
        return self.bundle.small_blob(digest, size)


def _repository(e: BundleRef) -> tuple[str, str] | None:
    return _repository_of(_ref_of(e))


def _repository_of(ref: Reference | None) -> tuple[str, str] | None:
    return (ref.registry, ref.repository) if ref is not None else None


# ---- signature policy -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verification:
    """What an import must verify: one policy for every model (the verify flags), or the cluster's table by prefix."""

    policy: Policy | None = None
    table: PolicyTable | None = None

    def policy_for(self, e: BundleRef) -> Policy | None:
        if self.table is None:
            return self.policy if self.policy is not None and self.policy.required else None
        ref = _ref_of(e)
        if ref is None:
            from loader.signing import SignatureError

            raise SignatureError(f"{e.label}: model {e.digest} carries no repository name in the bundle, so the"
                                 " signature policy's rules cannot say what it must be signed by; nothing was"
                                 " imported")
        return self.table.for_ref(ref.registry, ref.repository)


def verify_signatures(b: Bundle, entries: list[BundleRef], verification: Verification | None,
                      log: Any) -> dict[BundleRef, Verified]:
    """Every model's signature, from the bundle, offline, before anything is published: {entry: what verified it}
    (each entry under its own policy); SignatureError (exit 10) for the first model none verifies."""
    out: dict[BundleRef, Verified] = {}
    if verification is None:
        return out
    for e in entries:
        policy = verification.policy_for(e)
        if policy is None or policy.model_signature:  # over the files: on the staged tree, before publish
            continue
        out[e] = sign.verify_in(BundleSignatures(b, _ref_of(e)), policy, e.digest, e.label, log,
                                event="import.signature_verified",
                                then=f"export it again with its signatures (model-loader export {e.label}"
                                     " -o BUNDLE.tar) and import that")
    return out


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
    verified: Verified | None = None  # what verified the model's signature (a policy was set)
    signatures: int = 0  # signature manifests pushed beside it (registry; in the JSON when any)

    def as_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ref": self.ref, "digest": self.digest, "source": self.source}
        if self.path is not None:
            d.update(path=self.path, bytes=self.bytes, files=self.files)
        if self.signatures:
            d["signatures"] = self.signatures
        if self.verified is not None:
            d["verified"] = self.verified.as_json()
        return d


def import_to_cache(bundle_path: str | Path, cache_dir: str | Path, log: Any, concurrency: int = 4,
                    verification: Verification | None = None) -> list[ImportResult]:
    with Bundle(bundle_path) as b:
        # First, before the cache is touched: every model's signature, from the bundle.
        verified = verify_signatures(b, b.refs(), verification, log)
        cache = Cache(cache_dir).ensure()
        with cache.gc_lock(shared=True):
            return _import_to_cache(b, cache, verified, log, concurrency, verification)


def _import_to_cache(b: Bundle, cache: Cache, verified: dict[BundleRef, Verified], log: Any,
                     concurrency: int, verification: Verification | None = None) -> list[ImportResult]:
    plans = []
    for e in b.refs():
        image = b.image(e)
        entries = layout.layer_entries(image, e.label, log=log)  # refuses unsafe names before anything is written
        if not entries:
            raise ArtifactError(f"{e.label}: no layer has an {layout.TITLE} or {layout.MODELPACK_FILEPATH}"
                                " annotation, so the model would be empty")
        if image.config is not None and f"blobs/sha256/{image.config.digest.hex}" in b.members:
            b.verify_blob(image.config.digest, image.config.size)
        plans.append((e, image, entries))

    blobs: dict[Digest, int] = {}
    for _, _, entries in plans:
        for en in entries:
            blobs[en.digest] = en.size
    fetcher = Fetcher(b, cache, concurrency=concurrency, log=log, label=str(b.path), source_name=str(b.path))
    todo = [Blob(d, s) for d, s in blobs.items()]
    missing = fetcher.missing(todo)
    # As pull estimates it: the missing blobs, plus room for what tar layers extract to (at least their size).
    # First: it costs nothing, the reads below may take minutes.
    extracted = sum(en.size for _, _, entries in plans for en in entries if en.kind == "tar")
    cache.check_space(sum(x.size for x in missing) + extracted, f"bundle {b.path} ({len(missing)} blobs)")
    # Every blob a model names is read from the bundle and verified before anything is copied, also the ones
    # the cache already has: a bundle must hold what it names (it is recorded as a source of the model, so it
    # must prove possession like any source), and a corrupt one is refused before anything becomes visible.
    for x in todo:
        b.verify_blob(x.digest, x.size)
    log.info("import.start", bundle=str(b.path), refs=len(plans), blobs=len(missing),
             bytes=sum(x.size for x in missing))
    fetcher.fetch(todo)
    # OpenSSF model signatures are over the files: every model's tree is checked before any is published.
    for e, _, entries in plans:
        policy = verification.policy_for(e) if verification is not None else None
        if policy is not None and policy.model_signature:
            verified[e] = verify_staged_tree(cache, entries, e.digest, policy, e.label)
    return [_publish(cache, e, image, entries, verified.get(e), log) for e, image, entries in plans]


def _publish(cache: Cache, e: BundleRef, image: oci.ImageManifest, entries: list[layout.Entry],
             verified: Verified | None, log: Any) -> ImportResult:
    """What pull does after its fetch: materialise, publish under the model lock, link the ref, record use."""
    ref = _ref_of(e)
    # Vouched for by the admin who imported it (tls=True: as good as the registry's TLS for the access rule).
    sources = [Source(ref.registry, ref.repository, ANONYMOUS, tls=True)] if ref is not None else []
    model = publish_model(cache, e.digest, entries, dict(image.raw), image.media_type, [str(ref)] if ref else [],
                          e.label, sources)
    if verified is not None:  # as pull records it: a later pull under this policy needs no signature request
        cache.update_meta(e.digest, lambda meta: record_verification(meta, verified.policy,
                                                                     verified.record(time.time())))
    warnings = []
    if ref is not None:
        cache.link_ref(ref, e.digest)
        cache.add_ref_to_meta(e.digest, str(ref))
    else:
        warnings.append(f"bundle entry {e.label} carries no full image name ({IMAGE_NAME}): imported by digest"
                        f" only; pull it as REPO@{e.digest}")
    cache.touch(e.digest)
    log.info("import.model", ref=str(ref) if ref else None, digest=e.digest, path=str(model.path), bytes=model.bytes,
             files=model.files)
    return ImportResult(str(ref) if ref else e.digest, e.digest, e.label, str(model.path), model.bytes, model.files,
                        warnings, verified)


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


def import_to_registry(bundle_path: str | Path, target: str, opts: RegistryOptions, log: Any,
                       verification: Verification | None = None) -> list[ImportResult]:
    with Bundle(bundle_path) as b:
        refs = b.refs()
        for e in refs:
            policy = verification.policy_for(e) if verification is not None else None
            if policy is not None and policy.model_signature:
                raise UsageError(f"{e.label}: an OpenSSF model signature (--verify-model-signature) is over the model's"
                                 " files, checked on the tree before it is published to a cache (import --cache, pull);"
                                 " a registry target holds no tree: the loaders that pull from it check it")
        # First, before the registry is written to: every model's signature, from the bundle.
        checked = verify_signatures(b, refs, verification, log)
        jobs = []
        for e in refs:
            dest = target_ref(target, e)
            manifests, blobs = b.closure(e.digest, e.media_type, e.size, e.label)
            sigs = _signature_pushes(b, e)
            for s in sigs:
                for digest, size in s.blobs.items():
                    blobs.setdefault(digest, size)
            jobs.append((e, dest, manifests, blobs, sigs))
        # Verify everything before the first upload: a corrupt bundle leaves the registry untouched.
        verified: set[Digest] = set()
        for _, _, _, blobs, _ in jobs:
            for digest, size in blobs.items():
                if digest not in verified:
                    b.verify_blob(digest, size)
                    verified.add(digest)
        results = []
        for e, dest, manifests, blobs, sigs in jobs:
            try:
                results.append(_push_entry(b, e, dest, manifests, blobs, sigs, checked.get(e), opts, log))
            except AuthError as exc:
                raise push_auth_error(dest, exc) from exc
        return results


@dataclass(frozen=True)
class _SignaturePush:
    """One signature entry of a model, as it goes to a registry: cosign's ``.sig`` tag (its manifest put under the
    tag) or the referrers fallback tag (each referrer put by digest, then listed where the target keeps them)."""

    tag: str
    manifests: list[tuple[Digest, str, bytes]]  # children before parents; the entry's own manifest last
    blobs: dict[Digest, int]
    referrers: list[tuple[Digest, int, str]]  # fallback tag: (digest, size, artifactType) of each referrer

    @property
    def is_sig_tag(self) -> bool:
        return self.tag.endswith(".sig")


def _signature_pushes(b: Bundle, e: BundleRef) -> list[_SignaturePush]:
    out = []
    tags = b.signatures(_ref_of(e))
    for tag in (sign.sig_tag(e.digest), sign.referrers_tag(e.digest)):
        s = tags.get(tag)
        if s is None:
            continue
        manifests, blobs = b.closure(s.digest, s.media_type, s.size, f"{s.label} (signatures of {e.label})")
        referrers: list[tuple[Digest, int, str]] = []
        if not tag.endswith(".sig"):
            index = json.loads(manifests[-1][2])  # parsed as an index by closure
            for i, d in enumerate(index.get("manifests", [])):
                artifact_type = d.get("artifactType") if isinstance(d, dict) else None
                if artifact_type in sign.ALL_KINDS:
                    desc = oci.Descriptor.parse(d, f"{b.path}: {s.label} entry {i}")
                    referrers.append((desc.digest, desc.size, str(artifact_type)))
        out.append(_SignaturePush(tag, manifests, blobs, referrers))
    return out


def _push_entry(b: Bundle, e: BundleRef, dest: Reference, manifests: list[tuple[Digest, str, bytes]],
                blobs: dict[Digest, int], sigs: list[_SignaturePush], verified: Verified | None,
                opts: RegistryOptions, log: Any) -> ImportResult:
    """One ref into the target registry: its blobs (and its signatures') in parallel, then its manifests, children
    before parents, then its signatures' manifests."""
    with opts.client(dest, log, actions="pull,push") as client:
        up = Uploader(client, log=log)
        run_parallel([functools.partial(up.ensure, d, s, file_source(b.path, b.member(d).offset_data), d)
                      for d, s in sorted(blobs.items(), key=lambda kv: -kv[1])], opts.concurrency, up.stop)
        for digest, mt, data in manifests:
            reference = digest if digest != e.digest else (dest.tag or digest)
            _retrying(functools.partial(client.put_manifest, reference, data, mt), log, str(dest))
        pushed = 0
        for s in sigs:
            own = s.manifests[-1][0]
            for digest, mt, data in s.manifests:
                if digest == own and not s.is_sig_tag:
                    continue  # the bundle's fallback index: the target keeps its own list (below)
                reference = s.tag if digest == own else digest
                _retrying(functools.partial(client.put_manifest, reference, data, mt), log, str(dest))
                pushed += 1
            if s.referrers and _retrying(lambda: client.get_referrers(e.digest), log, str(dest)) is None:
                for digest, size, artifact_type in s.referrers:
                    sign.add_to_referrers_tag(client, e.digest, digest, size, artifact_type, log)
        log.info("import.pushed", source=e.label, ref=str(dest), digest=e.digest, blobs=len(blobs),
                 uploaded=up.counts["uploaded"], skipped=up.counts["exists"], signatures=pushed)
    return ImportResult(str(dest), e.digest, e.label, verified=verified, signatures=pushed)
