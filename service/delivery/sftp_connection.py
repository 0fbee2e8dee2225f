"""The SFTP sink's connections: SSH connections shared by all of a sink's deliveries,
opened when a delivery first needs one (a server down at start stops nothing) and again
after one drops, with the server's host key pinned by `known_hosts`.

Its SFTP sessions (one channel each, served by a process of its own on OpenSSH) are
kept for the next deliveries, at most `concurrency` at once, and at most
`sessions_per_connection` on one connection: OpenSSH refuses more than `MaxSessions`
(10 by default) channels on a connection, so a sink with a higher concurrency opens
a second one. Credentials are read once, when the sink opens; nothing of the host's
own SSH setup (`~/.ssh/config`, its agent, its default keys, its known_hosts) is used.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from cryptography.utils import CryptographyDeprecationWarning

from service.delivery.base import SinkError

if TYPE_CHECKING:  # so that CIPHERS comes without the settings' models and their start-up
    from service.settings.sinks import SftpSink

with warnings.catch_warnings():
    # asyncssh names cryptography's DSA types as it imports, which cryptography
    # deprecates; no DSA key is ever used here.
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    import asyncssh

__all__ = ["CIPHERS", "GONE", "Connection"]

log = logging.getLogger("filedock.delivery")

# What says the connection itself is gone: the next delivery opens a new one. (A
# session refused on a live connection, ChannelOpenError, is the server's limit of
# sessions: `_session` opens another connection instead.)
GONE = (
    asyncssh.DisconnectError,
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,
    OSError,
)
_CLOSE_S = 10.0
_KEEPALIVE_S = 30.0
# asyncssh's default ciphers, AES-GCM first: asyncssh builds a new cipher object for each
# chacha20-poly1305 packet and reuses one for AES-GCM, which OpenSSL runs on the CPU's
# AES instructions: half the CPU for a large upload (docs/benchmarks.md, "Delivery over
# SFTP"). A server that offers no AES-GCM negotiates the next one it has.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)


class _HostKeys(asyncssh.SSHClient):
    """Asked about a host key that known_hosts does not list: remembers it, and
    accepts it only when the sink says `accept_unknown_host_key`."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.unknown: str | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.unknown = f"{key.get_algorithm()} {key.get_fingerprint()}"
        return self.accept


