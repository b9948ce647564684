"""Docker config loading, registry-name normalisation, credential helpers and WWW-Authenticate parsing."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from loader.credentials import (
    Challenge,
    CredentialHelperError,
    Credentials,
    DockerConfigError,
    load_docker_configs,
    normalize_registry,
    parse_www_authenticate,
)
from loader.errors import AuthError, UsageError


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def write(path: Path, doc) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


# --- normalisation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, expected",
    [
        ("registry.example.com", "registry.example.com"),
        ("registry.example.com:5000", "registry.example.com:5000"),
        ("https://registry.example.com/v1/", "registry.example.com"),
        ("http://registry.example.com:5000", "registry.example.com:5000"),
        ("HTTPS://Registry.Example.COM/v2/", "registry.example.com"),
        ("registry.example.com/some/path", "registry.example.com"),
        ("https://index.docker.io/v1/", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_normalize_registry(key, expected):
    assert normalize_registry(key) == expected


# --- auths lookups --------------------------------------------------------------------------------------------------
ALICE = Credentials("alice", "s3cret:with:colons")


@pytest.mark.parametrize(
    "auths, lookup, expected",
    [
        ({"reg.example.com": {"auth": b64("alice:s3cret:with:colons")}}, "reg.example.com", ALICE),
        ({"https://reg.example.com/v1/": {"auth": b64("alice:s3cret:with:colons")}}, "reg.example.com", ALICE),
        ({"http://reg.example.com": {"auth": b64("alice:s3cret:with:colons")}}, "reg.example.com", ALICE),
        ({"reg.example.com": {"username": "alice", "password": "s3cret:with:colons"}}, "reg.example.com", ALICE),
        # base64 without padding, as some tools write it
        ({"reg.example.com": {"auth": b64("alice:s3cret:with:colons").rstrip("=")}}, "reg.example.com", ALICE),
        # port is part of the name
        ({"reg.example.com:5000": {"auth": b64("alice:s3cret:with:colons")}}, "reg.example.com", None),
        ({"reg.example.com:5000": {"auth": b64("alice:s3cret:with:colons")}}, "reg.example.com:5000", ALICE),
        ({"reg.example.com": {"identitytoken": "idtok"}}, "reg.example.com", Credentials(identity_token="idtok")),
        (
            {"reg.example.com": {"auth": b64("alice:"), "identitytoken": "idtok"}},
            "reg.example.com",
            Credentials("alice", "", "idtok"),
        ),
        # Docker Hub under any of its names
        ({"https://index.docker.io/v1/": {"auth": b64("alice:s3cret:with:colons")}}, "docker.io", ALICE),
        ({"https://index.docker.io/v1/": {"auth": b64("alice:s3cret:with:colons")}}, "registry-1.docker.io", ALICE),
        ({"docker.io": {"auth": b64("alice:s3cret:with:colons")}}, "index.docker.io", ALICE),
        # the exact host key beats one that only normalises to it, whatever the order in the file
        (
            {"https://reg.example.com/v1/": {"auth": b64("bob:x")}, "reg.example.com": {"auth": b64("alice:s3cret:with:colons")}},
            "reg.example.com",
            ALICE,
        ),
        # an empty entry (credentials live in a store) is no credentials
        ({"reg.example.com": {}}, "reg.example.com", None),
        ({"other.example.com": {"auth": b64("alice:x")}}, "reg.example.com", None),
    ],
    ids=[
        "host", "v1-url", "http-url", "username-password", "unpadded-base64", "port-mismatch", "port-match",
        "identity-token", "identity-token-with-user", "hub-v1-url", "hub-registry-1", "hub-docker-io",
        "exact-key-wins", "empty-entry", "other-host",
    ],
)
def test_auths_lookup(tmp_path, auths, lookup, expected):
    path = write(tmp_path / "config.json", {"auths": auths})
    got = load_docker_configs([path], {}).credentials_for(lookup)
    if expected is None:
        assert got is None
    else:
        assert got == Credentials(expected.username, expected.password, expected.identity_token, source=path)


# --- where files come from ------------------------------------------------------------------------------------------
def test_directory_holding_dockerconfigjson(tmp_path):
    path = write(tmp_path / "secret" / ".dockerconfigjson", {"auths": {"r.example": {"auth": b64("u:p")}}})
    cfg = load_docker_configs([str(tmp_path / "secret")], {})
    assert cfg.paths == [path]
    assert cfg.credentials_for("r.example") == Credentials("u", "p", source=path)


def test_directory_holding_legacy_dockercfg(tmp_path):
    path = write(tmp_path / "secret" / ".dockercfg", {"https://r.example/v1/": {"auth": b64("u:p"), "email": "e@x"}})
    cfg = load_docker_configs([str(tmp_path / "secret")], {})
    assert cfg.credentials_for("r.example") == Credentials("u", "p", source=path)


def test_directory_prefers_config_json(tmp_path):
    first = write(tmp_path / "d" / "config.json", {"auths": {"r.example": {"auth": b64("a:1")}}})
    write(tmp_path / "d" / ".dockerconfigjson", {"auths": {"r.example": {"auth": b64("b:2")}}})
    assert load_docker_configs([str(tmp_path / "d")], {}).credentials_for("r.example") == Credentials("a", "1", source=first)


def test_merge_earlier_file_wins(tmp_path):
    a = write(tmp_path / "a" / "config.json", {"auths": {"r.example": {"auth": b64("a:1")}}})
    b = write(
        tmp_path / "b" / "config.json",
        {"auths": {"https://r.example/v1/": {"auth": b64("b:2")}, "s.example": {"auth": b64("b:3")}}},
    )
    cfg = load_docker_configs([a, b], {})
    assert cfg.paths == [a, b]
    assert (cfg.credentials_for("r.example"), cfg.credentials_for("s.example"), cfg.credentials_for("t.example")) == (
        Credentials("a", "1", source=a),
        Credentials("b", "3", source=b),
        None,
    )


def test_default_is_docker_config_env(tmp_path):
    path = write(tmp_path / "dc" / "config.json", {"auths": {"r.example": {"auth": b64("u:p")}}})
    write(tmp_path / "home" / ".docker" / "config.json", {"auths": {"r.example": {"auth": b64("home:p")}}})
    cfg = load_docker_configs(None, {"DOCKER_CONFIG": str(tmp_path / "dc"), "HOME": str(tmp_path / "home")})
    assert cfg.paths == [path]
    assert cfg.credentials_for("r.example") == Credentials("u", "p", source=path)


def test_default_is_home_docker_config(tmp_path):
    path = write(tmp_path / "home" / ".docker" / "config.json", {"auths": {"r.example": {"auth": b64("home:p")}}})
    cfg = load_docker_configs([], {"HOME": str(tmp_path / "home")})
    assert cfg.paths == [path]
    assert cfg.credentials_for("r.example") == Credentials("home", "p", source=path)


@pytest.mark.parametrize("env_key", ["DOCKER_CONFIG", "HOME"])
def test_no_default_config_is_anonymous(tmp_path, env_key):
    cfg = load_docker_configs(None, {env_key: str(tmp_path)})
    assert (cfg.paths, cfg.credentials_for("r.example")) == ([], None)


# --- malformed files ------------------------------------------------------------------------------------------------
SECRET = "hunter2-never-print-me"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"auths": {"r": {"auth": "' + SECRET, "not valid JSON (Unterminated string starting at: line 1 column 26)"),
        ('["' + SECRET + '"]', "must hold a JSON object"),
        ({"auths": [SECRET]}, '"auths" must be an object mapping registries to entries'),
        ({"auths": {"r.example": SECRET}}, "auths['r.example'] must be an object"),
        ({"auths": {"r.example": {"auth": SECRET + "!"}}}, "auths['r.example'].auth is not base64 of \"user:password\""),
        (
            {"auths": {"r.example": {"auth": b64(SECRET)}}},
            "auths['r.example'].auth decodes to no \"user:password\" pair (the colon is missing)",
        ),
        ({"auths": {"r.example": {"password": 12345}}}, "auths['r.example'].password must be a string"),
        ({"credHelpers": {"r.example": 1}}, '"credHelpers" must be an object mapping registries to helper names'),
        ({"credsStore": ["x"]}, '"credsStore" must be a helper name'),
    ],
    ids=["bad-json", "not-object", "auths-list", "entry-string", "auth-not-base64", "auth-no-colon",
         "password-number", "helpers-bad", "store-bad"],
)
def test_malformed_config_names_file_and_problem(tmp_path, content, message):
    path = write(tmp_path / "config.json", content)
    with pytest.raises(DockerConfigError) as info:
        load_docker_configs([path], {})
    assert str(info.value) == f"docker config {path}: {message}"
    assert SECRET not in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)


def test_missing_path(tmp_path):
    with pytest.raises(DockerConfigError) as info:
        load_docker_configs([str(tmp_path / "nope.json")], {})
    assert str(info.value) == f"docker config {tmp_path / 'nope.json'} does not exist"


def test_directory_without_config(tmp_path):
    with pytest.raises(DockerConfigError) as info:
        load_docker_configs([str(tmp_path)], {})
    assert str(info.value) == (
        f"docker config directory {tmp_path} holds none of config.json, .dockerconfigjson, .dockercfg"
    )


# --- secrets stay hidden ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "creds, shown",
    [
        (Credentials("alice", SECRET, source="/x/config.json"),
         "Credentials(username='alice', password=***, source='/x/config.json')"),
        (Credentials(identity_token=SECRET, source="docker-credential-x"),
         "Credentials(username='', identity_token=***, source='docker-credential-x')"),
    ],
    ids=["password", "identity-token"],
)
def test_credentials_repr_hides_secret(creds, shown):
    assert (repr(creds), str(creds), f"{creds}", repr([creds])) == (shown, shown, shown, f"[{shown}]")


def test_docker_config_repr_hides_secret(tmp_path):
    path = write(tmp_path / "config.json", {"auths": {"r.example": {"auth": b64("u:" + SECRET)}}})
    cfg = load_docker_configs([path], {"SOME_TOKEN": SECRET})
    assert SECRET not in repr(cfg) and b64("u:" + SECRET) not in repr(cfg)


# --- credential helpers -----------------------------------------------------------------------------------------------
HELPER = """#!/bin/sh
# A fake docker-credential helper: records what it was asked, answers from $FAKE_HELPER_MODE.
read server
echo "$server" >> "$FAKE_HELPER_LOG"
case "$1:$FAKE_HELPER_MODE" in
  get:ok) printf '{"ServerURL":"%s","Username":"helper-user","Secret":"helper-secret"}' "$server" ;;
  get:token) printf '{"ServerURL":"%s","Username":"<token>","Secret":"refresh-abc"}' "$server" ;;
  get:notfound) echo "credentials not found in native keychain"; exit 1 ;;
  get:fail) echo "error getting credentials - err: exit status 1, out: keychain locked" >&2; exit 3 ;;
  get:junk) echo "this is not json" ;;
  *) echo "unexpected $1"; exit 2 ;;
