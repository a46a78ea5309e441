"""What real copiers, ERPs, GLPI and scripts send (tests/fixtures/devices, captured-style
samples), replayed byte for byte through the daemon to the fake Exchange Online: every one is
delivered, to exactly its envelope recipients, with CRLF line ends, no line over 998 octets,
no Bcc: header, Date/Message-ID/From present and a From: the mailbox may send as."""

from __future__ import annotations

import email
import email.policy
import json
import re
import smtplib
from email.utils import getaddresses
from pathlib import Path

import pytest

from tests.conftest import MAILBOX, RelayWith
from tests.fakes.exchange import FakeExchange
from tests.relayproc import RelayProcess, queue_id_of, strip_trace

DEVICES = Path(__file__).resolve().parents[1] / "fixtures" / "devices"
ENVELOPES = json.loads((DEVICES / "envelopes.json").read_text(encoding="utf-8"))
PERMITTED = {MAILBOX, "scanner@contoso.com", "jürgen@contoso.com"}


def replay(relay: RelayProcess, name: str) -> str:
    """Send one sample the way its device does (HELO or EHLO, its MAIL parameters, the exact
    bytes); the devices that never say QUIT just close. Returns the queue id."""
    envelope = ENVELOPES[name]
    data = (DEVICES / name).read_bytes()
    client = smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30)
    if envelope["greeting"] == "HELO":
        client.helo(envelope["helo"])
    else:
        client.ehlo(envelope["helo"])
    code, reply = client.mail(envelope["mail_from"], envelope["mail_params"])
    assert code == 250, (name, code, reply)
    for rcpt in envelope["rcpt_to"]:
        code, reply = client.rcpt(rcpt)
        assert code == 250, (name, code, reply)
    code, reply = client.data(data)
    assert code == 250, (name, code, reply)
    if "without QUIT" in envelope.get("session", ""):
        client.close()
    else:
        client.quit()
    return queue_id_of(reply)


@pytest.mark.timeout(180)
def test_every_device_sample_is_delivered_clean(
    relay_with: RelayWith,
    exchange: FakeExchange,
) -> None:
    relay = relay_with()
    names = sorted(ENVELOPES)
    assert len(names) == 17
    sent = {replay(relay, name): name for name in names}
    delivered = exchange.wait_for_messages(len(names), timeout=120)
    assert exchange.replies["550 5.6.11"] == 0, "a bare LF reached Exchange"
    by_name = {}
    for message in delivered:
        match = re.match(
            rb"Received: from [^\r\n]*\r\n\tby \S+ \(oauth-relay\) with \S+ id (\w+);", message.data
        )
        assert match is not None
        by_name[sent[match.group(1).decode()]] = message
    assert set(by_name) == set(names)
    for name, message in by_name.items():
        envelope = ENVELOPES[name]
        assert message.rcpt_tos == tuple(envelope["rcpt_to"]), name
        assert message.mail_from in PERMITTED, name
        data = message.data
        assert re.search(rb"(?<!\r)\n|\r(?!\n)", data) is None, f"{name}: bare CR or LF"
        assert max(len(line) for line in data.split(b"\r\n")) <= 998, name
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert "Bcc" not in parsed, name
        for header in ("Date", "Message-ID", "From"):
            assert parsed[header], f"{name}: no {header}"
        senders = {address.lower() for _, address in getaddresses(parsed.get_all("From", []))}
        assert senders <= {a.lower() for a in PERMITTED}, (name, senders)


def test_a_netcat_script_ending_with_bare_lf_dot_is_not_acknowledged_and_logged(
    exchange_relay: RelayProcess, tmp_path: Path
) -> None:
    """transcripts/t5: `echo ... | nc`: bare LF everywhere, '.' + LF at the end, then EOF."""
    import socket

    script = (
        b"ehlo srv-files01\n"
        b"MAIL FROM: <backup-script@srv-files01.contoso.local>\n"
        b"RCPT TO: it-ops@contoso.com\n"
        b"DATA\n"
        + (DEVICES / "15_shell_nc_script_no_header_separator.eml").read_bytes()
        + b".\nquit\n"
    )
    with socket.create_connection(("127.0.0.1", exchange_relay.smtp_port), timeout=10) as sock:
        sock.sendall(script)
        sock.shutdown(socket.SHUT_WR)
        replies = b""
        while chunk := sock.recv(4096):
            replies += chunk
    assert b"354 " in replies
    assert b"queued as" not in replies
    exchange_relay.wait_for_log(r"ended DATA with a bare LF dot")
    assert not list((tmp_path / "spool" / "incoming").iterdir())
    metrics = exchange_relay.metrics()
    assert metrics['relay_messages_received_total{result="bare_lf_end"}'] == 1


def test_a_copier_sending_as_its_own_address_is_delivered_as_the_mailbox(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    """Sample 01 (Canon): envelope and From: scanner@printer.local, which Exchange would
    refuse (SendAsDenied): rewritten envelope and From:, Reply-To: the device's address."""
    queue_id = replay(exchange_relay, "01_canon_mfp_scan_qp_multipart.eml")
    [received] = exchange.wait_for_messages(1, timeout=20)
    assert received.mail_from == MAILBOX
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    [(display, address)] = getaddresses(parsed.get_all("From", []))
    assert address == MAILBOX
    assert display  # the device's name is kept as the display name
    assert getaddresses(parsed.get_all("Reply-To", [])) == [("", "scanner@printer.local")]
    exchange_relay.wait_for_log(
        rf"\[{queue_id}\] sender policy: envelope sender scanner@printer.local"
    )
    exchange_relay.wait_for_log(rf"\[{queue_id}\] sender policy: From: ")


def test_a_permitted_sender_with_from_header_keep_arrives_byte_for_byte(
    relay_with: RelayWith,
    exchange: FakeExchange,
) -> None:
    """GLPI (sample 08, well formed) sending as a permitted address with from_header = keep:
    what Exchange receives is exactly what GLPI sent, under the relay's Received: line."""
    relay = relay_with(**{"upstream.from_header": "keep", "upstream.send_as": ["@contoso.com"]})
    exchange.add_mailbox(MAILBOX, send_as=["glpi@contoso.com", "helpdesk@contoso.com"])
    name = "08_glpi10_ticket_followup_sender_header.eml"
    queue_id = replay(relay, name)
    [received] = exchange.wait_for_messages(1, timeout=20)
    assert strip_trace(received.data, queue_id) == (DEVICES / name).read_bytes()
    assert received.mail_from == ENVELOPES[name]["mail_from"]
