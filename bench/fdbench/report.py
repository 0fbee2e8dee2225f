"""The markdown tables printed at the end of a run (and pasted into docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, str, str]


def _num(v: float | None, digits: int) -> str:
    if v is None:
        return "—"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fmt(s: dict[str, Any] | None, digits: int = 0, unit: str = "") -> str:
    """`median (min-max)` of a summary; just the median for one run."""
    if not s or s.get("median") is None:
        return "—"
    med = _num(s["median"], digits) + unit
    if len([v for v in s.get("runs", []) if v is not None]) <= 1:
        return med
    return f"{med} ({_num(s['min'], digits)}-{_num(s['max'], digits)})"


def _burst(r: dict[str, Any], rows: list[Row]) -> None:
    first = next(iter(r["runs"].values()), [])
    n = f"{first[0]['files']:,}" if first else "?"
    if r["runs"].get("filedock"):
        n = f"{r['runs']['filedock'][0]['verify']['expected']:,}"
    f = r["files_per_s"]
    rows.append(
        (
            f"1. burst {n} x 1 KiB",
            "files/s",
            fmt(f.get("floor")),
            fmt(f.get("peer")),
            fmt(f.get("filedock")),
        )
    )
    rows.append(
        (
            "",
            "filedock ÷ contender",
            fmt(r.get("filedock_vs_floor"), 2, "x"),
            fmt(r.get("filedock_vs_peer"), 1, "x"),
            "",
        )
    )
    c = r["cpu_ms_per_file"]
    rows.append(("", "CPU ms per file", fmt(c.get("floor"), 2), "", fmt(c.get("filedock"), 2)))
    # The floor again with filedock's folders (4 new inodes a file, not 1), then with its
    # folders, checks and ledger: their own rows.
    for who, label in (("layout", "layout floor"), ("work", "work floor")):
        if who not in f:
            continue
        rows.append(("", f"{label}: files/s", fmt(f[who]), "", ""))
        rows.append(("", f"{label}: CPU ms per file", fmt(c.get(who), 2), "", ""))
        rows.append(("", f"{label} ÷ floor", fmt(r.get(f"{who}_vs_floor"), 2, "x"), "", ""))
        rows.append(("", f"filedock ÷ {label}", fmt(r.get(f"filedock_vs_{who}"), 2, "x"), "", ""))
    if "peer_dropped" in r or "filedock_peak_rss_mib" in r:
        rows.append(("", "files dropped", "0", fmt(r.get("peer_dropped")), "0 (verified)"))
    if "filedock_peak_rss_mib" in r:
        rows.append(
            ("", "peak RSS MiB (service + worker)", "", "", fmt(r["filedock_peak_rss_mib"], 1))
        )


def _sustained(r: dict[str, Any], rows: list[Row], sizes: dict[str, Any]) -> None:
    title = f"2. sustained {sizes['sustained_rate']:.0f}/s x {sizes['sustained_s']:.0f} s"
    lat = r["latency"]
    labels = {
        "detected": "rename→detected",
        "claimed": "rename→claimed",
        "import_start": "rename→import start",
        "archived": "rename→archived",
    }
    first = True
    for stage, label in labels.items():
        fd = lat["filedock"].get(stage)
        pe = lat.get("peer", {}).get(stage)
        for key in ("p50_ms", "p99_ms", "max_ms"):
            if key != "p50_ms" and stage in ("detected", "claimed"):
                continue
            rows.append(
                (
                    title if first else "",
                    f"{label} {key.split('_')[0]} ms",
                    "",
                    fmt(pe[key], 1) if pe else "",
                    fmt(fd[key], 1) if fd else "—",
                )
            )
            first = False
    rows.append(("", "CPU ms per file", "", "", fmt(r["filedock_cpu_ms_per_file"], 2)))


def _big(r: dict[str, Any], rows: list[Row]) -> None:
    n = r["files"]
    peer = r.get("peer")
    rows.append(
        (
            f"3. burst {n:,} x 1 KiB",
            "files archived + SHA-256 verified",
            "",
            f"{peer['files']:,} processed" if peer else "",
            fmt(r["verified"]),
        )
    )
    rows.append(
        ("", "files lost", "", f"{peer['dropped']:,}" if peer else "", str(r["lost_total"]))
    )
    rows.append(
        (
            "",
            "files/s",
            "",
            f"{peer['files_per_s']:,.0f}" if peer else "",
            fmt(r["files_per_s"]),
        )
    )
    _memory(r, rows)


def _memory(r: dict[str, Any], rows: list[Row]) -> None:
    """The target's figure (peak PSS of service + worker, sampled) and the upper bound."""
    rows.append(("", "peak memory MiB: PSS, sampled", "", "", fmt(r["peak_pss_mib"], 1)))
    rows.append(("", "peak RSS MiB: each process's, summed", "", "", fmt(r["peak_rss_mib"], 1)))


