"""Flags and helpers shared by the subcommands that talk to a registry (pull, push, prefetch, export, import)."""

from __future__ import annotations

import argparse
import base64
import binascii
import os
from typing import TYPE_CHECKING, TypeAlias

from loader import contract
from loader.config import LoaderSettings
from loader.errors import UsageError
from loader.reference import parse

if TYPE_CHECKING:
    from loader.bundle import RegistryOptions
    from loader.credentials import DockerConfig
    from loader.log import Logger
    from loader.signing import Policy, PolicyTable

#: What ``add_parser(sub, settings)`` receives: the ``model-loader`` parser's subcommands.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_registry_flags(p: argparse.ArgumentParser, settings: LoaderSettings) -> None:
    p.add_argument(contract.FLAG_CONCURRENCY, type=int, default=settings.concurrency, metavar="N",
                   help=f"parallel transfers (default {settings.concurrency})")
    p.add_argument(contract.FLAG_PLAIN_HTTP, action="store_true", default=None,
                   help="use plain HTTP (default only for localhost/127.0.0.1 registries)")
    p.add_argument(contract.FLAG_INSECURE, action="store_true", help="do not verify the registry's TLS certificate")
    p.add_argument(contract.FLAG_DOCKER_CONFIG, action="append", default=[], metavar="PATH",
                   help="docker config file or directory (repeatable; default $DOCKER_CONFIG or ~/.docker)")
    p.add_argument(contract.FLAG_CA_FILE, action="append", default=[], metavar="PEM",
                   help="also trust these CA certificates for registries (repeatable; the webhook passes the"
                        " admin's CA bundle ConfigMap)")
    p.add_argument(contract.FLAG_PLAIN_HTTP_REGISTRY, action="append", default=[], metavar="HOST[:PORT]",
                   help="speak plain HTTP to this registry (repeatable; localhost and 127.0.0.1 always are)")
    p.add_argument("--timeout", type=float, default=settings.timeout, metavar="SECONDS",
                   help=f"stall timeout per connection (default {settings.timeout:g})")


def check_concurrency(n: int) -> None:
    if not 1 <= n <= contract.MAX_CONCURRENCY:
        raise UsageError(f"{contract.FLAG_CONCURRENCY} {n} must be between 1 and {contract.MAX_CONCURRENCY}"
                         " (connections per loader)")


