"""filedock benchmark: the floors, the peer and filedock, in one run (issue 8).

    .venv/bin/python bench/run.py            # everything, median of 3 runs (about 45 min)
    .venv/bin/python bench/run.py --quick    # CI smoke: 1 run, small sizes, < 2 min

Prints a markdown table and writes the raw figures to bench/results/<stamp>.json.
Exits 1 when filedock lost or damaged a file (every archive is checked against the
source's SHA-256), 2 when the harness could not measure; never on a missed target.
See docs/benchmarks.md for what each figure means and what limits it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fdbench import scenarios
from fdbench.common import BenchError, machine_info, same_filesystem
from fdbench.report import table

REPO = Path(__file__).resolve().parents[1]
SCENARIOS: dict[str, Callable[[scenarios.Ctx], dict[str, Any]]] = {
    "burst": scenarios.burst,
    "sustained": scenarios.sustained,
    "big": scenarios.big_burst,
    "backlog": scenarios.backlog,
    "idle": scenarios.idle,
}
FULL = {
    "runs": 3,
    "burst_files": 10_000,
    "sustained_rate": 200.0,
    "sustained_s": 30.0,
    "big_files": 100_000,
    "backlog_files": 1_000_000,
    "backlog_window_s": 60.0,
    "idle_window_s": 60.0,
    "idle_unrouted": 100_000,
}
QUICK = {
    "runs": 1,
    "burst_files": 500,
    "sustained_rate": 200.0,
    "sustained_s": 4.0,
    "big_files": 2_000,
    "backlog_files": 10_000,
    "backlog_window_s": 4.0,
    "idle_window_s": 3.0,
    "idle_unrouted": 2_000,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke: 1 run, small sizes")
    ap.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma list of: {', '.join(SCENARIOS)}"
    )
    for key, value in FULL.items():
        ap.add_argument(
            "--" + key.replace("_", "-"),
            type=type(value),
            default=None,
            help=f"default {value:,} (--quick: {QUICK[key]:,})",
        )
    ap.add_argument(
        "--contenders",
        default="floor,layout,work,peer,filedock",
        help="which contenders run in the burst and sustained scenarios",
    )
    ap.add_argument("--no-peer-sustained", action="store_true", help="skip the peer at 200/s")
    ap.add_argument("--no-peer-big", action="store_true", help="skip the peer's 100k burst")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to make files (default: a temp dir in /var/tmp, same filesystem as the repo)",
    )
    ap.add_argument(
        "--service-dir",
        type=Path,
        default=REPO,
        help="the checkout whose `service` package runs (to measure a private copy)",
    )
    ap.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run service/ in place (default: a copy taken at start, so that edits made to\n"
        "the tree during a long run do not mix versions)",
    )
    ap.add_argument("--python", default=None, help="interpreter for filedock (default: .venv)")
    ap.add_argument("--py-spy", type=Path, default=None, help="record a py-spy profile per run")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--label", default="", help="added to the results file name")
    ap.add_argument(
        "--no-settle",
        action="store_true",
        help="do not sync and drop the machine's caches before each contender (as root it\n"
        'does by default: see docs/benchmarks.md, "The machine"); for a smoke run beside\n'
        "other work, whose figures are not compared",
    )
    ap.add_argument(
        "--dirty-mb",
        type=int,
        default=0,
        help="burst and sustained on a busy disk: the staged files are not synced before\n"
        "a contender runs (as an upload just written), and this many MiB are written\n"
        "beside it, never synced, as it starts (another upload still being written)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--table", type=Path, default=None, help="print the table of a results file")
    return ap.parse_args(argv)


def _interpreter(args: argparse.Namespace) -> str:
    """The service's interpreter: --python, the checkout's venv, this repo's, or this one."""
    for candidate in (
        args.python,
        args.service_dir / ".venv" / "bin" / "python",
        REPO / ".venv" / "bin" / "python",
    ):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return sys.executable


def _snapshot(service_dir: Path, base: Path, *, copy: bool) -> tuple[Path, dict[str, Any]]:
    """Copy `service/` aside (one version for the whole run); say which version it is."""
    h = hashlib.sha256()
    for p in sorted((service_dir / "service").rglob("*.py")):
        h.update(p.relative_to(service_dir).as_posix().encode() + b"\0" + p.read_bytes())
    info: dict[str, Any] = {"service_py_sha256": h.hexdigest()[:16]}
    git = ["git", "-C", str(service_dir)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "service"], capture_output=True, text=True
    )
    info["git_head"] = head.stdout.strip() or None
    info["uncommitted_in_service"] = dirty.stdout.split("\n")[:-1] if dirty.stdout else []
    if not copy:
        return service_dir, info
    snap = base / "snapshot"
    shutil.copytree(
        service_dir / "service", snap / "service", ignore=shutil.ignore_patterns("__pycache__")
    )
    return snap, info


def _run_scenarios(ctx: scenarios.Ctx, only: list[str], results: dict[str, Any]) -> int:
    """Run each scenario; one that cannot be measured is reported, and the others still run."""
    code = 0
    for name in only:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            results["scenarios"][name] = SCENARIOS[name](ctx)
        except Exception as e:  # one scenario's failure must not hide the others'
            if not isinstance(e, BenchError):
                traceback.print_exc()
            print(f"  !! {name} could not be measured: {e!r}", flush=True)
            results["scenarios"][name] = {"error": repr(e)}
            code = 2
        finally:
            ctx.stop_all()
        print(f"   ({time.monotonic() - t0:.0f}s)", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return 0
    sizes = dict(QUICK if args.quick else FULL)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    python = _interpreter(args)
    if not shutil.which("inotifywait"):
        print("inotifywait is missing: apt-get install inotify-tools", file=sys.stderr)
        return 2
    parent = args.workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    if not same_filesystem(parent, REPO):
        print(f"note: {parent} is not on the repository's filesystem", file=sys.stderr)
    base = Path(tempfile.mkdtemp(prefix="fd-bench-", dir=parent))

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    service_dir, version = _snapshot(args.service_dir.resolve(), base, copy=not args.no_snapshot)
    ctx = scenarios.Ctx(
        base=base,
        service_dir=service_dir,
        python=python,
        quick=args.quick,
        peer_sustained=not args.quick and not args.no_peer_sustained,
        peer_big=not args.quick and not args.no_peer_big,
        py_spy=args.py_spy,
        settle=not args.no_settle,
        dirty_mb=args.dirty_mb,
        contenders=tuple(c.strip() for c in args.contenders.split(",") if c.strip()),
        log=lambda m: print(m, flush=True),
        **sizes,
    )
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "dirty_mb": args.dirty_mb,
        "sizes": sizes,
        "service_dir": str(args.service_dir.resolve()),
        "service_version": version,
        "machine": machine_info(base),
        "command": " ".join([sys.executable, *sys.argv]),
        "scenarios": {},
    }
    t_all = time.monotonic()
    try:
        code = _run_scenarios(ctx, only, results)
    finally:
        ctx.stop_all()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - t_all
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["machine"]["caches_dropped_between_runs"] = ctx.caches_dropped
    results["machine"]["settled_between_runs"] = ctx.settle
    results["lost_files"] = ctx.lost_files
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    suffix = ("-quick" if args.quick else "") + (f"-{args.label}" if args.label else "")
    out = args.results / f"{stamp}{suffix}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(table(results))
    print(f"\nresults: {out}  ({results['elapsed_s']:.0f}s)")
    if ctx.lost_files:
        print(f"FAIL: filedock lost or damaged {ctx.lost_files} file(s)", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
