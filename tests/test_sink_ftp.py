"""The FTP sink against real servers: vsftpd with TLS (explicit and implicit, its
default `require_ssl_reuse=YES`) and pyftpdlib (plain FTP, stock and with the habits
of other servers: a HASH command, an RNTO that refuses to replace).

Each server is started once for the module; each test delivers into a folder of its
own below the server's, through `FtpDelivery`, and looks at the server's folder on
disk: the bytes are there under the final name once, no temp file of ours is left, a
second delivery finds them, other bytes are refused or replaced, a file that changed
under us never arrives, and the failures a user meets (wrong password, a certificate
that does not verify, the server down or killed mid-upload) come out as the right
error class.
"""

from __future__ import annotations

import ftplib
import hashlib
import io
import itertools
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import free_port
from servers import FtpServer, pyftpdlib_server, vsftpd_tls

import service.delivery.ftp as ftp_module
from service.delivery.base import Item, SinkError
from service.delivery.ftp import FtpDelivery
from service.delivery.ftp_session import TlsFtp, classify
from service.settings.sinks import FtpSink, Secret

MiB = 1 << 20
SERVERS = ["vsftpd", "vsftpd-implicit", "pyftpdlib", "pyftpdlib-hash-refusing"]
_folders = itertools.count()


@pytest.fixture(scope="module", params=SERVERS)
def ftpd(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FtpServer]:
    base = tmp_path_factory.mktemp(request.param)
    serve = base / "serve"
    serve.mkdir()
    start = {
        "vsftpd": lambda: vsftpd_tls(base, serve),
        "vsftpd-implicit": lambda: vsftpd_tls(base, serve, implicit=True),
        "pyftpdlib": lambda: pyftpdlib_server(base, serve),
        "pyftpdlib-hash-refusing": lambda: pyftpdlib_server(
            base, serve, hash="HASH", refuse_rnto=True
        ),
    }[request.param]
    with start() as server:
        yield server


@pytest.fixture
def root(ftpd: FtpServer) -> str:
    """A folder of this test's own on the server, relative to the login folder."""
    name = f"t{next(_folders)}"
    (ftpd.serve / name).mkdir()
    return name


def settings(server: FtpServer, root: str, tmp_path: Path, **overrides: Any) -> FtpSink:
    """Sink settings for `server`, the password in a file (as a mounted secret)."""
    (tmp_path / "ftp-password").write_text(overrides.pop("password", server.password) + "\n")
    values: dict[str, Any] = {
        "kind": "ftp",
        "name": "remote",
        "host": "127.0.0.1",
        "port": server.port,
        "username": server.user,
        "password": Secret(file=tmp_path / "ftp-password"),
        "tls": server.tls,
        "ca_file": server.ca_file,
        "root": root,
        "timeout_s": 30,
    }
    values.update(overrides)
    return FtpSink(**values)


@asynccontextmanager
async def opened(s: FtpSink) -> AsyncIterator[FtpDelivery]:
    sink = FtpDelivery(s)
    await sink.open()
    try:
        yield sink
    finally:
        await sink.close()


def item(base: Path, target: str, content: bytes, *, job_id: str = "j1") -> Item:
    path = base / f"src-{hashlib.md5(target.encode()).hexdigest()}"
    path.write_bytes(content)
    return Item(
        path=path,
        target=target,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        job_id=job_id,
        sink="remote",
    )


async def deliver(s: FtpSink, it: Item) -> Any:
    async with opened(s) as sink:
        return await sink.deliver(it)


async def failure(s: FtpSink, it: Item) -> SinkError:
    with pytest.raises(SinkError) as caught:
        await deliver(s, it)
    return caught.value


