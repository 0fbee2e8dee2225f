"""The five scenarios. Each returns its raw runs, summaries and measured targets."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fdbench.common import (
    BenchError,
    file_names,
    make_files,
    parse_rfc3339,
    percentile,
    rename_all,
    settle_fs,
    summary,
)
from fdbench.contenders import (
    Filedock,
    Peer,
    run_floor,
    run_layout_floor,
    run_work_floor,
    verify_filedock,
)


@dataclass
class Ctx:
    """What every scenario needs: sizes, where to work, what to run, what to clean up."""

    base: Path
    service_dir: Path
    python: str
    quick: bool
    runs: int
    burst_files: int
    sustained_rate: float
    sustained_s: float
    big_files: int
    backlog_files: int
    backlog_window_s: float
    idle_window_s: float
    idle_unrouted: int
    peer_sustained: bool
    peer_big: bool
    contenders: tuple[str, ...] = ("floor", "layout", "work", "peer", "filedock")
    py_spy: Path | None = None
    settle: bool = True  # `settle_fs` before each contender
    dirty_mb: int = 0  # staged files left dirty, and this much written beside each run
    log: Callable[[str], None] = print
    lost_files: int = 0
    caches_dropped: bool | None = None  # what the last `settle_fs` could do
    _running: list[Any] = field(default_factory=list)

    def fresh(self, name: str, *, settle: bool = True) -> Path:
        """An empty work folder; by default on a file system settled by `settle_fs`, so
        that no contender pays for the inodes the one before it deleted."""
        work = self.base / name
        if work.exists():
            shutil.rmtree(work)
        if settle and self.settle:
            self.caches_dropped = settle_fs()
        work.mkdir(parents=True)
        return work

    def clean(self, work: Path) -> None:
        shutil.rmtree(work, ignore_errors=True)

    def filedock(self, work: Path, **kw: Any) -> Filedock:
        fd = Filedock(work, service_dir=self.service_dir, python=self.python, **kw)
        self._running.append(fd)
        return fd

    def peer(self, work: Path) -> Peer:
        p = Peer(work)
        self._running.append(p)
        return p

    def start_filedock(self, fd: Filedock, label: str) -> subprocess.Popen[bytes] | None:
        fd.start()
        if self.py_spy is None:
            return None
        self.py_spy.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen(
            [
                str(Path(self.python).with_name("py-spy")),
                "record",
                "--pid",
                str(fd.pid),
                "--rate",
                "200",
                "--threads",
                "--subprocesses",
                "--nonblocking",
                "--format",
                "raw",
                "-o",
                str(self.py_spy / f"{label}.folded.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._running.append(spy)
        return spy

    def stop(self, thing: Any) -> None:
        if isinstance(thing, subprocess.Popen):
            if thing.poll() is None:
                thing.send_signal(signal.SIGINT)
                try:
                    thing.wait(30)
                except subprocess.TimeoutExpired:
                    thing.kill()
                    thing.wait(5)
        else:
            thing.stop()
        with contextlib.suppress(ValueError):
            self._running.remove(thing)

    def stop_all(self) -> None:
        for thing in reversed(list(self._running)):
            with contextlib.suppress(Exception):
                self.stop(thing)


def _stop_fd(ctx: Ctx, fd: Filedock, spy: subprocess.Popen[bytes] | None) -> int | None:
    rc = fd.stop()
    with contextlib.suppress(ValueError):
        ctx._running.remove(fd)
    if spy is not None:
        ctx.stop(spy)
    return rc


def _check(ctx: Ctx, verdict: dict[str, Any], label: str) -> None:
    missing = verdict["expected"] - verdict["verified"]
    if not verdict["ok"]:
        ctx.lost_files += max(1, missing)
        ctx.log(f"  !! {label}: filedock LOST or damaged files: {verdict}")


def _stage(
    staging: Path, n: int, size: int, *, hashes: bool, sync: bool = True
) -> tuple[list[str], dict[str, str]]:
    names = file_names(n)
    sources = make_files(staging, names, size, hashes=hashes)
    if sync:  # the staging writes must not land inside a contender's fsyncs
        os.sync()
    return names, sources


@contextlib.contextmanager
def dirty_beside(work: Path, mib: int) -> Iterator[None]:
    """While the block runs, write `mib` MiB into a file of `work` in a thread, never
    synced: another upload being written (nothing when `mib` is 0)."""
    if not mib:
        yield
        return

    def write() -> None:
        block = os.urandom(1 << 20)
        with (work / "other-upload.bin").open("wb") as f:
            for _ in range(mib):
                f.write(block)

    thread = threading.Thread(target=write, name="dirty-writer", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def _rounds(
    ctx: Ctx,
    scenario: str,
    contenders: Sequence[str],
    n: int,
    measure: Callable[[str, Path, Path, list[str], dict[str, str], int], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
) -> dict[str, list[dict[str, Any]]]:
    """`ctx.runs` rounds, each contender in turn on `n` fresh 1 KiB files: results by name."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
    for r in range(ctx.runs):
        for who in contenders:
            work = ctx.fresh(f"{scenario}-{who}-{r}")
            staging = work / "staging"
            busy = ctx.dirty_mb > 0
            names, sources = _stage(staging, n, 1024, hashes=who == "filedock", sync=not busy)
            with dirty_beside(work, ctx.dirty_mb):
                res = measure(who, work, staging, names, sources, r)
            res["loadavg_1m"] = os.getloadavg()[0]
            runs[who].append(res)
            ctx.log(f"  {scenario} run {r + 1}/{ctx.runs} {who}: {describe(res)}")
            ctx.clean(work)
    return runs


