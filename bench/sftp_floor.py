"""The floor under filedock's SFTP sink: the same library (asyncssh) uploading the same
files to the same server, and nothing else.

    python bench/sftp_floor.py --port P --user U --key KEY --known-hosts KH SRC FOLDER

Every file below SRC goes to FOLDER (relative to the login folder) as rclone sends it:
`SFTPClient.put` to `.NAME.partial` beside its final name, then a rename; `--sessions`
SFTP sessions at once on one connection, the ciphers the sink offers. No ledger, no
claim, no check, no fsync, no archive: what the library itself costs a file.
bench_sftp.py runs it as the contender `asyncssh[-t<N>]`, timed from its start to its
exit like rclone.
"""

from __future__ import annotations

import argparse
import asyncio
import posixpath
import sys
import warnings
from pathlib import Path

from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    import asyncssh

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.delivery.sftp_connection import CIPHERS  # noqa: E402


async def upload(args: argparse.Namespace) -> None:
    files = sorted(p for p in args.src.rglob("*") if p.is_file())
    async with asyncssh.connect(
        "127.0.0.1",
        args.port,
        username=args.user,
        client_keys=[str(args.key)],
        known_hosts=str(args.known_hosts),
        config=None,
        agent_path=None,
        encryption_algs=list(CIPHERS),
    ) as conn:
        folders = sorted({posixpath.dirname(p.relative_to(args.src).as_posix()) for p in files})
        async with conn.start_sftp_client() as sftp:
            for folder in folders:
                await sftp.makedirs(posixpath.join(args.folder, folder), exist_ok=True)
        queue = iter(files)  # shared by the sessions: next() never awaits

        async def session() -> None:
            async with conn.start_sftp_client() as sftp:
                for path in queue:
                    final = posixpath.join(args.folder, path.relative_to(args.src).as_posix())
                    folder, name = posixpath.split(final)
                    temp = posixpath.join(folder, f".{name}.partial")
                    await sftp.put(str(path), temp)
                    await sftp.rename(temp, final)

        await asyncio.gather(*(session() for _ in range(args.sessions)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--key", type=Path, required=True, help="the client's private key")
    ap.add_argument("--known-hosts", type=Path, required=True)
    ap.add_argument("--sessions", type=int, default=4, help="at once (default 4)")
    ap.add_argument("src", type=Path)
    ap.add_argument("folder")
    asyncio.run(upload(ap.parse_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
