"""``model-cache-webhook``: certs, the mutate preview, and serve as a real process (file and watched inventories)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509

from tests.support.fake_apiserver import FakeApiServer
from tests.support.tls import client_context
from webhook import admission
from webhook.cli import main
from webhook.config import load_settings
from webhook.snapshot import snapshot_from

LOADER = "registry.example.com/model-cache/loader:0.1.0"
EXE = shutil.which("model-cache-webhook", path=str(Path(sys.executable).parent))

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web", "namespace": "models", "annotations": {"model.cache/ref": "registry.example.com/models/phi3:v1"}},
    "spec": {"containers": [{"name": "server", "image": "registry.example.com/app/server:1"}], "nodeSelector": {"pool": "crio"}},
}
DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "llm", "namespace": "models"},
    "spec": {
        "selector": {"matchLabels": {"app": "llm"}},
        "template": {
            "metadata": {"labels": {"app": "llm"}, "annotations": {"model.cache/ref": "registry.example.com/models/llama:v3"}},
            "spec": {"containers": [{"name": "server", "image": "registry.example.com/app/server:1"}], "nodeSelector": {"pool": "containerd"}},
        },
    },
}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "llm"}, "spec": {"ports": [{"port": 80}]}}
NODES = {
    "apiVersion": "v1",
    "kind": "List",
    "items": [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "crio-1", "labels": {"pool": "crio"}},
            "status": {"nodeInfo": {"containerRuntimeVersion": "cri-o://1.34.1", "kubeletVersion": "v1.35.0"}},
        },
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "containerd-1", "labels": {"pool": "containerd"}},
            "status": {"nodeInfo": {"containerRuntimeVersion": "containerd://2.0.4", "kubeletVersion": "v1.34.2"}},
        },
    ],
}


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("MODEL_CACHE_LOADER_IMAGE", LOADER)
    return {**os.environ, "MODEL_CACHE_LOADER_IMAGE": LOADER}


# --- certs --------------------------------------------------------------------------------------------------------


def test_certs_writes_a_ca_and_a_serving_pair_and_prints_the_ca_bundle(tmp_path, capsys):
    out = tmp_path / "certs"
    code = main(["certs", "--service", "model-cache", "--namespace", "model-cache-system", "--out", str(out), "--days", "90"])
    printed = capsys.readouterr()

    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    ca_pem = (out / "ca.crt").read_bytes()
    assert printed.out == base64.b64encode(ca_pem).decode() + "\n"
    assert printed.err == "".join(f"wrote {out / n}\n" for n in ("ca.crt", "tls.crt", "tls.key"))
    ca = x509.load_pem_x509_certificate(ca_pem)
    leaf = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "model-cache",
        "model-cache.model-cache-system",
        "model-cache.model-cache-system.svc",
        "model-cache.model-cache-system.svc.cluster.local",
    ]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 90
    assert (out / "tls.key").stat().st_mode & 0o777 == 0o600


def test_certs_extra_sans_and_a_bad_lifetime(tmp_path, capsys):
    assert main(["certs", "--service", "s", "--namespace", "n", "--out", str(tmp_path), "--san", "127.0.0.1", "--san", "localhost"]) == 0
    leaf = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName)[-1] == "localhost"
    capsys.readouterr()
    assert main(["certs", "--service", "s", "--namespace", "n", "--out", str(tmp_path / "x"), "--days", "0"]) == 2
    assert capsys.readouterr().err == "model-cache-webhook: certs: certificate lifetime must be at least 1 day, got 0\n"


# --- mutate -------------------------------------------------------------------------------------------------------


def test_mutate_prints_the_mutated_objects_and_the_decisions(tmp_path, capsys, env):
    source = tmp_path / "app.yaml"
    source.write_text(yaml.safe_dump_all([POD, DEPLOYMENT, SERVICE]))
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps(NODES))

    code = main(["mutate", "-f", str(source), "--nodes-file", str(nodes), "--namespace-labels", "model.cache/enabled=true"])
    printed = capsys.readouterr()

    settings = load_settings()
    snapshot = snapshot_from(NODES["items"], [], synced=True)
    labels = {"model.cache/enabled": "true"}
    docs = list(yaml.safe_load_all(source.read_text()))  # key order as in the file: the output keeps it
    expected = [admission.mutate_object(obj, labels, snapshot, settings) for obj in docs]
    assert code == 0
    assert list(yaml.safe_load_all(printed.out)) == [e[0] for e in expected]
    assert printed.out == yaml.safe_dump_all([e[0] for e in expected], sort_keys=False)
    assert printed.err.splitlines() == [str(d) for e in expected for d in e[2]] + [
        f"Deployment/llm: warning: {w}" for w in expected[1][1]
    ]
    # The pod lands on the CRI-O pool: an image volume; the Deployment on containerd: the loader init container.
    pod_out, deployment_out = expected[0][0], expected[1][0]
    assert [v["name"] for v in pod_out["spec"]["volumes"] if "image" in v] != []
    assert deployment_out["spec"]["template"]["spec"]["initContainers"][0]["args"][:2] == [
        "pull",
        "registry.example.com/models/llama:v3",
    ]


def test_mutate_reads_stdin_and_exits_1_when_an_object_would_be_denied(tmp_path, capsys, monkeypatch, env):
    bad = json.loads(json.dumps(POD))
    bad["metadata"]["annotations"]["model.cache/mode"] = "fastest"
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(yaml.safe_dump_all([bad, SERVICE])))
    code = main(["mutate", "-f", "-"])
    printed = capsys.readouterr()

    settings = load_settings()
    denial = admission.decide(bad, {}, snapshot_from([], [], synced=True), settings)
    assert code == 1
    assert printed.out == yaml.safe_dump_all([SERVICE], sort_keys=False)
    assert printed.err.splitlines() == [
        f"Pod/web: denied ({denial[0].reason})",
        "Service/llm: unchanged (not a Pod or a workload with a pod template)",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--namespace-labels", "novalue"], "mutate: --namespace-labels: 'novalue' is not key=value", id="bad-labels"),
        pytest.param(["--nodes-file", "/nonexistent/nodes.yaml"], "mutate: [Errno 2] No such file or directory: '/nonexistent/nodes.yaml'", id="missing-nodes"),
    ],
)
def test_mutate_usage_errors_exit_2(tmp_path, capsys, env, args, message):
    source = tmp_path / "pod.yaml"
    source.write_text(yaml.safe_dump(POD))
    assert main(["mutate", "-f", str(source), *args]) == 2
    assert capsys.readouterr().err == f"model-cache-webhook: {message}\n"


# --- serve --------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_settings_stop_serve_before_it_listens(tmp_path, env):
    env = {**env, "MODEL_CACHE_LOADER_CPU_REQUEST": "lots"}
    proc = subprocess.run(
        [EXE, "serve", "--tls-cert", "x", "--tls-key", "y", "--nodes-file", "z"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        "model-cache-webhook: invalid model-cache settings: MODEL_CACHE_LOADER_CPU_REQUEST: "
        "'lots' is not a Kubernetes quantity (e.g. 250m, 2, 256Mi, 1Gi)\n"
    )


def test_serve_without_a_certificate_exits_2(tmp_path, env):
    proc = subprocess.run(
        [EXE, "serve", "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key"), "--nodes-file", "z"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        f"model-cache-webhook: cannot load the TLS certificate {tmp_path / 'tls.crt'} / key {tmp_path / 'tls.key'}: "
        f"[Errno 2] No such file or directory: '{tmp_path / 'tls.crt'}'"
    )


class _Process:
    def __init__(self, args: list[str], env: dict, tmp_path: Path) -> None:
        assert main(["certs", "--service", "model-cache", "--namespace", "ns", "--out", str(tmp_path / "tls"), "--san", "127.0.0.1"]) == 0
        self.ca = (tmp_path / "tls" / "ca.crt").read_bytes()
        self.port = _free_port()
        self.log = tmp_path / "serve.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [EXE, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--tls-cert", str(tmp_path / "tls" / "tls.crt"), "--tls-key", str(tmp_path / "tls" / "tls.key"), *args],
                env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
        self.client = httpx.Client(base_url=f"https://127.0.0.1:{self.port}", verify=client_context(self.ca))

    def get_when_up(self, path: str, want: int, deadline: float = 60.0) -> httpx.Response:
        """Poll ``path`` until it answers ``want`` (start-up and sync take a moment in another process)."""
        end = time.monotonic() + deadline
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                resp = self.client.get(path)
                if resp.status_code == want:
                    return resp
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, f"{path} never answered {want}: {self.log.read_text()}"
            time.sleep(0.1)

    def stop(self) -> int:
        """SIGTERM, as kubelet sends; uvicorn drains, then re-raises the signal, so the status is -SIGTERM."""
        self.client.close()
        self.proc.terminate()
        return self.proc.wait(30)


def test_serve_with_a_nodes_file_answers_reviews_and_logs_json_lines(tmp_path, env):
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps(NODES))
    server = _Process(["--nodes-file", str(nodes)], env, tmp_path)
    try:
        assert server.get_when_up("/readyz", 200).json() == {"status": "ready", "nodes": 2, "namespaces": 0}
        body = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE", "namespace": "models", "object": POD},
        }
        resp = server.client.post("/mutate", json=body)
        assert resp.status_code == 200
        assert resp.json() == admission.mutate_review(
            json.loads(json.dumps(body)), snapshot_from(NODES["items"], [], synced=True), load_settings()
        )
    finally:
        assert server.stop() == -signal.SIGTERM
    lines = [json.loads(line) for line in server.log.read_text().splitlines()]
    assert all(sorted(line) == ["level", "logger", "message", "time"] for line in lines)
    messages = [{k: v for k, v in line.items() if k != "time"} for line in lines]
    assert {"level": "info", "logger": "webhook", "message": f"serving on https://127.0.0.1:{server.port}"} in messages
    assert {"level": "info", "logger": "uvicorn.error", "message": "Application shutdown complete."} in messages


def test_serve_with_a_probe_port_serves_probes_and_metrics_there_and_nothing_else(tmp_path, env):
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps(NODES))
    probe_port = _free_port()
    server = _Process(["--nodes-file", str(nodes), "--probe-port", str(probe_port), "--max-connections", "50"], env, tmp_path)
    try:
        assert server.get_when_up("/readyz", 200).status_code == 200
        with httpx.Client(base_url=f"https://127.0.0.1:{probe_port}", verify=client_context(server.ca)) as probes:
            assert probes.get("/readyz").json() == {"status": "ready", "nodes": 2, "namespaces": 0}
            assert probes.get("/healthz").status_code == 200
            assert "model_cache_" in probes.get("/metrics").text
            assert probes.post("/mutate", json={}).status_code == 404
    finally:
        assert server.stop() == -signal.SIGTERM
    messages = [json.loads(line)["message"] for line in server.log.read_text().splitlines()]
    assert f"probes on https://127.0.0.1:{probe_port} (/healthz /metrics /readyz)" in messages


def test_serve_refuses_a_connection_limit_below_one(tmp_path, env):
    proc = subprocess.run(
        [EXE, "serve", "--tls-cert", "x", "--tls-key", "y", "--nodes-file", "z", "--max-connections", "0"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert (proc.returncode, proc.stderr) == (
        2, "model-cache-webhook: --max-connections is 0: give a positive number (default 500)\n")


def test_serve_with_a_kubeconfig_is_ready_once_the_watch_has_listed(tmp_path, env):
    fake = FakeApiServer()
    fake.hold("nodes")
    fake.put("nodes", NODES["items"][0])
    fake.put("namespaces", {"metadata": {"name": "models", "labels": {"model.cache/enabled": "true"}}})
    server = _Process(["--kubeconfig", str(fake.write_kubeconfig(tmp_path / "kubeconfig"))], env, tmp_path)
    try:
        not_ready = server.get_when_up("/readyz", 503)
        assert not_ready.json()["status"] == "not ready"
        fake.release("nodes")
        assert server.get_when_up("/readyz", 200).json() == {"status": "ready", "nodes": 1, "namespaces": 1}
        fake.put("nodes", NODES["items"][1])
        metrics = ""
        for _ in range(600):
            metrics = server.client.get("/metrics").text
            if 'model_cache_inventory_nodes{runtime="containerd"} 1.0' in metrics:
                break
            time.sleep(0.05)
        assert 'model_cache_inventory_nodes{runtime="containerd"} 1.0' in metrics
        assert 'model_cache_inventory_nodes{runtime="cri-o"} 1.0' in metrics
    finally:
        assert server.stop() == -signal.SIGTERM
        fake.stop()


# --- serve with self-managed certificates --------------------------------------------------------------------------

# Names other than the defaults, so the test shows each MODEL_CACHE_* certificate setting is the one used.
MANAGED = {
    "MODEL_CACHE_MANAGE_CERTS": "true",
    "MODEL_CACHE_NAMESPACE": "mc-system",
    "MODEL_CACHE_TLS_SECRET": "mc-serving",
    "MODEL_CACHE_SERVICE_NAME": "mc-webhook",
    "MODEL_CACHE_WEBHOOK_CONFIGURATION": "mc.hooks",
}
MANAGED_SECRET = "/api/v1/namespaces/mc-system/secrets/mc-serving"
MANAGED_CONFIGS = [f"/apis/admissionregistration.k8s.io/v1/{kind}webhookconfigurations/mc.hooks" for kind in ("mutating", "validating")]


def _configuration(path: str) -> dict:
    kind = "Mutating" if "/mutating" in path else "Validating"
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": f"{kind}WebhookConfiguration",
        "metadata": {"name": "mc.hooks"},
        "webhooks": [
            {"name": "pods.model.cache", "clientConfig": {"service": {"name": "mc-webhook", "namespace": "mc-system", "path": "/mutate"}},
             "sideEffects": "None", "admissionReviewVersions": ["v1"]},
        ],
    }


def test_serve_with_managed_certificates_creates_the_secret_publishes_the_ca_and_serves_it(tmp_path, env):
    from tests.support.tls import SecretDir
    from webhook import certs

    fake = FakeApiServer()
    for path in MANAGED_CONFIGS:
        fake.store_put(path, _configuration(path))
    fake.put("nodes", NODES["items"][0])
    mounted = SecretDir(tmp_path / "mounted")  # the Secret volume (optional: true): empty until kubelet projects it
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [EXE, "serve", "--host", "127.0.0.1", "--port", str(port), "--tls-cert", str(mounted.cert_file),
             "--tls-key", str(mounted.key_file), "--kubeconfig", str(fake.write_kubeconfig(tmp_path / "kubeconfig"))],
            env={**env, **MANAGED}, stdout=subprocess.DEVNULL, stderr=out,
        )
    try:
        secret = None
        for _ in range(1200):
            assert proc.poll() is None, log.read_text()
            secret = fake.store_get(MANAGED_SECRET)
            if secret is not None:
                break
            time.sleep(0.05)
        bundle = certs.bundle_from_secret(secret)
        assert bundle is not None, secret
        assert (secret["type"], secret["metadata"]["namespace"]) == ("kubernetes.io/tls", "mc-system")
        leaf = x509.load_pem_x509_certificate(bundle.tls_cert)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == certs.service_dns_names("mc-webhook", "mc-system")
        # The caBundle lands in both configurations; nothing else in them changes.
        for _ in range(1200):
            if all(w["clientConfig"].get("caBundle") for p in MANAGED_CONFIGS for w in fake.store_get(p)["webhooks"]):
                break
            time.sleep(0.05)
        for path in MANAGED_CONFIGS:
            stored = fake.store_get(path)
            assert [w["clientConfig"].pop("caBundle") for w in stored["webhooks"]] == [bundle.ca_bundle]
            del stored["metadata"]["resourceVersion"]
            assert stored == _configuration(path)
        # Until kubelet projects the Secret there is no certificate to serve, so nothing listens yet.
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
        assert proc.poll() is None
        mounted.rotate(bundle)  # kubelet's projection

        host = "mc-webhook.mc-system.svc"  # what the apiserver dials; verified against the published CA
        client = httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=client_context(base64.b64decode(bundle.ca_bundle)))
        try:
            ready = None
            for _ in range(1200):
                assert proc.poll() is None, log.read_text()
                try:
                    ready = client.get("/readyz", extensions={"sni_hostname": host})
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            assert ready is not None and ready.status_code == 200, log.read_text()
            assert ready.json() == {"status": "ready", "nodes": 1, "namespaces": 0}
        finally:
            client.close()
    finally:
        proc.terminate()
        assert proc.wait(30) == -signal.SIGTERM
        fake.stop()
    messages = [json.loads(line)["message"] for line in log.read_text().splitlines()]
    assert "created certificate Secret mc-system/mc-serving" in messages
    assert "published the caBundle in the mutating webhook configuration mc.hooks" in messages
    assert "published the caBundle in the validating webhook configuration mc.hooks" in messages


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MODEL_CACHE_NAMESPACE", "Model_Cache", "'Model_Cache' is not a DNS label (at most 63 lower case letters, digits and '-', e.g. model-cache)"),
        ("MODEL_CACHE_SERVICE_NAME", "a.b", "'a.b' is not a DNS label (at most 63 lower case letters, digits and '-', e.g. model-cache)"),
        ("MODEL_CACHE_TLS_SECRET", "-tls", "'-tls' is not a DNS subdomain name (lower case letters, digits, '-' and '.', e.g. model-cache-tls)"),
        ("MODEL_CACHE_WEBHOOK_CONFIGURATION", "x" * 254, f"'{'x' * 254}' is not a DNS subdomain name (lower case letters, digits, '-' and '.', e.g. model-cache-tls)"),
        ("MODEL_CACHE_MANAGE_CERTS", "perhaps", "Input should be a valid boolean, unable to interpret input"),
    ],
    ids=["namespace", "service", "secret", "configuration-too-long", "manage-certs"],
)
def test_bad_certificate_settings_stop_serve(tmp_path, env, capsys, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    assert main(["serve", "--tls-cert", "x", "--tls-key", "y", "--nodes-file", "z"]) == 2
    assert capsys.readouterr().err == f"model-cache-webhook: invalid model-cache settings: {name}: {message}\n"


def test_bad_registry_settings_stop_serve_naming_every_bad_value(tmp_path, env, capsys, monkeypatch):
    monkeypatch.setenv("MODEL_CACHE_REGISTRY_CA_CONFIGMAP", "ca bundle")
    monkeypatch.setenv("MODEL_CACHE_PLAIN_HTTP_REGISTRIES", "registry.internal:5000,registry.internal/models")
    assert main(["serve", "--tls-cert", "x", "--tls-key", "y", "--nodes-file", "z"]) == 2
    assert capsys.readouterr().err == (
        "model-cache-webhook: invalid model-cache settings: MODEL_CACHE_REGISTRY_CA_CONFIGMAP: 'ca bundle' is not a"
        " ConfigMap name (a DNS subdomain: lower case letters, digits, '-' and '.', e.g. registry-ca); leave it empty"
        " for none; MODEL_CACHE_PLAIN_HTTP_REGISTRIES: plain_http_registries entry 'registry.internal/models' is not"
        " host or host:port (e.g. registry.internal, 10.0.0.5:5000)\n"
    )


def test_certificate_settings_default_to_the_manifests_names(monkeypatch):
    for name in [n for n in os.environ if n.startswith("MODEL_CACHE_")]:
        monkeypatch.delenv(name)
    s = load_settings()
    assert (s.manage_certs, s.namespace, s.tls_secret, s.service_name, s.webhook_configuration) == (
        False, "model-cache-system", "model-cache-tls", "model-cache", "model-cache"
    )
    assert load_settings(manage_certs="true").manage_certs is True


def test_the_documented_connection_limit_is_the_one_in_force():
    from webhook.cli import _parser
    from webhook.server import MAX_CONNECTIONS

    serve = _parser()._subparsers._group_actions[0].choices["serve"]
    [action] = [a for a in serve._actions if "--max-connections" in a.option_strings]
    assert f"(default: {MAX_CONNECTIONS})" in action.help
