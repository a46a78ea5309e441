"""Fallback between upstreams, end to end: the real daemon in front of the fake Exchange Online
and the fake Graph, both on one mailbox, with `[[route]] upstream = [...]`.

When Exchange turns SMTP AUTH off (535 5.7.139) the mail flows through Graph while the SMTP
upstream shows paused, and it returns to SMTP once SMTP AUTH is back; messages queued for the
closed upstream move over, and new ones go straight to the open one; a message too large for
Graph goes by SMTP instead of failing. Which upstream answered is recorded per recipient."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLIENT_ID, CLIENT_SECRET, MAILBOX, RelayFactory, exchange_config
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.graph import FakeGraph
from tests.fakes.pki import TestPKI
from tests.relayproc import RelayProcess, queue_id_of, spool_meta, spool_state, wait_until

TIMEOUT = 30
SENDERS = ["scanner@contoso.com", "jürgen@contoso.com"]  # the fake mailbox's Send As


def message(n: int, lines: int = 0) -> bytes:
    return (
        f"From: Scanner <scanner@contoso.com>\r\nTo: Bob <bob@example.org>\r\n"
        f"Subject: scan {n}\r\nMessage-ID: <fallback-{n}@contoso.com>\r\n\r\nscan {n}\r\n"
    ).encode() + b"".join(b"%05d" % i + b"x" * 71 + b"\r\n" for i in range(lines))


def fallback_config(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    graph: FakeGraph,
    *,
    route: list[str],
    delivery: dict[str, str],
    **graph_settings: Any,
) -> dict[str, dict[str, Any]]:
    overrides = {f"delivery.{key}": value for key, value in delivery.items()}
    sections = exchange_config(tmp_path, pki, entra, exchange, **overrides)
    sections["upstreams.graph"] = {
        "kind": "graph",
        "mailbox": MAILBOX,
        "graph_base_url": graph.base_url,
        "tls_ca_file": str(pki.ca_file),
        "send_as": SENDERS,
        "messages_per_minute": 0,
        **graph_settings,
    }
    sections["upstreams.graph.oauth"] = dict(sections["upstream.oauth"])
    sections["[route]"] = {"upstream": route}  # written as [[route]]
    return sections


StartRelay = Callable[..., RelayProcess]


@pytest.fixture
def start_relay(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    graph: FakeGraph,
    relay_factory: RelayFactory,
) -> StartRelay:
    """`start_relay(route=[...], delivery={...}, **graph_settings)`: the daemon in front of
    both fakes."""

    def start(*, route: list[str], delivery: dict[str, str], **graph_settings: Any) -> RelayProcess:
        sections = fallback_config(
            tmp_path, pki, entra, exchange, graph, route=route, delivery=delivery, **graph_settings
        )
        return relay_factory(sections)

    return start


def submit(relay: RelayProcess, recipients: list[str], data: bytes) -> str:
    code, reply = relay.submit("scanner@contoso.com", recipients, data)
    assert code == 250, reply
    return queue_id_of(reply)


def smtp_auth(exchange: FakeExchange, *, enabled: bool) -> None:
    exchange.add_mailbox(MAILBOX, send_as=SENDERS, smtp_auth_enabled=enabled)


def by_message_id(graph: FakeGraph) -> dict[str, Any]:
    found = {}
    for sent in graph.sent:
        for line in sent.mime.split(b"\r\n"):
            if line.startswith(b"Message-ID: "):
                found[line[12:].decode()] = sent
    return found


def test_smtp_auth_off_sends_through_graph_and_returns_to_smtp_when_it_is_back(
    tmp_path: Path,
    entra: FakeEntra,
    exchange: FakeExchange,
    graph: FakeGraph,
    start_relay: StartRelay,
) -> None:
    smtp_auth(exchange, enabled=False)
    relay = start_relay(route=["default", "graph"], delivery={"setup_pause": "2s"})
    first = submit(relay, ["bob@example.org", "hidden@example.com"], message(1))

    [sent] = graph.wait_for_sent(1, TIMEOUT)
    assert sent.to == ("bob@example.org",) and sent.bcc == ("hidden@example.com",)
    relay.wait_for_log(r"upstream default paused for \d+s \(configuration\): .*5\.7\.139")
    relay.wait_for_log(
        rf"\[{first}\] handed over from upstream default to graph "
        r"\(default is paused: configuration\)"
    )
    relay.wait_for_log(rf"\[{first}\] to=<hidden@example.com> delivered via graph: 250")
    wait_until(lambda: spool_state(tmp_path / "spool", first) is None, TIMEOUT, "delivered")
    metrics = relay.metrics()
    assert metrics['relay_upstream_paused{upstream="default"}'] == 1
    handed = 'relay_handovers_total{reason="configuration",to="graph",upstream="default"}'
    assert metrics[handed] >= 1
    assert metrics['relay_recipients_total{outcome="delivered",upstream="graph"}'] == 2
    assert metrics['relay_recipients_total{outcome="delivered",upstream="default"}'] == 0
    assert exchange.messages == []

    smtp_auth(exchange, enabled=True)  # the admin turns SMTP AUTH back on
    wait_until(lambda: relay.http_status("/readyz") == 200, TIMEOUT, "the pause to end")
    again = submit(relay, ["bob@example.org"], message(2))
    [back] = exchange.wait_for_messages(1, TIMEOUT)
    assert b"Message-ID: <fallback-2@contoso.com>" in back.data
    relay.wait_for_log(rf"\[{again}\] to=<bob@example.org> delivered via default: 250")
    relay.wait_for_log("upstream default works again")
    metrics = relay.metrics()
    assert metrics['relay_upstream_paused{upstream="default"}'] == 0
    assert metrics['relay_recipients_total{outcome="delivered",upstream="default"}'] == 1
    assert len(graph.sent) == 1


def test_queued_mail_moves_over_and_new_mail_goes_straight_to_the_open_upstream(
    tmp_path: Path,
    entra: FakeEntra,
    exchange: FakeExchange,
    graph: FakeGraph,
    start_relay: StartRelay,
) -> None:
    slow = {"setup_pause": "1h", "retry_initial": "1h", "retry_max": "1h"}
    relay = start_relay(route=["default", "graph"], delivery=slow)
    closing_channel = "421 4.3.2 Service not available, closing transmission channel"
    exchange.inject("eod", closing_channel, times=3, close=True)  # no session is left open
    deferred = [submit(relay, [f"user{n}@example.org"], message(n)) for n in range(3)]
    for queue_id in deferred:  # each waits an hour for its next try
        wait_until(
            lambda q=queue_id: spool_state(tmp_path / "spool", q) == "deferred", TIMEOUT, "deferred"
        )

    smtp_auth(exchange, enabled=False)
    closing = submit(relay, ["user3@example.org"], message(3))  # finds the upstream closed
    graph.wait_for_sent(4, TIMEOUT)
    for queue_id in (closing, *deferred):
        relay.wait_for_log(rf"\[{queue_id}\] handed over from upstream default to graph")
        wait_until(
            lambda q=queue_id: spool_state(tmp_path / "spool", q) is None, TIMEOUT, "delivered"
        )
    assert set(by_message_id(graph)) == {f"<fallback-{n}@contoso.com>" for n in range(4)}

    later = submit(relay, ["late@example.org"], message(4))  # default is paused for an hour
    graph.wait_for_sent(5, TIMEOUT)
    relay.wait_for_log(rf"\[{later}\] to=<late@example.org> delivered via graph")
    assert f"[{later}] handed over" not in relay.log_text()
    assert exchange.messages == []
    assert not list((tmp_path / "spool" / "failed").iterdir())


def test_a_message_too_large_for_graph_goes_by_smtp_and_each_recipient_records_its_upstream(
    tmp_path: Path,
    entra: FakeEntra,
    exchange: FakeExchange,
    graph: FakeGraph,
    start_relay: StartRelay,
) -> None:
    relay = start_relay(
        route=["graph", "default"], delivery={"setup_pause": "1h"}, max_request_size=65536
    )
    exchange.inject("rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", rcpt="gone@example.org")
    small = submit(relay, ["bob@example.org"], message(1))
    big = submit(relay, ["bob@example.org", "gone@example.org"], message(2, lines=1000))

    [sent] = graph.wait_for_sent(1, TIMEOUT)
    assert b"<fallback-1@contoso.com>" in sent.mime
    [received] = exchange.wait_for_messages(1, TIMEOUT)
    assert b"Message-ID: <fallback-2@contoso.com>" in received.data
    assert received.data.endswith(b"00999" + b"x" * 71 + b"\r\n")  # whole, never truncated
    assert received.data.count(b"x" * 71 + b"\r\n") == 1000
    relay.wait_for_log(
        rf"\[{big}\] handed over from upstream graph to default \(refused for its size\)"
    )
    wait_until(lambda: spool_state(tmp_path / "spool", big) == "failed", TIMEOUT, "failed/")
    entry = spool_meta(tmp_path / "spool", big)
    assert entry["route"] == ["graph", "default"] and entry["refused"] == ["graph"]
    assert [(r["address"], r["state"], r["via"]) for r in entry["recipients"]] == [
        ("bob@example.org", "delivered", "default"),
        ("gone@example.org", "failed", "default"),
    ]
    assert "5.3.4" in entry["history"][0]["reply"]  # graph's refusal stays in the history
    metrics = relay.metrics()
    assert metrics['relay_handovers_total{reason="size",to="default",upstream="graph"}'] == 1
    assert metrics['relay_upstream_paused{upstream="graph"}'] == 0
    wait_until(lambda: spool_state(tmp_path / "spool", small) is None, TIMEOUT, "delivered")


def test_two_closed_upstreams_keep_their_mail_and_hand_it_over_once_one_works(
    tmp_path: Path,
    entra: FakeEntra,
    exchange: FakeExchange,
    graph: FakeGraph,
    start_relay: StartRelay,
) -> None:
    """Both closed: nothing is passed back and forth while their pauses run out and are
    renewed; once Graph works again, what the SMTP upstream holds moves to it."""
    smtp_auth(exchange, enabled=False)
    entra.register_app(CLIENT_ID, secret=CLIENT_SECRET, roles=("SMTP.SendAsApp",))  # no Mail.Send
    every_second = {"setup_pause": "1s", "retry_initial": "1s", "retry_max": "1s"}
    relay = start_relay(route=["default", "graph"], delivery=every_second)
    first = submit(relay, ["bob@example.org"], message(1))
    relay.wait_for_log(rf"\[{first}\] handed over from upstream default to graph")
    relay.wait_for_log(r"upstream graph paused for \d+s \(configuration\): .*Mail\.Send")
    held = [submit(relay, [f"user{n}@example.org"], message(n)) for n in range(2, 5)]
    for cycle in range(3):  # default's pause runs out and is renewed: nothing moves back
        relay.wait_for_log(r"upstream default paused", since=len(relay.lines))
    metrics = relay.metrics()
    handed = 'relay_handovers_total{reason="configuration",to="graph",upstream="default"}'
    assert metrics[handed] == 1
    assert (
        metrics.get(
            'relay_handovers_total{reason="configuration",to="default",upstream="graph"}', 0
        )
        == 0
    )
    assert graph.sent == [] and exchange.messages == []

    entra.register_app(CLIENT_ID, secret=CLIENT_SECRET, roles=("SMTP.SendAsApp", "Mail.Send"))
    graph.wait_for_sent(4, TIMEOUT)  # graph works: the first, then what default held
    relay.wait_for_log("upstream graph works again")
    for queue_id in (first, *held):
        wait_until(
            lambda q=queue_id: spool_state(tmp_path / "spool", q) is None, TIMEOUT, "delivered"
        )
    assert exchange.messages == []
