"""Static proofs for the monitoring assets: the alert rules and the Grafana dashboard.

promtool checks and unit-tests the rules; the PrometheusRule must carry exactly the
groups of rules.yml; every alert needs its annotations, a runbook section and a firing
and a quiet unit test. The dashboard lint keeps it importable and provisioning-ready.
The helpers that list the expressions are shared with test_prometheus_integration.py,
which runs every one of them on a real Prometheus.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules.test.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
DASHBOARD = ROOT / "grafana" / "dashboards" / "filedock.json"
PROVISIONING = ROOT / "grafana" / "provisioning"

EXPECTED_ALERTS = {
    "FiledockDown",
    "FiledockNotReady",
    "FiledockOldestWaitingFileTooOld",
    "FiledockFailureRatioHigh",
    "FiledockNoSuccessWhileFilesArrive",
    "FiledockArchiveFilesystemNearlyFull",
    "FiledockWatcherRestarting",
    "FiledockRecoveryInconsistency",
    "FiledockSinkPaused",
    "FiledockDeliveryBacklogOld",
    "FiledockDeliveryFailing",
    "FiledockNotifyChannelFailing",
    "FiledockEventsGivenUp",
    "FiledockExpectedFileMissing",
}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Every label a panel may group by or print. Anything naming a file (name, path, job id)
# would explode the series count, and the service never exports it anyway. A sink's
# label is its configured name, one of a few per route; a notify channel's label is its
# configured name too, one of a few per deployment, and so is an arrival expectation's
# (a few per route); `judgement` takes four values.
ALLOWED_LABELS = {
    "route",
    "sink",
    "channel",
    "expectation",
    "judgement",
    "outcome",
    "error_class",
    "folder",
    "kind",
    "mode",
    "result",
    "le",
    "instance",
    "job",
    "namespace",
    "version",
    "python",
}
# Grafana's variables as the integration test substitutes them (an "All" selection is `.*`).
VARIABLE_VALUES = {
    "route": ".*",
    "namespace": ".*",
    "job": "filedock",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}
# The label lists of PromQL's grouping and matching modifiers.
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of rules.yml."""
    return [
        rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed children included, rows themselves excluded."""
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every annotation query."""
    out = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in panels(dashboard)
        for t in p["targets"]
    ]
    out += [
        (f"annotation {a['name']!r}", a["expr"])
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    ]
    return out


