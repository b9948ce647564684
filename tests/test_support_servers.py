"""Self-tests of the test servers: the fault proxy, the token issuer and the registries with auth.

Everything runs against the real docker-registry. Clients here are deliberately independent of the loader
(requests, or a raw socket where the exact bytes before a cut matter)."""

from __future__ import annotations

import base64
import json
import random
import socket
import threading

import pytest
import requests

from tests.support.auth_registry import AuthRegistry, session_for, start_htpasswd_registry, start_token_registry
from tests.support.faultproxy import FaultProxy, RequestRecord
from tests.support.oci import OCI_MANIFEST, Pusher, file_layer, sha256

BLOB = bytes(random.Random(1).getrandbits(8) for _ in range(300_000))
OTHER = bytes(random.Random(2).getrandbits(8) for _ in range(100_000))
REPO = "support/proxy"


@pytest.fixture(scope="module")
def artifact(registry, pusher):
    digest = pusher.push_artifact(REPO, "v1", [file_layer("w.bin", BLOB), file_layer("x.bin", OTHER)])
    return {"manifest": digest, "blob": sha256(BLOB), "other": sha256(OTHER)}


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.url, seed=7) as p:
        yield p


def raw_get(port: int, path: str, headers: dict | None = None, method: str = "GET"):
    """One request over a raw socket; reads until EOF or reset. Returns (status, headers, body, ending)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    buf, ending = b"", "eof"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            while chunk := s.recv(1 << 16):
                buf += chunk
        except ConnectionResetError:
            ending = "reset"
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), hdrs, body, ending


def blob_path(digest: str) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


# --- fault proxy: faithful pass-through ------------------------------------------------------------------------------
PASSTHROUGH_HEADERS = ("content-length", "content-range", "content-type", "docker-content-digest", "accept-ranges")


@pytest.mark.parametrize(
    "method, what, headers",
    [
        ("GET", "manifest", {"Accept": OCI_MANIFEST}),
        ("HEAD", "manifest", {"Accept": OCI_MANIFEST}),
        ("GET", "blob", {}),
        ("HEAD", "blob", {}),
        ("GET", "blob", {"Range": "bytes=1000-1999"}),
        ("GET", "blob", {"Range": "bytes=299000-"}),
        ("GET", "blob", {"Range": "bytes=-10"}),
        ("GET", "blob", {"Range": "bytes=400000-"}),
        ("GET", "missing", {}),
    ],
    ids=["manifest", "manifest-head", "blob", "blob-head", "range", "open-range", "suffix-range",
         "range-416", "missing-404"],
)
def test_proxy_passes_through(registry, artifact, proxy, method, what, headers):
    path = {
        "manifest": f"/v2/{REPO}/manifests/v1",
        "blob": blob_path(artifact["blob"]),
        "missing": blob_path("sha256:" + "0" * 64),
    }[what]
    direct = raw_get(registry.port, path, headers, method)
    via = raw_get(proxy.port, path, headers, method)
    assert (via[0], via[2], via[3]) == (direct[0], direct[2], direct[3])
    assert {k: via[1].get(k) for k in PASSTHROUGH_HEADERS} == {k: direct[1].get(k) for k in PASSTHROUGH_HEADERS}
    assert proxy.requests == [RequestRecord(method, path, headers.get("Range"), direct[0], len(direct[2]))]
    assert proxy.total_bytes == len(direct[2])
    expected_blob = {artifact["blob"]: len(direct[2])} if (what == "blob" and method == "GET" and direct[0] < 300) else {}
    assert dict(proxy.bytes_by_digest) == expected_blob
    assert proxy.errors == []


def test_push_and_pull_through_proxy(proxy):
    """Uploads (POST, PATCH-less monolithic PUT with a Location that must point back at the proxy) pass too."""
    data = b"pushed through the proxy"
    digest = Pusher(proxy.url).push_artifact("support/pushed", "v1", [file_layer("a.txt", data)])
    manifest = json.loads(Pusher(proxy.url).manifest_bytes("support/pushed", "v1"))
    assert sha256(json.dumps(manifest, separators=(",", ":")).encode()) == digest
    assert requests.get(f"{proxy.url}/v2/support/pushed/blobs/{sha256(data)}").content == data
    assert [r.method for r in proxy.requests if "/uploads/" in r.path][:2] == ["POST", "PUT"]
    assert proxy.errors == []


# --- fault proxy: faults ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style, ending", [("rst", "reset"), ("fin", "eof")])
def test_reset_first_k_blob_responses(artifact, proxy, style, ending):
    proxy.set_faults(reset_after_bytes=100_000, reset_count=2, reset_style=style)
    manifest = raw_get(proxy.port, f"/v2/{REPO}/manifests/v1", {"Accept": OCI_MANIFEST})
    results = [raw_get(proxy.port, blob_path(artifact["blob"])) for _ in range(3)]
    assert manifest[0] == 200 and manifest[3] == "eof"  # manifests are never touched
    assert [(r[0], r[2], r[3]) for r in results] == [
        (200, BLOB[:100_000], ending),
        (200, BLOB[:100_000], ending),
        (200, BLOB, "eof"),
    ]
    assert [(r.body_bytes, r.fault) for r in proxy.blob_requests()] == [
        (100_000, "reset"), (100_000, "reset"), (300_000, None)
    ]
    assert dict(proxy.bytes_by_digest) == {artifact["blob"]: 500_000}
    assert proxy.total_blob_bytes == 500_000
    assert dict(proxy.faults_injected) == {"reset": 2}


def test_reset_then_resume_with_range(artifact, proxy):
    proxy.set_faults(reset_after_bytes=120_000, reset_count=1)
    first = raw_get(proxy.port, blob_path(artifact["blob"]))
    rest = raw_get(proxy.port, blob_path(artifact["blob"]), {"Range": f"bytes={len(first[2])}-"})
    assert (first[3], rest[0], rest[1]["content-range"]) == ("reset", 206, "bytes 120000-299999/300000")
    assert first[2] + rest[2] == BLOB
    assert proxy.total_blob_bytes == len(BLOB)


def test_reset_with_probability_is_seeded(artifact, proxy):
    proxy.set_faults(reset_after_bytes=0, reset_probability=0.5)
    results = [raw_get(proxy.port, blob_path(artifact["other"]))[2] for _ in range(12)]
    rng = random.Random(7)
    expected = [b"" if rng.random() < 0.5 else OTHER for _ in range(12)]
    assert results == expected
    assert proxy.faults_injected["reset"] == expected.count(b"")


@pytest.mark.parametrize(
    "flip_digest, once, rng_header, expected_flips",
    [
        (None, False, None, [True, True]),
        ("blob", True, None, [True, False]),
        ("blob", False, "bytes=5000-5999", [True, True]),
        ("blob", False, "bytes=6000-6999", [False, False]),
        ("other", False, None, [False, False]),
    ],
    ids=["any-blob", "once", "inside-range", "outside-range", "other-digest"],
)
def test_flip_byte(artifact, proxy, flip_digest, once, rng_header, expected_flips):
    proxy.set_faults(flip_byte_at=5500, flip_digest=artifact.get(flip_digest), flip_once=once)
    headers = {"Range": rng_header} if rng_header else {}
    start = int(rng_header.split("=")[1].split("-")[0]) if rng_header else 0
    want = BLOB[start:start + 1000] if rng_header else BLOB
    bodies = [raw_get(proxy.port, blob_path(artifact["blob"]), headers)[2] for _ in range(2)]
    flipped = bytearray(want)
    if start <= 5500 < start + len(want):
        flipped[5500 - start] ^= 0xFF
    assert bodies == [bytes(flipped) if f else want for f in expected_flips]
    assert [r.fault for r in proxy.blob_requests()] == ["flip" if f else None for f in expected_flips]


@pytest.mark.parametrize("match, hits", [("", [503, 503, 200, 200]), ("/blobs/", [200, 503, 503, 200])])
def test_status_503(artifact, proxy, match, hits):
    proxy.set_faults(status_503=2, status_503_match=match)
    paths = [f"/v2/{REPO}/manifests/v1", blob_path(artifact["blob"]), blob_path(artifact["blob"]),
             blob_path(artifact["blob"])]
    results = [raw_get(proxy.port, p, {"Accept": OCI_MANIFEST}) for p in paths]
    assert [r[0] for r in results] == hits
    assert all(r[1]["retry-after"] == "1" for r in results if r[0] == 503)
    assert all("retry-after" not in r[1] for r in results if r[0] == 200)
    assert [r.fault for r in proxy.requests] == ["503" if h == 503 else None for h in hits]


def test_stall_then_cut(artifact, proxy):
    proxy.set_faults(stall_after_bytes=50_000, stall_seconds=0.2, stall_count=1)
    stalled = raw_get(proxy.port, blob_path(artifact["blob"]))
    after = raw_get(proxy.port, blob_path(artifact["blob"]))
    assert (stalled[0], stalled[2], stalled[3]) == (200, BLOB[:50_000], "eof")
    assert (after[2], [r.fault for r in proxy.blob_requests()]) == (BLOB, ["stall", None])


def test_client_sees_stall_and_stop_ends_it(registry, artifact):
    """A long stall: the client's read times out (its own timeout, not a timed assertion), and stop() returns
    promptly instead of waiting the stall out."""
    p = FaultProxy(registry.url).start()
    try:
        p.set_faults(stall_after_bytes=10_000, stall_seconds=3600)
        with socket.create_connection(("127.0.0.1", p.port), timeout=60) as s:
            s.sendall(f"GET {blob_path(artifact['blob'])} HTTP/1.1\r\nHost: {p.host}\r\n\r\n".encode())
            buf = b""
            while b"\r\n\r\n" not in buf or len(buf.partition(b"\r\n\r\n")[2]) < 10_000:
                buf += s.recv(1 << 16)
            s.settimeout(0.3)
            with pytest.raises(TimeoutError):
                s.recv(1)
            stopper = threading.Thread(target=p.stop)
            stopper.start()
            s.settimeout(60)
            assert s.recv(1) == b""  # the stall ended in a cut once the proxy stopped
            stopper.join()
        assert buf.partition(b"\r\n\r\n")[2] == BLOB[:10_000]
    finally:
        p.stop()


def test_counters_reset(artifact, proxy):
    raw_get(proxy.port, blob_path(artifact["other"]), {"Range": "bytes=0-99"})
    assert (proxy.total_blob_bytes, len(proxy.requests)) == (100, 1)
    proxy.reset_counters()
    assert (proxy.total_blob_bytes, proxy.total_bytes, proxy.requests, dict(proxy.faults_injected)) == (0, 0, [], {})


def test_upstream_down_is_502(fresh_registry):
    with FaultProxy(fresh_registry.url) as p:
        fresh_registry.stop()
        status, _, body, _ = raw_get(p.port, "/v2/")
        assert (status, body.startswith(b"FaultProxy: upstream failed:")) == (502, True)
        assert [r.fault for r in p.requests] == ["upstream-error"]


# --- htpasswd registry ----------------------------------------------------------------------------------------------
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def push_and_pull(reg: AuthRegistry, session: requests.Session, repo: str) -> None:
    data = f"weights for {repo}".encode()
    pusher = Pusher(reg.url, session=session)
    digest = pusher.push_artifact(repo, "v1", [file_layer("w.bin", data)])
    assert sha256(pusher.manifest_bytes(repo, "v1")) == digest
    assert session.get(f"{reg.url}/v2/{repo}/blobs/{sha256(data)}").content == data


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_htpasswd_registry(tls):
    with start_htpasswd_registry(USERS, tls=tls) as reg:
        assert reg.url == f"{'https' if tls else 'http'}://{reg.host}"
        anon = session_for(reg).get(f"{reg.url}/v2/")
        wrong = session_for(reg, ("alice", "nope")).get(f"{reg.url}/v2/")
        assert (anon.status_code, anon.headers["WWW-Authenticate"]) == (401, 'Basic realm="model-cache-test"')
        assert wrong.status_code == 401
        push_and_pull(reg, session_for(reg, ("alice", "alice-pw")), "private/model")
        if tls:
            with pytest.raises(requests.exceptions.SSLError):
                requests.get(f"{reg.url}/v2/")  # the system trust store does not know the test CA


# --- token registry -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["ES256", "RS256"])
def token_registry(request):
    with start_token_registry(USERS, public_repos={"public/model"}, acl=None, algorithm=request.param) as reg:
        yield reg


def get_token(reg: AuthRegistry, scopes: list[str], auth=None, **params) -> requests.Response:
    ts = reg.token_server
    return requests.get(ts.realm, params={"service": ts.service, "scope": scopes, **params}, auth=auth)


def test_token_registry_challenges(token_registry):
    reg, ts = token_registry, token_registry.token_server
    root = requests.get(f"{reg.url}/v2/")
    repo = requests.get(f"{reg.url}/v2/private/model/manifests/v1")
    assert (root.status_code, root.headers["WWW-Authenticate"]) == (
        401, f'Bearer realm="{ts.realm}",service="{ts.service}"'
    )
    assert (repo.status_code, repo.headers["WWW-Authenticate"]) == (
        401, f'Bearer realm="{ts.realm}",service="{ts.service}",scope="repository:private/model:pull"'
    )


def test_token_push_pull_and_scope(token_registry):
    reg, ts = token_registry, token_registry.token_server
    before = ts.tokens_issued
    r = get_token(reg, ["repository:private/a:pull,push"], ("alice", "alice-pw"))
    body = r.json()
    assert (r.status_code, sorted(body), body["token"] == body["access_token"], body["expires_in"]) == (
        200, ["access_token", "expires_in", "issued_at", "token"], True, 300
    )
    session = session_for(reg, bearer=body["token"])
    push_and_pull(reg, session, "private/a")
    # the same token does not open another repository
    other = session.get(f"{reg.url}/v2/private/b/manifests/v1")
    assert (other.status_code, other.headers["WWW-Authenticate"]) == (
        401,
        f'Bearer realm="{ts.realm}",service="{ts.service}",scope="repository:private/b:pull",'
        'error="insufficient_scope"',
    )
    assert ts.tokens_issued == before + 1
    assert ts.issued[-1].subject == "alice" and ts.issued[-1].access == (("private/a", ("pull", "push")),)


def test_token_anonymous_pull_of_public_repo_only(token_registry):
    reg, ts = token_registry, token_registry.token_server
    admin = session_for(reg, bearer=get_token(reg, ["repository:public/model:pull,push"], ("bob", "bob-pw")).json()["token"])
    data = b"public weights"
    Pusher(reg.url, session=admin).push_artifact("public/model", "v1", [file_layer("p.bin", data)])
    anon = get_token(reg, ["repository:public/model:pull,push", "repository:private/a:pull"])
    assert anon.status_code == 200
    assert ts.issued[-1].access == (("public/model", ("pull",)), ("private/a", ()))
    s = session_for(reg, bearer=anon.json()["token"])
    assert s.get(f"{reg.url}/v2/public/model/blobs/{sha256(data)}").content == data
    assert s.get(f"{reg.url}/v2/private/a/manifests/v1").status_code == 401
    assert s.post(f"{reg.url}/v2/public/model/blobs/uploads/").status_code == 401  # pull only


def test_token_bad_credentials_refused(token_registry):
    ts = token_registry.token_server
    before_refused, before_issued = ts.refused, ts.tokens_issued
    r = get_token(token_registry, ["repository:private/a:pull"], ("alice", "wrong"))
    assert (r.status_code, ts.refused, ts.tokens_issued) == (401, before_refused + 1, before_issued)


def test_token_expired_is_refused_by_registry(token_registry):
    reg, ts = token_registry, token_registry.token_server
    scope = ["repository:private/expiry:pull,push"]
    push_and_pull(reg, session_for(reg, bearer=get_token(reg, scope, ("alice", "alice-pw")).json()["token"]),
                  "private/expiry")
    ts.issue_expired = 1
    stale = get_token(reg, scope, ("alice", "alice-pw")).json()["token"]
    fresh = get_token(reg, scope, ("alice", "alice-pw")).json()["token"]
    r = session_for(reg, bearer=stale).get(f"{reg.url}/v2/private/expiry/tags/list")
    assert (r.status_code, r.headers["WWW-Authenticate"]) == (
        401,
        f'Bearer realm="{ts.realm}",service="{ts.service}",scope="repository:private/expiry:pull",'
        'error="invalid_token"',
    )
    r = session_for(reg, bearer=fresh).get(f"{reg.url}/v2/private/expiry/tags/list")
    assert (r.status_code, r.json()) == (200, {"name": "private/expiry", "tags": ["v1"]})
    assert [t.expired for t in ts.issued[-2:]] == [True, False]


def test_token_short_expires_in_is_reported(token_registry):
    ts = token_registry.token_server
    ts.expires_in = 2
    try:
        assert get_token(token_registry, [], ("alice", "alice-pw")).json()["expires_in"] == 2
    finally:
        ts.expires_in = 300


def test_token_oauth_post_flows(token_registry):
    """Docker's identity-token flow: password grant returns a refresh token, which later buys access tokens."""
    ts = token_registry.token_server
    pw = requests.post(ts.realm, data={"grant_type": "password", "username": "alice", "password": "alice-pw",
                                       "service": ts.service, "client_id": "test", "access_type": "offline",
                                       "scope": "repository:private/a:pull"})
    refresh = pw.json()["refresh_token"]
    by_refresh = requests.post(ts.realm, data={"grant_type": "refresh_token", "refresh_token": refresh,
                                               "service": ts.service, "client_id": "test",
                                               "scope": "repository:private/a:pull"})
    bad = requests.post(ts.realm, data={"grant_type": "refresh_token", "refresh_token": "nope",
                                        "service": ts.service, "scope": "repository:private/a:pull"})
    assert (pw.status_code, by_refresh.status_code, bad.status_code) == (200, 200, 401)
    assert "refresh_token" not in by_refresh.json()
    assert [(t.grant, t.subject, t.access) for t in ts.issued[-2:]] == [
        ("password", "alice", (("private/a", ("pull",)),)),
        ("refresh_token", "alice", (("private/a", ("pull",)),)),
    ]
    # a test can register an identity token directly, as a docker config's "identitytoken" would carry it
    ts.refresh_tokens["preset-identity"] = "bob"
    r = requests.post(ts.realm, data={"grant_type": "refresh_token", "refresh_token": "preset-identity",
                                      "service": ts.service, "scope": "repository:private/a:pull"})
    assert (r.status_code, ts.issued[-1].subject) == (200, "bob")


