"""Delivery to real S3-compatible stores (SeaweedFS, rclone's S3 server) through the
service: a route that receives, delivers and archives, killed before, during (a
multipart upload half sent) and after an upload, then started again. Each object is
there once, with our bytes; no multipart upload is left behind; the receipt says
what the store said."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import FiledockTree
from s3servers import S3Server

MiB = 1 << 20


def configure(
    tree: FiledockTree, s3_server: S3Server, bucket: str, **options: Any
) -> dict[str, str]:
    """A hub route to `bucket`; the credentials in the environment, as a pod gets them."""
    sink = {
        "name": "lake",
        "kind": "s3",
        "bucket": bucket,
        "key": "{route}/{relative_path}",
        "endpoint_url": s3_server.endpoint_url,
        "path_style": True,
        "access_key_id": {"env": "LAKE_KEY_ID"},
        "secret_access_key": {"env": "LAKE_SECRET"},
        "multipart_threshold_bytes": 5 * MiB,
        "part_size_bytes": 5 * MiB,
        **options,
    }
    tree.configure(routes=[{"name": "hub", "match": "**", "importer": "none", "deliver": [sink]}])
    return {"LAKE_KEY_ID": s3_server.access_key, "LAKE_SECRET": s3_server.secret}


def show(tree: FiledockTree, env: dict[str, str]) -> dict[str, Any]:
    (row,) = tree.rows()
    shown = tree.cli("show", row["id"], "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout))


@pytest.mark.parametrize(
    ("point", "size", "found"),
    [
        ("before_delivery", 1000, False),
        ("mid_delivery", 12 * MiB, False),  # killed after the first of three parts
        ("after_delivery", 12 * MiB, True),
    ],
)
def test_an_upload_killed_at_any_point_ends_as_one_object_with_a_receipt(
    tree: FiledockTree, s3_server: S3Server, point: str, size: int, found: bool
) -> None:
    bucket = s3_server.make_bucket()
    secrets = configure(tree, s3_server, bucket)
    body = hashlib.sha256(point.encode()).digest() * (size // 32) + b"!" * (size % 32)
    tree.drop("eu/orders.bin", body)
    crashed = tree.run_once(env=tree.env(FILEDOCK_TEST_CRASH_AT=f"{point}:1", **secrets))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert tree.rows()[0]["state"] == "delivering"
    again = tree.run_once(env=tree.env(**secrets))
    assert again.returncode == 0, again.stderr[-2000:]

    job = show(tree, tree.env(**secrets))
    assert job["state"] == "done"
    assert s3_server.keys(bucket) == ["hub/eu/orders.bin"]
    assert s3_server.get(bucket, "hub/eu/orders.bin") == body
    assert s3_server.uploads(bucket, "hub/eu/orders.bin") == []  # nothing half-sent is left
    (sink,) = job["deliveries"]
    assert (sink["state"], sink["attempts"]) == ("delivered", 2)
    (receipt,) = sink["receipts"]
    assert receipt["location"] == f"s3://{bucket}/hub/eu/orders.bin"
    assert receipt["found"] is found
    assert (receipt["bytes"], receipt["sha256"]) == (size, hashlib.sha256(body).hexdigest())
    assert receipt["remote"]["etag"]
    manifest = json.loads((Path(job["archive_path"]) / "manifest.json").read_text())
    assert manifest["deliveries"] == job["deliveries"]


def test_a_lost_answer_without_head_first_is_found_by_the_refused_put(
    tree: FiledockTree, s3_server: S3Server
) -> None:
    """`head_first: false`, killed after the PUT and before its ledger write. On restart
    the conditional PUT is refused (SeaweedFS) and a HEAD finds our bytes: `found`.
    rclone's store takes the PUT again (it ignores If-None-Match): the same bytes."""
    bucket = s3_server.make_bucket()
    secrets = configure(tree, s3_server, bucket, head_first=False)
    tree.drop("eu/small.csv", b"id,qty\n1,2\n")
    crashed = tree.run_once(env=tree.env(FILEDOCK_TEST_CRASH_AT="after_delivery:1", **secrets))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    again = tree.run_once(env=tree.env(**secrets))
    assert again.returncode == 0, again.stderr[-2000:]

    job = show(tree, tree.env(**secrets))
    assert job["state"] == "done"
    assert s3_server.keys(bucket) == ["hub/eu/small.csv"]
    assert s3_server.get(bucket, "hub/eu/small.csv") == b"id,qty\n1,2\n"
    (sink,) = job["deliveries"]
    assert (sink["state"], sink["attempts"]) == ("delivered", 2)
    (receipt,) = sink["receipts"]
    assert receipt["found"] is (s3_server.name == "seaweedfs")


def test_a_wrong_secret_stops_the_delivery_for_good_without_printing_it(
    tree: FiledockTree, s3_server: S3Server
) -> None:
    bucket = s3_server.make_bucket()
    secrets = configure(tree, s3_server, bucket) | {"LAKE_SECRET": "not-the-secret-4711"}
    tree.drop("a.csv", b"id\n")
    result = tree.run_once(env=tree.env(**secrets))
    assert result.returncode == 1, result.stderr[-2000:]
    job = show(tree, tree.env(**secrets))
    assert (job["state"], job["error_class"]) == ("failed", "delivery_failed")
    (sink,) = job["deliveries"]
    assert (sink["state"], sink["error_class"], sink["attempts"]) == ("failed", "sink_denied", 1)
    error = (tree.folder("failed") / job["id"] / "error.json").read_text()
    everything = error + result.stdout + result.stderr + json.dumps(job)
    assert "not-the-secret-4711" not in everything
    assert s3_server.keys(bucket) == []


def test_a_missing_credential_stops_the_start_naming_the_sink(
    tree: FiledockTree, s3_server: S3Server
) -> None:
    configure(tree, s3_server, s3_server.make_bucket())
    result = tree.run_once(env=tree.env())  # neither variable set
    assert result.returncode == 2
    assert "routes.hub.deliver.lake" in result.stderr and "LAKE_KEY_ID" in result.stderr
    checked = tree.cli("check-config")
    assert checked.returncode == 0 and "LAKE_KEY_ID" in checked.stdout  # names, not values
