"""The dispatcher: sends what the outbox holds, channel by channel, and marks it.

It takes due events (leased, so that with several replicas each goes to one of
them), hands each channel its share, and writes what became of each: `sent`, or a
retry after the channel's backoff, or `failed` once `max_attempts` are used up. A
crash after a send and before its mark sends that event again, with the same id:
at least once everywhere, at most once where the channel deduplicates by id (NATS,
a webhook receiver that keeps `webhook-id`). A digest channel (email) gets every
pending event of its own once the oldest is due.

In a running service the dispatcher lives in a process of its own (`process.py`); `run
--once` runs it in the service's process, after the drain. Either way what it counts
goes to a `Tally`: the metrics, here or across the pipe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, Protocol

import anyio

from service.crash import crash_point
from service.face.metrics import Metrics
from service.ledger import Ledger
from service.ledger.base import OutboxRecord
from service.notify.base import Channel, ChannelError, Event
from service.pipeline.retries import backoff
from service.pipeline.streams import shielded
from service.settings.notify import ChannelSettings

__all__ = ["Dispatcher", "MetricsTally", "Tally", "build_channel", "show_backlog"]

log = logging.getLogger("filedock.notify")
_BATCH = 500  # events taken at once
_IDLE_S = 1.0  # looks at the outbox at least this often (due retries, other replicas' events)
_DIGEST_MAX = 10_000  # events in one digest


def build_channel(settings: ChannelSettings) -> Channel:
    """The channel of a kind; each kind's client library is imported only when used."""
    if settings.kind == "webhook":
        from service.notify.webhook import WebhookSender

        return WebhookSender(settings)
    if settings.kind == "email":
        from service.notify.email import EmailSender

        return EmailSender(settings)
    if settings.kind == "nats":
        from service.notify.nats import NatsSender

        return NatsSender(settings)
    if settings.kind == "amqp":
        from service.notify.amqp import AmqpSender

        return AmqpSender(settings)
    raise AssertionError(f"unknown channel kind {settings!r}")


Counted = Literal["sent", "send_error", "failed", "ledger_error"]


class Tally(Protocol):
    """Where the dispatcher counts: an event sent, a send that failed, an event given
    up, a ledger error (`channel` empty)."""

    def count(self, what: Counted, channel: str = "", n: int = 1) -> None: ...


