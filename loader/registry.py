"""A registry repository: the manifests, blobs and uploads of one repository, on its registry and its mirrors.

Composed of two parts it does not reimplement: loader.transport (connections, TLS, redirects, bounds on what a
server may send; the only module that speaks HTTP) and loader.auth (which credentials may go to which origin,
challenges, tokens). This module decides what to ask, in which order (live mirrors first, then the registry
itself), and turns each answer into a typed value at the boundary: ``Docker-Content-Digest`` into a
:class:`~loader.digest.Digest` (a malformed one is refused, never used), ``Content-Length`` into a non-negative
int, ``Content-Range`` into its three numbers, ``Retry-After`` into seconds, an error body into its distribution
error code. Manifests are read to at most MAX_MANIFEST_BYTES, error bodies to at most 4 KiB.

Mirrors are read-only caches the registry's operator chose, each with its own credentials (see loader.auth). Any
refusal or failure of a mirror falls back to the registry for that request; a mirror that cannot be connected
to, refuses our credentials, breaks the protocol, or serves something other than what was asked (another size,
other manifest bytes, a malformed digest) is passed over for the rest of the client's life.

Errors are types, never matched by their text (loader.errors has the tree)::

    401, 403            AuthError
    404                 NotFoundError
    416                 RangeNotSatisfiable, with ``blob_size`` from ``Content-Range: bytes */SIZE``
    408, 429, 5xx       TransientError, with ``retry_after``
    other 4xx           RejectedError(status, code), ``code`` the distribution error code (DIGEST_INVALID, ...)
    anything else       ProtocolError (loader.transport), as is a broken header or a broken bound
    no connection       ConnectError; a dropped one TransientError

Nothing here retries: callers wrap small requests in loader.retry.call, and blob reads go through the copy
engine (loader.fetch.transfer), under the one retry policy (loader.retry).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar

from loader.auth import Authenticator, Log
from loader.credentials import Credentials
from loader.digest import Digest, is_digest
from loader.errors import (
    ArtifactError,
    AuthError,
    ConnectError,
    NetworkError,
    NotFoundError,
    RangeNotSatisfiable,
    RegistryError,
    RejectedError,
    TransientError,
    UsageError,
)
from loader.oci import INDEX_TYPES, MANIFEST_TYPES, MAX_MANIFEST_BYTES
from loader.reference import Reference, speaks_plain_http
from loader.transport import (
    USER_AGENT,
    BodyFactory,
    Buffer,
    DowngradeRefused,
    Origin,
    ProtocolError,
    Response,
    Transport,
    redact_url,
)

if TYPE_CHECKING:
    from loader.credentials import DockerConfig

__all__ = [
    "INDEX_TYPES", "MANIFEST_TYPES", "MAX_MANIFEST_BYTES", "USER_AGENT", "BlobResponse",
    "Endpoint", "Manifest", "RegistryClient", "parse_content_range", "parse_retry_after",
]

MAX_ERROR_BODY = 4096
MAX_SMALL_BODY = 64 * 1024  # upload and HEAD answers carry no body worth reading; more than this is dropped
MAX_RETRY_AFTER = 3600.0
MAX_MEDIA_TYPE = 255
_ACCEPT = ", ".join(MANIFEST_TYPES)
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/([0-9]{1,19})")
_UPLOAD_RANGE = re.compile(r"([0-9]{1,19})-(-1|[0-9]{1,19})")  # Distribution says 0--1 for an empty upload
_RETRY_SECONDS = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,6})?")
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: an origin, its role ("registry" or "mirror"), how messages name it (``host[:port]``,
    never with userinfo) and an optional query (containerd and Spegel name the upstream in ``?ns=``)."""

    origin: Origin
    role: str
    label: str
    query: str = ""

    @property
    def scheme(self) -> str:
        return self.origin.scheme

    @property
    def netloc(self) -> str:
        return self.label

    def url(self, path: str) -> str:
        return self.origin.url(path + (f"?{self.query}" if self.query else ""))


