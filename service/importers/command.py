"""The `command` importer: an external program, run with an argv list, never a shell.

Exit codes (sysexits): 0 done, 75 (EX_TEMPFAIL) retry later, 65 (EX_DATAERR)
reject; any other code is retried until the attempts are used up. On timeout
the program's whole process group gets SIGTERM, then SIGKILL after
`kill_grace_s`. Its stdout and stderr are kept, bounded, in the archive.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping

import anyio
from anyio.abc import ByteReceiveStream, Process

from service.errors import JobError, Reject, Retry
from service.importers.base import ImportJob, Result
from service.settings import CommandImporterSettings

__all__ = ["CommandImporter", "expand_argv"]

EX_DATAERR = 65
EX_TEMPFAIL = 75


def expand_argv(argv: list[str], values: Mapping[str, bytes]) -> list[bytes]:
    """Substitute `{path}`, `{name}`... in each argument, as bytes (names may not be UTF-8).

    Each argument stays one argv element whatever the name holds.
    """
    out = []
    for arg in argv:
        b = arg.encode()
        for key, value in values.items():
            b = b.replace(b"{" + key.encode() + b"}", value)
        out.append(b)
    return out


class _Tail:
    """Keeps the head and the tail of a stream, within a byte budget."""

    def __init__(self, budget: int) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.budget = budget
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        half = self.budget // 2
        room = half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > half:
            cut = len(self.tail) - half
            self.dropped += cut
            del self.tail[:cut]

    def value(self) -> bytes:
        if not self.dropped:
            return bytes(self.head + self.tail)
        return bytes(self.head) + f"\n[... {self.dropped} bytes dropped ...]\n".encode() + self.tail


async def _drain(stream: ByteReceiveStream | None, into: _Tail) -> None:
    if stream is None:
        return
    async for chunk in stream:
        into.feed(chunk)


class CommandImporter:
    def __init__(self, settings: CommandImporterSettings) -> None:
        self.settings = settings

    async def __call__(self, job: ImportJob) -> Result:
        s = self.settings
        argv = expand_argv(
            s.argv,
            {
                "path": os.fsencode(job.path),
                "name": job.name,
                "job_id": job.id.encode(),
                "out_dir": os.fsencode(job.out_dir),
                "temp_dir": os.fsencode(job.temp_dir),
                "route": job.route.encode(),
                "attempt": str(job.attempt).encode(),
            },
        )
        env = {
            **os.environ,
            **s.env,
            "FILEDOCK_JOB_ID": job.id,
            "FILEDOCK_ROUTE": job.route,
            "FILEDOCK_ATTEMPT": str(job.attempt),
            "FILEDOCK_OUT_DIR": os.fsdecode(job.out_dir),
            "TMPDIR": os.fsdecode(job.temp_dir),
        }
        stdout, stderr = _Tail(s.log_max_bytes // 2), _Tail(s.log_max_bytes // 2)
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: a timeout kills it all
            )
        except OSError as e:
            raise JobError("io_error", f"cannot start {s.argv[0]!r}: {e.strerror}") from e
        timed_out = False
        try:
            with anyio.move_on_after(s.timeout_s) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_drain, process.stdout, stdout)
                    tg.start_soon(_drain, process.stderr, stderr)
                    await process.wait()
            timed_out = scope.cancelled_caught
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    await _terminate(process, s.kill_grace_s)
        log = _log(stdout, stderr)
        code = process.returncode
        tail = stderr.value()[-2000:].decode("utf-8", "backslashreplace")
        if timed_out:
            raise JobError(
                "timeout", f"no exit within timeout_s={s.timeout_s:g}; killed", retryable=True
            ).with_log(log)
        if code == 0:
            return Result(detail={"kind": "command", "exit_code": 0}, log=log)
        if code == EX_TEMPFAIL:
            raise Retry(f"exit code 75 (retry later): {tail}".strip()).with_log(log)
        if code == EX_DATAERR:
            raise Reject(f"exit code 65 (rejected): {tail}".strip()).with_log(log)
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            raise JobError(
                "crashed", f"killed by signal {name}: {tail}".strip(), retryable=True
            ).with_log(log)
        raise JobError(
            "import_error", f"exit code {code}: {tail}".strip(), retryable=True
        ).with_log(log)


async def _terminate(process: Process, grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after the grace; always reap the child."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    with anyio.move_on_after(grace_s):
        await process.wait()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await process.wait()


def _log(stdout: _Tail, stderr: _Tail) -> bytes:
    return b"--- stdout ---\n" + stdout.value() + b"\n--- stderr ---\n" + stderr.value() + b"\n"
