"""Filesystem faults, for real: full disks (size-limited tmpfs), EACCES (a real non-root
user), EXDEV (a second mount), and a failing fsync (ext4 on a loop device whose backing
store runs out: writes succeed, writeback fails).

Each ends with no source lost: a file is in transfer/, in proc/ with its content, or in
a verified archive, and the service carries on by itself once the fault is gone.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

from conftest import FiledockTree, Service

from reliability.support import (
    NOBODY,
    RelTree,
    archive_ok,
    as_user,
    failing_writeback_fs,
    fill,
    metric,
    nonroot_base,
    python_route,
    remount_cold,
    report,
    resize_tmpfs,
    tmpfs,
    unfill,
    wait_for,
    wait_service_exit,
)


def _copies(tree: RelTree, files: dict[bytes, bytes]) -> dict[bytes, str]:
    """Where each file's good copy is: transfer, proc (intact), archive (verified) or nowhere.

    The service may move files meanwhile, so each place is looked at in the order a file
    travels through them: transfer/, then the ledger (its row is written before the
    claim's rename), then proc/, then archive/ or failed/ (each written before the
    source in proc/ goes). A file that moves on between two looks is found at the next.
    """
    where = {
        rel: "transfer" for rel, content in files.items() if _holds(tree.transfer, rel, content)
    }
    rows = {bytes(r["relative_path"]): r for r in tree.rows()}
    for rel, content in files.items():
        if rel in where:
            continue
        row = rows.get(rel)
        name = rel.rsplit(b"/", 1)[-1]
        if row is None:
            where[rel] = "nowhere"
        elif _holds(tree.folder("proc") / row["id"], name, content):
            where[rel] = "proc"
        elif _archived(tree, row["id"], content):
            where[rel] = "archive"
        elif row["id"] in tree.failed():
            where[rel] = "failed"
        else:
            where[rel] = "nowhere"
    return where


def _archived(tree: RelTree, job_id: str, content: bytes) -> bool:
    folder = tree.archived().get(job_id)
    return folder is not None and archive_ok(folder, content)


def _holds(folder: Path, rel: bytes, content: bytes) -> bool:
    """Whether `folder/rel` holds `content` (a file moved away meanwhile does not)."""
    try:
        with open(os.fsencode(folder) + b"/" + rel, "rb") as f:
            return f.read() == content
    except FileNotFoundError:
        return False


def _ready_reasons(service: Service) -> tuple[int, str]:
    status, body = service.get("/readyz")
    return status, body.decode()


# -- a full archive disk -----------------------------------------------------------------


def test_full_archive_disk_defers_then_recovers_by_itself(rtree: RelTree) -> None:
    with tmpfs(rtree.base / "archive-mnt", "2m") as mnt:
        rtree.configure(
            [python_route("quick", concurrency=2)],
            folders={"archive": str(mnt)},
            min_free_bytes=256 << 10,
        )
        service = rtree.start()
        files = {f"big-{i}.bin".encode(): os.urandom(400 << 10) for i in range(8)}
        for rel, content in files.items():
            rtree.drop(rel, content)
        wait_for(
            lambda: metric(service, "filedock_archive_retries_total") >= 1,
            timeout=30,
            what="an archive write to fail and be retried",
        )
        status, reasons = _ready_reasons(service)
        assert status == 503 and "disk:archive" in reasons, reasons
        where = _copies(rtree, files)
        assert "nowhere" not in where.values(), where  # the source is never deleted
        assert "proc" in where.values()  # imported, waiting for room in archive/
        assert service.proc.poll() is None
        full_at = time.monotonic()
        resize_tmpfs(mnt, "64m")  # space returns
        wait_for(
            lambda: rtree.settled(len(files)),
            timeout=150,
            interval=0.5,
            what="the deferred archives to be written once space returned",
        )
        recovered_s = time.monotonic() - full_at
        wait_for(lambda: _ready_reasons(service)[0] == 200, timeout=15, what="/readyz 200")
        retries = metric(service, "filedock_archive_retries_total")
        assert service.stop() == 0
        rtree.check_invariants(files)
        rtree.check_no_tmp()
        runs = [r for r in rtree.records() if r["event"] == "run"]
        assert len(runs) == len(files), "an archive retry must not import again"
    report(
        "full_archive_disk",
        files=len(files),
        archive_retries=retries,
        recovered_after_s=round(recovered_s, 1),
    )


def test_full_archive_disk_with_more_files_than_the_queue(rtree: RelTree) -> None:
    with tmpfs(rtree.base / "archive-mnt", "2m") as mnt:
        rtree.configure(
            [python_route("quick", concurrency=2)],
            folders={"archive": str(mnt)},
            min_free_bytes=256 << 10,
            queue_size=2,
            shutdown_grace_s=5,
        )
        service = rtree.start()
        files = {f"big-{i}.bin".encode(): os.urandom(300 << 10) for i in range(12)}
        for rel, content in files.items():
            rtree.drop(rel, content)
        wait_for(
            lambda: metric(service, "filedock_archive_retries_total") >= 1,
            timeout=30,
            what="an archive write to fail and be retried",
        )
        resize_tmpfs(mnt, "64m")
        try:
            wait_for(
                lambda: rtree.settled(len(files)),
                timeout=45,
                interval=0.5,
                what="the deferred archives to be written once space returned",
            )
        finally:
            service.proc.send_signal(signal.SIGTERM)
            code = wait_service_exit(service, timeout=20)
            if code is None:
                service.proc.kill()
                service.proc.wait()
            assert "nowhere" not in _copies(rtree, files).values()
        assert code == 0, "SIGTERM did not stop the service within shutdown_grace_s + 15 s"
        rtree.check_invariants(files)


# -- a full ledger disk ------------------------------------------------------------------


def test_full_ledger_disk_keeps_files_in_transfer_then_recovers(rtree: RelTree) -> None:
    with tmpfs(rtree.base / "state-mnt", "4m") as mnt:
        rtree.configure(
            [python_route("quick", concurrency=2)],
            folders={"state": str(mnt)},
            min_free_bytes=0,
        )
        service = rtree.start()
        rtree.drop("before.csv", b"before\n")
        rtree.wait_final(1)
        fill(mnt)
        errors_before = metric(service, "filedock_ledger_errors_total")
        files = {f"while-full-{i}.csv".encode(): f"{i}\n".encode() for i in range(40)}
        for rel, content in files.items():
            rtree.drop(rel, content)
        wait_for(
            lambda: metric(service, "filedock_ledger_errors_total") >= errors_before + 2,
            timeout=30,
            what="ledger writes to fail",
        )
        ready_while_full = _ready_reasons(service)[0]
        assert service.proc.poll() is None, service.log()[-3000:]
        assert rtree.transfer_files() == len(files)  # intake paused: the files wait upstream
        assert not rtree.proc_entries()
        unfill(mnt)
        wait_for(
            lambda: rtree.settled(len(files) + 1),
            timeout=60,
            interval=0.5,
            what="the waiting files to be processed once the ledger has room",
        )
        wait_for(lambda: _ready_reasons(service)[0] == 200, timeout=15, what="/readyz 200")
        errors = metric(service, "filedock_ledger_errors_total")
        assert service.stop() == 0
        rtree.check_invariants({**files, b"before.csv": b"before\n"})
    report(
        "full_ledger_disk_idle",
        files=len(files),
        ledger_errors=errors,
        readyz_while_full=ready_while_full,
    )


def test_full_ledger_disk_turns_readyz_503(rtree: RelTree) -> None:
    with tmpfs(rtree.base / "state-mnt", "4m") as mnt:
        rtree.configure(
            [python_route("quick")], folders={"state": str(mnt)}, min_free_bytes=256 << 10
        )
        service = rtree.start()
        fill(mnt)
        try:
            wait_for(
                lambda: _ready_reasons(service)[0] == 503,
                timeout=15,
                what="/readyz to report the ledger it cannot write",
            )
        finally:
            unfill(mnt)
            service.stop()


def test_full_ledger_disk_with_imports_in_flight(rtree: RelTree) -> None:
    with tmpfs(rtree.base / "state-mnt", "4m") as mnt:
        rtree.configure(
            [python_route("quick", concurrency=4)],
            folders={"state": str(mnt)},
            min_free_bytes=0,
            shutdown_grace_s=5,
        )
        service = rtree.start()
        files = {f"slow-{i}.csv".encode(): b"SLEEP 2\n" for i in range(4)}
        for rel, content in files.items():
            rtree.drop(rel, content)
        wait_for(lambda: len(rtree.records()) >= len(files), what="4 imports in flight")
        fill(mnt)  # the imports end while the ledger cannot be written
        ends = lambda: [r for r in rtree.records() if r["event"] == "end"]  # noqa: E731
        wait_for(lambda: len(ends()) >= len(files), what="the imports to end while full")
        try:
            wait_for(
                lambda: _down(service) or metric(service, "filedock_ledger_errors_total") >= 1,
                timeout=30,
                what="the archiving state to fail to be written",
            )
            assert service.proc.poll() is None, f"the service died:\n{service.log()[-3000:]}"
            assert not _down(service), "the service stopped serving HTTP (a task group ended)"
            assert "nowhere" not in _copies(rtree, files).values()
            unfill(mnt)
            wait_for(
                lambda: rtree.settled(len(files)),
                timeout=60,
                interval=0.5,
                what="the jobs to finish once the ledger has room",
            )
            assert service.stop() == 0
        finally:
            unfill(mnt)
            if service.proc.poll() is None:
                service.proc.kill()
                service.proc.wait()
        rtree.check_invariants(files)


# -- EACCES, as a real non-root user ---------------------------------------------------


def test_eacces_on_the_archive_folder_as_a_non_root_user() -> None:
    """The service runs as `nobody` (setpriv): root ignores permission bits, nobody does not."""
    prefix = as_user(NOBODY)
    with nonroot_base() as base:
        tree = RelTree(base)
        try:
            tree.configure([python_route("quick", concurrency=2)], min_free_bytes=0)
            for name in ("transfer", "proc", "failed", "temp", "state"):
                tree.folder(name).mkdir(parents=True, exist_ok=True)
            archive = tree.folder("archive")
            archive.mkdir(parents=True, exist_ok=True)
            os.chmod(archive, 0o755)  # owned by root: nobody gets EACCES writing into it
            for path in [base, *base.rglob("*")]:
                if path != archive:
                    os.chown(path, NOBODY, NOBODY)
            unreadable = tree.drop("unreadable.csv", b"secret-ish\n")
            os.chown(unreadable, 0, 0)
            os.chmod(unreadable, 0o600)  # EACCES on a file: nobody may move it, not read it
            files = {f"f-{i}.csv".encode(): f"{i}\n".encode() for i in range(5)}
            for rel, content in files.items():
                tree.drop(rel, content)
                os.chown(tree.transfer / rel.decode(), NOBODY, NOBODY)
            service = tree.start_argv(prefix, wait_ready=False)
            wait_for(lambda: _serving(service), timeout=30, what="the service to serve HTTP")
            wait_for(
                lambda: metric(service, "filedock_archive_retries_total") >= 1,
                timeout=30,
                what="archive writes to fail with EACCES and be retried",
            )
            status, reasons = _ready_reasons(service)
            assert status == 503 and "folder:archive" in reasons, reasons
            log = service.log()
            assert "Permission denied" in log or "EACCES" in log or "Errno 13" in log
            assert "nowhere" not in _copies(tree, files).values()
            os.chown(archive, NOBODY, NOBODY)  # the operator fixes the permissions
            wait_for(
                lambda: tree.settled(len(files) + 1),
                timeout=120,
                interval=0.5,
                what="the archives to be written once the folder is writable",
            )
            retries = metric(service, "filedock_archive_retries_total")
            assert service.stop() == 0
            rows = {bytes(r["name"]): r for r in tree.rows()}
            bad = rows[b"unreadable.csv"]
            assert bad["state"] == "failed" and bad["error_class"] in ("permission", "exhausted")
            dropped = dict(files)
            dropped[b"unreadable.csv"] = b"secret-ish\n"
            tree.check_invariants(dropped)
            assert os.stat(tree.failed()[bad["id"]] / "unreadable.csv").st_uid == 0
        finally:
            tree.close()
    report(
        "eacces_archive_folder",
        files=len(files) + 1,
        archive_retries=retries,
        how="service run as uid 65534 via setpriv; archive/ owned by root 0755",
    )


def _down(service: Service) -> bool:
    """The process exited, or no longer answers HTTP."""
    if service.proc.poll() is not None:
        return True
    try:
        service.get("/healthz")
    except OSError:
        return True
    return False


def _serving(service: Service) -> bool:
    assert service.proc.poll() is None, f"exited {service.proc.returncode}:\n{service.log()}"
    try:
        return service.get("/healthz")[0] == 200
    except OSError:
        return False


# -- EXDEV between transfer/ and proc/ -------------------------------------------------


def test_exdev_between_transfer_and_proc_is_refused_at_start(rtree: RelTree) -> None:
    with tmpfs(rtree.base / "proc-mnt", "2m") as mnt:
        rtree.configure(folders={"proc": str(mnt / "proc")})
        rtree.drop("waiting.csv", b"x\n")
        for run in (rtree.run_once, lambda: rtree.cli("run", timeout=30)):
            result = run()
            assert result.returncode == 2, result.stdout + result.stderr
            assert "different filesystems" in result.stderr and "EXDEV" in result.stderr
            assert result.stderr.count("\n") <= 2, "one clear line, not a traceback"
        assert (rtree.transfer / "waiting.csv").read_bytes() == b"x\n"
        assert sorted(os.listdir(rtree.transfer)) == ["waiting.csv"]  # no probe left behind
        assert not os.listdir(mnt / "proc")


# -- a failing fsync -------------------------------------------------------------------


def _start_on_failing_fs(tree: RelTree, mnt: Path) -> tuple[Service, dict[bytes, bytes]]:
    tree.configure(
        [python_route("quick", concurrency=2)],
        folders={"archive": str(mnt / "archive")},
        min_free_bytes=0,
        shutdown_grace_s=5,
    )
    service = tree.start()
    # Incompressible: 12 MB of archives cannot fit the 8 MB the image may grow by.
    files = {f"f-{i:02d}.bin".encode(): os.urandom(1 << 20) for i in range(12)}
    for rel, content in files.items():
        tree.drop(rel, content)
    return service, files


def _fault_noticed(service: Service) -> bool:
    if service.proc.poll() is not None:
        return True
    try:
        return metric(service, "filedock_archive_retries_total") >= 1
    except OSError:
        return False


def test_failing_fsync_never_deletes_the_only_good_copy(rtree: RelTree) -> None:
    with failing_writeback_fs(rtree.base) as mnt:
        service, files = _start_on_failing_fs(rtree, mnt)
        wait_for(lambda: _fault_noticed(service), timeout=60, what="the failing writeback")
        died_by_itself = service.proc.poll() is not None
        service.proc.kill()
        service.proc.wait()
        # A restart: recovery must not trust what only the page cache holds.
        again = rtree.start(wait_ready=False)
        wait_for(
            lambda: "recovery finished" in again.log() or again.proc.poll() is not None,
            timeout=60,
            what="recovery to run",
        )
        wait_for(lambda: _fault_noticed(again), timeout=60, what="the fault, after restart")
        again.proc.kill()
        again.proc.wait()
        remount_cold(mnt, rtree.base)  # what is left is what reached the device
        where = _copies(rtree, files)
    lost = [rel for rel, w in where.items() if w in ("nowhere", "failed")]
    report(
        "failing_fsync_copies",
        files=len(files),
        service_died=died_by_itself,
        **{k: list(where.values()).count(k) for k in ("proc", "archive", "nowhere")},
    )
    assert not lost, f"only good copy gone for {lost}: {where}"


def test_failing_fsync_is_deferred_not_fatal(rtree: RelTree) -> None:
    with failing_writeback_fs(rtree.base) as mnt:
        service, _ = _start_on_failing_fs(rtree, mnt)
        try:
            wait_for(lambda: _fault_noticed(service), timeout=60, what="the failing writeback")
            assert service.proc.poll() is None, f"the service died:\n{service.log()[-3000:]}"
            assert service.get("/healthz")[0] == 200
        finally:
            if service.proc.poll() is None:
                service.proc.kill()
                service.proc.wait()


def test_fsync_failing_after_the_archive_rename_keeps_the_source(rtree: RelTree) -> None:
    rtree.configure([python_route("quick")], shutdown_grace_s=5)
    files = {b"one.csv": b"1\n", b"two.csv": b"2\n"}
    for rel, content in files.items():
        rtree.drop(rel, content)
    hook = rtree.env(FILEDOCK_TEST_FAIL_FSYNC="publish:1")
    first = rtree.run_once(env=hook)
    assert "Input/output error" in first.stdout + first.stderr, "the hook injected nothing"
    # Whatever the first run did, the published copy was never known durable: the next
    # start must verify it (or rebuild it from proc/) before it removes the source.
    rtree.run_once()
    rtree.check_invariants(files)
    logs = rtree.run_once().stdout
    assert "verified" in logs or all(_copies(rtree, files)[r] == "archive" for r in files)


def test_sha256_helper_agrees_with_the_tree(tmp_path: Path) -> None:
    """A self-check of this suite's `archive_ok`, on a tree the service wrote."""
    tree = FiledockTree(tmp_path)
    tree.configure([python_route("quick")], min_free_bytes=0)
    tree.drop("a.csv", b"abc\n")
    assert tree.run_once().returncode == 0
    folder = next(iter(tree.archived().values()))
    assert archive_ok(folder, b"abc\n") and not archive_ok(folder, b"abd\n")
    assert hashlib.sha256(b"abc\n").hexdigest() == tree.rows()[0]["sha256"]