def files(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def url(server: FtpServer, path: str) -> str:
    scheme = "ftp" if server.tls == "none" else "ftps"
    return f"{scheme}://{server.user}@127.0.0.1:{server.port}/{path}"


# -- delivering ------------------------------------------------------------------------


async def test_a_file_arrives_in_nested_folders_with_a_receipt(
    ftpd: FtpServer, root: str, tmp_path: Path
) -> None:
    body = os.urandom(MiB + 7)
    it = item(tmp_path, "eu/2024/orders.bin", body)
    receipt = await deliver(settings(ftpd, root, tmp_path), it)

    assert files(ftpd.serve / root) == {"eu/2024/orders.bin": body}
    assert receipt.location == url(ftpd, f"{root}/eu/2024/orders.bin")
    assert (receipt.bytes, receipt.sha256, receipt.found) == (len(body), it.sha256, False)
    remote = receipt.remote
    assert (remote["path"], remote["size"], remote["tls"]) == (
        f"{root}/eu/2024/orders.bin",
        len(body),
        ftpd.tls,
    )
    if ftpd.tls != "none":
        assert remote["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert remote.get("sha256_by") == ftpd.hash_command  # the server checked the bytes too


async def test_an_empty_file_and_a_name_with_spaces_arrive(
    ftpd: FtpServer, root: str, tmp_path: Path
) -> None:
    s = settings(ftpd, root, tmp_path)
    empty = await deliver(s, item(tmp_path, "empty.csv", b""))
    spaced = await deliver(s, item(tmp_path, "a folder/the file ü.csv", b"x\n"))
    assert files(ftpd.serve / root) == {"empty.csv": b"", "a folder/the file ü.csv": b"x\n"}
    assert empty.bytes == 0
    assert spaced.location == url(ftpd, f"{root}/a%20folder/the%20file%20%C3%BC.csv")


async def test_the_same_item_twice_is_found_and_sent_once(
    ftpd: FtpServer, root: str, tmp_path: Path
) -> None:
    s = settings(ftpd, root, tmp_path)
    it = item(tmp_path, "a.csv", b"id\n1\n")
    first = await deliver(s, it)
    second = await deliver(s, it)
    assert (first.found, second.found) == (False, True)
    assert second.location == first.location and second.remote["size"] == 5
    assert files(ftpd.serve / root) == {"a.csv": b"id\n1\n"}


async def test_other_bytes_under_the_name_are_remote_exists_and_kept(
    ftpd: FtpServer, root: str, tmp_path: Path
) -> None:
    (ftpd.serve / root / "a.csv").write_bytes(b"theirs\n")
    (ftpd.serve / root / "b.csv").write_bytes(b"ours, but one byte more\n")
    s = settings(ftpd, root, tmp_path)
    e = await failure(s, item(tmp_path, "a.csv", b"ours!\n"))
    assert (e.error_class, e.retryable) == ("remote_exists", False)
    assert "7 bytes" in e.message
    e = await failure(s, item(tmp_path, "b.csv", b"ours, but one byte mor\n"))
    assert e.error_class == "remote_exists"
    assert files(ftpd.serve / root) == {"a.csv": b"theirs\n", "b.csv": b"ours, but one byte more\n"}


async def test_replace_puts_our_bytes_in_place_of_others(
    ftpd: FtpServer, root: str, tmp_path: Path
) -> None:
    (ftpd.serve / root / "a.csv").write_bytes(b"old bytes\n")
    s = settings(ftpd, root, tmp_path, exists="replace")
    receipt = await deliver(s, item(tmp_path, "a.csv", b"new\n"))
    assert receipt.found is False
    # pyftpdlib-hash-refusing refuses RNTO onto a file: the old one went aside, then away.
    assert files(ftpd.serve / root) == {"a.csv": b"new\n"}


async def test_an_old_file_left_aside_by_a_killed_replace_comes_back(
    ftpd: FtpServer, root: str, tmp_path: Path
) -> None:
    it = item(tmp_path, "a.csv", b"new\n")
    s = settings(ftpd, root, tmp_path, exists="replace")
    aside = FtpDelivery(s).paths(it).aside
    (ftpd.serve / aside).write_bytes(b"old\n")  # killed between its two renames
    assert (await deliver(s, it)).found is False
    assert files(ftpd.serve / root) == {"a.csv": b"new\n"}


async def test_our_leftover_temp_is_removed_and_a_foreign_one_is_not(
    ftpd: FtpServer, root: str, tmp_path: Path
) -> None:
    it = item(tmp_path, "eu/a.csv", b"id\n")
    s = settings(ftpd, root, tmp_path)
    ours = FtpDelivery(s).paths(it).temp
    assert ours == f"{root}/eu/.a.csv.j1.remote.filedock-tmp"
    (ftpd.serve / root / "eu").mkdir()
    (ftpd.serve / ours).write_bytes(b"half of a crashed attempt")
    foreign = ftpd.serve / root / "eu" / ".a.csv.j2.remote.filedock-tmp"
    foreign.write_bytes(b"another job's")
    await deliver(s, it)
    assert files(ftpd.serve / root) == {
        "eu/a.csv": b"id\n",
        "eu/.a.csv.j2.remote.filedock-tmp": b"another job's",
    }


def test_temp_names_are_ours_beside_the_final_one_and_fit_a_folder() -> None:
    s = FtpSink(kind="ftp", name="remote", host="h", root="/srv/in/")
    sink = FtpDelivery(s)
    it = Item(Path("x"), "eu/a.csv", 1, "0" * 64, "J7", "remote")
    paths = sink.paths(it)
    assert (paths.final, paths.folders) == ("/srv/in/eu/a.csv", ("/srv/in/eu",))
    assert paths.temp == "/srv/in/eu/.a.csv.J7.remote.filedock-tmp"
    assert paths.aside == "/srv/in/eu/.a.csv.J7.remote.filedock-old"
    assert sink.location(it) == "ftps://anonymous@h:21/srv/in/eu/a.csv"
    long = sink.paths(Item(Path("x"), "n" * 250, 1, "0" * 64, "J7", "remote"))
    assert len(long.temp.encode()) <= 255 and long.temp.endswith(".J7.remote.filedock-tmp")
    implicit = FtpDelivery(FtpSink(kind="ftp", name="r", host="h", tls="implicit", root="."))
    assert implicit.location(it) == "ftps://anonymous@h:990/eu/a.csv"


@pytest.mark.parametrize("change", ["other bytes", "grown", "shrunk"])
async def test_a_file_that_changed_never_arrives(
    ftpd: FtpServer, root: str, tmp_path: Path, change: str
) -> None:
    body = os.urandom(MiB)
    it = item(tmp_path, "a.bin", body)
    changed = {
        "other bytes": b"\0" + body[1:],
        "grown": body + b"more",
        "shrunk": body[:-1],
    }[change]
    it.path.write_bytes(changed)
    e = await failure(settings(ftpd, root, tmp_path), it)
    assert (e.error_class, e.retryable) == ("modified_during_processing", False)
    assert files(ftpd.serve / root) == {}


async def test_a_wrong_password_is_sink_denied(ftpd: FtpServer, root: str, tmp_path: Path) -> None:
    s = settings(ftpd, root, tmp_path, password="not-the-password-4711")
    e = await failure(s, item(tmp_path, "a.csv", b"x"))
    assert (e.error_class, e.retryable) == ("sink_denied", False)
    assert "530" in e.message and "not-the-password-4711" not in e.message


async def test_sessions_are_reused_and_at_most_concurrency_are_opened(
    ftpd: FtpServer, root: str, tmp_path: Path
) -> None:
    s = settings(ftpd, root, tmp_path, concurrency=2)
    before = ftpd.logins()
    async with opened(s) as sink:
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(sink.deliver, item(tmp_path, f"{i}.csv", f"{i}\n".encode()))
        await sink.deliver(item(tmp_path, "last.csv", b"last\n"))
    assert len(files(ftpd.serve / root)) == 7
    assert 1 <= ftpd.logins() - before <= 2


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vsftpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FtpServer]:
    """vsftpd with explicit TLS, for the tests of TLS itself."""
    base = tmp_path_factory.mktemp("vsftpd-only")
    (base / "serve").mkdir()
    with vsftpd_tls(base, base / "serve") as server:
        yield server


def _login(server: FtpServer, ftp: ftplib.FTP_TLS) -> None:
    ftp.connect("127.0.0.1", server.port)
    ftp.login(server.user, server.password)
    ftp.prot_p()


def test_the_test_server_refuses_data_connections_that_do_not_resume_the_session(
    vsftpd: FtpServer,
) -> None:
    """Python's own FTP_TLS opens a new TLS session for each data connection: vsftpd's
    default require_ssl_reuse refuses it, which is why the sink has its own."""
    plain = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=vsftpd.ca_file), timeout=10)
    try:
        _login(vsftpd, plain)
        with pytest.raises(ftplib.error_perm, match=r"^522 .*session reuse required"):
            plain.storbinary("STOR plain.txt", io.BytesIO(b"x"))
    finally:
        plain.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_data_connections_resume_the_control_session(
    vsftpd: FtpServer, version: ssl.TLSVersion
) -> None:
    context = ssl.create_default_context(cafile=vsftpd.ca_file)
    context.minimum_version = context.maximum_version = version
    ftp = TlsFtp(context=context, timeout=10)
    try:
        _login(vsftpd, ftp)
        reused: list[bool | None] = []

        def sent(_block: bytes) -> None:
            assert isinstance(ftp.data, ssl.SSLSocket)
            reused.append(ftp.data.session_reused)

        ftp.storbinary(f"STOR {version.name}.txt", io.BytesIO(b"resumed"), callback=sent)
        got: list[bytes] = []
        ftp.retrbinary(f"RETR {version.name}.txt", got.append)
        assert b"".join(got) == b"resumed" and reused == [True]
        assert isinstance(ftp.sock, ssl.SSLSocket)
        assert ftp.sock.version() == version.name.replace("_", ".")
    finally:
        ftp.close()


