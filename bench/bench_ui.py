"""The operator page with a million jobs in the ledger: each page's latency through the
real HTTP server, on SQLite and on PostgreSQL (issue "The operator page").

    .venv/bin/python bench/bench_ui.py                     # 1,000,000 jobs, 200 requests a page
    .venv/bin/python bench/bench_ui.py --quick             # smoke: 20,000 jobs, 20 requests
    .venv/bin/python bench/bench_ui.py --backend sqlite --jobs 1000000 --requests 500
    .venv/bin/python bench/bench_ui.py --write-cost        # and the indexes' cost to writes

For each backend a ledger is filled in bulk (rows written straight into the tables, the
secondary indexes built afterwards; PostgreSQL by COPY, then VACUUM ANALYZE as its
autovacuum would): `--jobs` jobs over the last 30 days, 8 routes of very different
sizes (50 % to 0.1 %), 97 % done, 2 % failed (rejected, exhausted, too_large), the
newest few hundred unfinished; a sink row for every 20th job, an outbox event for every
10th. The service's own HTTP server (`serve_http`, uvicorn) then serves `build_http_app`
with the operator page, in this process, on a loopback port, with the overview's
snapshot task running as `app.py` runs it; an httpx client asks each page `--requests`
times in turn, one request at a time, and the time from request to the last byte is
taken. The client shares the process, so its own cost is in the figures (about 1 ms).
The snapshot's refresh (the ledger's overview, the folders walked, the expectations),
which runs off the request path, is timed on its own. `--write-cost` also times the
pipeline's kind of ledger writes (jobs inserted 256 at a time, then moved through three
states in batches) with and without the page's three indexes, interleaved, 5 rounds.

PostgreSQL: FILEDOCK_TEST_POSTGRES_URL or --postgres-url (a schema `filedock_bench_ui` is
made and dropped). Prints a table; writes bench/results/ui-<stamp>.json. Exits 2 when
the harness could not measure; never on a missed target (docs/benchmarks.md, "The
operator page", holds the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.face.http import Health, build_http_app, serve_http  # noqa: E402
from service.face.metrics import Metrics  # noqa: E402
from service.face.ui import OperatorPage  # noqa: E402
from service.ledger import ledger_for_url  # noqa: E402
from service.ledger.pages import id_prefix  # noqa: E402
from service.settings import Settings  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from fdbench.uiledger import (  # noqa: E402
    PG_SCHEMA,
    ROUTES,
    SPAN_S,
    drop_schema,
    fill_postgres,
    fill_sqlite,
    fresh_schema,
    write_cost,
)

TARGET_MS = 100.0


def settings_for(root: Path, url: str) -> Settings:
    routes: list[dict[str, Any]] = [
        {"name": name, "match": f"{name}/**", "importer": "none"} for name, _ in ROUTES
    ]
    routes[0]["deliver"] = [
        {"name": "lake", "kind": "directory", "path": str(root / "lake")},
        {"name": "erp", "kind": "http", "url": "https://erp.example.net/in/{name}"},
    ]
    routes[1]["expect"] = [{"name": "daily", "schedule": "0 6 * * *", "grace_s": 600}]
    return Settings(
        root=root,
        ledger_url=url,
        routes=routes,
        notify=[
            {
                "name": "hooks",
                "kind": "webhook",
                "url": "https://hooks.example.net/fd",
                "secret": {"env": "BENCH_UNUSED"},
            }
        ],
        ui={"refresh_s": 5},
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(url: str, root: Path, requests: int, now: float) -> dict[str, Any]:
    settings = settings_for(root, url)
    for name in ("transfer", "proc", "archive", "failed", "temp", "state", "lake"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for k in range(20):  # a few files waiting in transfer/, unrouted or temporary
        (root / "transfer" / f"stray_{k}.txt").write_bytes(b"x")
        (root / "transfer" / f".upload_{k}.tmp").write_bytes(b"x")
    ledger = ledger_for_url(url)
    await ledger.open()
    metrics = Metrics()
    page = OperatorPage(settings, ledger, metrics)
    health = Health(ledger, metrics, {}, 0, recovery_done=True)
    app = build_http_app(health, page.app)
    failed = (await ledger.query(states=["failed"], limit=1))[0]
    folder = Path(failed.failed_path or "")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.json").write_text(json.dumps({"job_id": failed.id, "message": "no"}))
    middle = id_prefix(now - SPAN_S / 2) + "-0"  # the jobs older than 15 days ago
    pages = {
        "overview": "/",
        "jobs: newest": "/ui/jobs",
        "jobs: a page deep in the list": f"/ui/jobs?before={middle}",
        "jobs: failed": "/ui/jobs?state=failed",
        "jobs: a small route, failed": "/ui/jobs?route=rare&state=failed",
        "jobs: search, no match (scan bound)": "/ui/jobs?q=no-such-name",
        "jobs: search by SHA-256": f"/ui/jobs?q={failed.sha256[:20] if failed.sha256 else ''}",
        "job (failed, with error.json)": f"/ui/jobs/{failed.id}",
        "failures": "/ui/failures",
    }
    out: dict[str, Any] = {"pages": {}}
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_http, app, "127.0.0.1", 0)
        tg.start_soon(page.snapshot.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for path in pages.values():  # warm up (the first overview waits for its snapshot)
                r = await client.get(path)
                if r.status_code != 200:
                    raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]}")
            for label, path in pages.items():
                times = []
                for _ in range(requests):
                    t = time.perf_counter()
                    r = await client.get(path)
                    await r.aread()
                    times.append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200, (path, r.status_code)
                out["pages"][label] = summary(times) | {"path": path, "bytes": len(r.content)}
        refreshes = []
        for _ in range(max(5, requests // 20)):
            t = time.perf_counter()
            await page.snapshot.refresh()
            refreshes.append((time.perf_counter() - t) * 1000)
        out["snapshot refresh (off the request path)"] = summary(refreshes)
        tg.cancel_scope.cancel()
    await ledger.close()
    return out


def summary(times: list[float]) -> dict[str, float]:
    return {
        "n": len(times),
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(percentile(times, 0.95), 2),
        "max_ms": round(max(times), 2),
    }


async def run_backend(backend: str, jobs: int, requests: int, pg: str | None) -> dict[str, Any]:
    now = time.time()
    with tempfile.TemporaryDirectory(prefix=f"fd-bench-ui-{backend}-") as tmp:
        root = Path(tmp)
        if backend == "sqlite":
            url = f"sqlite:///{root / 'state' / 'ledger.sqlite3'}"
        else:
            url = fresh_schema(pg or "", PG_SCHEMA)
        t = time.monotonic()
        fill = fill_sqlite if backend == "sqlite" else fill_postgres
        await fill(url, jobs, now, root)
        filled_s = time.monotonic() - t
        print(f"{backend}: {jobs:,} jobs filled in {filled_s:.0f} s", file=sys.stderr)
        try:
            load_before = os.getloadavg()
            result = await measure(url, root, requests, now)
            result["load_average"] = [round(x, 2) for x in (*load_before, *os.getloadavg())]
        finally:
            if backend == "postgres":
                drop_schema(pg or "", PG_SCHEMA)
        return {"jobs": jobs, "fill_s": round(filled_s, 1), **result}


def table(results: dict[str, Any]) -> str:
    lines = ["| page | backend | p50 ms | p95 ms | max ms |", "|---|---|---:|---:|---:|"]
    for backend, r in results.items():
        rows = {
            **r["pages"],
            "snapshot refresh (off the request path)": r["snapshot refresh (off the request path)"],
        }
        for label, s in rows.items():
            lines.append(f"| {label} | {backend} | {s['p50_ms']} | {s['p95_ms']} | {s['max_ms']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 jobs, 20 requests a page")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--postgres-url", default=os.environ.get("FILEDOCK_TEST_POSTGRES_URL"))
    parser.add_argument(
        "--write-cost",
        action="store_true",
        help="also time the pipeline's ledger writes with and without the page's indexes",
    )
    args = parser.parse_args()
    jobs = args.jobs or (20_000 if args.quick else 1_000_000)
    requests = args.requests or (20 if args.quick else 200)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    if "postgres" in backends and not args.postgres_url:
        print(
            "bench_ui: no PostgreSQL (FILEDOCK_TEST_POSTGRES_URL or --postgres-url)",
            file=sys.stderr,
        )
        return 2
    results: dict[str, Any] = {}
    try:
        for backend in backends:
            results[backend] = anyio.run(run_backend, backend, jobs, requests, args.postgres_url)
            if args.write_cost:
                n, rounds = (5_000, 1) if args.quick else (20_000, 5)
                cost = anyio.run(write_cost, backend, args.postgres_url, n, rounds)
                results[backend]["write_cost"] = cost
    except Exception as e:
        print(f"bench_ui: could not measure: {e!r}", file=sys.stderr)
        return 2
    doc = {
        "jobs": jobs,
        "requests": requests,
        "target_p95_ms": TARGET_MS,
        "results": results,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }
    out = REPO / "bench" / "results" / f"ui-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(table(results))
    for backend, r in results.items():
        if "write_cost" in r:
            w = r["write_cost"]
            print(
                f"{backend}: ledger writes, µs a job (insert + 3 transitions): without the"
                f" page indexes {w['us_per_job']['without']}, with {w['us_per_job']['with']}"
                f" (x{w['ratio']})"
            )
        print(
            f"{backend}: load average (1, 5, 15 min) before {r['load_average'][:3]},"
            f" after {r['load_average'][3:]}"
        )
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
