"""The SFTP sink against real SFTP servers: OpenSSH's sshd (internal-sftp) and rclone's
`serve sftp`, a second implementation that differs where it matters.

Each server is started once for the module; each test delivers into a folder of its
own through `SftpDelivery` and looks at the result on the served disk. State a test
needs on the server beforehand (other bytes under the final name, a crashed attempt's
temp) is put there over SFTP by a plain asyncssh client, as another party would: rclone
caches its folder listings and would not see files made behind its back.

Where the two servers differ, the test says which does what (and
`service/delivery/sftp.py` how the sink copes with both).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import free_port
from cryptography.utils import CryptographyDeprecationWarning
from servers import SftpServer, rclone_sftp, sftp_server

from service.delivery.base import Item, Receipt, SinkError
from service.delivery.sftp import SftpDelivery
from service.settings.sinks import Secret, SftpSink

with warnings.catch_warnings():
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    import asyncssh

MiB = 1 << 20
JOB = "20250102T030405006Z-0a1b2c3d"
OTHER_JOB = "20250102T030405007Z-4e5f6a7b"
START = {"openssh": sftp_server, "rclone": rclone_sftp}


@dataclass
class Served:
    """A running server and the folder it serves (its `/` for rclone, the login folder
    for OpenSSH)."""

    kind: str
    server: SftpServer
    folder: Path


@pytest.fixture(scope="module", params=["openssh", "rclone"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp(request.param)
    folder = base / "served"
    folder.mkdir()
    with START[request.param](base, folder) as server:
        yield Served(request.param, server, folder)


@asynccontextmanager
async def client(served: Served) -> AsyncIterator[asyncssh.SFTPClient]:
    """Another party's SFTP session on the server."""
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
            yield sftp


async def put(served: Served, path: str, content: bytes) -> None:
    async with client(served) as sftp:
        await sftp.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        async with sftp.open(path, "wb", encoding=None) as f:
            await f.write(content)


@pytest.fixture
async def root(served: Served) -> str:
    """A folder of the test's own on the server, relative to the login folder."""
    name = f"t-{secrets.token_hex(4)}"
    async with client(served) as sftp:
        await sftp.mkdir(name)
    return name


def settings(served: Served, root: str, base: Path, **overrides: Any) -> SftpSink:
    values: dict[str, Any] = {
        "kind": "sftp",
        "name": "box",
        "host": "127.0.0.1",
        "port": served.server.port,
        "username": served.server.user,
        "private_key": Secret(file=served.server.key),
        "root": root,
    }
    values.update(overrides)
    if "known_hosts" not in values:
        values["known_hosts"] = served.server.known_hosts(base / "known_hosts")
    return SftpSink(**values)


@asynccontextmanager
async def opened(s: SftpSink) -> AsyncIterator[SftpDelivery]:
    sink = SftpDelivery(s)
    await sink.open()
    try:
        yield sink
    finally:
        await sink.close()


def item(base: Path, target: str, content: bytes, job: str = JOB) -> Item:
    path = base / f"src-{hashlib.sha256(target.encode() + content).hexdigest()[:12]}"
    path.write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    return Item(path=path, target=target, size=len(content), sha256=sha, job_id=job, sink="box")


