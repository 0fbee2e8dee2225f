"""The sinks a route delivers to (`deliver:`), one model per kind.

Credentials are never in the configuration itself: a `Secret` names the environment
variable or the file (a mounted Kubernetes secret) that holds each one, so printing
the settings (`check-config`) never shows a secret.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from service.delivery.template import TemplateError, check_template
from service.settings.sections import Section

__all__ = [
    "DirectorySink",
    "FtpSink",
    "HttpSink",
    "S3Sink",
    "Secret",
    "SftpSink",
    "SinkSettings",
    "template_of",
]

_SINK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class Secret(Section):
    """Where a credential is read from: `env` (a variable's name) or `file` (a path,
    trailing newline dropped). Read when the sink opens, never printed."""

    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret names exactly one of env or file")
        return self

    def read(self) -> str:
        """The secret's value; `ValueError` naming the source when it is not there."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ValueError(f"environment variable {self.env} is not set")
            return value
        assert self.file is not None
        try:
            return self.file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise ValueError(f"cannot read secret file {self.file}: {e.strerror}") from None


class _Sink(Section):
    """What every sink has: a name unique in its route, what it sends, how often it
    tries, how many deliveries run at once, and when it pauses."""

    name: str = Field(pattern=_SINK_NAME)
    send: Literal["source", "outputs"] = "source"
    exists: Literal["fail", "replace"] = "fail"
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=10.0, ge=0)
    max_backoff_s: float = Field(default=3600.0, ge=0)
    concurrency: int = Field(default=4, ge=1, le=256)
    timeout_s: float = Field(default=300.0, gt=0)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_pause_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> _Sink:
        if self.max_backoff_s < self.backoff_s:
            raise ValueError("max_backoff_s must be at least backoff_s")
        return self


def _template(value: str) -> str:
    try:
        return check_template(value)
    except TemplateError as e:
        raise ValueError(str(e)) from None


class S3Sink(_Sink):
    """An S3 bucket (AWS or an S3-compatible store: `endpoint_url`, `path_style`)."""

    kind: Literal["s3"]
    bucket: str = Field(min_length=3, max_length=63)
    key: str = "{route}/{date:%Y/%m/%d}/{name}"
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    path_style: bool = False
    access_key_id: Secret = Secret(env="AWS_ACCESS_KEY_ID")
    secret_access_key: Secret = Secret(env="AWS_SECRET_ACCESS_KEY")
    # `sha256`: the store checks the body against x-amz-checksum-sha256 (and the body
    # is not signed too); `none`: no checksum header (stores that reject it), the body
    # signed where the endpoint is plain http. Either way a PUT carries its Content-MD5,
    # and what the store holds after is checked: a PUT's ETag against that MD5, or a
    # HEAD of size and our x-amz-meta-sha256.
    checksum: Literal["sha256", "none"] = "sha256"
    # botocore's own CRC checksums, which some S3-compatible stores reject.
    request_checksum_calculation: Literal["when_required", "when_supported"] = "when_required"
    response_checksum_validation: Literal["when_required", "when_supported"] = "when_required"
    # Writes carry If-None-Match: * (`exists: fail`); false for stores that refuse it.
    conditional_writes: bool = True
    # A HEAD before each single PUT finds our bytes already there (a retry after a lost
    # answer) or another's object before anything is sent, on any store. false: the
    # conditional PUT alone decides, one request a file instead of two; only for stores
    # that honour If-None-Match (AWS, SeaweedFS, MinIO; not rclone's). A multipart
    # upload is always looked for first.
    head_first: bool = True
    # A single PUT's ETag is its MD5 and is checked as one; false for buckets where it
    # is not (AWS SSE-KMS or SSE-C encryption).
    etag_is_md5: bool = True
    # A smaller file goes in one PUT with its Content-MD5 (read into memory up to a
    # MiB, streamed from the file above); a larger one in a multipart upload, each part
    # streamed from the file.
    multipart_threshold_bytes: int = Field(default=64 << 20, ge=5 << 20)
    part_size_bytes: int = Field(default=16 << 20, ge=5 << 20, le=5 << 30)
    storage_class: str | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, key: str) -> str:
        return _template(key)

    @field_validator("prefix")
    @classmethod
    def _prefix_relative(cls, prefix: str) -> str:
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError("prefix is relative to the bucket, without a leading / or ..")
        return prefix

    @model_validator(mode="after")
    def _something_guards_exists(self) -> S3Sink:
        if not self.head_first and not self.conditional_writes and self.exists == "fail":
            raise ValueError(
                "head_first: false needs conditional_writes: true with exists: fail"
                " (nothing else would keep another's object from being replaced)"
            )
        return self


