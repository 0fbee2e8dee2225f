"""A test importer whose behaviour is written in the file it imports.

Usage: fake_importer.py OUT_DIR -- PATH

The first line of the file may hold directives, e.g. `EXIT 65`, `SLEEP 2`,
`SLEEP_FIRST 2` (sleep on attempt 1 only),
`FAIL_FIRST 2` (exit 75 on attempts 1-2), `HANG` (ignore SIGTERM and never
return), `CRASH` (die by SIGSEGV), `REJECT_UNLESS <path>` (exit 65 unless that
path exists). Every run appends a JSON line to $FILEDOCK_TEST_RECORD: job id,
attempt, argv, start and end times, pid: the tests read what really ran.
"""

import json
import os
import signal
import sys
import time


def record(**fields: object) -> None:
    path = os.environ.get("FILEDOCK_TEST_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")
            f.flush()


def main() -> int:
    out_dir, path = sys.argv[1], sys.argv[3]
    started = time.time()
    with open(path, "rb") as f:
        data = f.read()
    words = data.split(b"\n", 1)[0].decode("utf-8", "replace").split()
    job_id = os.environ.get("FILEDOCK_JOB_ID", "")
    attempt = int(os.environ.get("FILEDOCK_ATTEMPT", "0"))
    base = {
        "job_id": job_id,
        "attempt": attempt,
        "argv": [os.fsencode(a).hex() for a in sys.argv],
        "pid": os.getpid(),
        "started": started,
        "size": len(data),
    }
    record(event="start", **base)
    code = 0
    if words[:1] == ["SLEEP"] or (words[:1] == ["SLEEP_FIRST"] and attempt == 1):
        time.sleep(float(words[1]))
    elif words[:1] == ["HANG"]:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    elif words[:1] == ["CRASH"]:
        os.kill(os.getpid(), signal.SIGSEGV)
    elif words[:1] == ["EXIT"]:
        code = int(words[1])
    elif words[:1] == ["FAIL_FIRST"] and attempt <= int(words[1]):
        print("not yet: try again later", file=sys.stderr)
        code = 75
    elif words[:1] == ["REJECT_UNLESS"] and not os.path.exists(words[1]):
        print("rejected: the flag file is missing", file=sys.stderr)
        code = 65
    with open(os.path.join(out_dir, "result.txt"), "w") as f:
        f.write(f"{len(data)} bytes\n")
    print(f"imported {len(data)} bytes")
    record(event="end", code=code, ended=time.time(), **base)
    return code


if __name__ == "__main__":
    sys.exit(main())
