"""The FTP sink's sessions: logging in with ftplib, TLS the way servers demand it, the
few commands a delivery asks, and what each failure means.

With TLS the control connection is protected from the start (`implicit`, port 990)
or after AUTH TLS (`explicit`), and every data connection is protected (PROT P),
passive, and wrapped with the control connection's TLS session: servers such as
vsftpd (`require_ssl_reuse=YES`, its default) refuse any other with `522 ... session
reuse required`, to be sure the data comes from the client that logged in, and
Python's own `FTP_TLS` opens a fresh session for each (on TLS 1.2 and 1.3 alike).

A session remembers its data connection, so that a delivery cut short by its timeout
can shut both connections down under the thread blocked on them.
"""

from __future__ import annotations

import ftplib
import hashlib
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from service.delivery.base import SinkError
from service.settings.sinks import FtpSink

__all__ = [
    "BLOCK",
    "FTP_ERRORS",
    "NOT_MADE",
    "NOT_THERE",
    "PlainFtp",
    "Session",
    "TlsFtp",
    "classify",
    "ignoring",
    "login",
    "server_sha256",
    "sha256_of",
    "size_of",
    "tls_context",
]

BLOCK = 256 << 10
NOT_THERE = ("550",)  # SIZE, DELE, RNFR of a name that does not exist
NOT_MADE = ("550", "553", "521")  # MKD of a folder that exists (or cannot be made)
FTP_ERRORS = (ftplib.Error, OSError, EOFError)
_TLS_CLOSED = (ssl.SSLEOFError, ssl.SSLZeroReturnError)
_SHA256_HEX = re.compile(r"\b[0-9a-fA-F]{64}\b")


class PlainFtp(ftplib.FTP):
    """FTP without TLS that keeps its data connection at hand."""

    data: socket.socket | None = None

    def ntransfercmd(
        self, cmd: str, rest: int | str | None = None
    ) -> tuple[socket.socket, int | None]:
        conn, size = super().ntransfercmd(cmd, rest)
        self.data = conn
        return conn, size


class TlsFtp(ftplib.FTP_TLS):
    """FTP over TLS whose data connections resume the control connection's TLS session;
    `implicit`: TLS from the first byte instead of after AUTH TLS."""

    data: socket.socket | None = None
    implicit = False

    def connect(
        self,
        host: str = "",
        port: int = 0,
        timeout: float = -999,
        source_address: tuple[str, int] | None = None,
    ) -> str:
        if not self.implicit:
            return super().connect(host, port, timeout, source_address)
        self.host, self.port = host, port
        if timeout != -999:
            self.timeout = timeout
        raw = socket.create_connection((host, port), self.timeout, source_address)
        self.af = raw.family
        self.sock = self.context.wrap_socket(raw, server_hostname=host)
        self.file = self.sock.makefile("r", encoding=self.encoding)
        self.welcome = self.getresp()
        return self.welcome

    def ntransfercmd(
        self, cmd: str, rest: int | str | None = None
    ) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        session = self.sock.session if isinstance(self.sock, ssl.SSLSocket) else None
        conn = self.context.wrap_socket(conn, server_hostname=self.host, session=session)
        self.data = conn
        return conn, size


@dataclass
class Session:
    """A logged-in connection, and what its server offers to hash a file with."""

    ftp: PlainFtp | TlsFtp
    hash_command: str | None = None

    def sever(self) -> None:
        """Shut both connections down under a thread blocked on them (from another
        thread: the TLS objects are left alone, only the sockets are shut)."""
        for sock in (self.ftp.data, self.ftp.sock):
            if sock is not None:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self, *, polite: bool = False) -> None:
        """Close the connection (`polite`: say QUIT first, waiting 5 s at most)."""
        try:
            if polite and self.ftp.sock is not None:
                self.ftp.sock.settimeout(5)
                self.ftp.quit()
        except FTP_ERRORS:
            pass
        finally:
            self.ftp.close()

    @property
    def tls_version(self) -> str | None:
        sock = self.ftp.sock
        return sock.version() if isinstance(sock, ssl.SSLSocket) else None


def tls_context(s: FtpSink) -> ssl.SSLContext:
    """The sink's TLS client context: the system's CAs or `ca_file`, checked unless
    `verify_tls` is off; `sink_config` when `ca_file` cannot be loaded."""
    try:
        context = ssl.create_default_context(cafile=s.ca_file)
    except (OSError, ssl.SSLError) as e:
        what = f"sink {s.name}: ca_file {s.ca_file}: {e}"
        raise SinkError("sink_config", what, retryable=False) from None
    if not s.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def login(s: FtpSink, port: int, context: ssl.SSLContext | None, password: str) -> Session:
    """Connect, log in, protect the data (with TLS) and switch to binary: SIZE counts
    bytes only in binary mode. Blocking; ftplib's errors propagate."""
    ftp: PlainFtp | TlsFtp
    if context is None:
        ftp = PlainFtp(timeout=s.timeout_s)
    else:
        ftp = TlsFtp(context=context, timeout=s.timeout_s)
        ftp.implicit = s.tls == "implicit"
    session = Session(ftp)
    try:
        ftp.connect(s.host, port)
        ftp.login(s.username, password)
        if isinstance(ftp, TlsFtp):
            ftp.prot_p()
        ftp.voidcmd("TYPE I")
        session.hash_command = _hash_command(ftp)
    except BaseException:
        session.close()
        raise
    return session


