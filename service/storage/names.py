"""File names are bytes: ids for jobs, and safe, escaped forms of hostile names.

A name may be any bytes but `/` and NUL: non-UTF-8, newlines, control characters,
a leading `-`. The ledger keeps the exact bytes; logs and JSON get an escaped form
that stays on one line; archive names are made safe and cut to fit 255 bytes
without splitting a character.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from datetime import UTC, datetime

__all__ = [
    "display_name",
    "name_b64",
    "new_job_id",
    "rfc3339",
    "safe_archive_name",
]

NAME_MAX = 255


def new_job_id(now: float | None = None) -> str:
    """A job id that sorts by creation time and is unique across replicas.

    >>> len(new_job_id(0.0)), new_job_id(0.0)[:19]
    (28, '19700101T000000000Z')
    """
    t = time.time() if now is None else now
    stamp = datetime.fromtimestamp(t, UTC)
    return f"{stamp:%Y%m%dT%H%M%S}{stamp.microsecond // 1000:03d}Z-{secrets.token_hex(4)}"


def display_name(name: bytes | str) -> str:
    r"""A printable, single-line form of a name: undecodable bytes and controls escaped.

    >>> display_name(b"a\nb\xff.csv")
    'a\\nb\\xff.csv'
    """
    text = name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else name
    if text.isprintable():  # the usual name: nothing to escape
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append(ch)
        elif ch.isprintable():
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def name_b64(name: bytes) -> str | None:
    """The exact bytes, base64-encoded, when the name is not valid UTF-8 (else None)."""
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(name).decode("ascii")
    return None


def safe_archive_name(name: bytes, suffix: bytes = b"") -> bytes:
    """A file name for the archive: printable, no leading `-`, at most 255 bytes.

    A name that would be too long keeps its head, gains a short hash of the full
    name (so two long names never collide), and keeps its suffix; the cut never
    falls inside a multi-byte character.
    """
    text = display_name(name).replace("/", "_")
    if text.startswith("-"):
        text = "_" + text[1:]
    if text in ("", ".", ".."):
        text = "_" + text
    encoded = text.encode("utf-8") + suffix
    if len(encoded) <= NAME_MAX:
        return encoded
    digest = hashlib.sha256(name).hexdigest()[:12].encode()
    stem, dot, ext = text.rpartition(".")
    keep_ext = ("." + ext).encode() if dot and 0 < len(ext.encode()) <= 16 else b""
    head_budget = NAME_MAX - len(suffix) - len(keep_ext) - len(digest) - 1
    head = (stem if keep_ext else text).encode("utf-8")[:head_budget]
    head = head.decode("utf-8", "ignore").encode("utf-8")  # never split a character
    return head + b"~" + digest + keep_ext + suffix


def rfc3339(ts: float | None) -> str | None:
    """RFC 3339 UTC with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
