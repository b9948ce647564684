"""Which credentials may go where, and the flows that use them: challenges, the Bearer token flow and its cache,
Basic.

The rule: a credential belongs to exactly one origin (scheme, host, port), and is sent nowhere else.

- The registry's origin gets the credentials the docker config holds for the reference's registry.
- Each mirror's origin gets only its own: ``user:password@`` in its URL, else the docker config entry for the
  mirror's own ``host[:port]``. A 401 from a mirror is never answered with the registry's credentials.
- Any other origin (blob storage a registry redirects to, an upload Location on another host) gets nothing, and
  a 401 from it is an AuthError. The transport asks :meth:`Authenticator.headers` once per hop, so a redirect
  carries no ``Authorization`` unless its target is itself the origin the credentials belong to.
- A token realm gets the credentials of the origin whose challenge named it, as the distribution token spec
  says, but never over a downgrade: an https origin that names a plain ``http://`` realm gets an anonymous token
  request there (a warning is logged, and if the realm refuses anonymous access the AuthError says why the
  credentials were withheld). A public repository keeps working; a secret never crosses in clear text. An origin
  the user chose to reach over plain http (a loopback registry, ``--plain-http``) may name an http realm.

Tokens are cached per origin and per scope list until shortly before they expire, and refetched once when the
registry rejects a cached one. Token responses are bounded (1 MiB), their ``token`` is a printable string of
bounded length (it becomes a header), and ``expires_in`` must be a number, clamped to [0, 24 h]. Credentials
never appear in logs or messages: messages name origins and references only.
"""

from __future__ import annotations

import base64
import json
import math
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from loader.credentials import parse_www_authenticate
from loader.errors import AuthError, TransientError
from loader.transport import Origin, Transport

if TYPE_CHECKING:
    from loader.credentials import Credentials

MAX_TOKEN_RESPONSE_BYTES = 1 << 20
MAX_TOKEN_CHARS = 32 * 1024
MAX_CHALLENGE_CHARS = 8 * 1024
DEFAULT_EXPIRES_IN = 60.0  # the token spec's default when a response omits it
MAX_EXPIRES_IN = 24 * 3600.0
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: safe as a header value
CLIENT_ID = "model-loader"

CredentialLookup = Callable[[], "Credentials | None"]


class Log(Protocol):
    def warning(self, event: str, **fields: object) -> None: ...


@dataclass
class Token:
    value: str
    expires: float  # time.monotonic() after which it is not sent


class _OriginAuth:
    """What one origin may receive, shared by every worker thread."""

    def __init__(self, origin: Origin, role: str, label: str, lookup: CredentialLookup, fix: str) -> None:
        self.origin = origin
        self.role = role  # "registry" or "mirror", for messages
        self.label = label  # host[:port] as the user wrote it, never with userinfo
        self.fix = fix  # what a message tells the user to do about missing or refused credentials
        self.lock = threading.Lock()
        self.basic = False  # answered a Basic challenge: send Basic on every request
        self.tokens: dict[str, Token] = {}  # scope list -> token
        self._lookup = lookup
        self._lookup_lock = threading.Lock()
        self._creds: Credentials | None = None
        self._looked_up = False

    @property
    def name(self) -> str:
        return f"{self.role} {self.label}"

    def credentials(self) -> Credentials | None:
        """The origin's credentials, looked up once (a credential helper is a process: run it once, lazily)."""
        with self._lookup_lock:
            if not self._looked_up:
                self._creds = self._lookup()
                self._looked_up = True
            return self._creds


