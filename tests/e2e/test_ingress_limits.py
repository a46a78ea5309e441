"""Ingress limits on the real daemon (issue #5 item 4): sessions overall and per client,
command and DATA timeouts, command line length, header size, messages and errors per session,
SIZE= at MAIL, and fairness towards a real client while another address holds idle sessions.

Three daemons (Maildir upstream, no fakes), one per set of limits that cannot share a process:
`limits` (line, header, message, error and size limits; the default 20 sessions per client),
`sessions` (3 per client, 5 overall) and `timeouts` (1 s between commands, 2 s of silence
inside DATA: different, so that the DATA test shows which of the two applies there). Tests
talk raw SMTP over sockets bound to 127.0.0.x. Every read has a socket timeout; waits are on
conditions with a timeout; nothing sleeps.
"""

from __future__ import annotations

import re
import smtplib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.relayproc import TRACE, RelayProcess, wait_until, write_config

HOSTNAME = "relay.test.lan"
SENDER = b"app@limits.test"
RCPT = b"bob@example.org"
SESSIONS = "relay_smtp_sessions_open"
TOO_BIG = 'relay_messages_received_total{result="too_big"}'
REFUSED_LIMIT = 'relay_messages_received_total{result="refused_limit"}'
ABORTED = 'relay_messages_received_total{result="aborted"}'
ERROR_LOG = r"^\S+ (ERROR|CRITICAL) |Traceback"
IN_FLIGHT = ("incoming", "active", "deferred")
SPOOL_STATES = (*IN_FLIGHT, "failed", "hold", "corrupt")
_MAILDIR_ID = re.compile(r"_([0-9A-F]{12,32})\.")

GREETING = re.compile(rb"220 relay\.test\.lan ESMTP oauth-relay")
TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections, try again later"
TOO_MANY_ERRORS = b"421 4.7.0 Too many errors, closing the connection"
TOO_MANY_MESSAGES = b"421 4.7.0 Too many messages in one session, reconnect"
HEADER_TOO_BIG = b"552 5.3.4 Message header size exceeds the limit"
MESSAGE_TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size"
LINE_TOO_LONG = b"500 Command line too long"
SENDER_OK = b"250 2.1.0 Sender OK"
RECIPIENT_OK = b"250 2.1.5 Recipient OK"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>"
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]+)")
BYE = b"221 2.0.0 Bye"


# --- a raw SMTP client ---------------------------------------------------------------------------


class Conn:
    """One client connection; `reply()` reads one whole reply and returns its last line."""

    def __init__(
        self, port: int, *, source: str = "127.0.0.1", timeout: float = 10.0, greet: bool = True
    ) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self._buffer = b""
        self.greeting = self.reply() if greet else b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes | None:
        """One line without its CRLF; None when the server has closed the connection."""
        while b"\r\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(
                    f"nothing from the server within {self.timeout}s: {self._buffer!r}"
                ) from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert not self._buffer, f"connection closed inside a line: {self._buffer!r}"
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        while True:
            line = self.line()
            assert line is not None, "the server closed the connection instead of replying"
            assert re.fullmatch(rb"[2-5]\d\d[ -].*", line), line
            if line[3:4] == b" ":
                return line

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def assert_closed(self) -> None:
        """The server closes the connection (within the socket timeout), saying nothing more."""
        line = self.line()
        assert line is None, f"expected the end of the connection, got {line!r}"

    def assert_timed_out(self) -> None:
        """RFC 5321 4.5.3.2: the server says 421 4.4.2 on a timeout, then closes."""
        assert self.line() == b"421 4.4.2 Timeout exceeded, closing the connection"
        self.assert_closed()

    def ehlo(self) -> None:
        self.send(b"EHLO client.limits.test\r\n")
        assert self.reply() == b"250 HELP"

    def transaction(self, data: bytes, sender: bytes = SENDER) -> str:
        """MAIL, RCPT, DATA and `data` (plain text without dot lines); the queue id."""
        assert self.command(b"MAIL FROM:<" + sender + b">") == SENDER_OK
        assert self.command(b"RCPT TO:<" + RCPT + b">") == RECIPIENT_OK
        assert self.command(b"DATA") == START_DATA
        reply = self.command(data + b".")
        match = QUEUED.fullmatch(reply)
        assert match is not None, reply
        return match.group(1).decode()

    def quit(self) -> None:
        assert self.command(b"QUIT") == BYE
        self.assert_closed()


