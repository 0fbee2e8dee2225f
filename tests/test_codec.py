"""The archive's compression: each kind written in blocks by threads, read back by the
standard tools, each block checked as it is written, and a route's own choice."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import FiledockTree, command_route
from pydantic import ValidationError
from zstandard import ZstdDecompressor

from service.errors import JobError
from service.ledger import JobRecord
from service.settings import Settings
from service.storage.archive import check_published
from service.storage.codec import BLOCK, Codec, compress_into, expanded_sha256
from service.storage.fsutil import Barrier

KINDS = [Codec("gzip"), Codec("gzip", 6), Codec("zstd"), Codec("zstd", 9), Codec("none")]


def csv_like(size: int) -> bytes:
    line = b"12345,alpha,987654,0.123456,2026-12-07\n"
    out = bytearray()
    n = 0
    while len(out) < size:
        out += line.replace(b"12345", str(n).encode())
        n += 1
    return bytes(out[:size])


def compress(tmp_path: Path, data: bytes, codec: Codec, threads: int = 2) -> tuple[Path, str]:
    src = tmp_path / "source.csv"
    src.write_bytes(data)
    dst = tmp_path / f"copy{codec.suffix}"
    fd = os.open(src, os.O_RDONLY)
    try:
        digest = compress_into(fd, str(dst), codec, threads=threads)
    finally:
        os.close(fd)
    return dst, digest


def expand(path: Path, codec: Codec) -> bytes:
    """With the format's own reader, not ours."""
    if codec.kind == "gzip":
        return gzip.decompress(path.read_bytes())  # every member
    if codec.kind == "zstd":
        with path.open("rb") as f:
            return ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    return path.read_bytes()


@pytest.mark.parametrize("codec", KINDS, ids=lambda c: f"{c.kind}-{c.effective_level}")
@pytest.mark.parametrize("size", [0, 1000, BLOCK, 5 * BLOCK + 123])
def test_the_copy_expands_to_the_source_and_its_hash_is_returned(
    tmp_path: Path, codec: Codec, size: int
) -> None:
    data = csv_like(size)
    dst, digest = compress(tmp_path, data, codec)
    assert digest == hashlib.sha256(data).hexdigest()
    assert expand(dst, codec) == data
    assert expanded_sha256(str(dst), codec.kind) == digest
    if codec.kind != "none" and size > BLOCK:
        assert dst.stat().st_size < size / 2  # compressed, though cut into blocks


def test_a_multi_block_gzip_copy_passes_gzip_itself(tmp_path: Path) -> None:
    gz = shutil.which("gzip")
    assert gz is not None
    data = csv_like(3 * BLOCK + 7)
    dst, _ = compress(tmp_path, data, Codec("gzip"))
    assert subprocess.run([gz, "-t", str(dst)], check=False).returncode == 0
    assert subprocess.run([gz, "-dc", str(dst)], capture_output=True, check=True).stdout == data


def test_one_thread_or_many_write_the_same_bytes(tmp_path: Path) -> None:
    data = csv_like(4 * BLOCK + 1)
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    one, _ = compress(tmp_path / "one", data, Codec("zstd"), threads=1)
    many, _ = compress(tmp_path / "many", data, Codec("zstd"), threads=4)
    assert one.read_bytes() == many.read_bytes()


class FlippingCodec(Codec):
    """A compressor that flips a byte of the block starting with `marker`: what a
    memory or library fault would do (it cannot be caused on purpose otherwise)."""

    marker: ClassVar[bytes] = b""

    def compress(self, block: bytes) -> bytes:
        blob = super().compress(block)
        if block.startswith(self.marker):
            return blob[:-9] + bytes([blob[-9] ^ 0xFF]) + blob[-8:]
        return blob


def test_a_block_that_does_not_expand_to_its_source_fails_the_copy(tmp_path: Path) -> None:
    data = csv_like(5 * BLOCK)
    FlippingCodec.marker = data[3 * BLOCK : 3 * BLOCK + 40]  # the fourth block's start
    with pytest.raises(JobError) as caught:
        compress(tmp_path, data, FlippingCodec("gzip"))
    assert caught.value.error_class == "io_error"
    assert caught.value.retryable


@pytest.mark.parametrize(
    ("archive", "suffix", "kind"),
    [({"compression": "zstd", "level": 5}, ".zst", "zstd"), ({"compression": "none"}, "", "none")],
)
def test_a_route_chooses_its_own_compression(
    tree: FiledockTree, archive: dict[str, object], suffix: str, kind: str
) -> None:
    tree.configure(
        routes=[
            command_route("raw", match="raw/*", archive=archive),
            command_route("rest", match="**"),
        ],
        archive={"compression": "gzip", "level": 2},
    )
    data = csv_like(3 * BLOCK + 5)
    tree.drop("raw/big.csv", data)
    tree.drop("other.csv", b"a,b\n")
    assert tree.run_once().returncode == 0
    archived = {p.name: p for p in tree.folder("archive").rglob("*") if p.is_file()}
    copy = archived[f"big.csv{suffix}"]
    assert expand(copy, Codec(kind)) == data  # type: ignore[arg-type]
    assert gzip.decompress(archived["other.csv.gz"].read_bytes()) == b"a,b\n"
    manifest = (copy.parent / "manifest.json").read_text()
    assert f'"compression": "{kind}"' in manifest


@pytest.mark.parametrize("kind", ["old-gzip", "zstd", "none"])
def test_an_archive_published_earlier_is_verified_again_by_its_own_format(
    tmp_path: Path, kind: str
) -> None:
    data = csv_like(BLOCK + 99)
    codec = Codec("gzip") if kind == "old-gzip" else Codec(kind)  # type: ignore[arg-type]
    final = tmp_path / "20261207T101500000Z-0a0b0c0d"
    final.mkdir()
    copy, digest = compress(final, data, codec)
    (final / "source.csv").unlink()
    entry: dict[str, object] = {"name": copy.name, "role": "source", "sha256": digest}
    if kind != "old-gzip":  # archives written before the setting carry no compression
        entry["compression"] = codec.kind
    (final / "manifest.json").write_text(json.dumps({"files": [entry]}))
    job = JobRecord(id=final.name, route="r", name=b"source.csv", relative_path=b"source.csv")
    job.sha256 = digest
    check_published(final, job, Barrier())
    job.sha256 = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(JobError, match="does not match"):
        check_published(final, job, Barrier())


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        ({"compression": "zstd", "level": 25}, "level 25 for compression zstd: levels are 1 to 19"),
        ({"compression": "gzip", "level": 0}, "level 0 for compression gzip: levels are 1 to 9"),
        ({"compression": "none", "level": 3}, "level 3 for compression none: levels are none"),
        ({"compression": "brotli"}, "Input should be 'gzip', 'zstd' or 'none'"),
    ],
)
def test_a_compression_that_does_not_exist_is_refused(
    tmp_path: Path, archive: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(root=tmp_path, archive=archive)
