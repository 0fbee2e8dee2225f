"""The ledger contract, run on both backends: SQLite in a tmp_path file, PostgreSQL in a
schema of its own per test (dropped afterwards), so tests never see each other's rows."""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

import anyio
import psycopg
import pytest
from conftest import OpenLedger

from service.errors import LedgerUnavailable
from service.ledger import DeliveryRecord, JobRecord, Ledger, WindowRecord
from service.ledger.base import SCHEMA_VERSION, OutboxRecord

NOW = 1_800_000_000.0  # 2027-01-15, a fixed "now" for every test


def job(n: int, **fields: Any) -> JobRecord:
    values: dict[str, Any] = {
        "id": f"20270115T000000{n:03d}Z-{n:08x}",
        "route": "orders",
        "name": f"file{n}.csv".encode(),
        "relative_path": f"eu/file{n}.csv".encode(),
        "detected_at": NOW - 10,
        "created_at": NOW - 10,
        "updated_at": NOW - 10,
    }
    values.update(fields)
    return JobRecord(**values)


def raw_execute(url: str, statement: str) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own, outside the ledger."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return conn.execute(statement).fetchall()
    with psycopg.connect(url, autocommit=True) as pg:
        cur = pg.execute(statement)
        return cur.fetchall() if cur.description else []


# -- rows in, rows out ---------------------------------------------------------------


async def test_insert_get_round_trip_keeps_exact_bytes_and_every_field(ledger: Ledger) -> None:
    record = JobRecord(
        id="20270115T000000000Z-0badf00d",
        route="orders",
        name=b"\xff\xfe-$(rm -rf x)\nname\x01.csv",
        relative_path=b"eu/\x80\x81/\xff\xfe-$(rm -rf x)\nname\x01.csv",
        state="failed",
        outcome="exhausted",
        attempts=3,
        size=20 << 30,
        mtime_ns=1_700_000_000_123_456_789,
        sha256="ab" * 32,
        next_attempt_at=NOW + 0.125,
        error_class="timeout",
        error="took too long: \u00e9\u4e2d",
        detected_at=NOW - 3.5,
        created_at=NOW - 3.25,
        updated_at=NOW,
        archive_path=None,
        failed_path="failed/20270115T000000000Z-0badf00d",
        duplicate_of="20270101T000000000Z-00000001",
        owner="replica-1",
        lease_expires_at=NOW + 60,
        history=[{"n": 1, "started_at": NOW - 3, "ended_at": NOW - 2, "result": "timeout"}],
    )
    await ledger.insert([record])

    assert await ledger.get(record.id) == record
    assert await ledger.get("20270115T000000000Z-ffffffff") is None


async def test_insert_nothing_and_ping(ledger: Ledger) -> None:
    await ledger.insert([])
    await ledger.ping()
    assert await ledger.counts() == {}


async def test_a_write_is_committed_when_it_returns(ledger: Ledger, backend_url: str) -> None:
    await ledger.insert([job(1)])
    assert await ledger.update(job(1).id, {"state": "importing", "attempts": 1})

    rows = raw_execute(backend_url, "SELECT id, state, attempts FROM jobs")
    assert rows == [(job(1).id, "importing", 1)]


async def test_duplicate_id_is_refused_and_nothing_of_the_batch_is_kept(ledger: Ledger) -> None:
    await ledger.insert([job(1)])
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await ledger.insert([job(2), job(1)])
    assert [r.id for r in await ledger.query()] == [job(1).id]


# -- update and delete ----------------------------------------------------------------


async def test_update_with_expect_state(ledger: Ledger) -> None:
    await ledger.insert([job(1, state="claimed")])
    jid = job(1).id

    assert not await ledger.update(jid, {"state": "done"}, expect_state="importing")
    assert (await ledger.get(jid)).state == "claimed"  # type: ignore[union-attr]

    history = [{"n": 1, "result": "ok", "detail": "caf\u00e9 \U0001f600"}]
    assert await ledger.update(
        jid,
        {"state": "importing", "attempts": 1, "history": history, "updated_at": NOW},
        expect_state="claimed",
    )
    got = await ledger.get(jid)
    assert got is not None
    assert (got.state, got.attempts, got.history, got.updated_at) == (
        "importing",
        1,
        history,
        NOW,
    )
    assert await ledger.update(jid, {"error": None, "next_attempt_at": None})
    assert not await ledger.update("20270115T000000000Z-ffffffff", {"state": "done"})


