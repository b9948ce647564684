"""Signatures in air-gapped bundles (issue 13), against the real registry: ``export`` carries what the verification
search finds (cosign's ``.sig`` tag, referrers as the OCI 1.1 fallback tag's index) in a layout skopeo still reads;
``import --cache`` and ``import --to`` verify every model from the bundle, offline, before anything is published
(refusals: exit 10 or 8, the cache, a sentinel directory and the target registry exactly as they were); ``--cache``
records the verification as pull does, ``--to`` pushes the signatures along so ``pull --verify-key`` verifies
against the target."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
import requests

from loader import contract, signing
from loader.cache import Cache
from loader.digest import Digest
from tests.support import bundle_tar
from tests.support.files import snapshot, tree
from tests.support.oci import OCI_INDEX, OCI_MANIFEST, sha256
from tests.support.referrers_proxy import ReferrersProxy
from tests.support.signing_fixtures import Key
from tests.test_signing import DEV, FILES, ISSUER, _layers, _push_bundle, _push_signature, cli, keyless, pull, sign

IMAGE = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"


def export(capsys, bundle: Path, *refs: str, extra: tuple[str, ...] = ()) -> dict:
    code, out, err = cli(capsys, "export", *refs, "-o", str(bundle), "--output", "json", *extra)
    assert code == 0, err
    return json.loads(out)


def import_(capsys, bundle: Path, where: tuple[str, ...], *keys: Path,
            extra: tuple[str, ...] = ()) -> tuple[int, list[dict], str]:
    argv = ["import", str(bundle), *where, "--output", "json", *extra]
    for k in keys:
        argv += [contract.FLAG_VERIFY_KEY, str(k)]
    code, out, err = cli(capsys, *argv)
    return code, [json.loads(line) for line in out.splitlines()], err


def closure(pusher, repo: str, *manifests: str) -> set[str]:
    """Each manifest's digest and every blob it references (config and layers)."""
    out = set()
    for d in manifests:
        m = json.loads(pusher.manifest_bytes(repo, d))
        out |= {d, m["config"]["digest"], *(x["digest"] for x in m["layers"])}
    return out


def sig_entry(data: bytes, media_type: str, name: str, tag: str) -> dict:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data),
            "annotations": {IMAGE: f"{name}:{tag}", REF_NAME: tag}}


# ---- export ---------------------------------------------------------------------------------------------------------
def test_export_carries_the_signatures_in_a_layout_skopeo_reads(capsys, pusher, registry, tmp_path, keys, fake):
    repo = "bsig/layout"
    digest = pusher.push_artifact(repo, "v1", _layers(FILES))
    hexd = digest.split(":")[1]
    ref, name = f"{registry.host}/{repo}:v1", f"{registry.host}/{repo}"
    # A keyless bundle and a key signature as referrers (the fallback tag: Distribution 2.8 has no referrers API),
    # and a key signature at cosign's tag.
    keyless_sig = _push_bundle(registry.url, repo, digest, fake.dsse_bundle(fake.statement(digest), DEV, ISSUER),
                               fallback_tag=True)
    referrer = sign(capsys, ref, keys["wrong"], "--referrers")["signature"]
    tagged = sign(capsys, ref, keys["right"])["signature"]

    bundle = tmp_path / "signed.tar"
    res = export(capsys, bundle, ref)
    assert res["signatures"] == 3
    index, blobs = bundle_tar.read(bundle)
    fallback = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": keyless_sig, "size": len(pusher.manifest_bytes(repo, keyless_sig)),
         "artifactType": signing.SIGSTORE_BUNDLE},
        {"mediaType": OCI_MANIFEST, "digest": referrer, "size": len(pusher.manifest_bytes(repo, referrer)),
         "artifactType": signing.COSIGN_SIG_ARTIFACT}]}, separators=(",", ":")).encode()
    model = pusher.manifest_bytes(repo, "v1")
    assert index == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(model), "annotations": {IMAGE: ref, REF_NAME: "v1"}},
        sig_entry(pusher.manifest_bytes(repo, tagged), OCI_MANIFEST, name, f"sha256-{hexd}.sig"),
        sig_entry(fallback, OCI_INDEX, name, f"sha256-{hexd}")]}
    assert set(blobs) == closure(pusher, repo, digest, tagged, referrer, keyless_sig) | {sha256(fallback)}
    assert all(sha256(data) == d for d, data in blobs.items())
    assert blobs[sha256(fallback)] == fallback

    # Still a standard layout: skopeo reads the model and the signature tag.
    for tag, want in (("v1", model), (f"sha256-{hexd}.sig", pusher.manifest_bytes(repo, tagged))):
        out = tmp_path / f"skopeo-{tag}"
        subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{bundle}:{tag}", f"dir:{out}"], check=True,
                       capture_output=True)
        assert (out / "manifest.json").read_bytes() == want
    raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci-archive:{bundle}:sha256-{hexd}"], check=True,
                         capture_output=True).stdout
    assert raw == fallback

    # --no-with-signatures: the model alone, as before signatures travelled.
    plain = tmp_path / "plain.tar"
    assert "signatures" not in export(capsys, plain, ref, extra=("--no-with-signatures",))
    index, blobs = bundle_tar.read(plain)
    assert [e["digest"] for e in index["manifests"]] == [digest]
    assert set(blobs) == closure(pusher, repo, digest)