class HttpSink(_Sink):
    """An HTTP endpoint that takes the file as the request body."""

    kind: Literal["http"]
    url: str
    method: Literal["PUT", "POST"] = "PUT"
    headers: dict[str, str] = Field(default_factory=dict)
    secret_headers: dict[str, Secret] = Field(default_factory=dict)
    # 5xx, connection errors and timeouts are always retried; these 4xx as well.
    retry_statuses: list[int] = Field(default_factory=lambda: [408, 425, 429])
    verify_tls: bool = True
    ca_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _url_template(cls, url: str) -> str:
        scheme, _, rest = url.partition("://")
        host, _, path = rest.partition("/")
        if scheme not in ("http", "https") or not host:
            raise ValueError("url must be http://host/... or https://host/...")
        if "{" in host:
            raise ValueError("the scheme and host of url are fixed; fields go in its path")
        if "?" in url or "#" in url:
            raise ValueError("url takes no query or fragment: the path names the file")
        if not path:
            raise ValueError("url needs a path after the host, e.g. https://host/in/{name}")
        return f"{scheme}://{host}/{_template(path)}"

    @field_validator("retry_statuses")
    @classmethod
    def _four_hundreds(cls, statuses: list[int]) -> list[int]:
        for s in statuses:
            if not 400 <= s < 500:
                raise ValueError(f"retry_statuses lists 4xx codes (5xx are always retried): {s}")
        return statuses


class _Placed(_Sink):
    """A sink whose files go to `target` below its root (a path template)."""

    target: str = "{relative_path}"

    @field_validator("target")
    @classmethod
    def _target(cls, target: str) -> str:
        return _template(target)


class DirectorySink(_Placed):
    """A folder (another volume, a mounted share): temp name, fsync, rename."""

    kind: Literal["directory"]
    path: Path
    fsync: bool = True

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        if not path.is_absolute():
            raise ValueError("path must be absolute")
        return path


class SftpSink(_Placed):
    """A folder on an SFTP server: temp name in the target folder, then rename."""

    kind: Literal["sftp"]
    host: str = Field(min_length=1)
    port: int = Field(default=22, ge=1, le=65535)
    username: str = Field(min_length=1)
    private_key: Secret | None = None  # a key file (mounted secret), or its text in a variable
    password: Secret | None = None  # where the server takes no key
    # The server's host key must be listed here (OpenSSH known_hosts format); a key
    # that does not match fails the sink (sink_denied). No trust on first use unless
    # `accept_unknown_host_key` (then the key seen is logged, never written).
    known_hosts: Path | None = None
    accept_unknown_host_key: bool = False
    root: str = "."  # the remote folder targets are relative to (absolute, or from login)
    dir_mode: int = Field(default=0o755, ge=0, le=0o7777)
    file_mode: int = Field(default=0o644, ge=0, le=0o7777)
    # OpenSSH takes at most MaxSessions (10) sessions on one connection; more
    # deliveries at once open more connections.
    sessions_per_connection: int = Field(default=8, ge=1, le=64)

    @model_validator(mode="after")
    def _credentials(self) -> SftpSink:
        if self.private_key is None and self.password is None:
            raise ValueError("an sftp sink needs private_key or password")
        if self.known_hosts is None and not self.accept_unknown_host_key:
            raise ValueError(
                "an sftp sink needs known_hosts (the server's host key), or"
                " accept_unknown_host_key: true to trust any key"
            )
        return self


class FtpSink(_Placed):
    """A folder on an FTP or FTPS server: temp name in the target folder, then rename."""

    kind: Literal["ftp"]
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)  # 21, or 990 with tls: implicit
    username: str = "anonymous"
    password: Secret | None = None
    tls: Literal["none", "explicit", "implicit"] = "explicit"
    verify_tls: bool = True
    ca_file: Path | None = None
    root: str = "/"


SinkSettings = Annotated[
    S3Sink | HttpSink | DirectorySink | SftpSink | FtpSink, Field(discriminator="kind")
]


def template_of(sink: SinkSettings) -> str:
    """The template that places a file on `sink`: s3 `key`, http the path of `url`
    (after the host, without its leading `/`), the others' `target`."""
    if isinstance(sink, S3Sink):
        return sink.key
    if isinstance(sink, DirectorySink | SftpSink | FtpSink):
        return sink.target
    return sink.url.split("://", 1)[1].partition("/")[2]