class Connection:
    """A sink's SSH connections to its server, their sessions, and the idle ones."""

    def __init__(self, settings: SftpSink) -> None:
        self.settings = settings
        self._options: asyncssh.SSHClientConnectionOptions | None = None
        self._open: dict[asyncssh.SSHClientConnection, int] = {}  # sessions on each
        self._room: dict[asyncssh.SSHClientConnection, int] = {}  # the most it takes
        self._idle: list[tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]] = []
        self._lock = anyio.Lock()
        self._limiter = anyio.CapacityLimiter(settings.concurrency)
        self._accepted: set[str] = set()  # unknown host keys logged already

    async def configure(self) -> None:
        """Read the credentials and known_hosts; `sink_config` when they are missing or
        unusable. Nothing is sent yet."""
        s = self.settings
        try:
            key, password = _credentials(s)
        except ValueError as e:
            raise SinkError("sink_config", f"sink {s.name}: {e}", retryable=False) from None
        # Never empty: asyncssh would read ~/.ssh/known_hosts instead.
        known = asyncssh.import_known_hosts("")
        if s.known_hosts is not None:
            try:
                path = str(s.known_hosts)
                known = await anyio.to_thread.run_sync(asyncssh.read_known_hosts, path)
            except (OSError, ValueError) as e:
                why = e.strerror if isinstance(e, OSError) else e
                what = f"sink {s.name}: known_hosts {s.known_hosts}: {why}"
                raise SinkError("sink_config", what, retryable=False) from None
        self._options = asyncssh.SSHClientConnectionOptions(
            username=s.username,
            client_keys=[key] if key is not None else None,
            password=password,
            known_hosts=known,
            config=None,
            agent_path=None,
            encryption_algs=list(CIPHERS),
            connect_timeout=min(s.timeout_s, 30.0),
            keepalive_interval=_KEEPALIVE_S,
        )

    @asynccontextmanager
    async def session(self) -> AsyncIterator[asyncssh.SFTPClient]:
        """An SFTP session, kept for the next delivery when this one ends well or with a
        verdict of ours (a `SinkError`); a connection that failed is closed, and the
        next delivery opens a new one."""
        async with self._limiter:
            conn, sftp = await self._session()
            try:
                yield sftp
            except SinkError:
                self._keep(conn, sftp)
                raise
            except BaseException as e:
                self._end(conn, sftp)
                if isinstance(e, GONE):
                    self._drop(conn)
                raise
            self._keep(conn, sftp)

    async def close(self) -> None:
        conns = list(self._open)
        self._open.clear()
        self._idle.clear()
        for conn in conns:
            conn.close()
        with anyio.move_on_after(_CLOSE_S, shield=True):
            for conn in conns:
                await conn.wait_closed()

    async def _session(self) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
        while self._idle:
            conn, sftp = self._idle.pop()
            if not conn.is_closed():
                return conn, sftp
            self._end(conn, sftp)
        for _ in range(3):  # a connection that died while idle shows it only now
            conn = await self._connection()
            self._open[conn] += 1
            try:
                return conn, await conn.start_sftp_client()
            except asyncssh.ChannelOpenError:
                self._open[conn] -= 1
                if conn.is_closed():
                    self._drop(conn)
                    continue
                # The server's limit of sessions on a connection: another one takes more.
                self._room[conn] = max(1, self._open[conn])
                log.warning(
                    "the SFTP server refused another session on a connection; opening another",
                    extra={"sink": self.settings.name, "sessions": self._open[conn]},
                )
            except GONE:
                self._open[conn] -= 1
                self._drop(conn)
        raise SinkError("sink_unreachable", "no SFTP session could be opened", retryable=True)

    def _keep(self, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient) -> None:
        if conn in self._open and not conn.is_closed():
            self._idle.append((conn, sftp))
        else:
            self._end(conn, sftp)

    def _end(self, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient) -> None:
        sftp.exit()
        if conn in self._open:
            self._open[conn] -= 1

    def _drop(self, conn: asyncssh.SSHClientConnection) -> None:
        conn.close()
        self._open.pop(conn, None)
        self._room.pop(conn, None)
        self._idle = [(c, s) for c, s in self._idle if c is not conn]

    async def _connection(self) -> asyncssh.SSHClientConnection:
        """A live connection with room for one more session, opened if none has."""
        async with self._lock:
            for conn in [c for c in self._open if c.is_closed()]:
                self._drop(conn)
            limit = self.settings.sessions_per_connection
            for conn, n in self._open.items():
                if n < min(limit, self._room.get(conn, limit)):
                    return conn
            conn = await self._connect()
            self._open[conn] = 0
            return conn

    async def _connect(self) -> asyncssh.SSHClientConnection:
        s = self.settings
        if self._options is None:
            raise RuntimeError(f"sink {s.name} is not open")
        client = _HostKeys(s.accept_unknown_host_key)
        try:
            conn = await asyncssh.connect(
                s.host, s.port, client_factory=lambda: client, options=self._options
            )
        except (asyncssh.HostKeyNotVerifiable, asyncssh.KeyExchangeFailed) as e:
            # KeyExchangeFailed: the server has no key of the types known_hosts lists.
            offered = f"the server offered {client.unknown}" if client.unknown else e.reason
            what = f"host key of {s.host}:{s.port} does not match known_hosts ({offered})"
            raise SinkError("sink_denied", what, retryable=False) from None
        if client.unknown and client.unknown not in self._accepted:
            self._accepted.add(client.unknown)
            log.warning(
                "accepting an unknown SFTP host key (accept_unknown_host_key)",
                extra={"sink": s.name, "server": f"{s.host}:{s.port}", "key": client.unknown},
            )
        return conn


def _credentials(s: SftpSink) -> tuple[asyncssh.SSHKey | None, str | None]:
    """The private key (a key file's text, from a file or a variable) and the password;
    `ValueError` naming which is missing or unusable, never showing it."""
    key = password = None
    if s.private_key is not None:
        try:
            key = asyncssh.import_private_key(s.private_key.read())
        except ValueError as e:  # KeyImportError is one too
            raise ValueError(f"private_key: {e}") from None
    if s.password is not None:
        try:
            password = s.password.read()
        except ValueError as e:
            raise ValueError(f"password: {e}") from None
    return key, password
