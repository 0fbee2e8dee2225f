"""The demo route's importer: a small program, as an upstream team would write one.

Usage: demo_importer.py OUT_DIR -- PATH

It counts the lines and bytes of the file, writes a summary into OUT_DIR (kept
in the archive beside the source) and prints it. It shows the exit-code
contract: a name containing "reject" exits 65 (rejected, set aside at once),
"flaky" exits 75 (retry later) on its first attempt.
"""

import json
import os
import sys


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[2] != "--":
        print("usage: demo_importer.py OUT_DIR -- PATH", file=sys.stderr)
        return 64
    out_dir, path = sys.argv[1], sys.argv[3]
    name = os.path.basename(path)
    if "reject" in name:
        print(f"{name}: this file can never be imported (demo rejection)", file=sys.stderr)
        return 65
    if "flaky" in name and os.environ.get("FILEDOCK_ATTEMPT") == "1":
        print(f"{name}: the database is busy, try again later (demo)", file=sys.stderr)
        return 75
    with open(path, "rb") as f:
        data = f.read()
    summary = {"name": name, "bytes": len(data), "lines": data.count(b"\n")}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    print(f"imported {name}: {summary['lines']} lines, {summary['bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
