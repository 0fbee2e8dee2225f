"""The job ledger: one interface, a backend per URL scheme (`sqlite:///`, `postgresql://`)."""

from __future__ import annotations

from pathlib import Path

from service.errors import ConfigError
from service.ledger.base import (
    FINAL_STATES,
    STATES,
    UNFINISHED,
    Arrival,
    DeliveryRecord,
    DeliveryState,
    JobRecord,
    Ledger,
    Outcome,
    State,
    WindowRecord,
)

__all__ = [
    "FINAL_STATES",
    "STATES",
    "UNFINISHED",
    "Arrival",
    "DeliveryRecord",
    "DeliveryState",
    "JobRecord",
    "Ledger",
    "Outcome",
    "State",
    "WindowRecord",
    "ledger_for_url",
]


def ledger_for_url(url: str) -> Ledger:
    """The backend for a URL; drivers are imported only when their scheme is used."""
    if url.startswith("sqlite:///"):
        from service.ledger.sqlite import SqliteLedger

        return SqliteLedger(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from service.ledger.postgres import PostgresLedger

        return PostgresLedger(url)
    raise ConfigError(f"ledger_url: unsupported scheme in {url!r} (sqlite:/// or postgresql://)")
