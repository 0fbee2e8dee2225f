"""How the archived copy of a source is compressed, and checked as it is written.

`gzip` (the default) is a standard gzip file: levels 1-3 are ISA-L's (python-isal,
several times zlib's speed at a ratio at least as good as zlib's level 1), levels
4-9 zlib's. `zstd` is Zstandard (python-zstandard). `none` keeps the bytes as they
came. Every reader of the format reads the result: `gzip -d`, `zstd -d`, Python's
`gzip` and `zstandard`.

A file is cut into `BLOCK`-sized blocks, and each block becomes a gzip member or a
zstd frame of its own, compressed by a worker thread (both libraries release the
GIL), as pigz and `zstd -T0` do: a large file is compressed on every core, with at
most two blocks per thread in memory. Each block is decompressed in memory as soon
as it is compressed and compared with its source bytes, and the source is hashed as
it is read: a copy whose every block expands to its source, of a source whose
SHA-256 is the claimed one, expands to the claimed file. No second read of the copy
is needed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from isal import isal_zlib
from zstandard import ZstdCompressor, ZstdDecompressor

from service.errors import JobError

__all__ = ["BLOCK", "GZIP", "Codec", "compress_into", "expanded_sha256", "threads_available"]

BLOCK = 2 << 20
_GZIP_WBITS = 31  # a gzip member with its header and trailer
_READ = 1 << 20

Kind = Literal["gzip", "zstd", "none"]


@dataclass(frozen=True)
class Codec:
    """A compression and its level (`None`: the kind's default, gzip 1 and zstd 3)."""

    kind: Kind = "gzip"
    level: int | None = None

    @property
    def suffix(self) -> str:
        return {"gzip": ".gz", "zstd": ".zst", "none": ""}[self.kind]

    @property
    def effective_level(self) -> int:
        return self.level if self.level is not None else {"gzip": 1, "zstd": 3}.get(self.kind, 0)

    def compress(self, block: bytes) -> bytes:
        level = self.effective_level
        if self.kind == "gzip":
            if level <= isal_zlib.ISAL_BEST_COMPRESSION:
                return isal_zlib.compress(block, level, _GZIP_WBITS)
            return zlib.compress(block, level, _GZIP_WBITS)
        if self.kind == "zstd":
            return ZstdCompressor(level=level).compress(block)
        return block

    def decompress(self, blob: bytes) -> bytes:
        """One block's member or frame back to its bytes."""
        if self.kind == "gzip":
            return isal_zlib.decompress(blob, _GZIP_WBITS)
        if self.kind == "zstd":
            return ZstdDecompressor().decompress(blob)
        return blob


GZIP = Codec()  # the default


def threads_available() -> int:
    """The CPUs this process may run on (a container's cpuset included)."""
    return len(os.sched_getaffinity(0))


def compress_into(
    fd: int,
    dst: str,
    codec: Codec,
    *,
    threads: int,
    progress: Callable[[int], None] | None = None,
) -> str:
    """Read `fd` to its end and write its compressed copy to the new file `dst`, each
    block checked against its source; returns the SHA-256 of what was read.
    `progress` is told the source bytes of each block written.

    A block that does not expand to its source raises a retryable `io_error`.
    """
    done = progress or (lambda n: None)
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    h = hashlib.sha256()
    try:
        first = _read_block(fd)
        second = _read_block(fd) if len(first) == BLOCK else b""
        if not second:  # one block: no thread to hand it to
            h.update(first)
            _write_all(out, _pack(codec, first))
            return h.hexdigest()
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="filedock-compress") as pool:
            pending: deque[tuple[int, Future[bytes]]] = deque()
            for block in _blocks(fd, first, second):
                h.update(block)
                pending.append((len(block), pool.submit(_pack, codec, block)))
                while len(pending) > 2 * threads:
                    n, packed = pending.popleft()
                    _write_all(out, packed.result())
                    done(n)
            for n, packed in pending:
                _write_all(out, packed.result())
                done(n)
        return h.hexdigest()
    finally:
        os.close(out)


def expanded_sha256(path: str, kind: Kind) -> str:
    """The SHA-256 of what an archived copy expands to (every member or frame); a copy
    that does not decode raises a retryable `io_error`."""
    try:
        return _expanded_sha256(path, kind)
    except OSError:
        raise
    except Exception as e:  # zlib's, isal's or zstd's error for a damaged copy
        raise JobError("io_error", f"the archived copy does not decode: {e}", retryable=True) from e


def _expanded_sha256(path: str, kind: Kind) -> str:
    h = hashlib.sha256()
    if kind == "gzip":
        with gzip.open(path, "rb") as gz:
            while chunk := gz.read(_READ):
                h.update(chunk)
    elif kind == "zstd":
        with open(path, "rb") as f:
            reader = ZstdDecompressor().stream_reader(f, read_across_frames=True)
            while chunk := reader.read(_READ):
                h.update(chunk)
    else:
        with open(path, "rb") as f:
            while chunk := f.read(_READ):
                h.update(chunk)
    return h.hexdigest()


def _pack(codec: Codec, block: bytes) -> bytes:
    blob = codec.compress(block)
    if codec.kind == "none":
        return blob
    try:
        same = codec.decompress(blob) == block
    except Exception:  # isal's, zlib's or zstd's error for a stream that is not whole
        same = False
    if not same:
        raise JobError("io_error", "the compressed copy does not match its source", retryable=True)
    return blob


def _blocks(fd: int, first: bytes, second: bytes) -> Iterator[bytes]:
    yield first
    block = second
    while block:
        yield block
        block = _read_block(fd) if len(block) == BLOCK else b""


def _read_block(fd: int) -> bytes:
    parts = []
    left = BLOCK
    while left and (chunk := os.read(fd, left)):
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
