"""Reading the CSV: its encoding, the header, then chunks of records with their line numbers."""

from __future__ import annotations

import codecs
import csv
import functools
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from service.errors import Reject
from service.settings import CsvSqlImporterSettings

_MAX_LINE: Final = 1 << 23  # characters read at once: a longer line is cut (its pieces fail)
_KEEP_RAW: Final = 4096  # characters of an unparsable record kept in the pending file


class _RawLines:
    """The source's physical lines again, read forward on demand: the text of a record the
    CSV parser could not read goes to the pending file as it was. Requests come in line
    order, so one extra pass at most, and only for files with unreadable records."""

    def __init__(self, path: Path, encoding: str) -> None:
        self._path, self._encoding = path, encoding
        self._file: TextIO | None = None
        self._number = 0

    def text(self, first: int, last: int) -> str:
        if self._file is None:
            self._file = open(  # closed by close()
                self._path, encoding=self._encoding, errors="surrogateescape", newline=""
            )
        readline, kept, size = self._file.readline, list[str](), 0
        while self._number < last and (line := readline(_MAX_LINE)):
            self._number += 1
            if self._number >= first and size < _KEEP_RAW:
                kept.append(line)
                size += len(line)
        text = "".join(kept)
        return text.rstrip("\r\n") if len(text) <= _KEEP_RAW else text[:_KEEP_RAW]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class _Chunk:
    """Consecutive records, column-wise: no Python object per record beyond its fields."""

    lines: list[int]  # where each record starts
    fields: list[list[str]]
    problems: dict[int, str]  # position -> why the record is unreadable

    def __len__(self) -> int:
        return len(self.fields)


class _Source:
    """One pass over the CSV: the header, then chunks of non-blank records.

    `csv.reader` pulls lines straight from `readline` (no Python code per line), at most
    `_MAX_LINE` characters at a time: a file without line breaks cannot fill the memory.
    """

    def __init__(
        self, path: Path, settings: CsvSqlImporterSettings, encoding: str, *, check_decoding: bool
    ) -> None:
        self.encoding = encoding
        self._check = check_decoding
        self._file = open(  # closed on __exit__
            path, encoding=encoding, errors="surrogateescape", newline="", buffering=1 << 20
        )
        lines = iter(functools.partial(self._file.readline, _MAX_LINE), "")
        self._reader = csv.reader(
            lines, delimiter=settings.delimiter, quotechar=settings.quotechar, strict=True
        )
        self._raw = _RawLines(path, encoding)
        self.width = 0

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        self._raw.close()

    def header(self) -> list[str]:
        """The first non-blank record, stripped; `Reject` when there is none or it is broken."""
        while True:
            first = self._reader.line_num + 1
            try:
                fields = next(self._reader)
            except StopIteration:
                raise Reject("empty file: no header") from None
            except csv.Error as e:
                raise Reject(f"line {first}: the header is unreadable: {e}") from None
            if self._check and _undecodable(fields):
                raise Reject(f"line {first}: the header has bytes that are not {self.encoding}")
            if any(name.strip() for name in fields):
                self.width = len(fields)
                return [name.strip() for name in fields]

    def read(self, size: int) -> _Chunk:
        """Up to `size` records after the header; blank lines are skipped and not counted."""
        chunk = _Chunk([], [], {})
        while len(chunk) < size and not self._batch(chunk, size - len(chunk)):
            pass
        if self._check and _undecodable(itertools.chain.from_iterable(chunk.fields)):
            for n, fields in enumerate(chunk.fields):
                if n not in chunk.problems and _undecodable(fields):
                    chunk.problems[n] = f"bytes that are not valid {self.encoding}"
        return chunk

    def _batch(self, chunk: _Chunk, want: int) -> bool:
        """Read up to `want` records into the chunk, in C; whether the file has ended.

        `list.extend` keeps the records read before a `csv.Error`. Each record takes one
        line unless a quoted field holds line breaks: only then are lines counted here.
        """
        reader, width = self._reader, self.width
        start, batch, error = reader.line_num, list[list[str]](), None
        try:
            batch.extend(itertools.islice(reader, want))
        except csv.Error as e:
            error = e
        read = len(batch)
        lines: Sequence[int]
        if error is None and reader.line_num - start == read:
            lines = range(start + 1, start + 1 + read)
        else:
            lines = _first_lines(start, batch)
        after = lines[-1] + _line_breaks(batch[-1]) if batch else start
        if set(map(len, batch)) - {width}:  # blank lines (or rows of another width)
            kept = [n for n, fields in enumerate(batch) if not _blank(fields, width)]
            lines, batch = [lines[n] for n in kept], [batch[n] for n in kept]
        chunk.lines.extend(lines)
        chunk.fields.extend(batch)
        if error is None:
            return read < want
        reason = str(error)
        if reason == "unexpected end of data":
            reason = "unterminated quoted field (it runs to the end of the file)"
        chunk.problems[len(chunk)] = f"malformed CSV: {reason}"
        chunk.lines.append(after + 1)
        chunk.fields.append([self._raw.text(after + 1, reader.line_num)])
        return False

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        """(first line, fields) of each record."""
        while chunk := self.read(1000):
            yield from zip(chunk.lines, chunk.fields, strict=True)


def _blank(fields: list[str], width: int) -> bool:
    return not fields or (len(fields) == 1 and width > 1 and not fields[0].strip())


def _line_breaks(fields: list[str]) -> int:
    """The line breaks inside a record's quoted fields, as `readline` splits lines."""
    return sum(f.count("\n") + f.count("\r") - f.count("\r\n") for f in fields)


def _first_lines(start: int, rows: list[list[str]]) -> list[int]:
    """The line each record starts on, the line before the first being `start`."""
    lines, line = [], start
    for fields in rows:
        lines.append(line + 1)
        line += 1 + _line_breaks(fields)
    return lines


def _undecodable(texts: Iterable[str]) -> bool:
    """Whether there are lone surrogates: the bytes `surrogateescape` kept undecoded."""
    joined = "".join(texts)
    if joined.isascii():
        return False
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _choose_encoding(path: Path, settings: CsvSqlImporterSettings) -> tuple[str, bool]:
    """The first encoding that decodes the whole file, and whether rows still need checking.

    The file is decoded once ahead, in C, without keeping it: a clean file then needs no
    check per row. When every candidate fails, the first one is used, and the records
    with undecodable bytes become row errors.
    """
    for encoding in [settings.encoding, *settings.fallback_encodings]:
        decoder = codecs.getincrementaldecoder(encoding)()
        try:
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    decoder.decode(block)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            continue
        return encoding, False
    return settings.encoding, True
