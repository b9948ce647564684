"""Signed models only (issue 13), against the real registry: cosign key signatures at the tag scheme and as OCI 1.1
referrers (through a referrers API of our own in front of Distribution 2.8, which has none, and through the
fallback tag), made in the tests by ``model-loader sign`` or by hand; what is refused, with which exit code and
message, and that a refusal leaves the cache and a sentinel directory exactly as they were."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from loader import contract, signing
from loader.cache import Cache
from loader.cli import main
from loader.digest import Digest
from loader.errors import ArtifactError, UsageError
from tests.support.fake_sigstore import FakeSigstore
from tests.support.files import snapshot, tree
from tests.support.oci import OCI_MANIFEST, Pusher, file_layer
from tests.support.referrers_proxy import ReferrersProxy
from tests.support.signing_fixtures import Key

FILES = {"model.safetensors": b"weights" * 100, "config.json": b'{"a": 1}'}


def _layers(files: dict[str, bytes]) -> list:
    return [file_layer(name, data) for name, data in files.items()]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def pull(capsys, ref: str, cache: Path, *keys: Path, extra: tuple[str, ...] = ()) -> tuple[int, dict | None, str]:
    argv = ["pull", ref, "--cache", str(cache), "--output", "json", "--progress", "none", *extra]
    for k in keys:
        argv += [contract.FLAG_VERIFY_KEY, str(k)]
    code, out, err = cli(capsys, *argv)
    return code, (json.loads(out) if code == 0 else None), err


def sign(capsys, ref: str, key: Key, *extra: str) -> dict:
    code, out, err = cli(capsys, "sign", ref, "--key", str(key.pem), "--output", "json", *extra)
    assert code == 0, err
    return json.loads(out)


def refused_untouched(capsys, ref: str, cache: Path, sentinel: Path, *keys: Path) -> str:
    """A pull that must be refused with exit 10: the cache and the sentinel as they were; the message."""
    before, sent = snapshot(cache), snapshot(sentinel)
    code, _out, err = pull(capsys, ref, cache, *keys)
    assert code == contract.ExitCode.SIGNATURE == 10
    assert snapshot(cache) == before
    assert snapshot(sentinel) == sent
    return err


def published(cache: Path, digest: str) -> dict:
    return tree(cache / contract.MODELS_DIR / digest.split(":")[1])


def test_unsigned_is_refused_and_a_later_signed_pull_succeeds(capsys, pusher, registry, cache, sentinel, keys):
    digest = pusher.push_artifact("sig/unsigned", "v1", _layers(FILES))
    ref = f"{registry.host}/sig/unsigned:v1"
    err = refused_untouched(capsys, ref, cache, sentinel, keys["right"].pub)
    hexd = digest.split(":")[1]
    assert (f"{ref}: model {digest} is not signed as the policy requires (key {keys['right'].fingerprint[:19]}..."
            f" (ecdsa-p256, {keys['right'].pub})): no signature found (looked in the referrers API (absent) and tag"
            f" sha256-{hexd}, tag sha256-{hexd}.sig). Nothing was published") in err
    assert "exit_code=10" in err

    signed = sign(capsys, ref, keys["right"])
    assert (signed["digest"], signed["where"], signed["key"]) == (digest, "tag", keys["right"].fingerprint)
    code, res, err = pull(capsys, ref, cache, keys["right"].pub)
    assert code == 0, err
    assert res["verified"] == {"policy": res["verified"]["policy"], "signer": keys["right"].fingerprint,
                               "where": "tag", "signature": signed["signature"], "recorded": False}
    assert published(cache, digest) == FILES
    meta = Cache(cache).read_meta(digest)
    assert meta is not None and list(meta["verified"]) == [res["verified"]["policy"]]
    assert {k: v for k, v in meta["verified"][res["verified"]["policy"]].items() if k != "at"} == {
        "signer": keys["right"].fingerprint, "where": "tag", "signature": signed["signature"]}


@pytest.mark.parametrize("kind", ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa"])
def test_signed_by_the_right_key(capsys, pusher, registry, cache, tmp_path, kind):
    key = Key(tmp_path, kind, kind)
    repo = f"sig/right-{kind}"
    digest = pusher.push_artifact(repo, "v1", _layers(FILES))
    ref = f"{registry.host}/{repo}:v1"
    signed = sign(capsys, ref, key)
    code, res, err = pull(capsys, ref, cache, key.pub)
    assert code == 0, err
    assert (res["digest"], res["cache_hit"], res["verified"]["signer"], res["verified"]["where"],
            res["verified"]["signature"]) == (digest, False, key.fingerprint, "tag", signed["signature"])
    assert published(cache, digest) == FILES


def _push_signature(pusher, repo: str, tag: str, payload: bytes, signature: bytes) -> str:
    """A signature manifest made by hand (as cosign lays it out), independent of the code under test."""
    layer = signing.signature_layer(payload, signature)
    pusher.push_blob(repo, payload)
    config = signing.signature_config([layer])
    pusher.push_blob(repo, config)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(config),
                           "digest": str(Digest.of(config))},
                "layers": [layer]}
    return pusher.push_manifest(repo, tag, manifest)


def test_rsa_pss_and_cosign_capitalised_payload(capsys, pusher, registry, cache, tmp_path):
    """RSA-PSS (what cosign signs with for --signing-algorithm rsa-sign-pss-*) and the payload spelled as the
    cosign spec's example does (``Docker-manifest-digest``: Go's encoding/json matches keys case-insensitively)."""
    key = Key(tmp_path, "pss", "rsa")
    digest = pusher.push_artifact("sig/pss", "v1", _layers(FILES))
    payload = json.dumps({"critical": {"identity": {"docker-reference": "x"}, "image": {
        "Docker-manifest-digest": digest}, "type": signing.COSIGN_TYPE}, "optional": None}).encode()
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
    sig = _push_signature(pusher, "sig/pss", f"sha256-{digest.split(':')[1]}.sig", payload,
                          key.private.sign(payload, pss, hashes.SHA256()))
    code, res, err = pull(capsys, f"{registry.host}/sig/pss:v1", cache, key.pub)
    assert code == 0, err
    assert (res["verified"]["signer"], res["verified"]["signature"]) == (key.fingerprint, sig)


def test_wrong_key_is_refused_and_any_one_key_suffices(capsys, pusher, registry, cache, sentinel, keys):
    digest = pusher.push_artifact("sig/wrong", "v1", _layers(FILES))
    ref = f"{registry.host}/sig/wrong:v1"
    signed = sign(capsys, ref, keys["wrong"])
    err = refused_untouched(capsys, ref, cache, sentinel, keys["right"].pub)
    assert (f"{ref}: model {digest} is not signed as the policy requires (key {keys['right'].fingerprint[:19]}..."
            f" (ecdsa-p256, {keys['right'].pub})): 1 signature(s) found (looked in the referrers API (absent) and"
            f" tag sha256-{digest.split(':')[1]}, tag sha256-{digest.split(':')[1]}.sig), none verifies: signature"
            f" {signed['signature']} (tag) verifies with none of the policy's keys. Nothing was published") in err
    code, res, err = pull(capsys, ref, cache, keys["right"].pub, keys["wrong"].pub)
    assert code == 0, err
    assert res["verified"]["signer"] == keys["wrong"].fingerprint
    assert published(cache, digest) == FILES


def test_a_signature_for_another_digest_is_refused(capsys, pusher, registry, cache, sentinel, keys):
    digest = pusher.push_artifact("sig/other", "v1", _layers(FILES))
    other = pusher.push_artifact("sig/other", "v2", _layers({"x.bin": b"another model"}))
    sign(capsys, f"{registry.host}/sig/other:v2", keys["right"])
    # v2's signature manifest, copied to v1's signature tag: valid, by the right key, for the wrong digest.
    sig_manifest = pusher.manifest_bytes("sig/other", f"sha256-{other.split(':')[1]}.sig")
    copied = pusher.push_manifest("sig/other", f"sha256-{digest.split(':')[1]}.sig", json.loads(sig_manifest))
    ref = f"{registry.host}/sig/other:v1"
    err = refused_untouched(capsys, ref, cache, sentinel, keys["right"].pub)
    assert f"none verifies: signature {copied} (tag) signs {other}, not {digest}. Nothing was published" in err


def test_a_tag_moved_after_signing_is_refused(capsys, pusher, registry, cache, sentinel, keys):
    signed_digest = pusher.push_artifact("sig/moved", "v1", _layers(FILES))
    ref = f"{registry.host}/sig/moved:v1"
    sign(capsys, ref, keys["right"])
    moved = pusher.push_artifact("sig/moved", "v1", _layers({"evil.bin": b"swapped weights"}))
    err = refused_untouched(capsys, ref, cache, sentinel, keys["right"].pub)
    assert f"{ref}: model {moved} is not signed as the policy requires" in err and "no signature found" in err
    # The digest that was signed still pulls, by digest.
    code, _res, err = pull(capsys, f"{registry.host}/sig/moved@{signed_digest}", cache, keys["right"].pub)
    assert code == 0, err
    assert published(cache, signed_digest) == FILES


def test_referrer_only_signature_through_the_referrers_api(capsys, pusher, registry, cache, keys):
    digest = pusher.push_artifact("sig/referrer", "v1", _layers(FILES))
    with ReferrersProxy(registry.url) as proxy:
        ref = f"{proxy.host}/sig/referrer:v1"
        signed = sign(capsys, ref, keys["right"], "--referrers")
        assert signed["where"] == "referrers"
        assert proxy.referrers[("sig/referrer", digest)] == [
            {"mediaType": OCI_MANIFEST, "digest": signed["signature"],
             "size": len(pusher.manifest_bytes("sig/referrer", signed["signature"])),
             "artifactType": signing.COSIGN_SIG_ARTIFACT}]
        # Only a referrer: neither cosign's .sig tag nor the fallback tag exists.
        hexd = digest.split(":")[1]
        for tag in (f"sha256-{hexd}.sig", f"sha256-{hexd}"):
            assert pusher.s.get(f"{registry.url}/v2/sig/referrer/manifests/{tag}").status_code == 404
        code, res, err = pull(capsys, ref, cache, keys["right"].pub)
        assert code == 0, err
        assert (res["verified"]["where"], res["verified"]["signature"]) == ("referrers", signed["signature"])
        assert ("GET", f"/v2/sig/referrer/referrers/{digest}") in proxy.requests
        assert not any(p.endswith(".sig") for _, p in proxy.requests)  # found by the API: the tag is not asked
    assert published(cache, digest) == FILES


def test_referrer_on_a_registry_without_the_api_uses_the_fallback_tag(capsys, pusher, registry, cache, keys):
    digest = pusher.push_artifact("sig/fallback", "v1", _layers(FILES))
    ref = f"{registry.host}/sig/fallback:v1"
    signed = sign(capsys, ref, keys["right"], "--referrers")
    assert signed["where"] == "referrers-tag"
    index = json.loads(pusher.manifest_bytes("sig/fallback", f"sha256-{digest.split(':')[1]}"))
    assert [(m["digest"], m["artifactType"]) for m in index["manifests"]] == [
        (signed["signature"], signing.COSIGN_SIG_ARTIFACT)]
    code, res, err = pull(capsys, ref, cache, keys["right"].pub)
    assert code == 0, err
    assert (res["verified"]["where"], res["verified"]["signature"]) == ("referrers-tag", signed["signature"])


def test_a_hit_verified_under_the_same_policy_is_not_verified_again(capsys, pusher, registry, cache, keys):
    digest = pusher.push_artifact("sig/hit", "v1", _layers(FILES))
    with ReferrersProxy(registry.url) as proxy:
        ref = f"{proxy.host}/sig/hit:v1"
        sign(capsys, ref, keys["right"])
        code, first, err = pull(capsys, ref, cache, keys["right"].pub)
        assert code == 0 and first["verified"]["recorded"] is False, err
        proxy.requests.clear()
        code, again, err = pull(capsys, ref, cache, keys["right"].pub)
        assert code == 0, err
        assert (again["cache_hit"], again["verified"]) == (True, {**first["verified"], "recorded": True})
        assert proxy.requests == [("HEAD", "/v2/sig/hit/manifests/v1")]  # the tag re-checked, no signature fetched
        # By digest: no request at all.
        proxy.requests.clear()
        code, by_digest, err = pull(capsys, f"{proxy.host}/sig/hit@{digest}", cache, keys["right"].pub)
        assert code == 0 and by_digest["verified"]["recorded"] is True and proxy.requests == [], err
        # Another policy (one more key): verified again, and recorded beside the first.
        code, other, err = pull(capsys, ref, cache, keys["right"].pub, keys["wrong"].pub)
        assert code == 0, err
        assert other["verified"]["recorded"] is False and other["verified"]["policy"] != first["verified"]["policy"]
        assert any(p.endswith(".sig") for _, p in proxy.requests)
    meta = Cache(cache).read_meta(digest)
    assert meta is not None and sorted(meta["verified"]) == sorted([first["verified"]["policy"],
                                                                   other["verified"]["policy"]])


def test_a_cached_model_not_verified_under_the_policy(capsys, pusher, registry, cache, sentinel, keys):
    """Pulled before without a policy: the policy's pull verifies it (unsigned: refused, and the cached copy is not
    served, online or --offline); signed: served as a hit and recorded."""
    digest = pusher.push_artifact("sig/cached", "v1", _layers(FILES))
    ref = f"{registry.host}/sig/cached:v1"
    code, res, err = pull(capsys, ref, cache)
    assert code == 0 and "verified" not in res, err
    err = refused_untouched(capsys, ref, cache, sentinel, keys["right"].pub)
    assert f"{ref}: model {digest} is not signed as the policy requires" in err
    before = snapshot(cache)
    code, _, err = pull(capsys, ref, cache, keys["right"].pub, extra=(contract.FLAG_OFFLINE,))
    assert code == 10 and snapshot(cache) == before
    assert (f"{ref}: the cached model {digest} was never verified under this signature policy") in err
    sign(capsys, ref, keys["right"])
    code, res, err = pull(capsys, ref, cache, keys["right"].pub)
    assert code == 0 and res["cache_hit"] is True and res["verified"]["recorded"] is False, err
    code, res, err = pull(capsys, ref, cache, keys["right"].pub, extra=(contract.FLAG_OFFLINE,))
    assert code == 0 and res["verified"]["recorded"] is True, err


def test_inline_keys_and_the_policy_fingerprint(capsys, pusher, registry, cache, keys):
    """--verify-key-data (what the webhook passes from $(MODEL_CACHE_VERIFY_KEYS)) is the same policy as the files:
    the fingerprint depends on the keys, not on where they came from or their order."""
    pusher.push_artifact("sig/inline", "v1", _layers(FILES))
    ref = f"{registry.host}/sig/inline:v1"
    sign(capsys, ref, keys["right"])
    data = ",".join(base64.b64encode(k.pub_pem).decode() for k in (keys["wrong"], keys["right"]))
    code, inline, err = pull(capsys, ref, cache, extra=(contract.FLAG_VERIFY_KEY_DATA, data))
    assert code == 0, err
    code, files, err = pull(capsys, ref, cache, keys["right"].pub, keys["wrong"].pub)
    assert code == 0 and files["verified"] == {**inline["verified"], "recorded": True}, err


@pytest.mark.parametrize(("value", "message"), [
    ("not base64!", "--verify-key-data #1: entry 0 is not base64 (of a PEM public key)"),
    (base64.b64encode(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").decode(),
     "public key --verify-key-data #1[0] is not a PEM public key"),
], ids=["not-base64", "not-a-key"])
def test_a_bad_key_stops_the_loader_before_the_cache(capsys, tmp_path, value, message):
    cache = tmp_path / "never"
    code, _, err = cli(capsys, "pull", "127.0.0.1:1/x:v1", "--cache", str(cache), contract.FLAG_VERIFY_KEY_DATA, value)
    assert code == contract.ExitCode.USAGE and message in err and not cache.exists()


# ---- the pure parsers, on hostile input -------------------------------------------------------------------------
D = "sha256:" + "a" * 64


@pytest.mark.parametrize(("payload", "message"), [
    (b"[]", "is not a JSON object"),
    (b"{}", "has no 'critical' object"),
    (json.dumps({"critical": {"type": "x", "image": {"docker-manifest-digest": D}}}).encode(),
     "has critical.type 'x', not 'cosign container image signature'"),
    (json.dumps({"critical": {"type": signing.COSIGN_TYPE, "image": {"docker-manifest-digest": "sha256:zz"}}}).encode(),
     "digest 'sha256:zz' is not sha256"),
    (json.dumps({"critical": {"type": signing.COSIGN_TYPE,
                              "image": {"docker-manifest-digest": D, "Docker-manifest-digest": D}}}).encode(),
     "spells 'docker-manifest-digest' 2 ways"),
    (b"{" + b" " * signing.MAX_PAYLOAD + b"}", f"over the {signing.MAX_PAYLOAD} byte limit"),
], ids=["array", "no-critical", "type", "bad-digest", "ambiguous", "oversized"])
def test_hostile_payloads(payload, message):
    with pytest.raises(ArtifactError) as exc:
        signing.parse_payload(payload, "p")
    assert message in str(exc.value)


def test_hostile_signature_manifests():
    good = signing.signature_layer(b"{}", b"sig")
    layers = [good,
              {**good, "mediaType": "application/octet-stream"},
              {**good, "annotations": {}},
              {**good, "annotations": {signing.SIGNATURE_ANNOTATION: "%%%"}},
              {**good, "annotations": {signing.SIGNATURE_ANNOTATION: "A" * (signing.MAX_SIGNATURE_B64 + 4)}},
              {**good, "size": signing.MAX_PAYLOAD + 1}]
    found, skipped = signing.parse_signature_manifest(json.dumps({"layers": layers}).encode(), "m")
    assert found == [signing.SignatureLayer(Digest.of(b"{}"), 2, b"sig")]
    assert skipped == [
        f"m layer 1 is not a {signing.SIMPLESIGNING} layer",
        f"m layer 2 has no {signing.SIGNATURE_ANNOTATION} annotation",
        f"m layer 3: its {signing.SIGNATURE_ANNOTATION} annotation is not base64",
        f"m layer 4 has a {signing.MAX_SIGNATURE_B64 + 4}-character signature, over {signing.MAX_SIGNATURE_B64}",
        f"m layer 5 has payload size {signing.MAX_PAYLOAD + 1}, not 0 to {signing.MAX_PAYLOAD}"]
    many = json.dumps({"layers": [good] * (signing.MAX_SIGNATURE_LAYERS + 1)}).encode()
    found, skipped = signing.parse_signature_manifest(many, "m")
    assert len(found) == signing.MAX_SIGNATURE_LAYERS and skipped == [
        f"m has {signing.MAX_SIGNATURE_LAYERS + 1} layers; only the first {signing.MAX_SIGNATURE_LAYERS} were looked at"]
    with pytest.raises(ArtifactError, match="over the"):
        signing.parse_signature_manifest(b" " * (signing.MAX_SIGNATURE_MANIFEST + 1), "m")


def test_referrers_index_is_filtered_and_bounded():
    entry = {"mediaType": OCI_MANIFEST, "digest": D, "size": 1, "artifactType": signing.COSIGN_SIG_ARTIFACT}
    other = {**entry, "artifactType": "application/spdx+json", "digest": "sha256:" + "b" * 64}
    data = json.dumps({"manifests": [other] + [entry] * (signing.MAX_SIGNATURE_MANIFESTS + 5)}).encode()
    assert signing.parse_referrers(data, Digest(D), (signing.COSIGN_SIG_ARTIFACT,), "r") == [
        (Digest(D), signing.COSIGN_SIG_ARTIFACT)] * signing.MAX_SIGNATURE_MANIFESTS


def test_weak_or_foreign_keys_are_refused():
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    for key, message in ((small, "RSA-1024; 2048 bits at least"), (k1, "curve secp256k1")):
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(UsageError) as exc:
            signing.load_public_key(pem, "k")
        assert message in str(exc.value)


# ---- keyless: Sigstore bundles, made offline by a Sigstore of the tests' own (tests/support/fake_sigstore.py) ---------
ISSUER = "https://issuer.example"
DEV = "dev@example.com"


def _push_bundle(base_url: str, repo: str, subject: str, bundle: bytes, fallback_tag: bool) -> str:
    """A bundle referrer as cosign's new bundle format stores it; with ``fallback_tag``, also listed in the OCI 1.1
    fallback tag's index (what a client does for a registry without the referrers API)."""
    p = Pusher(base_url)
    p.push_blob(repo, bundle)
    empty = p.push_blob(repo, b"{}")
    subject_bytes = p.manifest_bytes(repo, subject)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": signing.SIGSTORE_BUNDLE,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
                "layers": [{"mediaType": signing.SIGSTORE_BUNDLE, "digest": str(Digest.of(bundle)),
                            "size": len(bundle)}],
                "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_bytes)}}
    body = json.dumps(manifest, separators=(",", ":")).encode()
    ref = p.push_manifest(repo, str(Digest.of(body)), manifest)
    if fallback_tag:
        p.push_manifest(repo, f"sha256-{subject.split(':')[1]}", {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": ref, "size": len(body),
                           "artifactType": signing.SIGSTORE_BUNDLE}]})
    return ref