def substitute_variables(expr: str) -> str:
    """The PromQL Grafana would send, with each `$var` / `${var}` replaced by its test value."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLE_VALUES:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return VARIABLE_VALUES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def labels_used(expr: str) -> set[str]:
    """Labels an expression groups or matches by: by/without/on/ignoring lists and matchers."""
    found: set[str] = set()
    for group in GROUPING.findall(expr):
        found.update(label.strip() for label in group.split(",") if label.strip())
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        found.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return found


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


# --- the rules ---------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    done = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_expected_alerts_exist_once_each() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert sorted(names) == sorted(EXPECTED_ALERTS)


def test_prometheusrule_carries_the_same_groups_as_rules_yml() -> None:
    resource = load_yaml(PROMETHEUS_RULE)
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["metadata"]["name"] == "filedock"
    assert resource["spec"] == load_yaml(RULES)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_annotations_and_a_runbook_section(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert len(annotations["description"].split()) >= 15, "say what to check and do"
    url = annotations["runbook_url"]
    assert url.startswith("https://"), url
    page, _, anchor = url.partition("#")
    assert page.endswith("/docs/operations.md"), url
    assert anchor == rule["alert"].lower()
    headings = re.findall(r"^#{2,4} (.+)$", OPERATIONS.read_text(encoding="utf-8"), re.M)
    assert anchor in {github_anchor(h) for h in headings}, f"no section #{anchor} in {OPERATIONS}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert EXPECTED_ALERTS - firing == set(), "alerts never shown to fire"
    assert EXPECTED_ALERTS - quiet == set(), "alerts never shown to stay quiet"


# --- the dashboard -----------------------------------------------------------------------


def test_dashboard_is_importable_and_provisioning_ready() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "filedock"
    assert dashboard["title"]
    assert "__inputs" not in dashboard, "an __inputs section breaks provisioning"
    assert dashboard.get("id") is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    route = variables["route"]
    assert route["type"] == "query"
    assert re.fullmatch(r"label_values\(filedock_jobs_total(\{.*\})?, route\)", route["definition"])
    assert route["query"]["query"] == route["definition"]
    assert route["multi"] is True
    assert route["includeAll"] is True
    ids = [p["id"] for p in dashboard["panels"]] + [
        child["id"] for p in dashboard["panels"] for child in p.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def _datasource_refs(node: Any, where: str = "") -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                found.append((where, value))
            found.extend(_datasource_refs(value, f"{where}/{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_datasource_refs(value, f"{where}/{i}"))
    return found


def test_dashboard_datasource_is_the_variable_everywhere() -> None:
    refs = _datasource_refs(load_dashboard())
    assert refs
    wrong = [(where, ref) for where, ref in refs if ref != DATASOURCE_REF]
    assert wrong == []


def test_every_panel_has_a_target_and_a_description() -> None:
    for panel in panels(load_dashboard()):
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty target"
        assert panel.get("description"), f"panel {panel['title']!r} has no description"


def test_the_required_panels_are_there() -> None:
    exprs = " ".join(expr for _, expr in dashboard_expressions(load_dashboard()))
    for needed in (
        "filedock_jobs_total",
        "histogram_quantile(0.95, sum by (route, le) (rate(filedock_import_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (route, le) (rate(filedock_end_to_end_seconds_bucket",
        "filedock_jobs_in_progress",
        "filedock_concurrency_limit",
        "filedock_queue_depth",
        "filedock_backlog_files",
        "filedock_oldest_waiting_file_age_seconds",
        "filedock_retries_total",
        "filedock_filesystem_free_bytes",
        "filedock_watcher_restarts_total",
        "filedock_recovery_actions_total",
        "filedock_stalled_uploads",
        "filedock_unrouted_files",
        "filedock_ready",
        "up{",
        "changes(process_start_time_seconds",
        "filedock_deliveries_total",
        "histogram_quantile(0.95, sum by (sink, le) (rate(filedock_delivery_duration_seconds",
        "filedock_delivery_bytes_total",
        "max by (route, sink) (filedock_deliveries_waiting",
        "max by (route, sink) (filedock_oldest_delivery_age_seconds",
        "max by (route, sink) (filedock_sink_paused",
        "sum by (channel) (rate(filedock_events_sent_total",
        "sum by (channel) (rate(filedock_event_send_errors_total",
        "sum by (channel) (increase(filedock_events_failed_total",
        "max by (channel) (filedock_outbox_pending",
        "max by (channel) (filedock_outbox_oldest_pending_age_seconds",
        "max by (route, expectation) (filedock_expectation_missing",
        "max by (route, expectation) (filedock_expectation_next_deadline_timestamp_seconds",
        "sum by (route, expectation, judgement) (increase(filedock_arrival_windows_total",
    ):
        assert needed in exprs, f"no panel shows {needed}"


def test_dashboard_uses_no_file_name_or_path_labels() -> None:
    dashboard = load_dashboard()
    for where, expr in dashboard_expressions(dashboard):
        used = labels_used(expr)
        assert used <= ALLOWED_LABELS, f"{where}: unexpected labels {used - ALLOWED_LABELS}"
    for panel in panels(dashboard):
        for target in panel["targets"]:
            printed = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert printed <= ALLOWED_LABELS, f"{panel['title']!r} prints {printed}"


def test_dashboard_variables_all_have_test_values() -> None:
    for where, expr in dashboard_expressions(load_dashboard()):
        substituted = substitute_variables(expr)
        assert "$" not in substituted, f"{where}: {substituted}"


def test_rules_use_no_file_name_or_path_labels() -> None:
    for rule in alert_rules():
        used = labels_used(rule["expr"])
        assert used <= ALLOWED_LABELS, f"{rule['alert']}: unexpected labels {used}"


def test_grafana_provisioning_points_at_the_dashboard_folder() -> None:
    datasources = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    providers = load_yaml(PROVISIONING / "dashboards" / "filedock.yaml")
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].endswith("/dashboards/filedock")