async def test_a_certificate_that_does_not_verify_is_sink_denied(
    vsftpd: FtpServer, tmp_path: Path
) -> None:
    it = item(tmp_path, "a.csv", b"id\n")
    e = await failure(settings(vsftpd, ".", tmp_path, ca_file=None), it)
    assert (e.error_class, e.retryable) == ("sink_denied", False)
    assert "certificate does not verify" in e.message and "ca_file" in e.message
    # Trusting the CA that signed it, or not verifying at all, lets it through.
    assert (await deliver(settings(vsftpd, ".", tmp_path), it)).found is False
    unverified = settings(vsftpd, ".", tmp_path, ca_file=None, verify_tls=False)
    assert (await deliver(unverified, it)).found is True


async def test_a_ca_file_that_cannot_be_read_stops_the_sink_at_open(
    vsftpd: FtpServer, tmp_path: Path
) -> None:
    (tmp_path / "not-a-ca.pem").write_text("not a certificate\n")
    for ca_file in (tmp_path / "missing.pem", tmp_path / "not-a-ca.pem"):
        with pytest.raises(SinkError) as caught:
            await FtpDelivery(settings(vsftpd, ".", tmp_path, ca_file=ca_file)).open()
        assert (caught.value.error_class, caught.value.retryable) == ("sink_config", False)
        assert str(ca_file) in caught.value.message


