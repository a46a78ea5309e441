"""Two mailboxes behind one relay: routing by sender domain, and a throttled mailbox that
never holds up the other one."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import MAILBOX, RelayFactory, exchange_config
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.pki import TestPKI
from tests.relayproc import queue_id_of, spool_meta, spool_state, wait_until

INVOICES = "invoices@contoso.com"
ERP = "billing@erp.contoso.com"


def message(n: int, sender: str) -> bytes:
    return (
        f"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\nMessage-ID: <route-{n}@contoso.com>\r\n"
        f"From: <{sender}>\r\nTo: <ap@example.org>\r\nSubject: {n}\r\n\r\nbody {n}\r\n"
    ).encode()


def two_mailboxes(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, exchange: FakeExchange
) -> dict[str, dict[str, object]]:
    exchange.add_mailbox(INVOICES, send_as=[ERP])
    sections = exchange_config(tmp_path, pki, entra, exchange)
    invoices = {**sections["upstream"], "mailbox": INVOICES, "send_as": ["@erp.contoso.com"]}
    sections["upstreams.invoices"] = invoices
    sections["upstreams.invoices.oauth"] = dict(sections["upstream.oauth"])
    # write_config writes the section "[route]" as [[route]]: an array of tables
    sections["[route]"] = {"sender": ["@erp.contoso.com"], "upstream": "invoices"}
    return sections


def test_messages_are_routed_to_their_mailbox(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    relay_factory: RelayFactory,
) -> None:
    relay = relay_factory(two_mailboxes(tmp_path, pki, entra, exchange))
    relay.submit(ERP, ["ap@example.org"], message(1, ERP))
    relay.submit(MAILBOX, ["ap@example.org"], message(2, MAILBOX))
    received = {m.message_id_reply: m for m in exchange.wait_for_messages(2, timeout=20)}
    assert received["<route-1@contoso.com>"].auth_user == INVOICES
    assert received["<route-1@contoso.com>"].mail_from == ERP  # permitted: kept
    assert received["<route-2@contoso.com>"].auth_user == MAILBOX
    relay.wait_for_log(r"ready: .* upstreams=default:exchange-online,invoices:exchange-online")


def test_a_throttled_mailbox_never_holds_up_the_other_and_loses_nothing(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    relay_factory: RelayFactory,
) -> None:
    """Exchange allows 3 messages a minute per mailbox here and the relay's budget is off
    (to provoke the throttling): the invoices mailbox gets throttled and paused, its messages
    wait in the queue, and the default mailbox's messages are delivered meanwhile."""
    exchange.messages_per_minute = 3
    relay = relay_factory(two_mailboxes(tmp_path, pki, entra, exchange))
    erp_ids = [
        queue_id_of(relay.submit(ERP, ["ap@example.org"], message(n, ERP))[1]) for n in range(6)
    ]
    relay.wait_for_log(r"upstream invoices paused for 60s \(throttled\)")
    other_ids = [
        queue_id_of(relay.submit(MAILBOX, ["ap@example.org"], message(10 + n, MAILBOX))[1])
        for n in range(3)
    ]
    spool = tmp_path / "spool"
    wait_until(lambda: all(spool_state(spool, q) is None for q in other_ids), 20, "default drained")
    by_mailbox = [m.auth_user for m in exchange.messages]
    assert by_mailbox.count(MAILBOX) == 3
    assert by_mailbox.count(INVOICES) == 3
    waiting = [q for q in erp_ids if spool_state(spool, q) is not None]
    assert len(waiting) == 3
    for queue_id in waiting:
        assert spool_state(spool, queue_id) in ("deferred", "incoming")
        assert all(r["state"] == "pending" for r in spool_meta(spool, queue_id)["recipients"])
    assert not list((spool / "failed").iterdir())
    assert exchange.throttled >= 1
