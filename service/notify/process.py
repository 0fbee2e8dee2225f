"""The dispatcher in a process of its own, at a lower CPU priority than the intake.

Sending costs the event loop that runs it: a request's CPU, and a wait for the GIL
after each of its system calls while the service's other threads hold it. On the
service's loop a webhook on every `done` slowed a burst of files to 0.59 times the same
burst without one (`docs/benchmarks.md`, "Notifications"). In a process of its own
the sends run beside the pipeline, not in turn with it, and under `SCHED_IDLE` the
kernel gives the intake the CPU first when both want it: events wait while the intake
has work for every core and go out as soon as it has not. The child runs on uvloop,
whose event loop and sockets are C: a send costs it less CPU than on asyncio's own.

The parent (`DispatcherProcess`) starts `python -m service.notify.process`, writes it
one JSON line (the channels, the ledger, the lease, this instance's name), waits for
its channels to open (a missing secret still stops the start, naming the channel),
then writes a byte whenever events were committed. The child takes, sends and marks
events in the ledger itself, exactly as the dispatcher does in the service's process
(`run --once`), and writes what it counted as JSON lines on its stdout, which the
parent adds to its metrics; its logs go where the service's go. It dies with the
service (`PR_SET_PDEATHSIG`), ends when its stdin closes, and is started again if it
ends on its own: the next one takes under the same instance, so it sends at once the
events its predecessor held, with the same ids.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from functools import partial
from typing import IO, Any

import anyio
import orjson
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import TypeAdapter

from service import crash
from service.errors import StartupError
from service.face.logs import setup_logging
from service.face.metrics import Metrics
from service.ledger import ledger_for_url
from service.notify.base import ChannelError
from service.notify.dispatcher import Counted, Dispatcher, MetricsTally
from service.notify.events import Outbox
from service.settings import Settings
from service.settings.notify import ChannelSettings
from service.storage.fsutil import libc

__all__ = ["DispatcherProcess"]

log = logging.getLogger("filedock.notify")
# The sending thread's CPU priority is the kernel's lowest, `SCHED_IDLE`: a thread of
# the intake that wakes takes the core from it at once, where a nice +19 thread may
# finish its time slice first. Where that policy is refused, it runs at nice +19.
_NICE = 19
_OPEN_TIMEOUT_S = 60.0  # the channels' first connections (a broker's TLS, a login)
_STOP_S = 5.0  # after its stdin closes, before it is killed
_RESTART_S = (1.0, 30.0)  # first and longest wait before starting it again
_FLUSH_S = 0.5  # how often the child reports what it counted
# After a round of fewer than a batch's events, the time given to more to gather: each
# round is two ledger writes, which take the SQLite ledger's lock from the intake.
_GATHER_S = 0.5
_LINE_MAX = 1 << 20
_PR_SET_PDEATHSIG = 1
_channels = TypeAdapter(list[ChannelSettings])


class DispatcherProcess:
    """The parent's side: starts the child, wakes it, adds its counts to `metrics`,
    starts it again when it ends on its own."""

    def __init__(self, settings: Settings, metrics: Metrics, outbox: Outbox, *, owner: str):
        self.spec = {
            "channels": _channels.dump_python(settings.notify, mode="json", by_alias=True),
            "ledger_url": settings.effective_ledger_url,
            "lease_s": settings.lease_s,
            "owner": owner,
            "log_level": settings.log_level,
        }
        self.tally = MetricsTally(metrics)
        self.metrics = metrics
        self.outbox = outbox
        self.process: Process | None = None
        self._reports: BufferedByteReceiveStream | None = None

    async def start(self) -> None:
        """Start the child and wait until its channels are open. Raises `StartupError`
        naming the channel when one cannot be used as configured; any other failure is
        logged, and `run` tries again."""
        error, final = await self._spawn()
        if final:
            raise StartupError(error)
        if error:
            self.metrics.notify_process_restarts.inc()
            log.error("the notify process cannot start", extra={"error": error})

    async def run(self) -> None:
        """Until cancelled: wake the child when events are written, count what it
        reports, and start it again (after a backoff) whenever it ends."""
        wait = _RESTART_S[0]
        while True:
            if self.process is not None:
                started = time.monotonic()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._wake)
                    await self._read_reports()
                    tg.cancel_scope.cancel()
                code = await self.process.wait()
                self.process = None
                if time.monotonic() - started > 10 * _RESTART_S[1]:
                    wait = _RESTART_S[0]  # it ran a good while: not a crash loop
                self.metrics.notify_process_restarts.inc()
                log.error(
                    "the notify process ended; starting it again",
                    extra={"exit_code": code, "retry_in_s": wait},
                )
            await anyio.sleep(wait)
            wait = min(wait * 2, _RESTART_S[1])
            if (error := (await self._spawn())[0]) is not None:
                self.metrics.notify_process_restarts.inc()
                log.error("the notify process cannot start", extra={"error": error})

    async def aclose(self) -> None:
        """Close its stdin (it stops) and wait a little; then kill it."""
        process, self.process = self.process, None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            if process.stdin is not None:
                with contextlib.suppress(OSError, anyio.BrokenResourceError):
                    await process.stdin.aclose()
            with anyio.move_on_after(_STOP_S):
                await process.wait()
                return
            process.kill()
            await process.wait()

    async def _spawn(self) -> tuple[str | None, bool]:
        """Start the child. Returns None once its channels are open, else why not (and
        no child), and whether that is for good: a channel refused as configured."""
        try:
            log_fd: int | None = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):  # a test's captured stdout
            log_fd = None
        process = await anyio.open_process(
            [sys.executable, "-m", "service.notify.process"], stderr=log_fd
        )
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._reports = BufferedByteReceiveStream(process.stdout)
        await process.stdin.send(orjson.dumps(self.spec) + b"\n")
        why = f"the notify process did not open its channels in {_OPEN_TIMEOUT_S:.0f} s"
        with anyio.move_on_after(_OPEN_TIMEOUT_S):
            while (report := await self._next_report()) is not None:
                if report.get("ready"):
                    return None, False
                if "error" in report:
                    await self.aclose()
                    return str(report["error"]), bool(report.get("final"))
            code = await process.wait()
            why = f"the notify process ended as it started (exit code {code}; its log says why)"
        await self.aclose()
        return why, False

    async def _wake(self) -> None:
        """A byte when events were written, at most one every `_GATHER_S`: the child
        waits that long for more anyway, and each write costs this event loop a system
        call and a wait for the GIL."""
        assert self.process is not None and self.process.stdin is not None
        while True:
            await self.outbox.wait_written(3600.0)
            try:
                await self.process.stdin.send(b"w")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return  # it ended: `run` sees it
            await anyio.sleep(_GATHER_S)

    async def _read_reports(self) -> None:
        while (report := await self._next_report()) is not None:
            for what, channel, n in report.get("counts", ()):
                self.tally.count(what, channel, n)

    async def _next_report(self) -> dict[str, Any] | None:
        """The child's next line; None at its end."""
        assert self._reports is not None
        try:
            line = await self._reports.receive_until(b"\n", _LINE_MAX)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            return None
        doc: dict[str, Any] = orjson.loads(line)
        return doc


