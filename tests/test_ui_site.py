"""The operator page through its ASGI app (service/face/ui/), on a real SQLite ledger and
folders in tmp_path: what each page shows, the security headers, hostile names shown
as text, documents read only from where the ledger says, and the gate in front of
every action (read-only without a token file, Origin, session, CSRF)."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from service.face.http import Health, build_http_app
from service.face.metrics import Metrics
from service.face.ui import OperatorPage
from service.face.ui.render import name_html, text_html
from service.ledger import JobRecord, Ledger, ledger_for_url
from service.settings import Settings

TOKEN = "alice-token-0123456789abcdef"
HOSTILE = b"<script>alert(1)</script>\n\xff\xe2\x80\xae<img src=x onerror=alert(2)>.csv"
ORIGIN = {"origin": "http://testserver"}


@dataclass
class Site:
    client: httpx.AsyncClient
    page: OperatorPage
    ledger: Ledger
    settings: Settings

    async def failed_job(self, n: int, name: bytes = b"bad.csv", **fields: Any) -> JobRecord:
        """A job set aside in failed/, with its file and error.json, as the pipeline leaves it."""
        job_id = f"20270115T0000000{n:02d}Z-{n:08x}"
        folder = self.settings.folder("failed") / job_id
        folder.mkdir(parents=True)
        (folder / "payload").write_bytes(b"data")
        (folder / "error.json").write_text(json.dumps({"job_id": job_id, "message": "no"}))
        now = time.time()
        values: dict[str, Any] = {
            "id": job_id,
            "route": "main",
            "name": name,
            "relative_path": name,
            "state": "failed",
            "outcome": "rejected",
            "attempts": 1,
            "error_class": "rejected",
            "error": "exit code 65: line 3 has no date",
            "failed_path": str(folder),
            "detected_at": now,
            "created_at": now,
            "updated_at": now,
            "history": [
                {
                    "n": 1,
                    "started_at": "2027-01-15T00:00:00.000Z",
                    "result": "rejected",
                    "log_tail": "line 3:\tno date\n",
                }
            ],
        }
        values.update(fields)
        record = JobRecord(**values)
        await self.ledger.insert([record])
        return record

    async def sign_in(self) -> str:
        """Signs in as alice; the CSRF token of the session."""
        form = await self.client.get("/ui/login")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
        assert nonce is not None
        r = await self.client.post(
            "/ui/login", data={"nonce": nonce[1], "token": TOKEN, "next": "/"}, headers=ORIGIN
        )
        assert r.status_code == 303, r.text
        page = await self.client.get("/")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        return csrf[1]


async def open_site(tmp_path: Path, tokens: bool) -> AsyncIterator[Site]:
    ui: dict[str, Any] = {"refresh_s": 1}
    if tokens:
        (tmp_path / "tokens").write_text(f"alice:{TOKEN}\n")
        ui["token_file"] = tmp_path / "tokens"
    lake = {"name": "lake", "kind": "directory", "path": str(tmp_path / "lake")}
    settings = Settings(
        root=tmp_path / "data",
        routes=[{"name": "main", "match": "**", "importer": "none", "deliver": [lake]}],
        ui=ui,
    )
    for name in ("transfer", "proc", "archive", "failed", "temp", "state"):
        settings.folder(name).mkdir(parents=True, exist_ok=True)
    ledger = ledger_for_url(settings.effective_ledger_url)
    await ledger.open()
    metrics = Metrics()
    page = OperatorPage(settings, ledger, metrics)
    health = Health(ledger, metrics, {}, 0, recovery_done=True)
    app = build_http_app(health, page.app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield Site(client, page, ledger, settings)
    await ledger.close()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async for s in open_site(tmp_path, tokens=True):
        yield s


@pytest.fixture
async def read_only(tmp_path: Path) -> AsyncIterator[Site]:
    async for s in open_site(tmp_path, tokens=False):
        yield s


# -- pages ----------------------------------------------------------------------------


async def test_every_page_answers_with_its_security_headers(site: Site) -> None:
    job = await site.failed_job(1)
    for path in ("/", "/ui/jobs", f"/ui/jobs/{job.id}", "/ui/failures", "/ui/login"):
        r = await site.client.get(path)
        assert r.status_code == 200, (path, r.text[:300])
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "'unsafe-inline'" not in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
        assert "<script>" not in r.text and " style=" not in r.text  # nothing inline
    static = await site.client.get("/ui/static/htmx.min.js")
    assert static.status_code == 200 and static.text.startswith("/*! htmx.org 2.")
    assert static.headers["x-content-type-options"] == "nosniff"
    assert "max-age" in static.headers["cache-control"]
    assert (await site.client.get("/nowhere")).status_code == 404


async def test_the_probes_and_jobs_endpoint_stay_as_they_are(site: Site) -> None:
    await site.failed_job(1)
    r = await site.client.get("/jobs?state=failed")
    assert r.headers["content-type"] == "application/json"
    assert [j["name"] for j in r.json()] == ["bad.csv"]
    assert "content-security-policy" not in r.headers
    assert (await site.client.get("/healthz")).json() == {"status": "ok"}
    assert (await site.client.get("/metrics")).status_code == 200


async def test_the_overview_shows_jobs_routes_folders_and_sinks(site: Site) -> None:
    await site.failed_job(1)
    (site.settings.folder("transfer") / ".half.csv.tmp").write_bytes(b"x")
    site.page.metrics.sink_paused.labels("main", "lake").set(1)
    r = await site.client.get("/")
    assert 'href="/ui/jobs?state=failed"' in r.text
    assert re.search(r'<span class="n">1</span><span class="label">failed</span>', r.text)
    assert "transfer/" in r.text and "temporary name" in r.text and ">main<" in r.text
    assert "main / lake" in r.text and ">paused<" in r.text
    partial = await site.client.get("/", headers={"hx-request": "true"})
    assert "<html" not in partial.text and "Overview" in partial.text


async def test_the_job_list_filters_pages_and_refuses_bad_filters(site: Site) -> None:
    for n in range(3):
        await site.failed_job(n, name=f"file{n}.csv".encode())
    r = await site.client.get("/ui/jobs?state=failed&limit=25")
    assert all(f"file{n}.csv" in r.text for n in range(3))
    r = await site.client.get("/ui/jobs?q=FILE1")
    assert "file1.csv" in r.text and "file2.csv" not in r.text
    assert (await site.client.get("/ui/jobs?state=nope")).status_code == 400
    assert (await site.client.get("/ui/jobs?before=../../etc")).status_code == 400
    assert (await site.client.get("/ui/jobs?limit=100000")).status_code == 400
    found = await site.client.get("/ui/jobs?q=20270115T000000001Z-00000001")
    assert found.status_code == 303 and found.headers["location"].endswith("Z-00000001")


async def test_a_failed_job_shows_its_reason_log_and_error_json(site: Site) -> None:
    job = await site.failed_job(1)
    r = await site.client.get(f"/ui/jobs/{job.id}")
    assert "exit code 65: line 3 has no date" in r.text
    assert f"filedock retry {job.id}" in r.text
    assert "line 3:\tno date" in r.text  # the log tail, tabs kept
    assert "error.json" in r.text and "&#34;message&#34;: &#34;no&#34;" in r.text
    assert (await site.client.get("/ui/jobs/20990101T000000000Z-00000000")).status_code == 404
    assert (await site.client.get("/ui/jobs/..%2F..%2Fetc")).status_code == 404


async def test_documents_are_read_only_from_the_folders_the_ledger_may_name(
    site: Site, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "error.json").write_text('{"password": "hunter2"}')
    outside = await site.failed_job(1, failed_path=str(secret))
    r = await site.client.get(f"/ui/jobs/{outside.id}")
    assert "hunter2" not in r.text and "not inside" in r.text
    linked = await site.failed_job(2)
    error_json = Path(linked.failed_path or "") / "error.json"
    error_json.unlink()
    os.symlink(secret / "error.json", error_json)
    r = await site.client.get(f"/ui/jobs/{linked.id}")
    assert "hunter2" not in r.text and "cannot be read" in r.text


async def test_hostile_names_are_shown_as_escaped_text(site: Site) -> None:
    job = await site.failed_job(1, name=HOSTILE, error="<b>bold</b>\u202eevil\x1b[31m")
    for path in ("/ui/jobs", f"/ui/jobs/{job.id}", "/ui/failures"):
        text = (await site.client.get(path)).text
        assert "<script>alert" not in text and "<img src=x" not in text and "<b>" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert "\u202e" not in text and "\x1b" not in text and "\ufffd" not in text
        assert '<span class="esc" title="RIGHT-TO-LEFT OVERRIDE">\\u202e</span>' in text
    text = (await site.client.get(f"/ui/jobs/{job.id}")).text
    assert '<span class="esc" title="a byte that is not UTF-8">\\xff</span>' in text
    assert '<span class="esc" title="a newline">\\n</span>' in text
    assert '<span class="esc" title="U+001B, a control character">\\u001b</span>' in text


async def test_the_snapshot_is_gathered_in_the_background_once_asked_for(site: Site) -> None:
    snapshot = site.page.snapshot
    async with anyio.create_task_group() as tg:
        tg.start_soon(snapshot.run)
        await wait_until(lambda: snapshot.running)
        assert snapshot.current is None  # nobody looked: nothing gathered
        first = await snapshot.get()
        assert first is not None and first.ledger.counts == {}
        assert await snapshot.get() is first  # within refresh_s: the same figures
        await site.failed_job(1)
        await wait_until(lambda: snapshot.current is not first, timeout=15)
        assert snapshot.current is not None and snapshot.current.ledger.counts == {"failed": 1}
        tg.cancel_scope.cancel()


async def wait_until(condition: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


def test_names_and_texts_mark_what_they_hide() -> None:
    assert str(name_html(b"ok.csv")) == '<bdi class="name">ok.csv</bdi>'
    assert str(text_html("a\\nb")) == "a\\nb"  # a real backslash stays plain text
    assert (
        str(text_html("a\u200bb")) == 'a<span class="esc" title="ZERO WIDTH SPACE">\\u200b</span>b'
    )
    assert str(text_html("x\ny", multiline=True)) == "x\ny"
    assert str(text_html(b"\xf0\x9f\x98\x80 \x00")).startswith("\U0001f600 <span")


# -- actions --------------------------------------------------------------------------


async def test_read_only_without_a_token_file(read_only: Site) -> None:
    job = await read_only.failed_job(1)
    r = await read_only.client.get(f"/ui/jobs/{job.id}")
    assert "read-only" in r.text and "/ui/login" not in r.text and 'id="retry"' not in r.text
    refused = await read_only.client.post(
        f"/ui/jobs/{job.id}/retry", data={"csrf": "x"}, headers=ORIGIN
    )
    assert refused.status_code == 403
    login = await read_only.client.post("/ui/login", data={"token": TOKEN}, headers=ORIGIN)
    assert login.status_code == 403
    assert (await read_only.ledger.get(job.id)).state == "failed"  # type: ignore[union-attr]


async def test_signing_in_needs_the_form_of_this_page_and_a_valid_token(site: Site) -> None:
    form = await site.client.get("/ui/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)[1]  # type: ignore[index]
    good = {"nonce": nonce, "token": TOKEN}
    foreign = await site.client.post(
        "/ui/login", data=good, headers={"origin": "http://evil.example"}
    )
    assert foreign.status_code == 403 and "filedock_session" not in foreign.headers.get(
        "set-cookie", ""
    )
    wrong = await site.client.post("/ui/login", data={**good, "token": TOKEN + "x"}, headers=ORIGIN)
    assert wrong.status_code == 403 and "not a valid token" in wrong.text
    stale = await site.client.post("/ui/login", data={**good, "nonce": "other"}, headers=ORIGIN)
    assert stale.status_code == 403
    away = await site.client.post(
        "/ui/login", data={**good, "next": "//evil.example/x"}, headers=ORIGIN
    )
    assert away.status_code == 303 and away.headers["location"] == "/"
    cookie = away.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie


async def test_retry_needs_a_session_its_csrf_token_and_this_origin(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    job = await site.failed_job(1)
    url = f"/ui/jobs/{job.id}/retry"
    assert (await site.client.post(url, data={"csrf": "x"}, headers=ORIGIN)).status_code == 403
    csrf = await site.sign_in()
    page = await site.client.get(f"/ui/jobs/{job.id}")
    assert 'id="retry"' in page.text and "alice" in page.text
    for data, headers in [
        ({"csrf": csrf}, {"origin": "http://evil.example"}),
        ({"csrf": csrf}, {}),
        ({"csrf": csrf[:-1] + "0"}, ORIGIN),
        ({}, ORIGIN),
    ]:
        assert (await site.client.post(url, data=data, headers=headers)).status_code == 403
    json_body = await site.client.post(url, json={"csrf": csrf}, headers=ORIGIN)
    assert json_body.status_code == 403
    assert (await site.ledger.get(job.id)).state == "failed"  # type: ignore[union-attr]

    with caplog.at_level(logging.INFO, "filedock.ui"):
        done = await site.client.post(url, data={"csrf": csrf}, headers=ORIGIN)
    assert done.status_code == 303 and done.headers["location"].endswith("?notice=queued")
    row = await site.ledger.get(job.id)
    assert row is not None and row.state == "waiting" and row.history[-1]["event"] == "manual_retry"
    assert (site.settings.folder("proc") / job.id / "payload").exists()
    logged = [r for r in caplog.records if r.getMessage() == "ui action"]
    assert [(r.who, r.action, r.job_id) for r in logged] == [("alice", "retry", job.id)]  # type: ignore[attr-defined]
    again = await site.client.post(url, data={"csrf": csrf}, headers=ORIGIN)
    assert again.status_code == 409 and "only failed jobs can be retried" in again.text


async def test_a_sink_of_a_failed_delivery_can_be_retried_alone(site: Site) -> None:
    from service.ledger import DeliveryRecord

    job = await site.failed_job(1, error_class="delivery_failed", outcome="set_aside")
    now = time.time()
    await site.ledger.save_deliveries(
        [
            DeliveryRecord(job.id, "lake", "main", "delivered", 1, created_at=now, updated_at=now),
            DeliveryRecord(
                job.id,
                "erp",
                "main",
                "failed",
                5,
                error_class="sink_rejected",
                error="403",
                created_at=now,
                updated_at=now,
            ),
        ]
    )
    csrf = await site.sign_in()
    page = await site.client.get(f"/ui/jobs/{job.id}")
    assert "Retry sink erp" in page.text and "Retry sink lake" not in page.text
    r = await site.client.post(
        f"/ui/jobs/{job.id}/retry", data={"csrf": csrf, "sink": "erp"}, headers=ORIGIN
    )
    assert r.status_code == 303
    states = {d.sink: d.state for d in await site.ledger.deliveries(job.id)}
    assert states == {"erp": "pending", "lake": "delivered"}


async def test_signing_out_ends_the_session(site: Site) -> None:
    csrf = await site.sign_in()
    r = await site.client.post("/ui/logout", data={"csrf": csrf}, headers=ORIGIN)
    assert r.status_code == 303
    assert 'href="/ui/login' in (await site.client.get("/")).text