def keyless(root: Path, *identities: str) -> tuple[str, ...]:
    out: tuple[str, ...] = (contract.FLAG_TRUSTED_ROOT, str(root))
    for i in identities:
        out += (contract.FLAG_VERIFY_IDENTITY, i)
    return out


@pytest.mark.parametrize("where", ["referrers", "referrers-tag"])
def test_keyless_bundle_for_the_right_identity(capsys, pusher, registry, cache, root, fake, where):
    repo = f"sig/keyless-{where}"
    digest = pusher.push_artifact(repo, "v1", _layers(FILES))
    bundle = fake.dsse_bundle(fake.statement(digest), DEV, ISSUER)
    with ReferrersProxy(registry.url) as proxy:
        host = proxy.host if where == "referrers" else registry.host
        sig = _push_bundle(f"http://{host}", repo, digest, bundle, fallback_tag=where == "referrers-tag")
        code, res, err = pull(capsys, f"{host}/{repo}:v1", cache,
                              extra=keyless(root, f"{ISSUER}=someone@example.com", f"{ISSUER}={DEV}"))
    assert code == 0, err
    assert {k: v for k, v in res["verified"].items() if k != "policy"} == {
        "signer": f"identity:{ISSUER}={DEV}", "where": where, "signature": sig, "recorded": False}
    assert published(cache, digest) == FILES


