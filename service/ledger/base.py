"""The ledger's contract: the job record and the operations every backend provides.

The filesystem is the truth and the ledger the index: a row says where a job's
file is and what happened to it. All SQL lives in the backend modules.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from service.ledger.reach import Reachability
from service.ledger.records import (
    DELIVERY_COLUMNS,
    OUTBOX_COLUMNS,
    REPLICA_COLUMNS,
    WINDOW_COLUMNS,
    Arrival,
    DeliveryRecord,
    DeliveryState,
    Judgement,
    OutboxRecord,
    ReplicaRecord,
    WindowRecord,
)
from service.storage.names import display_name, name_b64, rfc3339

if TYPE_CHECKING:
    from service.ledger.pages import FailureGroup, JobDetail, JobsPage, JobsQuery, LedgerOverview

__all__ = [
    "COLUMNS",
    "DELIVERY_COLUMNS",
    "FINAL_STATES",
    "OUTBOX_COLUMNS",
    "REPLICA_COLUMNS",
    "STATES",
    "WINDOW_COLUMNS",
    "Arrival",
    "DeliveryRecord",
    "DeliveryState",
    "JobRecord",
    "Judgement",
    "Ledger",
    "OutboxRecord",
    "Outcome",
    "ReplicaRecord",
    "State",
    "WindowRecord",
]

State = Literal["claimed", "importing", "waiting", "delivering", "archiving", "done", "failed"]
Outcome = Literal["imported", "partial", "duplicate", "rejected", "exhausted", "set_aside"]
STATES: Final[tuple[State, ...]] = (
    "claimed",
    "importing",
    "waiting",
    "delivering",
    "archiving",
    "done",
    "failed",
)
FINAL_STATES: Final = frozenset({"done", "failed"})
UNFINISHED: Final = ("claimed", "importing", "waiting", "delivering", "archiving")
SCHEMA_VERSION: Final = (
    6  # 2: deliveries; 3: outbox; 4: arrival windows; 5: replicas; 6: page indexes
)


@dataclass
class JobRecord:
    """One job: a file claimed out of `transfer/` and everything that happened to it.

    `name` and `relative_path` are the exact bytes of the upstream's name.
    Times are Unix seconds. `history` is the list of attempts, each a dict with
    `n`, `started_at`, `ended_at`, `result` and an optional `detail`.
    """

    id: str
    route: str
    name: bytes
    relative_path: bytes
    state: State = "claimed"
    outcome: Outcome | None = None
    attempts: int = 0
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    next_attempt_at: float | None = None
    error_class: str | None = None
    error: str | None = None
    detected_at: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    archive_path: str | None = None
    failed_path: str | None = None
    duplicate_of: str | None = None
    owner: str | None = None
    lease_expires_at: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The contract's JSON form (docs/contracts.md): names escaped, times RFC 3339 UTC."""
        return {
            "id": self.id,
            "route": self.route,
            "name": display_name(self.name),
            "name_b64": name_b64(self.name),
            "relative_path": display_name(self.relative_path),
            "state": self.state,
            "outcome": self.outcome,
            "attempts": self.attempts,
            "size": self.size,
            "sha256": self.sha256,
            "error_class": self.error_class,
            "error": self.error,
            "next_attempt_at": rfc3339(self.next_attempt_at),
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "archive_path": self.archive_path,
            "failed_path": self.failed_path,
            "duplicate_of": self.duplicate_of,
            "owner": self.owner,
            "history": self.history,
        }

    def import_facts(self) -> dict[str, Any]:
        """What the importer returned for the attempt that succeeded, as the ledger keeps
        it (`detail` of that attempt; none when it was too large to keep)."""
        for attempt in reversed(self.history):
            if attempt.get("result") == "ok":
                return dict(attempt.get("detail") or {})
        return {}


COLUMNS: Final = tuple(f.name for f in dataclasses.fields(JobRecord))
UPDATABLE: Final = frozenset(COLUMNS) - {"id"}


