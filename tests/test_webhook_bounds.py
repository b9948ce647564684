"""Hostile pods against the pure core: names chosen to collide, counts over the ceilings, names that would become
paths, annotation values with control characters. Work is counted (probes of the name set), never timed."""

from __future__ import annotations

import re
from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from loader import contract
from tests.support.k8s_validate import assert_valid_pod
from webhook import admission, mutate
from webhook import annotations as ann
from webhook.config import Settings
from webhook.errors import Denied
from webhook.mutate import (
    MAX_ANNOTATION_CHARS,
    MAX_CONTAINERS,
    MAX_MODEL_MOUNTS,
    MAX_MODELS,
    MAX_PULL_SECRETS,
    MAX_VOLUMES,
    Namer,
    mutate_pod,
)
from webhook.snapshot import EMPTY

SETTINGS = Settings()
REF = "registry.example.com/models/phi3:v1"
DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")


def pod(annotations: dict[str, str] | None = None, **spec: object) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web",
            "annotations": {ann.REF: REF, ann.MODE: "init-container", **(annotations or {})},
        },
        "spec": {"containers": [{"name": "server", "image": "registry.example.com/app/server:1"}], **spec},
    }


def colliding(n: int) -> list[str]:
    """``n`` distinct secret names that all map to the DNS label ``regcred-a`` (case and separators differ)."""
    seps = ["-", "_", ".", "__", "..", "_.", "._", "___", "..."]
    out = []
    for i in range(n):
        word = "".join(c.upper() if i >> k & 1 else c for k, c in enumerate("regcred"))
        out.append(f"{word}{seps[(i >> 7) % len(seps)]}{'A' if i >> 7 >= len(seps) else 'a'}" + "_" * (i // 1152))
    assert len(set(out)) == n and {mutate._dns_label(s) for s in out} == {"regcred-a"}
    return out


class CountingNamer(Namer):
    made: ClassVar[list[Namer]] = []

    def __init__(self, taken: set[str]) -> None:
        super().__init__(taken)
        CountingNamer.made.append(self)


@pytest.fixture
def namers(monkeypatch):
    CountingNamer.made = []
    monkeypatch.setattr(mutate, "Namer", CountingNamer)
    return CountingNamer.made


# --- naming: O(1) per name --------------------------------------------------------------------------------------


def test_twenty_thousand_colliding_names_take_linear_probes():
    names = colliding(20_000)
    # The pod also holds the suffixed names a per-stem counter would try first.
    taken = {f"model-cache-pull-regcred-a-{n}" for n in range(2, 5_000)}
    namer = Namer(set(taken))
    got = [namer.name(mutate.PULL_SECRET_VOLUME + s) for s in names]
    assert len(set(got)) == len(got) and not set(got) & taken
    assert all(DNS_LABEL.fullmatch(n) for n in got)
    # One probe per name plus at most one failed probe per taken name: linear (the old probing took ~2e8).
    assert namer.probes <= len(names) + len(taken) + len(got)
    assert namer.probes == 20_000 + 4_998 + 19_999


@hyp_settings(max_examples=200, deadline=None)
@given(
    bases=st.lists(st.text(alphabet="aA-_.9", max_size=70), max_size=40),
    taken=st.sets(st.text(alphabet="a-9", min_size=1, max_size=66), max_size=40),
)
def test_names_are_fresh_dns_labels_in_linear_probes(bases, taken):
    namer = Namer(set(taken))
    got = [namer.name(b) for b in bases]
    assert len(set(got)) == len(got) and not set(got) & taken
    assert all(DNS_LABEL.fullmatch(n) for n in got)
    # A stem and a successful suffix per name, and at most one failed probe per name taken before or since.
    assert namer.probes <= 3 * len(bases) + len(taken)


def test_review_with_twenty_thousand_colliding_pull_secrets_is_denied_without_naming(namers):
    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "models",
            "operation": "CREATE",
            "object": pod(imagePullSecrets=[{"name": s} for s in colliding(20_000)]),
        },
    }
    answer = admission.mutate_review(body, EMPTY, SETTINGS)
    assert answer["response"] == {
        "uid": "u1",
        "allowed": False,
        "status": {
            "code": 403,
            "reason": "Forbidden",
            "message": "spec.imagePullSecrets has 20000 entries, over this webhook's limit of 256 (model.cache"
            " processes no pod beyond it); split the pod or remove entries it does not use",
        },
    }
    assert namers == []  # refused before any name was looked for


