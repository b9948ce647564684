"""The loader's exception tree, mapped to exit codes at the CLI boundary.

    LoaderError                       exit 1
    ├── UsageError                    exit 2   bad flags or reference
    ├── ArtifactError                 exit 8   unsafe names, unsupported or malformed artifacts
    │   └── InvalidDigest (loader.digest)          a digest that is not sha256:<64 lowercase hex>
    ├── DigestMismatch                exit 5   bytes or size did not match the descriptor (a digest after one retry)
    ├── NoSpaceError                  exit 6   the cache's filesystem is too full
    └── RegistryError
        ├── AuthError                 exit 3   credentials refused or missing
        ├── NotFoundError             exit 4   repository, tag or blob missing
        ├── RejectedError             exit 7   the registry refused a request for a reason retrying cannot fix
        │                                      (``code`` is the distribution error code, e.g. DIGEST_INVALID)
        └── NetworkError              exit 7   unreachable, failing or stalling after retries
            ├── DeadlineExceeded                the overall deadline or the minimum rate was not met
            ├── LockTimeout                     another loader held a blob or the cache too long
            └── TransientError        (retried: connection drops, 5xx, 429, stalls)
                ├── ConnectError                could not connect at all (a mirror that does this is dead)
                └── RangeNotSatisfiable         416; ``blob_size`` is the size the server reports, if any

Every message names the reference or registry involved and what to do about it.
"""

from __future__ import annotations

from loader.contract import ExitCode


class LoaderError(Exception):
    exit_code: ExitCode = ExitCode.FAILURE


class UsageError(LoaderError):
    exit_code = ExitCode.USAGE


class ArtifactError(LoaderError):
    exit_code = ExitCode.INVALID_ARTIFACT


class DigestMismatch(LoaderError):
    exit_code = ExitCode.DIGEST_MISMATCH


class NoSpaceError(LoaderError):
    exit_code = ExitCode.NO_SPACE


class RegistryError(LoaderError):
    exit_code = ExitCode.NETWORK


class AuthError(RegistryError):
    exit_code = ExitCode.AUTH


class NotFoundError(RegistryError):
    exit_code = ExitCode.NOT_FOUND


class NetworkError(RegistryError):
    exit_code = ExitCode.NETWORK


class TransientError(NetworkError):
    """A failure worth retrying. ``retry_after`` is the server's Retry-After in seconds, when it sent one."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RejectedError(RegistryError):
    """The registry answered a request with a definite refusal (4xx other than auth and not-found)."""

    def __init__(self, message: str, status: int = 0, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class DeadlineExceeded(NetworkError):
    """A transfer ran past its overall deadline, or stayed under the minimum rate for too long."""


class LockTimeout(NetworkError):
    """Waiting for a lock another loader holds took longer than the bound."""


class ConnectError(TransientError):
    """No connection could be made (refused, unreachable, DNS)."""


class RangeNotSatisfiable(TransientError):
    """A 416. ``blob_size`` is the blob's real size when the server said (``Content-Range: bytes */SIZE``)."""

    def __init__(self, message: str, blob_size: int | None = None):
        super().__init__(message)
        self.blob_size = blob_size
