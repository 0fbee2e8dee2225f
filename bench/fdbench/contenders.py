"""The contenders: the floor (a plain loop), the loop of filedock's folder layout with its
group commit, the loop of all of filedock's work (layout, checks, ledger), the peer
(inotifywait + bash) and filedock."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from fdbench.common import BenchError, cpu_seconds, free_port, mem_kib, wait_until
from service.ledger.sqlite_writer import _SCHEMA as LEDGER_SCHEMA  # filedock's own tables
from service.settings import Settings
from service.storage.fsutil import syncfs  # the barrier filedock's own group commit uses

BATCH: int = Settings.model_fields["batch_max_files"].default  # filedock's group commit

BENCH_DIR = Path(__file__).resolve().parents[1]

# -- the floor -------------------------------------------------------------------------


def run_floor(transfer: Path, proc: Path, archive_day: Path) -> dict[str, Any]:
    """Exactly the per-file work, nothing else: no watcher, no ledger, no batching.

    Per file: rename transfer/ -> proc/, read, gzip (level 6) into `<name>.gz.tmp`
    in the archive day folder, fsync it, rename it into place, fsync the day folder,
    unlink the source (two fsyncs a file).
    """
    archive_day.mkdir(parents=True, exist_ok=True)
    proc.mkdir(parents=True, exist_ok=True)
    t, p, a = (os.fsencode(x) + b"/" for x in (transfer, proc, archive_day))
    wflags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    cpu0, t0 = time.process_time(), time.time()
    names = os.listdir(os.fsencode(transfer))
    day_fd = os.open(archive_day, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            claimed = p + name
            os.rename(t + name, claimed)
            with open(claimed, "rb") as f:
                data = f.read()
            tmp, final = a + name + b".gz.tmp", a + name + b".gz"
            fd = os.open(tmp, wflags, 0o644)
            try:
                os.write(fd, gzip.compress(data, 6, mtime=0))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            os.fsync(day_fd)
            os.unlink(claimed)
    finally:
        os.close(day_fd)
    t1, cpu1 = time.time(), time.process_time()
    return {"files": len(names), "start": t0, "end": t1, "cpu_s": cpu1 - cpu0}


def _write_new(path: bytes, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def run_layout_floor(
    transfer: Path, proc: Path, archive_day: Path, *, batch: int = BATCH
) -> dict[str, Any]:
    """The file-system work filedock's layout asks for, with its group commit.

    The folders of filedock's layout, per file: `mkdir proc/<id>`, rename the
    file into it, read it, `mkdir <id>.tmp` in the archive day folder, gzip into it,
    write a small `manifest.json`, rename the folder to `<id>`, unlink the source and
    rmdir its folder: four new inodes where the floor makes one. Made durable as
    filedock does (a group commit): per batch of filedock's default
    `batch_max_files`, one `syncfs()` after the claims, one after the builds, one after
    the renames. No watcher, no ledger, no checks: the file work alone, which filedock
    cannot beat.
    """
    archive_day.mkdir(parents=True, exist_ok=True)
    proc.mkdir(parents=True, exist_ok=True)
    t, p, a = (os.fsencode(x) + b"/" for x in (transfer, proc, archive_day))
    cpu0, t0 = time.process_time(), time.time()
    names = os.listdir(os.fsencode(transfer))
    jobs = [(b"%08d" % i, name) for i, name in enumerate(names)]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        for job, name in chunk:
            os.mkdir(p + job)
            os.rename(t + name, p + job + b"/" + name)
        syncfs(p)
        for job, name in chunk:
            with open(p + job + b"/" + name, "rb") as f:
                data = f.read()
            tmp = a + job + b".tmp"
            os.mkdir(tmp)
            _write_new(tmp + b"/" + name + b".gz", gzip.compress(data, 6, mtime=0))
            manifest = {"job_id": job.decode(), "name": os.fsdecode(name), "size": len(data)}
            _write_new(tmp + b"/manifest.json", json.dumps(manifest, indent=2).encode())
        syncfs(a)
        for job, _ in chunk:
            os.rename(a + job + b".tmp", a + job)
        syncfs(a)
        for job, name in chunk:
            os.unlink(p + job + b"/" + name)
            os.rmdir(p + job)
    t1, cpu1 = time.time(), time.process_time()
    return {"files": len(names), "start": t0, "end": t1, "cpu_s": cpu1 - cpu0}


def run_work_floor(
    transfer: Path, proc: Path, archive_day: Path, ledger: Path, *, batch: int = BATCH
) -> dict[str, Any]:
    """Everything filedock must do for a file, as one plain loop: the layout floor's
    file work, plus the checks and the ledger the design asks for.

    Per batch of filedock's default `batch_max_files`, as filedock does it: the jobs'
    rows inserted and the WAL fsynced before the claims (the row first); each claimed
    file read and hashed (its SHA-256); `importing` recorded; the no-op import (one
    read); `archiving` recorded; each source read again and checked against its hash,
    gzipped, the copy expanded and checked, and written with its manifest; the renames;
    `done` recorded; the sources removed. The ledger is SQLite in WAL mode,
    `synchronous=NORMAL`, filedock's schema. No watcher, no event loop, no worker
    process, no log: what a service keeping these promises cannot do with less.
    """
    archive_day.mkdir(parents=True, exist_ok=True)
    proc.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(ledger, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(LEDGER_SCHEMA)
    t, p, a = (os.fsencode(x) + b"/" for x in (transfer, proc, archive_day))

    def read(path: bytes) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, os.fstat(fd).st_size + 1)
        finally:
            os.close(fd)

    def record(chunk: list[tuple[bytes, bytes]], **fields: Any) -> None:
        sql = (
            f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)}, updated_at = ? WHERE id = ?"
        )
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, [(*fields.values(), now, job.decode()) for job, _ in chunk])
        conn.execute("COMMIT")

    insert = (
        "INSERT INTO jobs (id, route, name, relative_path, state, detected_at, created_at,"
        " updated_at, history) VALUES (?, 'bench', ?, ?, 'claimed', ?, ?, ?, '[]')"
    )
    history = json.dumps([{"n": 1, "started_at": "2026-11-24T00:00:00Z", "result": "ok"}])
    cpu0, t0 = time.process_time(), time.time()
    names = os.listdir(os.fsencode(transfer))
    jobs = [(b"%08d" % i, name) for i, name in enumerate(names)]
    wal = os.open(f"{ledger}-wal", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        for start in range(0, len(jobs), batch):
            chunk = jobs[start : start + batch]
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert, [(j.decode(), n, n, now, now, now) for j, n in chunk])
            conn.execute("COMMIT")
            os.fsync(wal)
            for job, name in chunk:
                os.mkdir(p + job)
                os.rename(t + name, p + job + b"/" + name)
            syncfs(p)
            sha = {
                job: hashlib.sha256(read(p + job + b"/" + name)).hexdigest() for job, name in chunk
            }
            record(chunk, state="importing", attempts=1, history=history)
            for job, name in chunk:  # the no-op import
                read(p + job + b"/" + name)
            record(chunk, state="archiving", outcome="imported", history=history)
            for job, name in chunk:
                data = read(p + job + b"/" + name)
                if hashlib.sha256(data).hexdigest() != sha[job]:
                    raise BenchError(f"{name!r} changed")
                blob = gzip.compress(data, 6, mtime=0)
                if hashlib.sha256(gzip.decompress(blob)).hexdigest() != sha[job]:
                    raise BenchError(f"{name!r}: bad copy")
                tmp = a + job + b".tmp"
                os.mkdir(tmp)
                _write_new(tmp + b"/" + name + b".gz", blob)
                manifest = {
                    "job_id": job.decode(),
                    "name": os.fsdecode(name),
                    "size": len(data),
                    "sha256": sha[job],
                    "outcome": "imported",
                    "files": [{"name": os.fsdecode(name) + ".gz", "sha256": sha[job]}],
                    "history": json.loads(history),
                }
                doc = json.dumps(manifest, indent=2) + "\n"
                _write_new(tmp + b"/manifest.json", doc.encode())
            syncfs(a)
            for job, _ in chunk:
                os.rename(a + job + b".tmp", a + job)
            syncfs(a)
            record(chunk, state="done")
            for job, name in chunk:
                os.unlink(p + job + b"/" + name)
                os.rmdir(p + job)
    finally:
        os.close(wal)
        conn.close()
    t1, cpu1 = time.time(), time.process_time()
    return {"files": len(names), "start": t0, "end": t1, "cpu_s": cpu1 - cpu0}


# -- the peer --------------------------------------------------------------------------

PEER_SCRIPT = r"""#!/bin/bash
# What a sysadmin writes: for each file moved in, move it aside, gzip it, archive it.
T=$1; P=$2; A=$3
inotifywait -m -e moved_to --format '%f' "$T" | while IFS= read -r f; do
    mv "$T/$f" "$P/$f" && gzip "$P/$f" && mv "$P/$f.gz" "$A/" && echo "$EPOCHREALTIME $f"
