"""Importers for the benchmark: put `bench/` on the service's PYTHONPATH to use them."""

from __future__ import annotations

import time
from typing import Any


def read_once(job: Any) -> None:
    """The no-op import: read the claimed file once, as any real importer would."""
    with open(job.path, "rb") as f:
        f.read()


def noop(job: Any) -> None:
    """An import that does nothing: what is measured is filedock's own work."""


def wait_50ms(job: Any) -> None:
    """An I/O-bound import: 50 ms waiting on another system, as a remote call does."""
    time.sleep(0.05)
