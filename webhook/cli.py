"""``model-cache-webhook``: serve the webhook, make certificates, preview a mutation.

::

    model-cache-webhook serve --host H --port P --tls-cert F --tls-key F [--kubeconfig F | --nodes-file F]
    model-cache-webhook certs --service NAME --namespace NS --out DIR [--days N] [--san NAME ...]
    model-cache-webhook mutate -f FILE [--nodes-file F] [--namespace-labels k=v,...]

Settings (``MODEL_CACHE_*``) are loaded once, before anything else; a bad value exits 2 with the message, before
a socket is opened. ``mutate`` is the GitOps preview: it runs the same pure core as the server over objects from
a file (Pods, and the pod templates of Deployments, StatefulSets, DaemonSets, Jobs, CronJobs and ReplicaSets),
prints the mutated objects as YAML on stdout and the decisions and warnings on stderr, and exits 1 if any object
would be denied.

The webhook's dependencies are the ``webhook`` extra (``pip install 'model-cache[webhook]'``); the loader image
installs the project without them. This module imports none of them at the top, so that a missing extra is an
exit 2 with that advice rather than a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from webhook.errors import ConfigError

if TYPE_CHECKING:
    from webhook.certs import CertManager, SelfManaged

EXIT_OK = 0
EXIT_DENIED = 1
EXIT_USAGE = 2

# The top-level modules of the ``webhook`` extra (pyproject.toml): what is absent where only the loader's
# dependencies are installed. uvloop is loaded by uvicorn, by name; httptools by webhook/server.py (its bounded protocol).
WEBHOOK_EXTRA = frozenset(
    {
        "fastapi", "uvicorn", "httptools", "uvloop", "orjson", "pydantic", "pydantic_settings", "typing_extensions",
        "kubernetes", "starlette", "yaml", "jsonpatch",
    }
)

log = logging.getLogger("webhook")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model-cache-webhook", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve /mutate, /validate, /healthz, /readyz and /metrics over TLS")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8443)
    serve.add_argument(
        "--probe-port", type=int, help="also serve /healthz, /readyz and /metrics (only) on this port, with slots of"
        " its own: kubelet's probes are answered while admission connections are all taken (default: none)"
    )
    serve.add_argument(
        "--max-connections", type=int, default=None, help="open admission connections at most; at the limit the"
        " longest-idle one is closed for a new one (default: 500)"
    )
    serve.add_argument("--tls-cert", required=True, type=Path, help="PEM certificate (re-read when it changes)")
    serve.add_argument("--tls-key", required=True, type=Path, help="PEM private key (re-read when it changes)")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--kubeconfig", type=Path, help="watch nodes through this kubeconfig (default: in-cluster)")
    source.add_argument("--nodes-file", type=Path, help="a NodeList (YAML or JSON) instead of watching the cluster")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    certs = sub.add_parser("certs", help="write ca.crt, tls.crt and tls.key for the Service; print the caBundle")
    certs.add_argument("--service", required=True)
    certs.add_argument("--namespace", required=True)
    certs.add_argument("--out", required=True, type=Path)
    certs.add_argument("--days", type=int, default=365, help="serving certificate lifetime (the CA gets twice it)")
    certs.add_argument("--san", action="append", default=[], help="an extra DNS name or IP (repeatable)")

    mutate = sub.add_parser("mutate", help="print the objects of FILE as the webhook would admit them")
    mutate.add_argument("-f", "--filename", required=True, help="YAML or JSON, several documents allowed; - is stdin")
    mutate.add_argument("--nodes-file", type=Path, help="the node inventory to decide with (default: none)")
    mutate.add_argument(
        "--namespace-labels", default="", help="labels of the objects' namespace, k=v,k=v (Pod Security level...)"
    )
    return parser


def _labels(text: str) -> dict[str, str]:
    labels = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--namespace-labels: {part!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"model-cache-webhook: {message}", file=sys.stderr)
    return code


# --- serve ---------------------------------------------------------------------------------------------------


# Self-managed certificates: how long start-up may take to settle the Secret and see kubelet project it (the
# Deployment's startupProbe allows 180 s before a restart), and how often a running replica re-checks it.
CERT_BOOTSTRAP_SECONDS = 170.0
CERT_RECONCILE_SECONDS = 600.0


def _self_managed(settings: Any) -> SelfManaged | None:
    """The self-managed certificate settings, or None when certificates come from outside.

    From MODEL_CACHE_MANAGE_CERTS, _TLS_SECRET, _SERVICE_NAME, _WEBHOOK_CONFIGURATION and _NAMESPACE (see
    manifests/base; the namespace comes from the downward API).
    """
    from webhook import certs

    if not settings.manage_certs:
        return None
    return certs.SelfManaged(
        namespace=settings.namespace,
        secret=settings.tls_secret,
        service=settings.service_name,
        webhook_configuration=settings.webhook_configuration,
    )


def _bootstrap_certs(manager: CertManager, cert_file: Path, key_file: Path, deadline: float) -> str | None:
    """Reconcile the Secret (retrying the API), then wait until kubelet has projected a certificate the
    published caBundle trusts. Returns None when done, else why it gave up."""
    import time

    from webhook import certs

    delay, problem = 0.5, ""
    while True:
        try:
            bundle = manager.reconcile()
            if manager.problem is None:
                break
            problem = manager.problem
        except Exception as exc:  # noqa: BLE001 - any API failure: retry until the deadline
            problem = str(exc)
        if time.monotonic() + delay > deadline:
            return f"could not set up the certificate Secret: {problem}"
        log.warning("certificate Secret not settled yet, retrying in %.1fs: %s", delay, problem)
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
    said = 0.0
    while True:
        try:
            if key_file.exists() and certs.chains_to(cert_file.read_bytes(), bundle.ca_cert):
                return None
        except OSError:
            pass
        now = time.monotonic()
        if now > deadline:
            return f"kubelet did not project the certificate Secret to {cert_file} in time"
        if now - said > 15:
            log.info("waiting for kubelet to project the certificate Secret to %s", cert_file)
            said = now
        time.sleep(1.0)


def _serve(args: argparse.Namespace, settings: Any) -> int:
    import gc
    import threading
    import time

    from webhook import certs
    from webhook import inventory as inv
    from webhook.app import create_app
    from webhook.server import MAX_CONNECTIONS, PROBE_PATHS, bind, configure_logging, limit_open_files, make_server
    from webhook.tls import ReloadingContext

    configure_logging(args.log_level)
    if args.max_connections is not None and args.max_connections < 1:
        return _fail(f"--max-connections is {args.max_connections}: give a positive number (default 500)")
    manager = None
    cfg = _self_managed(settings)
    if cfg is not None:
        try:
            manager = certs.CertManager(inv.ClusterObjects(inv.api_client(args.kubeconfig)), cfg)
        except Exception as exc:  # noqa: BLE001 - kubeconfig/in-cluster problems come in many types; all fatal here
            return _fail(f"cannot reach the cluster to manage certificates: {exc}")
        problem = _bootstrap_certs(manager, args.tls_cert, args.tls_key, time.monotonic() + CERT_BOOTSTRAP_SECONDS)
        if problem:
            return _fail(problem, 1)
    try:
        tls = ReloadingContext(args.tls_cert, args.tls_key)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot load the TLS certificate {args.tls_cert} / key {args.tls_key}: {exc}")
    try:
        if args.nodes_file is not None:
            inventory = inv.static(inv.load_file(args.nodes_file))
        else:
            inventory = inv.WatchingInventory(inv.api_client(args.kubeconfig))
    except Exception as exc:  # noqa: BLE001 - kubeconfig/in-cluster problems come in many types; all are fatal here
        return _fail(f"cannot set up the node inventory: {exc}")
    sockets = []
    for port in (args.port, args.probe_port):
        if port is None:
            continue
        try:
            sockets.append(bind(args.host, port))
        except OSError as exc:
            return _fail(f"cannot listen on {args.host}:{port}: {exc}")
    probe_port = sockets[1].getsockname()[1] if len(sockets) > 1 else None
    limit_open_files()
    readiness = [lambda: manager.ready_reason(tls.cert_pem)] if manager is not None else []
    app = create_app(inventory, settings, readiness=readiness)
    server = make_server(app, tls, host=args.host, port=args.port, probe_port=probe_port,
                         max_connections=args.max_connections or MAX_CONNECTIONS)
    stopping = threading.Event()
    if manager is not None:
        threading.Thread(target=manager.run, args=(stopping, CERT_RECONCILE_SECONDS), name="certs", daemon=True).start()
    log.info("serving on https://%s:%d", args.host, sockets[0].getsockname()[1])
    if probe_port is not None:
        log.info("probes on https://%s:%d (%s)", args.host, probe_port, " ".join(sorted(PROBE_PATHS)))
    # Everything built so far (modules, the app, a file inventory) lives as long as the process: keep it out of
    # the collector's full passes, which otherwise walk it all and show up as latency spikes.
    gc.freeze()
    try:
        server.run(sockets=sockets)
    finally:
        stopping.set()
    return EXIT_OK


# --- certs ---------------------------------------------------------------------------------------------------


def _certs(args: argparse.Namespace) -> int:
    from webhook import certs

    try:
        bundle = certs.generate(args.service, args.namespace, extra_sans=args.san, days=args.days)
        written = certs.write_bundle(bundle, args.out)
    except (OSError, ValueError) as exc:
        return _fail(f"certs: {exc}")
    for path in written.values():
        print(f"wrote {path}", file=sys.stderr)
    print(bundle.ca_bundle)
    return EXIT_OK


# --- mutate --------------------------------------------------------------------------------------------------


def _read_documents(name: str) -> list[Any]:
    import yaml

    text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def _objects(docs: list[Any]) -> list[Any]:
    """Documents, with v1 Lists (``kubectl get -o yaml``) flattened into their items."""
    out: list[Any] = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend(doc["items"])
        else:
            out.append(doc)
    return out


def _describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return f"document of type {type(obj).__name__}"
    meta = m if isinstance(m := obj.get("metadata"), dict) else {}
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "<unnamed>")
    return f"{obj.get('kind', '<no kind>')}/{name}"


def _mutate(args: argparse.Namespace, settings: Any) -> int:
    import yaml

    from webhook import admission
    from webhook import inventory as inv
    from webhook.errors import Denied, MalformedReview
    from webhook.snapshot import snapshot_from

    try:
        labels = _labels(args.namespace_labels)
        # Without a node list the preview decides as for an empty cluster: the init container, which works anywhere.
        snapshot = inv.load_file(args.nodes_file) if args.nodes_file else snapshot_from([], [], synced=True)
        objects = _objects(_read_documents(args.filename))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        return _fail(f"mutate: {exc}")

    out, code = [], EXIT_OK
    for obj in objects:
        what = _describe(obj)
        try:
            new_obj, warnings, decisions = admission.mutate_object(obj, labels, snapshot, settings)
        except Denied as exc:
            print(f"{what}: denied ({exc.message})", file=sys.stderr)
            code = max(code, EXIT_DENIED)
            continue
        except MalformedReview as exc:
            print(f"{what}: not a Kubernetes object the webhook can read: {exc}", file=sys.stderr)
            code = EXIT_USAGE
            continue
        for decision in decisions:
            print(str(decision), file=sys.stderr)
        for warning in warnings:
            print(f"{what}: warning: {warning}", file=sys.stderr)
        out.append(new_obj)
    if out:
        sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False))
    return code


# --- entry ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in WEBHOOK_EXTRA:
            raise
        return _fail(f"{exc.name} is missing: the webhook's dependencies are an extra, install model-cache[webhook]")


def _run(args: argparse.Namespace) -> int:
    if args.command == "certs":
        return _certs(args)  # needs no cluster settings
    from webhook.config import load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        return _fail(str(exc))
    if args.command == "serve":
        return _serve(args, settings)
    return _mutate(args, settings)


if __name__ == "__main__":
    sys.exit(main())
