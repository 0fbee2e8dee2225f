"""Notifications through the real service: events written to the outbox with the state
change that causes them, sent by the dispatcher to a real webhook receiver (which
verifies every signature with the `standardwebhooks` library) and to the machine's
NATS JetStream, retried, given up on, and neither lost nor invented across a SIGKILL
before or after a send."""

from __future__ import annotations

import base64
import json
import signal
from typing import Any

import anyio
from conftest import (
    HOOK_SECRET,
    FiledockTree,
    command_route,
    configure_webhook,
    free_port,
    wait_for,
)
from nats_streams import NATS_URL, stream_on
from smtp_box import smtp_server
from webhook_receiver import WebhookReceiver


def events(tree: FiledockTree, env: dict[str, str]) -> list[dict[str, Any]]:
    result = tree.cli("events", "--json", "--limit", "1000", env=env)
    assert result.returncode in (0, 1), result.stderr
    return list(json.loads(result.stdout)) if result.returncode == 0 else []


def test_each_outcome_becomes_one_signed_cloudevent(
    tree: FiledockTree, hooks: WebhookReceiver
) -> None:
    env = configure_webhook(tree, hooks)
    tree.drop("eu/good.csv", b"fine\n")
    tree.drop("bad.csv", b"EXIT 65\n")
    tree.drop(b"caf\xe9.csv", b"fine too\n")  # not UTF-8
    assert tree.run_once(env=env).returncode == 1  # bad.csv failed

    assert hooks.rejected == []  # every signature verified
    by_subject = {d.doc["subject"]: d.doc for d in hooks.accepted}
    assert sorted(by_subject) == ["main/bad.csv", "main/caf\\xe9.csv", "main/eu/good.csv"]
    done, failed = by_subject["main/eu/good.csv"], by_subject["main/bad.csv"]
    rows = {r["name"]: r for r in tree.jobs()}
    assert done["specversion"] == "1.0" and done["type"] == "filedock.job.done"
    assert done["id"] == f"{rows['good.csv']['id']}.done"
    assert done["data"]["archive_path"] == rows["good.csv"]["archive_path"]
    assert done["data"]["sha256"] == rows["good.csv"]["sha256"]
    assert failed["type"] == "filedock.job.failed"
    assert (failed["data"]["error_class"], failed["data"]["outcome"]) == ("rejected", "rejected")
    assert failed["data"]["how_to_retry"] == f"filedock retry {rows['bad.csv']['id']}"
    odd = by_subject["main/caf\\xe9.csv"]["data"]
    assert base64.b64decode(odd["name_b64"]) == b"caf\xe9.csv"
    assert {d.headers["webhook-id"] for d in hooks.accepted} == {
        d.doc["id"] for d in hooks.accepted
    }
    outbox = events(tree, env)
    assert sorted(e["state"] for e in outbox) == ["sent"] * 3


def test_a_channel_that_stays_down_is_retried_then_given_up_on_with_the_reason(
    tree: FiledockTree, hooks: WebhookReceiver
) -> None:
    down = f"http://127.0.0.1:{free_port()}/events"  # nothing listens there
    env = configure_webhook(tree, hooks, url=down, max_attempts=3)
    tree.drop("a.csv", b"fine\n")
    assert tree.run_once(env=env).returncode == 0  # the job is done all the same
    (event,) = events(tree, env)
    assert (event["state"], event["attempts"]) == ("failed", 3)
    assert "127.0.0.1" in event["error"]
    listed = tree.cli("events", env=env).stdout
    assert "failed" in listed and "3 attempt(s)" in listed
    assert tree.cli("events", "--pending", env=env).returncode == 1  # none pending


def test_an_event_survives_a_crash_before_its_send_and_keeps_its_id(
    tree: FiledockTree, hooks: WebhookReceiver
) -> None:
    env = configure_webhook(tree, hooks)
    tree.drop("a.csv", b"fine\n")
    crashed = tree.run_once(env={**env, "FILEDOCK_TEST_CRASH_AT": "after_ledger_done:1"})
    assert crashed.returncode == -signal.SIGKILL
    assert hooks.accepted == []
    (pending,) = events(tree, env)
    assert pending["state"] == "pending"
    assert tree.run_once(env=env).returncode == 0
    assert [d.doc["id"] for d in hooks.accepted] == [pending["id"]]
    assert [e["state"] for e in events(tree, env)] == ["sent"]


