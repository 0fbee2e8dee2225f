"""SIGKILL at every step of the protocol: run, crash, restart, drain; I1-I5 hold.

The service kills itself (`FILEDOCK_TEST_CRASH_AT=point:nth`, service/crash.py) the
nth time it passes a point. The mix of files reaches every point: plain files are
archived, a rejected one and a symlink to a secret outside the tree go to failed/
(`mid_fail`).
"""

from __future__ import annotations

import json
import os
import random

import pytest
from conftest import command_route

from reliability.support import Outside, RelTree, check_i4, python_route, report
from service.crash import POINTS

PLAIN = {f"ok-{i}.csv".encode(): f"id,n\n{i},{i * i}\n".encode() for i in range(4)}
REJECTED = {b"rejected.csv": b"EXIT 65\n"}
LINK = b"link.csv"


def _drop_mix(
    tree: RelTree, outside: Outside, plain: dict[bytes, bytes] = PLAIN, max_attempts: int = 5
) -> dict[bytes, bytes]:
    tree.configure([command_route(max_attempts=max_attempts)])
    for rel, content in {**plain, **REJECTED}.items():
        tree.drop(rel, content)
    outside.link_to_secret(tree.transfer / LINK.decode())
    return {**plain, **REJECTED, LINK: b""}


def _check(tree: RelTree, outside: Outside, dropped: dict[bytes, bytes]) -> dict[str, int]:
    tree.check_invariants(dropped)  # I1, I2, I3 and the archives' sha256
    rows = {bytes(r["relative_path"]): r for r in tree.rows()}
    plain = {rel for rel in dropped if rel.startswith(b"ok-")}
    for rel in plain:
        assert (rows[rel]["state"], rows[rel]["outcome"]) == ("done", "imported"), rel
    assert (rows[b"rejected.csv"]["state"], rows[b"rejected.csv"]["outcome"]) == (
        "failed",
        "rejected",
    )
    assert (rows[LINK]["state"], rows[LINK]["error_class"]) == ("failed", "symlink")
    figures = check_i4(tree, plain | set(REJECTED))  # I4
    for r in tree.records():  # the importer never saw the symlink
        assert not bytes.fromhex(r["argv"][-1]).endswith(LINK)
    link_job = tree.failed()[rows[LINK]["id"]]
    assert (link_job / LINK.decode()).is_symlink()
    assert json.loads((link_job / "error.json").read_text())["error_class"] == "symlink"
    outside.check()  # I5: the secret was never read, nothing appeared outside the tree
    return figures


# mid_claim has a test of its own below; the delivery points need a sink and the
# outbox's a channel: they have theirs with real ones (tests/test_delivery_crash.py,
# tests/test_delivery_s3.py and the other sinks', tests/test_notify.py).
ELSEWHERE = {"before_delivery", "mid_delivery", "after_delivery", "after_event_sent"}
FIRST_PASS = sorted(POINTS - {"mid_claim"} - ELSEWHERE)


@pytest.mark.parametrize("point", FIRST_PASS)
def test_sigkill_at_each_point_then_restart(rtree: RelTree, outside: Outside, point: str) -> None:
    dropped = _drop_mix(rtree, outside)
    crashed = rtree.run_once(env=rtree.env(FILEDOCK_TEST_CRASH_AT=f"{point}:1"))
    assert crashed.returncode == -9, f"{point} was never reached:\n{crashed.stdout[-2000:]}"
    rows = rtree.rows()
    assert rows, "a crash after the first claim leaves ledger rows behind"
    restarted = rtree.run_once()
    # 1 when this run failed a job (the rejected file or the link), 0 when the crashed run had
    assert restarted.returncode in (0, 1), restarted.stdout[-3000:] + restarted.stderr
    figures = _check(rtree, outside, dropped)
    report("crash_points", point=point, nth=1, files=len(dropped), **figures)


def test_sigkill_after_the_vet_of_a_recovered_job(rtree: RelTree, outside: Outside) -> None:
    """`after_vet` as it is reachable today: a job recovered after a crash is vetted again."""
    dropped = _drop_mix(rtree, outside)
    first = rtree.run_once(env=rtree.env(FILEDOCK_TEST_CRASH_AT="after_claim:6"))
    assert first.returncode == -9
    second = rtree.run_once(env=rtree.env(FILEDOCK_TEST_CRASH_AT="after_vet:1"))
    assert second.returncode == -9, second.stdout[-2000:]
    restarted = rtree.run_once()
    assert restarted.returncode in (0, 1), restarted.stdout[-3000:] + restarted.stderr
    figures = _check(rtree, outside, dropped)
    report("crash_points", point="after_vet (re-vet after recovery)", nth=1, **figures)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", range(12))
