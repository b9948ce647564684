"""HTTP/1.1 to registries, token services and blob storage: the only loader module that imports ``http.client``
or ``ssl``.

It owns one TLS context, a connection pool per thread and per origin (so each download worker keeps its own
keep-alive connection), redirects, the bounds on what a server may send, and the mapping of socket and protocol
failures to the loader's error types. It never retries (the one retry policy lives with the callers) and it
decides nothing about credentials: every hop of a request, redirects included, gets exactly the headers that the
caller's ``authorize(origin)`` returns for that hop's origin (loader.auth decides), so a redirect can never carry
an ``Authorization`` meant for another origin.

``http.client`` rather than a higher-level client because the fetch engine needs ``readinto`` on a reused buffer
(no per-chunk allocation, the GIL released during each ``recv``) and exact control over Range requests.

Redirects: at most MAX_REDIRECTS hops, and never from https to http. A downgrade is refused for every request,
manifests and blobs alike: a blob is verified by digest afterwards, so integrity is not what is at stake, but a
private model's bytes (and the pre-signed storage URL, itself a credential) would cross the network in clear
text, and a registry we reached over TLS that points us at plain http is either misconfigured or not the
registry. Nothing is sent to the http location at all.

Errors (the loader's tree is in loader.errors; the two classes defined here extend it)::

    RegistryError
    ├── ProtocolError                  the answer broke HTTP or one of our bounds, or a TLS certificate did not
    │   └── DowngradeRefused           verify; retrying cannot help (exit 7)
    └── NetworkError
        └── TransientError             the connection dropped or timed out mid-request (retried by callers)
            └── ConnectError           no connection at all: refused, unreachable, DNS, connect timeout
"""

from __future__ import annotations

import contextlib
import http.client
import io
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from loader.errors import ConnectError, RegistryError, TransientError, UsageError

USER_AGENT = "model-loader/0.1"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
# http.client already refuses more than 100 header lines and lines over 64 KiB; this bounds their sum.
MAX_HEADER_BYTES = 64 * 1024
MAX_DISCARD_BYTES = 64 * 1024  # a body we do not need is read this far to keep the connection, else dropped
#: A whole small body (a manifest, a token answer) must arrive within this; the socket timeout bounds each read only.
BODY_SECONDS = 60.0
#: An answer's status line and headers, whole, must arrive within this after the request was sent (the socket
#: timeout bounds each read only: 100 header lines of 64 KiB at a byte every 29 s would take years).
HEAD_SECONDS = 60.0
READ_PIECE = 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,252})|[0-9a-f:.]{2,45}")
_DIGITS_RE = re.compile(r"[0-9]{1,19}")
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")
MAX_LINE = 65536  # http.client's own bound on a status, header or chunk-size line

Buffer = bytes | bytearray | memoryview
Body = bytes | Iterable[Buffer]
BodyFactory = Callable[[], Body]
Authorize = Callable[["Origin"], Mapping[str, str]]


class ProtocolError(RegistryError):
    """A server's answer broke HTTP or one of the loader's bounds (headers, body sizes, header syntax), or its
    certificate did not verify. Not retried: asking again gets the same answer."""


class DowngradeRefused(ProtocolError):
    """An https origin redirected to http; the redirect was not followed."""


@dataclass(frozen=True)
class Origin:
    """Where a credential may go: scheme, host (lower case, IPv6 without brackets) and port (default filled in)."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        """The origin of an absolute http(s) URL. Raises ValueError (never quoting the URL: it may hold a
        password) when it has another scheme, no host, a bad host or a bad port."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError("the scheme is not http or https")
        host = parts.hostname or ""
        if not _HOST_RE.fullmatch(host):
            raise ValueError("the host is missing or not a host name or IP address")
        port = parts.port  # raises ValueError for a port out of range or not a number
        return cls(scheme, host, DEFAULT_PORTS[scheme] if port is None else port)

    @property
    def hostport(self) -> str:
        """``host[:port]`` as people write it: the port only when it is not the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def secure(self) -> bool:
        return self.scheme == "https"

    def url(self, target: str) -> str:
        return f"{self.scheme}://{self.hostport}{target}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.hostport}"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (``user:***@host``), for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def parse_content_length(value: str | None, where: str) -> int | None:
    """A Content-Length header as a non-negative int; None when absent. Anything else (a sign, a list of
    values, junk) is refused rather than guessed at."""
    if value is None:
        return None
    value = value.strip()
    if not _DIGITS_RE.fullmatch(value):
        raise ProtocolError(f"{where} sent Content-Length {_short(value)}, not a non-negative integer")
    return int(value)


def _short(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _why(exc: BaseException) -> str:
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
    return text[:200]


class _TooSlow(TimeoutError):
    """A read armed with a deadline (_DeadlineReader.arm) did not finish by it."""


class _DeadlineReader(io.RawIOBase):
    """The socket's reader for one answer, under every read http.client makes. While armed, each read waits at
    most until the deadline, however http.client loops (a status line or header, a chunk-size line or a trailer
    read a byte at a time, ``read(n)`` filling n bytes); disarmed, each read has only the socket's own timeout.
    The head is read armed with HEAD_SECONDS; ``Response`` arms the rest (BODY_SECONDS for a whole small body, the
    socket timeout for each read of a chunked blob, so the engine's minimum rate gets control back)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # the socket's own SocketIO (it counts its references)
        self.timeout = sock.gettimeout()
        self._deadline: float | None = None

    def readable(self) -> bool:
        return True

    def arm(self, seconds: float | None = None) -> None:
        """Reads from now on end ``seconds`` from now at the latest (the socket's timeout when None)."""
        self._deadline = time.monotonic() + (seconds if seconds is not None else (self.timeout or BODY_SECONDS))

    def disarm(self) -> None:
        if self._deadline is not None:
            self._deadline = None
            with contextlib.suppress(OSError):  # already closed, after a read that failed
                self._sock.settimeout(self.timeout)

    def readinto(self, b: Buffer) -> int | None:  # type: ignore[override]
        if self._deadline is None:
            return self._raw.readinto(b)
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _TooSlow()
        self._sock.settimeout(left if self.timeout is None else min(left, self.timeout))
        try:
            return self._raw.readinto(b)
        except TimeoutError:
            if time.monotonic() >= self._deadline:
                raise _TooSlow() from None
            raise

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Makefile:
    """What http.client.HTTPResponse reads its socket through: ``makefile`` is all it calls."""

    def __init__(self, raw: _DeadlineReader) -> None:
        self._raw = raw

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self._raw)


class _HTTPResponse(http.client.HTTPResponse):
    """``HTTPResponse`` read through a _DeadlineReader, its head within HEAD_SECONDS of the request."""

    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None) -> None:
        self.deadline = _DeadlineReader(sock)
        self.deadline.arm(HEAD_SECONDS)
        super().__init__(_Makefile(self.deadline), debuglevel, method, url)  # type: ignore[arg-type]

    def begin(self) -> None:
        try:
            super().begin()
        finally:
            self.deadline.disarm()

    def _read_status(self) -> tuple[str, int, str]:
        # http.client skips 100 Continue only: any other informational answer (102 Processing, 103 Early Hints,
        # which CDNs in front of registries send) passed for the final one, and the real answer was left on the
        # pooled connection for the next request to read as its own. Skipped like 100, under the head's deadline.
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 100 < status < 200 or status == 101:
                return str(version), int(status), str(reason)
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]

    def _read_next_chunk_size(self) -> int:
        # http.client's own reads int(line, 16), which takes "-1" (read(n) then reads until the connection closes,
        # all of it held in memory) and "+1" or " 1_0": only hex digits are a chunk size (RFC 9112 7.1).
        line = self.fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise http.client.LineTooLong("chunk size")
        size = line.split(b";", 1)[0].strip(b" \t\r\n")
        if not _CHUNK_SIZE_RE.fullmatch(size):
            self._close_conn()  # type: ignore[attr-defined]
            raise ValueError(f"chunk size {size[:20]!r} is not hexadecimal digits")
        return int(size, 16)


class CAFileError(UsageError):
    """A CA bundle given with --ca-file is missing or not PEM (exit 2)."""


