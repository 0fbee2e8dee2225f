"""Start-up recovery: each half-finished state, built for real on disk and in the ledger,
is finished by the next start, and nothing is deleted that holds a payload."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import anyio
from conftest import FiledockTree

from service.ledger import JobRecord, ledger_for_url
from service.storage.names import new_job_id


def _insert(tree: FiledockTree, **fields: object) -> JobRecord:
    now = time.time()
    record = JobRecord(
        id=str(fields.pop("id", new_job_id(now))),
        route="main",
        name=b"x.csv",
        relative_path=b"x.csv",
        detected_at=now,
        created_at=now,
        updated_at=now,
        owner="someone-else",
        lease_expires_at=now - 1,
        **fields,  # type: ignore[arg-type]
    )

    async def go() -> None:
        ledger = ledger_for_url(f"sqlite:///{tree.root / 'state' / 'ledger.sqlite3'}")
        await ledger.open()
        await ledger.insert([record])
        await ledger.close()

    anyio.run(go)
    return record


def _actions(result_stdout: str) -> dict[str, int]:
    for line in result_stdout.splitlines():
        doc = json.loads(line)
        if doc["msg"] == "recovery finished":
            return dict(doc["actions"])
    return {}


def test_a_claim_that_never_happened_is_undone(tree: FiledockTree) -> None:
    tree.configure()
    tree.drop("x.csv", b"still here\n")
    stale = _insert(tree, state="claimed")
    (tree.folder("proc") / stale.id / "out").mkdir(parents=True)  # died before the rename
    result = tree.run_once()
    assert result.returncode == 0
    assert _actions(result.stdout) == {"unclaimed_row": 1}
    rows = tree.rows()
    assert len(rows) == 1 and rows[0]["id"] != stale.id and rows[0]["state"] == "done"
    tree.check_invariants({b"x.csv": b"still here\n"})


def test_a_claimed_folder_without_a_row_is_adopted(tree: FiledockTree) -> None:
    tree.configure()
    job_id = new_job_id()
    (tree.folder("proc") / job_id).mkdir(parents=True)
    (tree.folder("proc") / job_id / "orphan.csv").write_bytes(b"adopt me\n")
    result = tree.run_once()
    assert result.returncode == 0 and _actions(result.stdout) == {"adopted": 1}
    assert [r["id"] for r in tree.rows()] == [job_id]
    tree.check_invariants({b"orphan.csv": b"adopt me\n"})


def test_an_interrupted_import_is_retried_with_its_attempt_counted(tree: FiledockTree) -> None:
    tree.configure()
    job = _insert(
        tree,
        state="importing",
        attempts=1,
        history=[{"n": 1, "started_at": "2026-01-01T00:00:00.000Z", "result": "running"}],
    )
    (tree.folder("proc") / job.id).mkdir(parents=True)
    (tree.folder("proc") / job.id / "x.csv").write_bytes(b"again\n")
    result = tree.run_once()
    assert result.returncode == 0 and _actions(result.stdout) == {"requeued": 1}
    row = tree.rows()[0]
    assert row["state"] == "done" and row["attempts"] == 2
    assert [h["result"] for h in json.loads(row["history"])] == ["interrupted", "ok"]


def test_a_published_archive_is_finished_not_redone(tree: FiledockTree) -> None:
    tree.configure()
    job = _insert(tree, state="archiving", attempts=1, outcome="imported")
    proc = tree.folder("proc") / job.id
    proc.mkdir(parents=True)
    (proc / "x.csv").write_bytes(b"done already\n")
    y, m, d = job.id[:4], job.id[4:6], job.id[6:8]
    final = tree.folder("archive") / y / m / d / job.id
    final.mkdir(parents=True)
    (final / "x.csv.gz").write_bytes(gzip.compress(b"done already\n"))
    (final / "manifest.json").write_text(json.dumps({"outcome": "imported", "size": 13}))
    result = tree.run_once()
    assert result.returncode == 0 and _actions(result.stdout) == {"finished_archive": 1}
    assert not proc.exists()  # the source goes only because its archive exists
    assert tree.rows()[0]["state"] == "done"
    assert not tree.records()  # not imported again


def test_a_failed_folder_without_a_row_gets_one(tree: FiledockTree) -> None:
    tree.configure()
    job_id = new_job_id()
    folder: Path = tree.folder("failed") / job_id
    folder.mkdir(parents=True)
    (folder / "bad.csv").write_bytes(b"x")
    (folder / "error.json").write_text(
        json.dumps({"route": "main", "error_class": "rejected", "outcome": "rejected"})
    )
    result = tree.run_once()
    assert _actions(result.stdout) == {"adopted": 1}
    row = tree.rows()[0]
    assert (row["id"], row["state"], row["error_class"]) == (job_id, "failed", "rejected")
    assert (folder / "bad.csv").exists()


async def test_a_take_over_the_ledger_interrupted_hands_back_every_job_it_took(
    tmp_path: Path,
) -> None:
    """Jobs taken over are this process's once taken: a take-over that fails half-way
    (the ledger away) gives them all back at the next one, none stranded."""
    from prometheus_client import CollectorRegistry
    from stages import Flaky

    from service.discovery.routes import Router
    from service.face.metrics import Metrics
    from service.ledger.sqlite import SqliteLedger
    from service.settings import Settings
    from service.upkeep.recovery import Recovery
    from service.upkeep.replicas import this_instance

    route = {"name": "main", "match": "**", "importer": "none"}
    settings = Settings(root=tmp_path, routes=[route])
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        now = time.time()
        jobs = []
        for n in range(3):
            job_id = f"20261207T00000000{n}Z-0000000{n}"
            (tmp_path / "proc" / job_id).mkdir(parents=True)
            (tmp_path / "proc" / job_id / "x.csv").write_bytes(b"x\n")
            jobs.append(
                JobRecord(
                    job_id,
                    "main",
                    b"x.csv",
                    b"x.csv",
                    state="importing",
                    history=[{"n": 1, "started_at": "", "result": "running"}],
                    owner="gone/1",
                    lease_expires_at=now - 1,
                    detected_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
        await ledger.insert(jobs)
        me = this_instance("pod-a")
        flaky = Flaky(ledger).fail("update")  # the first job's `interrupted` is not written
        recovery = Recovery(
            settings,
            flaky,
            Metrics(CollectorRegistry()),
            Router(list(settings.routes)),
            me,  # type: ignore[arg-type]
        )
        try:
            await recovery.take_over(set(), now=now)
        except Exception:
            pass
        else:
            raise AssertionError("the ledger was to fail")
        resumed = await recovery.take_over(set(), now=now)
        assert sorted(j.id for j in resumed) == [j.id for j in jobs]
        rows = await ledger.query(limit=None)
        assert {j.owner for j in rows} == {me.instance}
        assert all((j.state, j.history[-1]["result"]) == ("claimed", "interrupted") for j in rows)
    finally:
        await ledger.close()
