"""The csv-sql importer through the real service: partial jobs, the pending file fixed and
dropped again, row metrics, and no duplicate rows after a crash mid-import."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from conftest import FiledockTree, wait_for


def csv_route(db: str) -> dict[str, Any]:
    return {
        "name": "orders",
        "match": "*.csv",
        "importer": {
            "kind": "csv-sql",
            "database_url": f"sqlite:///{db}",
            "table": "orders",
            "mode": "create",
            "key": ["order_no"],
            "columns": {
                "order_no": {"type": "int", "required": True},
                "customer": {"type": "str", "required": True, "max_length": 10},
                "amount": {"type": "decimal"},
            },
        },
        "max_attempts": 2,
        "backoff_s": 0,
        "max_backoff_s": 0,
    }


def _table(db: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute("SELECT order_no, customer, amount FROM orders ORDER BY 1"))


def test_partial_import_then_the_fixed_pending_file(tree: FiledockTree) -> None:
    db = str(tree.base / "shop.sqlite3")
    tree.configure([csv_route(db)])
    tree.drop(
        "orders.csv",
        b"order_no,customer,amount\n1,ada,10.50\n2,a-name-far-too-long,3\nx,bob,1\n4,cy,7\n",
    )
    service = tree.start()
    tree.wait_final(1)
    job = tree.jobs()[0]
    assert (job["state"], job["outcome"]) == ("done", "partial")
    assert _table(db) == [(1, "ada", "10.50"), (4, "cy", "7")]

    archive = tree.archived()[job["id"]]
    manifest = json.loads((archive / "manifest.json").read_text())
    assert manifest["outcome"] == "partial"
    assert manifest["importer"]["rows_imported"] == 2
    assert manifest["importer"]["rows_failed"] == 2
    finished = [f["name"] for f in manifest["files"] if f["name"].endswith(".finished.csv")]
    assert finished and (archive / finished[0]).read_text().count("\n") == 3  # header + 2

    failed = tree.failed()[job["id"]]
    pending = failed / "orders.pending.csv"
    error = json.loads((failed / "error.json").read_text())
    assert error["outcome"] == "partial" and "filedock retry" in error["how_to_retry"]
    lines = pending.read_text().splitlines()
    assert lines[0].endswith("import_error") and len(lines) == 3
    assert "customer" in lines[1] and "order_no" in lines[2]  # the column and the reason

    metrics = service.get("/metrics")[1].decode()
    assert 'filedock_rows_total{result="imported",route="orders"} 2.0' in metrics
    assert 'filedock_rows_total{result="failed",route="orders"} 2.0' in metrics
    assert 'filedock_jobs_total{outcome="partial",route="orders"} 1.0' in metrics

    # The operator fixes the two rows and drops the pending file again.
    fixed = "\n".join(
        [lines[0], lines[1].replace("a-name-far-too-long", "al"), lines[2].replace("x,", "3,", 1)]
    )
    tree.drop("orders-fixed.csv", fixed.encode() + b"\n")
    wait_for(lambda: len(_table(db)) == 4, what="the fixed rows to land")
    tree.wait_final(2)
    assert _table(db) == [(1, "ada", "10.50"), (2, "al", "3"), (3, "bob", "1"), (4, "cy", "7")]
    assert tree.jobs()[0]["outcome"] == "imported"
    service.stop()


def test_no_valid_row_is_a_failed_job(tree: FiledockTree) -> None:
    db = str(tree.base / "shop.sqlite3")
    tree.configure([csv_route(db)])
    tree.drop("bad.csv", b"order_no,customer\nx,\n")
    assert tree.run_once().returncode == 1
    row = tree.rows()[0]
    assert (row["state"], row["outcome"], row["error_class"]) == ("failed", "rejected", "rejected")


def test_crash_mid_import_leaves_no_duplicate_rows(tree: FiledockTree) -> None:
    db = str(tree.base / "shop.sqlite3")
    tree.configure([csv_route(db)])
    body = b"order_no,customer,amount\n" + b"".join(
        b"%d,c%d,1\n" % (i, i % 1000) for i in range(1, 20001)
    )
    tree.drop("big.csv", body)
    crashed = tree.run_once(env=tree.env(FILEDOCK_TEST_CRASH_AT="after_import:1"))
    assert crashed.returncode == -9  # killed after the import committed, before archiving
    assert len(_table(db)) == 20000
    assert tree.run_once().returncode == 0  # the import runs again: same job id, no new rows
    assert len(_table(db)) == 20000
    row = tree.rows()[0]
    assert row["state"] == "done" and row["attempts"] == 2