class Response:
    """One answer. Its connection goes back to the pool once the body has been read to the end (``read_body``,
    ``discard``), or is closed (``close``). ``origin`` and ``url`` are those of the last hop."""

    def __init__(self, raw: _HTTPResponse, url: str, origin: Origin, name: str,
                 release: Callable[[bool], None]) -> None:
        self._raw = raw
        self._deadline = raw.deadline
        self._release: Callable[[bool], None] | None = release
        self.status = raw.status
        self.url = url
        self.origin = origin
        self.name = name  # "registry 127.0.0.1:5000", for messages
        size = sum(len(k) + len(v) + 4 for k, v in raw.getheaders())
        if size > MAX_HEADER_BYTES:
            self.close()
            raise ProtocolError(f"{name} answered with {size} bytes of headers, over the {MAX_HEADER_BYTES} byte"
                                " limit")
        try:
            self.content_length = parse_content_length(raw.getheader("Content-Length"), name)
        except ProtocolError:
            self.close()
            raise

    @contextlib.contextmanager
    def _bounded(self, seconds: float | None) -> Iterator[None]:
        """Reads inside end ``seconds`` from now at the latest (the socket's timeout when None), however
        http.client loops (_DeadlineReader.arm); the socket's own timeout again after."""
        self._deadline.arm(seconds)
        try:
            yield
        finally:
            self._deadline.disarm()

    def header(self, name: str) -> str | None:
        """A header's value (several of the same name joined by ``, ``), or None."""
        return self._raw.getheader(name)

    @property
    def length(self) -> int | None:
        """Body bytes not yet read, when the server said (None: chunked or until close)."""
        return self._raw.length

    def readinto(self, buf: Buffer) -> int:
        """Up to ``len(buf)`` body bytes from at most one read of the socket (0 at the end, or when the server
        closed early). Not ``HTTPResponse.readinto``: it loops until the buffer is full, so a server trickling a
        byte at a time would never be seen by the engine's minimum-rate rule (loader.retry.RateWatch)."""
        raw = self._raw
        try:
            if raw.isclosed():
                return 0
            if raw.chunked:  # read1 returns after at most one read of a chunk (readinto fills the buffer)
                # ... but waits inside for a whole chunk-size line (or trailer lines): bounded, one call ends within
                # the socket's timeout however they trickle, so the engine's minimum rate gets control back.
                view = memoryview(buf).cast("B")
                with self._bounded(None):
                    data = raw.read1(len(view))
                if len(data) > len(view):  # read1 never gives more than asked; guarded anyway
                    raise ProtocolError(f"{self.name} sent a chunk larger than the read asked for")
                view[: len(data)] = data
                return len(data)
            view = memoryview(buf).cast("B")
            if raw.length is not None and len(view) > raw.length:
                view = view[: raw.length]
            if not len(view):
                raw.close()  # the whole body was read: the connection may be reused
                return 0
            n = raw.fp.readinto1(view)
            if raw.length is not None:
                raw.length -= n
            if not n or raw.length == 0:
                raw.close()
            return n
        except _TooSlow as exc:
            raise TransientError(f"{self.name} sent the framing of its chunked body too slowly: one read waited"
                                 " longer than the socket timeout") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"connection to {self.name} dropped while reading: {_why(exc)}") from exc

    def read_body(self, limit: int, what: str) -> bytes:
        """The whole body, at most ``limit`` bytes (ProtocolError naming ``what`` when longer), then the
        connection goes back to the pool."""
        if self.content_length is not None and self.content_length > limit:
            self.close()
            raise ProtocolError(f"{self.name} sent {what} of {self.content_length} bytes, over the {limit} byte"
                                " limit")
        # A whole-time bound, not only the socket's per-read timeout: a registry sending a byte every few seconds
        # (of the body, or of a chunked body's size lines and trailers, inside http.client's own loops) would
        # otherwise hold the pull (and a CSI publish slot) for as long as it liked.
        buf = bytearray()
        try:
            with self._bounded(BODY_SECONDS):
                while len(buf) <= limit:
                    piece = self._raw.read1(min(READ_PIECE, limit + 1 - len(buf)))
                    if not piece:
                        break
                    buf += piece
        except _TooSlow as exc:
            self.close()
            raise TransientError(f"{self.name} sent {what} too slowly: {len(buf)} bytes in {BODY_SECONDS:g} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransientError(f"connection to {self.name} dropped while reading {what}: {_why(exc)}") from exc
        data = bytes(buf)
        if len(data) > limit:
            self.close()
            raise ProtocolError(f"{self.name} sent {what} longer than the {limit} byte limit")
        if self._raw.length == 0:  # read1 never marks a Content-Length body finished: the connection may be reused
            self._raw.close()
        self.close(reusable=True)
        return data

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of a body we only quote (an error's), never an error itself; then closed."""
        reusable = True
        try:
            with self._bounded(BODY_SECONDS):  # read(limit) loops until it has limit bytes: bounded as a whole
                data = self._raw.read(limit)  # read(0) still ends a HEAD answer, so its connection is kept
        except (OSError, http.client.HTTPException):
            # http.client marks the answer closed when a read fails, which must not pass for "read to its end":
            # the connection is out of step (the rest of a body may follow), so it is dropped, never pooled.
            data, reusable = b"", False
        self.close(reusable=reusable)
        return data

    def discard(self) -> None:
        """Read and drop a body we do not need (a redirect's, a 401's), keeping the connection when it is short."""
        self.read_some(MAX_DISCARD_BYTES)

    def isclosed(self) -> bool:
        return self._raw.isclosed()

    def close(self, reusable: bool = False) -> None:
        """Give the connection back (only when ``reusable`` and the body was read to its end) or close it."""
        release, self._release = self._release, None
        if release is not None:
            release(reusable and self._raw.isclosed())


class Transport:
    """Pooled connections for one client (see the module docstring). Thread-safe; ``close()`` closes every
    connection of every thread."""

    def __init__(self, *, insecure: bool = False, timeout: float = 30.0, ca_files: Sequence[str] = ()) -> None:
        self.timeout = timeout
        self._insecure = insecure
        self._ca_files = tuple(ca_files)
        self._ssl_lock = threading.Lock()
        # Made at the first https connection: loading the system's CA store takes ~20 ms of a start that is ~80 ms
        # in all (measured with cProfile on a pull), and a plain-http registry never needs it. An admin's CA files
        # are loaded now, so a bad one is refused before anything is fetched.
        self._ssl: ssl.SSLContext | None = None
        if self._ca_files:
            self._ssl_context()
        self._local = threading.local()
        self._lock = threading.Lock()
        # Every connection not yet closed (pooled or in use), for close(); one closed on release leaves it.
        self._conns: set[http.client.HTTPConnection] = set()

    def _ssl_context(self) -> ssl.SSLContext:
        with self._ssl_lock:
            if self._ssl is not None:
                return self._ssl
            ctx = ssl.create_default_context()
            for path in self._ca_files:  # the admin's private CAs, trusted in addition to the system's
                try:
                    ctx.load_verify_locations(cafile=path)
                except (OSError, ssl.SSLError) as exc:
                    raise CAFileError(f"CA bundle {path} cannot be used ({_why(exc)}): it must be readable PEM"
                                      " certificates (the ConfigMap named by MODEL_CACHE_REGISTRY_CA_CONFIGMAP, key"
                                      " ca.crt, in the pod's namespace)") from exc
            if self._insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl = ctx
            return ctx

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            c.close()

    def request(self, method: str, url: str, headers: Mapping[str, str], *, body: BodyFactory | None = None,
                authorize: Authorize | None = None, role: str = "registry", context: str = "",
                stay_on_origin: bool = False) -> Response:
        """Send a request and follow redirects; returns the last answer, whatever its status.

        ``body`` is called again for each hop. ``authorize(origin)`` gives each hop its credentials headers;
        ``headers`` must hold none. ``stay_on_origin``: the body itself is a secret (an OAuth2 refresh token), so
        a redirect to any other origin is refused rather than followed with it. ``role`` names the first server
        in messages ("registry", "mirror", "token service"); ``context`` ends them (" for REF")."""
        if any(k.lower() in ("authorization", "host") for k in headers):
            raise ValueError("credentials headers come from authorize(), per origin")
        try:
            origin = Origin.of(url)
        except ValueError as exc:
            raise ProtocolError(f"{role} URL {_short(redact_url(url))} is unusable: {exc}{context}") from None
        name = f"{role} {origin.hostport}"
        first = name
        for _hop in range(MAX_REDIRECTS + 1):
            h = {"User-Agent": USER_AGENT, **headers, **(authorize(origin) if authorize is not None else {})}
            resp = self._send(method, url, origin, name, h, body, context)
            if resp.status not in REDIRECT_STATUSES:
                return resp
            location = resp.header("Location")
            resp.discard()
            if not location:
                raise ProtocolError(f"{name} answered {resp.status} without a Location{context}")
            new_url = urllib.parse.urljoin(url, location.strip())
            try:
                new_origin = Origin.of(new_url)
            except ValueError as exc:
                raise ProtocolError(f"{name} redirected to an unusable location ({exc}){context}") from None
            if origin.secure and not new_origin.secure:
                raise DowngradeRefused(
                    f"{name} redirected {method} over https to plain http ({new_origin}){context}; the loader"
                    " does not follow a redirect from https to http (credentials and model bytes would cross the"
                    " network unencrypted): fix the registry's or its storage's redirect to use https"
                )
            if stay_on_origin and new_origin != origin:
                raise ProtocolError(f"{name} redirected {method} to another origin ({new_origin}){context}; the"
                                    " request carries a secret, so it is not sent anywhere else")
            if resp.status == 303 and method != "HEAD":
                method, body = "GET", None
            url, origin = new_url, new_origin
            name = f"{new_origin.hostport} (redirected from {first})"
        raise ProtocolError(f"{first} redirected more than {MAX_REDIRECTS} times{context}")

    # ------------------------------------------------------------------------------------------------ internals
    def _send(self, method: str, url: str, origin: Origin, name: str, headers: dict[str, str],
              body: BodyFactory | None, context: str) -> Response:
        parts = urllib.parse.urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn, release = self._checkout(origin)
        if conn.sock is None:
            try:
                conn.connect()
            except ssl.SSLCertVerificationError as exc:
                release(False)
                raise ProtocolError(
                    f"the TLS certificate of {name} did not verify ({exc.verify_message}){context}: trust its CA"
                    " in the system store, or pass --insecure for a registry you trust otherwise"
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                release(False)
                raise ConnectError(f"could not connect to {name} ({_why(exc)}){context}") from exc
        try:
            conn.request(method, target, body=body() if body is not None else None, headers=headers)
            raw = conn.getresponse()
            assert isinstance(raw, _HTTPResponse)  # every connection's response_class (below)
        except http.client.InvalidURL as exc:  # a Location with spaces or control characters
            release(False)
            raise ProtocolError(f"{name} sent a location that is not a valid request target{context}") from exc
        except http.client.LineTooLong as exc:
            release(False)
            raise ProtocolError(f"{name} sent a header or status line over 64 KiB{context}") from exc
        except http.client.HTTPException as exc:
            release(False)
            if type(exc) is http.client.HTTPException:  # http.client's "got more than 100 headers"
                raise ProtocolError(f"{name} sent more than 100 headers{context}") from exc
            raise TransientError(f"could not talk to {name} ({_why(exc)}){context}") from exc
        except _TooSlow as exc:
            release(False)
            raise TransientError(f"{name} sent the head of its answer too slowly: not complete {HEAD_SECONDS:g} s"
                                 f" after the request{context}") from exc
        except OSError as exc:
            release(False)
            raise TransientError(f"could not talk to {name} ({_why(exc)}){context}") from exc
        return Response(raw, url, origin, name, release)

    def _checkout(self, origin: Origin) -> tuple[http.client.HTTPConnection, Callable[[bool], None]]:
        pool: dict[Origin, http.client.HTTPConnection] | None = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        conn = pool.pop(origin, None)
        if conn is None:
            if origin.secure:
                conn = http.client.HTTPSConnection(origin.host, origin.port, timeout=self.timeout,
                                                   context=self._ssl_context())
            else:
                conn = http.client.HTTPConnection(origin.host, origin.port, timeout=self.timeout)
            conn.response_class = _HTTPResponse
            with self._lock:
                self._conns.add(conn)
        held = conn

        def release(reusable: bool) -> None:
            if reusable and origin not in pool:
                pool[origin] = held
            else:
                held.close()
                with self._lock:
                    self._conns.discard(held)

        return conn, release
