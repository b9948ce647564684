"""``model-loader sign REF --key KEY``: a cosign-compatible signature for REF's manifest digest.

    model-loader sign registry.example.com/models/phi3:v1 --key cosign.pem [--referrers] [--output json]

Resolves REF to its manifest digest (a tag is resolved once, here: the signature names the digest, never the tag),
signs cosign's simple-signing payload for it with the PEM private key (ECDSA P-256/P-384/P-521, Ed25519, RSA
PKCS#1 v1.5) and pushes it: by default at cosign's tag ``sha256-<hex>.sig`` (appended to the signatures already
there, as cosign does), with ``--referrers`` as an OCI 1.1 referrer (``subject``), listed in the fallback tag
``sha256-<hex>`` when the registry has no referrers API. ``cosign verify --key`` verifies either; so does
``model-loader pull --verify-key``.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from loader import contract
from loader.commands.common import (
    SubParsers,
    add_registry_flags,
    check_concurrency,
    registry_options,
)
from loader.config import LoaderSettings
from loader.errors import AuthError, UsageError

if TYPE_CHECKING:
    from loader.log import Logger

NAME = contract.SIGN
MAX_PRIVATE_KEY = 64 * 1024


def add_parser(sub: SubParsers, settings: LoaderSettings) -> None:
    p = sub.add_parser(NAME, help="sign a model's manifest digest (cosign-compatible) and push the signature")
    p.add_argument("ref", metavar="REF", help="host[:port]/repo[:tag][@sha256:...]")
    p.add_argument("--key", required=True, metavar="PEM", help="PEM private key (ECDSA, Ed25519 or RSA; unencrypted)")
    p.add_argument("--referrers", action="store_true",
                   help="push an OCI 1.1 referrer instead of cosign's sha256-<hex>.sig tag")
    add_registry_flags(p, settings)
    p.add_argument(contract.FLAG_OUTPUT, choices=["text", "json"], default="text")


def run(args: argparse.Namespace, settings: LoaderSettings, log: Logger) -> int:
    from loader import signing
    from loader.reference import parse
    from loader.retry import SMALL_REQUESTS, call
    from loader.sign import RegistryManifest, push_signature
    from loader.upload import push_auth_error

    check_concurrency(args.concurrency)
    options = registry_options(args, settings)
    try:
        ref = parse(args.ref)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        with open(args.key, "rb") as f:
            pem = f.read(MAX_PRIVATE_KEY + 1)
    except OSError as exc:
        raise UsageError(f"--key {args.key!r}: {exc.strerror}") from None
    if len(pem) > MAX_PRIVATE_KEY:
        raise UsageError(f"--key {args.key!r} is over {MAX_PRIVATE_KEY} bytes: not a PEM private key")
    key = signing.load_private_key(pem, args.key)
    public = signing.public_key_of(key)
    with options.client(ref, log, actions="pull,push") as client:
        head = call(lambda: client.get_manifest(ref.reference), SMALL_REQUESTS, str(ref), log, "sign.retry")
        target = RegistryManifest(head.digest, head.media_type, head.size)
        payload = signing.make_payload(head.digest, f"{ref.registry}/{ref.repository}")
        signature = signing.sign_payload(key, payload)
        if not signing.verify_with(public, payload, signature):  # a key the verifier would not accept
            raise UsageError(f"--key {args.key!r}: the signature it made does not verify with its own public key")
        try:
            where, sig = push_signature(client, target, payload, signature, args.referrers, log)
        except AuthError as exc:
            raise push_auth_error(ref, exc) from exc
    out = {"ref": str(ref), "digest": head.digest, "signature": sig, "where": where, "key": public.fingerprint,
           "key_kind": public.kind}
    log.info("sign.done", **out)
    if args.output == "json":
        print(json.dumps(out), flush=True)
    else:
        print(f"signed {ref.registry}/{ref.repository}@{head.digest} with {public.kind} key {public.fingerprint}:"
              f" signature {sig} ({where})", flush=True)
    return 0
