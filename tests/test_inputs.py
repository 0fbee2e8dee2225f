"""Hostile and odd inputs: each ends in archive/ or failed/ with a clear reason, and the
service is never blocked, never follows a link, never runs a shell."""

from __future__ import annotations

import json
import os
import socket
import stat

from conftest import FiledockTree, command_route


def _row(tree: FiledockTree, name: bytes) -> dict[str, object]:
    rows = [r for r in tree.rows() if bytes(r["name"]) == name]
    assert len(rows) == 1, f"{len(rows)} rows for {name!r}"
    return rows[0]


def _everything_written(tree: FiledockTree, *extra_logs: str) -> bytes:
    blobs = [(tree.root / "state" / "ledger.sqlite3").read_bytes()]
    for path in tree.root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            blobs.append(path.read_bytes())
            if path.suffix == ".gz":
                import gzip

                blobs.append(gzip.decompress(path.read_bytes()))
    blobs += [e.encode() for e in extra_logs]
    return b"\n".join(blobs)


def test_symlink_to_a_secret_is_set_aside_and_never_read(tree: FiledockTree) -> None:
    secret = tree.base / "secret.txt"
    secret.write_bytes(b"TOP-SECRET-CONTENT-9f8e7d")
    tree.configure()
    os.symlink(secret, tree.transfer / "innocent.csv")
    result = tree.run_once()
    assert result.returncode == 1
    row = _row(tree, b"innocent.csv")
    assert row["state"] == "failed" and row["error_class"] == "symlink"
    moved = tree.failed()[str(row["id"])] / "innocent.csv"
    assert moved.is_symlink()  # the link itself was moved aside, not its target
    assert secret.read_bytes() == b"TOP-SECRET-CONTENT-9f8e7d"
    assert not [r for r in tree.records()], "the importer must never run on a symlink"
    assert b"TOP-SECRET" not in _everything_written(tree, result.stdout, result.stderr)


def test_fifo_socket_directory_and_hard_link_are_set_aside(tree: FiledockTree) -> None:
    tree.configure([command_route(match="**/*.csv")])
    os.mkfifo(tree.transfer / "pipe.csv")  # opening it for reading would block forever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fspath(tree.transfer / "sock.csv"))
    (tree.transfer / "folder.csv").mkdir()
    (tree.transfer / "folder.csv" / "inside.txt").write_bytes(b"x")
    (tree.base / "original.csv").write_bytes(b"shared")
    os.link(tree.base / "original.csv", tree.transfer / "linked.csv")
    tree.drop("fine.csv", b"fine\n")
    result = tree.run_once(timeout=60)
    sock.close()
    assert result.returncode == 1
    expect = {
        b"pipe.csv": "not_regular_file",
        b"sock.csv": "not_regular_file",
        b"folder.csv": "not_regular_file",
        b"linked.csv": "hard_link",
    }
    for name, error_class in expect.items():
        row = _row(tree, name)
        assert (row["state"], row["error_class"]) == ("failed", error_class), name
        error = json.loads((tree.failed()[str(row["id"])] / "error.json").read_text())
        assert error["error_class"] == error_class and error["message"]
    assert stat.S_ISFIFO(
        os.lstat(tree.failed()[str(_row(tree, b"pipe.csv")["id"])] / "pipe.csv").st_mode
    )
    assert _row(tree, b"fine.csv")["state"] == "done"
    assert (tree.base / "original.csv").read_bytes() == b"shared"


def test_hostile_names_reach_the_importer_as_one_argument_and_no_shell_runs(
    tree: FiledockTree,
) -> None:
    tree.configure()
    names = [
        b"-rf --no-preserve-root.csv",
        b"$(touch pwned).csv",
        b"semi;colon `id` 'quote\" .csv",
        b"new\nline\ttab\x07bell.csv",
        b"latin1-\xe9t\xe9.csv",  # not valid UTF-8
        "ユ".encode() * 83 + b"ab.csv",  # 255 bytes, mostly 3-byte characters
    ]
    assert len(names[-1]) == 255
    for name in names:
        tree.drop(name, b"payload " + name)
    tree.drop(b"empty.csv", b"")
    result = tree.run_once()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert not list(tree.base.rglob("pwned")) and not os.path.exists("pwned")
    started = [r for r in tree.records() if r["event"] == "start"]
    paths = {bytes.fromhex(r["argv"][-1]).rsplit(b"/", 1)[-1] for r in started}
    assert paths == set(names) | {b"empty.csv"}  # each arrived intact, as one argv element
    rows = {bytes(r["name"]): r for r in tree.rows()}
    assert set(rows) == set(names) | {b"empty.csv"}  # the ledger keeps the exact bytes
    assert all(r["state"] == "done" for r in rows.values())
    assert rows[b"empty.csv"]["size"] == 0
    for line in result.stdout.splitlines():
        json.loads(line)  # one log line stays one JSON object whatever the name holds
    for folder in tree.archived().values():
        for entry in os.listdir(os.fsencode(folder)):
            assert len(entry) <= 255 and not entry.startswith(b"-")
            entry.decode("utf-8")  # archive names are valid UTF-8
    jobs = tree.jobs()
    latin = next(j for j in jobs if j["name"].startswith("latin1"))
    assert latin["name"] == "latin1-\\xe9t\\xe9.csv" and latin["name_b64"]


def test_too_large_is_refused_before_reading(tree: FiledockTree) -> None:
    tree.configure([command_route(max_size_bytes=1024)])
    big = tree.transfer / "huge.bin"
    with open(big, "wb") as f:
        f.truncate(20 * 1024**3)  # a 20 GB sparse file
    result = tree.run_once(timeout=30)
    assert result.returncode == 1
    row = _row(tree, b"huge.bin")
    assert row["error_class"] == "too_large" and row["sha256"] is None
    assert not tree.records()