def message(subject: str, *, headers: bytes = b"", body: bytes = b"Hello\r\n") -> bytes:
    message_id = subject.replace(" ", ".").encode()
    top = (
        b"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\n"
        b"From: <app@limits.test>\r\n"
        b"Subject: %s\r\n"
        b"Message-ID: <%s@limits.test>\r\n"
    ) % (subject.encode(), message_id)
    return top + headers + b"\r\n" + body


# --- daemons -------------------------------------------------------------------------------------


@dataclass
class Box:
    relay: RelayProcess
    root: Path

    @property
    def port(self) -> int:
        return self.relay.smtp_port

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def conn(self, **kwargs: Any) -> Conn:
        return Conn(self.port, **kwargs)

    def metric(self, name: str) -> float:
        return self.relay.metrics().get(name, 0.0)

    def delivered(self) -> dict[str, Path]:
        new = self.root / "maildir" / "new"
        if not new.is_dir():
            return {}
        found = {}
        for path in new.iterdir():
            match = _MAILDIR_ID.search(path.name)
            assert match is not None, path.name
            found[match.group(1)] = path
        return found

    def spooled(self, states: tuple[str, ...] = SPOOL_STATES) -> set[str]:
        return {
            path.stem
            for state in states
            if (self.spool / state).is_dir()
            for path in (self.spool / state).glob("*.json")
        }

    def bodies(self) -> set[str]:
        data = self.spool / "data"
        return {path.stem for path in data.glob("*.eml")} if data.is_dir() else set()

    def settle(self, timeout: float = 30.0) -> dict[str, Path]:
        """Wait until nothing waits in the spool (no message, no stray body); the maildir."""
        wait_until(
            lambda: not self.spooled() and not self.bodies(), timeout, "the spool to be empty"
        )
        return self.delivered()

    def wait_no_sessions(self, timeout: float = 10.0) -> None:
        wait_until(lambda: self.metric(SESSIONS) == 0, timeout, "every session to be closed")

    def stop(self) -> None:
        if self.relay.running:
            try:
                self.relay.stop(timeout=20)
            finally:
                if self.relay.running:
                    self.relay.kill()


def start_box(root: Path, **smtp: Any) -> Box:
    sections: dict[str, dict[str, Any]] = {
        "smtp": {"listen": ["127.0.0.1:0"], "hostname": HOSTNAME, **smtp},
        "spool": {"path": str(root / "spool")},
        "delivery": {"retry_initial": "1s", "retry_max": "5s", "max_age": "1h"},
        "upstream": {"kind": "maildir", "path": str(root / "maildir")},
        "metrics": {"listen": "127.0.0.1:0"},
        "server": {"shutdown_grace": "5s"},
        "log": {"level": "info"},
    }
    relay = RelayProcess(write_config(root / "relay.toml", sections), cwd=root)
    return Box(relay.start(), root)


@pytest.fixture(scope="module")
def limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    box = start_box(
        tmp_path_factory.mktemp("limits"),
        allow=["127.0.0.1/32", "127.0.0.2/32"],
        max_command_length=512,
        max_header_size=1024,
        max_messages_per_session=2,
        max_errors_per_session=3,
        max_sessions_per_client=20,
        max_sessions=200,
    )
    yield box
    box.stop()


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    box = start_box(
        tmp_path_factory.mktemp("sessions"),
        allow=["127.0.0.0/24"],
        max_sessions_per_client=3,
        max_sessions=5,
    )
    yield box
    box.stop()


