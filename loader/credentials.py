"""Registry credentials from docker config files and credential helpers, and ``WWW-Authenticate`` parsing.

In a pod the webhook mounts each imagePullSecret (a ``.dockerconfigjson``, or a legacy ``.dockercfg``) under
``contract.DOCKER_CONFIG_MOUNT``; on a workstation it is ``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``. This module turns those files into one lookup, ``DockerConfig.credentials_for(host)``,
resolved the way the docker CLI does: ``credHelpers`` for that registry, then the ``auths`` entry, then the
default ``credsStore``. Several files merge and the earliest file that knows a registry wins.

Reading and validating the files happens once, at start-up (``load_docker_configs``); a malformed file stops the
loader there with a message naming the file. Credential helpers are programs (``docker-credential-<name>``), so
they run lazily, only for a registry that is actually contacted. A pull secret is written by a tenant, so a
helper name (``credHelpers`` values, ``credsStore``) must be a plain program name (``[A-Za-z0-9][A-Za-z0-9._-]*``,
no ``..``, at most 64 characters) or the file is refused; the program is looked up only in the absolute
directories of the configured PATH, never as a path.

Secrets never leave a ``Credentials`` object by accident: its repr hides them and no error message here quotes
a file's content or a helper's output beyond its first line of error text.

Errors::

    DockerConfigError (UsageError, ValueError)   a file is missing, unreadable or malformed   exit 2
    CredentialHelperError (AuthError)            a helper is missing, failed or answered junk  exit 3
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path

from loader.errors import AuthError, UsageError

CONFIG_FILE_NAMES = ("config.json", ".dockerconfigjson", ".dockercfg")  # tried in this order inside a directory
LEGACY_FILE_NAME = ".dockercfg"  # kubernetes.io/dockercfg: a bare {host: entry} map, no "auths" wrapper

# Docker Hub's many names. The docker CLI files Hub credentials under the v1 index URL.
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"

HELPER_PREFIX = "docker-credential-"
HELPER_TIMEOUT_SECONDS = 60.0
HELPER_NAME_MAX = 64
# A helper is a program name looked up on PATH, never a path: no "/", no leading "." or "-", no "..".
_HELPER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TOKEN_USERNAME = "<token>"  # a helper's Username when its Secret is an identity (refresh) token


class DockerConfigError(UsageError, ValueError):
    """A docker config file is missing, unreadable or malformed. The message names the file, never a secret."""


class CredentialHelperError(AuthError):
    """A credential helper is missing, failed, or answered something that is not credentials."""


# --- values ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class Credentials:
    """Username and password, or an identity token (OAuth2 refresh token for the realm). ``source`` says where
    they came from (a file path or a helper name) so errors can point at it; it is never secret."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    source: str = ""

    def __repr__(self) -> str:
        secret = "identity_token=***" if self.identity_token else "password=***"
        return f"Credentials(username={self.username!r}, {secret}, source={self.source!r})"

    __str__ = __repr__


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header. ``scheme`` is lower-cased, so are param names."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str | None = None


# --- registry names ---------------------------------------------------------------------------------------------
def normalize_registry(key: str) -> str:
    """The host[:port] a config key or registry name refers to, as the docker CLI compares them: scheme and path
    dropped (``https://host/v1/`` -> ``host``), lower-cased, and every Docker Hub alias folded to ``docker.io``."""
    s = key.strip()
    for scheme in ("http://", "https://"):
        if s.lower().startswith(scheme):
            s = s[len(scheme):]
            break
    host = s.split("/", 1)[0].lower()
    return "docker.io" if host in DOCKER_HUB_ALIASES else host


def helper_server_url(registry: str) -> str:
    """What the docker CLI writes on a helper's stdin for a registry: the v1 index URL for Hub, else host[:port]."""
    host = normalize_registry(registry)
    return DOCKER_HUB_SERVER_URL if host == "docker.io" else host


# --- one parsed file --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ConfigFile:
    path: str
    auths: dict[str, Credentials]  # normalised host -> credentials (first key for a host wins, exact key first)
    cred_helpers: dict[str, str]  # normalised host -> helper name
    creds_store: str | None


