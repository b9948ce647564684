"""The container images, checked without a Docker engine or a builder: the Dockerfiles are parsed and held to what
the deployment relies on (one base pinned by digest, locked wheels fetched and hash-checked in one stage and only
installed in the last, pip settings only through build secrets, OCI labels, a precompiled standard library, a
numeric non-root USER that matches the Deployment, an exec-form ENTRYPOINT naming an installed console script, a
read-only-root-friendly environment), and .dockerignore is evaluated with Docker's matching rules.

The locks (requirements/*.txt) are checked against the installed distributions: each image's lock pins exactly
the closure of what that image installs, every pin with hashes, at the versions `make`'s venv holds; the loader's
lock holds no distribution only the webhook needs; the build lock pins pip and the setuptools that builds the
project, and `make` installs that pip before anything else.

The extras split is checked against the installed distributions: the loader image installs
``model-cache[agent,signing]`` and the webhook image ``model-cache[webhook]``; each side's imports (read from the
source, imports inside functions included) are declared where they are used; the loader's install set holds no
distribution of the webhook extra but what the loader's own dependencies require (typing-extensions through grpcio,
pydantic through sigstore), and the webhook's none of the agent and signing extras; and in an interpreter that can
import only what the loader image holds, every loader module imports and ``model-cache-webhook`` says which extra
to install.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import importlib.util
import json
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from loader import contract
from webhook.cli import WEBHOOK_EXTRA

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {"webhook": "Dockerfile.webhook", "loader": "Dockerfile.loader"}
ENTRYPOINTS = {"webhook": "model-cache-webhook", "loader": "model-loader"}
# The lock each image installs, and the one `make`'s venv installs.
LOCKS = {"webhook": "requirements/webhook.txt", "loader": "requirements/loader.txt", "dev": "requirements/dev.txt",
         "build": "requirements/build.txt"}
# The extras each lock's install set holds, besides [project].dependencies.
LOCK_EXTRAS = {"loader": ("agent", "signing"), "webhook": ("webhook",), "dev": ("webhook", "agent", "signing", "test")}
# One exact patch of a slim Debian 12 Python 3.11, pinned by the digest of its multi-arch index.
PINNED = re.compile(r"^python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}$")
BUILD_TOOLS = re.compile(r"\b(apt-get|apt|apk|gcc|g\+\+|make|build-essential|python3?-dev|setup\.py)\b")
PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}
SECRETS = ("type=secret,id=pip.conf", "type=secret,id=pip-ca")  # pip's settings, mounted for one RUN only


# --- a small Dockerfile parser ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str  # upper case
    flags: dict[str, tuple[str, ...]]  # --from=build, --mount=... (leading --x=y options; a flag may repeat)
    args: str  # the rest, as written

    def commands(self) -> list[tuple[dict[str, str], list[str]]]:
        """A shell-form RUN as its ``&&``-joined commands: (leading VAR=value assignments, argv) each."""
        out: list[tuple[dict[str, str], list[str]]] = [({}, [])]
        for word in shlex.split(self.args):
            env, argv = out[-1]
            if word == "&&":
                out.append(({}, []))
            elif not argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word):
                key, _, value = word.partition("=")
                env[key] = value
            else:
                argv.append(word)
        return out


@dataclasses.dataclass(frozen=True)
class Stage:
    base: str
    alias: str | None
    body: tuple[Instruction, ...]

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.body if i.name == name]


@dataclasses.dataclass(frozen=True)
class Dockerfile:
    args: dict[str, str]  # the global ARGs (before the first FROM) and their defaults
    stages: list[Stage]


def logical_lines(text: str) -> list[str]:
    """Instructions with continuations joined; comment lines (and parser directives) dropped, as Docker does."""
    out, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        if current.strip():
            out.append(current.strip())
        current = ""
    assert not current, "dangling line continuation"
    return out


def parse_instruction(line: str) -> Instruction:
    name, _, rest = line.partition(" ")
    flags: dict[str, tuple[str, ...]] = {}
    rest = rest.strip()
    while rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        key, _, value = token[2:].partition("=")
        flags[key] = (*flags.get(key, ()), value)
        rest = rest.strip()
    return Instruction(name.upper(), flags, rest)


def parse_dockerfile(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in map(parse_instruction, logical_lines(path.read_text())):
        if instruction.name == "FROM":
            words = instruction.args.split()
            alias = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            assert len(words) in (1, 3), instruction
            stages.append(Stage(words[0], alias, ()))
        elif not stages:
            assert instruction.name == "ARG", f"{path.name}: {instruction.name} before FROM"
            key, _, value = instruction.args.partition("=")
            args[key] = value
        else:
            last = stages[-1]
            stages[-1] = dataclasses.replace(last, body=last.body + (instruction,))
    return Dockerfile(args, stages)


def dockerfile(image: str) -> Dockerfile:
    return parse_dockerfile(ROOT / IMAGES[image])


def stages_of(image: str) -> list[Stage]:
    return dockerfile(image).stages


def final(image: str) -> Stage:
    return stages_of(image)[-1]


def words_of(instruction: Instruction) -> dict[str, str]:
    """ENV and LABEL: KEY=value words (the legacy ``ENV KEY value`` form is refused)."""
    out = {}
    for word in shlex.split(instruction.args):
        key, sep, value = word.partition("=")
        assert sep, f"use {instruction.name} KEY=value, not the legacy form: {instruction.args}"
        out[key] = value
    return out


def env_of(stage: Stage) -> dict[str, str]:
    return {k: v for i in stage.all("ENV") for k, v in words_of(i).items()}


def stage_args(stage: Stage) -> dict[str, str]:
    return {k: v for i in stage.all("ARG") for k, _, v in [i.args.partition("=")]}


def test_parser_reads_global_args_continuations_repeated_flags_and_stages(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text(
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python:3.11.15-slim-bookworm@sha256:" + "0" * 64 + "\n"
        "FROM ${BASE} AS build\n"
        "RUN --mount=type=secret,id=a --mount=type=bind,from=build,source=/w,target=/w \\\n"
        "    # a comment inside a continuation\n"
        "    X=1 Y='a b' echo a \\\n"
        "    && echo b\n"
        "FROM ${BASE}\n"
        'ENTRYPOINT ["x"]\n'
    )
    run = Instruction("RUN", {"mount": ("type=secret,id=a", "type=bind,from=build,source=/w,target=/w")},
                      "X=1 Y='a b' echo a && echo b")
    assert parse_dockerfile(path) == Dockerfile(
        {"BASE": "python:3.11.15-slim-bookworm@sha256:" + "0" * 64},
        [Stage("${BASE}", "build", (run,)), Stage("${BASE}", None, (Instruction("ENTRYPOINT", {}, '["x"]'),))],
    )
    assert run.commands() == [({"X": "1", "Y": "a b"}, ["echo", "a"]), ({}, ["echo", "b"])]


# --- the images ------------------------------------------------------------------------------------------------


def test_one_base_pinned_by_digest_and_documented():
    bases = {image: dockerfile(image).args for image in IMAGES}
    assert bases["loader"] == bases["webhook"] and set(bases["loader"]) == {"BASE"}
    base = bases["loader"]["BASE"]
    assert PINNED.match(base), base
    for image in IMAGES:
        assert [(s.base, s.alias) for s in stages_of(image)] == [("${BASE}", "build"), ("${BASE}", None)]
    # The README and the architecture doc name the same tag and digest, and say how to move them.
    tag, _, digest = base.partition("@")
    for doc in ("README.md", "docs/architecture.md"):
        text = (ROOT / doc).read_text()
        assert tag in text and digest in text, doc
        assert "buildx imagetools inspect" in text, doc


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_build_stage_fetches_only_the_locked_wheels_and_builds_the_project(image):
    build = stages_of(image)[0]
    assert [i.name for i in build.body] == ["WORKDIR", "COPY", "RUN", "COPY", "COPY", "COPY", "RUN"]
    assert [(i.flags, i.args) for i in build.all("COPY")] == [
        ({}, f"requirements/build.txt {LOCKS[image]} ./requirements/"),
        ({}, "pyproject.toml README.md ./"),
        ({}, "webhook ./webhook"),
        ({}, "loader ./loader"),
    ]
    fetch, wheel = build.all("RUN")
    # The only step that reaches an index: pip's settings (a private index, a proxy's CA) come from build secrets,
    # mounted for this step alone; every file is checked against the lock's hashes; no sdist is built.
    assert fetch.flags == {"mount": SECRETS}
    settings = {"PIP_CONFIG_FILE": "/run/secrets/pip.conf", **PIP_ENV}
    assert fetch.commands() == [
        (settings, ["python", "-m", "pip", "download", "--require-hashes", "--no-deps", "--only-binary=:all:",
                    "--dest", "/wheels", "-r", LOCKS[image]]),
        (settings, ["python", "-m", "pip", "install", "--require-hashes", "--no-deps", "-r", LOCKS["build"]]),
    ]
    # The project's wheel, with the locked setuptools (no isolated build environment fetching an unlocked one).
    assert wheel.flags == {}
    assert wheel.commands() == [
        (PIP_ENV, ["python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", "/wheels", "."])
    ]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_runtime_stage_installs_only_the_locked_wheels(image):
    stage = final(image)
    assert [i.name for i in stage.body] == (
        ["ARG"] * 4 + ["LABEL", "RUN", "ENV", "USER"] + (["EXPOSE"] if image == "webhook" else []) + ["ENTRYPOINT"]
    )
    [install] = stage.all("RUN")
    # The wheels and the lock come from the build stage through bind mounts (not a COPY, so they are not a
    # layer), pip may not reach an index, the lock's hashes are checked again, `pip check` proves the lock
    # complete, pip is removed once it has done its job, and the standard library is compiled.
    assert install.flags == {"mount": ("type=bind,from=build,source=/wheels,target=/wheels",
                                       "type=bind,from=build,source=/src/requirements,target=/requirements")}
    assert install.commands() == [
        (PIP_ENV, ["python", "-m", "pip", "install", "--no-index", "--find-links=/wheels", "--require-hashes",
                   "--no-deps", "-r", "/" + LOCKS[image]]),
        (PIP_ENV, ["python", "-m", "pip", "install", "--no-index", "--no-deps", "/wheels/model_cache-*.whl"]),
        ({}, ["python", "-m", "pip", "check"]),
        ({}, ["python", "-m", "pip", "uninstall", "--yes", "pip", "setuptools", "wheel"]),
        ({}, ["python", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
              "-x", "/site-packages/", "/usr/local/lib/python3.11"]),
    ]
    for instruction in stage.body:
        assert not BUILD_TOOLS.search(instruction.args), instruction
    assert stage.all("COPY") == [] and stage.all("ADD") == []


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_oci_labels_name_source_version_and_revision(image):
    stage = final(image)
    args = stage_args(stage)
    assert args == {"BASE": "", "VERSION": tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"],
                    "REVISION": "unknown", "SOURCE": "https://github.com/model-cache/model-cache"}
    [label] = stage.all("LABEL")
    labels = words_of(label)
    prefix = "org.opencontainers.image."
    assert {k.removeprefix(prefix) for k in labels} == {
        "title", "description", "source", "version", "revision", "licenses", "base.name"}
    assert labels[prefix + "source"] == "${SOURCE}"
    assert labels[prefix + "version"] == "${VERSION}"
    assert labels[prefix + "revision"] == "${REVISION}"
    assert labels[prefix + "base.name"] == "${BASE}"
    assert labels[prefix + "title"] == f"model-cache {image}"
    assert labels[prefix + "licenses"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_pip_settings_never_reach_a_layer(image):
    # No ENV or ARG carries pip settings, an index or a credential; the only secrets are the two mounts above.
    parsed = dockerfile(image)
    names = set(parsed.args) | {k for s in parsed.stages for k in (*env_of(s), *stage_args(s))}
    assert not {n for n in names if re.search(r"PIP|INDEX|TOKEN|PASSWORD|SECRET|CERT|PROXY", n, re.I)}
    mounts = [m for s in parsed.stages for i in s.body for m in i.flags.get("mount", ())]
    assert [m for m in mounts if "secret" in m] == list(SECRETS)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_user_is_numeric_and_not_root(image):
    [user] = final(image).all("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0
    assert (int(uid), int(gid)) == (65532, 65532)


def test_webhook_user_matches_the_deployment():
    # runAsNonRoot can only be verified by kubelet against a numeric USER; the Deployment pins the same ids.
    [user] = final("webhook").all("USER")
    documents = yaml.safe_load_all((ROOT / "manifests" / "base" / "deployment.yaml").read_text())
    [deployment] = [d for d in documents if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ids = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert user.args == ids == f"{container['securityContext']['runAsUser']}:{container['securityContext']['runAsGroup']}"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_entrypoint_is_an_installed_console_script(image):
    [entrypoint] = final(image).all("ENTRYPOINT")
    argv = json.loads(entrypoint.args)  # exec form: a JSON array, never a shell string
    assert argv == [ENTRYPOINTS[image]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.distribution("model-cache").entry_points
        if ep.group == "console_scripts"
    }
    assert installed == scripts
    module, _, func = scripts[argv[0]].partition(":")
    assert importlib.util.find_spec(module) is not None
    assert callable(getattr(importlib.import_module(module), func))  # loader.cli:entry, webhook's main
    assert (Path(sys.executable).parent / argv[0]).is_file()


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_no_shell_needed_at_run_time(image):
    stage = final(image)
    assert stage.all("CMD") == [] and stage.all("SHELL") == [] and stage.all("HEALTHCHECK") == []
    [entrypoint] = stage.all("ENTRYPOINT")
    assert entrypoint.args.startswith("[")


def test_loader_environment_keeps_writes_on_the_cache_volume():
    assert env_of(final("loader")) == {
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": posixpath.join(contract.CACHE_MOUNT, contract.TMP_DIR),
    }


def test_webhook_environment_writes_no_bytecode():
    assert env_of(final("webhook")) == {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


def test_readme_documents_the_multi_arch_build_and_which_builders_work():
    readme = (ROOT / "README.md").read_text()
    for image in IMAGES:
        header = (ROOT / IMAGES[image]).read_text()
        for text in (readme, header):
            assert f"docker buildx build --platform linux/amd64,linux/arm64 -f {IMAGES[image]}" in text
            assert f"podman build --platform linux/amd64,linux/arm64 -f {IMAGES[image]}" in text
            assert "--secret id=pip.conf,src=" in text
    assert "BuildKit" in readme and "buildah" in readme and "make lock" in readme


# --- the build context -----------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: * and ? stay within one path element, **/ spans any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def in_context(path: str) -> bool:
    """Whether Docker sends ``path`` (relative, posix): the last rule matching it or a parent directory wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negate, regex in dockerignore_rules():
        if any(regex.match(c) for c in candidates):
            included = negate
    return included


