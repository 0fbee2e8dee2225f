"""The SQLite ledger unavailable, for real: another process holding its write lock for
seconds while files arrive, and the ledger file and its folder made read-only (under a
real non-root user, since root ignores permission bits), under a running service and
at start.

Each ends with every file archived exactly once, nothing left in transfer/ or proc/,
each file imported exactly once, `/readyz` 503 naming the ledger while it lasted and
200 after, and the same process throughout.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from conftest import Service

from reliability.outage import ReadyzProbe, Upstream, starts
from reliability.support import (
    NOBODY,
    RelTree,
    as_user,
    check_i4,
    imports_per_job,
    metric,
    nonroot_base,
    python_route,
    report,
    wait_for,
)


def _files(n: int, prefix: str = "f") -> dict[bytes, bytes]:
    return {f"in-{i % 4}/{prefix}-{i:05d}.csv".encode(): f"id\n{i}\n".encode() for i in range(n)}


def _ledger(tree: RelTree) -> Path:
    return tree.folder("state") / "ledger.sqlite3"


def _check_after(tree: RelTree, files: dict[bytes, bytes], service: Service) -> dict[str, int]:
    wait_for(lambda: service.get("/readyz")[0] == 200, timeout=30, what="/readyz 200 again")
    assert service.proc.poll() is None and starts(service) == 1, "the service restarted"
    assert metric(service, "filedock_ledger_errors_total") > 0
    assert service.stop() == 0, service.log()[-3000:]
    tree.check_invariants(files)
    figures = check_i4(tree, set(files))
    twice = {job: n for job, n in imports_per_job(tree).items() if n != 1}
    assert not twice, f"imported more than once with no process killed: {twice}"
    return figures


def test_sqlite_ledger_locked_by_another_process(rtree: RelTree) -> None:
    """A `BEGIN EXCLUSIVE` held for 8 s by another connection: every write waits its
    `busy_timeout` and fails; the files wait, and all go through once it is released."""
    rtree.configure([python_route("quick", concurrency=4)], min_free_bytes=0)
    service = rtree.start()
    files = _files(600)
    probe, upstream = ReadyzProbe([service]), Upstream(rtree, files, 100)
    probe.start()
    upstream.start()
    try:
        wait_for(lambda: rtree.final_count() >= 100, timeout=60, what="100 done")
        holder = sqlite3.connect(_ledger(rtree), timeout=30, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            locked_at = time.monotonic()
            said = wait_for(
                lambda: [r for r in probe.ledger_reasons(service, locked_at) if "locked" in r],
                timeout=20,
                what="/readyz 503 saying the ledger is locked",
            )
            while time.monotonic() - locked_at < 8:  # the lock is held for its length
                assert service.proc.poll() is None, service.log()[-3000:]
                time.sleep(0.2)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        upstream.join()
        wait_for(lambda: rtree.settled(len(files)), timeout=120, interval=0.5, what="all final")
        probe.stop()
        assert not probe.unanswered(service), "/readyz went unanswered"
        figures = _check_after(rtree, files, service)
    finally:
        probe.stop()
    report("sqlite_ledger_locked", files=len(files), locked_s=8, readyz=said[-1], **figures)


def _nonroot_tree(base: Path) -> RelTree:
    tree = RelTree(base)
    tree.configure([python_route("quick", concurrency=2)], min_free_bytes=0)
    for name in ("transfer", "proc", "archive", "failed", "temp", "state"):
        tree.folder(name).mkdir(parents=True, exist_ok=True)
    for path in [base, *base.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    return tree


def _drop_as_nobody(tree: RelTree, files: dict[bytes, bytes]) -> None:
    for rel, content in files.items():
        path = tree.drop(rel, content)
        os.chown(path, NOBODY, NOBODY)
        os.chown(path.parent, NOBODY, NOBODY)


def _read_only(tree: RelTree) -> None:
    os.chmod(_ledger(tree), 0o444)
    os.chmod(tree.folder("state"), 0o555)


def _writable(tree: RelTree) -> None:
    os.chmod(tree.folder("state"), 0o755)
    os.chmod(_ledger(tree), 0o644)


def test_sqlite_ledger_made_read_only_under_a_running_service() -> None:
    """Permissions are checked when a file is opened: the running service writes on
    through its connection, and says on `/readyz` that the next start could not."""
    prefix = as_user(NOBODY)
    with nonroot_base() as base:
        tree = _nonroot_tree(base)
        try:
            service = tree.start_argv(prefix)
            before, during = _files(100, "before"), _files(100, "during")
            _drop_as_nobody(tree, before)
            wait_for(lambda: tree.settled(len(before)), timeout=60, what="the first files")
            _read_only(tree)
            try:
                _, body = wait_for(
                    lambda: (r := service.get("/readyz"))[0] == 503 and r,
                    timeout=15,
                    what="/readyz 503",
                )
                said = json.loads(body)["reasons"]
                assert "read-only" in said["ledger"] and "folder:state" in said, said
                _drop_as_nobody(tree, during)
                wait_for(
                    lambda: tree.settled(len(before) + len(during)),
                    timeout=60,
                    what="the files dropped meanwhile, written through the open connection",
                )
            finally:
                _writable(tree)
            wait_for(lambda: service.get("/readyz")[0] == 200, timeout=30, what="/readyz 200")
            assert service.stop() == 0, service.log()[-3000:]
            files = {**before, **during}
            tree.check_invariants(files)
            assert all(n == 1 for n in imports_per_job(tree).values())
        finally:
            tree.close()
    report("sqlite_ledger_read_only_running", files=len(files), readyz=said)


def test_sqlite_ledger_read_only_at_start() -> None:
    """The service waits for a ledger it cannot write (alive, not ready, saying why)
    and starts by itself once the mode is restored."""
    prefix = as_user(NOBODY)
    with nonroot_base() as base:
        tree = _nonroot_tree(base)
        try:
            first = tree.start_argv(prefix)  # makes the ledger
            assert first.stop() == 0
            _read_only(tree)
            try:
                service = tree.start_argv(prefix, wait_ready=False)
                probe = ReadyzProbe([service])
                probe.start()
                try:
                    said = wait_for(
                        lambda: probe.ledger_reasons(service), timeout=30, what="/readyz 503"
                    )
                    assert "readonly" in said[-1] or "read-only" in said[-1], said[-1]
                    assert service.get("/healthz")[0] == 200
                    files = _files(50)
                    _drop_as_nobody(tree, files)
                    wait_for(
                        lambda: any("waiting for it" in m["msg"] for m in service.log_lines()),
                        what="the log line saying the service waits for the ledger",
                    )
                    assert tree.transfer_files() == len(files)
                finally:
                    probe.stop()
            finally:
                _writable(tree)
            wait_for(lambda: tree.settled(len(files)), timeout=60, what="all files")
            figures = _check_after(tree, files, service)
        finally:
            tree.close()
    report("sqlite_ledger_read_only_at_start", files=len(files), readyz=said[-1], **figures)
