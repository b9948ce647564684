"""The contract between the webhook and the loader, defined once.

The webhook writes init containers that run ``model-loader``; the loader reads what they write. Everything both
sides must agree on lives here: the subcommand and its flags, the cache layout paths the app mounts, the exit
codes a pod's status shows, and where pull secrets are mounted.
"""

from __future__ import annotations

import enum
import posixpath

from loader.reference import Reference, cache_key

# --- the command line the webhook emits (exec form, never a shell) -------------------------------------------
PROGRAM = "model-loader"
PULL = "pull"
FLAG_CACHE = "--cache"
FLAG_DOCKER_CONFIG = "--docker-config"
FLAG_OUTPUT = "--output"
FLAG_CONCURRENCY = "--concurrency"
MAX_CONCURRENCY = 64  # connections (and threads, each with a 1 MiB buffer) per loader; the webhook injects at most this
FLAG_PLAIN_HTTP = "--plain-http"
FLAG_INSECURE = "--insecure-skip-tls-verify"
FLAG_MIRROR = "--mirror"
FLAG_OFFLINE = "--offline"
FLAG_CHECK_ACCESS = "--check-access"  # a cached model only for a pod that proves access (shared caches)
# Issue 15: pin the pod to the digest it verified. The webhook passes ``--pod-uid $(MODEL_CACHE_POD_UID)`` (kubelet
# expands $(VAR) in args from the container's env, here the downward API's metadata.uid) and
# ``--node-name $(MODEL_CACHE_NODE_NAME)`` (spec.nodeName); the loader then writes pod_entry() for each model.
FLAG_POD_UID = "--pod-uid"
FLAG_NODE_NAME = "--node-name"
FLAG_CA_FILE = "--ca-file"  # extra CA certificates (PEM) to trust for registries; repeatable
FLAG_PLAIN_HTTP_REGISTRY = "--plain-http-registry"  # HOST[:PORT] spoken to over plain HTTP; repeatable
ENV_POD_UID = "MODEL_CACHE_POD_UID"  # fieldRef metadata.uid: in the loader and in every app container it mounts into
ENV_NODE_NAME = "MODEL_CACHE_NODE_NAME"  # fieldRef spec.nodeName: in the loader

# --- signature policy (issue 13): a model becomes visible only when a signature over its manifest digest verifies ---
# The policy reaches the loader as arguments (public keys and identities are not secret; no cross-namespace mounts).
# Several keys or identities: any one that verifies suffices. No policy flag: nothing is required (as before).
SIGN = "sign"  # ``model-loader sign REF --key KEY``: write a cosign-compatible signature for REF's manifest digest
FLAG_VERIFY_KEY = "--verify-key"  # FILE: a PEM public key (ECDSA P-256/P-384, Ed25519, RSA); repeatable
FLAG_VERIFY_KEY_DATA = "--verify-key-data"  # base64 of a PEM public key, several joined by ","; repeatable
FLAG_VERIFY_IDENTITY = "--verify-identity"  # ISSUER=SUBJECT: a keyless signer (OIDC issuer, certificate SAN)
FLAG_TRUSTED_ROOT = "--trusted-root"  # FILE: the Sigstore trusted root JSON keyless bundles are checked against
FLAG_VERIFY_MODEL_SIGNATURE = "--verify-model-signature"  # the OpenSSF signature file over the files, by a key
# The webhook keeps inline keys in the loader container's env and passes them as
# ``--verify-key-data=$(MODEL_CACHE_VERIFY_KEYS)`` (kubelet expands $(VAR) in args), so the policy is readable in
# the pod spec, bounded like any arg, and the loader itself reads no environment for it.
ENV_VERIFY_KEYS = "MODEL_CACHE_VERIFY_KEYS"  # base64 PEM public keys joined by ","
# The cluster's policy by reference prefix (loader/policy.py's JSON): the node agent reads it from a file, the
# webhook passes an init container the rules its models match as ``--signature-policy-data=$(MODEL_CACHE_SIGNATURE_POLICY)``
# and, for keyless identities, ``--trusted-root-data=$(MODEL_CACHE_TRUSTED_ROOT)`` (base64 of the trusted root JSON).
FLAG_SIGNATURE_POLICY = "--signature-policy"  # FILE: the policy JSON
FLAG_SIGNATURE_POLICY_DATA = "--signature-policy-data"  # the policy JSON, inline
FLAG_TRUSTED_ROOT_DATA = "--trusted-root-data"  # base64 of a Sigstore trusted root JSON, inline
ENV_SIGNATURE_POLICY = "MODEL_CACHE_SIGNATURE_POLICY"
ENV_TRUSTED_ROOT = "MODEL_CACHE_TRUSTED_ROOT"