def test_dockerignore_matcher():
    assert _pattern_regex("**/__pycache__").match("__pycache__")
    assert _pattern_regex("**/__pycache__").match("a/b/__pycache__")
    assert not _pattern_regex("*").match("a/b")


@pytest.mark.parametrize(
    "path, sent",
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("webhook/cli.py", True),
        ("loader/contract.py", True),
        ("requirements/loader.txt", True),
        ("requirements/webhook.txt", True),
        ("requirements/build.txt", True),
        ("requirements/dev.txt", False),
        ("webhook/__pycache__/cli.cpython-311.pyc", False),
        ("loader/stray.pyc", False),
        (".venv/bin/python", False),
        (".git/HEAD", False),
        ("tests/test_images.py", False),
        ("manifests/base/deployment.yaml", False),
        ("certs/out/tls.key", False),
        (".demo/registry/data", False),
    ],
)
def test_build_context(path, sent):
    assert in_context(path) is sent


def test_context_holds_only_what_the_wheel_needs():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    sent = {p for p in tracked if in_context(p)}
    assert {"pyproject.toml", "README.md"} <= sent
    assert {p.split("/")[0] for p in sent} == {"pyproject.toml", "README.md", "requirements", "webhook", "loader"}
    assert {p for p in sent if p.startswith("requirements/")} == {LOCKS[i] for i in (*IMAGES, "build")}


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_copy_source_exists_and_is_in_the_context(image):
    sources = [
        src
        for stage in stages_of(image)
        for copy in stage.all("COPY")
        if "from" not in copy.flags
        for src in copy.args.split()[:-1]
    ]
    assert sources == ["requirements/build.txt", LOCKS[image], "pyproject.toml", "README.md", "webhook", "loader"]
    for src in sources:
        path = ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files and all(in_context(f.relative_to(ROOT).as_posix()) for f in files), src