def test_keyless_message_signature_over_the_manifest(capsys, pusher, registry, cache, root, fake):
    """A message-signature bundle (``cosign sign-blob`` / ``sigstore sign`` over the manifest file) binds the digest
    too: the signed artifact is the manifest, whose sha256 is the digest. Over another artifact: refused."""
    digest = pusher.push_artifact("sig/keyless-message", "v1", _layers(FILES))
    other = pusher.push_artifact("sig/keyless-message", "v2", _layers({"x.bin": b"x"}))
    sig = _push_bundle(registry.url, "sig/keyless-message", digest, fake.message_bundle(digest, DEV, ISSUER),
                       fallback_tag=True)
    wrong = _push_bundle(registry.url, "sig/keyless-message", other, fake.message_bundle(digest, DEV, ISSUER),
                         fallback_tag=True)
    code, res, err = pull(capsys, f"{registry.host}/sig/keyless-message:v1", cache, extra=keyless(root, f"{ISSUER}={DEV}"))
    assert code == 0 and (res["verified"]["signer"], res["verified"]["signature"]) == (f"identity:{ISSUER}={DEV}", sig), err
    code, _, err = pull(capsys, f"{registry.host}/sig/keyless-message:v2", cache, extra=keyless(root, f"{ISSUER}={DEV}"))
    assert code == 10 and f"none verifies: bundle {wrong} (referrers-tag): not for {DEV} from {ISSUER} (" in err


