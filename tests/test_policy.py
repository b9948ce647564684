"""The pure decisions under the loader: digests, descriptors and manifests as parsed at the boundary, the retry
policy's arithmetic, and the shared cache's access rule. No network, no disk: values in, values or errors out."""

from __future__ import annotations

import json
import random

import pytest

from loader import oci
from loader.access import ANONYMOUS, Source, add_source, hit_proof, identity_of, may_fall_back, sources_of
from loader.credentials import Credentials
from loader.digest import Digest, InvalidDigest
from loader.errors import ArtifactError, DeadlineExceeded, NetworkError, TransientError
from loader.reference import parse
from loader.retry import Attempts, Deadline, RateWatch, RetryPolicy

HEX = "ab" * 32
D = f"sha256:{HEX}"


# ---- digests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    "sha256:" + "../../refs/x/" + "a" * 51, "sha256:" + "/" * 64, "sha256:" + "A" * 64, "sha256:" + "a" * 63,
    "sha256:" + "a" * 65, "sha512:" + "a" * 64, "sha256:" + "a" * 64 + "\n", " sha256:" + "a" * 64, 7, None,
    ["sha256:" + "a" * 64],
], ids=["dotdot", "slashes", "upper", "short", "long", "sha512", "newline", "space", "int", "none", "list"])
def test_anything_but_sha256_and_64_lowercase_hex_is_refused_naming_where(value):
    with pytest.raises(InvalidDigest) as e:
        Digest.parse(value, "manifest m layer 3")
    assert e.value.exit_code == 8 and str(e.value).startswith("manifest m layer 3: digest ")


def test_a_digest_is_its_text():
    d = Digest.parse(D, "x")
    assert (d, d.hex, d.short, Digest(d) is d) == (D, HEX, D[:19], True)
    assert Digest.of(b"") == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert json.dumps({"d": d}) == json.dumps({"d": D})


# ---- descriptors and manifests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("desc,fragment", [
    ({"digest": D, "size": -1}, "has size -1"),
    ({"digest": D, "size": True}, "has size True"),
    ({"digest": D, "size": "10"}, "has size '10'"),
    ({"digest": D, "size": 1 << 60}, "has size"),
    ({"digest": D, "size": 1, "mediaType": 5}, "mediaType 5"),
    ({"digest": D, "size": 1, "annotations": {"a": 1}}, "not a string map"),
    ({"digest": D, "size": 1, "platform": "linux"}, "platform that is not an object"),
    ({"digest": "v1", "size": 1}, "digest 'v1'"),
    ("sha256:" + HEX, "must be a JSON object"),
], ids=["negative", "bool", "string", "huge", "media-type", "annotations", "platform", "tag", "not-object"])
def test_bad_descriptors_are_refused_naming_the_field(desc, fragment):
    with pytest.raises(ArtifactError) as e:
        oci.Descriptor.parse(desc, "index i entry 0")
    assert e.value.exit_code == 8 and fragment in str(e.value) and str(e.value).startswith("index i entry 0")


