"""Replica instances in the ledger, on both backends: their rows (register, heartbeat,
stop, prune), and whose jobs a starting or running instance may take (`upkeep/replicas.py`),
with an injected `now` and host: a live instance keeps its jobs whatever its name; one
known to have ended gives them up at once."""

from __future__ import annotations

import logging
import os
import subprocess
from typing import Any

import pytest

from service.ledger import JobRecord, Ledger
from service.ledger.base import OutboxRecord, ReplicaRecord
from service.upkeep.replicas import Host, ended, process_start, register, take_orphans

NOW = 1_800_000_000.0
LEASE_S = 30.0
HERE = Host("node-1", "boot-1", "pid:[4026531836]")


def job(n: int, owner: str | None, **fields: Any) -> JobRecord:
    values: dict[str, Any] = {
        "id": f"20270115T000000{n:03d}Z-{n:08x}",
        "route": "orders",
        "name": f"f{n}.csv".encode(),
        "relative_path": f"f{n}.csv".encode(),
        "state": "importing",
        "detected_at": NOW - 10,
        "created_at": NOW - 10,
        "updated_at": NOW - 10,
        "owner": owner,
        "lease_expires_at": NOW + LEASE_S,  # live: renewed at the last heartbeat
    }
    values.update(fields)
    return JobRecord(**values)


def instance(tag: str, name: str = "pod-a", **fields: Any) -> ReplicaRecord:
    """An instance of `name` on HERE whose process is this test's (alive), beating now."""
    values: dict[str, Any] = {
        "instance": f"{name}/{tag}",
        "name": name,
        "host": HERE.name,
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
        "boot_id": HERE.boot_id,
        "pid_ns": HERE.pid_ns,
        "started_at": NOW - 100,
        "heartbeat_at": NOW - 1,
        "version": "0.1.0",
    }
    values.update(fields)
    return ReplicaRecord(**values)


