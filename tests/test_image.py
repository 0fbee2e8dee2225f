"""The container image, built for real and run the way Kubernetes runs it.

deploy/image/build-test-image.sh builds the Dockerfile with buildah (FROM a debootstrap
stand-in for python:3.11-slim-bookworm, cached outside the repository), and
deploy/image/run-image.sh runs the result without a container engine: the image's user,
environment, entrypoint and command, a read-only root filesystem, a tmpfs at /tmp, a data
folder at /data, and the service as PID 1 of its own PID namespace. The tests drop a
file the way upstream systems must (temp name, then rename) and wait for it in archive/.
Building needs root, buildah and debootstrap: the first run takes a few minutes, later
ones about half a minute.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool, skip_or_fail, wait_for

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "deploy" / "image" / "build-test-image.sh"
RUN = ROOT / "deploy" / "image" / "run-image.sh"
IMAGE = "localhost/filedock:pytest"
CACHE = os.environ.get("FILEDOCK_IMAGE_CACHE", "/var/tmp/filedock-image-cache")
UID = GID = 10001
# The image's default configuration: shutdown_grace_s 25, and a margin for bookkeeping.
STOP_TIMEOUT_S = 40
IMAGE_TEST_TIMEOUT_S = 1200


def tool(name: str) -> str:
    """A tool from this interpreter's virtualenv (not always on PATH), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return require_tool(name)