def test_token_acl_limits_actions():
    with start_token_registry(USERS, acl={"alice": {"team/m": ["pull"]}, "bob": {"*": ["pull", "push"]}}) as reg:
        ts = reg.token_server
        bob = session_for(reg, bearer=get_token(reg, ["repository:team/m:pull,push"], ("bob", "bob-pw")).json()["token"])
        Pusher(reg.url, session=bob).push_artifact("team/m", "v1", [file_layer("t.bin", b"team")])
        alice_token = get_token(reg, ["repository:team/m:pull,push"], ("alice", "alice-pw")).json()["token"]
        assert ts.issued[-1].access == (("team/m", ("pull",)),)
        alice = session_for(reg, bearer=alice_token)
        assert alice.get(f"{reg.url}/v2/team/m/blobs/{sha256(b'team')}").content == b"team"
        assert alice.post(f"{reg.url}/v2/team/m/blobs/uploads/").status_code == 401


def test_token_registry_over_tls():
    with start_token_registry(USERS, tls=True) as reg:
        token = get_token(reg, ["repository:private/tls:pull,push"], ("alice", "alice-pw")).json()["token"]
        push_and_pull(reg, session_for(reg, bearer=token), "private/tls")


def test_token_jwt_header_carries_x5c(token_registry):
    token = get_token(token_registry, [], ("alice", "alice-pw")).json()["token"]
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=" * (-len(token.split(".")[1]) % 4)))
    assert (sorted(header), header["alg"] in ("ES256", "RS256"), len(header["x5c"])) == (["alg", "typ", "x5c"], True, 1)
    assert (claims["iss"], claims["aud"], claims["sub"], claims["access"]) == (
        token_registry.token_server.issuer, token_registry.token_server.service, "alice", []
    )