# -- 1. burst --------------------------------------------------------------------------


def burst(ctx: Ctx) -> dict[str, Any]:
    n = ctx.burst_files
    order = [c for c in ("floor", "layout", "work", "peer", "filedock") if c in ctx.contenders]

    def measure(
        who: str, work: Path, staging: Path, names: list[str], sources: dict[str, str], r: int
    ) -> dict[str, Any]:
        if who in FLOORS:
            return _burst_floor(work, staging, names, who, sync=ctx.dirty_mb == 0)
        if who == "peer":
            return _burst_peer(ctx, work, staging, names)
        return _burst_filedock(ctx, work, staging, names, sources, f"burst-{r}")

    return _burst_summary(_rounds(ctx, "burst", order, n, measure, _fmt_run))


FLOORS = ("floor", "layout", "work")


def _burst_floor(
    work: Path, staging: Path, names: list[str], kind: str, *, sync: bool = True
) -> dict[str, Any]:
    """One of the plain loops: `floor` (the issue's), `layout` (filedock's folders) or
    `work` (its folders, checks and ledger)."""
    transfer = work / "transfer"
    transfer.mkdir()
    rename_all(staging, transfer, names)
    if sync:
        os.sync()
    args = (transfer, work / "proc", work / "archive" / "day")
    if kind == "work":
        out = run_work_floor(*args, work / "ledger.sqlite3")
    else:
        out = (run_layout_floor if kind == "layout" else run_floor)(*args)
    n = out["files"]
    return {
        "files": n,
        "files_per_s": n / (out["end"] - out["start"]),
        "cpu_ms_per_file": out["cpu_s"] * 1000 / n,
        "lost": len(names) - n,
    }


def _burst_peer(
    ctx: Ctx, work: Path, staging: Path, names: list[str], *, stall_s: float = 10
) -> dict[str, Any]:
    peer = ctx.peer(work)
    peer.start()
    t0, t_renamed, _ = rename_all(staging, peer.transfer, names)
    got = peer.wait_done(len(names), stall_s=stall_s, timeout=len(names) / 40 + 60)
    done = peer.processed()
    overflow = peer.overflowed()
    ctx.stop(peer)
    end = max((t for t, _ in done), default=t0)
    return {
        "files": got,
        "files_per_s": got / (end - t0) if end > t0 else 0.0,
        "dropped": len(names) - got,
        "overflow_reported": overflow,
        "rename_s": t_renamed - t0,
    }


def _burst_filedock(
    ctx: Ctx,
    work: Path,
    staging: Path,
    names: list[str],
    sources: dict[str, str],
    label: str,
    *,
    rss: bool = False,
) -> dict[str, Any]:
    fd = ctx.filedock(work)
    spy = ctx.start_filedock(fd, label)
    fd.wait_ready()
    time.sleep(1.0)  # let start-up work (first scan, gauges) finish
    cpu0 = fd.cpu()
    t0, t_renamed, _ = rename_all(staging, fd.transfer, names)
    samples: list[int] = []
    done = fd.wait_done(len(names), timeout=len(names) / 20 + 120, sample=samples)
    mem = fd.mem()
    rc = _stop_fd(ctx, fd, spy)
    rows = fd.rows()
    end = max((r["updated_at"] for r in rows if r["state"] == "done"), default=t0)
    verdict = verify_filedock(fd, sources, rows)
    _check(ctx, verdict, label)
    n = len(names)
    out = {
        "files": verdict["verified"],
        "files_per_s": n / (end - t0),
        "cpu_ms_per_file": (done["cpu_s"] - cpu0) * 1000 / n,
        "rename_s": t_renamed - t0,
        "peak_rss_mib": mem.get("VmHWM", 0) / 1024,
        "exit_code": rc,
        "verify": verdict,
    }
    if rss:
        out["peak_pss_mib"] = max(samples, default=0) / 1024
    return out