# --- the extras split: the loader image holds what the loader imports, nothing of the webhook's ------------------

FIRST_PARTY = {"webhook", "loader", "tests", "bench", "examples"}
# The loader image's extras, besides [project].dependencies: the node agent's CSI plugin (loader.csi, grpcio and
# protobuf; the agent runs from the loader image) and signature verification (loader.signing: sigstore,
# model-signing).
LOADER_EXTRAS = ("agent", "signing")
# The whole install set of the loader image, besides the project: what LOADER_EXTRAS and [project].dependencies
# declare, and what they require. Most of it is sigstore's (tuf, securesystemslib, rich, requests, id, pyjwt, ...).
LOADER_CLOSURE = {
    # [project].dependencies
    "zstandard", "prometheus-client", "cryptography", "cffi", "pycparser",
    # agent
    "grpcio", "protobuf", "typing-extensions",
    # signing
    "sigstore", "sigstore-models", "sigstore-rekor-types", "model-signing", "pyopenssl", "annotated-types",
    "asn1crypto", "blake3", "certifi", "charset-normalizer", "click", "dnspython", "email-validator", "id", "idna",
    "in-toto-attestation", "markdown-it-py", "mdurl", "platformdirs", "pydantic", "pydantic-core", "pygments",
    "pyjwt", "requests", "rfc3161-client", "rfc8785", "rich", "securesystemslib", "tuf", "typing-inspection",
    "urllib3",
}
# In the webhook extra (the webhook imports them) and in the loader image all the same, as a requirement of one of
# the loader's own dependencies (the parent named here; others may require them too).
SHARED_BY_REQUIREMENT = {"typing-extensions": "grpcio", "pydantic": "sigstore"}
# The webhook image holds none of these (its install set is [project].dependencies and the webhook extra).
LOADER_ONLY = {"grpcio", "protobuf", "sigstore", "sigstore-models", "model-signing", "pyopenssl", "tuf"}
# The webhook extra's distributions that must never reach the loader image.
WEBHOOK_ONLY = {"fastapi", "starlette", "uvicorn", "httptools", "uvloop", "orjson", "pydantic-settings", "kubernetes",
                "pyyaml", "jsonpatch"}
