"""The cluster's signature policy (issue 13): which keys or keyless identities a model must be signed by, chosen by
the registry or repository prefix of its reference. Pure: text in, typed rules out.

One JSON document serves both sides, so they cannot disagree: the webhook reads it from
``MODEL_CACHE_SIGNATURE_POLICY`` (it routes such models away from image volumes and passes each loader the keys its
models need), and the node agent from ``--signature-policy FILE`` (it enforces it on prefetch and on CSI volumes,
which a pod can also write itself, without the webhook)::

    [
      {"prefix": "registry.example.com/models", "keys": ["-----BEGIN PUBLIC KEY-----\\n..."]},
      {"prefix": "ghcr.io/acme", "identities": ["https://token.actions.githubusercontent.com=https://github.com/acme/models/.github/workflows/sign.yml@refs/heads/main"]},
      {"prefix": "registry.example.com/models/scratch"}
    ]

The longest matching prefix decides (``host``, ``host:port``, or ``host/repository-prefix`` on ``/`` boundaries; hosts
compared as one registry: case, ``:443`` and Docker Hub's aliases folded); a rule with neither keys nor identities
exempts its prefix; ``{"prefix": "*"}`` matches what no other rule does (a policy that fails closed); a reference no
rule matches needs no signature. Keyless
identities are verified against a trusted root given beside the policy (the webhook's ``MODEL_CACHE_TRUSTED_ROOT``,
the agent's ``--trusted-root``). The PEM texts are checked as keys by whoever loads them (loader/signing.py); here
only their shape and size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_RULES = 64
MAX_KEYS = 16  # per rule
MAX_IDENTITIES = 16  # per rule
MAX_PEM = 16 * 1024  # one public key, PEM
MAX_POLICY = 1024 * 1024  # the whole document

_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[0-9]{1,5})?")
_REPO = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_PEM = re.compile(r"-----BEGIN PUBLIC KEY-----\n[A-Za-z0-9+/=\n]+-----END PUBLIC KEY-----\n?")
_FIELDS = frozenset({"prefix", "keys", "identities"})
EXAMPLE = '[{"prefix": "registry.example.com/models", "keys": ["-----BEGIN PUBLIC KEY-----\\n...\\n-----END PUBLIC KEY-----\\n"]}]'


class PolicyError(ValueError):
    """The policy document is not what this module reads; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class Rule:
    prefix: str  # host, host:port or host/repository-prefix
    keys: tuple[str, ...] = ()  # PEM public keys
    identities: tuple[str, ...] = ()  # ISSUER=SUBJECT

    @property
    def required(self) -> bool:
        return bool(self.keys or self.identities)

    def matches(self, registry: str, repository: str) -> bool:
        return self.prefix == ANY or under_prefix(self.prefix, registry, repository)


#: A rule for every reference no other rule matches (the longest prefix still decides): a policy that fails closed.
ANY = "*"
#: Names of one registry: Docker Hub's aliases, compared as one host (the default port, too, is the same host).
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})


def canonical_host(host: str, *, https: bool = True) -> str:
    """A registry host as a rule compares it: lowercase, without the default HTTPS port (``https`` only), Docker
    Hub's aliases as ``docker.io``; so ``REGISTRY.example.com:443`` and ``registry.example.com`` are one host, as
    they are one registry."""
    h = host.lower()
    if https and h.endswith(":443"):
        h = h[:-4]
    return "docker.io" if h in _HUB_ALIASES else h


def under_prefix(prefix: str, registry: str, repository: str, *, https: bool = True) -> bool:
    """Whether a model of ``registry``/``repository`` is under ``prefix`` (host, host:port or host/repository-prefix):
    the repository equal to the prefix's or below it at a ``/``; the hosts as one registry (canonical_host) when the
    registry is spoken to over ``https``, where 443 is the default port. Over plain http (a loopback registry, one
    of MODEL_CACHE_PLAIN_HTTP_REGISTRIES) ``host:443`` is another service than ``host``, so the port must be as
    written. A signature rule leaves ``https`` True: it may only cover more. The webhook's allow-list passes what
    the loader will speak, so naming ``localhost`` never admits ``localhost:443``."""
    host, _, repo = prefix.partition("/")
    if canonical_host(registry, https=https) != canonical_host(host, https=https):
        return False
    return not repo or repository == repo or repository.startswith(repo + "/")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text)} characters)"


