"""The registry client against registries, mirrors, token realms and storage that lie, bait credentials or break
the protocol. Every server records what it received, so each leak test asserts where a secret did not go, not
only that a call failed. Honest counterparts sit next to the hostile cases: real Distribution registries
(htpasswd and token auth) and the hostile server playing an honest one (tests/support/hostile_registry.py)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os

import pytest

from loader.auth import MAX_EXPIRES_IN, parse_token_response
from loader.credentials import load_docker_configs
from loader.digest import InvalidDigest
from loader.errors import (
    AuthError,
    ConnectError,
    NotFoundError,
    RangeNotSatisfiable,
    RegistryError,
    RejectedError,
    TransientError,
    UsageError,
)
from loader.log import Logger
from loader.oci import MAX_MANIFEST_BYTES, OCI_MANIFEST
from loader.reference import parse
from loader.registry import RegistryClient
from loader.transport import DowngradeRefused, ProtocolError
from tests.support.auth_registry import session_for, start_htpasswd_registry, start_token_registry
from tests.support.hostile_registry import (
    Answer,
    FakeRegistry,
    HostileServer,
    Seen,
    basic,
    error_answer,
    json_answer,
    require_basic,
    require_bearer,
)
from tests.support.oci import Pusher, file_layer
from tests.support.registry import free_port

USERS = {"alice": "alice-upstream-secret"}
UP_USER, UP_PW = "up-user", "up-registry-secret"
MIRROR_USER, MIRROR_PW = "mirror-user", "mirror-own-secret"
IDENTITY = "identity-refresh-secret"
REPO = "m/model"

BLOB = os.urandom(10_000)
CONFIG = b"{}"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
    "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(CONFIG), "size": len(CONFIG)},
    "layers": [{"mediaType": "application/octet-stream", "digest": sha(BLOB), "size": len(BLOB),
                "annotations": {"org.opencontainers.image.title": "w.bin"}}],
}).encode()


def fake() -> FakeRegistry:
    return FakeRegistry({"v1": MANIFEST, sha(MANIFEST): MANIFEST}, {sha(BLOB): BLOB, sha(CONFIG): CONFIG})


def b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def docker_config(tmp_path, auths: dict[str, dict], name: str = "config.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"auths": auths}))
    return load_docker_configs([str(path)], {})


def logins(tmp_path, **hosts: tuple[str, str]):
    """A docker config with user:password for each host (keyword: any name, value: (host, user, password))."""
    return docker_config(tmp_path, {h: {"auth": b64(u, p)} for h, u, p in hosts.values()})


def client(host: str, creds=None, *, tls: bool = False, log=None, mirrors=(), ref: str | None = None):
    return RegistryClient(parse(ref or f"{host}/{REPO}:v1"), plain_http=not tls, insecure=tls, credentials=creds,
                          mirrors=list(mirrors), timeout=10, log=log)


def read_blob(c: RegistryClient, digest: str, size: int) -> bytes:
    out = bytearray()
    buf = bytearray(4096)
    with c.open_blob(digest, size=size) as body:
        while True:
            n = body.readinto(buf)
            if not n:
                break
            out += buf[:n]
    return bytes(out)


def secrets_in(server: HostileServer, *secrets: str) -> list[str]:
    got = server.everything_received()
    return [s for s in secrets if s in got]


# --- mirrors: only their own credentials -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def upstreams():
    """Real registries that demand credentials, each holding private/model:v1."""
    layers = [file_layer("w.bin", BLOB)]
    with start_htpasswd_registry(USERS) as basic_reg, start_token_registry(USERS) as token_reg:
        Pusher(basic_reg.url, session=session_for(basic_reg, ("alice", USERS["alice"]))).push_artifact(
            "private/model", "v1", layers)
        ts = token_reg.token_server
        import requests

        tok = requests.get(ts.realm, params={"service": ts.service, "scope": "repository:private/model:pull,push"},
                           auth=("alice", USERS["alice"])).json()["token"]
        Pusher(token_reg.url, session=session_for(token_reg, bearer=tok)).push_artifact("private/model", "v1", layers)
        yield {"basic": basic_reg, "token": token_reg}


def _upstream_creds(tmp_path, reg):
    return logins(tmp_path, up=(reg.host, "alice", USERS["alice"]))


@pytest.mark.parametrize("challenge", ["basic", "bearer"])
@pytest.mark.parametrize("kind", ["basic", "token"], ids=["htpasswd-registry", "token-registry"])
def test_a_mirror_asking_for_credentials_never_gets_the_registrys(upstreams, kind, challenge, tmp_path):
    """A mirror that answers 401 (Basic, or Bearer with a realm of its choosing) gets nothing: the registry's
    credentials are for the registry's origin only. The pull falls back to the registry and succeeds."""
    reg = upstreams[kind]
    stream = io.StringIO()
    with HostileServer() as mirror, HostileServer() as realm:
        realm.on(None, r"/token.*", json_answer(200, {"token": "mirror-token", "expires_in": 300}))
        if challenge == "basic":
            mirror.on(None, r".*", error_answer(401, "UNAUTHORIZED", headers={"WWW-Authenticate": 'Basic realm="m"'}))
        else:
            mirror.on(None, r".*", require_bearer("never-issued", f"{realm.url}/token", Answer(200)))
        with client(reg.host, _upstream_creds(tmp_path, reg), mirrors=[mirror.url], log=Logger(stream, "debug"),
                    ref=f"{reg.host}/private/model:v1") as c:
            layer = c.get_manifest("v1").json()["layers"][0]
            assert read_blob(c, layer["digest"], layer["size"]) == BLOB
        upstream_token = reg.token_server.last_token if kind == "token" else None
        assert mirror.seen()  # asked first, then passed over: it refused
        for server in (mirror, realm):
            assert secrets_in(server, USERS["alice"], b64("alice", USERS["alice"])) == []
            assert set(server.authorizations()) <= {None, "Bearer mirror-token"}
            assert upstream_token is None or upstream_token not in server.everything_received()
        assert "event=mirror.fallback" in stream.getvalue() and USERS["alice"] not in stream.getvalue()


