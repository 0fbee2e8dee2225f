"""Helpers of the reliability suite: a tree that honours `folders:`, routes, metrics,
the I4/I5 checks, real mounts, and the figures each scenario reports.

Everything here drives real things: the `filedock` process, real mounts (tmpfs,
loop-mounted ext4), real users (`setpriv`), real user namespaces (`unshare`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import REPO, FiledockTree, Service, skip_or_fail, wait_for

HARNESS_FILES = re.compile(r"^(filedock\.yaml|service-\d+\.log|importer-record\.jsonl|data)$")
SECRET = b"TOP-SECRET-9d1c0ffee-DO-NOT-LEAK"


def python_route(func: str = "quick", name: str = "main", **overrides: Any) -> dict[str, Any]:
    """A route whose importer is `tests/reliability/importers.py:<func>`, run in-process."""
    route: dict[str, Any] = {
        "name": name,
        "match": "**",
        "importer": {"kind": "python", "callable": f"reliability.importers:{func}"},
        "max_attempts": 3,
        "backoff_s": 0,
        "max_backoff_s": 0,
    }
    route.update(overrides)
    return route


class RelTree(FiledockTree):
    """A FiledockTree whose folders follow the `folders:` setting (mount points)."""

    def folder(self, name: str) -> Path:
        configured = (self.settings.get("folders") or {}).get(name)
        return Path(configured) if configured else self.root / name

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(PYTHONDONTWRITEBYTECODE="1", **extra)

    def start_argv(
        self, prefix: list[str], *, env: dict[str, str] | None = None, wait_ready: bool = True
    ) -> Service:
        """Like `start()`, with the service's argv behind `prefix` (setpriv, unshare...)."""
        log_path = self.base / f"service-{len(self.services)}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "service", "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env or self.env(),
                cwd=REPO,
            )
        service = Service(proc, int(self.settings["http"]["port"]), log_path)
        self.services.append(service)
        if wait_ready:
            service.wait_ready()
        return service

    def final_count(self) -> int:
        return sum(1 for r in self.rows() if r["state"] in ("done", "failed"))

    def proc_entries(self) -> list[str]:
        p = self.folder("proc")
        return sorted(os.listdir(p)) if p.exists() else []

    def transfer_files(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.transfer))

    def settled(self, n: int) -> bool:
        """n files ended (done or failed) and nothing is left in transfer/ or proc/."""
        return self.final_count() >= n and not self.proc_entries() and not self.transfer_files()

    def everything_written(self, *extra_logs: str) -> bytes:
        """Every byte the service keeps: the ledger, archives (decompressed), failed/, logs.

        Symlinks are never followed (the one moved aside still points at the secret).
        """
        blobs: list[bytes] = []
        for name in ("state", "archive", "failed", "proc", "temp"):
            top = self.folder(name)
            for path in top.rglob("*") if top.exists() else []:
                if path.is_symlink() or not path.is_file():
                    continue
                data = path.read_bytes()
                blobs.append(data)
                if path.suffix == ".gz":
                    blobs.append(gzip.decompress(data))
        for log in self.base.glob("service-*.log"):
            blobs.append(log.read_bytes())
        blobs += [e.encode() for e in extra_logs]
        return b"\n".join(blobs)

    def check_no_tmp(self) -> None:
        """I3 for folders mounted outside the root too."""
        for name in ("archive", "failed"):
            top = self.folder(name)
            left = [p for p in top.rglob("*.tmp")] if top.exists() else []
            assert not left, f"temp copies left in {name}/: {left[:5]}"


# -- metrics ---------------------------------------------------------------------------


