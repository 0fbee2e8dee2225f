"""`filedock status` and `show`: what each folder holds (Kofa's listing), why files
wait (both blocking: run in a worker thread), and the reports as text.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from service.discovery.readiness import BUSY_REASON, Readiness
from service.discovery.routes import Router
from service.settings import Settings
from service.storage.fsutil import tree_entries
from service.storage.names import display_name, rfc3339
from service.storage.writers import LeaseCheck, open_and_check

__all__ = ["folder_report", "render_job", "render_status", "waiting_report"]

FOLDERS = ("transfer", "proc", "archive", "failed", "temp")
_WAITING_SHOWN = 1000


def folder_report(settings: Settings) -> dict[str, dict[str, Any]]:
    """Per folder: regular files, their bytes and the oldest one's mtime."""
    report: dict[str, dict[str, Any]] = {}
    for name in FOLDERS:
        files = size = 0
        oldest: float | None = None
        for entry in tree_entries(settings.folder(name)):
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            files += 1
            size += st.st_size
            oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
        report[name] = {"files": files, "bytes": size, "oldest": rfc3339(oldest)}
    return report


def waiting_report(settings: Settings) -> list[dict[str, Any]]:
    """Files in transfer/ that are not claimed yet, each with why it waits."""
    transfer = settings.folder("transfer")
    tb = os.fsencode(transfer)
    router = Router(list(settings.routes))
    readiness = Readiness(transfer)
    out: list[dict[str, Any]] = []
    now = time.time()
    for entry in tree_entries(transfer):
        rel = os.fsencode(entry.path)[len(tb) + 1 :]
        is_dir = entry.is_dir(follow_symlinks=False)
        c = router.classify(rel, is_dir=is_dir)
        if is_dir and c.kind != "candidate":
            continue
        if c.kind == "unrouted":
            reason = "unrouted: matches no route"
        elif c.kind == "ignored":
            reason = f"temporary name, ignored by route {c.route.name if c.route else '?'}"
        elif c.kind == "companion":
            reason = "marker or checksum file, claimed with its data file"
        elif c.route is not None and c.route.readiness == "stable":
            age = now - entry.stat(follow_symlinks=False).st_mtime
            reason = (
                f"settling: modified {age:.0f}s ago (settle_s={c.route.settle_s:g})"
                if age < c.route.settle_s
                else "ready: queued for a claim"
            )
        else:
            assert c.route is not None
            reason = readiness.why_not_ready(c.route, rel, None) or "ready: queued for a claim"
        if reason.startswith("ready") and _open_for_writing(tb + b"/" + rel):
            reason = BUSY_REASON
        out.append(
            {
                "path": display_name(rel),
                "route": c.route.name if c.route else None,
                "reason": reason,
            }
        )
        if len(out) >= _WAITING_SHOWN:
            break
    return out


def _open_for_writing(path: bytes) -> bool:
    fd, writers = open_and_check(path)
    if fd is not None:
        os.close(fd)
    return writers is LeaseCheck.WRITING


def render_status(doc: dict[str, Any]) -> str:
    """`filedock status` for people: folders, jobs, work in progress, deliveries not done,
    arrival expectations, and what waits in `transfer/` and why."""
    from service.arrivals.report import render_expectations

    lines = [f"{'folder':<10} {'files':>9} {'bytes':>14}  oldest"]
    for name, f in doc["folders"].items():
        lines.append(f"{name:<10} {f['files']:>9} {f['bytes']:>14}  {f['oldest'] or '-'}")
    jobs = ", ".join(f"{k} {v}" for k, v in sorted(doc["jobs"].items())) or "none"
    lines += ["", f"jobs: {jobs}"]
    if doc["in_progress"]:
        lines += ["", "large jobs in progress:"]
        lines += [f"  {p['job_id']} ({p['route']}) {p['shown']}" for p in doc["in_progress"]]
    if doc["sinks"]:
        lines += ["", "deliveries not done yet (pending, running or waiting for a retry):"]
        lines += [
            f"  {b['route']}/{b['sink']}: {b['open']}, the oldest since {b['oldest']}"
            for b in doc["sinks"]
        ]
    if doc["expectations"]:
        lines += ["", "arrival expectations (the last window judged):"]
        lines += [f"  {line}" for line in render_expectations(doc["expectations"])]
    if doc["waiting_in_transfer"]:
        lines += ["", "waiting in transfer/ (not claimed yet):"]
        lines += [f"  {w['path']}: {w['reason']}" for w in doc["waiting_in_transfer"]]
    return "\n".join(lines)


def render_job(doc: dict[str, Any]) -> str:
    """`filedock show ID` for people: the job's fields, each attempt, each sink with its
    receipts."""
    lines = [
        f"{key:>15}: {value}"
        for key, value in doc.items()
        if key not in ("history", "deliveries") and value is not None
    ]
    lines += [f"{'attempt':>15}: " + json.dumps(h, ensure_ascii=True) for h in doc["history"]]
    for d in doc["deliveries"]:
        line = f"{d['state']}, {d['attempts']} attempt(s)"
        if d["error_class"]:
            line += f", last error {d['error_class']}: {d['error']}"
        if d["next_attempt_at"] and d["state"] == "waiting":
            line += f", next attempt {d['next_attempt_at']}"
        lines.append(f"{'sink ' + d['sink']:>15}: {line}")
        lines += [f"{'':>15}  receipt: " + json.dumps(r, ensure_ascii=True) for r in d["receipts"]]
    return "\n".join(lines)