class MetricsTally:
    """Counts straight into the service's metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def count(self, what: Counted, channel: str = "", n: int = 1) -> None:
        m = self.metrics
        if what == "ledger_error":
            m.ledger_errors.inc(n)
            return
        counters = {"sent": m.events_sent, "send_error": m.event_send_errors}
        counters.get(what, m.events_failed).labels(channel).inc(n)


class Dispatcher:
    def __init__(
        self,
        channels: Sequence[ChannelSettings],
        ledger: Ledger,
        tally: Tally,
        *,
        lease_s: float,
        owner: str,
    ) -> None:
        self.ledger = ledger
        self.tally = tally
        self.owner = owner  # this instance: the events it takes are leased to it
        self.lease_s = lease_s
        self.settings = {ch.name: ch for ch in channels}
        self.channels = {ch.name: build_channel(ch) for ch in channels}

    async def open(self) -> None:
        """Raises `ChannelError` naming the channel (`notify.NAME: …`) when one cannot
        be used as configured (a missing secret)."""
        for name, channel in self.channels.items():
            try:
                await channel.open()
            except ChannelError as e:
                raise ChannelError(f"notify.{name}: {e.message}", retryable=e.retryable) from None

    async def aclose(self) -> None:
        for channel in self.channels.values():
            with anyio.CancelScope(shield=True):
                await channel.close()

    async def run(
        self, wait_written: Callable[[float], Awaitable[None]], *, gather_s: float = 0.0
    ) -> None:
        """Send until cancelled; between rounds with nothing due, wait until events are
        written (`wait_written`) or `_IDLE_S` passes. After a round that took less than
        a batch, wait `gather_s` for more to gather: fewer, larger rounds."""
        while True:
            taken = await self.dispatch()
            if not taken:
                await wait_written(_IDLE_S)
            elif taken < _BATCH and gather_s:
                await anyio.sleep(gather_s)

    async def dispatch(self) -> int:
        """Send what is due now; returns how many events were tried."""
        if not self.channels:
            return 0
        now = time.time()
        by_channel: dict[str, list[OutboxRecord]] = {}
        try:
            # Channel by channel: the events of a channel no longer configured stay
            # where they are, untouched.
            for name in self.channels:
                taken = await self.ledger.take_outbox(
                    now, self.owner, self.lease_s, limit=_BATCH, channel=name
                )
                if taken:
                    by_channel[name] = taken
        except Exception as e:
            self.tally.count("ledger_error")
            log.error("cannot read the outbox", extra={"error": repr(e)[:300]})
            return 0
        async with anyio.create_task_group() as tg:
            for name, records in by_channel.items():
                tg.start_soon(self._channel, name, records, now)
        return sum(len(records) for records in by_channel.values())

    async def _channel(self, name: str, records: list[OutboxRecord], now: float) -> None:
        channel = self.channels[name]
        if channel.digest:
            try:
                rest = await self.ledger.take_outbox(
                    now, self.owner, self.lease_s, limit=_DIGEST_MAX, channel=name, due_only=False
                )
            except Exception as e:  # the digest holds what was taken; the rest comes later
                self.tally.count("ledger_error")
                log.error("cannot read the outbox", extra={"error": repr(e)[:300]})
                rest = []
            seen = {r.event_id for r in records}
            records += [r for r in rest if r.event_id not in seen]
        events = [Event.from_json(r.payload) for r in records]
        try:
            with anyio.fail_after(self.settings[name].timeout_s * (1 if channel.digest else 4)):
                results: Sequence[ChannelError | None] = await channel.send(events)
        except TimeoutError:
            results = [ChannelError("no answer in time")] * len(records)
        except Exception as e:  # a bug of the channel: logged whole, retried
            log.exception("channel raised", extra={"channel": name})
            results = [ChannelError(repr(e)[:500])] * len(records)
        crash_point("after_event_sent")
        await shielded(self._mark(name, records, results))

    async def _mark(
        self, name: str, records: list[OutboxRecord], results: Sequence[ChannelError | None]
    ) -> None:
        ch, now = self.settings[name], time.time()
        for record, error in zip(records, results, strict=True):
            record.attempts += 1
            if error is None:
                record.state, record.sent_at, record.error = "sent", now, None
                self.tally.count("sent", name)
                continue
            record.error = error.message[:2000]
            self.tally.count("send_error", name)
            if error.retryable and record.attempts < ch.max_attempts:
                record.next_attempt_at = now + backoff(ch, record.attempts)
                continue
            record.state = "failed"
            self.tally.count("failed", name)
            log.error(
                "event not sent, given up",
                extra={"channel": name, "event_id": record.event_id, "error": record.error},
            )
        failures = [r for r in records if r.state == "pending"]
        if failures:
            log.warning(
                "events will be sent again",
                extra={
                    "channel": name,
                    "events": len(failures),
                    "error": failures[0].error,
                    "retry_in_s": round(failures[0].next_attempt_at - now, 3),
                },
            )
        try:
            await self.ledger.outbox_done(records)
        except Exception as e:  # the lease runs out: they are sent again, same ids
            self.tally.count("ledger_error")
            log.error("cannot mark events sent", extra={"error": repr(e)[:300]})


async def show_backlog(ledger: Ledger, metrics: Metrics, channels: Sequence[str]) -> None:
    """`filedock_outbox_pending` and the oldest pending event's age, per channel."""
    backlog = {name: (n, oldest) for name, n, oldest in await ledger.outbox_backlog()}
    now = time.time()
    for name in channels:
        n, oldest = backlog.get(name, (0, None))
        metrics.outbox_pending.labels(name).set(n)
        metrics.outbox_oldest_age.labels(name).set(
            max(0.0, now - oldest) if oldest is not None else 0.0
        )
