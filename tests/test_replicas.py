"""Several replicas on one tree and one PostgreSQL ledger; one is SIGKILLed mid-run."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from typing import Any

import psycopg
from conftest import FiledockTree, free_port, wait_for
from psycopg.rows import dict_row

FILES = 5000


def _rows(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        try:
            return list(conn.execute("SELECT id, state, owner, relative_path FROM jobs"))
        except psycopg.errors.UndefinedTable:
            return []


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
    by_owner = collections.Counter(r["owner"] for r in rows)
    assert by_owner["r1"] and by_owner["r2"], by_owner
    taken_over = [r for r in rows if r["id"] in twice]
    print(
        f"replicas: {FILES} files, owners {dict(by_owner)}, re-imported after the kill "
        f"{len(taken_over)}, all final {time.time() - killed_at:.1f}s after the kill"
    )