@pytest.mark.parametrize("how", ["url-userinfo", "docker-config", "url-userinfo-bearer"])
def test_a_mirror_gets_its_own_credentials(upstreams, how, tmp_path):
    """user:password in the mirror URL, or the docker config entry for the mirror's own host:port, go to the
    mirror (and to the realm the mirror names); the registry's never do."""
    reg = upstreams["basic"]
    with HostileServer() as mirror, HostileServer() as realm:
        if how == "url-userinfo-bearer":
            realm.on(None, r"/token.*", require_basic(MIRROR_USER, MIRROR_PW, json_answer(200, {"token": "m-tok"})))
            fake().serve(mirror, "private/model", wrap=lambda r: require_bearer("m-tok", f"{realm.url}/token", r))
        else:
            fake().serve(mirror, "private/model", wrap=lambda r: require_basic(MIRROR_USER, MIRROR_PW, r))
        if how == "docker-config":
            url = mirror.url
            creds = logins(tmp_path, up=(reg.host, "alice", USERS["alice"]), m=(mirror.host, MIRROR_USER, MIRROR_PW))
        else:
            url = f"http://{MIRROR_USER}:{MIRROR_PW}@{mirror.host}"
            creds = _upstream_creds(tmp_path, reg)
        with client(reg.host, creds, mirrors=[url], ref=f"{reg.host}/private/model:v1") as c:
            assert c.get_manifest("v1").data == MANIFEST  # the mirror's (fake) content: it answered
            assert read_blob(c, sha(BLOB), len(BLOB)) == BLOB
    if how == "url-userinfo-bearer":
        assert set(mirror.authorizations()) == {None, "Bearer m-tok"}
        assert set(realm.authorizations()) == {basic(MIRROR_USER, MIRROR_PW)}
    else:
        assert set(mirror.authorizations()) == {None, basic(MIRROR_USER, MIRROR_PW)}
    for server in (mirror, realm):
        assert secrets_in(server, USERS["alice"], b64("alice", USERS["alice"])) == []


