"""`filedock retry`: a failed job's folder back to proc/ and the job due again (or, for a
failed delivery, back to its sinks not delivered yet); its history is kept."""

from __future__ import annotations

import time
from typing import Any

import anyio

from service.settings import Settings

__all__ = ["retry_job"]


async def retry_job(
    settings: Settings, ledger: Any, job: Any, *, sink: str | None = None
) -> str | None:
    """Move a failed job's folder back to proc/ and mark it due; None when done.

    A job whose delivery failed goes back to its sinks, not to its importer: the sinks
    not delivered yet (or `sink` alone) start afresh; delivered ones keep their receipt.
    """
    from service.storage.archive import read_json
    from service.storage.fsutil import move_tree

    if job.state != "failed":
        return f"is {job.state}, not failed: only failed jobs can be retried"
    deliveries = await ledger.deliveries(job.id) if job.error_class == "delivery_failed" else []
    if sink is not None and sink not in {d.sink for d in deliveries}:
        names = ", ".join(d.sink for d in deliveries) or "none: its delivery did not fail"
        return f"has no sink {sink!r} to retry (its sinks: {names})"
    failed_dir = settings.folder("failed") / job.id
    proc_dir = settings.folder("proc") / job.id
    if not failed_dir.is_dir():
        return f"{failed_dir} is gone (reaped?): nothing to retry"
    if job.outcome == "set_aside" and job.error_class in (
        "symlink",
        "not_regular_file",
        "hard_link",
    ):
        return f"was set aside as {job.error_class}: it can never be imported"
    previous = read_json(failed_dir / "error.json") or {}
    await anyio.to_thread.run_sync(move_tree, failed_dir, proc_dir)
    (proc_dir / "error.json").unlink(missing_ok=True)
    now = time.time()
    history = [
        *job.history,
        {
            "event": "manual_retry",
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "previous_failed_at": previous.get("failed_at"),
            "previous_error_class": job.error_class,
            "previous_error": (job.error or "")[:500],
        },
    ]
    fields: dict[str, Any] = {
        "state": "waiting",
        "next_attempt_at": now,
        "outcome": None,
        "error_class": None,
        "error": None,
        "failed_path": None,
        "history": history,
        "updated_at": now,
        "owner": None,
        "lease_expires_at": None,
    }
    if job.error_class == "modified_during_processing":
        # The operator asks for the file as it is now: its content is vetted anew.
        fields.update(sha256=None, size=None, mtime_ns=None)
    if deliveries:
        again = [d for d in deliveries if d.state != "delivered" and sink in (None, d.sink)]
        for d in again:
            d.state, d.attempts, d.next_attempt_at, d.updated_at = "pending", 0, None, now
        fields.update(state="delivering", outcome=_imported_outcome(job.history))
        await ledger.save_deliveries(again, [(job.id, fields)])
        return None
    await ledger.update(job.id, fields)
    return None


def _imported_outcome(history: list[dict[str, Any]]) -> str:
    """What the import of a job whose delivery failed had ended with."""
    for entry in reversed(history):
        if entry.get("event") == "delivering":
            return str(entry.get("outcome", "imported"))
    return "imported"
