"""The configuration contract: one `Settings` object, built once and passed down.

Sources, lowest priority first: defaults, a YAML or TOML file (`--config` or
`FILEDOCK_CONFIG`), then `FILEDOCK_*` environment variables (`__` for nesting).
Unknown keys are errors: a typo in a config file must never be silently dropped.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.errors import ConfigError
from service.settings.notify import ChannelSettings
from service.settings.route import Route
from service.settings.sections import (
    ArchiveSettings,
    Folders,
    HttpSettings,
    Retention,
    UiSettings,
    distinct,
)

__all__ = ["Settings", "format_validation_error", "load_settings", "read_config_file"]

_config_file: ContextVar[Path | None] = ContextVar("filedock_config_file", default=None)


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
    ui: UiSettings = UiSettings()
    retention: Retention = Retention()
    archive: ArchiveSettings = ArchiveSettings()
    # How a batch of claims or archives is made durable: one syncfs() of the filesystem,
    # an fsync of each file and folder, or (auto) whichever is cheaper now.
    barrier: Literal["auto", "syncfs", "fsync"] = "syncfs"
    routes: list[Route] = Field(default_factory=list)
    notify: list[ChannelSettings] = Field(default_factory=list)

    @field_validator("notify")
    @classmethod
    def _channels_distinct(cls, channels: list[ChannelSettings]) -> list[ChannelSettings]:
        return distinct(channels, "channel name {name} is used twice")

    @field_validator("routes")
    @classmethod
    def _routes_distinct(cls, routes: list[Route]) -> list[Route]:
        return distinct(routes, "route name {name} is used twice")

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
