"""The CLI users script against: status, jobs, show, retry, exit codes."""

from __future__ import annotations

import json
import socket

from conftest import FiledockTree, free_port

from service.discovery.readiness import BUSY_REASON


def test_status_jobs_show_and_retry(tree: FiledockTree) -> None:
    tree.configure()
    flag = tree.base / "fixed"
    tree.drop("good.csv", b"fine\n")
    tree.drop("bad.csv", f"REJECT_UNLESS {flag}\n".encode())
    (tree.transfer / "waiting.tmp").write_bytes(b"half")
    assert tree.run_once().returncode == 1

    status = json.loads(tree.cli("status", "--json").stdout)
    assert status["jobs"] == {"done": 1, "failed": 1}
    assert status["folders"]["transfer"]["files"] == 1
    assert status["folders"]["failed"]["files"] == 3  # bad.csv, error.json, out/result.txt
    assert status["waiting_in_transfer"][0]["reason"].startswith("temporary name")
    text = tree.cli("status").stdout
    assert "transfer" in text and "done 1" in text

    failed = tree.jobs("--state", "failed")
    assert [j["name"] for j in failed] == ["bad.csv"]
    job_id = failed[0]["id"]
    shown = json.loads(tree.cli("show", job_id, "--json").stdout)
    assert shown["error_class"] == "rejected" and shown["failed_path"].endswith(job_id)
    assert tree.cli("show", "20990101T000000000Z-00000000").returncode == 1

    flag.write_text("")  # the operator fixed the cause
    r = tree.cli("retry", job_id)
    assert r.returncode == 0 and "queued" in r.stdout
    assert tree.run_once().returncode == 0
    shown = json.loads(tree.cli("show", job_id, "--json").stdout)
    assert shown["state"] == "done" and shown["attempts"] == 2
    assert [h.get("event", "attempt") for h in shown["history"]] == [
        "attempt",
        "manual_retry",
        "attempt",
    ]
    assert job_id in tree.archived() and job_id not in tree.failed()
    assert tree.cli("retry", job_id).returncode == 1  # done: nothing to retry


def test_help_lists_every_command() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, check=True
    ).stdout
    commands = ("run", "check-config", "status", "jobs", "show", "retry", "events", "replicas")
    for command in (*commands, "expectations", "reap"):
        assert command in out


def test_expectations_says_when_none_are_configured(tree: FiledockTree) -> None:
    tree.configure()
    result = tree.cli("expectations")
    assert result.returncode == 1
    assert "no route has arrival expectations" in result.stderr


def test_a_second_process_on_one_sqlite_ledger_is_refused(tree: FiledockTree) -> None:
    tree.configure()
    service = tree.start()
    second = tree.run_once()
    assert second.returncode == 2
    assert "another filedock is already running" in second.stderr
    assert "PostgreSQL" in second.stderr
    assert service.stop() == 0
    assert tree.run_once().returncode == 0  # the lock goes with the process

    # Each start was an instance of its own, named after the host; the refused one none.
    replicas = json.loads(tree.cli("replicas", "--json").stdout)
    assert [(r["name"], r["state"], r["jobs"]) for r in replicas] == [
        (socket.gethostname(), "stopped", 0)
    ] * 2
    assert replicas[1]["pid"] == service.proc.pid
    assert replicas[0]["instance"] != replicas[1]["instance"]
    assert replicas[0]["instance"] in tree.cli("replicas").stdout


def test_a_file_open_for_writing_waits_for_its_writer(tree: FiledockTree) -> None:
    """`status` says why the file waits; `run --once` leaves it where it is."""
    tree.configure()
    with open(tree.transfer / "upload.csv", "wb") as writer:
        writer.write(b"half of it")
        writer.flush()
        status = json.loads(tree.cli("status", "--json").stdout)
        assert status["waiting_in_transfer"] == [
            {"path": "upload.csv", "route": "main", "reason": BUSY_REASON}
        ]
        result = tree.run_once()
        assert result.returncode == 0, result.stdout[-2000:]
        assert "not claimed: open for writing" in result.stdout
        assert tree.rows() == []
        writer.write(b" and the rest\n")
    assert tree.run_once().returncode == 0
    assert [(r["name"], r["size"], r["state"]) for r in tree.rows()] == [
        (b"upload.csv", len(b"half of it and the rest\n"), "done")
    ]


def test_status_and_show_tell_where_a_delivery_stands(tree: FiledockTree) -> None:
    down = f"http://127.0.0.1:{free_port()}/in/{{name}}"  # nothing listens there
    sink = {"name": "erp", "kind": "http", "url": down, "backoff_s": 3600}
    tree.configure(routes=[{"name": "hub", "match": "**", "importer": "none", "deliver": [sink]}])
    tree.drop("a.csv", b"id\n")
    assert tree.run_once().returncode == 0  # nothing failed: the sink waits for its retry
    assert tree.run_once().returncode == 0  # a restart keeps the schedule: not due yet

    status = json.loads(tree.cli("status", "--json").stdout)
    assert status["jobs"] == {"delivering": 1}
    (backlog,) = status["sinks"]
    assert (backlog["route"], backlog["sink"], backlog["open"]) == ("hub", "erp", 1)
    assert "hub/erp: 1, the oldest since" in tree.cli("status").stdout

    (job,) = tree.jobs("--state", "delivering")
    shown = tree.cli("show", job["id"]).stdout
    assert "sink erp: waiting, 1 attempt(s), last error sink_unreachable" in shown
    assert "next attempt" in shown
    assert tree.cli("retry", job["id"]).returncode == 1  # not failed: nothing to retry
