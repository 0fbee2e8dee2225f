"""The PostgreSQL ledger goes away and comes back, for real: the server stopped and
started again during a run, and the test's own database refusing connections (with
its open ones cut) for a while, under one replica and under two; and a database that
refuses connections when the service starts.

Each ends with every file archived exactly once (ledger rows, archive folders, the
sha256 of each archive), nothing left in transfer/ or proc/, each file imported exactly
once (no process was killed), `/readyz` 503 naming the ledger while it was away and 200
after, `filedock_ledger_errors_total` above zero, and the same process throughout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Service, free_port

from reliability.outage import (
    PgTree,
    ReadyzProbe,
    Upstream,
    own_database,
    postgres_stopped,
    refusing,
    starts,
)
from reliability.support import check_i4, imports_per_job, metric, python_route, report, wait_for


@pytest.fixture
def pg_tree(tmp_path: Path, postgres_url: str) -> Iterator[PgTree]:
    """A tree whose ledger is a PostgreSQL database of its own, dropped afterwards."""
    with own_database(postgres_url) as url:
        tree = PgTree(tmp_path)
        tree.url = url
        try:
            yield tree
        finally:
            tree.close()


def _files(n: int) -> dict[bytes, bytes]:
    return {f"in-{i % 8}/f-{i:05d}.csv".encode(): f"id\n{i}\n".encode() for i in range(n)}


def _configure(tree: PgTree, **settings: object) -> None:
    tree.configure(
        [python_route("quick", concurrency=4)],
        ledger_url=tree.url,
        min_free_bytes=0,
        shutdown_grace_s=10,
        **settings,
    )


def _start(tree: PgTree, *, wait_ready: bool = True) -> Service:
    """A `filedock run` with an HTTP port of its own (several may share the tree)."""
    port = free_port()
    service = tree.start(env=tree.env(FILEDOCK_HTTP__PORT=str(port)), wait_ready=False)
    service.port = port
    if wait_ready:
        service.wait_ready()
    return service


def _serving(service: Service) -> bool:
    try:
        return service.get("/healthz")[0] == 200
    except OSError:
        return False


def _check_after(
    tree: PgTree, files: dict[bytes, bytes], services: list[Service]
) -> dict[str, int]:
    """The invariants once every file is final, each service still the same process."""
    wait_for(
        lambda: all(s.get("/readyz")[0] == 200 for s in services),
        timeout=30,
        what="/readyz 200 on every replica once the ledger is back",
    )
    for s in services:
        assert s.proc.poll() is None and starts(s) == 1, "the service restarted"
        assert metric(s, "filedock_ledger_errors_total") > 0
        taking = [line for line in s.log_lines() if line["msg"].startswith("taking over")]
        assert not taking, f"a live replica's jobs were taken over: {taking}"
    for s in services:
        assert s.stop() == 0, s.log()[-3000:]
    tree.check_invariants(files)
    figures = check_i4(tree, set(files))
    runs = imports_per_job(tree)
    twice = {job: n for job, n in runs.items() if n != 1}
    assert not twice, f"imported more than once with no process killed: {twice}"
    return figures


# -- the server stopped and started again ------------------------------------------------


def _restart_scenario(tree: PgTree, n: int, rate: float) -> None:
    _configure(tree, lease_s=10)
    service = _start(tree)
    files = _files(n)
    probe, upstream = ReadyzProbe([service]), Upstream(tree, files, rate)
    probe.start()
    upstream.start()
    try:
        wait_for(lambda: tree.final_count() >= n // 4, timeout=60, what="a quarter done")
        stopped_at = time.monotonic()
        with postgres_stopped(tree.url):
            reasons = wait_for(
                lambda: probe.ledger_reasons(service, stopped_at),
                timeout=30,
                what="/readyz 503 naming the ledger",
            )
            assert service.proc.poll() is None, service.log()[-3000:]
        down_s = time.monotonic() - stopped_at
        upstream.join()
        wait_for(lambda: tree.settled(n), timeout=120, interval=0.5, what=f"all {n} final")
        probe.stop()
        assert probe.unanswered(service) == 0, "/readyz went unanswered during the outage"
        figures = _check_after(tree, files, [service])
    finally:
        probe.stop()
    report(
        "postgres_restart",
        files=n,
        down_s=round(down_s, 1),
        readyz=reasons[-1],
        **figures,
    )


def test_postgres_restart_during_a_run(pg_tree: PgTree) -> None:
    _restart_scenario(pg_tree, 1500, rate=150)


@pytest.mark.slow
def test_postgres_restart_during_a_5000_file_run(pg_tree: PgTree) -> None:
    _restart_scenario(pg_tree, 5000, rate=250)


# -- the database refuses connections -------------------------------------------------


def _refusal_scenario(tree: PgTree, n: int, rate: float, refuse_s: float) -> None:
    """Two replicas, `lease_s` well under the outage: neither may take the other's jobs
    for a heartbeat it could not write."""
    _configure(tree, lease_s=3)
    services = [_start(tree), _start(tree)]
    files = _files(n)
    probe, upstream = ReadyzProbe(services), Upstream(tree, files, rate)
    probe.start()
    upstream.start()
    try:
        wait_for(lambda: tree.final_count() >= n // 5, timeout=60, what="a fifth done")
        refused_at = time.monotonic()
        with refusing(os.environ["FILEDOCK_TEST_POSTGRES_URL"], tree.url):
            for s in services:
                wait_for(
                    lambda s=s: probe.ledger_reasons(s, refused_at),  # type: ignore[misc]
                    timeout=15,
                    what="/readyz 503 naming the ledger",
                )
            while time.monotonic() - refused_at < refuse_s:  # the outage lasts its length
                assert all(s.proc.poll() is None for s in services), "a replica exited"
                time.sleep(0.2)
            errors = [metric(s, "filedock_ledger_errors_total") for s in services]
        upstream.join()
        wait_for(lambda: tree.settled(n), timeout=120, interval=0.5, what=f"all {n} final")
        probe.stop()
        assert not any(probe.unanswered(s) for s in services), "/readyz went unanswered"
        figures = _check_after(tree, files, services)
    finally:
        probe.stop()
    said = probe.ledger_reasons(services[0], refused_at)
    report(
        "postgres_refuses_connections",
        files=n,
        replicas=len(services),
        refused_s=refuse_s,
        ledger_errors_during=errors,
        readyz=said[-1],
        **figures,
    )


def test_postgres_refuses_connections_for_a_while(pg_tree: PgTree) -> None:
    _refusal_scenario(pg_tree, 1200, rate=100, refuse_s=12)


@pytest.mark.slow
def test_postgres_refuses_connections_for_30_s(pg_tree: PgTree) -> None:
    _refusal_scenario(pg_tree, 5000, rate=100, refuse_s=30)


# -- refused at start -------------------------------------------------------------------


def test_postgres_refusing_at_start(pg_tree: PgTree) -> None:
    """`run --once` refuses to start (exit 2, one line); `run` waits for the ledger,
    alive and not ready, and starts by itself once it answers."""
    _configure(pg_tree, lease_s=10)
    files = _files(40)
    for rel, content in files.items():
        pg_tree.drop(rel, content)
    admin = os.environ["FILEDOCK_TEST_POSTGRES_URL"]
    with refusing(admin, pg_tree.url):
        once = pg_tree.run_once(timeout=60)
        assert once.returncode == 2, once.stdout + once.stderr
        assert "ledger" in once.stderr and "not currently accepting connections" in once.stderr
        assert once.stderr.count("\n") <= 2, "one clear line, not a traceback"
        service = _start(pg_tree, wait_ready=False)
        probe = ReadyzProbe([service])
        probe.start()
        try:
            said = wait_for(lambda: probe.ledger_reasons(service), timeout=30, what="/readyz 503")
            assert service.get("/healthz")[0] == 200  # alive: no restart wanted
            waiting = wait_for(
                lambda: [m for m in service.log_lines() if "waiting for it" in m["msg"]],
                what="the log line saying the service waits for the ledger",
            )
            assert "not currently accepting connections" in waiting[0]["error"]
            assert pg_tree.transfer_files() == len(files)
            other = _start(pg_tree, wait_ready=False)  # a signal ends the wait
            wait_for(lambda: _serving(other), what="the second one to serve HTTP")
            assert other.stop(timeout=10) == 0
        finally:
            probe.stop()
    wait_for(lambda: pg_tree.settled(len(files)), timeout=60, what="all files once it answers")
    figures = _check_after(pg_tree, files, [service])
    report("postgres_refusing_at_start", files=len(files), readyz=said[-1], **figures)