@pytest.mark.parametrize("state", ["dead", "failing", "refusing"])
def test_a_mirror_password_is_never_logged_nor_in_an_error(state, tmp_path):
    """A mirror URL's password is taken out where the URL is parsed: logs name the mirror by host:port."""
    stream = io.StringIO()
    with HostileServer() as reg, HostileServer() as mirror:
        fake().serve(reg, REPO)
        if state == "failing":
            mirror.on(None, r".*", error_answer(503, "UNAVAILABLE", headers={"Retry-After": "0"}))
        elif state == "refusing":
            mirror.on(None, r".*", error_answer(401, "UNAUTHORIZED", headers={"WWW-Authenticate": 'Basic realm="m"'}))
        host = f"127.0.0.1:{free_port()}" if state == "dead" else mirror.host
        url = f"http://{MIRROR_USER}:{MIRROR_PW}@{host}"
        with client(reg.host, mirrors=[url], log=Logger(stream, "debug")) as c:
            assert c.get_manifest("v1").data == MANIFEST
        log = stream.getvalue()
        assert f"event=mirror.fallback mirror={host} registry={reg.host}" in log
        assert MIRROR_PW not in log and b64(MIRROR_USER, MIRROR_PW) not in log
        if state == "refusing":  # its own credentials were offered to it, and refused
            assert "rejected the configured ones" in log and mirror.authorizations()[-1] == basic(MIRROR_USER, MIRROR_PW)
        # ... and they are the mirror's alone: the registry never sees them.
        assert set(reg.authorizations()) == {None} and secrets_in(reg, MIRROR_PW, b64(MIRROR_USER, MIRROR_PW)) == []
        # With the registry gone too, the error names what failed, still without the password.
        reg.stop()
        with client(reg.host, mirrors=[url], log=Logger(stream, "debug")) as c, pytest.raises(RegistryError) as e:
            c.get_manifest("v1")
        assert MIRROR_PW not in str(e.value) and MIRROR_PW not in stream.getvalue()


@pytest.mark.parametrize("url", [f"http://{MIRROR_USER}:{MIRROR_PW}@127.0.0.1:99999",
                                 f"ftp://{MIRROR_USER}:{MIRROR_PW}@127.0.0.1:5000"], ids=["bad-port", "bad-scheme"])
def test_an_unusable_mirror_url_is_refused_with_its_password_redacted(url):
    with pytest.raises(UsageError) as e:
        client("127.0.0.1:5000", mirrors=[url])
    assert MIRROR_PW not in str(e.value) and f"{MIRROR_USER}:***@" in str(e.value)


def test_a_mirror_serving_other_bytes_for_a_digest_is_passed_over_for_good(registry, pusher):
    d = pusher.push_artifact("hostile/mirror", "v1", [file_layer("w", b"real")])
    with HostileServer() as mirror:
        mirror.on(None, r"/v2/.*/manifests/.*", Answer(200, {"Content-Type": OCI_MANIFEST}, MANIFEST))
        stream = io.StringIO()
        with client(registry.host, mirrors=[mirror.url], log=Logger(stream), ref=f"{registry.host}/hostile/mirror@{d}") as c:
            assert c.get_manifest(d).digest == d
            assert c.get_manifest(d).digest == d
        assert len(mirror.seen()) == 1 and "whose digest is" in stream.getvalue()


