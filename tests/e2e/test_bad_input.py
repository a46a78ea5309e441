"""Hostile and broken SMTP input against the real daemon (issue #5 item 6): smuggling probes,
pipelining, NUL and invalid UTF-8, overlong lines, recipient floods, commands out of order, TLS
on the plain port, clients outside the allowlist and silent connections.

One daemon (Maildir upstream, no fakes) serves the whole module; every test talks raw SMTP over
a socket and checks the exact replies and exactly which messages reached the maildir (nothing
may stay in the spool). Each test compares against a snapshot of the maildir taken at its start.
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.upstream import smtp_data
from tests.relayproc import strip_trace, wait_until
from tests.smtpwire import HOSTNAME, Reply, Sandbox, Wire, codes, maildir_message

# The limits these tests rely on, set explicitly so that a change of default does not move them.
MAX_RECIPIENTS = 100
MAX_COMMAND = 2048  # octets per command line (MAIL gets 36 more after EHLO: SIZE=, SMTPUTF8)
MAX_HEADER = 1_048_576
MAX_ERRORS = 20  # 5xx replies per session before 421 and a close
LIMITS = {
    "smtp.max_recipients": MAX_RECIPIENTS,
    "smtp.max_command_length": MAX_COMMAND,
    "smtp.max_header_size": MAX_HEADER,
    "smtp.max_errors_per_session": MAX_ERRORS,
    # 60 idle connections from 127.0.0.1 below: the per-client limit is not what they test.
    "smtp.max_sessions_per_client": 100,
    "smtp.max_sessions": 200,
}
SENDER = b"sender@bad-input.test"
RCPT = b"rcpt@bad-input.test"

SENDER_OK = b"250 2.1.0 Sender OK"
RECIPIENT_OK = b"250 2.1.5 Recipient OK"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>"
BAD_ADDRESS = b"553 5.1.7 The address is not valid UTF-8"
TOO_MANY = b"452 4.5.3 Too many recipients"
NEED_HELO = b"503 Error: send HELO first"
NEED_MAIL = b"503 Error: need MAIL command"
NEED_RCPT = b"503 5.5.1 Error: need RCPT command"
BAD_SYNTAX = b"500 Error: bad syntax"
TOO_LONG = b"500 Command line too long"
TOO_MANY_ERRORS = b"421 4.7.0 Too many errors, closing the connection"
BYE = b"221 2.0.0 Bye"
ERROR_LOG = r"^\S+ (ERROR|CRITICAL) |Traceback"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    sandbox = Sandbox(tmp_path_factory.mktemp("bad_input"), **LIMITS).start()
    yield sandbox
    sandbox.stop()


@pytest.fixture
def before(box: Sandbox) -> Iterator[dict[str, Path]]:
    """The maildir before the test; after it, the daemon must still be up, the spool empty and
    nothing logged as an error (bad input is the client's problem, never a crash)."""
    snapshot = box.settle()
    since = len(box.relay.lines)
    yield snapshot
    assert box.relay.running, "the daemon died:\n" + "\n".join(box.relay.lines[-40:])
    box.settle()
    errors = [line for line in box.relay.lines[since:] if re.search(ERROR_LOG, line)]
    assert not errors, "\n".join(errors[:20])


def message(subject: bytes, body: bytes) -> bytes:
    """A message the normaliser leaves byte for byte as it is (Date, Message-ID, From)."""
    return (
        b"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\n"
        b"Message-ID: <" + subject.replace(b" ", b".") + b"@bad-input.test>\r\n"
        b"From: <sender@bad-input.test>\r\n"
        b"Subject: " + subject + b"\r\n\r\n" + body
    )


def ehlo(wire: Wire, name: bytes = b"client.bad-input.test") -> Reply:
    reply = wire.command(b"EHLO " + name)
    assert reply.code == 250 and reply.lines[0] == b"250-" + HOSTNAME.encode(), reply
    return reply


def transaction(
    wire: Wire, data: bytes, *, sender: bytes = SENDER, rcpts: tuple[bytes, ...] = (RCPT,)
) -> str:
    """MAIL, RCPT, DATA (pipelined, as RFC 2920 allows), then the data; returns the queue id.
    `data` is sent as given: it must already be dot-stuffed and end with CRLF."""
    envelope = b"MAIL FROM:<" + sender + b">\r\n"
    envelope += b"".join(b"RCPT TO:<" + rcpt + b">\r\n" for rcpt in rcpts) + b"DATA\r\n"
    wire.send(envelope)
    replies = wire.replies(2 + len(rcpts))
    assert [r.last for r in replies] == [SENDER_OK, *[RECIPIENT_OK] * len(rcpts), START_DATA]
    wire.send(data + b".\r\n")
    reply = wire.reply()
    assert reply.queue_id is not None, reply
    return reply.queue_id


def quit_(wire: Wire) -> None:
    wire.send(b"QUIT\r\n")
    assert [r.last for r in wire.rest()] == [BYE]


def spooled_message(path: Path, queue_id: str) -> bytes:
    """The message as the relay spooled it: without the maildir's envelope lines and the
    relay's own Received: line."""
    return strip_trace(maildir_message(path)[2], queue_id)


# --- SMTP smuggling ------------------------------------------------------------------------------

SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nSmuggled\r\n"

# (probe, what it becomes in the spooled message). Only <CRLF>.<CRLF> ends the data; the
# normaliser then turns every bare CR and bare LF into CRLF, and a dot at the start of a line
# that follows a bare LF is unstuffed like any other leading dot (relay/smtpdata.py).
PROBES = {
    "LF.CRLF": (b"\n.\r\n", b"\r\n\r\n"),
    "CR.CR": (b"\r.\r", b"\r\n.\r\n"),
    "LF.LF": (b"\n.\n", b"\r\n\r\n"),
    "CRLF.LF": (b"\r\n.\n", b"\r\n\r\n"),
    "LF.CR": (b"\n.\r", b"\r\n\r\n"),
    "CR.LF": (b"\r.\n", b"\r\n.\r\n"),
}


@pytest.mark.parametrize("probe", PROBES)
def test_smuggling_probe_is_content_of_the_one_message(
    box: Sandbox, before: dict[str, Path], probe: str
) -> None:
    """CVE-2023-51764 family / GHSA-pr2m-px7j-xdp2: a sloppy end-of-data marker followed by a
    second transaction inside DATA. The relay must see one message whose content is the whole
    thing, answer exactly one 250 to the end of data, and never act on the smuggled commands."""
    raw, spooled = PROBES[probe]
    with box.wire() as wire:
        ehlo(wire, b"smuggler")
        wire.send(b"MAIL FROM:<" + SENDER + b">\r\nRCPT TO:<" + RCPT + b">\r\nDATA\r\n")
        assert [r.last for r in wire.replies(3)] == [SENDER_OK, RECIPIENT_OK, START_DATA]
        wire.send(message(b"smuggling probe", b"before" + raw + SMUGGLED) + b"\r\n.\r\nQUIT\r\n")
        after_data = wire.rest()
    assert len(after_data) == 2, [str(r) for r in after_data]
    assert after_data[0].queue_id is not None, after_data[0]
    assert after_data[1].last == BYE
    queue_id = after_data[0].queue_id

    new = box.new_since(before)
    assert list(new) == [queue_id], "the smuggled transaction became a message"
    return_path, delivered_to, _ = maildir_message(new[queue_id])
    assert (return_path, delivered_to) == (SENDER, [RCPT])
    data = spooled_message(new[queue_id], queue_id)
    assert data == message(b"smuggling probe", b"before" + spooled + SMUGGLED + b"\r\n")
    # Some probes leave a line holding a single dot in the spooled message; on the way out it
    # is stuffed, so the upstream sees one end of data too.
    assert smtp_data(data).count(b"\r\n.\r\n") == 1
    assert box.relay.wait_for_log(rf"\[{queue_id}\] accepted from=<sender@bad-input\.test>")


# --- pipelining ----------------------------------------------------------------------------------


def test_commands_pipelined_right_after_the_end_of_data_are_handled_in_order(
    box: Sandbox, before: dict[str, Path]
) -> None:
    first = message(b"first", b"one\r\n")
    second = message(b"second", b"two\r\n")
    with box.wire() as wire:
        ehlo(wire, b"pipeliner")
        wire.send(b"MAIL FROM:<first@bad-input.test>\r\nRCPT TO:<one@bad-input.test>\r\nDATA\r\n")
        assert [r.last for r in wire.replies(3)] == [SENDER_OK, RECIPIENT_OK, START_DATA]
        wire.send(
            first + b".\r\n"
            b"MAIL FROM:<second@bad-input.test>\r\nRCPT TO:<two@bad-input.test>\r\nDATA\r\n"
        )
        replies = wire.replies(4)
        assert [r.last for r in replies[1:]] == [SENDER_OK, RECIPIENT_OK, START_DATA]
        wire.send(second + b".\r\nQUIT\r\n")
        rest = wire.rest()
    assert [r.last for r in rest[1:]] == [BYE]
    ids = [replies[0].queue_id, rest[0].queue_id]
    assert None not in ids and ids[0] != ids[1], (replies[0], rest[0])

    new = box.new_since(before)
    assert set(new) == set(ids)
    for queue_id, sender, rcpt, data in (
        (ids[0], b"first@bad-input.test", b"one@bad-input.test", first),
        (ids[1], b"second@bad-input.test", b"two@bad-input.test", second),
    ):
        assert queue_id is not None
        assert maildir_message(new[queue_id])[:2] == (sender, [rcpt])
        assert spooled_message(new[queue_id], queue_id) == data


def test_a_whole_session_in_one_write_is_answered_in_order(
    box: Sandbox, before: dict[str, Path]
) -> None:
    """Not even waiting for the 354 (RFC 2920 says a client must): the bytes after DATA are the
    data, and everything after the end of data is commands again."""
    session = b"EHLO burst\r\n"
    for n in range(3):
        session += b"MAIL FROM:<s%d@bad-input.test>\r\nRCPT TO:<r%d@bad-input.test>\r\n" % (n, n)
        session += b"DATA\r\n" + message(b"burst %d" % n, b".. stuffed\r\n") + b".\r\n"
    session += b"NOOP\r\nQUIT\r\n"
    with box.wire() as wire:
        wire.send(session)
        replies = wire.rest()
    assert codes(replies) == [250] + [250, 250, 354, 250] * 3 + [250, 221]
    ids = [reply.queue_id for reply in replies if reply.queue_id]
    assert len(set(ids)) == 3

    new = box.new_since(before)
    assert set(new) == set(ids)
    for n, queue_id in enumerate(ids):
        assert maildir_message(new[queue_id])[:2] == (
            b"s%d@bad-input.test" % n,
            [b"r%d@bad-input.test" % n],
        )
        assert spooled_message(new[queue_id], queue_id) == message(
            b"burst %d" % n, b". stuffed\r\n"
        )


# --- NUL bytes and invalid UTF-8 -----------------------------------------------------------------


def test_nul_bytes_in_command_words_are_unknown_commands(
    box: Sandbox, before: dict[str, Path]
) -> None:
    with box.wire() as wire:
        ehlo(wire)
        assert wire.command(b"NO\x00OP").last == b'500 Error: command "NO?OP" not recognized'
        assert wire.command(b"\x00").last == b'500 Error: command "?" not recognized'
        assert wire.command(b"\x00\x00 \x00").last == b'500 Error: command "??" not recognized'

        assert wire.command(b"NOOP").last == b"250 OK"
        quit_(wire)
    assert box.new_since(before) == {}


def test_nul_in_the_helo_name_does_not_reach_the_received_line(
    box: Sandbox, before: dict[str, Path]
) -> None:
    data = message(b"nul helo", b"hello\r\n")
    with box.wire() as wire:
        ehlo(wire, b"dev\x00ice\x00")
        queue_id = transaction(wire, data)
        quit_(wire)
    new = box.new_since(before)
    assert list(new) == [queue_id]
    _, _, spooled = maildir_message(new[queue_id])
    assert spooled.startswith(b"Received: from dev?ice? ([127.0.0.1])\r\n")
    assert strip_trace(spooled, queue_id) == data


def test_invalid_utf8_in_the_helo_name_is_accepted_and_stored_replaced(
    box: Sandbox, before: dict[str, Path]
) -> None:
    """Found by the fuzz test: the name cannot be written as UTF-8 in the queue file, which
    made every attempt to queue the message fail with 451, for ever."""
    data = message(b"bad helo", b"hello\r\n")
    with box.wire() as wire:
        ehlo(wire, b"copier-\xef\xff")
        queue_id = transaction(wire, data)
        quit_(wire)
    new = box.new_since(before)
    assert list(new) == [queue_id]
    _, _, spooled = maildir_message(new[queue_id])
    assert spooled.startswith(b"Received: from copier-?? ([127.0.0.1])\r\n")
    assert strip_trace(spooled, queue_id) == data


def test_nul_bytes_in_the_body_are_kept(box: Sandbox, before: dict[str, Path]) -> None:
    data = message(b"nul body", b"a\x00b\r\n\x00\r\n\x00\x00\x00 trailing\r\n")
    with box.wire() as wire:
        ehlo(wire)
        queue_id = transaction(wire, data)
        quit_(wire)
    new = box.new_since(before)
    assert list(new) == [queue_id]
    assert spooled_message(new[queue_id], queue_id) == data


@pytest.mark.parametrize("address", [b"a\x00b@bad-input.test", b"a\rb@bad-input.test"])
def test_control_characters_in_envelope_addresses_are_refused(
    box: Sandbox, before: dict[str, Path], address: bytes
) -> None:
    with box.wire() as wire:
        ehlo(wire)
        mail = wire.command(b"MAIL FROM:<" + address + b">")
        assert wire.command(b"MAIL FROM:<" + SENDER + b">").last in (
            SENDER_OK,
            b"503 Error: nested MAIL command",
        )
        rcpt = wire.command(b"RCPT TO:<" + address + b">")
        wire.send(b"RSET\r\n")
        wire.reply()
        quit_(wire)
    assert box.new_since(before) == {}
    assert mail.code in (501, 553), mail
    assert rcpt.code in (501, 553), rcpt


def test_invalid_utf8_in_mail_from_and_rcpt_to_is_refused_553(
    box: Sandbox, before: dict[str, Path]
) -> None:
    data = message(b"after bad addresses", b"ok\r\n")
    with box.wire() as wire:
        ehlo(wire)
        assert wire.command(b"MAIL FROM:<j\xfcrgen@bad-input.test>").last == BAD_ADDRESS
        assert wire.command(b"MAIL FROM:<a\xc3@bad-input.test> SMTPUTF8").last == BAD_ADDRESS
        assert wire.command(b"MAIL FROM:<" + SENDER + b">").last == SENDER_OK
        assert wire.command(b"RCPT TO:<\xff\xfe@bad-input.test>").last == BAD_ADDRESS
        assert wire.command(b"RCPT TO:<over\xc0\xaflong@bad-input.test>").last == BAD_ADDRESS
        assert wire.command(b"RCPT TO:<" + RCPT + b">").last == RECIPIENT_OK
        assert wire.command(b"DATA").last == START_DATA
        wire.send(data + b".\r\n")
        queue_id = wire.reply().queue_id
        quit_(wire)
    assert queue_id is not None
    new = box.new_since(before)
    assert list(new) == [queue_id]
    assert maildir_message(new[queue_id])[:2] == (SENDER, [RCPT])
    assert spooled_message(new[queue_id], queue_id) == data


def test_invalid_utf8_in_the_body_is_accepted_byte_for_byte(
    box: Sandbox, before: dict[str, Path]
) -> None:
    data = message(b"latin1 and junk", b"caf\xe9 \xff\xfe \xc3( \xed\xa0\x80 \xf4\x90\x80\x80\r\n")
    with box.wire() as wire:
        ehlo(wire)
        queue_id = transaction(wire, data)
        quit_(wire)
    new = box.new_since(before)
    assert list(new) == [queue_id]
    assert spooled_message(new[queue_id], queue_id) == data
    assert box.relay.wait_for_log(rf"\[{queue_id}\] accepted ")


# --- overlong lines and big headers --------------------------------------------------------------


def test_overlong_command_lines_get_500_and_the_session_goes_on(
    box: Sandbox, before: dict[str, Path]
) -> None:
    """Command lines up to max_command_length octets (CRLF not counted); a line longer than the
    64 KiB stream buffer is read to its end and answered the same way."""
    data = message(b"after long lines", b"still here\r\n")
    with box.wire() as wire:
        ehlo(wire)
        assert wire.command(b"NOOP " + b"x" * (MAX_COMMAND - 5)).last == b"250 OK"
        assert wire.command(b"NOOP " + b"x" * (MAX_COMMAND - 4)).last == TOO_LONG
        assert wire.command(b"MAIL FROM:<" + b"a" * 3000 + b"@bad-input.test>").last == TOO_LONG
        assert wire.command(b"MAIL FROM:<" + SENDER + b">").last == SENDER_OK
        assert wire.command(b"RCPT TO:<" + b"b" * 100_000 + b"@bad-input.test>").last == TOO_LONG
        assert wire.command(b"X" * 1_000_000).last == TOO_LONG
        assert wire.command(b"RSET").last == b"250 OK"
        queue_id = transaction(wire, data)
        quit_(wire)
    new = box.new_since(before)
    assert list(new) == [queue_id]
    assert spooled_message(new[queue_id], queue_id) == data


def mail_line(length: int) -> bytes:
    line = b"MAIL FROM:<" + b"m" * (length - 27) + b"@bad-input.test>"
    assert len(line) == length
    return line


def mail_limit(wire: Wire) -> int:
    """The longest MAIL line this session accepts now: max_command_length plus what aiosmtpd
    adds for the extensions it advertised at EHLO (binary search, a few 500s)."""
    low, high = MAX_COMMAND, MAX_COMMAND + 200  # accepted, refused
    assert wire.command(mail_line(low)).last == SENDER_OK
    assert wire.command(b"RSET").last == b"250 OK"
    assert wire.command(mail_line(high)).last == TOO_LONG
    while high - low > 1:
        middle = (low + high) // 2
        if wire.command(mail_line(middle)).last == SENDER_OK:
            assert wire.command(b"RSET").last == b"250 OK"
            low = middle
        else:
            high = middle
    return low


def test_the_mail_line_limit_is_per_session(box: Sandbox, before: dict[str, Path]) -> None:
    """aiosmtpd keeps its command size limits in a class attribute, raised by every EHLO of any
    session and cleared by every new connection; the relay gives each session its own."""
    with box.wire() as first:
        ehlo(first)
        limit = mail_limit(first)
        assert MAX_COMMAND <= limit <= MAX_COMMAND + 36
        with box.wire() as other:
            for _ in range(4):
                ehlo(other)
            quit_(other)
        assert first.command(mail_line(limit + 1)).last == TOO_LONG
        with box.wire() as third:
            ehlo(third)
            quit_(third)
        assert first.command(mail_line(limit)).last == SENDER_OK
        quit_(first)
    assert box.new_since(before) == {}


def test_a_100_kb_body_line_is_accepted_and_wrapped(box: Sandbox, before: dict[str, Path]) -> None:
    line = b"".join(b"%07d " % n for n in range(12_500))  # 100,000 octets, no line end
    with box.wire() as wire:
        ehlo(wire)
        queue_id = transaction(wire, message(b"long line", line + b"\r\n"))
        quit_(wire)
    new = box.new_since(before)
    assert list(new) == [queue_id]
    spooled = spooled_message(new[queue_id], queue_id)
    assert max(len(part) for part in spooled.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(spooled, policy=email.policy.default)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    payload = parsed.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.rstrip(b"\r\n") == line


def test_a_2_mb_header_block_is_refused_552_and_the_session_goes_on(
    box: Sandbox, before: dict[str, Path]
) -> None:
    """Current behaviour: a header block over max_header_size (the bytes up to the first empty
    line, as received) is refused at the end of data; one just under it is spooled unchanged."""
    fields = b"".join(b"X-Filler-%05d: %s\r\n" % (n, b"v" * 60) for n in range(26_000))
    assert len(fields) > 2 * MAX_HEADER - 100_000
    fitting = fields[: MAX_HEADER - 1000]
    fitting = fitting[: fitting.rindex(b"\r\n") + 2] + message(b"big header", b"body\r\n")
    with box.wire() as wire:
        ehlo(wire)
        wire.send(b"MAIL FROM:<" + SENDER + b">\r\nRCPT TO:<" + RCPT + b">\r\nDATA\r\n")
        assert [r.last for r in wire.replies(3)] == [SENDER_OK, RECIPIENT_OK, START_DATA]
        wire.send(fields + message(b"huge header", b"body\r\n") + b".\r\n")
        assert wire.reply().last == b"552 5.3.4 Message header size exceeds the limit"
        assert wire.command(b"DATA").last == NEED_RCPT  # the transaction is over
        queue_id = transaction(wire, fitting)
        quit_(wire)
    new = box.new_since(before)
    assert list(new) == [queue_id]
    assert spooled_message(new[queue_id], queue_id) == fitting
    assert box.relay.wait_for_log(r"refused a message from 127\.0\.0\.1: header block over")


# --- recipient floods ----------------------------------------------------------------------------


def test_ten_thousand_recipients_pipelined_get_452_beyond_the_limit(
    box: Sandbox, before: dict[str, Path]
) -> None:
    rcpts = [b"r%05d@bad-input.test" % n for n in range(10_000)]
    data = message(b"flood", b"to many\r\n")
    with box.wire(timeout=30) as wire:
        ehlo(wire)
        burst = b"MAIL FROM:<" + SENDER + b">\r\n"
        burst += b"".join(b"RCPT TO:<" + rcpt + b">\r\n" for rcpt in rcpts) + b"DATA\r\n"
        writer = wire.send_in_background(burst)
        replies = wire.replies(1 + len(rcpts) + 1)
        writer.join(timeout=30)
        assert replies[0].last == SENDER_OK
        assert [r.last for r in replies[1 : 1 + MAX_RECIPIENTS]] == [RECIPIENT_OK] * MAX_RECIPIENTS
        assert {r.last for r in replies[1 + MAX_RECIPIENTS : -1]} == {TOO_MANY}
        assert replies[-1].last == START_DATA
        wire.send(data + b".\r\n")
        queue_id = wire.reply().queue_id
        quit_(wire)
    assert queue_id is not None
    new = box.new_since(before)
    assert list(new) == [queue_id]
    assert maildir_message(new[queue_id])[:2] == (SENDER, rcpts[:MAX_RECIPIENTS])
    assert spooled_message(new[queue_id], queue_id) == data


# --- commands out of order, unknown commands, empty lines ----------------------------------------


def test_commands_out_of_order_get_503(box: Sandbox, before: dict[str, Path]) -> None:
    with box.wire() as wire:
        assert wire.command(b"MAIL FROM:<" + SENDER + b">").last == NEED_HELO
        assert wire.command(b"RCPT TO:<" + RCPT + b">").last == NEED_HELO
        assert wire.command(b"DATA").last == NEED_HELO
        assert wire.command(b"HELO old-device").last == b"250 " + HOSTNAME.encode()
        assert wire.command(b"RCPT TO:<" + RCPT + b">").last == NEED_MAIL
        assert wire.command(b"DATA").last == NEED_RCPT
        assert wire.command(b"MAIL FROM:<" + SENDER + b">").last == SENDER_OK
        assert wire.command(b"DATA").last == NEED_RCPT
        assert (
            wire.command(b"MAIL FROM:<" + SENDER + b">").last == b"503 Error: nested MAIL command"
        )
        assert wire.command(b"RCPT TO:<" + RCPT + b">").last == RECIPIENT_OK
        assert wire.command(b"RSET").last == b"250 OK"
        assert wire.command(b"DATA").last == NEED_RCPT
        assert wire.command(b"RCPT TO:<" + RCPT + b">").last == NEED_MAIL
        quit_(wire)
    assert box.new_since(before) == {}


def test_unknown_commands_get_500_and_the_fifth_closes_the_session(
    box: Sandbox, before: dict[str, Path]
) -> None:
    """aiosmtpd allows 5 unrecognised commands per session: the fifth gets 502 and a close."""
    with box.wire() as wire:
        ehlo(wire)
        for word in (b"FROB", b"BDAT", b"XCLIENT", b"GET"):
            reply = wire.command(word + b" / HTTP/1.0")
            assert reply.last == b'500 Error: command "%s" not recognized' % word
        assert wire.command(b"NOOP").last == b"250 OK"
        wire.send(b"POST /\r\nNOOP\r\n")
        assert [r.last for r in wire.rest()] == [
            b"502 5.5.1 Too many unrecognized commands, goodbye."
        ]
    assert box.new_since(before) == {}


def test_empty_lines_get_500_and_do_not_end_the_session(
    box: Sandbox, before: dict[str, Path]
) -> None:
    """An empty line (CRLF or a bare LF) is bad syntax; a line of blanks is an unrecognised
    command with an empty name (which counts towards aiosmtpd's five)."""
    data = message(b"after empty lines", b"ok\r\n")
    with box.wire() as wire:
        wire.send(b"\r\n\n" * 4)
        assert [r.last for r in wire.replies(8)] == [BAD_SYNTAX] * 8
        assert wire.command(b" ").last == b'500 Error: command "" not recognized'
        ehlo(wire)
        wire.send(b"\r\n\r\n")
        assert [r.last for r in wire.replies(2)] == [BAD_SYNTAX] * 2
        queue_id = transaction(wire, data)
        quit_(wire)
    new = box.new_since(before)
    assert list(new) == [queue_id]
    assert spooled_message(new[queue_id], queue_id) == data


def test_the_error_budget_closes_the_session_with_421(
    box: Sandbox, before: dict[str, Path]
) -> None:
    with box.wire() as wire:
        ehlo(wire)
        for _ in range(MAX_ERRORS - 1):
            assert wire.command(b"").last == BAD_SYNTAX
        wire.send(b"\r\n")
        assert [r.last for r in wire.rest()] == [BAD_SYNTAX, TOO_MANY_ERRORS]
    assert box.new_since(before) == {}


# --- TLS on the plain port -----------------------------------------------------------------------


def client_hello() -> bytes:
    """The first flight of a real TLS client (Python's ssl, TLS 1.2/1.3 ClientHello)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:16]  # a handshake record
    return hello


def test_a_tls_client_hello_on_the_plain_port_gets_errors_and_the_daemon_keeps_serving(
    box: Sandbox, before: dict[str, Path]
) -> None:
    # Implicit TLS (port 465 style): the ClientHello is the very first thing sent.
    with box.wire(greet=False) as wire:
        wire.send(client_hello() + b"\r\nNOOP\r\nQUIT\r\n")
        greeting, *replies = wire.rest()
    assert greeting.code == 220
    # The hello is binary: it reads as a few lines of bad syntax or unknown commands; if it
    # holds five unknown "commands" the session is closed with 502.
    errors = [r for r in replies if r.code in (500, 502)]
    assert errors and replies[: len(errors)] == errors, [str(r) for r in replies]
    assert codes(replies[len(errors) :]) in ([250, 221], []), [str(r) for r in replies]
    if not replies[len(errors) :]:
        assert errors[-1].last == b"502 5.5.1 Too many unrecognized commands, goodbye."

    # A real TLS client gives up on the handshake at once: the 220 is no ServerHello.
    context = ssl.create_default_context()
    with (
        socket.create_connection(("127.0.0.1", box.port), timeout=10) as sock,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(sock, server_hostname=HOSTNAME)

    # The daemon still serves a normal client.
    data = message(b"after tls garbage", b"ok\r\n")
    with smtplib.SMTP("127.0.0.1", box.port, timeout=10) as client:
        assert client.sendmail(SENDER.decode(), [RCPT.decode()], data) == {}
    new = box.new_since(before)
    assert len(new) == 1
    [(queue_id, path)] = new.items()
    assert spooled_message(path, queue_id) == data


# --- the allowlist -------------------------------------------------------------------------------


def test_a_client_outside_the_allowlist_gets_554_and_nothing_is_spooled(
    box: Sandbox, before: dict[str, Path]
) -> None:
    refused = 'relay_messages_received_total{result="refused_allowlist"}'
    count = box.relay.metrics().get(refused, 0)
    with box.wire(source="127.0.0.2") as wire:
        assert wire.greeting is not None
        assert wire.greeting.lines == (b"554 5.7.1 Access denied: this client may not relay here",)
        wire.send(b"EHLO x\r\nMAIL FROM:<" + SENDER + b">\r\nRCPT TO:<" + RCPT + b">\r\nDATA\r\n")
        assert [r.last for r in wire.replies(4)] == [b"503 5.7.1 Access denied, send QUIT"] * 4
        wire.send(b"QUIT\r\n")
        assert [r.last for r in wire.rest()] == [b"221 2.0.0 Bye"]
    # Without a QUIT, five lines are answered and the connection is closed.
    with box.wire(source="127.0.0.2") as wire:
        assert wire.greeting is not None and wire.greeting.code == 554
        wire.send(b"EHLO x\r\n" + message(b"refused", b"x\r\n") + b".\r\n")
        assert [r.last for r in wire.rest()] == [b"503 5.7.1 Access denied, send QUIT"] * 5
    assert box.new_since(before) == {}
    assert box.relay.metrics()[refused] == count + 2
    assert box.relay.wait_for_log(r"refused client 127\.0\.0\.2: not in ")


# --- silent and half-open connections ------------------------------------------------------------


def test_fifty_silent_connections_do_not_block_a_real_client(
    box: Sandbox, before: dict[str, Path]
) -> None:
    since = len(box.relay.lines)
    silent = [socket.create_connection(("127.0.0.1", box.port), timeout=10) for _ in range(50)]
    # Some stop in the middle of DATA, some also half-close (FIN) their side there.
    stalled = []
    for n in range(10):
        sock = socket.create_connection(("127.0.0.1", box.port), timeout=10)
        sock.sendall(
            b"EHLO staller\r\nMAIL FROM:<stall@bad-input.test>\r\n"
            b"RCPT TO:<" + RCPT + b">\r\nDATA\r\n" + message(b"stalled %d" % n, b"partial")
        )
        if n % 2:
            sock.shutdown(socket.SHUT_WR)
        stalled.append(sock)
    try:
        data = message(b"past the silent ones", b"ok\r\n")
        with smtplib.SMTP("127.0.0.1", box.port, timeout=10) as client:
            client.ehlo("real-client")
            code, reply = client.mail(SENDER.decode())
            assert code == 250
            code, reply = client.rcpt(RCPT.decode())
            assert code == 250
            code, reply = client.data(data)
            assert code == 250, reply
        queue_id = reply.decode().rsplit(" ", 1)[-1]
        box.wait_delivered([queue_id], timeout=10)
    finally:
        for sock in silent + stalled:
            sock.close()
    new = box.new_since(before)
    assert list(new) == [queue_id]
    assert spooled_message(new[queue_id], queue_id) == data
    wait_until(
        lambda: (
            sum("closed the connection during DATA" in line for line in box.relay.lines[since:])
            == len(stalled)
        ),
        10,
        "the stalled transactions to be logged as aborted",
    )


# --- surprising behaviour found on the way (see the report) --------------------------------------


def test_replies_to_unknown_commands_stay_inside_the_reply_grammar(
    box: Sandbox, before: dict[str, Path]
) -> None:
    with box.wire(echo_ok=False) as wire:
        wire.send(b"A\rB\x1b[2J\r\n")
        wire.reply()
        quit_(wire)


def test_nothing_is_answered_after_the_421_of_the_error_budget(
    box: Sandbox, before: dict[str, Path]
) -> None:
    with box.wire() as wire:
        ehlo(wire)
        wire.send(b"\r\n" * MAX_ERRORS + b"MAIL FROM:<" + SENDER + b">\r\nNOOP\r\nQUIT\r\n")
        replies = wire.rest()
    assert box.new_since(before) == {}
    assert [r.last for r in replies] == [BAD_SYNTAX] * MAX_ERRORS + [TOO_MANY_ERRORS]


def test_the_502_goodbye_is_the_last_reply(box: Sandbox, before: dict[str, Path]) -> None:
    with box.wire() as wire:
        ehlo(wire)
        wire.send(b"\r\n" * (MAX_ERRORS - 5) + b"FROB\r\n" * 5 + b"NOOP\r\n")
        replies = wire.rest()
    assert box.new_since(before) == {}
    assert [r.last for r in replies] == [BAD_SYNTAX] * (MAX_ERRORS - 5) + [
        b'500 Error: command "FROB" not recognized'
    ] * 4 + [b"502 5.5.1 Too many unrecognized commands, goodbye."]


def test_a_complete_session_followed_by_a_half_close_is_accepted(
    box: Sandbox, before: dict[str, Path]
) -> None:
    data = message(b"half close", b"ok\r\n")
    with box.wire() as wire:
        wire.send(
            b"EHLO scripted\r\nMAIL FROM:<" + SENDER + b">\r\nRCPT TO:<" + RCPT + b">\r\n"
            b"DATA\r\n" + data + b".\r\nQUIT\r\n"
        )
        wire.sock.shutdown(socket.SHUT_WR)
        replies = wire.rest()
    new = box.new_since(before)
    assert codes(replies) == [250, 250, 250, 354, 250, 221], [str(r) for r in replies]
    assert len(new) == 1
