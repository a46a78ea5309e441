"""ingress.py on real loopback sockets: the SMTP dialogue, the allowlist, limits and the spool.

Every test runs the real `Ingress` (RelayHandler, a real Spool in tmp_path, real Metrics) on the
test's event loop, listening on 127.0.0.1 port 0, and talks to it with real clients: aiosmtplib
in the same loop, stdlib smtplib and raw sockets in worker threads, swaks as a subprocess.
Replies are compared with the constants in `relay.replies` where the relay owns them, and spool
contents byte for byte. Faults are made for real (a file where a spool directory should be, a
callback or clock that raises); no relay module is patched. Waits are on replies or conditions,
each bounded by a timeout; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ipaddress
import json
import logging
import re
import shutil
import smtplib
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import aiosmtplib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from relay import ingress as ingress_module
from relay import replies
from relay.errors import SpoolError
from relay.ingress import Ingress, IngressLimits, Listener, RelayHandler, RelaySMTP, SessionRegistry
from relay.metrics import Metrics
from relay.model import QueueEntry, Recipient
from relay.normalize import Normalized, normalize_message
from relay.policy import Network
from relay.spool import Spool, State, new_queue_id, valid_queue_id
from tests.relayproc import strip_trace

NOW = 1_764_000_000.0
HOSTNAME = "relay.test.lan"
MAX_SIZE = 10_000
LOCALHOST = ipaddress.ip_network("127.0.0.1/32")
OUTSIDER = "127.0.0.2"  # loopback on Linux, but not in LOCALHOST
IO_TIMEOUT = 10.0

# CRLF line endings and lines that start with a dot: what the client hands over must come back
# byte for byte after the client's dot-stuffing and the server's unstuffing.
WELL_FORMED = (  # what a well-behaved sender puts on top: the normaliser leaves such mail alone
    b"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\nMessage-ID: <ingress-test@example.com>\r\n"
)
BODY = WELL_FORMED + (
    b"From: scanner@example.com\r\n"
    b"To: alice@example.com\r\n"
    b"Subject: scan 0042\r\n"
    b"\r\n"
    b"hello\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b"end\r\n"
)
QUEUED = re.compile(r"250 2\.0\.0 Ok: queued as ([0-9A-F]+)")
EHLO_LINES = [
    f"250-{HOSTNAME}",
    f"250-SIZE {MAX_SIZE}",
    "250-8BITMIME",
    "250-SMTPUTF8",
    "250-PIPELINING",
    "250 HELP",
]
GREETING = f"220 {HOSTNAME} ESMTP oauth-relay"

T = TypeVar("T")


# --- the relay under test ----------------------------------------------------------------------


@dataclass
class Relay:
    ingress: Ingress
    spool: Spool
    metrics: Metrics
    committed: list[QueueEntry]

    @property
    def port(self) -> int:
        return self.ingress.bound[0][1]

    def files(self, directory: str) -> list[str]:
        return sorted(p.name for p in (self.spool.root / directory).iterdir())

    def nothing_spooled(self) -> bool:
        """No metadata and no body anywhere: tmp/, data/ and every state directory are empty."""
        dirs = ["tmp", "data", *(s.value for s in State)]
        return all(
            not any(path.iterdir()) for path in (self.spool.root / d for d in dirs) if path.is_dir()
        )

    def only_message(self) -> tuple[QueueEntry, bytes]:
        """The single message in incoming/, with its body; fails unless there is exactly one."""
        ids = list(self.spool.ids(State.INCOMING))
        assert len(ids) == 1, ids
        assert self.files("data") == [f"{ids[0]}.eml"]
        assert self.files("tmp") == []
        entry = self.spool.load(State.INCOMING, ids[0])
        return entry, strip_trace(self.spool.read_body(ids[0]), entry.queue_id)

    def received(self, result: str) -> float:
        """relay_messages_received_total{result=...} as scraped from the rendered exposition."""
        text = self.metrics.render().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "relay_messages_received_total" and sample.labels == {
                    "result": result
                }:
                    return sample.value
        raise AssertionError(f"no relay_messages_received_total{{result={result!r}}}")


StartRelay = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start_relay(tmp_path: Path) -> AsyncIterator[StartRelay]:
    """`await start_relay(networks=..., max_recipients=...)`: a listening Ingress; drained after."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)  # catches calls from the wrong thread and never-awaited coroutines
    started: list[Relay] = []

    async def start(
        *,
        networks: Sequence[Network] = (LOCALHOST,),
        max_message_size: int = MAX_SIZE,
        max_recipients: int = 50,
        on_commit: Callable[[QueueEntry], None] | None = None,
        clock: Callable[[], float] = lambda: NOW,
        spill_at: int = 1024 * 1024,
    ) -> Relay:
        spool = Spool(tmp_path / f"spool{len(started)}")
        spool.open()
        metrics = Metrics()
        committed: list[QueueEntry] = []
        limits = IngressLimits(
            HOSTNAME, tuple(networks), max_message_size, max_recipients, spill_at=spill_at
        )
        handler = RelayHandler(spool, limits, metrics, on_commit or committed.append, clock=clock)
        ingress = Ingress(handler, limits)
        await ingress.start([Listener.plain("127.0.0.1:0", tuple(networks))])
        relay = Relay(ingress, spool, metrics, committed)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        await asyncio.wait_for(relay.ingress.drain(0.0), IO_TIMEOUT)
        relay.spool.close()


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking client call in a worker thread, bounded by a timeout."""
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), IO_TIMEOUT + 5)


# --- a raw socket client -----------------------------------------------------------------------


class RawSMTP:
    """Blocking, byte-exact SMTP over a plain socket. Call its methods through `off_loop`."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=IO_TIMEOUT, source_address=(source, 0)
        )
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> str | None:
        """The next reply line without CRLF, or None at end of stream."""
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line.decode("utf-8")

    def reply(self) -> list[str]:
        """All lines of the next (possibly multi-line) reply."""
        lines: list[str] = []
        while True:
            line = self.line()
            if line is None:
                raise ConnectionError(f"connection closed after {lines!r}")
            lines.append(line)
            if line[3:4] != "-":
                return lines

    def replies(self, count: int) -> list[list[str]]:
        return [self.reply() for _ in range(count)]

    def command(self, data: bytes) -> list[str]:
        self.send(data)
        return self.reply()

    def rest(self) -> bytes:
        """Everything the server still sends until it closes the connection."""
        data, self._buffer = self._buffer, b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


