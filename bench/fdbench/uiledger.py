"""The ledger bench/bench_ui.py measures the operator page against: a million jobs
written in bulk, on SQLite or PostgreSQL; and what the page's indexes cost the
pipeline's own ledger writes."""

from __future__ import annotations

import json
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.ledger import ledger_for_url
from service.ledger.base import COLUMNS

__all__ = [
    "PG_SCHEMA",
    "ROUTES",
    "SPAN_S",
    "drop_schema",
    "fill_postgres",
    "fill_sqlite",
    "fresh_schema",
    "write_cost",
]

ROUTES = [
    ("orders", 50),
    ("invoices", 20),
    ("stock", 15),
    ("returns", 8),
    ("payroll", 4),
    ("audit", 2),
    ("legacy", 0.9),
    ("rare", 0.1),
]
FAILURES = [
    ("rejected", "rejected", "importer said: line 3 has no date"),
    ("exhausted", "exhausted", "5 attempts used up; last: exit code 1"),
    ("set_aside", "too_large", "12 GiB is over max_size_bytes"),
]
SPAN_S = 30 * 86400
PG_SCHEMA = "filedock_bench_ui"


def job_rows(n: int, now: float, root: Path) -> Iterator[tuple[Any, ...]]:
    """`n` jobs in the ledger's column order, oldest first."""
    rnd = random.Random(8)
    names, weights = [r for r, _ in ROUTES], [w for _, w in ROUTES]
    ok = json.dumps(
        [
            {
                "n": 1,
                "started_at": "2026-01-01T00:00:00.000Z",
                "result": "ok",
                "ended_at": "2026-01-01T00:00:00.012Z",
                "elapsed_s": 0.012,
            }
        ]
    )
    tail = "--- stdout ---\nline 1 ok\nline 2 ok\n--- stderr ---\nline 3: no date\n" * 4
    bad = json.dumps(
        [
            {
                "n": 1,
                "started_at": "2026-01-01T00:00:00.000Z",
                "result": "rejected",
                "ended_at": "2026-01-01T00:00:00.012Z",
                "log_tail": tail,
            }
        ]
    )
    for i in range(n):
        t = now - SPAN_S + SPAN_S * i / n
        stamp = datetime.fromtimestamp(t, UTC)
        job_id = f"{stamp:%Y%m%dT%H%M%S}{stamp.microsecond // 1000:03d}Z-{i:08x}"
        route = rnd.choices(names, weights)[0]
        name = f"{route}_{i:07d}.csv".encode()
        x = rnd.random()
        state, outcome, error_class, error, history = "done", "imported", None, None, ok
        archive = str(root / "archive" / job_id[:4] / job_id[4:6] / job_id[6:8] / job_id)
        failed = None
        if i >= n - 300 and x < 0.5:
            state, outcome, error_class, error = "waiting", None, "import_error", "exit code 1"
            archive = None
        elif x < 0.02:
            outcome, error_class, error = FAILURES[int(x * 150) % 3]
            state, history, archive, failed = "failed", bad, None, str(root / "failed" / job_id)
        sha = f"{rnd.getrandbits(256):064x}"
        yield (
            job_id,
            route,
            name,
            b"in/" + name,
            state,
            outcome,
            1,
            1024 + i % 4096,
            0,
            sha,
            None,
            error_class,
            error,
            t - 1,
            t,
            t + 2,
            archive,
            failed,
            None,
            None,
            None,
            history,
        )


