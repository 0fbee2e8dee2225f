"""A real Prometheus scrapes a real filedock that imports real files.

Every PromQL expression of the dashboard and of the alert rules then runs through
Prometheus' HTTP API: each must be valid, may only name metrics the service really
exports, and each dashboard target must return data unless its metric cannot have
any yet in this scenario (EXPECTED_EMPTY). The rules file is loaded by the server
itself, so every rule is also evaluated on live data, and two alerts are driven for
real: a high failure ratio, an expected file that does not come, and the service
going away.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import require_tool, wait_for
from test_alert_rules import (
    GROUPING,
    RULES,
    alert_rules,
    dashboard_expressions,
    load_dashboard,
    substitute_variables,
)
from webhook_receiver import WebhookReceiver, webhook_receiver

ROOT = Path(__file__).resolve().parent.parent
GOOD_FILES = ("orders_1.csv", "orders_2.csv", "orders_3.csv")
BAD_FILES = ("orders_bad_1.csv", "orders_bad_2.csv")
# Metrics that cannot have a series yet in this scenario; a target naming one may be empty.
EXPECTED_EMPTY = {
    "filedock_rows_total": "no csv-sql route here",
    "filedock_reaped_total": "nothing is old enough to reap",
    "filedock_recovery_actions_total": "a fresh root has nothing to recover",
}
# Series Prometheus makes itself while scraping, not the service.
SCRAPE_SERIES = {"up"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "inf", "nan",
}  # fmt: skip
# An exit status of 65 is the command importer's "reject": the file goes to failed/ at once.
IMPORTER = "import sys; sys.exit(65 if 'bad' in sys.argv[1] else 0)"

pytestmark = pytest.mark.timeout(240)
HOOK_SECRET = "whsec_" + base64.b64encode(b"integration-test-key").decode()
# The expected daily report's deadline: this long after the service starts.
DEADLINE_AFTER_S = 12


@dataclass
class Filedock:
    process: subprocess.Popen[bytes]
    url: str
    root: Path
    log: Path
    config: Path
    env: dict[str, str]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the process is still there after the grace period."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group().lower() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def exported_names(exposition: str) -> set[str]:
    """Every sample name the exposition declares or carries (a histogram's _bucket, …)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind in ("histogram", "summary"):
                names |= {f"{name}_count", f"{name}_sum"}
            if kind == "histogram":
                names.add(f"{name}_bucket")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    """An instant query; a syntax or evaluation error fails the test with Prometheus' reason."""
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}\n  -> {body.get('errorType')}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def drop(transfer: Path, name: str, content: str) -> None:
    """Write under a temporary name, then rename: the service never sees half a file."""
    temp = transfer / f"{name}.tmp"
    temp.write_text(content)
    os.rename(temp, transfer / name)


def archived_jobs(root: Path) -> list[Path]:
    return [p for p in (root / "archive").glob("*/*/*/*") if p.is_dir() and p.suffix != ".tmp"]


def failed_jobs(root: Path) -> list[Path]:
    return [p for p in (root / "failed").glob("*") if p.is_dir()]


@pytest.fixture(scope="module", autouse=True)
def tools() -> dict[str, str]:
    """Both binaries, looked up before anything starts."""
    return {name: require_tool(name) for name in ("prometheus", "promtool")}


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookReceiver]:
    with webhook_receiver(HOOK_SECRET) as receiver:
        yield receiver


def once_at(ts: float) -> str:
    """A cron schedule (with seconds, UTC) whose one deadline this year is at `ts`."""
    t = datetime.fromtimestamp(ts, UTC)
    return f"{t.second} {t.minute} {t.hour} {t.day} {t.month} *"


