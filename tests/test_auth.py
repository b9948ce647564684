"""Auth against real registries: htpasswd (basic) and token (bearer) auth, credentials from docker config files,
token refresh, and no credential ever in a log line or an error."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import pytest
import requests

from loader.credentials import load_docker_configs
from loader.errors import AuthError, NetworkError
from loader.log import Logger
from loader.pull import PullOptions, pull
from tests.support.auth_registry import session_for, start_htpasswd_registry, start_token_registry
from tests.support.files import tree
from tests.support.oci import Pusher, file_layer

USERS = {"alice": "alice-secret-pw", "bob": "bob-secret-pw"}
DATA = {"w.bin": os.urandom(3 << 20), "config.json": b"{}"}


def docker_config(tmp_path, host, user, password, name="config.json"):
    d = tmp_path / f"cfg-{user}"
    d.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (d / name).write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return d


def run(ref, cache, creds, **kw):
    stream = io.StringIO()
    opts = dict(progress="none", concurrency=4, credentials=creds)
    opts.update(kw)
    try:
        return pull(ref, PullOptions(cache=cache, **opts), Logger(stream, level="debug")), stream.getvalue()
    finally:
        for pw in USERS.values():
            assert pw not in stream.getvalue()


@pytest.fixture(scope="module", params=[False, True], ids=["http", "https"])
def basic_registry(request):
    with start_htpasswd_registry(USERS, tls=request.param) as reg:
        Pusher(reg.url, session=session_for(reg, ("alice", USERS["alice"]))).push_artifact(
            "private/model", "v1", [file_layer(n, d) for n, d in DATA.items()])
        reg.tls = request.param
        yield reg


def test_basic_auth_with_docker_config(basic_registry, tmp_path):
    reg = basic_registry
    creds = load_docker_configs([str(docker_config(tmp_path, reg.host, "alice", USERS["alice"]))], {})
    res, _ = run(f"{reg.host}/private/model:v1", tmp_path / "c", creds, plain_http=not reg.tls, insecure=reg.tls)
    assert tree(res.path) == DATA


def test_basic_auth_missing_and_wrong_credentials(basic_registry, tmp_path):
    reg = basic_registry
    ref = f"{reg.host}/private/model:v1"
    with pytest.raises(AuthError) as e:
        run(ref, tmp_path / "c", None, plain_http=not reg.tls, insecure=reg.tls)
    assert f"registry {reg.host} requires credentials for {ref} and none are configured" in str(e.value)
    wrong = load_docker_configs([str(docker_config(tmp_path, reg.host, "alice", "bob-secret-pw"))], {})
    with pytest.raises(AuthError) as e:
        run(ref, tmp_path / "c", wrong, plain_http=not reg.tls, insecure=reg.tls)
    assert "rejected the configured ones" in str(e.value) and "bob-secret-pw" not in str(e.value)


@pytest.fixture(scope="module")
def token_registry():
    with start_token_registry(USERS, public_repos={"public/model"}) as reg:
        ts = reg.token_server
        for repo in ("private/model", "public/model"):
            tok = requests.get(ts.realm, params={"service": ts.service, "scope": f"repository:{repo}:pull,push"},
                               auth=("alice", USERS["alice"])).json()["token"]
            Pusher(reg.url, session=session_for(reg, bearer=tok)).push_artifact(
                repo, "v1", [file_layer(n, d) for n, d in DATA.items()])
        yield reg


def test_token_auth_private_repo_one_token_for_all_workers(token_registry, tmp_path):
    reg, ts = token_registry, token_registry.token_server
    creds = load_docker_configs([str(docker_config(tmp_path, reg.host, "bob", USERS["bob"]))], {})
    before = ts.tokens_issued
    res, _ = run(f"{reg.host}/private/model:v1", tmp_path / "c", creds)
    assert tree(res.path) == DATA
    assert ts.tokens_issued - before == 1  # cached per scope, shared by every download thread


def test_token_auth_anonymous_public_repo(token_registry, tmp_path):
    res, _ = run(f"{token_registry.host}/public/model:v1", tmp_path / "c", None)
    assert tree(res.path) == DATA


def test_token_auth_refused(token_registry, tmp_path):
    reg = token_registry
    with pytest.raises(AuthError) as e:
        run(f"{reg.host}/private/model:v1", tmp_path / "c", None)
    assert "anonymous access" in str(e.value) or "refused access" in str(e.value)
    wrong = load_docker_configs([str(docker_config(tmp_path, reg.host, "bob", "nope"))], {})
    with pytest.raises(AuthError) as e:
        run(f"{reg.host}/private/model:v1", tmp_path / "c2", wrong)
    assert "refused the configured credentials" in str(e.value)


def test_expired_token_is_refreshed(token_registry, tmp_path):
    reg, ts = token_registry, token_registry.token_server
    creds = load_docker_configs([str(docker_config(tmp_path, reg.host, "alice", USERS["alice"]))], {})
    ts.issue_expired = 1  # the registry rejects the first token: the loader must fetch a new one and go on
    before = ts.tokens_issued
    res, _ = run(f"{reg.host}/private/model:v1", tmp_path / "c", creds)
    assert tree(res.path) == DATA
    assert ts.tokens_issued - before == 2


def test_cli_reads_pull_secret_mount_and_docker_config_env(token_registry, tmp_path):
    """The webhook mounts each imagePullSecret's .dockerconfigjson in a directory and passes --docker-config."""
    reg = token_registry
    secret_dir = docker_config(tmp_path, reg.host, "alice", USERS["alice"], name=".dockerconfigjson")
    base = [sys.executable, "-m", "loader.cli", "pull", f"{reg.host}/private/model:v1", "--progress", "none"]
    out = subprocess.run(base + ["--cache", str(tmp_path / "c1"), "--docker-config", str(secret_dir)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    env_dir = docker_config(tmp_path, reg.host, "bob", USERS["bob"])
    env = {**os.environ, "DOCKER_CONFIG": str(env_dir)}
    out = subprocess.run(base + ["--cache", str(tmp_path / "c2")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(base + ["--cache", str(tmp_path / "c3")], capture_output=True, text=True,
                         env={**os.environ, "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path / "none")})
    assert out.returncode == 3, out.stderr
    assert "refused access" in out.stderr and "imagePullSecrets" in out.stderr and USERS["alice"] not in out.stderr


def test_cli_reads_the_webhooks_pull_secret_directories_missing_and_legacy(token_registry, tmp_path):
    """The webhook passes each pull secret's directory, projecting .dockerconfigjson as config.json and a legacy
    .dockercfg as .dockercfg, optional: a missing secret is an empty directory, skipped with a warning (the kubelet
    also pulls without a missing pull secret); a legacy one is read."""
    from loader.credentials import CONFIG_FILE_NAMES
    from webhook.mutate import PULL_SECRET_ITEMS

    reg = token_registry
    assert {item["path"] for item in PULL_SECRET_ITEMS} <= set(CONFIG_FILE_NAMES)  # what the webhook writes is read
    missing = tmp_path / "docker" / "deleted-secret"  # what the kubelet leaves for an absent optional secret
    (missing / "..2026_11_23_13_00_00.000000001").mkdir(parents=True)
    (missing / "..data").symlink_to("..2026_11_23_13_00_00.000000001")
    legacy = tmp_path / "docker" / "old-secret"
    legacy.mkdir()
    auth = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    (legacy / ".dockercfg").write_text(json.dumps({reg.host: {"auth": auth}}))
    cmd = [sys.executable, "-m", "loader.cli", "pull", f"{reg.host}/private/model:v1", "--progress", "none",
           "--output", "json", "--cache", str(tmp_path / "c"), "--docker-config", str(missing),
           "--docker-config", str(legacy)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files"] == len(DATA)
    warnings = [line for line in out.stderr.splitlines() if "event=docker_config.missing" in line]
    assert len(warnings) == 1 and f"path={missing}" in warnings[0]
    assert USERS["alice"] not in out.stderr and auth not in out.stderr

    # A directory that is not an empty secret volume but holds no config is a mistake, not a missing secret.
    typo = tmp_path / "not-a-docker-config"
    typo.mkdir()
    (typo / "auth.json").write_text("{}")
    out = subprocess.run(cmd + ["--docker-config", str(typo)], capture_output=True, text=True)
    assert out.returncode == 2 and f"docker config directory {typo} holds none of" in out.stderr

    # The legacy secret gone too: anonymous, refused, exit 3 (a fresh cache, so no cached copy is involved).
    only_missing = [str(tmp_path / "c2") if a == str(tmp_path / "c") else a for a in cmd[: cmd.index(str(legacy)) - 1]]
    out = subprocess.run(only_missing, capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 3 and "imagePullSecrets" in out.stderr


def test_check_access_refuses_a_cached_private_digest_without_credentials(token_registry, tmp_path):
    """On a shared node cache, knowing a digest must not be enough to read a private model."""
    reg = token_registry
    creds = load_docker_configs([str(docker_config(tmp_path, reg.host, "alice", USERS["alice"]))], {})
    first, _ = run(f"{reg.host}/private/model:v1", tmp_path / "c", creds)
    by_digest = f"{reg.host}/private/model@{first.digest}"
    open_hit, _ = run(by_digest, tmp_path / "c", None)  # default: a cached digest needs no network
    assert open_hit.cache_hit
    with pytest.raises(AuthError):
        run(by_digest, tmp_path / "c", None, check_access=True)
    ok, _ = run(by_digest, tmp_path / "c", creds, check_access=True)
    assert ok.cache_hit and ok.path == first.path


def test_check_access_with_registry_down_still_uses_the_cache(tmp_path):
    from tests.support.registry import start_registry

    reg = start_registry()
    try:
        d = Pusher(reg.url).push_artifact("m/x", "v1", [file_layer("w", b"1")])
        uid = "3f2b1c0d-0000-4000-8000-0000000000aa"
        run(f"{reg.host}/m/x@{d}", tmp_path, None, check_access=True, pod_uid=uid)
        reg.stop()
        # The pod that read it, restarting: its pin was written after it proved access, so it gets the cache.
        res, log = run(f"{reg.host}/m/x@{d}", tmp_path, None, check_access=True, pod_uid=uid)
        assert res.cache_hit and "unreachable" in res.warnings[0] and "event=pull.registry_unreachable" in log
        # Another pod: the model was read anonymously over plain HTTP, which anyone could have answered
        # (hostAliases), so an outage grants it nothing (issue 10's hostile review; docs/architecture.md).
        with pytest.raises(NetworkError) as e:
            run(f"{reg.host}/m/x@{d}", tmp_path, None, check_access=True)
        assert "is not given out" in str(e.value)
    finally:
        reg.cleanup()