def dead_process() -> tuple[int, int]:
    """The pid and start time of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["sleep", "30"])
    start = process_start(proc.pid)
    proc.kill()
    proc.wait()
    assert start is not None
    return proc.pid, start


async def setup(ledger: Ledger, *replicas: ReplicaRecord) -> None:
    """Each instance registered with one job of its own (job n for the n-th)."""
    for n, r in enumerate(replicas):
        assert await ledger.register_replica(r)
        await ledger.insert([job(n, r.instance)])


async def taken(ledger: Ledger, me: ReplicaRecord, now: float = NOW) -> list[str | None]:
    """The former owners of the jobs `me` takes at `now`."""
    before = {j.id: j.owner for j in await ledger.query(limit=None)}
    return sorted(
        before[j.id] or "" for j in await take_orphans(ledger, me, LEASE_S, now, host=HERE)
    )


# -- the rows ---------------------------------------------------------------------------


async def test_instances_register_beat_stop_and_count_their_jobs(ledger: Ledger) -> None:
    first = instance("1", started_at=NOW - 50)
    second = instance("2", started_at=NOW - 20)
    assert await ledger.register_replica(first)
    assert not await ledger.register_replica(instance("1", name="pod-a"))  # id taken
    assert await ledger.register_replica(second)
    await ledger.insert(
        [
            job(1, first.instance),
            job(2, first.instance, state="waiting"),
            job(3, first.instance, state="done"),  # finished: not held
            job(4, second.instance, state="delivering"),
        ]
    )
    assert [(r.instance, r.jobs) for r in await ledger.replicas()] == [
        (second.instance, 1),  # the newest start first
        (first.instance, 2),
    ]
    await ledger.replica_stopped(first.instance, NOW)
    rows = {r.instance: r for r in await ledger.replicas()}
    assert rows[first.instance].stopped_at == NOW
    assert rows[second.instance] == ReplicaRecord(**{**vars(second), "jobs": 1})

    first.heartbeat_at = NOW + 5  # it beats again: it runs after all
    await ledger.replica_heartbeat(first)
    row = next(r for r in await ledger.replicas() if r.instance == first.instance)
    assert (row.heartbeat_at, row.stopped_at) == (NOW + 5, None)


async def test_a_heartbeat_writes_back_a_pruned_row_and_pruning_takes_the_silent(
    ledger: Ledger,
) -> None:
    old, recent = instance("old", heartbeat_at=NOW - 8 * 86400), instance("recent")
    await setup(ledger, old, recent)
    assert await ledger.prune_replicas(NOW - 7 * 86400, 100) == 1
    assert [r.instance for r in await ledger.replicas()] == [recent.instance]
    await ledger.replica_heartbeat(old)
    assert len(await ledger.replicas()) == 2


async def test_take_orphans_takes_every_job_of_the_instances_gone(ledger: Ledger) -> None:
    await ledger.insert(
        [
            job(1, "pod-a/dead"),
            job(2, "pod-a/dead", state="done"),  # finished: stays as it is
            job(3, "pod-b/live"),
            job(4, "me"),
        ]
    )
    got = await ledger.take_orphans(NOW, "me", LEASE_S, gone=["pod-a/dead", "me"])
    assert [(j.id, j.owner) for j in got] == [(job(1, None).id, "me")]
    everything = await ledger.take_orphans(NOW, "other", LEASE_S, everyone=True)
    assert [j.id for j in everything] == [job(n, None).id for n in (1, 3, 4)]


def event(n: int) -> OutboxRecord:
    job_id = job(n, None).id
    return OutboxRecord(
        f"{job_id}.done",
        "hooks",
        "filedock.job.done",
        "orders",
        job_id,
        {"id": job_id},
        next_attempt_at=NOW - 1,
        created_at=NOW - 10 + n,
    )


async def test_release_outbox_frees_the_events_of_the_instances_gone(ledger: Ledger) -> None:
    await ledger.insert([job(n, None, state="done") for n in (1, 2, 3)])
    await ledger.update_many([(job(1, None).id, {"outcome": "imported"})], events=[event(1)])
    await ledger.update_many([(job(2, None).id, {"outcome": "imported"})], events=[event(2)])
    await ledger.update_many([(job(3, None).id, {"outcome": "imported"})], events=[event(3)])
    for n, owner in ((1, "pod-a/dead"), (2, "pod-b/live"), (3, "me")):
        (held,) = await ledger.take_outbox(NOW, owner, LEASE_S, limit=1)
        assert held.event_id == event(n).event_id
    assert await ledger.take_outbox(NOW, "other", LEASE_S, limit=10) == []  # all leased
    assert await ledger.release_outbox("me", gone=["pod-a/dead", "me"]) == 1
    assert [e.event_id for e in await ledger.take_outbox(NOW, "other", LEASE_S, limit=10)] == [
        event(1).event_id
    ]
    assert await ledger.release_outbox("me", everyone=True) == 2  # "pod-b/live", "other"
    assert len(await ledger.take_outbox(NOW, "me", LEASE_S, limit=10)) == 3


# -- rule 2: a live instance keeps its jobs, whatever its name ----------------------------


async def test_a_live_instance_keeps_its_jobs_whatever_its_name(ledger: Ledger) -> None:
    dead_pid, dead_start = dead_process()
    same_name_alive = instance("alive")  # this very process: alive
    other_host = instance("away", host="node-2", pid=dead_pid, pid_start=dead_start)
    other_ns = instance("ns", pid_ns="pid:[4026532001]", pid=dead_pid, pid_start=dead_start)
    other_boot = instance("boot", boot_id="boot-0", pid=dead_pid, pid_start=dead_start)
    await setup(ledger, same_name_alive, other_host, other_ns, other_boot)
    restarted = instance("new", started_at=NOW)  # a new start under the same name
    assert await ledger.register_replica(restarted)
    assert await taken(ledger, restarted) == []

    # Much later, still heartbeating (and renewing leases): still nothing to take.
    later = NOW + 10 * LEASE_S
    for r in (same_name_alive, other_host, other_ns, other_boot):
        r.heartbeat_at = later - 1
        await ledger.replica_heartbeat(r)
        await ledger.renew_leases(r.instance, later + LEASE_S)
    assert await taken(ledger, restarted, later) == []


# -- rule 3: an instance known to have ended gives its jobs up at once ---------------------


async def test_a_restart_takes_back_the_jobs_of_its_ended_instance_at_once(
    ledger: Ledger,
) -> None:
    dead_pid, dead_start = dead_process()
    gone = instance("gone", pid=dead_pid, pid_start=dead_start)  # same host, pid gone
    reused = instance("reused", pid_start=(process_start(os.getpid()) or 0) - 1)  # pid reused
    stopped = instance("stopped", stopped_at=NOW - 2)
    alive = instance("alive")
    await setup(ledger, gone, reused, stopped, alive)
    await ledger.insert([job(9, None, state="done")])
    await ledger.update_many([(job(9, None).id, {"outcome": "imported"})], events=[event(9)])
    assert await ledger.take_outbox(NOW, gone.instance, LEASE_S, limit=1)  # its event
    restarted = instance("new", started_at=NOW)
    assert await ledger.register_replica(restarted)

    # Their leases are live and their heartbeats fresh: only the proof of an end counts.
    assert await taken(ledger, restarted) == sorted(
        [gone.instance, reused.instance, stopped.instance]
    )
    assert await taken(ledger, restarted) == []  # and the live one keeps its job
    (event_9,) = await ledger.take_outbox(NOW, restarted.instance, LEASE_S, limit=1)
    assert event_9.event_id == event(9).event_id  # the gone one's event is free again
    owners = {j.owner for j in await ledger.query(states=["importing"], limit=None)}
    assert owners == {restarted.instance, alive.instance}


async def test_an_instance_silent_for_lease_s_has_ended(ledger: Ledger) -> None:
    silent = instance("silent", host="node-2", heartbeat_at=NOW - LEASE_S - 1)
    await setup(ledger, silent)
    # A job it claimed after its last heartbeat still has a live lease, yet it is taken.
    await ledger.insert([job(7, silent.instance, lease_expires_at=NOW + LEASE_S)])
    me = instance("me", host="node-3")
    assert await taken(ledger, me) == [silent.instance, silent.instance]


async def test_silence_is_no_proof_until_this_process_has_beaten_steadily(ledger: Ledger) -> None:
    """After an outage of the ledger every replica looks silent: without `by_age` neither
    an old heartbeat nor an expired lease frees a job; a stopped instance's still do."""
    silent = instance("silent", host="node-2", heartbeat_at=NOW - LEASE_S - 1)
    stopped = instance("stopped", host="node-2", stopped_at=NOW - 5)
    await setup(ledger, silent, stopped)
    await ledger.insert([job(7, "pod-b/lapsed", lease_expires_at=NOW - 1)])
    me = instance("me", host="node-3")
    got = await take_orphans(ledger, me, LEASE_S, NOW, host=HERE, by_age=False)
    assert [j.id for j in got] == [job(1, None).id]  # the stopped instance's job alone
    later = await take_orphans(ledger, me, LEASE_S, NOW, host=HERE)
    assert sorted(j.id for j in later) == [job(0, None).id, job(7, None).id]