async def test_the_wrong_tls_mode_is_sink_rejected(vsftpd: FtpServer, tmp_path: Path) -> None:
    s = settings(vsftpd, ".", tmp_path, tls="implicit")  # the server waits for AUTH TLS
    e = await failure(s, item(tmp_path, "a.csv", b"x"))
    assert (e.error_class, e.retryable) == ("sink_rejected", False)
    assert "TLS handshake failed" in e.message


async def test_a_plain_login_where_tls_is_required_is_sink_denied(
    vsftpd: FtpServer, tmp_path: Path
) -> None:
    e = await failure(settings(vsftpd, ".", tmp_path, tls="none"), item(tmp_path, "a", b"x"))
    assert (e.error_class, e.retryable) == ("sink_denied", False)
    assert "530 Anonymous sessions must use encryption" in e.message


async def test_a_root_folder_that_is_not_there_is_refused(
    vsftpd: FtpServer, tmp_path: Path
) -> None:
    s = settings(vsftpd, "no-such-folder", tmp_path)
    e = await failure(s, item(tmp_path, "a.csv", b"x"))
    assert (e.error_class, e.retryable) == ("permission", False)
    assert e.message.endswith("/no-such-folder/a.csv: upload: 553 Could not create file.")


async def test_a_missing_password_stops_the_sink_at_open(vsftpd: FtpServer, tmp_path: Path) -> None:
    missing = Secret(env="FILEDOCK_TEST_NO_SUCH_VAR")
    s = FtpSink(kind="ftp", name="remote", host="127.0.0.1", port=vsftpd.port, password=missing)
    with pytest.raises(SinkError) as caught:
        await FtpDelivery(s).open()
    assert caught.value.error_class == "sink_config"
    assert "FILEDOCK_TEST_NO_SUCH_VAR" in caught.value.message


