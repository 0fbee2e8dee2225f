"""Scale-out: 1, 2 and 3 replicas on one tree and one PostgreSQL ledger, in one run.

    .venv/bin/python bench/bench_scaleout.py                 # 5,000 files, 2 rounds
    .venv/bin/python bench/bench_scaleout.py --quick         # 600 files, 1 round
    FILEDOCK_BENCH_POSTGRES=postgresql://postgres@127.0.0.1:5432/postgres ...

Each replica is a `filedock run` started as a user would on one host: default
settings (the replica id is the host name; each process registers an instance of its
own), one shared root, one PostgreSQL database made fresh for the run and dropped at
the end. The route's importer is I/O-bound, as a call to a remote system is: each
import waits 50 ms (`bench_importers:wait_50ms`). The files (1 KiB each) are staged
beside `transfer/` and renamed into it once every replica is ready; the clock runs
from the first rename to the last job's `done` in the ledger.

Rounds interleave the replica counts (1, 2, 3, then 3, 2, 1, ...). After each run
every file must be archived exactly once: one `done` row per file and one archive
folder per row. Prints the table and writes bench/results/scaleout-<stamp>.json;
docs/benchmarks.md, "Scale-out", holds the latest figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from fdbench.common import (  # noqa: E402
    BenchError,
    cpu_seconds,
    file_names,
    make_files,
    wait_until,
)
from fdbench.contenders import Filedock  # noqa: E402


def ledger_db(admin_url: str) -> tuple[str, str]:
    name = f"filedock_scaleout_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name, admin_url.rsplit("/", 1)[0] + "/" + name


def drop_db(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def counts(url: str) -> dict[str, int]:
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
    except psycopg.Error:
        return {}
    return {state: int(n) for state, n in rows}


def one_run(work: Path, admin_url: str, replicas: int, n: int) -> dict[str, Any]:
    db, url = ledger_db(admin_url)
    services: list[Filedock] = []
    try:
        root = work / "tree"
        names = file_names(n, suffix=".csv")
        make_files(root / "staging", names, 1024, hashes=False)
        os.sync()
        for k in range(replicas):
            fd = Filedock(
                work / f"replica-{k}",
                service_dir=REPO,
                python=sys.executable,
                extra={
                    "root": str(root / "data"),
                    "ledger_url": url,
                    "routes": [
                        {
                            "name": "bench",
                            "match": "**",
                            "importer": {"kind": "python", "callable": "bench_importers:wait_50ms"},
                        }
                    ],
                },
            )
            fd.doc.pop("max_concurrency")  # the defaults, as a user gets them
            fd.transfer = root / "data" / "transfer"
            fd.work.mkdir(parents=True)
            fd.start()
            services.append(fd)
        for fd in services:
            fd.wait_ready()
        transfer = root / "data" / "transfer"
        t0 = time.time()
        for name in names:
            os.rename(root / "staging" / name, transfer / name)
        cpu0 = sum(cpu_seconds(fd.pid) for fd in services)
        wait_until(
            lambda: counts(url).get("done", 0) >= n, timeout=1800, interval=0.1, what="all done"
        )
        cpu = sum(cpu_seconds(fd.pid) for fd in services) - cpu0
        with psycopg.connect(url) as conn:
            last = conn.execute("SELECT max(updated_at) FROM jobs").fetchone()
            per_name = conn.execute(
                "SELECT count(*), count(DISTINCT relative_path) FROM jobs WHERE state = 'done'"
            ).fetchone()
            by_instance = conn.execute(
                "SELECT owner, count(*) FROM jobs GROUP BY owner ORDER BY owner"
            ).fetchall()
        assert last is not None and per_name is not None
        archived = sum(1 for _ in (root / "data" / "archive").glob("*/*/*/*"))
        if per_name != (n, n) or archived != n:
            raise BenchError(f"{replicas} replicas: {per_name} done rows, {archived} archived")
        seconds = float(last[0]) - t0
        return {
            "replicas": replicas,
            "files": n,
            "seconds": seconds,
            "files_per_s": n / seconds,
            "cpu_s": cpu,
            "jobs_by_instance": [int(c) for _, c in by_instance],
        }
    finally:
        for fd in services:
            fd.stop()
        drop_db(admin_url, db)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="600 files, 1 round")
    ap.add_argument("--work", type=Path, default=BENCH / "work-scaleout")
    args = ap.parse_args(argv)
    admin = os.environ.get(
        "FILEDOCK_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    n, rounds = (600, 1) if args.quick else (args.files, args.rounds)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: [], 3: []}
    for r in range(rounds):
        order = [1, 2, 3] if r % 2 == 0 else [3, 2, 1]
        for k in order:
            res = one_run(args.work / f"r{r}-{k}", admin, k, n)
            runs[k].append(res)
            print(
                f"round {r + 1}: {k} replica(s): {res['files_per_s']:.1f} files/s,"
                f" {res['seconds']:.1f} s, CPU {res['cpu_s']:.1f} s,"
                f" jobs per instance {res['jobs_by_instance']}",
                flush=True,
            )
    one = statistics.median(x["files_per_s"] for x in runs[1])
    print("\n| replicas | files/s (median) | ratio to one | CPU s per 1,000 files |")
    print("|---|---|---|---|")
    for k, results in runs.items():
        rate = statistics.median(x["files_per_s"] for x in results)
        cpu = statistics.median(x["cpu_s"] for x in results) * 1000 / n
        print(f"| {k} | {rate:.1f} | {rate / one:.2f} | {cpu:.1f} |")
    out = BENCH / "results" / f"scaleout-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "files": n, "runs": runs}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