def test_chains_of_crashes_at_random_points(rtree: RelTree, outside: Outside, seed: int) -> None:
    """Crash again and again (also while recovering from the last crash) until a run ends.

    max_attempts is high: the charge of an attempt per crash has its own test below.
    """
    rng = random.Random(seed)
    plain = {f"ok-{i:02d}.csv".encode(): f"id\n{i}\n".encode() for i in range(24)}
    dropped = _drop_mix(rtree, outside, plain, max_attempts=100)
    crashes = 0
    for _ in range(40):
        point, nth = rng.choice(sorted(POINTS)), rng.randint(1, 3)  # mostly reached: long chains
        result = rtree.run_once(env=rtree.env(FILEDOCK_TEST_CRASH_AT=f"{point}:{nth}"))
        if result.returncode != -9:
            assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr
            break
        crashes += 1
    final = rtree.run_once()
    assert final.returncode in (0, 1), final.stdout[-3000:] + final.stderr
    figures = _check(rtree, outside, dropped)
    report("crash_chains", seed=seed, crashes=crashes, files=len(dropped), **figures)


def test_sigkill_between_the_claim_mkdir_and_rename(rtree: RelTree, outside: Outside) -> None:
    dropped = _drop_mix(rtree, outside)
    crashed = rtree.run_once(env=rtree.env(FILEDOCK_TEST_CRASH_AT="mid_claim:3"))
    assert crashed.returncode == -9, crashed.stdout[-2000:] + crashed.stderr[-2000:]
    restarted = rtree.run_once()
    assert restarted.returncode in (0, 1), restarted.stdout[-3000:] + restarted.stderr
    _check(rtree, outside, dropped)  # one row per file, proc/ empty


def test_imported_jobs_waiting_for_the_archiver_are_not_charged_by_a_crash(
    rtree: RelTree,
) -> None:
    rtree.configure(
        [python_route("quick", concurrency=8, max_attempts=3)],
        min_free_bytes=0,
        batch_max_files=1,  # one archive at a time: imported jobs queue behind it
    )
    files = {f"f-{i:02d}.bin".encode(): os.urandom(1 << 20) for i in range(20)}
    for rel, content in files.items():
        rtree.drop(rel, content)
    # jobs the ledger held `archiving` at a crash -> the services that had run by then
    waiting: dict[str, set[int]] = {}
    at_first_crash = 0
    for _ in range(3):  # as many crashes as max_attempts, all while archiving
        crashed = rtree.run_once(env=rtree.env(FILEDOCK_TEST_CRASH_AT="mid_archive:2"))
        assert crashed.returncode == -9
        ran = {r["pid"] for r in rtree.records()}
        archiving = [row["id"] for row in rtree.rows() if row["state"] == "archiving"]
        for job_id in archiving:
            waiting.setdefault(job_id, ran)
        at_first_crash = at_first_crash or len(archiving)
    rtree.run_once()
    rows = rtree.rows()
    completed: dict[str, int] = {}
    for r in rtree.records():
        if r["event"] == "end":
            completed[r["job_id"]] = completed.get(r["job_id"], 0) + 1
    # An import, once it ended and was recorded, is not run again after a crash.
    again = sorted(
        {
            r["job_id"]
            for r in rtree.records()
            if r["pid"] not in waiting.get(r["job_id"], {r["pid"]})
        }
    )
    assert not again, f"imported again after a crash, though recorded archiving: {again}"
    # The imports are quick, the archives one at a time: by the second archive most
    # files have imported, and the ledger says so (not `importing`).
    assert at_first_crash >= len(files) // 2, f"{at_first_crash} jobs archiving at the crash"
    exhausted = {
        bytes(r["name"]): completed.get(r["id"], 0) for r in rows if r["outcome"] == "exhausted"
    }
    report(
        "crash_while_waiting_for_archiver",
        files=len(files),
        crashes=3,
        exhausted=len(exhausted),
        completed_imports_of_exhausted=sorted(exhausted.values()),
        archiving_at_the_first_crash=at_first_crash,
        imported_more_than_once=sum(n > 1 for n in completed.values()),
    )
    assert not exhausted, (
        f"imported, then failed as exhausted (name: completed imports): {exhausted}"
    )
    # A job archived after a crash still carries in its manifest what its import returned.
    without_facts = sorted(
        job_id
        for job_id, folder in rtree.archived().items()
        if json.loads((folder / "manifest.json").read_text())["importer"].get("bytes") != 1 << 20
    )
    assert not without_facts, f"archived without the importer's facts: {without_facts}"
    rtree.check_invariants(files)


def test_a_crash_keeps_the_importer_log_of_jobs_waiting_for_the_archiver(
    rtree: RelTree,
) -> None:
    """A command's output lives only in memory until its archive holds it: such a job is
    not recorded `archiving` before the archiver takes it, so a crash while it waits
    imports it again, and its archive still has its `importer.log`."""
    rtree.configure(
        [command_route(concurrency=8)],
        min_free_bytes=0,
        batch_max_files=1,  # one archive at a time: imported jobs queue behind it
    )
    files = {f"f-{i:02d}.bin".encode(): os.urandom(4 << 20) for i in range(10)}
    for rel, content in files.items():
        rtree.drop(rel, content)
    crashed = rtree.run_once(env=rtree.env(FILEDOCK_TEST_CRASH_AT="mid_archive:3"))
    assert crashed.returncode == -9
    assert rtree.run_once().returncode == 0
    archived = rtree.archived()
    missing = sorted(
        name for name, folder in archived.items() if not (folder / "importer.log").exists()
    )
    assert len(archived) == len(files) and not missing, f"no importer.log: {missing}"
    rtree.check_invariants(files)
