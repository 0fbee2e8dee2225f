"""Cell values: each column type's checks and conversion, value by value or a column at once."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final

from service.settings import CsvColumn

# The accepted shapes. Dates and date-times are the ISO 8601 forms SQLite's date functions
# and PostgreSQL both read; the rest of ISO 8601 (week dates, basic format) is refused.
_INT: Final = r"[+-]?[0-9]+"
_DECIMAL: Final = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_DATE: Final = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_DATETIME: Final = (
    _DATE + r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,6})?)?(?:Z|[+-][0-9]{2}:[0-9]{2})?)?"
)
_BOOL: Final = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_BOOL_ANY_CASE: Final = {
    variant: value
    for text, value in _BOOL.items()
    for variant in (text, text.title(), text.upper())
}


class _CellError(Exception):
    """A value broke its column's rules; the message is the reason."""


def _show(raw: str) -> str:
    return repr(raw if len(raw) <= 40 else raw[:37] + "...")


def _parse_int(text: str) -> int:
    if re.fullmatch(_INT, text) is None:
        raise _CellError(f"not an integer: {_show(text)}")
    value = int(text) if len(text) <= 21 else 1 << 63  # int() refuses 4300+ digits
    if not -(1 << 63) <= value < 1 << 63:
        raise _CellError(f"outside the 64-bit integer range: {_show(text)}")
    return value


def _parse_bool(text: str) -> bool:
    value = _BOOL.get(text.lower())
    if value is None:
        raise _CellError(f"not a boolean (true/false, 1/0, yes/no): {_show(text)}")
    return value


def _parse_date(text: str) -> str:
    try:
        if re.fullmatch(_DATE, text) is None:
            raise ValueError
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise _CellError(f"not an ISO date (YYYY-MM-DD): {_show(text)}") from None


def _parse_datetime(text: str) -> str:
    """Kept as written: a value without an offset is UTC (the PostgreSQL session is UTC)."""
    try:
        if re.fullmatch(_DATETIME, text) is None:
            raise ValueError
        datetime.fromisoformat(text)
    except ValueError:
        raise _CellError(f"not an ISO 8601 date-time: {_show(text)}") from None
    return text


def _decimal_parser(precision: int | None, scale: int | None) -> Callable[[str], str]:
    """Plain decimal notation, kept exact as text (no float ever sees it, no rounding)."""

    def parse(text: str) -> str:
        if re.fullmatch(_DECIMAL, text) is None:
            raise _CellError(f"not a decimal number: {_show(text)}")
        if precision is not None:
            whole, _, fraction = text.lstrip("+-").partition(".")
            if len(fraction.rstrip("0")) > (scale or 0):
                raise _CellError(f"more than {scale or 0} decimal places: {_show(text)}")
            if len(whole.lstrip("0")) > precision - (scale or 0):
                digits = precision - (scale or 0)
                raise _CellError(f"more than {digits} digits before the point: {_show(text)}")
        return format(Decimal(text), "f")

    return parse


def _converter(column: CsvColumn, *, required: bool) -> Callable[[str], Any]:
    """One value's checks and conversion: an empty value is NULL (or `required`)."""
    parse: Callable[[str], Any] | None = {
        "str": None,
        "int": _parse_int,
        "decimal": _decimal_parser(column.precision, column.scale),
        "bool": _parse_bool,
        "date": _parse_date,
        "datetime": _parse_datetime,
    }[column.type]
    strip = column.type != "str"
    max_length = column.max_length
    match = re.compile(column.pattern).fullmatch if column.pattern is not None else None
    choices = frozenset(column.choices) if column.choices is not None else None

    def convert(raw: str) -> Any:
        text = raw.strip() if strip else raw
        if not text:
            if required:
                raise _CellError("required")
            return None
        if max_length is not None and len(text) > max_length:
            raise _CellError(f"longer than {max_length} characters: {_show(text)}")
        if match is not None and match(text) is None:
            raise _CellError(f"does not match the pattern {column.pattern!r}: {_show(text)}")
        if choices is not None and text not in choices:
            raise _CellError(f"not one of the choices: {_show(text)}")
        return text if parse is None else parse(text)

    return convert


