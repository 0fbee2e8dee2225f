"""The archiver's worker process (service/storage/archive_writer.py), as an operator meets it:
it may be killed, the whole process group may get a Ctrl-C, errors cross its pipe."""

from __future__ import annotations

import json
import os
import pickle
import signal
from pathlib import Path

from conftest import FiledockTree, Service, command_route, wait_for
from reliability.support import python_route

from service.errors import JobError


def _worker_pids(service: Service) -> list[int]:
    """The service's children that are anyio worker processes (not importer commands)."""
    pids = []
    for task in os.listdir(f"/proc/{service.proc.pid}/task"):
        try:  # a thread, or a child, may end while we look
            children = Path(f"/proc/{service.proc.pid}/task/{task}/children").read_text()
        except FileNotFoundError:
            continue
        for child in map(int, children.split()):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                continue
            if b"anyio.to_process" in cmdline and state != "Z":
                pids.append(child)
    return pids


def test_a_killed_archive_worker_is_replaced_and_nothing_is_lost(tree: FiledockTree) -> None:
    tree.configure([command_route()])
    service = tree.start()
    first = wait_for(lambda: _worker_pids(service), timeout=30, what="the archive worker")
    dropped = {b"before.csv": b"1\n"}
    tree.drop("before.csv", b"1\n")
    tree.wait_final(1)

    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: not _worker_pids(service), timeout=30, what="the worker to die")
    for i in range(10):
        name = f"after-{i}.csv"
        tree.drop(name, f"{i}\n".encode())
        dropped[name.encode()] = f"{i}\n".encode()
    tree.wait_final(len(dropped), timeout=120)

    assert service.proc.poll() is None, f"the service died:\n{service.log()[-3000:]}"
    assert _worker_pids(service) not in ([], first), "no new worker took over"
    assert {r["state"] for r in tree.rows()} == {"done"}
    assert service.stop() == 0
    tree.check_invariants(dropped)


def _started_at(pid: int) -> float:
    """A process's start time as Prometheus' process collector reports it."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    btime = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def test_the_workers_own_figures_are_exported_and_follow_a_new_worker(
    tree: FiledockTree,
) -> None:
    """The dashboard's CPU and memory panels show the worker beside the service: its
    figures are its own (its start time), and after it is replaced, the new one's."""
    worker = "filedock_archive_worker_process_"
    tree.configure([command_route()])
    service = tree.start()

    def exported_for(pid: int) -> bool:
        started = service.metric(worker + "start_time_seconds")
        return started is not None and abs(started - _started_at(pid)) < 0.02

    (first,) = wait_for(lambda: _worker_pids(service), timeout=30, what="the archive worker")
    wait_for(lambda: exported_for(first), timeout=30, what="the worker's start time in /metrics")
    assert (service.metric(worker + "resident_memory_bytes") or 0) > 5 << 20
    assert service.metric(worker + "cpu_seconds_total") is not None

    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not _worker_pids(service), timeout=30, what="the worker to die")
    tree.drop("after.csv", b"1\n")
    tree.wait_final(1, timeout=120)
    (second,) = wait_for(lambda: _worker_pids(service), timeout=30, what="a new worker")
    assert second != first
    wait_for(lambda: exported_for(second), timeout=30, what="the new worker's start time")
    assert service.stop() == 0


def test_ctrl_c_to_the_process_group_still_drains_cleanly(tree: FiledockTree) -> None:
    """A terminal's Ctrl-C reaches every process of the group: the worker must leave its
    stopping to the service, which finishes the archives in flight first."""
    tree.configure([command_route(concurrency=4)])
    service = tree.start(own_process_group=True)
    wait_for(lambda: _worker_pids(service), timeout=30, what="the archive worker")
    dropped = {f"f-{i:02d}.csv".encode(): f"{i}\n".encode() for i in range(30)}
    for rel, content in dropped.items():
        tree.drop(rel, content)
    tree.wait_final(1)

    os.killpg(service.proc.pid, signal.SIGINT)
    assert service.proc.wait(timeout=60) == 0, service.log()[-3000:]
    assert "cannot archive yet" not in service.log(), service.log()[-3000:]
    finished = tree.run_once()  # whatever the drain left claimed
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr
    tree.check_invariants(dropped)


def test_importer_facts_json_cannot_hold_are_archived_as_text(tree: FiledockTree) -> None:
    """A python importer's `Decimal` or `datetime` reaches the manifest as its `str()`;
    it used to stop the job short of its archive (retried forever). What orjson refuses
    (a 70-bit integer, a lone surrogate) is written by the standard encoder."""
    tree.configure([python_route("odd_detail")])
    tree.drop("order.csv", b"id\n1\n")
    result = tree.run_once()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    (folder,) = tree.archived().values()
    importer = json.loads((folder / "manifest.json").read_text())["importer"]
    assert importer["amount"] == "1.50"
    assert importer["loaded_at"] == "2026-11-24 00:00:00+00:00"
    assert importer["checksum"] == 2**70
    assert importer["label"] == "r\udce9sum\udce9"
    assert importer["city"] == "Zürich"
    tree.check_invariants({b"order.csv": b"id\n1\n"})


def test_a_job_error_crosses_the_pipe_whole() -> None:
    err = JobError("io_error", "the compressed copy does not match", retryable=True)
    err.with_log(b"importer said so")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, JobError)
    assert (back.error_class, back.message, back.retryable, back.log) == (
        "io_error",
        "the compressed copy does not match",
        True,
        b"importer said so",
    )
