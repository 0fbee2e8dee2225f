"""The running service sends its events from a process of its own, at a lower CPU
priority than the intake (`service/notify/process.py`): started with the service,
counted in the service's metrics, started again when it dies, and a channel that
cannot be used as configured still stops the start, named."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import HOOK_SECRET, FiledockTree, Service, configure_webhook, wait_for
from webhook_receiver import WebhookReceiver


def notify_processes(service: Service) -> list[int]:
    """The service's children running the dispatcher."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == service.proc.pid and b"service.notify.process" in cmdline:
            found.append(int(pid))
    return found


def sent(service: Service) -> float:
    for line in service.get("/metrics")[1].decode().splitlines():
        if line.startswith('filedock_events_sent_total{channel="downstream"}'):
            return float(line.split()[1])
    return 0.0


def test_the_service_sends_from_its_own_process_at_a_lower_priority(
    tree: FiledockTree, hooks: WebhookReceiver
) -> None:
    service = tree.start(env=configure_webhook(tree, hooks))
    (child,) = notify_processes(service)
    # The sending thread (the child's main thread) yields the CPU to the intake's.
    assert os.sched_getscheduler(child) == os.SCHED_IDLE
    assert os.sched_getscheduler(service.proc.pid) == os.SCHED_OTHER
    # Its SQLite writer thread keeps the service's policy: never starved holding the lock.
    threads = [int(tid) for tid in os.listdir(f"/proc/{child}/task")]
    assert os.SCHED_OTHER in {os.sched_getscheduler(tid) for tid in threads}
    tree.drop("a.csv", b"fine\n")
    wait_for(lambda: len(hooks.accepted) == 1, timeout=30, what="the event of a.csv")
    assert hooks.accepted[0].doc["subject"] == "main/a.csv"
    # What the child counted reaches the service's /metrics.
    wait_for(lambda: sent(service) == 1, timeout=10, what="events_sent_total 1")
    assert service.stop() == 0
    wait_for(lambda: not Path(f"/proc/{child}").exists(), timeout=10, what="the child gone")


def test_a_dead_notify_process_is_started_again_and_nothing_is_lost(
    tree: FiledockTree, hooks: WebhookReceiver
) -> None:
    service = tree.start(env=configure_webhook(tree, hooks))
    (child,) = notify_processes(service)
    os.kill(child, signal.SIGKILL)
    tree.drop("b.csv", b"fine\n")  # done while no process sends: it waits in the outbox
    wait_for(lambda: len(hooks.accepted) == 1, timeout=30, what="the event of b.csv")
    (again,) = notify_processes(service)
    assert again != child
    assert service.metric("filedock_notify_process_restarts_total") == 1
    ended = [r for r in service.log_lines() if r["msg"].startswith("the notify process ended")]
    assert ended and ended[0]["level"] == "ERROR" and ended[0]["exit_code"] == -signal.SIGKILL
    assert service.stop() == 0


def test_a_missing_secret_stops_a_running_service_naming_the_channel(
    tree: FiledockTree, hooks: WebhookReceiver
) -> None:
    configure_webhook(tree, hooks)
    service = tree.start(env=tree.env(), wait_ready=False)  # no HOOK_SECRET
    assert service.proc.wait(timeout=60) == 2
    assert "notify.downstream" in service.log() and "HOOK_SECRET" in service.log()
    assert HOOK_SECRET not in service.log()
