"""dsn.py: failure and delay notices (RFC 3464 / RFC 6522), read back with Python's email parser."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage, Message
from email.utils import format_datetime, parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dsn import (
    DELAY_SUBJECT,
    FAILURE_SUBJECT,
    MAX_DIAGNOSTIC,
    MAX_HEADER_BYTES,
    Notice,
    delay_notice,
    failure_notice,
    notice_recipient,
)
from relay.model import Attempt, QueueEntry, RcptState, Recipient

MTA = "relay.contoso.example"
DAEMON = "MAILER-DAEMON@relay.contoso.example"
SENDER = "scanner@printers.contoso.example"
NOW = datetime(2025, 11, 25, 9, 30, tzinfo=UTC)
RECEIVED = 1_764_000_000.0  # Mon, 24 Nov 2025 16:00:00 +0000
LAST_TRY = 1_764_050_000.0
EXPIRED = (
    "554 5.4.7 delivery time expired: message stayed queued longer than max_age "
    "(last reply: 451 4.4.2 upstream timed out)"
)
UNKNOWN = "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
HEADERS = (
    b"Received: from scanner-2f ([192.168.1.20])\r\n\tby relay with ESMTP\r\n"
    b"From: Scanner <scanner@printers.contoso.example>\r\n"
    b"To: alice@contoso.example, bob@contoso.example\r\n"
    b"Subject: Scan 0042\r\n"
    b"Message-ID: <scan-0042@printers.contoso.example>\r\n"
)


def entry(*recipients: Recipient, **changes: object) -> QueueEntry:
    fields: dict[str, object] = {
        "queue_id": "0193A1B2C3D4E5F60",
        "mail_from": SENDER,
        "recipients": recipients,
        "received_at": RECEIVED,
        "size": 1234,
        "client": "192.168.1.20",
        "helo": "scanner-2f",
        "attempts": 3,
        "history": (Attempt(LAST_TRY, "failed", UNKNOWN),),
    }
    fields.update(changes)
    return QueueEntry(**fields)  # type: ignore[arg-type]


def failed(address: str, reply: str = UNKNOWN) -> Recipient:
    return Recipient(address, RcptState.FAILED, reply)


def fail(e: QueueEntry, headers: bytes = HEADERS, to: str = SENDER) -> Notice:
    return failure_notice(
        e, recipient=to, reporting_mta=MTA, now=NOW, original_headers=headers, from_address=DAEMON
    )


def delay(e: QueueEntry, until: datetime, headers: bytes = HEADERS) -> Notice:
    return delay_notice(
        e,
        recipient=SENDER,
        reporting_mta=MTA,
        now=NOW,
        original_headers=headers,
        from_address=DAEMON,
        will_retry_until=until,
    )


def check_wire(data: bytes) -> None:
    """CRLF only, no line beyond 998 octets, ends with CRLF."""
    assert data.endswith(b"\r\n")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def parse(notice: Notice) -> EmailMessage:
    """Parse, check the multipart/report skeleton and the wire format, return the message."""
    assert notice.mail_from == ""
    check_wire(notice.data)
    msg = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.is_multipart()
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert all(not part.defects for part in msg.walk())
    boundary = msg.get_boundary()
    assert boundary
    # the boundary appears in its parameter, three delimiters and the close delimiter only
    assert notice.data.count(boundary.encode()) == 5
    return msg


def blocks(msg: EmailMessage) -> list[dict[str, str]]:
    """The delivery-status part as header blocks: per-message first, then per-recipient."""
    status = list(msg.iter_parts())[1]
    payload = status.get_payload()
    assert isinstance(payload, list)
    result = []
    for block in payload:
        assert isinstance(block, Message)
        result.append({name: str(value) for name, value in block.items()})
    return result


def text_of(msg: EmailMessage, index: int) -> str:
    part = list(msg.iter_parts())[index]
    assert isinstance(part, EmailMessage)
    content = part.get_content()
    assert isinstance(content, str)
    return content


# --- structure -----------------------------------------------------------------------------------


def test_partially_failed_message_lists_only_the_failed_recipients() -> None:
    e = entry(
        Recipient("alice@contoso.example", RcptState.DELIVERED, "250 2.1.5 Recipient OK"),
        failed("bob@contoso.example"),
        failed("carol@contoso.example", EXPIRED),
    )
    msg = parse(fail(e))

    assert msg["From"] == f"Mail Delivery System <{DAEMON}>"
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert msg["Subject"] == FAILURE_SUBJECT
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"].endswith(f"@{MTA}>")
    assert parsedate_to_datetime(msg["Date"]) == NOW
    assert all(not value.defects for _, value in msg.items())

    per_message, *per_rcpt = blocks(msg)
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert per_message["Received-From-MTA"] == "dns; scanner-2f"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == RECEIVED
    assert per_message["X-Oauth-Relay-Queue-Id"] == "0193A1B2C3D4E5F60"
    assert [b["Final-Recipient"] for b in per_rcpt] == [
        "rfc822; bob@contoso.example",
        "rfc822; carol@contoso.example",
    ]
    assert [b["Action"] for b in per_rcpt] == ["failed", "failed"]
    assert [b["Status"] for b in per_rcpt] == ["5.1.10", "5.4.7"]
    assert [b["Diagnostic-Code"] for b in per_rcpt] == [f"smtp; {UNKNOWN}", f"smtp; {EXPIRED}"]
    for block in per_rcpt:
        assert parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp() == LAST_TRY
        assert "Will-Retry-Until" not in block
    assert b"alice@contoso.example>" not in list(msg.iter_parts())[1].as_bytes()

    text = " ".join(text_of(msg, 0).split())
    assert "0193A1B2C3D4E5F60" in text
    assert "<bob@contoso.example>" in text and "<carol@contoso.example>" in text
    assert "<alice@contoso.example>" not in text
    assert "delivered to 1 other recipient" in text
    assert "misspelled" in text  # 5.1.x in plain words
    assert "longest time a message may wait" in text  # 5.4.7 in plain words
    assert text_of(msg, 2).replace("\r\n", "\n") == HEADERS.decode().replace("\r\n", "\n").strip()


def test_expired_message_reports_status_5_4_7() -> None:
    msg = parse(fail(entry(failed("bob@contoso.example", EXPIRED))))
    (rcpt,) = blocks(msg)[1:]
    assert rcpt["Status"] == "5.4.7"
    assert rcpt["Action"] == "failed"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 554 5.4.7 delivery time expired")


@pytest.mark.parametrize(
    ("reply", "status", "diagnostic"),
    [
        ("550 5.1.1 User unknown", "5.1.1", "smtp; 550 5.1.1 User unknown"),
        ("550 Requested action not taken", "5.0.0", "smtp; 550 Requested action not taken"),
        ("552 4.2.2 mailbox full", "5.2.2", "smtp; 552 4.2.2 mailbox full"),  # class follows Action
        ("550-5.7.1 Relay denied", "5.7.1", "smtp; 550-5.7.1 Relay denied"),
        ("rejected by local policy", "5.0.0", "X-Oauth-Relay; rejected by local policy"),
        ("550 5.\u0661.1 odd digits", "5.0.0", r"smtp; 550 5.\x{661}.1 odd digits"),
        ("550  5.1.1\tspread\r\n out", "5.1.1", "smtp; 550 5.1.1 spread out"),
        ("", "5.0.0", None),
    ],
)
def test_status_and_diagnostic_come_from_the_stored_reply(
    reply: str, status: str, diagnostic: str | None
) -> None:
    (rcpt,) = blocks(parse(fail(entry(failed("bob@contoso.example", reply)))))[1:]
    assert rcpt["Status"] == status
    assert rcpt.get("Diagnostic-Code") == diagnostic


def test_the_body_is_never_included() -> None:
    raw = HEADERS + b"\r\nThe quarterly numbers: SECRET-4711\r\n"
    notice = fail(entry(failed("bob@contoso.example")), headers=raw)
    assert b"SECRET-4711" not in notice.data
    assert "Subject: Scan 0042" in text_of(parse(notice), 2)


def test_bare_lf_original_headers_become_crlf() -> None:
    raw = b"Subject: from a device\nX-Folded: one\n two\n\nbody\n"
    msg = parse(fail(entry(failed("bob@contoso.example")), headers=raw))
    assert text_of(msg, 2) == "Subject: from a device\r\nX-Folded: one\r\n two"


def test_eight_bit_original_headers_are_quoted_printable() -> None:
    raw = "Subject: Rechnung für Jörg\r\nFrom: büro@contoso.example\r\n".encode()
    notice = fail(entry(failed("bob@contoso.example")), headers=raw)
    assert notice.data.isascii() and not notice.smtputf8
    msg = parse(notice)
    part = list(msg.iter_parts())[2]
    assert part.get_content_charset() == "utf-8"
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(msg, 2) == raw.decode().strip()


def test_undecodable_original_header_bytes_stay_visible_as_escapes() -> None:
    raw = "Subject: Grüße\r\n".encode("latin-1")
    msg = parse(fail(entry(failed("bob@contoso.example")), headers=raw))
    assert list(msg.iter_parts())[2].get_content_charset() == "utf-8"
    assert text_of(msg, 2) == r"Subject: Gr\xfc\xdfe"


def test_huge_header_blocks_are_cut_between_fields() -> None:
    field = b"Received: " + b"x" * 88 + b"\r\n\t" + b"y" * 50 + b"\r\n"
    msg = parse(fail(entry(failed("bob@contoso.example")), headers=field * 2000))
    kept = text_of(msg, 2)
    assert len(kept) <= MAX_HEADER_BYTES
    assert kept.endswith("y" * 50)
    assert kept.count("Received: ") == kept.count("\t" + "y" * 50)


# --- non-ASCII -----------------------------------------------------------------------------------


def test_non_ascii_failed_recipient_uses_the_rfc6533_utf8_type() -> None:
    e = entry(failed("jörg+scans@bücher.example", "550 5.1.1 Benutzer jörg unbekannt"))
    notice = fail(e)
    assert notice.data.isascii() and not notice.smtputf8
    msg = parse(notice)
    (rcpt,) = blocks(msg)[1:]
    assert rcpt["Final-Recipient"] == r"utf-8; j\x{F6}rg\x{2B}scans@b\x{FC}cher.example"
    assert rcpt["Diagnostic-Code"] == r"smtp; 550 5.1.1 Benutzer j\x{F6}rg unbekannt"
    assert rcpt["Status"] == "5.1.1"
    text_part = list(msg.iter_parts())[0]
    assert text_part.get_content_charset() == "utf-8"
    text = text_of(msg, 0)
    assert "<jörg+scans@bücher.example>" in text
    assert "Benutzer jörg unbekannt" in text


def test_notice_to_a_non_ascii_sender_needs_smtputf8() -> None:
    e = entry(failed("bob@contoso.example"), mail_from="jörg@bücher.example")
    notice = fail(e, to="jörg@bücher.example")
    assert notice.smtputf8
    assert notice.recipient == "jörg@bücher.example"
    parse(notice)
    utf8 = email.message_from_string(notice.data.decode(), policy=email.policy.default)
    assert utf8["To"].addresses[0].addr_spec == "jörg@bücher.example"


def test_control_characters_never_reach_the_report() -> None:
    reply = "550 5.1.1 evil\x00\x1b[31m\x7f text\u2028more"
    notice = fail(entry(failed("bob\x1b@contoso.example", reply)))
    msg = parse(notice)
    (rcpt,) = blocks(msg)[1:]
    assert rcpt["Final-Recipient"] == r"utf-8; bob\x{1B}@contoso.example"
    assert rcpt["Diagnostic-Code"] == r"smtp; 550 5.1.1 evil\x{00}\x{1B}[31m\x{7F} text more"
    assert "\x1b" not in text_of(msg, 0)


# --- folding and limits --------------------------------------------------------------------------


def test_a_diagnostic_code_longer_than_998_characters_is_folded() -> None:
    reply = "550 5.7.1 " + " ".join(f"reason{i}" for i in range(200))
    assert len(reply) > 998
    notice = fail(entry(failed("bob@contoso.example", reply)))
    msg = parse(notice)
    line = next(x for x in notice.data.split(b"\r\n") if x.startswith(b"Diagnostic-Code:"))
    assert len(line) <= 78
    (rcpt,) = blocks(msg)[1:]
    assert rcpt["Diagnostic-Code"] == f"smtp; {reply}"  # unfolds to the reply exactly


def test_an_unbroken_run_longer_than_998_characters_is_split() -> None:
    reply = "550 5.7.1 " + "x" * 2500
    msg = parse(fail(entry(failed("bob@contoso.example", reply))))
    (rcpt,) = blocks(msg)[1:]
    assert rcpt["Diagnostic-Code"].replace(" ", "") == f"smtp;{reply}".replace(" ", "")


def test_very_long_diagnostics_are_cut() -> None:
    reply = "550 5.7.1 " + "blah " * 5000
    (rcpt,) = blocks(parse(fail(entry(failed("bob@contoso.example", reply)))))[1:]
    assert rcpt["Diagnostic-Code"].endswith("...")
    assert len(rcpt["Diagnostic-Code"]) <= MAX_DIAGNOSTIC + len("X-Oauth-Relay; ...")


# --- delay notices -------------------------------------------------------------------------------


def test_delay_notice_reports_pending_recipients_as_delayed() -> None:
    until = datetime(2025, 11, 29, 16, 0, tzinfo=UTC)
    e = entry(
        Recipient("alice@contoso.example", RcptState.DELIVERED, "250 2.1.5 Recipient OK"),
        Recipient("bob@contoso.example", RcptState.PENDING, "451 4.4.2 upstream timed out"),
        Recipient("carol@contoso.example", RcptState.PENDING, ""),
        failed("dave@contoso.example"),
    )
    notice = delay(e, until)
    msg = parse(notice)
    assert msg["Subject"] == DELAY_SUBJECT
    assert msg["Auto-Submitted"] == "auto-replied"
    per_message, *per_rcpt = blocks(msg)
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert [b["Final-Recipient"] for b in per_rcpt] == [
        "rfc822; bob@contoso.example",
        "rfc822; carol@contoso.example",
    ]
    assert [b["Action"] for b in per_rcpt] == ["delayed", "delayed"]
    assert [b["Status"] for b in per_rcpt] == ["4.4.2", "4.0.0"]
    assert per_rcpt[0]["Diagnostic-Code"] == "smtp; 451 4.4.2 upstream timed out"
    assert "Diagnostic-Code" not in per_rcpt[1]
    for block in per_rcpt:
        assert parsedate_to_datetime(block["Will-Retry-Until"]) == until
    text = text_of(msg, 0)
    assert "do not need to send the message again" in text
    assert format_datetime(until) in text
    assert "dave@contoso.example" not in text


def test_failure_and_delay_notices_have_distinct_message_ids() -> None:
    e = entry(
        failed("bob@contoso.example"),
        Recipient("carol@contoso.example", RcptState.PENDING, "451 4.4.2 upstream timed out"),
    )
    until = NOW + timedelta(days=4)
    ids = {parse(fail(e))["Message-ID"], parse(delay(e, until))["Message-ID"]}
    assert len(ids) == 2


def test_same_inputs_give_the_same_bytes() -> None:
    e = entry(failed("bob@contoso.example"))
    assert fail(e).data == fail(e).data


# --- refusals ------------------------------------------------------------------------------------


def test_nothing_to_report_is_an_error() -> None:
    e = entry(Recipient("alice@contoso.example", RcptState.DELIVERED, "250 2.1.5 OK"))
    with pytest.raises(ValueError, match="no failed recipients"):
        fail(e)
    with pytest.raises(ValueError, match="no delayed recipients"):
        delay(e, NOW + timedelta(days=1))


@pytest.mark.parametrize(
    "changes",
    [
        {"now": datetime(2025, 11, 25, 9, 30)},  # naive
        {"reporting_mta": "relay.example\r\nBcc: x@y"},
        {"reporting_mta": ""},
        {"recipient": "a@b\r\nBcc: victim@example.com"},
        {"recipient": "no-at-sign"},
        {"from_address": "<MAILER-DAEMON@x>"},
    ],
)
def test_unsafe_arguments_are_refused(changes: dict[str, object]) -> None:
    kwargs: dict[str, object] = {
        "recipient": SENDER,
        "reporting_mta": MTA,
        "now": NOW,
        "original_headers": HEADERS,
        "from_address": DAEMON,
    }
    kwargs.update(changes)
    with pytest.raises(ValueError):
        failure_notice(entry(failed("bob@contoso.example")), **kwargs)  # type: ignore[arg-type]


def test_naive_will_retry_until_is_refused() -> None:
    e = entry(Recipient("bob@contoso.example"))
    with pytest.raises(ValueError, match="timezone-aware"):
        delay(e, datetime(2025, 11, 29))


def test_dates_in_other_zones_are_written_in_utc() -> None:
    berlin = timezone(timedelta(hours=1))
    e = entry(failed("bob@contoso.example"))
    notice = failure_notice(
        e,
        recipient=SENDER,
        reporting_mta=MTA,
        now=NOW.astimezone(berlin),
        original_headers=HEADERS,
        from_address=DAEMON,
    )
    assert parse(notice)["Date"] == format_datetime(NOW)


# --- who gets a notice ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bounce_to", "sender", "expected"),
    [
        ("sender", SENDER, SENDER),
        ("sender", "postmaster@contoso.example", "postmaster@contoso.example"),
        ("sender", "jörg@bücher.example", "jörg@bücher.example"),
        ("sender", "MAILER-DAEMON@contoso.example", None),
        ("sender", "mailer-daemon@contoso.example", None),
        ("sender", "", None),
        ("sender", "<>", None),
        ("sender", "no-at-sign", None),
        ("sender", "a\r\nb@contoso.example", None),
        ("admin@contoso.example", SENDER, "admin@contoso.example"),
        ("admin@contoso.example", "MAILER-DAEMON@contoso.example", "admin@contoso.example"),
        ("admin@contoso.example", "", None),
        (" admin@contoso.example ", SENDER, "admin@contoso.example"),
        ("none", SENDER, None),
        ("none", "", None),
        ("NONE", SENDER, None),
    ],
)
def test_notice_recipient(bounce_to: str, sender: str, expected: str | None) -> None:
    assert notice_recipient(bounce_to, sender) == expected


@pytest.mark.parametrize("bounce_to", ["", "nobody", "admin@contoso.example, x@y", "<a@b>"])
def test_an_invalid_bounce_to_is_an_error(bounce_to: str) -> None:
    with pytest.raises(ValueError, match="bounce_to"):
        notice_recipient(bounce_to, SENDER)


@given(st.sampled_from(["sender", "none", "admin@contoso.example", "postmaster@x.example"]))
def test_never_a_notice_about_a_notice(bounce_to: str) -> None:
    assert notice_recipient(bounce_to, "") is None
    assert notice_recipient(bounce_to, "<>") is None


# --- arbitrary input ------------------------------------------------------------------------------

replies = st.one_of(
    st.text(max_size=3000),
    st.builds(
        lambda code, enhanced, text: f"{code} {enhanced} {text}",
        st.sampled_from([421, 450, 451, 452, 550, 552, 553, 554]),
        st.from_regex(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True),
        st.text(max_size=1500),
    ),
)
addresses = st.text(min_size=1, max_size=300)
states = st.sampled_from([RcptState.PENDING, RcptState.DELIVERED, RcptState.FAILED])


@settings(max_examples=150, deadline=None)
@given(
    rcpts=st.lists(st.tuples(addresses, states, replies), min_size=1, max_size=5),
    helo=st.text(max_size=50),
    queue_id=st.text(min_size=1, max_size=40),
    headers=st.binary(max_size=3000),
)
def test_any_entry_gives_a_parseable_notice(
    rcpts: list[tuple[str, RcptState, str]], helo: str, queue_id: str, headers: bytes
) -> None:
    e = entry(
        failed("fixed@contoso.example"),
        Recipient("pending@contoso.example", RcptState.PENDING, "451 4.4.2 upstream timed out"),
        *(Recipient(a, s, r) for a, s, r in rcpts),
        helo=helo,
        queue_id=queue_id,
    )
    for notice, action in (
        (fail(e, headers=headers), "failed"),
        (delay(e, NOW + timedelta(days=3), headers=headers), "delayed"),
    ):
        msg = parse(notice)
        assert notice.data.isascii()
        wanted = RcptState.FAILED if action == "failed" else RcptState.PENDING
        reported = [r for r in e.recipients if r.state is wanted]
        per_rcpt = blocks(msg)[1:]
        assert len(per_rcpt) == len(reported)
        for block in per_rcpt:
            assert block["Action"] == action
            assert re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", block["Status"])
            assert block["Status"][0] == ("5" if action == "failed" else "4")
        text_of(msg, 0)
        text_of(msg, 2)


@settings(max_examples=100, deadline=None)
@given(sender=st.text(max_size=80), bounce_to=st.sampled_from(["sender", "admin@x.example"]))
def test_notice_recipient_only_returns_writable_addresses(sender: str, bounce_to: str) -> None:
    to = notice_recipient(bounce_to, sender)
    if to is None:
        return
    notice = fail(entry(failed("bob@contoso.example"), mail_from=sender), to=to)
    assert notice.recipient == to
    parse(notice)
    assert f"\r\nTo: <{to}>\r\n".encode() in notice.data
