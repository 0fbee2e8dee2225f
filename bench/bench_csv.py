"""Rows per second of the `csv-sql` importer against a floor measured in the same run.

The floor writes the same rows with no validation: a plain `executemany` loop (SQLite)
or `COPY` (PostgreSQL), in one transaction. The target is at least half the floor's rate.
`--big` also imports a generated 1 GB CSV in a child process and reports its peak RSS
next to a small file's: memory must not grow with the file.

    python bench/bench_csv.py [--rows 200000] [--quick] [--big] [--postgres URL]

PostgreSQL is measured when `--postgres` or FILEDOCK_TEST_POSTGRES_URL names a server.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.importers.base import ImportJob
from service.importers.csv_sql import CsvSqlImporter
from service.settings import CsvSqlImporterSettings

HEADER = ["id", "name", "qty", "price", "paid", "day", "at"]
COLUMNS: dict[str, Any] = {
    "id": {"type": "int", "required": True},
    "name": {"type": "str", "required": True, "max_length": 80},
    "qty": {"type": "int"},
    "price": {"type": "decimal", "precision": 12, "scale": 2},
    "paid": {"type": "bool"},
    "day": {"type": "date"},
    "at": {"type": "datetime"},
}
SQLITE_DDL = (
    "CREATE TABLE {t} (id INTEGER NOT NULL, name TEXT NOT NULL, qty INTEGER, price TEXT,"
    " paid INTEGER, day TEXT, at TEXT, PRIMARY KEY (id))"
)
PG_DDL = (
    "CREATE TABLE {t} (id BIGINT NOT NULL, name TEXT NOT NULL, qty BIGINT,"
    " price NUMERIC(12, 2), paid BOOLEAN, day DATE, at TIMESTAMPTZ, PRIMARY KEY (id))"
)
CHUNK = 1000


def write_csv(path: Path, rows: int, *, start: int = 0) -> None:
    rng = random.Random(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for i in range(start, start + rows):
            w.writerow(
                [
                    i,
                    f"customer {rng.randrange(10**6)}",
                    rng.randrange(1, 100),
                    f"{rng.randrange(10**6) / 100:.2f}",
                    rng.choice(("yes", "no")),
                    f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
                    f"2024-05-{rng.randrange(1, 29):02d}T{rng.randrange(24):02d}:15:00+02:00",
                ]
            )


def settings(url: str, table: str) -> CsvSqlImporterSettings:
    return CsvSqlImporterSettings(
        kind="csv-sql",
        database_url=url,
        table=table,
        columns=COLUMNS,
        key=["id"],
        mode="create",
        chunk_rows=CHUNK,
    )


def job(path: Path, work: Path) -> ImportJob:
    return ImportJob(
        id=f"bench-{uuid.uuid4().hex}",
        route="bench",
        path=path,
        name=path.name.encode(),
        relative_path=path.name.encode(),
        out_dir=work / "out",
        temp_dir=work / "tmp",
        attempt=1,
        size=path.stat().st_size,
        sha256="0" * 64,
    )


def run_importer(url: str, table: str, path: Path, work: Path) -> tuple[float, int]:
    importer = CsvSqlImporter(settings(url, table), limiter=anyio.CapacityLimiter(1))
    started = time.perf_counter()
    result = anyio.run(importer, job(path, work))
    elapsed = time.perf_counter() - started
    assert result.outcome == "imported", result
    return elapsed, int(result.detail["rows_imported"])


def floor_sqlite(db: Path, table: str, path: Path) -> tuple[float, int]:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(SQLITE_DDL.format(t=table))
    started = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    sql = f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?)"
    n = 0
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader)
        chunk: list[list[str]] = []
        for row in reader:
            chunk.append(row)
            if len(chunk) >= CHUNK:
                conn.executemany(sql, chunk)
                n += len(chunk)
                chunk = []
        conn.executemany(sql, chunk)
        n += len(chunk)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed, n


def floor_postgres(url: str, table: str, path: Path) -> tuple[float, int]:
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute(PG_DDL.format(t=table).encode())
        conn.commit()
        started = time.perf_counter()
        n = 0
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            next(reader)
            sql = f"COPY {table} FROM STDIN".encode()
            with conn.cursor().copy(sql) as copy:
                for row in reader:
                    copy.write_row(row)
                    n += 1
        conn.commit()
        return time.perf_counter() - started, n


def drop_postgres(url: str, table: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}".encode())
        conn.execute(b"DELETE FROM filedock_imports WHERE job_id LIKE 'bench-%'")
        conn.execute(b"DELETE FROM filedock_import_errors WHERE job_id LIKE 'bench-%'")


def best_of(runs: int, floor: Any, ours: Any) -> tuple[tuple[float, int], tuple[float, int]]:
    """The best of each, measured in turns: a busy machine slows both alike."""
    floors, ourses = [], []
    for i in range(runs):
        floors.append(floor(i))
        ourses.append(ours(i))
    return min(floors), min(ourses)


def bench_rates(rows: int, runs: int, pg_url: str | None, work: Path) -> list[list[str]]:
    path = work / "bench.csv"
    write_csv(path, rows)
    table_rows = []

    def sqlite_floor(i: int) -> tuple[float, int]:
        return floor_sqlite(work / f"floor{i}.sqlite3", "orders", path)

    def sqlite_ours(i: int) -> tuple[float, int]:
        return run_importer(f"sqlite:///{work / f'ours{i}.sqlite3'}", "orders", path, work)

    targets = [("SQLite", sqlite_floor, sqlite_ours)]
    if pg_url is not None:
        url = pg_url
        suffix = uuid.uuid4().hex[:8]

        def pg_floor(i: int) -> tuple[float, int]:
            table = f"bench_floor_{suffix}_{i}"
            try:
                return floor_postgres(url, table, path)
            finally:
                drop_postgres(url, table)

        def pg_ours(i: int) -> tuple[float, int]:
            table = f"bench_ours_{suffix}_{i}"
            try:
                return run_importer(url, table, path, work)
            finally:
                drop_postgres(url, table)

        targets.append(("PostgreSQL", pg_floor, pg_ours))
    for name, floor, ours in targets:
        (floor_s, floor_n), (ours_s, ours_n) = best_of(runs, floor, ours)
        assert floor_n == ours_n == rows, (floor_n, ours_n, rows)
        floor_rate, ours_rate = rows / floor_s, rows / ours_s
        table_rows.append(
            [
                name,
                f"{rows:,}",
                f"{floor_rate:,.0f}",
                f"{ours_rate:,.0f}",
                f"{ours_rate / floor_rate:.2f}",
                "ok" if ours_rate >= floor_rate / 2 else "BELOW TARGET",
            ]
        )
    return table_rows


def child_import(url: str, path: str, work: str) -> None:
    """In a child process: import one file; print rows, seconds, and this process's peak RSS."""
    elapsed, n = run_importer(url, "orders", Path(path), Path(work))
    print(n, f"{elapsed:.3f}", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss_of_import(url: str, path: Path, work: Path) -> tuple[int, float, int]:
    """Rows, seconds and peak RSS (KiB) of an import run in a fresh child process."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", url, str(path), str(work)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]), float(out[1]), int(out[2])


def bench_memory(work: Path, big_bytes: int, pg_url: str | None) -> list[list[str]]:
    small, big = work / "small.csv", work / "big.csv"
    write_csv(small, 20_000)
    per_row = small.stat().st_size / 20_000
    write_csv(big, int(big_bytes / per_row))
    rows = []
    targets = [("SQLite", None)] + ([("PostgreSQL", pg_url)] if pg_url is not None else [])
    for name, url in targets:
        for label, path in (("small", small), ("big", big)):
            if url is not None:
                drop_postgres(url, "orders")
            target = url or f"sqlite:///{work / f'mem-{label}.sqlite3'}"
            n, seconds, peak = peak_rss_of_import(target, path, work)
            rows.append(
                [
                    name,
                    f"{path.stat().st_size / 1e6:,.1f} MB",
                    f"{n:,}",
                    f"{n / seconds:,.0f}",
                    f"{peak / 1024:,.0f} MiB",
                ]
            )
        if url is not None:
            drop_postgres(url, "orders")
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child_import(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="20k rows, one run each")
    parser.add_argument("--runs", type=int, default=3, help="best of N runs (default 3)")
    parser.add_argument("--big", action="store_true", help="also the 1 GB peak-RSS check")
    parser.add_argument("--big-bytes", type=int, default=10**9)
    parser.add_argument("--postgres", default=os.environ.get("FILEDOCK_TEST_POSTGRES_URL"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder")
    args = parser.parse_args()
    rows, runs = (20_000, 1) if args.quick else (args.rows, args.runs)
    with tempfile.TemporaryDirectory(dir=args.work, prefix="bench-csv-") as tmp:
        work = Path(tmp)
        print(f"## csv-sql import rate ({rows:,} rows, best of {runs}, chunk_rows={CHUNK})\n")
        header = ["database", "rows", "floor rows/s", "csv-sql rows/s", "ratio", "target ≥ 0.5"]
        print(markdown(header, bench_rates(rows, runs, args.postgres, work)))
        if args.big:
            print(f"\n## peak RSS of one import (child process, {args.big_bytes / 1e9:g} GB)\n")
            header = ["database", "file", "rows", "rows/s", "peak RSS"]
            print(markdown(header, bench_memory(work, args.big_bytes, args.postgres)))


if __name__ == "__main__":
    main()
