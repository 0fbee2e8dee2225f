"""Fixtures shared by the whole suite: tool discovery, the PostgreSQL URL, waiting on conditions.

A test that needs an external tool or server skips locally with the reason, but
under `CI=true` a missing tool is a failure: CI must prove everything.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from service.ledger import Ledger, ledger_for_url

T = TypeVar("T")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip with the reason; under CI=true fail instead (a skip there hides a gap)."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The path of an executable, or skip (fail under CI) naming the missing tool."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed (see .ci/run for how CI installs it)")
        raise AssertionError("unreachable")
    return path


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll `condition` until it returns a truthy value; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


@pytest.fixture
def postgres_url() -> str:
    """The URL of the test PostgreSQL server, from FILEDOCK_TEST_POSTGRES_URL."""
    url = os.environ.get("FILEDOCK_TEST_POSTGRES_URL")
    if not url:
        skip_or_fail("FILEDOCK_TEST_POSTGRES_URL is not set (no PostgreSQL server to test with)")
    assert url is not None
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as e:
        skip_or_fail(f"PostgreSQL at {url} is not reachable: {e}")
    return url


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL URL whose tables live in a fresh schema, dropped after the test."""
    import uuid

    import psycopg

    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in postgres_url else "?"
        yield f"{postgres_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each ledger backend in turn: a SQLite file, and a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'ledger.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    return url


OpenLedger = Callable[[], Awaitable[Ledger]]


@pytest.fixture
async def open_ledger(backend_url: str) -> AsyncIterator[OpenLedger]:
    """Opens a new ledger on the test's database each call; all are closed at the end."""
    opened: list[Ledger] = []

    async def factory() -> Ledger:
        ledger = ledger_for_url(backend_url)
        await ledger.open()
        opened.append(ledger)
        return ledger

    yield factory
    for ledger in opened:
        await ledger.close()


@pytest.fixture
async def ledger(open_ledger: OpenLedger) -> Ledger:
    """A ledger on each backend (see `backend_url`)."""
    return await open_ledger()


# -- the real service on a tmp_path tree ------------------------------------------------


TESTS = Path(__file__).parent
REPO = TESTS.parent
FAKE_IMPORTER = TESTS / "fake_importer.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command_route(name: str = "main", match: str = "**", **overrides: Any) -> dict[str, Any]:
    """A route whose importer is tests/fake_importer.py (its behaviour is read from the file)."""
    route: dict[str, Any] = {
        "name": name,
        "match": match,
        "importer": {
            "kind": "command",
            "argv": [sys.executable, str(FAKE_IMPORTER), "{out_dir}", "--", "{path}"],
            "timeout_s": 30,
            "kill_grace_s": 1,
        },
        "max_attempts": 3,
        "backoff_s": 0,
        "max_backoff_s": 0,
    }
    route.update(overrides)
    return route