def encode_history(history: list[dict[str, Any]]) -> str:
    return json.dumps(history, separators=(",", ":"))


def decode_history(raw: str | None) -> list[dict[str, Any]]:
    return list(json.loads(raw)) if raw else []


def check_fields(fields: Mapping[str, Any]) -> None:
    if not fields:
        raise ValueError("no ledger columns to update")
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise ValueError(f"not ledger columns: {sorted(unknown)}")


class Ledger(Protocol):
    """The operations the pipeline, recovery and the CLI need; one backend per URL scheme.

    A write has committed when its coroutine returns, and survives a crash of the
    process. `insert` is also durable against power loss (a claim's row must be on
    disk before its rename); a backend may let other writes reach the disk later,
    since each follows a durable filesystem step that recovery reconciles from.
    """

    url: str
    reach: Reachability  # whether it answers, as its last operations found

    async def open(self) -> None:
        """Connect and create or migrate the schema; `LedgerUnavailable` when it cannot
        be reached now (trying again may succeed)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise when the ledger cannot answer (for `/readyz`)."""

    async def insert(self, records: Sequence[JobRecord]) -> None: ...

    async def update(
        self,
        job_id: str,
        fields: Mapping[str, Any],
        *,
        expect_state: str | None = None,
        events: Sequence[OutboxRecord] = (),
    ) -> bool:
        """Set columns of one job; with `expect_state`, only if the job is in that state.
        `events` go to the outbox in the same transaction (when a row changed; an event
        already there, by id and channel, is kept as it is).

        Returns whether a row was changed.
        """

    async def update_many(
        self,
        changes: Sequence[tuple[str, Mapping[str, Any]]],
        events: Sequence[OutboxRecord] = (),
    ) -> None:
        """Set columns of several jobs in one transaction (batched transitions), with
        their `events`."""

    async def delete(self, job_ids: Sequence[str]) -> None: ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def query(
        self,
        *,
        states: Sequence[str] | None = None,
        route: str | None = None,
        limit: int | None = 100,
        oldest_first: bool = False,
    ) -> list[JobRecord]: ...

    async def counts(self) -> dict[str, int]:
        """Jobs per state."""

    async def take_due(self, now: float, limit: int, owner: str, lease_s: float) -> list[JobRecord]:
        """Jobs whose retry is due, now owned by `owner`: a waiting one is `claimed`
        again (its import runs); a `delivering` one stays so, with no next attempt (its
        sinks are tried again).

        Several replicas may call this at once: each due job goes to exactly one.
        """

    async def take_orphans(
        self,
        now: float,
        owner: str,
        lease_s: float,
        *,
        gone: Sequence[str] = (),
        everyone: bool = False,
        leases: bool = True,
        mine: bool = False,
    ) -> list[JobRecord]:
        """Unfinished jobs of other owners whose lease has expired (or that have no
        owner), and every unfinished job of the instances in `gone` (known to have
        ended), now owned by `owner`; with `everyone` (no other process can be
        running), every unfinished job of another owner. `leases` False: an expired
        lease frees no job (this process cannot tell yet whether its owner could renew
        it). `owner`'s own are taken only with `mine` (at start, before this process
        holds any: those an interrupted recovery took).

        Several replicas may call this at once: each job goes to exactly one.
        """

    async def renew_leases(self, owner: str, until: float) -> None:
        """Extend the lease of every unfinished job `owner` holds."""

    async def register_replica(self, replica: ReplicaRecord) -> bool:
        """Write the row of a starting instance; False (nothing written) when its
        `instance` is taken already."""

    async def replica_heartbeat(self, replica: ReplicaRecord) -> None:
        """Write the instance's row with its `heartbeat_at` (and again whole, should it
        have been pruned); `stopped_at` is cleared: it runs."""

    async def replica_stopped(self, instance: str, at: float) -> None:
        """The instance has stopped cleanly: nothing of it runs any more."""

    async def replicas(self) -> list[ReplicaRecord]:
        """Every instance's row, the newest start first, with the unfinished jobs each
        holds (`jobs`)."""

    async def prune_replicas(self, before: float, limit: int) -> int:
        """Delete rows of instances whose last heartbeat was before `before`; returns how
        many."""

    async def find_done_by_sha256(self, route: str, sha256: str, since: float) -> str | None:
        """The id of a done job of `route` with this content, created after `since`."""

    async def save_deliveries(
        self,
        deliveries: Sequence[DeliveryRecord],
        jobs: Sequence[tuple[str, Mapping[str, Any]]] = (),
        events: Sequence[OutboxRecord] = (),
    ) -> None:
        """Write sinks' states (insert or replace) and set columns of jobs, with their
        `events`, in one transaction: a job and its sinks never disagree after a crash."""

    async def deliveries(self, job_id: str) -> list[DeliveryRecord]:
        """A job's sinks, by name."""

    async def delivery_backlog(self) -> list[tuple[str, str, int, float | None]]:
        """Per route and sink: deliveries not yet delivered nor failed, and when the
        oldest of them began (`created_at`)."""

    async def take_outbox(
        self,
        now: float,
        owner: str,
        lease_s: float,
        *,
        limit: int,
        channel: str | None = None,
        due_only: bool = True,
    ) -> list[OutboxRecord]:
        """Pending events whose next attempt is due (`due_only`; otherwise every pending
        one, for a digest), oldest first, now held by `owner` for `lease_s`; those
        another live replica holds are skipped."""

    async def release_outbox(
        self, owner: str, *, gone: Sequence[str] = (), everyone: bool = False
    ) -> int:
        """Release the leases on pending events held by the instances in `gone` (known to
        have ended; with `everyone`, by any owner but `owner`): any dispatcher may take
        them at once. Returns how many."""

    async def outbox_done(self, records: Sequence[OutboxRecord]) -> None:
        """Write the state, attempts, next attempt, error and `sent_at` of events the
        dispatcher tried, releasing them."""

    async def outbox_backlog(self) -> list[tuple[str, int, float | None]]:
        """Per channel: pending events and when the oldest was written."""

    async def outbox_query(self, *, pending_only: bool, limit: int) -> list[OutboxRecord]:
        """Events, newest first (for `filedock events`)."""

    async def prune_outbox(self, before: float, limit: int) -> int:
        """Delete sent and failed events written before `before`; returns how many."""

    async def arrivals(self, route: str, after: float, until: float) -> list[Arrival]:
        """The route's jobs detected after `after` and by `until`, oldest first."""

    async def record_window(
        self, window: WindowRecord, events: Sequence[OutboxRecord] = ()
    ) -> bool:
        """Write a judged window and its `events`, unless that window (route,
        expectation, deadline) is already written: then nothing, and False."""

    async def windows(self, route: str, expectation: str, limit: int) -> list[WindowRecord]:
        """An expectation's windows, the latest deadline first."""

    async def prune_windows(self, before: float, limit: int) -> int:
        """Delete windows judged before `before`, except each expectation's latest."""

    async def older_than(self, states: Sequence[str], before: float, limit: int) -> list[JobRecord]:
        """Final jobs last updated before `before` (for the reaper), oldest first."""

    # -- the operator page (service/ledger/pages.py) -----------------------------------

    async def page_overview(self, since: float) -> LedgerOverview:
        """Jobs per state, each route's jobs created after `since`, the open deliveries
        and the pending events, read together."""

    async def page_jobs(self, query: JobsQuery) -> JobsPage:
        """A page of jobs, newest first, after `query.before` (keyset)."""

    async def page_job(self, job_id: str) -> JobDetail:
        """A job (None: no such job) and its sinks, read together."""

    async def page_failures(self, per_group: int) -> list[FailureGroup]:
        """Failed jobs by route and error class, the largest group first, each with
        its newest `per_group` jobs."""
