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
    """Due times of queued messages, smallest first. Waiting is on an event, never a sleep loop.

    A message is scheduled once; adding it again with another state (put back by hand) or an
    earlier due time replaces the old entry, which is then skipped when it reaches the top.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, str, State]] = []
        self._current: dict[str, tuple[float, State]] = {}
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._current)

    def add(self, queue_id: str, due: float, state: State) -> None:
        known = self._current.get(queue_id)
        if known is not None and known[1] is state and known[0] <= due:
            return
        self._current[queue_id] = (due, state)
        heapq.heappush(self._heap, (due, next(self._seq), queue_id, state))
        self._changed.set()

    def _drop_stale(self) -> None:
        while self._heap:
            due, _, queue_id, state = self._heap[0]
            if self._current.get(queue_id) == (due, state):
                return
            heapq.heappop(self._heap)

    def pop_due(self) -> tuple[str, State] | None:
        self._drop_stale()
        if self._heap and self._heap[0][0] <= self._clock():
            _, _, queue_id, state = heapq.heappop(self._heap)
            del self._current[queue_id]
            return queue_id, state
        return None

    def seconds_until_due(self) -> float | None:
        self._drop_stale()
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

    def bring_forward(self, latest: float) -> int:
        """Make every message due later than now but by `latest` due now (the reason they
        waited, a paused upstream, is gone). Returns how many."""
        now = self._clock()
        moved = 0
        for queue_id, (due, state) in list(self._current.items()):
            if now < due <= latest:
                self._current[queue_id] = (now, state)
                heapq.heappush(self._heap, (now, next(self._seq), queue_id, state))
                moved += 1
        if moved:
            self._changed.set()
        return moved

    def snapshot(self) -> list[tuple[str, State]]:
        """Every scheduled message and its state, in no particular order."""
        return [(queue_id, state) for queue_id, (_, state) in self._current.items()]

    def discard(self, queue_id: str) -> None:
        """Forget a message (it went elsewhere); its heap item is skipped when it surfaces."""
        self._current.pop(queue_id, None)

    def state_of(self, queue_id: str) -> State | None:
        """The state the message was scheduled in, or None when it is not scheduled."""
        known = self._current.get(queue_id)
        return None if known is None else known[1]
