"""Delivery to real SFTP servers (OpenSSH's sshd, rclone's `serve sftp`) through the
service: a route that receives, delivers and archives, killed (SIGKILL,
`FILEDOCK_TEST_CRASH_AT`) before, during (the temp file begun) and after an upload,
then started again. The file is on the server once, under its final name, with our
bytes and no temp file beside it; the receipt says where and what the server holds."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import FiledockTree
from cryptography.utils import CryptographyDeprecationWarning
from servers import SftpServer, rclone_sftp, sftp_server

with warnings.catch_warnings():
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    import asyncssh

MiB = 1 << 20
START = {"openssh": sftp_server, "rclone": rclone_sftp}


@dataclass
class Served:
    kind: str
    server: SftpServer
    folder: Path  # what the server serves, on this disk


@pytest.fixture(scope="module", params=["openssh", "rclone"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp(request.param)
    folder = base / "served"
    folder.mkdir()
    with START[request.param](base, folder) as server:
        yield Served(request.param, server, folder)


@pytest.fixture
def root(served: Served) -> str:
    """A folder of the test's own, made over SFTP (rclone would not see one made on
    the disk behind its back until its listing cache expires)."""
    name = f"t-{secrets.token_hex(4)}"

    async def mkdir() -> None:
        async with asyncssh.connect(
            "127.0.0.1",
            served.server.port,
            username=served.server.user,
            client_keys=[str(served.server.key)],
            known_hosts=None,
            config=None,
            agent_path=None,
        ) as conn:
            async with conn.start_sftp_client() as sftp:
                await sftp.mkdir(name)

    asyncio.run(mkdir())
    return name


def configure(tree: FiledockTree, served: Served, root: str, **overrides: Any) -> None:
    """A hub route to `root` on the server; the key is a file, as a mounted secret."""
    sink = {
        "name": "box",
        "kind": "sftp",
        "host": "127.0.0.1",
        "port": served.server.port,
        "username": served.server.user,
        "private_key": {"file": str(served.server.key)},
        "known_hosts": str(served.server.known_hosts(tree.base / "known_hosts")),
        "root": root,
    } | overrides
    tree.configure(routes=[{"name": "hub", "match": "**", "importer": "none", "deliver": [sink]}])


def show(tree: FiledockTree) -> dict[str, Any]:
    (row,) = tree.rows()
    shown = tree.cli("show", row["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout))


def names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    ("point", "found"),
    [("before_delivery", False), ("mid_delivery", False), ("after_delivery", True)],
)
def test_an_upload_killed_at_any_point_ends_as_one_file_with_a_receipt(
    tree: FiledockTree, served: Served, root: str, point: str, found: bool
) -> None:
    configure(tree, served, root)
    body = hashlib.sha256(point.encode()).digest() * (3 * MiB // 32)  # 3 chunks
    tree.drop("eu/orders.bin", body)
    crashed = tree.run_once(env=tree.env(FILEDOCK_TEST_CRASH_AT=f"{point}:1"))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert tree.rows()[0]["state"] == "delivering"
    if point == "mid_delivery":  # the killed attempt left its temp, partly written
        (temp,) = (served.folder / root / "eu").glob(".orders.bin.*.box.filedock-tmp")
        assert temp.stat().st_size < len(body)
    again = tree.run_once()
    assert again.returncode == 0, again.stderr[-2000:]

    job = show(tree)
    assert job["state"] == "done"
    assert names(served.folder / root) == ["eu", "eu/orders.bin"]  # no temp left
    assert (served.folder / root / "eu/orders.bin").read_bytes() == body
    (sink,) = job["deliveries"]
    assert (sink["state"], sink["attempts"]) == ("delivered", 2)
    (receipt,) = sink["receipts"]
    path = ("/" if served.kind == "rclone" else f"{served.folder}/") + f"{root}/eu/orders.bin"
    user, port = served.server.user, served.server.port
    assert receipt["location"] == f"sftp://{user}@127.0.0.1:{port}{path}"
    assert receipt["found"] is found
    assert (receipt["bytes"], receipt["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert receipt["remote"]["path"] == path and receipt["remote"]["size"] == len(body)
    manifest = json.loads((Path(job["archive_path"]) / "manifest.json").read_text())
    assert manifest["deliveries"] == job["deliveries"]


def test_a_host_key_that_does_not_match_fails_the_delivery_for_good(
    tree: FiledockTree, served: Served, root: str
) -> None:
    configure(tree, served, root)
    other = tree.base / "other-host-key"
    other.with_suffix(".pub").write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
    )
    served.server.known_hosts(tree.base / "known_hosts", other.with_suffix(".pub"))
    tree.drop("a.csv", b"id\n")
    result = tree.run_once()
    assert result.returncode == 1, result.stderr[-2000:]
    job = show(tree)
    assert (job["state"], job["error_class"]) == ("failed", "delivery_failed")
    (sink,) = job["deliveries"]
    assert (sink["state"], sink["error_class"], sink["attempts"]) == ("failed", "sink_denied", 1)
    assert "does not match known_hosts" in sink["error"]
    assert names(served.folder / root) == []


def test_a_missing_known_hosts_file_stops_the_start_naming_the_sink(
    tree: FiledockTree, served: Served, root: str
) -> None:
    configure(tree, served, root, known_hosts=str(tree.base / "no-such-file"))
    result = tree.run_once()
    assert result.returncode == 2
    assert "routes.hub.deliver.box" in result.stderr and "no-such-file" in result.stderr
