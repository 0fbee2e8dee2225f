"""Fixtures of the reliability suite (tests/conftest.py's are visible here too)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability.support import Outside, RelTree


@pytest.fixture
def rtree(tmp_path: Path) -> Iterator[RelTree]:
    """A filedock tree in tmp_path whose folders may be mount points (`folders:`)."""
    t = RelTree(tmp_path)
    yield t
    t.close()


@pytest.fixture
def outside(tmp_path: Path) -> Outside:
    """I5: a sentinel file outside the tree, and a snapshot of what surrounds the tree."""
    return Outside(tmp_path)
