"""Pacing against the fake Exchange with its per-mailbox rate limit on: bursts are accepted at
ingress speed and drained at the allowed rate, with no throttling reply ever provoked."""

from __future__ import annotations

import smtplib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import MAILBOX, RelayWith
from tests.fakes.exchange import FakeExchange
from tests.relayproc import RelayProcess

CLIENTS = 20


def message(n: int) -> bytes:
    return (
        f"From: <{MAILBOX}>\r\nTo: <bob@example.org>\r\nSubject: burst {n}\r\n"
        f"Message-ID: <burst-{n}@contoso.com>\r\n\r\nmessage {n}\r\n"
    ).encode()


def submit_batch(relay: RelayProcess, numbers: range) -> int:
    """One client connection sending several messages, like an ERP flushing its outbox."""
    accepted = 0
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as client:
        for n in numbers:
            client.sendmail(MAILBOX, ["bob@example.org"], message(n))
            accepted += 1
    return accepted


def burst(relay: RelayProcess, total: int) -> float:
    """Submit `total` messages from CLIENTS concurrent clients; return the seconds it took."""
    per_client = total // CLIENTS
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        batches = [range(c * per_client, (c + 1) * per_client) for c in range(CLIENTS)]
        assert sum(pool.map(lambda b: submit_batch(relay, b), batches)) == total
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_burst_of_2000_from_20_clients_drains_at_the_scaled_limit_without_throttling(
    relay_with: RelayWith,
    exchange: FakeExchange,
) -> None:
    """The limit and the relay's budget scaled together (6000/min) to keep the test short."""
    exchange.messages_per_minute = 6000
    exchange.max_concurrent_per_mailbox = 3
    relay = relay_with(**{"upstream.messages_per_minute": 6000, "log.level": "info"})
    accept_seconds = burst(relay, 2000)
    delivered = exchange.wait_for_messages(2000, timeout=240)
    assert len({m.message_id_reply for m in delivered}) == 2000
    assert exchange.throttled == 0
    assert exchange.replies["421 4.4.2"] == 0
    assert exchange.replies["432 4.3.2"] == 0
    # accepted at ingress speed, i.e. much faster than the 20 s the budget needs to drain it
    assert accept_seconds < 20, accept_seconds


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_default_of_30_a_minute_drains_45_in_about_90_seconds(
    relay_with: RelayWith,
    exchange: FakeExchange,
) -> None:
    exchange.messages_per_minute = 30
    relay = relay_with(**{"upstream.messages_per_minute": None})
    started = time.monotonic()
    submit_batch(relay, range(45))
    assert time.monotonic() - started < 10
    exchange.wait_for_messages(45, timeout=150)
    elapsed = time.monotonic() - started
    assert 80 <= elapsed <= 100, elapsed
    assert exchange.throttled == 0
    assert exchange.replies["421 4.4.2"] == 0