async def test_update_refuses_unknown_columns_and_empty_updates(ledger: Ledger) -> None:
    await ledger.insert([job(1)])
    with pytest.raises(ValueError, match="not ledger columns"):
        await ledger.update(job(1).id, {"state": "done", "state; DROP TABLE jobs": 1})
    with pytest.raises(ValueError, match="id"):
        await ledger.update(job(1).id, {"id": "other"})
    with pytest.raises(ValueError, match="no ledger columns"):
        await ledger.update(job(1).id, {})
    assert (await ledger.get(job(1).id)) == job(1)


async def test_delete_removes_only_the_given_jobs(ledger: Ledger) -> None:
    await ledger.insert([job(n) for n in range(5)])
    await ledger.delete([job(1).id, job(3).id, "20270115T000000000Z-ffffffff"])
    await ledger.delete([])
    assert sorted(r.id for r in await ledger.query(limit=None)) == [job(n).id for n in (0, 2, 4)]


# -- reading ---------------------------------------------------------------------------


async def test_query_filters_orders_and_limits(ledger: Ledger) -> None:
    await ledger.insert(
        [
            job(0, state="done"),
            job(1, state="failed", route="invoices"),
            job(2, state="waiting"),
            job(3, state="done", route="invoices"),
            job(4, state="done"),
        ]
    )
    ids = [job(n).id for n in range(5)]

    assert [r.id for r in await ledger.query()] == ids[::-1]
    assert [r.id for r in await ledger.query(oldest_first=True)] == ids
    assert [r.id for r in await ledger.query(limit=2)] == [ids[4], ids[3]]
    assert [r.id for r in await ledger.query(limit=2, oldest_first=True)] == ids[:2]
    assert [r.id for r in await ledger.query(limit=None)] == ids[::-1]
    assert [r.id for r in await ledger.query(states=["done"])] == [ids[4], ids[3], ids[0]]
    assert [r.id for r in await ledger.query(states=["done", "failed"], route="invoices")] == [
        ids[3],
        ids[1],
    ]
    assert [r.id for r in await ledger.query(route="orders", oldest_first=True)] == [
        ids[0],
        ids[2],
        ids[4],
    ]
    assert await ledger.query(route="nope") == []
    assert await ledger.query(states=["archiving"]) == []


async def test_counts_per_state(ledger: Ledger) -> None:
    states = ["done"] * 3 + ["failed"] * 2 + ["waiting", "claimed"]
    await ledger.insert([job(n, state=s) for n, s in enumerate(states)])
    assert await ledger.counts() == {"done": 3, "failed": 2, "waiting": 1, "claimed": 1}


async def test_find_done_by_sha256_in_route_and_window_without_duplicates(ledger: Ledger) -> None:
    sha, other = "a" * 64, "b" * 64
    await ledger.insert(
        [
            job(0, state="done", outcome="imported", sha256=sha, created_at=NOW - 100),
            job(1, state="done", outcome="duplicate", sha256=sha, created_at=NOW - 5),
            job(2, state="done", outcome="imported", sha256=sha, created_at=NOW - 10),
            job(3, state="failed", outcome="rejected", sha256=sha, created_at=NOW - 1),
            job(4, state="done", outcome="imported", sha256=sha, route="invoices"),
            job(5, state="importing", sha256=other, created_at=NOW - 1),
            job(6, state="done", outcome=None, sha256=other, created_at=NOW - 50),
        ]
    )
    assert await ledger.find_done_by_sha256("orders", sha, NOW - 1000) == job(0).id
    assert await ledger.find_done_by_sha256("orders", sha, NOW - 100) == job(0).id  # inclusive
    assert await ledger.find_done_by_sha256("orders", sha, NOW - 99) == job(2).id
    assert await ledger.find_done_by_sha256("orders", sha, NOW - 9) is None  # only dup / failed
    assert await ledger.find_done_by_sha256("invoices", sha, 0) == job(4).id
    assert await ledger.find_done_by_sha256("other", sha, 0) is None
    # A done job without an outcome is no duplicate: it counts.
    assert await ledger.find_done_by_sha256("orders", other, 0) == job(6).id


