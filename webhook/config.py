"""Cluster settings for the webhook, read once from ``MODEL_CACHE_*`` environment variables and validated at start-up.

This is the only module that reads the environment. The result is passed to the admission functions as an
argument, so a bad value stops the process at boot (``ConfigError``) instead of failing requests later.

``MODEL_CACHE_ALLOWED_REGISTRIES`` takes a JSON list or a comma-separated string; each entry is ``host``,
``host:port`` or ``host/repository-prefix``. Empty means every registry is allowed. ``MODEL_CACHE_PLAIN_HTTP_REGISTRIES``
takes the same forms of list, of ``host`` or ``host:port`` only.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from loader import contract
from loader.policy import PolicyError, Rule, parse_rules
from loader.reference import ReferenceError, parse
from webhook.annotations import parse_cache
from webhook.errors import ConfigError

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][0-9]+)?$")
_SUFFIX = {
    None: Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
_VERSION = re.compile(r"^[0-9]+\.[0-9]+$")
_HOST_PORT = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?$|^\[[0-9a-f:.]+\](:[0-9]{1,5})?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_REPO_PREFIX = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes resource quantity as a number ("250m" -> 0.25, "1Gi" -> 1073741824); ValueError if malformed."""
    m = _QUANTITY.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 250m, 2, 256Mi, 1Gi)")
    suffix = m.group(2)
    try:
        number = Decimal(m.group(1))
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from exc
    if suffix and suffix[0] in "eE":
        return number * Decimal(10) ** int(suffix[1:])
    return number * _SUFFIX[suffix]


def parse_version(text: str) -> tuple[int, int]:
    """``"1.33"`` -> (1, 33)."""
    if not _VERSION.match(text):
        raise ValueError(f"{text!r} is not a MAJOR.MINOR version such as 1.33")
    major, minor = text.split(".")
    return int(major), int(minor)