# --- the CSI path (issue 12): the volume the webhook writes, the node agent's driver serves -------------------------
#: The CSI driver name (a CSIDriver object of this name; kubelet lists it in the node's CSINode once registered).
CSI_DRIVER = "model.cache"
#: volumeAttributes key holding the model reference of an inline CSI volume.
CSI_ATTR_REF = "ref"

# --- cache layout (relative to the cache root) ------------------------------------------------------------------
BLOBS_DIR = "blobs/sha256"  # verified blobs, read-only, named by hex digest
PARTIAL_DIR = "partial"  # in-flight downloads and their resume state
MODELS_DIR = "models/sha256"  # one published, read-only tree per manifest digest
REFS_DIR = "refs"  # one symlink per reference -> ../models/sha256/<hex>
LOCKS_DIR = "locks"
TMP_DIR = "tmp"  # staging trees; same filesystem as models/ so publish is a rename
LASTUSE_DIR = "lastuse"  # one file per manifest digest, mtime = last pull or hit
PODS_DIR = "pods"  # pods/<pod-uid>/<cache_key(ref)> -> ../../models/sha256/<hex>: what each pod verified and mounts
POD_NODE_FILE = ".node"  # pods/<pod-uid>/.node: the node the pod runs on (gc on a shared claim judges only its own)


def ref_subpath(ref: Reference | str) -> str:
    """Path, relative to the cache root, of the link to the model a reference last resolved to on this cache.

    Moved when a tag moves, so apps do not mount it (kubelet resolves a subPath afresh at every container start, so
    a restarted container would follow the tag): they mount their pod's pin, pod_subpath_expr(). It serves lookups
    (``--offline``, the outage fallback) and pods injected by webhooks older than issue 15.
    """
    return posixpath.join(REFS_DIR, cache_key(ref))


def pod_entry(ref: Reference | str, pod_uid: str) -> str:
    """Path, relative to the cache root, of one pod's pinned link to the model tree it verified. Never moved while
    the pod exists, so a restarted container (kubelet resolves subPaths afresh on every start) sees the same digest
    even after the tag moved."""
    return posixpath.join(PODS_DIR, pod_uid, cache_key(ref))


def pod_subpath_expr(ref: Reference | str) -> str:
    """What the app's volumeMount puts in ``subPathExpr``: pod_entry() with the UID from the container's env."""
    return posixpath.join(PODS_DIR, f"$({ENV_POD_UID})", cache_key(ref))


#: Prefix of the node labels the node agent sets for each model it holds complete (issue 12): ``WARM_LABEL_PREFIX``
#: + the hash part of the reference's cache key, value ``"true"``. The webhook prefers nodes carrying them.
WARM_LABEL_PREFIX = "warm.model.cache/"


def warm_label(ref: Reference | str) -> str:
    """The node label key saying a node holds ``ref`` complete in its node cache: ``warm.model.cache/<16 hex>``, the
    hash of cache_key() (a valid label name whatever the reference, and distinct for distinct references)."""
    return warm_label_of_key(cache_key(ref))


def warm_label_of_key(key: str) -> str:
    """warm_label() from a cache key (the name of a ``refs/`` entry) rather than the reference."""
    return WARM_LABEL_PREFIX + key.rsplit("-", 1)[-1]


# --- where things live inside the pod -----------------------------------------------------------------------
DEFAULT_NODE_CACHE = "/var/lib/model-cache"  # hostPath on the node for the `node` cache
CACHE_MOUNT = "/cache"  # the cache volume inside the loader container
DOCKER_CONFIG_MOUNT = "/run/model-cache/docker"  # each pull secret at <this>/<position>/ (never its name: names from
#                                                   a pod are not paths); config.json or .dockercfg inside
CA_MOUNT = "/run/model-cache/ca"  # the admin's CA bundle ConfigMap, projected read-only (optional: a missing one is
#                                   reported by the loader, naming it, instead of a pod stuck in ContainerCreating)
CA_BUNDLE_KEY = "ca.crt"  # the key of that ConfigMap (trust-manager's and cert-manager's convention)


class ExitCode(enum.IntEnum):
    """Distinct exit codes so `kubectl get pod` and scripts can tell failures apart."""

    OK = 0
    FAILURE = 1  # unexpected
    USAGE = 2  # bad flags or a bad reference
    AUTH = 3  # the registry refused the credentials
    NOT_FOUND = 4  # repository, tag or blob does not exist
    DIGEST_MISMATCH = 5  # bytes did not match their descriptor twice, or the registry reports another size
    NO_SPACE = 6  # not enough free disk in the cache
    NETWORK = 7  # registry unreachable or failing after retries
    INVALID_ARTIFACT = 8  # unsafe names, unsupported media types, malformed manifests
    PERMISSION = 9  # the loader's uid may not write (or read) a path in the cache: the message names uid, path, owner
    SIGNATURE = 10  # a signature policy is set and no signature over the model's digest verifies: nothing published
