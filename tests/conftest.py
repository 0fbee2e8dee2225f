"""Fixtures shared by the whole suite: tool discovery, the PostgreSQL URL, waiting on conditions.

A test that needs an external tool or server skips locally with the reason, but
under `CI=true` a missing tool is a failure: CI must prove everything.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip with the reason; under CI=true fail instead (a skip there hides a gap)."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The path of an executable, or skip (fail under CI) naming the missing tool."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed (see .ci/run for how CI installs it)")
        raise AssertionError("unreachable")
    return path


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll `condition` until it returns a truthy value; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


@pytest.fixture
def postgres_url() -> str:
    """The URL of the test PostgreSQL server, from FILEDOCK_TEST_POSTGRES_URL."""
    url = os.environ.get("FILEDOCK_TEST_POSTGRES_URL")
    if not url:
        skip_or_fail("FILEDOCK_TEST_POSTGRES_URL is not set (no PostgreSQL server to test with)")
    assert url is not None
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as e:
        skip_or_fail(f"PostgreSQL at {url} is not reachable: {e}")
    return url