esac
"""


@pytest.fixture
def helper_env(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "docker-credential-fake"
    exe.write_text(HELPER)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    log = tmp_path / "helper.log"
    return {"PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", "FAKE_HELPER_LOG": str(log)}, log


@pytest.mark.parametrize(
    "doc, lookup, mode, expected, asked",
    [
        ({"credHelpers": {"r.example": "fake"}}, "r.example", "ok",
         Credentials("helper-user", "helper-secret", source="docker-credential-fake"), ["r.example"]),
        ({"credHelpers": {"https://r.example:5000/v1/": "fake"}}, "r.example:5000", "ok",
         Credentials("helper-user", "helper-secret", source="docker-credential-fake"), ["r.example:5000"]),
        ({"credHelpers": {"r.example": "fake"}}, "r.example", "token",
         Credentials(identity_token="refresh-abc", source="docker-credential-fake"), ["r.example"]),
        ({"credsStore": "fake", "auths": {"r.example": {}}}, "r.example", "ok",
         Credentials("helper-user", "helper-secret", source="docker-credential-fake"), ["r.example"]),
        ({"credsStore": "fake"}, "docker.io", "ok",
         Credentials("helper-user", "helper-secret", source="docker-credential-fake"), ["https://index.docker.io/v1/"]),
        ({"credsStore": "fake"}, "r.example", "notfound", None, ["r.example"]),
        # credHelpers beats auths for its registry; auths beats credsStore
        ({"credHelpers": {"r.example": "fake"}, "auths": {"r.example": {"auth": b64("file:pw")}}}, "r.example", "ok",
         Credentials("helper-user", "helper-secret", source="docker-credential-fake"), ["r.example"]),
        ({"credsStore": "fake", "auths": {"r.example": {"auth": b64("file:pw")}}}, "r.example", "ok",
         Credentials("file", "pw", source="{path}"), []),
        # a helper for another registry is never run
        ({"credHelpers": {"other.example": "fake"}}, "r.example", "ok", None, []),
    ],
    ids=["cred-helper", "cred-helper-url-key", "identity-token", "creds-store", "creds-store-hub", "not-found",
         "helper-beats-auths", "auths-beat-store", "other-registry"],
)
def test_credential_helpers(tmp_path, helper_env, doc, lookup, mode, expected, asked):
    env, log = helper_env
    path = write(tmp_path / "config.json", doc)
    got = load_docker_configs([path], {**env, "FAKE_HELPER_MODE": mode}).credentials_for(lookup)
    if expected is not None and expected.source == "{path}":
        expected = Credentials(expected.username, expected.password, source=path)
    assert got == expected
    assert (log.read_text().splitlines() if log.exists() else []) == asked


def test_helper_not_found_falls_through_to_next_file(tmp_path, helper_env):
    env, _ = helper_env
    first = write(tmp_path / "a" / "config.json", {"credsStore": "fake"})
    second = write(tmp_path / "b" / "config.json", {"auths": {"r.example": {"auth": b64("b:2")}}})
    cfg = load_docker_configs([first, second], {**env, "FAKE_HELPER_MODE": "notfound"})
    assert cfg.credentials_for("r.example") == Credentials("b", "2", source=second)


@pytest.mark.parametrize(
    "doc, mode, message",
    [
        ({"credHelpers": {"r.example": "fake"}}, "fail",
         "credential helper docker-credential-fake failed for registry r.example (exit 3): "
         "error getting credentials - err: exit status 1, out: keychain locked"),
        ({"credHelpers": {"r.example": "fake"}}, "junk",
         'credential helper docker-credential-fake answered registry r.example with something other than '
         '{"Username": ..., "Secret": ...} JSON'),
        ({"credHelpers": {"r.example": "missing"}}, "ok",
         "credential helper docker-credential-missing (configured for registry r.example) is not on PATH: "
         "install it or remove it from the docker config"),
    ],
    ids=["helper-fails", "helper-junk", "helper-missing"],
)
def test_credential_helper_errors(tmp_path, helper_env, doc, mode, message):
    env, _ = helper_env
    path = write(tmp_path / "config.json", doc)
    cfg = load_docker_configs([path], {**env, "FAKE_HELPER_MODE": mode})
    with pytest.raises(CredentialHelperError) as info:
        cfg.credentials_for("r.example")
    assert str(info.value) == message
    assert isinstance(info.value, AuthError)


def test_helper_found_on_monkeypatched_path(tmp_path, helper_env, monkeypatch):
    """The env mapping the loader passes is the process environment when it holds PATH."""
    env, log = helper_env
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FAKE_HELPER_MODE", "ok")
    path = write(tmp_path / "config.json", {"credHelpers": {"127.0.0.1:5000": "fake"}})
    got = load_docker_configs([path], os.environ).credentials_for("127.0.0.1:5000")
    assert (got, log.read_text()) == (Credentials("helper-user", "helper-secret", source="docker-credential-fake"),
                                      "127.0.0.1:5000\n")


# --- WWW-Authenticate -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "header, expected",
    [
        (
            'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"',
            [Challenge("bearer", {"realm": "https://auth.example/token", "service": "registry.example",
                                  "scope": "repository:a/b:pull,push"})],
        ),
        (
            'Bearer realm="http://127.0.0.1:1/token",service="s",scope="repository:m:pull",error="invalid_token"',
            [Challenge("bearer", {"realm": "http://127.0.0.1:1/token", "service": "s", "scope": "repository:m:pull",
                                  "error": "invalid_token"})],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        ('basic REALM=unquoted', [Challenge("basic", {"realm": "unquoted"})]),
        (
            'Basic realm="a, b", Bearer realm="https://x/t", service=s',
            [Challenge("basic", {"realm": "a, b"}), Challenge("bearer", {"realm": "https://x/t", "service": "s"})],
        ),
        ('Bearer  realm = "r" ,  scope="x"', [Challenge("bearer", {"realm": "r", "scope": "x"})]),
        ('Bearer realm="a\\"b\\\\c"', [Challenge("bearer", {"realm": 'a"b\\c'})]),
        ('Bearer realm="a",,service="b"', [Challenge("bearer", {"realm": "a", "service": "b"})]),
        ("Negotiate abc123==, Basic realm=x",
         [Challenge("negotiate", {}, "abc123=="), Challenge("basic", {"realm": "x"})]),
        ("Basic", [Challenge("basic", {})]),
        ("", []),
        ('Bearer realm="unterminated', [Challenge("bearer", {"realm": "unterminated"})]),
    ],
    ids=["bearer-scope-with-comma", "bearer-error", "basic", "case-and-token-value", "two-challenges",
         "whitespace", "escapes", "empty-element", "token68", "bare-scheme", "empty", "unterminated"],
)
def test_parse_www_authenticate(header, expected):
    assert parse_www_authenticate(header) == expected


# --- helper names from a (tenant-written) pull secret --------------------------------------------------------------
SENTINEL = """#!/bin/sh
echo ran >> "{marker}"
printf '{{"Username":"u","Secret":"s"}}'
"""


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SENTINEL.format(marker=marker))
    path.chmod(0o755)


@pytest.mark.parametrize("field", ["credHelpers", "credsStore"])
@pytest.mark.parametrize("name", ["../x", "/bin/sh", "a/b", "..", ".hidden", "-x", "a..b", "x" * 65, "a b", "x\n"],
                         ids=["dotdot-slash", "absolute", "slash", "dotdot", "leading-dot", "leading-dash", "inner-dotdot",
                              "too-long", "space", "newline"])
def test_helper_names_that_are_not_plain_program_names_are_refused_before_anything_runs(tmp_path, monkeypatch, field,
                                                                                         name):
    """A name with a '/' would make the lookup run a path (relative to the working directory, or absolute):
    refused when the file is read, naming the file and the key, and no helper is spawned."""
    marker = tmp_path / "helper-ran"
    cwd, bindir = tmp_path / "cwd", tmp_path / "bin"
    cwd.mkdir()
    bindir.mkdir()
    monkeypatch.chdir(cwd)
    # A helper wherever the name could lead: resolved against the working directory, and on PATH.
    for base in (cwd, bindir):
        target = base / f"docker-credential-{name}"
        if "\n" not in name and target.resolve().is_relative_to(tmp_path) and not target.exists():
            _plant(target, marker)
    doc = {"credHelpers": {"r.example": name}} if field == "credHelpers" else {"credsStore": name}
    path = write(tmp_path / "config.json", doc)
    with pytest.raises(DockerConfigError) as e:
        load_docker_configs([path], {"PATH": str(bindir)}).credentials_for("r.example")
    msg = str(e.value)
    assert msg.startswith(f"docker config {path}: ") and field in msg and "not a plain program name" in msg
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../x", "/bin/sh", "a/b"])
def test_run_helper_refuses_a_path_on_its_own(tmp_path, monkeypatch, name):
    from loader.credentials import run_helper

    marker = tmp_path / "helper-ran"
    monkeypatch.chdir(tmp_path)
    target = tmp_path / f"docker-credential-{name}"
    if target.resolve().is_relative_to(tmp_path):
        _plant(target, marker)
    with pytest.raises(CredentialHelperError, match="not a plain program name"):
        run_helper(name, "r.example", {"PATH": "/usr/bin"})
    assert not marker.exists()


def test_helpers_are_looked_up_only_in_absolute_path_entries(tmp_path, monkeypatch):
    """An empty or relative PATH entry would find the helper relative to the working directory."""
    marker = tmp_path / "helper-ran"
    monkeypatch.chdir(tmp_path)
    _plant(tmp_path / "rel" / "docker-credential-fake", marker)
    _plant(tmp_path / "docker-credential-fake", marker)
    path = write(tmp_path / "config.json", {"credHelpers": {"r.example": "fake"}})
    cfg = load_docker_configs([path], {"PATH": f"rel{os.pathsep}{os.pathsep}."})
    with pytest.raises(CredentialHelperError, match="is not on PATH"):
        cfg.credentials_for("r.example")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["fake", "ecr-login", "gcloud", "desktop.exe", "secret_service", "x" * 64])
def test_plain_helper_names_are_accepted(name):
    from loader.credentials import valid_helper_name

    assert valid_helper_name(name)