OpenRaw = Callable[..., Awaitable[RawSMTP]]


@pytest.fixture
async def open_raw() -> AsyncIterator[OpenRaw]:
    """`await open_raw(port, source=...)`: a connected RawSMTP, closed after the test."""
    opened: list[RawSMTP] = []

    async def connect(port: int, source: str = "127.0.0.1") -> RawSMTP:
        raw = await off_loop(RawSMTP, port, source)
        opened.append(raw)
        return raw

    yield connect
    for raw in opened:
        raw.close()


async def greeted(open_raw: OpenRaw, relay: Relay, helo: bytes = b"EHLO raw.test\r\n") -> RawSMTP:
    raw = await open_raw(relay.port)
    assert await off_loop(raw.reply) == [GREETING]
    assert (await off_loop(raw.command, helo))[-1].startswith("250 ")
    return raw


# --- aiosmtplib helpers ------------------------------------------------------------------------


def client_for(relay: Relay, **kwargs: Any) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=relay.port,
        local_hostname=kwargs.pop("local_hostname", "scanner.lan"),
        start_tls=False,
        timeout=IO_TIMEOUT,
        **kwargs,
    )


def text(response: aiosmtplib.SMTPResponse | aiosmtplib.SMTPResponseException) -> str:
    """The reply as it went over the wire: code, space, the rest of the (last) line."""
    return f"{response.code} {response.message}"


async def send(
    relay: Relay,
    body: bytes = BODY,
    *,
    sender: str = "scanner@example.com",
    recipients: Sequence[str] = ("alice@example.com",),
) -> str:
    """One transaction with aiosmtplib; returns the final reply as text."""
    async with client_for(relay) as client:
        await client.mail(sender)
        for recipient in recipients:
            await client.rcpt(recipient)
        try:
            return text(await client.data(body))
        except aiosmtplib.SMTPResponseException as exc:
            return text(exc)


