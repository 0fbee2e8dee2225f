"""Who may act on the operator page: the token file, sessions, CSRF and Origin checks.

The token file holds one `name:token` a line (`#` comments and blank lines aside);
the name is who an action is logged as. An operator signs in once with a token; the
session cookie then carries the name, an expiry and an HMAC keyed by that token, so
every replica reading the same file accepts it, and removing a line ends its sessions.
A form's CSRF token is a second HMAC of the same session. Every POST must also come
from the page's own origin (or one of `ui.allowed_origins`). Secrets are compared
with `hmac.compare_digest` only, and never logged or shown.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from service.errors import ConfigError
from service.face.logs import get_logger

__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "Gate", "Session", "TokenFile", "parse_tokens"]

log = get_logger("filedock.ui")

SESSION_COOKIE: Final = "filedock_session"
LOGIN_COOKIE: Final = "filedock_login"
NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")
TOKEN_RE: Final = re.compile(r"^[\x21-\x7e]{16,512}\Z")


def parse_tokens(text: str, source: str) -> dict[str, bytes]:
    """The tokens of a token file by name.

    Raises:
        ConfigError: naming the line (never the token) that is not `name:token` with a
            valid name and a token of 16 to 512 printable ASCII characters, or a name
            or token used twice, or a file with no token at all.
    """
    tokens: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not NAME_RE.match(name):
            raise ConfigError(
                f"{source}:{n}: expected name:token (a name of letters, digits, _.@-)"
            )
        if not TOKEN_RE.match(token):
            raise ConfigError(
                f"{source}:{n}: the token of {name!r} must be 16 to 512 printable ASCII"
                " characters without spaces"
            )
        if name in tokens:
            raise ConfigError(f"{source}:{n}: {name!r} is named twice")
        if any(hmac.compare_digest(token.encode(), t) for t in tokens.values()):
            raise ConfigError(f"{source}:{n}: the token of {name!r} is another name's too")
        tokens[name] = token.encode()
    if not tokens:
        raise ConfigError(f"{source}: no token in the file (lines of name:token)")
    return tokens


class TokenFile:
    """The token file, read at start (an invalid one stops the start) and again
    whenever it changes, so a rotated secret takes effect without a restart. A file
    that turns unreadable or invalid later refuses every action until it is fixed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._tokens: dict[str, bytes] = {}
        if path is not None:
            self._tokens = self._read(path)

    @property
    def configured(self) -> bool:
        return self.path is not None

    def _read(self, path: Path) -> dict[str, bytes]:
        try:
            st = os.stat(path)
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"ui.token_file: cannot read {path}: {e}") from e
        self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        return parse_tokens(text, f"ui.token_file {path}")

    def tokens(self) -> Mapping[str, bytes]:
        if self.path is None:
            return {}
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        if st is None or (st.st_ino, st.st_mtime_ns, st.st_size) != self._seen:
            try:
                self._tokens = self._read(self.path)
                log.info("ui token file read", extra={"names": sorted(self._tokens)})
            except ConfigError as e:
                self._seen, self._tokens = None, {}
                log.error("ui token file refused: no action allowed", extra={"error": str(e)})
        return self._tokens

    def who(self, presented: str) -> str | None:
        """The name whose token this is; every token is compared, so the time taken
        tells nothing of which one came close."""
        given = presented.strip().encode()
        found = None
        for name, token in self.tokens().items():
            if hmac.compare_digest(given, token):
                found = name
        return found


@dataclass(frozen=True)
class Session:
    """A signed-in operator: the token's name, until when, and the forms' CSRF token."""

    name: str
    expires: int
    csrf: str


def _mac(token: bytes, purpose: str, name: str, expires: int) -> str:
    message = f"filedock-ui:{purpose}\0{name}\0{expires}".encode()
    return hmac.new(token, message, hashlib.sha256).hexdigest()


class Gate:
    """Sessions, CSRF tokens and origins, for one token file."""

    def __init__(
        self, tokens: TokenFile, *, session_s: float, allowed_origins: Sequence[str] = ()
    ) -> None:
        self.tokens = tokens
        self.session_s = session_s
        self.allowed_origins = frozenset(allowed_origins)

    def issue(self, name: str, now: float | None = None) -> tuple[str, Session]:
        """A session for `name` (signed in just now): the cookie's value and itself."""
        token = self.tokens.tokens()[name]
        expires = int((time.time() if now is None else now) + self.session_s)
        cookie = f"{name}.{expires}.{_mac(token, 'session', name, expires)}"
        return cookie, Session(name, expires, _mac(token, "csrf", name, expires))

    def session(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie proves, or None (forged, expired, or its token gone)."""
        if not cookie or cookie.count(".") < 2:
            return None
        name, expires_text, mac = cookie.rsplit(".", 2)
        token = self.tokens.tokens().get(name)
        if token is None or not expires_text.isdigit():
            return None
        expires = int(expires_text)
        if expires <= (time.time() if now is None else now):
            return None
        if not hmac.compare_digest(mac.encode(), _mac(token, "session", name, expires).encode()):
            return None
        return Session(name, expires, _mac(token, "csrf", name, expires))

    @staticmethod
    def csrf_ok(session: Session, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(
            presented.encode(), session.csrf.encode()
        )

    @staticmethod
    def login_nonce() -> str:
        """The double-submit value of the sign-in form (its cookie and its field)."""
        return secrets.token_urlsafe(24)

    def origin_ok(self, headers: Mapping[str, str]) -> bool:
        """The form was posted from this page: its Origin (or, without one, its
        Referer) is the page's own host, or an allowed origin; a cross-site fetch as
        the browser reports it is refused whatever the headers say."""
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        source = headers.get("origin") or headers.get("referer")
        if not source or source == "null":
            return False
        parts = urlsplit(source)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        if origin in self.allowed_origins:
            return True
        host = headers.get("host", "").lower()
        default = {"http": ":80", "https": ":443"}[parts.scheme]
        return bool(host) and parts.netloc.lower().removesuffix(default) == host.removesuffix(
            default
        )