# -- failures ----------------------------------------------------------------------------


async def test_a_server_that_is_down_is_sink_unreachable(tmp_path: Path) -> None:
    s = FtpSink(kind="ftp", name="remote", host="127.0.0.1", port=free_port(), tls="none")
    e = await failure(s, item(tmp_path, "a.csv", b"x"))
    assert (e.error_class, e.retryable) == ("sink_unreachable", True)
    assert e.message.startswith("ftp://anonymous@127.0.0.1:")


async def test_a_name_with_a_line_break_is_a_bad_target(tmp_path: Path) -> None:
    s = FtpSink(kind="ftp", name="remote", host="127.0.0.1", port=free_port(), tls="none")
    e = await failure(s, item(tmp_path, "a\r\nDELE b.csv", b"x"))
    assert (e.error_class, e.retryable) == ("bad_target", False)


async def test_a_server_killed_mid_upload_is_retried_and_leaves_one_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = tmp_path / "serve"
    serve.mkdir()
    with vsftpd_tls(tmp_path, serve) as server:
        body = os.urandom(8 * MiB)
        it = item(tmp_path, "big.bin", body)
        monkeypatch.setattr(ftp_module, "crash_point", lambda point: server.process.kill())
        async with opened(settings(server, ".", tmp_path)) as sink:
            with pytest.raises(SinkError) as caught:
                await sink.deliver(it)
            assert caught.value.retryable, caught.value.message
            assert caught.value.error_class == "sink_unreachable", caught.value.message
            (temp,) = files(serve).items()  # the first block's worth, or a little more
            assert temp[0] == ".big.bin.j1.remote.filedock-tmp" and len(temp[1]) < len(body)

            monkeypatch.setattr(ftp_module, "crash_point", lambda point: None)
            server.process.start()
            receipt = await sink.deliver(it)  # the same sink: its broken session was dropped
        assert receipt.found is False
        assert files(serve) == {"big.bin": body}