# ---- import --cache -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tag", "referrers", "keyless"])
def test_import_verifies_from_the_bundle_and_records_it(capsys, pusher, registry, tmp_path, cache, keys, fake,
                                                        root, kind):
    """Signed in a registry with a referrers API (the proxy); the bundle carries the referrers as the fallback tag;
    the import verifies them with no registry, records the policy, and a later pull under it asks for no
    signature."""
    repo = f"bsig/import-{kind}"
    digest = pusher.push_artifact(repo, "v1", _layers(FILES))
    policy: tuple[str, ...] = keyless(root, f"{ISSUER}={DEV}") if kind == "keyless" else (
        contract.FLAG_VERIFY_KEY, str(keys["right"].pub))
    with ReferrersProxy(registry.url) as proxy:
        ref = f"{proxy.host}/{repo}:v1"
        if kind == "keyless":
            sig = _push_bundle(f"http://{proxy.host}", repo, digest,
                               fake.dsse_bundle(fake.statement(digest), DEV, ISSUER), fallback_tag=False)
            signer = f"identity:{ISSUER}={DEV}"
        else:
            sig = sign(capsys, ref, keys["right"], *(("--referrers",) if kind == "referrers" else ()))["signature"]
            signer = keys["right"].fingerprint
        bundle = tmp_path / "b.tar"
        export(capsys, bundle, ref)
        proxy.requests.clear()

        code, res, err = import_(capsys, bundle, ("--cache", str(cache)), extra=policy)
        assert code == 0, err
        assert proxy.requests == []  # offline: everything from the bundle
        [r] = res
        where = "tag" if kind == "tag" else "referrers-tag"  # a bundle's referrers are its fallback tag
        verified = {"policy": r["verified"]["policy"], "signer": signer, "where": where, "signature": sig,
                    "recorded": False}
        assert r == {"ref": ref, "digest": digest, "source": ref, "path": str(cache / "models" / "sha256" / digest[7:]),
                     "bytes": sum(map(len, FILES.values())), "files": len(FILES), "verified": verified}
        assert tree(r["path"]) == FILES
        meta = Cache(cache).read_meta(digest)
        assert meta is not None and list(meta["verified"]) == [verified["policy"]]
        assert {k: v for k, v in meta["verified"][verified["policy"]].items() if k != "at"} == {
            "signer": signer, "where": where, "signature": sig}

        # A pull under the same policy: a hit, the recorded verification, no signature request.
        code, hit, err = pull(capsys, ref, cache, extra=policy)
        assert code == 0, err
        assert (hit["cache_hit"], hit["verified"]) == (True, {**verified, "recorded": True})
        assert proxy.requests == [("HEAD", f"/v2/{repo}/manifests/v1")]