# --- redirects ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["manifest", "blob"])
def test_https_registry_redirecting_to_http_is_refused_and_nothing_is_sent_there(what, tmp_path):
    """https -> http (the same host, another port) is not followed, for manifests and for blobs: the plain-http
    server never sees a request, so neither the credentials nor a byte of the model crosses in clear text."""
    with HostileServer(tls=True) as reg, HostileServer() as plain:
        fake().serve(plain, REPO)  # would answer honestly

        def downgrade(seen: Seen) -> Answer:
            return Answer(302 if what == "manifest" else 307, {"Location": f"http://127.0.0.1:{plain.port}{seen.path}"})

        reg.on(None, rf"/v2/{REPO}/(manifests|blobs)/.*", require_basic(UP_USER, UP_PW, downgrade))
        with client(reg.host, logins(tmp_path, r=(reg.host, UP_USER, UP_PW)), tls=True) as c, \
                pytest.raises(DowngradeRefused) as e:
            c.get_manifest("v1") if what == "manifest" else c.open_blob(sha(BLOB), size=len(BLOB))
        assert plain.seen() == []
        assert reg.authorizations() == [None, basic(UP_USER, UP_PW)]  # its own origin only
        assert "https to plain http" in str(e.value) and UP_PW not in str(e.value)
        assert not isinstance(e.value, TransientError)  # not retried: asking again gets the same redirect


@pytest.mark.parametrize("tls, scheme", [(False, "basic"), (True, "basic"), (False, "bearer"), (True, "bearer")],
                         ids=["http-basic", "https-basic", "http-bearer", "https-bearer"])
def test_a_redirect_to_storage_carries_no_authorization(tls, scheme, tmp_path):
    """Blob storage on another origin gets the request without Authorization (no Basic, no token), and the
    download works; a 401 from storage is an AuthError, never answered with the registry's credentials."""
    with HostileServer(tls) as reg, HostileServer(tls) as storage, HostileServer(tls) as realm:
        fake().serve(storage, REPO)
        realm.on(None, r"/token.*", require_basic(UP_USER, UP_PW, json_answer(200, {"token": "reg-token"})))

        def guard(route):
            if scheme == "basic":
                return require_basic(UP_USER, UP_PW, route)
            return require_bearer("reg-token", f"{realm.url}/token", route)

        reg.on(None, rf"/v2/{REPO}/manifests/.*", guard(fake().manifest_answer))
        reg.on(None, rf"/v2/{REPO}/blobs/.*", guard(lambda seen: Answer(307, {"Location": f"{storage.url}{seen.path}"})))
        creds = logins(tmp_path, r=(reg.host, UP_USER, UP_PW))
        with client(reg.host, creds, tls=tls) as c:
            assert c.get_manifest("v1").data == MANIFEST
            assert read_blob(c, sha(BLOB), len(BLOB)) == BLOB
            storage.on(None, r".*", error_answer(401, "UNAUTHORIZED", headers={"WWW-Authenticate": 'Basic realm="s"'}))
            with pytest.raises(AuthError):
                c.open_blob(sha(BLOB), size=len(BLOB))
        assert len(storage.seen()) == 2 and storage.authorizations() == [None, None]
        assert secrets_in(storage, UP_PW, b64(UP_USER, UP_PW), "reg-token") == []


def test_redirect_loops_and_unusable_redirects_are_protocol_errors():
    with HostileServer() as reg:
        reg.on(None, rf"/v2/{REPO}/manifests/loop", lambda seen: Answer(302, {"Location": seen.path}))
        reg.on(None, rf"/v2/{REPO}/manifests/nowhere", Answer(302))
        reg.on(None, rf"/v2/{REPO}/manifests/spaces", Answer(302, {"Location": "/v2/a b"}))
        reg.on(None, rf"/v2/{REPO}/manifests/ftp", Answer(302, {"Location": "ftp://127.0.0.1/x"}))
        with client(reg.host) as c:
            with pytest.raises(ProtocolError, match="not a valid request target"):
                c.get_manifest("spaces")
            with pytest.raises(ProtocolError, match="unusable location"):
                c.get_manifest("ftp")
            with pytest.raises(ProtocolError, match="redirected more than 5 times"):
                c.get_manifest("loop")
            with pytest.raises(ProtocolError, match="without a Location"):
                c.get_manifest("nowhere")


# --- token realms ------------------------------------------------------------------------------------------------
def _realm_registry(reg: HostileServer, realm_url: str) -> None:
    reg.on(None, rf"/v2/{REPO}/manifests/.*", require_bearer("anon-token", realm_url, fake().manifest_answer))