async def test_older_than_gives_final_jobs_oldest_first(ledger: Ledger) -> None:
    await ledger.insert(
        [
            job(0, state="done", updated_at=NOW - 50),
            job(1, state="failed", updated_at=NOW - 300),
            job(2, state="done", updated_at=NOW - 200),
            job(3, state="waiting", updated_at=NOW - 400),
            job(4, state="done", updated_at=NOW - 200),
            job(5, state="done", updated_at=NOW - 100),
        ]
    )
    final = ["done", "failed"]
    ids = [r.id for r in await ledger.older_than(final, NOW - 100, 10)]
    assert ids == [job(1).id, job(2).id, job(4).id]  # updated_at < before, ties by id
    assert [r.id for r in await ledger.older_than(final, NOW - 100, 2)] == ids[:2]
    assert [r.id for r in await ledger.older_than(["done"], NOW, 10)] == [
        job(n).id for n in (2, 4, 5, 0)
    ]
    assert await ledger.older_than(final, NOW - 1000, 10) == []


# -- several replicas -----------------------------------------------------------------


async def test_take_due_takes_only_due_waiting_jobs_oldest_first(ledger: Ledger) -> None:
    await ledger.insert(
        [
            job(0, state="waiting", next_attempt_at=NOW - 5),
            job(1, state="waiting", next_attempt_at=NOW + 5),
            job(2, state="waiting", next_attempt_at=NOW - 50),
            job(3, state="claimed", next_attempt_at=NOW - 50),
            job(4, state="failed", next_attempt_at=NOW - 50),
            job(5, state="waiting", next_attempt_at=NOW),
        ]
    )
    taken = await ledger.take_due(NOW, 2, "r1", 30.0)
    assert [r.id for r in taken] == [job(2).id, job(0).id]
    for r in taken:
        assert (r.state, r.owner, r.lease_expires_at, r.updated_at) == (
            "claimed",
            "r1",
            NOW + 30,
            NOW,
        )
        assert await ledger.get(r.id) == r

    assert [r.id for r in await ledger.take_due(NOW, 10, "r2", 30.0)] == [job(5).id]
    assert await ledger.take_due(NOW, 10, "r2", 30.0) == []
    assert (await ledger.get(job(1).id)).state == "waiting"  # type: ignore[union-attr]


async def test_take_due_from_two_ledgers_at_once_gives_each_job_to_one(
    open_ledger: OpenLedger,
) -> None:
    first, second = await open_ledger(), await open_ledger()
    jobs = [job(n, state="waiting", next_attempt_at=NOW - n) for n in range(200)]
    await first.insert(jobs)
    taken: dict[str, list[str]] = {"a": [], "b": [], "c": [], "d": []}

    async def drain(ledger: Ledger, owner: str) -> None:
        while batch := await ledger.take_due(NOW, 7, owner, 60.0):
            taken[owner].extend(r.id for r in batch)
            assert all(r.owner == owner for r in batch)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, first, "a")
            tg.start_soon(drain, second, "b")
            tg.start_soon(drain, first, "c")
            tg.start_soon(drain, second, "d")

    every = [i for ids in taken.values() for i in ids]
    assert len(every) == len(set(every)) == 200
    assert set(every) == {j.id for j in jobs}
    assert await first.take_due(NOW, 500, "e", 60.0) == []
    for owner, ids in taken.items():
        for r in await second.query(states=["claimed"], limit=None):
            assert (r.owner == owner) == (r.id in ids)


