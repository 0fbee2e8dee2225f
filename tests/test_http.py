"""The HTTP surface of a running service: probes, /jobs, and /metrics as Prometheus reads it."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
from conftest import FiledockTree, skip_or_fail, wait_for


def test_readyz_is_503_while_recovery_runs(tree: FiledockTree) -> None:
    tree.configure()
    proc = tree.folder("proc")
    proc.mkdir(parents=True)
    for i in range(1000):  # claimed folders with no ledger row: recovery adopts each
        job = proc / f"20260101T{i:09d}Z-{i:08x}"
        job.mkdir()
        (job / f"adopted-{i}.csv").write_bytes(b"x")
    service = tree.start(wait_ready=False)
    codes: list[int] = []

    def probe() -> bool:
        try:
            status, body = service.get("/readyz")
        except OSError:
            return False
        codes.append(status)
        if status == 503:
            assert "recovery" in json.loads(body)["reasons"]
        return status == 200

    wait_for(probe, timeout=120, interval=0.01, what="/readyz to turn 200")
    assert 503 in codes, "never saw /readyz answer 503 during recovery"
    tree.wait_final(1000, timeout=120)
    service.stop()


def test_readyz_is_503_when_the_ledger_filesystem_is_full(tree: FiledockTree) -> None:
    state = tree.folder("state")
    state.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state)], capture_output=True
    )
    if mounted.returncode != 0:
        skip_or_fail(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        tree.configure(min_free_bytes=1 << 20)
        service = tree.start()
        filler = state / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        wait_for(lambda: service.get("/readyz")[0] == 503, what="/readyz to turn 503")
        reasons = json.loads(service.get("/readyz")[1])["reasons"]
        assert "disk:state" in reasons
        assert service.get("/healthz")[0] == 200  # alive, just not ready
        filler.unlink()
        wait_for(lambda: service.get("/readyz")[0] == 200, what="/readyz to recover by itself")
        service.stop()
    finally:
        tree.close()
        subprocess.run(["umount", "-l", str(state)], check=True)


def test_healthz_stays_200_under_a_10k_burst(tree: FiledockTree) -> None:
    tree.configure(
        [
            {
                "name": "burst",
                "match": "**",
                "importer": {"kind": "python", "callable": "recording_importer:record"},
            }
        ]
    )
    service = tree.start(env=tree.env(FILEDOCK_TEST_RECORD=os.devnull))
    staging = tree.base / "staging"
    staging.mkdir()
    for i in range(10_000):
        (staging / f"{i:05d}.dat").write_bytes(b"x" * 64)
    answers: list[tuple[int, float]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            t = time.monotonic()
            status = service.get("/healthz")[0]
            answers.append((status, time.monotonic() - t))
            time.sleep(0.05)  # pacing the prober, not synchronisation

    prober = threading.Thread(target=poll)
    prober.start()
    try:
        for name in os.listdir(staging):
            os.rename(staging / name, tree.transfer / name)
        tree.wait_final(10_000, timeout=300)
    finally:
        done.set()
        prober.join()
    assert answers and all(status == 200 for status, _ in answers)
    slowest = max(t for _, t in answers)
    print(f"/healthz under a 10k burst: {len(answers)} probes, slowest {slowest * 1000:.0f} ms")
    assert slowest < 2.0
    service.stop()


@pytest.mark.parametrize("query", ["?state=failed", "?route=main&limit=1", "?state=bogus"])
def test_jobs_endpoint_filters(tree: FiledockTree, query: str) -> None:
    tree.configure()
    tree.drop("good.csv", b"fine")
    tree.drop("bad.csv", b"EXIT 65\n")
    service = tree.start()
    tree.wait_final(2)
    status, body = service.get("/jobs" + query)
    if query == "?state=bogus":
        assert status == 400 and "unknown state" in json.loads(body)["error"]
        return
    jobs = json.loads(body)
    assert status == 200
    if query == "?state=failed":
        assert [j["name"] for j in jobs] == ["bad.csv"]
        assert jobs[0]["error_class"] == "rejected" and jobs[0]["created_at"].endswith("Z")
    else:
        assert len(jobs) == 1 and jobs[0]["route"] == "main"
    service.stop()
