"""How the operator page writes values: the Jinja environment and its filters.

Everything a template prints is escaped (autoescape). Names and texts that came from
outside (file names are any bytes; importer messages any text) also show what they
hide: a byte that is not UTF-8, a newline, a right-to-left override or any other
invisible character is written as a marked escape (`\\xff`, `\\n`, `\\u202e`), so
a hostile name can neither run nor pass for another.
"""

from __future__ import annotations

import json
import time
import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

from service.storage.names import rfc3339

__all__ = ["TEMPLATES", "age", "environment", "name_html", "size", "text_html"]

TEMPLATES: Final = Path(__file__).parent / "templates"
_SHOWN: Final = {"\n": ("\\n", "a newline"), "\t": ("\\t", "a tab"), "\r": ("\\r", "a return")}
NONE: Final = "\u2013"  # an en dash: no value


def _mark(shown: str, title: str) -> str:
    return f'<span class="esc" title="{escape(title)}">{escape(shown)}</span>'


def text_html(value: object, *, multiline: bool = False) -> Markup:
    """A text escaped for HTML, with its invisible characters written out and marked;
    `multiline` keeps newlines and tabs (for a `<pre>`)."""
    if value is None:
        return Markup("")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    text = str(value)
    if text.isprintable():
        return escape(text)
    out: list[str] = []
    run: list[str] = []
    for ch in text:
        code = ord(ch)
        if ch.isprintable() or (multiline and ch in "\n\t"):
            run.append(ch)
            continue
        out.append(str(escape("".join(run))))
        run.clear()
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            out.append(_mark(f"\\x{code - 0xDC00:02x}", "a byte that is not UTF-8"))
        elif ch in _SHOWN:
            out.append(_mark(*_SHOWN[ch]))
        else:
            shown = f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
            out.append(_mark(shown, unicodedata.name(ch, f"U+{code:04X}, a control character")))
    out.append(str(escape("".join(run))))
    return Markup("".join(out))


def name_html(value: bytes | str | None) -> Markup:
    """A file name or path: escaped and marked as `text_html`, isolated from the text
    around it (a name in a right-to-left script must not reorder the row)."""
    return Markup(f'<bdi class="name">{text_html(value)}</bdi>')


def pre_html(value: object) -> Markup:
    return text_html(value, multiline=True)


def json_html(doc: object) -> Markup:
    """A JSON document, indented; its strings keep their characters (marked where
    invisible) rather than `\\u` escapes."""
    return pre_html(json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=False))


def _epoch(value: float | str | None) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def when(value: float | str | None) -> Markup:
    """A moment as `2026-12-07 10:25:55Z`, with its RFC 3339 form for machines."""
    t = _epoch(value)
    if t is None:
        return Markup(f'<span class="muted">{NONE}</span>')
    shown = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return Markup(f'<time datetime="{rfc3339(t)}">{shown}</time>')


def ago(value: float | str | None, now: float | None = None) -> Markup:
    """How long ago, with the moment itself as the tooltip."""
    t = _epoch(value)
    if t is None:
        return Markup('<span class="muted">never</span>')
    delta = (time.time() if now is None else now) - t
    shown = age(delta) + " ago" if delta >= 0 else "in " + age(-delta)
    exact = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return Markup(f'<time datetime="{rfc3339(t)}" title="{exact}">{shown}</time>')


def age(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    s = abs(seconds)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400 * 2:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} d"


def size(n: int | None) -> str:
    if n is None:
        return NONE
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def number(n: int | float | None) -> str:
    if n is None:
        return NONE
    return f"{n:,.0f}"


def percent(ratio: float | None) -> str:
    return NONE if ratio is None else f"{ratio * 100:.1f} %"


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"], default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    filters: dict[str, Any] = {
        "name": name_html,
        "text": text_html,
        "pre": pre_html,
        "json": json_html,
        "when": when,
        "ago": ago,
        "age": age,
        "size": size,
        "number": number,
        "percent": percent,
    }
    env.filters.update(filters)
    return env