def test_keyless_bundle_for_another_identity_is_refused(capsys, pusher, registry, cache, sentinel, root, fake):
    digest = pusher.push_artifact("sig/keyless-wrong", "v1", _layers(FILES))
    sig = _push_bundle(registry.url, "sig/keyless-wrong", digest, fake.dsse_bundle(fake.statement(digest), DEV, ISSUER),
                       fallback_tag=True)
    ref = f"{registry.host}/sig/keyless-wrong:v1"
    before, sent = snapshot(cache), snapshot(sentinel)
    code, _, err = pull(capsys, ref, cache, extra=keyless(root, f"{ISSUER}=other@example.com",
                                                          f"https://other-issuer.example={DEV}"))
    assert code == 10 and snapshot(cache) == before and snapshot(sentinel) == sent
    assert (f"{ref}: model {digest} is not signed as the policy requires (identity other@example.com from {ISSUER};"
            f" identity {DEV} from https://other-issuer.example): 1 signature(s) found (looked in the referrers API"
            f" (absent) and tag sha256-{digest.split(':')[1]}), none verifies: bundle {sig} (referrers-tag): not for"
            f" other@example.com from {ISSUER} (Certificate's SANs do not match other@example.com; actual SANs:"
            f" {{'{DEV}'}}); not for {DEV} from https://other-issuer.example (Certificate's OIDCIssuer does not match"
            f" (got '{ISSUER}', expected 'https://other-issuer.example')). Nothing was published") in err