def test_a_crash_after_the_send_sends_again_with_the_same_id(
    tree: FiledockTree, hooks: WebhookReceiver
) -> None:
    env = configure_webhook(tree, hooks)
    tree.drop("a.csv", b"fine\n")
    crashed = tree.run_once(env={**env, "FILEDOCK_TEST_CRASH_AT": "after_event_sent:1"})
    assert crashed.returncode == -signal.SIGKILL
    (first,) = hooks.accepted
    assert tree.run_once(env=env).returncode == 0
    assert [d.doc["id"] for d in hooks.accepted] == [first.doc["id"]] * 2  # at least once
    assert [e["state"] for e in events(tree, env)] == ["sent"]


def test_a_missing_secret_stops_the_start_naming_the_channel(
    tree: FiledockTree, hooks: WebhookReceiver
) -> None:
    configure_webhook(tree, hooks)
    result = tree.run_once(env={k: v for k, v in tree.env().items() if k != "HOOK_SECRET"})
    assert result.returncode == 2
    assert "notify.downstream" in result.stderr and "HOOK_SECRET" in result.stderr
    checked = tree.cli("check-config")
    assert checked.returncode == 0 and "HOOK_SECRET" in checked.stdout
    assert HOOK_SECRET not in checked.stdout


async def test_nats_holds_each_event_once_though_a_crash_sent_it_twice(
    tree: FiledockTree, hooks: WebhookReceiver
) -> None:
    async with stream_on(NATS_URL) as stream:
        bus = {
            "name": "bus",
            "kind": "nats",
            "servers": [NATS_URL],
            "subject": f"{stream.prefix}.{{route}}.{{type}}",
            "stream": stream.name,
        }
        tree.configure(routes=[command_route(max_attempts=1)], notify=[bus])
        tree.drop("a.csv", b"fine\n")
        tree.drop("b.csv", b"EXIT 65\n")
        env = tree.env(FILEDOCK_TEST_CRASH_AT="after_event_sent:1")
        crashed = await anyio.to_thread.run_sync(lambda: tree.run_once(env=env))
        assert crashed.returncode == -signal.SIGKILL
        assert await stream.messages() == 2  # sent, not yet marked
        again = await anyio.to_thread.run_sync(tree.run_once)
        assert again.returncode == 0  # the jobs ended in the first run
        sent = [e for e in events(tree, tree.env()) if e["state"] == "sent"]
        assert len(sent) == 2  # both sent again after the restart, with the same ids ...
        assert await stream.messages() == 2  # ... which the stream dropped as duplicates
        sub = await stream.js.pull_subscribe(f"{stream.prefix}.>", stream=stream.name)
        got = {json.loads(m.data)["type"] for m in await sub.fetch(2, timeout=5)}
        assert got == {"filedock.job.done", "filedock.job.failed"}


def test_a_burst_of_failures_makes_a_few_digest_emails(tree: FiledockTree) -> None:
    with smtp_server() as smtp:
        ops = {
            "name": "ops",
            "kind": "email",
            "on": {"types": ["filedock.job.failed"]},
            "host": "127.0.0.1",
            "port": smtp.port,
            "tls": "none",
            "from": "filedock@example.org",
            "to": ["ops@example.org"],
            "digest_s": 1,
        }
        route = {
            "name": "main",
            "match": "**",
            "importer": {"kind": "python", "callable": "stages:reject"},
        }
        tree.configure(routes=[route], notify=[ops], batch_max_files=64)
        service = tree.start()
        for n in range(1000):
            tree.drop(f"bad-{n:04d}.csv", b"x\n")
        tree.wait_final(1000, timeout=120)
        wait_for(
            lambda: sum(int(m.message["X-Filedock-Events"]) for m in smtp.mailbox.received) == 1000,
            timeout=60,
            what="every failure in a digest",
        )
        service.stop()
    messages = smtp.mailbox.received
    assert 1 <= len(messages) <= 10  # a handful, not 1,000
    assert all("failed on route main" in str(m.message["Subject"]) for m in messages)
