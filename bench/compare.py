"""A/B a change to filedock: the same scenario against several checkouts, interleaved.

    .venv/bin/python bench/compare.py --variant before=/work/main \\
        --variant after=/tmp/fd-exp --scenario burst --files 10000 --runs 3

Each run goes through every variant in turn (and the three floors, for bursts), so a noisy
neighbour hurts them alike. A variant's `,key=value` adds to its filedock configuration
(YAML values: `name=DIR,debounce_ms=5,watch_mode=scan`), and `,python=PATH` runs it with
another interpreter (one whose environment has filedock's dependencies). Results go to
bench/results/compare-<stamp>.json; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fdbench import scenarios
from fdbench.common import summary
from fdbench.report import fmt

REPO = Path(__file__).resolve().parents[1]


def _variant(text: str) -> tuple[str, Path, str | None, dict[str, Any]]:
    """`name=DIR[,python=PATH][,key=value...]`: a checkout, the interpreter to run it
    with (by default the repository's venv), and its configuration overrides."""
    name, _, rest = text.partition("=")
    path, *sets = rest.split(",")
    extra = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in sets)}
    python = extra.pop("python", None)
    return name, Path(path).resolve(), None if python is None else str(python), extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--variant", action="append", required=True, help="name=DIR[,python=PATH][,key=val...]"
    )
    ap.add_argument("--scenario", choices=("burst", "sustained", "backlog"), default="burst")
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=200.0, help="sustained: files/s")
    ap.add_argument("--seconds", type=float, default=30.0, help="sustained: duration")
    ap.add_argument("--window", type=float, default=10.0, help="backlog: seconds watched")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--floor", action="store_true", help="burst: run the three floors too")
    ap.add_argument(
        "--dirty-mb",
        type=int,
        default=0,
        help="burst: staged files left dirty, and this much written beside each run",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    variants = [_variant(v) for v in args.variant]
    base = Path(tempfile.mkdtemp(prefix="fd-compare-", dir=args.workdir))
    venv_python = str(REPO / ".venv" / "bin" / "python")
    ctx = scenarios.Ctx(
        base=base,
        service_dir=REPO,
        python=venv_python,
        quick=False,
        runs=args.runs,
        burst_files=args.files,
        sustained_rate=args.rate,
        sustained_s=args.seconds,
        big_files=args.files,
        backlog_files=args.files,
        backlog_window_s=args.window,
        idle_window_s=0,
        idle_unrouted=0,
        peer_sustained=False,
        peer_big=False,
        dirty_mb=args.dirty_mb,
        log=lambda m: print(m, flush=True),
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _, _ in variants}
    floors = scenarios.FLOORS if args.floor else ()
    for floor in floors:
        runs[floor] = []
    try:
        for r in range(args.runs):
            for name, path, python, extra in variants:
                ctx.service_dir, ctx.python = path, python or venv_python
                res = _one(ctx, args, r, name, extra)
                runs[name].append(res)
                print(f"  run {r + 1}/{args.runs} {name}: {_brief(res)}", flush=True)
            for floor in floors:
                res = _floor(ctx, args.files, r, floor)
                runs[floor].append(res)
                print(f"  run {r + 1}/{args.runs} {floor}: {_brief(res)}", flush=True)
    finally:
        ctx.stop_all()
        shutil.rmtree(base, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"compare-{time.strftime('%Y%m%dT%H%M%S')}.json"
    doc = {
        "argv": sys.argv,
        "variants": [(n, str(p), py, e) for n, p, py, e in variants],
        "runs": runs,
    }
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(_table(runs))
    print(f"\nresults: {out}")
    return 1 if ctx.lost_files else 0


def _one(ctx: scenarios.Ctx, args: argparse.Namespace, r: int, name: str, extra: dict) -> dict:
    work = ctx.fresh(f"{name}-{r}")
    orig = ctx.filedock

    def filedock(w: Path, **kw: Any) -> Any:
        kw.setdefault("extra", extra)
        return orig(w, **kw)

    ctx.filedock = filedock  # type: ignore[method-assign]
    try:
        if args.scenario == "backlog":
            from fdbench.common import file_names, make_files

            make_files(work / "data" / "transfer", file_names(args.files), 64, hashes=False)
            os.sync()
            res = scenarios._backlog_run(ctx, work, f"{name}-{r}")
        else:
            n = args.files if args.scenario == "burst" else int(args.rate * args.seconds)
            busy = args.scenario == "burst" and ctx.dirty_mb > 0
            names, sources = scenarios._stage(work / "staging", n, 1024, hashes=True, sync=not busy)
            if args.scenario == "burst":
                with scenarios.dirty_beside(work, ctx.dirty_mb if busy else 0):
                    res = scenarios._burst_filedock(
                        ctx, work, work / "staging", names, sources, f"{name}-{r}", rss=True
                    )
            else:
                res = scenarios._sustained_filedock(
                    ctx, work, work / "staging", names, sources, f"{name}-{r}"
                )
    finally:
        ctx.filedock = orig  # type: ignore[method-assign]
        ctx.clean(work)
    return res


def _floor(ctx: scenarios.Ctx, n: int, r: int, kind: str) -> dict[str, Any]:
    work = ctx.fresh(f"{kind}-{r}")
    busy = ctx.dirty_mb > 0
    names, _ = scenarios._stage(work / "staging", n, 1024, hashes=False, sync=not busy)
    with scenarios.dirty_beside(work, ctx.dirty_mb):
        res = scenarios._burst_floor(work, work / "staging", names, kind, sync=not busy)
    ctx.clean(work)
    return res


def _brief(res: dict[str, Any]) -> str:
    if "latency" in res:
        return scenarios._fmt_lat(res)
    if "ready_s" in res:
        return scenarios._fmt_backlog(res)
    return scenarios._fmt_run(res)


def _table(runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| variant | measure | median (min-max) |", "|---|---|---|"]
    for name, rs in runs.items():
        if not rs:
            continue
        keys: list[tuple[str, Any]] = []
        if "files_per_s" in rs[0]:
            keys += [("files/s", lambda x: x["files_per_s"])]
        if "cpu_ms_per_file" in rs[0]:
            keys += [("CPU ms/file", lambda x: x["cpu_ms_per_file"])]
        if "peak_rss_mib" in rs[0]:
            keys += [("peak RSS MiB", lambda x: x["peak_rss_mib"])]
        if "latency" in rs[0]:
            for stage in rs[0]["latency"]:
                for q in ("p50_ms", "p99_ms"):
                    keys.append((f"rename→{stage} {q}", _lat_key(stage, q)))
        if "ready_s" in rs[0]:
            for k in ("ready_s", "first_import_s", "peak_rss_mib", "done_in_window"):
                keys.append((k, _get(k)))
        for label, get in keys:
            lines.append(f"| {name} | {label} | {fmt(summary([get(x) for x in rs]), 2)} |")
    return "\n".join(lines)


def _lat_key(stage: str, q: str) -> Any:
    return lambda x: x["latency"][stage][q]


def _get(key: str) -> Any:
    return lambda x: x[key]


if __name__ == "__main__":
    sys.exit(main())