def stuffed(body: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency, as a client applies it: double a dot that starts a line."""
    return re.sub(rb"(?m)^\.", b"..", body)


def queue_id_of(reply: str) -> str:
    match = QUEUED.fullmatch(reply)
    assert match is not None, reply
    assert valid_queue_id(match.group(1))
    return match.group(1)


# --- a message accepted ------------------------------------------------------------------------


async def test_accepted_message_is_spooled_before_250(start_relay: StartRelay) -> None:
    relay = await start_relay()
    async with client_for(relay, local_hostname="scanner.lan") as client:
        assert text(await client.mail("scanner@example.com")) == str(replies.SENDER_OK)
        assert text(await client.rcpt("alice@example.com")) == str(replies.RECIPIENT_OK)
        assert text(await client.rcpt("bob@example.com")) == str(replies.RECIPIENT_OK)
        reply = text(await client.data(BODY))

    queue_id = queue_id_of(reply)
    assert reply == str(replies.queued(queue_id))
    assert queue_id[:11] == new_queue_id(NOW)[:11]  # time-ordered from the injected clock
    assert relay.files("incoming") == [f"{queue_id}.json"]
    assert relay.files("data") == [f"{queue_id}.eml"]
    for path in (relay.spool.meta_path(State.INCOMING, queue_id), relay.spool.body_path(queue_id)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    entry, body = relay.only_message()
    assert body == BODY
    assert entry == QueueEntry(
        queue_id=queue_id,
        mail_from="scanner@example.com",
        recipients=(Recipient("alice@example.com"), Recipient("bob@example.com")),
        received_at=NOW,
        size=relay.spool.body_path(queue_id).stat().st_size,  # the trace line on top included
        client="127.0.0.1",
        helo="scanner.lan",
        smtputf8=False,
        eightbit=False,
    )
    meta = json.loads(relay.spool.meta_path(State.INCOMING, queue_id).read_bytes())
    assert meta["version"] == 1
    assert relay.committed == [entry]
    assert relay.received("accepted") == 1
    assert relay.received("error") == 0


# --- 250 only after a durable commit -----------------------------------------------------------


@pytest.mark.parametrize("broken", ["data", "tmp", "incoming"])
async def test_spool_failure_answers_451_and_leaves_nothing(
    start_relay: StartRelay, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    """A regular file where a spool directory should be makes commit() fail even as root:
    data/ fails the body write, tmp/ the metadata write (body already written), incoming/ the
    final rename (both already written). Each must roll back and answer 451 4.3.0."""
    caplog.set_level(logging.INFO, logger="relay")
    relay = await start_relay()
    directory = relay.spool.root / broken
    shutil.rmtree(directory)
    directory.write_bytes(b"not a directory\n")

    async with client_for(relay) as client:
        await client.mail("scanner@example.com")
        await client.rcpt("alice@example.com")
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(BODY)
        assert text(refused.value) == str(replies.TEMPORARY_FAILURE)
        assert 400 <= refused.value.code < 500
        for leak in ("Not a directory", "Errno", "Error", str(relay.spool.root), broken + "/"):
            assert leak not in refused.value.message

        assert relay.nothing_spooled()
        assert relay.committed == []
        assert relay.received("error") == 1
        assert relay.received("accepted") == 0
        failures = [r for r in caplog.records if r.name == "relay.ingress" and r.exc_info]
        assert len(failures) == 1
        record = failures[0]
        assert record.levelno == logging.ERROR
        queue_id = record.queue_id  # type: ignore[attr-defined]
        assert valid_queue_id(queue_id)
        assert record.exc_info is not None
        error = record.exc_info[1]
        assert isinstance(error, SpoolError)
        assert str(error).startswith(f"{queue_id}: commit failed:")
        assert isinstance(error.__cause__, NotADirectoryError)
        assert queue_id not in refused.value.message

        # "try again later" means it: once the spool is repaired, the same session succeeds.
        directory.unlink()
        directory.mkdir(mode=0o700)
        await client.mail("scanner@example.com")
        await client.rcpt("alice@example.com")
        retried = text(await client.data(BODY))
    assert retried == str(replies.queued(queue_id_of(retried)))
    assert relay.only_message()[1] == BODY


async def test_unexpected_error_answers_451_without_detail(
    start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """Any exception in a hook goes through handle_exception: generic 451, never aiosmtpd's
    `500 Error: (ExcName) text`; the detail is in the log."""

    def broken_clock() -> float:
        raise RuntimeError("clock source /etc/secret unavailable")

    caplog.set_level(logging.INFO, logger="relay")
    relay = await start_relay(clock=broken_clock)
    assert await send(relay) == str(replies.TEMPORARY_FAILURE)
    assert relay.nothing_spooled()
    assert relay.committed == []
    assert relay.received("error") == 1
    assert "clock source /etc/secret unavailable" in caplog.text


async def test_committed_message_is_acknowledged_even_if_on_commit_fails(
    start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_enqueue(entry: QueueEntry) -> None:
        raise RuntimeError("scheduler unavailable")

    caplog.set_level(logging.INFO, logger="relay")
    relay = await start_relay(on_commit=failing_enqueue)
    reply = await send(relay)
    entry, _ = relay.only_message()  # it is durably queued whatever the reply says
    assert reply == str(replies.queued(entry.queue_id))
    assert "scheduler unavailable" in caplog.text


# --- the allowlist -----------------------------------------------------------------------------


async def test_client_outside_allowlist_gets_554_and_is_closed(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay(networks=[LOCALHOST])
    outsider = await open_raw(relay.port, OUTSIDER)
    assert await off_loop(outsider.line) == str(replies.ACCESS_DENIED)
    # RFC 5321 3.1: after a 554 greeting, every command but QUIT gets 503, then we close
    assert await off_loop(outsider.command, b"EHLO x\r\n") == [str(replies.REFUSED_SESSION)]
    assert await off_loop(outsider.command, b"MAIL FROM:<a@b.c>\r\n") == [
        str(replies.REFUSED_SESSION)
    ]
    assert await off_loop(outsider.command, b"QUIT\r\n") == [str(replies.BYE)]
    assert await off_loop(outsider.rest) == b""
    assert relay.received("refused_allowlist") == 1
    assert relay.nothing_spooled()

    assert queue_id_of(await send(relay))  # the same relay from 127.0.0.1
    assert relay.only_message()[0].client == "127.0.0.1"
    assert relay.received("refused_allowlist") == 1


async def test_aiosmtplib_from_outside_allowlist_is_refused(start_relay: StartRelay) -> None:
    relay = await start_relay(networks=[LOCALHOST])
    client = client_for(relay, source_address=(OUTSIDER, 0))
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
        await client.connect()
    assert text(refused.value) == str(replies.ACCESS_DENIED)
    client.close()
    assert relay.nothing_spooled()


async def test_empty_allowlist_refuses_everyone(start_relay: StartRelay, open_raw: OpenRaw) -> None:
    relay = await start_relay(networks=[])
    raw = await open_raw(relay.port)
    assert await off_loop(raw.line) == str(replies.ACCESS_DENIED)
    assert await off_loop(raw.command, b"QUIT\r\n") == [str(replies.BYE)]
    assert await off_loop(raw.rest) == b""
    assert relay.received("refused_allowlist") == 1
    assert relay.nothing_spooled()


# --- EHLO and HELO -----------------------------------------------------------------------------


async def test_ehlo_advertises_size_8bitmime_smtputf8_pipelining(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay()
    raw = await open_raw(relay.port)
    assert await off_loop(raw.reply) == [GREETING]
    assert await off_loop(raw.command, b"EHLO scanner.lan\r\n") == EHLO_LINES
    assert await off_loop(raw.command, b"QUIT\r\n") == ["221 2.0.0 Bye"]
    assert await off_loop(raw.rest) == b""

    async with client_for(relay) as client:
        await client.ehlo()
        assert client.esmtp_extensions["size"] == str(MAX_SIZE)
        for extension in ("8bitmime", "smtputf8", "pipelining"):
            assert client.supports_extension(extension), extension
        assert not client.supports_extension("auth")  # nothing to authenticate with here


def helo_only_transaction(port: int) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=IO_TIMEOUT) as client:
        helo = client.helo("oldprinter")
        client.mail("printer@example.com")
        client.rcpt("alice@example.com")
        return helo, client.data(BODY)


async def test_helo_only_client_can_send(start_relay: StartRelay) -> None:
    relay = await start_relay()
    helo, (code, message) = await off_loop(helo_only_transaction, relay.port)
    assert helo == (250, HOSTNAME.encode())
    queue_id = queue_id_of(f"{code} {message.decode()}")
    entry, body = relay.only_message()
    assert entry.queue_id == queue_id
    assert entry.helo == "oldprinter"
    assert entry.mail_from == "printer@example.com"
    assert body == BODY


# --- recipients --------------------------------------------------------------------------------


async def test_recipient_limit_refuses_the_fourth_with_452(start_relay: StartRelay) -> None:
    relay = await start_relay(max_recipients=3)
    addresses = [f"user{n}@example.com" for n in range(1, 5)]
    async with client_for(relay) as client:
        await client.mail("scanner@example.com")
        for address in addresses[:3]:
            assert text(await client.rcpt(address)) == str(replies.RECIPIENT_OK)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt(addresses[3])
        assert text(refused.value) == str(replies.TOO_MANY_RECIPIENTS)
        assert text(refused.value) == "452 4.5.3 Too many recipients"
        reply = text(await client.data(BODY))
    entry, _ = relay.only_message()
    assert reply == str(replies.queued(entry.queue_id))
    assert entry.recipients == tuple(Recipient(a) for a in addresses[:3])
    assert relay.received("too_many_recipients") == 1
    assert relay.received("accepted") == 1


async def test_duplicate_recipients_are_stored_once(start_relay: StartRelay) -> None:
    relay = await start_relay()
    reply = await send(
        relay,
        recipients=["alice@example.com", "bob@example.com", "alice@example.com"],
    )
    entry, _ = relay.only_message()
    assert reply == str(replies.queued(entry.queue_id))
    assert entry.recipients == (Recipient("alice@example.com"), Recipient("bob@example.com"))


# --- the size limit ----------------------------------------------------------------------------


def oversized_body() -> bytes:
    return b"Subject: big\r\n\r\n" + b"x" * 98 + b"\r\n" + (b"y" * 98 + b"\r\n") * 120


async def test_mail_size_over_limit_is_refused_with_552(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay()
    raw = await greeted(open_raw, relay)
    too_big = await off_loop(raw.command, f"MAIL FROM:<a@b> SIZE={MAX_SIZE + 1}\r\n".encode())
    assert len(too_big) == 1
    assert too_big[0].startswith("552 ")
    # exactly at the limit is fine
    ok = await off_loop(raw.command, f"MAIL FROM:<a@b> SIZE={MAX_SIZE}\r\n".encode())
    assert ok == [str(replies.SENDER_OK)]
    assert relay.nothing_spooled()


async def test_body_over_limit_is_refused_with_552_and_not_spooled(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay()
    body = oversized_body()
    assert len(body) > MAX_SIZE
    async with client_for(relay) as client:
        await client.mail("scanner@example.com")
        await client.rcpt("alice@example.com")
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(body)
        assert refused.value.code == 552
        assert relay.nothing_spooled()
        assert relay.committed == []
        # the session survives the refusal and the next message goes through
        await client.mail("scanner@example.com")
        await client.rcpt("alice@example.com")
        reply = text(await client.data(BODY))
    entry, stored = relay.only_message()
    assert reply == str(replies.queued(entry.queue_id))
    assert stored == BODY


def body_of_size(size: int, first_line: bytes) -> bytes:
    """`size` bytes in lines of at most 78 characters, the first body line being `first_line`."""
    body = WELL_FORMED + b"From: a@example.com\r\nSubject: exact\r\n\r\n" + first_line + b"\r\n"
    while len(body) + 80 <= size:
        body += b"z" * 78 + b"\r\n"
    last = size - len(body) - 2
    assert last >= 0
    return body + b"z" * last + b"\r\n"


@pytest.mark.parametrize(
    "first_line",
    [
        pytest.param(b"plain", id="no-dot-lines"),
        pytest.param(b".dot-led", id="dot-led-line"),
    ],
)
async def test_message_of_exactly_the_advertised_size_is_accepted(
    start_relay: StartRelay, first_line: bytes
) -> None:
    relay = await start_relay()
    body = body_of_size(MAX_SIZE, first_line)
    assert len(body) == MAX_SIZE
    reply = await send(relay, body)
    entry, stored = relay.only_message()
    assert reply == str(replies.queued(entry.queue_id))
    assert stored == body
    assert entry.size == relay.spool.body_path(entry.queue_id).stat().st_size > MAX_SIZE


async def test_size_refusals_use_the_relay_reply_and_are_counted(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay()
    raw = await greeted(open_raw, relay)
    too_big = await off_loop(raw.command, f"MAIL FROM:<a@b> SIZE={MAX_SIZE + 1}\r\n".encode())
    assert too_big == [str(replies.MESSAGE_TOO_BIG)]
    assert await off_loop(raw.command, b"MAIL FROM:<a@b>\r\n") == [str(replies.SENDER_OK)]
    assert await off_loop(raw.command, b"RCPT TO:<c@d>\r\n") == [str(replies.RECIPIENT_OK)]
    assert (await off_loop(raw.command, b"DATA\r\n"))[0].startswith("354 ")
    refused = await off_loop(raw.command, oversized_body() + b".\r\n")
    assert refused == [str(replies.MESSAGE_TOO_BIG)]
    assert relay.received("too_big") == 2
    assert relay.nothing_spooled()


# --- pipelining --------------------------------------------------------------------------------


async def test_pipelined_commands_get_all_replies_in_order(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay()
    raw = await open_raw(relay.port)
    assert await off_loop(raw.reply) == [GREETING]
    await off_loop(
        raw.send,
        b"EHLO pipe.lan\r\n"
        b"MAIL FROM:<scanner@example.com>\r\n"
        b"RCPT TO:<alice@example.com>\r\n"
        b"RCPT TO:<bob@example.com>\r\n"
        b"DATA\r\n",
    )
    assert await off_loop(raw.replies, 5) == [
        EHLO_LINES,
        [str(replies.SENDER_OK)],
        [str(replies.RECIPIENT_OK)],
        [str(replies.RECIPIENT_OK)],
        ["354 End data with <CR><LF>.<CR><LF>"],
    ]
    await off_loop(raw.send, stuffed(BODY) + b".\r\nQUIT\r\n")
    queued, bye = await off_loop(raw.replies, 2)
    assert bye == ["221 2.0.0 Bye"]
    assert await off_loop(raw.rest) == b""
    entry, body = relay.only_message()
    assert queued == [str(replies.queued(entry.queue_id))]
    assert entry.helo == "pipe.lan"
    assert entry.recipients == (Recipient("alice@example.com"), Recipient("bob@example.com"))
    assert relay.committed == [entry]


# --- SMTPUTF8 and 8-bit ------------------------------------------------------------------------


async def test_smtputf8_sender_is_accepted_and_flagged(start_relay: StartRelay) -> None:
    relay = await start_relay()
    async with client_for(relay) as client:
        mail = await client.mail("jürgen@example.com", options=["SMTPUTF8"], encoding="utf-8")
        assert text(mail) == str(replies.SENDER_OK)
        rcpt = await client.rcpt("müller@example.com", encoding="utf-8")
        assert text(rcpt) == str(replies.RECIPIENT_OK)
        reply = text(await client.data(BODY))
    entry, body = relay.only_message()
    assert reply == str(replies.queued(entry.queue_id))
    assert entry.mail_from == "jürgen@example.com"
    assert entry.recipients == (Recipient("müller@example.com"),)
    assert entry.smtputf8 is True
    assert entry.eightbit is False
    assert body == BODY
    raw_meta = relay.spool.meta_path(State.INCOMING, entry.queue_id).read_bytes()
    assert "jürgen@example.com".encode() in raw_meta


HEAD = WELL_FORMED + b"From: scanner@example.com\r\n"


@pytest.mark.parametrize(
    ("body", "smtputf8", "eightbit"),
    [
        pytest.param(
            HEAD + "Subject: hello\r\n\r\nGrüße aus Köln\r\n".encode(), False, True, id="8bit-body"
        ),
        pytest.param(
            HEAD + b"Subject: latin-1 body\r\n\r\ncaf\xe9\r\n", False, True, id="non-utf8-8bit-body"
        ),
        pytest.param(HEAD + b"Subject: hello\r\n\r\nascii\r\n", False, False, id="7bit"),
    ],
)
async def test_eightbit_and_smtputf8_flags_follow_the_content(
    start_relay: StartRelay, body: bytes, smtputf8: bool, eightbit: bool
) -> None:
    relay = await start_relay()
    async with client_for(relay) as client:
        await client.mail("scanner@example.com", options=["BODY=8BITMIME"])
        await client.rcpt("alice@example.com")
        reply = text(await client.data(body))
    entry, stored = relay.only_message()
    assert reply == str(replies.queued(entry.queue_id))
    assert stored == body
    assert (entry.smtputf8, entry.eightbit) == (smtputf8, eightbit)


async def test_raw_utf8_header_without_smtputf8_is_encoded_before_the_spool(
    start_relay: StartRelay,
) -> None:
    """An old device writes UTF-8 raw into Subject without asking for SMTPUTF8: the header is
    encoded per RFC 2047 (the text survives) and the message needs no SMTPUTF8 upstream."""
    relay = await start_relay()
    body = HEAD + "Subject: Grüße aus Köln\r\n\r\nplain body\r\n".encode()
    async with client_for(relay) as client:
        await client.mail("scanner@example.com")
        await client.rcpt("alice@example.com")
        await client.data(body)
    entry, stored = relay.only_message()
    assert stored.isascii()
    parsed = email.message_from_bytes(stored, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße aus Köln"
    assert (entry.smtputf8, entry.eightbit) == (False, False)


async def test_non_utf8_address_is_refused_with_553(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay()
    raw = await greeted(open_raw, relay)
    bad_address = str(replies.BAD_ADDRESS)
    assert await off_loop(raw.command, b"MAIL FROM:<caf\xe9@example.com>\r\n") == [bad_address]
    assert bad_address.startswith("553 5.1.7 ")
    # the refused MAIL left no state behind: a valid one is accepted, not "nested MAIL"
    ok = await off_loop(raw.command, b"MAIL FROM:<cafe@example.com>\r\n")
    assert ok == [str(replies.SENDER_OK)]
    assert await off_loop(raw.command, b"RCPT TO:<caf\xe9@example.com>\r\n") == [bad_address]
    assert await off_loop(raw.command, b"DATA\r\n") == [str(replies.NEED_RCPT)]
    assert relay.nothing_spooled()


# --- end-of-data smuggling ---------------------------------------------------------------------


async def test_only_crlf_dot_crlf_ends_the_data(start_relay: StartRelay, open_raw: OpenRaw) -> None:
    """Bare-LF variants of the end-of-data marker are message content, never a new command.
    A line that starts with a dot is unstuffed (RFC 5321 4.5.2) whether the line before it
    ended in CRLF or a bare LF, the way smtplib stuffs: `\\n.\\n` arrives as `\\n\\n`, and a
    client that wants `\\r\\n.\\n` stored sends `\\r\\n..\\n`."""
    relay = await start_relay()
    raw = await greeted(open_raw, relay)
    await off_loop(raw.send, b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert await off_loop(raw.replies, 3) == [
        [str(replies.SENDER_OK)],
        [str(replies.RECIPIENT_OK)],
        ["354 End data with <CR><LF>.<CR><LF>"],
    ]
    wire = (
        b"Subject: smuggle\r\n"
        b"\r\n"
        b"one\n.\nMAIL FROM:<evil@example.com>\r\n"  # \n.\n
        b".\nRCPT TO:<victim@example.com>\r\n"  # \r\n.\n (a dot-led line: unstuffed)
        b"..\nDATA\r\n"  # \r\n.\n, stuffed by the client
        b"two\n.\r\n"  # \n.\r\n
        b"three\r.\r\n"  # \r.\r\n
        b"end\r\n"
        b".\r\n"
        b"QUIT\r\n"
    )
    stored = (  # a line ends at any LF, and a dot that leads a line is unstuffed (Postfix's
        # "normalize" treatment of bare LF); only <CRLF>.<CRLF> ends the data
        b"Subject: smuggle\r\n"
        b"\r\n"
        b"one\n\nMAIL FROM:<evil@example.com>\r\n"
        b"\nRCPT TO:<victim@example.com>\r\n"
        b".\nDATA\r\n"
        b"two\n\r\n"
        b"three\r.\r\n"
        b"end\r\n"
    )
    await off_loop(raw.send, wire)
    queued, bye = await off_loop(raw.replies, 2)
    assert bye == ["221 2.0.0 Bye"]
    assert await off_loop(raw.rest) == b""  # no reply to a smuggled command
    entry, body = relay.only_message()
    assert queued == [str(replies.queued(entry.queue_id))]
    # the DATA reader's exact bytes are tested in test_smtpdata; here they are also
    # normalised (bare LF -> CRLF, Date and Message-ID added): what matters is that the
    # smuggled commands stayed content of the one message
    assert body.endswith(
        normalize_message(
            stored,
            envelope_from="a@example.com",
            hostname="relay.test",
            now=datetime.now(UTC),
            smtputf8=False,
        ).data.split(b"\r\n\r\n", 1)[1]
    )
    for smuggled in (b"MAIL FROM:<evil@example.com>", b"RCPT TO:<victim@example.com>", b"DATA"):
        assert smuggled in body
    assert entry.mail_from == "a@example.com"
    assert entry.recipients == (Recipient("b@example.com"),)


async def test_a_lone_angle_bracket_is_a_syntax_error_not_a_server_error(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay()
    raw = await greeted(open_raw, relay)
    answers = [
        (await off_loop(raw.command, command))[0][:3]
        for command in (
            b"MAIL FROM:<\r\n",
            b"MAIL FROM:<a@b.c>\r\n",
            b"RCPT TO:<\r\n",
            b"RCPT TO:<=??q??=@example.com>\r\n",  # the parser fails late, on addr_spec
        )
    ]
    assert answers == ["553", "250", "553", "553"]  # was 451 and a traceback in the log
    assert relay.received("error") == 0


async def test_a_transaction_pipelined_after_the_502_goodbye_is_not_accepted(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    """aiosmtpd closes the session after too many unknown commands but goes on through what
    is already buffered: a message there must not be spooled, since its 250 cannot be sent
    (found by test_fuzz_ingress once normalising a small body stopped yielding to the loop)."""
    relay = await start_relay()
    raw = await greeted(open_raw, relay)
    transaction = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    await off_loop(raw.send, b"XYZZY\r\n" * 12 + transaction + BODY + b".\r\nQUIT\r\n")
    answer = (await off_loop(raw.rest)).decode()
    assert "502 5.5.1 Too many unrecognized commands" in answer
    assert "queued as" not in answer
    reply = await send(relay, BODY)  # a new session: the relay has handled everything before
    entry, _ = relay.only_message()
    assert reply == str(replies.queued(entry.queue_id))
    assert [e.queue_id for e in relay.committed] == [entry.queue_id]


# --- aiosmtpd's dispatch tables ---------------------------------------------------------------


async def test_short_dir_listing_gives_aiosmtpd_the_same_tables(tmp_path: Path) -> None:
    """RelaySMTP and RelayHandler list only their hooks in dir() (aiosmtpd builds its tables
    from dir() on every connection): the tables must hold every hook the full listing has."""
    spool = Spool(tmp_path / "spool")
    spool.open()
    limits = IngressLimits(HOSTNAME, (LOCALHOST,), MAX_SIZE, 10)
    handler = RelayHandler(spool, limits, Metrics(), lambda entry: None)
    session = RelaySMTP(handler, limits, SessionRegistry())
    everything = object.__dir__(session)
    assert set(session._smtp_methods) == {n[5:] for n in everything if n.startswith("smtp_")}
    assert set(session._auth_methods) == {n[5:] for n in everything if n.startswith("auth_")} - {
        "CRAM_MD5"
    }
    hooks = {n[7:] for n in object.__dir__(handler) if n.startswith("handle_")}
    assert set(session._handle_hooks) == hooks
    assert {"DATA", "EHLO", "MAIL", "RCPT", "exception"} <= hooks


def reference_getaddr(arg: str) -> tuple[str | None, str | None]:
    """aiosmtpd 1.4's SMTP._getaddr, as it parses (without its local-part limit), but with
    the IndexError Python's parser raises on a lone "<" taken as a syntax error too."""
    if not arg:
        return "", ""
    try:
        parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
        address, rest = parse(arg)
        return address.addr_spec, rest
    except (HeaderParseError, IndexError):
        return None, None


ADDRESS_PARTS = st.sampled_from(
    ["<", ">", "a", "B.c", "x+y", "@", ".", "..", "example.com", "[1.2.3.4]", " ", "\t",
     "SIZE=5120", "(c)", '"q r"', "-", "é", ":", ",", "BODY=8BITMIME", "=?utf-8?q?j=C3=BCrgen?=",
     "=?", "?=", "\x0b", "\xa0", "\r", "\u3000"]
)  # fmt: skip


@settings(max_examples=500)
@given(st.lists(ADDRESS_PARTS, max_size=9).map("".join))
def test_address_fast_path_parses_like_aiosmtpd(arg: str) -> None:
    ours = RelaySMTP._getaddr(SimpleNamespace(local_part_limit=0), arg)  # type: ignore[arg-type]
    assert ours == reference_getaddr(arg)


@pytest.mark.parametrize(
    "arg",
    [
        "<=?utf-8?q?j=C3=BCrgen?=@contoso.com>",  # the email parser decodes it
        "<=?utf-8?q?a=40evil.example?=@example.com>",
        "<=??q??=@example.com>",
        "<a@b.example> \x0bSIZE=1",  # whitespace the parser skips, besides SP and HTAB
        "<a@b.example> \x0b(c)",
        "<a@b.example>\t\r(c) SIZE=10",
    ],
)
def test_address_fast_path_leaves_what_it_cannot_parse_alike_to_the_email_parser(
    arg: str,
) -> None:
    assert not ingress_module._SIMPLE_ANGLE_ADDR.match(arg)
    ours = RelaySMTP._getaddr(SimpleNamespace(local_part_limit=0), arg)  # type: ignore[arg-type]
    assert ours == reference_getaddr(arg)


@pytest.mark.parametrize(
    "arg",
    ["<scan@contoso.com>", "<scan@contoso.com> SIZE=5120", "<a.b+c@x-y.example>\tBODY=8BITMIME"],
)
def test_address_fast_path_takes_what_devices_send(arg: str) -> None:
    assert ingress_module._SIMPLE_ANGLE_ADDR.match(arg)
    ours = RelaySMTP._getaddr(SimpleNamespace(local_part_limit=0), arg)  # type: ignore[arg-type]
    assert ours == reference_getaddr(arg)


# --- large messages: the body goes to a file while it arrives (issue #8) -----------------------

SPILL = 4096  # bytes of body held in memory before the rest goes to tmp/
BIG_LIMIT = 3 * 1024 * 1024


def scan_body(lines: int = 2000, *, head: bytes = WELL_FORMED, line: bytes = b"QUJD" * 19) -> bytes:
    """A copier scan: header, then base64-like lines of 76 characters, some dot-led."""
    body = head + b"From: scanner@example.com\r\nTo: alice@example.com\r\nSubject: scan\r\n\r\n"
    rows = [b"." + line[1:] if n % 97 == 0 else line for n in range(lines)]
    return body + b"\r\n".join(rows) + b"\r\n"


def normalised(body: bytes) -> Normalized:
    """What the relay should store for `body` from scanner@example.com (small or large)."""
    now = datetime.fromtimestamp(NOW, UTC)
    return normalize_message(
        body, envelope_from="scanner@example.com", hostname=HOSTNAME, now=now, smtputf8=False
    )


def received_files(relay: Relay) -> list[Path]:
    return sorted((relay.spool.root / "tmp").glob("*.recv"))


async def until(predicate: Callable[[], Any], what: str, timeout: float = IO_TIMEOUT) -> None:
    """Poll a cheap condition (a directory listing) until it holds, or fail."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_large_body_is_in_a_file_before_the_final_dot_and_stored_exactly(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay(spill_at=SPILL, max_message_size=BIG_LIMIT)
    body = scan_body(8000)  # half of it is more than the 256 KiB gathered for each write
    raw = await greeted(open_raw, relay)
    await off_loop(raw.send, b"MAIL FROM:<scanner@example.com>\r\nRCPT TO:<alice@example.com>\r\n")
    assert await off_loop(raw.replies, 2) == [[str(replies.SENDER_OK)], [str(replies.RECIPIENT_OK)]]
    assert await off_loop(raw.command, b"DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]
    wire = stuffed(body)
    await off_loop(raw.send, wire[: len(wire) // 2])
    await until(
        lambda: any(p.stat().st_size > SPILL for p in received_files(relay)), "a .recv file"
    )
    assert stat.S_IMODE(received_files(relay)[0].stat().st_mode) == 0o600
    assert relay.files("incoming") == []
    await off_loop(raw.send, wire[len(wire) // 2 :] + b".\r\n")
    queued = await off_loop(raw.reply)
    entry, stored = relay.only_message()  # also: tmp/ is empty again
    assert queued == [str(replies.queued(entry.queue_id))]
    assert stored == body
    assert entry.size == relay.spool.body_path(entry.queue_id).stat().st_size
    assert stat.S_IMODE(relay.spool.body_path(entry.queue_id).stat().st_mode) == 0o600
    assert not entry.eightbit
    assert relay.received("accepted") == 1


async def test_large_body_with_header_fixes_keeps_its_body_byte_for_byte(
    start_relay: StartRelay,
) -> None:
    """No Date, no Message-ID and a Bcc: only the header block is rewritten."""
    relay = await start_relay(spill_at=SPILL, max_message_size=BIG_LIMIT)
    body = scan_body(head=b"Bcc: hidden@example.com\r\n")
    reply = await send(relay, body)
    entry, stored = relay.only_message()
    assert reply == str(replies.queued(entry.queue_id))
    expected = normalised(body).data
    mid = re.compile(rb"Message-ID: <[^>]+>")
    assert mid.sub(b"<id>", stored) == mid.sub(b"<id>", expected)
    assert b"Bcc" not in stored
    assert stored.endswith(body[body.index(b"\r\n\r\n") :])
    assert entry.size == relay.spool.body_path(entry.queue_id).stat().st_size


@pytest.mark.parametrize(
    "quirk",
    [
        pytest.param(b"\n", id="bare-lf"),
        pytest.param(b"x" * 1200, id="long-line"),
        pytest.param(b"caf\xc3\xa9", id="8bit"),
    ],
)
async def test_large_body_that_needs_fixing_is_normalised_like_a_small_one(
    start_relay: StartRelay, quirk: bytes
) -> None:
    relay = await start_relay(spill_at=SPILL, max_message_size=BIG_LIMIT)
    body = scan_body(line=b"line " + quirk + b" end")
    reply = await send(relay, body)
    entry, stored = relay.only_message()
    assert reply == str(replies.queued(entry.queue_id))
    expected = normalised(body)
    assert expected.data != body or quirk == b"caf\xc3\xa9"
    assert stored == expected.data
    assert entry.eightbit == expected.eightbit
    assert entry.size == relay.spool.body_path(entry.queue_id).stat().st_size


async def test_large_body_over_the_limit_gets_552_and_leaves_no_file(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(spill_at=SPILL, max_message_size=50_000)
    async with client_for(relay) as client:
        await client.mail("scanner@example.com")
        await client.rcpt("alice@example.com")
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(scan_body())
        assert refused.value.code == 552
        assert relay.nothing_spooled()
        assert (await client.noop()).code == 250


async def test_large_header_block_in_a_file_is_refused_with_552(start_relay: StartRelay) -> None:
    relay = await start_relay(spill_at=SPILL, max_message_size=BIG_LIMIT)
    fields = b"".join(b"X-Field-%d: value\r\n" % n for n in range(60_000))  # > 1 MiB
    reply = await send(relay, fields + b"\r\nbody\r\n")
    assert reply == str(replies.HEADER_TOO_BIG)
    assert relay.nothing_spooled()


async def test_client_gone_during_a_large_body_leaves_no_file(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay(spill_at=SPILL, max_message_size=BIG_LIMIT)
    raw = await greeted(open_raw, relay)
    await off_loop(raw.send, b"MAIL FROM:<scanner@example.com>\r\nRCPT TO:<alice@example.com>\r\n")
    await off_loop(raw.replies, 2)
    assert (await off_loop(raw.command, b"DATA\r\n"))[0].startswith("354")
    await off_loop(raw.send, stuffed(scan_body())[:100_000])
    await until(lambda: bool(received_files(relay)), "a .recv file")
    raw.close()
    await until(relay.nothing_spooled, "the .recv file to go")
    assert relay.received("aborted") == 1


async def test_client_gone_right_after_the_final_dot_of_a_large_body_leaves_no_stray_file(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    """The session ends while the body is normalised in a worker thread (bare LF: in
    memory): the files are removed once the thread is done, unless the commit took them."""
    relay = await start_relay(spill_at=SPILL, max_message_size=BIG_LIMIT)
    raw = await greeted(open_raw, relay)
    await off_loop(raw.send, b"MAIL FROM:<scanner@example.com>\r\nRCPT TO:<alice@example.com>\r\n")
    await off_loop(raw.replies, 2)
    assert (await off_loop(raw.command, b"DATA\r\n"))[0].startswith("354")
    body = scan_body(20_000, line=b"line with a bare LF\n" + b"Q" * 50)
    await off_loop(raw.send, stuffed(body) + b".\r\n")
    await until(
        lambda: any(p.stat().st_size > len(body) for p in received_files(relay)), "all of it"
    )
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # a reset: the session ends at once (a FIN would let it answer first)

    def settled() -> bool:
        stored = {name.removesuffix(".eml") for name in relay.files("data")}
        queued = {name.removesuffix(".json") for name in relay.files("incoming")}
        return relay.files("tmp") == [] and stored == queued

    await until(settled, "no file but those of a committed message")


async def test_spool_that_cannot_take_a_large_body_answers_451_and_reads_to_the_end(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    """The body is read and dropped to its final dot: none of its lines becomes a command."""
    relay = await start_relay(spill_at=SPILL, max_message_size=BIG_LIMIT)
    tmp = relay.spool.root / "tmp"
    tmp.rmdir()
    tmp.write_bytes(b"")  # a file where tmp/ should be: nothing can be created in it
    raw = await greeted(open_raw, relay)
    await off_loop(raw.send, b"MAIL FROM:<scanner@example.com>\r\nRCPT TO:<alice@example.com>\r\n")
    await off_loop(raw.replies, 2)
    assert (await off_loop(raw.command, b"DATA\r\n"))[0].startswith("354")
    body = scan_body() + b"RSET\r\nMAIL FROM:<evil@example.com>\r\n"
    await off_loop(raw.send, stuffed(body) + b".\r\nNOOP\r\n")
    assert await off_loop(raw.replies, 2) == [
        [str(replies.TEMPORARY_FAILURE)],
        ["250 OK"],
    ]
    assert relay.files("data") == []
    assert relay.files("incoming") == []
    assert relay.received("error") == 1


# --- swaks -------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_sends_a_message(start_relay: StartRelay) -> None:
    relay = await start_relay()
    process = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        f"127.0.0.1:{relay.port}",
        "--from",
        "a@example.com",
        "--to",
        "b@example.com",
        "--helo",
        "swaks.test",
        "--body",
        "hello",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), IO_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode(errors="replace")
    entry, body = relay.only_message()
    assert f"<-  {replies.queued(entry.queue_id)}".encode() in output
    assert entry.mail_from == "a@example.com"
    assert entry.recipients == (Recipient("b@example.com"),)
    assert entry.helo == "swaks.test"
    assert b"\r\nX-Mailer: swaks " in body
    assert b"\r\n\r\nhello\r\n" in body  # swaks's template adds blank lines after the body
    assert entry.size == relay.spool.body_path(entry.queue_id).stat().st_size


# --- drain -------------------------------------------------------------------------------------


async def test_drain_closes_idle_sessions_and_lets_a_transaction_finish(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay()
    idle = await greeted(open_raw, relay)
    busy = client_for(relay)
    await busy.connect()
    try:
        await busy.mail("scanner@example.com")
        await busy.rcpt("alice@example.com")

        drain = asyncio.create_task(relay.ingress.drain(IO_TIMEOUT))
        assert await off_loop(idle.rest) == f"{replies.SHUTTING_DOWN}\r\n".encode()
        assert str(replies.SHUTTING_DOWN).startswith("421 4.3.2 ")
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", relay.port), IO_TIMEOUT)
        assert not drain.done()  # still waiting for the transaction in progress

        reply = text(await busy.data(BODY))
        await asyncio.wait_for(drain, IO_TIMEOUT)  # the finished session was closed
    finally:
        busy.close()
    entry, body = relay.only_message()
    assert reply == str(replies.queued(entry.queue_id))
    assert body == BODY
    assert relay.committed == [entry]
    assert len(relay.ingress.sessions) == 0


async def test_drain_takes_no_message_pipelined_after_the_one_that_finished(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    """While draining, the session ends after its message: a second transaction the client
    pipelined behind it gets no 250 and must not be spooled either."""
    relay = await start_relay()
    raw = await greeted(open_raw, relay)
    await off_loop(raw.command, b"MAIL FROM:<a@example.com>\r\n")
    drain = asyncio.create_task(relay.ingress.drain(IO_TIMEOUT))
    await until(lambda: relay.ingress.handler.draining, "draining")
    transaction = b"RCPT TO:<b@example.com>\r\nDATA\r\n" + BODY + b".\r\n"
    second = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" + BODY
    await off_loop(raw.send, transaction + second + b".\r\nQUIT\r\n")
    answer = (await off_loop(raw.rest)).decode()
    await asyncio.wait_for(drain, IO_TIMEOUT)
    assert answer.count("queued as") == 1, answer
    entry, _ = relay.only_message()
    assert f"queued as {entry.queue_id}" in answer
    assert relay.committed == [entry]


async def test_drain_grace_expiry_closes_an_unfinished_transaction(
    start_relay: StartRelay, open_raw: OpenRaw
) -> None:
    relay = await start_relay()
    stalled = await greeted(open_raw, relay)
    assert await off_loop(stalled.command, b"MAIL FROM:<a@example.com>\r\n") == [
        str(replies.SENDER_OK)
    ]
    assert await off_loop(stalled.command, b"RCPT TO:<b@example.com>\r\n") == [
        str(replies.RECIPIENT_OK)
    ]
    await asyncio.wait_for(relay.ingress.drain(0.2), IO_TIMEOUT)
    assert await off_loop(stalled.rest) == f"{replies.SHUTTING_DOWN}\r\n".encode()
    assert len(relay.ingress.sessions) == 0
    assert relay.nothing_spooled()