def _index(children: list[dict]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": children}).encode()


def test_an_index_names_its_children_by_digest_only():
    with pytest.raises(ArtifactError) as e:
        oci.parse_manifest(_index([{"mediaType": oci.OCI_MANIFEST, "digest": "latest", "size": 3}]), Digest(D),
                           "", "r.io/m:v1")
    assert "'latest'" in str(e.value) and "index sha256:abab" in str(e.value)


def test_manifests_are_bounded():
    layers = [{"digest": D, "size": 1}] * (oci.MAX_LAYERS + 1)
    with pytest.raises(ArtifactError, match="10001 layers, over 10000"):
        oci.parse_manifest(json.dumps({"layers": layers}, separators=(",", ":")).encode(), Digest(D), oci.OCI_MANIFEST,
                           "m")
    with pytest.raises(ArtifactError, match="over the 4194304 byte limit"):
        oci.parse_manifest(b" " * (oci.MAX_MANIFEST_BYTES + 1), Digest(D), oci.OCI_MANIFEST, "m")


def test_closure_walks_children_first_once_and_refuses_deep_nesting():
    leaf = json.dumps({"layers": [{"digest": D, "size": 5}],
                       "config": {"digest": "sha256:" + "cd" * 32, "size": 2}}).encode()
    leaf_d = Digest.of(leaf)
    idx = _index([{"digest": leaf_d, "size": len(leaf)}, {"digest": leaf_d, "size": len(leaf)}])
    idx_d = Digest.of(idx)
    store = {leaf_d: leaf}

    def child(d):
        return store[d.digest], oci.parse_manifest(store[d.digest], d.digest, oci.OCI_MANIFEST, "t")

    manifests, blobs = oci.closure(idx, oci.parse_manifest(idx, idx_d, "", "t"), child, "t")
    assert [m[0] for m in manifests] == [leaf_d, idx_d]
    assert blobs == {"sha256:" + "cd" * 32: 2, D: 5}

    # a chain of indexes deeper than the bound
    chain = leaf
    for _ in range(oci.MAX_INDEX_DEPTH + 1):
        d = Digest.of(chain)
        store[d] = chain
        chain = _index([{"digest": d, "size": len(chain)}])

    def any_child(d):
        data = store[d.digest]
        return data, oci.parse_manifest(data, d.digest, "", "t")

    with pytest.raises(ArtifactError, match="nested deeper"):
        oci.closure(chain, oci.parse_manifest(chain, Digest.of(chain), "", "t"), any_child, "t")


# ---- the retry policy -----------------------------------------------------------------------------------------------
POLICY = RetryPolicy(attempts=3, base_delay=1.0, max_delay=8.0, max_retry_after=30.0, progress_bytes=1000,
                     min_rate=100.0, rate_window=10.0)


def test_retry_after_is_honoured_up_to_its_cap_and_backoff_is_jittered_within_bounds():
    assert POLICY.delay(1, 5.0) == 5.0 and POLICY.delay(1, 3600.0) == 30.0 and POLICY.delay(1, -3.0) == 0.0
    rng = random.Random(1)
    for tries, top in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        d = POLICY.delay(tries, None, rng)
        assert top / 2 <= d <= top


def test_a_trickle_does_not_reset_the_attempts_but_real_progress_does():
    a = Attempts(POLICY, "blob b")
    exc = TransientError("dropped")
    a.failed(exc, progressed=999)
    a.failed(exc, progressed=999)
    with pytest.raises(NetworkError, match="after 3 failed attempts without progress"):
        a.failed(exc, progressed=999)
    b = Attempts(POLICY, "blob b")
    for _ in range(10):
        b.failed(exc, progressed=1000)  # each try moved a real amount: never gives up on attempts
    assert b.tries == 1


def test_a_wait_that_would_cross_the_deadline_is_not_started():
    a = Attempts(POLICY, "blob b", Deadline(at=100.0, what="the pull of r"), hint="Kept for the next pull.")
    assert a.failed(TransientError("x", retry_after=5.0), now=90.0) == 5.0
    with pytest.raises(DeadlineExceeded) as e:
        a.failed(TransientError("x", retry_after=20.0), now=90.0)
    assert "the deadline of the pull of r" in str(e.value) and str(e.value).endswith("Kept for the next pull.")
    with pytest.raises(DeadlineExceeded):
        Deadline(at=100.0, what="w").check(now=100.0)


def test_the_minimum_rate_is_judged_over_a_whole_window():
    w = RateWatch(POLICY, "blob b from r", now=0.0)
    w.add(10, now=5.0)  # slow, but the window is not over
    with pytest.raises(TransientError, match="trickling at 1 B/s"):
        w.add(1, now=11.0)
    ok = RateWatch(POLICY, "blob b", now=0.0)
    ok.add(1001, now=10.0)  # 100 B/s over 10 s: fine, a new window starts
    ok.add(2000, now=19.0)


# ---- the access rule ----------------------------------------------------------------------------------------------
REF = parse("registry.example.com/team-a/model:v1")
CREDS_A = Credentials(username="a", password="secret-a")


def test_an_identity_is_a_fingerprint_not_the_secret():
    ident = identity_of(REF.registry, CREDS_A)
    assert ident.startswith("pbkdf2:") and "secret-a" not in ident
    assert identity_of(REF.registry, CREDS_A) == ident
    assert identity_of("other.example.com", CREDS_A) != ident
    assert identity_of(REF.registry, Credentials(username="b", password="secret-a")) != ident
    assert identity_of(REF.registry, Credentials(username="a", password="other")) != ident
    assert identity_of(REF.registry, None) == ANONYMOUS == identity_of(REF.registry, Credentials(username="a"))


SRC_A = Source("registry.example.com", "team-a/model", identity_of("registry.example.com", CREDS_A), tls=True)


@pytest.mark.parametrize("sources,ref,tls,want", [
    ([SRC_A], REF, True, "manifest"),
    ([SRC_A], REF, False, "possession"),
    ([Source(SRC_A.registry, SRC_A.repository, SRC_A.identity, tls=False)], REF, True, "possession"),
    ([SRC_A], parse("registry.example.com/team-b/model:v1"), True, "possession"),
    ([SRC_A], parse("evil.example.com/team-a/model:v1"), True, "possession"),
    ([], REF, True, "possession"),
], ids=["same-source-tls", "pod-without-tls", "recorded-without-tls", "other-repository", "other-registry", "none"])
def test_what_a_hit_must_prove(sources, ref, tls, want):
    assert hit_proof(sources, ref, tls) == want


@pytest.mark.parametrize("sources,ref,identity,want", [
    ([SRC_A], REF, SRC_A.identity, True),
    ([SRC_A], REF, ANONYMOUS, False),
    ([SRC_A], REF, identity_of(REF.registry, Credentials(username="a", password="guess")), False),
    ([SRC_A], parse("dead.example.com/team-a/model:v1"), SRC_A.identity, False),
    ([Source(REF.registry, REF.repository, ANONYMOUS, tls=True)], REF, ANONYMOUS, True),
    ([Source(REF.registry, REF.repository, ANONYMOUS, tls=True)], REF, SRC_A.identity, True),
    ([Source(REF.registry, REF.repository, ANONYMOUS, tls=True)], parse("dead.example.com/x/y:v1"), ANONYMOUS,
     False),
    ([Source(REF.registry, REF.repository, ANONYMOUS, tls=False)], REF, ANONYMOUS, False),
    ([Source(REF.registry, REF.repository, SRC_A.identity, tls=False)], REF, SRC_A.identity, True),
], ids=["same-identity", "anonymous-for-private", "wrong-password", "other-registry", "public", "public-with-creds",
        "public-elsewhere", "anonymous-over-plain-http", "own-identity-over-plain-http"])
def test_who_gets_the_cached_copy_during_an_outage(sources, ref, identity, want):
    assert may_fall_back(sources, ref, identity) is want


def test_the_first_sources_are_never_pushed_out():
    meta: dict = {}
    first = [Source("r.example.com", f"first{i}", ANONYMOUS, tls=True) for i in range(16)]
    for s in first:
        add_source(meta, s)
    for i in range(500):
        add_source(meta, Source("evil.example.com", f"m{i}", ANONYMOUS, tls=True))
    kept = sources_of(meta)
    assert kept[:16] == first and len(kept) == 64 and kept[-1].repository == "m499"


def test_a_mirror_with_credentials_is_not_anonymous():
    from loader.access import identity_via_mirrors

    assert identity_via_mirrors(["http://mirror:5000"], None) == ANONYMOUS
    with_pw = identity_via_mirrors(["http://agent:secret@mirror:5000"], None)
    assert with_pw.startswith("pbkdf2:") and "secret" not in with_pw
    by_config = identity_via_mirrors(["http://mirror:5000"],
                                     lambda host: CREDS_A if host == "mirror:5000" else None)
    assert by_config.startswith("pbkdf2:") and by_config != with_pw


def test_sources_are_recorded_once_and_bounded_and_junk_is_ignored():
    meta: dict = {"sources": [{"registry": 1}, "junk"]}
    add_source(meta, SRC_A)
    add_source(meta, SRC_A)
    assert sources_of(meta) == [SRC_A]
    for i in range(100):
        add_source(meta, Source("r.example.com", f"repo{i}", ANONYMOUS, tls=True))
    assert len(meta["sources"]) == 64 and sources_of(meta)[-1].repository == "repo99"