@pytest.fixture(scope="module")
def timeouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    box = start_box(
        tmp_path_factory.mktemp("timeouts"),
        allow=["127.0.0.1/32"],
        command_timeout="1s",
        data_timeout="2s",  # not the same: a DATA that stalls is cut by this one, not the other
    )
    yield box
    box.stop()


@pytest.fixture(autouse=True)
def healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: the daemon is up, logged no error, and once the test's sockets are
    closed it holds no session any more (a leaked one would count against a client)."""
    names = [name for name in ("limits", "sessions", "timeouts") if name in request.fixturenames]
    boxes: list[Box] = [request.getfixturevalue(name) for name in names]
    since = [len(box.relay.lines) for box in boxes]
    yield
    for box, start in zip(boxes, since, strict=True):
        assert box.relay.running, "the daemon died:\n" + "\n".join(box.relay.lines[-40:])
        errors = [line for line in box.relay.lines[start:] if re.search(ERROR_LOG, line)]
        assert not errors, "\n".join(errors[:20])
        box.wait_no_sessions()


# --- sessions overall and per client -------------------------------------------------------------


def test_the_fourth_connection_from_one_client_gets_421(sessions: Box) -> None:
    refused = sessions.metric(REFUSED_LIMIT)
    held = [sessions.conn() for _ in range(3)]
    try:
        for conn in held:
            assert GREETING.fullmatch(conn.greeting), conn.greeting
        with sessions.conn() as fourth:
            assert fourth.greeting == TOO_MANY_CONNECTIONS
            fourth.assert_closed()
        with sessions.conn(source="127.0.0.2") as other:  # another client is not affected
            assert GREETING.fullmatch(other.greeting), other.greeting
            other.quit()
        # A slot set free is usable again at once (the session is gone when the close is seen).
        held.pop().quit()
        with sessions.conn() as again:
            assert GREETING.fullmatch(again.greeting), again.greeting
            again.ehlo()
            again.quit()
    finally:
        for conn in held:
            conn.close()
    assert sessions.metric(REFUSED_LIMIT) == refused + 1
    sessions.relay.wait_for_log(
        r"refused client 127\.0\.0\.1: 3 sessions open from it \(max_sessions_per_client = 3\)"
    )


def test_the_sixth_connection_overall_gets_421(sessions: Box) -> None:
    refused = sessions.metric(REFUSED_LIMIT)
    held = [sessions.conn(source=f"127.0.0.{n}") for n in range(1, 6)]
    try:
        for conn in held:
            assert GREETING.fullmatch(conn.greeting), conn.greeting
        for source in ("127.0.0.6", "127.0.0.1"):  # a new client, and one with a session open
            with sessions.conn(source=source) as sixth:
                assert sixth.greeting == TOO_MANY_CONNECTIONS, source
                sixth.assert_closed()
        held.pop().quit()
        with sessions.conn(source="127.0.0.6") as again:
            assert GREETING.fullmatch(again.greeting), again.greeting
            again.quit()
    finally:
        for conn in held:
            conn.close()
    assert sessions.metric(REFUSED_LIMIT) == refused + 2
    sessions.relay.wait_for_log(
        r"refused client 127\.0\.0\.6: 5 sessions open \(max_sessions = 5\)"
    )


# --- timeouts ------------------------------------------------------------------------------------


def test_a_silent_client_is_disconnected_after_the_command_timeout(timeouts: Box) -> None:
    started = time.monotonic()
    with timeouts.conn() as silent, timeouts.conn() as partial:
        partial.send(b"EHLO half-a-line-and-then-nothi")  # no CRLF: still silence
        for conn in (silent, partial):
            assert GREETING.fullmatch(conn.greeting), conn.greeting
            conn.assert_timed_out()
    elapsed = time.monotonic() - started
    assert 0.95 <= elapsed < 8, elapsed
    with timeouts.conn() as talking:  # a session that talks is answered as usual
        talking.ehlo()
        talking.quit()


def test_a_client_stopping_inside_data_is_disconnected_and_nothing_is_spooled(
    timeouts: Box,
) -> None:
    aborted = timeouts.metric(ABORTED)
    since = len(timeouts.relay.lines)
    with timeouts.conn() as conn:
        conn.ehlo()
        assert conn.command(b"MAIL FROM:<" + SENDER + b">") == SENDER_OK
        assert conn.command(b"RCPT TO:<" + RCPT + b">") == RECIPIENT_OK
        assert conn.command(b"DATA") == START_DATA
        conn.send(message("stalled", body=b"the first half of the bo"))
        stalled = time.monotonic()
        conn.assert_timed_out()
        elapsed = time.monotonic() - stalled
    assert 1.95 <= elapsed < 8, elapsed  # data_timeout (2 s), not command_timeout (1 s)
    timeouts.relay.wait_for_log(
        r"was silent for 2s during DATA: connection closed, nothing accepted", since=since
    )
    assert timeouts.metric(ABORTED) == aborted + 1
    assert timeouts.settle() == {}  # no message and no body in the spool, none delivered


# --- command line, header and message size -------------------------------------------------------


def test_a_600_byte_command_gets_500_and_the_session_goes_on(limits: Box) -> None:
    before = limits.settle()
    with limits.conn() as conn:
        conn.ehlo()
        assert conn.command(b"NOOP " + b"x" * 595) == LINE_TOO_LONG  # 600 octets
        assert conn.command(b"NOOP " + b"y" * 507) == b"250 OK"  # 512 octets: the limit
        too_long = b"MAIL FROM:<" + b"a" * 580 + b"@limits.test>"
        assert conn.command(too_long) == LINE_TOO_LONG
        queue_id = conn.transaction(message("after a long line"))
        conn.quit()
    wait_until(lambda: queue_id in limits.delivered(), 30, f"{queue_id} delivered")
    assert set(limits.settle()) - set(before) == {queue_id}


def test_a_2_kb_header_block_gets_552_and_a_2_kb_body_is_accepted(limits: Box) -> None:
    before = limits.settle()
    too_big = limits.metric(TOO_BIG)
    filler = b"".join(b"X-Filler-%02d: " % n + b"h" * 113 + b"\r\n" for n in range(16))
    assert len(filler) == 2048
    with limits.conn() as conn:
        conn.ehlo()
        assert conn.command(b"MAIL FROM:<" + SENDER + b">") == SENDER_OK
        assert conn.command(b"RCPT TO:<" + RCPT + b">") == RECIPIENT_OK
        assert conn.command(b"DATA") == START_DATA
        assert conn.command(message("big header", headers=filler) + b".") == HEADER_TOO_BIG
        assert limits.spooled() == set() and limits.bodies() == set()  # nothing queued
        body = b"".join(b"body line %02d " % n + b"b" * 113 + b"\r\n" for n in range(16))
        assert len(body) == 2048
        queue_id = conn.transaction(message("big body", body=body))
        conn.quit()
    assert limits.metric(TOO_BIG) == too_big + 1
    wait_until(lambda: queue_id in limits.delivered(), 30, f"{queue_id} delivered")
    new = set(limits.settle()) - set(before)
    assert new == {queue_id}
    assert body in limits.delivered()[queue_id].read_bytes()
    limits.relay.wait_for_log(r"refused a message from 127\.0\.0\.1: header block over 1024 bytes")


def test_a_huge_size_at_mail_gets_552_and_counts_as_too_big(limits: Box) -> None:
    too_big = limits.metric(TOO_BIG)
    with limits.conn() as conn:
        conn.send(b"EHLO client.limits.test\r\n")
        lines: list[bytes] = []
        while not (lines and lines[-1][3:4] == b" "):
            line = conn.line()
            assert line is not None
            lines.append(line)
        assert b"250-SIZE 36700160" in lines  # the default max_message_size
        huge = b"MAIL FROM:<" + SENDER + b"> SIZE=999999999999"
        assert conn.command(huge) == MESSAGE_TOO_BIG
        assert conn.command(b"MAIL FROM:<" + SENDER + b"> SIZE=36700160") == SENDER_OK
        assert conn.command(b"RSET") == b"250 OK"
        conn.quit()
    assert limits.metric(TOO_BIG) == too_big + 1


# --- messages and errors per session -------------------------------------------------------------


def test_the_third_mail_of_a_session_gets_421_and_the_two_before_are_delivered(
    limits: Box,
) -> None:
    before = limits.settle()
    with limits.conn() as conn:
        conn.ehlo()
        first = conn.transaction(message("first of the session"))
        second = conn.transaction(message("second of the session"))
        assert conn.command(b"MAIL FROM:<" + SENDER + b">") == TOO_MANY_MESSAGES
        conn.assert_closed()
    with limits.conn() as conn:  # the limit is per session: a new one may send again
        conn.ehlo()
        third = conn.transaction(message("first of the next session"))
        conn.quit()
    wanted = {first, second, third}
    wait_until(lambda: wanted <= set(limits.delivered()), 30, f"{sorted(wanted)} delivered")
    assert set(limits.settle()) - set(before) == wanted
    for queue_id in wanted:
        trace = TRACE.match(limits.delivered()[queue_id].read_bytes().split(b"\r\n", 2)[2])
        assert trace is not None and trace.group("id").decode() == queue_id


def test_three_unknown_commands_end_the_session_with_421(limits: Box) -> None:
    with limits.conn() as conn:
        conn.ehlo()
        assert conn.command(b"FOO").startswith(b"500 ")
        assert conn.command(b"BAR").startswith(b"500 ")
        conn.send(b"BAZ\r\n")
        assert conn.reply().startswith(b"500 ")
        assert conn.reply() == TOO_MANY_ERRORS
        conn.assert_closed()
    limits.relay.wait_for_log(r"closing the session of 127\.0\.0\.1 after 3 errors")


def test_errors_of_any_kind_count_against_the_budget(limits: Box) -> None:
    with limits.conn() as conn:
        conn.ehlo()
        assert conn.command(b"NOOP " + b"x" * 600) == LINE_TOO_LONG
        assert conn.command(b"MAIL FROM:<" + SENDER + b"> SIZE=999999999999") == MESSAGE_TOO_BIG
        assert conn.command(b"RCPT TO:<" + RCPT + b">").startswith(b"503 ")
        assert conn.reply() == TOO_MANY_ERRORS
        conn.assert_closed()


# --- fairness ------------------------------------------------------------------------------------


def test_twenty_silent_connections_from_one_client_do_not_stall_another(limits: Box) -> None:
    before = limits.settle()
    silent = [limits.conn(source="127.0.0.2") for _ in range(20)]
    try:
        for conn in silent:
            assert GREETING.fullmatch(conn.greeting), conn.greeting
        with limits.conn(source="127.0.0.2") as extra:  # all twenty are really held open
            assert extra.greeting == TOO_MANY_CONNECTIONS
            extra.assert_closed()
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", limits.port, timeout=10) as client:
            client.ehlo("real-client.limits.test")
            assert client.mail(SENDER.decode()) == (250, b"2.1.0 Sender OK")
            assert client.rcpt(RCPT.decode()) == (250, b"2.1.5 Recipient OK")
            code, reply = client.data(message("past the silent ones"))
        elapsed = time.monotonic() - started
        match = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]+)", reply)
        assert code == 250 and match is not None, (code, reply)
        assert elapsed < 3, f"the real client took {elapsed:.2f}s"
        queue_id = match.group(1).decode()
        wait_until(lambda: queue_id in limits.delivered(), 10, f"{queue_id} delivered")
    finally:
        for conn in silent:
            conn.close()
    assert set(limits.settle()) - set(before) == {queue_id}