def test_keyless_bundle_for_another_digest_is_refused(capsys, pusher, registry, cache, sentinel, root, fake):
    digest = pusher.push_artifact("sig/keyless-other", "v1", _layers(FILES))
    other = "sha256:" + "c" * 64
    sig = _push_bundle(registry.url, "sig/keyless-other", digest, fake.dsse_bundle(fake.statement(other), DEV, ISSUER),
                       fallback_tag=True)
    before, sent = snapshot(cache), snapshot(sentinel)
    code, _, err = pull(capsys, f"{registry.host}/sig/keyless-other:v1", cache, extra=keyless(root, f"{ISSUER}={DEV}"))
    assert code == 10 and snapshot(cache) == before and snapshot(sentinel) == sent
    assert f"none verifies: bundle {sig} (referrers-tag): it signs {other}, not {digest}. Nothing was published" in err


def test_keyless_bundle_from_an_untrusted_sigstore_is_refused(capsys, pusher, registry, cache, sentinel, root):
    stranger = FakeSigstore("stranger")  # the same identity, certified and logged by a Sigstore the root does not name
    digest = pusher.push_artifact("sig/keyless-stranger", "v1", _layers(FILES))
    sig = _push_bundle(registry.url, "sig/keyless-stranger", digest,
                       stranger.dsse_bundle(stranger.statement(digest), DEV, ISSUER), fallback_tag=True)
    before, sent = snapshot(cache), snapshot(sentinel)
    code, _, err = pull(capsys, f"{registry.host}/sig/keyless-stranger:v1", cache,
                        extra=keyless(root, f"{ISSUER}={DEV}"))
    assert code == 10 and snapshot(cache) == before and snapshot(sentinel) == sent
    assert f"none verifies: bundle {sig} (referrers-tag): not for {DEV} from {ISSUER} (" in err


