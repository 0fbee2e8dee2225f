"""Large files: rename → archived against the command-line pipeline doing the same work.

    .venv/bin/python bench/bench_large.py                 # 1 GiB text, 1 GiB random, 4 GiB text
    .venv/bin/python bench/bench_large.py --quick         # 128 MiB each, 1 round
    .venv/bin/python bench/bench_large.py --rounds 3 --sizes 1024

Each round runs every contender in turn on a fresh copy of the file, staged on the same
filesystem and flushed (`sync`) before the clock starts, so that no contender pays for
another's writeback; ratios are taken round by round, their median reported.

- filedock: `filedock run` on a fresh root, one route with a no-op python importer
  (`bench_importers:noop`), `archive.compression` as the contender says. The clock
  starts at the rename into `transfer/` and stops at the job's `done` in the ledger
  (`updated_at`: archived, verified, durable, the source removed). The service and its
  archive worker's memory (VmRSS summed, and PSS) is sampled every 50 ms.
- the pipeline, in bash, doing what the archive does: hash the source, compress it to a
  file, make that file durable, and check the copy expands to the source's hash:
  `tee >(sha256sum) < SRC | COMPRESS > DST && sync DST && DECOMPRESS < DST | sha256sum`
  (for `none`: `cp SRC DST && sync DST && sha256sum DST`). For each codec the fastest
  of its tools is the peer: gzip -1, pigz -1 and igzip -1 on two threads (ISA-L, the
  library filedock's gzip levels 1-3 use), each with its own -d; zstd -3 -T0.

Prints the table and writes bench/results/large-<stamp>.json. Needs pigz, zstd and
igzip (Debian packages pigz, zstd, isal). docs/benchmarks.md, "Large files", holds
the latest figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from fdbench.common import BenchError, mem_kib, wait_until  # noqa: E402
from fdbench.contenders import Filedock  # noqa: E402

MIB = 1 << 20
# The pipelines per codec, as (name, compress, decompress); `{level}` from the contender.
PEERS = {
    "gzip": [
        ("gzip -1", "gzip -1 -c", "gzip -dc"),
        ("pigz -1", "pigz -1 -c", "pigz -dc"),
        ("igzip -1 -T2", "igzip -1 -T 2 -c", "igzip -dc"),  # ISA-L's own tool, as ours
    ],
    "zstd": [("zstd -3 -T0", "zstd -3 -T0 -q -c", "zstd -dc -q")],
    "none": [("cp + sha256sum", "", "")],
}


def make_text(path: Path, size: int) -> None:
    """CSV-like text: ids, words, numbers and dates, as a database extract is."""
    rnd = random.Random(7)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    with path.open("w") as f:
        written, i = 0, 0
        while written < size:
            rows = "".join(
                f"{i + k},{words[rnd.randrange(8)]},{rnd.randrange(10**7)},"
                f"{rnd.random():.6f},2026-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d}\n"
                for k in range(5000)
            )
            f.write(rows)
            written += len(rows)
            i += 5000
        f.truncate(size)


def make_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))


def stage(master: Path, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    copy = where / master.name
    shutil.copyfile(master, copy)
    os.sync()
    return copy


def run_filedock(work: Path, master: Path, codec: str) -> dict[str, Any]:
    fd = Filedock(
        work,
        service_dir=REPO,
        python=sys.executable,
        extra={
            "archive": {"compression": codec},
            "routes": [
                {
                    "name": "bench",
                    "match": "**",
                    "importer": {"kind": "python", "callable": "bench_importers:noop"},
                }
            ],
        },
    )
    staged = stage(master, work / "staging")
    fd.start()
    try:
        fd.wait_ready()
        os.sync()
        samples: list[tuple[int, int]] = []
        t0 = time.time()
        os.rename(staged, fd.transfer / master.name)
        deadline = time.monotonic() + 1800
        while fd.counts().get("done", 0) + fd.counts().get("failed", 0) < 1:
            m = mem_kib(fd.pid)
            samples.append((m["VmRSS"], m["Pss"]))
            if time.monotonic() > deadline:
                raise BenchError("filedock did not finish in 1800 s")
            time.sleep(0.05)
        rows = fd.rows()
    finally:
        fd.stop()
    [row] = rows
    if row["state"] != "done":
        raise BenchError(f"filedock: job {row['state']}: {fd.logfile.read_text()[-1500:]}")
    archived = Path(row["archive_path"])
    copy = next(p for p in archived.iterdir() if p.name.startswith(master.name))
    return {
        "seconds": row["updated_at"] - t0,
        "peak_rss_mib": max(s[0] for s in samples) / 1024 if samples else None,
        "peak_pss_mib": max(s[1] for s in samples) / 1024 if samples else None,
        "archived_bytes": copy.stat().st_size,
    }


def run_pipeline(work: Path, master: Path, peer: tuple[str, str, str]) -> dict[str, Any]:
    name, compress, decompress = peer
    src = stage(master, work / "staging")
    dst = work / "copy"
    if compress:
        script = (
            f"set -eo pipefail; tee >(sha256sum >{work}/src.sha) <{src} | {compress} >{dst}"
            f" && sync {dst} && {decompress} <{dst} | sha256sum >{work}/copy.sha"
        )
    else:
        script = f"set -e; cp {src} {dst} && sync {dst} && sha256sum {dst} >{work}/copy.sha"
    t0 = time.monotonic()
    subprocess.run(["bash", "-c", script], check=True)
    seconds = time.monotonic() - t0
    if compress:
        # tee's sha256sum may still be writing its line when the pipeline returns
        wait_until(lambda: (work / "src.sha").stat().st_size > 0, timeout=30, what="sha256sum")
        same = (work / "src.sha").read_text().split()[0] == (work / "copy.sha").read_text().split()[
            0
        ]
        if not same:
            raise BenchError(f"{name}: the copy does not expand to the source")
    return {"seconds": seconds, "archived_bytes": dst.stat().st_size}


def rounds(work: Path, master: Path, codec: str, n: int, log: Any) -> dict[str, Any]:
    ours: list[dict[str, Any]] = []
    peers: dict[str, list[dict[str, Any]]] = {p[0]: [] for p in PEERS[codec]}
    for r in range(n):
        for peer in PEERS[codec]:
            res = run_pipeline(work / f"{codec}-peer-{r}", master, peer)
            peers[peer[0]].append(res)
            shutil.rmtree(work / f"{codec}-peer-{r}")
            log(f"    {peer[0]}: {res['seconds']:.2f} s")
        res = run_filedock(work / f"{codec}-fd-{r}", master, codec)
        ours.append(res)
        shutil.rmtree(work / f"{codec}-fd-{r}")
        log(f"    filedock {codec}: {res['seconds']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB")
    fastest = min(peers, key=lambda k: statistics.median(x["seconds"] for x in peers[k]))
    ratio = [p["seconds"] / o["seconds"] for o, p in zip(ours, peers[fastest], strict=True)]
    return {
        "codec": codec,
        "filedock": ours,
        "peers": peers,
        "fastest_peer": fastest,
        "ratio_per_round": ratio,
        "ratio_median": statistics.median(ratio),
        "peak_rss_mib_max": max(o["peak_rss_mib"] or 0 for o in ours),
        "size_bytes": master.stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work-large")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="128 MiB files, 1 round")
    ap.add_argument(
        "--sizes", type=int, nargs="*", help="text file sizes in MiB (default 1024 4096)"
    )
    ap.add_argument("--codecs", nargs="*", default=["gzip", "zstd", "none"])
    args = ap.parse_args(argv)
    for tool in ("pigz", "zstd", "igzip", "gzip", "sha256sum"):
        if shutil.which(tool) is None:
            print(
                f"bench_large: {tool} not found (apt-get install pigz zstd isal)", file=sys.stderr
            )
            return 2
    sizes = [128] if args.quick else (args.sizes or [1024, 4096])
    n = 1 if args.quick else args.rounds
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = lambda text: print(text, flush=True)  # noqa: E731
    results: list[dict[str, Any]] = []
    cases = [(f"text-{s}MiB", s, make_text) for s in sizes]
    cases.insert(1, (f"random-{sizes[0]}MiB", sizes[0], make_random))
    try:
        for label, size, make in cases:
            master = work / f"{label}.dat"
            make(master, size * MIB)
            log(f"{label}:")
            codecs = args.codecs if label.startswith("text") else ["gzip"]
            for codec in codecs:
                res = rounds(work, master, codec, n, log)
                res["case"] = label
                results.append(res)
            master.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| file | codec | filedock s (median) | fastest peer | peer s | ratio | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ours = statistics.median(x["seconds"] for x in r["filedock"])
        peer = statistics.median(x["seconds"] for x in r["peers"][r["fastest_peer"]])
        print(
            f"| {r['case']} | {r['codec']} | {ours:.2f} | {r['fastest_peer']} | {peer:.2f}"
            f" | {r['ratio_median']:.2f} | {r['peak_rss_mib_max']:.0f} |"
        )
    out = BENCH / "results" / f"large-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
