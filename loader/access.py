"""Who may have a model from a shared cache: the access rule, as pure decisions plus the proofs they ask for.

A node cache is shared by tenants who do not trust each other and who may know each other's references and
digests. A pod gets a cached model only when it proves it could have read the model itself. What the cache
records per model is where it was verified from (:class:`Source`: registry, repository, the identity that read
it, whether TLS vouched for the registry). With ``--check-access`` (what the webhook injects for shared caches):

* **Hit through a recorded source over verified TLS**: the pod's registry must serve the manifest by digest to
  the pod's credentials, bytes verified against the digest (one small GET; a registry serves a repository's
  manifest only to credentials that may read that repository, and TLS says it is that registry).
* **Any other hit** (another registry or repository, plain HTTP, ``--insecure-skip-tls-verify``): the same
  manifest GET, plus *proof of possession*: a random range of every blob, compared with the cached bytes. A
  registry that merely claims a digest (HEAD 200, a ``Docker-Content-Digest`` header) proves nothing.
* **Blobs already in the cache that a new pull would use** are proven the same way; a blob whose proof fails is
  downloaded in full from the pod's registry and verified against its digest before the pull goes on.
* **Registry unreachable**: the cached copy is granted only for a reference whose registry and repository are a
  recorded source, and only to the identity that read it there (a fingerprint of the credentials, never the
  secret) or when it was read anonymously (a public model). A pod can make a registry unreachable at will
  (``hostAliases``), so an outage alone proves nothing.
* ``--offline`` is unchanged (the webhook never injects it) and a pod's own ``pod`` cache is not shared.

A successful proof adds the pod's source to the model's record, so the next pod from that repository pays only
the manifest GET.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from loader.digest import Digest
from loader.errors import LoaderError
from loader.fetch import BlobSource
from loader.reference import Reference
from loader.retry import RetryPolicy

ANONYMOUS = "anonymous"
PROOF_BYTES = 64  # per blob: a random window the prover cannot guess without holding the blob
FINGERPRINT_ITERATIONS = 20_000  # PBKDF2 rounds: a leaked meta file is not a cheap oracle for weak passwords

Proof = Literal["manifest", "possession"]


@dataclass(frozen=True)
class Source:
    registry: str  # host[:port] as the reference writes it
    repository: str
    identity: str  # ANONYMOUS or "pbkdf2:<hex>"
    tls: bool  # the registry was reached over verified TLS

    @classmethod
    def parse(cls, obj: object) -> Source | None:
        if not isinstance(obj, dict):
            return None
        reg, repo, ident, tls = obj.get("registry"), obj.get("repository"), obj.get("identity"), obj.get("tls")
        if not all(isinstance(x, str) and x for x in (reg, repo, ident)) or not isinstance(tls, bool):
            return None
        return cls(str(reg), str(repo), str(ident), tls)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class CredentialsLike(Protocol):
    username: str
    password: str
    identity_token: str


def identity_of(registry: str, creds: CredentialsLike | None) -> str:
    """Who is asking, as a fingerprint safe to store in a shared cache: never the secret itself."""
    if creds is None or not (creds.password or creds.identity_token):
        return ANONYMOUS
    secret = (creds.identity_token or creds.password).encode()
    salt = f"model-cache identity\0{registry}\0{creds.username}".encode()
    return "pbkdf2:" + hashlib.pbkdf2_hmac("sha256", secret, salt, FINGERPRINT_ITERATIONS).hex()[:32]


def sources_of(meta: Mapping[str, Any]) -> list[Source]:
    out = []
    for obj in meta.get("sources", []):
        src = Source.parse(obj)
        if src is not None:
            out.append(src)
    return out


def hit_proof(sources: Iterable[Source], ref: Reference, tls: bool) -> Proof:
    """What a pod must show to get a cached model over the network (pure)."""
    if tls and any(s.registry == ref.registry and s.repository == ref.repository and s.tls for s in sources):
        return "manifest"
    return "possession"


def may_fall_back(sources: Iterable[Source], ref: Reference, identity: str) -> bool:
    """May this pod have the cached copy while its registry cannot be reached? (pure) Only for a recorded source of
    this registry and repository: read with this pod's own credentials, or read anonymously over verified TLS (or
    imported by an admin). An anonymous read over plain HTTP grants nothing: anyone could have answered it (a pod's
    hostAliases can point the registry's name at a server of its own)."""
    return any(s.registry == ref.registry and s.repository == ref.repository
               and ((s.identity == identity and identity != ANONYMOUS) or (s.identity == ANONYMOUS and s.tls))
               for s in sources)


def identity_via_mirrors(mirrors: Iterable[str], credentials_for: Any) -> str:
    """The identity of a pull that reached the registry's content through mirrors: anonymous only when no mirror
    was sent credentials (none in its URL, none in the docker config for its host). A private registry's mirror
    that asks for the node agent's password must not make the model look public."""
    secrets = []
    for url in mirrors:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"https://{url}")
        if parsed.password or parsed.username:
            secrets.append(f"{parsed.hostname}\0{parsed.username}\0{parsed.password}")
        elif credentials_for is not None and parsed.hostname:
            host = f"{parsed.hostname}:{parsed.port}" if parsed.port else parsed.hostname
            creds = credentials_for(host)
            if creds is not None and (creds.password or creds.identity_token):
                secrets.append(f"{host}\0{creds.username}\0{creds.identity_token or creds.password}")
    if not secrets:
        return ANONYMOUS
    salt = b"model-cache identity via mirrors"
    return "pbkdf2:" + hashlib.pbkdf2_hmac("sha256", "\n".join(sorted(secrets)).encode(), salt,
                                           FINGERPRINT_ITERATIONS).hex()[:32]