async def test_mine_takes_back_what_an_interrupted_recovery_took(ledger: Ledger) -> None:
    me = instance("me")
    await setup(ledger, me)  # job 0 is mine, with a live lease
    assert await take_orphans(ledger, me, LEASE_S, NOW, host=HERE) == []
    (got,) = await take_orphans(ledger, me, LEASE_S, NOW, host=HERE, mine=True)
    assert (got.id, got.owner) == (job(0, None).id, me.instance)


async def test_the_sole_process_of_a_ledger_takes_every_job(ledger: Ledger) -> None:
    await setup(ledger, instance("alive", host="node-2"))
    await ledger.insert([job(8, "pod-a"), job(9, None)])  # an owner with no row, none
    me = instance("me")
    got = await take_orphans(ledger, me, LEASE_S, NOW, sole=True, host=HERE)
    assert len(got) == 3 and {j.owner for j in got} == {me.instance}


# -- the rule itself and this instance ------------------------------------------------------


def test_ended_says_why() -> None:
    dead_pid, dead_start = dead_process()
    assert ended(instance("a"), NOW, LEASE_S, HERE) is None
    assert ended(instance("a", stopped_at=NOW), NOW, LEASE_S, HERE) == "stopped"
    assert ended(instance("a", heartbeat_at=NOW - 31), NOW, LEASE_S, HERE) == (
        "no heartbeat for 31 s"
    )
    gone = instance("a", pid=dead_pid, pid_start=dead_start)
    assert ended(gone, NOW, LEASE_S, HERE) == f"its process (pid {dead_pid}) is gone"
    assert ended(gone, NOW, LEASE_S, Host("node-1", None, None)) is None  # cannot tell


def test_a_zombie_has_no_start_time() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert process_start(proc.pid) is not None
        proc.kill()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert process_start(proc.pid) is None
    finally:
        proc.wait()


async def test_a_second_live_instance_of_a_name_runs_and_is_warned_about(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    first = await register(ledger, "pod-a", LEASE_S)
    with caplog.at_level(logging.WARNING, logger="filedock.replicas"):
        second = await register(ledger, "pod-a", LEASE_S)
    assert first.instance != second.instance
    assert first.instance.startswith("pod-a/") and second.instance.startswith("pod-a/")
    (warning,) = [r for r in caplog.records if r.name == "filedock.replicas"]
    assert warning.other_instance == first.instance  # type: ignore[attr-defined]
    assert 0 <= warning.other_heartbeat_age_s < 5  # type: ignore[attr-defined]
    await ledger.replica_stopped(first.instance, first.started_at)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="filedock.replicas"):
        await register(ledger, "pod-a", LEASE_S)  # the live one is warned about, not the stopped
    assert [r.other_instance for r in caplog.records] == [second.instance]  # type: ignore[attr-defined]
