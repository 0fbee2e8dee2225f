"""The `filedock` command (`python -m service` is the same).

Exit codes (a contract, docs/contracts.md): `run --once` 0 when every job ended
done, 1 when any ended failed, 2 on a configuration error; other commands 0 on
success, 1 for not found / nothing to do, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from service import __version__
from service.errors import ConfigError, StartupError
from service.ledger.base import STATES
from service.storage.names import rfc3339

if TYPE_CHECKING:  # imported in main(): the archive worker process loads this module
    from service.ledger import Ledger  # (the `filedock` script) and needs no pydantic
    from service.settings import Settings

__all__ = ["main"]

T = TypeVar("T")
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="YAML or TOML configuration file (default: $FILEDOCK_CONFIG); "
        "FILEDOCK_* environment variables override it",
    )
    parser = argparse.ArgumentParser(
        prog="filedock",
        description="Event-driven file intake: claims each complete file dropped into "
        "transfer/, imports it, delivers it to the route's sinks, and archives it (or sets it "
        "aside in failed/ with the reason); tells the notify channels what happened.",
        epilog="Docs: README.md and docs/ in the source tree.",
    )
    parser.add_argument("--version", action="version", version=f"filedock {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", parents=[common], help="serve (watch, import, deliver, archive, notify)"
    )
    run.add_argument(
        "--once",
        action="store_true",
        help="drain what is in transfer/ (and due retries), then exit: "
        "0 all done, 1 any failed, 2 configuration error",
    )
    sub.add_parser(
        "check-config", parents=[common], help="validate and print the effective configuration"
    )
    status = sub.add_parser(
        "status",
        parents=[common],
        help="files per folder (count, bytes, oldest); jobs per state; deliveries per sink;"
        " arrival expectations",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")

    jobs = sub.add_parser("jobs", parents=[common], help="list jobs from the ledger, newest first")
    jobs.add_argument("--state", choices=STATES)
    jobs.add_argument("--route")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    jobs.add_argument("--json", action="store_true", help="a JSON array (see docs/contracts.md)")

    show = sub.add_parser(
        "show", parents=[common], help="one job, with its attempts and each sink's receipt"
    )
    show.add_argument("job_id", metavar="ID")
    show.add_argument("--json", action="store_true")

    retry = sub.add_parser(
        "retry", parents=[common], help="send a failed job back for a new attempt (history kept)"
    )
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("job_id", metavar="ID", nargs="?")
    target.add_argument("--all-failed", action="store_true", help="every failed job")
    retry.add_argument(
        "--sink",
        metavar="NAME",
        help="of a job whose delivery failed: send to this sink only (default: every sink"
        " not delivered yet; delivered sinks are never sent to again)",
    )

    events = sub.add_parser(
        "events", parents=[common], help="the outbox: events for the notify channels, newest first"
    )
    events.add_argument("--pending", action="store_true", help="only those not sent yet")
    events.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    events.add_argument("--json", action="store_true", help="a JSON array")

    expectations = sub.add_parser(
        "expectations",
        parents=[common],
        help="each route's arrival expectations: the next deadline and the last windows'"
        " judgements (on_time, late, missing, failed)",
    )
    expectations.add_argument(
        "--last", type=int, default=5, help="judged windows shown per expectation (default 5)"
    )
    expectations.add_argument("--json", action="store_true", help="a JSON array")
    replicas = sub.add_parser(
        "replicas",
        parents=[common],
        help="the service's instances on this ledger, live ones first, then those ended in"
        " the last 7 days: heartbeat age, jobs held",
    )
    replicas.add_argument(
        "--json", action="store_true", help="a JSON array (see docs/contracts.md)"
    )

    reap = sub.add_parser("reap", parents=[common], help="apply the retention now")
    reap.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from service.settings import load_settings

    try:
        settings = load_settings(args.config)
        if args.command == "check-config":
            return check_config(settings)
        from service.face.logs import setup_logging

        setup_logging(settings.log_level if args.command == "run" else "WARNING")
        commands: dict[str, Callable[[Settings, argparse.Namespace], Awaitable[int]]] = {
            "run": cmd_run,
            "status": cmd_status,
            "jobs": cmd_jobs,
            "show": cmd_show,
            "retry": cmd_retry,
            "events": cmd_events,
            "expectations": cmd_expectations,
            "replicas": cmd_replicas,
            "reap": cmd_reap,
        }
        return anyio.run(commands[args.command], settings, args)
    except ConfigError as e:
        print(f"filedock: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as e:
        print(f"filedock: cannot start: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def check_config(settings: Settings) -> int:
    from service.discovery.routes import unreachable_routes
    from service.importers import build_importer

    problems = unreachable_routes(list(settings.routes))
    for route in settings.routes:
        try:
            build_importer(route, limiter=anyio.CapacityLimiter(1))
        except ConfigError as e:
            problems.append(f"routes.{route.name}.importer: {e}")
    if problems:
        print("filedock: invalid configuration:\n  " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_CONFIG
    doc = settings.model_dump(mode="json")
    doc["ledger_url"] = settings.effective_ledger_url
    doc["folders"] = {name: str(settings.folder(name)) for name in doc["folders"]}
    import yaml

    print(yaml.safe_dump(doc, sort_keys=False), end="")
    return EXIT_OK


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from service.app import App
    from service.discovery.routes import unreachable_routes

    problems = unreachable_routes(list(settings.routes))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return await App(settings, once=args.once).run()


async def _with_ledger(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    from service.ledger import ledger_for_url

    url = settings.effective_ledger_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise ConfigError(f"no ledger at {url}: has filedock run with this configuration?")
    ledger = ledger_for_url(url)
    await ledger.open()
    try:
        return await fn(ledger)
    finally:
        await ledger.close()


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from service.arrivals.report import expectations_report
    from service.face.progress import describe
    from service.face.status import folder_report, render_status, waiting_report
    from service.storage.progress import progress_dir, read_progress

    folders = await anyio.to_thread.run_sync(folder_report, settings)
    waiting = await anyio.to_thread.run_sync(waiting_report, settings)

    async def read(ledger: Ledger) -> tuple[dict[str, int], list[dict[str, Any]], list[Any]]:
        backlog = [
            {"route": route, "sink": sink, "open": n, "oldest": rfc3339(oldest)}
            for route, sink, n, oldest in sorted(await ledger.delivery_backlog())
        ]
        expected = await expectations_report(settings, ledger, time.time(), last=1)
        return await ledger.counts(), backlog, expected

    try:
        counts, sinks, expected = await _with_ledger(settings, read)
    except ConfigError:
        counts, sinks, expected = {}, [], []
    now = time.time()
    in_progress = read_progress(progress_dir(settings.folder("state")), now=now)
    doc = {
        "folders": folders,
        "jobs": counts,
        "in_progress": [{**p, "shown": describe(p, now)} for p in in_progress],
        "waiting_in_transfer": waiting,
        "sinks": sinks,
        "expectations": expected,
    }
    if args.json:
        _print_json(doc)
    else:
        print(render_status(doc))
    return EXIT_OK


async def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    records = await _with_ledger(
        settings,
        lambda ledger: ledger.query(
            states=[args.state] if args.state else None, route=args.route, limit=args.limit
        ),
    )
    if args.json:
        _print_json([r.to_json() for r in records])
        return EXIT_OK
    if not records:
        print("no jobs")
        return EXIT_FAILED
    for r in records:
        j = r.to_json()
        print(
            f"{j['id']}  {j['state']:<9} {j['outcome'] or '-':<9} {j['route']:<12} "
            f"{j['attempts']:>2}  {j['name']}"
            + (f"  [{j['error_class']}]" if j["error_class"] else "")
        )
    return EXIT_OK


async def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    from service.face.progress import describe
    from service.face.status import render_job
    from service.storage.progress import progress_dir, read_progress

    async def read(ledger: Ledger) -> dict[str, Any] | None:
        record = await ledger.get(args.job_id)
        if record is None:
            return None
        doc = record.to_json()
        doc["deliveries"] = [d.to_json() for d in await ledger.deliveries(record.id)]
        now = time.time()
        for p in read_progress(progress_dir(settings.folder("state")), now=now):
            if p.get("job_id") == record.id:
                doc["progress"] = describe(p, now)
        return doc

    doc = await _with_ledger(settings, read)
    if doc is None:
        print(f"filedock: no job {args.job_id}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        _print_json(doc)
    else:
        print(render_job(doc))
    return EXIT_OK


async def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from service.face.retry import retry_job
    from service.ledger import JobRecord

    async def go(ledger: Ledger) -> int:
        if args.all_failed:
            targets: list[JobRecord] = await ledger.query(states=["failed"], limit=None)
        else:
            one = await ledger.get(args.job_id)
            if one is None:
                print(f"filedock: no job {args.job_id}", file=sys.stderr)
                return EXIT_FAILED
            targets = [one]
        sent = 0
        for job in targets:
            problem = await retry_job(settings, ledger, job, sink=args.sink)
            if problem:
                print(f"filedock: {job.id}: {problem}", file=sys.stderr)
            else:
                sent += 1
                print(f"{job.id}: queued for a new attempt")
        return EXIT_OK if sent else EXIT_FAILED

    return await _with_ledger(settings, go)


async def cmd_events(settings: Settings, args: argparse.Namespace) -> int:
    records = await _with_ledger(
        settings, lambda ledger: ledger.outbox_query(pending_only=args.pending, limit=args.limit)
    )
    if args.json:
        _print_json([r.to_json() for r in records])
        return EXIT_OK
    if not records:
        print("no events")
        return EXIT_FAILED
    for r in records:
        j = r.to_json()
        line = f"{j['created_at']}  {j['state']:<7} {j['channel']:<12} {j['type']:<26} {j['id']}"
        if j["state"] != "sent" and j["attempts"]:
            line += f"  [{j['attempts']} attempt(s): {j['error']}]"
        print(line)
    return EXIT_OK


async def cmd_expectations(settings: Settings, args: argparse.Namespace) -> int:
    from service.arrivals.report import expectations_report, render_expectations

    if not any(route.expect for route in settings.routes):
        print("no route has arrival expectations (expect: in a route)", file=sys.stderr)
        return EXIT_FAILED

    async def read(ledger: Ledger) -> list[dict[str, Any]]:
        return await expectations_report(settings, ledger, time.time(), last=args.last)

    report = await _with_ledger(settings, read)
    if args.json:
        _print_json(report)
    else:
        print("\n".join(render_expectations(report)))
    return EXIT_OK


async def cmd_replicas(settings: Settings, args: argparse.Namespace) -> int:
    from service.face.replicas import render, replicas_report

    records = await _with_ledger(settings, lambda ledger: ledger.replicas())
    report = replicas_report(records, time.time(), settings.lease_s)
    if args.json:
        _print_json(report)
        return EXIT_OK
    if not report:
        print("no replicas")
        return EXIT_FAILED
    print(render(report))
    return EXIT_OK


async def cmd_reap(settings: Settings, args: argparse.Namespace) -> int:
    from service.face.metrics import Metrics
    from service.upkeep.reaper import Reaper

    async def go(ledger: Ledger) -> int:
        reaper = Reaper(settings, ledger, Metrics())
        while True:  # a pass handles one bounded batch per kind
            report = await reaper.reap_once(dry_run=args.dry_run)
            print(report.render())
            if args.dry_run or not report.more:
                return EXIT_OK

    return await _with_ledger(settings, go)


def _print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, ensure_ascii=True)
    sys.stdout.write("\n")