MAX_SOURCES = 64
KEEP_FIRST = 16  # the earliest sources (the model's first readers) are never pushed out by later ones


def add_source(meta: dict[str, Any], source: Source) -> None:
    """Record a source in a meta dict (in place), once, keeping the list bounded. The first KEEP_FIRST sources
    stay: another tenant proving possession from many repositories of its own rotates only the rest, so it cannot
    take the outage fallback away from the tenant that read the model first."""
    current = sources_of(meta)
    if source in current:
        return
    current.append(source)
    if len(current) > MAX_SOURCES:
        current = current[:KEEP_FIRST] + current[len(current) - (MAX_SOURCES - KEEP_FIRST):]
    meta["sources"] = [s.as_json() for s in current]


def possession_failures(client: BlobSource, blobs: Iterable[tuple[Digest, int]], blob_path: Callable[[Digest], Path],
                        policy: RetryPolicy | None = None, rng: random.Random | None = None) -> list[Digest]:
    """The blobs for which the registry did not serve the cached bytes of a random window (proof of possession).

    One small Range request per blob, for a window of PROOF_BYTES (the whole blob when it is smaller), which must
    arrive within the policy's rate window (a trickled proof fails like a trickled transfer). A registry that
    ignores Range, answers an error, is too slow, or serves other bytes fails the proof for that blob (the caller
    then downloads and verifies it in full)."""
    rng = rng or random.SystemRandom()
    limit = (policy or RetryPolicy()).rate_window
    failed: list[Digest] = []
    for digest, size in blobs:
        if size == 0:
            continue
        length = min(PROOF_BYTES, size)
        offset = rng.randrange(size - length + 1)  # a full window wherever it falls
        if _served(client, digest, size, offset, length, limit) != _cached(blob_path(digest), offset, length):
            failed.append(digest)
    return failed


def _served(client: BlobSource, digest: Digest, size: int, offset: int, length: int,
            limit: float) -> bytes | None:
    deadline = time.monotonic() + limit
    try:
        with client.open_blob(digest, offset, offset + length - 1, size=size) as body:
            if body.start != offset:
                return None  # the registry ignored Range: no cheap proof, download it instead
            buf = bytearray(length)
            view = memoryview(buf)
            got = 0
            while got < length:
                n = body.readinto(view[got:])  # one socket read at a time (loader.transport)
                if n == 0 or time.monotonic() > deadline:
                    return None
                got += n
            return bytes(buf)
    except (LoaderError, OSError):
        return None  # refusals (401/403/404) fail the proof too; the download that follows reports them properly


def _cached(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