def metrics(service: Service) -> dict[str, float]:
    """`name{labels}` -> value, from /metrics."""
    status, body = service.get("/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(service: Service, name: str) -> float:
    """The sum of a metric over its labels (0 when absent)."""
    values = metrics(service)
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def rss_and_fds(pid: int) -> tuple[int, int]:
    """Resident memory (bytes) and open file descriptors of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


# -- I4 and I5 -------------------------------------------------------------------------


def imports_per_job(tree: FiledockTree) -> Counter[str]:
    """How many times the importer started, per job id (fake_importer or importers.py)."""
    return Counter(r["job_id"] for r in tree.records() if r.get("event") in ("start", "run"))


def check_i4(tree: FiledockTree, must_import: set[bytes]) -> dict[str, int]:
    """I4: every job of a file the importer must see ran at least once; figures."""
    runs = imports_per_job(tree)
    rows = {bytes(r["relative_path"]): r for r in tree.rows()}
    for rel in must_import:
        assert runs[rows[rel]["id"]] >= 1, f"{rel!r}: the importer never ran"
    jobs = {r["id"] for r in rows.values()}
    stray = set(runs) - jobs
    assert not stray, f"imports for jobs the ledger does not know: {sorted(stray)[:5]}"
    return {
        "imports": sum(runs.values()),
        "re_imports": sum(n - 1 for n in runs.values() if n > 1),
    }


class Outside:
    """I5: a sentinel outside the service's folders, and the rest of `base` around them.

    The sentinel's atime is set before its mtime, so under `relatime` (or `strictatime`)
    any read of it moves the atime: "never read" is checked, not assumed.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.dir = base / "outside"
        self.dir.mkdir(exist_ok=True)
        self.sentinel = self.dir / "secret.txt"
        self.sentinel.write_bytes(SECRET)
        st = os.stat(self.sentinel)
        os.utime(self.sentinel, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
        self.before = self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        st = os.stat(self.sentinel)
        others = sorted(
            e for e in os.listdir(self.base) if e != "outside" and not HARNESS_FILES.match(e)
        )
        return {
            "mtime_ns": st.st_mtime_ns,
            "atime_ns": st.st_atime_ns,
            "ctime_ns": st.st_ctime_ns,
            "outside_entries": sorted(os.listdir(self.dir)),
            "base_entries": others,
        }

    def check(self) -> None:
        after = self._snapshot()
        assert after["atime_ns"] == self.before["atime_ns"], "the sentinel outside was read"
        assert after == self.before, f"outside the service's folders changed: {after}"
        assert self.sentinel.read_bytes() == SECRET

    def link_to_secret(self, where: Path) -> None:
        os.symlink(self.sentinel, where)


# -- mounts and users ------------------------------------------------------------------


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at `path` (a real ENOSPC), unmounted on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        skip_or_fail(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {e}")
    try:
        yield path
    finally:
        unmount(path)


def unmount(path: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        if not os.path.ismount(path):
            return
        time.sleep(0.1)  # a process that just exited may still hold it for a moment
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize_tmpfs(path: Path, size: str) -> None:
    _run("mount", "-o", f"remount,size={size}", str(path))


def fill(path: Path) -> Path:
    """Write zeros into `path/filler.bin` until the filesystem is full."""
    filler = path / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 64 << 10, 4 << 10, 512):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    for extra in range(10_000):  # the last partial blocks, and inodes
        try:
            (path / f".filler-{extra}").write_bytes(b"\0" * 512)
        except OSError:
            break
    return filler


def unfill(path: Path) -> None:
    (path / "filler.bin").unlink(missing_ok=True)
    for p in path.glob(".filler-*"):
        p.unlink()


@contextlib.contextmanager
def failing_writeback_fs(base: Path, *, backing: str = "8m", size: str = "256M") -> Iterator[Path]:
    """An ext4 whose writes succeed but whose writeback fails: a fault device without dm.

    A sparse 256 MB image lives on an 8 MB tmpfs and is loop-mounted: ext4 sees 256 MB
    free, accepts `write()`, and fails at writeback (fsync/syncfs return an error)
    once the image can no longer grow: the "failing fsync" scenarios of docs/reliability.md.
    """
    back, mnt = base / "fault-backing", base / "fault-mnt"
    with tmpfs(back, backing):
        image = back / "ext4.img"
        with open(image, "wb") as f:
            f.truncate(_bytes(size))
        try:
            _run(
                "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)
            )
            loop = _run("losetup", "-f", "--show", str(image))
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            skip_or_fail(f"cannot make a loop-mounted ext4 here: {e}")
        try:
            mnt.mkdir(exist_ok=True)
            _run("mount", "-o", "errors=continue", loop, str(mnt))
            try:
                yield mnt
            finally:
                unmount(mnt)
        finally:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def remount_cold(mnt: Path, base: Path) -> None:
    """Unmount and mount again: what is left is what reached the device, not the cache."""
    source = next(
        line.split()[0]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1] == str(mnt)
    )
    unmount(mnt)
    _run("mount", "-o", "errors=continue", source, str(mnt))


def _bytes(size: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(size[:-1]) * units[size[-1].lower()] if size[-1].isalpha() else int(size)


NOBODY = 65534


@contextlib.contextmanager
def nonroot_base() -> Iterator[Path]:
    """A base folder a non-root user can reach (pytest's tmp_path is 0700 root)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="filedock-rel-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_user(uid: int = NOBODY) -> list[str]:
    """argv prefix that runs a command as a real non-root user (no capabilities)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        skip_or_fail("setpriv (util-linux) is not installed")
    if os.geteuid() != 0:
        skip_or_fail("changing to another user needs root")
    return [str(setpriv), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


def in_userns_with_inotify_limit(setting: str, limit: int) -> list[str]:
    """argv prefix: a new user namespace whose inotify `setting` is `limit`.

    `setting` is `max_inotify_watches` or `max_inotify_instances`: both are per user
    namespace under `/proc/sys/user/` (Linux >= 5.11), so the limit is lowered for the
    service alone, and nothing machine-wide changes.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        skip_or_fail("unshare (util-linux) is not installed")
    knob = f"/proc/sys/user/{setting}"
    probe = subprocess.run(
        [str(unshare), "--user", "--map-root-user", "sh", "-c", f"echo 7 > {knob} && cat {knob}"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "7":
        skip_or_fail(f"cannot lower {setting} in a user namespace: {probe.stderr}")
    script = f'echo {limit} > {knob} && exec "$@"'
    return [str(unshare), "--user", "--map-root-user", "--", "sh", "-c", script, "sh"]


# -- checking archives and reporting figures --------------------------------------------


def archive_ok(folder: Path, content: bytes) -> bool:
    """The archive folder holds a gzip copy whose content has the source's sha256."""
    try:
        manifest = json.loads((folder / "manifest.json").read_bytes())
        data = gzip.decompress((folder / manifest["files"][0]["name"]).read_bytes())
    except (OSError, ValueError, EOFError, KeyError, gzip.BadGzipFile):
        return False
    return hashlib.sha256(data).digest() == hashlib.sha256(content).digest()


def report(scenario: str, **figures: Any) -> None:
    """Print the figures of a run; append them to $RELIABILITY_RESULTS when set."""
    line = json.dumps(
        {"scenario": scenario, "at": time.strftime("%FT%TZ", time.gmtime()), **figures}
    )
    print(line)
    path = os.environ.get("RELIABILITY_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def wait_service_exit(service: Service, timeout: float) -> int | None:
    """The exit code if the process ended within `timeout`, else None (it is still running)."""
    try:
        return service.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


__all__ = [
    "NOBODY",
    "SECRET",
    "Outside",
    "RelTree",
    "archive_ok",
    "as_user",
    "check_i4",
    "failing_writeback_fs",
    "fill",
    "imports_per_job",
    "in_userns_with_inotify_limit",
    "metric",
    "metrics",
    "nonroot_base",
    "python_route",
    "remount_cold",
    "report",
    "resize_tmpfs",
    "rss_and_fds",
    "tmpfs",
    "unfill",
    "wait_for",
    "wait_service_exit",
]
