"""The only module that speaks HTTP to a registry: manifests, blobs, auth, redirects and mirrors.

Built on ``http.client`` rather than a higher-level client because the fetch engine needs ``readinto`` on a
reused buffer (no per-chunk allocation, the GIL released during each ``recv``) and exact control over Range
requests. Connections are pooled per thread and per host, so each download worker keeps its own keep-alive
connection.

Auth follows the distribution token spec: a request answered 401 with ``WWW-Authenticate: Bearer realm=...``
gets a token from the realm (anonymously, with basic credentials, or with an identity token) and is retried;
``Basic`` challenges are answered with the configured credentials. Tokens are cached per scope until shortly
before they expire, and refetched once when a registry rejects a cached one. Credentials never appear in logs or
error messages.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterator

from loader.errors import AuthError, NetworkError, NotFoundError, RegistryError, TransientError
from loader.reference import Reference

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the distribution spec's recommended limit
USER_AGENT = "model-loader/0.1"
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class Endpoint:
    """Where to send requests: ``scheme://netloc`` plus an optional query (Spegel-style ``ns=`` for mirrors)."""

    scheme: str
    netloc: str
    query: str = ""
    is_mirror: bool = False

    def url(self, path: str) -> str:
        q = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.netloc}{path}{q}"


@dataclass
class Manifest:
    digest: str
    media_type: str
    data: bytes | None  # None for a HEAD
    size: int

    def json(self) -> dict:
        assert self.data is not None
        try:
            obj = json.loads(self.data)
        except ValueError as exc:
            raise RegistryError(f"manifest {self.digest} is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise RegistryError(f"manifest {self.digest} is not a JSON object")
        return obj


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class _Auth:
    """Per-registry-host auth state, shared by every worker thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    basic: bool = False
    challenge: dict | None = None  # last Bearer challenge params (realm, service)
    tokens: dict[str, _Token] = field(default_factory=dict)  # scope -> token


class BlobResponse:
    """An open blob body. ``start`` is the first byte it carries (a server may ignore Range and send 200)."""

    def __init__(self, resp: http.client.HTTPResponse, start: int, total: int | None, release: Callable[[bool], None]):
        self._resp = resp
        self.start = start
        self.total = total
        self.length = resp.length
        self._release = release

    def readinto(self, buf) -> int:
        try:
            return self._resp.readinto(buf)
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"connection dropped while reading a blob: {exc or type(exc).__name__}") from exc

    def close(self, reusable: bool = False) -> None:
        self._release(reusable and self._resp.isclosed())

    def __enter__(self) -> "BlobResponse":
        return self

    def __exit__(self, *exc) -> None:
        self.close(reusable=exc[0] is None)


class RegistryClient:
    """Talks to one registry (and its mirrors) for one reference's repository."""

    def __init__(
        self,
        ref: Reference,
        *,
        plain_http: bool | None = None,
        insecure: bool = False,
        credentials=None,  # loader.credentials.DockerConfig or None
        mirrors: list[str] = (),
        timeout: float = 30.0,
        log=None,
        actions: str = "pull",  # token scope actions: "pull,push" for push and import --to
        extra_scopes: tuple[str, ...] = (),  # e.g. pull on a cross-repository mount's source repository
    ):
        self.ref = ref
        self.repo = ref.repository
        self.actions = actions
        self.extra_scopes = tuple(extra_scopes)
        scheme = "http" if (plain_http if plain_http is not None else ref.is_loopback) else "https"
        self.upstream = Endpoint(scheme, ref.endpoint_host)
        self.mirrors = [_mirror_endpoint(m, ref.registry) for m in mirrors]
        self.timeout = timeout
        self.log = log
        self._creds = credentials
        self._ssl = ssl.create_default_context()
        if insecure:
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE
        self._local = threading.local()
        self._auth: dict[str, _Auth] = {}
        self._auth_lock = threading.Lock()
        self._dead_mirrors: set[Endpoint] = set()
        self.bytes_received = 0  # body bytes of blob responses, for tests and progress
        self.bytes_sent = 0  # request body bytes of blob uploads
        self._stats_lock = threading.Lock()
        self._conns: list[http.client.HTTPConnection] = []  # every connection opened, closed by close()

    def close(self) -> None:
        """Close every pooled connection, in every thread's pool."""
        with self._stats_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            c.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
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
        resp, _ = self._with_endpoints("HEAD", f"/v2/{self.repo}/manifests/{reference}", {"Accept": ", ".join(MANIFEST_TYPES)})
        digest = resp.getheader("Docker-Content-Digest")
        size = int(resp.getheader("Content-Length") or 0)
        mt = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        resp.read()
        if not digest:
            # Some registries omit the digest on HEAD; a GET tells us for certain.
            return self.get_manifest(reference)
        return Manifest(digest, mt, None, size)

    def get_manifest(self, reference: str) -> Manifest:
        resp, _ = self._with_endpoints("GET", f"/v2/{self.repo}/manifests/{reference}", {"Accept": ", ".join(MANIFEST_TYPES)})
        length = resp.length
        if length is not None and length > MAX_MANIFEST_BYTES:
            resp.close()
            raise RegistryError(f"manifest {self.ref} is {length} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
        data = resp.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise RegistryError(f"manifest {self.ref} is over the {MAX_MANIFEST_BYTES} byte limit")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(
                f"registry {self.ref.registry} returned a manifest for {self.repo}@{reference} whose digest is {digest}"
            )
        mt = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        return Manifest(digest, mt, data, len(data))

    def open_blob(self, digest: str, start: int = 0, end: int | None = None, size: int | None = None) -> BlobResponse:
        """GET a blob from ``start`` (to ``end`` inclusive, or the end). Raises TransientError on retryable faults.

        With ``size`` (the descriptor's), a mirror that reports another total size is passed over for the
        upstream registry; the caller judges what the upstream reports (``BlobResponse.total``)."""
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"

        def wrong_size(resp) -> str | None:
            total = _total_size(resp)
            return None if size is None or total in (None, size) else f"reports {total} bytes for a {size}-byte blob"

        resp, release = self._with_endpoints("GET", f"/v2/{self.repo}/blobs/{digest}", headers, keep_open=True,
                                             mirror_check=wrong_size)
        if resp.status == 206:
            got_start, total = _content_range(resp.getheader("Content-Range"))
            if got_start != start:
                release(False)
                raise TransientError(f"registry answered Range {start}- with Content-Range starting at {got_start}")
            return BlobResponse(resp, start, total, release)
        return BlobResponse(resp, 0, resp.length, release)

    def count_bytes(self, n: int) -> None:
        with self._stats_lock:
            self.bytes_received += n

    # ----------------------------------------------------------------------------------------------- internals
    def _with_endpoints(self, method, path, headers, keep_open=False, mirror_check=None):
        """Try each live mirror, then the upstream. A mirror's failure of any kind falls back to upstream, and so
        does a mirror answer that ``mirror_check(resp)`` finds wrong (it returns why; the mirror is then dead)."""
        for ep in self.mirrors:
            if ep in self._dead_mirrors:
                continue
            try:
                resp, release = self._request(ep, method, path, headers, keep_open)
                why = mirror_check(resp) if mirror_check is not None else None
                if why is None:
                    return resp, release
                release(False)
                self._dead_mirrors.add(ep)
                raise NetworkError(f"mirror {ep.netloc} {why}")
            except (NetworkError, NotFoundError, AuthError) as exc:
                if isinstance(exc, NetworkError) and not isinstance(exc, TransientError):
                    self._dead_mirrors.add(ep)
                if isinstance(exc, TransientError) and "connect" in str(exc):
                    self._dead_mirrors.add(ep)
                if self.log:
                    self.log.warning("mirror.fallback", mirror=ep.netloc, registry=self.ref.registry, error=str(exc))
        return self._request(self.upstream, method, path, headers, keep_open)

    def _request(self, ep: Endpoint, method: str, path: str, headers: dict, keep_open: bool, body=None):
        # ``path`` may be an absolute URL (an upload Location). ``body`` is a callable returning the request body
        # (bytes or an iterable of buffers), called again for each resend after a 401 or a redirect.
        url = path if path.startswith(("http://", "https://")) else ep.url(path)
        auth_tried = 0
        redirects = 0
        send_auth = True
        while True:
            parsed = urllib.parse.urlsplit(url)
            h = {"User-Agent": USER_AGENT, **headers}
            if send_auth:
                h.update(self._auth_header(parsed.netloc))
            conn, release = self._conn(parsed.scheme, parsed.netloc)
            target = parsed.path + (f"?{parsed.query}" if parsed.query else "")
            try:
                conn.request(method, target, body=body() if body is not None else None, headers=h)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                release(False)
                what = "connect to" if isinstance(exc, ConnectionRefusedError) else "talk to"
                raise TransientError(
                    f"could not {what} registry {parsed.netloc} ({exc or type(exc).__name__}) for {self.ref}"
                ) from exc
            status = resp.status
            if status in _REDIRECTS and redirects < 5:
                location = resp.getheader("Location") or ""
                resp.read()
                release(True)
                new = urllib.parse.urljoin(url, location)
                # Blob redirects go to storage (S3, GCS): never hand our registry credentials to another host.
                send_auth = urllib.parse.urlsplit(new).netloc == urllib.parse.urlsplit(ep.url("/")).netloc
                url, redirects = new, redirects + 1
                continue
            if status == 401 and auth_tried < 2 and send_auth:
                challenge = resp.getheader("WWW-Authenticate") or ""
                resp.read()
                release(True)
                auth_tried += 1
                self._on_challenge(parsed.netloc, challenge, retry=auth_tried > 1)
                continue
            if 200 <= status < 300:
                if keep_open:
                    return resp, release
                if method == "HEAD":
                    resp.read()
                    release(True)
                    return resp, release
                # Small bodies (manifests): read fully here so the connection can be reused.
                body = resp.read(MAX_MANIFEST_BYTES + 1)
                release(True)
                return _BufferedResponse(resp, body), release
            body = b""
            try:
                body = resp.read(4096) if method != "HEAD" else b""
            except (OSError, http.client.HTTPException):
                pass
            release(False)
            raise _status_error(status, resp, body, self.ref, parsed.netloc, method, path)

    def _conn(self, scheme: str, netloc: str):
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        key = (scheme, netloc)
        conn = pool.pop(key, None)
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self.timeout)
            with self._stats_lock:
                self._conns.append(conn)

        def release(reusable: bool) -> None:
            if reusable and key not in pool:
                pool[key] = conn
            else:
                conn.close()

        return conn, release

    # auth ------------------------------------------------------------------------------------------------
    def _auth_state(self, netloc: str) -> _Auth:
        with self._auth_lock:
            return self._auth.setdefault(netloc, _Auth())

    def _credentials(self):
        if self._creds is None:
            return None
        return self._creds.credentials_for(self.ref.registry)

    def _auth_header(self, netloc: str) -> dict:
        st = self._auth_state(netloc)
        with st.lock:
            tok = st.tokens.get(self.scope)
            if tok and tok.expires > time.monotonic():
                return {"Authorization": f"Bearer {tok.value}"}
            basic = st.basic
        if basic:
            creds = self._credentials()
            if creds and getattr(creds, "username", None) and getattr(creds, "password", None):
                raw = f"{creds.username}:{creds.password}".encode()
                return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def _on_challenge(self, netloc: str, header: str, retry: bool) -> None:
        from loader.credentials import parse_www_authenticate

        challenges = {c.scheme.lower(): c for c in parse_www_authenticate(header)} if header else {}
        st = self._auth_state(netloc)
        creds = self._credentials()
        if "bearer" in challenges:
            params = challenges["bearer"].params
            with st.lock:
                st.challenge = params
                st.tokens.pop(self.scope, None)
            try:
                token = self._fetch_token(params, creds, self.scopes)
            except AuthError:
                if not self.extra_scopes:
                    raise
                # The token spec says to grant the allowed subset of the scopes; a service that refuses the whole
                # request instead gets the base scope alone (a mount then falls back to an upload).
                token = self._fetch_token(params, creds, self.scopes[:1])
            with st.lock:
                st.tokens[self.scope] = token
            return
        if "basic" in challenges:
            if creds is None or retry:
                raise AuthError(
                    f"registry {self.ref.registry} requires credentials for {self.ref} and "
                    + ("rejected the configured ones" if creds else "none are configured")
                    + ": add an imagePullSecret (or --docker-config) with access to it"
                )
            with st.lock:
                st.basic = True
            return
        raise AuthError(f"registry {self.ref.registry} refused {self.ref} with 401 and no usable challenge ({header[:80]!r})")

    def _fetch_token(self, params: dict, creds, scopes: tuple[str, ...]) -> _Token:
        realm = params.get("realm")
        if not realm:
            raise AuthError(f"registry {self.ref.registry} sent a Bearer challenge without a realm")
        # The token spec repeats ``scope`` in a GET query; the OAuth2 POST form takes one space-separated list.
        query: list[tuple[str, str]] = [("scope", s) for s in scopes]
        if params.get("service"):
            query.append(("service", params["service"]))
        parsed = urllib.parse.urlsplit(realm)
        headers = {"User-Agent": USER_AGENT}
        method, body = "GET", None
        identity = getattr(creds, "identity_token", None) if creds else None
        if identity:
            method = "POST"
            form = {"grant_type": "refresh_token", "refresh_token": identity, "client_id": "model-loader",
                    "scope": " ".join(scopes), **({"service": params["service"]} if params.get("service") else {})}
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif creds and getattr(creds, "username", None):
            raw = f"{creds.username}:{creds.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        sep = "&" if parsed.query else ""
        target = (parsed.path or "/") + "?" + parsed.query + sep + (urllib.parse.urlencode(query) if method == "GET" else "")
        conn, release = self._conn(parsed.scheme, parsed.netloc)
        try:
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(1024 * 1024)
        except (OSError, http.client.HTTPException) as exc:
            release(False)
            raise TransientError(f"could not reach token service {parsed.netloc} for {self.ref}: {exc}") from exc
        release(True)
        if resp.status in (401, 403):
            raise AuthError(
                f"token service {parsed.netloc} refused "
                + ("the configured credentials" if creds else "anonymous access")
                + f" for {self.ref}: check the imagePullSecret (or --docker-config) for {self.ref.registry}"
            )
        if resp.status != 200:
            raise (TransientError if resp.status >= 500 else AuthError)(
                f"token service {parsed.netloc} answered {resp.status} for {self.ref}"
            )
        try:
            obj = json.loads(data)
            value = obj.get("token") or obj.get("access_token")
            expires_in = float(obj.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            raise AuthError(f"token service {parsed.netloc} sent an unreadable token response for {self.ref}") from exc
        if not value:
            raise AuthError(f"token service {parsed.netloc} sent no token for {self.ref}")
        # Refresh a little early so a long download never sends an expired token.
        return _Token(value, time.monotonic() + max(1.0, expires_in * 0.9 - 5))

    # ----------------------------------------------------------------------------------------------- uploads
    # Push primitives (distribution spec "Pushing blobs" and "Pushing manifests"). They always talk to the
    # upstream registry: mirrors are read-only. The sequencing (skip, mount, chunking, retries) lives in
    # loader.push; these methods are one request each.
    def blob_size(self, digest: str) -> int | None:
        """The size of a blob the repository already has, or None when it has not."""
        try:
            resp, _ = self._request(self.upstream, "HEAD", f"/v2/{self.repo}/blobs/{digest}", {}, False)
        except NotFoundError:
            return None
        return int(resp.getheader("Content-Length") or 0)

    def start_upload(self, mount: str | None = None, from_repo: str | None = None) -> str | None:
        """Open an upload session and return its absolute Location URL.

        With ``mount``/``from_repo``, first ask for a cross-repository mount of that blob: None means the registry
        linked it (201) and nothing needs uploading; a registry that cannot mount opens a session instead (202).
        """
        query = "?" + urllib.parse.urlencode({"mount": mount, "from": from_repo}) if mount and from_repo else ""
        resp, _ = self._request(self.upstream, "POST", f"/v2/{self.repo}/blobs/uploads/{query}", {}, False)
        if query and resp.status == 201:
            return None
        return self._location(resp, "POST blobs/uploads/")

    def upload_chunk(self, location: str, body: Callable[[], object], start: int, length: int) -> str:
        """PATCH ``length`` bytes at ``start`` of an open upload; returns the next Location."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length),
                   "Content-Range": f"{start}-{start + length - 1}"}
        resp, _ = self._request(self.upstream, "PATCH", location, headers, False, body=body)
        return self._location(resp, "PATCH upload")

    def upload_offset(self, location: str) -> int:
        """How many bytes of an open upload the registry holds (GET on the session, its ``Range: 0-N``)."""
        resp, _ = self._request(self.upstream, "GET", location, {}, False)
        rng = resp.getheader("Range") or ""
        try:
            first, last = rng.split("-", 1)
            return int(last) + 1 if int(first) == 0 else 0
        except ValueError as exc:
            raise TransientError(f"registry {self.ref.registry} sent an unreadable upload Range {rng!r}") from exc

    def finish_upload(self, location: str, digest: str, body: Callable[[], object] | None = None,
                      length: int = 0) -> None:
        """PUT ?digest= to close an upload, with the last (or only) bytes as its body."""
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        self._request(self.upstream, "PUT", f"{location}{sep}{urllib.parse.urlencode({'digest': digest})}", headers,
                      False, body=body if length else (lambda: b""))

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or digest; returns its digest (checked against the registry's)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        headers = {"Content-Type": media_type, "Content-Length": str(len(data))}
        resp, _ = self._request(self.upstream, "PUT", f"/v2/{self.repo}/manifests/{reference}", headers, False,
                                body=lambda: data)
        theirs = resp.getheader("Docker-Content-Digest")
        if theirs and theirs != digest:
            raise RegistryError(f"registry {self.ref.registry} stored the manifest of {self.ref} as {theirs},"
                                f" not {digest}: it rewrote the manifest")
        return digest

    def count_sent(self, n: int) -> None:
        with self._stats_lock:
            self.bytes_sent += n

    def _location(self, resp, what: str) -> str:
        location = resp.getheader("Location")
        if not location:
            raise RegistryError(f"registry {self.ref.registry} answered {what} for {self.ref} without a Location")
        return urllib.parse.urljoin(self.upstream.url(f"/v2/{self.repo}/blobs/uploads/"), location)


class _BufferedResponse:
    """A fully read small response that still answers getheader()/read() like HTTPResponse."""

    def __init__(self, resp: http.client.HTTPResponse, body: bytes):
        self.status = resp.status
        self._headers = resp
        self._body = body
        self.length = len(body)

    def getheader(self, name, default=None):
        return self._headers.getheader(name, default)

    def read(self, n: int | None = None) -> bytes:
        data, self._body = (self._body, b"") if n is None else (self._body[:n], self._body[n:])
        return data

    def close(self) -> None:
        pass


def _mirror_endpoint(url: str, registry: str) -> Endpoint:
    parsed = urllib.parse.urlsplit(url if "://" in url else f"https://{url}")
    # containerd and Spegel name the upstream in ?ns= so one mirror can front several registries.
    return Endpoint(parsed.scheme or "https", parsed.netloc, urllib.parse.urlencode({"ns": registry}), is_mirror=True)


def _total_size(resp) -> int | None:
    """The whole blob's size as a blob response states it: the Content-Range total of a 206, else the length."""
    if resp.status == 206:
        try:
            return _content_range(resp.getheader("Content-Range"))[1]
        except TransientError:
            return None
    return resp.length


def _content_range(header: str | None) -> tuple[int, int | None]:
    # "bytes 100-199/1000"
    try:
        unit, rest = (header or "").split(" ", 1)
        span, total = rest.split("/", 1)
        return int(span.split("-", 1)[0]), (None if total == "*" else int(total))
    except ValueError as exc:
        raise TransientError(f"registry sent an unreadable Content-Range {header!r}") from exc


def _retry_after(resp) -> float | None:
    value = resp.getheader("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _status_error(status, resp, body: bytes, ref: Reference, netloc: str, method: str, path: str) -> RegistryError:
    what = "manifest" if "/manifests/" in path else "blob" if "/blobs/" in path else "resource"
    detail = _error_detail(body)
    if status in (401, 403):
        return AuthError(
            f"registry {netloc} refused access to the {what} of {ref} ({status}{detail}): check that the pod's"
            " imagePullSecrets (or --docker-config) hold credentials that may pull it"
        )
    if status == 404:
        return NotFoundError(f"registry {netloc} has no {what} for {ref} ({path.rsplit('/', 1)[-1]}){detail}: check the repository and tag")
    if status == 429 or status >= 500:
        return TransientError(f"registry {netloc} answered {status} for the {what} of {ref}{detail}", _retry_after(resp))
    if status == 416:
        # Go's ServeContent (Distribution) says how long the blob really is: ``Content-Range: bytes */SIZE``.
        exc = TransientError(f"registry {netloc} answered 416 (range not satisfiable) for the {what} of {ref}")
        try:
            exc.blob_size = int((resp.getheader("Content-Range") or "").rpartition("/")[2])
        except ValueError:
            pass
        return exc
    return RegistryError(f"registry {netloc} answered {status} to {method} {path}{detail}")


def _error_detail(body: bytes) -> str:
    try:
        errs = json.loads(body).get("errors") or []
        msgs = [e.get("message") or e.get("code") for e in errs if isinstance(e, dict)]
        return f": {'; '.join(m for m in msgs if m)}" if msgs else ""
    except (ValueError, AttributeError):
        return ""


def backoff_delays(attempts: int, base: float = 0.5, cap: float = 10.0) -> Iterator[float]:
    delay = base
    for _ in range(attempts):
        yield delay
        delay = min(cap, delay * 2)


#: Tries of one small request (a manifest, a HEAD, an upload POST) before it is a NetworkError.
SMALL_REQUEST_ATTEMPTS = 4


def retrying(fn, log, event: str, **fields):
    """``fn()``, one small request, retried on transient faults with backoff that honours Retry-After (capped at
    30 s); after SMALL_REQUEST_ATTEMPTS tries, a NetworkError. Each retry is logged as ``event`` with ``fields``."""
    delays = list(backoff_delays(SMALL_REQUEST_ATTEMPTS - 1, base=0.25))
    for i in range(SMALL_REQUEST_ATTEMPTS):
        try:
            return fn()
        except TransientError as exc:
            if i == SMALL_REQUEST_ATTEMPTS - 1:
                raise NetworkError(f"{exc} (after {SMALL_REQUEST_ATTEMPTS} attempts)") from exc
            delay = min(exc.retry_after, 30.0) if exc.retry_after is not None else delays[i]
            if log is not None:
                log.warning(event, **fields, attempt=i + 1, delay_s=delay, error=str(exc))
            time.sleep(delay)