def buildah(*args: str) -> str:
    done = subprocess.run(
        [
            require_tool("buildah"),
            *("--root", f"{CACHE}/storage", "--runroot", f"{CACHE}/run"),
            *("--storage-driver", "vfs", *args),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"buildah {' '.join(args)}: {done.stderr}"
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(port: int, path: str) -> tuple[int, str] | None:
    """(status, body) of a GET on loopback, or None while nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        conn.close()


def owned_data_dir(tmp_path: Path) -> Path:
    """A scratch /data owned by the image's user, as fsGroup makes the real volume."""
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, UID, GID)
    return data


def drop(data: Path, name: str, content: bytes) -> None:
    """Deliver a file the way upstream must: a temp name in transfer/, then a rename."""
    transfer = data / "transfer"
    transfer.mkdir(exist_ok=True)
    os.chown(transfer, UID, GID)
    temp = transfer / f"{name}.part"
    temp.write_bytes(content)
    os.chown(temp, UID, GID)
    temp.rename(transfer / name)


def archived(data: Path, name: str) -> list[Path]:
    archive = data / "archive"
    if not archive.is_dir():
        return []
    return [
        p for p in archive.rglob(f"{name}*") if p.is_file() and not p.parent.name.endswith(".tmp")
    ]


def run_container(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(RUN), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A container in the background: (its run-image.sh process, host PID of its PID 1).

    Its output goes to `tmp_path/container.log`. On the way out it is stopped like
    `docker stop` does (SIGTERM), and SIGKILLed as a group only if that fails.
    """
    pidfile = tmp_path / "pid"
    with (tmp_path / "container.log").open("wb") as out:
        container = subprocess.Popen(
            ["bash", str(RUN), "--pidfile", str(pidfile), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        pid = wait_for(
            lambda: pidfile.exists() and pidfile.read_text().strip(),
            timeout=120,
            what="the container's PID 1",
        )
        yield container, int(pid)
    finally:
        if container.poll() is None:
            # run-image.sh passes SIGTERM on and removes its working container; SIGKILL to
            # the whole group only if that fails (unshare --kill-child ends PID 1 then).
            container.send_signal(signal.SIGTERM)
            try:
                container.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(container.pid, signal.SIGKILL)
                container.wait(timeout=30)


def in_namespace(pid1: int) -> list[int]:
    """Host PIDs of the processes in the PID namespace whose PID 1 is `pid1`."""
    ns = os.readlink(f"/proc/{pid1}/ns/pid")
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                    found.append(int(entry))
    return found


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


# --- without building --------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_scripts_pass_shellcheck() -> None:
    scripts = sorted(str(p) for p in (ROOT / "deploy" / "image").glob("*.sh"))
    done = subprocess.run(
        [require_tool("shellcheck"), "--external-sources", *scripts],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_passes_checkov(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            tool("checkov"),
            *("--file", str(ROOT / "Dockerfile"), "--framework", "dockerfile"),
            *("--output", "json", "--skip-download", "--compact"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report = json.loads(done.stdout)
    failed = [f"{c['check_id']} {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 20, report["summary"]


def test_dockerignore_lets_in_only_what_the_dockerfile_copies() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "exclude everything (.venv, data, caches), then let files back in"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [
        src.rstrip("/")
        for copy in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M)
        for src in copy.split()[:-1]
        if not src.startswith("--")
    ]
    assert sources, "no COPY found in the Dockerfile"
    assert set(sources) <= allowed, set(sources) - allowed


def test_the_baked_configuration_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import load_settings

    for name in list(os.environ):
        if name.startswith("FILEDOCK_"):
            monkeypatch.delenv(name)
    settings = load_settings(ROOT / "deploy" / "image" / "config.yaml")
    assert settings.root == Path("/data")
    assert settings.http.port == 9100
    assert re.search(r"^EXPOSE 9100$", (ROOT / "Dockerfile").read_text(), re.M)
    (route,) = settings.routes
    assert route.importer.kind == "command"
    script = route.importer.argv[1]
    assert script.startswith("/opt/filedock/examples/")
    assert (ROOT / "examples" / Path(script).name).is_file(), script


# --- the built image ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if os.geteuid() != 0:
        skip_or_fail("building and running the image needs root (chroot, namespaces)")
    for name in ("buildah", "debootstrap", "unshare", "setpriv", "chroot"):
        require_tool(name)
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(BUILD), "--tag", IMAGE],
        capture_output=True,
        text=True,
        timeout=IMAGE_TEST_TIMEOUT_S - 60,
        env={**os.environ, "FILEDOCK_IMAGE_CACHE": CACHE},
    )
    assert done.returncode == 0, f"image build failed:\n{done.stderr[-6000:]}"
    assert done.stdout.strip() == IMAGE
    print(f"image built in {time.monotonic() - started:.0f}s:\n{done.stderr}")
    yield IMAGE


def image_config(image: str) -> dict[str, Any]:
    inspected = json.loads(buildah("inspect", "--type", "image", image))
    config: dict[str, Any] = inspected["Docker"]["config"]
    return config


@pytest.mark.timeout(IMAGE_TEST_TIMEOUT_S)
def test_image_metadata_and_contents(image: str) -> None:
    config = image_config(image)
    assert config["User"] == f"{UID}:{GID}"
    assert config["Entrypoint"] == ["tini", "--", "filedock"]
    assert config["Cmd"] == ["run", "--config", "/etc/filedock/config.yaml"]
    assert "9100/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    labels = config["Labels"]
    for key in ("title", "version", "revision", "created", "licenses", "description"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.version"] == re.search(
        r'__version__ = "(.+)"', (ROOT / "service" / "__init__.py").read_text()
    ).group(1)  # type: ignore[union-attr]

    container = buildah("from", "--pull=never", "--quiet", image).strip()
    try:
        rootfs = Path(buildah("mount", container).strip())
        assert (rootfs / "opt/venv/bin/filedock").is_file()
        assert (rootfs / "etc/filedock/config.yaml").is_file()
        assert (rootfs / "opt/filedock/examples/demo_importer.py").is_file()
        data = (rootfs / "data").stat()
        assert (data.st_uid, data.st_gid) == (UID, GID)
        # The final stage holds no sources, no build tools and no secrets from the build.
        for absent in ("src", "usr/bin/gcc", "usr/bin/cc", "usr/bin/make", "run/secrets/pip-ca"):
            assert not (rootfs / absent).exists(), absent
        # Byte code is compiled at build time: a read-only root cannot take .pyc files.
        assert list((rootfs / "opt/venv/lib").glob("python3*/site-packages/service/__pycache__"))
    finally:
        buildah("rm", container)


@pytest.mark.timeout(IMAGE_TEST_TIMEOUT_S)
def test_image_validates_its_configuration(image: str, tmp_path: Path) -> None:
    data = owned_data_dir(tmp_path)
    done = run_container(
        "-v", f"{data}:/data", image, "--", "check-config", "--config", "/etc/filedock/config.yaml"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text("root: /data\nshutdown_grace: 25\n")
    done = run_container(
        *("-v", f"{data}:/data", "-v", f"{bad}:/etc/filedock:ro", image),
        *("--", "check-config", "--config", "/etc/filedock/config.yaml"),
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "shutdown_grace" in done.stdout + done.stderr


@pytest.mark.timeout(IMAGE_TEST_TIMEOUT_S)
def test_image_run_once_drains_transfer_and_exits(image: str, tmp_path: Path) -> None:
    data = owned_data_dir(tmp_path)
    drop(data, "batch-0001.csv", b"id,name\n1,alpha\n2,beta\n")
    done = run_container(
        *("-v", f"{data}:/data", "-e", "FILEDOCK_HTTP__ENABLED=false", image),
        *("--", "run", "--once", "--config", "/etc/filedock/config.yaml"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert archived(data, "batch-0001.csv"), sorted(map(str, data.rglob("*")))
    assert not list((data / "transfer").iterdir())


@pytest.mark.timeout(IMAGE_TEST_TIMEOUT_S)
def test_image_serves_imports_and_stops_gracefully(image: str, tmp_path: Path) -> None:
    data = owned_data_dir(tmp_path)
    port = free_port()
    log = tmp_path / "container.log"
    with serving(
        tmp_path,
        *("-v", f"{data}:/data", "-e", f"FILEDOCK_HTTP__PORT={port}"),
        *("-e", "FILEDOCK_HTTP__HOST=127.0.0.1", image),
    ) as (container, pid):
        health = wait_for(
            lambda: http_get(port, "/healthz"), timeout=60, what=f"/healthz on :{port}"
        )
        assert health[0] == 200, health

        # PID 1 of the namespace is tini, and the service its child.
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "tini"
        assert proc_status(pid)["NSpid"].split()[-1] == "1"
        (service,) = (p for p in in_namespace(pid) if proc_status(p)["PPid"] == str(pid))
        # Kubernetes' promises, read off the running service.
        status = proc_status(service)
        assert "filedock" in Path(f"/proc/{service}/cmdline").read_bytes().decode()
        assert status["Uid"].split() == [str(UID)] * 4
        assert status["Gid"].split() == [str(GID)] * 4
        assert status["NoNewPrivs"] == "1"
        assert int(status["CapEff"], 16) == 0
        mountinfo = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        mounts = {fields[4]: fields[5].split(",") for fields in map(str.split, mountinfo)}
        assert "ro" in mounts["/"], "the root filesystem is read-only"
        assert "rw" in mounts["/data"] and "rw" in mounts["/tmp"]

        drop(data, "hello.csv", b"id,greeting\n1,hello\n")
        wait_for(lambda: archived(data, "hello.csv"), timeout=60, what="hello.csv in archive/")
        assert not (data / "transfer" / "hello.csv").exists()
        wait_for(lambda: not any((data / "proc").iterdir()), timeout=30, what="an empty proc/")
        metrics = http_get(port, "/metrics")
        assert metrics is not None and metrics[0] == 200
        assert re.search(
            r'^filedock_jobs_total\{[^}]*route="demo"[^}]*\} 1(\.0)?$', metrics[1], re.M
        ), metrics[1][:3000]
        ready = http_get(port, "/readyz")
        assert ready is not None and ready[0] == 200, ready

        # `docker stop` / the kubelet: SIGTERM to PID 1, a clean exit within the grace.
        container.send_signal(signal.SIGTERM)
        assert container.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text()[-4000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines, "the service logged no JSON line"
    for line in lines:
        assert isinstance(json.loads(line), dict), line


@pytest.mark.timeout(IMAGE_TEST_TIMEOUT_S)
def test_image_reaps_what_an_importer_leaves_behind(image: str, tmp_path: Path) -> None:
    """An importer that exits leaving a background child: tini, as PID 1, reaps it."""
    data = owned_data_dir(tmp_path)
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.yaml").write_text(
        "root: /data\nhttp: {enabled: false}\nroutes:\n  - name: orphans\n"
        '    match: "**"\n    importer:\n      kind: command\n'
        '      argv: [sh, -c, "sleep 3 </dev/null >/dev/null 2>&1 & exit 0", sh, "{path}"]\n'
    )
    log = tmp_path / "container.log"
    volumes = ("-v", f"{data}:/data", "-v", f"{config}:/etc/filedock:ro")
    with serving(tmp_path, *volumes, image) as (container, pid):
        drop(data, "orphan.csv", b"id\n1\n")
        wait_for(lambda: archived(data, "orphan.csv"), timeout=60, what="orphan.csv archived")

        def sleepers() -> list[str]:
            states = []
            for p in in_namespace(pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{p}/comm").read_text().strip() == "sleep":
                        states.append(proc_status(p)["State"])
            return states

        # The orphan outlives its importer by seconds, then must be gone: no zombie left.
        wait_for(sleepers, timeout=30, what="the importer's orphan, still running")
        wait_for(lambda: not sleepers(), timeout=30, what="the orphan reaped, no zombie left")
        container.send_signal(signal.SIGTERM)
        assert container.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text()[-4000:]
