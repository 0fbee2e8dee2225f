"""The Kubernetes manifests: every overlay renders, validates and keeps its promises.

Each overlay under deploy/kubernetes is rendered with `kubectl kustomize` and checked
with real tools: `kubernetes-validate --strict` for the built-in kinds, the CRDs' schemas
(tests/schemas) for ServiceMonitor, PrometheusRule and ScaledObject, `promtool` for every
PromQL expression, and `checkov` with zero failed checks (each skip carries its reason in
the manifests). Then the invariants a user relies on: the volume mounted once at /data
without subPath, a termination grace period above shutdown_grace_s, non-root with a
read-only root filesystem, and a configuration the service itself accepts.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = ["base", "monitoring", "ha"]
# The oldest and the newest Kubernetes whose schemas kubernetes-validate ships that we
# support: the manifests must be valid on both.
KUBERNETES_VERSIONS = ["1.28.0", "1.37.0"]
SERVICE_DEFAULT_SHUTDOWN_GRACE_S = 25.0
# Time left after shutdown_grace_s for the shielded bookkeeping (ledger, archive renames).
MIN_GRACE_MARGIN_S = 5


def tool(name: str) -> str:
    """A tool from this interpreter's virtualenv (not always on PATH), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return require_tool(name)


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)


@functools.cache
def render(overlay: str) -> str:
    kubectl = require_tool("kubectl")
    done = run([kubectl, "kustomize", str(KUSTOMIZE / overlay)])
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return done.stdout


def documents(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render(overlay)) if doc]