@pytest.fixture(scope="module")
def filedock(
    tmp_path_factory: pytest.TempPathFactory, hooks: WebhookReceiver
) -> Iterator[Filedock]:
    base = tmp_path_factory.mktemp("filedock")
    root = base / "data"
    port = free_port()
    # Nothing listens there: every event sent to the webhook fails and is retried.
    closed_port = free_port()
    config = base / "filedock.yaml"
    (base / "share").mkdir()
    config.write_text(
        yaml.safe_dump(
            {
                "root": str(root),
                "http": {"host": "127.0.0.1", "port": port},
                "scan_interval_s": 1,
                "routes": [
                    {
                        "name": "orders",
                        "match": "*.csv",
                        "importer": {
                            "kind": "command",
                            "argv": [sys.executable, "-c", IMPORTER, "{path}"],
                            "timeout_s": 30,
                        },
                        "max_attempts": 1,
                        # A sink, so that the delivery panels and rules see real series.
                        "deliver": [
                            {"name": "share", "kind": "directory", "path": str(base / "share")}
                        ],
                        # A daily report that never comes, due a few seconds after start.
                        "expect": [
                            {
                                "name": "daily-report",
                                "match": "daily_*.csv",
                                "schedule": once_at(time.time() + DEADLINE_AFTER_S),
                            }
                        ],
                    }
                ],
                # A channel, so that the notification panels and rules see real series:
                # its sends fail, their errors count and the events wait in the outbox.
                "notify": [
                    {
                        "name": "downstream",
                        "kind": "webhook",
                        "url": f"http://127.0.0.1:{closed_port}/events",
                        "secret": {"env": "NOTIFY_WEBHOOK_SECRET"},
                        "backoff_s": 1,
                    },
                    {
                        "name": "arrivals",
                        "kind": "webhook",
                        "url": f"{hooks.url}/events",
                        "secret": {"env": "NOTIFY_WEBHOOK_SECRET"},
                        "on": {"types": ["filedock.arrival.missing", "filedock.arrival.late"]},
                    },
                ],
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILEDOCK_")}
    env["NOTIFY_WEBHOOK_SECRET"] = HOOK_SECRET
    log = base / "filedock.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "run", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    service = Filedock(process, f"http://127.0.0.1:{port}", root, log, config, env)
    try:

        def ready() -> bool:
            assert process.poll() is None, f"filedock exited:\n{service.log_tail()}"
            response = get(f"{service.url}/readyz")
            return response is not None and response.status_code == 200

        wait_for(ready, timeout=60, what="filedock's /readyz to answer 200")
        yield service
    finally:
        stop(process)


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, tools: dict[str, str], filedock: Filedock
) -> Iterator[str]:
    base = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = base / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "filedock",
                        "static_configs": [{"targets": [filedock.url.removeprefix("http://")]}],
                    }
                ],
            }
        )
    )
    log = base / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                tools["prometheus"],
                f"--config.file={config}",
                f"--storage.tsdb.path={base / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def target_up() -> bool:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-4000:]}"
            response = get(f"{url}/api/v1/targets")
            if response is None or response.status_code != 200:
                return False
            targets = response.json()["data"]["activeTargets"]
            return bool(targets) and all(t["health"] == "up" for t in targets)

        wait_for(target_up, timeout=60, what="Prometheus to scrape filedock")
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def traffic(filedock: Filedock, prometheus: str) -> None:
    """Real files through the real service, while Prometheus watches.

    3 imported, 2 rejected, and one file that matches no route and stays in transfer/.
    """
    transfer = filedock.root / "transfer"
    for name in GOOD_FILES + BAD_FILES:
        drop(transfer, name, "id,amount\n1,9.99\n")
    drop(transfer, "notes.txt", "matches no route\n")
    wait_for(
        lambda: (
            len(archived_jobs(filedock.root)) == len(GOOD_FILES)
            and len(failed_jobs(filedock.root)) == len(BAD_FILES)
        ),
        timeout=60,
        what=f"{len(GOOD_FILES)} jobs in archive/ and {len(BAD_FILES)} in failed/",
    )
    ended = str(len(GOOD_FILES) + len(BAD_FILES))
    wait_for(
        lambda: [r["value"][1] for r in query(prometheus, "sum(filedock_jobs_total)")] == [ended],
        timeout=30,
        what=f"Prometheus to scrape the {ended} ended jobs",
    )
    wait_for(
        lambda: [r["value"][1] for r in query(prometheus, "filedock_unrouted_files")] == ["1"],
        timeout=30,
        what="Prometheus to see notes.txt as an unrouted file",
    )