def _backlog(r: dict[str, Any], rows: list[Row]) -> None:
    title = f"4. backlog {r['files']:,} files at start"
    b = r["baseline_1_file"]
    rows.append((title, "start → /readyz 200 s", "", "", fmt(r["ready_s"], 2)))
    rows.append(("", "start → first claim s", "", "", fmt(r["first_claim_s"], 2)))
    rows.append(("", "start → first import s", "", "", fmt(r["first_import_s"], 2)))
    rows.append(("", "start → first archive s", "", "", fmt(r["first_archive_s"], 2)))
    rows.append(
        ("", f"jobs done in the {r['window_s']:.0f} s window", "", "", fmt(r["done_in_window"]))
    )
    _memory(r, rows)
    if b:
        rows.append(
            (
                "",
                "same start with 1 file: ready / first import s",
                "",
                "",
                f"{fmt(b['ready_s'], 2)} / {fmt(b['first_import_s'], 2)}",
            )
        )


def _idle(r: dict[str, Any], rows: list[Row]) -> None:
    title = f"5. idle, {r['window_s']:.0f} s windows"
    rows.append((title, "CPU % of one core, empty", "", "", fmt(r["empty"]["cpu_pct"], 3)))
    rows.append(
        (
            "",
            f"CPU % of one core, {r['unrouted_files']:,} unrouted",
            "",
            "",
            fmt(r["unrouted"]["cpu_pct"], 3),
        )
    )
    rows.append(
        (
            "",
            "peak RSS MiB empty / unrouted",
            "",
            "",
            f"{r['empty']['peak_rss_mib']:.1f} / {r['unrouted']['peak_rss_mib']:.1f}",
        )
    )


def table(results: dict[str, Any]) -> str:
    sc = results["scenarios"]
    rows: list[Row] = []
    for name, r in sc.items():
        if "error" in r:
            rows.append((name, "could not be measured", "", "", r["error"][:80]))
        elif name == "burst":
            _burst(r, rows)
        elif name == "sustained":
            _sustained(r, rows, results["sizes"])
        elif name == "big":
            _big(r, rows)
        elif name == "backlog":
            _backlog(r, rows)
        elif name == "idle":
            _idle(r, rows)
    n = results["sizes"]["runs"]
    head = (
        f"Median of {n} runs (min-max)" if n > 1 else "One run (--quick: indicative only)"
    ) + "\n\n"
    if results["machine"].get("settled_between_runs") is False:
        head += "(--no-settle: the file system was not settled between runs)\n\n"
    elif results["machine"].get("caches_dropped_between_runs") is False:
        head += "(not root: caches were not dropped between runs; see docs/benchmarks.md)\n\n"
    lines = [
        "| scenario | measure | floor | peer (inotifywait+bash) | filedock |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    targets = [t for r in sc.values() for t in r.get("targets", [])]
    if targets:
        lines += ["", "| target | measured | result |", "|---|---|---|"]
        for t in targets:
            measured = "—" if t["measured"] is None else f"{t['measured']:,.2f} {t['unit']}"
            verdict = {True: "pass", False: "**FAIL**", None: "not measured"}[t["pass"]]
            lines.append(f"| {t['target']} | {measured} | {verdict} |")
    return head + "\n".join(lines)