@pytest.mark.parametrize("kind", ["password", "identity-token"])
def test_an_http_realm_named_by_an_https_registry_gets_no_credentials(kind, tmp_path):
    """Basic credentials and identity tokens are withheld from a plain-http realm: it is asked anonymously (a
    public repository keeps working), with a warning."""
    with HostileServer(tls=True) as reg, HostileServer() as realm:
        realm.on("GET", r"/token.*", lambda s: json_answer(200, {"token": "anon-token"}) if s.authorization is None
                 else error_answer(401, "UNAUTHORIZED"))
        _realm_registry(reg, f"{realm.url}/token")
        entry = {"auth": b64(UP_USER, UP_PW)} if kind == "password" else {"identitytoken": IDENTITY}
        stream = io.StringIO()
        with client(reg.host, docker_config(tmp_path, {reg.host: entry}), tls=True, log=Logger(stream)) as c:
            assert c.get_manifest("v1").data == MANIFEST
        assert [(s.method, s.authorization) for s in realm.seen()] == [("GET", None)]
        assert secrets_in(realm, UP_PW, b64(UP_USER, UP_PW), IDENTITY) == []
        assert "event=auth.insecure_realm" in stream.getvalue() and UP_PW not in stream.getvalue()


def test_an_http_realm_refusing_anonymous_access_says_why_the_credentials_were_withheld(tmp_path):
    with HostileServer(tls=True) as reg, HostileServer() as realm:
        realm.on(None, r"/token.*", error_answer(401, "UNAUTHORIZED"))
        _realm_registry(reg, f"{realm.url}/token")
        with client(reg.host, logins(tmp_path, r=(reg.host, UP_USER, UP_PW)), tls=True) as c, \
                pytest.raises(AuthError) as e:
            c.get_manifest("v1")
        assert "named a plain http token realm" in str(e.value) and "must use https" in str(e.value)
        assert UP_PW not in str(e.value) and realm.authorizations() == [None]


@pytest.mark.parametrize("kind", ["password", "identity-token"])
def test_an_https_realm_gets_the_registrys_credentials(kind, tmp_path):
    """The honest path: the realm an https registry names over https gets its credentials (Basic on a GET, or the
    identity token in an OAuth2 POST), and nothing is sent to any other origin."""
    with HostileServer(tls=True) as reg, HostileServer(tls=True) as realm:
        def issue(s: Seen) -> Answer:
            ok = s.authorization == basic(UP_USER, UP_PW) if s.method == "GET" else IDENTITY.encode() in s.body
            return json_answer(200, {"access_token": "anon-token", "expires_in": 120}) if ok else error_answer(401, "X")

        realm.on(None, r"/token.*", issue)
        _realm_registry(reg, f"{realm.url}/token")
        entry = {"auth": b64(UP_USER, UP_PW)} if kind == "password" else {"identitytoken": IDENTITY}
        with client(reg.host, docker_config(tmp_path, {reg.host: entry}), tls=True) as c:
            assert c.get_manifest("v1").data == MANIFEST
        assert [s.method for s in realm.seen()] == (["GET"] if kind == "password" else ["POST"])
        assert secrets_in(reg, UP_PW, b64(UP_USER, UP_PW), IDENTITY) == []


def test_an_identity_token_post_is_not_redirected_to_another_origin(tmp_path):
    """The refresh token travels in the POST body: a 307 would resend it, so a realm may not send it elsewhere."""
    with HostileServer(tls=True) as reg, HostileServer(tls=True) as realm, HostileServer(tls=True) as elsewhere:
        realm.on(None, r"/token.*", lambda s: Answer(307, {"Location": f"{elsewhere.url}{s.path}"}))
        elsewhere.on(None, r".*", json_answer(200, {"token": "anon-token"}))
        _realm_registry(reg, f"{realm.url}/token")
        creds = docker_config(tmp_path, {reg.host: {"identitytoken": IDENTITY}})
        with client(reg.host, creds, tls=True) as c, pytest.raises(ProtocolError, match="carries a secret"):
            c.get_manifest("v1")
        assert elsewhere.seen() == [] and [s.method for s in realm.seen()] == ["POST"]