def _refused_bundle(capsys, pusher, registry, tmp_path: Path, keys: dict[str, Key], repo: str,
                    case: str) -> tuple[Path, str, str, str]:
    """A bundle whose model does not verify under the right key: (bundle, ref, digest, what the message says)."""
    digest = pusher.push_artifact(repo, "v1", _layers(FILES))
    hexd = digest.split(":")[1]
    ref = f"{registry.host}/{repo}:v1"
    looked = f"looked in the referrers API (absent) and tag sha256-{hexd}, tag sha256-{hexd}.sig"
    extra: tuple[str, ...] = ()
    if case == "wrong-key":
        sig = sign(capsys, ref, keys["wrong"])["signature"]
        why = f"1 signature(s) found ({looked}), none verifies: signature {sig} (tag) verifies with none of the" \
              " policy's keys"
    elif case == "unsigned":
        why = f"no signature found ({looked})"
    elif case == "left-behind":  # signed, but exported without its signatures
        sign(capsys, ref, keys["right"])
        extra = ("--no-with-signatures",)
        why = f"no signature found ({looked})"
    else:  # another digest: v2's valid signature by the right key, copied to v1's signature tag
        other = pusher.push_artifact(repo, "v2", _layers({"x.bin": b"another model"}))
        sign(capsys, f"{registry.host}/{repo}:v2", keys["right"])
        copied = pusher.push_manifest(repo, f"sha256-{hexd}.sig",
                                      json.loads(pusher.manifest_bytes(repo, f"sha256-{other.split(':')[1]}.sig")))
        why = f"1 signature(s) found ({looked}), none verifies: signature {copied} (tag) signs {other}, not {digest}"
    bundle = tmp_path / f"{case}.tar"
    export(capsys, bundle, ref, extra=extra)
    return bundle, ref, digest, why


def refusal(keys: dict[str, Key], ref: str, digest: str, why: str) -> str:
    right = keys["right"]
    return (f"{ref}: model {digest} is not signed as the policy requires (key {right.fingerprint[:19]}... (ecdsa-p256,"
            f" {right.pub})): {why}. Nothing was published")


CASES = ["wrong-key", "unsigned", "left-behind", "another-digest"]


@pytest.mark.parametrize("case", CASES)
def test_import_refuses_what_does_not_verify_and_publishes_nothing(capsys, pusher, registry, tmp_path, cache,
                                                                    sentinel, keys, case):
    bundle, ref, digest, why = _refused_bundle(capsys, pusher, registry, tmp_path, keys, f"bsig/refused-{case}", case)
    before, sent = snapshot(cache), snapshot(sentinel)
    code, res, err = import_(capsys, bundle, ("--cache", str(cache)), keys["right"].pub)
    assert (code, res) == (contract.ExitCode.SIGNATURE, [])
    assert refusal(keys, ref, digest, why) in err
    assert snapshot(cache) == before
    assert snapshot(sentinel) == sent
    # Without a policy the same bundle imports (verification is the policy's, not the bundle's).
    code, res, err = import_(capsys, bundle, ("--cache", str(cache)))
    assert code == 0 and [r["digest"] for r in res] == [digest], err


@pytest.mark.parametrize("case", CASES)
def test_import_to_a_registry_refuses_before_the_first_push(capsys, pusher, registry, tmp_path, keys, case):
    bundle, ref, digest, why = _refused_bundle(capsys, pusher, registry, tmp_path, keys, f"bsig/refused-to-{case}",
                                               case)
    target = f"{registry.host}/mirror-refused-{case}"
    code, res, err = import_(capsys, bundle, ("--to", target), keys["right"].pub)
    assert (code, res) == (contract.ExitCode.SIGNATURE, [])
    assert refusal(keys, ref, digest, why) in err
    # Nothing pushed: no tag, no manifest, not one blob linked into the target repository.
    dest = f"{registry.url}/v2/mirror-refused-{case}/bsig/refused-to-{case}"
    assert requests.get(f"{dest}/tags/list").status_code == 404
    assert requests.head(f"{dest}/manifests/{digest}", headers={"Accept": OCI_MANIFEST}).status_code == 404
    layers = json.loads(pusher.manifest_bytes(f"bsig/refused-to-{case}", digest))["layers"]
    assert [requests.head(f"{dest}/blobs/{x['digest']}").status_code for x in layers] == [404] * len(layers)