def test_keyless_flags_go_together(capsys, tmp_path, root):
    cache = tmp_path / "never"
    for extra in ((contract.FLAG_VERIFY_IDENTITY, f"{ISSUER}={DEV}"), (contract.FLAG_TRUSTED_ROOT, str(root))):
        code, _, err = cli(capsys, "pull", "127.0.0.1:1/x:v1", "--cache", str(cache), *extra)
        assert code == 2 and "--verify-identity and --trusted-root go together" in err and not cache.exists()
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"mediaType": "nope"}')
    code, _, err = cli(capsys, "pull", "127.0.0.1:1/x:v1", "--cache", str(cache), *keyless(bad, f"{ISSUER}={DEV}"))
    assert code == 2 and f"trusted root {bad} is not a usable Sigstore trusted root" in err and not cache.exists()


# ---- OpenSSF model signing: model.sig over the files, checked on the tree before publish ------------------------
def _model_signed(tmp: Path, key: Key, files: dict[str, bytes], change: dict[str, bytes] | None = None) -> dict:
    """The files plus a model.sig made by model-signing (key-based) over them; ``change``: files replaced after
    signing (what a tampered upload looks like)."""
    import model_signing

    d = tmp / f"model-{len(list(tmp.iterdir()))}"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=["model.sig"], ignore_git_paths=True)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=key.pem).set_hashing_config(hashing).sign(
        d, d / "model.sig")
    out = {**files, **(change or {})}
    out["model.sig"] = (d / "model.sig").read_bytes()
    return out