def _strings(item: dict[str, Any], name: str, where: str, limit: int) -> list[str]:
    value = item.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}.{name} is {_shown(value)}: give a list of strings")
    if len(value) > limit:
        raise PolicyError(f"{where}.{name} has {len(value)} entries, over the limit of {limit}: split the rule")
    return value


def parse_rules(text: str, where: str) -> tuple[Rule, ...]:
    """The rules of a policy document (JSON), or PolicyError naming the first thing wrong and the fix."""
    if len(text) > MAX_POLICY:
        raise PolicyError(f"{where} is {len(text)} characters, over {MAX_POLICY}: keep only what the cluster needs")
    if not text.strip():
        return ()
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise PolicyError(f"{where} is not JSON ({exc}): write a list of rules, e.g. {EXAMPLE}") from None
    if not isinstance(doc, list):
        raise PolicyError(f"{where} is a JSON {type(doc).__name__}: write a list of rules, e.g. {EXAMPLE}")
    if len(doc) > MAX_RULES:
        raise PolicyError(f"{where} has {len(doc)} rules, over the limit of {MAX_RULES}: merge rules by prefix")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, item in enumerate(doc):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise PolicyError(f"{at} is {_shown(item)}: each rule is an object with prefix, keys and identities")
        unknown = sorted(set(item) - _FIELDS)
        if unknown:
            raise PolicyError(f"{at} has unknown fields {unknown}: a rule has only prefix, keys and identities")
        prefix = item.get("prefix")
        if not isinstance(prefix, str):
            raise PolicyError(f"{at}.prefix is {_shown(prefix)}: give host, host:port or host/repository-prefix")
        host, _, repo = prefix.partition("/")
        if prefix == ANY:
            pass
        elif not _HOST.fullmatch(host) or (repo and not _REPO.fullmatch(repo)) or prefix != prefix.strip():
            raise PolicyError(f"{at}.prefix is {_shown(prefix)}: give host, host:port or host/repository-prefix in"
                              " lowercase, without a scheme, a tag or a trailing '/' (e.g. registry.example.com/models)")
        if prefix in seen:
            raise PolicyError(f"{at}.prefix {prefix!r} appears in two rules: merge them")
        seen.add(prefix)
        keys = _strings(item, "keys", at, MAX_KEYS)
        for j, pem in enumerate(keys):
            if len(pem) > MAX_PEM or not _PEM.fullmatch(pem.replace("\r\n", "\n")):
                raise PolicyError(f"{at}.keys[{j}] is {_shown(pem)}: give a PEM public key ('-----BEGIN PUBLIC"
                                  " KEY-----' ... '-----END PUBLIC KEY-----', at most 16 KiB)")
        identities = _strings(item, "identities", at, MAX_IDENTITIES)
        for j, ident in enumerate(identities):
            issuer, sep, subject = ident.partition("=")
            if not sep or not issuer.startswith("https://") or not subject or any(c.isspace() for c in ident):
                raise PolicyError(f"{at}.identities[{j}] is {_shown(ident)}: give ISSUER=SUBJECT, the OIDC issuer URL"
                                  " (https://...) and the certificate's subject (an email or a workflow URL)")
        rules.append(Rule(prefix, tuple(p.replace("\r\n", "\n") for p in keys), tuple(identities)))
    return tuple(rules)


def rule_for(registry: str, repository: str, rules: Sequence[Rule]) -> Rule | None:
    """The rule for a reference: the longest prefix that matches (``*`` the shortest of all), or None."""
    best: Rule | None = None
    for rule in rules:
        if rule.matches(registry, repository) and (best is None or _rank(rule) > _rank(best)):
            best = rule
    return best


def _rank(rule: Rule) -> int:
    return -1 if rule.prefix == ANY else len(rule.prefix)
