"""Routing: globs on the relative path, first match wins, temp names, shadowed routes."""

from __future__ import annotations

from typing import Any

import pytest

from service.discovery.routes import Router, glob_to_regex, unreachable_routes
from service.settings import Route


def route(name: str, match: str, **kw: Any) -> Route:
    return Route(name=name, match=match, importer={"kind": "python", "callable": "m:f"}, **kw)


@pytest.mark.parametrize(
    ("glob", "path", "hit"),
    [
        ("*.csv", b"a.csv", True),
        ("*.csv", b"eu/a.csv", False),
        ("**/*.csv", b"a.csv", True),
        ("**/*.csv", b"eu/2026/a.csv", True),
        ("orders/**", b"orders/x/y.bin", True),
        ("orders/*.csv", b"orders/\xff.csv", True),
        ("report-?.txt", b"report-1.txt", True),
        ("report-[0-9].txt", b"report-a.txt", False),
        ("report-[!0-9].txt", b"report-a.txt", True),
        ("a.csv", b"a\ncsv", False),
    ],
)
def test_glob(glob: str, path: bytes, hit: bool) -> None:
    assert bool(glob_to_regex(glob).match(path)) is hit


def test_first_match_wins_and_temp_names_are_ignored() -> None:
    router = Router([route("orders", "orders/*.csv"), route("rest", "**")])
    assert router.classify(b"orders/a.csv").route.name == "orders"  # type: ignore[union-attr]
    assert router.classify(b"orders/a.txt").route.name == "rest"  # type: ignore[union-attr]
    assert router.classify(b"orders/a.csv.part").kind == "ignored"
    assert router.classify(b"x/.hidden").kind == "ignored"
    only = Router([route("orders", "orders/*.csv")])
    assert only.classify(b"other/a.csv").kind == "unrouted"
    # An upload still under its temp name is not reported as unrouted, wherever it is.
    assert only.classify(b"other/.upload-1f3a").kind == "ignored"
    assert only.classify(b"other/a.csv.part").kind == "ignored"
    assert only.prune_dir(b".staging") and not only.prune_dir(b"eu")


def test_directories_named_like_files_are_candidates_only_for_file_globs() -> None:
    router = Router([route("csv", "**/*.csv")])
    assert router.classify(b"x.csv", is_dir=True).kind == "candidate"
    catch_all = Router([route("all", "**")])
    assert catch_all.classify(b"eu", is_dir=True).kind == "unrouted"  # walked, never claimed


def test_companions_belong_to_their_route() -> None:
    router = Router([route("m", "*.csv", readiness="marker", checksum_sidecar=True)])
    assert router.classify(b"a.csv.done").kind == "companion"
    assert router.classify(b"a.csv.sha256").kind == "companion"
    assert router.classify(b"a.csv").kind == "candidate"


def test_unreachable_routes_are_named() -> None:
    assert unreachable_routes([route("all", "**"), route("csv", "orders/*.csv")])
    assert unreachable_routes([route("a", "*.csv"), route("b", "*.csv")])
    assert not unreachable_routes([route("csv", "orders/*.csv"), route("all", "**")])
    assert not unreachable_routes([route("csv", "*.csv"), route("txt", "*.txt")])
    assert not unreachable_routes([route("eu", "eu/*.csv"), route("any", "*/*.csv")])