def _basic(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


class Authenticator:
    """Auth state for one client: the origins it may authenticate to, each with its own credentials."""

    def __init__(self, transport: Transport, subject: str, log: Log | None = None) -> None:
        self.transport = transport
        self.subject = subject  # the reference, for messages
        self.log = log
        self._origins: dict[Origin, _OriginAuth] = {}
        self._lock = threading.Lock()

    def add_origin(self, origin: Origin, *, role: str, label: str, lookup: CredentialLookup, fix: str) -> None:
        """Let ``origin`` receive the credentials ``lookup()`` gives. The first registration of an origin wins."""
        with self._lock:
            self._origins.setdefault(origin, _OriginAuth(origin, role, label, lookup, fix))

    def knows(self, origin: Origin) -> bool:
        return origin in self._origins

    def headers(self, origin: Origin, scope_key: str) -> dict[str, str]:
        """The ``Authorization`` header for a request to ``origin``: its cached token for ``scope_key``, or Basic
        after it asked for Basic; nothing for an origin no credentials belong to."""
        st = self._origins.get(origin)
        if st is None:
            return {}
        with st.lock:
            tok = st.tokens.get(scope_key)
            if tok is not None and tok.expires > time.monotonic():
                return {"Authorization": f"Bearer {tok.value}"}
            basic = st.basic
        if basic:
            creds = st.credentials()
            if creds is not None and creds.username and creds.password:
                return {"Authorization": _basic(creds)}
        return {}

    def answer(self, origin: Origin, header: str, scopes: tuple[str, ...], retry: bool) -> None:
        """Prepare to answer a 401 from ``origin`` whose ``WWW-Authenticate`` is ``header``: fetch a token (its
        cache key is the whole scope list), or switch to Basic. Raises AuthError when it cannot be answered."""
        st = self._origins.get(origin)
        if st is None:
            raise AuthError(f"{origin.hostport} asked for credentials (401) while serving {self.subject}; no"
                            " credentials belong to it, so none are sent")
        challenges = {c.scheme: c for c in parse_www_authenticate(header[:MAX_CHALLENGE_CHARS])} if header else {}
        creds = st.credentials()
        if "bearer" in challenges:
            params = challenges["bearer"].params
            key = " ".join(scopes)
            with st.lock:
                st.tokens.pop(key, None)
            try:
                token = self._fetch_token(st, params, creds, scopes)
            except AuthError:
                if len(scopes) == 1:
                    raise
                # The token spec says to grant the allowed subset of the scopes; a service that refuses the whole
                # request instead gets the base scope alone (a mount then falls back to an upload).
                token = self._fetch_token(st, params, creds, scopes[:1])
            with st.lock:
                st.tokens[key] = token
            return
        if "basic" in challenges:
            if creds is None or retry or not (creds.username and creds.password):
                why = ("none are configured" if creds is None
                       else "rejected the configured ones" if retry
                       else "the configured ones are not a username and password (an identity token works only"
                            " with a Bearer token realm)")
                raise AuthError(f"{st.name} requires credentials for {self.subject} and {why}: {st.fix}")
            with st.lock:
                st.basic = True
            return
        shown = header[:80].encode("ascii", "backslashreplace").decode()
        raise AuthError(f"{st.name} refused {self.subject} with 401 and no usable challenge ({shown!r})")

    def _fetch_token(self, st: _OriginAuth, params: dict[str, str], creds: Credentials | None,
                     scopes: tuple[str, ...]) -> Token:
        realm = params.get("realm") or ""
        try:
            realm_origin = Origin.of(realm)
        except ValueError as exc:
            raise AuthError(f"{st.name} sent a Bearer challenge whose realm is unusable ({exc}) for"
                            f" {self.subject}") from None
        # Over a downgrade the realm is asked anonymously: see the module docstring.
        withheld = creds is not None and st.origin.secure and not realm_origin.secure
        send = None if withheld else creds
        if withheld and self.log is not None:
            self.log.warning("auth.insecure_realm", registry=st.label, realm=str(realm_origin), ref=self.subject,
                             hint="credentials withheld from a plain-http token realm; asking anonymously")
        service = params.get("service")
        parts = urllib.parse.urlsplit(realm)
        method, body = "GET", None
        headers: dict[str, str] = {}
        query = parts.query
        auth: dict[str, str] = {}
        if send is not None and send.identity_token:
            method = "POST"
            form = {"grant_type": "refresh_token", "refresh_token": send.identity_token, "client_id": CLIENT_ID,
                    "scope": " ".join(scopes), **({"service": service} if service else {})}
            data = urllib.parse.urlencode(form).encode()
            body = data
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            # The token spec repeats ``scope`` in a GET query; the OAuth2 POST form takes one space-separated list.
            extra = urllib.parse.urlencode([("scope", s) for s in scopes] + ([("service", service)] if service else []))
            query = f"{query}&{extra}" if query else extra
            if send is not None and send.username:
                auth = {"Authorization": _basic(send)}
        url = realm_origin.url((parts.path or "/") + (f"?{query}" if query else ""))
        where = f"token service {realm_origin.hostport}"
        resp = self.transport.request(
            method, url, headers, body=(lambda: body) if body is not None else None,
            authorize=lambda o: auth if o == realm_origin else {}, role="token service",
            context=f" for {self.subject}", stay_on_origin=body is not None,
        )
        if resp.status in (401, 403):
            resp.discard()
            if withheld:
                raise AuthError(
                    f"{where} refused anonymous access for {self.subject}; the credentials for {st.label} were not"
                    f" sent to it because {st.name} is https but named a plain http token realm ({realm_origin}),"
                    " where they would cross the network in clear text: the registry's token realm must use https"
                )
            raise AuthError(f"{where} refused " + ("the configured credentials" if creds else "anonymous access")
                            + f" for {self.subject}: {st.fix}")
        if resp.status != 200:
            resp.discard()
            if resp.status >= 500 or resp.status == 429:
                raise TransientError(f"{where} answered {resp.status} for {self.subject}")
            raise AuthError(f"{where} answered {resp.status} for {self.subject}")
        value, expires_in = parse_token_response(resp.read_body(MAX_TOKEN_RESPONSE_BYTES, "a token response"),
                                                 f"{where} (for {self.subject})")
        # Refresh a little early so a long download never sends an expired token.
        return Token(value, time.monotonic() + max(1.0, expires_in * 0.9 - 5))


def parse_token_response(data: bytes, where: str) -> tuple[str, float]:
    """(token, expires_in seconds) from a token response body, validated: see the module docstring."""
    try:
        obj = json.loads(data)
    except ValueError:
        raise AuthError(f"{where} sent a token response that is not JSON") from None
    if not isinstance(obj, dict):
        raise AuthError(f"{where} sent a token response that is not a JSON object")
    value = obj.get("token") or obj.get("access_token")
    if not value:
        raise AuthError(f"{where} sent no token")
    if not isinstance(value, str) or len(value) > MAX_TOKEN_CHARS or not _TOKEN_RE.fullmatch(value):
        raise AuthError(f"{where} sent a token that is not a string of at most {MAX_TOKEN_CHARS} printable"
                        " characters without spaces")
    raw = obj.get("expires_in")
    if raw is None:
        return value, DEFAULT_EXPIRES_IN
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise AuthError(f"{where} sent expires_in {str(raw)[:40]!r}, not a number of seconds")
    if isinstance(raw, int):
        raw = min(max(raw, 0), int(MAX_EXPIRES_IN))
    if not math.isfinite(raw):
        raise AuthError(f"{where} sent expires_in {raw!r}, not a finite number of seconds")
    return value, min(max(float(raw), 0.0), MAX_EXPIRES_IN)