def _per_round(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[float]:
    """files/s of `a` ÷ `b`, round by round: each round's contenders ran back to back,
    under the same neighbours' load."""
    return [
        x["files_per_s"] / y["files_per_s"] for x, y in zip(a, b, strict=True) if y["files_per_s"]
    ]


def _burst_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    s = {who: summary([r["files_per_s"] for r in rs]) for who, rs in runs.items()}
    fd = runs.get("filedock", [])
    out: dict[str, Any] = {"runs": runs, "files_per_s": s, "targets": []}
    out["cpu_ms_per_file"] = {
        who: summary([r["cpu_ms_per_file"] for r in runs[who]])
        for who in ("filedock", *FLOORS)
        if who in runs
    }
    if fd:
        out["filedock_peak_rss_mib"] = summary([r["peak_rss_mib"] for r in fd])
    if "peer" in runs:
        out["peer_dropped"] = summary([r["dropped"] for r in runs["peer"]])
    for who in ("layout", "work"):  # what the layout, and all the work, cost, per round
        if who in runs and "floor" in runs:
            out[f"{who}_vs_floor"] = summary(_per_round(runs[who], runs["floor"]))
    for who, bound in (("floor", 0.8), ("layout", None), ("work", None), ("peer", 6.0)):
        if not fd or who not in runs:
            continue
        paired = summary(_per_round(fd, runs[who]))
        a_med, b_med = s["filedock"]["median"], s[who]["median"]
        paired["ratio_of_medians"] = a_med / b_med if a_med and b_med else None
        out[f"filedock_vs_{who}"] = paired
        if bound is None:  # the layout and work floors explain the floor target; no targets
            continue
        out["targets"].append(
            _target(f"burst ≥ {bound:g} x {who}", paired["median"], ">=", bound, "x")
        )
    return out


# -- 2. sustained ----------------------------------------------------------------------


def sustained(ctx: Ctx) -> dict[str, Any]:
    n = int(ctx.sustained_rate * ctx.sustained_s)
    contenders = ["filedock"] + (
        ["peer"] if ctx.peer_sustained and "peer" in ctx.contenders else []
    )

    def measure(
        who: str, work: Path, staging: Path, names: list[str], sources: dict[str, str], r: int
    ) -> dict[str, Any]:
        if who == "filedock":
            return _sustained_filedock(ctx, work, staging, names, sources, f"sustained-{r}")
        return _sustained_peer(ctx, work, staging, names)

    return _sustained_summary(_rounds(ctx, "sustained", contenders, n, measure, _fmt_lat))


def _produce(staging: Path, transfer: Path, names: list[str], rate: float) -> dict[str, float]:
    """Rename one file every 1/rate s, on a fixed schedule; the time each rename returned."""
    s, d = os.fsencode(staging) + b"/", os.fsencode(transfer) + b"/"
    when: dict[str, float] = {}
    start = time.perf_counter()
    for i, name in enumerate(names):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        os.rename(s + name.encode(), d + name.encode())
        when[name] = time.time()
    return when


def _lat(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=float("nan")),
    }


