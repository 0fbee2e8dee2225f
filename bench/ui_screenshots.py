"""The operator page's screenshots in docs/screenshots/, made by driving Chromium.

    .venv/bin/python bench/ui_screenshots.py            # writes docs/screenshots/*.png

Starts a real `filedock run` on a temporary tree (two routes, one delivering to a
folder, a webhook channel nobody answers, an arrival expectation), drops a few dozen
files (some the importer rejects, one with a hostile name, some left waiting), signs
in with a token, and takes the overview, a failed job and the failures page in the
light and the dark scheme. Needs Debian's chromium and Playwright (a test extra).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "screenshots"
sys.path.insert(0, str(REPO / "tests"))

from browser import launch  # noqa: E402

TOKEN = "screenshots-0123456789abcdef"
IMPORTER = """import sys, time
data = open(sys.argv[-1], "rb").read()
time.sleep(0.05)
if b"BAD" in data:
    print("line 3: column 'delivery_date' is empty", file=sys.stderr)
    sys.exit(65)
rows = data.count(b"\\n")
print(f"imported {rows} rows")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drop(transfer: Path, rel: str, content: bytes) -> None:
    final = transfer / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.part")
    tmp.write_bytes(content)
    os.rename(tmp, final)


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def configure(base: Path, port: int) -> Path:
    (base / "importer.py").write_text(IMPORTER)
    (base / "tokens").write_text(f"on-call:{TOKEN}\n")
    command = {"kind": "command", "argv": [sys.executable, str(base / "importer.py"), "{path}"]}
    doc = {
        "root": str(base / "data"),
        "scan_interval_s": 1,
        "replica_id": "filedock-0",
        "http": {"host": "127.0.0.1", "port": port},
        "ui": {"token_file": str(base / "tokens")},
        "routes": [
            {
                "name": "orders",
                "match": "orders/**",
                "importer": command,
                "max_attempts": 1,
                "expect": [{"name": "morning", "schedule": "0 6 * * 1-5", "grace_s": 1800}],
            },
            {
                "name": "invoices",
                "match": "invoices/**",
                "importer": "none",
                "deliver": [
                    {
                        "name": "archive-share",
                        "kind": "directory",
                        "path": str(base / "share"),
                        "fsync": False,
                    }
                ],
            },
        ],
        "notify": [
            {
                "name": "erp-hook",
                "kind": "webhook",
                "url": "http://127.0.0.1:9/events",
                "secret": {"env": "SHOTS_WEBHOOK_SECRET"},
                "backoff_s": 300,
            }
        ],
    }
    (base / "share").mkdir()
    config = base / "filedock.yaml"
    config.write_text(yaml.safe_dump(doc))
    return config


def fill(transfer: Path) -> int:
    rows = b"order_id,customer,delivery_date\n" + b"1001,ACME,2026-12-08\n" * 40
    for k in range(1, 19):
        drop(transfer, f"orders/eu/orders_{k:04d}.csv", rows)
    for k in range(1, 4):
        drop(transfer, f"orders/us/orders_{k:04d}.csv", b"order_id,customer\nBAD\n")
    drop(transfer, "orders/eu/<img src=x onerror=alert(1)>.csv", b"BAD\n")
    for k in range(1, 9):
        drop(transfer, f"invoices/2026/inv_{k:05d}.pdf", b"%PDF-1.7\n" + b"x" * 20_000)
    return 18 + 3 + 1 + 8


def shoot(base_url: str) -> None:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    failed = get(base_url + "/jobs?state=failed&limit=10")
    plain = next(j for j in failed if "<" not in j["name"])
    pages = {
        "overview": "/",
        "job": f"/ui/jobs/{plain['id']}",
        "failures": "/ui/failures",
    }
    with sync_playwright() as p:
        browser = launch(p)
        for scheme in ("light", "dark"):
            context = browser.new_context(
                viewport={"width": 1360, "height": 860}, color_scheme=scheme, device_scale_factor=1
            )
            page = context.new_page()
            page.goto(base_url + "/ui/login?next=/")
            page.locator("#token").fill(TOKEN)
            page.locator("#sign-in").click()
            page.wait_for_url(base_url + "/")
            for name, path in pages.items():
                page.goto(base_url + path)
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(OUT / f"{name}-{scheme}.png"), full_page=name != "job")
                print(OUT / f"{name}-{scheme}.png")
            context.close()
        browser.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fd-shots-") as tmp:
        base = Path(tmp)
        port = free_port()
        config = configure(base, port)
        transfer = base / "data" / "transfer"
        transfer.mkdir(parents=True)
        expected = fill(transfer)
        env = {**os.environ, "SHOTS_WEBHOOK_SECRET": "whsec_c2NyZWVuc2hvdHMtb25seS1rZXk="}
        log = open(base / "service.log", "wb")
        service = subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    jobs = get(base_url + "/jobs?limit=1000")
                except OSError:
                    jobs = []
                if sum(j["state"] in ("done", "failed") for j in jobs) >= expected:
                    break
                time.sleep(0.2)
            else:
                raise SystemExit(f"the jobs did not finish:\n{(base / 'service.log').read_text()}")
            drop(transfer, "stray/readme.txt", b"not for any route\n")
            (transfer / "orders" / "eu" / ".orders_0019.csv.part").write_bytes(b"half")
            while time.monotonic() < deadline:  # the overview shows what waits
                with urllib.request.urlopen(base_url + "/", timeout=5) as r:
                    if b"readme.txt" in r.read():
                        break
                time.sleep(0.2)
            shoot(base_url)
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
