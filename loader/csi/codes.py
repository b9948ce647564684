"""Pure: which gRPC status answers a loader error, following the CSI spec's error tables (spec.md, "Error Scheme"
and "NodePublishVolume Errors").

kubelet (pkg/volume/csi, ``isFinalError``) treats CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, RESOURCE_EXHAUSTED
and ABORTED as "the operation may still be in progress": it keeps the volume in an uncertain state, retries the
call with backoff, and unpublishes it if the pod goes away. Every other code is final for that attempt (the volume
manager still retries the mount with backoff while the pod exists). So:

    pull still running past the call's deadline    ABORTED         the spec's "operation pending for volume"
    another call for this volume in flight         ABORTED         (the caller retries with exponential backoff)
    registry unreachable, stalling, lock timeouts  UNAVAILABLE     transient: retried
    cache filesystem full                          RESOURCE_EXHAUSTED
    credentials refused                            PERMISSION_DENIED (a secret was given) / UNAUTHENTICATED (none)
    repository, tag or blob missing                NOT_FOUND       the spec's "volume does not exist"
    bad reference, unsafe or malformed artifact    INVALID_ARGUMENT the caller must fix the ref before retrying
    bytes that do not match their digest           DATA_LOSS
    the registry refused for another reason        FAILED_PRECONDITION
    anything else                                  INTERNAL

The message is the loader's own (it names the reference and what to do); it never holds a secret.
"""

from __future__ import annotations

import grpc

from loader.errors import (
    ArtifactError,
    AuthError,
    DigestMismatch,
    LoaderError,
    NetworkError,
    NoSpaceError,
    NotFoundError,
    RejectedError,
    UsageError,
)


def code_for(exc: LoaderError, had_credentials: bool) -> grpc.StatusCode:
    if isinstance(exc, AuthError):
        return grpc.StatusCode.PERMISSION_DENIED if had_credentials else grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, NoSpaceError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, UsageError | ArtifactError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, DigestMismatch):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(exc, RejectedError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, NetworkError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL
