"""Notifications: a 10,000-file burst with a webhook on every `done`, against the same
burst without notifications, interleaved in one run (issue "Notifications").

    .venv/bin/python bench/bench_notify.py            # 10,000 files, 8 rounds of A and B
    .venv/bin/python bench/bench_notify.py --quick    # smoke: 300 files, 1 round, < 1 min
    .venv/bin/python bench/bench_notify.py --files 5000 --rounds 5

Each round runs both contenders in turn (A first in even rounds, B first in odd ones),
each on a fresh root on a settled file system (`sync`, and as root the caches dropped,
as bench/run.py does):

- A, `plain`: filedock with the benchmark's configuration (`Filedock` in
  bench/fdbench/contenders.py: one route, the `bench_importers:read_once` Python
  importer, concurrency 8), no `notify:`.
- B, `webhook`: the same, plus `notify: [{name: hooks, kind: webhook, url:
  http://127.0.0.1:PORT/events, secret: {env: HOOK_SECRET}}]` (the channel's defaults
  otherwise: concurrency 8, timeout 30 s). The receiver is a separate process
  (this file with `--serve-receiver`: aiohttp's low-level server on uvloop, on loopback) that
  answers 204 at once, records when each `webhook-id` first arrived (`time.time()`),
  and keeps the headers and body of every `--sample-every`-th request and of the last
  one; those are checked with `standardwebhooks.Webhook(secret).verify` afterwards.

The burst is run.py's: the service is started on an empty `transfer/`, `/readyz`
answers, one second passes, then the 1 KiB files are renamed in from a staging folder
as fast as Python can. files/s = files ÷ (last job's `done`, the ledger's
`updated_at`, minus the first rename). Every archive is gunzipped and checked against the
source's SHA-256 (`verify_filedock`). For B the service runs until every event is
`sent` in the outbox (or `--event-timeout-s` passes); then `filedock events --json
--limit N` gives each event's `sent_at`, and the receiver its arrival times.

Prints a JSON summary and a table; writes bench/results/notify-<stamp>.json. Exits 1
when a file is lost or damaged, an event is missing or a sampled signature does not
verify; 2 when the harness could not measure; never on a missed target.
docs/benchmarks.md, "Notifications: a webhook on every done", holds the figures.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

SECRET = "whsec_" + base64.b64encode(b"filedock-bench-notify-secret-0123").decode()
FULL = {"files": 10_000, "rounds": 8}
QUICK = {"files": 300, "rounds": 1}
RATIO_BOUND = 0.9
LAG_BOUND_S = 10.0


# -- the receiver (a separate process) -------------------------------------------------


def serve_receiver(port: int, sample_every: int) -> None:
    """Answer every POST 204 at once; record each webhook-id's first arrival.

    GET /stats returns the arrivals, the duplicates and the sampled requests."""
    import asyncio

    import uvloop
    from aiohttp import web

    first: dict[str, float] = {}
    state: dict[str, Any] = {"requests": 0, "duplicates": 0, "last": None}
    samples: list[dict[str, Any]] = []

    def kept(headers: Any, body: bytes) -> dict[str, Any]:
        return {"headers": dict(headers), "body": body.decode("utf-8", "replace")}

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET":
            last = [kept(*state["last"])] if state["last"] else []
            doc = {
                "requests": state["requests"],
                "duplicates": state["duplicates"],
                "arrivals": first,
                "samples": samples + last,
            }
            return web.Response(body=json.dumps(doc).encode(), content_type="application/json")
        body = await request.read()
        now = time.time()
        wid = request.headers.get("webhook-id", "")
        state["requests"] += 1
        if wid in first:
            state["duplicates"] += 1
        else:
            first[wid] = now
        # Copied only when sampled: the receiver shares the service's two cores, and
        # what it spends an event is taken from the burst.
        if state["requests"] % sample_every == 1 or sample_every == 1:
            samples.append(kept(request.headers, body))
        state["last"] = (request.headers, body)
        return web.Response(status=204)

    async def main() -> None:
        server = web.Server(handle, access_log=None)
        runner = web.ServerRunner(server, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=512)
        await site.start()
        print("ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await runner.cleanup()

    # uvloop: a third less CPU a request than asyncio's loop, CPU taken from the burst.
    uvloop.run(main())


class Receiver:
    def __init__(self, python: str, sample_every: int) -> None:
        from fdbench.common import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.p = subprocess.Popen(
            [python, __file__, "--serve-receiver", str(self.port), str(sample_every)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"the receiver did not start: {line!r}")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=30) as r:
            return dict(json.loads(r.read()))

    def cpu(self) -> float:
        from fdbench.common import cpu_seconds

        return cpu_seconds(self.p.pid)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)


def verify_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    from standardwebhooks import Webhook
    from standardwebhooks.webhooks import WebhookVerificationError

    hook = Webhook(SECRET)
    ok, bad, types = 0, [], set()
    for s in samples:
        try:
            doc = hook.verify(s["body"].encode(), s["headers"])
        except WebhookVerificationError as e:
            bad.append(f"{s['headers'].get('webhook-id')}: {e}")
            continue
        if doc.get("id") != s["headers"].get("webhook-id"):
            bad.append(f"{s['headers'].get('webhook-id')}: id differs from the body's")
            continue
        ok += 1
        types.add(doc.get("type"))
    return {"checked": len(samples), "verified": ok, "refused": bad[:5], "types": sorted(types)}


# -- the runs --------------------------------------------------------------------------


def _cpu_by_process(pid: int) -> dict[str, float]:
    """CPU seconds of the service and each of its live descendants, by what it runs
    (`service`, `archive worker`, `notify process`), to tell where an event's cost goes."""
    from fdbench.common import process_tree, stat_cpu

    out: dict[str, float] = {}
    for p in process_tree(pid):
        try:
            cpu = stat_cpu(f"/proc/{p}/stat")
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if p == pid:
            what = "service"
        elif b"service.notify.process" in cmd:
            what = "notify process"
        elif b"to_process" in cmd:
            what = "archive worker"
        else:
            what = "other"
        out[what] = out.get(what, 0.0) + cpu
    return out


def _when(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, int | float):
        return float(v)
    text = str(v).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def _outbox_counts(fd: Any) -> dict[str, int]:
    path = fd.root / "state" / "ledger.sqlite3"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return dict(db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def _cli_events(fd: Any, python: str, service_dir: Path, limit: int) -> list[dict[str, Any]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(service_dir), str(BENCH)])
    for key in [k for k in env if k.startswith("FILEDOCK_")]:
        env.pop(key)
    out = subprocess.run(
        [
            python,
            "-m",
            "service",
            "events",
            "--config",
            str(fd.config),
            "--json",
            "--limit",
            str(limit),
        ],
        cwd=service_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode not in (0, 1):
        raise RuntimeError(f"filedock events: {out.returncode}: {out.stderr[-500:]}")
    return list(json.loads(out.stdout)) if out.stdout.strip() else []


def one_run(ctx: Any, args: argparse.Namespace, who: str, r: int) -> dict[str, Any]:
    from fdbench.common import rename_all
    from fdbench.contenders import verify_filedock
    from fdbench.scenarios import _check, _stage, _stop_fd

    n = args.files
    label = f"{who}-{r}"
    work = ctx.fresh(label)
    staging = work / "staging"
    names, sources = _stage(staging, n, 1024, hashes=True)
    receiver = None
    extra: dict[str, Any] = {}
    if who == "webhook":
        receiver = Receiver(str(REPO / ".venv" / "bin" / "python"), args.sample_every)
        hook = {"name": "hooks", "kind": "webhook", "url": receiver.url}
        hook["secret"] = {"env": "HOOK_SECRET"}
        extra["notify"] = [hook]
    fd = ctx.filedock(work, extra=extra)
    try:
        spy = ctx.start_filedock(fd, f"notify-{label}")
        spy_ext = None
        if args.py_spy_dir is not None and who in args.py_spy_for:
            args.py_spy_dir.mkdir(parents=True, exist_ok=True)
            spy_ext = subprocess.Popen(
                [
                    str(args.py_spy),
                    "record",
                    "--pid",
                    str(fd.pid),
                    "--rate",
                    "100",
                    "--subprocesses",
                    "--threads",
                    *([] if args.py_spy_busy else ["--idle"]),
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    str(args.py_spy_dir / f"notify-{label}.folded.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        fd.wait_ready()
        time.sleep(1.0)
        cpu0 = fd.cpu()
        by0 = _cpu_by_process(fd.pid)
        rcpu0 = receiver.cpu() if receiver else 0.0
        t0, t_renamed, _ = rename_all(staging, fd.transfer, names)
        done = fd.wait_done(n, timeout=n / 20 + 120)
        out: dict[str, Any] = {}
        if receiver is not None:
            deadline = time.monotonic() + args.event_timeout_s
            while time.monotonic() < deadline:
                c = _outbox_counts(fd)
                if c.get("sent", 0) + c.get("failed", 0) >= n:
                    break
                time.sleep(0.1)
            out["events_all_sent_seen_at"] = time.time()
        cpu1 = fd.cpu()
        by1 = _cpu_by_process(fd.pid)
        rcpu1 = receiver.cpu() if receiver else 0.0
        if spy_ext is not None:
            spy_ext.send_signal(signal.SIGINT)
            spy_ext.wait(60)
        rc = _stop_fd(ctx, fd, spy)
        rows = fd.rows()
        stats = receiver.stats() if receiver else None
    finally:
        if receiver is not None:
            receiver.stop()
    end = max((row["updated_at"] for row in rows if row["state"] == "done"), default=t0)
    verdict = verify_filedock(fd, sources, rows)
    _check(ctx, verdict, label)
    out.update(
        {
            "files": verdict["verified"],
            "files_per_s": n / (end - t0),
            "seconds": end - t0,
            "rename_s": t_renamed - t0,
            "cpu_ms_per_file": (done["cpu_s"] - cpu0) * 1000 / n,
            "cpu_s_to_all_sent": cpu1 - cpu0,
            "cpu_s_by_process": {k: round(v - by0.get(k, 0.0), 2) for k, v in by1.items()},
            "exit_code": rc,
            "verify": verdict,
            "last_done": end,
        }
    )
    if stats is not None:
        events = _cli_events(fd, ctx.python, ctx.service_dir, max(20_000, 2 * n))
        sent = [e for e in events if e.get("state") == "sent"]
        sent_at = [t for t in (_when(e.get("sent_at")) for e in sent) if t is not None]
        created = [t for t in (_when(e.get("created_at")) for e in events) if t is not None]
        arrivals = stats["arrivals"]
        ids = {e.get("id") for e in events}
        last_sent = max(sent_at, default=None)
        last_arrival = max(arrivals.values(), default=None)
        out["events"] = {
            "in_outbox": len(events),
            "sent": len(sent),
            "states": {
                s: sum(1 for e in events if e.get("state") == s)
                for s in sorted({e.get("state") for e in events})
            },
            "types": sorted({e.get("type") for e in events}),
            "received_ids": len(arrivals),
            "received_of_outbox": len(ids & set(arrivals)),
            "requests": stats["requests"],
            "duplicates": stats["duplicates"],
            "first_created_after_start_s": min(created) - t0 if created else None,
            "last_sent_after_last_done_s": None if last_sent is None else last_sent - end,
            "last_arrival_after_last_done_s": None if last_arrival is None else last_arrival - end,
            "first_arrival_after_start_s": (min(arrivals.values()) - t0 if arrivals else None),
            "events_per_s_while_sending": (
                len(arrivals) / (last_arrival - min(arrivals.values()))
                if arrivals and last_arrival and last_arrival > min(arrivals.values())
                else None
            ),
            # events received by the time the last file was done
            "received_by_last_done": sum(1 for t in arrivals.values() if t <= end),
            "receiver_cpu_s": rcpu1 - rcpu0,
            "signatures": verify_samples(stats["samples"]),
        }
        if last_sent is not None:
            out["events"]["lag_s"] = last_sent - end
    out["loadavg_1m"] = os.getloadavg()[0]
    ctx.clean(work)
    return out


def _brief(res: dict[str, Any]) -> str:
    s = (
        f"{res['files']:,} files, {res['files_per_s']:.0f} files/s,"
        f" {res['cpu_ms_per_file']:.2f} CPU ms/file"
    )
    ev = res.get("events")
    if ev:
        s += (
            f"; events {ev['received_ids']:,} received ({ev['received_by_last_done']:,} by the"
            f" last done), last sent_at +{ev['last_sent_after_last_done_s']:.2f}s, last arrival"
            f" +{ev['last_arrival_after_last_done_s']:.2f}s after the last done;"
            f" signatures {ev['signatures']['verified']}/{ev['signatures']['checked']}"
        )
    return s


def summarize(runs: dict[str, list[dict[str, Any]]], n: int) -> dict[str, Any]:
    from fdbench.common import summary

    a, b = runs["plain"], runs["webhook"]
    ratios = [y["files_per_s"] / x["files_per_s"] for x, y in zip(a, b, strict=False)]
    evs = [r["events"] for r in b]
    lag = [e["last_sent_after_last_done_s"] for e in evs]
    arr = [e["last_arrival_after_last_done_s"] for e in evs]
    delivered_all = all(e["received_of_outbox"] == n and e["sent"] == n for e in evs)
    lag_max = max((v for v in lag if v is not None), default=None)
    arr_max = max((v for v in arr if v is not None), default=None)
    out: dict[str, Any] = {
        "files": n,
        "files_per_s": {k: summary([r["files_per_s"] for r in v]) for k, v in runs.items()},
        "cpu_ms_per_file": {k: summary([r["cpu_ms_per_file"] for r in v]) for k, v in runs.items()},
        "ratio_b_over_a": summary(ratios),
        "last_sent_after_last_done_s": summary(lag),
        "last_arrival_after_last_done_s": summary(arr),
        "received_by_last_done": summary([e["received_by_last_done"] for e in evs]),
        "events_per_s_while_sending": summary([e["events_per_s_while_sending"] for e in evs]),
        "receiver_cpu_s": summary([e["receiver_cpu_s"] for e in evs]),
        "cpu_s_by_process": {
            k: {
                what: summary([r["cpu_s_by_process"].get(what, 0.0) for r in v])
                for what in sorted({w for r in v for w in r["cpu_s_by_process"]})
            }
            for k, v in runs.items()
        },
        "all_events_delivered": delivered_all,
        "signatures": {
            "checked": sum(e["signatures"]["checked"] for e in evs),
            "verified": sum(e["signatures"]["verified"] for e in evs),
        },
    }
    worst_ratio = min(ratios, default=None)
    med_ratio = out["ratio_b_over_a"]["median"]
    out["targets"] = [
        {
            "target": f"files/s with webhook ≥ {RATIO_BOUND} x without (per round)",
            "median": med_ratio,
            "min": worst_ratio,
            "pass_median": None if med_ratio is None else med_ratio >= RATIO_BOUND,
            "pass_every_round": None if worst_ratio is None else worst_ratio >= RATIO_BOUND,
        },
        {
            "target": f"all {n:,} events delivered within {LAG_BOUND_S:g} s of the last archive",
            "max_last_sent_s": lag_max,
            "max_last_arrival_s": arr_max,
            "all_delivered": delivered_all,
            "pass": delivered_all
            and lag_max is not None
            and lag_max <= LAG_BOUND_S
            and arr_max is not None
            and arr_max <= LAG_BOUND_S,
        },
    ]
    return out


def table(s: dict[str, Any]) -> str:
    from fdbench.report import fmt

    sig = s["signatures"]
    lines = [
        f"| contender ({s['files']:,} x 1 KiB) | files/s | CPU ms/file (to last done) |",
        "|---|---|---|",
    ]
    for k, label in (("plain", "A: no notify"), ("webhook", "B: webhook on every done")):
        lines.append(
            f"| {label} | {fmt(s['files_per_s'][k])} | {fmt(s['cpu_ms_per_file'][k], 2)} |"
        )
    lines += [
        "",
        "| measure | median (min-max) |",
        "|---|---|",
        f"| B ÷ A files/s, per round | {fmt(s['ratio_b_over_a'], 2)} |",
        f"| last done → last event `sent_at` | {fmt(s['last_sent_after_last_done_s'], 2, 's')} |",
        f"| last done → last arrival | {fmt(s['last_arrival_after_last_done_s'], 2, 's')} |",
        f"| events received by the last done | {fmt(s['received_by_last_done'])} |",
        f"| events/s, first to last arrival | {fmt(s['events_per_s_while_sending'])} |",
        f"| receiver CPU s | {fmt(s['receiver_cpu_s'], 2)} |",
        *(
            f"| CPU s to all sent, {who}: {what} | {fmt(v, 2)} |"
            for who, by in s["cpu_s_by_process"].items()
            for what, v in by.items()
        ),
        f"| signatures verified (sampled) | {sig['verified']}/{sig['checked']} |",
        "",
        "| target | measured | result |",
        "|---|---|---|",
    ]
    t1, t2 = s["targets"]
    r = (
        "met"
        if t1["pass_every_round"]
        else ("met at the median" if t1["pass_median"] else "missed")
    )
    lines.append(
        f"| {t1['target']} | median {t1['median']:.2f}, worst round {t1['min']:.2f} | {r} |"
    )
    lines.append(
        f"| {t2['target']} | last `sent_at` +{t2['max_last_sent_s']:.2f} s, last arrival "
        f"+{t2['max_last_arrival_s']:.2f} s (max over rounds); all delivered: "
        f"{t2['all_delivered']} | {'met' if t2['pass'] else 'missed'} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke: 300 files, 1 round")
    ap.add_argument("--files", type=int, default=None, help="files a burst (default 10,000)")
    ap.add_argument("--rounds", type=int, default=None, help="A/B rounds (default 8)")
    ap.add_argument("--sample-every", type=int, default=100, help="keep 1 request in N to verify")
    ap.add_argument(
        "--event-timeout-s",
        type=float,
        default=120.0,
        help="how long B waits after the last done for every event to be sent",
    )
    ap.add_argument(
        "--python",
        default=None,
        help="interpreter for filedock (default: .venv; e.g. a wrapper script that\n"
        "adds to PYTHONPATH, to try a library change without touching the venv)",
    )
    ap.add_argument("--label", default="", help="added to the results file name")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    ap.add_argument("--no-settle", action="store_true", help="leave the caches alone")
    ap.add_argument(
        "--py-spy-dir",
        type=Path,
        default=None,
        help="record a py-spy profile (raw, --idle) of each run here",
    )
    ap.add_argument(
        "--py-spy-busy",
        action="store_true",
        help="profile only the samples where a thread runs (py-spy without --idle)",
    )
    ap.add_argument("--py-spy", type=Path, default=Path("/tmp/spyenv/bin/py-spy"))
    ap.add_argument("--py-spy-for", default="plain,webhook", help="which contenders to profile")
    ap.add_argument(
        "--serve-receiver", nargs=2, metavar=("PORT", "SAMPLE_EVERY"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.serve_receiver:
        serve_receiver(int(args.serve_receiver[0]), int(args.serve_receiver[1]))
        return 0
    sizes = dict(QUICK if args.quick else FULL)
    if args.files is not None:
        sizes["files"] = args.files
    if args.rounds is not None:
        sizes["rounds"] = args.rounds
    args.files, args.rounds = sizes["files"], sizes["rounds"]
    args.py_spy_for = {x.strip() for x in args.py_spy_for.split(",")}

    from fdbench import scenarios
    from fdbench.common import BenchError, machine_info

    os.environ["HOOK_SECRET"] = SECRET
    base = Path(tempfile.mkdtemp(prefix="fd-notify-", dir=args.workdir))
    python = args.python or str(REPO / ".venv" / "bin" / "python")
    ctx = scenarios.Ctx(
        base=base,
        service_dir=REPO,
        python=python,
        quick=args.quick,
        runs=args.rounds,
        burst_files=args.files,
        sustained_rate=0,
        sustained_s=0,
        big_files=0,
        backlog_files=0,
        backlog_window_s=0,
        idle_window_s=0,
        idle_unrouted=0,
        peer_sustained=False,
        peer_big=False,
        settle=not args.no_settle,
        log=lambda m: print(m, flush=True),
    )
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "webhook": []}
    doc: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([sys.executable, *sys.argv]),
        "sizes": sizes,
        "machine": machine_info(base),
        "runs": runs,
    }
    code = 0
    t_all = time.monotonic()
    try:
        for r in range(args.rounds):
            # A then B in even rounds, B then A in odd ones: a drift of the host over a
            # run (its caches, other work) weighs on both alike.
            for who in ("plain", "webhook")[:: 1 if r % 2 == 0 else -1]:
                res = one_run(ctx, args, who, r)
                runs[who].append(res)
                print(f"  round {r + 1}/{args.rounds} {who}: {_brief(res)}", flush=True)
    except Exception as e:
        if not isinstance(e, BenchError):
            traceback.print_exc()
        print(f"  !! could not measure: {e!r}", flush=True)
        doc["error"] = repr(e)
        code = 2
    finally:
        ctx.stop_all()
        shutil.rmtree(base, ignore_errors=True)
    doc["elapsed_s"] = time.monotonic() - t_all
    doc["machine"]["loadavg_at_end"] = os.getloadavg()
    doc["machine"]["caches_dropped_between_runs"] = ctx.caches_dropped
    doc["lost_files"] = ctx.lost_files
    if code == 0:
        doc["summary"] = summarize(runs, args.files)
        print(json.dumps(doc["summary"], indent=2, default=str))
        print()
        print(table(doc["summary"]))
        if not doc["summary"]["all_events_delivered"]:
            code = 1
        sig = doc["summary"]["signatures"]
        if sig["verified"] != sig["checked"] or not sig["checked"]:
            code = 1
    if ctx.lost_files:
        code = 1
    args.results.mkdir(parents=True, exist_ok=True)
    suffix = ("-quick" if args.quick else "") + (f"-{args.label}" if args.label else "")
    out = args.results / f"notify-{time.strftime('%Y%m%dT%H%M%S')}{suffix}.json"
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nresults: {out}  ({doc['elapsed_s']:.0f}s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
