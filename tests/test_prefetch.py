"""prefetch against the real registry: rounds that follow a moving tag and a changing models file, the metrics
they publish, the untaint step against a node API of our own (TLS, bearer token, 409s), gc after a round, the
command as a process (SIGTERM), and the DaemonSet overlay rendered and validated."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from loader import contract
from loader.config import LoaderSettings
from loader.errors import NotFoundError
from loader.gc import Policy
from loader.log import Logger, NullLogger
from loader.prefetch import (
    Config,
    NodeApi,
    NodeApiError,
    Prefetcher,
    StatusServer,
    Untaint,
    parse_untaint,
    remove_taint,
    taint_removal_patch,
)
from loader.pull import PullOptions
from loader.reference import cache_key
from tests.support.fake_node_api import FakeNodeApi, Request
from tests.support.files import tree
from tests.support.oci import file_layer

ROOT = Path(__file__).resolve().parent.parent
WARMING = "model.cache/warming"
OLD = 1_700_000_000


def data(seed: str, size: int) -> bytes:
    block = hashlib.sha256(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def push(pusher, repo: str, tag: str, files: dict[str, bytes]) -> str:
    return pusher.push_artifact(repo, tag, [file_layer(n, b) for n, b in files.items()])


def link_target(cache: Path, ref: str) -> str:
    return os.readlink(cache / contract.REFS_DIR / cache_key(ref))


def opts(cache: Path) -> PullOptions:
    return PullOptions(cache=cache, progress="none")


class ConfigMapDir:
    """A directory laid out like a mounted ConfigMap: ``models.txt -> ..data/models.txt``, ``..data`` swapped
    atomically to a new timestamped directory on every update, as kubelet's atomic writer does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        (root / "models.txt").symlink_to("..data/models.txt")
        self.generation = 0

    @property
    def path(self) -> Path:
        return self.root / "models.txt"

    def write(self, text: str) -> None:
        self.generation += 1
        version = self.root / f"..2026_11_22_00_00_00.{self.generation}"
        version.mkdir()
        (version / "models.txt").write_text(text)
        (self.root / "..data_tmp").symlink_to(version.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")


def samples(text: str) -> dict[tuple, float]:
    """Every sample of the exposition by (name, sorted labels), without the *_created timestamps."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def values(prefetcher: Prefetcher) -> dict[tuple, float]:
    """The samples a test can know exactly: everything but durations and the success timestamp."""
    got = samples(prefetcher.metrics.exposition().decode())
    return {k: v for k, v in got.items()
            if not (k[0].startswith("model_cache_prefetch_round_duration_seconds") and not k[0].endswith("_count"))
            and k[0] != "model_cache_prefetch_last_success_timestamp_seconds"}


def expected_metrics(*, listed, cached, nbytes, pulled, success, failure, rounds, warm, failures=None) -> dict:
    out = {
        ("model_cache_prefetch_models_listed", ()): listed,
        ("model_cache_prefetch_models_cached", ()): cached,
        ("model_cache_prefetch_bytes", ()): nbytes,
        ("model_cache_prefetch_pulled_bytes_total", ()): pulled,
        ("model_cache_prefetch_rounds_total", (("result", "success"),)): success,
        ("model_cache_prefetch_rounds_total", (("result", "failure"),)): failure,
        ("model_cache_prefetch_round_duration_seconds_count", ()): rounds,
        ("model_cache_prefetch_node_warm", ()): warm,
    }
    for ref, n in (failures or {}).items():
        out[("model_cache_prefetch_failures_total", (("ref", ref),))] = n
    return out


# --- rounds -------------------------------------------------------------------------------------------------------


def test_rounds_follow_a_moving_tag(registry, pusher, tmp_path):
    repo = "prefetch/moving"
    ref = f"{registry.host}/{repo}:v1"
    cache = tmp_path / "cache"
    v1 = {"model.bin": data("mv-1", 200_000), "config.json": b'{"v": 1}'}
    v2 = {"model.bin": data("mv-2", 300_000), "config.json": b'{"v": 2}', "extra/tok.json": b"{}"}
    d1 = push(pusher, repo, "v1", v1)
    p = Prefetcher(Config(refs=(ref,)), opts(cache), NullLogger())

    r1 = p.step()
    assert (r1.ok, r1.results[ref].digest, r1.results[ref].cache_hit) == (True, d1, False)
    assert link_target(cache, ref) == f"../models/sha256/{d1[7:]}"
    assert tree(cache / contract.REFS_DIR / cache_key(ref)) == v1

    d2 = push(pusher, repo, "v1", v2)  # the tag moves
    r2 = p.step()
    assert (r2.ok, r2.results[ref].digest, r2.results[ref].cache_hit) == (True, d2, False)
    assert link_target(cache, ref) == f"../models/sha256/{d2[7:]}"
    assert tree(cache / contract.REFS_DIR / cache_key(ref)) == v2
    assert tree(cache / contract.MODELS_DIR / d1[7:]) == v1  # the old tree stays for pods that mounted it (gc's job)

    r3 = p.step()
    assert (r3.ok, r3.results[ref].digest, r3.results[ref].cache_hit) == (True, d2, True)
    assert values(p) == expected_metrics(listed=1, cached=1, nbytes=300_010, pulled=200_008 + 300_010, success=3,
                                         failure=0, rounds=3, warm=1)


def test_the_models_file_is_reread_every_round(registry, pusher, tmp_path):
    repo = "prefetch/listed"
    refs = {n: f"{registry.host}/{repo}:{n}" for n in ("one", "two", "three")}
    files = {n: {f"{n}.bin": data(f"ls-{n}", 10_000 * (i + 1))} for i, n in enumerate(refs)}
    digests = {n: push(pusher, repo, n, files[n]) for n in refs}
    cache = tmp_path / "cache"
    cm = ConfigMapDir(tmp_path / "config")
    cm.write(f"# the models every node keeps\n{refs['one']}\n")
    stream = io.StringIO()
    p = Prefetcher(Config(models_file=str(cm.path)), opts(cache), Logger(stream))

    r1 = p.step()
    assert (r1.ok, r1.refs, [r.digest for r in r1.results.values()]) == (True, [refs["one"]], [digests["one"]])

    cm.write(f"{refs['two']}  # new\n\n{refs['three']}\n{refs['two']}\n")
    r2 = p.step()
    assert (r2.ok, r2.refs) == (True, [refs["two"], refs["three"]])
    assert {ref: (r.digest, r.cache_hit) for ref, r in r2.results.items()} == {
        refs["two"]: (digests["two"], False), refs["three"]: (digests["three"], False)}
    for n in ("two", "three"):
        assert tree(cache / contract.REFS_DIR / cache_key(refs[n])) == files[n]

    cm.write(f"{refs['three']}\nhttps://{registry.host}/{repo}:bad\n")  # a typo keeps the round from succeeding
    r3 = p.step()
    assert (r3.ok, r3.refs, list(r3.results)) == (False, [refs["three"]], [refs["three"]])
    assert r3.errors == [f"{cm.path}:2: reference 'https://{registry.host}/{repo}:bad' has a URL scheme: drop it"
                         " and write host/repository:tag (plain HTTP is chosen with --plain-http, or automatically"
                         " for localhost)"]
    assert values(p) == expected_metrics(listed=1, cached=1, nbytes=30_000, pulled=60_000, success=2, failure=1,
                                         rounds=3, warm=1, failures={f"{cm.path}:2": 1})
    rounds = [line for line in stream.getvalue().splitlines() if "event=prefetch.round " in line]
    assert [line.split(" ", 2)[2] for line in rounds] == [
        "event=prefetch.round round=1 models=1 pulled=1 cached=0 failed=0 ok=True seconds=" + rounds[0].rsplit("=", 1)[1],
        "event=prefetch.round round=2 models=2 pulled=2 cached=0 failed=0 ok=True seconds=" + rounds[1].rsplit("=", 1)[1],
        "event=prefetch.round round=3 models=1 pulled=0 cached=1 failed=1 ok=False seconds=" + rounds[2].rsplit("=", 1)[1],
    ]


def test_a_missing_models_file_fails_the_round(tmp_path):
    p = Prefetcher(Config(models_file=str(tmp_path / "absent.txt")), opts(tmp_path / "cache"), NullLogger())
    rnd = p.step()
    assert (rnd.ok, rnd.refs, rnd.errors, rnd.exit_code()) == (
        False, [], [f"{tmp_path / 'absent.txt'}: cannot read the models file: No such file or directory"], 2)
    assert not p.ready.is_set()


def test_metrics_and_health_endpoints(registry, pusher, tmp_path):
    repo = "prefetch/metrics"
    good, late = f"{registry.host}/{repo}:good", f"{registry.host}/{repo}:late"
    push(pusher, repo, "good", {"w.bin": data("m-good", 123_456)})
    p = Prefetcher(Config(refs=(good, late)), opts(tmp_path / "cache"), NullLogger())
    server = StatusServer(p.metrics, p.ready, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"

    def get(path: str) -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=10) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read().decode()

    try:
        assert get("/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
        assert get("/readyz") == (503, "text/plain; charset=utf-8", "warming\n")
        r1 = p.step()
        assert (r1.ok, list(r1.results), type(r1.failures[late]), r1.exit_code()) == (False, [good], NotFoundError, 4)
        status, ctype, body = get("/metrics")
        assert (status, ctype) == (200, CONTENT_TYPE_LATEST)
        got = samples(body)
        assert got[("model_cache_prefetch_last_success_timestamp_seconds", ())] == 0
        assert {k: v for k, v in got.items() if k in values(p)} == values(p) == expected_metrics(
            listed=2, cached=1, nbytes=123_456, pulled=123_456, success=0, failure=1, rounds=1, warm=0,
            failures={late: 1})
        assert get("/readyz")[0] == 503

        push(pusher, repo, "late", {"w.bin": data("m-late", 1_000)})
        before = time.time()
        assert p.step().ok
        got = samples(get("/metrics")[2])
        assert before <= got[("model_cache_prefetch_last_success_timestamp_seconds", ())] <= time.time()
        assert values(p) == expected_metrics(listed=2, cached=2, nbytes=124_456, pulled=124_456, success=1,
                                             failure=1, rounds=2, warm=1, failures={late: 1})
        assert get("/readyz") == (200, "text/plain; charset=utf-8", "ok\n")
        assert get("/nope")[0] == 404
    finally:
        server.close()


def test_gc_after_each_round_keeps_the_listed_models(registry, pusher, tmp_path):
    repo = "prefetch/gc"
    cache = tmp_path / "cache"
    listed, stale = f"{registry.host}/{repo}:listed", f"{registry.host}/{repo}:stale"
    d_listed = push(pusher, repo, "listed", {"a.bin": data("g-listed", 5_000)})
    d_stale = push(pusher, repo, "stale", {"b.bin": data("g-stale", 7_000)})
    seed = Prefetcher(Config(refs=(listed, stale)), opts(cache), NullLogger())
    assert seed.step().ok
    for d in (d_listed, d_stale):
        os.utime(cache / contract.LASTUSE_DIR / d[7:], (OLD, OLD))
    p = Prefetcher(Config(refs=(listed,), gc_policy=Policy(max_unused=86400)), opts(cache), NullLogger())
    assert p.step().ok  # the round touches what it lists, then gc removes the rest
    assert sorted(os.listdir(cache / contract.MODELS_DIR)) == [d_listed[7:]]
    assert os.listdir(cache / contract.REFS_DIR) == [cache_key(listed)]


# --- the untaint step -------------------------------------------------------------------------------------------


@pytest.fixture
def node_api(tmp_path):
    api = FakeNodeApi(tmp_path / "api")
    yield api
    api.close()


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
WARMING_TAINTS = [{"key": WARMING, "effect": "NoSchedule"}, {"key": WARMING, "value": "x", "effect": "NoExecute"}]


def node(name: str, taints: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"pool": "spot"}},
            "spec": {"providerID": f"fake://{name}", "taints": taints}}


def settings_for(api: FakeNodeApi) -> LoaderSettings:
    return LoaderSettings.from_env(api.env())


def test_taint_removal_patch_is_pure():
    n = node("n", [GPU_TAINT, *WARMING_TAINTS])
    n["metadata"]["resourceVersion"] = "7"
    assert taint_removal_patch(n, WARMING) == {"metadata": {"resourceVersion": "7"}, "spec": {"taints": [GPU_TAINT]}}
    assert taint_removal_patch(n, "model.cache/other") is None
    only = node("n", WARMING_TAINTS[:1])
    only["metadata"]["resourceVersion"] = "8"
    assert taint_removal_patch(only, WARMING) == {"metadata": {"resourceVersion": "8"}, "spec": {"taints": None}}
    assert taint_removal_patch({"metadata": {"resourceVersion": "9"}, "spec": {}}, WARMING) is None


def test_the_taint_goes_only_after_the_first_successful_round(registry, pusher, tmp_path, node_api):
    repo = "prefetch/untaint"
    ref = f"{registry.host}/{repo}:v1"
    node_api.put(node("node-a", [GPU_TAINT, *WARMING_TAINTS]))
    node_api.put(node("node-b", [*WARMING_TAINTS]))
    other_before = node_api.get("node-b")
    api = NodeApi.from_settings(settings_for(node_api))
    p = Prefetcher(Config(refs=(ref,), untaint=Untaint("node-a", WARMING)), opts(tmp_path / "cache"), NullLogger(),
                   node_api=api)

    r1 = p.step()  # the tag does not exist yet: the node stays tainted, the API is not even asked
    assert not r1.ok
    assert node_api.requests == []
    assert node_api.get("node-a")["spec"]["taints"] == [GPU_TAINT, *WARMING_TAINTS]

    push(pusher, repo, "v1", {"w.bin": data("u-1", 4_000)})
    assert p.step().ok
    a = node_api.get("node-a")
    assert a["spec"] == {"providerID": "fake://node-a", "taints": [GPU_TAINT]}
    assert a["metadata"]["labels"] == {"pool": "spot"}
    assert node_api.get("node-b") == other_before
    rv = "101"  # node-a's, as put: the patch is guarded by the version it read
    assert node_api.requests == [
        Request("GET", "/api/v1/nodes/node-a", None, None, 200),
        Request("PATCH", "/api/v1/nodes/node-a", "application/merge-patch+json",
                {"metadata": {"resourceVersion": rv}, "spec": {"taints": [GPU_TAINT]}}, 200),
    ]
    assert p.step().ok  # once is enough
    assert len(node_api.requests) == 2
    assert values(p)[("model_cache_prefetch_node_warm", ())] == 1


def test_conflicts_are_retried_with_a_fresh_read(tmp_path, node_api):
    node_api.put(node("node-a", [*WARMING_TAINTS]))
    node_api.concurrent_writes(2)
    stream = io.StringIO()
    assert remove_taint(NodeApi.from_settings(settings_for(node_api)), Untaint("node-a", WARMING), Logger(stream))
    assert [(r.method, r.status) for r in node_api.requests] == [
        ("GET", 200), ("PATCH", 409), ("GET", 200), ("PATCH", 409), ("GET", 200), ("PATCH", 200)]
    a = node_api.get("node-a")
    assert a["spec"] == {"providerID": "fake://node-a"}  # the last taint gone: the field is dropped
    assert sorted(a["metadata"]["labels"]) == ["other-writer/101", "other-writer/102", "pool"]  # theirs kept
    assert [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()] == [
        "level=warning event=prefetch.untaint_conflict node=node-a attempt=1",
        "level=warning event=prefetch.untaint_conflict node=node-a attempt=2",
        f"level=info event=prefetch.untaint node=node-a taint={WARMING} result=removed attempt=3",
    ]
    # Already gone: one read, no write.
    assert remove_taint(NodeApi.from_settings(settings_for(node_api)), Untaint("node-a", WARMING), NullLogger()) is False
    assert [(r.method, r.status) for r in node_api.requests[6:]] == [("GET", 200)]


def test_endless_conflicts_give_up_with_a_clear_error(node_api):
    node_api.put(node("node-a", [*WARMING_TAINTS]))
    node_api.concurrent_writes(100)
    with pytest.raises(NodeApiError) as err:
        remove_taint(NodeApi.from_settings(settings_for(node_api)), Untaint("node-a", WARMING), NullLogger())
    assert str(err.value) == f"node node-a kept changing: 5 patches removing taint {WARMING} conflicted"


@pytest.mark.parametrize("case,message", [
    ("token", f"cannot get node node-a to remove taint {WARMING}: HTTP 401: the API server rejected the"
              " service-account token (Unauthorized)"),
    ("node", f"cannot get node node-z to remove taint {WARMING}: HTTP 404: there is no node 'node-z': --untaint"
             " must name this pod's own node (spec.nodeName via the downward API, $(NODE_NAME))"
             " (nodes \"node-z\" not found)"),
], ids=["bad-token", "unknown-node"])
def test_api_errors_explain_themselves(node_api, case, message):
    node_api.put(node("node-a", [*WARMING_TAINTS]))
    settings = settings_for(node_api)
    if case == "token":
        Path(settings.kube_token_file).write_text("stale\n")
    target = Untaint("node-z" if case == "node" else "node-a", WARMING)
    with pytest.raises(NodeApiError) as err:
        remove_taint(NodeApi.from_settings(settings), target, NullLogger())
    assert str(err.value) == message
    assert node_api.get("node-a")["spec"]["taints"] == WARMING_TAINTS


def test_untaint_flag_and_environment(tmp_path):
    assert parse_untaint("ip-10-0-0-1.ec2.internal:model.cache/warming") == Untaint("ip-10-0-0-1.ec2.internal",
                                                                                   WARMING)
    with pytest.raises(Exception) as err:
        NodeApi.from_settings(LoaderSettings.from_env({}))
    assert str(err.value) == ("--untaint needs the in-cluster API server, but KUBERNETES_SERVICE_HOST/PORT are not"
                              " set: run it in a pod (the node agent DaemonSet), or drop --untaint")


# --- the command ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loader.cli", "prefetch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def test_the_command_warms_untaints_serves_and_stops_on_sigterm(registry, pusher, tmp_path, node_api):
    repo = "prefetch/cli"
    ref = f"{registry.host}/{repo}:v1"
    files = {"w.bin": data("cli-1", 50_000)}
    digest = push(pusher, repo, "v1", files)
    node_api.put(node("node-a", [GPU_TAINT, WARMING_TAINTS[0]]))
    cm = ConfigMapDir(tmp_path / "config")
    cm.write(f"{ref}\n")
    port = free_port()
    cache = tmp_path / "cache"
    proc = cli("--cache", str(cache), "--models-file", str(cm.path), "--interval", "1h", "--untaint",
               f"node-a:{WARMING}", "--metrics-port", str(port), "--metrics-address", "127.0.0.1",
               "--gc-max-unused", "168h", env=node_api.env())
    try:
        deadline = time.monotonic() + 120
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                    ready = r.status
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        assert ready == 200, proc.stderr.read() if proc.poll() is not None else "not ready"
        assert node_api.get("node-a")["spec"]["taints"] == [GPU_TAINT]
        assert tree(cache / contract.MODELS_DIR / digest[7:]) == files
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            got = samples(r.read().decode())
        assert got[("model_cache_prefetch_models_cached", ())] == 1
        assert got[("model_cache_prefetch_bytes", ())] == 50_000
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, "")
    events = [line.split(" ")[2] for line in err.splitlines()]
    assert events[0] == "event=prefetch.start"
    assert [e for e in events if e in ("event=prefetch.round", "event=prefetch.untaint", "event=gc.done",
                                       "event=prefetch.stopped")] == [
        "event=prefetch.round", "event=prefetch.untaint", "event=gc.done", "event=prefetch.stopped"]


def test_one_shot_exit_codes_and_bad_flags(registry, tmp_path):
    cache = str(tmp_path / "cache")
    proc = cli("--cache", cache, "--ref", f"{registry.host}/prefetch/none:v1")
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out) == (4, "")
    assert "event=prefetch.pull_failed" in err

    for args, message in [
        (["--interval", "10"], "--interval '10' is not a duration: write a number and a unit (s, m, h, d, w),"
                               " e.g. 30m, 12h, 7d or 1h30m"),
        (["--interval", "0s"], "--interval '0s' must be longer than 0, e.g. 10m"),
        (["--untaint", "node-a"], "--untaint 'node-a' is not NODE:TAINT_KEY, e.g. $(NODE_NAME):model.cache/warming"
                                  " (NODE from the downward API, spec.nodeName; the taint's key only, any effect)"),
        (["--gc-max-size", "lots"], "--gc-max-size 'lots' is not a size: write a number and an optional unit (K, M,"
                                    " G, T for powers of 1000; Ki, Mi, Gi, Ti for powers of 1024), e.g. 500Mi, 20G"
                                    " or 1Ti"),
        (["--metrics-port", "70000"], "--metrics-port 70000 is not a port number (0 turns metrics off), e.g. 9090"),
    ]:
        proc = cli("--cache", cache, "--ref", f"{registry.host}/prefetch/none:v1", *args)
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, out) == (2, ""), args
        [line] = err.splitlines()
        quoted = '"' + message.replace("\\", "\\\\").replace('"', '\\"') + '"'
        assert line.split(" ", 1)[1] == f"level=error event=failed command=prefetch exit_code=2 error={quoted}"