# Declared in the webhook extra but never imported by name: uvicorn loads them (webhook/server.py's Config: uvloop
# by name, httptools through uvicorn's httptools protocol, which server.py subclasses to bound request heads).
UVICORN_LOADS = {"httptools": "from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol",
                 "uvloop": 'loop="uvloop"'}
# Declared in the signing extra but never imported by name: model_signing imports OpenSSL without declaring
# pyopenssl (here: the module that imports it, and the line).
MODEL_SIGNING_LOADS = {"pyopenssl": ("model_signing._signing.sign_certificate", "from OpenSSL import crypto")}


def declared(group: str) -> dict[str, Requirement]:
    """pyproject.toml's requirements: "project" for [project].dependencies, else that optional extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] if group == "project" else project["optional-dependencies"][group]
    return {canonicalize_name(r.name): r for r in map(Requirement, texts)}


def loader_side() -> dict[str, Requirement]:
    """What the loader image's install set declares: [project].dependencies and LOADER_EXTRAS."""
    return {name: r for group in ("project", *LOADER_EXTRAS) for name, r in declared(group).items()}


def closure(requirements: list[Requirement]) -> set[str]:
    """The distributions pip installs for ``requirements`` (with their extras), read off the installed metadata."""
    seen: set[tuple[str, str]] = set()
    todo = [(r, "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        dist = importlib.metadata.distribution(name)  # installed: `make` installs .[webhook,agent,signing,test]
        for wanted in ("", *req.extras):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            todo.extend((Requirement(t), wanted) for t in dist.requires or [])
    return {name for name, _ in seen}


def distributions_of(module: str) -> set[str]:
    """The installed distributions that provide top-level ``module``."""
    return {canonicalize_name(d) for d in importlib.metadata.packages_distributions().get(module, [])}


def third_party_imports(*folders: str) -> dict[str, dict[str, bool]]:
    """Top-level modules that aren't the standard library's or ours, imported anywhere under ``folders`` (inside
    functions too) -> {file:line: whether the import runs (False: only under ``if TYPE_CHECKING``)}."""
    found: dict[str, dict[str, bool]] = {}

    def visit(node: ast.AST, where: Path, runs: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, where, False)
            for child in node.orelse:
                visit(child, where, runs)
            return
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.partition(".")[0]
            if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                found.setdefault(top, {})[f"{where.relative_to(ROOT)}:{node.lineno}"] = runs
        for child in ast.iter_child_nodes(node):
            visit(child, where, runs)

    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            visit(ast.parse(path.read_text(), str(path)), path, True)
    return found


def test_the_loader_image_installs_no_distribution_of_the_webhook_extra():
    loader = closure(list(loader_side().values()))
    webhook = closure([*declared("project").values(), *declared("webhook").values()])
    assert loader == LOADER_CLOSURE
    # A webhook dependency reaches the loader image only as a requirement of one of the loader's own.
    assert loader & set(declared("webhook")) == set(SHARED_BY_REQUIREMENT), "a webhook dependency is in the loader image"
    for dist, required_by in SHARED_BY_REQUIREMENT.items():
        assert required_by in loader_side() and dist not in loader_side()
        assert dist in closure([loader_side()[required_by]]) - {required_by}
    assert set(declared("webhook")) >= WEBHOOK_ONLY and webhook - loader >= WEBHOOK_ONLY
    # And the webhook image holds nothing of the agent's or of signing's: the extras split works both ways.
    assert LOADER_CLOSURE >= LOADER_ONLY
    assert not webhook & LOADER_ONLY, "an agent or signing dependency is in the webhook image"
    assert not webhook & (set(declared("agent")) | set(declared("signing")))
    # Each distribution is declared once, in the one group that needs it.
    groups = ("project", "agent", "signing", "webhook", "test")
    for i, group in enumerate(groups):
        for other in groups[i + 1:]:
            assert not set(declared(group)) & set(declared(other)), (group, other)


def test_each_side_declares_what_it_imports():
    project, webhook, test = declared("project"), declared("webhook"), declared("test")
    loader = loader_side()
    for folders, allowed, closed in [
        (("loader",), set(loader), closure(list(loader.values()))),
        (("webhook",), set(project) | set(webhook), closure([*project.values(), *webhook.values()])),
        (("tests", "bench", "examples"), set(loader) | set(webhook) | set(test), None),
    ]:
        for module, sites in third_party_imports(*folders).items():
            dists = distributions_of(module)
            assert dists, f"{module} (imported at {sorted(sites)}) is not installed"
            # An import that runs needs its distribution declared on that side; a type-only one, in its closure.
            if any(sites.values()):
                assert dists & allowed, f"{folders}: {module} ({sorted(sites)}) is not declared for it"
            elif closed is not None:
                assert dists & closed, f"{folders}: {module} ({sorted(sites)}) is not installed with it"
    # And each runtime dependency is imported where it is declared: the loader's (with the agent and signing
    # extras) by the loader, the webhook extra's by the webhook and not by the loader (else it belongs to
    # [project].dependencies), the agent and signing extras' not by the webhook (else they belong to the core).
    imported = {
        side: {d for m, sites in third_party_imports(side).items() if any(sites.values()) for d in distributions_of(m)}
        for side in IMAGES
    }
    assert set(loader) - set(MODEL_SIGNING_LOADS) == imported["loader"]
    assert not set(webhook) & imported["loader"]
    assert not (set(loader) - set(project)) & imported["webhook"]
    for dist, (module, named) in MODEL_SIGNING_LOADS.items():
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None and named in Path(spec.origin).read_text()
        assert dist in declared("signing") and dist not in imported["loader"]
    server = (ROOT / "webhook" / "server.py").read_text()
    for dist, named in UVICORN_LOADS.items():
        assert named in server and dist in webhook and dist not in imported["webhook"]
    assert set(webhook) - set(UVICORN_LOADS) == imported["webhook"] - set(project)


def test_the_cli_knows_the_webhook_extra_modules():
    # webhook.cli turns a ModuleNotFoundError of one of these into "install model-cache[webhook]". A module of a
    # core dependency it also names (cryptography, core since loader.signing imports it) never fires: every
    # install holds it.
    webhook, project = set(declared("webhook")), set(declared("project"))
    modules = {m for m in third_party_imports("webhook") if distributions_of(m) & webhook}
    core = {m for m in WEBHOOK_EXTRA if distributions_of(m) & project}
    assert modules | set(UVICORN_LOADS) == WEBHOOK_EXTRA - core


# A child interpreter that can import only what the loader image holds: the standard library, the project, and
# the top-level modules of LOADER_CLOSURE's distributions.
LOADER_IMAGE_PYTHON = """
import importlib.abc, sys
ALLOWED = set(sys.argv[1].split(","))
class LoaderImageOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        # _sysconfigdata_*: the standard library's build variables (sysconfig; zoneinfo reads TZPATH from them)
        if top in sys.stdlib_module_names or top.startswith("_sysconfigdata_") or top in ALLOWED:
            return None
        raise ModuleNotFoundError(f"No module named {name!r} (not in the loader image)", name=name)
sys.meta_path.insert(0, LoaderImageOnly())
"""


def in_loader_image(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    allowed = {"webhook", "loader"} | {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if {canonicalize_name(d) for d in dists} <= LOADER_CLOSURE
    }
    return subprocess.run(
        [sys.executable, "-c", LOADER_IMAGE_PYTHON + code, ",".join(sorted(allowed)), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def test_every_loader_module_imports_with_only_the_loader_images_packages():
    done = in_loader_image(
        "import pkgutil, importlib, loader\n"
        "names = [m.name for m in pkgutil.walk_packages(loader.__path__, 'loader.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names), 'loader modules imported', flush=True)\n"
        "import yaml\n"  # and the blocker works
    )
    assert re.fullmatch(r"(\d+) loader modules imported\n", done.stdout), done.stderr
    assert int(done.stdout.split()[0]) >= 20
    assert done.returncode == 1
    assert done.stderr.endswith("ModuleNotFoundError: No module named 'yaml' (not in the loader image)\n"), done.stderr


# Not `certs`: it needs only cryptography, a core dependency, so it runs from the loader image too.
@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--tls-cert", "/nonexistent/c", "--tls-key", "/nonexistent/k"],
        ["mutate", "-f", "/nonexistent/pods.yaml"],
    ],
    ids=lambda argv: argv[0],
)
def test_the_webhook_cli_without_its_extra_says_what_to_install(argv):
    done = in_loader_image("import sys\nfrom webhook.cli import main\nsys.exit(main(sys.argv[2:]))\n", *argv)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("model-cache-webhook: ") and line.endswith("install model-cache[webhook]"), line


# --- the locks: every image's install set pinned with hashes, and used -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pin:
    version: str
    hashes: frozenset[str]


def read_lock(which: str) -> dict[str, Pin]:
    """A lock as pip-compile writes it (NAME==VERSION, then --hash=sha256:... options; comments and "via" lines)."""
    pins: dict[str, Pin] = {}
    text = (ROOT / LOCKS[which]).read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.partition("#")[0].strip()
        if not line:
            continue
        requirement, *options = line.split()
        req = Requirement(requirement)
        [spec] = req.specifier
        assert spec.operator == "==" and not req.extras and req.marker is None, line
        assert options and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", o) for o in options), line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{LOCKS[which]}: {name} twice"
        pins[name] = Pin(spec.version, frozenset(o.removeprefix("--hash=") for o in options))
    return pins


def install_set(which: str) -> set[str]:
    """The distributions pip installs for the project with the lock's extras, besides the project itself."""
    wanted = [*declared("project").values(), *(r for extra in LOCK_EXTRAS[which] for r in declared(extra).values())]
    return closure(wanted)


@pytest.mark.parametrize("which", sorted(LOCK_EXTRAS))
def test_each_lock_pins_its_whole_install_set_with_hashes(which):
    lock = read_lock(which)
    # Exactly the closure: nothing missing (--require-hashes would refuse the build), nothing extra.
    assert set(lock) == install_set(which)
    # One set of versions: the images' locks are dev.txt's pins, hashes and all, and dev.txt is what `make`'s
    # venv holds (the metadata the closure above was read from is that of the locked versions).
    dev = read_lock("dev")
    assert {name: dev[name] for name in lock} == lock
    assert {name: importlib.metadata.version(name) for name in lock} == {n: p.version for n, p in lock.items()}


def test_the_loader_lock_holds_no_webhook_only_distribution():
    loader, webhook = read_lock("loader"), read_lock("webhook")
    assert set(loader) == LOADER_CLOSURE
    webhook_only = set(webhook) - install_set("loader")
    assert webhook_only >= WEBHOOK_ONLY
    assert not set(loader) & webhook_only
    # And the webhook's lock none of the agent's or signing's: what the two share is the core's closure and what
    # both sides' own dependencies require (pydantic, typing-extensions, requests, ...).
    assert not set(webhook) & LOADER_ONLY
    assert set(webhook) & set(loader) >= closure(list(declared("project").values())) | set(SHARED_BY_REQUIREMENT)


def test_the_build_lock_pins_pip_and_a_setuptools_that_builds_the_project():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [requires] = pyproject["build-system"]["requires"]
    req = Requirement(requires)
    # license = "Apache-2.0" (a PEP 639 expression) needs setuptools 77; 70 fails to build the project.
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert req.name == "setuptools" and "76.9" not in req.specifier and "77.0" in req.specifier
    # build.in, what build.txt is compiled from: pip, and the build-system's own requirement, to the letter.
    lines = [line.partition("#")[0].strip() for line in (ROOT / "requirements/build.in").read_text().splitlines()]
    assert [line for line in lines if line] == ["pip", requires]
    build = read_lock("build")
    assert set(build) == {"pip", "setuptools"} and build["setuptools"].version in req.specifier
    assert SpecifierSet(">=77").contains(build["setuptools"].version)
    # At dev.txt's versions where dev.txt pins them too (grpcio-tools needs setuptools): `make` installs both
    # locks in one pip call, which two pins of one name would fail; and the venv holds those versions.
    dev = read_lock("dev")
    assert {name: dev[name] for name in set(build) & set(dev)} == {name: build[name] for name in set(build) & set(dev)}
    assert {name: importlib.metadata.version(name) for name in build} == {n: p.version for n, p in build.items()}


def makefile_rule(target: str) -> list[str]:
    """The recipe lines of one Makefile rule, with make's variables left as written."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{re.escape(target)}\s*:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_installs_the_dev_lock_and_refreshes_every_lock():
    assert makefile_rule("$(STAMP)") == [
        "$(PYTHON) -m venv $(VENV)",
        # The locked pip first (no unpinned upgrade: `make` is reproducible), hash-checked like everything after.
        "$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements/build.txt",
        "$(PY) -m pip install --quiet --require-hashes -r requirements/dev.txt -r requirements/build.txt",
        "$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .",
        "touch $(STAMP)",
    ]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\): pyproject\.toml requirements/dev\.txt requirements/build\.txt$", makefile, re.M)
    written = [re.search(r"-o (\S+) (?:pyproject\.toml|requirements/build\.in)$", line) for line in makefile_rule("lock")]
    assert sorted(m.group(1) for m in written if m) == sorted(LOCKS.values())
    assert "--generate-hashes" in makefile and "CUSTOM_COMPILE_COMMAND='make lock'" in makefile
    for path in LOCKS.values():
        assert "#    make lock\n" in (ROOT / path).read_text(), f"{path} says how it is refreshed"
