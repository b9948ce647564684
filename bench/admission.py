"""Admission benchmark: one uvicorn worker over TLS, keep-alive, concurrency 32, realistic pods; and the same
reviews while an attacker sends the worst inputs the webhook is defended against.

    .venv/bin/python bench/admission.py [--requests 5000] [--concurrency 32] [--rounds 5] [--warmup 500]
    .venv/bin/python bench/admission.py --attacks all [--requests 3000] [--attack-connections N]
        [--attack-ramp 1.0] [--ceiling-models 32] [--attack-inventory 10] [--timeout 30]

Starts ``model-cache-webhook serve`` as a subprocess (one worker, the real TLS context, a generated CA) with a
node inventory file, and drives it with a deliberately cheap client: raw asyncio + ssl, one pre-serialised HTTP/1.1
request per review, so the client costs little next to the server on a 2-core machine (its CPU time is
measured and printed alongside the server's). Series, each after a warm-up on other reviews than it measures:

* ``/noop``    POST /noop: the same transport (TLS, HTTP, JSON parse and dump of the same bodies), no decision;
* ``/mutate``  POST /mutate: the full admission of each pod;
* ``/mutate*`` the same with every pod distinct: the cost when no answer can be reused, and what the
  inventory's size costs a decision.

They run against an inventory of 10 nodes and one of 5000 nodes (two servers), in interleaved rounds so that
machine-load drift during the run hits all series alike. Pods are 10-30 KB: several containers with env, probes,
resources and mounts, required node affinity, tolerations, a model.cache/ref annotation, and the managedFields
entry the API server's field manager stamps with the time of each create; they come from 40 pod templates (as
replicas of a few dozen Deployments would), each review with its own uid and create time.
Absolute numbers drift with machine load: read the ratios, measured side by side in one run.

``--attacks NAME[,NAME...]`` (or ``all``) runs the attack series instead, on one server (``--attack-inventory``
nodes): /noop and /mutate without an attack, then /mutate under each attack, all in the same interleaved rounds.
For each round's chunk of each attack series an attacker process (this script with ``--attacker NAME``, niced, so
its own CPU is not the server's doing) is started, given ``--attack-ramp`` seconds to get under way, and stopped
when the chunk's reviews are answered. The attacks (ATTACKS; connections per attack in ATTACK_CONNECTIONS, or
``--attack-connections`` for all), each against the bound named:

* ``oversized-declared``  Content-Length twice the body cap (webhook/app.py MAX_BODY_BYTES), then body: 413 unread;
* ``oversized-chunked``   chunked ``[{},{},...]`` past the cap: 413 at the first byte over;
* ``stalled-bodies``      20 uploads of all but the last byte of a body at the cap: 408 at the body deadline
  (``MODEL_CACHE_REVIEW_READ_SECONDS``, 10 s), 503 past the in-flight budget (MAX_INFLIGHT_BYTES);
* ``endless-heads``       a header line that never ends, sent as fast as read: 431 past MAX_HEAD_BYTES (server.py);
* ``trickled-heads``      200 connections each sending a header byte every 0.5 s: closed at HEAD_SECONDS;
* ``pull-secrets-20k``    pods with 20,000 imagePullSecrets names that differ only in case and separators: denied
  at MAX_PULL_SECRETS (webhook/mutate.py), never named one by one;
* ``ceiling-pods``        pods at every ceiling mutate.py still processes (MAX_CONTAINERS targets, MAX_VOLUMES
  volumes, MAX_PULL_SECRETS pull secrets sharing one name stem, ``--ceiling-models`` references in model.cache/ref):
  decided in full, the most work one review can ask for;
* ``dense-json``          `[{},{},...]` past and at the object count (MAX_CONTAINERS in app.py), 7 MiB of short
  strings, nesting past the parser's depth: 400, refused before or after parsing;
* ``idle-connections``    1000 connections that never send a byte, half with TLS set up, half bare TCP that never
  start the handshake; reopened when the server closes them.

Printed per series: p50/p99/max latency of the ordinary reviews and their ratios to /mutate without an attack,
reviews without a 200 answer (refused, reset, closed, timed out after ``--timeout``, or another status: the
client counts each and goes on with a new connection), the server's peak RSS (VmHWM, reset through
/proc/PID/clear_refs before each chunk; VmRSS sampled every 10 ms where that is not allowed) and its rise over the
RSS the series started at, the server's and the attacker's CPU, and what the attacker saw (status or connection
outcome, counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from webhook import certs  # noqa: E402

TEMPLATES = 40


# --- workload -------------------------------------------------------------------------------------------------


def make_nodes(count: int, rng: random.Random) -> dict:
    """A mixed fleet: a CRI-O 1.34 / kubelet 1.35 GPU pool, a containerd pool, an old CRI-O pool."""
    items = []
    pools = [
        ("crio-gpu", "cri-o://1.34.2", "v1.35.1", [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]),
        ("containerd", "containerd://2.0.4", "v1.34.3", []),
        ("crio-old", "cri-o://1.31.6", "v1.31.9", []),
    ]
    for i in range(count):
        pool, runtime, kubelet, taints = pools[i % len(pools)]
        zone = f"zone-{chr(97 + i % 3)}"
        items.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": f"{pool}-{i:05d}",
                    "labels": {
                        "kubernetes.io/hostname": f"{pool}-{i:05d}",
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "topology.kubernetes.io/zone": zone,
                        "node.kubernetes.io/instance-type": rng.choice(["g5.2xlarge", "m6i.4xlarge", "p4d.24xlarge"]),
                        "pool": pool,
                    },
                },
                "spec": {"taints": taints},
                "status": {"nodeInfo": {"containerRuntimeVersion": runtime, "kubeletVersion": kubelet}},
            }
        )
    return {"apiVersion": "v1", "kind": "List", "items": items}


def _container(name: str, rng: random.Random, env_count: int) -> dict:
    return {
        "name": name,
        "image": f"registry.example.com/team/{name}:{rng.randrange(1, 99)}.{rng.randrange(0, 20)}",
        "imagePullPolicy": "IfNotPresent",
        "command": ["/usr/bin/python3", "-m", f"{name}.server"],
        "args": [f"--flag-{i}={rng.getrandbits(64):x}" for i in range(8)],
        "env": [{"name": f"SETTING_{i}", "value": f"{rng.getrandbits(128):x}"} for i in range(env_count)]
        + [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "api", "key": "key"}}},
        ],
        "ports": [{"containerPort": 8000 + i, "name": f"p{i}", "protocol": "TCP"} for i in range(3)],
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8000}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/live", "port": 8000}, "periodSeconds": 10, "failureThreshold": 6},
        "volumeMounts": [{"name": f"data-{i}", "mountPath": f"/data/{i}"} for i in range(4)]
        + [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }


def make_pod_template(index: int, rng: random.Random) -> dict:
    pool = ["crio-gpu", "containerd", "crio-old"][index % 3] if index % 4 else None
    containers = [_container(name, rng, rng.randrange(8, 30)) for name in ("server", "metrics", "proxy", "log-shipper")[: rng.randrange(2, 5)]]
    match = [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]
    if pool:
        match.append({"key": "pool", "operator": "In", "values": [pool]})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"inference-{index}-7d9f8c6b5-",
            "namespace": "models",
            "labels": {"app": f"inference-{index}", "pod-template-hash": "7d9f8c6b5", "tier": "serving"},
            "annotations": {
                "model.cache/ref": f"registry.example.com/models/llm-{index}:v{index % 5}",
                "prometheus.io/scrape": "true",
                "kubectl.kubernetes.io/restartedAt": "2026-11-20T10:00:00Z",
            },
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"inference-{index}-7d9f8c6b5", "uid": f"rs-{index}", "controller": True, "blockOwnerDeletion": True}
            ],
        },
        "spec": {
            "containers": containers,
            "volumes": [{"name": f"data-{i}", "emptyDir": {}} for i in range(4)]
            + [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": match}]},
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 50, "preference": {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["zone-a"]}]}}
                    ],
                },
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": f"inference-{index}"}}}}
                    ]
                },
            },
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ],
            "imagePullSecrets": [{"name": "registry-credentials"}],
            "serviceAccountName": "inference",
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 60,
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "priority": 0,
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
        },
    }


def _fields_v1(value: object) -> dict:
    """The ``fieldsV1`` set of a value, as the API server's field manager records it: keys only."""
    if isinstance(value, dict):
        return {f"f:{k}": _fields_v1(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(i, dict) and "name" in i for i in value):
        return {f'k:{{"name":"{i["name"]}"}}': {".": {}, **_fields_v1(i)} for i in value}
    return {}


def make_reviews(count: int, seed: int = 7, distinct: bool = False) -> list[bytes]:
    """``count`` reviews of pods from TEMPLATES templates, each stamped by the field manager with its create time.
    ``distinct``: each pod also gets its own name (as pods created by name are), so no two are alike."""
    rng = random.Random(seed)
    templates = [make_pod_template(i, rng) for i in range(TEMPLATES)]
    bodies = []
    for n in range(count):
        pod = json.loads(json.dumps(templates[n % TEMPLATES]))
        meta = pod["metadata"]
        meta["managedFields"] = [{
            "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
            "time": f"2026-11-23T{10 + n // 3600 % 12:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": _fields_v1({k: meta[k] for k in ("generateName", "labels", "annotations", "ownerReferences")}),
                         "f:spec": _fields_v1(pod["spec"])},
        }]
        if distinct:
            meta["name"] = f"{meta.pop('generateName')}{n:05x}"
        uid = f"{rng.getrandbits(128):032x}"
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "models",
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
                "object": pod,
                "oldObject": None,
                "dryRun": False,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        }
        bodies.append(json.dumps(review).encode())
    return bodies


