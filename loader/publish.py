"""Publishing a model: its tree built from verified blobs, made read-only and renamed into the cache, once.

Shared by every command that ends with a model in a cache (pull, prefetch, import --cache): the same layout
functions, the same meta (with the sources that proved access, loader.access), under the model's lock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loader import layout
from loader.access import Source, add_source
from loader.cache import Cache, CachedModel, current_boot_id
from loader.digest import Digest
from loader.errors import ArtifactError

if TYPE_CHECKING:
    from loader.signing import Policy, Verified


def publish_model(cache: Cache, digest: str, entries: list[layout.Entry], image: dict[str, Any], media_type: str,
                  refs: list[str], label: str, sources: Sequence[Source] = ()) -> CachedModel:
    """Materialise a model's tree from its verified blobs and publish it, under the model lock, unless another
    loader already has; the published model. Shared by pull (after its fetch) and bundle import."""
    digest = Digest(digest)
    with cache.lock(f"model-{digest.hex}"):
        model = cache.lookup_digest(digest)
        if model is None:
            staging = cache.new_staging()
            try:
                nbytes, nfiles = layout.materialize(entries, staging, cache.blob_path, label)
                meta = {"digest": digest, "refs": refs, "bytes": nbytes, "files": nfiles, "manifest": image,
                        "media_type": media_type, "blobs": sorted({e.digest for e in entries}),
                        "sources": [s.as_json() for s in sources],
                        "created": time.time(), "boot_id": current_boot_id()}
                cache.publish_model(digest, staging, meta)
            finally:
                cache.remove_tree(staging)
            model = cache.lookup_digest(digest)
            sources = ()
    # Already published by another loader: this pull verified its own copy of every blob, so its source counts.
    for src in sources:
        cache.update_meta(digest, lambda meta, src=src: add_source(meta, src))
    if model is None:
        raise ArtifactError(f"{label}: model {digest} was published but cannot be read back from cache {cache.root}")
    return model


def verify_staged_tree(cache: Cache, entries: list[layout.Entry], digest: Digest, policy: Policy,
                       label: str) -> Verified:
    """An OpenSSF model signature (policy.model_signature): the model's files, laid out as they will be published
    (hard links to the verified blobs, tars extracted) in a staging tree of their own that is removed afterwards,
    checked against the model's signature file. Before publish, by pull and by import alike; SignatureError (exit
    10) when it does not verify."""
    from loader import signing

    staging = cache.new_staging()
    try:
        layout.materialize(entries, staging, cache.blob_path, label)
        return signing.verify_model_signature(staging, policy, digest, label, cache.tmp_dir())
    finally:
        cache.remove_tree(staging)