class Service:
    """A `filedock run` subprocess."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log_path

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metric(self, name: str) -> float | None:
        """The value of an unlabelled sample in /metrics; None while it is not exported."""
        for line in self.get("/metrics")[1].decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"filedock exited {self.proc.returncode}:\n{self.log()}")
            try:
                return self.get("/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout=timeout, what="/readyz to answer 200")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


class FiledockTree:
    """A filedock root in tmp_path, its configuration, and ways to look at it."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = tmp_path
        self.root = tmp_path / "data"
        self.config = tmp_path / "filedock.yaml"
        self.record = tmp_path / "importer-record.jsonl"
        self.services: list[Service] = []
        self.settings: dict[str, Any] = {}

    def folder(self, name: str) -> Path:
        return self.root / name

    @property
    def transfer(self) -> Path:
        return self.root / "transfer"

    def configure(self, routes: list[dict[str, Any]] | None = None, **settings: Any) -> Path:
        doc: dict[str, Any] = {
            "root": str(self.root),
            "scan_interval_s": 1,
            "shutdown_grace_s": 10,
            "http": {"host": "127.0.0.1", "port": free_port()},
            "routes": routes if routes is not None else [command_route()],
        }
        doc.update(settings)
        self.settings = doc
        self.config.write_text(yaml.safe_dump(doc))
        self.transfer.mkdir(parents=True, exist_ok=True)
        return self.config

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDOCK_")}
        env["FILEDOCK_TEST_RECORD"] = str(self.record)
        env["PYTHONPATH"] = str(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(extra)
        return env

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=env or self.env(),
            cwd=REPO,
            timeout=timeout,
        )

    def run_once(
        self, *, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.cli("run", "--once", env=env, timeout=timeout)

    def start(
        self,
        *,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        own_process_group: bool = False,
    ) -> Service:
        log_path = self.base / f"service-{len(self.services)}.log"
        out = open(log_path, "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--config", str(self.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or self.env(),
            cwd=REPO,
            start_new_session=own_process_group,  # as a terminal's foreground job
        )
        out.close()
        service = Service(proc, int(self.settings["http"]["port"]), log_path)
        self.services.append(service)
        if wait_ready:
            service.wait_ready()
        return service

    def drop(self, rel: str | bytes, content: bytes = b"hello\n") -> Path:
        """Deliver a file the way upstreams must: write a temp name, then rename."""
        rel_b = rel.encode() if isinstance(rel, str) else rel
        final = os.fsencode(self.transfer) + b"/" + rel_b
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = os.path.dirname(final) + b"/.upload-" + os.urandom(4).hex().encode()
        with open(tmp, "wb") as f:
            f.write(content)
        os.rename(tmp, final)
        return Path(os.fsdecode(final))

    # -- looking at the result -------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        db = self.folder("state") / "ledger.sqlite3"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def jobs(self, *args: str) -> list[dict[str, Any]]:
        result = self.cli("jobs", "--json", "--limit", "100000", *args)
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def archived(self) -> dict[str, Path]:
        """Job id -> archive folder."""
        out = {}
        for manifest in self.folder("archive").glob("*/*/*/*/manifest.json"):
            out[manifest.parent.name] = manifest.parent
        return out

    def failed(self) -> dict[str, Path]:
        return (
            {p.name: p for p in self.folder("failed").iterdir() if p.is_dir()}
            if self.folder("failed").exists()
            else {}
        )

    def final_count(self) -> int:
        return sum(1 for r in self.rows() if r["state"] in ("done", "failed"))

    def wait_final(self, n: int, timeout: float = 60) -> None:
        wait_for(lambda: self.final_count() >= n, timeout=timeout, what=f"{n} jobs done or failed")

    def records(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def check_invariants(self, dropped: dict[bytes, bytes]) -> None:
        """docs/reliability.md I1-I3 and I4's at-least-once, for files dropped as {rel: content}."""
        rows = self.rows()
        assert len(rows) == len(dropped), f"{len(rows)} ledger rows for {len(dropped)} files"
        archived, failed = self.archived(), self.failed()
        by_rel = {bytes(r["relative_path"]): r for r in rows}
        assert set(by_rel) == set(dropped), "ledger rows do not match the dropped files"
        for rel, content in dropped.items():
            row = by_rel[rel]
            in_archive, in_failed = row["id"] in archived, row["id"] in failed
            if row["state"] == "done":
                assert in_archive, f"{rel!r}: done but not archived"
                if row["outcome"] != "partial":
                    assert not in_failed, f"{rel!r}: both archived and failed"
                folder = archived[row["id"]]
                manifest = json.loads((folder / "manifest.json").read_text())
                gz = folder / manifest["files"][0]["name"]
                data = gzip.decompress(gz.read_bytes())
                assert hashlib.sha256(data).hexdigest() == hashlib.sha256(content).hexdigest()
                assert manifest["sha256"] == row["sha256"] == hashlib.sha256(content).hexdigest()
            else:
                assert row["state"] == "failed", f"{rel!r}: ended {row['state']}"
                assert in_failed and not in_archive, f"{rel!r}: failed but not in failed/"
                assert (failed[row["id"]] / "error.json").exists()
        leftovers = (
            [p for p in self.folder("proc").iterdir()] if self.folder("proc").exists() else []
        )
        assert not leftovers, f"proc/ not empty: {leftovers}"
        temp = list(self.folder("temp").iterdir()) if self.folder("temp").exists() else []
        assert not temp, f"temp/ not empty: {temp}"
        tmps = [p for p in self.root.rglob("*.tmp")]
        assert not tmps, f"temp copies left: {tmps}"

    def close(self) -> None:
        for s in self.services:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


@pytest.fixture
def tree(tmp_path: Path) -> Any:
    t = FiledockTree(tmp_path)
    yield t
    t.close()


Mount = Callable[..., Path]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    """Mounts a tmpfs of the given size under tmp_path; unmounts each at the end."""
    require_tool("mount")
    mounted: list[Path] = []

    def mount_tmpfs(size: str = "64m") -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        argv = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            skip_or_fail(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount_tmpfs
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def served_receiver() -> Iterator[Any]:
    """A real HTTP receiver (`http_receiver.py`), one per test module."""
    from http_receiver import http_receiver

    with http_receiver() as receiver:
        yield receiver


@pytest.fixture
def receiver(served_receiver: Any) -> Iterator[Any]:
    """The module's receiver, holding nothing and answering as told from scratch."""
    served_receiver.reset()
    yield served_receiver
    served_receiver.reset()


HOOK_SECRET = "whsec_" + base64.b64encode(b"filedock-test-secret-0123456789ab").decode()


@pytest.fixture(scope="module")
def served_hooks() -> Iterator[Any]:
    """A webhook receiver that verifies every signature (`webhook_receiver.py`) under
    `HOOK_SECRET`, one per test module."""
    from webhook_receiver import webhook_receiver

    with webhook_receiver(HOOK_SECRET) as receiver:
        yield receiver


@pytest.fixture
def hooks(served_hooks: Any) -> Iterator[Any]:
    served_hooks.reset(HOOK_SECRET)
    yield served_hooks
    served_hooks.reset(HOOK_SECRET)


def configure_webhook(tree: FiledockTree, hooks: Any, **channel: Any) -> dict[str, str]:
    """One route whose imports fail for good at once, and a webhook channel
    `downstream` to `hooks`, retried without waiting; returns the service's env."""
    hook = {"name": "downstream", "kind": "webhook", "url": f"{hooks.url}/events"}
    hook.update(secret={"env": "HOOK_SECRET"}, backoff_s=0, **channel)
    tree.configure(routes=[command_route(max_attempts=1)], notify=[hook])
    return tree.env(HOOK_SECRET=HOOK_SECRET)


@pytest.fixture(scope="module", params=["rclone", "seaweedfs"])
def s3_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Each S3-compatible store in turn (`s3servers.py`), one per test module."""
    from s3servers import rclone_s3, seaweedfs

    start = {"rclone": rclone_s3, "seaweedfs": seaweedfs}[request.param]
    with start(tmp_path_factory.mktemp(request.param)) as server:
        yield server
