"""The intake: a bounded queue of ready files per route, between discovery and the claimer.

Discovery offers each ready file once; the claimer takes it and releases it when it
has left `transfer/`. Watcher hints that find a queue full are dropped (a scan
queues them later); scans wait for room: that is the backpressure that keeps a
backlog on disk rather than in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from service.face.metrics import Metrics

__all__ = ["Candidate", "Intake"]

_SEEN_CAP = 10_000  # names the watcher reported while their queue was full


@dataclass(frozen=True)
class Candidate:
    rel: bytes
    detected_at: float


class Intake:
    """A bounded queue of ready files per route; a file is queued at most once."""

    def __init__(self, routes: list[str], size: int, metrics: Metrics) -> None:
        self._send: dict[str, MemoryObjectSendStream[Candidate]] = {}
        self.receive: dict[str, MemoryObjectReceiveStream[Candidate]] = {}
        for name in routes:
            self._send[name], self.receive[name] = anyio.create_memory_object_stream[Candidate](
                size
            )
        self._queued: set[bytes] = set()
        self._metrics = metrics
        # Files the watcher reported while their queue was full: a scan queues them
        # later and must not count them as missed by the watcher. Past the cap (or after
        # an inotify overflow) names are not known, and files that appeared before
        # `misses_unknown_before` are not judged.
        self._reported: set[bytes] = set()
        self.misses_unknown_before = 0.0

    def __contains__(self, rel: bytes) -> bool:
        return rel in self._queued

    def offer_nowait(self, route: str, rel: bytes) -> bool:
        """Queue a file if there is room (watcher hints); the next scan finds it otherwise."""
        if rel in self._queued:
            return True
        try:
            self._send[route].send_nowait(Candidate(rel, time.time()))
        except anyio.WouldBlock:
            return False
        self._queued_new(route, rel)
        return True

    async def offer(self, route: str, rel: bytes) -> None:
        """Queue a file, waiting for room (scans): this is the backpressure."""
        if rel in self._queued:
            return
        await self._send[route].send(Candidate(rel, time.time()))
        self._queued_new(route, rel)

    def _queued_new(self, route: str, rel: bytes) -> None:
        self._queued.add(rel)
        self._metrics.files_detected.labels(route).inc()
        self._metrics.queue_depth.set(len(self._queued))

    def pending(self) -> int:
        """Files queued and not yet claimed."""
        return len(self._queued)

    def seen_by_watcher(self, rel: bytes) -> None:
        """The watcher reported a file that found its queue full."""
        if len(self._reported) < _SEEN_CAP:
            self._reported.add(rel)
        else:
            self.misses_unknown_before = time.time()

    def was_seen_by_watcher(self, rel: bytes) -> bool:
        return rel in self._reported

    def release(self, rel: bytes) -> None:
        """The file left the queue (claimed, or gone)."""
        self._reported.discard(rel)
        self._queued.discard(rel)
        self._metrics.queue_depth.set(len(self._queued))

    def close(self) -> None:
        """Both ends of every queue, once discovery and the claimers have stopped."""
        for name, stream in self._send.items():
            stream.close()
            self.receive[name].close()