# -- the child ---------------------------------------------------------------------------


class _Reports:
    """The child's side of the counts: kept, and written as one line every `_FLUSH_S`."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.counts: Counter[tuple[str, str]] = Counter()

    def count(self, what: Counted, channel: str = "", n: int = 1) -> None:
        self.counts[(what, channel)] += n

    def write(self, doc: dict[str, Any]) -> None:
        self.out.write(orjson.dumps(doc) + b"\n")
        self.out.flush()

    def flush(self) -> None:
        if self.counts:
            counts, self.counts = self.counts, Counter()
            self.write({"counts": [[w, ch, n] for (w, ch), n in counts.items()]})

    async def run(self) -> None:
        try:
            while True:
                await anyio.sleep(_FLUSH_S)
                self.flush()
        finally:
            self.flush()


async def _child(spec: dict[str, Any], reports: _Reports) -> None:
    channels = _channels.validate_python(spec["channels"])
    outbox = Outbox(channels)  # here only its wake-up: the parent's bytes set it
    ledger = ledger_for_url(spec["ledger_url"])
    dispatcher = Dispatcher(
        channels,
        ledger,
        reports,
        lease_s=spec["lease_s"],
        owner=spec["owner"],
    )
    try:
        try:
            await ledger.open()
            # Only this thread, the sender's, and those it starts from now on: the
            # SQLite ledger's writer thread, started above, keeps the service's priority,
            # so that it never holds the database's lock while it waits for a core.
            _lowest_priority(threading.get_native_id())
            await dispatcher.open()
        except ChannelError as e:
            reports.write({"error": e.message, "final": not e.retryable})
            return
        except Exception as e:  # the ledger unreachable: the parent starts this again later
            reports.write({"error": f"notify process: cannot start: {e!r}"[:500]})
            return
        reports.write({"ready": True})
        stdin = anyio.wrap_file(sys.stdin.buffer)
        async with anyio.create_task_group() as tg:
            tg.start_soon(reports.run)
            tg.start_soon(partial(dispatcher.run, outbox.wait_written, gather_s=_GATHER_S))
            while await stdin.read1(4096):  # a byte a wake-up; the end: stop
                outbox.written()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await dispatcher.aclose()
            await ledger.close()


def _lowest_priority(tid: int) -> None:
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:  # a seccomp profile or a kernel without it
        os.setpriority(os.PRIO_PROCESS, tid, _NICE)


def _main() -> None:
    # fd 1 carries the reports; the logs (stdout, as in the service) go to its stderr,
    # which is the service's stdout.
    reports = _Reports(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when this stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(libc, "prctl"):
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    crash.kill_parent_too()  # a crash point here is the service's crash
    spec = orjson.loads(sys.stdin.buffer.readline())
    setup_logging(spec["log_level"])
    anyio.run(_child, spec, reports, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    _main()