def test_a_token_response_over_1_mib_is_refused():
    with HostileServer() as reg, HostileServer() as realm:
        realm.on(None, r"/token.*", json_answer(200, {"token": "t", "padding": "x" * (2 << 20)}))
        _realm_registry(reg, f"{realm.url}/token")
        with client(reg.host) as c, pytest.raises(ProtocolError, match="the 1048576 byte limit"):
            c.get_manifest("v1")


@pytest.mark.parametrize("body, expected", [
    (b'{"token": "t"}', ("t", 60.0)),
    (b'{"access_token": "t", "expires_in": 300}', ("t", 300.0)),
    (b'{"token": "t", "access_token": "u", "expires_in": 1.5}', ("t", 1.5)),
    (b'{"token": "t", "expires_in": -5}', ("t", 0.0)),
    (b'{"token": "t", "expires_in": 1e308}', ("t", MAX_EXPIRES_IN)),
    (b'{"token": "t", "expires_in": 1000000000000000000000000000000}', ("t", MAX_EXPIRES_IN)),
    (b'{"token": "t", "expires_in": "300"}', "not a number"),
    (b'{"token": "t", "expires_in": true}', "not a number"),
    (b'{"token": "t", "expires_in": Infinity}', "not a finite number"),
    (b'{"token": "a b"}', "printable"),
    (b'{"token": "a\\r\\nX-Injected: 1"}', "printable"),
    (b'{"token": "' + b"x" * 40000 + b'"}', "printable"),
    (b'{"token": 5}', "printable"),
    (b'{"expires_in": 60}', "sent no token"),
    (b'["t"]', "not a JSON object"),
    (b"<html>", "not JSON"),
], ids=["default-expiry", "access-token", "token-wins", "negative", "huge-float", "huge-int", "string-expiry",
        "bool-expiry", "infinite-expiry", "space", "crlf", "too-long", "number", "missing", "array", "html"])
def test_token_responses_are_validated(body, expected):
    if isinstance(expected, tuple):
        assert parse_token_response(body, "token service t") == expected
    else:
        with pytest.raises(AuthError, match=expected):
            parse_token_response(body, "token service t")


# --- errors are types ----------------------------------------------------------------------------------------
def test_connection_refused_is_a_connect_error():
    port = free_port()
    with client(f"127.0.0.1:{port}") as c, pytest.raises(ConnectError) as e:
        c.head_manifest("v1")
    assert isinstance(e.value, TransientError)
    assert str(e.value).startswith(f"could not connect to registry 127.0.0.1:{port} (")


@pytest.mark.parametrize("content_range, size", [("bytes */123", 123), ("bytes */junk", None), (None, None)])
def test_416_is_range_not_satisfiable_with_the_size_the_server_states(content_range, size):
    with HostileServer() as reg:
        reg.on("GET", r"/v2/.*/blobs/.*", Answer(416, {"Content-Range": content_range} if content_range else {}))
        with client(reg.host) as c, pytest.raises(RangeNotSatisfiable) as e:
            c.open_blob(sha(BLOB), 500)
    assert e.value.blob_size == size and getattr(e.value, "blob_size", None) == size
    assert isinstance(e.value, TransientError)


