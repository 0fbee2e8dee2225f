"""The S3 sink against real S3-compatible stores: SeaweedFS and rclone's S3 server.

Each store is started once for the module. A test delivers real files through
`S3Delivery` and looks at the store with a plain botocore client: the bytes and our
`sha256` metadata are there, a second delivery finds them, other bytes are refused or
replaced, a crashed attempt's multipart upload is aborted, a file that changed under
us never becomes an object, and the failures a user meets (wrong secret, server down,
missing bucket) come out as the right error class.

Where the two stores differ, the test says which does what (and
`service/delivery/s3.py` how the sink copes with both).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import free_port
from s3servers import S3Server, rclone_s3

from service.delivery.base import Item, Receipt, SinkError
from service.delivery.s3 import S3Delivery
from service.settings.sinks import S3Sink, Secret

MiB = 1 << 20


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    return s3_server.make_bucket()


def settings(s3_server: S3Server, bucket: str, base: Path, **overrides: Any) -> S3Sink:
    """Sink settings for `s3_server`, credentials in files (as a mounted secret)."""
    secret = overrides.pop("secret", s3_server.secret)
    (base / "key-id").write_text(s3_server.access_key + "\n")
    (base / "secret").write_text(secret + "\n")
    values: dict[str, Any] = {
        "kind": "s3",
        "name": "store",
        "bucket": bucket,
        "prefix": "in/",
        "endpoint_url": s3_server.endpoint_url,
        "path_style": True,
        "access_key_id": Secret(file=base / "key-id"),
        "secret_access_key": Secret(file=base / "secret"),
        "multipart_threshold_bytes": 5 * MiB,
        "part_size_bytes": 5 * MiB,
    }
    values.update(overrides)
    return S3Sink(**values)


@asynccontextmanager
async def opened(s: S3Sink) -> AsyncIterator[S3Delivery]:
    sink = S3Delivery(s)
    await sink.open()
    try:
        yield sink
    finally:
        await sink.close()


def item(base: Path, target: str, content: bytes) -> Item:
    path = base / f"src-{hashlib.md5(target.encode('utf-8', 'surrogatepass')).hexdigest()}"
    path.write_bytes(content)
    return Item(
        path=path,
        target=target,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        job_id="job-1",
        sink="store",
    )


async def traced(sink: S3Delivery, it: Item) -> tuple[Receipt, int]:
    """The delivery's receipt and the peak of the memory Python allocated meanwhile."""
    tracemalloc.start()
    try:
        receipt = await sink.deliver(it)
        return receipt, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def b64(content: bytes) -> str:
    return base64.b64encode(hashlib.sha256(content).digest()).decode()