class Settings(BaseSettings):
    """Everything an admin can tune. Defaults suit a cluster with a CRI-O pool and a containerd pool."""

    model_config = SettingsConfigDict(env_prefix="MODEL_CACHE_", frozen=True, extra="ignore")

    loader_image: str = "ghcr.io/model-cache/loader:0.1.0"
    node_cache_path: str = contract.DEFAULT_NODE_CACHE
    default_mount_path: str = "/models"
    default_mode: Literal["auto", "image-volume", "csi", "init-container"] = "auto"
    default_cache: str = "node"
    # The loader's resources. Kubernetes charges a pod, for its whole life, the larger of its largest init
    # container's request and the sum of its app containers' requests, per resource: so the loader's *requests*
    # are paid by every pod whose app asks for less (at 250m, 8 such pods filled a 2-CPU node), while its limits
    # cost the node nothing once it has exited. It needs little to be scheduled: 35 MB peak RSS whatever the model
    # size, one 1 MiB buffer per download, ~1.7 CPU-seconds per GB hashed (docs/benchmarks.md). Hence small requests
    # (50m, 64Mi: below what any real app requests, so they rarely change a pod's footprint) and generous limits
    # (2 CPUs to download and hash at full speed; 512Mi for the interpreter, TLS, the buffers and the page cache its
    # writes are charged with). Any request or limit makes a BestEffort pod Burstable; a Guaranteed pod is kept
    # Guaranteed by giving the loader requests equal to limits (webhook/mutate.py, loader_resources).
    loader_cpu_request: str = "50m"
    loader_cpu_limit: str = "2"
    loader_memory_request: str = "64Mi"
    loader_memory_limit: str = "512Mi"
    loader_concurrency: int = Field(default=8, ge=1, le=contract.MAX_CONCURRENCY)
    # On a shared cache (node hostPath, pvc:) the loader asks the registry even for an already cached digest, so
    # a pod cannot read another tenant's private model just by knowing its digest. Costs one manifest HEAD per
    # pod start; a registry outage still falls back to the cache. Off only for single-tenant clusters.
    loader_check_access: bool = True
    allowed_registries: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A ConfigMap with the CA certificates (PEM, key contract.CA_BUNDLE_KEY) the loader trusts for registries besides
    # its image's: projected into the loader by name, so it must exist in every enabled namespace (trust-manager's
    # Bundle distributes one). Empty: none.
    registry_ca_configmap: str = ""
    # Registries (host or host:port) the loader speaks plain HTTP to: in-cluster registries without TLS. Passed to
    # every loader; a model from one is never "verified over TLS" for the shared cache's access rule.
    plain_http_registries: Annotated[list[str], NoDecode] = Field(default_factory=list)
    loader_run_as_user: int = Field(default=65532, ge=1, le=2**31 - 1)
    # The cluster's signature policy (issue 13; loader/policy.py's JSON: rules of prefix, keys, identities): a model
    # whose longest matching rule names keys or identities is served only once a signature verifies. The webhook
    # keeps such models off image volumes (the runtime checks no signature) and passes each loader the rules its
    # models match; the node agent enforces the same document (--signature-policy) on CSI volumes.
    signature_policy: Annotated[tuple[Rule, ...], NoDecode] = ()
    # base64 of the Sigstore trusted root JSON that keyless identities in the policy are verified against.
    trusted_root: str = ""
    # Whether every node agent enforces the same policy (manifests/overlays/agent/signature-policy): only then may a
    # model the policy covers take the CSI path; otherwise it takes the init container, whose loader the webhook
    # hands the policy itself. The webhook cannot see an agent's flags, so the admin says so.
    agent_enforces_signatures: bool = False
    # Weight (1-100) of the preferred node affinity toward nodes whose node agent holds the pod's model complete
    # (label contract.warm_label), added on the CSI and node-cache paths while some node carries that label; the
    # scheduler then places replicas on warm nodes when they fit. 0: never.
    warm_affinity_weight: int = Field(default=50, ge=0, le=100)
    image_volume_min_crio: str = "1.33"
    image_volume_min_kubelet: str = "1.35"
    # Self-managed certificates (see webhook/certs.py): on, the webhook keeps its CA and serving certificate in
    # Secret ``tls_secret`` of ``namespace`` (SANs from ``service_name``) and patches the caBundle into the
    # Mutating- and ValidatingWebhookConfiguration named ``webhook_configuration``. Off when certificates come
    # from outside (certs/generate.sh, cert-manager).
    manage_certs: bool = False
    tls_secret: str = "model-cache-tls"
    service_name: str = "model-cache"
    webhook_configuration: str = "model-cache"
    namespace: str = "model-cache-system"

    # How long a review's body may take to arrive, from the first read of it. The API server sends a review whole
    # and gives up after the webhook's timeoutSeconds (5 s in manifests/base, at most 30 s), so twice that is never
    # hit by it; a client trickling a body is cut there instead of holding its buffer (answered 408).
    review_read_seconds: float = Field(default=10.0, gt=0, le=60)

    @field_validator("loader_image")
    @classmethod
    def _image(cls, v: str) -> str:
        try:
            parse(v)
        except ReferenceError as exc:
            raise ValueError(f"loader_image: {exc}") from exc
        return v

    @field_validator("node_cache_path", "default_mount_path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or v == "/" or ".." in v.split("/") or posixpath.normpath(v) != v:
            raise ValueError(f"{v!r} must be a normalised absolute path other than / (e.g. /var/lib/model-cache)")
        return v

    @field_validator("default_cache")
    @classmethod
    def _cache(cls, v: str) -> str:
        try:
            parse_cache(v)
        except ValueError as exc:
            raise ValueError(f"default_cache {v!r}: {exc}") from exc
        return v.strip()

    @field_validator("loader_cpu_request", "loader_cpu_limit", "loader_memory_request", "loader_memory_limit")
    @classmethod
    def _quantity(cls, v: str) -> str:
        parse_quantity(v)
        return v

    @field_validator("image_volume_min_crio", "image_volume_min_kubelet")
    @classmethod
    def _version(cls, v: str) -> str:
        parse_version(v)
        return v

    @field_validator("tls_secret", "webhook_configuration")
    @classmethod
    def _subdomain(cls, v: str) -> str:
        # Secret and webhook configuration names are DNS subdomains (RFC 1123), at most 253 characters.
        if len(v) > 253 or not _DNS_SUBDOMAIN.fullmatch(v):
            raise ValueError(f"{v!r} is not a DNS subdomain name (lower case letters, digits, '-' and '.', e.g. model-cache-tls)")
        return v

    @field_validator("service_name", "namespace")
    @classmethod
    def _label(cls, v: str) -> str:
        # Services and namespaces are DNS labels (RFC 1123), at most 63 characters; they also become certificate SANs.
        if len(v) > 63 or not _DNS_LABEL.fullmatch(v):
            raise ValueError(f"{v!r} is not a DNS label (at most 63 lower case letters, digits and '-', e.g. model-cache)")
        return v

    @field_validator("registry_ca_configmap")
    @classmethod
    def _configmap(cls, v: str) -> str:
        # ConfigMap names are DNS subdomains (RFC 1123), at most 253 characters.
        v = v.strip()
        if v and (len(v) > 253 or not _DNS_SUBDOMAIN.fullmatch(v)):
            raise ValueError(
                f"{v!r} is not a ConfigMap name (a DNS subdomain: lower case letters, digits, '-' and '.', e.g."
                " registry-ca); leave it empty for none"
            )
        return v

    @field_validator("signature_policy", mode="before")
    @classmethod
    def _policy(cls, v: object) -> object:
        if not isinstance(v, str):
            return v
        try:
            rules = parse_rules(v, "signature_policy")
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        for i, rule in enumerate(rules):
            for j, pem in enumerate(rule.keys):
                try:
                    load_pem_public_key(pem.encode())
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"signature_policy[{i}].keys[{j}] does not load as a public key ({exc}): give"
                                     " the PEM of an ECDSA, Ed25519 or RSA public key") from None
        return rules

    @field_validator("trusted_root")
    @classmethod
    def _trusted_root(cls, v: str) -> str:
        text = v.strip()
        if text:
            try:
                json.loads(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise ValueError("trusted_root is not base64 of a JSON document: give `base64 -w0 trusted_root.json`"
                                 ) from None
        return text

    @field_validator("allowed_registries", "plain_http_registries", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{text!r} is neither a JSON list nor a comma-separated list: {exc}") from exc
            return [part for part in (p.strip() for p in text.split(",")) if part]
        return v

    @field_validator("allowed_registries")
    @classmethod
    def _registries(cls, v: list[str]) -> list[str]:
        out = []
        for entry in v:
            entry = entry.strip().rstrip("/")
            host, _, prefix = entry.partition("/")
            host = host.lower()
            if not _HOST_PORT.match(host) or (prefix and not _REPO_PREFIX.match(prefix)):
                raise ValueError(
                    f"allowed_registries entry {entry!r} is not host, host:port or host/repository-prefix"
                    " (e.g. registry.example.com, 10.0.0.5:5000, ghcr.io/acme)"
                )
            out.append(f"{host}/{prefix}" if prefix else host)
        return out

    @field_validator("plain_http_registries")
    @classmethod
    def _plain_http(cls, v: list[str]) -> list[str]:
        out: dict[str, None] = {}
        for entry in v:
            host = entry.strip().lower()
            if not _HOST_PORT.match(host):
                raise ValueError(
                    f"plain_http_registries entry {entry.strip()!r} is not host or host:port (e.g."
                    " registry.internal, 10.0.0.5:5000)"
                )
            out[host] = None
        return list(out)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Settings:
        for what, req, lim in (
            ("cpu", self.loader_cpu_request, self.loader_cpu_limit),
            ("memory", self.loader_memory_request, self.loader_memory_limit),
        ):
            if parse_quantity(req) > parse_quantity(lim):
                raise ValueError(f"loader_{what}_request {req} is larger than loader_{what}_limit {lim}")
        if any(rule.identities for rule in self.signature_policy) and not self.trusted_root:
            raise ValueError("signature_policy names keyless identities but trusted_root is empty: set"
                             " MODEL_CACHE_TRUSTED_ROOT to base64 of the Sigstore trusted root JSON")
        return self

    @property
    def min_crio(self) -> tuple[int, int]:
        return parse_version(self.image_volume_min_crio)

    @property
    def min_kubelet(self) -> tuple[int, int]:
        return parse_version(self.image_volume_min_kubelet)


def _msg(text: str) -> str:
    # pydantic prefixes messages from our validators; the rest of the message already says what to do.
    return text.removeprefix("Value error, ")


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and keyword overrides), or ConfigError listing every bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"MODEL_CACHE_{'.'.join(str(p) for p in e['loc']).upper() or 'SETTINGS'}: {_msg(e['msg'])}" for e in exc.errors()
        )
        raise ConfigError(f"invalid model-cache settings: {problems}") from exc
    except ValueError as exc:  # a malformed JSON list in MODEL_CACHE_ALLOWED_REGISTRIES
        raise ConfigError(f"invalid model-cache settings: {exc}") from exc