@pytest.mark.parametrize("status, body, code", [
    (400, {"errors": [{"code": "DIGEST_INVALID", "message": "provided digest did not match uploaded content"}]},
     "DIGEST_INVALID"),
    (400, {"errors": [{"code": "MANIFEST_INVALID", "message": "manifest invalid"}]}, "MANIFEST_INVALID"),
    (405, {"errors": [{"code": "UNSUPPORTED"}]}, "UNSUPPORTED"),
    (400, {"errors": [{"code": "not/a code", "message": "m"}]}, None),
    (409, "not json", None),
], ids=["digest-invalid", "manifest-invalid", "unsupported", "junk-code", "no-json"])
def test_other_4xx_are_rejected_errors_with_their_distribution_code(status, body, code):
    with HostileServer() as reg:
        reg.on("PUT", r"/v2/.*/manifests/.*", Answer(status, {}, json.dumps(body).encode() if isinstance(body, dict)
                                                     else body.encode()))
        with client(reg.host) as c, pytest.raises(RejectedError) as e:
            c.put_manifest("v1", MANIFEST, OCI_MANIFEST)
    assert (e.value.status, e.value.code) == (status, code)
    assert not isinstance(e.value, (TransientError, AuthError, NotFoundError))


def test_push_reports_a_digest_refusal_by_its_code():
    """push.py branches on RejectedError.code, not on the words of the message."""
    from loader.push import Uploader, bytes_source

    with HostileServer() as reg:
        reg.on("POST", r"/v2/.*/blobs/uploads/", Answer(202, {"Location": f"/v2/{REPO}/blobs/uploads/u1"}))
        reg.on("PUT", r"/v2/.*/blobs/uploads/u1\?.*", error_answer(400, "DIGEST_INVALID", "no match"))
        with client(reg.host) as c, pytest.raises(RegistryError) as e:
            Uploader(c, chunk_size=0).ensure(sha(BLOB), len(BLOB), bytes_source(BLOB), "w.bin")
    assert "was it modified during the push?" in str(e.value)
    assert isinstance(e.value.__cause__, RejectedError) and e.value.__cause__.code == "DIGEST_INVALID"


