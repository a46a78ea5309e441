"""The mailbox budget, with a simulated clock: never more than Exchange's limits in any
rolling window, and spread evenly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.pacing import DAY, MINUTE, Budget, Pacer


def drain(pacer: Pacer, messages: int, recipients: int = 1, start: float = 0.0) -> list[float]:
    """Send `messages` as fast as the pacer allows; return the send times."""
    now, sent = start, []
    while len(sent) < messages:
        wait = pacer.acquire(now, recipients)
        if wait > 0:
            now += wait
            continue
        sent.append(now)
    return sent


def max_in_window(times: list[float], window: float) -> int:
    best, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - window:
            first += 1
        best = max(best, last - first + 1)
    return best


def test_unlimited_never_waits() -> None:
    pacer = Pacer(Budget())
    assert drain(pacer, 1000) == [0.0] * 1000


def test_a_burst_of_45_drains_in_about_90_seconds_evenly() -> None:
    times = drain(Pacer(Budget(messages_per_minute=30)), 45)
    assert times[0] == 0.0
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(2.0 <= gap <= 2.1 for gap in gaps), gaps  # even, with a hair of margin
    assert 85 <= times[-1] <= 90
    assert max_in_window(times, MINUTE) <= 30


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=120),
    st.lists(st.floats(min_value=0, max_value=30, allow_nan=False), min_size=1, max_size=200),
)
def test_never_more_than_the_limit_in_any_rolling_minute(limit: int, gaps: list[float]) -> None:
    """Messages arriving at arbitrary times: the sends never exceed the limit per minute."""
    pacer, now, sent = Pacer(Budget(messages_per_minute=limit)), 0.0, []
    for gap in gaps:
        now += gap
        while (wait := pacer.acquire(now, 1)) > 0:
            now += wait
        sent.append(now)
    assert max_in_window(sent, MINUTE) <= limit
    assert sent == sorted(sent)


def test_recipients_per_day() -> None:
    pacer = Pacer(Budget(recipients_per_day=10_000))
    times = drain(pacer, 21, recipients=500)
    assert times[:20] == [0.0] * 20
    assert DAY <= times[20] <= DAY + 1


def test_reserve_message_takes_the_slot_and_recipients_are_added_later() -> None:
    pacer = Pacer(Budget(messages_per_minute=60, recipients_per_day=3))
    assert pacer.reserve_message(0.0) == 0
    assert pacer.reserve_message(0.0) == 1.0  # next slot one second later, not taken
    assert pacer.recipient_delay(0.0, 3) == 0
    pacer.take_recipients(0.0, 3)
    assert pacer.recipient_delay(0.0, 1) > DAY - 1
    assert pacer.reserve_message(1.0) == 0


def test_a_message_larger_than_the_daily_budget_waits_for_an_empty_day() -> None:
    pacer = Pacer(Budget(recipients_per_day=100))
    assert pacer.acquire(0.0, 10) == 0
    assert 0 < pacer.delay(1.0, 500) <= DAY
    assert pacer.delay(DAY + 1, 500) == 0


def test_a_released_slot_is_free_again() -> None:
    """A slot taken for a message that was then not sent (claimed elsewhere, session failed)
    goes back, so failures do not eat the mailbox's rate."""
    pacer = Pacer(Budget(messages_per_minute=30))
    assert pacer.reserve_message(0.0) == 0
    assert pacer.reserve_message(0.0) == 2.0
    pacer.release_message()
    assert pacer.reserve_message(0.0) == 0