async def test_postgres_take_due_skips_rows_another_replica_is_taking(pg_url: str) -> None:
    from service.ledger.postgres import PostgresLedger

    ledger = PostgresLedger(pg_url)
    await ledger.open()
    try:
        await ledger.insert(
            [job(n, state="waiting", next_attempt_at=NOW - 10 + n) for n in range(4)]
        )
        # Another replica's transaction holds the two most due rows: they are skipped,
        # not waited for, and not taken twice.
        async with await psycopg.AsyncConnection.connect(pg_url) as other:
            await other.execute(
                "SELECT id FROM jobs WHERE id = ANY(%s) FOR UPDATE", ([job(0).id, job(1).id],)
            )
            with anyio.fail_after(10):
                taken = await ledger.take_due(NOW, 10, "me", 30.0)
            assert [r.id for r in taken] == [job(2).id, job(3).id]
            await other.rollback()
        assert [r.id for r in await ledger.take_due(NOW, 10, "me", 30.0)] == [
            job(0).id,
            job(1).id,
        ]
    finally:
        await ledger.close()


async def test_take_orphans_respects_live_leases_and_takes_expired_ones(ledger: Ledger) -> None:
    await ledger.insert(
        [
            job(0, state="importing", owner="other", lease_expires_at=NOW + 10),  # live
            job(1, state="claimed", owner="other", lease_expires_at=NOW - 1),  # expired
            job(2, state="waiting", owner=None),  # never owned
            job(3, state="archiving", owner="me", lease_expires_at=NOW + 10),  # mine: kept
            job(4, state="done", owner="other", lease_expires_at=NOW - 100),  # finished
            job(5, state="failed", owner=None),  # finished
            job(6, state="importing", owner="third", lease_expires_at=NOW + 0.5),  # live
            job(7, state="importing", owner="other", lease_expires_at=NOW),  # ends now: live
        ]
    )
    taken = await ledger.take_orphans(NOW, "me", 30.0)
    assert [r.id for r in taken] == [job(n).id for n in (1, 2)]
    for r in taken:
        assert (r.owner, r.lease_expires_at) == ("me", NOW + 30)
        assert await ledger.get(r.id) == r
    assert (await ledger.get(job(2).id)).state == "waiting"  # type: ignore[union-attr]

    # Now every unfinished job has a live lease: another replica takes nothing.
    assert await ledger.take_orphans(NOW, "other2", 30.0) == []
    # Once the leases run out, "other" and "third" have died: their jobs move over.
    later = [r.id for r in await ledger.take_orphans(NOW + 31, "other2", 30.0)]
    assert later == [job(n).id for n in (0, 1, 2, 3, 6, 7)]


async def test_renew_leases_extends_only_the_owners_unfinished_jobs(ledger: Ledger) -> None:
    await ledger.insert(
        [
            job(0, state="importing", owner="me", lease_expires_at=NOW + 1),
            job(1, state="waiting", owner="me", lease_expires_at=NOW - 5),
            job(2, state="done", owner="me", lease_expires_at=NOW + 1),
            job(3, state="importing", owner="other", lease_expires_at=NOW + 1),
        ]
    )
    await ledger.renew_leases("me", NOW + 90)

    leases = {r.id: r.lease_expires_at for r in await ledger.query(limit=None)}
    assert leases == {
        job(0).id: NOW + 90,
        job(1).id: NOW + 90,
        job(2).id: NOW + 1,
        job(3).id: NOW + 1,
    }
    # At NOW + 60 the renewed leases still hold; only "other"'s lapsed job moves.
    assert [r.id for r in await ledger.take_orphans(NOW + 60, "third", 30.0)] == [job(3).id]


# -- lifecycle ----------------------------------------------------------------------------


async def test_rows_survive_close_and_reopen(open_ledger: OpenLedger) -> None:
    first = await open_ledger()
    await first.insert([job(n) for n in range(3)])
    await first.update(job(1).id, {"state": "done"})
    await first.close()
    with pytest.raises(RuntimeError, match="not open"):
        await first.get(job(1).id)

    second = await open_ledger()
    assert [r.id for r in await second.query(oldest_first=True)] == [job(n).id for n in range(3)]
    assert (await second.get(job(1).id)).state == "done"  # type: ignore[union-attr]