@dataclass
class Manifest:
    digest: Digest
    media_type: str
    data: bytes | None  # None for a HEAD
    size: int

    def json(self) -> dict[str, Any]:
        assert self.data is not None
        try:
            obj = json.loads(self.data)
        except ValueError as exc:
            raise RegistryError(f"manifest {self.digest} is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise RegistryError(f"manifest {self.digest} is not a JSON object")
        return obj


class BlobResponse:
    """An open blob body. ``start`` is the first byte it carries (a server may ignore Range and send 200);
    ``total`` the whole blob's size as the answer states it, when it does."""

    def __init__(self, resp: Response, start: int, total: int | None) -> None:
        self._resp = resp
        self.start = start
        self.total = total
        self.length = resp.length

    def readinto(self, buf: Buffer) -> int:
        return self._resp.readinto(buf)

    def read_all(self, limit: int, what: str) -> bytes:
        """The whole (small) body, at most ``limit`` bytes and within transport.BODY_SECONDS (Response.read_body)."""
        return self._resp.read_body(limit, what)

    def close(self, reusable: bool = False) -> None:
        self._resp.close(reusable)

    def __enter__(self) -> BlobResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(reusable=exc[0] is None)


class RegistryClient:
    """Talks to one registry (and its mirrors) for one reference's repository."""

    def __init__(
        self,
        ref: Reference,
        *,
        plain_http: bool | None = None,
        insecure: bool = False,
        credentials: DockerConfig | None = None,
        mirrors: Sequence[str] = (),
        timeout: float = 30.0,
        log: Log | None = None,
        actions: str = "pull",  # token scope actions: "pull,push" for push and import --to
        extra_scopes: tuple[str, ...] = (),  # e.g. pull on a cross-repository mount's source repository
        ca_files: Sequence[str] = (),  # extra CAs to trust (an admin's private registry CA)
        plain_http_registries: Collection[str] = (),  # registries spoken to over plain HTTP (when plain_http is None)
    ) -> None:
        self.ref = ref
        self.repo = ref.repository
        self.actions = actions
        self.extra_scopes = tuple(extra_scopes)
        self.timeout = timeout
        self.log = log
        self.transport = Transport(insecure=insecure, timeout=timeout, ca_files=ca_files)
        self.auth = Authenticator(self.transport, str(ref), log)
        plain = plain_http if plain_http is not None else speaks_plain_http(ref.registry, plain_http_registries)
        scheme = "http" if plain else "https"
        try:
            origin = Origin.of(f"{scheme}://{ref.endpoint_host}")
        except ValueError as exc:
            raise UsageError(f"registry {ref.registry!r} of {ref} is not a usable host[:port]: {exc}") from None
        self.upstream = Endpoint(origin, "registry", ref.registry)
        docker = credentials
        self.auth.add_origin(
            origin, role="registry", label=ref.registry,
            lookup=lambda: docker.credentials_for(ref.registry) if docker is not None else None,
            fix=f"check that the pod's imagePullSecrets (or --docker-config) hold credentials for {ref.registry}"
                " that may pull it",
        )
        self.mirrors: list[Endpoint] = []
        for url in mirrors:
            ep, own, key = parse_mirror(url, ref.registry)
            self.mirrors.append(ep)
            self.auth.add_origin(
                ep.origin, role="mirror", label=ep.label,
                lookup=_mirror_lookup(own, docker, key),
                fix=f"give the mirror its own credentials (user:password in its --mirror URL, or an entry for {key}"
                    " in the docker config); the registry's are never sent to a mirror",
            )
        self._dead_mirrors: set[Endpoint] = set()
        self.bytes_received = 0  # body bytes of blob responses, for tests and progress
        self.bytes_sent = 0  # request body bytes of blob uploads
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        """Close every pooled connection, in every thread's pool."""
        self.transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- public
    @property
    def scopes(self) -> tuple[str, ...]:
        # One token for all of them: a cross-repository mount needs push on this repository and pull on the
        # source in the same token, or a token registry answers the mount with a plain upload session.
        return (f"repository:{self.repo}:{self.actions}", *self.extra_scopes)

    @property
    def scope(self) -> str:
        """The token cache key: every scope asked for, space-separated as OAuth2 writes a scope list."""
        return " ".join(self.scopes)

    def head_manifest(self, reference: str) -> Manifest:
        def accept(resp: Response, ep: Endpoint) -> Manifest | None:
            resp.discard()
            digest = _content_digest(resp)
            if digest is None:
                return None
            if is_digest(reference) and digest != reference:
                raise ProtocolError(f"{resp.name} answered HEAD for {self.repo}@{reference} with"
                                    f" Docker-Content-Digest {digest}: it claims to hold other content")
            return Manifest(digest, _media_type(resp), None, resp.content_length or 0)

        head = self._with_endpoints("HEAD", f"/v2/{self.repo}/manifests/{reference}", {"Accept": _ACCEPT}, accept)
        # Some registries omit the digest on HEAD; a GET tells us for certain.
        return head if head is not None else self.get_manifest(reference)

    def get_manifest(self, reference: str) -> Manifest:
        def accept(resp: Response, ep: Endpoint) -> Manifest:
            data = resp.read_body(MAX_MANIFEST_BYTES, f"the manifest of {self.ref}")
            digest = Digest.of(data)
            if is_digest(reference) and digest != reference:
                raise ProtocolError(f"{resp.name} returned a manifest for {self.repo}@{reference} whose digest is"
                                    f" {digest}")
            claimed = _content_digest(resp)
            if claimed is not None and claimed != digest:
                raise ProtocolError(f"{resp.name} sent manifest bytes for {self.repo}:{reference} hashing to"
                                    f" {digest} under Docker-Content-Digest {claimed}")
            return Manifest(digest, _media_type(resp), data, len(data))

        return self._with_endpoints("GET", f"/v2/{self.repo}/manifests/{reference}", {"Accept": _ACCEPT}, accept)

    def get_referrers(self, digest: str) -> bytes | None:
        """The OCI 1.1 referrers index of ``digest`` (``GET /v2/<name>/referrers/<digest>``, read to at most
        MAX_MANIFEST_BYTES; unfiltered, as the ``artifactType`` filter is optional for a registry and the caller
        filters anyway), or None when the registry answers 404: it has no referrers API (Distribution 2.8), and
        the caller falls back to the tag schemes."""
        dgst = Digest.parse(digest, f"referrers subject of {self.ref}")

        def accept(resp: Response, ep: Endpoint) -> bytes:
            return resp.read_body(MAX_MANIFEST_BYTES, f"the referrers of {self.repo}@{dgst}")

        try:
            return self._with_endpoints("GET", f"/v2/{self.repo}/referrers/{dgst}",
                                        {"Accept": "application/vnd.oci.image.index.v1+json"}, accept)
        except NotFoundError:
            return None

    def open_blob(self, digest: str, start: int = 0, end: int | None = None, size: int | None = None) -> BlobResponse:
        """GET a blob from ``start`` (to ``end`` inclusive, or the end). Raises TransientError on retryable faults.

        With ``size`` (the descriptor's), a mirror that reports another total size is passed over for the
        upstream registry; the caller judges what the upstream reports (``BlobResponse.total``)."""
        dgst = Digest.parse(digest, f"blob of {self.ref}")
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"

        def accept(resp: Response, ep: Endpoint) -> BlobResponse:
            try:
                if resp.status == 206:
                    first, last, total = parse_content_range(resp.header("Content-Range"), resp.name)
                    if resp.length is not None and resp.length != last - first + 1:
                        raise ProtocolError(f"{resp.name} sent Content-Range {first}-{last} with a body of"
                                            f" {resp.length} bytes")
                    if first != start:
                        raise TransientError(f"{resp.name} answered Range {start}- with Content-Range starting at"
                                             f" {first}")
                    blob = BlobResponse(resp, start, total)
                else:
                    blob = BlobResponse(resp, 0, resp.length)
                if ep.role == "mirror" and size is not None and blob.total not in (None, size):
                    raise ProtocolError(f"mirror {ep.label} reports {blob.total} bytes for a {size}-byte blob")
                return blob
            except BaseException:
                resp.close()
                raise

        return self._with_endpoints("GET", f"/v2/{self.repo}/blobs/{dgst}", headers, accept)

    def count_bytes(self, n: int) -> None:
        with self._stats_lock:
            self.bytes_received += n

    # ----------------------------------------------------------------------------------------------- uploads
    # Push primitives (distribution spec "Pushing blobs" and "Pushing manifests"). They always talk to the
    # upstream registry: mirrors are read-only. The sequencing (skip, mount, chunking, retries) lives in
    # loader.push; these methods are one request each.
    def blob_size(self, digest: str) -> int | None:
        """The size of a blob the repository already has, or None when it has not."""
        dgst = Digest.parse(digest, f"blob of {self.ref}")
        try:
            resp = self._request(self.upstream, "HEAD", self.upstream.url(f"/v2/{self.repo}/blobs/{dgst}"), {})
        except NotFoundError:
            return None
        resp.discard()
        return resp.content_length or 0

    def start_upload(self, mount: str | None = None, from_repo: str | None = None) -> str | None:
        """Open an upload session and return its absolute Location URL.

        With ``mount``/``from_repo``, first ask for a cross-repository mount of that blob: None means the registry
        linked it (201) and nothing needs uploading; a registry that cannot mount opens a session instead (202).
        """
        query = "?" + urllib.parse.urlencode({"mount": mount, "from": from_repo}) if mount and from_repo else ""
        resp = self._request(self.upstream, "POST", self.upstream.url(f"/v2/{self.repo}/blobs/uploads/{query}"), {})
        resp.read_some(MAX_SMALL_BODY)
        if query and resp.status == 201:
            return None
        return self._location(resp, "POST blobs/uploads/")

    def upload_chunk(self, location: str, body: BodyFactory, start: int, length: int) -> str:
        """PATCH ``length`` bytes at ``start`` of an open upload; returns the next Location."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length),
                   "Content-Range": f"{start}-{start + length - 1}"}
        resp = self._request(self.upstream, "PATCH", location, headers, body=body)
        resp.read_some(MAX_SMALL_BODY)
        return self._location(resp, "PATCH upload")

    def upload_offset(self, location: str) -> int:
        """How many bytes of an open upload the registry holds (GET on the session, its ``Range: 0-N``)."""
        resp = self._request(self.upstream, "GET", location, {})
        resp.read_some(MAX_SMALL_BODY)
        rng = (resp.header("Range") or "").strip()
        m = _UPLOAD_RANGE.fullmatch(rng)
        if m is None:
            raise TransientError(f"{resp.name} sent an unreadable upload Range {rng[:80]!r} for {self.ref}")
        first, last = int(m.group(1)), int(m.group(2))
        return last + 1 if first == 0 else 0

    def finish_upload(self, location: str, digest: str, body: BodyFactory | None = None, length: int = 0) -> None:
        """PUT ?digest= to close an upload, with the last (or only) bytes as its body."""
        dgst = Digest.parse(digest, f"blob of {self.ref}")
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        resp = self._request(self.upstream, "PUT", f"{location}{sep}{urllib.parse.urlencode({'digest': dgst})}",
                             headers, body=body if length and body is not None else (lambda: b""))
        resp.read_some(MAX_SMALL_BODY)

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or digest; returns its digest (checked against the registry's)."""
        digest = Digest.of(data)
        headers = {"Content-Type": media_type, "Content-Length": str(len(data))}
        resp = self._request(self.upstream, "PUT", self.upstream.url(f"/v2/{self.repo}/manifests/{reference}"),
                             headers, body=lambda: data)
        resp.read_some(MAX_SMALL_BODY)
        theirs = _content_digest(resp)
        if theirs is not None and theirs != digest:
            raise RegistryError(f"registry {self.ref.registry} stored the manifest of {self.ref} as {theirs},"
                                f" not {digest}: it rewrote the manifest")
        return digest

    def count_sent(self, n: int) -> None:
        with self._stats_lock:
            self.bytes_sent += n

    # ----------------------------------------------------------------------------------------------- internals
    def _with_endpoints(self, method: str, path: str, headers: dict[str, str],
                        accept: Callable[[Response, Endpoint], T]) -> T:
        """Try each live mirror, then the registry. ``accept`` turns a 2xx answer into the result (closing it on
        failure). A mirror's failure of any kind, ``accept``'s included, falls back to the registry."""
        for ep in self.mirrors:
            if ep in self._dead_mirrors:
                continue
            try:
                return accept(self._request(ep, method, ep.url(path), headers), ep)
            except (RegistryError, ArtifactError) as exc:
                # Dead for good: unreachable, refusing our credentials (or their absence: every request of this
                # repository would be refused alike), breaking the protocol, or serving something other than
                # asked. Per request only: missing content, other refusals, 5xx, dropped connections.
                if isinstance(exc, (ConnectError, ProtocolError, ArtifactError, AuthError)) or (
                        isinstance(exc, NetworkError) and not isinstance(exc, TransientError)):
                    self._dead_mirrors.add(ep)
                if self.log is not None:
                    self.log.warning("mirror.fallback", mirror=ep.label, registry=self.ref.registry, error=str(exc))
        return accept(self._request(self.upstream, method, self.upstream.url(path), headers), self.upstream)

    def _request(self, ep: Endpoint, method: str, url: str, headers: dict[str, str],
                 body: BodyFactory | None = None) -> Response:
        """One request to ``ep`` (``url`` may be an upload Location), answering up to two auth challenges of
        ``ep``'s own origin; returns a 2xx answer or raises its typed error."""
        scope = self.scope
        for attempt in range(3):
            resp = self.transport.request(method, url, headers, body=body,
                                          authorize=lambda o: self.auth.headers(o, scope), role=ep.role,
                                          context=f" for {self.ref}")
            if resp.status == 401 and attempt < 2 and resp.origin == ep.origin:
                challenge = resp.header("WWW-Authenticate") or ""
                resp.discard()
                self.auth.answer(ep.origin, challenge, self.scopes, retry=attempt > 0)
                continue
            if 200 <= resp.status < 300:
                return resp
            raise self._status_error(resp, method)
        raise AssertionError("unreachable")

    def _status_error(self, resp: Response, method: str) -> RegistryError:
        status, name = resp.status, resp.name
        body = resp.read_some(MAX_ERROR_BODY if method != "HEAD" else 0)
        resp.close()
        path = urllib.parse.urlsplit(resp.url).path
        what = "manifest" if "/manifests/" in path else "blob" if "/blobs/" in path else "resource"
        code, detail = parse_error_body(body)
        ref = self.ref
        if status in (401, 403):
            return AuthError(
                f"{name} refused access to the {what} of {ref} ({status}{detail}): check that the pod's"
                " imagePullSecrets (or --docker-config) hold credentials that may pull it"
            )
        if status == 404:
            return NotFoundError(f"{name} has no {what} for {ref} ({path.rsplit('/', 1)[-1][:80]}){detail}: check"
                                 " the repository and tag")
        if status == 416:
            # Go's ServeContent (Distribution) says how long the blob really is: ``Content-Range: bytes */SIZE``.
            m = _UNSATISFIED_RANGE.fullmatch((resp.header("Content-Range") or "").strip())
            return RangeNotSatisfiable(f"{name} answered 416 (range not satisfiable) for the {what} of {ref}",
                                       int(m.group(1)) if m else None)
        if status in (408, 429) or status >= 500:
            return TransientError(f"{name} answered {status} for the {what} of {ref}{detail}",
                                  parse_retry_after(resp.header("Retry-After")))
        if 400 <= status < 500:
            return RejectedError(f"{name} refused {method} {path[:200]} for {ref} ({status}{detail})", status, code)
        return ProtocolError(f"{name} answered {status} to {method} {path[:200]} for {ref}{detail}")

    def _location(self, resp: Response, what: str) -> str:
        location = resp.header("Location")
        if not location:
            raise RegistryError(f"registry {self.ref.registry} answered {what} for {self.ref} without a Location")
        url = urllib.parse.urljoin(resp.url, location.strip())
        try:
            origin = Origin.of(url)
        except ValueError as exc:
            raise ProtocolError(f"registry {self.ref.registry} answered {what} for {self.ref} with an unusable"
                                f" Location ({exc})") from None
        if self.upstream.origin.secure and not origin.secure:
            raise DowngradeRefused(f"registry {self.ref.registry} answered {what} for {self.ref} with a plain http"
                                   f" Location ({origin}); the loader does not send model bytes or credentials"
                                   " over a downgrade from https: fix the registry's external URL")
        return url


# --------------------------------------------------------------------------------------------------- mirrors
def parse_mirror(url: str, registry: str) -> tuple[Endpoint, Credentials | None, str]:
    """A ``--mirror`` URL as (endpoint, its own credentials from ``user:password@``, its docker config key).

    The userinfo is taken out here and appears nowhere else: the endpoint's label is ``host[:port]``, and a
    message about a bad URL shows it as ``user:***@``."""
    text = url.strip() if "://" in url else f"https://{url.strip()}"
    try:
        origin = Origin.of(text)
    except ValueError as exc:
        raise UsageError(f"mirror {redact_url(text)!r} for {registry} is not a usable URL ({exc}): write"
                         " http(s)://[user:password@]host[:port]") from None
    parts = urllib.parse.urlsplit(text)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    own = None
    if at:
        user, _, password = userinfo.partition(":")
        own = Credentials(urllib.parse.unquote(user), urllib.parse.unquote(password),
                          source=f"--mirror URL of {hostport}")
    # containerd and Spegel name the upstream in ?ns= so one mirror can front several registries.
    return Endpoint(origin, "mirror", hostport, urllib.parse.urlencode({"ns": registry})), own, hostport


def _mirror_lookup(own: Credentials | None, docker: DockerConfig | None,
                   key: str) -> Callable[[], Credentials | None]:
    def lookup() -> Credentials | None:
        if own is not None:
            return own
        return docker.credentials_for(key) if docker is not None else None

    return lookup


# --------------------------------------------------------------------------------------------------- headers
def parse_content_range(value: str | None, name: str) -> tuple[int, int, int | None]:
    """``bytes FIRST-LAST/TOTAL`` (TOTAL may be ``*``) as (first, last, total or None); anything else, or
    numbers that contradict each other, is a ProtocolError naming ``name`` (the server)."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if m is None:
        shown = (value or "")[:80]
        raise ProtocolError(f"{name} sent an unreadable Content-Range {shown!r}")
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        raise ProtocolError(f"{name} sent Content-Range {m.group(0)!r}, whose numbers contradict each other")
    return first, last, total


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), clamped to [0, MAX_RETRY_AFTER]; None when
    absent or unreadable (callers then use their own backoff)."""
    if not value:
        return None
    value = value.strip()
    if _RETRY_SECONDS.fullmatch(value):
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return min(max(0.0, when - time.time()), MAX_RETRY_AFTER)


def parse_error_body(body: bytes) -> tuple[str | None, str]:
    """(the first distribution error code, a short detail for messages) from an error body (already bounded)."""
    try:
        errs = json.loads(body).get("errors") or []
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None, ""
    if not isinstance(errs, list):
        return None, ""
    code = None
    msgs = []
    for e in errs[:3]:
        if not isinstance(e, dict):
            continue
        c = e.get("code")
        if code is None and isinstance(c, str) and _ERROR_CODE.fullmatch(c):
            code = c
        m = e.get("message") or c
        if isinstance(m, str) and m:
            msgs.append("".join(ch for ch in m[:200] if ch.isprintable()))
    return code, (f": {'; '.join(msgs)}" if msgs else "")


def _content_digest(resp: Response) -> Digest | None:
    """The ``Docker-Content-Digest`` header as a Digest (refused when malformed), or None when absent."""
    value = resp.header("Docker-Content-Digest")
    return None if value is None else Digest.parse(value.strip(), f"{resp.name} header Docker-Content-Digest")


def _media_type(resp: Response) -> str:
    return (resp.header("Content-Type") or "").split(";")[0].strip()[:MAX_MEDIA_TYPE]