async def test_small_file_is_one_object_with_our_sha256(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    content = os.urandom(100_000)
    it = item(tmp_path, "route/2026/a b+ü.csv", content)
    async with opened(settings(s3_server, bucket, tmp_path)) as sink:
        receipt = await sink.deliver(it)

    key = "in/route/2026/a b+ü.csv"
    assert receipt.location == f"s3://{bucket}/{key}" == sink.location(it)
    assert (receipt.bytes, receipt.sha256, receipt.found) == (len(content), it.sha256, False)
    assert receipt.remote["etag"] == hashlib.md5(content).hexdigest()  # a single PUT's ETag
    assert receipt.remote["multipart"] is False and receipt.remote["parts"] == 1
    # SeaweedFS checks and echoes the SHA-256 in its answer to the PUT; rclone's answer
    # carries none (its ETag, the MD5 of what it received, is the receipt's proof).
    expected = b64(content) if s3_server.name == "seaweedfs" else None
    assert receipt.remote.get("checksum_sha256") == expected
    assert s3_server.keys(bucket) == [key]
    assert s3_server.get(bucket, key) == content
    head = s3_server.head(bucket, key)
    assert head is not None and head["Metadata"] == {"sha256": it.sha256}


async def test_multipart_upload_streams_its_parts_from_the_file(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    content = os.urandom(22 * MiB)  # five parts of 5 MiB, the last one 2 MiB
    it = item(tmp_path, "big.bin", content)
    async with opened(settings(s3_server, bucket, tmp_path)) as sink:
        receipt, peak = await traced(sink, it)

    assert receipt.remote["multipart"] is True and receipt.remote["parts"] == 5
    # The complete answer's ETag is AWS's MD5-of-MD5s with the part count, on both.
    assert receipt.remote["etag"].endswith("-5")
    # Each part is read from the file as it is hashed and sent: no part is ever held.
    assert peak < 5 * MiB, f"peak {peak / MiB:.1f} MiB for a 22 MiB file in 5 MiB parts"
    assert s3_server.get(bucket, "in/big.bin") == content
    head = s3_server.head(bucket, "in/big.bin")
    assert head is not None and head["Metadata"] == {"sha256": it.sha256}
    assert s3_server.uploads(bucket, "in/big.bin") == []


@pytest.mark.parametrize("size", [1000, 6 * MiB], ids=["put", "multipart"])
async def test_second_delivery_finds_the_first(
    s3_server: S3Server, bucket: str, tmp_path: Path, size: int
) -> None:
    it = item(tmp_path, "twice.bin", os.urandom(size))
    async with opened(settings(s3_server, bucket, tmp_path)) as sink:
        first = await sink.deliver(it)
        second = await sink.deliver(it)
    assert (first.found, second.found) == (False, True)
    assert (second.location, second.bytes, second.sha256) == (first.location, size, it.sha256)
    assert s3_server.keys(bucket) == ["in/twice.bin"]


async def test_same_bytes_without_our_metadata_are_found(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """An object of the right bytes but without our mark (someone else's upload, or a
    store that forgot its metadata: rclone keeps it in memory only) is recognised."""
    content = os.urandom(3000)
    it = item(tmp_path, "theirs.bin", content)
    s3_server.put(bucket, "in/theirs.bin", content)
    async with opened(settings(s3_server, bucket, tmp_path, checksum="none")) as sink:
        receipt = await sink.deliver(it)
    assert receipt.found is True
    assert s3_server.head(bucket, "in/theirs.bin")["Metadata"] == {}  # type: ignore[index]


@pytest.mark.parametrize("size", [3000, 6 * MiB], ids=["put", "multipart"])
async def test_rclone_forgets_metadata_on_restart_yet_the_item_is_found(
    tmp_path: Path, size: int
) -> None:
    """rclone's S3 server keeps user metadata and checksums in memory: after a restart
    the object has no x-amz-meta-sha256, and its ETag is the plain MD5 of the file
    (multipart objects too). A retry after a lost acknowledgement still finds it."""
    it = item(tmp_path, "kept.bin", os.urandom(size))
    with rclone_s3(tmp_path) as first:
        bucket = first.make_bucket()
        async with opened(settings(first, bucket, tmp_path)) as sink:
            assert (await sink.deliver(it)).found is False
    with rclone_s3(tmp_path) as second:
        head = second.head(bucket, "in/kept.bin")
        assert head is not None and head["Metadata"] == {}
        assert head["ETag"].strip('"') == hashlib.md5(it.path.read_bytes()).hexdigest()
        async with opened(settings(second, bucket, tmp_path)) as sink:
            receipt = await sink.deliver(it)
    assert receipt.found is True


async def test_other_bytes_there_fail_or_are_replaced(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    s3_server.put(bucket, "in/x.csv", b"someone else's", Metadata={"sha256": "0" * 64})
    it = item(tmp_path, "x.csv", b"ours\n")
    async with opened(settings(s3_server, bucket, tmp_path)) as sink:
        with pytest.raises(SinkError) as e:
            await sink.deliver(it)
    assert (e.value.error_class, e.value.retryable) == ("remote_exists", False)
    assert "0" * 64 in e.value.message
    assert s3_server.get(bucket, "in/x.csv") == b"someone else's"

    async with opened(settings(s3_server, bucket, tmp_path, exists="replace")) as sink:
        receipt = await sink.deliver(it)
    assert receipt.found is False
    assert s3_server.get(bucket, "in/x.csv") == b"ours\n"
    assert s3_server.keys(bucket) == ["in/x.csv"]


async def assert_theirs_kept_where_honoured(
    s3_server: S3Server, bucket: str, sink: S3Delivery, it: Item, theirs: bytes
) -> None:
    """`it` goes where another's object (`theirs`) is: SeaweedFS honours the PUT's
    If-None-Match: *, and the sink says remote_exists and leaves theirs; rclone's
    server ignores the header, and ours replaces theirs."""
    key = sink.key(it)
    if s3_server.name == "rclone":
        await sink.deliver(it)
        assert s3_server.get(bucket, key) == it.path.read_bytes()
        return
    with pytest.raises(SinkError) as e:
        await sink.deliver(it)
    assert e.value.error_class == "remote_exists"
    assert s3_server.get(bucket, key) == theirs


async def test_object_appearing_after_the_check(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """Another writer's object lands between our HEAD and our PUT. SeaweedFS honours
    If-None-Match: * and the sink reports remote_exists; rclone ignores the header,
    so there the HEAD before the write is all the protection there is."""
    it = item(tmp_path, "race.csv", b"ours\n")
    async with opened(settings(s3_server, bucket, tmp_path)) as sink:
        real_head = sink._head
        calls = 0

        async def head_then_race(client: Any, key: str) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                assert await real_head(client, key) is None
                s3_server.put(bucket, key, b"theirs\n")
                return None
            return await real_head(client, key)

        sink._head = head_then_race  # type: ignore[method-assign]
        await assert_theirs_kept_where_honoured(s3_server, bucket, sink, it, b"theirs\n")


async def test_without_head_first_the_conditional_put_alone_decides(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """`head_first: false`: a new object costs one request, not two. An object already
    there is found by the PUT's If-None-Match: * (ours: found; another's: remote_exists)
    on a store that honours it. rclone's ignores it and replaces another's object: why
    the HEAD first stays the default."""
    ops: list[str] = []
    it = item(tmp_path, "one.csv", b"ours\n")
    async with opened(settings(s3_server, bucket, tmp_path, head_first=False)) as sink:
        assert sink._client is not None
        sink._client.meta.events.register(
            "before-send.s3", lambda request, **_: ops.append(request.method)
        )
        assert (await sink.deliver(it)).found is False
        assert ops == ["PUT"]
        ops.clear()
        honoured = s3_server.name == "seaweedfs"
        assert (await sink.deliver(it)).found is honoured  # rclone's writes it again
        assert ops == (["PUT", "HEAD"] if honoured else ["PUT"])

        s3_server.put(bucket, "in/theirs.csv", b"theirs\n")
        other = item(tmp_path, "theirs.csv", b"ours\n")
        await assert_theirs_kept_where_honoured(s3_server, bucket, sink, other, b"theirs\n")


async def test_leftover_multipart_upload_is_aborted(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    stale = s3_server.start_upload(bucket, "in/part.bin", os.urandom(5 * MiB))
    neighbour = s3_server.start_upload(bucket, "in/part.bin.other")  # same prefix, not ours
    assert s3_server.uploads(bucket, "in/part.bin") == [stale]
    it = item(tmp_path, "part.bin", os.urandom(7 * MiB))
    async with opened(settings(s3_server, bucket, tmp_path)) as sink:
        await sink.deliver(it)
    assert s3_server.uploads(bucket, "in/part.bin") == []
    assert s3_server.uploads(bucket, "in/part.bin.other") == [neighbour]
    assert s3_server.get(bucket, "in/part.bin") == it.path.read_bytes()


async def assert_never_an_object(
    s3_server: S3Server, bucket: str, base: Path, checksum: str, it: Item
) -> None:
    """The delivery of a changed file fails as such, and leaves nothing on the store."""
    s = settings(s3_server, bucket, base, checksum=checksum, conditional_writes=False)
    async with opened(s) as sink:
        with pytest.raises(SinkError) as e:
            await sink.deliver(it)
    assert (e.value.error_class, e.value.retryable) == ("modified_during_processing", False)
    assert s3_server.keys(bucket) == []
    assert s3_server.uploads(bucket, sink.key(it)) == []


@pytest.mark.parametrize("checksum", ["sha256", "none"])
@pytest.mark.parametrize("change", ["rewritten", "grown", "shrunk"])
@pytest.mark.parametrize("size", [1000, 3 * MiB, 6 * MiB], ids=["put", "streamed-put", "multipart"])
async def test_changed_file_never_becomes_an_object(
    s3_server: S3Server, bucket: str, tmp_path: Path, size: int, change: str, checksum: str
) -> None:
    """With `checksum: sha256` the parts are hashed before they are sent; with `none`,
    as they are sent: either way the upload is not completed."""
    it = item(tmp_path, "moving.bin", os.urandom(size))
    with open(it.path, "r+b") as f:
        if change == "rewritten":  # same size, other bytes in the last part
            f.seek(size - 10)
            f.write(b"x" * 10)
        elif change == "grown":
            f.seek(0, os.SEEK_END)
            f.write(b"more")
        else:
            f.truncate(size - 1)
    await assert_never_an_object(s3_server, bucket, tmp_path, checksum, it)


@pytest.mark.parametrize("size", [1000, 3 * MiB, 6 * MiB], ids=["put", "streamed-put", "multipart"])
async def test_checksum_none_delivers(
    s3_server: S3Server, bucket: str, tmp_path: Path, size: int
) -> None:
    it = item(tmp_path, "plain.bin", os.urandom(size))
    s = settings(s3_server, bucket, tmp_path, checksum="none", conditional_writes=False)
    async with opened(s) as sink:
        receipt = await sink.deliver(it)
    assert receipt.found is False and receipt.bytes == size
    assert s3_server.get(bucket, "in/plain.bin") == it.path.read_bytes()


async def test_single_put_streams_a_file_over_a_mib(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """A file under `multipart_threshold_bytes` but over a MiB goes in one PUT read
    straight from the file: `concurrency` such PUTs at once hold no file in memory."""
    content = os.urandom(20 * MiB)
    it = item(tmp_path, "mid.bin", content)
    s = settings(s3_server, bucket, tmp_path, multipart_threshold_bytes=64 * MiB)
    async with opened(s) as sink:
        receipt, peak = await traced(sink, it)
    assert receipt.remote["multipart"] is False
    assert receipt.remote["etag"] == hashlib.md5(content).hexdigest()
    assert peak < 5 * MiB, f"peak {peak / MiB:.1f} MiB for a 20 MiB file in one PUT"
    assert s3_server.get(bucket, "in/mid.bin") == content


@pytest.mark.parametrize("checksum", ["sha256", "none"])
async def test_file_rewritten_after_its_check_is_refused_by_the_store(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
    checksum: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A streamed PUT sends its bytes after they were checked. The file is rewritten
    in that gap (the check is wrapped to do it): the PUT's Content-MD5 is the checked
    bytes', the store refuses what it receives, and the sink names the change."""
    import service.delivery.s3 as s3

    it = item(tmp_path, "late.bin", os.urandom(3 * MiB))
    checked = s3._checked_md5

    def check_then_rewrite(target: Item, fd: int) -> str:
        md5 = checked(target, fd)
        with open(target.path, "r+b") as f:
            f.write(b"changed")
        return md5

    monkeypatch.setattr(s3, "_checked_md5", check_then_rewrite)
    await assert_never_an_object(s3_server, bucket, tmp_path, checksum, it)


async def test_bytes_the_store_finds_damaged_are_retried(
    s3_server: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses a PUT whose bytes do not match its Content-MD5 while the file
    is unchanged: damage on the way (made here by announcing another MD5), worth a retry."""
    import service.delivery.s3 as s3

    it = item(tmp_path, "damaged.bin", os.urandom(3 * MiB))
    monkeypatch.setattr(s3, "_checked_md5", lambda target, fd: hashlib.md5(b"other").hexdigest())
    async with opened(settings(s3_server, bucket, tmp_path, checksum="none")) as sink:
        with pytest.raises(SinkError) as e:
            await sink.deliver(it)
    assert (e.value.error_class, e.value.retryable) == ("checksum_mismatch", True)
    assert s3_server.keys(bucket) == []


@pytest.mark.parametrize("checksum", ["sha256", "none"])
async def test_a_body_is_signed_only_where_no_checksum_goes_with_it(
    s3_server: S3Server, bucket: str, tmp_path: Path, checksum: str
) -> None:
    """Over plain http botocore signs each body's SHA-256, a second pass over it on the
    event loop; with `checksum: sha256` the store checks the signed checksum header
    instead, so the body goes unsigned (as botocore sends it over https)."""
    sent: list[tuple[str, str]] = []

    def seen(request: Any, **_: Any) -> None:
        op = "part" if "partNumber=" in request.url else request.method
        sent.append((op, request.headers.get("x-amz-content-sha256", b"").decode()))

    it = item(tmp_path, "signed.bin", os.urandom(6 * MiB))
    s = settings(s3_server, bucket, tmp_path, checksum=checksum, conditional_writes=False)
    async with opened(s) as sink:
        assert sink._client is not None
        sink._client.meta.events.register("before-send.s3", seen)
        await sink.deliver(it)
    bodies = [value for op, value in sent if op == "part"]
    assert len(bodies) == 2
    if checksum == "sha256":
        assert bodies == ["UNSIGNED-PAYLOAD"] * 2
    else:
        assert all(re.fullmatch("[0-9a-f]{64}", value) for value in bodies)
    assert s3_server.get(bucket, "in/signed.bin") == it.path.read_bytes()


async def test_concurrent_deliveries_share_one_client(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    items = [item(tmp_path, f"many/{i}.txt", f"file {i}\n".encode()) for i in range(12)]

    async def deliver(sink: S3Delivery, it: Item) -> None:
        """As the service does, a retryable failure is tried again: rclone's S3 server
        now and then answers 500 to PUTs into one folder at once (its log: "Dir.Rename
        error: file does not exist"), about one round of 12 PUTs in 60."""
        for attempt in range(3):
            try:
                await sink.deliver(it)
                return
            except SinkError as e:
                if not e.retryable or attempt == 2:
                    raise

    async with opened(settings(s3_server, bucket, tmp_path, concurrency=4)) as sink:
        async with anyio.create_task_group() as tg:
            for it in items:
                tg.start_soon(deliver, sink, it)
    assert sorted(s3_server.keys(bucket)) == sorted(f"in/many/{i}.txt" for i in range(12))


async def test_wrong_secret_is_denied_for_good(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    wrong = "not-the-secret-" + "9" * 20
    it = item(tmp_path, "denied.csv", b"a,b\n")
    async with opened(settings(s3_server, bucket, tmp_path, secret=wrong)) as sink:
        with pytest.raises(SinkError) as e:
            await sink.deliver(it)
    assert (e.value.error_class, e.value.retryable) == ("sink_denied", False)
    assert wrong not in str(e.value) and s3_server.secret not in str(e.value)


async def test_missing_bucket_is_rejected(s3_server: S3Server, tmp_path: Path) -> None:
    it = item(tmp_path, "lost.csv", b"a\n")
    async with opened(settings(s3_server, "no-such-bucket-here", tmp_path)) as sink:
        with pytest.raises(SinkError) as e:
            await sink.deliver(it)
    assert (e.value.error_class, e.value.retryable) == ("sink_rejected", False)
    assert "NoSuchBucket" in e.value.message


async def test_vanished_file_is_unreadable(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    it = item(tmp_path, "gone.csv", b"a\n")
    it.path.unlink()
    async with opened(settings(s3_server, bucket, tmp_path)) as sink:
        with pytest.raises(SinkError) as e:
            await sink.deliver(it)
    assert (e.value.error_class, e.value.retryable) == ("source_unreadable", False)
    assert s3_server.keys(bucket) == []


async def test_server_down_is_unreachable_and_retryable(tmp_path: Path) -> None:
    down = S3Server("down", f"http://127.0.0.1:{free_port()}", "filedock-test", "secret")
    async with opened(settings(down, "bucket", tmp_path, timeout_s=5)) as sink:
        with pytest.raises(SinkError) as e:
            await sink.deliver(item(tmp_path, "x.csv", b"x"))
    assert (e.value.error_class, e.value.retryable) == ("sink_unreachable", True)


async def test_unencodable_target_is_a_bad_target(tmp_path: Path) -> None:
    down = S3Server("down", f"http://127.0.0.1:{free_port()}", "filedock-test", "secret")
    async with opened(settings(down, "bucket", tmp_path)) as sink:
        with pytest.raises(SinkError) as e:
            await sink.deliver(item(tmp_path, "bad-\udcff.csv", b"x"))
    assert (e.value.error_class, e.value.retryable) == ("bad_target", False)


async def test_missing_credential_is_a_config_error(tmp_path: Path) -> None:
    s = S3Sink(
        kind="s3",
        name="store",
        bucket="bucket",
        access_key_id=Secret(env="FILEDOCK_TEST_NO_SUCH_VARIABLE"),
        secret_access_key=Secret(file=tmp_path / "missing"),
    )
    with pytest.raises(SinkError) as e:
        await S3Delivery(s).open()
    assert (e.value.error_class, e.value.retryable) == ("sink_config", False)
    assert "FILEDOCK_TEST_NO_SUCH_VARIABLE" in e.value.message


@pytest.mark.parametrize("checksum", ["sha256", "none"])
@pytest.mark.parametrize(
    "size", [1000, 3 * MiB, 11 * MiB], ids=["put", "streamed-put", "multipart"]
)
async def test_botocore_checksums_on_streamed_bodies(
    s3_server: S3Server, bucket: str, tmp_path: Path, checksum: str, size: int
) -> None:
    """With `request_checksum_calculation: when_supported` botocore reads each body once
    more for its own CRC, a streamed one too: the bodies still arrive whole and are
    checked."""
    it = item(tmp_path, "crc.bin", os.urandom(size))
    s = settings(
        s3_server,
        bucket,
        tmp_path,
        checksum=checksum,
        conditional_writes=False,
        request_checksum_calculation="when_supported",
    )
    async with opened(s) as sink:
        receipt = await sink.deliver(it)
    assert receipt.remote["multipart"] is (size > 5 * MiB)
    assert receipt.remote["parts"] == -(-size // (5 * MiB))
    assert s3_server.get(bucket, "in/crc.bin") == it.path.read_bytes()
