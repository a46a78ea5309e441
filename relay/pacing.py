"""Pacing: how fast one mailbox may send, so that Exchange Online never has to throttle it.

One job: decide, for a clock reading, whether a message with n recipients may go now, and if
not, how long to wait. Two budgets per mailbox, both from Exchange's documented limits:
messages per minute (30), spread evenly (one every 2 s) and never more than the limit in any
rolling minute, and recipients per rolling day (10,000). Pure: the time is passed in; nothing
here sleeps. Limits: the counts live in memory, so a restart forgets the day's recipients
(Exchange remembers them; a relay restarted after a 10,000-recipient day may be throttled).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MINUTE = 60.0
DAY = 86_400.0
WINDOW_MARGIN = 0.05  # seconds: stay clear of the rolling window's edge


@dataclass(frozen=True)
class Budget:
    messages_per_minute: int = 0  # 0 = no limit
    recipients_per_day: int = 0  # 0 = no limit

    @property
    def unlimited(self) -> bool:
        return not self.messages_per_minute and not self.recipients_per_day


class Pacer:
    """The sending budget of one mailbox."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._sends: deque[float] = deque()  # times of the last messages, one rolling minute
        self._recipients: deque[tuple[float, int]] = deque()  # (time, count), one rolling day
        self._recipients_today = 0
        self._next_slot = 0.0

    def delay(self, now: float, recipients: int) -> float:
        """Seconds to wait before a message with `recipients` recipients may go (0: now)."""
        self._forget(now)
        return max(self._message_delay(now), self._recipient_delay(now, recipients))

    def take(self, now: float, recipients: int) -> None:
        """Record a message as sent now."""
        self._forget(now)
        if self.budget.messages_per_minute:
            self._sends.append(now)
            self._next_slot = max(self._next_slot, now) + MINUTE / self.budget.messages_per_minute
        self.take_recipients(now, recipients)

    def acquire(self, now: float, recipients: int) -> float:
        """`take` when the message may go now and return 0, else return the wait."""
        wait = self.delay(now, recipients)
        if wait <= 0:
            self.take(now, recipients)
        return wait

    def reserve_message(self, now: float) -> float:
        """Claim the next message slot if it is free now (return 0), else return the wait.
        Recipients are added with `take_recipients` once the message is known."""
        self._forget(now)
        wait = self._message_delay(now)
        if wait <= 0:
            self.take(now, 0)
        return wait

    def release_message(self) -> None:
        """Give back the last reserved slot: the message it was for was not sent."""
        limit = self.budget.messages_per_minute
        if limit and self._sends:
            self._sends.pop()
            self._next_slot -= MINUTE / limit

    def recipient_delay(self, now: float, recipients: int) -> float:
        self._forget(now)
        return self._recipient_delay(now, recipients)

    def take_recipients(self, now: float, recipients: int) -> None:
        if self.budget.recipients_per_day and recipients:
            self._recipients.append((now, recipients))
            self._recipients_today += recipients

    def _message_delay(self, now: float) -> float:
        limit = self.budget.messages_per_minute
        if not limit:
            return 0.0
        spacing = max(0.0, self._next_slot - now)
        window = 0.0
        if len(self._sends) >= limit:
            window = self._sends[-limit] + MINUTE + WINDOW_MARGIN - now
        return max(spacing, window)

    def _recipient_delay(self, now: float, recipients: int) -> float:
        limit = self.budget.recipients_per_day
        if not limit:
            return 0.0
        excess = self._recipients_today + min(recipients, limit) - limit
        if excess <= 0:
            return 0.0
        freed = 0
        for sent_at, count in self._recipients:
            freed += count
            if freed >= excess:
                return max(0.0, sent_at + DAY + WINDOW_MARGIN - now)
        return DAY

    def _forget(self, now: float) -> None:
        while self._sends and self._sends[0] <= now - MINUTE - WINDOW_MARGIN:
            self._sends.popleft()
        while self._recipients and self._recipients[0][0] <= now - DAY:
            _, count = self._recipients.popleft()
            self._recipients_today -= count
