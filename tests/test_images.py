"""The container images, checked without a Docker engine: the Dockerfiles are parsed and held to what the
deployment relies on (a pinned slim base, wheels built in one stage and only installed in the last, a numeric
non-root USER that matches the Deployment, an exec-form ENTRYPOINT naming an installed console script, a
read-only-root-friendly environment), and .dockerignore is evaluated with Docker's matching rules.
"""

from __future__ import annotations

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

from loader import contract

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {"webhook": "Dockerfile.webhook", "loader": "Dockerfile.loader"}
ENTRYPOINTS = {"webhook": "model-cache-webhook", "loader": "model-loader"}
BASE = "python:3.11.14-slim-bookworm"
# An exact patch version of a slim Debian 12 Python 3.11, optionally also pinned by digest.
PINNED = re.compile(r"^python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$")
BUILD_TOOLS = re.compile(r"\b(apt-get|apt|apk|gcc|g\+\+|make|build-essential|python3?-dev|pip wheel|setup\.py)\b")


# --- a small Dockerfile parser ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str  # upper case
    flags: dict[str, str]  # --from=build, --mount=... (leading --x=y options)
    args: str  # the rest, as written


@dataclasses.dataclass(frozen=True)
class Stage:
    base: str
    alias: str | None
    body: tuple[Instruction, ...]

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.body if i.name == name]


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
    flags = {}
    rest = rest.strip()
    while rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        key, _, value = token[2:].partition("=")
        flags[key] = value
        rest = rest.strip()
    return Instruction(name.upper(), flags, rest)


def parse_dockerfile(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for instruction in map(parse_instruction, logical_lines(path.read_text())):
        if instruction.name == "FROM":
            words = instruction.args.split()
            alias = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            assert len(words) in (1, 3), instruction
            stages.append(Stage(words[0], alias, ()))
        else:
            assert stages, f"{path.name}: {instruction.name} before FROM"
            last = stages[-1]
            stages[-1] = dataclasses.replace(last, body=last.body + (instruction,))
    return stages


def stages_of(image: str) -> list[Stage]:
    return parse_dockerfile(ROOT / IMAGES[image])


def final(image: str) -> Stage:
    return stages_of(image)[-1]


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"use ENV KEY=value, not the legacy form: {instruction.args}"
            env[key] = value
    return env


def test_parser_reads_continuations_flags_and_stages(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.11.14-slim-bookworm AS build\n"
        "RUN --mount=type=bind,from=build,source=/w,target=/w \\\n"
        "    # a comment inside a continuation\n"
        "    echo a \\\n"
        "    && echo b\n"
        "FROM python:3.11.14-slim-bookworm\n"
        'ENTRYPOINT ["x"]\n'
    )
    assert parse_dockerfile(dockerfile) == [
        Stage(BASE, "build", (Instruction("RUN", {"mount": "type=bind,from=build,source=/w,target=/w"},
                                          "echo a && echo b"),)),
        Stage(BASE, None, (Instruction("ENTRYPOINT", {}, '["x"]'),)),
    ]


# --- the images ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_multi_stage_on_a_pinned_slim_base(image):
    stages = stages_of(image)
    assert [(s.base, s.alias) for s in stages] == [(BASE, "build"), (BASE, None)]
    assert all(PINNED.match(s.base) for s in stages)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_build_stage_makes_wheels_of_the_project(image):
    build = stages_of(image)[0]
    assert [i.args for i in build.all("RUN")] == ["python -m pip wheel --wheel-dir /wheels ."]
    assert [(i.flags, i.args) for i in build.all("COPY")] == [
        ({}, "pyproject.toml README.md ./"),
        ({}, "webhook ./webhook"),
        ({}, "loader ./loader"),
    ]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_runtime_stage_installs_only_the_wheels(image):
    stage = final(image)
    assert [i.name for i in stage.body] == (
        ["RUN", "ENV", "USER", "EXPOSE", "ENTRYPOINT"] if image == "webhook" else ["RUN", "ENV", "USER", "ENTRYPOINT"]
    )
    [install] = stage.all("RUN")
    # The wheels come from the build stage through a bind mount (not a COPY, so they are not a layer), pip may
    # not reach an index, and pip is removed once it has done its job.
    assert install.flags == {"mount": "type=bind,from=build,source=/wheels,target=/wheels"}
    assert install.args == (
        "python -m pip install --no-cache-dir --no-index --find-links=/wheels model-cache"
        " && python -m pip uninstall --yes pip setuptools wheel"
    )
    for instruction in stage.body:
        assert not BUILD_TOOLS.search(instruction.args), instruction
    assert stage.all("COPY") == [] and stage.all("ADD") == []


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
    assert func == "main"
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
    assert {p.split("/")[0] for p in sent} == {"pyproject.toml", "README.md", "webhook", "loader"}


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_copy_source_exists_and_is_in_the_context(image):
    sources = [
        src
        for stage in stages_of(image)
        for copy in stage.all("COPY")
        if "from" not in copy.flags
        for src in copy.args.split()[:-1]
    ]
    assert sources == ["pyproject.toml", "README.md", "webhook", "loader"]
    for src in sources:
        path = ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files and all(in_context(f.relative_to(ROOT).as_posix()) for f in files), src