def _sustained_filedock(
    ctx: Ctx,
    work: Path,
    staging: Path,
    names: list[str],
    sources: dict[str, str],
    label: str,
) -> dict[str, Any]:
    fd = ctx.filedock(work)
    spy = ctx.start_filedock(fd, label)
    fd.wait_ready()
    time.sleep(1.0)
    cpu0 = fd.cpu()
    when = _produce(staging, fd.transfer, names, ctx.sustained_rate)
    elapsed = max(when.values()) - min(when.values())
    done = fd.wait_done(len(names), timeout=120)
    mem = fd.mem()
    rc = _stop_fd(ctx, fd, spy)
    rows = fd.rows()
    verdict = verify_filedock(fd, sources, rows)
    _check(ctx, verdict, label)
    stages: dict[str, list[float]] = {
        "detected": [],
        "claimed": [],
        "import_start": [],
        "archived": [],
    }
    for row in rows:
        t = when.get(row["name"])
        if t is None or row["state"] != "done":
            continue
        first = next((h for h in row["history"] if "started_at" in h), None)
        stages["detected"].append(row["detected_at"] - t)
        stages["claimed"].append(row["created_at"] - t)
        if first is not None:
            stages["import_start"].append(parse_rfc3339(first["started_at"]) - t)
        stages["archived"].append(row["updated_at"] - t)
    return {
        "files": verdict["verified"],
        "offered_rate": len(names) / elapsed if elapsed else None,
        "latency": {k: _lat(v) for k, v in stages.items()},
        "cpu_ms_per_file": (done["cpu_s"] - cpu0) * 1000 / len(names),
        "peak_rss_mib": mem.get("VmHWM", 0) / 1024,
        "exit_code": rc,
        "verify": verdict,
    }


def _sustained_peer(ctx: Ctx, work: Path, staging: Path, names: list[str]) -> dict[str, Any]:
    peer = ctx.peer(work)
    peer.start()
    when = _produce(staging, peer.transfer, names, ctx.sustained_rate)
    got = peer.wait_done(len(names), stall_s=10, timeout=len(names) / 40 + 60)
    done = peer.processed()
    ctx.stop(peer)
    lat = [t - when[name] for t, name in done if name in when]
    return {
        "files": got,
        "dropped": len(names) - got,
        "latency": {"archived": _lat(lat)},
    }


def _sustained_summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs, "latency": {}}
    for who, rs in runs.items():
        stages = rs[0]["latency"].keys()
        out["latency"][who] = {
            stage: {
                key: summary([r["latency"][stage][key] for r in rs])
                for key in ("p50_ms", "p99_ms", "max_ms")
            }
            for stage in stages
        }
    arch = out["latency"]["filedock"]["archived"]
    out["filedock_cpu_ms_per_file"] = summary([r["cpu_ms_per_file"] for r in runs["filedock"]])
    out["targets"] = [
        _target("sustained p50 rename→archived ≤ 30 ms", arch["p50_ms"]["median"], "<=", 30, "ms"),
        _target(
            "sustained p99 rename→archived ≤ 120 ms", arch["p99_ms"]["median"], "<=", 120, "ms"
        ),
    ]
    return out


# -- 3. big burst ----------------------------------------------------------------------


def big_burst(ctx: Ctx) -> dict[str, Any]:
    n = ctx.big_files
    runs: list[dict[str, Any]] = []
    for r in range(ctx.runs):
        work = ctx.fresh(f"big-{r}")
        staging = work / "staging"
        names, sources = _stage(staging, n, 1024, hashes=True)
        res = _burst_filedock(ctx, work, staging, names, sources, f"big-{r}", rss=True)
        res["loadavg_1m"] = os.getloadavg()[0]
        runs.append(res)
        ctx.log(f"  big burst run {r + 1}/{ctx.runs} filedock: {_fmt_run(res)}")
        ctx.clean(work)
    peer: dict[str, Any] | None = None
    if ctx.peer_big:
        work = ctx.fresh("big-peer")
        names, _ = _stage(work / "staging", n, 1024, hashes=False)
        peer = _burst_peer(ctx, work, work / "staging", names, stall_s=15)
        ctx.log(f"  big burst (1 run) peer: {_fmt_run(peer)}")
        ctx.clean(work)
    lost = sum(r["verify"]["expected"] - r["verify"]["verified"] for r in runs)
    rss = summary([r["peak_rss_mib"] for r in runs])
    pss = summary([r["peak_pss_mib"] for r in runs])
    return {
        "runs": runs,
        "files": n,
        "verified": summary([r["verify"]["verified"] for r in runs]),
        "lost_total": lost,
        "files_per_s": summary([r["files_per_s"] for r in runs]),
        "peak_rss_mib": rss,
        "peak_pss_mib": pss,
        "peer": peer,
        "targets": [
            _target(f"{n:,} burst: zero lost", lost, "<=", 0, "files"),
            _target(f"{n:,} burst: peak memory ≤ 80 MB", _mb(pss["max"]), "<=", 80, "MB"),
        ],
    }


