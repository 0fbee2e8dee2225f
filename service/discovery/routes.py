"""Which route a path in `transfer/` belongs to, and whether it is a temp name.

Paths are bytes relative to `transfer/`. Globs: `*` and `?` stay inside one path
segment, `**` spans segments (`**/` also matches no folder at all), `[...]` is a
character class. The watcher and the scanner both call `Router.classify`, so
they agree on what is ignored by construction.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from service.settings import Route

__all__ = ["Classified", "Router", "glob_to_regex"]


def glob_to_regex(pattern: str) -> re.Pattern[bytes]:
    """Compile a path glob to a bytes regex matching the whole relative path.

    >>> bool(glob_to_regex("orders/**/*.csv").match(b"orders/eu/2026/a.csv"))
    True
    >>> bool(glob_to_regex("orders/*.csv").match(b"orders/eu/a.csv"))
    False
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile(("(?s:" + "".join(out) + r")\Z").encode("utf-8"))


def _last_segment_is_wild(pattern: str) -> bool:
    last = pattern.rsplit("/", 1)[-1]
    return last in ("*", "**")


@dataclass(frozen=True)
class Classified:
    """What a path is: a candidate of a route, a temp name, unrouted, or a marker/sidecar."""

    kind: Literal["candidate", "ignored", "unrouted", "companion"]
    route: Route | None = None


class _CompiledRoute:
    def __init__(self, route: Route) -> None:
        self.route = route
        self.regex = glob_to_regex(route.match)
        self.ignore = [glob_to_regex(p) for p in route.ignore]
        self.matches_dirs = not _last_segment_is_wild(route.match)
        suffixes = []
        if route.readiness == "marker":
            suffixes.append(route.marker_suffix.encode())
        if route.checksum_sidecar:
            suffixes.append(b".sha256")
        self.companion_suffixes = tuple(suffixes)


class Router:
    """Routes relative paths; the first route whose glob matches wins."""

    def __init__(self, routes: list[Route]) -> None:
        self._routes = [_CompiledRoute(r) for r in routes]

    def classify(self, rel: bytes, *, is_dir: bool = False) -> Classified:
        """Classify a path relative to `transfer/`.

        A directory is a candidate only when a route's last glob segment names
        files (`*.csv`, not `*` or `**`): a folder called `x.csv` is set aside,
        while ordinary subfolders are simply walked.
        """
        base = rel.rsplit(b"/", 1)[-1]
        for cr in self._routes:
            if cr.companion_suffixes and base.endswith(cr.companion_suffixes):
                for suffix in cr.companion_suffixes:
                    if base.endswith(suffix) and cr.regex.match(rel[: -len(suffix)]):
                        return Classified("companion", cr.route)
            if not cr.regex.match(rel):
                continue
            if is_dir and not cr.matches_dirs:
                return Classified("unrouted")
            if any(p.match(base) for p in cr.ignore):
                return Classified("ignored", cr.route)
            return Classified("candidate", cr.route)
        if self._routes and all(any(p.match(base) for p in cr.ignore) for cr in self._routes):
            return Classified("ignored")  # an upload in progress, wherever it is written
        return Classified("unrouted")

    def companion_has_file(self, route: Route, rel: bytes, transfer: bytes) -> bool:
        """Whether the file a marker or checksum file belongs to is there."""
        for suffix in (route.marker_suffix.encode(), b".sha256"):
            if rel.endswith(suffix) and os.path.lexists(transfer + b"/" + rel[: -len(suffix)]):
                return True
        return False

    def prune_dir(self, name: bytes) -> bool:
        """Whether a subfolder is a temp folder for every route (never walked into)."""
        return bool(self._routes) and all(
            any(p.match(name) for p in cr.ignore) for cr in self._routes
        )


def _sample_paths(pattern: str) -> list[bytes]:
    """Concrete paths a glob matches, used to show a later route can never be reached."""
    samples = []
    for filler in ("x", "yz"):
        s = pattern.replace("**/", f"{filler}/").replace("**", filler)
        s = re.sub(r"\[!?([^\]])[^\]]*\]", lambda m: m.group(1), s)
        samples.append(s.replace("*", filler).replace("?", "q").encode())
        samples.append(
            pattern.replace("**/", "").replace("**", filler).replace("*", filler).encode()
        )
    return samples


def unreachable_routes(routes: list[Route]) -> list[str]:
    """Routes shadowed by an earlier one (every path they match goes to the earlier one)."""
    problems = []
    compiled = [(r, glob_to_regex(r.match)) for r in routes]
    for i, (later, later_re) in enumerate(compiled):
        samples = [s for s in _sample_paths(later.match) if later_re.match(s)]
        for earlier, earlier_re in compiled[:i]:
            if samples and all(earlier_re.match(s) for s in samples):
                problems.append(
                    f"routes.{later.name}: unreachable: every file matching {later.match!r} "
                    f"is taken first by route {earlier.name!r} ({earlier.match!r}); "
                    "put the more specific route first"
                )
                break
    return problems
