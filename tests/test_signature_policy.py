"""The cluster's signature policy by reference prefix (loader/policy.py): parsed at the boundary with errors that
name the field, the value and the fix; the longest prefix decides; and a real pull under it (--signature-policy-data,
what the webhook passes) requires exactly what each model's rule asks."""

from __future__ import annotations

import json

import pytest

from loader import contract
from loader.policy import MAX_RULES, PolicyError, Rule, parse_rules, rule_for
from tests.support.files import snapshot
from tests.support.signing_fixtures import Key
from tests.test_signing import FILES, _layers, cli, published, sign

PEM = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"


def test_a_policy_parses_into_rules():
    text = json.dumps([
        {"prefix": "registry.example.com/models", "keys": [PEM]},
        {"prefix": "ghcr.io/acme", "identities": ["https://token.actions.githubusercontent.com=https://github.com/acme/m"]},
        {"prefix": "registry.example.com/models/scratch"},
        {"prefix": "registry.internal:5000"},
    ])
    assert parse_rules(text, "MODEL_CACHE_SIGNATURE_POLICY") == (
        Rule("registry.example.com/models", (PEM,)),
        Rule("ghcr.io/acme", (), ("https://token.actions.githubusercontent.com=https://github.com/acme/m",)),
        Rule("registry.example.com/models/scratch"),
        Rule("registry.internal:5000"),
    )
    assert parse_rules("", "x") == parse_rules("  \n", "x") == ()


@pytest.mark.parametrize(("doc", "message"), [
    ("{", "P is not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)): write a list"),
    ('{"prefix": "a"}', "P is a JSON dict: write a list of rules"),
    ('["x"]', "P[0] is 'x': each rule is an object with prefix, keys and identities"),
    ('[{"prefix": "a.io", "key": []}]', "P[0] has unknown fields ['key']: a rule has only prefix, keys and identities"),
    ('[{"keys": []}]', "P[0].prefix is None: give host, host:port or host/repository-prefix"),
    ('[{"prefix": "https://a.io/m"}]', "P[0].prefix is 'https://a.io/m': give host, host:port or host/repository-prefix"
                                       " in lowercase, without a scheme, a tag or a trailing '/'"),
    ('[{"prefix": "a.io/m/"}]', "P[0].prefix is 'a.io/m/': give host"),
    ('[{"prefix": "A.io"}]', "P[0].prefix is 'A.io': give host"),
    ('[{"prefix": "a.io"}, {"prefix": "a.io"}]', "P[1].prefix 'a.io' appears in two rules: merge them"),
    ('[{"prefix": "a.io", "keys": "pem"}]', "P[0].keys is 'pem': give a list of strings"),
    ('[{"prefix": "a.io", "keys": ["not a key"]}]', "P[0].keys[0] is 'not a key': give a PEM public key"),
    ('[{"prefix": "a.io", "identities": ["dev@example.com"]}]',
     "P[0].identities[0] is 'dev@example.com': give ISSUER=SUBJECT, the OIDC issuer URL (https://...)"),
    ('[{"prefix": "a.io", "identities": ["http://i=x"]}]', "P[0].identities[0] is 'http://i=x': give ISSUER=SUBJECT"),
    (json.dumps([{"prefix": f"r{i}.io"} for i in range(MAX_RULES + 1)]),
     f"P has {MAX_RULES + 1} rules, over the limit of {MAX_RULES}: merge rules by prefix"),
    (json.dumps([{"prefix": "a.io", "keys": [PEM] * 17}]), "P[0].keys has 17 entries, over the limit of 16"),
])
def test_bad_policies_name_the_field_the_value_and_the_fix(doc, message):
    with pytest.raises(PolicyError) as e:
        parse_rules(doc, "P")
    assert message in str(e.value)


def test_the_longest_prefix_decides_on_path_boundaries():
    rules = parse_rules(json.dumps([
        {"prefix": "registry.example.com", "keys": [PEM]},
        {"prefix": "registry.example.com/models/scratch"},
        {"prefix": "registry.example.com/models", "keys": [PEM, PEM.replace("AE", "AF")]},
    ]), "P")
    host, scratch, models = rules
    assert rule_for("registry.example.com", "models/phi3", rules) is models
    assert rule_for("registry.example.com", "models", rules) is models
    assert rule_for("registry.example.com", "models2/phi3", rules) is host  # not a path boundary
    assert rule_for("registry.example.com", "models/scratch/x", rules) is scratch
    assert not scratch.required
    assert rule_for("REGISTRY.example.com", "other/x", rules) is host  # hosts compare case-blind
    # One registry, however it is spelt: the default port and Docker Hub's aliases cannot step around a rule.
    assert rule_for("registry.example.com:443", "models/phi3", rules) is models
    assert rule_for("registry.example.com:5000", "models/phi3", rules) is None  # another port: another registry
    assert rule_for("ghcr.io", "acme/m", rules) is None
    hub = parse_rules(json.dumps([{"prefix": "docker.io/acme", "keys": [PEM]}]), "P")
    for alias in ("docker.io", "index.docker.io", "registry-1.docker.io", "REGISTRY.hub.docker.com", "docker.io:443"):
        assert rule_for(alias, "acme/m", hub) is hub[0], alias