def _mb(mib: float | None) -> float | None:
    return None if mib is None else mib * 1024 * 1024 / 1e6


# -- 4. backlog ------------------------------------------------------------------------


def backlog(ctx: Ctx) -> dict[str, Any]:
    n = ctx.backlog_files
    base = ctx.fresh("backlog")
    transfer = base / "data" / "transfer"
    names = file_names(n)
    t0 = time.monotonic()
    make_files(transfer, names, 64, hashes=False)
    os.sync()
    made_s = time.monotonic() - t0
    ctx.log(f"  backlog: made {n:,} files in {made_s:.1f}s")
    runs, baseline = [], []
    for r in range(ctx.runs):
        if r:
            _reset_backlog(base, transfer, names)
        res = _backlog_run(ctx, base, f"backlog-{r}")
        res["loadavg_1m"] = os.getloadavg()[0]
        runs.append(res)
        ctx.log(f"  backlog run {r + 1}/{ctx.runs}: {_fmt_backlog(res)}")
        if ctx.quick:
            continue
        # The same start-up with one file: what Python and the service cost without a backlog.
        one = ctx.fresh(f"backlog-one-{r}", settle=False)  # keep the backlog's cache warm
        make_files(one / "data" / "transfer", file_names(1), 64, hashes=False)
        os.sync()
        res1 = _backlog_run(ctx, one, f"backlog-one-{r}", window_s=min(5.0, ctx.backlog_window_s))
        baseline.append(res1)
        ctx.log(f"  backlog run {r + 1}/{ctx.runs} with 1 file: {_fmt_backlog(res1)}")
        ctx.clean(one)
    t0 = time.monotonic()
    ctx.clean(base)
    ctx.log(f"  backlog: removed in {time.monotonic() - t0:.1f}s")
    keys = ("ready_s", "first_claim_s", "first_import_s", "first_archive_s", "peak_rss_mib")
    out: dict[str, Any] = {
        "files": n,
        "make_s": made_s,
        "window_s": ctx.backlog_window_s,
        "runs": runs,
        "baseline_1_file": {k: summary([r[k] for r in baseline]) for k in keys}
        if baseline
        else None,
    }
    for k in (*keys, "done_in_window", "peak_pss_mib"):
        out[k] = summary([r[k] for r in runs])
    out["targets"] = [
        _target(
            f"{n:,} backlog: first import ≤ 2 s", out["first_import_s"]["median"], "<=", 2, "s"
        ),
        _target(
            f"{n:,} backlog: peak memory ≤ 150 MB", _mb(out["peak_pss_mib"]["max"]), "<=", 150, "MB"
        ),
    ]
    return out


def _reset_backlog(base: Path, transfer: Path, names: list[str]) -> None:
    """Back to the full backlog: drop the last run's state, recreate the files it took."""
    for folder in ("proc", "archive", "failed", "temp", "state"):
        shutil.rmtree(base / "data" / folder, ignore_errors=True)
    present = set(os.listdir(transfer))
    missing = [n for n in names if n not in present]
    make_files(transfer, missing, 64, hashes=False)
    (base / "filedock.log").unlink(missing_ok=True)
    os.sync()


def _backlog_run(
    ctx: Ctx, work: Path, label: str, *, window_s: float | None = None
) -> dict[str, Any]:
    window = ctx.backlog_window_s if window_s is None else window_s
    fd = ctx.filedock(work)
    t_start = time.time()
    spy = ctx.start_filedock(fd, label)
    ready_at: float | None = None
    samples: list[int] = []
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        if ready_at is None and fd.ready():
            ready_at = time.time()
        samples.append(fd.mem()["Pss"])
        time.sleep(0.02 if ready_at is None else 0.25)
    if ready_at is None:
        ready_at = fd.wait_ready(timeout=120)
    mem = fd.mem()
    _stop_fd(ctx, fd, spy)
    rows = fd.rows()
    starts = [
        parse_rfc3339(h["started_at"]) for r in rows for h in r["history"] if "started_at" in h
    ]
    done = [r["updated_at"] for r in rows if r["state"] == "done"]

    def since(t: float | None) -> float | None:
        return None if t is None else t - t_start

    return {
        "ready_s": ready_at - t_start,
        "first_claim_s": since(min((r["created_at"] for r in rows), default=None)),
        "first_import_s": since(min(starts, default=None)),
        "first_archive_s": since(min(done, default=None)),
        "done_in_window": len(done),
        "peak_rss_mib": mem.get("VmHWM", 0) / 1024,
        "peak_pss_mib": max(samples, default=0) / 1024,
    }


