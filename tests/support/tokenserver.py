"""A token issuer for Distribution's ``auth: token:`` scheme, for tests.

The registry answers an anonymous request with ``401`` and ``WWW-Authenticate: Bearer realm=...,service=...,
scope=...``; a client then asks the realm (this server) for a token and retries with ``Authorization: Bearer``.
This server is that realm: it checks basic credentials against a users dict, grants anonymous pull on configured
public repositories, and signs JWTs with a key whose self-signed certificate travels in the ``x5c`` header.
Distribution 2.8 verifies the ``x5c`` chain against the certificate in its ``rootcertbundle`` (checked on this
machine: see tests/test_support_servers.py), so the registry's config only needs ``cert_path``.

Beyond the plain GET flow it speaks the OAuth2 POST flow docker uses for identity tokens (``grant_type=password``
and ``grant_type=refresh_token``), hands out refresh tokens for ``offline_token=true``, and lets a test issue
already-expired tokens (``issue_expired``) or a short ``expires_in`` to exercise token refresh. Counters say how
many tokens were issued and for which scopes.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

Algorithm = Literal["ES256", "RS256"]

# Distribution accepts tokens up to this long after `exp` (its Leeway): an expired token must be older than this.
REGISTRY_LEEWAY_SECONDS = 60


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class IssuedToken:
    """What a test can assert about one issued token (never the token itself: it is in `TokenServer.last_token`)."""

    subject: str  # "" for anonymous
    access: tuple[tuple[str, tuple[str, ...]], ...]  # ((repository, granted actions), ...) in request order
    requested: tuple[str, ...]  # the raw scope parameters
    grant: str  # "anonymous", "basic", "password", "refresh_token"
    expired: bool


class TokenServer:
    """``with TokenServer(users={"alice": "pw"}, public_repos={"public/model"}) as ts: ts.realm ...``

    Attributes a test may change at run time: ``expires_in`` (seconds, also the JWT lifetime),
    ``issue_expired`` (the next N tokens are already expired for the registry), ``users``, ``public_repos``,
    ``acl`` (None: an authenticated user gets every action asked; else user -> {repo or "*": actions}).
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        public_repos: Iterable[str] = (),
        acl: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
        service: str = "model-cache-test",
        issuer: str = "model-cache-test-issuer",
        algorithm: Algorithm = "ES256",
        expires_in: int = 300,
        workdir: Path | None = None,
    ):
        self.service = service
        self.issuer = issuer
        self.algorithm: Algorithm = algorithm
        self.expires_in = expires_in
        self.issue_expired = 0
        self.users = dict(users or {})
        self.public_repos = set(public_repos)
        self.acl = None if acl is None else {u: {r: set(a) for r, a in m.items()} for u, m in acl.items()}
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> username (tests may add identity tokens)
        self.issued: list[IssuedToken] = []
        self.refused = 0  # requests answered 401
        self.last_token: str | None = None
        self._lock = threading.Lock()
        self._owned_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="mc-tokenserver-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._key, self._cert = _make_signing_cert(algorithm, issuer)
        self.cert_path = self.workdir / "token-signing.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> TokenServer:
        handler = type("_BoundHandler", (_Handler,), {"token_server": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="tokenserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._owned_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the token server first"
        return self._server.server_address[1]

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return len(self.issued)

    def registry_auth_config(self) -> str:
        """The ``auth:`` YAML block for a registry that trusts this issuer (for start_registry's extra_config)."""
        return (
            "auth:\n"
            "  token:\n"
            f"    realm: {self.realm}\n"
            f"    service: {self.service}\n"
            f"    issuer: {self.issuer}\n"
            f"    rootcertbundle: {self.cert_path}\n"
        )

    # --- decisions (no I/O) ----------------------------------------------------------------------------------
    def _granted(self, user: str | None, repo: str, asked: list[str]) -> list[str]:
        if user is None:
            return ["pull"] if "pull" in asked and repo in self.public_repos else []
        if self.acl is None:
            return list(asked)
        rules = self.acl.get(user, {})
        allowed = rules.get(repo, set()) | rules.get("*", set())
        if repo in self.public_repos:
            allowed = allowed | {"pull"}
        return [a for a in asked if a in allowed or "*" in allowed]

    def _check_password(self, user: str, password: str) -> bool:
        expected = self.users.get(user)
        return expected is not None and secrets.compare_digest(expected.encode(), password.encode())

    def issue(self, user: str | None, scopes: list[str], grant: str, offline: bool) -> dict:
        access: list[dict] = []
        summary: list[tuple[str, tuple[str, ...]]] = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue  # registry:catalog:* and friends: grant nothing
            # repository names never hold ':', but a scope's name may carry a port-less host prefix with '/'
            name, actions = ":".join(parts[1:-1]), parts[-1].split(",")
            granted = self._granted(user, name, actions)
            summary.append((name, tuple(granted)))
            if granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        with self._lock:
            expired = self.issue_expired > 0
            if expired:
                self.issue_expired -= 1
            lifetime = self.expires_in
        now = int(time.time())
        exp = now - REGISTRY_LEEWAY_SECONDS - 60 if expired else now + lifetime
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": exp,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        token = self._sign(claims)
        body = {
            "token": token,
            "access_token": token,
            "expires_in": lifetime,
            "issued_at": dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if offline and user is not None:
            refresh = secrets.token_urlsafe(24)
            with self._lock:
                self.refresh_tokens[refresh] = user
            body["refresh_token"] = refresh
        with self._lock:
            self.issued.append(IssuedToken(user or "", tuple(summary), tuple(scopes), grant, expired))
            self.last_token = token
        return body

    def _sign(self, claims: dict) -> str:
        der = self._cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": self.algorithm, "x5c": [base64.b64encode(der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}".encode()
        if self.algorithm == "ES256":
            r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS wants raw r||s, not DER
        else:
            sig = self._key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{_b64url(sig)}"


def _make_signing_cert(algorithm: Algorithm, issuer: str):
    key = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


class _Handler(BaseHTTPRequestHandler):
    token_server: TokenServer  # bound by TokenServer.start
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # tests read counters, not logs
        pass

    def _answer(self, status: int, body: dict, headers: Mapping[str, str] = {}) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, why: str) -> None:
        with self.token_server._lock:
            self.token_server.refused += 1
        self._answer(
            401, {"errors": [{"code": "UNAUTHORIZED", "message": why}]}, {"WWW-Authenticate": 'Basic realm="token"'}
        )

    def _basic_user(self) -> tuple[bool, str | None]:
        """(ok, user): no header is anonymous (ok, None); a bad header or password is (False, None)."""
        header = self.headers.get("Authorization")
        if not header:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except ValueError:
            return False, None
        return (True, user) if self.token_server._check_password(user, password) else (False, None)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            self._answer(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        q = urllib.parse.parse_qs(url.query)
        if q.get("service", [self.token_server.service])[0] != self.token_server.service:
            self._answer(400, {"errors": [{"code": "INVALID_REQUEST", "message": "unknown service"}]})
            return
        ok, user = self._basic_user()
        if not ok:
            self._refuse("bad credentials")
            return
        offline = q.get("offline_token", ["false"])[0].lower() == "true"
        body = self.token_server.issue(user, q.get("scope", []), "basic" if user else "anonymous", offline)
        self._answer(200, body)

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        if url.path != "/token":
            self._answer(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        ts = self.token_server
        grant = form.get("grant_type", [""])[0]
        scopes = [s for raw in form.get("scope", []) for s in raw.split(" ") if s]
        if grant == "password":
            user, password = form.get("username", [""])[0], form.get("password", [""])[0]
            if not ts._check_password(user, password):
                self._refuse("bad credentials")
                return
        elif grant == "refresh_token":
            with ts._lock:
                user = ts.refresh_tokens.get(form.get("refresh_token", [""])[0])
            if user is None:
                self._refuse("unknown refresh token")
                return
        else:
            self._answer(400, {"error": "unsupported_grant_type"})
            return
        offline = form.get("access_type", [""])[0] == "offline" or grant == "password"
        body = ts.issue(user, scopes, grant, offline and grant == "password")
        self._answer(200, body)
