"""The `python` importer's group runner, driven directly: real worker threads, real files.

Quick imports of a sync callable share a worker thread's call (`run_group`); what each
job gets back must still be its own, and a hung import must be charged alone, without
its thread, once abandoned, starting any other job again.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from conftest import wait_for

from service.errors import Reject
from service.importers import ImportJob
from service.importers.python import PythonImporter
from service.settings import PythonImporterSettings

CALLS: list[str] = []  # job ids, in the order the callable was entered
HUNG: list[int] = []  # the thread that ran the hung import


def behave(job: ImportJob) -> dict[str, str]:
    """The callable under test: the file's first word says what to do."""
    CALLS.append(job.id)
    word = job.path.read_bytes().split(b"\n", 1)[0]
    if word == b"HANG":
        HUNG.append(threading.get_ident())
        time.sleep(1.5)
    elif word == b"REJECT":
        raise Reject("the file asked to be rejected")
    elif word == b"RAISE":
        raise RuntimeError(f"failed on {job.id}")
    return {"job": job.id}


@pytest.fixture
def importer() -> PythonImporter:
    CALLS.clear()
    HUNG.clear()
    settings = PythonImporterSettings(kind="python", callable="test_python_importer:behave")
    return PythonImporter(settings, limiter=anyio.CapacityLimiter(4))


def jobs(tmp_path: Path, *words: bytes) -> list[ImportJob]:
    out = []
    for n, word in enumerate(words):
        path = tmp_path / f"f{n}.csv"
        path.write_bytes(word + b"\n")
        out.append(
            ImportJob(
                id=f"job-{n}",
                route="main",
                path=path,
                name=path.name.encode(),
                relative_path=path.name.encode(),
                out_dir=tmp_path / "out",
                temp_dir=tmp_path / "temp",
                attempt=1,
                size=path.stat().st_size,
                sha256="",
            )
        )
    return out


async def test_each_job_of_a_group_gets_its_own_result_or_error(
    importer: PythonImporter, tmp_path: Path
) -> None:
    group = jobs(tmp_path, b"OK", b"REJECT", b"OK", b"RAISE", b"OK")
    outcomes = await importer.run_group(group, timeout_s=30)
    assert CALLS == [j.id for j in group]  # each once, in order
    for job, outcome in zip(group, outcomes, strict=True):
        word = job.path.read_bytes().strip()
        if word == b"OK":
            assert outcome.error is None and outcome.result is not None
            assert outcome.result.detail["job"] == job.id
        else:
            assert outcome.result is None
            assert isinstance(outcome.error, Reject if word == b"REJECT" else RuntimeError)
        assert outcome.elapsed_s >= 0
    assert "job-3" in str(outcomes[3].error)


async def test_a_hung_import_is_charged_alone_and_no_job_runs_twice(
    importer: PythonImporter, tmp_path: Path
) -> None:
    group = jobs(tmp_path, b"OK", b"OK", b"HANG", b"OK", b"OK")
    started = time.monotonic()
    outcomes = await importer.run_group(group, timeout_s=0.3)
    took = time.monotonic() - started
    assert [type(o.error) for o in outcomes] == [type(None)] * 2 + [TimeoutError] + [type(None)] * 2
    assert outcomes[2].elapsed_s >= 0.3
    assert [o.result.detail["job"] for o in outcomes if o.result] == [
        "job-0",
        "job-1",
        "job-3",
        "job-4",
    ]
    assert took < 1.5, "the jobs after the hung one waited for it to return"
    # The abandoned thread returns later: it must not start job-3 or job-4 again, and
    # once it has left its group call, it no longer can.
    (hung,) = HUNG
    wait_for(lambda: not _in_group_call(hung), timeout=10, what="the hung thread to return")
    assert sorted(CALLS) == [j.id for j in group], f"calls: {CALLS}"


def _in_group_call(thread: int) -> bool:
    """The thread is still inside a group call (`_GroupCall.__call__`) of the importer."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        if frame.f_code.co_qualname == "_GroupCall.__call__":
            return True
        frame = frame.f_back
    return False
