"""The floor under filedock's S3 sink: the same library (aiobotocore) uploading the same
files to the same store, and nothing else.

    AWS_ACCESS_KEY_ID=K AWS_SECRET_ACCESS_KEY=S python bench/s3_floor.py --endpoint URL SRC BUCKET

Every file below SRC becomes the object of its relative path: one `put_object` a file
(the file itself as the body), `--concurrency` at once on one client, path style, no
retries, botocore's defaults otherwise. No HEAD, no conditional write, no checksum of
ours, no claim, no ledger, no archive: what the library itself costs a file.
bench_delivery.py runs it as the contender `aiobotocore[-t<N>]`, timed from its start
to its exit like rclone.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session


async def upload(args: argparse.Namespace) -> None:
    files = sorted(p for p in args.src.rglob("*") if p.is_file())
    config = AioConfig(
        region_name="us-east-1",
        s3={"addressing_style": "path"},
        max_pool_connections=args.concurrency,
        retries={"mode": "standard", "total_max_attempts": 1},
    )
    async with get_session().create_client(
        "s3",
        endpoint_url=args.endpoint,
        config=config,
    ) as client:
        queue = iter(files)  # shared by the workers: next() never awaits

        async def worker() -> None:
            for path in queue:
                with open(path, "rb") as body:
                    key = path.relative_to(args.src).as_posix()
                    await client.put_object(Bucket=args.bucket, Key=key, Body=body)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True, help="the store's URL")
    ap.add_argument("--concurrency", type=int, default=4, help="PUTs at once (default 4)")
    ap.add_argument("src", type=Path)
    ap.add_argument("bucket")
    asyncio.run(upload(ap.parse_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