# ---- import --to ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tag", "referrers-tag", "referrers"])
def test_import_to_another_repository_keeps_signatures_verifiable(capsys, pusher, registry, fresh_registry, tmp_path,
                                                                  cache, keys, kind):
    """Signed at cosign's tag or as a referrer; imported under a prefix into another registry, without the
    referrers API (the referrer listed in the target's fallback tag) or with it (the proxy): pull verifies there."""
    repo = f"bsig/to-{kind}"
    digest = pusher.push_artifact(repo, "v1", _layers(FILES))
    ref = f"{registry.host}/{repo}:v1"
    sig = sign(capsys, ref, keys["right"], *(() if kind == "tag" else ("--referrers",)))["signature"]
    bundle = tmp_path / "b.tar"
    export(capsys, bundle, ref)
    with ReferrersProxy(fresh_registry.url) as proxy:
        host = proxy.host if kind == "referrers" else fresh_registry.host
        code, res, err = import_(capsys, bundle, ("--to", f"{host}/mirror"), keys["right"].pub)
        assert code == 0, err
        target = f"{host}/mirror/{repo}:v1"
        [r] = res
        assert r == {"ref": target, "digest": digest, "source": ref, "signatures": 1,
                     "verified": {**r["verified"], "signer": keys["right"].fingerprint,
                                  "where": "tag" if kind == "tag" else "referrers-tag", "signature": sig,
                                  "recorded": False}}
        # The signature manifest, byte for byte, where pull looks for it in the target.
        target_repo = f"mirror/{repo}"
        assert pusher.manifest_bytes(repo, sig) == requests.get(
            f"{fresh_registry.url}/v2/{target_repo}/manifests/{sig}", headers={"Accept": OCI_MANIFEST}).content
        fallback = requests.get(f"{fresh_registry.url}/v2/{target_repo}/manifests/sha256-{digest[7:]}",
                                headers={"Accept": OCI_INDEX})
        if kind == "referrers-tag":
            assert [(m["digest"], m["artifactType"]) for m in fallback.json()["manifests"]] == [
                (sig, signing.COSIGN_SIG_ARTIFACT)]
        else:  # cosign's tag, or a target with the referrers API: no fallback tag written
            assert fallback.status_code == 404
        if kind == "referrers":
            assert [m["digest"] for m in proxy.referrers[(target_repo, digest)]] == [sig]

        code, pulled, err = pull(capsys, target, cache, keys["right"].pub)
        assert code == 0, err
        assert (pulled["verified"]["where"], pulled["verified"]["signature"]) == (
            {"tag": "tag", "referrers-tag": "referrers-tag", "referrers": "referrers"}[kind], sig)
        assert tree(pulled["path"]) == FILES
        code, _none, err = pull(capsys, target, tmp_path / "other-cache", keys["wrong"].pub)
        assert code == contract.ExitCode.SIGNATURE, err


# ---- hostile signature entries --------------------------------------------------------------------------------------
def _signature_manifest(layers: list[dict], pad: int = 0) -> bytes:
    config = signing.signature_config(layers)
    m = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
         "config": {"mediaType": signing.OCI_IMAGE_CONFIG, "size": len(config), "digest": str(Digest.of(config))},
         "layers": layers}
    if pad:
        m["annotations"] = {"pad": "x" * pad}
    return json.dumps(m, separators=(",", ":")).encode()


@pytest.mark.parametrize("case", ["oversized", "entry-media-type", "layer-media-type", "missing-payload"])
def test_a_hostile_signature_entry_is_refused(capsys, pusher, registry, tmp_path, cache, sentinel, keys, case):
    repo = f"bsig/hostile-{case}"
    digest = pusher.push_artifact(repo, "v1", _layers(FILES))
    hexd = digest.split(":")[1]
    ref, name = f"{registry.host}/{repo}:v1", f"{registry.host}/{repo}"
    plain = tmp_path / "plain.tar"
    export(capsys, plain, ref)
    index, blobs = bundle_tar.read(plain)
    payload = signing.make_payload(Digest(digest), name)
    layer = signing.signature_layer(payload, signing.sign_payload(keys["right"].private, payload))
    config = signing.signature_config([layer])
    blobs.update([bundle_tar.blob(payload), bundle_tar.blob(config)])
    entry_type = OCI_MANIFEST
    if case == "oversized":  # a valid signature, inside a manifest over the signature manifest limit
        manifest = _signature_manifest([layer], pad=signing.MAX_SIGNATURE_MANIFEST)
        code, why = contract.ExitCode.SIGNATURE, (f"signature manifest {sha256(manifest)} (tag) is {len(manifest)}"
                                                  f" bytes, over the {signing.MAX_SIGNATURE_MANIFEST} byte limit")
    elif case == "entry-media-type":  # index.json says the signature tag is a layer
        manifest = _signature_manifest([layer])
        entry_type = "application/vnd.oci.image.layer.v1.tar"
        code, why = contract.ExitCode.INVALID_ARTIFACT, (
            f"signature entry {name}:sha256-{hexd}.sig has media type '{entry_type}', not a manifest or an index:"
            " the bundle is malformed, nothing was imported")
    elif case == "layer-media-type":  # the signed payload, but not in a simple-signing layer
        manifest = _signature_manifest([{**layer, "mediaType": "application/octet-stream"}])
        code, why = contract.ExitCode.SIGNATURE, (
            f"signature manifest {sha256(manifest)} (tag) layer 0 is not a {signing.SIMPLESIGNING} layer")
    else:
        manifest = _signature_manifest([layer])
        del blobs[str(Digest.of(payload))]
        code, why = contract.ExitCode.SIGNATURE, f"is missing blob {Digest.of(payload)}"
    blobs.update([bundle_tar.blob(manifest)])
    index["manifests"].append(sig_entry(manifest, entry_type, name, f"sha256-{hexd}.sig"))
    bundle = tmp_path / "hostile.tar"
    bundle_tar.write(bundle, index, blobs)

    before, sent = snapshot(cache), snapshot(sentinel)
    got, res, err = import_(capsys, bundle, ("--cache", str(cache)), keys["right"].pub)
    assert (got, res) == (code, [])
    assert why in err
    assert snapshot(cache) == before
    assert snapshot(sentinel) == sent
    if case == "layer-media-type":  # the same signature in a well-formed manifest verifies: the refusal was the layer
        good = _signature_manifest([layer])
        index["manifests"][-1] = sig_entry(good, OCI_MANIFEST, name, f"sha256-{hexd}.sig")
        bundle_tar.write(bundle, index, {**blobs, **dict([bundle_tar.blob(good)])})
        got, res, err = import_(capsys, bundle, ("--cache", str(cache)), keys["right"].pub)
        assert got == 0 and res[0]["verified"]["signature"] == sha256(good), err


