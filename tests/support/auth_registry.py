"""Real registries that demand credentials: htpasswd (basic) and token (bearer) auth, optionally over TLS.

Both run the same Debian ``docker-registry`` as tests/support/registry.py, with an ``auth:`` section added. What
was checked on this machine (Distribution 2.8.2), and is asserted in tests/test_support_servers.py:
- ``auth: htpasswd:`` works over plain HTTP (no TLS requirement); only bcrypt hashes are accepted.
- ``auth: token:`` accepts ES256 and RS256 JWTs whose ``x5c`` header holds the self-signed signing certificate
  that its ``rootcertbundle`` names.
- A token stays valid for about a minute past its ``exp`` (Distribution's leeway), so a short ``expires_in``
  alone does not make the registry refuse it: use ``TokenServer.issue_expired`` for that.

TLS is optional (``tls=True``): the registry then serves https with a leaf certificate for 127.0.0.1 and
localhost signed by a throwaway CA, and ``ca_path`` is the bundle a client verifies against.

    with start_token_registry(users={"alice": "pw"}, public_repos={"public/m"}) as reg:
        reg.url, reg.host, reg.token_server.realm, reg.ca_path
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import requests

from tests.support.registry import REGISTRY_BIN, RegistryProcess, free_port
from tests.support.tokenserver import Algorithm, TokenServer


# --- TLS material -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TLSFiles:
    ca_path: Path  # PEM of the CA: what a client trusts (requests' verify=, ssl.create_default_context(cafile=))
    cert_path: Path  # the server's leaf certificate (SANs 127.0.0.1, localhost)
    key_path: Path


def make_tls_files(directory: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost")) -> TLSFiles:
    """A throwaway CA and a server certificate it signs for ``hosts``, made by the webhook's own certificate code
    (so Go's TLS stack checks it too). A real chain, not one self-signed leaf, because strict verifiers (Go,
    OpenSSL with X509_STRICT) refuse a leaf that is its own CA."""
    from webhook import certs

    bundle = certs.generate("model-cache-test-registry", "tests", extra_sans=hosts, days=7)
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    files.ca_path.write_bytes(bundle.ca_cert)
    files.cert_path.write_bytes(bundle.tls_cert)
    files.key_path.write_bytes(bundle.tls_key)
    return files


def write_htpasswd(path: Path, users: Mapping[str, str], rounds: int = 4) -> Path:
    """An htpasswd file Distribution accepts (bcrypt only). Low cost rounds: these are test passwords."""
    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=rounds)).decode()}\n" for u, p in users.items()]
    path.write_text("".join(lines))
    return path


# --- a registry process that may speak TLS ------------------------------------------------------------------------
@dataclass
class _TLSRegistryProcess(RegistryProcess):
    """RegistryProcess serving https: registry.py's start() probes plain http, so readiness is re-done here."""

    tls: TLSFiles | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def config_text(self) -> str:
        assert self.tls is not None
        plain = f"http: {{addr: 127.0.0.1:{self.port}}}\n"
        text = super().config_text()
        assert plain in text, "registry.py's config layout changed: update _TLSRegistryProcess"
        return text.replace(
            plain,
            f"http: {{addr: 127.0.0.1:{self.port}, tls: {{certificate: {self.tls.cert_path}, "
            f"key: {self.tls.key_path}}}}}\n",
        )

    def start(self, timeout: float = 20.0) -> _TLSRegistryProcess:
        cfg = self.root.parent / f"registry-{self.port}.yml"
        cfg.write_text(self.config_text())
        self.log = self.root.parent / f"registry-{self.port}.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log,
                                         stderr=subprocess.STDOUT)
        ctx = ssl.create_default_context(cafile=str(self.tls.ca_path))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1, context=ctx) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"TLS registry did not become ready in time: {self.log.read_text()[-2000:]}")


# --- what tests use -----------------------------------------------------------------------------------------------
@dataclass
class AuthRegistry:
    """A running registry with auth. ``users`` maps user -> password; ``token_server`` is set for token auth."""

    registry: RegistryProcess
    users: dict[str, str]
    workdir: Path
    ca_path: Path | None = None  # set when tls=True
    token_server: TokenServer | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:  # http://127.0.0.1:PORT or https://...
        return self.registry.url

    @property
    def host(self) -> str:  # 127.0.0.1:PORT, as it appears in a reference
        return self.registry.host

    @property
    def verify(self) -> str | bool:
        """What to pass as requests' ``verify=`` (per request: a Session's ``verify`` loses to REQUESTS_CA_BUNDLE
        from the environment unless the session has ``trust_env = False``)."""
        return str(self.ca_path) if self.ca_path else True

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.registry.cleanup()
        if self.token_server is not None:
            self.token_server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> AuthRegistry:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _start(extra_config: str, workdir: Path, tls: bool) -> RegistryProcess:
    root = workdir / "data"
    root.mkdir(parents=True, exist_ok=True)
    if tls:
        files = make_tls_files(workdir / "tls")
        return _TLSRegistryProcess(root=root, port=free_port(), extra_config=extra_config, tls=files).start()
    return RegistryProcess(root=root, port=free_port(), extra_config=extra_config).start()


def start_htpasswd_registry(users: Mapping[str, str], tls: bool = False, realm: str = "model-cache-test") -> AuthRegistry:
    """A registry with ``auth: htpasswd:`` (basic auth) for ``users``."""
    workdir = Path(tempfile.mkdtemp(prefix="mc-authreg-"))
    try:
        htpasswd = write_htpasswd(workdir / "htpasswd", users)
        reg = _start(f"auth:\n  htpasswd:\n    realm: {realm}\n    path: {htpasswd}\n", workdir, tls)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return AuthRegistry(reg, dict(users), workdir, ca_path=workdir / "tls/ca.pem" if tls else None)


def start_token_registry(
    users: Mapping[str, str],
    public_repos: Iterable[str] = (),
    acl: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
    tls: bool = False,
    algorithm: Algorithm = "ES256",
    expires_in: int = 300,
) -> AuthRegistry:
    """A registry with ``auth: token:`` whose realm is a TokenServer of its own (see tests/support/tokenserver.py)."""
    workdir = Path(tempfile.mkdtemp(prefix="mc-authreg-"))
    ts = TokenServer(users, public_repos, acl, algorithm=algorithm, expires_in=expires_in, workdir=workdir / "token")
    try:
        ts.start()
        reg = _start(ts.registry_auth_config(), workdir, tls)
    except BaseException:
        ts.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return AuthRegistry(reg, dict(users), workdir, ca_path=workdir / "tls/ca.pem" if tls else None, token_server=ts)


def session_for(reg: AuthRegistry, auth=None, bearer: str | None = None) -> requests.Session:
    """A requests session that trusts the registry's CA and sends basic or bearer credentials."""
    s = requests.Session()
    s.trust_env = False  # else REQUESTS_CA_BUNDLE from the environment overrides s.verify
    s.verify = reg.verify
    if auth:
        s.auth = auth
    if bearer:
        s.headers["Authorization"] = f"Bearer {bearer}"
    return s