def http_request(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


# --- client ---------------------------------------------------------------------------------------------------


def _failure(exc: BaseException) -> str:
    """A label for a request or connection that failed: what the API server's call would have seen."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed"  # the server closed the connection before (the whole of) an answer
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return "tls-error"
    if isinstance(exc, OSError):
        return f"oserror-{exc.errno}"
    return type(exc).__name__


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """(status, head, body) of one HTTP/1.1 response with a Content-Length (or none: no body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, head, await reader.readexactly(length)


async def _open(host: str, port: int, ctx: ssl.SSLContext | None, timeout: float = 30.0):
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost" if ctx else None), timeout
    )


async def _worker(host, port, ctx, queue: list[bytes], latencies: list[float], statuses: dict, bodies: list | None,
                  timeout: float):
    """Send the queued requests one at a time on a keep-alive connection. A request whose connection fails (refused,
    reset, closed by the server, no answer within ``timeout``) is counted under that label, not retried (the API
    server does not retry a POST either), and the next one goes on a new connection."""
    conn = None
    while queue:
        request = queue.pop()
        try:
            if conn is None:  # the handshake is not part of a review's latency (connections are kept alive)
                conn = await _open(host, port, ctx, timeout)
            started = time.perf_counter()
            reader, writer = conn
            writer.write(request)
            status, head, body = await asyncio.wait_for(_read_response(reader), timeout)
        except Exception as exc:  # noqa: BLE001 (every failure is a result here)
            label = _failure(exc)
            statuses[label] = statuses.get(label, 0) + 1
            if conn is not None:
                conn[1].transport.abort()
                conn = None
            continue
        latencies.append(time.perf_counter() - started)
        statuses[status] = statuses.get(status, 0) + 1
        if bodies is not None and len(bodies) < 3:
            bodies.append(body)
        if b"connection: close" in head.lower():
            writer.transport.abort()
            conn = None
    if conn is not None:
        conn[1].close()


async def _drive(host, port, ctx, requests: list[bytes], concurrency: int, keep: list | None = None,
                 timeout: float = 30.0):
    queue = list(reversed(requests))
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    started = time.perf_counter()
    await asyncio.gather(*(_worker(host, port, ctx, queue, latencies, statuses, keep, timeout) for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, statuses


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Phase:
    """One (inventory, endpoint) series, measured over several interleaved rounds; with ``attack``, each round's
    chunk is measured while that attack's process runs."""

    def __init__(self, inventory: int, path: str, server: tuple[str, int, int], bodies: list[bytes], name: str = "",
                 attack: str | None = None) -> None:
        self.inventory, self.path, self.server, self.bodies = inventory, path, server, bodies
        self.name = name or path
        self.attack = attack
        self.elapsed = 0.0
        self.latencies: list[float] = []
        self.statuses: dict[int | str, int] = {}
        self.server_cpu = 0.0
        self.client_cpu = 0.0
        self.attacker_cpu = 0.0
        self.outcomes: dict[str, int] = {}
        self.peak_mb = 0.0
        self.rise_mb = 0.0  # the peak over the RSS the series started at (memory earlier series left is not its own)
        self.after_mb = 0.0  # RSS 0.5 s after the last round's chunk (attack mode)
        self.sample: dict = {}

    def run(self, ctx: ssl.SSLContext, bodies: list[bytes], concurrency: int,
            attack_env: tuple[Path, argparse.Namespace, Path] | None = None, timeout: float = 30.0) -> None:
        host, port, pid = self.server
        requests = [http_request(self.path, b) for b in bodies]
        peak = PeakRss(pid)
        attacker = Attack(self.attack, port, *attack_env) if self.attack and attack_env else None
        try:
            cpu_server0, cpu_client0 = _cpu_seconds(pid), time.process_time()
            samples: list[bytes] = []
            elapsed, latencies, statuses = asyncio.run(_drive(host, port, ctx, requests, concurrency, samples, timeout))
            self.server_cpu += _cpu_seconds(pid) - cpu_server0
            self.client_cpu += time.process_time() - cpu_client0
        finally:
            if attacker is not None:
                cpu, outcomes = attacker.stop()
                self.attacker_cpu += cpu
                for label, n in outcomes.items():
                    self.outcomes[label] = self.outcomes.get(label, 0) + n
            top = peak.stop()
            self.peak_mb = max(self.peak_mb, top)
            self.rise_mb = max(self.rise_mb, top - peak.start)
        self.elapsed += elapsed
        self.latencies += latencies
        for code, n in statuses.items():
            self.statuses[code] = self.statuses.get(code, 0) + n
        if samples:
            response = json.loads(samples[0]).get("response", {})
            self.sample = {"allowed": response.get("allowed"), "patched": bool(response.get("patch"))}

    @property
    def failed(self) -> int:
        """Requests that got no HTTP answer (refused, reset, closed, timed out) or a non-200 one."""
        return sum(n for code, n in self.statuses.items() if code != 200)

    def row(self) -> dict:
        if not self.latencies:
            return {"rps": 0.0, "p50": float("nan"), "p99": float("nan"), "max": float("nan"), "mean": float("nan")}
        return {
            "rps": len(self.latencies) / self.elapsed,
            "p50": _pct(self.latencies, 0.50) * 1000,
            "p99": _pct(self.latencies, 0.99) * 1000,
            "max": max(self.latencies) * 1000,
            "mean": statistics.fmean(self.latencies) * 1000,
        }


# --- attacks ------------------------------------------------------------------------------------------------
#
# Each attack runs in a child process of its own (``--attacker NAME``), so that its CPU never stalls the measuring
# client's event loop; it loops until SIGTERM and then prints what it saw as one JSON line: the outcome of every
# attempt (the status the server answered, or how the connection failed: refused, reset, closed, timeout).

ATTACKS = ("oversized-declared", "oversized-chunked", "stalled-bodies", "endless-heads", "trickled-heads",
           "pull-secrets-20k", "ceiling-pods", "dense-json", "idle-connections")
#: Attacker connections per attack (``--attack-connections`` sets one number for all).
ATTACK_CONNECTIONS = {
    "oversized-declared": 8, "oversized-chunked": 4, "stalled-bodies": 20, "endless-heads": 8, "trickled-heads": 200,
    "pull-secrets-20k": 4, "ceiling-pods": 4, "dense-json": 4, "idle-connections": 1000,
}
_OPENED = "connections opened"
_CHUNK = 64 * 1024


def _attack_head(path: str, framing: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n{framing}\r\n\r\n".encode()


def _objects(size: int) -> bytes:
    """``[{},{},...]`` of ``size`` bytes: the body that costs the most memory per byte to parse."""
    n = (size - 2) // 3
    return b"[" + b"{}," * n + b"{}" + b" " * (size - 2 - 3 * n - 2) + b"]"


def _review_of(pod: dict, uid: str) -> bytes:
    return json.dumps({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "models",
                    "operation": "CREATE", "object": pod},
    }).encode()


def pull_secret_reviews(count: int = 8, secrets: int = 20_000) -> list[bytes]:
    """Realistic pods carrying ``secrets`` pull-secret names that differ only in case and separators (one DNS label
    for all: the quadratic-naming input of issue 11), each pod named apart so that no answer is reused."""
    rng = random.Random(11)
    words = ("registry", "credentials")
    names = []
    for i in range(secrets):
        letters = [c.upper() if i >> k & 1 else c for k, c in enumerate("".join(words))]
        sep = "-_."[i % 3]
        names.append({"name": "".join(letters[: len(words[0])]) + sep + "".join(letters[len(words[0]) :])})
    out = []
    for k in range(count):
        pod = make_pod_template(k, rng)
        pod["metadata"]["name"] = f"secrets-{k}"
        pod["spec"]["imagePullSecrets"] = names
        out.append(_review_of(pod, f"secrets-{k}"))
    return out


def ceiling_reviews(models: int, count: int = 4) -> list[bytes]:
    """Pods at every ceiling webhook/mutate.py processes (so decided in full, never denied): MAX_CONTAINERS app
    containers (every one a target), MAX_VOLUMES volumes, MAX_PULL_SECRETS valid pull-secret names that all map to
    one volume-name stem, and ``models`` model references in model.cache/ref (at most what MAX_ANNOTATION_CHARS
    holds)."""
    import itertools

    from webhook import mutate

    # "a.b-c...": every choice of '.' or '-' between nine letters is a valid Secret name, and all map to one stem.
    seps = itertools.product(".-", repeat=8)
    secrets = ["".join(x for pair in zip("abcdefghi", (*s, ""), strict=True) for x in pair) for s in seps]
    refs: list[str] = []
    for i in range(models):
        ref = f"registry.example.com/models/m{i}:v1"
        if len(",".join([*refs, ref])) > mutate.MAX_ANNOTATION_CHARS:
            break
        refs.append(ref)
    out = []
    for k in range(count):
        containers = [{
            "name": f"c{i}", "image": f"registry.example.com/app/c{i}:1",
            "env": [{"name": f"SETTING_{j}", "value": "x"} for j in range(4)],
            "volumeMounts": [{"name": f"v{(4 * i + j) % mutate.MAX_VOLUMES}", "mountPath": f"/data/{j}"} for j in range(4)],
        } for i in range(mutate.MAX_CONTAINERS)]
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"ceiling-{k}", "namespace": "models", "annotations": {"model.cache/ref": ",".join(refs)}},
            "spec": {"containers": containers,
                     "volumes": [{"name": f"v{i}", "emptyDir": {}} for i in range(mutate.MAX_VOLUMES)],
                     "imagePullSecrets": [{"name": n} for n in secrets[: mutate.MAX_PULL_SECRETS]]},
        }
        out.append(_review_of(pod, f"ceiling-{k}"))
    return out


def dense_bodies() -> list[bytes]:
    """The worst JSON under the body cap (tests/test_webhook_memory.py has each): objects past the count limit
    (refused before parsing), objects at it and short strings (parsed, then refused: not an AdmissionReview), and
    nesting past the parser's depth."""
    from webhook.app import MAX_BODY_BYTES, MAX_CONTAINERS

    return [
        _objects(MAX_BODY_BYTES),
        b"[" + b"{}," * (MAX_CONTAINERS - 2) + b"{}" + b" " * (MAX_BODY_BYTES - 3 * MAX_CONTAINERS) + b"]",
        b"[" + b'"ab",' * (MAX_BODY_BYTES // 5 - 1) + b'"ab"]',
        b"[" * 100_000 + b"]" * 100_000,
    ]


class _Attacker:
    """The attack loops of one attacker process; ``tally`` counts outcomes by label."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, tally: dict[str, int]) -> None:
        self.host, self.port, self.ctx, self.tally = host, port, ctx, tally
        self.stopping = False

    def add(self, label: str, n: int = 1) -> None:
        self.tally[label] = self.tally.get(label, 0) + n

    async def open(self, tls: bool = True):
        conn = await _open(self.host, self.port, self.ctx if tls else None)
        self.add(_OPENED)
        return conn

    async def repeat(self, attempt) -> None:
        """``attempt()`` (one connection, one outcome label) again and again; failures counted, never raised."""
        while not self.stopping:
            try:
                self.add(await attempt())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self.add(_failure(exc))
                await asyncio.sleep(0.05)  # a refusing server is not hammered in a tight loop

    async def send_until_answered(self, head: bytes, pieces, timeout: float = 60.0) -> str:
        """Send ``head``, then the byte strings ``pieces`` yields (awaiting each drain) until the server answers or
        closes; the outcome is the answer's status, or how the connection ended."""
        reader, writer = await self.open()
        answer = asyncio.ensure_future(asyncio.wait_for(_read_response(reader), timeout))
        try:
            writer.write(head)
            try:
                async for piece in pieces:
                    if answer.done():
                        break
                    writer.write(piece)
                    await writer.drain()
            except OSError:
                pass  # the server answered and closed: the answer (or the close) is the outcome
            status, _, _ = await answer
            return str(status)
        finally:
            answer.cancel()
            writer.transport.abort()

    async def requests(self, path: str, bodies: list[bytes], offset: int) -> None:
        """Reviews on a keep-alive connection, one after another, a new connection when the server closes one."""
        i = offset
        while not self.stopping:
            conn = None
            try:
                conn = reader, writer = await self.open()
                while not self.stopping:
                    writer.write(http_request(path, bodies[i % len(bodies)]))
                    i += 1
                    status, head, body = await asyncio.wait_for(_read_response(reader), 120)
                    self.add(f"{status} denied" if b'"allowed":false' in body else str(status))
                    if b"connection: close" in head.lower():
                        break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self.add(_failure(exc))
                await asyncio.sleep(0.05)
            finally:
                if conn is not None:
                    conn[1].transport.abort()

    async def idle(self, tls: bool) -> None:
        """A connection that never sends a byte (with TLS set up, or a bare TCP connection that never starts the
        handshake); reopened when the server closes it."""
        what = "tls" if tls else "tcp"
        while not self.stopping:
            try:
                reader, writer = await self.open(tls)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self.add(f"{what} {_failure(exc)}")
                await asyncio.sleep(0.1)
                continue
            self.add(f"{what} held", 1)  # the count held when the attack stops
            try:
                await reader.read(1)  # b"" when the server closes it
                self.add(f"{what} closed by the server")
            except asyncio.CancelledError:
                writer.transport.abort()
                raise
            except Exception as exc:  # noqa: BLE001
                self.add(f"{what} {_failure(exc)}")
            self.add(f"{what} held", -1)
            writer.transport.abort()
            await asyncio.sleep(0.1)


async def _stream(piece: bytes, total: int, interval: float = 0.0, exact: bool = False):
    """``piece`` again and again until ``total`` bytes (the last one cut to fit when ``exact``), each after
    ``interval`` seconds."""
    sent = 0
    while sent < total:
        if interval:
            await asyncio.sleep(interval)
        part = piece[: total - sent] if exact else piece
        yield part
        sent += len(part)


def _attack_tasks(name: str, a: _Attacker, connections: int, args: argparse.Namespace) -> list:
    from webhook.app import MAX_BODY_BYTES
    from webhook.server import MAX_HEAD_BYTES

    if name == "oversized-declared":  # refused from the Content-Length alone (413)
        head = _attack_head("/mutate", f"content-length: {2 * MAX_BODY_BYTES}")
        body = _objects(_CHUNK)
        return [a.repeat(lambda: a.send_until_answered(head, _stream(body, 2 * MAX_BODY_BYTES))) for _ in range(connections)]
    if name == "oversized-chunked":  # counted while read: refused at the first byte over (413)
        chunk = _objects(_CHUNK)
        frame = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        head = _attack_head("/mutate", "transfer-encoding: chunked")
        return [a.repeat(lambda: a.send_until_answered(head, _stream(frame, 2 * MAX_BODY_BYTES))) for _ in range(connections)]
    if name == "stalled-bodies":  # all but the last byte, then silence: 408 at the body deadline, 503 past the budget
        head = _attack_head("/mutate", f"content-length: {MAX_BODY_BYTES}")
        chunk = b" " * _CHUNK
        return [a.repeat(lambda: a.send_until_answered(head, _stream(chunk, MAX_BODY_BYTES - 1, exact=True)))
                for _ in range(connections)]
    if name == "endless-heads":  # one header line that never ends, sent as fast as the server reads (431)
        head = b"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\nx-endless: "
        return [a.repeat(lambda: a.send_until_answered(head, _stream(b"a" * 16384, 16 * MAX_HEAD_BYTES)))
                for _ in range(connections)]
    if name == "trickled-heads":  # a byte of header every half second: closed at the head deadline
        head = b"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\nx-trickle: "
        return [a.repeat(lambda: a.send_until_answered(head, _stream(b"a", 1_000, interval=0.5), timeout=600))
                for _ in range(connections)]
    if name == "pull-secrets-20k":
        bodies = pull_secret_reviews()
        return [a.requests("/mutate", bodies, i) for i in range(connections)]
    if name == "ceiling-pods":
        bodies = ceiling_reviews(args.ceiling_models)
        return [a.requests("/mutate", bodies, i) for i in range(connections)]
    if name == "dense-json":
        bodies = dense_bodies()
        return [a.requests("/mutate", bodies, i) for i in range(connections)]
    if name == "idle-connections":  # half with TLS set up, half bare TCP that never starts the handshake
        return [a.idle(tls=i % 2 == 0) for i in range(connections)]
    raise SystemExit(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")


async def _attack(args: argparse.Namespace, tally: dict[str, int]) -> dict[str, int]:
    ctx = ssl.create_default_context(cafile=args.ca_file)
    attacker = _Attacker("127.0.0.1", args.port, ctx, tally)
    connections = args.attack_connections or ATTACK_CONNECTIONS[args.attacker]
    coroutines = _attack_tasks(args.attacker, attacker, connections, args)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    parent = os.getppid()

    async def orphaned() -> None:  # the benchmark died without stopping us: stop by ourselves
        while os.getppid() == parent:
            await asyncio.sleep(1)
        stop.set()

    tasks = [asyncio.ensure_future(c) for c in (*coroutines, orphaned())]
    # Ready once every attack connection has been opened (or tried for 60 s): the attack is under way.
    deadline = time.monotonic() + 60
    while tally.get(_OPENED, 0) < connections and time.monotonic() < deadline and not stop.is_set():
        await asyncio.sleep(0.05)
    print("ready", flush=True)
    await stop.wait()
    attacker.stopping = True
    for task in tasks:
        task.cancel()
    # asyncio.wait_for in 3.11 can swallow a cancellation that races its inner await's completion; the loops also
    # check ``stopping``, and a task that is still running after a few seconds is left behind (the caller exits).
    await asyncio.wait(tasks, timeout=5)
    return tally


def attacker_main(args: argparse.Namespace) -> int:
    # Niced: on a shared machine the attacker's own CPU (TLS for megabytes a second) is not the server's doing; a
    # real attacker runs on other machines. It gets what the server and the measuring client leave.
    os.nice(10)
    tally: dict[str, int] = {}
    try:
        asyncio.run(_attack(args, tally))
    except BaseException:  # noqa: BLE001 (the tally is printed whatever happened; the error goes to stderr)
        traceback.print_exc()
        tally["attacker failed"] = 1
    finally:
        print(json.dumps(tally), flush=True)
        os._exit(0)  # no interpreter shutdown waiting on anything the attack left open


class Attack:
    """One attacker process for the duration of one measured chunk: started, given ``ramp`` seconds to get under
    way, stopped; its CPU time and outcomes are read back."""

    def __init__(self, name: str, port: int, ca_file: Path, args: argparse.Namespace, log: Path) -> None:
        self.name = name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--attacker", name, "--port", str(port),
               "--ca-file", str(ca_file), "--ceiling-models", str(args.ceiling_models)]
        if args.attack_connections:
            cmd += ["--attack-connections", str(args.attack_connections)]
        with log.open("ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        line = self.proc.stdout.readline()  # "ready" (or EOF when it failed)
        if line.strip() != b"ready":
            self.proc.kill()
            raise SystemExit(f"the {name} attacker did not start; see {log}")
        time.sleep(args.attack_ramp)

    def stop(self) -> tuple[float, dict[str, int]]:
        cpu = _cpu_seconds(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        try:
            return cpu, json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return cpu, {f"attacker exited {self.proc.returncode}": 1}


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


class PeakRss:
    """The peak RSS of a process over a span: its VmHWM after resetting it (``5 > /proc/PID/clear_refs``), and
    VmRSS sampled every 10 ms in case the reset is not allowed."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.start = self.sampled = _status_mb(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.sampled = max(self.sampled, _status_mb(self.pid, "VmRSS"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.sampled, _status_mb(self.pid, "VmHWM")) if self.reset else self.sampled


def start_server(tmp: Path, nodes_file: Path, tls_dir: Path) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MODEL_CACHE_LOADER_IMAGE": "registry.example.com/model-cache/loader:0.1.0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "webhook.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--tls-cert", str(tls_dir / "tls.crt"), "--tls-key", str(tls_dir / "tls.key"),
         "--nodes-file", str(nodes_file), "--log-level", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / f"server-{port}.log", "wb"),  # noqa: SIM115 (open while the server runs)
    )
    return proc, port


def wait_ready(port: int, ctx: ssl.SSLContext, proc: subprocess.Popen) -> None:
    async def probe():
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        return int(head[9:12])

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the webhook exited with {proc.returncode}")
        try:
            if asyncio.run(probe()) == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the webhook did not become ready")


def serving_tls(directory: Path) -> ssl.SSLContext:
    """A serving certificate for 127.0.0.1 written to ``directory`` (start_server's --tls-dir), and a client context
    that trusts its CA."""
    bundle = certs.generate("model-cache", "bench", extra_sans=["localhost", "127.0.0.1"])
    certs.write_bundle(bundle, directory)
    return ssl.create_default_context(cadata=bundle.ca_cert.decode())


def attack_main(args: argparse.Namespace) -> int:
    """The attack series: /noop and /mutate without an attack, then /mutate under each attack, on one server, in
    interleaved rounds; latency ratios against the /mutate without an attack, the server's peak RSS per series."""
    names = list(ATTACKS) if args.attacks == "all" else [n.strip() for n in args.attacks.split(",") if n.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    bodies = make_reviews(args.requests + args.warmup)
    rounds = max(1, args.rounds)
    chunk = -(-args.requests // rounds)
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as tmp_s:
        tmp = Path(tmp_s)
        ctx = serving_tls(tmp / "tls")
        nodes_file = tmp / "nodes.json"
        nodes_file.write_text(json.dumps(make_nodes(args.attack_inventory, random.Random(1))))
        proc, port = start_server(tmp, nodes_file, tmp / "tls")
        attack_env = (tmp / "tls" / "ca.crt", args, tmp / "attackers.log")
        try:
            wait_ready(port, ctx, proc)
            server = ("127.0.0.1", port, proc.pid)
            idle_mb = _status_mb(proc.pid, "VmRSS")
            phases = [Phase(args.attack_inventory, "/noop", server, bodies), Phase(args.attack_inventory, "/mutate", server, bodies)]
            phases += [Phase(args.attack_inventory, "/mutate", server, bodies, name=n, attack=n) for n in names]
            for path in ("/noop", "/mutate"):
                warm = [http_request(path, b) for b in bodies[-args.warmup :]]
                asyncio.run(_drive("127.0.0.1", port, ctx, warm, args.concurrency))
            after_rounds: list[float] = []
            for r in range(rounds):
                for phase in phases:
                    phase.run(ctx, bodies[r * chunk : (r + 1) * chunk], args.concurrency, attack_env, args.timeout)
                    time.sleep(0.5)  # the server closes what the attacker left behind
                    phase.after_mb = _status_mb(proc.pid, "VmRSS")
                after_rounds.append(_status_mb(proc.pid, "VmRSS"))
                print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
            final_mb = _status_mb(proc.pid, "VmRSS")
        finally:
            proc.terminate()
            proc.wait(10)

    base = phases[1].row()
    print(f"model-cache admission under attack: {args.requests} reviews per series (after {args.warmup} warm-up) in "
          f"{rounds} interleaved rounds; concurrency {args.concurrency}, TLS 1.3 keep-alive, one uvicorn worker, "
          f"{args.attack_inventory} nodes; each attack in its own process, started {args.attack_ramp} s before each "
          f"round's reviews; machine: {os.cpu_count()} cores")
    print(f"server RSS: {idle_mb:.0f} MB after start, {final_mb:.0f} MB at the end, after each round "
          f"{', '.join(f'{mb:.0f}' for mb in after_rounds)} MB; peak RSS per series is VmHWM (reset before each chunk)"
          " or VmRSS sampled every 10 ms")
    print()
    header = (f"{'series':<20} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p50 x':>6} {'p99 x':>6} "
              f"{'req/s x':>7} {'failed':>6} {'peak RSS MB':>11} {'rise MB':>7} {'after MB':>8} {'server CPU s':>12} "
              f"{'attacker CPU s':>14}")
    print(header)
    print("-" * len(header))
    for phase in phases:
        r = phase.row()
        name = phase.name if phase.attack else f"{phase.path} (no attack)"
        print(f"{name:<20} {r['rps']:>7.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['max']:>8.1f} "
              f"{r['p50'] / base['p50']:>6.2f} {r['p99'] / base['p99']:>6.2f} {r['rps'] / base['rps']:>7.2f} "
              f"{phase.failed:>6} {phase.peak_mb:>11.0f} {phase.rise_mb:>7.0f} {phase.after_mb:>8.0f} {phase.server_cpu:>12.2f} "
              f"{phase.attacker_cpu:>14.2f}")
    print()
    print("ratios (x) are against /mutate without an attack, in the same run; failed: reviews without a 200 answer;"
          " rise: peak RSS over the RSS the series started at (the largest of its rounds); after: RSS 0.5 s after the"
          " series' last chunk")
    noop = phases[0].row()
    print(f"no attack: mutate/noop throughput ratio {base['rps'] / noop['rps']:.2f} (target >= 0.5); mutate p99 "
          f"{base['p99']:.2f} ms (target < 25 ms)")
    print()
    print("statuses of the measured reviews, and what each attacker saw (outcome: count, over all rounds):")
    for phase in phases:
        name = phase.name if phase.attack else f"{phase.path} (no attack)"
        print(f"  {name:<20} reviews {phase.statuses}")
        if phase.attack:
            print(f"  {'':<20} attacker {dict(sorted(phase.outcomes.items()))}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the requests are split into")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a review may take before it counts as failed")
    parser.add_argument("--attacks", default="", help=f"comma list of attacks (or 'all': {','.join(ATTACKS)}): run "
                        "the attack series instead of the inventory series")
    parser.add_argument("--attack-connections", type=int, default=0, help="attacker connections for every attack "
                        "(default: per attack, ATTACK_CONNECTIONS)")
    parser.add_argument("--attack-ramp", type=float, default=1.0, help="seconds an attack runs before the measuring starts")
    parser.add_argument("--ceiling-models", type=int, default=32, help="model references in each ceiling-pods pod "
                        "(at most what model.cache/ref's length ceiling holds)")
    parser.add_argument("--attack-inventory", type=int, default=10, help="nodes in the attacked server's inventory")
    parser.add_argument("--attacker", help=argparse.SUPPRESS)  # the attacker process's own mode
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ca-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacker:
        return attacker_main(args)
    if args.attacks:
        return attack_main(args)

    # The warm-up replays the last ``warmup`` reviews, generated beyond the measured ones.
    bodies = make_reviews(args.requests + args.warmup)
    distinct = make_reviews(args.requests + args.warmup, seed=8, distinct=True)
    sizes = sorted(len(b) for b in bodies[: args.requests])
    rounds = max(1, args.rounds)
    chunk = -(-args.requests // rounds)
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as tmp_s:
        tmp = Path(tmp_s)
        ctx = serving_tls(tmp / "tls")
        rng = random.Random(1)
        procs, phases = [], []
        try:
            for inventory in (10, 5000):
                nodes_file = tmp / f"nodes-{inventory}.json"
                nodes_file.write_text(json.dumps(make_nodes(inventory, rng)))
                proc, port = start_server(tmp, nodes_file, tmp / "tls")
                procs.append(proc)
                wait_ready(port, ctx, proc)
                server = ("127.0.0.1", port, proc.pid)
                series = [Phase(inventory, "/noop", server, bodies), Phase(inventory, "/mutate", server, bodies),
                          Phase(inventory, "/mutate", server, distinct, name="/mutate*")]
                for phase in series:
                    warm = [http_request(phase.path, b) for b in phase.bodies[-args.warmup :]]  # not the measured ones
                    asyncio.run(_drive("127.0.0.1", port, ctx, warm, args.concurrency))
                    phases.append(phase)
            # Interleaved rounds: machine-load drift hits every series alike instead of whichever ran last.
            for r in range(rounds):
                for phase in phases:
                    phase.run(ctx, phase.bodies[r * chunk : (r + 1) * chunk], args.concurrency)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
    results = [(p.inventory, {"name": p.name, **p.row(), "statuses": p.statuses, "server_cpu": p.server_cpu,
                              "client_cpu": p.client_cpu, "sample": p.sample}) for p in phases]

    print(f"model-cache admission benchmark: {args.requests} reviews per series (after {args.warmup} warm-up), "
          f"in {rounds} interleaved rounds; concurrency {args.concurrency}, TLS 1.3 keep-alive, one uvicorn worker "
          f"(uvloop + httptools) per inventory")
    print(f"review bodies: {sizes[0] / 1024:.1f}-{sizes[-1] / 1024:.1f} KB (median {sizes[len(sizes) // 2] / 1024:.1f} KB), "
          f"{TEMPLATES} pod templates, 2-4 containers each; machine: {os.cpu_count()} cores")
    print()
    header = f"{'inventory':>9} {'endpoint':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'server CPU s':>12} {'client CPU s':>12}  statuses"
    print(header)
    print("-" * len(header))
    for inventory, r in results:
        print(f"{inventory:>9} {r['name']:<8} {r['rps']:>8.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['mean']:>8.2f} "
              f"{r['server_cpu']:>12.2f} {r['client_cpu']:>12.2f}  {r['statuses']}")
    print()
    by = {(inv, r["name"]): r for inv, r in results}
    for inventory in (10, 5000):
        ratio = by[(inventory, "/mutate")]["rps"] / by[(inventory, "/noop")]["rps"]
        print(f"{inventory:>5} nodes: mutate/noop throughput ratio {ratio:.2f} (target >= 0.5); "
              f"mutate p99 {by[(inventory, '/mutate')]['p99']:.2f} ms (target < 25 ms)")
    for name in ("/mutate", "/mutate*"):
        print(f"5000 vs 10 nodes, {name}: p50 ratio {by[(5000, name)]['p50'] / by[(10, name)]['p50']:.2f}, "
              f"throughput ratio {by[(5000, name)]['rps'] / by[(10, name)]['rps']:.2f}")
    # The decision's own cost: server CPU per review beyond the same server's no-op (drift between the two server
    # processes cancels out; latency ratios carry it).
    cost = {inv: (by[(inv, "/mutate*")]["server_cpu"] - by[(inv, "/noop")]["server_cpu"]) / args.requests * 1000
            for inv in (10, 5000)}
    print(f"decision CPU per review (/mutate* minus /noop, same server): 10 nodes {cost[10]:.3f} ms, "
          f"5000 nodes {cost[5000]:.3f} ms, ratio {cost[5000] / cost[10]:.2f}")
    print("/mutate*: every pod distinct (created by name), so every review is decided afresh: "
          + "; ".join(f"{inv} nodes {by[(inv, '/mutate*')]['rps'] / by[(inv, '/noop')]['rps']:.2f}x the no-op "
                      f"throughput, p99 {by[(inv, '/mutate*')]['p99']:.2f} ms" for inv in (10, 5000)))
    print(f"sample /mutate response: {by[(10, '/mutate')]['sample']}")
    print("client: raw asyncio+ssl with pre-built requests; its CPU time is shown beside the server's "
          "(both share the 2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
