"""`make demo`: the whole path on one machine, with nothing but Debian's registry and this repo.

1. start a real registry on 127.0.0.1 and push a small sample model as an OCI artifact
2. generate certificates and start the webhook over TLS with a sample inventory (a CRI-O and a containerd pool)
3. send it the pod of examples/deployment.yaml three times, once per pool, and show each decision and patch
4. run the injected init container's exact command line locally, show the model tree, run it again (warm hit)
5. move the tag: the first pod restarts on the digest it pinned, a new pod gets the new one
6. run it as another tenant would, naming the model's digest on a registry it made unreachable: refused (exit 7),
   the shared cache's access rule (docs/architecture.md)
7. the third path: start the node agent (model-loader agent) and call NodePublishVolume on its CSI socket as
   kubelet would for the CSI volume of step 3; show the bind-mounted, read-only tree beside the other paths'
8. sign a model with `model-loader sign`; a pull requiring the signature takes it, and refuses an unsigned one
9. stop everything it started

Exits non-zero if any step fails.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonpatch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loader import contract  # noqa: E402
from tests.support import kubelet  # noqa: E402  the model of kubelet's subPath and $(VAR) handling
from tests.support.oci import Pusher, file_layer  # noqa: E402
from tests.support.registry import free_port, start_registry  # noqa: E402
from tests.support.unmount import unmount_all_under  # noqa: E402

WORK = ROOT / ".demo"
BIN = Path(sys.executable).parent
BOLD, DIM, GREEN, RED, RESET = ("\x1b[1m", "\x1b[2m", "\x1b[32m", "\x1b[31m", "\x1b[0m") if sys.stdout.isatty() else ("",) * 5


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


def sample_model(dest: Path) -> dict[str, bytes]:
    """A few MB that look like a Hugging Face model directory: safetensors shards, config, tokenizer."""
    rng = __import__("random").Random(7)

    def safetensors(n_floats: int) -> bytes:
        header = json.dumps({"weight": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
        return len(header).to_bytes(8, "little") + header + rng.randbytes(4 * n_floats)

    files = {
        "model-00001-of-00002.safetensors": safetensors(768 * 1024),
        "model-00002-of-00002.safetensors": safetensors(512 * 1024),
        "config.json": json.dumps({"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072}, indent=2).encode(),
        "generation_config.json": b'{"max_length": 4096}\n',
        "tokenizer/tokenizer.json": json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}).encode(),
        "tokenizer/tokenizer_config.json": b'{"model_max_length": 4096}\n',
    }
    for name, data in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    return files


def review_for(pod: dict, namespace: str) -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": f"demo-{time.monotonic_ns()}",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def tree_lines(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out.append(f"    {p.relative_to(root)}  ({p.stat().st_size:,} bytes)")
    return out


def wait_ready(client: httpx.Client, url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the webhook exited with {proc.returncode}")
        try:
            if client.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the webhook did not become ready")


def csi_path(pod: dict, registry_host: str, files: dict[str, bytes]) -> None:
    """Step 7: the node agent's CSI volume, published as kubelet would publish it (bind mounts need root)."""
    step("7. the CSI path: the node agent serves the pod's csi volume from its node cache")
    volume = next(v for v in pod["spec"]["volumes"] if "csi" in v)
    print(f"the pod's volume: {json.dumps(volume, separators=(',', ':'))}")
    if os.geteuid() != 0:
        print(f"{DIM}skipped: NodePublishVolume bind-mounts the model, which needs root (run make demo as root, as"
              f" CI does); tests/test_csi.py covers it{RESET}")
        return
    import grpc

    from loader.csi import csi_pb2, csi_pb2_grpc

    work = WORK / "agent"
    pods = work / "kubelet" / "pods"
    pods.mkdir(parents=True)
    sock = Path("/tmp") / f"model-cache-demo-{os.getpid()}" / "csi.sock"  # a unix socket path has <= 107 bytes
    agent = subprocess.Popen(
        [BIN / "model-loader", "agent", "--cache", work / "node-cache", "--node-name", "gpu-agent-0",
         "--csi-socket", sock, "--pods-dir", pods, "--interval", "1h"],
        stdout=subprocess.DEVNULL, stderr=open(WORK / "agent.log", "w"))  # noqa: SIM115 (open while it runs)
    uid = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
    target = pods / uid / "volumes" / "kubernetes.io~csi" / volume["name"] / "mount"
    target.parent.mkdir(parents=True)  # kubelet makes the volume's directory; the plugin makes the mount point
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id=f"csi-{uid}-{volume['name']}", target_path=str(target), readonly=True,
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)),
        volume_context={**volume["csi"]["volumeAttributes"], "csi.storage.k8s.io/ephemeral": "true",
                        "csi.storage.k8s.io/pod.uid": uid, "csi.storage.k8s.io/pod.namespace": "inference",
                        "csi.storage.k8s.io/pod.name": "phi3-server-7d9f8-abcde",
                        "csi.storage.k8s.io/serviceAccount.name": "default"})
    try:
        for _ in range(300):  # until the agent listens
            if sock.exists() or agent.poll() is not None:
                break
            time.sleep(0.1)
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            node = csi_pb2_grpc.NodeStub(channel)
            t0 = time.monotonic()
            for _ in range(30):  # kubelet retries a publish answered ABORTED (pull still running) the same way
                try:
                    node.NodePublishVolume(request, timeout=60)
                    break
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.ABORTED:
                        raise RuntimeError(f"NodePublishVolume: {exc.code().name}: {exc.details()}") from None
                    time.sleep(0.5)
            print(f"NodePublishVolume -> OK in {time.monotonic() - t0:.2f}s; {target.relative_to(ROOT)} is a"
                  " read-only bind mount of the model tree:")
            print("\n".join(tree_lines(target)))
            for name, data in files.items():
                if (target / name).read_bytes() != data:
                    raise RuntimeError(f"{name} differs from what was pushed")
            try:
                (target / "config.json").write_bytes(b"{}")
                raise RuntimeError("the CSI mount is writable")
            except OSError as exc:
                if exc.errno != 30:  # EROFS
                    raise
            print(f"{GREEN}every file is byte-identical to the pushed model, and writes fail (EROFS){RESET}: the same"
                  " tree as the image volume and the init container give")
            node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=request.volume_id,
                                                                         target_path=str(target)), timeout=60)
            print(f"NodeUnpublishVolume -> OK: target removed ({not target.exists()})")
    finally:
        unmount_all_under(pods)  # when a step above failed between publish and unpublish
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
        shutil.rmtree(sock.parent, ignore_errors=True)


