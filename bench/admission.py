"""Admission benchmark: one uvicorn worker over TLS, keep-alive, concurrency 32, realistic pods.

    .venv/bin/python bench/admission.py [--requests 5000] [--concurrency 32]

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
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


async def _worker(host, port, ctx, queue: list[bytes], latencies: list[float], statuses: dict, bodies: list | None):
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost")
    try:
        while queue:
            request = queue.pop()
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            if bodies is not None and len(bodies) < 3:
                bodies.append(body)
    finally:
        writer.close()


async def _drive(host, port, ctx, requests: list[bytes], concurrency: int, keep: list | None = None):
    queue = list(reversed(requests))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    await asyncio.gather(*(_worker(host, port, ctx, queue, latencies, statuses, keep) for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, statuses


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Phase:
    """One (inventory, endpoint) series, measured over several interleaved rounds."""

    def __init__(self, inventory: int, path: str, server: tuple[str, int, int], bodies: list[bytes], name: str = "") -> None:
        self.inventory, self.path, self.server, self.bodies = inventory, path, server, bodies
        self.name = name or path
        self.elapsed = 0.0
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.server_cpu = 0.0
        self.client_cpu = 0.0
        self.sample: dict = {}

    def run(self, ctx: ssl.SSLContext, bodies: list[bytes], concurrency: int) -> None:
        host, port, pid = self.server
        requests = [http_request(self.path, b) for b in bodies]
        cpu_server0, cpu_client0 = _cpu_seconds(pid), time.process_time()
        samples: list[bytes] = []
        elapsed, latencies, statuses = asyncio.run(_drive(host, port, ctx, requests, concurrency, samples))
        self.server_cpu += _cpu_seconds(pid) - cpu_server0
        self.client_cpu += time.process_time() - cpu_client0
        self.elapsed += elapsed
        self.latencies += latencies
        for code, n in statuses.items():
            self.statuses[code] = self.statuses.get(code, 0) + n
        response = json.loads(samples[0]).get("response", {})
        self.sample = {"allowed": response.get("allowed"), "patched": bool(response.get("patch"))}

    def row(self) -> dict:
        return {
            "rps": len(self.latencies) / self.elapsed,
            "p50": _pct(self.latencies, 0.50) * 1000,
            "p99": _pct(self.latencies, 0.99) * 1000,
            "mean": statistics.fmean(self.latencies) * 1000,
        }


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the requests are split into")
    args = parser.parse_args()

    # The warm-up replays the last ``warmup`` reviews, generated beyond the measured ones.
    bodies = make_reviews(args.requests + args.warmup)
    distinct = make_reviews(args.requests + args.warmup, seed=8, distinct=True)
    sizes = sorted(len(b) for b in bodies[: args.requests])
    rounds = max(1, args.rounds)
    chunk = -(-args.requests // rounds)
    with tempfile.TemporaryDirectory(prefix="bench-admission-") as tmp_s:
        tmp = Path(tmp_s)
        bundle = certs.generate("model-cache", "bench", extra_sans=["localhost", "127.0.0.1"])
        certs.write_bundle(bundle, tmp / "tls")
        ctx = ssl.create_default_context(cadata=bundle.ca_cert.decode())
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