def test_pull_secrets_at_the_ceiling_are_all_mounted_in_linear_probes(namers):
    # Valid secret names (DNS subdomains: '.' or '-' between the letters) that all map to one volume name,
    # model-cache-pull-r-e-g-c-r-e-d-a-b-c, which the pod also holds with the suffixes -2 to -299.
    names = [
        "".join(c + (".-"[i >> k & 1] if k < 9 else "") for k, c in enumerate("regcredabc"))
        for i in range(MAX_PULL_SECRETS)
    ]
    volumes = [{"name": f"model-cache-pull-r-e-g-c-r-e-d-a-b-c-{n}", "emptyDir": {}} for n in range(2, 300)]
    outcome = mutate_pod(pod(imagePullSecrets=[{"name": s} for s in names], volumes=volumes), "ml", None, EMPTY, SETTINGS)
    spec = outcome.pod["spec"]
    secret_volumes = [v for v in spec["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in secret_volumes] == names
    loader = spec["initContainers"][0]
    mounts = {m["name"]: m["mountPath"] for m in loader["volumeMounts"]}
    assert [mounts[v["name"]] for v in secret_volumes] == [f"{contract.DOCKER_CONFIG_MOUNT}/{i}" for i in range(len(names))]
    volume_namer, container_namer = namers
    # The cache volume, each secret's stem, a suffix for all secrets but the first, and each taken suffix once.
    assert volume_namer.probes == 1 + len(names) + (len(names) - 1) + len(volumes)
    assert container_namer.probes == 1
    assert_valid_pod(outcome.pod)


# --- ceilings ---------------------------------------------------------------------------------------------------


def _containers(n: int) -> list[dict]:
    return [{"name": f"c{i}", "image": "registry.example.com/app/server:1"} for i in range(n)]


@pytest.mark.parametrize(
    "make,message,limit",
    [
        pytest.param(
            lambda n: pod(initContainers=_containers(n - 1)),
            "spec.containers, spec.initContainers and spec.ephemeralContainers has {n} containers, over this"
            " webhook's limit of {limit} (model.cache processes no pod beyond it); split the pod or remove"
            " containers it does not use",
            MAX_CONTAINERS,
            id="containers",
        ),
        pytest.param(
            lambda n: pod(volumes=[{"name": f"v{i}", "emptyDir": {}} for i in range(n)]),
            "spec.volumes has {n} volumes, over this webhook's limit of {limit} (model.cache processes no pod beyond"
            " it); split the pod or remove volumes it does not use",
            MAX_VOLUMES,
            id="volumes",
        ),
        pytest.param(
            lambda n: pod(imagePullSecrets=[{"name": f"s{i}"} for i in range(n)]),
            "spec.imagePullSecrets has {n} entries, over this webhook's limit of {limit} (model.cache processes no"
            " pod beyond it); split the pod or remove entries it does not use",
            MAX_PULL_SECRETS,
            id="pull-secrets",
        ),
    ],
)
def test_counts_over_the_ceiling_are_denied_naming_field_and_limit(make, message, limit):
    assert mutate_pod(make(limit), "ml", None, EMPTY, SETTINGS).mode == ann.INIT_CONTAINER  # at it: served
    with pytest.raises(Denied) as exc:
        mutate_pod(make(limit + 1), "ml", None, EMPTY, SETTINGS)
    assert exc.value.message == message.format(n=limit + 1, limit=limit)


def _models(n: int) -> str:
    return ", ".join(f"m{i}=r.io/m:{i}" for i in range(n))


def test_models_over_the_ceiling_are_denied_naming_the_limit():
    assert len(mutate_pod(pod({ann.REF: _models(MAX_MODELS)}), "ml", None, EMPTY, SETTINGS).pod["spec"]["containers"][0]
               ["volumeMounts"]) == MAX_MODELS  # at it: served
    with pytest.raises(Denied) as exc:
        mutate_pod(pod({ann.REF: _models(MAX_MODELS + 1)}), "ml", None, EMPTY, SETTINGS)
    assert exc.value.message == (
        f"model.cache/ref names {MAX_MODELS + 1} models, over this webhook's limit of {MAX_MODELS} (model.cache"
        " processes no pod beyond it); split the pod or remove models it does not use")


def test_model_mounts_over_the_ceiling_are_denied_naming_the_limit():
    # models x target containers: each pair is a mount and an env var in the target.
    per = MAX_MODEL_MOUNTS // MAX_MODELS
    served = pod({ann.REF: _models(MAX_MODELS)}, containers=_containers(per))
    assert mutate_pod(served, "ml", None, EMPTY, SETTINGS).mode == ann.INIT_CONTAINER
    with pytest.raises(Denied) as exc:
        mutate_pod(pod({ann.REF: _models(MAX_MODELS)}, containers=_containers(per + 1)), "ml", None, EMPTY, SETTINGS)
    assert exc.value.message == (
        f"model.cache/ref and model.cache/containers: {MAX_MODELS} models in {per + 1} containers are"
        f" {MAX_MODELS * (per + 1)} mounts, over this webhook's limit of {MAX_MODEL_MOUNTS}; list only the containers"
        " that read the models in model.cache/containers")


@pytest.mark.parametrize("key", [ann.REF, ann.MOUNT_PATH, ann.CONTAINERS, ann.MODE, ann.CACHE])
def test_annotation_values_over_the_ceiling_are_denied_with_the_value_cut(key):
    value = "x" * (MAX_ANNOTATION_CHARS + 1)
    with pytest.raises(Denied) as exc:
        mutate_pod(pod({key: value}), "ml", None, EMPTY, SETTINGS)
    assert exc.value.message == (
        f"{key} is {MAX_ANNOTATION_CHARS + 1} characters long, over this webhook's limit of {MAX_ANNOTATION_CHARS}:"
        f" {'x' * 80!r}... ({MAX_ANNOTATION_CHARS + 1} characters); shorten it"
    )


def test_a_pod_without_the_ref_annotation_is_never_counted():
    big = pod(imagePullSecrets=[{"name": "../x"}] * (MAX_PULL_SECRETS + 1))
    del big["metadata"]["annotations"][ann.REF]
    assert mutate_pod(big, "ml", None, EMPTY, SETTINGS).mode is None


# --- names from the pod never become paths ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../../cache/refs", "..", "a/b", "RegCred", "regcred.", "-regcred", "reg\ncred", "regcred\n", "rég", "x" * 254],
    ids=["dotdot-path", "dotdot", "slash", "upper", "trailing-dot", "leading-dash", "newline", "trailing-newline",
         "non-ascii", "too-long"],
)
def test_pull_secret_names_that_are_not_dns_subdomains_are_denied(name):
    with pytest.raises(Denied) as exc:
        mutate_pod(pod(imagePullSecrets=[{"name": "regcred"}, {"name": name}]), "ml", None, EMPTY, SETTINGS)
    assert exc.value.message == (
        f"spec.imagePullSecrets[1].name is {ann.shown(name)}, which cannot be a Secret's name (a DNS subdomain: up"
        " to 253 lowercase letters, digits, '-' and '.'); name the pull secret as it is called in the namespace"
    )


def test_pull_secret_directories_are_positions_not_names():
    secrets = [{"name": "regcred"}, {}, {"name": "team.registry-creds"}, {"name": "regcred"}, {"name": "a" * 253}]
    outcome = mutate_pod(pod(imagePullSecrets=secrets), "ml", None, EMPTY, SETTINGS)
    loader = outcome.pod["spec"]["initContainers"][0]
    dirs = [m["mountPath"] for m in loader["volumeMounts"] if m["mountPath"].startswith(contract.DOCKER_CONFIG_MOUNT)]
    assert dirs == [f"{contract.DOCKER_CONFIG_MOUNT}/{i}" for i in range(3)]
    args = loader["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == contract.FLAG_DOCKER_CONFIG] == dirs
    assert_valid_pod(outcome.pod)


# --- annotation values: control characters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,char",
    [("/models\x00", "\x00"), ("/mo\ndels", "\n"), ("/models/\x1b[31m", "\x1b"), ("/mo\tdels", "\t"),
     ("/models\x85", "\x85"), ("/models\u2028x", "\u2028"), ("/models\x7f", "\x7f")],
    ids=["nul", "inner-newline", "escape", "tab", "nel", "line-separator", "del"],
)
def test_control_characters_in_the_mount_path_are_denied(value, char):
    with pytest.raises(Denied) as exc:
        mutate_pod(pod({ann.MOUNT_PATH: value}), "ml", None, EMPTY, SETTINGS)
    if char in "\n\t":
        assert exc.value.message == (
            f"{ann.MOUNT_PATH} is {value!r}, which contains the control character {char!r}: use an absolute"
            " directory of printable characters, such as /models"
        )
    else:  # refused for every annotation before the mount path is read
        assert exc.value.message == (
            f"{ann.MOUNT_PATH} is {value!r}, which contains the control character {char!r}: write the value with"
            " printable characters only (commas, spaces and newlines may separate list entries)"
        )


@pytest.mark.parametrize("key,value", [
    (ann.REF, REF + "\x07"), (ann.CONTAINERS, "server\x00"), (ann.MODE, "auto\x0b"), (ann.CACHE, "pod\x1c"),
    (ann.REF, "\x85" + REF),
], ids=["ref-bell", "containers-nul", "mode-vt", "cache-file-separator", "ref-nel-before"])
def test_control_characters_in_any_annotation_are_denied(key, value):
    with pytest.raises(Denied) as exc:
        mutate_pod(pod({key: value}), "ml", None, EMPTY, SETTINGS)
    char = ann.CONTROL.search(value)
    assert char is not None
    assert exc.value.message == (
        f"{key} is {value!r}, which contains the control character {char.group()!r}: write the value with"
        " printable characters only (commas, spaces and newlines may separate list entries)"
    )


@pytest.mark.parametrize("annotations", [
    {ann.REF: REF + "\n"}, {ann.REF: "a=" + REF + ",\n  b=" + REF + "\n"}, {ann.MOUNT_PATH: " /models\n"},
    {ann.CACHE: "pvc:claim\n"}, {ann.MODE: "init-container\r\n"},
], ids=["ref-trailing-newline", "ref-block-scalar", "mount-path-edges", "cache-trailing-newline", "mode-crlf"])
def test_ascii_whitespace_around_values_is_dropped(annotations):
    outcome = mutate_pod(pod(annotations), "ml", None, EMPTY, SETTINGS)
    assert outcome.mode == ann.INIT_CONTAINER
    assert_valid_pod(outcome.pod)


@pytest.mark.parametrize("annotations,message", [
    ({ann.REF: "registry.example.com/models/phi3\n:v1"},
     "model.cache/ref: reference 'registry.example.com/models/phi3\\n:v1' has repository 'models/phi3\\n': use"
     " lowercase letters, digits and separators ('.', '_', '__', '-') between '/'-separated components"),
    ({ann.REF: "registry.example.com/models/phi3:v\u0661"},
     "model.cache/ref: reference 'registry.example.com/models/phi3:v\u0661' has tag 'v\u0661': a tag is up to 128"
     " ASCII letters, digits, '_', '.' or '-' and does not start with '.' or '-'"),
    ({ann.REF: "x\u00a0=" + REF},
     "model.cache/ref: model name 'x\\xa0' cannot be a directory name here: use 1-63 letters, digits, '.', '_'"
     " or '-', starting and ending with a letter or digit (set it with name=REF)"),
    ({ann.CACHE: "pvc:cla\u0131m"},
     "model.cache/cache is 'pvc:cla\u0131m': claim name 'cla\u0131m' is not a valid PersistentVolumeClaim name"
     " (lowercase letters, digits, '-' and '.')"),
    ({ann.CACHE: "pvc:claim\n.x"},
     "model.cache/cache is 'pvc:claim\\n.x': claim name 'claim\\n.x' is not a valid PersistentVolumeClaim name"
     " (lowercase letters, digits, '-' and '.')"),
], ids=["repository-newline", "tag-arabic-digit", "name-nbsp", "claim-dotless-i", "claim-inner-newline"])
def test_grammars_are_ascii_and_whole(annotations, message):
    with pytest.raises(Denied) as exc:
        mutate_pod(pod(annotations), "ml", None, EMPTY, SETTINGS)
    assert exc.value.message == message


def test_thousands_of_unknown_annotations_draw_a_bounded_set_of_warnings():
    extra = {f"{ann.PREFIX}x{i}": "1" for i in range(5_000)}
    outcome = mutate_pod(pod(extra), "ml", None, EMPTY, SETTINGS)
    known = "ref, mount-path, containers, mode, cache"
    assert outcome.warnings == (
        *(f"model.cache: unknown annotation {ann.PREFIX}x{i} ignored (known: {known})" for i in range(8)),
        "model.cache: 4992 more unknown model.cache annotations ignored",
    )


def test_model_names_that_differ_only_in_separator_runs_get_distinct_image_volumes(namers):
    names = ["a-b", "a..b", "a...b", "a....b", "a" + "." * 60 + "b"]  # one volume stem, distinct variables
    refs = ",".join(f"{name}={REF}" for name in names)
    outcome = mutate_pod(pod({ann.REF: refs, ann.MODE: "image-volume"}), "ml", None, EMPTY, SETTINGS)
    spec = outcome.pod["spec"]
    pairs = zip(spec["volumes"], spec["containers"][0]["volumeMounts"], strict=True)
    assert [(v["name"], m["mountPath"]) for v, m in pairs] == [
        ("model-a-b", "/models/a-b"),
        ("model-a-b-2", "/models/a..b"),
        ("model-a-b-3", "/models/a...b"),
        ("model-a-b-4", "/models/a....b"),
        ("model-a-b-5", "/models/a" + "." * 60 + "b"),
    ]
    assert [n.probes for n in namers] == [1 + 2 * 4]
    assert_valid_pod(outcome.pod)


@pytest.mark.parametrize(
    "annotations,message",
    [
        ({ann.CONTAINERS: ",".join(f"n{i}" for i in range(20))},
         f"{ann.CONTAINERS} names {', '.join(repr(f'n{i}') for i in range(8))} and more, not a container of this pod;"
         " containers: server"),
        ({ann.REF: "y" * 200 + "=" + REF},
         f"{ann.REF}: model name {'y' * 80!r}... (200 characters) cannot be a directory name here: use 1-63 letters,"
         " digits, '.', '_' or '-', starting and ending with a letter or digit (set it with name=REF)"),
    ],
    ids=["many-unknown-containers", "long-model-name"],
)
def test_denials_show_long_values_cut(annotations, message):
    with pytest.raises(Denied) as exc:
        mutate_pod(pod(annotations), "ml", None, EMPTY, SETTINGS)
    assert exc.value.message == message
