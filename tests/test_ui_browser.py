"""The operator page in a real browser: Debian's Chromium driven by Playwright, against a
real `filedock run` on a tmp_path tree. Files are dropped, and what an operator on call
does is done by clicking: see them on the overview, open a failed job and read why,
sign in with a token and retry it, watch it end done. A hostile name stays text, and
no dialog opens; the page runs under its Content-Security-Policy without a violation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from browser import CHROMIUM, launch
from conftest import FiledockTree, skip_or_fail

TOKEN = "alice-0123456789abcdef0123456789"
HOSTILE = "<img src=x onerror=alert(1)>.csv"
WAIT_MS = 30_000

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (Debian's: Playwright downloads none here)."""
    if not os.access(CHROMIUM, os.X_OK):
        skip_or_fail(f"{CHROMIUM} is not installed (.ci/run installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed (a test extra: pip install -e '.[test]')")
        raise
    with sync_playwright() as p:
        chromium = launch(p)
        yield chromium
        chromium.close()


class Watched:
    """A browser page, and what it said that it should not have: dialogs, script errors,
    console errors (a CSP violation is one)."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context()
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        # A page answered 403 on purpose is reported as a resource that failed to load.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def clean(self) -> None:
        assert self.dialogs == [], f"a dialog opened: {self.dialogs}"
        assert self.errors == [], f"the browser reported: {self.errors}"

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser: Any) -> Iterator[Watched]:
    w = Watched(browser)
    yield w
    w.close()


def base_url(tree: FiledockTree) -> str:
    return f"http://127.0.0.1:{tree.settings['http']['port']}"


def test_the_overview_shows_dropped_files_and_a_hostile_name_stays_text(
    tree: FiledockTree, watched: Watched
) -> None:
    from playwright.sync_api import expect

    tree.configure(ui={"refresh_s": 1})  # no token file: read-only
    service = tree.start()
    base, page = base_url(tree), watched.page
    page.goto(base + "/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()

    for name in ("orders_1.csv", "orders_2.csv", HOSTILE):
        tree.drop(name, b"fine\n")
    tree.drop("broken.csv", b"EXIT 65\n")
    tree.wait_final(4)
    # The overview refreshes itself: no reload.
    done = page.locator("a.tile", has_text="done").locator(".n")
    expect(done).to_have_text("3")
    expect(page.locator("a.tile", has_text="failed").locator(".n")).to_have_text("1")

    page.goto(base + "/ui/jobs")
    expect(page.get_by_text(HOSTILE, exact=True)).to_be_visible()
    assert page.locator("main img").count() == 0
    page.get_by_placeholder("part of a name").fill("ORDERS_2")  # filters as one types
    expect(page.locator("#results tbody tr")).to_have_count(1)
    expect(page.locator("#results")).to_contain_text("orders_2.csv")
    expect(page).to_have_url(re.compile(r"q=ORDERS_2"))
    page.get_by_placeholder("part of a name").fill("")
    expect(page.locator("#results tbody tr")).to_have_count(4)
    page.locator("tr", has_text=HOSTILE).locator("a.id").click()
    expect(page.locator("h1")).to_have_text(HOSTILE)
    assert page.locator("main img").count() == 0

    # Read-only: nothing to sign in with, no button, and a POST is refused.
    failed = tree.jobs("--state", "failed")[0]["id"]
    page.goto(f"{base}/ui/jobs/{failed}")
    expect(page.locator("#reason")).to_contain_text("rejected")
    assert page.locator("#retry").count() == 0 and page.get_by_text("sign in").count() == 0
    refused = page.request.post(
        f"{base}/ui/jobs/{failed}/retry", form={"csrf": "x"}, headers={"Origin": base}
    )
    assert refused.status == 403
    watched.clean()
    service.stop()


def test_an_operator_reads_why_a_job_failed_and_retries_it_with_a_token(
    tree: FiledockTree, watched: Watched
) -> None:
    from playwright.sync_api import expect

    tokens = tree.base / "ui-tokens"
    tokens.write_text(f"# who may act\nalice:{TOKEN}\n")
    tree.configure(ui={"token_file": str(tokens), "refresh_s": 1})
    service = tree.start()
    flag = tree.base / "fixed"
    tree.drop("bad.csv", f"REJECT_UNLESS {flag}\n".encode())
    tree.wait_final(1)
    base, page = base_url(tree), watched.page

    page.goto(base + "/ui/failures")
    expect(page.locator("main h2", has_text="rejected")).to_be_visible()
    page.locator("main a.id").first.click()
    expect(page.locator("#reason")).to_contain_text("rejected: exit code 65")
    expect(page.locator("main")).to_contain_text("the flag file is missing")  # the log tail
    job_url = page.url
    job_id = job_url.rsplit("/", 1)[1]

    # Signed out: no button, and the action itself is refused.
    assert page.locator("#retry").count() == 0
    refused = page.request.post(
        f"{job_url}/retry", form={"csrf": "guess"}, headers={"Origin": base}
    )
    assert refused.status == 403
    page.locator("main").get_by_role("link", name="Sign in").click()
    page.locator("#token").fill(TOKEN + "-not")
    page.locator("#sign-in").click()
    expect(page.get_by_role("alert")).to_contain_text("not a valid token")
    page.locator("#token").fill(TOKEN)
    page.locator("#sign-in").click()
    expect(page).to_have_url(job_url)
    expect(page.locator("header.top")).to_contain_text("alice")

    flag.write_text("")  # the operator fixed the cause
    page.locator("#retry").click()
    expect(page.get_by_role("status")).to_contain_text("Queued for a new attempt")
    expect(page.locator("#job-state")).to_have_text("done")  # the page follows it live
    assert tree.jobs()[0]["state"] == "done"
    actions = [line for line in service.log_lines() if line["msg"] == "ui action"]
    assert [(a["who"], a["action"], a["job_id"]) for a in actions] == [("alice", "retry", job_id)]
    watched.clean()
    service.stop()