def _unchanged_but_blobs(before: dict, after: dict) -> None:
    """Nothing published, linked or recorded; only verified, unreferenced blobs added (gc removes them)."""
    added = {k for k in after if k not in before}
    assert all(k.startswith("blobs/sha256/") for k in added), added
    assert {k: v for k, v in after.items() if k not in added and k not in ("blobs/sha256", "tmp")} == {
        k: v for k, v in before.items() if k not in ("blobs/sha256", "tmp")}


def test_openssf_model_signature(capsys, pusher, registry, cache, tmp_path, keys):
    files = _model_signed(tmp_path, keys["right"], FILES)
    digest = pusher.push_artifact("sig/openssf", "v1", _layers(files))
    ref = f"{registry.host}/sig/openssf:v1"
    code, res, err = pull(capsys, ref, cache, keys["wrong"].pub, keys["right"].pub,
                          extra=(contract.FLAG_VERIFY_MODEL_SIGNATURE,))
    assert code == 0, err
    assert {k: v for k, v in res["verified"].items() if k != "policy"} == {
        "signer": keys["right"].fingerprint, "where": "model-signature", "signature": str(Digest.of(files["model.sig"])),
        "recorded": False}
    assert published(cache, digest) == files
    assert os.listdir(cache / contract.TMP_DIR) == []  # the verification's staging tree is gone
    code, again, err = pull(capsys, ref, cache, keys["wrong"].pub, keys["right"].pub,
                            extra=(contract.FLAG_VERIFY_MODEL_SIGNATURE,))
    assert code == 0 and again["verified"] == {**res["verified"], "recorded": True}, err