async def test_a_newer_schema_is_refused(open_ledger: OpenLedger, backend_url: str) -> None:
    ledger = await open_ledger()
    await ledger.insert([job(1)])
    await ledger.close()
    raw_execute(backend_url, "UPDATE filedock_schema SET version = version + 1")

    with pytest.raises(RuntimeError, match="newer than this filedock"):
        await open_ledger()

    raw_execute(backend_url, "UPDATE filedock_schema SET version = version - 1")
    assert (await (await open_ledger()).get(job(1).id)) == job(1)


async def test_replicas_starting_together_create_the_schema_once(
    open_ledger: OpenLedger, backend_url: str
) -> None:
    ledgers: list[Ledger] = []

    async def start() -> None:
        ledgers.append(await open_ledger())

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(start)

    assert raw_execute(backend_url, "SELECT version FROM filedock_schema") == [(SCHEMA_VERSION,)]
    await ledgers[0].insert([job(1)])
    assert all([await lg.get(job(1).id) == job(1) for lg in ledgers])


# -- deliveries -----------------------------------------------------------------------


def sink_row(job_id: str, sink: str, **fields: Any) -> DeliveryRecord:
    values: dict[str, Any] = {"created_at": NOW - 5, "updated_at": NOW - 5}
    values.update(fields)
    return DeliveryRecord(job_id, sink, "orders", **values)


async def test_deliveries_and_their_job_are_written_together_and_read_back(
    ledger: Ledger,
) -> None:
    await ledger.insert([job(1), job(2)])
    receipt = {"location": "s3://b/k", "bytes": 3, "sha256": "ab", "remote": {"etag": '"x"'}}
    lake = sink_row(job(1).id, "lake", state="delivered", attempts=2, receipts=[receipt])
    erp = sink_row(job(1).id, "erp", state="waiting", next_attempt_at=NOW + 60, error="503")
    await ledger.save_deliveries([lake, erp], [(job(1).id, {"state": "delivering"})])
    assert await ledger.deliveries(job(1).id) == [erp, lake]  # by sink name
    assert (await ledger.get(job(1).id)).state == "delivering"  # type: ignore[union-attr]
    erp.state, erp.attempts, erp.next_attempt_at = "delivered", 2, None
    await ledger.save_deliveries([erp])  # a sink's row replaced, the other kept
    assert [d.state for d in await ledger.deliveries(job(1).id)] == ["delivered", "delivered"]
    assert await ledger.deliveries(job(2).id) == []
    await ledger.delete([job(1).id])
    assert await ledger.deliveries(job(1).id) == []


async def test_delivery_backlog_counts_open_sinks_and_their_oldest(ledger: Ledger) -> None:
    await ledger.insert([job(1), job(2), job(3)])
    await ledger.save_deliveries(
        [
            sink_row(job(1).id, "lake", state="waiting", created_at=NOW - 100),
            sink_row(job(2).id, "lake", state="pending", created_at=NOW - 50),
            sink_row(job(3).id, "lake", state="delivered", created_at=NOW - 500),
            sink_row(job(3).id, "erp", state="failed", created_at=NOW - 500),
        ]
    )
    assert await ledger.delivery_backlog() == [("orders", "lake", 2, NOW - 100)]


async def test_take_due_gives_a_due_delivering_job_back_without_claiming_it(
    ledger: Ledger,
) -> None:
    await ledger.insert(
        [
            job(1, state="delivering", next_attempt_at=NOW - 1),
            job(2, state="delivering", next_attempt_at=None),  # being delivered: not taken
            job(3, state="delivering", next_attempt_at=NOW + 60),
        ]
    )
    taken = await ledger.take_due(NOW, 10, "replica-a", 30)
    assert [(j.id, j.state, j.next_attempt_at, j.owner) for j in taken] == [
        (job(1).id, "delivering", None, "replica-a")
    ]
    row = await ledger.get(job(1).id)
    assert row is not None and (row.state, row.next_attempt_at) == ("delivering", None)
    assert await ledger.take_due(NOW, 10, "replica-b", 30) == []


