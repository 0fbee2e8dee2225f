"""Helpers of the ledger-outage scenarios: a PostgreSQL database of the test's own, the
ways it goes away (the server stopped and started again, connections refused) and
comes back, a tree whose rows are read from it, a steady upstream, and a prober that
records every `/readyz` answer.

Only the test's own database is refused (`ALLOW_CONNECTIONS false` and its backends
terminated), so other tests on the same server are not touched; a stop of the server
is the one fault that reaches them, and it is kept to a few seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
from conftest import Service, skip_or_fail
from psycopg.rows import dict_row

from reliability.support import RelTree

__all__ = [
    "PgTree",
    "ReadyzProbe",
    "Upstream",
    "own_database",
    "postgres_stopped",
    "refusing",
    "starts",
]


def _with_db(url: str, name: str) -> str:
    return urlsplit(url)._replace(path="/" + name).geturl()


@contextlib.contextmanager
def own_database(admin_url: str) -> Iterator[str]:
    """A database of the test's own (`filedock_outage_<hex>`), dropped afterwards."""
    name = f"filedock_outage_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield _with_db(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@contextlib.contextmanager
def refusing(admin_url: str, url: str) -> Iterator[None]:
    """The database at `url` refuses new connections and loses its open ones, until the
    block ends."""
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    try:
        yield
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")


def _cluster(url: str) -> tuple[str, str]:
    """The (version, name) of the local cluster that serves `url`'s port."""
    if shutil.which("pg_lsclusters") is None or os.geteuid() != 0:
        skip_or_fail("stopping the PostgreSQL server needs pg_lsclusters and root")
    port = str(urlsplit(url).port or 5432)
    out = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == port:
            return fields[0], fields[1]
    skip_or_fail(f"no local PostgreSQL cluster listens on port {port}")
    raise AssertionError("unreachable")


def _ctl(version: str, name: str, action: str) -> None:
    argv = ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action]
    if action == "stop":
        argv += ["-m", "fast"]
    subprocess.run(argv, capture_output=True, text=True, check=True)


@contextlib.contextmanager
def postgres_stopped(url: str) -> Iterator[None]:
    """The whole server stopped (fast shutdown: every connection cut) until the block
    ends, then started again; started again whatever happens in the block."""
    version, name = _cluster(url)
    _ctl(version, name, "stop")
    try:
        yield
    finally:
        _ctl(version, name, "start")


class PgTree(RelTree):
    """A tree whose ledger is the PostgreSQL database at `url`."""

    url = ""

    def rows(self) -> list[dict[str, Any]]:
        with psycopg.connect(self.url, row_factory=dict_row, connect_timeout=5) as conn:
            try:
                return list(conn.execute("SELECT * FROM jobs ORDER BY id"))
            except psycopg.errors.UndefinedTable:
                return []


class Upstream(threading.Thread):
    """Drops `files` into the tree at about `rate` a second (temp name, then rename)."""

    def __init__(self, tree: RelTree, files: dict[bytes, bytes], rate: float) -> None:
        super().__init__(daemon=True)
        self.tree, self.files, self.rate = tree, files, rate
        self.dropped = 0

    def run(self) -> None:
        started = time.monotonic()
        for i, (rel, content) in enumerate(self.files.items()):
            self.tree.drop(rel, content)
            self.dropped = i + 1
            ahead = i / self.rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)  # pacing the load generator, not synchronisation


class ReadyzProbe(threading.Thread):
    """Asks each service's `/readyz` every 0.1 s and keeps (time, port, status, reasons)."""

    def __init__(self, services: list[Service]) -> None:
        super().__init__(daemon=True)
        self.services = services
        self.seen: list[tuple[float, int, int, dict[str, Any]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for service in self.services:
                try:
                    status, body = service.get("/readyz")
                    reasons = dict(json.loads(body).get("reasons", {}))
                except (OSError, ValueError) as e:
                    status, reasons = -1, {"probe": repr(e)}
                self.seen.append((time.monotonic(), service.port, status, reasons))
            self._halt.wait(0.1)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def ledger_reasons(self, service: Service, since: float = 0.0) -> list[str]:
        """What a 503 of `service` said of the ledger, since `since` (monotonic)."""
        return [
            str(reasons["ledger"])
            for at, port, status, reasons in list(self.seen)
            if port == service.port and at >= since and status == 503 and "ledger" in reasons
        ]

    def unanswered(self, service: Service) -> int:
        """Probes `service` did not answer at all (HTTP down, or slower than 5 s)."""
        return sum(
            1 for _, port, status, _ in list(self.seen) if port == service.port and status < 0
        )


def starts(service: Service) -> int:
    """How many times the process logged its start (one: it never restarted)."""
    return sum(1 for line in service.log_lines() if line.get("msg") == "filedock starting")
