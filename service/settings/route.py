"""A route: a pattern on the path relative to `transfer/`, and how to take and import
what it matches."""

from __future__ import annotations

import fnmatch
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from service.settings.expect import Expectation
from service.settings.sections import Compression, ImporterSettings, Section, distinct
from service.settings.sinks import SinkSettings

__all__ = ["DEFAULT_IGNORE", "NAME_RE", "Route"]

# The temporary names common uploaders write before they rename to the final name:
# never claimed (the README lists each client and the readiness it needs).
DEFAULT_IGNORE = [
    ".*",  # rsync (.name.XXXXXX), lftp xfer:use-temp-file (.in.name.), editors, dot-files
    "*.partial",  # rclone (name.<8 hex>.partial)
    "*.part",  # Firefox, curl/wget scripts, sftp `put name.part`
    "*.filepart",  # WinSCP
    "*.crdownload",  # Chrome, Edge
    "*.download",  # Safari (a folder)
    "*.writing",  # Spring Integration, Apache Camel (tempFileName)
    "*.inprogress",  # Apache Camel, Flume, Flink
    "*.tmp",
    "*.temp",
    "~$*",  # Microsoft Office lock and save files
]
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class Route(Section):
    """A pattern on the path relative to `transfer/`, plus how to import what it matches
    (`importer: none`: not at all), where to deliver it (`deliver:`) and which files
    are due by when (`expect:`)."""

    name: str = Field(pattern=NAME_RE)
    match: str = Field(min_length=1)
    readiness: Literal["rename", "stable", "marker"] = "rename"
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    settle_s: float = Field(default=5.0, ge=0)
    marker_suffix: str = Field(default=".done", min_length=1)
    checksum_sidecar: bool = False
    stalled_after_s: float = Field(default=600.0, gt=0)
    max_size_bytes: int | None = Field(default=None, ge=0)
    importer: ImporterSettings | Literal["none"]
    deliver: list[SinkSettings] = Field(default_factory=list)
    expect: list[Expectation] = Field(default_factory=list)
    archive: Compression | None = None
    concurrency: int = Field(default=4, ge=1)
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=10.0, ge=0)
    max_backoff_s: float = Field(default=3600.0, ge=0)
    order: Literal["none", "fifo", "partition"] = "none"
    partition_key: str | None = None
    duplicates: Literal["import", "skip"] = "import"
    dedup_window_days: float = Field(default=30.0, gt=0)

    @field_validator("match")
    @classmethod
    def _relative_glob(cls, pattern: str) -> str:
        if pattern.startswith("/") or ".." in pattern.split("/"):
            raise ValueError("match is a glob on the path relative to transfer/, without / or ..")
        try:
            fnmatch.translate(pattern)
        except re.error as e:  # pragma: no cover - fnmatch escapes nearly everything
            raise ValueError(f"invalid glob {pattern!r}: {e}") from e
        return pattern

    @field_validator("partition_key")
    @classmethod
    def _key_group(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return None
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"invalid regular expression {pattern!r}: {e}") from e
        if "key" not in compiled.groupindex:
            raise ValueError("partition_key needs a named group (?P<key>...)")
        return pattern

    @field_validator("deliver")
    @classmethod
    def _sinks_distinct(cls, sinks: list[SinkSettings]) -> list[SinkSettings]:
        return distinct(sinks, "two sinks are named {name}; a sink's name is unique in its route")

    @field_validator("expect")
    @classmethod
    def _expectations_distinct(cls, expected: list[Expectation]) -> list[Expectation]:
        return distinct(
            expected, "two expectations are named {name}; an expectation's name is unique"
        )

    @model_validator(mode="after")
    def _consistent(self) -> Route:
        if self.order == "partition" and self.partition_key is None:
            raise ValueError("order: partition needs partition_key")
        if self.max_backoff_s < self.backoff_s:
            raise ValueError("max_backoff_s must be at least backoff_s")
        if self.importer == "none":
            for sink in self.deliver:
                if sink.send == "outputs":
                    raise ValueError(f"sink {sink.name!r} sends outputs; importer: none makes none")
        return self
