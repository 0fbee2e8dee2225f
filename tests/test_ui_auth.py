"""Who may act on the operator page (service/face/ui/auth.py): the token file, sessions,
CSRF tokens and the Origin check."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from service.errors import ConfigError
from service.face.ui.auth import Gate, TokenFile, parse_tokens
from service.settings import UiSettings

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"


def write_tokens(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_token_file_names_each_token() -> None:
    text = f"# on-call tokens\n\n alice : {ALICE} \nbob.smith@ops:{BOB}\n"
    assert parse_tokens(text, "f") == {"alice": ALICE.encode(), "bob.smith@ops": BOB.encode()}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (f"{ALICE}\n", "f:1: expected name:token"),
        (f"al ice:{ALICE}\n", "f:1: expected name:token"),
        (f"-alice:{ALICE}\n", "f:1: expected name:token"),
        ("alice:short\n", "f:1: the token of 'alice' must be 16 to 512"),
        ("alice:with a space inside it\n", "f:1: the token of 'alice' must be"),
        (f"alice:{ALICE}\nalice:{BOB}\n", "f:2: 'alice' is named twice"),
        (f"alice:{ALICE}\nbob:{ALICE}\n", "f:2: the token of 'bob' is another name's too"),
        ("# nobody\n\n", "f: no token in the file"),
    ],
)
def test_an_invalid_token_file_is_refused_naming_the_line_not_the_token(
    text: str, says: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_tokens(text, "f")
    assert says in str(e.value)
    assert ALICE not in str(e.value) and BOB not in str(e.value)


def test_a_missing_token_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        TokenFile(tmp_path / "nope")


def test_who_finds_the_name_of_a_token_and_nothing_else(tmp_path: Path) -> None:
    tokens = TokenFile(write_tokens(tmp_path / "t", f"alice:{ALICE}\nbob:{BOB}\n"))
    assert tokens.configured
    assert (tokens.who(ALICE), tokens.who(f" {BOB}\n")) == ("alice", "bob")
    assert tokens.who(ALICE[:-1]) is None and tokens.who("") is None
    assert TokenFile(None).who(ALICE) is None and not TokenFile(None).configured


def test_a_changed_token_file_is_read_again_and_a_broken_one_refuses_everyone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_tokens(tmp_path / "t", f"alice:{ALICE}\n")
    tokens = TokenFile(path)
    assert tokens.who(ALICE) == "alice"
    write_tokens(path, f"bob:{BOB}\n# alice has left\n")
    os.utime(path, ns=(1, 1))  # a change the mtime alone would show
    assert (tokens.who(ALICE), tokens.who(BOB)) == (None, "bob")
    with caplog.at_level(logging.ERROR, "filedock.ui"):
        write_tokens(path, "bob\n")
        assert tokens.who(BOB) is None
    assert "no action allowed" in caplog.text and BOB not in caplog.text
    path.unlink()
    assert tokens.who(BOB) is None
    write_tokens(path, f"bob:{BOB}\n")
    assert tokens.who(BOB) == "bob"


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    tokens = TokenFile(write_tokens(tmp_path / "t", f"alice:{ALICE}\nbob:{BOB}\n"))
    return Gate(tokens, session_s=3600, allowed_origins=["https://filedock.example.net"])


def test_a_session_proves_its_name_until_it_expires(gate: Gate) -> None:
    cookie, session = gate.issue("alice", now=1000.0)
    assert cookie.startswith("alice.4600.") and ALICE not in cookie
    assert gate.session(cookie, now=4599.0) == session
    assert gate.session(cookie, now=4600.0) is None  # expired
    assert gate.csrf_ok(session, session.csrf)
    assert not gate.csrf_ok(session, session.csrf[:-1] + "0") and not gate.csrf_ok(session, None)
    _, bobs = gate.issue("bob", now=1000.0)
    assert bobs.csrf != session.csrf  # a CSRF token belongs to its session


@pytest.mark.parametrize(
    "forge",
    [
        lambda c: "bob" + c[len("alice") :],  # another name, the same MAC
        lambda c: c.replace(".4600.", ".9999."),  # a later expiry
        lambda c: c[:-1] + ("0" if c[-1] != "0" else "1"),  # a MAC off by a digit
        lambda c: "alice..",
        lambda c: "",
        lambda c: "nobody.4600." + c.rsplit(".", 1)[1],
    ],
)
def test_a_forged_session_is_refused(gate: Gate, forge: object) -> None:
    cookie, _ = gate.issue("alice", now=1000.0)
    assert gate.session(forge(cookie), now=2000.0) is None  # type: ignore[operator]


def test_removing_a_token_ends_its_sessions(gate: Gate, tmp_path: Path) -> None:
    cookie, _ = gate.issue("alice")
    assert gate.session(cookie) is not None
    write_tokens(tmp_path / "t", f"bob:{BOB}\n")
    os.utime(tmp_path / "t", ns=(2, 2))
    assert gate.session(cookie) is None


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ({"host": "127.0.0.1:9100", "origin": "http://127.0.0.1:9100"}, True),
        ({"host": "fd.local", "origin": "http://fd.local:80"}, True),
        ({"host": "fd.local:443", "origin": "https://fd.local"}, True),
        ({"host": "127.0.0.1:9100", "referer": "http://127.0.0.1:9100/ui/jobs/x"}, True),
        ({"host": "internal:9100", "origin": "https://filedock.example.net"}, True),
        ({"host": "127.0.0.1:9100", "origin": "http://evil.example"}, False),
        ({"host": "127.0.0.1:9100", "origin": "http://127.0.0.1:9101"}, False),
        ({"host": "127.0.0.1:9100", "origin": "null"}, False),
        ({"host": "127.0.0.1:9100"}, False),
        ({"host": "127.0.0.1:9100", "origin": "javascript://127.0.0.1:9100"}, False),
        (
            {
                "host": "127.0.0.1:9100",
                "origin": "http://127.0.0.1:9100",
                "sec-fetch-site": "cross-site",
            },
            False,
        ),
        ({"origin": "http://127.0.0.1:9100"}, False),
    ],
)
def test_a_form_must_come_from_the_page_itself(
    gate: Gate, headers: dict[str, str], ok: bool
) -> None:
    assert gate.origin_ok(headers) is ok


def test_allowed_origins_are_origins() -> None:
    ui = UiSettings(allowed_origins=["HTTPS://FileDock.example.net/", "http://10.0.0.5:9100"])
    assert ui.allowed_origins == ["https://filedock.example.net", "http://10.0.0.5:9100"]
    for bad in ("filedock.example.net", "https://x.example/ui", "ftp://x.example", "https://"):
        with pytest.raises(ValueError, match="origin"):
            UiSettings(allowed_origins=[bad])
