"""Delivery to a real FTPS server (vsftpd, explicit TLS with its default
`require_ssl_reuse=YES`) through the service: a route that receives, delivers and
archives, killed before, during (the temp file half uploaded) and after an upload,
then started again. The file is there once, with our bytes; no temp file is left in
the served folder; the receipt says what the server said."""

from __future__ import annotations

import hashlib
import itertools
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FiledockTree
from servers import FtpServer, vsftpd_tls

MiB = 1 << 20
_folders = itertools.count()


@pytest.fixture(scope="module")
def vsftpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FtpServer]:
    base = tmp_path_factory.mktemp("vsftpd")
    (base / "serve").mkdir()
    with vsftpd_tls(base, base / "serve") as server:
        yield server


@pytest.fixture
def folder(vsftpd: FtpServer) -> str:
    """The sink's root for this test: a folder of its own in the served one."""
    name = f"drop{next(_folders)}"
    (vsftpd.serve / name).mkdir()
    return name


def configure(tree: FiledockTree, server: FtpServer, root: str) -> dict[str, str]:
    """A hub route to the server; the password in the environment, as a pod gets it."""
    sink = {
        "name": "partner",
        "kind": "ftp",
        "host": "127.0.0.1",
        "port": server.port,
        "username": server.user,
        "password": {"env": "PARTNER_FTP_PASSWORD"},
        "tls": "explicit",
        "ca_file": str(server.ca_file),
        "root": root,
        "target": "{route}/{relative_path}",
    }
    tree.configure(routes=[{"name": "hub", "match": "**", "importer": "none", "deliver": [sink]}])
    return {"PARTNER_FTP_PASSWORD": server.password}


def show(tree: FiledockTree, env: dict[str, str]) -> dict[str, Any]:
    (row,) = tree.rows()
    shown = tree.cli("show", row["id"], "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout))


def served(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, temp files included, by relative path."""
    found = (p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in found}


@pytest.mark.parametrize(
    ("point", "size", "found"),
    [
        ("before_delivery", 1000, False),
        ("mid_delivery", 2 * MiB, False),  # killed after the first block of the temp file
        ("after_delivery", 2 * MiB, True),
    ],
)
def test_an_upload_killed_at_any_point_ends_as_one_file_with_a_receipt(
    tree: FiledockTree, vsftpd: FtpServer, folder: str, point: str, size: int, found: bool
) -> None:
    secrets = configure(tree, vsftpd, folder)
    body = hashlib.sha256(point.encode()).digest() * (size // 32) + b"!" * (size % 32)
    tree.drop("eu/orders.bin", body)
    crashed = tree.run_once(env=tree.env(FILEDOCK_TEST_CRASH_AT=f"{point}:1", **secrets))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert tree.rows()[0]["state"] == "delivering"
    (row,) = tree.rows()
    left = served(vsftpd.serve / folder)
    temp = f"hub/eu/.orders.bin.{row['id']}.partner.filedock-tmp"
    expected = {
        "before_delivery": set(),
        "mid_delivery": {temp},
        "after_delivery": {"hub/eu/orders.bin"},
    }[point]
    assert set(left) == expected
    assert point != "mid_delivery" or len(left[temp]) < size  # half sent

    again = tree.run_once(env=tree.env(**secrets))
    assert again.returncode == 0, again.stderr[-2000:]

    job = show(tree, tree.env(**secrets))
    assert job["state"] == "done"
    assert served(vsftpd.serve / folder) == {"hub/eu/orders.bin": body}  # no temp file left
    (sink,) = job["deliveries"]
    assert (sink["state"], sink["attempts"]) == ("delivered", 2)
    (receipt,) = sink["receipts"]
    assert receipt["location"] == (
        f"ftps://anonymous@127.0.0.1:{vsftpd.port}/{folder}/hub/eu/orders.bin"
    )
    assert receipt["found"] is found
    assert (receipt["bytes"], receipt["sha256"]) == (size, hashlib.sha256(body).hexdigest())
    remote = receipt["remote"]
    assert (remote["path"], remote["size"], remote["tls"]) == (
        f"{folder}/hub/eu/orders.bin",
        size,
        "explicit",
    )
    manifest = json.loads((Path(job["archive_path"]) / "manifest.json").read_text())
    assert manifest["deliveries"] == job["deliveries"]


def test_a_wrong_password_stops_the_delivery_for_good_without_printing_it(
    tree: FiledockTree, vsftpd: FtpServer, folder: str
) -> None:
    secrets = configure(tree, vsftpd, folder) | {"PARTNER_FTP_PASSWORD": "not-the-pw-4711"}
    tree.drop("a.csv", b"id\n")
    result = tree.run_once(env=tree.env(**secrets))
    assert result.returncode == 1, result.stderr[-2000:]
    job = show(tree, tree.env(**secrets))
    assert (job["state"], job["error_class"]) == ("failed", "delivery_failed")
    (sink,) = job["deliveries"]
    assert (sink["state"], sink["error_class"], sink["attempts"]) == ("failed", "sink_denied", 1)
    error = (tree.folder("failed") / job["id"] / "error.json").read_text()
    everything = error + result.stdout + result.stderr + json.dumps(job)
    assert "not-the-pw-4711" not in everything
    assert served(vsftpd.serve / folder) == {}


def test_a_missing_password_stops_the_start_naming_the_sink(
    tree: FiledockTree, vsftpd: FtpServer, folder: str
) -> None:
    configure(tree, vsftpd, folder)
    result = tree.run_once(env=tree.env())  # PARTNER_FTP_PASSWORD not set
    assert result.returncode == 2
    assert "routes.hub.deliver.partner" in result.stderr
    assert "PARTNER_FTP_PASSWORD" in result.stderr