def test_an_inline_key_policy_and_base64_keys_verify_a_bundle(capsys, pusher, registry, tmp_path, cache, keys):
    """--verify-key-data (what the webhook passes) verifies an import like --verify-key."""
    repo = "bsig/inline"
    digest = pusher.push_artifact(repo, "v1", _layers(FILES))
    ref = f"{registry.host}/{repo}:v1"
    sig = sign(capsys, ref, keys["right"])["signature"]
    bundle = tmp_path / "b.tar"
    export(capsys, bundle, ref)
    data = base64.b64encode(keys["right"].pub_pem).decode()
    code, res, err = import_(capsys, bundle, ("--cache", str(cache)), extra=(contract.FLAG_VERIFY_KEY_DATA, data))
    assert code == 0, err
    assert (res[0]["digest"], res[0]["verified"]["signature"]) == (digest, sig)


def test_hand_made_signature_at_the_tag_travels(capsys, pusher, registry, tmp_path, cache, keys):
    """A signature laid out by hand as cosign does (not by model-loader sign) is carried and verified."""
    repo = "bsig/cosign"
    digest = pusher.push_artifact(repo, "v1", _layers(FILES))
    payload = signing.make_payload(Digest(digest), f"{registry.host}/{repo}")
    sig = _push_signature(pusher, repo, f"sha256-{digest[7:]}.sig", payload,
                          signing.sign_payload(keys["right"].private, payload))
    bundle = tmp_path / "b.tar"
    export(capsys, bundle, f"{registry.host}/{repo}:v1")
    code, res, err = import_(capsys, bundle, ("--cache", str(cache)), keys["right"].pub)
    assert code == 0, err
    assert (res[0]["verified"]["where"], res[0]["verified"]["signature"]) == ("tag", sig)


# ---- the cluster's policy by prefix, and what import does not verify ------------------------------------------------
def test_the_cluster_policy_decides_per_model(capsys, pusher, registry, tmp_path, cache, sentinel, keys):
    """--signature-policy (the agent's and webhook's table): each model of one bundle under its own rule. A signed
    model under a rule, and an unsigned one under an exempt prefix, import; the same bundle with the unsigned model
    under the rule is refused whole."""
    signed = f"{registry.host}/bsig/table/signed:v1"
    exempt = f"{registry.host}/bsig/table/scratch/unsigned:v1"
    s_digest = pusher.push_artifact("bsig/table/signed", "v1", _layers(FILES))
    u_digest = pusher.push_artifact("bsig/table/scratch/unsigned", "v1", _layers({"u.bin": b"unsigned"}))
    sig = sign(capsys, signed, keys["right"])["signature"]
    bundle = tmp_path / "b.tar"
    export(capsys, bundle, signed, exempt)
    pem = keys["right"].pub_pem.decode()

    def table(*rules: dict) -> tuple[str, str]:
        return (contract.FLAG_SIGNATURE_POLICY_DATA, json.dumps(list(rules)))

    strict = table({"prefix": f"{registry.host}/bsig/table", "keys": [pem]})
    before, sent = snapshot(cache), snapshot(sentinel)
    code, res, err = import_(capsys, bundle, ("--cache", str(cache)), extra=strict)
    assert (code, res) == (contract.ExitCode.SIGNATURE, [])
    assert f"{exempt}: model {u_digest} is not signed as the policy requires" in err
    assert f"export it again with its signatures (model-loader export {exempt} -o BUNDLE.tar)" in err
    assert (snapshot(cache), snapshot(sentinel)) == (before, sent)

    code, res, err = import_(capsys, bundle, ("--cache", str(cache)), extra=table(
        {"prefix": f"{registry.host}/bsig/table", "keys": [pem]}, {"prefix": f"{registry.host}/bsig/table/scratch"}))
    assert code == 0, err
    assert [(r["digest"], r.get("verified", {}).get("signature")) for r in res] == [(s_digest, sig), (u_digest, None)]