def parse_mirrors(values: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in values:
        host, sep, url = v.partition("=")
        if not sep or not host or not url:
            raise UsageError(f"{contract.FLAG_MIRROR} {v!r} is not HOST=URL, e.g. registry.example.com=http://127.0.0.1:30020")
        out.setdefault(host.strip(), []).append(url.strip())
    return out


def _empty_config_dir(path: str) -> bool:
    """A secret volume with nothing projected: empty, or only the kubelet's own ``..data`` / ``..<timestamp>``
    entries. Any other directory without a config file stays an error (a mistyped --docker-config)."""
    return os.path.isdir(path) and all(name.startswith("..") for name in os.listdir(path))


def load_credentials(paths: list[str], settings: LoaderSettings, log: Logger | None = None) -> DockerConfig:
    from loader import credentials

    # The webhook mounts pull secrets with optional: true (a deleted secret must not wedge the pod in
    # ContainerCreating, as the kubelet does not for images), so a named path may legitimately be absent or an
    # empty directory: say so and go on without it, as the kubelet does.
    present = [p for p in paths if os.path.exists(p) and not _empty_config_dir(p)]
    if log is not None:
        for p in paths:
            if p not in present:
                log.warning("docker_config.missing", path=p, hint="pull secret not mounted; continuing without it")
    if paths and not present:
        return credentials.load_docker_configs([], {})
    paths = present

    env = {k: v for k, v in (("DOCKER_CONFIG", settings.docker_config), ("HOME", settings.home),
                             ("PATH", settings.path)) if v}
    try:
        return credentials.load_docker_configs(paths or None, env)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def registry_options(args: argparse.Namespace, settings: LoaderSettings) -> RegistryOptions:
    """How export, import --to and sign open a repository, from the registry flags (add_registry_flags)."""
    from loader.bundle import RegistryOptions

    ca_files, plain_hosts = registry_settings(args)
    return RegistryOptions(plain_http=args.plain_http, insecure=args.insecure_skip_tls_verify,
                           credentials=load_credentials(args.docker_config, settings), timeout=args.timeout,
                           concurrency=args.concurrency, ca_files=ca_files, plain_http_registries=plain_hosts)


def registry_settings(args: argparse.Namespace) -> tuple[tuple[str, ...], frozenset[str]]:
    """--ca-file and --plain-http-registry, checked: the CA files exist (a missing one names the ConfigMap the
    webhook projects it from), the registries are host[:port]."""
    for path in args.ca_file:
        if not os.path.isfile(path):
            raise UsageError(f"{contract.FLAG_CA_FILE} {path!r} does not exist: when the webhook passes it, create the"
                             f" ConfigMap named by MODEL_CACHE_REGISTRY_CA_CONFIGMAP (key {contract.CA_BUNDLE_KEY}) in"
                             " the pod's namespace, or unset that setting")
    hosts = []
    for host in args.plain_http_registry:
        try:
            ref = parse(f"{host}/x")
        except ValueError as exc:
            raise UsageError(f"{contract.FLAG_PLAIN_HTTP_REGISTRY} {host!r} is not a registry host[:port]") from exc
        if ref.registry != host:
            raise UsageError(f"{contract.FLAG_PLAIN_HTTP_REGISTRY} {host!r} is not a registry host[:port],"
                             " e.g. registry.internal:5000")
        hosts.append(host)
    return tuple(args.ca_file), frozenset(hosts)


def add_verify_flags(p: argparse.ArgumentParser) -> None:
    """The signature policy (issue 13): with any of these, a model is served only once a signature verifies."""
    p.add_argument(contract.FLAG_VERIFY_KEY, action="append", default=[], metavar="PEM",
                   help="require a cosign signature by this public key (repeatable; any one key suffices)")
    p.add_argument(contract.FLAG_VERIFY_KEY_DATA, action="append", default=[], metavar="BASE64[,BASE64...]",
                   help="the same, inline: base64 of PEM public keys joined by ',' (the webhook passes"
                        f" $({contract.ENV_VERIFY_KEYS}))")
    p.add_argument(contract.FLAG_VERIFY_IDENTITY, action="append", default=[], metavar="ISSUER=SUBJECT",
                   help="require a keyless Sigstore bundle for this OIDC issuer and certificate subject (repeatable;"
                        f" any one suffices; needs {contract.FLAG_TRUSTED_ROOT})")
    p.add_argument(contract.FLAG_TRUSTED_ROOT, metavar="JSON",
                   help="the Sigstore trusted root keyless bundles are verified against, offline")
    p.add_argument(contract.FLAG_TRUSTED_ROOT_DATA, metavar="BASE64",
                   help=f"the same, inline: base64 of the trusted root JSON (the webhook passes $({contract.ENV_TRUSTED_ROOT}))")
    p.add_argument(contract.FLAG_SIGNATURE_POLICY, metavar="JSON",
                   help="the cluster's policy by registry/repository prefix (a JSON list of {prefix, keys, identities};"
                        " docs/architecture.md, 'Signatures'): each model must satisfy its longest matching rule")
    p.add_argument(contract.FLAG_SIGNATURE_POLICY_DATA, metavar="JSON",
                   help=f"the same, inline (the webhook passes $({contract.ENV_SIGNATURE_POLICY}))")
    p.add_argument(contract.FLAG_VERIFY_MODEL_SIGNATURE, action="store_true",
                   help="require instead an OpenSSF model signature (model.sig in the model's tree, over its files)"
                        f" by one of the {contract.FLAG_VERIFY_KEY} ECDSA keys, checked after download and before"
                        " publish")


def signature_table(args: argparse.Namespace) -> PolicyTable | None:
    """The cluster's policy by prefix (--signature-policy[-data]), keys loaded now; None without one."""
    if args.signature_policy is None and args.signature_policy_data is None:
        return None
    if args.signature_policy is not None and args.signature_policy_data is not None:
        raise UsageError(f"{contract.FLAG_SIGNATURE_POLICY} and {contract.FLAG_SIGNATURE_POLICY_DATA} both given:"
                         " pass one")
    if args.verify_key or args.verify_key_data or args.verify_identity or args.verify_model_signature:
        raise UsageError(f"{contract.FLAG_SIGNATURE_POLICY} names the keys per prefix: drop {contract.FLAG_VERIFY_KEY},"
                         f" {contract.FLAG_VERIFY_KEY_DATA}, {contract.FLAG_VERIFY_IDENTITY} and"
                         f" {contract.FLAG_VERIFY_MODEL_SIGNATURE}, or the policy")
    from loader import policy as cluster_policy

    where = contract.FLAG_SIGNATURE_POLICY_DATA if args.signature_policy is None else args.signature_policy
    text = args.signature_policy_data
    if args.signature_policy is not None:
        try:
            with open(args.signature_policy, encoding="utf-8") as f:
                text = f.read(cluster_policy.MAX_POLICY + 1)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{contract.FLAG_SIGNATURE_POLICY} {args.signature_policy!r}: {exc}") from None
    try:
        rules = cluster_policy.parse_rules(text or "", where)
    except cluster_policy.PolicyError as exc:
        raise UsageError(str(exc)) from None
    if not any(rule.required for rule in rules):
        return None
    _require_modules(["cryptography"] + (["sigstore"] if any(rule.identities for rule in rules) else []))
    from loader import signing

    root, source = _trusted_root(args)
    return signing.PolicyTable.build(rules, root, source, where)


def _trusted_root(args: argparse.Namespace) -> tuple[bytes | None, str | None]:
    """The trusted root's bytes and where they came from (--trusted-root FILE or --trusted-root-data), checked."""
    from loader import signing

    if args.trusted_root and args.trusted_root_data:
        raise UsageError(f"{contract.FLAG_TRUSTED_ROOT} and {contract.FLAG_TRUSTED_ROOT_DATA} both given: pass one")
    if args.trusted_root_data:
        try:
            root = base64.b64decode(args.trusted_root_data, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(f"{contract.FLAG_TRUSTED_ROOT_DATA} is not base64: give base64 of the trusted root"
                             " JSON") from None
        signing.load_trusted_root(root, contract.FLAG_TRUSTED_ROOT_DATA)
        return root, contract.FLAG_TRUSTED_ROOT_DATA
    if not args.trusted_root:
        return None, None
    try:
        with open(args.trusted_root, "rb") as f:
            root = f.read(signing.MAX_TRUSTED_ROOT + 1)
    except OSError as exc:
        raise UsageError(f"{contract.FLAG_TRUSTED_ROOT} {args.trusted_root!r}: {exc.strerror}") from None
    signing.load_trusted_root(root, args.trusted_root)
    return root, args.trusted_root


def signature_policy(args: argparse.Namespace) -> Policy | None:
    """The policy the verify flags give, keys loaded and checked now (a bad key stops the loader before it touches
    the cache); None when no flag asks for a signature (or the cluster's policy by prefix is given instead)."""
    if args.signature_policy is not None or args.signature_policy_data is not None:
        return None
    if not (args.verify_key or args.verify_key_data or args.verify_identity or args.trusted_root
            or args.trusted_root_data or args.verify_model_signature):
        return None
    from loader import signing

    _require_modules(["cryptography"] + (["sigstore"] if args.verify_identity or args.trusted_root else [])
                     + (["model_signing"] if args.verify_model_signature else []))
    keyed = bool(args.verify_key or args.verify_key_data)
    if args.verify_model_signature and (not keyed or args.verify_identity):
        raise UsageError(f"{contract.FLAG_VERIFY_MODEL_SIGNATURE} needs {contract.FLAG_VERIFY_KEY} (ECDSA public keys;"
                         " keyless model signatures are not supported)")
    if bool(args.verify_identity) != bool(args.trusted_root or args.trusted_root_data):
        raise UsageError(f"{contract.FLAG_VERIFY_IDENTITY} and {contract.FLAG_TRUSTED_ROOT} go together: keyless"
                         " bundles are verified for an identity against a trusted root, offline")
    root, root_source = _trusted_root(args)
    keys: list[signing.PublicKey] = []
    for path in args.verify_key:
        try:
            with open(path, "rb") as f:
                pem = f.read(signing.MAX_KEY_PEM + 1)
        except OSError as exc:
            raise UsageError(f"{contract.FLAG_VERIFY_KEY} {path!r}: {exc.strerror}") from None
        keys.append(signing.load_public_key(pem, path))
    for i, text in enumerate(args.verify_key_data):
        keys.extend(signing.keys_from_base64(text, f"{contract.FLAG_VERIFY_KEY_DATA} #{i + 1}"))
    identities = tuple(signing.Identity.parse(v, contract.FLAG_VERIFY_IDENTITY) for v in args.verify_identity)
    return signing.Policy(keys=tuple(keys), identities=identities, trusted_root=root,
                          trusted_root_source=root_source, model_signature=args.verify_model_signature)


def _require_modules(names: list[str]) -> None:
    """Signature checks need packages a minimal loader install may lack: say which, before the cache is touched."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise UsageError(f"signature verification needs the Python packages {', '.join(missing)}, which this loader"
                         " does not have (pip install cryptography sigstore model-signing)")