def names(folder: Path) -> list[str]:
    """Everything below `folder`, relative: temp names would show here."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def temp_name(target: str, job: str = JOB) -> str:
    folder, _, name = target.rpartition("/")
    return (folder + "/" if folder else "") + f".{name}.{job}.box.filedock-tmp"


async def refused(sink: SftpDelivery, it: Item) -> SinkError:
    with pytest.raises(SinkError) as caught:
        await sink.deliver(it)
    return caught.value


async def test_delivers_into_new_nested_folders_with_a_receipt(
    served: Served, root: str, tmp_path: Path
) -> None:
    content = os.urandom(3 * MiB + 17)
    it = item(tmp_path, "eu/2025/01/orders.bin", content)
    async with opened(settings(served, root, tmp_path)) as sink:
        receipt = await sink.deliver(it)
    final = served.folder / root / "eu/2025/01/orders.bin"
    assert final.read_bytes() == content
    assert names(served.folder / root) == ["eu", "eu/2025", "eu/2025/01", "eu/2025/01/orders.bin"]
    login = "/" if served.kind == "rclone" else f"{served.folder}/"  # its realpath(".")
    remote_path = f"{login}{root}/eu/2025/01/orders.bin"
    port = served.server.port
    assert receipt.location == f"sftp://{served.server.user}@127.0.0.1:{port}{remote_path}"
    assert (receipt.bytes, receipt.sha256, receipt.found) == (len(content), it.sha256, False)
    assert receipt.remote["path"] == remote_path
    assert receipt.remote["size"] == len(content)
    assert receipt.remote["mtime"] == int(final.stat().st_mtime)
    if served.kind == "openssh":  # rclone's server ignores modes (its --file-perms rule)
        assert final.stat().st_mode & 0o777 == 0o644
        assert (served.folder / root / "eu").stat().st_mode & 0o777 == 0o755


async def test_a_folder_removed_after_it_was_seen_is_made_again(
    served: Served, root: str, tmp_path: Path
) -> None:
    """The sink remembers the folders it has seen and stops asking about them; one
    removed on the server meanwhile (an operator clearing it) is made again."""
    async with opened(settings(served, root, tmp_path)) as sink:
        await sink.deliver(item(tmp_path, "day/a.csv", b"first\n"))
        shutil.rmtree(served.folder / root / "day")
        receipt = await sink.deliver(item(tmp_path, "day/b.csv", b"second\n", job=OTHER_JOB))
    final = served.folder / root / "day/b.csv"
    assert final.read_bytes() == b"second\n" and receipt.bytes == len(b"second\n")
    assert names(served.folder / root) == ["day", "day/b.csv"]
    if served.kind == "openssh":  # a small file's mode is set beside its one write
        assert final.stat().st_mode & 0o777 == 0o644


async def test_the_same_item_twice_is_found_and_written_once(
    served: Served, root: str, tmp_path: Path
) -> None:
    it = item(tmp_path, "a.csv", b"id\n1\n")
    async with opened(settings(served, root, tmp_path)) as sink:
        first = await sink.deliver(it)
        mtime = (served.folder / root / "a.csv").stat().st_mtime_ns
        again = await sink.deliver(it)
    assert (first.found, again.found) == (False, True)
    assert again.location == first.location and again.sha256 == it.sha256
    assert names(served.folder / root) == ["a.csv"]
    assert (served.folder / root / "a.csv").stat().st_mtime_ns == mtime  # not written again


async def test_other_bytes_under_the_final_name_are_remote_exists(
    served: Served, root: str, tmp_path: Path
) -> None:
    await put(served, f"{root}/a.csv", b"someone else's\n")
    async with opened(settings(served, root, tmp_path)) as sink:
        error = await refused(sink, item(tmp_path, "a.csv", b"ours\n"))
    assert (error.error_class, error.retryable) == ("remote_exists", False)
    assert "15 bytes" in error.message
    assert (served.folder / root / "a.csv").read_bytes() == b"someone else's\n"
    assert names(served.folder / root) == ["a.csv"]


@pytest.mark.parametrize("posix_rename", [True, False], ids=["posix-rename", "aside"])
async def test_replace_puts_our_bytes_in_place_and_leaves_nothing_else(
    served: Served,
    root: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    posix_rename: bool,
) -> None:
    if not posix_rename:  # as a server without posix-rename@openssh.com answers

        async def unsupported(self: Any, old: Any, new: Any) -> None:
            raise asyncssh.SFTPOpUnsupported("POSIX rename not supported")

        monkeypatch.setattr(asyncssh.SFTPClient, "posix_rename", unsupported)
    await put(served, f"{root}/in/a.csv", b"the old file\n")
    it = item(tmp_path, "in/a.csv", b"the new file, longer\n")
    async with opened(settings(served, root, tmp_path, exists="replace")) as sink:
        receipt = await sink.deliver(it)
    assert not receipt.found and receipt.bytes == len(b"the new file, longer\n")
    assert (served.folder / root / "in/a.csv").read_bytes() == b"the new file, longer\n"
    assert names(served.folder / root) == ["in", "in/a.csv"]


async def test_a_crashed_attempts_temp_is_removed_and_a_foreign_one_untouched(
    served: Served, root: str, tmp_path: Path
) -> None:
    ours, theirs = temp_name("in/a.csv"), temp_name("in/a.csv", job="20250101T000000000Z-ffffffff")
    await put(served, f"{root}/{ours}", b"half of")
    await put(served, f"{root}/{theirs}", b"another job's upload")
    await put(served, f"{root}/in/.a.csv.part", b"someone's temp")
    async with opened(settings(served, root, tmp_path)) as sink:
        await sink.deliver(item(tmp_path, "in/a.csv", b"whole\n"))
    folder = served.folder / root
    assert names(folder) == sorted(["in", "in/a.csv", theirs, "in/.a.csv.part"])
    assert (folder / theirs).read_bytes() == b"another job's upload"
    assert (folder / "in/a.csv").read_bytes() == b"whole\n"


async def test_a_file_that_changed_since_its_claim_is_never_published(
    served: Served, root: str, tmp_path: Path
) -> None:
    it = item(tmp_path, "in/a.csv", b"as claimed\n")
    it.path.write_bytes(b"as changed\n")  # same size, other bytes
    async with opened(settings(served, root, tmp_path)) as sink:
        error = await refused(sink, it)
    assert (error.error_class, error.retryable) == ("modified_during_processing", False)
    assert names(served.folder / root) == ["in"]  # no final name, no temp


def pipe_item(base: Path, target: str, content: bytes) -> Item:
    """An item read from a FIFO: the upload goes only as far as the test writes."""
    fifo = base / f"pipe-{secrets.token_hex(4)}"
    os.mkfifo(fifo)
    sha = hashlib.sha256(content).hexdigest()
    return Item(path=fifo, target=target, size=len(content), sha256=sha, job_id=JOB, sink="box")


@asynccontextmanager
async def feeding(it: Item) -> AsyncIterator[Any]:
    """The write end of `it`'s FIFO, once the sink has opened it to read."""

    def opened_by_the_sink() -> int | None:
        try:  # without a reader, a non-blocking open fails (ENXIO) instead of waiting
            return os.open(it.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            return None

    with anyio.fail_after(20):
        while (fd := opened_by_the_sink()) is None:
            await anyio.sleep(0.01)
    os.set_blocking(fd, True)
    writer = os.fdopen(fd, "wb", 0)
    try:
        yield writer
    finally:
        try:
            await anyio.to_thread.run_sync(writer.close)
        except BrokenPipeError:
            pass


async def write(writer: Any, data: bytes) -> None:
    try:
        await anyio.to_thread.run_sync(writer.write, data)
    except BrokenPipeError:  # the sink stopped reading: it failed
        pass


async def until(condition: Any, what: str, timeout: float = 20) -> None:
    """Poll `condition` until it holds; fail naming `what` at the deadline."""
    with anyio.move_on_after(timeout):
        while not condition():
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


async def test_a_file_that_appears_during_the_upload_is_never_replaced(
    served: Served, root: str, tmp_path: Path
) -> None:
    content = os.urandom(2 * MiB)
    it = pipe_item(tmp_path, "in/a.bin", content)
    temp = served.folder / root / temp_name("in/a.bin")
    outcome: list[Receipt | SinkError] = []
    async with opened(settings(served, root, tmp_path)) as sink:

        async def deliver() -> None:
            try:
                outcome.append(await sink.deliver(it))
            except SinkError as e:
                outcome.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(deliver)
            async with feeding(it) as writer:
                await write(writer, content[:MiB])
                await until(lambda: size_of(temp) >= MiB // 2, "part of the first MiB in the temp")
                await put(served, f"{root}/in/a.bin", b"arrived meanwhile\n")
                await write(writer, content[MiB:])
    (error,) = outcome
    assert isinstance(error, SinkError), error
    assert (error.error_class, error.retryable) == ("remote_exists", False)
    assert (served.folder / root / "in/a.bin").read_bytes() == b"arrived meanwhile\n"
    assert names(served.folder / root) == ["in", "in/a.bin"]


async def test_a_server_killed_mid_upload_is_retryable_and_the_next_attempt_cleans_up(
    served: Served, root: str, tmp_path: Path
) -> None:
    content = os.urandom(4 * MiB)
    it = pipe_item(tmp_path, "in/big.bin", content)
    temp = served.folder / root / temp_name("in/big.bin")
    process = served.server.process
    assert process is not None
    outcome: list[Receipt | SinkError] = []
    async with opened(settings(served, root, tmp_path)) as sink:

        async def deliver() -> None:
            try:
                outcome.append(await sink.deliver(it))
            except SinkError as e:
                outcome.append(e)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(deliver)
                async with feeding(it) as writer:
                    await write(writer, content[:MiB])
                    await until(
                        lambda: size_of(temp) >= MiB // 2, "part of the first MiB in the temp"
                    )
                    await anyio.to_thread.run_sync(process.kill)
                    await write(writer, content[MiB:])
        finally:
            if process.proc is None:
                await anyio.to_thread.run_sync(process.start)
        (error,) = outcome
        assert isinstance(error, SinkError), error
        assert error.retryable and error.error_class == "sink_unreachable", error.message
        assert not (served.folder / root / "in/big.bin").exists()
        # The server is back: the same sink reconnects, and the next attempt of the
        # item removes the temp the killed one left.
        again = dataclasses.replace(it, path=item(tmp_path, "x", content).path)
        receipt = await sink.deliver(again)
    assert not receipt.found
    assert (served.folder / root / "in/big.bin").read_bytes() == content
    assert names(served.folder / root) == ["in", "in/big.bin"]


async def test_a_delivery_cancelled_mid_upload_removes_its_temp(
    served: Served, root: str, tmp_path: Path
) -> None:
    """As the sink's `timeout_s` cancels it; the connection serves the next one."""
    content = os.urandom(2 * MiB)
    it = pipe_item(tmp_path, "in/a.bin", content)
    temp = served.folder / root / temp_name("in/a.bin")
    async with opened(settings(served, root, tmp_path)) as sink:
        scope = anyio.CancelScope()

        async def deliver() -> None:
            with scope:
                await sink.deliver(it)

        async with anyio.create_task_group() as tg:
            tg.start_soon(deliver)
            async with feeding(it) as writer:
                await write(writer, content[:MiB])
                await until(lambda: size_of(temp) >= MiB // 2, "part of the first MiB in the temp")
                scope.cancel()
        assert scope.cancelled_caught
        assert names(served.folder / root) == ["in"]
        receipt = await sink.deliver(
            dataclasses.replace(it, path=item(tmp_path, "x", content).path)
        )
    assert not receipt.found
    assert names(served.folder / root) == ["in", "in/a.bin"]


async def test_deliveries_share_one_connection_and_at_most_concurrency_sessions(
    served: Served, root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions: list[object] = []
    start = asyncssh.SSHClientConnection.start_sftp_client

    def counted(conn: asyncssh.SSHClientConnection, **kw: Any) -> Any:
        sessions.append(conn)
        return start(conn, **kw)

    monkeypatch.setattr(asyncssh.SSHClientConnection, "start_sftp_client", counted)
    before = served.server.logins()
    items = [item(tmp_path, f"many/{n}.bin", os.urandom(100_000 + n)) for n in range(8)]
    receipts: list[Receipt] = []
    async with opened(settings(served, root, tmp_path, concurrency=3)) as sink:
        async with anyio.create_task_group() as tg:
            for it in items:

                async def one(it: Item = it) -> None:
                    receipts.append(await sink.deliver(it))

                tg.start_soon(one)
        receipts.append(await sink.deliver(items[0]))  # later, on the same connection
    assert sum(r.found for r in receipts) == 1 and len(receipts) == 9
    for n, it in enumerate(items):
        assert (served.folder / root / f"many/{n}.bin").read_bytes() == it.path.read_bytes()
    assert served.server.logins() - before == 1
    assert 1 <= len(sessions) <= 3 and len(set(map(id, sessions))) == 1  # kept and reused


async def test_a_host_key_that_does_not_match_is_denied_before_anything_is_written(
    served: Served, root: str, tmp_path: Path
) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")])
    known = served.server.known_hosts(tmp_path / "known_hosts", tmp_path / "other.pub")
    async with opened(settings(served, root, tmp_path, known_hosts=known)) as sink:
        error = await refused(sink, item(tmp_path, "a.csv", b"x\n"))
    assert (error.error_class, error.retryable) == ("sink_denied", False)
    fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", str(served.server.host_key)], capture_output=True, text=True
    ).stdout.split()[1]
    assert f"host key of 127.0.0.1:{served.server.port} does not match known_hosts" in error.message
    assert fingerprint in error.message  # the key the server offered
    assert names(served.folder / root) == []


async def test_a_host_not_in_known_hosts_is_denied(
    served: Served, root: str, tmp_path: Path
) -> None:
    (tmp_path / "empty").write_text("# no hosts\n")
    async with opened(settings(served, root, tmp_path, known_hosts=tmp_path / "empty")) as sink:
        error = await refused(sink, item(tmp_path, "a.csv", b"x\n"))
    assert (error.error_class, error.retryable) == ("sink_denied", False)
    assert names(served.folder / root) == []


async def test_an_unknown_host_key_is_accepted_when_asked_and_logged_once(
    served: Served, root: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings(served, root, tmp_path, known_hosts=None, accept_unknown_host_key=True)
    caplog.set_level(logging.WARNING, logger="filedock.delivery")
    async with opened(s) as sink:
        await sink.deliver(item(tmp_path, "a.csv", b"x\n"))
        await sink.close()  # the next delivery connects again: the same key, no new line
        await sink.deliver(item(tmp_path, "b.csv", b"y\n"))
    (record,) = [r for r in caplog.records if "unknown SFTP host key" in r.getMessage()]
    fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", str(served.server.host_key)], capture_output=True, text=True
    ).stdout.split()[1]
    assert fingerprint in record.__dict__["key"]
    assert names(served.folder / root) == ["a.csv", "b.csv"]


async def test_a_wrong_private_key_is_denied(served: Served, root: str, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "wrong")])
    s = settings(served, root, tmp_path, private_key=Secret(file=tmp_path / "wrong"))
    async with opened(s) as sink:
        error = await refused(sink, item(tmp_path, "a.csv", b"x\n"))
    assert (error.error_class, error.retryable) == ("sink_denied", False)
    assert names(served.folder / root) == []


async def test_a_server_that_is_down_is_unreachable_and_stops_no_start(
    served: Served, tmp_path: Path
) -> None:
    s = settings(served, ".", tmp_path, port=free_port())
    async with opened(s) as sink:  # opening connects to nothing
        error = await refused(sink, item(tmp_path, "a.csv", b"x\n"))
    assert (error.error_class, error.retryable) == ("sink_unreachable", True)
    assert f"sftp://{served.server.user}@127.0.0.1:{s.port}" in error.message


async def test_missing_credentials_or_known_hosts_stop_the_open(
    served: Served, tmp_path: Path
) -> None:
    cases = [
        ({"private_key": Secret(env="FILEDOCK_TEST_NO_SUCH_KEY")}, "FILEDOCK_TEST_NO_SUCH_KEY"),
        ({"known_hosts": tmp_path / "missing"}, "missing"),
        ({"private_key": Secret(file=served.server.host_key)}, "private_key"),  # a public key
    ]
    for overrides, named in cases:
        sink = SftpDelivery(settings(served, ".", tmp_path, **overrides))
        with pytest.raises(SinkError) as caught:
            await sink.open()
        assert (caught.value.error_class, caught.value.retryable) == ("sink_config", False)
        assert named in caught.value.message


async def test_a_missing_root_is_rejected(served: Served, tmp_path: Path) -> None:
    async with opened(settings(served, "no-such-folder/deeper", tmp_path)) as sink:
        error = await refused(sink, item(tmp_path, "a.csv", b"x\n"))
    assert (error.error_class, error.retryable) == ("sink_rejected", False)
    assert not (served.folder / "no-such-folder").exists()


async def test_a_file_where_a_folder_should_be_is_a_bad_target(
    served: Served, root: str, tmp_path: Path
) -> None:
    await put(served, f"{root}/in", b"a file\n")
    async with opened(settings(served, root, tmp_path)) as sink:
        error = await refused(sink, item(tmp_path, "in/a.csv", b"x\n"))
    assert (error.error_class, error.retryable) == ("bad_target", False)
    assert names(served.folder / root) == ["in"]


@pytest.fixture
def read_only(served: Served, tmp_path: Path) -> Iterator[Served]:
    """A second server of the same kind that refuses every write."""
    folder = tmp_path / "ro"
    folder.mkdir()
    with START[served.kind](tmp_path, folder, read_only=True) as server:
        yield Served(served.kind, server, folder)


async def test_a_server_that_refuses_writes_is_a_permission_error(
    read_only: Served, tmp_path: Path
) -> None:
    async with opened(settings(read_only, ".", tmp_path)) as sink:
        error = await refused(sink, item(tmp_path, "a.csv", b"x\n"))
    assert (error.error_class, error.retryable) == ("permission", False), error.message
    assert names(read_only.folder) == []


async def test_a_password_is_used_where_no_key_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On rclone only: the test sshd takes keys alone (run unprivileged, it has no
    password to check)."""
    folder = tmp_path / "pw"
    folder.mkdir()
    monkeypatch.setenv("FILEDOCK_TEST_SFTP_PASSWORD", "s3cret-pass")
    with rclone_sftp(tmp_path, folder, password="s3cret-pass") as server:
        by_password = Served("rclone", server, folder)
        password = Secret(env="FILEDOCK_TEST_SFTP_PASSWORD")
        s = settings(by_password, ".", tmp_path, private_key=None, password=password)
        async with opened(s) as sink:
            receipt = await sink.deliver(item(tmp_path, "a.csv", b"x\n"))
        assert receipt.location.startswith(f"sftp://filedock@127.0.0.1:{server.port}/")
        monkeypatch.setenv("FILEDOCK_TEST_SFTP_PASSWORD", "not-the-password")
        async with opened(s) as sink:
            error = await refused(sink, item(tmp_path, "b.csv", b"y\n"))
        assert (error.error_class, error.retryable) == ("sink_denied", False)
        assert "not-the-password" not in error.message
    assert names(folder) == ["a.csv"]


async def test_more_deliveries_than_the_server_takes_sessions_open_more_connections(
    tmp_path: Path,
) -> None:
    """sshd refuses a connection's channels past MaxSessions: a sink whose concurrency
    is higher opens more connections, and loses no delivery to the refusal."""
    folder = tmp_path / "served"
    folder.mkdir()
    with sftp_server(tmp_path, folder, max_sessions=2) as server:
        served = Served("openssh", server, folder)
        items = [item(tmp_path, f"n/{n}.bin", os.urandom(50_000 + n)) for n in range(12)]
        s = settings(served, ".", tmp_path, concurrency=6, sessions_per_connection=8)
        async with opened(s) as sink, anyio.create_task_group() as tg:
            for it in items:
                tg.start_soon(sink.deliver, it)
        for n, it in enumerate(items):
            assert (folder / f"n/{n}.bin").read_bytes() == it.path.read_bytes()
        assert 3 <= server.logins() <= 6  # two sessions a connection: at least three


@pytest.mark.parametrize(
    ("offered", "negotiated"),
    [
        (None, "aes128-gcm@openssh.com"),  # sshd's defaults: AES-GCM, cheaper here
        ("chacha20-poly1305@openssh.com", "chacha20-poly1305@openssh.com"),
        ("aes256-ctr", "aes256-ctr"),
    ],
)
async def test_aes_gcm_is_preferred_and_any_default_cipher_the_server_offers_works(
    tmp_path: Path, offered: str | None, negotiated: str
) -> None:
    folder = tmp_path / "served"
    folder.mkdir()
    with sftp_server(tmp_path, folder, ciphers=offered, log_level="DEBUG1") as server:
        served = Served("openssh", server, folder)
        async with opened(settings(served, ".", tmp_path)) as sink:
            await sink.deliver(item(tmp_path, "a.csv", b"x\n"))
        assert (folder / "a.csv").read_bytes() == b"x\n"
        assert server.process is not None
        log = server.process.log.read_text(errors="replace")
        assert f"kex: client->server cipher: {negotiated}" in log
