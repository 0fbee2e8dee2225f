"""The configuration contract: one `Settings` object, built once and passed down.

Sources, lowest priority first: defaults, a YAML or TOML file (`--config` or
`FILEDOCK_CONFIG`), then `FILEDOCK_*` environment variables (`__` for nesting).
Unknown keys are errors: a typo in a config file must never be silently dropped.
"""

from __future__ import annotations

import codecs
import fnmatch
import os
import re
import socket
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.errors import ConfigError

__all__ = [
    "CommandImporterSettings",
    "CsvColumn",
    "CsvSqlImporterSettings",
    "Folders",
    "HttpSettings",
    "PythonImporterSettings",
    "Retention",
    "Route",
    "Settings",
    "load_settings",
]

_config_file: ContextVar[Path | None] = ContextVar("filedock_config_file", default=None)

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
_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Folders(_Section):
    """Each folder defaults to `<root>/<name>`; `transfer` and `proc` must share a filesystem."""

    transfer: Path | None = None
    proc: Path | None = None
    archive: Path | None = None
    failed: Path | None = None
    temp: Path | None = None
    state: Path | None = None


class HttpSettings(_Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=9100, ge=0, le=65535)


class Retention(_Section):
    """Retention never drops below 7 days: a shorter value is a configuration error."""

    archive_days: int = Field(default=90, ge=7)
    failed_days: int = Field(default=90, ge=7)
    ledger_days: int = Field(default=90, ge=7)
    interval_s: float = Field(default=3600.0, gt=0)
    batch_size: int = Field(default=500, ge=1)


class CommandImporterSettings(_Section):
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


class PythonImporterSettings(_Section):
    """A callable loaded by dotted path, `package.module:callable`."""

    kind: Literal["python"]
    callable: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    timeout_s: float = Field(default=300.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)


class CsvColumn(_Section):
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


class CsvSqlImporterSettings(_Section):
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


class Route(_Section):
    """A pattern on the path relative to `transfer/`, plus how to import what it matches."""

    name: str = Field(pattern=_NAME_RE)
    match: str = Field(min_length=1)
    readiness: Literal["rename", "stable", "marker"] = "rename"
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    settle_s: float = Field(default=5.0, ge=0)
    marker_suffix: str = Field(default=".done", min_length=1)
    checksum_sidecar: bool = False
    stalled_after_s: float = Field(default=600.0, gt=0)
    max_size_bytes: int | None = Field(default=None, ge=0)
    importer: ImporterSettings
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

    @model_validator(mode="after")
    def _consistent(self) -> Route:
        if self.order == "partition" and self.partition_key is None:
            raise ValueError("order: partition needs partition_key")
        if self.max_backoff_s < self.backoff_s:
            raise ValueError("max_backoff_s must be at least backoff_s")
        return self


class Settings(BaseSettings):
    """The effective configuration of one filedock process."""

    model_config = SettingsConfigDict(
        env_prefix="FILEDOCK_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    root: Path = Path("./data")
    folders: Folders = Folders()
    ledger_url: str | None = None
    watch_mode: Literal["auto", "events", "poll", "scan"] = "auto"
    scan_interval_s: float = Field(default=30.0, gt=0)
    debounce_ms: int = Field(default=50, ge=1)
    max_concurrency: int = Field(default=8, ge=1)
    queue_size: int = Field(default=256, ge=1)
    batch_max_files: int = Field(default=256, ge=1)
    batch_max_delay_ms: float = Field(default=5.0, ge=0)
    shutdown_grace_s: float = Field(default=25.0, ge=0)
    min_free_bytes: int = Field(default=64 << 20, ge=0)
    replica_id: str = Field(default_factory=socket.gethostname)
    lease_s: float = Field(default=60.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    http: HttpSettings = HttpSettings()
    retention: Retention = Retention()
    routes: list[Route] = Field(default_factory=list)

    @field_validator("routes")
    @classmethod
    def _routes_distinct(cls, routes: list[Route]) -> list[Route]:
        seen: set[str] = set()
        for route in routes:
            if route.name in seen:
                raise ValueError(f"route name {route.name!r} is used twice")
            seen.add(route.name)
        return routes

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))

    def folder(self, name: str) -> Path:
        """The absolute path of one of the service's folders."""
        configured: Path | None = getattr(self.folders, name)
        return (configured if configured is not None else self.root / name).absolute()

    @property
    def effective_ledger_url(self) -> str:
        if self.ledger_url:
            return self.ledger_url
        return f"sqlite:///{self.folder('state') / 'ledger.sqlite3'}"

    def route(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)


class _FileSource(PydanticBaseSettingsSource):
    """The YAML or TOML file named by `--config` or `FILEDOCK_CONFIG`."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ returns the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        if path is None:
            return {}
        return read_config_file(path)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from e
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(raw.decode())
        else:
            data = yaml.safe_load(raw)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


@contextmanager
def _using_file(path: Path | None) -> Iterator[None]:
    token = _config_file.set(path)
    try:
        yield
    finally:
        _config_file.reset(token)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings from a file (or `FILEDOCK_CONFIG`) and the environment.

    Raises:
        ConfigError: with one line per invalid field, naming the field and the reason.
    """
    if path is None and os.environ.get("FILEDOCK_CONFIG"):
        path = os.environ["FILEDOCK_CONFIG"]
    with _using_file(Path(path) if path is not None else None):
        try:
            return Settings(**overrides)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, path)) from e


def format_validation_error(error: ValidationError, path: Path | str | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)
