"""Replica identity: each start of the service is an instance of its own, and which
other instances have ended, so that their jobs may be taken at once.

The configured `replica_id` is a name (the pod name, by default the hostname), and
several processes may carry the same one: two services on one host with the default
settings, or a pod restarted in place whose earlier process has not yet been seen to
die. So the owner of a job's lease is the instance id, `<replica_id>/<8 hex>`, drawn
at each start and registered in the ledger's `replicas` table with the facts another
process needs to tell whether it still runs (host, boot id, pid namespace, pid and
the process's start time).

An instance has ended, and its jobs are taken without waiting for their leases, when:
- it says so: it stopped cleanly (`stopped_at`);
- its heartbeat is older than `lease_s` (the heartbeat renews its leases too, so those
  have run out as well), as judged by a process that has itself written its heartbeat
  all along for `lease_s` (the ledger being away silences every replica alike);
- it ran on this host (same hostname, boot id and pid namespace) and its process is
  gone: no process has its pid, or the one that has it started at another time (a
  pid used again, as by a container's process restarted in the same namespace);
- this process holds the SQLite ledger's lock, which no other process can hold while
  it runs (every job is then free to take).
Its leases on the outbox's events are released with it. Otherwise its jobs and events
wait for their leases to expire (`Recovery.take_over`). A live instance is never taken
from, whatever its name: a name proves nothing.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass

import anyio

from service import __version__
from service.ledger import JobRecord, Ledger
from service.ledger.base import ReplicaRecord

__all__ = [
    "Host",
    "ended",
    "mark_stopped",
    "process_start",
    "register",
    "take_orphans",
    "this_instance",
]

log = logging.getLogger("filedock.replicas")
_STOPPED_WRITE_S = 3.0


@dataclass(frozen=True)
class Host:
    """Where a process runs, as far as telling its pids apart goes: `boot_id` changes at
    each boot (pids start over), `pid_ns` names the pid namespace (a container has its
    own, in which the same pid is another process)."""

    name: str
    boot_id: str | None
    pid_ns: str | None

    @classmethod
    def here(cls) -> Host:
        return cls(socket.gethostname(), _boot_id(), _pid_ns())

    def knows(self, r: ReplicaRecord) -> bool:
        """Whether `r`'s pid means the same process here as where it ran."""
        return (
            r.host == self.name
            and self.boot_id is not None
            and r.boot_id == self.boot_id
            and self.pid_ns is not None
            and r.pid_ns == self.pid_ns
        )


def this_instance(
    name: str, *, now: float | None = None, host: Host | None = None
) -> ReplicaRecord:
    """This process's row, with a new instance id (not yet registered)."""
    now = time.time() if now is None else now
    host = host or Host.here()
    pid = os.getpid()
    return ReplicaRecord(
        instance=f"{name}/{secrets.token_hex(4)}",
        name=name,
        host=host.name,
        pid=pid,
        started_at=now,
        heartbeat_at=now,
        version=__version__,
        boot_id=host.boot_id,
        pid_ns=host.pid_ns,
        pid_start=process_start(pid),
    )


def ended(
    r: ReplicaRecord, now: float, lease_s: float, host: Host, *, by_age: bool = True
) -> str | None:
    """Why the instance `r` is known to have ended, or None while it may run. `by_age`
    False: a silent heartbeat proves nothing (see `take_orphans`)."""
    if r.stopped_at is not None:
        return "stopped"
    age = now - r.heartbeat_at
    if by_age and age > lease_s:
        return f"no heartbeat for {age:.0f} s"
    if host.knows(r):
        start = process_start(r.pid)
        if start is None or (r.pid_start is not None and start != r.pid_start):
            return f"its process (pid {r.pid}) is gone"
    return None


def process_start(pid: int) -> int | None:
    """When the process `pid` started (clock ticks since boot), or None when there is
    none, or only its zombie (it has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # the name in () may hold anything
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


async def register(ledger: Ledger, name: str, lease_s: float) -> ReplicaRecord:
    """Register this process as a new instance of `name`; warn when another live instance
    has the same name (both run, each with its own jobs)."""
    host = Host.here()
    for _ in range(8):  # another id, should its 32 random bits be taken already
        me = this_instance(name, host=host)
        if await ledger.register_replica(me):
            break
    else:
        raise RuntimeError("could not register this instance: every id drawn was taken")
    for other in await ledger.replicas():
        if other.name != name or other.instance == me.instance:
            continue
        if ended(other, me.started_at, lease_s, host) is None:
            log.warning(
                "another live instance has this replica_id: both run, each holding its own"
                " jobs; give each process its own replica_id to tell them apart",
                extra={
                    "replica_id": name,
                    "instance": me.instance,
                    "other_instance": other.instance,
                    "other_host": other.host,
                    "other_pid": other.pid,
                    "other_heartbeat_age_s": round(me.started_at - other.heartbeat_at, 1),
                },
            )
    return me


async def mark_stopped(ledger: Ledger, replica: ReplicaRecord) -> None:
    """This instance has stopped: nothing of it runs any more, and its jobs are free to
    take at once. A ledger that cannot be written now (or within a few seconds: the
    stop must not wait out a pool's timeout) lets its heartbeat age instead."""
    try:
        with anyio.fail_after(_STOPPED_WRITE_S):
            await ledger.replica_stopped(replica.instance, time.time())
    except Exception as e:
        log.warning("could not mark this instance stopped", extra={"error": repr(e)[:300]})


async def take_orphans(
    ledger: Ledger,
    me: ReplicaRecord,
    lease_s: float,
    now: float,
    *,
    sole: bool = False,
    host: Host | None = None,
    by_age: bool = True,
    mine: bool = False,
) -> list[JobRecord]:
    """The jobs `me` may take now: those whose lease has expired, and every job of an
    instance known to have ended, whose events' leases are released as well. `sole`:
    this process holds the ledger's single-replica lock, so no other process runs and
    every job and event is free to take. `mine`: `me`'s own unfinished jobs too (at
    start, before any is held: those an interrupted recovery took).

    `by_age` False: neither an old heartbeat nor an expired lease frees a job. An
    instance that could not reach the ledger could not renew them either; when the
    ledger was away for every replica, the others are as silent as this one and as
    alive. So this process trusts their silence only once it has itself written
    every heartbeat for `lease_s` (`Heartbeat.steady`): by then a live instance has
    written one too.
    """
    gone: list[str] = []
    if not sole:
        host = host or Host.here()
        for r in await ledger.replicas():
            mortal = r.instance != me.instance
            why = ended(r, now, lease_s, host, by_age=by_age) if mortal else None
            if why is None:
                continue
            gone.append(r.instance)
            if r.jobs:
                log.info(
                    "taking over the jobs of an instance that has ended",
                    extra={"instance": r.instance, "jobs": r.jobs, "reason": why},
                )
    if gone or sole:
        await ledger.release_outbox(me.instance, gone=gone, everyone=sole)
    return await ledger.take_orphans(
        now, me.instance, lease_s, gone=gone, everyone=sole, leases=by_age, mine=mine
    )


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
