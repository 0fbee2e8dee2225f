"""A delivery killed (SIGKILL, `FILEDOCK_TEST_CRASH_AT`) before, during and after it
reaches the remote, then the service started again: each file ends on each sink once,
under its final name, with the right bytes, no temp file left there, and a receipt.

The sinks are real: a folder on a second filesystem (a tmpfs the test mounts) and an
HTTP receiver on loopback; the S3 stores are in `test_delivery_s3.py`.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import FiledockTree, Mount
from http_receiver import Receiver


def hub(*sinks: dict[str, Any]) -> list[dict[str, Any]]:
    """A route that receives, delivers and archives (no importer)."""
    return [{"name": "hub", "match": "**", "importer": "none", "deliver": list(sinks)}]


def killed_then_finished(tree: FiledockTree, point: str) -> dict[str, Any]:
    """One file through a run killed at `point`, then through a clean run; its job as
    `filedock show --json` gives it."""
    crashed = tree.run_once(env=tree.env(FILEDOCK_TEST_CRASH_AT=f"{point}:1"))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    (row,) = tree.rows()
    assert row["state"] == "delivering"
    again = tree.run_once()
    assert again.returncode == 0, again.stderr[-2000:]
    shown = tree.cli("show", row["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    job: dict[str, Any] = json.loads(shown.stdout)
    assert job["state"] == "done"
    manifest = json.loads((Path(job["archive_path"]) / "manifest.json").read_text())
    assert manifest["deliveries"] == job["deliveries"]  # the receipts are archived too
    return job


@pytest.mark.parametrize(
    ("point", "found", "attempts"),
    [("before_delivery", False, 2), ("mid_delivery", False, 2), ("after_delivery", True, 2)],
)
def test_a_folder_sink_killed_at_any_point_holds_the_file_once(
    tree: FiledockTree, mount: Mount, point: str, found: bool, attempts: int
) -> None:
    root = mount()
    tree.configure(routes=hub({"name": "share", "kind": "directory", "path": str(root)}))
    body = b"0123456789" * 50_000
    tree.drop("in/data.bin", body)
    job = killed_then_finished(tree, point)
    (sink,) = job["deliveries"]
    assert (sink["state"], sink["attempts"]) == ("delivered", attempts)
    (receipt,) = sink["receipts"]
    assert receipt["found"] is found
    assert receipt["sha256"] == hashlib.sha256(body).hexdigest()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["in", "in/data.bin"]
    assert (root / "in" / "data.bin").read_bytes() == body


@pytest.mark.parametrize("point", ["before_delivery", "after_delivery"])
def test_an_http_sink_killed_before_or_after_the_upload_gets_the_body_once(
    tree: FiledockTree, receiver: Receiver, point: str
) -> None:
    url = f"{receiver.url}/in/{{job_id}}/{{name}}"
    tree.configure(routes=hub({"name": "erp", "kind": "http", "url": url}))
    tree.drop("a.csv", b"id\n1\n")
    job = killed_then_finished(tree, point)
    assert receiver.writes == [f"/in/{job['id']}/a.csv"]  # stored once
    assert receiver.stored[f"/in/{job['id']}/a.csv"] == b"id\n1\n"
    (sink,) = job["deliveries"]
    assert (sink["state"], sink["attempts"]) == ("delivered", 2)
    keys = {seen.headers["idempotency-key"] for seen in receiver.seen}
    assert len(keys) == 1  # the retry carried the first attempt's key
