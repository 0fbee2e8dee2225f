"""A `python` importer for tests: records each import's start and end, optionally slowly.

Configure as `{kind: python, callable: "recording_importer:record", options: {sleep_s: 0.2}}`;
each run appends a JSON line to $FILEDOCK_TEST_RECORD.
"""

import hashlib
import json
import os
import time

import anyio

from service.importers import ImportJob


async def record(job: ImportJob, sleep_s: float = 0.0) -> dict[str, object]:
    started = time.time()
    data = job.path.read_bytes()
    await anyio.sleep(sleep_s)
    line = {
        "event": "import",
        "job_id": job.id,
        "rel": job.relative_path.decode("utf-8", "replace"),
        "route": job.route,
        "replica": os.environ.get("FILEDOCK_REPLICA_ID"),
        "pid": os.getpid(),
        "attempt": job.attempt,
        "started": started,
        "ended": time.time(),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),  # what the importer was given
    }
    with open(os.environ["FILEDOCK_TEST_RECORD"], "a") as f:
        f.write(json.dumps(line) + "\n")
    return {"bytes": len(data)}