def _hash_command(ftp: ftplib.FTP) -> str | None:
    """`HASH` (draft-bryan-ftpext-hash, SHA-256 chosen) or `XSHA256`, if FEAT offers one."""
    try:
        features = [line.strip() for line in ftp.sendcmd("FEAT").splitlines()[1:-1]]
    except ftplib.Error:
        return None
    for feature in features:
        name, _, args = feature.partition(" ")
        algorithms = [a.strip() for a in args.upper().split(";") if a.strip()]
        if name.upper() == "HASH" and {"SHA-256", "SHA-256*"} & set(algorithms):
            if "SHA-256*" not in algorithms:
                try:
                    ftp.sendcmd("OPTS HASH SHA-256")
                except ftplib.Error:
                    continue
            return "HASH"
    if any(f.upper() == "XSHA256" for f in features):
        return "XSHA256"
    return None


def sha256_of(session: Session, path: str) -> str:
    """A file's SHA-256: by the server where it computes one, else read back (RETR)."""
    if session.hash_command is not None:
        return server_sha256(session, path)
    h = hashlib.sha256()
    session.ftp.retrbinary(f"RETR {path}", h.update, BLOCK)
    return h.hexdigest()


def server_sha256(session: Session, path: str) -> str:
    """What the server's hash command says (`213 [SHA-256 0-N] <hex> [path]`)."""
    reply = session.ftp.sendcmd(f"{session.hash_command} {path}")
    found = _SHA256_HEX.search(reply[4:])
    if found is None:
        raise ftplib.error_reply(f"{session.hash_command} answered {reply!r}")
    return found.group(0).lower()


def size_of(ftp: ftplib.FTP, path: str) -> int | None:
    """The size of a file, or None where there is none (SIZE refuses folders too)."""
    try:
        reply = ftp.sendcmd(f"SIZE {path}")
    except ftplib.error_perm as e:
        if str(e).startswith(NOT_THERE):
            return None
        raise
    if not reply.startswith("213"):
        raise ftplib.error_reply(reply)
    return int(reply[3:].strip())


def ignoring(codes: tuple[str, ...], command: Callable[..., object], *args: str) -> None:
    """Run an ftplib command; a permanent refusal whose code starts with one of
    `codes` is an expected answer (the folder exists, the file is not there)."""
    try:
        command(*args)
    except ftplib.error_perm as e:
        if not str(e).startswith(codes):
            raise


def classify(e: BaseException, where: str, *, handshake: bool = False) -> SinkError:
    """The error class of an ftplib or socket failure (`handshake`: while logging in)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        what = (
            f"{where}: the server's TLS certificate does not verify ({e.verify_message});"
            " name the CA that signed it in ca_file"
        )
        return SinkError("sink_denied", what, retryable=False)
    if isinstance(e, ftplib.Error):
        return _classify_reply(e, where)
    if isinstance(e, TimeoutError):
        return SinkError("timeout", f"{where}: no answer: {e}", retryable=True)
    if isinstance(e, ssl.SSLError) and not isinstance(e, _TLS_CLOSED):
        if handshake:  # the same every time: TLS settings the server does not share
            what = f"{where}: TLS handshake failed ({e}); does the server expect the other tls?"
            return SinkError("sink_rejected", what, retryable=False)
        return SinkError("sink_error", f"{where}: TLS: {e}", retryable=True)
    return SinkError("sink_unreachable", f"{where}: {_why(e)}", retryable=True)


def _classify_reply(e: ftplib.Error, where: str) -> SinkError:
    reply = str(e).strip()
    code = reply[:3]
    if code == "530":
        return SinkError("sink_denied", f"{where}: {reply}", retryable=False)
    if code in ("550", "553"):
        return SinkError("permission", f"{where}: {reply}", retryable=False)
    if code in ("552", "452"):
        return SinkError("disk_full", f"{where}: {reply}", retryable=True)
    if isinstance(e, ftplib.error_perm):
        return SinkError("sink_rejected", f"{where}: {reply}", retryable=False)
    # 4xx, and answers that make no sense (error_reply, error_proto)
    return SinkError("sink_error", f"{where}: {reply}", retryable=True)


def _why(e: BaseException) -> str:
    if isinstance(e, (EOFError, *_TLS_CLOSED)):
        return "the server closed the connection"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
