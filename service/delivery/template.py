"""Where a file goes on a sink: a template such as `{route}/{date:%Y/%m/%d}/{name}`,
rendered into a relative path that can never leave the sink's root."""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

__all__ = ["FIELDS", "Target", "TemplateError", "check_template", "render"]

FIELDS: Final = ("name", "stem", "ext", "relative_path", "route", "job_id", "sha256", "date")


class TemplateError(ValueError):
    """A template that names an unknown field, or renders to a path outside its root."""


def check_template(template: str) -> str:
    """Raise `TemplateError` for an unknown field or a format only `date` may have."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(f"bad template {template!r}: {e}") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in FIELDS:
            raise TemplateError(
                f"unknown field {{{field}}} in {template!r}; known: " + ", ".join(FIELDS)
            )
        if conversion or (spec and field != "date"):
            raise TemplateError(f"{{{field}}} takes no format or conversion in {template!r}")
    if template.startswith("/"):
        raise TemplateError(f"{template!r} is absolute; a target is relative to the sink's root")
    return template


@dataclass(frozen=True)
class Target:
    """What a template's fields are for one file."""

    name: str
    relative_path: str
    route: str
    job_id: str
    sha256: str
    claimed_at: float

    def fields(self) -> Mapping[str, object]:
        stem, ext = os.path.splitext(self.name)
        return {
            "name": self.name,
            "stem": stem,
            "ext": ext,
            "relative_path": self.relative_path,
            "route": self.route,
            "job_id": self.job_id,
            "sha256": self.sha256,
            "date": datetime.fromtimestamp(self.claimed_at, UTC),
        }


def render(template: str, target: Target) -> str:
    """The relative path `template` gives for `target`: `/`-separated, never empty,
    never absolute, and without `.`, `..` or empty parts (a `relative_path` of the
    upstream's that tried to climb out is refused, not cleaned)."""
    text = template.format_map(target.fields())
    parts = text.split("/")
    if text.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise TemplateError(f"{template!r} gives {text!r}, which is not a plain relative path")
    if "\x00" in text or "\\" in text:
        raise TemplateError(f"{template!r} gives a path with a NUL or a backslash: {text!r}")
    return text