def test_an_unnamed_model_under_the_cluster_policy_is_refused(capsys, pusher, registry, tmp_path, cache, keys):
    """A bundle entry without io.containerd.image.name: no rule can be chosen for it, so it is refused rather than
    let through unverified."""
    digest = pusher.push_artifact("bsig/unnamed", "v1", _layers(FILES))
    plain = tmp_path / "plain.tar"
    export(capsys, plain, f"{registry.host}/bsig/unnamed:v1")
    index, blobs = bundle_tar.read(plain)
    index["manifests"][0]["annotations"] = {REF_NAME: "v1"}
    bundle = tmp_path / "unnamed.tar"
    bundle_tar.write(bundle, index, blobs)
    before = snapshot(cache)
    code, res, err = import_(capsys, bundle, ("--cache", str(cache)), extra=(
        contract.FLAG_SIGNATURE_POLICY_DATA, json.dumps([{"prefix": registry.host, "keys": [keys["right"].pub_pem.decode()]}])))
    assert (code, res) == (contract.ExitCode.SIGNATURE, [])
    assert (f"v1: model {digest} carries no repository name in the bundle, so the signature policy's rules cannot"
            " say what it must be signed by; nothing was imported") in err
    assert snapshot(cache) == before


def test_an_openssf_model_signature_is_checked_on_the_imported_tree_before_publish(capsys, pusher, registry,
                                                                                   tmp_path, cache, keys):
    from tests.test_signing import _model_signed, _unchanged_but_blobs

    (tmp_path / "g").mkdir()
    (tmp_path / "b").mkdir()
    good = _model_signed(tmp_path / "g", keys["right"], FILES)
    bad = _model_signed(tmp_path / "b", keys["right"], FILES, change={"config.json": b'{"a": 2}'})
    refs = {}
    for name, files in (("good", good), ("bad", bad)):
        refs[name] = (pusher.push_artifact(f"bundle/openssf-{name}", "v1", _layers(files)),
                      f"{registry.host}/bundle/openssf-{name}:v1")
        export(capsys, tmp_path / f"{name}.tar", refs[name][1])
    flags = (contract.FLAG_VERIFY_MODEL_SIGNATURE,)
    code, res, err = import_(capsys, tmp_path / "good.tar", ("--cache", str(cache)), keys["right"].pub, extra=flags)
    assert code == 0, err
    [one] = res
    assert (one["digest"], one["verified"]["where"], one["verified"]["signer"]) == (
        refs["good"][0], "model-signature", keys["right"].fingerprint)
    assert tree(cache / contract.MODELS_DIR / refs["good"][0].split(":")[1]) == good
    # A later pull under the same policy is a recorded hit.
    code, again, err = pull(capsys, refs["good"][1], cache, keys["right"].pub, extra=flags)
    assert code == 0 and again is not None and again["verified"]["recorded"] is True, err

    before = snapshot(cache)
    code, res, err = import_(capsys, tmp_path / "bad.tar", ("--cache", str(cache)), keys["right"].pub, extra=flags)
    assert (code, res) == (contract.ExitCode.SIGNATURE, [])
    assert f"{refs['bad'][1]}: model {refs['bad'][0]} is not signed as the policy requires" in err
    _unchanged_but_blobs(before, snapshot(cache))

    # A registry target holds no tree to check: refused before anything is pushed.
    code, res, err = import_(capsys, tmp_path / "good.tar", ("--to", f"{registry.host}/elsewhere"), keys["right"].pub,
                             extra=flags)
    assert (code, res) == (contract.ExitCode.USAGE, [])
    assert "a registry target holds no tree: the loaders that pull from it check it" in err


