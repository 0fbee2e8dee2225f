"""Real servers on loopback for the tests: OpenSSH's sftp and vsftpd, each serving a folder.

Each is started on a free port, waited on until it answers, and stopped at the end.
Where the program is not installed, the test skips (fails under CI=true: `.ci/run`
installs them).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SftpServer:
    port: int
    user: str
    key: Path  # the client's private key

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


@contextmanager
def sftp_server(base: Path, serve: Path) -> Iterator[SftpServer]:
    """OpenSSH's sshd, run as the current user, offering only internal-sftp in `serve`.

    An unprivileged sshd authenticates only the user it runs as; as root it needs
    `/run/sshd` (its privilege-separation folder).
    """
    _require(SSHD, "openssh-server")
    home = base / "sshd"
    home.mkdir()
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True
        )
    (home / "authorized_keys").write_bytes((home / "client.pub").read_bytes())
    port = free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home / 'host'}\n"
        f"PidFile {home / 'sshd.pid'}\nAuthorizedKeysFile {home / 'authorized_keys'}\n"
        "StrictModes no\nUsePAM yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"Subsystem sftp internal-sftp\nForceCommand internal-sftp -d {serve}\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)
    argv = [SSHD, "-D", "-e", "-f", str(home / "sshd_config")]
    with _running(argv, port, home / "sshd.log", "sshd"):
        import pwd

        yield SftpServer(port, pwd.getpwuid(os.getuid()).pw_name, home / "client")


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


def deadline_run(argv: list[str], timeout: float = 120, **kw: object) -> None:
    """Run a client to completion; fail with its output if it fails."""
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    assert result.returncode == 0, (
        f"{argv[0]} exited {result.returncode} after {time.monotonic() - started:.1f}s: "
        f"{result.stdout[-2000:]!r} {result.stderr[-2000:]!r}"
    )