def the(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for doc in documents(overlay)
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{overlay}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(overlay: str) -> dict[str, Any]:
    spec: dict[str, Any] = the(overlay, "Deployment", "filedock")["spec"]["template"]["spec"]
    return spec


def container(overlay: str) -> dict[str, Any]:
    (main,) = [c for c in pod_spec(overlay)["containers"] if c["name"] == "filedock"]
    return main


def env_of(overlay: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(overlay).get("env", [])}


def service_config(overlay: str) -> dict[str, Any]:
    """The service's YAML configuration as the ConfigMap carries it."""
    configmap = the(overlay, "ConfigMap")
    config: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    return config


def schema_file(api_version: str, kind: str) -> Path:
    return SCHEMAS / f"{api_version.replace('/', '_')}_{kind}.json"


# --- rendering and validation ------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_validate_strict(overlay: str, version: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render(overlay), encoding="utf-8")
    done = run([tool("kubernetes-validate"), "--strict", "-k", version, str(rendered)])
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # kubernetes-validate skips kinds it has no schema for (CRDs): each of those must be
    # checked against a schema of ours instead, and everything else must have passed.
    skipped = set(re.findall(r"Couldn't find schema for kind (\w+) with api version (\S+)", output))
    for kind, api_version in skipped:
        assert schema_file(api_version, kind).is_file(), f"no schema for {api_version} {kind}"
    passed = len(re.findall(r" passed for resource ", output))
    assert passed == len(documents(overlay)) - len(skipped_docs(overlay, skipped)), output


def skipped_docs(overlay: str, skipped: set[tuple[str, str]]) -> list[dict[str, Any]]:
    return [d for d in documents(overlay) if (d["kind"], d["apiVersion"]) in skipped]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_crd_schema(overlay: str) -> None:
    builtin = re.compile(r"^(v1|(apps|policy|networking\.k8s\.io|batch|rbac\.[\w.]+)/v1)$")
    for doc in documents(overlay):
        if builtin.match(doc["apiVersion"]):
            continue
        path = schema_file(doc["apiVersion"], doc["kind"])
        assert path.is_file(), f"{overlay}: no schema in tests/schemas for {doc['kind']}"
        validator = jsonschema.Draft202012Validator(json.loads(path.read_text(encoding="utf-8")))
        errors = [
            f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
        assert errors == [], f"{overlay} {doc['kind']} {doc['metadata']['name']}: {errors}"


def test_crd_schemas_reject_an_unknown_field() -> None:
    """The schema subsets are strict: a misspelt field fails, as with the API server."""
    monitor = the("monitoring", "ServiceMonitor")
    monitor = json.loads(json.dumps(monitor))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    schema = json.loads(schema_file(monitor["apiVersion"], monitor["kind"]).read_text("utf-8"))
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        jsonschema.validate(monitor, schema, cls=jsonschema.Draft202012Validator)


def promtool_check_rules(groups: list[dict[str, Any]], tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
    done = run([require_tool("promtool"), "check", "rules", str(rules)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout, done.stdout


@pytest.mark.parametrize("overlay", ["monitoring", "ha"])
def test_prometheusrule_groups_pass_promtool(overlay: str, tmp_path: Path) -> None:
    rule = the(overlay, "PrometheusRule")
    assert rule["spec"]["groups"], "the PrometheusRule has no rule groups"
    promtool_check_rules(rule["spec"]["groups"], tmp_path)


def test_keda_triggers_are_valid_promql_on_filedock_metrics(tmp_path: Path) -> None:
    scaled = the("ha", "ScaledObject")
    triggers = scaled["spec"]["triggers"]
    records = []
    for n, trigger in enumerate(triggers):
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith(("http://", "https://"))
        assert float(meta["threshold"]) > 0
        query = meta["query"]
        assert re.search(r"filedock_(oldest_waiting_file_age_seconds|backlog_files)\b", query)
        # Every replica reports the same shared folder: summing would count it N times.
        assert query.startswith("max("), f"aggregate with max(), not sum(): {query}"
        records.append({"record": f"keda:filedock_trigger_{n}", "expr": query})
    promtool_check_rules([{"name": "keda-triggers", "rules": records}], tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_unjustified(overlay: str, tmp_path: Path) -> None:
    checkov = tool("checkov")
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render(overlay), encoding="utf-8")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    done = run(
        [
            checkov,
            *("--file", str(rendered), "--framework", "kubernetes"),
            *("--output", "json", "--skip-download", "--compact"),
        ],
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report = json.loads(done.stdout)
    if isinstance(report, list):
        (report,) = [r for r in report if r.get("check_type") == "kubernetes"]
    summary = report["summary"]
    failed = [
        f"{c['check_id']} {c['check_name']} ({c['resource']})"
        for c in report["results"]["failed_checks"]
    ]
    assert failed == [], f"checkov failed checks in {overlay}: {failed}"
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 50, summary
    for check in report["results"]["skipped_checks"]:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.split()) >= 8, f"{check['check_id']} is skipped without a reason"


# --- what a user relies on ---------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_data_volume_is_mounted_once_at_data_without_subpath(overlay: str) -> None:
    pod = pod_spec(overlay)
    claims = [v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert len(claims) == 1, f"one volume for every folder, got {claims}"
    mounts = [
        m
        for c in pod["containers"] + pod.get("initContainers", [])
        for m in c.get("volumeMounts", [])
        if m["name"] == claims[0]
    ]
    # A second mount (or subPath per folder) of one volume makes the claim's rename EXDEV.
    assert len(mounts) == 1, mounts
    assert mounts[0]["mountPath"] == "/data"
    assert "subPath" not in mounts[0] and "subPathExpr" not in mounts[0]
    assert not mounts[0].get("readOnly", False)
    config = service_config(overlay)
    assert config["root"] == "/data"
    for name, folder in (config.get("folders") or {}).items():
        assert folder is None or str(folder).startswith("/data/"), f"folders.{name}: {folder}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_exceeds_shutdown_grace(overlay: str) -> None:
    grace = float(service_config(overlay).get("shutdown_grace_s", SERVICE_DEFAULT_SHUTDOWN_GRACE_S))
    override = env_of(overlay).get("FILEDOCK_SHUTDOWN_GRACE_S")
    if override is not None:
        grace = float(override["value"])
    termination = pod_spec(overlay)["terminationGracePeriodSeconds"]
    assert termination >= grace + MIN_GRACE_MARGIN_S, (termination, grace)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runs_as_non_root_with_a_read_only_root_filesystem(overlay: str) -> None:
    pod = pod_spec(overlay)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == 10001
    assert pod["fsGroupChangePolicy"] == "OnRootMismatch"
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    main = container(overlay)["securityContext"]
    assert main["readOnlyRootFilesystem"] is True
    assert main["allowPrivilegeEscalation"] is False
    assert main["runAsNonRoot"] is True
    assert main["capabilities"]["drop"] == ["ALL"]
    assert "add" not in main["capabilities"]
    # The only writable places: the data volume and an emptyDir at /tmp.
    volumes = {v["name"]: v for v in pod_spec(overlay)["volumes"]}
    writable = {
        m["mountPath"]: volumes[m["name"]]
        for m in container(overlay)["volumeMounts"]
        if not m.get("readOnly", False)
    }
    assert set(writable) == {"/data", "/tmp"}
    assert "emptyDir" in writable["/tmp"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_service_and_network_policy_use_the_metrics_port(overlay: str) -> None:
    main = container(overlay)
    port = service_config(overlay).get("http", {}).get("port", 9100)
    (metrics,) = [p for p in main["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == port
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    service = the(overlay, "Service", "filedock")
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("metrics", "metrics")
    ]
    pod_labels = the(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    policy = the(overlay, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = [p for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ports == [{"port": "metrics", "protocol": "TCP"}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_is_pinned_and_config_is_mounted(overlay: str) -> None:
    main = container(overlay)
    image = main["image"]
    assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.rsplit("/", 1)[-1]), image
    assert not image.endswith(":latest")
    assert main["args"] == ["run", "--config", "/etc/filedock/config.yaml"]
    config_volume = next(v for v in pod_spec(overlay)["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == the(overlay, "ConfigMap")["metadata"]["name"]
    assert {"name": config_volume["name"], "mountPath": "/etc/filedock", "readOnly": True} in (
        main["volumeMounts"]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_accepts_the_rendered_configuration(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap plus the Deployment's FILEDOCK_* variables pass the service's validation."""
    from service.settings import load_settings

    for name in list(os.environ):
        if name.startswith("FILEDOCK_"):
            monkeypatch.delenv(name)
    for name, var in env_of(overlay).items():
        if "value" in var:
            monkeypatch.setenv(name, var["value"])
        elif name == "FILEDOCK_LEDGER_URL":
            monkeypatch.setenv(name, "postgresql://filedock@postgres.example:5432/filedock")
        else:
            monkeypatch.setenv(name, "filedock-7d9f8-abcde")  # fieldRef: the pod's name
    config = tmp_path / "config.yaml"
    config.write_text(the(overlay, "ConfigMap")["data"]["config.yaml"], encoding="utf-8")
    settings = load_settings(config)
    assert settings.root == Path("/data")
    assert settings.routes, "a configuration without routes imports nothing"


def test_base_is_one_replica_with_sqlite_on_a_read_write_once_volume() -> None:
    deployment = the("base", "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # Never old and new pod side by side on one SQLite file and one RWO volume.
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert the("base", "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "FILEDOCK_LEDGER_URL" not in env_of("base")
    assert not service_config("base").get("ledger_url")
    assert env_of("base")["FILEDOCK_REPLICA_ID"]["valueFrom"]["fieldRef"] == {
        "fieldPath": "metadata.name"
    }


def test_ha_shares_a_read_write_many_volume_with_a_postgresql_ledger() -> None:
    deployment = the("ha", "Deployment")
    assert deployment["spec"]["replicas"] > 1
    assert the("ha", "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    env = env_of("ha")
    ledger = env["FILEDOCK_LEDGER_URL"]["valueFrom"]["secretKeyRef"]
    assert ledger["name"] and ledger["key"] and not ledger.get("optional", False)
    assert env["FILEDOCK_WATCH_MODE"]["value"] == "scan"
    assert "Secret" not in {d["kind"] for d in documents("ha")}, "never ship a credential"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = the("ha", "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    scaled = the("ha", "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["minReplicaCount"] == deployment["spec"]["replicas"]
    assert scaled["maxReplicaCount"] > scaled["minReplicaCount"]


@pytest.mark.parametrize("overlay", ["monitoring", "ha"])
def test_the_service_monitor_scrapes_the_filedock_service(overlay: str) -> None:
    monitor = the(overlay, "ServiceMonitor")
    service = the(overlay, "Service", "filedock")  # its name is the job label the alerts use
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}