def _all_shaped(line: str) -> Callable[[Sequence[str]], bool]:
    """Whether every value has the shape: one regex over the joined column, in C."""
    column = re.compile(f"(?:{line})(?:\n(?:{line}))*")

    def check(values: Sequence[str]) -> bool:
        joined = "\n".join(values)
        # a value holding a line break would pass as two: count them
        return column.fullmatch(joined) is not None and joined.count("\n") == len(values) - 1

    return check


def _canonical_decimal(column: CsvColumn) -> str:
    """The decimals `_decimal_parser` returns unchanged, within the column's digits."""
    if column.precision is None:
        return r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?"
    scale = column.scale or 0
    whole = column.precision - scale
    integer = f"(?:0|[1-9][0-9]{{0,{whole - 1}}})" if whole > 0 else "0"
    return "-?" + integer + (f"(?:\\.[0-9]{{1,{scale}}})?" if scale else "")


_NOT_INT_TEXT: Final = re.compile(r"[^0-9+-]")


def _int_characters(values: Sequence[str]) -> bool:
    """Only digits and signs: `int()` then checks the rest of `_INT`. This refuses what
    `int()` takes beyond it (other digits, `1_000`), and spaces, which the rules would see."""
    return _NOT_INT_TEXT.search("".join(values)) is None


def _int64s(values: Sequence[str]) -> list[int]:
    ints = list(map(int, values))
    if ints and not (-(1 << 63) <= min(ints) and max(ints) < 1 << 63):
        raise ValueError("outside the 64-bit range")
    return ints


def _consume(parse: Callable[[str], object]) -> Callable[[Sequence[str]], Sequence[Any]]:
    def check(values: Sequence[str]) -> Sequence[str]:
        deque(map(parse, values), maxlen=0)  # raises on the first invalid value
        return values

    return check


def _fast_path(column: CsvColumn) -> Callable[[Sequence[str]], Sequence[Any] | None]:
    """A whole column of a chunk at C speed; None sends it through `_converter` value by value.

    It accepts only values `_converter` accepts, and converts them to the same values.
    """
    shape = {
        "str": None,
        "int": _int_characters,
        "decimal": _all_shaped(_canonical_decimal(column)),
        "bool": None,
        "date": _all_shaped(_DATE),
        "datetime": _all_shaped(_DATETIME),
    }[column.type]
    convert: Callable[[Sequence[str]], Sequence[Any]] = {
        "str": lambda values: values,
        "int": _int64s,
        "decimal": lambda values: values,
        "bool": lambda values: list(map(_BOOL_ANY_CASE.__getitem__, values)),
        "date": _consume(date.fromisoformat),
        "datetime": _consume(datetime.fromisoformat),
    }[column.type]
    checks: list[Callable[[Sequence[str]], bool]] = []
    if column.max_length is not None:
        limit = column.max_length
        checks.append(lambda values: max(map(len, values)) <= limit)
    if column.pattern is not None:
        match = re.compile(column.pattern).fullmatch
        checks.append(lambda values: all(map(match, values)))
    if column.choices is not None:
        checks.append(frozenset(column.choices).issuperset)

    def fast(values: Sequence[str]) -> Sequence[Any] | None:
        if shape is not None and not shape(values):
            return None
        if not all(check(values) for check in checks):
            return None
        try:
            return convert(values)
        except (ValueError, KeyError):
            return None

    return fast


@dataclass
class _Cell:
    """One target column fed by one input column."""

    index: int  # in the input row
    name: str
    one: Callable[[str], Any]
    fast: Callable[[Sequence[str]], Sequence[Any] | None]
    required: bool

    def column(self, values: Sequence[str]) -> Sequence[Any] | None:
        if "" in values:
            if self.required:
                return None
            present = [v for v in values if v]
            converted = self.fast(present) if present else []
            if converted is None:
                return None
            it = iter(converted)
            return [next(it) if v else None for v in values]
        return self.fast(values)
