"""The claim barrier: one syncfs() against an fdatasync of each file and an fsync of each
folder on threads, with and without other dirty data on the filesystem, interleaved.

    .venv/bin/python bench/bench_barrier.py                  # 256-file batches, 12 rounds
    .venv/bin/python bench/bench_barrier.py --rounds 4 --dirty-mb 0 100

Each round writes a batch of 1 KiB files (not synced: an upload just finished), and,
for the dirty condition, `--dirty-mb` of other data into a file beside them that
nobody syncs (another upload still being written). Then each file is claimed as
filedock claims it (a folder per job in `proc/`, one rename) and the barrier is
timed: `service.storage.fsutil.Barrier` with mode `syncfs`, `fsync` or `auto` (which
learns both costs over the rounds, as the service does), as the service runs it.
Modes rotate round by round, on a settled filesystem at each round's start. Prints
the median flush time per batch; docs/benchmarks.md, "Barrier", holds the figures
and the choice of `auto` they led to.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from service.storage.fsutil import Barrier, BarrierMode, dirty_bytes  # noqa: E402


def write_dirty(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(block)


def one_round(work: Path, files: int, dirty_mib: int, mode: BarrierMode) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    transfer, proc = work / "transfer", work / "proc"
    transfer.mkdir(parents=True)
    proc.mkdir()
    os.sync()  # settled: what follows is the only dirty data
    if dirty_mib:
        write_dirty(work / "other-upload.bin", dirty_mib)
    payload = os.urandom(1024)
    for i in range(files):
        (transfer / f"f{i:05d}.csv").write_bytes(payload)
    barrier = Barrier(mode)
    for i in range(files):
        job = proc / f"job{i:05d}"
        job.mkdir()
        os.rename(transfer / f"f{i:05d}.csv", job / f"f{i:05d}.csv")
        barrier.file(job / f"f{i:05d}.csv")
        barrier.dir(job)
    barrier.dir(transfer)
    barrier.dir(proc)
    dirty = dirty_bytes()
    t0 = time.perf_counter()
    barrier.flush()
    seconds = time.perf_counter() - t0
    return {"mode": mode, "dirty_mib": dirty_mib, "flush_ms": seconds * 1000, "dirty_seen": dirty}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--dirty-mb", type=int, nargs="*", default=[0, 100])
    ap.add_argument("--work", type=Path, default=BENCH / "work-barrier")
    args = ap.parse_args(argv)
    results: list[dict[str, Any]] = []
    modes: list[BarrierMode] = ["syncfs", "fsync", "auto"]
    try:
        for r in range(args.rounds):
            for dirty in args.dirty_mb:
                for mode in modes[r % 3 :] + modes[: r % 3]:
                    res = one_round(args.work, args.files, dirty, mode)
                    results.append(res)
                    print(
                        f"round {r + 1}: {dirty:>4} MiB dirty, {mode:>6}: {res['flush_ms']:8.1f}"
                        f" ms (dirty seen {res['dirty_seen'] >> 20} MiB)",
                        flush=True,
                    )
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    print(f"\nmedians, batches of {args.files} files:")
    print("| other dirty data | syncfs ms | fsync ms | auto ms |")
    print("|---|---|---|---|")
    for dirty in args.dirty_mb:
        by = {
            m: statistics.median(
                x["flush_ms"] for x in results if x["mode"] == m and x["dirty_mib"] == dirty
            )
            for m in modes
        }
        print(f"| {dirty} MiB | {by['syncfs']:.1f} | {by['fsync']:.1f} | {by['auto']:.1f} |")
    out = BENCH / "results" / f"barrier-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
