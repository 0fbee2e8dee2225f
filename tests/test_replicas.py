"""Several replicas on one tree and one PostgreSQL ledger, as separate `filedock run`
processes: one SIGKILLed mid-run, two with the same name (the default, the hostname,
or an explicit `replica_id`), one restarted in place."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import threading
import time
from typing import Any

import psycopg
from conftest import FiledockTree, Service, free_port, wait_for
from psycopg.rows import dict_row

FILES = 5000


def _rows(url: str) -> list[dict[str, Any]]:
    """Every job, with the name (`replica_id`) of the instance that owns it."""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        try:
            return list(
                conn.execute(
                    "SELECT id, state, owner, relative_path, replicas.name AS replica"
                    " FROM jobs LEFT JOIN replicas ON replicas.instance = jobs.owner"
                )
            )
        except psycopg.errors.UndefinedTable:
            return []


def _instances(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        try:
            return list(conn.execute("SELECT * FROM replicas ORDER BY started_at"))
        except psycopg.errors.UndefinedTable:
            return []


def _instance_of(url: str, service: Service) -> str:
    """The instance id the `filedock run` process registered."""
    found = wait_for(
        lambda: [r["instance"] for r in _instances(url) if r["pid"] == service.proc.pid],
        what="the process's instance row",
    )
    return str(found[0])


def test_three_replicas_one_killed(tree: FiledockTree, pg_url: str) -> None:
    route = {
        "name": "shared",
        "match": "**",
        "importer": {
            "kind": "python",
            "callable": "recording_importer:record",
            "options": {"sleep_s": 0.005},
        },
        "concurrency": 4,
    }
    tree.configure([route], ledger_url=pg_url, lease_s=3, scan_interval_s=1)
    replicas = []
    for i in range(3):
        env = tree.env(FILEDOCK_REPLICA_ID=f"r{i}", FILEDOCK_HTTP__PORT=str(free_port()))
        service = tree.start(env=env, wait_ready=False)
        service.port = int(env["FILEDOCK_HTTP__PORT"])
        replicas.append(service)
    for service in replicas:
        service.wait_ready()

    staging = tree.base / "staging"
    staging.mkdir()

    def upstream() -> None:  # files arrive during the run, temp name then rename
        for i in range(FILES):
            (staging / f"{i:05d}.csv").write_bytes(b"row %d\n" % i)
            os.rename(staging / f"{i:05d}.csv", tree.transfer / f"{i:05d}.csv")
            if i % 500 == 499:
                time.sleep(0.2)

    writer = threading.Thread(target=upstream)
    writer.start()
    wait_for(lambda: len(_rows(pg_url)) >= FILES // 3, timeout=120, what="a third claimed")
    victim = replicas[0]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    killed_at = time.time()
    writer.join()

    def all_final() -> bool:
        rows = _rows(pg_url)
        return len(rows) == FILES and all(r["state"] in ("done", "failed") for r in rows)

    wait_for(all_final, timeout=300, what=f"all {FILES} jobs done or failed")
    for service in replicas[1:]:
        code = service.stop()
        assert code == 0, f"exit {code}:\n" + service.log()[-3000:]

    rows = _rows(pg_url)
    assert len({bytes(r["relative_path"]) for r in rows}) == FILES  # one row per file
    assert all(r["state"] == "done" for r in rows)
    archived = tree.archived()
    assert set(archived) == {r["id"] for r in rows}  # each in archive/, exactly once
    assert not tree.failed()
    assert not list(tree.folder("proc").iterdir())
    assert not list(tree.transfer.iterdir())

    imports: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for record in tree.records():
        imports[record["job_id"]].append(record)
    twice = {job: runs for job, runs in imports.items() if len(runs) > 1}
    for job, runs in twice.items():  # only the dead replica's unfinished imports ran again
        assert runs[0]["replica"] == "r0", f"{job} imported twice by live replicas: {runs}"
    by_owner = collections.Counter(r["replica"] for r in rows)
    assert by_owner["r1"] and by_owner["r2"], by_owner
    taken_over = [r for r in rows if r["id"] in twice]
    print(
        f"replicas: {FILES} files, owners {dict(by_owner)}, re-imported after the kill "
        f"{len(taken_over)}, all final {time.time() - killed_at:.1f}s after the kill"
    )


def _recording_route(sleep_s: float, concurrency: int) -> dict[str, Any]:
    return {
        "name": "shared",
        "match": "**",
        "importer": {
            "kind": "python",
            "callable": "recording_importer:record",
            "options": {"sleep_s": sleep_s},
        },
        "concurrency": concurrency,
    }


def _start_replica(tree: FiledockTree, **env: str) -> Service:
    """A `filedock run` on the tree with an HTTP port of its own; `env` adds variables."""
    port = free_port()
    service = tree.start(env=tree.env(FILEDOCK_HTTP__PORT=str(port), **env), wait_ready=False)
    service.port = port
    service.wait_ready()
    return service


def _replicas_cli(tree: FiledockTree) -> dict[str, dict[str, Any]]:
    result = tree.cli("replicas", "--json")
    assert result.returncode == 0, result.stderr
    return {r["instance"]: r for r in json.loads(result.stdout)}


def _check_each_file_archived_once(tree: FiledockTree, url: str, files: int) -> None:
    rows = _rows(url)
    assert len(rows) == files and len({bytes(r["relative_path"]) for r in rows}) == files
    assert all(r["state"] == "done" for r in rows), collections.Counter(r["state"] for r in rows)
    assert set(tree.archived()) == {r["id"] for r in rows}  # each in archive/, exactly once
    assert not tree.failed()
    assert not list(tree.folder("proc").iterdir())
    assert not list(tree.transfer.iterdir())


def test_two_replicas_with_default_settings_on_one_host(tree: FiledockTree, pg_url: str) -> None:
    """No `replica_id`: both are named after the host, and still two replicas; either
    finishes the jobs of the other when it is SIGKILLed."""
    lease_s, scan_s, files = 3, 1, 600
    tree.configure(
        [_recording_route(0.002, 2)],
        ledger_url=pg_url,
        lease_s=lease_s,
        scan_interval_s=scan_s,
        batch_max_files=32,
    )
    first = _start_replica(tree)
    second = _start_replica(tree)
    victim, survivor = first, second
    gone = _instance_of(pg_url, victim)
    instances = _instances(pg_url)
    assert [r["name"] for r in instances] == [socket.gethostname()] * 2
    assert len({r["instance"] for r in instances}) == 2
    for i in range(files):
        tree.drop(f"{i:04d}.csv", b"row %d\n" % i)

    def victim_busy() -> bool:
        rows = _rows(pg_url)
        final = sum(r["state"] == "done" for r in rows)
        held = sum(r["owner"] == gone and r["state"] != "done" for r in rows)
        return final >= files * 2 // 3 and held > 0

    wait_for(victim_busy, timeout=60, what="two thirds done, the victim holding jobs")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    killed_at = time.monotonic()
    held = {r["id"] for r in _rows(pg_url) if r["owner"] == gone and r["state"] != "done"}

    def all_done() -> bool:
        rows = _rows(pg_url)
        return len(rows) == files and all(r["state"] == "done" for r in rows)

    wait_for(all_done, timeout=60, what=f"all {files} jobs done")
    finished_s = time.monotonic() - killed_at
    assert survivor.stop() == 0, survivor.log()[-3000:]
    _check_each_file_archived_once(tree, pg_url, files)
    assert finished_s <= lease_s + scan_s, f"done {finished_s:.1f} s after the kill"

    imports: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for record in tree.records():
        imports[record["job_id"]].append(record)
    for runs in imports.values():  # only the victim's unfinished imports ran again
        assert len(runs) == 1 or runs[0]["pid"] == victim.proc.pid, runs
    survivor_log = survivor.log()
    assert "another live instance has this replica_id" in survivor_log
    taking = [line for line in survivor.log_lines() if line["msg"].startswith("taking over")]
    assert taking and taking[0]["instance"] == gone and "is gone" in taking[0]["reason"]
    print(
        f"default replica_id: {files} files, the victim held {len(held)}, all done "
        f"{finished_s:.1f} s after the kill (lease_s {lease_s}, scan {scan_s} s)"
    )


def test_two_live_replicas_with_one_replica_id_run_as_two(tree: FiledockTree, pg_url: str) -> None:
    """Both run, each its own instance; the second warns about the first; `filedock
    replicas` lists both, live then stopped."""
    tree.configure([_recording_route(0.05, 2)], ledger_url=pg_url, lease_s=3)
    first = _start_replica(tree, FILEDOCK_REPLICA_ID="pod-a")
    second = _start_replica(tree, FILEDOCK_REPLICA_ID="pod-a")
    ids = [_instance_of(pg_url, s) for s in (first, second)]
    files = 40
    for i in range(files):
        tree.drop(f"{i:03d}.csv", b"row %d\n" % i)
    wait_for(lambda: sum(r["state"] == "done" for r in _rows(pg_url)) == files, what="all done")

    (warning,) = [
        line for line in second.log_lines() if line["msg"].startswith("another live instance")
    ]
    assert warning["other_instance"] == ids[0] and warning["replica_id"] == "pod-a"
    assert 0 <= warning["other_heartbeat_age_s"] <= 3
    assert not [line for line in first.log_lines() if line["msg"].startswith("another live")]
    listed = _replicas_cli(tree)
    assert {i: (listed[i]["name"], listed[i]["state"]) for i in ids} == {
        ids[0]: ("pod-a", "live"),
        ids[1]: ("pod-a", "live"),
    }
    assert all(listed[i]["heartbeat_age_s"] <= 3 and listed[i]["jobs"] == 0 for i in ids)
    by_owner = collections.Counter(r["owner"] for r in _rows(pg_url))
    assert set(by_owner) <= set(ids)

    assert first.stop() == 0 and second.stop() == 0
    _check_each_file_archived_once(tree, pg_url, files)
    assert len(tree.records()) == files  # no file imported twice
    listed = _replicas_cli(tree)
    assert [listed[i]["state"] for i in ids] == ["stopped", "stopped"]
    text = tree.cli("replicas").stdout
    assert ids[0] in text and "stopped" in text


def test_a_replica_restarted_in_place_takes_its_jobs_back_at_once(
    tree: FiledockTree, pg_url: str
) -> None:
    """The same name, started again after a SIGKILL on this host: its earlier process is
    gone, so its jobs are resumed at once, not after their 60 s lease."""
    tree.configure([_recording_route(1.0, 2)], ledger_url=pg_url, lease_s=60)
    before = _start_replica(tree, FILEDOCK_REPLICA_ID="pod-a")
    killed = _instance_of(pg_url, before)
    for i in range(4):
        tree.drop(f"{i}.csv", b"row %d\n" % i)

    def importing() -> bool:
        rows = _rows(pg_url)
        return sum(r["state"] == "importing" and r["owner"] == killed for r in rows) == 2

    wait_for(importing, what="two imports running")
    before.proc.send_signal(signal.SIGKILL)
    before.proc.wait()
    restarted_at = time.monotonic()
    after = _start_replica(tree, FILEDOCK_REPLICA_ID="pod-a")
    wait_for(lambda: sum(r["state"] == "done" for r in _rows(pg_url)) == 4, what="all done")
    assert time.monotonic() - restarted_at < 30  # well within the lease
    assert after.stop() == 0
    _check_each_file_archived_once(tree, pg_url, 4)
    (taking,) = [line for line in after.log_lines() if line["msg"].startswith("taking over")]
    assert taking["instance"] == killed
    assert taking["reason"] == f"its process (pid {before.proc.pid}) is gone"


def test_readyz_names_a_heartbeat_that_cannot_be_written(tree: FiledockTree, pg_url: str) -> None:
    tree.configure([_recording_route(0, 1)], ledger_url=pg_url, lease_s=3)
    service = _start_replica(tree)

    def reasons() -> dict[str, str] | None:
        status, body = service.get("/readyz")
        return dict(json.loads(body)["reasons"]) if status == 503 else None

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE replicas RENAME TO replicas_away")  # the beat cannot write
        try:
            found = wait_for(reasons, what="/readyz to turn 503")
        finally:
            conn.execute("ALTER TABLE replicas_away RENAME TO replicas")
    assert list(found) == ["heartbeat"], found
    assert found["heartbeat"].startswith("last written ")
    assert "error UndefinedTable" in found["heartbeat"]
    wait_for(lambda: service.get("/readyz")[0] == 200, what="/readyz 200 once it beats again")
    assert service.stop() == 0
