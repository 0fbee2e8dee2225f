"""The protocol every sink kind implements, and what a delivery produces.

A sink sends one `Item` at a time and returns a `Receipt`, or raises `SinkError`.
Every kind keeps three promises, whichever point a crash interrupts it at:
- nothing half-written is ever visible under the final name (temp name and rename,
  a single PUT, or a multipart upload completed only when whole);
- a delivery first asks whether the remote already holds our bytes under the final
  name (a lost acknowledgement, or a retry after a crash): then the receipt says
  `found: true` and nothing is sent again; other bytes there are `remote_exists`
  (final) unless the sink says `exists: replace`;
- a temp object a crashed delivery left behind is removed by the next delivery of
  the same item (temp names derive from the job id and the sink).
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Item", "Receipt", "Sink", "SinkError", "modified", "unreadable"]


@dataclass(frozen=True)
class Item:
    """One file to send: where it is here and where it goes there.

    `target` is the rendered, relative path (see `template.render`); `sha256` is the
    hex digest the bytes must have (the claim's for the source file). The sink
    checks the bytes it reads against it and fails with `modified_during_processing`
    if they differ.
    """

    path: Path
    target: str
    size: int
    sha256: str
    job_id: str
    sink: str
    # Told the bytes as they are sent, for a large item's progress (`storage.progress`).
    progress: Callable[[int], None] | None = field(default=None, compare=False, repr=False)

    def sent(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt of this item on this sink, unique otherwise."""
        return f"{self.job_id}:{self.sink}:{self.target}"


@dataclass
class Receipt:
    """What the remote holds for an item: its location there, bytes, SHA-256, and what
    it said (`remote`: ETag, VersionId, checksum, HTTP status …). `found`: the bytes
    were already there (an earlier attempt's acknowledgement was lost)."""

    location: str
    bytes: int
    sha256: str
    remote: dict[str, Any] = field(default_factory=dict)
    found: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "remote": self.remote,
            "found": self.found,
        }


class SinkError(Exception):
    """A delivery that did not happen. `retryable`: the same item may succeed later
    (connection refused, timeout, 5xx, 429); otherwise it never will as configured
    (`remote_exists`, 4xx, a bad target, refused credentials)."""

    def __init__(self, error_class: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        self.retryable = retryable


class Sink(abc.ABC):
    """One configured sink of a route. `open` builds its client (reused by every
    delivery), `close` releases it; `deliver` may run concurrently for different
    items, up to the sink's `concurrency`."""

    name: str

    async def open(self) -> None:  # noqa: B027 - a sink without a client needs none
        """Read credentials and build clients; raise `SinkError` on bad configuration."""

    async def close(self) -> None:  # noqa: B027
        """Release clients and connections."""

    @abc.abstractmethod
    async def deliver(self, item: Item) -> Receipt:
        """Send `item` atomically and verified, or find it already there."""

    @abc.abstractmethod
    def location(self, item: Item) -> str:
        """Where `item` goes, for logs and receipts (never with credentials)."""


def modified(item: Item, found: str) -> SinkError:
    """The file's bytes are not the claim's any more (`found` says what was read)."""
    return SinkError(
        "modified_during_processing",
        f"{item.path} changed since its claim: read {found}; the claim had {item.size} bytes,"
        f" sha256 {item.sha256}",
        retryable=False,
    )


def unreadable(item: Item, error: OSError) -> SinkError:
    """The source file could not be read (it is in proc/, where only filedock writes)."""
    what = f"{item.path}: {error.strerror or error}"
    return SinkError("source_unreadable", what, retryable=False)


def read_checked(item: Item) -> bytes:
    """The whole file, once its size and SHA-256 are the claim's: one call in a worker
    thread, for a file small enough to send from memory."""
    try:
        with open(item.path, "rb") as f:
            data = f.read(item.size + 1)
    except OSError as e:
        raise unreadable(item, e) from None
    sha = hashlib.sha256(data).hexdigest()
    if len(data) != item.size or sha != item.sha256:
        raise modified(item, f"{len(data)} bytes, sha256 {sha}")
    return data