def signed_models(registry, files: dict[str, bytes]) -> None:
    """Step 8: a signing key, `model-loader sign`, and a pull that requires the signature (what the webhook's
    MODEL_CACHE_SIGNATURE_POLICY makes every loader and agent do for the models it covers)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    step("8. signed models only: sign one in CI, require the signature when pulling")
    keys = WORK / "keys"
    keys.mkdir()
    private = ed25519.Ed25519PrivateKey.generate()
    (keys / "model.key").write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    (keys / "model.pub").write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    signed, unsigned = f"{registry.host}/models/signed:v1", f"{registry.host}/models/unsigned:v1"
    for repo in ("models/signed", "models/unsigned"):
        Pusher(registry.url).push_artifact(repo, "v1", [file_layer(n, d) for n, d in files.items()][:2] + [
            file_layer("origin.txt", repo.encode())], artifact_type="application/vnd.example.model.v1")
    out = subprocess.run([BIN / "model-loader", "sign", signed, "--key", keys / "model.key", "--output", "json"],
                         check=True, capture_output=True, text=True).stdout
    print(f"model-loader sign {signed} --key model.key -> {json.loads(out)['where']} signature"
          f" {json.loads(out)['signature'][:19]}...")
    cache = WORK / "signed-cache"
    for ref, want in ((signed, 0), (unsigned, 10)):
        done = subprocess.run([BIN / "model-loader", "pull", ref, "--cache", cache, "--verify-key", keys / "model.pub",
                               "--output", "json", "--progress", "none"], capture_output=True, text=True)
        if done.returncode != want:
            raise RuntimeError(f"pull {ref} with --verify-key: exit {done.returncode}, expected {want}: {done.stderr[-300:]}")
        if want == 0:
            verified = json.loads(done.stdout.splitlines()[-1])["verified"]
            print(f"{GREEN}pull {ref} --verify-key model.pub: verified{RESET} (signer {verified['signer'][:19]}...,"
                  f" found at the {verified['where']})")
        else:
            print(f"{GREEN}pull {ref} --verify-key model.pub: refused (exit 10){RESET}, nothing published:")
            print(f"  {DIM}{done.stderr.strip().splitlines()[-1][:260]}{RESET}")


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # keep our lines in order with the subprocesses' output
    t_start = time.monotonic()
    unmount_all_under(WORK)
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "model").mkdir(parents=True)
    registry = webhook = None
    try:
        step("1. a local OCI registry and a sample model")
        registry = start_registry(root=WORK / "registry" / "data")
        print(f"registry: Debian's docker-registry (CNCF Distribution) at {registry.url}")
        files = sample_model(WORK / "model")
        ref = f"{registry.host}/models/phi3-mini:v1"
        digest = Pusher(registry.url).push_artifact(
            "models/phi3-mini", "v1", [file_layer(n, d) for n, d in files.items()],
            artifact_type="application/vnd.example.model.v1")
        print(f"pushed {ref} ({sum(map(len, files.values())):,} bytes, {len(files)} files, one layer per file)")
        print(f"  manifest {digest}")

        step("2. the webhook over TLS with a sample node inventory")
        certs = WORK / "certs"
        ca_bundle = subprocess.run(
            [BIN / "model-cache-webhook", "certs", "--service", "model-cache", "--namespace", "model-cache-system",
             "--out", certs, "--san", "127.0.0.1", "--san", "localhost"],
            check=True, capture_output=True, text=True).stdout.strip()
        print(f"certificates in {certs.relative_to(ROOT)} (caBundle {ca_bundle[:24]}...)")
        port = free_port()
        env = {**os.environ, "MODEL_CACHE_LOADER_IMAGE": "ghcr.io/model-cache/loader:0.1.0"}
        log = open(WORK / "webhook.log", "w")  # noqa: SIM115 (the webhook's log, open while it runs)
        webhook = subprocess.Popen(
            [BIN / "model-cache-webhook", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--tls-cert", certs / "tls.crt", "--tls-key", certs / "tls.key", "--nodes-file", ROOT / "examples/nodes.yaml"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"https://127.0.0.1:{port}"
        client = httpx.Client(verify=str(certs / "ca.crt"), timeout=10)
        wait_ready(client, url, webhook)
        print(f"webhook: {url} (ready; log in {(WORK / 'webhook.log').relative_to(ROOT)})")
        print("inventory: examples/nodes.yaml: 3 nodes cri-o 1.34 / kubelet 1.35 (pool=crio),"
              " 2 nodes containerd 2.0 (pool=containerd), 2 containerd nodes running the node agent (pool=agent)")

        step("3. the pod of examples/deployment.yaml, as its ReplicaSet creates it, once per pool")
        deployment = yaml.safe_load((ROOT / "examples/deployment.yaml").read_text().replace("REGISTRY", registry.host))
        template = deployment["spec"]["template"]
        mutated = {}
        for pool in ("crio", "containerd", "agent"):
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {**copy.deepcopy(template["metadata"]), "generateName": "phi3-server-7d9f8-",
                                "namespace": "inference"},
                   "spec": {**copy.deepcopy(template["spec"]), "nodeSelector": {"pool": pool}}}
            resp = client.post(f"{url}/mutate", json=review_for(pod, "inference"))
            resp.raise_for_status()
            r = resp.json()["response"]
            if not r["allowed"]:
                raise RuntimeError(f"pod denied: {r['status']['message']}")
            ops = json.loads(base64.b64decode(r["patch"]))
            after = jsonpatch.apply_patch(pod, ops)
            mutated[pool] = after
            print(f"\n{BOLD}nodeSelector pool={pool}{RESET}")
            print(f"  decision: {GREEN}{after['metadata']['annotations']['model.cache/injected']}{RESET}")
            for w in r.get("warnings") or []:
                print(f"  warning: {w}")
            print(f"  patch ({len(ops)} ops):")
            for op in ops:
                value = json.dumps(op.get("value"), separators=(",", ":"))
                print(f"    {op['op']:7} {op['path']:45} {DIM}{value[:110]}{'...' if len(value) > 110 else ''}{RESET}")

        step("4. the injected init container, run here exactly as the pod would run it")
        pod = copy.deepcopy(mutated["containerd"])
        # What the scheduler and the API server add, which the downward API hands to the containers.
        pod.setdefault("metadata", {})["uid"] = "6d1f5e0a-2b8c-4e55-9a3e-0c1d2e3f4a5b"
        pod["spec"]["nodeName"] = "containerd-node-1"
        init = next(c for c in pod["spec"]["initContainers"] if c["name"] == "model-loader")
        argv = list(init.get("command", [])) + list(init.get("args", []))
        print("init container command: " + " ".join(argv))
        cache = WORK / "node-cache"  # stands in for the node's hostPath
        expanded = kubelet.expand_args(argv, kubelet.container_env(pod, init))  # $(VAR) from the downward API
        local = [str(BIN / "model-loader") if a == contract.PROGRAM else str(cache) if a == contract.CACHE_MOUNT else a
                 for a in expanded]
        print(f"(run locally with {contract.CACHE_MOUNT} -> {cache.relative_to(ROOT)}, $(VAR) expanded as kubelet"
              f" does: pod uid {pod['metadata']['uid']}, node {pod['spec']['nodeName']})")
        t0 = time.monotonic()
        subprocess.run(local, check=True)
        cold = time.monotonic() - t0
        app = pod["spec"]["containers"][0]
        mount = next(m for m in app["volumeMounts"] if m.get("subPathExpr", "").startswith(contract.PODS_DIR))
        seen = kubelet.resolve_mount(cache, mount, kubelet.container_env(pod, app))
        print(f"\nthe app container mounts {mount['mountPath']} (readOnly={mount.get('readOnly')}) = "
              f"subPathExpr {mount['subPathExpr']} of the cache volume, this pod's pin:")
        print("\n".join(tree_lines(seen)))
        env_vars = {e["name"]: e.get("value") for e in app.get("env", [])}
        print("  env: " + ", ".join(f"{k}={v}" for k, v in env_vars.items() if k.startswith("MODEL_PATH")))
        for name, data in files.items():
            if (seen / name).read_bytes() != data:
                raise RuntimeError(f"{name} differs from what was pushed")
        print(f"{GREEN}every file is byte-identical to the pushed model{RESET} (cold pull {cold:.2f}s incl. start-up)")

        def as_pod(uid: str) -> list[str]:
            """The init container's command line for another pod of the same template."""
            other = copy.deepcopy(pod)
            other["metadata"]["uid"] = uid
            return [str(BIN / "model-loader") if a == contract.PROGRAM else str(cache) if a == contract.CACHE_MOUNT
                    else a for a in kubelet.expand_args(argv, kubelet.container_env(other, init))]

        print("\nsecond pod on the same node (warm cache):")
        t0 = time.monotonic()
        subprocess.run(as_pod("9a8b7c6d-0000-4000-8000-000000000002"), check=True)
        warm = time.monotonic() - t0
        print(f"{GREEN}warm cache hit in {warm:.2f}s{RESET} (manifest HEAD and GET, a 64-byte proof per blob over"
              " plain HTTP, no blob download)")

        step("5. the tag moves; the first pod restarts, a third pod starts")
        moved = {**files, "config.json": b'{"architectures": ["Phi3ForCausalLM"], "revision": 2}'}
        Pusher(registry.url).push_artifact("models/phi3-mini", "v1", [file_layer(n, d) for n, d in moved.items()],
                                           artifact_type="application/vnd.example.model.v1")
        subprocess.run(local, check=True)  # the first pod again: its pin
        restarted = kubelet.resolve_mount(cache, mount, kubelet.container_env(pod, app))
        subprocess.run(as_pod("9a8b7c6d-0000-4000-8000-000000000003"), check=True)
        third = copy.deepcopy(pod)
        third["metadata"]["uid"] = "9a8b7c6d-0000-4000-8000-000000000003"
        fresh = kubelet.resolve_mount(cache, mount, kubelet.container_env(third, app))
        if (restarted / "config.json").read_bytes() != files["config.json"] or \
                (fresh / "config.json").read_bytes() != moved["config.json"]:
            raise RuntimeError("a restarted pod did not keep its digest, or a new pod did not get the moved tag")
        print(f"{GREEN}the restarted pod keeps the digest it verified{RESET} ({restarted.name[:19]}...), the new pod"
              f" gets the moved tag ({fresh.name[:19]}...): a tag move affects new pods only")

        step("6. another tenant on the same node names the model's digest on a registry it made unreachable")
        as_json = [("json" if k and local[k - 1] == contract.FLAG_OUTPUT else a) for k, a in enumerate(local)]
        result = subprocess.run(as_json, check=True, capture_output=True, text=True)
        digest = json.loads(result.stdout.splitlines()[-1])["digest"]
        at = local.index(contract.PULL) + 1  # the reference
        stolen = [*local[:at], f"127.0.0.1:9/models/phi3-mini@{digest}", *local[at + 1:]]
        print("its init container: " + " ".join(stolen[at - 1:at + 1]) + " ... (the same flags, the same node cache)")
        out = subprocess.run(stolen, capture_output=True, text=True)
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        if out.returncode != 7 or "is not given out" not in out.stderr:
            raise RuntimeError(f"another tenant got the cached model: exit {out.returncode}: {last}")
        print(f"{GREEN}refused (exit {out.returncode}){RESET}: an outage proves nothing; the cache keeps the model for"
              " the identity that read it (docs/architecture.md, 'The shared cache')")
        print(f"  {DIM}{last[:300]}{RESET}")
        csi_path(mutated["agent"], registry.host, moved)  # the tag has moved (step 5): a new pod gets that
        signed_models(registry, files)
        step(f"done in {time.monotonic() - t_start:.1f}s")
        return 0
    except (subprocess.CalledProcessError, RuntimeError, httpx.HTTPError, OSError, KeyError, StopIteration) as exc:
        print(f"\n{RED}demo failed: {type(exc).__name__}: {exc}{RESET}", file=sys.stderr)
        if (WORK / "webhook.log").exists():
            print((WORK / "webhook.log").read_text()[-3000:], file=sys.stderr)
        return 1
    finally:
        if webhook and webhook.poll() is None:
            webhook.send_signal(signal.SIGTERM)
            try:
                webhook.wait(10)
            except subprocess.TimeoutExpired:
                webhook.kill()
        if registry:
            registry.stop()


if __name__ == "__main__":
    sys.exit(main())
