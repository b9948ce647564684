"""The loader's exception tree, mapped to exit codes at the CLI boundary.

    LoaderError                       exit 1
    ├── UsageError                    exit 2   bad flags or reference
    ├── ArtifactError                 exit 8   unsafe names, unsupported or malformed artifacts
    ├── DigestMismatch                exit 5   bytes or size did not match the descriptor (a digest after one retry)
    ├── NoSpaceError                  exit 6   the cache's filesystem is too full
    └── RegistryError
        ├── AuthError                 exit 3   credentials refused or missing
        ├── NotFoundError             exit 4   repository, tag or blob missing
        └── NetworkError              exit 7   unreachable, failing or stalling after retries
            └── TransientError        (retried: connection drops, 5xx, 429, stalls)

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
