"""The email channel: every pending event in one plain-text digest, sent over SMTP.

A digest channel is handed everything pending once the oldest event is due, so one
message tells of a whole window: the subject counts the events by type and route
("3 done, 17 failed on route orders; 2 delivery failures on route lake"), the body
lists them grouped by type and route, failures first, each with its reason, its
folder and the command that retries it. A thousand failures still make one short
message: past `listed` events the rest are counted, with the command that lists them.

The message is sent or it is not, so every event gets the same result. A refused
connection, a timeout and a 4xx reply may pass later; a 5xx reply, refused
credentials, a certificate the CA file does not vouch for or a server without the TLS
the settings ask for never will as configured. The Message-ID is made from the events
themselves: a re-send of the same digest after a crash carries the same Message-ID,
and a mail system that deduplicates drops the copy.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

import aiosmtplib

from service.notify.base import Channel, ChannelError, Event
from service.settings.notify import EmailChannel

__all__ = ["EmailSender", "subject_of"]

log = logging.getLogger("filedock.notify")

_DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 25}
_ERROR_SHOWN = 500
_ROUTES_IN_SUBJECT = 3

# Per type: (order in the subject, the count among others, the count alone, heading).
# The body lists failures first, so a truncated digest still shows what needs a hand.
_TYPES: dict[str, tuple[int, str, str, str]] = {
    "filedock.job.done": (0, "{n} done", "{n} {files} done", "Done"),
    "filedock.job.partial": (1, "{n} partly done", "{n} {files} partly done", "Partly done"),
    "filedock.job.duplicate": (2, "{n} {duplicates}", "{n} duplicate {files}", "Duplicates"),
    "filedock.job.failed": (3, "{n} failed", "{n} {files} failed", "Failed"),
    "filedock.delivery.failed": (
        4,
        "{n} delivery {failures}",
        "{n} delivery {failures}",
        "Delivery failures",
    ),
}
_OTHER = (5, "{n} other {events}", "{n} other {events}", "Other events")
_BODY_ORDER = (
    "filedock.job.failed",
    "filedock.delivery.failed",
    "filedock.job.partial",
    "filedock.job.duplicate",
    "filedock.job.done",
)
_FAILURES = frozenset({"filedock.job.failed", "filedock.delivery.failed"})


class EmailSender(Channel):
    """One SMTP server, connected for each digest (minutes apart: nothing to pool).

    `clock` gives the Date header (tests pin it)."""

    digest = True
    # Events listed in full in one message; the rest are counted per group.
    listed = 200

    def __init__(self, settings: EmailChannel, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.name = settings.name
        self._clock = clock
        self._port = settings.port or _DEFAULT_PORTS[settings.tls]
        self._password: str | None = None
        self._tls: ssl.SSLContext | None = None

    async def open(self) -> None:
        s = self.settings
        if s.username is not None:
            if s.password is None:
                raise ChannelError(
                    f"email {s.name}: username set without password", retryable=False
                )
            try:
                self._password = s.password.read()
            except ValueError as e:
                raise ChannelError(f"email {s.name}: password: {e}", retryable=False) from None
        if s.tls != "none":
            try:
                context = ssl.create_default_context(cafile=s.ca_file)
            except (OSError, ssl.SSLError) as e:
                what = f"email {s.name}: ca_file {s.ca_file}: {e}"
                raise ChannelError(what, retryable=False) from None
            if not s.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls = context

    async def send(self, events: Sequence[Event]) -> list[ChannelError | None]:
        if not events:
            return []
        s = self.settings
        try:
            message = self.compose(events)
        except ValueError as e:  # a line break in an address or a header
            error = ChannelError(f"email {self.name}: message not made: {e}", retryable=False)
            return [error] * len(events)
        try:
            refused, _ = await aiosmtplib.send(
                message,
                sender=parseaddr(s.sender)[1] or s.sender,
                recipients=s.to,
                hostname=s.host,
                port=self._port,
                use_tls=s.tls == "implicit",
                start_tls=s.tls == "starttls",
                tls_context=self._tls,
                username=s.username,
                password=self._password if s.username is not None else None,
                timeout=s.timeout_s,
            )
        except (aiosmtplib.SMTPException, OSError, ValueError) as e:
            error = self._judge(e)
            return [error] * len(events)
        if refused:  # some recipients took it: it is sent; the others are for the log
            shown = ", ".join(f"{to}: {r.code} {r.message}" for to, r in refused.items())
            log.warning("email %s: recipients refused: %s", self.name, shown)
        return [None] * len(events)

    def compose(self, events: Sequence[Event]) -> EmailMessage:
        """The digest of `events` as one message, the same for the same events (but
        for its Date)."""
        s = self.settings
        message = EmailMessage()
        subject = f"{s.subject_prefix} {subject_of(events)}".strip()
        message["Subject"] = re.sub(r"[\x00-\x1f\x7f]", "?", subject)
        message["From"] = s.sender
        message["To"] = ", ".join(s.to)
        message["Date"] = format_datetime(datetime.fromtimestamp(self._clock(), UTC), usegmt=True)
        message["Message-ID"] = message_id(events, s.sender)
        message["X-Filedock-Events"] = str(len(events))
        message.set_content(body_of(events, self.listed))
        return message

    def _judge(self, e: BaseException) -> ChannelError:
        where = f"email {self.name}: smtp {self.settings.host}:{self._port}"
        retryable, why = _classify(e)
        text = f"{where}: {why}"
        if self._password and len(self._password) >= 4:
            text = text.replace(self._password, "***")
        return ChannelError(text, retryable=retryable)


def _classify(e: BaseException) -> tuple[bool, str]:
    """(retryable, why) of a send that failed."""
    if _in_chain(e, ssl.SSLCertVerificationError):
        return False, f"TLS certificate not trusted: {e}"
    if isinstance(e, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in e.recipients]
        shown = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in e.recipients)
        return any(400 <= c < 500 for c in codes), f"every recipient refused: {shown}"
    if isinstance(e, aiosmtplib.SMTPAuthenticationError):
        return 400 <= e.code < 500, f"login refused: {e.code} {e.message}"
    if isinstance(e, aiosmtplib.SMTPResponseException):
        return 400 <= e.code < 500, f"answered {e.code} {e.message}"
    if isinstance(e, aiosmtplib.SMTPTimeoutError):
        return True, f"timed out: {e.message}"
    if isinstance(e, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected):
        return True, f"connection failed: {e.message}"
    if isinstance(e, aiosmtplib.SMTPException):  # no STARTTLS, no AUTH: configuration
        return False, e.message
    if isinstance(e, ValueError):  # an address aiosmtplib refuses to send to
        return False, f"refused to send: {e}"
    transient_tls = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
    if isinstance(e, ssl.SSLError) and not isinstance(e, transient_tls):
        return False, f"TLS failed: {e}"
    return True, f"connection failed: {e}"


def _in_chain(e: BaseException, kind: type[BaseException]) -> bool:
    chain: list[BaseException] = []
    seen: BaseException | None = e
    while seen is not None and seen not in chain:
        if isinstance(seen, kind):
            return True
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return False


def _kind(event_type: str) -> tuple[int, str, str, str]:
    return _TYPES.get(event_type, _OTHER)


def _count(template: str, n: int) -> str:
    one = n == 1
    return template.format(
        n=n,
        files="file" if one else "files",
        duplicates="duplicate" if one else "duplicates",
        failures="failure" if one else "failures",
        events="event" if one else "events",
    )


def subject_of(events: Sequence[Event]) -> str:
    """The events counted by type per route, the routes with most failures first:
    `3 done, 17 failed on route orders; 2 delivery failures on route lake`."""
    per_route: dict[str, Counter[str]] = defaultdict(Counter)
    for event in events:
        per_route[event.route or "(none)"][event.type] += 1

    def weight(route: str) -> tuple[int, int, str]:
        counts = per_route[route]
        failures = sum(n for t, n in counts.items() if t in _FAILURES)
        return -failures, -counts.total(), route

    routes = sorted(per_route, key=weight)
    clauses = []
    for route in routes[:_ROUTES_IN_SUBJECT]:
        counts = sorted(per_route[route].items(), key=lambda tn: _kind(tn[0])[0])
        jobs = [(t, n) for t, n in counts if t.startswith("filedock.job.")]
        parts = []
        for t, n in counts:
            _, among, alone, _ = _kind(t)
            parts.append(_count(alone if jobs == [(t, n)] else among, n))
        clauses.append(", ".join(parts) + f" on route {route}")
    rest = routes[_ROUTES_IN_SUBJECT:]
    if rest:
        n = sum(per_route[r].total() for r in rest)
        clauses.append(_count("{n} more {events}", n) + f" on {len(rest)} other routes")
    return "; ".join(clauses)


def message_id(events: Sequence[Event], sender: str) -> str:
    """The first event's id and a hash of all: the same events give the same
    Message-ID; a digest that has grown since (more pending after a crash) a new one,
    so a receiver that drops duplicates does not drop it."""
    ids = "\n".join(e.id for e in events).encode("utf-8", "surrogateescape")
    first = re.sub(r"[^A-Za-z0-9_-]", "-", events[0].id)[:64]
    domain = parseaddr(sender)[1].rpartition("@")[2]
    if not re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*", domain):
        domain = "filedock.invalid"
    return f"<filedock.{first}.{hashlib.sha256(ids).hexdigest()[:16]}@{domain}>"


def body_of(events: Sequence[Event], listed: int) -> str:
    """The plain-text body: a count per route, then each (type, route) group, failures
    first, its events oldest first, up to `listed` events in all."""
    groups: dict[tuple[str, str], list[Event]] = defaultdict(list)
    for event in events:
        groups[(event.type, event.route or "(none)")].append(event)

    def order(key: tuple[str, str]) -> tuple[int, str, str]:
        t, route = key
        rank = _BODY_ORDER.index(t) if t in _BODY_ORDER else len(_BODY_ORDER)
        return rank, t, route

    lines = [_count("{n} {events}", len(events)) + ": " + subject_of(events) + ".", ""]
    budget, unlisted = listed, 0
    for key in sorted(groups, key=order):
        t, route = key
        group = sorted(groups[key], key=lambda e: e.time)
        heading = f"{_kind(t)[3]} on route {route} ({len(group)})"
        lines += [heading, "-" * len(heading)]
        for event in group[:budget]:
            lines += _entry(event)
        shown = min(len(group), budget)
        budget -= shown
        if shown < len(group):
            more = len(group) - shown
            unlisted += more
            state = "--state failed " if t == "filedock.job.failed" else ""
            lines += [f"and {more} more: filedock jobs {state}--route {route}", ""]
    if unlisted:
        lines.append(f"{unlisted} of {len(events)} events are counted here but not listed.")
    return "\n".join(lines).rstrip() + "\n"


def _entry(event: Event) -> list[str]:
    data = event.data
    name = data.get("relative_path") or data.get("name") or event.subject
    lines = [f"{event.time}  {name}"]
    what = str(data.get("outcome") or event.type.rpartition(".")[2])
    if event.type == "filedock.delivery.failed":
        what = f"delivery to {data.get('sink', '?')} failed"
    reason = ": ".join(str(data[k]) for k in ("error_class", "error") if data.get(k))
    reason = reason or str(data.get("message") or "")
    lines.append(f"    {what}: {_indented(reason)}" if reason else f"    {what}")
    for key, label in (("archive_path", "archive folder"), ("failed_path", "failed folder")):
        if data.get(key):
            lines.append(f"    {label}: {data[key]}")
    if retry := _retry(event):
        lines.append(f"    retry: {retry}")
    lines.append("")
    return lines


def _retry(event: Event) -> str | None:
    data = event.data
    if data.get("how_to_retry"):
        return str(data["how_to_retry"])
    job_id = data.get("job_id")
    if not job_id or event.type not in _FAILURES:
        return None
    if event.type == "filedock.delivery.failed" and data.get("sink"):
        return f"filedock retry {job_id} --sink {data['sink']}"
    return f"filedock retry {job_id}"


def _indented(text: str) -> str:
    """An error message cut short, its own lines indented under the entry."""
    if len(text) > _ERROR_SHOWN:
        text = text[:_ERROR_SHOWN] + " …"
    return "\n      ".join(text.splitlines())
