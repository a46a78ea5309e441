"""The scheduler: which queued message is due next, and waiting until one is.

One job: a heap of (due time, queue id), smallest first, and a wake-up event. It holds ids and
due times only, never bodies or headers. No I/O; the clock is injected. Waiting is on an
event with a timeout, never a sleep loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Callable

from relay.spool import State


class Scheduler:
    """Due times of queued messages, smallest first. Waiting is on an event, never a sleep loop."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, str, State]] = []
        self._queued: set[str] = set()
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, queue_id: str, due: float, state: State) -> None:
        if queue_id in self._queued:
            return
        self._queued.add(queue_id)
        heapq.heappush(self._heap, (due, next(self._seq), queue_id, state))
        self._changed.set()

    def pop_due(self) -> tuple[str, State] | None:
        if self._heap and self._heap[0][0] <= self._clock():
            _, _, queue_id, state = heapq.heappop(self._heap)
            self._queued.discard(queue_id)
            return queue_id, state
        return None

    def seconds_until_due(self) -> float | None:
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - self._clock())

    async def wait(self, limit: float | None = None, *, ignore_due: bool = False) -> None:
        """Return when something may be due (the earliest due time or a new item), or after
        `limit` seconds. With `ignore_due`, only a new item or `limit` ends the wait."""
        delay = None if ignore_due else self.seconds_until_due()
        if limit is not None:
            delay = limit if delay is None else min(delay, limit)
        if delay == 0:
            return
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), delay)

    def poke(self) -> None:
        self._changed.set()

    def known(self, queue_id: str) -> bool:
        return queue_id in self._queued
