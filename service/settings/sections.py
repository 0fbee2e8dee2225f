"""The configuration's plain sections: folders, HTTP, the operator page, retention, and
each importer's."""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ArchiveSettings",
    "CommandImporterSettings",
    "Compression",
    "CsvColumn",
    "CsvSqlImporterSettings",
    "Folders",
    "HttpSettings",
    "ImporterSettings",
    "PythonImporterSettings",
    "Retention",
    "Section",
    "UiSettings",
    "distinct",
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=_Named)


def distinct(items: list[N], message: str) -> list[N]:
    """`items`, unless two share a name: then a ValueError of `message`, whose
    `{name}` is that name."""
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ValueError(message.format(name=repr(item.name)))
        seen.add(item.name)
    return items


class Folders(Section):
    """Each folder defaults to `<root>/<name>`; `transfer` and `proc` must share a filesystem."""

    transfer: Path | None = None
    proc: Path | None = None
    archive: Path | None = None
    failed: Path | None = None
    temp: Path | None = None
    state: Path | None = None


class HttpSettings(Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=9100, ge=0, le=65535)


class Compression(Section):
    """How an archived source is compressed: `gzip` (levels 1-9, default 1), `zstd`
    (levels 1-19, default 3) or `none`."""

    compression: Literal["gzip", "zstd", "none"] = "gzip"
    level: int | None = None

    @model_validator(mode="after")
    def _level_in_range(self) -> Compression:
        if self.level is None:
            return self
        top = {"gzip": 9, "zstd": 19, "none": 0}[self.compression]
        if self.compression == "none" or not 1 <= self.level <= top:
            allowed = "none" if self.compression == "none" else f"1 to {top}"
            raise ValueError(
                f"level {self.level} for compression {self.compression}: levels are {allowed}"
            )
        return self


class ArchiveSettings(Compression):
    """The archive's compression (a route's `archive:` can choose its own) and the
    threads that compress a large file (0: one per CPU this process may use)."""

    threads: int = Field(default=0, ge=0, le=256)


class UiSettings(Section):
    """The operator page on the HTTP port (`/`).

    `token_file` names the file of `name:token` lines that may act (retry); without
    one the page is read-only. `allowed_origins` are origins besides the page's own
    that may post its forms (a proxy that rewrites the Host header).
    """

    enabled: bool = True
    token_file: Path | None = None
    allowed_origins: list[str] = Field(default_factory=list)
    session_hours: float = Field(default=12.0, gt=0, le=168)
    refresh_s: float = Field(default=5.0, ge=1, le=3600)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(f"{origin!r}: an origin has no path, query or fragment")
        return [o.rstrip("/").lower() for o in origins]


class Retention(Section):
    """Retention never drops below 7 days: a shorter value is a configuration error."""

    archive_days: int = Field(default=90, ge=7)
    failed_days: int = Field(default=90, ge=7)
    ledger_days: int = Field(default=90, ge=7)
    interval_s: float = Field(default=3600.0, gt=0)
    batch_size: int = Field(default=500, ge=1)


class CommandImporterSettings(Section):
    """An external program run with an argv list (never a shell)."""

    kind: Literal["command"]
    argv: list[str] = Field(min_length=1)
    timeout_s: float = Field(default=300.0, gt=0)
    kill_grace_s: float = Field(default=10.0, ge=0)
    env: dict[str, str] = Field(default_factory=dict)
    log_max_bytes: int = Field(default=1 << 20, ge=1024)

    @field_validator("argv")
    @classmethod
    def _placeholders_known(cls, argv: list[str]) -> list[str]:
        known = {"path", "name", "job_id", "out_dir", "temp_dir", "route", "attempt"}
        for arg in argv:
            for field in re.findall(r"{([^{}]*)}", arg):
                if field not in known:
                    raise ValueError(
                        f"unknown placeholder {{{field}}} in {arg!r}; known: "
                        + ", ".join(sorted(known))
                    )
        return argv


