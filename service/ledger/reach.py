"""Whether the ledger answers: since when it has not, and why.

Each backend reports here from the one place its operations pass through (the
PostgreSQL pool's connections, the SQLite writer thread): a failure that means the
ledger cannot be used (no connection, a database that refuses them, a file locked
or read-only), and the next operation that succeeds. `/readyz` says what this holds
(`ledger: unreachable since 12 s: …`) and the start-up waits on it; a failure of one
statement (a constraint, a missing table) is the caller's business, not an outage.
"""

from __future__ import annotations

import time

__all__ = ["Reachability", "one_line"]


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Class: message` on one line (libpq's messages span several)."""
    text = " ".join(str(error).split()) or repr(error)
    return f"{type(error).__name__}: {text}"[:limit]


class Reachability:
    """The ledger's availability as its last operations found it.

    Args:
        verb: what the ledger is while it fails (`unreachable`, `not writable`).
    """

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.down_since: float | None = None  # monotonic
        self.error: str | None = None

    def failed(self, error: BaseException, *, vague: bool = False) -> None:
        """An operation could not use the ledger. `vague`: the error says less than one
        already kept (a pool's timeout after the connection errors that caused it)."""
        if not (vague and self.error):
            self.error = one_line(error)
        if self.down_since is None:
            self.down_since = time.monotonic()

    def answered(self) -> None:
        # down_since first: a reader in another thread never sees a time without its error
        self.down_since = None
        self.error = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def problem(self) -> str | None:
        """What `/readyz` says while the ledger fails, or None when it answers."""
        if self.down_since is None:
            return None
        age = time.monotonic() - self.down_since
        return f"{self.verb} since {age:.0f} s: {self.error or 'no answer'}"