def test_a_star_rule_fails_closed_for_what_no_other_rule_matches():
    rules = parse_rules(json.dumps([{"prefix": "*", "keys": [PEM]}, {"prefix": "registry.example.com/scratch"}]), "P")
    star, scratch = rules
    assert rule_for("anything.example", "x/y", rules) is star and star.required
    assert rule_for("registry.example.com", "scratch/x", rules) is scratch


# --- a real pull under the policy --------------------------------------------------------------------------------


def test_each_model_must_satisfy_its_own_rule(capsys, pusher, registry, tmp_path):
    right, wrong = Key(tmp_path, "right"), Key(tmp_path, "wrong")
    policy = json.dumps([
        {"prefix": f"{registry.host}/signed", "keys": [right.pub_pem.decode()]},
        {"prefix": f"{registry.host}/signed/scratch"},
    ])
    cache = tmp_path / "cache"
    refs = {}
    for repo in ("signed/phi3", "signed/scratch/tmp", "free/phi3", "signed/wrongly"):
        # Distinct contents: a digest verified under the policy is verified wherever it is pulled from.
        pusher.push_artifact(repo, "v1", _layers({**FILES, "repo.txt": repo.encode()}))
        refs[repo] = f"{registry.host}/{repo}:v1"
    sign(capsys, refs["signed/phi3"], right)
    sign(capsys, refs["signed/wrongly"], wrong)

    def pull(ref: str) -> tuple[int, dict | None, str]:
        code, out, err = cli(capsys, "pull", ref, "--cache", str(cache), "--output", "json", "--progress", "none",
                             contract.FLAG_SIGNATURE_POLICY_DATA, policy)
        return code, (json.loads(out) if code == 0 else None), err

    code, res, err = pull(refs["signed/phi3"])
    assert code == 0, err
    assert res is not None and res["verified"]["signer"] == right.fingerprint
    assert published(cache, res["digest"]) == {**FILES, "repo.txt": b"signed/phi3"}
    for exempt in ("signed/scratch/tmp", "free/phi3"):  # an exempting rule; no rule at all
        code, res, err = pull(refs[exempt])
        assert code == 0, err
        assert res is not None and "verified" not in res
    before = snapshot(cache)
    code, res, err = pull(refs["signed/wrongly"])
    assert code == contract.ExitCode.SIGNATURE == 10
    assert f"{refs['signed/wrongly']}: model " in err and "is not signed as the policy requires" in err
    assert snapshot(cache) == before


@pytest.mark.parametrize(("extra", "message"), [
    ((contract.FLAG_SIGNATURE_POLICY_DATA, "[", ), "--signature-policy-data is not JSON"),
    ((contract.FLAG_SIGNATURE_POLICY_DATA, '[{"prefix": "a.io", "identities": ["https://i=x"]}]'),
     "--signature-policy-data names keyless identities but no trusted root was given"),
    ((contract.FLAG_SIGNATURE_POLICY_DATA, "[]", contract.FLAG_VERIFY_KEY_DATA, "eA=="),
     "--signature-policy names the keys per prefix: drop --verify-key"),
])
def test_bad_policy_flags_exit_2_before_the_cache(capsys, tmp_path, extra, message):
    code, _out, err = cli(capsys, "pull", "registry.example.com/m:v1", "--cache", str(tmp_path / "cache"), *extra)
    assert code == 2
    assert message in err
    assert not (tmp_path / "cache").exists()


# --- the webhook's side of the contract: what it injects, the loader enforces --------------------------------------