async def test_a_version_1_ledger_gains_the_deliveries_outbox_windows_and_replicas_tables(
    open_ledger: OpenLedger, backend_url: str
) -> None:
    first = await open_ledger()
    await first.insert([job(1)])
    await first.close()
    raw_execute(backend_url, "DROP TABLE deliveries")
    raw_execute(backend_url, "DROP TABLE outbox")
    raw_execute(backend_url, "DROP TABLE arrival_windows")
    raw_execute(backend_url, "DROP INDEX jobs_route_detected")
    raw_execute(backend_url, "DROP TABLE replicas")
    raw_execute(backend_url, "UPDATE filedock_schema SET version = 1")
    ledger = await open_ledger()
    assert raw_execute(backend_url, "SELECT version FROM filedock_schema") == [(SCHEMA_VERSION,)]
    await ledger.save_deliveries([sink_row(job(1).id, "lake")])
    assert [d.sink for d in await ledger.deliveries(job(1).id)] == ["lake"]
    await ledger.update_many([(job(1).id, {"state": "done"})], events=[event(1)])
    assert len(await ledger.outbox_query(pending_only=True, limit=5)) == 1
    window = WindowRecord("orders", "daily", NOW, NOW - 86400, "missing", until=NOW)
    assert await ledger.record_window(window)
    assert not await ledger.record_window(window)
    assert [w.judgement for w in await ledger.windows("orders", "daily", 5)] == ["missing"]
    assert [a.job_id for a in await ledger.arrivals("orders", NOW - 60, NOW)] == [job(1).id]
    assert await ledger.replicas() == []


async def test_a_version_4_ledger_gains_the_replicas_table(
    open_ledger: OpenLedger, backend_url: str
) -> None:
    from service.upkeep.replicas import this_instance

    first = await open_ledger()
    await first.insert([job(1, state="importing", owner="pod-a")])  # a version 4 owner: a name
    await first.close()
    raw_execute(backend_url, "DROP TABLE replicas")
    raw_execute(backend_url, "UPDATE filedock_schema SET version = 4")
    ledger = await open_ledger()
    assert raw_execute(backend_url, "SELECT version FROM filedock_schema") == [(SCHEMA_VERSION,)]
    me = this_instance("pod-a", now=NOW)
    assert await ledger.register_replica(me)
    assert [(r.instance, r.jobs) for r in await ledger.replicas()] == [(me.instance, 0)]
    assert await ledger.get(job(1).id) == job(1, state="importing", owner="pod-a")


async def test_postgres_advisory_lock_is_held_by_one_replica(pg_url: str) -> None:
    from service.ledger.postgres import PostgresLedger

    first, second = PostgresLedger(pg_url), PostgresLedger(pg_url)
    await first.open()
    await second.open()
    try:
        async with first.advisory_lock("reaper") as held:
            assert held
            async with second.advisory_lock("reaper") as other:
                assert not other
            async with second.advisory_lock("another-key") as unrelated:
                assert unrelated
        async with second.advisory_lock("reaper") as held:
            assert held
    finally:
        await first.close()
        await second.close()


async def test_postgres_open_names_the_reason_it_cannot_connect(postgres_url: str) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from service.ledger.postgres import PostgresLedger

    info = conninfo_to_dict(postgres_url)
    info["dbname"] = "filedock_no_such_database"
    ledger = PostgresLedger(make_conninfo("", **info), connect_timeout_s=2)
    with anyio.fail_after(30), pytest.raises(LedgerUnavailable, match="no_such_database") as e:
        await ledger.open()
    assert isinstance(e.value.__cause__, psycopg.OperationalError)  # the server's own words
    assert ledger.reach.problem() is not None  # what /readyz says while the service waits
    await ledger.close()


async def test_postgres_ledger_outlives_its_connections(pg_url: str) -> None:
    """Connections killed under the ledger (a server restart, a failover) are replaced."""
    from service.ledger.postgres import PostgresLedger

    app = f"filedock-test-{uuid.uuid4().hex[:12]}"
    ledger = PostgresLedger(f"{pg_url}&application_name={app}")
    await ledger.open()
    try:
        await ledger.insert([job(1)])
        with psycopg.connect(pg_url, autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))"
                " FROM pg_stat_activity WHERE application_name = %s",
                (app,),
            ).fetchone()
        assert row is not None and row[0] >= 1
        with anyio.fail_after(30):
            assert await ledger.get(job(1).id) == job(1)
            assert await ledger.update(job(1).id, {"state": "importing"})
    finally:
        await ledger.close()