class PythonImporterSettings(Section):
    """A callable loaded by dotted path, `package.module:callable`."""

    kind: Literal["python"]
    callable: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    timeout_s: float = Field(default=300.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class CsvColumn(Section):
    """One target column of a `csv-sql` import and the rules a CSV value must pass.

    `precision` and `scale` (decimal only) bound the digits as SQL's NUMERIC(p, s) does;
    a value with more digits is a row error, never rounded.
    """

    type: Literal["str", "int", "decimal", "bool", "date", "datetime"] = "str"
    required: bool = False
    max_length: int | None = Field(default=None, ge=1)
    pattern: str | None = None
    choices: list[str] | None = None
    precision: int | None = Field(default=None, ge=1, le=1000)
    scale: int | None = Field(default=None, ge=0, le=1000)

    @model_validator(mode="after")
    def _decimal_digits(self) -> CsvColumn:
        if (self.precision is not None or self.scale is not None) and self.type != "decimal":
            raise ValueError("precision and scale apply to type: decimal only")
        if self.scale is not None and self.precision is None:
            raise ValueError("scale needs precision")
        if self.precision is not None and self.scale is not None and self.scale > self.precision:
            raise ValueError("scale must not exceed precision")
        return self

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"invalid regular expression {pattern!r}: {e}") from e
        return pattern


class CsvSqlImporterSettings(Section):
    """Rows of a CSV into a SQL table; failed rows go to a `.pending` file (Kofa)."""

    kind: Literal["csv-sql"]
    database_url: str
    table: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    columns: dict[str, CsvColumn] = Field(min_length=1)
    key: list[str] = Field(default_factory=list)
    mode: Literal["create", "update", "upsert", "remove"] = "create"
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    quotechar: str = Field(default='"', min_length=1, max_length=1)
    encoding: str = "utf-8-sig"
    fallback_encodings: list[str] = Field(default_factory=list)
    header_map: dict[str, str] = Field(default_factory=dict)
    create_table: bool = True
    chunk_rows: int = Field(default=1000, ge=1)
    timeout_s: float = Field(default=3600.0, gt=0)

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, url: str) -> str:
        if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
            return url
        if url.startswith(("postgresql://", "postgres://")):
            return url
        raise ValueError("database_url must be sqlite:///<path> or postgresql://...")

    @field_validator("table")
    @classmethod
    def _table_not_reserved(cls, table: str) -> str:
        if table.lower().startswith("filedock_"):
            raise ValueError("table names starting with filedock_ are reserved for bookkeeping")
        return table

    @field_validator("encoding", "fallback_encodings")
    @classmethod
    def _encodings_known(cls, value: str | list[str]) -> str | list[str]:
        for name in [value] if isinstance(value, str) else value:
            try:
                codecs.lookup(name)
            except LookupError:
                raise ValueError(f"unknown encoding {name!r}") from None
        return value

    @field_validator("header_map")
    @classmethod
    def _header_map_one_to_one(cls, header_map: dict[str, str]) -> dict[str, str]:
        if "import_error" in header_map:
            raise ValueError("the import_error header is always ignored on input")
        targets = list(header_map.values())
        for target in targets:
            if targets.count(target) > 1:
                raise ValueError(f"two headers map to column {target!r}")
        return header_map

    @model_validator(mode="after")
    def _keys_are_columns(self) -> CsvSqlImporterSettings:
        if self.delimiter == self.quotechar or {self.delimiter, self.quotechar} & {"\r", "\n"}:
            raise ValueError("delimiter and quotechar must differ and must not be a line break")
        for name in self.columns:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", name):
                raise ValueError(f"column name {name!r} is not a plain SQL identifier")
            if name == "import_error":
                raise ValueError("import_error is the pending file's error column, not a column")
        for k in self.key:
            if k not in self.columns:
                raise ValueError(f"key column {k!r} is not in columns")
        if self.mode != "create" and not self.key:
            raise ValueError(f"mode {self.mode!r} needs key columns")
        for target in self.header_map.values():
            if target not in self.columns:
                raise ValueError(f"header_map target {target!r} is not in columns")
        return self


ImporterSettings = Annotated[
    CommandImporterSettings | PythonImporterSettings | CsvSqlImporterSettings,
    Field(discriminator="kind"),
]