@pytest.mark.parametrize("case", ["file-changed", "wrong-key", "no-signature-file"])
def test_openssf_model_signature_refused(capsys, pusher, registry, cache, sentinel, tmp_path, keys, case):
    if case == "file-changed":
        files = _model_signed(tmp_path, keys["right"], FILES, change={"config.json": b'{"a": 2}'})
    elif case == "wrong-key":
        files = _model_signed(tmp_path, keys["wrong"], FILES)
    else:
        files = dict(FILES)
    repo = f"sig/openssf-{case}"
    digest = pusher.push_artifact(repo, "v1", _layers(files))
    ref = f"{registry.host}/{repo}:v1"
    before, sent = snapshot(cache), snapshot(sentinel)
    code, _, err = pull(capsys, ref, cache, keys["right"].pub, extra=(contract.FLAG_VERIFY_MODEL_SIGNATURE,))
    assert code == 10
    _unchanged_but_blobs(before, snapshot(cache))
    assert snapshot(sentinel) == sent
    head = (f"{ref}: model {digest} is not signed as the policy requires (an OpenSSF model signature model.sig by key"
            f" {keys['right'].fingerprint[:19]}... (ecdsa-p256, {keys['right'].pub})): ")
    expected = {
        "file-changed": f"key {keys['right'].fingerprint[:19]}...: the files do not match the signature: Hash"
                        " mismatch for 'config.json'. Nothing was published",
        "wrong-key": f"key {keys['right'].fingerprint[:19]}...: Key mismatch: The public key hash in the signature's"
                     " verification material does not match the provided public key",
        "no-signature-file": "the model has no model.sig file (a regular file at the top of its tree). Nothing was"
                             " published",
    }[case]
    assert head + expected in err, err
    assert not (cache / contract.MODELS_DIR / digest.split(":")[1]).exists()