# -- 5. idle ---------------------------------------------------------------------------


def idle(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"window_s": ctx.idle_window_s}
    for case in ("empty", "unrouted"):
        work = ctx.fresh(f"idle-{case}")
        match = "**"
        if case == "unrouted":
            match = "*.csv"
            make_files(work / "data" / "transfer", file_names(ctx.idle_unrouted), 64, hashes=False)
            os.sync()
        fd = ctx.filedock(work, match=match)
        spy = ctx.start_filedock(fd, f"idle-{case}")
        fd.wait_ready()
        if case == "unrouted":
            t0 = time.time()
            _wait_metric(fd, "filedock_unrouted_files", ctx.idle_unrouted, timeout=300)
            ctx.log(
                f"  idle: first scan saw {ctx.idle_unrouted:,} unrouted in {time.time() - t0:.1f}s"
            )
        time.sleep(1.0 if ctx.quick else 5.0)
        windows = []
        for w in range(ctx.runs):
            c0, t0 = fd.cpu(), time.monotonic()
            time.sleep(ctx.idle_window_s)
            c1, t1 = fd.cpu(), time.monotonic()
            windows.append(100 * (c1 - c0) / (t1 - t0))
            ctx.log(f"  idle {case} window {w + 1}/{ctx.runs}: {windows[-1]:.3f} % of one core")
        mem = fd.mem()
        _stop_fd(ctx, fd, spy)
        ctx.clean(work)
        out[case] = {
            "cpu_pct": summary(windows),
            "peak_rss_mib": mem.get("VmHWM", 0) / 1024,
            "rss_mib": mem.get("VmRSS", 0) / 1024,
        }
    out["unrouted_files"] = ctx.idle_unrouted
    out["targets"] = [
        _target("idle (empty) CPU ≤ 0.5 %", out["empty"]["cpu_pct"]["median"], "<=", 0.5, "%"),
        _target(
            f"idle ({ctx.idle_unrouted:,} unrouted) CPU ≤ 0.5 %",
            out["unrouted"]["cpu_pct"]["median"],
            "<=",
            0.5,
            "%",
        ),
    ]
    return out


def _wait_metric(fd: Filedock, name: str, value: float, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fd.metric(name)
        if v is not None and v >= value:
            return
        time.sleep(0.5)
    raise BenchError(f"{name} did not reach {value} within {timeout:.0f}s")


# -- shared ----------------------------------------------------------------------------


def _target(name: str, measured: float | None, op: str, bound: float, unit: str) -> dict[str, Any]:
    ok = None if measured is None else (measured >= bound if op == ">=" else measured <= bound)
    return {
        "target": name,
        "measured": measured,
        "op": op,
        "bound": bound,
        "unit": unit,
        "pass": ok,
    }


def _fmt_run(res: dict[str, Any]) -> str:
    parts = [f"{res['files']:,} files", f"{res['files_per_s']:.0f} files/s"]
    if "cpu_ms_per_file" in res:
        parts.append(f"{res['cpu_ms_per_file']:.2f} CPU ms/file")
    if "dropped" in res:
        parts.append(f"{res['dropped']:,} dropped")
    if "peak_pss_mib" in res:
        parts.append(f"peak PSS {res['peak_pss_mib']:.1f} MiB")
    if "peak_rss_mib" in res:
        parts.append(f"peak RSS (summed) {res['peak_rss_mib']:.1f} MiB")
    return ", ".join(parts)


def _fmt_lat(res: dict[str, Any]) -> str:
    a = res["latency"]["archived"]
    s = f"rename→archived p50 {a['p50_ms']:.1f} p99 {a['p99_ms']:.1f} max {a['max_ms']:.1f} ms"
    if "import_start" in res["latency"]:
        i = res["latency"]["import_start"]
        s += f"; →import start p50 {i['p50_ms']:.1f} p99 {i['p99_ms']:.1f} ms"
    return s


def _fmt_backlog(res: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}s"

    return (
        f"ready {f(res['ready_s'])}, first import {f(res['first_import_s'])}, first archive "
        f"{f(res['first_archive_s'])}, {res['done_in_window']:,} done, "
        f"peak PSS {res['peak_pss_mib']:.1f} MiB, peak RSS (summed) {res['peak_rss_mib']:.1f} MiB"
    )
