"""The check for writers (a kernel read lease), and the claim and vet that rely on it,
on real files with real writer processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import wait_for

from service.errors import JobError
from service.storage.claim import claim_batch, vet
from service.storage.writers import LeaseCheck, open_and_check, still_idle

# A writer in another process: opens the file for appending, says so, and holds it
# open until its standard input closes.
WRITER = (
    "import sys; f = open(sys.argv[1], 'ab'); f.write(b'more'); f.flush(); "
    "print('open', flush=True); sys.stdin.read(); f.close()"
)


def _writer(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "open\n"
    return proc


def _close(proc: subprocess.Popen[str]) -> None:
    """Let the writer close the file and end."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0
    proc.stdout.close()


def test_a_file_open_for_writing_is_seen_and_a_closed_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "upload.csv"
    path.write_bytes(b"a,b\n")
    fd, result = open_and_check(os.fsencode(path))
    assert result is LeaseCheck.IDLE and fd is not None
    os.close(fd)
    writer = _writer(path)
    try:
        assert open_and_check(os.fsencode(path)) == (None, LeaseCheck.WRITING)
    finally:
        _close(writer)
    fd, result = open_and_check(os.fsencode(path))
    assert result is LeaseCheck.IDLE and fd is not None
    os.close(fd)


def test_a_writer_that_opens_during_the_check_is_seen(tmp_path: Path) -> None:
    """The lease is held while the caller works: a writer's open waits for it, and the
    lease shows as broken, so a file opened mid-check is not taken as complete."""
    path = tmp_path / "upload.csv"
    path.write_bytes(b"a,b\n")
    fd, result = open_and_check(os.fsencode(path))
    assert result is LeaseCheck.IDLE and fd is not None
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: not still_idle(fd), timeout=10, what="the lease to break")
    finally:
        os.close(fd)  # the writer's open goes on now
        assert proc.stdout is not None and proc.stdout.readline() == "open\n"
        _close(proc)


def test_a_fifo_is_never_opened_and_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    assert open_and_check(os.fsencode(fifo)) == (None, LeaseCheck.UNKNOWN)


def test_a_file_of_another_owner_cannot_be_told(tmp_path: Path) -> None:
    """Without CAP_LEASE the kernel grants leases only on one's own files: the answer is
    UNKNOWN (reported once), never a false "idle" or a crash."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to check as another user")
    shared = Path(tempfile.mkdtemp(prefix="filedock-lease-"))  # tmp_path is private
    shared.chmod(0o755)
    path = shared / "theirs.csv"
    path.write_bytes(b"x\n")
    code = (
        "import os, sys; from service.storage.writers import open_and_check; "
        "fd, r = open_and_check(os.fsencode(sys.argv[1])); print(r.value)"
    )
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    result = subprocess.run(
        [*drop, sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=30,
    )
    shutil.rmtree(shared)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "unknown"
    assert "cannot tell whether files are still open for writing" in result.stdout + result.stderr


def test_claim_leaves_a_file_being_written_in_transfer(tmp_path: Path) -> None:
    transfer, proc = tmp_path / "transfer", tmp_path / "proc"
    transfer.mkdir()
    proc.mkdir()
    (transfer / "busy.csv").write_bytes(b"1\n")
    (transfer / "done.csv").write_bytes(b"2\n")
    writer = _writer(transfer / "busy.csv")
    try:
        results = claim_batch(
            transfer, proc, [(b"busy.csv", "job-busy"), (b"done.csv", "job-done")]
        )
    finally:
        _close(writer)
    assert [(r.rel, r.status) for r in results] == [
        (b"busy.csv", "busy"),
        (b"done.csv", "claimed"),
    ]
    assert (transfer / "busy.csv").read_bytes() == b"1\nmore"  # untouched, still there
    assert sorted(p.name for p in proc.iterdir()) == ["job-done"]


def test_vet_of_a_claimed_file_still_open_for_writing_is_a_retry(tmp_path: Path) -> None:
    """A writer that opened the file as it was claimed: the job waits for it, never set
    aside and never imported as a prefix."""
    path = tmp_path / "claimed.csv"
    path.write_bytes(b"1\n")
    writer = _writer(path)
    try:
        with pytest.raises(JobError) as info:
            vet(os.fsencode(path), max_size=None, want_hash=True)
    finally:
        _close(writer)
    assert info.value.error_class == "modified_during_processing"
    assert info.value.retryable
    assert vet(os.fsencode(path), max_size=None, want_hash=True).size == len(b"1\nmore")
