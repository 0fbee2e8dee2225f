"""`filedock replicas`: the instances that share this ledger, live ones first, each with
its heartbeat's age and the unfinished jobs it holds (see `upkeep/replicas.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.ledger.base import ReplicaRecord
from service.storage.names import rfc3339
from service.upkeep.replicas import Host, ended

__all__ = ["render", "replicas_report"]


def replicas_report(
    records: Sequence[ReplicaRecord], now: float, lease_s: float, host: Host | None = None
) -> list[dict[str, Any]]:
    """Each instance as JSON (docs/contracts.md): `state` is `live` (its heartbeat is
    current and nothing says it has ended), `stopped` (it stopped cleanly) or `gone`
    (`reason` says how that is known); live ones first, then the newest start first."""
    host = host or Host.here()
    out: list[dict[str, Any]] = []
    for r in records:
        why = ended(r, now, lease_s, host)
        state = "live" if why is None else "stopped" if why == "stopped" else "gone"
        out.append(
            {
                "instance": r.instance,
                "name": r.name,
                "host": r.host,
                "pid": r.pid,
                "version": r.version,
                "started_at": rfc3339(r.started_at),
                "heartbeat_at": rfc3339(r.heartbeat_at),
                "heartbeat_age_s": round(max(0.0, now - r.heartbeat_at), 1),
                "stopped_at": rfc3339(r.stopped_at),
                "jobs": r.jobs,
                "state": state,
                "reason": why,
            }
        )
    out.sort(key=lambda d: d["state"] != "live")  # stable: newest first within each
    return out


def render(report: Sequence[dict[str, Any]]) -> str:
    """The report for a person: one line per instance, and why a gone one is gone."""
    lines = [f"{'instance':<32} {'state':<7} {'heartbeat age':>13} {'jobs':>6}  {'host':<20} pid"]
    for d in report:
        line = (
            f"{d['instance']:<32} {d['state']:<7} {d['heartbeat_age_s']:>11.1f} s"
            f" {d['jobs']:>6}  {d['host']:<20} {d['pid']}"
        )
        lines.append(line + (f"  ({d['reason']})" if d["state"] == "gone" else ""))
    return "\n".join(lines)