@pytest.fixture(scope="module")
def exposition(filedock: Filedock, traffic: None) -> str:
    response = httpx.get(f"{filedock.url}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def test_promtool_check_metrics_is_clean_on_the_real_exposition(
    tools: dict[str, str], exposition: str
) -> None:
    done = subprocess.run(
        [tools["promtool"], "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""


def test_the_exposition_carries_no_file_names(exposition: str) -> None:
    for name in GOOD_FILES + BAD_FILES + ("notes.txt",):
        assert name not in exposition


def test_every_dashboard_expression_runs_on_real_data(prometheus: str, exposition: str) -> None:
    exported = exported_names(exposition) | SCRAPE_SERIES
    expressions = [
        (where, substitute_variables(e)) for where, e in dashboard_expressions(load_dashboard())
    ]
    for where, expr in expressions:
        unknown = metric_names(expr) - exported
        assert unknown == set(), f"{where} names metrics filedock does not export: {unknown}"

    def must_have_data(where: str, expr: str) -> bool:
        return not where.startswith("annotation") and not metric_names(expr) & EXPECTED_EMPTY.keys()

    def without_data() -> list[str]:
        return [
            f"{where}: {expr}"
            for where, expr in expressions
            if not query(prometheus, expr) and must_have_data(where, expr)
        ]

    # Gauges such as the free space are set by the service's periodic work: give it time.
    try:
        wait_for(lambda: not without_data(), timeout=30, what="every dashboard target to have data")
    except AssertionError:
        pytest.fail("dashboard targets without data:\n" + "\n".join(without_data()))


def test_dashboard_variables_resolve(prometheus: str, traffic: None) -> None:
    found = {}
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = substitute_variables(match.group(1)), match.group(2)
        body = httpx.get(
            f"{prometheus}/api/v1/label/{label}/values", params={"match[]": selector}, timeout=10
        ).json()
        assert body["status"] == "success", body
        found[variable["name"]] = body["data"]
    assert found["route"] == ["orders"]
    assert found["job"] == ["filedock"]


def test_every_alert_expression_runs_and_every_rule_is_healthy(
    prometheus: str, exposition: str
) -> None:
    exported = exported_names(exposition) | SCRAPE_SERIES
    for rule in alert_rules():
        query(prometheus, rule["expr"])
        unknown = metric_names(rule["expr"]) - exported
        assert unknown == set(), (
            f"{rule['alert']} names metrics filedock does not export: {unknown}"
        )

    def evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_for(evaluated, timeout=30, what="Prometheus to evaluate every rule")
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def active_alerts(prometheus: str) -> dict[str, dict[str, Any]]:
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return {a["labels"]["alertname"]: a for a in alerts}


def test_failure_ratio_alert_goes_pending_on_real_failures(prometheus: str, traffic: None) -> None:
    # 2 of 5 jobs rejected: 40 % of at least 5 jobs. Its `for: 5m` keeps it pending here.
    alert = wait_for(
        lambda: active_alerts(prometheus).get("FiledockFailureRatioHigh"),
        timeout=30,
        what="FiledockFailureRatioHigh to go pending",
    )
    assert alert["state"] == "pending"
    assert alert["labels"]["route"] == "orders"
    assert alert["labels"]["job"] == "filedock"
    assert float(alert["value"]) == pytest.approx(0.4, abs=0.05)
    quiet = {"FiledockDown", "FiledockNotReady", "FiledockRecoveryInconsistency"}
    assert quiet & active_alerts(prometheus).keys() == set()


def test_an_expected_file_that_does_not_come_fires_its_alert_and_event(
    prometheus: str, filedock: Filedock, hooks: WebhookReceiver
) -> None:
    labels = {"route": "orders", "expectation": "daily-report"}
    # The real service judges the window missing and tells the channel, signed.
    [event] = wait_for(
        lambda: [d.doc for d in hooks.accepted if d.doc["type"].startswith("filedock.arrival")],
        timeout=DEADLINE_AFTER_S + 30,
        what="the arrival event at the webhook",
    )
    assert event["type"] == "filedock.arrival.missing"
    assert event["subject"] == "orders/daily-report"
    assert {k: event["data"][k] for k in ("judgement", "files", "min_files", "match")} == {
        "judgement": "missing",
        "files": 0,
        "min_files": 1,
        "match": "daily_*.csv",
    }
    # Its gauge, and the alert on it in the real Prometheus, at once (the grace is over).
    exposition = httpx.get(f"{filedock.url}/metrics", timeout=10).text
    assert 'filedock_expectation_missing{expectation="daily-report",route="orders"} 1.0' in (
        exposition
    )
    alert = wait_for(
        lambda: active_alerts(prometheus).get("FiledockExpectedFileMissing"),
        timeout=30,
        what="FiledockExpectedFileMissing to fire",
    )
    assert alert["state"] == "firing"
    assert {k: alert["labels"][k] for k in labels} == labels
    # And `filedock expectations` tells the operator the same.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "expectations",
            "--json",
            "--config",
            str(filedock.config),
        ],
        cwd=ROOT,
        env=filedock.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    [report] = json.loads(done.stdout)
    assert report["missing"] is True
    assert [w["judgement"] for w in report["windows"]] == ["missing"]


def test_down_alert_goes_pending_when_filedock_stops(prometheus: str, filedock: Filedock) -> None:
    # Last in the module: it stops the service the other tests share.
    stop(filedock.process)
    alert = wait_for(
        lambda: active_alerts(prometheus).get("FiledockDown"),
        timeout=30,
        what="FiledockDown to go pending once the target is gone",
    )
    assert alert["state"] == "pending"
    assert alert["labels"]["instance"] == filedock.url.removeprefix("http://")