def _fail(path: str, what: str) -> DockerConfigError:
    return DockerConfigError(f"docker config {path}: {what}")


def valid_helper_name(name: str) -> bool:
    """Whether ``name`` may complete ``docker-credential-<name>``: a plain program name, found only on PATH."""
    return len(name) <= HELPER_NAME_MAX and _HELPER_NAME_RE.fullmatch(name) is not None and ".." not in name


def _check_helper(path: str, key: str, name: str) -> None:
    # A pull secret is tenant-controlled: a name with a "/" would make shutil.which run that path.
    if not valid_helper_name(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise _fail(path, f"{key} names the credential helper {shown!r}, which is not a plain program name"
                          f" (letters, digits, '.', '_' and '-', starting with a letter or digit, no '..', at most"
                          f" {HELPER_NAME_MAX} characters): a helper is the program {HELPER_PREFIX}<name> on PATH")


def _decode_auth(path: str, key: str, value: object) -> tuple[str, str]:
    if not isinstance(value, str):
        raise _fail(path, f'auths[{key!r}].auth must be a string (base64 of "user:password")')
    try:
        raw = base64.b64decode(value.strip() + "=" * (-len(value.strip()) % 4), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise _fail(path, f'auths[{key!r}].auth is not base64 of "user:password"') from None
    user, sep, password = raw.partition(":")
    if not sep:
        raise _fail(path, f'auths[{key!r}].auth decodes to no "user:password" pair (the colon is missing)')
    return user, password


def _parse_entry(path: str, key: str, entry: object) -> Credentials | None:
    """One ``auths`` entry; None for an entry without credentials (docker writes ``{}`` when a store holds them)."""
    if not isinstance(entry, dict):
        raise _fail(path, f"auths[{key!r}] must be an object")
    for name in ("auth", "username", "password", "identitytoken", "registrytoken", "email"):
        if name in entry and entry[name] is not None and not isinstance(entry[name], str):
            raise _fail(path, f"auths[{key!r}].{name} must be a string")
    user, password = entry.get("username") or "", entry.get("password") or ""
    if entry.get("auth"):
        user, password = _decode_auth(path, key, entry["auth"])
    identity = entry.get("identitytoken") or ""
    if not (user or password or identity):
        return None
    return Credentials(user, password, identity, source=path)


def parse_config(path: str, text: str, legacy: bool = False) -> _ConfigFile:
    """Parse one file's text. ``legacy``: the ``.dockercfg`` format, a bare auths map."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:  # the message quotes no content, only the position
        raise _fail(path, f"not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise _fail(path, "must hold a JSON object")
    if legacy:
        doc = {"auths": doc}
    auths_doc = doc.get("auths") or {}
    helpers_doc = doc.get("credHelpers") or {}
    store = doc.get("credsStore") or None
    if not isinstance(auths_doc, dict):
        raise _fail(path, '"auths" must be an object mapping registries to entries')
    if not isinstance(helpers_doc, dict) or not all(isinstance(v, str) and v for v in helpers_doc.values()):
        raise _fail(path, '"credHelpers" must be an object mapping registries to helper names')
    if store is not None and not isinstance(store, str):
        raise _fail(path, '"credsStore" must be a helper name')

    auths: dict[str, Credentials] = {}
    exact: set[str] = set()
    for key, entry in auths_doc.items():
        creds = _parse_entry(path, key, entry)
        if creds is None:
            continue
        host = normalize_registry(key)
        # Docker prefers a key that is exactly the host over one that merely normalises to it.
        is_exact = key.strip().lower() == host or (host == "docker.io" and key == DOCKER_HUB_SERVER_URL)
        if host not in auths or (is_exact and host not in exact):
            auths[host] = creds
            if is_exact:
                exact.add(host)
    if store is not None:
        _check_helper(path, '"credsStore"', store)
    cred_helpers: dict[str, str] = {}
    for key, name in helpers_doc.items():
        _check_helper(path, f"credHelpers[{key[:80]!r}]", name)
        cred_helpers.setdefault(normalize_registry(key), name)
    return _ConfigFile(path, auths, cred_helpers, store)


# --- the merged view ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DockerConfig:
    """Every loaded file, earliest first. ``env`` is what credential helpers are found with (its PATH) and run
    with; without a PATH in it, the system default path is searched."""

    files: tuple[_ConfigFile, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def credentials_for(self, registry_host: str) -> Credentials | None:
        """Credentials for a registry (``host[:port]``, or any docker-style key), or None for anonymous access.

        Per file, like the docker CLI: a ``credHelpers`` entry for the host, else the ``auths`` entry, else the
        ``credsStore``. A helper that has nothing for the host passes to the next file. Raises
        CredentialHelperError when a helper cannot be run or fails.
        """
        host = normalize_registry(registry_host)
        for f in self.files:
            if host in f.cred_helpers:
                creds = run_helper(f.cred_helpers[host], host, self.env)
            elif host in f.auths:
                return f.auths[host]
            elif f.creds_store:
                creds = run_helper(f.creds_store, host, self.env)
            else:
                continue
            if creds is not None:
                return creds
        return None


def run_helper(name: str, registry: str, env: Mapping[str, str]) -> Credentials | None:
    """``docker-credential-<name> get`` with the registry's server URL on stdin. None when the helper says it has
    no credentials for it (its "credentials not found" answer)."""
    program = HELPER_PREFIX + name
    server_url = helper_server_url(registry)
    if not valid_helper_name(name):  # parse_config refused it already; this keeps run_helper safe on its own
        raise CredentialHelperError(f"credential helper name {name[:80]!r} (configured for registry {registry}) is"
                                    " not a plain program name: it is looked up on PATH only")
    # Only absolute PATH entries: an empty or relative one would resolve the name against the working directory.
    search = os.pathsep.join(d for d in env.get("PATH", os.defpath).split(os.pathsep) if os.path.isabs(d))
    exe = shutil.which(program, path=search)
    if exe is None:
        raise CredentialHelperError(
            f"credential helper {program} (configured for registry {registry}) is not on PATH: install it or "
            "remove it from the docker config"
        )
    import subprocess  # here: only a docker config with a helper pays for it (~1.3 ms of every start otherwise)

    try:
        proc = subprocess.run(
            [exe, "get"], input=server_url.encode(), capture_output=True, env=dict(env),
            timeout=HELPER_TIMEOUT_SECONDS, check=False,
        )
    except subprocess.TimeoutExpired:
        raise CredentialHelperError(
            f"credential helper {program} did not answer for registry {registry} within {HELPER_TIMEOUT_SECONDS:g}s"
        ) from None
    except OSError as exc:
        raise CredentialHelperError(f"credential helper {program} could not run for registry {registry}: "
                                    f"{exc.strerror}") from None
    if proc.returncode != 0:
        # Helpers print their error on stdout (the docker-credential-helpers convention) or stderr. Only the
        # first line is quoted: a failing helper has no credentials to print, but keep it short anyway.
        said = (proc.stdout or proc.stderr).decode("utf-8", "replace").strip().splitlines()
        first = said[0][:200] if said else ""
        if "credentials not found" in first.lower():
            return None
        raise CredentialHelperError(
            f"credential helper {program} failed for registry {registry} (exit {proc.returncode})"
            + (f": {first}" if first else "")
        )
    try:
        doc = json.loads(proc.stdout)
        user, secret = doc.get("Username", ""), doc["Secret"]
        if not isinstance(user, str) or not isinstance(secret, str):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CredentialHelperError(
            f'credential helper {program} answered registry {registry} with something other than '
            '{"Username": ..., "Secret": ...} JSON'
        ) from None
    if user == TOKEN_USERNAME:
        return Credentials(identity_token=secret, source=program)
    return Credentials(user, secret, source=program)


# --- loading ----------------------------------------------------------------------------------------------------
def _resolve(path: str) -> str:
    """A config file path, or a directory holding one of CONFIG_FILE_NAMES."""
    p = Path(path)
    if p.is_dir():
        for name in CONFIG_FILE_NAMES:
            if (p / name).is_file():
                return str(p / name)
        raise DockerConfigError(f"docker config directory {path} holds none of {', '.join(CONFIG_FILE_NAMES)}")
    if not p.exists():
        raise DockerConfigError(f"docker config {path} does not exist")
    return path


def default_config_paths(env: Mapping[str, str]) -> list[str]:
    """``$DOCKER_CONFIG/config.json`` when DOCKER_CONFIG is set, else ``~/.docker/config.json``; only if it
    exists (no config is anonymous access, not an error)."""
    if env.get("DOCKER_CONFIG"):
        candidate = Path(env["DOCKER_CONFIG"]) / "config.json"
    else:
        home = env.get("HOME") or os.path.expanduser("~")
        candidate = Path(home) / ".docker" / "config.json"
    return [str(candidate)] if candidate.is_file() else []


def load_docker_configs(paths: list[str] | None, env: Mapping[str, str]) -> DockerConfig:
    """Load and validate docker config files (see the module docstring). ``paths`` empty or None: the default
    location from ``env``. Raises DockerConfigError naming the first bad file."""
    files = []
    for path in paths or default_config_paths(env):
        resolved = _resolve(path)
        try:
            text = Path(resolved).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise DockerConfigError(f"docker config {resolved}: cannot be read ({reason})") from None
        files.append(parse_config(resolved, text, legacy=Path(resolved).name == LEGACY_FILE_NAME))
    return DockerConfig(tuple(files), dict(env))


# --- WWW-Authenticate ---------------------------------------------------------------------------------------------
_TCHAR = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = _TCHAR | set("/=")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse RFC 7235 challenges: ``Bearer realm="https://a/token",service="r",scope="repository:x:pull,push",
    Basic realm="r"``. Quoted strings may hold commas and backslash escapes; a comma followed by a bare token
    (no ``=``) starts the next challenge. Malformed trailing input is dropped rather than raised: the caller
    decides what a missing realm means."""
    s, i, n = header, 0, len(header)
    out: list[Challenge] = []

    def skip_ws(i: int) -> int:
        while i < n and s[i] in " \t":
            i += 1
        return i

    def token(i: int, chars: Set[str] = _TCHAR) -> tuple[str, int]:
        j = i
        while j < n and s[j] in chars:
            j += 1
        return s[i:j], j

    while i < n:
        i = skip_ws(i)
        if i < n and s[i] == ",":
            i += 1
            continue
        scheme, i = token(i)
        if not scheme:
            break  # junk we cannot read: stop with what we have
        params: dict[str, str] = {}
        token68 = None
        i = skip_ws(i)
        # token68 (e.g. "Negotiate abc==") when the next word is not followed by "="
        word, j = token(i, _TOKEN68)
        k = skip_ws(j)
        if word and (k >= n or s[k] == ",") and not _looks_like_param(s, i):
            token68, i = word, k
        else:
            while i < n:
                i = skip_ws(i)
                name, j = token(i)
                k = skip_ws(j)
                if not name or k >= n or s[k] != "=":
                    break  # the next challenge's scheme (or junk)
                k = skip_ws(k + 1)
                if k < n and s[k] == '"':
                    value, k = _quoted(s, k)
                else:
                    value, k = token(k, _TOKEN68)
                params[name.lower()] = value
                i = skip_ws(k)
                if i >= n or s[i] != ",":
                    break
                while i < n and s[i] in ", \t":  # empty list elements are allowed
                    i += 1
        out.append(Challenge(scheme.lower(), params, token68))
    return out


def _looks_like_param(s: str, i: int) -> bool:
    """Whether s[i:] starts ``name = value`` (an auth-param) rather than a token68 such as ``abc==``."""
    j = i
    while j < len(s) and s[j] in _TCHAR:
        j += 1
    if j == i:
        return False
    while j < len(s) and s[j] in " \t":
        j += 1
    if j >= len(s) or s[j] != "=":
        return False
    j += 1
    while j < len(s) and s[j] in " \t":
        j += 1
    return j < len(s) and (s[j] == '"' or s[j] in _TCHAR)


def _quoted(s: str, i: int) -> tuple[str, int]:
    """The quoted-string starting at s[i] == '"': (unescaped value, index after the closing quote)."""
    out, i = [], i + 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    return "".join(out), i  # unterminated: take the rest
