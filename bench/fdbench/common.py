"""Helpers shared by the contenders and scenarios: files, /proc readings, statistics."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
_BLOCK = os.urandom(1 << 16)


class BenchError(RuntimeError):
    """The harness could not measure (a contender hung, did not start, ...)."""


def content(i: int, size: int) -> bytes:
    """Unique, deterministic-length content for file number `i` (half random, half text)."""
    head = f"{i:012d}\n".encode()
    if size <= len(head):
        return head[:size]
    body = size - len(head)
    half = body // 2
    start = (i * 7919) % (len(_BLOCK) - half) if half < len(_BLOCK) else 0
    text = (b"id,name,qty\n" * (1 + (body - half) // 12))[: body - half]
    return head + _BLOCK[start : start + half] + text


def make_files(
    folder: Path, names: Sequence[str], size: int, *, hashes: bool = True, first: int = 0
) -> dict[str, str]:
    """Create files fast (os.open/write/close); return name -> sha256 when `hashes`."""
    folder.mkdir(parents=True, exist_ok=True)
    base = os.fsencode(folder) + b"/"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    out: dict[str, str] = {}
    for k, name in enumerate(names):
        data = content(first + k, size)
        fd = os.open(base + name.encode(), flags, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        if hashes:
            out[name] = hashlib.sha256(data).hexdigest()
    return out


def file_names(n: int, *, prefix: str = "f", suffix: str = ".dat", first: int = 0) -> list[str]:
    return [f"{prefix}{i:07d}{suffix}" for i in range(first, first + n)]


def rename_all(src: Path, dst: Path, names: Iterable[str]) -> tuple[float, float, int]:
    """Rename every name from src/ to dst/ as fast as possible: (t_first, t_last, count)."""
    s, d = os.fsencode(src) + b"/", os.fsencode(dst) + b"/"
    t0 = time.time()
    n = 0
    for name in names:
        b = name.encode()
        os.rename(s + b, d + b)
        n += 1
    return t0, time.time(), n


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (filedock's archive worker, importer commands)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def stat_cpu(stat: str, *, reaped: bool = False) -> float:
    """CPU seconds (user + system) in a `/proc/P/stat` or `/proc/P/task/T/stat` file;
    with `reaped`, plus what its reaped children left (cutime, cstime). `OSError` when
    the process is gone."""
    with open(stat, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # after the comm field: state is fields[0]; utime, stime, cutime, cstime are stat
    # fields 14 to 17
    return sum(int(x) for x in fields[11 : 15 if reaped else 13]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its descendants: the live ones' own,
    and what the reaped ones left in their parent's cutime and cstime."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += stat_cpu(f"/proc/{p}/stat", reaped=True)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def mem_kib(pid: int) -> dict[str, int]:
    """Memory in KiB of a process and its live descendants (filedock's archive worker).

    `VmRSS` and `VmHWM` (peak RSS) are sums of each process's own: pages both map (the
    interpreter, shared libraries) count twice, and each `VmHWM` is at its own moment,
    so their sum is an upper bound. `Pss` shares each page among the processes mapping
    it: the pair's real footprint now, which is what a container's limit charges.
    """
    out = {"VmRSS": 0, "VmHWM": 0, "Pss": 0}
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        key, value = line.split(":", 1)
                        out[key] += int(value.split()[0])
            with open(f"/proc/{p}/smaps_rollup", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        out["Pss"] += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
            continue
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    pred: Callable[[], bool], *, timeout: float, interval: float = 0.05, what: str = "condition"
) -> float:
    """Poll `pred` until true; returns the time.time() it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.time()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def parse_rfc3339(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def summary(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, min and max of the runs' values (None values are skipped)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": list(values)}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "runs": list(values),
    }


def settle_fs() -> bool:
    """Write everything back and, as root, drop the page, dentry and inode caches.

    Without a journal, ext4 will not reuse an inode freed in the last 60 s (300 s while
    its inode-table block is dirty) as long as that block is cached: each new inode then
    steps over every recently freed one (`recently_deleted()`, fs/ext4/ialloc.c). A
    contender that followed one which deleted 30,000 files paid for those deletions:
    the floor measured 1,200 files/s after one, 2,100 on a settled file system. Returns whether
    the caches could be dropped (root only); without it the runs stay comparable only
    round against round.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3")
    except OSError:
        return False
    return True


def journal_of(path: Path) -> str | None:
    """The ext4 journal of the file system holding `path`: a task name, "none", or None
    when it is not ext4 or cannot be told."""
    dev = os.stat(path).st_dev
    for entry in Path("/sys/fs/ext4").glob("*"):
        try:
            if os.stat(f"/dev/{entry.name}").st_rdev == dev:
                task = (entry / "journal_task").read_text().strip()
                return "none" if task == "<none>" else task
        except OSError:
            continue
    return None


def same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def filesystem_of(path: Path) -> str:
    target = os.path.realpath(path)
    best, desc = "", "?"
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.split()
            mount = parts[1]
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(
                mount
            ) >= len(best):
                best, desc = mount, f"{parts[2]} ({parts[0]} on {mount}, {parts[3]})"
    return desc


def machine_info(work: Path) -> dict[str, Any]:
    mem = "?"
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    model = "?"
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        gz = subprocess.run(["gzip", "--version"], capture_output=True, text=True, check=False)
        gzip_version = gz.stdout.splitlines()[0] if gz.stdout else "?"
    except OSError:
        gzip_version = "?"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory": mem,
        "filesystem": filesystem_of(work),
        "ext4_journal": journal_of(work),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "gzip": gzip_version,
        "inotify_max_queued_events": _read_int("/proc/sys/fs/inotify/max_queued_events"),
        "loadavg_at_start": os.getloadavg(),
    }


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