@pytest.mark.parametrize("value, expected", [
    ("7", 7.0), ("0", 0.0), ("1.5", 1.5), ("99999999", 3600.0), ("nan", None), ("inf", None), ("-3", None),
    ("1e3", None), ("", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
])
def test_retry_after_is_parsed_and_bounded(value, expected):
    with HostileServer() as reg:
        reg.on(None, r".*", error_answer(503, "UNAVAILABLE", headers={"Retry-After": value}))
        with client(reg.host) as c, pytest.raises(TransientError) as e:
            c.get_manifest("v1")
    assert e.value.retry_after == expected


# --- bounds and headers parsed at the boundary ---------------------------------------------------------------
@pytest.mark.parametrize("headers, message", [
    ([(f"X-H{i}", "v") for i in range(150)], "more than 100 headers"),
    ([(f"X-H{i}", "v" * 2000) for i in range(40)], "bytes of headers, over the 65536 byte limit"),
    ([("X-Long", "v" * 70_000)], "over 64 KiB"),
], ids=["too-many", "too-large", "line-too-long"])
def test_header_bounds(headers, message):
    with HostileServer() as reg:
        reg.on(None, r".*", Answer(200, headers, MANIFEST))
        with client(reg.host) as c, pytest.raises(ProtocolError, match=message):
            c.get_manifest("v1")


def test_error_bodies_are_read_to_4_kib_and_quoted_briefly():
    with HostileServer() as reg:
        reg.on(None, rf"/v2/{REPO}/manifests/huge", Answer(400, {}, b'{"errors": [' + b" " * (8 << 20) + b"]}"))
        reg.on(None, rf"/v2/{REPO}/manifests/long", error_answer(400, "MANIFEST_INVALID", "m" * 3000))
        with client(reg.host) as c:
            with pytest.raises(RejectedError) as e:
                c.get_manifest("huge")
            assert e.value.code is None and len(str(e.value)) < 300
            with pytest.raises(RejectedError) as e:
                c.get_manifest("long")
            assert e.value.code == "MANIFEST_INVALID" and "m" * 200 in str(e.value) and "m" * 201 not in str(e.value)


@pytest.mark.parametrize("framing", [True, False], ids=["content-length", "close-delimited"])
def test_a_manifest_over_the_limit_is_refused(framing):
    body = b"{" + b" " * MAX_MANIFEST_BYTES + b"}"
    with HostileServer() as reg:
        reg.on(None, r".*", Answer(200, {"Content-Type": OCI_MANIFEST}, body, content_length=framing))
        with client(reg.host) as c, pytest.raises(ProtocolError, match=f"the {MAX_MANIFEST_BYTES} byte limit"):
            c.get_manifest("v1")


@pytest.mark.parametrize("value", ["sha256:" + "../" * 21 + "x", "sha512:" + "a" * 128, "sha256:" + "A" * 64,
                                   "sha256:abc", ""], ids=["traversal", "sha512", "uppercase", "short", "empty"])
@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_a_malformed_docker_content_digest_is_refused_not_used(value, method):
    with HostileServer() as reg:
        reg.on(None, r".*", Answer(200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": value}, MANIFEST))
        with client(reg.host) as c, pytest.raises(InvalidDigest) as e:
            c.head_manifest("v1") if method == "HEAD" else c.get_manifest("v1")
    assert f"registry {reg.host} header Docker-Content-Digest" in str(e.value)


def test_a_docker_content_digest_that_contradicts_the_request_or_the_bytes_is_refused():
    other = sha(b"other")
    with HostileServer() as reg:
        reg.on(None, r".*", Answer(200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": other}, MANIFEST))
        with client(reg.host) as c:
            with pytest.raises(ProtocolError, match="claims to hold other content"):
                c.head_manifest(sha(MANIFEST))  # HEAD by digest answered with another digest
            assert c.head_manifest("v1").digest == other  # by tag, the header is what a HEAD can know
            with pytest.raises(ProtocolError, match="under Docker-Content-Digest"):
                c.get_manifest("v1")


@pytest.mark.parametrize("value", ["-1", "abc", "5, 6", "+5", "1" * 25])
def test_a_malformed_content_length_is_refused(value):
    with HostileServer() as reg:
        reg.on("HEAD", r"/v2/.*/blobs/.*", Answer(200, [("Content-Length", value)]))
        with client(reg.host) as c, pytest.raises(ProtocolError, match="not a non-negative integer"):
            c.blob_size(sha(BLOB))


@pytest.mark.parametrize("content_range, body, error", [
    ("bytes 0-99/50", b"x" * 100, ProtocolError),
    ("bytes 10-5/100", b"x" * 6, ProtocolError),
    ("bytes x-y/z", b"x", ProtocolError),
    ("items 0-9/10", b"x" * 10, ProtocolError),
    ("bytes 0-99/1000", b"x" * 10, ProtocolError),  # the body is not the range it claims
    ("bytes 0-9/1000", b"x" * 10, TransientError),  # another range than asked: worth asking again
], ids=["past-total", "backwards", "junk", "unit", "short-body", "wrong-start"])
def test_content_range_is_checked(content_range, body, error):
    with HostileServer() as reg:
        reg.on("GET", r"/v2/.*/blobs/.*", Answer(206, {"Content-Range": content_range}, body))
        with client(reg.host) as c, pytest.raises(error):
            c.open_blob(sha(BLOB), 100 if error is TransientError else 0, 199)


def test_a_real_registry_answers_honestly_through_every_check(registry, pusher):
    """The honest path on a real Distribution: HEAD, GET by tag and digest, a ranged and a whole blob."""
    data = os.urandom(50_000)
    d = pusher.push_artifact("hostile/honest", "v1", [file_layer("w", data)])
    with client(registry.host, ref=f"{registry.host}/hostile/honest:v1") as c:
        head = c.head_manifest("v1")
        assert head.digest == d and head.data is None and head.size > 0
        m = c.get_manifest(d)
        assert m.digest == d and m.media_type == OCI_MANIFEST
        layer = m.json()["layers"][0]
        with c.open_blob(layer["digest"], 100, 199, size=len(data)) as body:
            buf = bytearray(100)
            assert (body.start, body.total, body.readinto(buf), bytes(buf)) == (100, len(data), 100, data[100:200])
        assert read_blob(c, layer["digest"], len(data)) == data
        assert c.blob_size(layer["digest"]) == len(data) and c.blob_size(sha(b"absent")) is None