def side_rows(n: int, now: float) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Sink rows (every 20th job, two sinks) and outbox events (every 10th job)."""
    deliveries, events = [], []
    for i in range(0, n, 10):
        t = now - SPAN_S + SPAN_S * i / n
        stamp = datetime.fromtimestamp(t, UTC)
        job_id = f"{stamp:%Y%m%dT%H%M%S}{stamp.microsecond // 1000:03d}Z-{i:08x}"
        late = i >= n - 400
        if i % 20 == 0:
            for sink in ("lake", "erp"):
                state = "waiting" if late and sink == "erp" else "delivered"
                deliveries.append((job_id, sink, "orders", state, 1, None, None, None, "[]", t, t))
        payload = json.dumps({"id": f"{job_id}.done", "type": "filedock.job.done"})
        events.append(
            (
                f"{job_id}.done",
                "hooks",
                "filedock.job.done",
                "orders",
                job_id,
                payload,
                "pending" if late else "sent",
                0,
                t,
                None,
                t,
                None if late else t,
                None,
                None,
            )
        )
    return deliveries, events


async def fill_sqlite(url: str, n: int, now: float, root: Path) -> None:
    ledger = ledger_for_url(url)
    await ledger.open()  # the schema
    await ledger.close()
    path = url.removeprefix("sqlite:///")
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA synchronous=OFF")
    indexes = c.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs' AND sql NOT NULL"
    ).fetchall()
    for (index,) in indexes:
        c.execute(f"DROP INDEX {index}")
    c.execute("BEGIN")
    marks = ", ".join("?" * len(COLUMNS))
    c.executemany(
        f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({marks})", job_rows(n, now, root)
    )
    deliveries, events = side_rows(n, now)
    c.executemany(f"INSERT INTO deliveries VALUES ({', '.join('?' * 11)})", deliveries)
    c.executemany(f"INSERT INTO outbox VALUES ({', '.join('?' * 14)})", events)
    c.execute("COMMIT")
    c.close()
    ledger = ledger_for_url(url)
    await ledger.open()  # builds the indexes again (CREATE INDEX IF NOT EXISTS at every open)
    await ledger.close()


async def fill_postgres(url: str, n: int, now: float, root: Path) -> None:
    import psycopg

    ledger = ledger_for_url(url)
    await ledger.open()
    await ledger.close()
    with psycopg.connect(url, autocommit=True) as c:
        defs = [
            r[0]
            for r in c.execute(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema()"
                " AND tablename = 'jobs' AND indexname != 'jobs_pkey'"
            )
        ]
        for (drop,) in c.execute(
            "SELECT format('DROP INDEX %I', indexname) FROM pg_indexes"
            " WHERE schemaname = current_schema() AND tablename = 'jobs'"
            " AND indexname != 'jobs_pkey'"
        ).fetchall():
            c.execute(drop)
        with c.cursor() as cur:
            with cur.copy(f"COPY jobs ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in job_rows(n, now, root):
                    copy.write_row(row)
            deliveries, events = side_rows(n, now)
            with cur.copy("COPY deliveries FROM STDIN") as copy:
                for row in deliveries:
                    copy.write_row(row)
            with cur.copy("COPY outbox FROM STDIN") as copy:
                for row in events:
                    copy.write_row(row)
        for statement in defs:
            c.execute(statement)
        c.execute("VACUUM ANALYZE jobs")
        c.execute("VACUUM ANALYZE deliveries")
        c.execute("VACUUM ANALYZE outbox")


PAGE_INDEXES = ("jobs_state_id", "jobs_route_id", "jobs_failed")


async def write_cost(backend: str, pg: str | None, jobs: int, rounds: int) -> dict[str, Any]:
    """What the page's indexes cost the pipeline's writes: `jobs` jobs inserted 256 at a
    time and moved through three states in batches (as claims and transitions write
    them), with and without the three indexes, interleaved round by round."""
    from service.ledger import JobRecord
    from service.storage.names import new_job_id

    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(rounds):
        for variant in ("without", "with"):
            with tempfile.TemporaryDirectory(prefix="fd-bench-ui-w-") as tmp:
                url = f"sqlite:///{Path(tmp) / 'ledger.sqlite3'}"
                if backend == "postgres":
                    url = fresh_schema(pg or "", f"{PG_SCHEMA}_w")
                ledger = ledger_for_url(url)
                await ledger.open()
                if variant == "without":  # after the open, which makes them
                    _drop_indexes(url)
                t = time.perf_counter()
                for _ in range(0, jobs, 256):
                    now = time.time()
                    batch = [
                        JobRecord(
                            new_job_id(now),
                            f"route{k % 4}",
                            b"f.csv",
                            b"f.csv",
                            detected_at=now,
                            created_at=now,
                            updated_at=now,
                        )
                        for k in range(256)
                    ]
                    await ledger.insert(batch)
                    for state in ("importing", "archiving", "done"):
                        await ledger.update_many(
                            [(r.id, {"state": state, "updated_at": now}) for r in batch]
                        )
                times[variant].append(time.perf_counter() - t)
                await ledger.close()
    if backend == "postgres":
        drop_schema(pg or "", f"{PG_SCHEMA}_w")
    per_job = {v: round(statistics.median(ts) / jobs * 1e6, 1) for v, ts in times.items()}
    return {
        "jobs": jobs,
        "rounds": rounds,
        "us_per_job": per_job,
        "ratio": round(per_job["with"] / per_job["without"], 2),
    }


def fresh_schema(pg: str, schema: str) -> str:
    import psycopg

    with psycopg.connect(pg, autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        c.execute(f"CREATE SCHEMA {schema}")
    return f"{pg}{'&' if '?' in pg else '?'}options=-csearch_path%3D{schema}"


def drop_schema(pg: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(pg, autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _drop_indexes(url: str) -> None:
    statements = [f"DROP INDEX IF EXISTS {index}" for index in PAGE_INDEXES]
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as c:
            for statement in statements:
                c.execute(statement)
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        for statement in statements:
            c.execute(statement)
