"""Issue #4: every metric moves in an end-to-end run against the fakes, as scraped over HTTP
from /metrics, and /readyz turns unready while the upstream is paused.

Each test scrapes before an action and after it, and asserts the change: a metric that stays
still (or moves when it should not) fails. Waits are on conditions with a timeout.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay import __version__
from relay.spool import new_queue_id
from tests.conftest import MAILBOX, RelayWith
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.relayproc import RelayProcess, queue_id_of, spool_state, wait_until

MESSAGE = (
    b"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\n"
    b"From: Relay <relay@contoso.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: metrics\r\n"
    b"Message-ID: <metrics-1@contoso.com>\r\n"
    b"\r\n"
    b"Hello Bob\r\n"
)
BOB = "bob@example.org"
UP = 'upstream="default"'
TEMPORARY = "451 4.4.0 STOREDRV.Submission.Exception:StorageTransientException"
NOT_FOUND = "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address"

ACCEPTED = 'relay_messages_received_total{result="accepted"}'
DELIVERED = "relay_messages_delivered_total"
DEFERRED = "relay_messages_deferred_total"
REJECTED = 'relay_messages_failed_total{reason="rejected"}'
EXPIRED = 'relay_messages_failed_total{reason="expired"}'
RCPT_DELIVERED = 'relay_recipients_total{outcome="delivered",upstream="default"}'
RCPT_DEFERRED = 'relay_recipients_total{outcome="deferred",upstream="default"}'
RCPT_FAILED = 'relay_recipients_total{outcome="failed",upstream="default"}'
AMBIGUOUS = "relay_delivery_ambiguous_total"
HELD = "relay_messages_held_total"
FAILURE_NOTICES = 'relay_notices_queued_total{kind="failure"}'
DELAY_NOTICES = 'relay_notices_queued_total{kind="delay"}'
TOKEN_OK = 'relay_token_requests_total{result="ok"}'
TOKEN_ERROR = 'relay_token_requests_total{result="error"}'
LATENCY_COUNT = "relay_delivery_latency_seconds_count"
SIZE_COUNT = "relay_message_size_bytes_count"
SIZE_SUM = "relay_message_size_bytes_sum"
PAUSED = f"relay_upstream_paused{{{UP}}}"
TOKEN_EXPIRY = f"relay_token_expiry_seconds{{{UP}}}"
SINCE_DELIVERY = f"relay_seconds_since_last_delivery{{{UP}}}"
SESSIONS = "relay_smtp_sessions_open"
OLDEST = "relay_queue_oldest_age_seconds"
RECOVERED = "relay_recovered_in_flight_total"
QUARANTINED = "relay_spool_quarantined_total"


def attempts(outcome: str) -> str:
    return f'relay_delivery_attempts_total{{outcome="{outcome}",{UP}}}'


def pauses(reason: str) -> str:
    return f'relay_upstream_pauses_total{{reason="{reason}",{UP}}}'


def queued(state: str) -> str:
    return f'relay_queue_messages{{state="{state}"}}'


def received(result: str) -> str:
    return f'relay_messages_received_total{{result="{result}"}}'


def moves(before: Mapping[str, float], after: Mapping[str, float], keys: Any) -> dict[str, float]:
    """How far each metric moved; a series that does not exist yet counts as 0."""
    return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in keys}


def wait_for_counters(
    relay: RelayProcess,
    before: Mapping[str, float],
    expected: Mapping[str, float],
    timeout: float = 20.0,
) -> dict[str, float]:
    """Scrape until every counter in `expected` moved at least that far, then assert each moved
    exactly that far (0: must not move). Returns the last scrape."""
    scraped: dict[str, float] = {}

    def reached() -> bool:
        scraped.clear()
        scraped.update(relay.metrics())
        return all(d >= expected[k] for k, d in moves(before, scraped, expected).items())

    try:
        wait_until(reached, timeout, "the counters to move", interval=0.05)
    except AssertionError:
        pass  # reported below, with every counter's movement
    assert moves(before, scraped, expected) == dict(expected), relay.log_text()[-3000:]
    return scraped


def settle(relay: RelayProcess) -> dict[str, float]:
    """Wait until nothing waits in the spool, then scrape once more (late increments show)."""
    waiting = [queued(s) for s in ("incoming", "active", "deferred")]
    wait_until(
        lambda: not any(relay.metrics()[k] for k in waiting), 20, "an empty queue", interval=0.05
    )
    return relay.metrics()


# --- message outcomes: accept, deliver, defer, fail, ambiguous ---------------------------------


@dataclass
class Outcome:
    """One message through the relay: the faults set up in the fake, the counters' expected
    movements once everything (notices included) has settled."""

    overrides: dict[str, Any]
    faults: Callable[[FakeExchange], None]
    expected: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)


OUTCOMES = {
    "delivered": Outcome(
        {},
        lambda exchange: None,
        {
            ACCEPTED: 1,
            SIZE_COUNT: 1,
            DELIVERED: 1,
            RCPT_DELIVERED: 1,
            attempts("delivered"): 1,
            LATENCY_COUNT: 1,
            TOKEN_OK: 1,
            TOKEN_ERROR: 0,
            DEFERRED: 0,
            RCPT_DEFERRED: 0,
            REJECTED: 0,
        },
    ),
    "deferred then delivered": Outcome(
        {},
        lambda exchange: exchange.inject("eod", TEMPORARY),
        {
            ACCEPTED: 1,
            DEFERRED: 1,
            RCPT_DEFERRED: 1,
            attempts("deferred"): 1,
            DELIVERED: 1,
            RCPT_DELIVERED: 1,
            attempts("delivered"): 1,
            LATENCY_COUNT: 1,
            REJECTED: 0,
        },
    ),
    "rejected, failure notice delivered": Outcome(
        {},
        lambda exchange: exchange.inject("rcpt", NOT_FOUND, rcpt=BOB),
        {
            ACCEPTED: 1,
            REJECTED: 1,
            RCPT_FAILED: 1,
            attempts("failed"): 1,
            FAILURE_NOTICES: 1,
            # the notice to the sender is a message of its own, delivered like any other
            DELIVERED: 1,
            RCPT_DELIVERED: 1,
            attempts("delivered"): 1,
            LATENCY_COUNT: 1,
            SIZE_COUNT: 1,  # received messages only, never notices
            DEFERRED: 0,
            EXPIRED: 0,
        },
        extra={queued("failed"): 1},
    ),
    "deferred past warn_after, delay notice": Outcome(
        {"delivery.warn_after": "0.5s"},
        lambda exchange: exchange.inject("rcpt", TEMPORARY, rcpt=BOB, times=3),
        {
            ACCEPTED: 1,
            DEFERRED: 3,
            RCPT_DEFERRED: 3,
            attempts("deferred"): 3,
            DELAY_NOTICES: 1,
            DELIVERED: 2,  # the message, at last, and the delay notice
            attempts("delivered"): 2,
            FAILURE_NOTICES: 0,
        },
    ),
    "expired past max_age, failure notice delivered": Outcome(
        {"delivery.max_age": "1s"},
        lambda exchange: exchange.inject("rcpt", TEMPORARY, rcpt=BOB, times=1000),
        {
            ACCEPTED: 1,
            EXPIRED: 1,
            attempts("failed"): 1,
            FAILURE_NOTICES: 1,
            DELIVERED: 1,  # the notice
            REJECTED: 0,
        },
        extra={queued("failed"): 1},
    ),
    "ambiguous, resent": Outcome(
        {},
        lambda exchange: exchange.drop_after_eod(delivered=True),
        {
            ACCEPTED: 1,
            AMBIGUOUS: 1,
            DEFERRED: 1,
            attempts("deferred"): 1,
            DELIVERED: 1,
            attempts("delivered"): 1,
            HELD: 0,
            attempts("ambiguous"): 0,
        },
    ),
    "ambiguous, held": Outcome(
        {"delivery.on_ambiguous": "hold"},
        lambda exchange: exchange.drop_after_eod(delivered=True),
        {
            ACCEPTED: 1,
            AMBIGUOUS: 1,
            HELD: 1,
            attempts("ambiguous"): 1,
            DELIVERED: 0,
            DEFERRED: 0,
        },
        extra={queued("hold"): 1},
    ),
}


@pytest.mark.parametrize("case", list(OUTCOMES.values()), ids=list(OUTCOMES))
def test_message_outcomes_move_their_counters(
    case: Outcome, relay_with: RelayWith, exchange: FakeExchange
) -> None:
    relay = relay_with(**case.overrides)
    before = relay.metrics()
    case.faults(exchange)

    code, _ = relay.submit(MAILBOX, [BOB], MESSAGE)
    assert code == 250

    wait_for_counters(relay, before, case.expected)
    after = settle(relay)
    assert moves(before, after, case.expected) == case.expected, "moved again after settling"
    assert moves(before, after, case.extra) == case.extra


def test_accepted_message_size_is_observed(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    before = exchange_relay.metrics()
    exchange_relay.submit(MAILBOX, [BOB], MESSAGE)
    after = wait_for_counters(exchange_relay, before, {SIZE_COUNT: 1})
    size = moves(before, after, [SIZE_SUM])[SIZE_SUM]
    assert len(MESSAGE) < size < len(MESSAGE) + 1024  # as stored: with the Received: line


# --- the upstream: pauses, /readyz, tokens ------------------------------------------------------


def test_unreachable_upstream_pauses_and_readyz_turns_unready_until_it_works(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    relay = exchange_relay
    assert relay.http_status("/readyz") == 200
    before = relay.metrics()
    assert before.get(PAUSED, 0) == 0
    exchange.inject(
        "connect", "421 4.3.2 Service not available, closing transmission channel", close=True
    )
    relay.submit(MAILBOX, [BOB], MESSAGE)

    wait_until(lambda: relay.http_status("/readyz") == 503, 10, "/readyz unready")
    # the message waits out the pause in deferred/, without spending an attempt
    paused = wait_until(
        lambda: (m := relay.metrics())[queued("deferred")] == 1 and m, 5, "message deferred"
    )
    assert paused[PAUSED] == 1
    assert moves(before, paused, [pauses("unreachable"), attempts("no_session")]) == {
        pauses("unreachable"): 1,
        attempts("no_session"): 1,
    }

    wait_until(lambda: relay.http_status("/readyz") == 200, 20, "/readyz ready again")
    after = wait_for_counters(relay, before, {DELIVERED: 1, pauses("unreachable"): 1})
    assert after[PAUSED] == 0


def test_token_failure_counts_an_error_and_pauses_for_configuration(
    exchange_relay: RelayProcess, entra: FakeEntra
) -> None:
    relay = exchange_relay
    before = relay.metrics()
    assert relay.http_status("/readyz") == 200
    entra.fail_next(1, 503, retry_after=0)
    relay.submit(MAILBOX, [BOB], MESSAGE)

    wait_until(lambda: relay.http_status("/readyz") == 503, 10, "/readyz unready")
    paused = relay.metrics()
    assert paused[PAUSED] == 1
    assert moves(before, paused, [TOKEN_ERROR, TOKEN_OK, pauses("configuration")]) == {
        TOKEN_ERROR: 1,
        TOKEN_OK: 0,
        pauses("configuration"): 1,
    }
    assert paused[TOKEN_EXPIRY] == 0  # no token yet

    after = wait_for_counters(relay, before, {DELIVERED: 1, TOKEN_OK: 1, TOKEN_ERROR: 1})
    assert after[PAUSED] == 0
    wait_until(lambda: relay.http_status("/readyz") == 200, 10, "/readyz ready again")


def test_throttling_pauses_the_upstream_but_keeps_it_ready(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    relay = exchange_relay
    before = relay.metrics()
    exchange.inject(
        "eod",
        "421 4.4.2 Message submission rate for this client has exceeded the configured limit",
    )
    relay.submit(MAILBOX, [BOB], MESSAGE)

    after = wait_for_counters(relay, before, {pauses("throttled"): 1, DEFERRED: 1})
    assert after[PAUSED] == 1
    assert relay.http_status("/readyz") == 200  # throttling passes by itself: still ready


def test_token_expiry_is_set_by_the_first_token(exchange_relay: RelayProcess) -> None:
    before = exchange_relay.metrics()
    assert before[TOKEN_EXPIRY] == 0
    exchange_relay.submit(MAILBOX, [BOB], MESSAGE)
    after = wait_for_counters(exchange_relay, before, {DELIVERED: 1})
    assert 3000 < after[TOKEN_EXPIRY] <= 3599


def test_seconds_since_last_delivery_grows_then_resets(exchange_relay: RelayProcess) -> None:
    relay = exchange_relay
    start = relay.metrics()[SINCE_DELIVERY]  # counts from the start: nothing delivered yet
    wait_until(lambda: relay.metrics()[SINCE_DELIVERY] >= start + 1.0, 10, "the gauge to grow")
    before = relay.metrics()
    relay.submit(MAILBOX, [BOB], MESSAGE)
    after = wait_for_counters(relay, before, {DELIVERED: 1})
    assert after[SINCE_DELIVERY] < before[SINCE_DELIVERY] - 0.5


# --- the queue and the SMTP side ----------------------------------------------------------------


def test_queue_depth_and_oldest_age_follow_a_message_in_flight(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    relay = exchange_relay
    before = relay.metrics()
    assert before[queued("active")] == 0
    assert before[OLDEST] == 0
    exchange.stall("eod", 2)
    relay.submit(MAILBOX, [BOB], MESSAGE)

    wait_until(
        lambda: (m := relay.metrics())[queued("active")] == 1 and m[OLDEST] >= 0.5,
        10,
        "one message in active/ for half a second",
        interval=0.05,
    )
    wait_for_counters(relay, before, {DELIVERED: 1})
    wait_until(
        lambda: (m := relay.metrics())[queued("active")] == 0 and m[OLDEST] == 0,
        10,
        "an empty queue",
    )


def test_smtp_sessions_open_counts_client_connections(exchange_relay: RelayProcess) -> None:
    relay = exchange_relay
    assert relay.metrics()[SESSIONS] == 0
    clients = []
    for n in (1, 2):
        client = smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10)
        client.ehlo(f"client-{n}.example")
        clients.append(client)
        wait_until(lambda n=n: relay.metrics()[SESSIONS] == n, 10, f"{n} sessions open")
    for client in clients:
        client.quit()
    wait_until(lambda: relay.metrics()[SESSIONS] == 0, 10, "no session open")


def test_refused_smtp_transactions_are_counted_by_result(relay_with: RelayWith) -> None:
    relay = relay_with(**{"smtp.max_recipients": 1, "smtp.max_message_size": 4096})
    before = relay.metrics()
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo("refused.example")
        assert client.mail(MAILBOX, ["SIZE=5000"])[0] == 552
        assert client.mail(MAILBOX)[0] == 250
        assert client.rcpt(BOB)[0] == 250
        assert client.rcpt("carol@example.org")[0] == 452
    with socket.create_connection(("127.0.0.1", relay.smtp_port), timeout=10) as sock:
        sock.sendall(b"EHLO aborts.example\r\nMAIL FROM:<a@contoso.com>\r\n")
        sock.sendall(b"RCPT TO:<b@example.org>\r\nDATA\r\n")
        with sock.makefile("rb") as replies:  # closed with the socket: the hang-up is real
            while not replies.readline().startswith(b"354"):
                pass
        sock.sendall(b"Subject: cut short\r\n\r\nhalf a mess")  # then hangs up
    with socket.create_connection(
        ("127.0.0.1", relay.smtp_port), timeout=10, source_address=("127.0.0.2", 0)
    ) as sock:
        assert sock.recv(1024).startswith(b"554 ")

    wait_for_counters(
        relay,
        before,
        {
            received("too_big"): 1,
            received("too_many_recipients"): 1,
            received("aborted"): 1,
            received("refused_allowlist"): 1,
            ACCEPTED: 0,
        },
    )


def test_a_huge_declared_size_is_counted_as_too_big(relay_with: RelayWith) -> None:
    relay = relay_with(**{"smtp.max_message_size": 4096})
    before = relay.metrics()
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
        client.ehlo("huge.example")
        code, reply = client.mail(MAILBOX, ["SIZE=100000"])
    assert code == 552
    assert reply.startswith(b"5.3.4 ")  # the relay's own reply, as for a SIZE just too big
    wait_for_counters(relay, before, {received("too_big"): 1}, timeout=2)


# --- the spool: recovery and quarantine -----------------------------------------------------------


def test_a_message_in_flight_at_a_crash_is_counted_as_recovered(
    exchange_relay: RelayProcess, exchange: FakeExchange, tmp_path: Path
) -> None:
    relay = exchange_relay
    exchange.stall("eod", 60)
    queue_id = queue_id_of(relay.submit(MAILBOX, [BOB], MESSAGE)[1])
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) == "active", 10, "in flight")
    assert relay.metrics()[RECOVERED] == 0

    relay.kill()
    exchange.clear_faults()
    relay.start()
    assert relay.metrics()[RECOVERED] == 1
    wait_for_counters(relay, {}, {RECOVERED: 1, DELIVERED: 1})


def test_a_corrupt_spool_entry_is_quarantined_and_counted(
    relay_with: RelayWith, tmp_path: Path
) -> None:
    relay = relay_with(**{"delivery.rescan": "0.2s"})
    before = relay.metrics()
    assert before[queued("corrupt")] == 0
    queue_id = new_queue_id()
    (tmp_path / "spool" / "incoming" / f"{queue_id}.json").write_bytes(b"{not json")

    after = wait_for_counters(relay, before, {QUARANTINED: 1})
    assert after[queued("corrupt")] == 1
    assert spool_state(tmp_path / "spool", queue_id) == "corrupt"


def test_build_info_names_the_running_version(exchange_relay: RelayProcess) -> None:
    build = {k: v for k, v in exchange_relay.metrics().items() if k.startswith("relay_build_info")}
    assert build == {f'relay_build_info{{version="{__version__}"}}': 1}
