"""A command importer that, on its first attempt, hangs ignoring SIGTERM and leaves a
grandchild that ignores it too; later attempts succeed.

Usage: hang_importer.py OUT_DIR -- PATH. Records each run to $FILEDOCK_TEST_RECORD.
"""

import json
import os
import signal
import subprocess
import sys
import time


def record(**fields: object) -> None:
    with open(os.environ["FILEDOCK_TEST_RECORD"], "a") as f:
        f.write(json.dumps(fields) + "\n")


def main() -> int:
    attempt = int(os.environ.get("FILEDOCK_ATTEMPT", "0"))
    job_id = os.environ.get("FILEDOCK_JOB_ID", "")
    if attempt > 1:
        record(event="start", job_id=job_id, attempt=attempt, pid=os.getpid(), started=time.time())
        return 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(3600)",
        ]
    )
    record(
        event="start",
        job_id=job_id,
        attempt=attempt,
        pid=os.getpid(),
        child=child.pid,
        started=time.time(),
    )
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