done
"""


class Peer:
    """`inotifywait -m` piped into a bash loop; its log has one `<epoch> <name>` a file."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.transfer, self.proc, self.archive = (work / n for n in ("transfer", "proc", "archive"))
        self.script = work / "peer.sh"
        self.log = work / "peer.log"
        self.err = work / "peer.err"
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for d in (self.transfer, self.proc, self.archive):
            d.mkdir(parents=True, exist_ok=True)
        self.script.write_text(PEER_SCRIPT)
        with open(self.log, "wb") as out, open(self.err, "wb") as err:
            self.p = subprocess.Popen(
                ["bash", str(self.script), str(self.transfer), str(self.proc), str(self.archive)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_until(
            lambda: b"Watches established" in self.err.read_bytes(),
            timeout=20,
            what="inotifywait to establish its watch",
        )

    def processed(self) -> list[tuple[float, str]]:
        out = []
        for line in self.log.read_bytes().decode("utf-8", "replace").splitlines():
            stamp, _, name = line.partition(" ")
            with contextlib.suppress(ValueError):
                out.append((float(stamp), name))
        return out

    def count(self) -> int:
        with open(self.log, "rb") as f:
            return sum(1 for _ in f)

    def wait_done(self, expected: int, *, stall_s: float, timeout: float) -> int:
        """Until every file is processed, or nothing happened for `stall_s` (dropped events)."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.count()
            if n >= expected:
                return n
            if n != last:
                last, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                return n
            time.sleep(0.25)
        return self.count()

    def overflowed(self) -> bool:
        return b"Q_OVERFLOW" in self.err.read_bytes() or b"overflow" in self.err.read_bytes()

    def stop(self) -> None:
        if self.p is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGTERM)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(10)
        self.p = None


# -- filedock --------------------------------------------------------------------------


class Filedock:
    """filedock as a real subprocess, with a production-like configuration."""

    def __init__(
        self,
        work: Path,
        *,
        service_dir: Path,
        python: str,
        match: str = "**",
        scan_interval_s: float = 30,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.work = work
        self.root = work / "data"
        self.transfer = self.root / "transfer"
        self.service_dir = service_dir
        self.python = python
        self.port = free_port()
        self.config = work / "filedock.yaml"
        self.logfile = work / "filedock.log"
        self.p: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self._db: sqlite3.Connection | None = None
        doc: dict[str, Any] = {
            "root": str(self.root),
            "scan_interval_s": scan_interval_s,
            "http": {"host": "127.0.0.1", "port": self.port},
            "max_concurrency": 8,
            "routes": [
                {
                    "name": "bench",
                    "match": match,
                    "importer": {
                        "kind": "python",
                        "callable": "bench_importers:read_once",
                        "timeout_s": 60,
                    },
                    "concurrency": 8,
                }
            ],
        }
        doc.update(extra or {})
        self.doc = doc

    @property
    def pid(self) -> int:
        if self.p is None:
            raise BenchError("filedock is not running")
        return self.p.pid

    def start(self) -> None:
        self.transfer.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(self.doc, sort_keys=False))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.service_dir), str(BENCH_DIR)])
        env.pop("FILEDOCK_CONFIG", None)
        for key in [k for k in env if k.startswith("FILEDOCK_")]:
            env.pop(key)
        self.started_at = time.time()
        with open(self.logfile, "ab") as log:
            self.p = subprocess.Popen(
                [self.python, "-m", "service", "run", "--config", str(self.config)],
                cwd=self.service_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def _check_alive(self) -> None:
        if not self.alive():
            tail = self.logfile.read_bytes()[-2000:].decode("utf-8", "replace")
            raise BenchError(f"filedock exited ({self.p.returncode if self.p else '?'}): {tail}")

    def ready(self) -> bool:
        self._check_alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60) -> float:
        return wait_until(self.ready, timeout=timeout, interval=0.02, what="/readyz 200")

    def metric(self, name: str) -> float | None:
        """The value of one unlabelled (or first labelled) sample from /metrics."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except (urllib.error.URLError, OSError):
            return None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None:
            path = self.root / "state" / "ledger.sqlite3"
            if not path.exists():
                return None
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        return self._db

    def count(self, state: str = "done") -> int:
        """Jobs in a state (read-only connection; 0 before the ledger exists)."""
        return self.counts().get(state, 0)

    def counts(self) -> dict[str, int]:
        try:
            db = self._conn()
            if db is None:
                return {}
            return dict(db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        except sqlite3.Error:
            return {}

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def mem(self) -> dict[str, int]:
        return mem_kib(self.pid)

    def wait_done(
        self, expected: int, *, timeout: float, sample: list[int] | None = None
    ) -> dict[str, Any]:
        """Poll the ledger until `expected` jobs are done (or failed); sample the PSS of the
        service and its worker meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            counts = self.counts()
            finished = counts.get("done", 0) + counts.get("failed", 0)
            if sample is not None:
                sample.append(self.mem()["Pss"])
            if finished >= expected:
                return {"when": time.time(), "cpu_s": self.cpu(), "counts": counts}
            if time.monotonic() > deadline:
                raise BenchError(f"filedock finished {finished}/{expected} in {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int | None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self.p is None:
            return None
        p, self.p = self.p, None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        return p.returncode

    def rows(self) -> list[dict[str, Any]]:
        """Every job row (after stop)."""
        path = self.root / "state" / "ledger.sqlite3"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            cur = db.execute(
                "SELECT id, name, state, sha256, detected_at, created_at, updated_at,"
                " archive_path, history FROM jobs"
            )
            out = []
            for r in cur:
                d = dict(r)
                d["name"] = bytes(d["name"]).decode("utf-8", "surrogateescape")
                d["history"] = json.loads(d["history"] or "[]")
                out.append(d)
            return out
        finally:
            db.close()


def verify_filedock(
    fd: Filedock, sources: dict[str, str], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every source must have exactly one done job whose archive holds its exact bytes.

    Checks the ledger's sha256, the manifest's sha256 and the gunzipped archive copy
    against the source's SHA-256 computed when the file was made.
    """
    done: dict[str, list[dict[str, Any]]] = {}
    failed = 0
    for r in rows:
        if r["state"] == "done":
            done.setdefault(r["name"], []).append(r)
        elif r["state"] == "failed":
            failed += 1
    lost, bad, duplicated = [], [], []
    for name, sha in sources.items():
        jobs = done.get(name, [])
        if not jobs:
            lost.append(name)
            continue
        if len(jobs) > 1:
            duplicated.append(name)
        job = jobs[0]
        if not _archive_ok(Path(job["archive_path"] or "/nonexistent"), name, sha, job["sha256"]):
            bad.append(name)
    leftovers = {
        folder: _count_entries(fd.root / folder) for folder in ("transfer", "proc", "failed")
    }
    return {
        "expected": len(sources),
        "verified": len(sources) - len(lost) - len(bad),
        "lost": len(lost),
        "bad_archive": len(bad),
        "duplicated": len(duplicated),
        "failed_jobs": failed,
        "leftover": leftovers,
        "examples": (lost + bad + duplicated)[:5],
        "ok": not lost and not bad and not duplicated and failed == 0,
    }


def _archive_ok(folder: Path, name: str, sha: str, ledger_sha: str | None) -> bool:
    if ledger_sha != sha:
        return False
    try:
        manifest = json.loads((folder / "manifest.json").read_bytes())
        source = next(f for f in manifest["files"] if f.get("role") == "source")
        if manifest.get("sha256") != sha or source.get("sha256") != sha:
            return False
        with gzip.open(folder / source["name"], "rb") as gz:
            return hashlib.sha256(gz.read()).hexdigest() == sha
    except (OSError, ValueError, KeyError, StopIteration, EOFError):
        return False


def _count_entries(folder: Path) -> int:
    try:
        with os.scandir(folder) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0