def test_the_loader_the_webhook_injects_enforces_the_policy(capsys, pusher, registry, tmp_path):
    """A pod mutated under MODEL_CACHE_SIGNATURE_POLICY: its init container's command line, $(VAR) expanded as kubelet
    does, run against the real registry: the signed model passes, the same pod for an unsigned one is exit 10."""
    from loader.cli import main
    from tests.support import kubelet
    from webhook import annotations as ann
    from webhook.config import Settings
    from webhook.mutate import mutate_pod
    from webhook.snapshot import snapshot_from

    right = Key(tmp_path, "right")
    settings = Settings(signature_policy=json.dumps([{"prefix": f"{registry.host}/team", "keys": [right.pub_pem.decode()]}]))
    crio = {"metadata": {"name": "n1"}, "status": {"nodeInfo": {"containerRuntimeVersion": "cri-o://1.34.1",
                                                                "kubeletVersion": "v1.35.0"}}}
    for repo, signed in (("team/signed", True), ("team/unsigned", False)):
        pusher.push_artifact(repo, "v1", _layers({**FILES, "repo.txt": repo.encode()}))
        ref = f"{registry.host}/{repo}:v1"
        if signed:
            sign(capsys, ref, right)
        pod = {"metadata": {"annotations": {ann.REF: ref}, "uid": "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"},
               "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "app:1"}]}}
        out = mutate_pod(pod, "open", None, snapshot_from([crio], []), settings)
        assert out.mode == ann.INIT_CONTAINER  # every node mounts image volumes, but the model must be signed
        pod = {**out.pod, "metadata": {**out.pod["metadata"], "uid": pod["metadata"]["uid"]}}
        [init] = out.pod["spec"]["initContainers"]
        argv = kubelet.expand_args([*init["command"], *init["args"]], kubelet.container_env(pod, init))
        argv = [str(tmp_path / "cache") if a == contract.CACHE_MOUNT else a for a in argv[1:]]
        before = snapshot(tmp_path / "cache") if (tmp_path / "cache").exists() else {}
        code = main(argv)
        err = capsys.readouterr().err
        if signed:
            assert code == 0, err
        else:
            assert code == 10, err
            assert "is not signed as the policy requires" in err
            assert snapshot(tmp_path / "cache") == before


def test_kubectl_apply_of_a_workload_asking_an_image_volume_for_a_signed_model_is_denied(tmp_path):
    from tests.test_admission import denied, fresh_snapshot, review
    from webhook import annotations as ann
    from webhook.admission import validate_review
    from webhook.config import Settings

    key = Key(tmp_path, "k")
    settings = Settings(signature_policy=json.dumps([{"prefix": "registry.example.com/models",
                                                      "keys": [key.pub_pem.decode()]}]))
    template = {"metadata": {"annotations": {ann.REF: "registry.example.com/models/phi3:v1", ann.MODE: "image-volume"}},
                "spec": {"containers": [{"name": "server", "image": "registry.example.com/vllm:1"}],
                         "nodeSelector": {"pool": "crio"}}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat"},
                  "spec": {"template": template}}
    assert validate_review(review(deployment, kind="Deployment", namespace="open"), fresh_snapshot(), settings) == denied(
        "model.cache/mode is 'image-volume', but model 'phi3' (registry.example.com/models/phi3:v1) must be signed (the"
        " cluster's signature policy for registry.example.com/models) and an image volume is mounted by the container"
        " runtime, which checks no signature; set model.cache/mode to auto, csi or init-container (the node agent or"
        " the loader verifies the signature)")


# --- the webhook's settings: a bad policy stops start-up, naming what is wrong ------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    ({"signature_policy": "[{"}, "MODEL_CACHE_SIGNATURE_POLICY: signature_policy is not JSON"),
    ({"signature_policy": '[{"prefix": "A.io"}]'}, "MODEL_CACHE_SIGNATURE_POLICY: signature_policy[0].prefix is 'A.io'"),
    ({"signature_policy": json.dumps([{"prefix": "a.io", "keys": [PEM]}])},
     "MODEL_CACHE_SIGNATURE_POLICY: signature_policy[0].keys[0] does not load as a public key"),
    ({"signature_policy": json.dumps([{"prefix": "a.io", "identities": ["https://i.example=dev@example.com"]}])},
     "MODEL_CACHE_SETTINGS: signature_policy names keyless identities but trusted_root is empty: set"
     " MODEL_CACHE_TRUSTED_ROOT to base64 of the Sigstore trusted root JSON"),
    ({"trusted_root": "not base64!"}, "MODEL_CACHE_TRUSTED_ROOT: trusted_root is not base64 of a JSON document"),
    ({"trusted_root": "bm90IGpzb24="}, "MODEL_CACHE_TRUSTED_ROOT: trusted_root is not base64 of a JSON document"),
], ids=["not-json", "bad-prefix", "pem-not-a-key", "identities-without-root", "root-not-base64", "root-not-json"])
def test_a_bad_policy_stops_the_webhook_at_start_up(overrides, message):
    from webhook.config import load_settings
    from webhook.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_settings(**overrides)
    assert str(e.value).startswith(f"invalid model-cache settings: {message}"), str(e.value)