# -- the outbox -------------------------------------------------------------------------


def event(n: int, channel: str = "hooks", **fields: Any) -> OutboxRecord:
    values: dict[str, Any] = {
        "type": "filedock.job.done",
        "route": "orders",
        "job_id": job(n).id,
        "payload": {"id": f"{job(n).id}.done", "data": {"name": "caf\u00e9.csv"}},
        "next_attempt_at": NOW - 1,
        "created_at": NOW - 10 + n,
    }
    values.update(fields)
    return OutboxRecord(f"{job(n).id}.done", channel, **values)


async def test_events_are_written_with_their_state_change_and_only_with_it(
    ledger: Ledger,
) -> None:
    await ledger.insert([job(1), job(2), job(3)])
    await ledger.update_many([(job(1).id, {"state": "done"})], events=[event(1)])
    changed = await ledger.update(
        job(2).id, {"state": "failed"}, expect_state="archiving", events=[event(2)]
    )
    assert not changed  # no state change: no event
    await ledger.save_deliveries([sink_row(job(3).id, "lake")], events=[event(3, "mail")])
    await ledger.update_many([(job(1).id, {"state": "done"})], events=[event(1)])  # again
    pending = await ledger.outbox_query(pending_only=True, limit=10)
    assert sorted((e.event_id, e.channel) for e in pending) == [
        (f"{job(1).id}.done", "hooks"),
        (f"{job(3).id}.done", "mail"),
    ]
    assert pending[-1].payload["data"]["name"] == "caf\u00e9.csv"
    assert sorted(await ledger.outbox_backlog()) == [("hooks", 1, NOW - 9), ("mail", 1, NOW - 7)]


async def test_take_outbox_leases_due_events_and_done_releases_them(
    open_ledger: OpenLedger,
) -> None:
    a, b = await open_ledger(), await open_ledger()
    await a.insert([job(n) for n in (1, 2, 3)])
    due = [event(1), event(2)]
    later = event(3, next_attempt_at=NOW + 60)
    await a.update_many([(job(1).id, {"state": "done"})], events=[*due, later])
    taken = await a.take_outbox(NOW, "replica-a", 30, limit=10)
    assert [e.event_id for e in taken] == [e.event_id for e in due]
    assert await b.take_outbox(NOW, "replica-b", 30, limit=10) == []  # held by a
    everything = await b.take_outbox(NOW + 31, "replica-b", 30, limit=10, due_only=False)
    assert len(everything) == 3  # a's lease ran out; a digest takes what is not due too
    sent, retry = everything[0], everything[1]
    sent.state, sent.sent_at, sent.attempts = "sent", NOW + 31, 1
    retry.attempts, retry.next_attempt_at, retry.error = 1, NOW + 90, "503"
    await b.outbox_done([sent, retry])
    pending = await a.take_outbox(NOW + 100, "replica-a", 30, limit=10)
    assert [(e.event_id, e.attempts, e.error) for e in pending] == [
        (retry.event_id, 1, "503"),
        (later.event_id, 0, None),
    ]
    assert await a.prune_outbox(NOW + 1000, 100) == 1  # only the sent one
    assert len(await a.outbox_query(pending_only=False, limit=10)) == 2


async def test_old_windows_are_pruned_but_each_expectations_latest_is_kept(
    ledger: Ledger,
) -> None:
    day = 86400.0
    for n in range(3):  # three old windows of "daily", one old window of "weekly"
        deadline = NOW - (10 - n) * day
        await ledger.record_window(
            WindowRecord("orders", "daily", deadline, deadline - day, "on_time", judged_at=deadline)
        )
    await ledger.record_window(
        WindowRecord(
            "orders", "weekly", NOW - 9 * day, NOW - 16 * day, "late", judged_at=NOW - 9 * day
        )
    )
    assert await ledger.prune_windows(NOW - day, 100) == 2
    assert [w.deadline for w in await ledger.windows("orders", "daily", 5)] == [NOW - 8 * day]
    assert len(await ledger.windows("orders", "weekly", 5)) == 1