async def test_a_timeout_cuts_a_stalled_upload_loose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink's thread blocks on the server; the caller's timeout shuts its
    connections down under it rather than waiting for the socket timeout (60 s)."""
    serve = tmp_path / "serve"
    serve.mkdir()
    with pyftpdlib_server(tmp_path, serve) as server:
        assert server.process.proc is not None
        pid = server.process.proc.pid
        monkeypatch.setattr(ftp_module, "crash_point", lambda point: os.kill(pid, signal.SIGSTOP))
        try:
            async with opened(settings(server, ".", tmp_path, timeout_s=60)) as sink:
                with anyio.fail_after(20):  # a deadline for the test itself
                    with pytest.raises(TimeoutError):
                        with anyio.fail_after(1):
                            await sink.deliver(item(tmp_path, "big.bin", os.urandom(32 * MiB)))
        finally:
            os.kill(pid, signal.SIGCONT)
        monkeypatch.setattr(ftp_module, "crash_point", lambda point: None)
        async with opened(settings(server, ".", tmp_path)) as sink:
            await sink.deliver(item(tmp_path, "big.bin", b"small now"))
        assert files(serve) == {"big.bin": b"small now"}


@pytest.fixture(scope="module")
def xsha256_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FtpServer]]:
    """pyftpdlib offering XSHA256: one honest, one that answers a wrong digest."""
    base = tmp_path_factory.mktemp("xsha256")
    servers = {}
    with pyftpdlib_server(base, _made(base / "honest"), hash="XSHA256") as honest:
        servers["honest"] = honest
        with pyftpdlib_server(base, _made(base / "lying"), hash="XSHA256!") as lying:
            servers["lying"] = lying
            yield servers


def _made(folder: Path) -> Path:
    folder.mkdir()
    return folder


async def test_a_server_hash_command_checks_the_bytes(
    xsha256_servers: dict[str, FtpServer], tmp_path: Path
) -> None:
    server = xsha256_servers["honest"]
    s = settings(server, ".", tmp_path)
    it = item(tmp_path, "a.csv", b"id\n")
    first, second = await deliver(s, it), await deliver(s, it)
    assert (first.remote["sha256_by"], first.found, second.found) == ("XSHA256", False, True)


async def test_bytes_the_server_does_not_confirm_are_a_checksum_mismatch_and_removed(
    xsha256_servers: dict[str, FtpServer], tmp_path: Path
) -> None:
    server = xsha256_servers["lying"]
    e = await failure(settings(server, ".", tmp_path), item(tmp_path, "a.csv", b"id\n"))
    assert (e.error_class, e.retryable) == ("checksum_mismatch", True)
    assert files(server.serve) == {}  # so that the retry sends it again


@pytest.mark.parametrize(
    ("reply", "error_class", "retryable"),
    [
        ("530 Login incorrect.", "sink_denied", False),
        ("550 Permission denied.", "permission", False),
        ("553 Could not create file.", "permission", False),
        ("552 Exceeded storage allocation.", "disk_full", True),
        ("452 Insufficient storage space.", "disk_full", True),
        ("421 Too many users.", "sink_error", True),
        ("451 Local error.", "sink_error", True),
        ("501 Syntax error.", "sink_rejected", False),
    ],
)
def test_replies_are_classified(reply: str, error_class: str, retryable: bool) -> None:
    kind = ftplib.error_temp if reply.startswith("4") else ftplib.error_perm
    e = classify(kind(reply), "ftp://u@h:21/a.csv: upload")
    assert (e.error_class, e.retryable) == (error_class, retryable)
    assert e.message == f"ftp://u@h:21/a.csv: upload: {reply}"


def test_connection_failures_are_classified() -> None:
    where = "ftp://u@h:21/a.csv: upload"
    cases: list[tuple[BaseException, str]] = [
        (ConnectionRefusedError(111, "Connection refused"), "sink_unreachable"),
        (ConnectionResetError(104, "Connection reset by peer"), "sink_unreachable"),
        (EOFError(), "sink_unreachable"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "sink_unreachable"),
        (socket.gaierror(-2, "Name or service not known"), "sink_unreachable"),
        (TimeoutError("timed out"), "timeout"),
    ]
    for error, error_class in cases:
        e = classify(error, where)
        assert (e.error_class, e.retryable) == (error_class, True), error
