"""The small error hierarchy: control flow for importers, and classified failures.

`Retry` and `Reject` are what importers raise; `JobError` carries one of the
contract's error classes (docs/contracts.md) to the ledger, `error.json` and metrics.
"""

from __future__ import annotations

from typing import Any, Final, Literal

__all__ = [
    "ERROR_CLASSES",
    "ConfigError",
    "ErrorClass",
    "JobError",
    "LedgerUnavailable",
    "Reject",
    "Retry",
    "StartupError",
]

ErrorClass = Literal[
    "rejected",
    "exhausted",
    "timeout",
    "crashed",
    "not_regular_file",
    "symlink",
    "hard_link",
    "too_large",
    "checksum_mismatch",
    "modified_during_processing",
    "permission",
    "disk_full",
    "io_error",
    "unrouted",
    "delivery_failed",  # a sink failed for good (error.json names each sink's state)
    # Only while a job is `waiting` for its next attempt (never a final class):
    "import_error",
    "retry",
]
ERROR_CLASSES: Final = ErrorClass.__args__  # type: ignore[attr-defined]


class ConfigError(Exception):
    """The configuration is invalid; the message names the field and the reason."""


class StartupError(Exception):
    """The service cannot start safely (e.g. `transfer/` and `proc/` on two filesystems)."""


class LedgerUnavailable(Exception):
    """The ledger cannot be opened now (the server is away or refuses connections, the
    file is locked or read-only): trying again later may succeed."""


class _Failure(Exception):
    """An import failure that may carry the importer's output, kept with the job."""

    log: bytes | None = None

    def with_log(self, log: bytes | None) -> _Failure:
        self.log = log
        return self


class Retry(_Failure):
    """Raised by an importer to try again later.

    Args:
        reason: what went wrong, kept in the ledger and in `error.json`.
        defer_s: wait this long instead of the route's backoff.
    """

    def __init__(self, reason: str = "retry requested", *, defer_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.defer_s = defer_s

    def __repr__(self) -> str:
        defer = f", defer_s={self.defer_s:g}" if self.defer_s is not None else ""
        return f"Retry({self.reason!r}{defer})"


class Reject(_Failure):
    """Raised by an importer when the file can never be imported: fail it at once."""

    def __init__(self, reason: str = "rejected by the importer") -> None:
        super().__init__(reason)
        self.reason = reason

    def __repr__(self) -> str:
        return f"Reject({self.reason!r})"


class JobError(_Failure):
    """A failure with an error class from the contract.

    `retryable` failures (a timeout, an I/O error) are retried until the route's
    attempts are used up; the others send the job to `failed/` at once.
    """

    def __init__(self, error_class: ErrorClass, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.error_class: ErrorClass = error_class
        self.message = message
        self.retryable = retryable

    def __repr__(self) -> str:
        return f"JobError({self.error_class!r}, {self.message!r}, retryable={self.retryable})"

    def __reduce__(self) -> tuple[Any, ...]:  # pickled across the archiver's worker process
        return (JobError, (self.error_class, self.message), self.__dict__)
