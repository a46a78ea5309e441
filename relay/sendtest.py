"""`oauth-relay send-test`: what an admin runs after setting up a device.

One job: submit a test message to the running relay over SMTP, exactly as a copier would,
then follow it through the spool until it is delivered, fails, or the time runs out, and say
which in one line (with the upstream's reply). Blocking I/O: this is a command, not the
daemon.
"""

from __future__ import annotations

import re
import smtplib
import socket
import time
from dataclasses import dataclass
from email.utils import formatdate, make_msgid

from relay.config import Settings, parse_host_port
from relay.errors import RelayError
from relay.spool import Spool, State

POLL_SECONDS = 0.5


class SendTestError(RelayError):
    """The relay did not accept the test message."""


@dataclass(frozen=True)
class Outcome:
    queue_id: str
    delivered: bool
    summary: str  # one line for the admin
    reply: str = ""  # the upstream's reply that decided (or last deferred) it


def relay_address(settings: Settings) -> tuple[str, int]:
    """Where a local client reaches the first listener (a wildcard means loopback)."""
    host, port = parse_host_port(settings.smtp.listen[0])
    wildcards = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - not a bind
    host = wildcards.get(host, host)
    return host, port


def test_message(sender: str, recipient: str, hostname: str) -> bytes:
    return (
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: {make_msgid('oauth-relay-test', domain=hostname)}\r\n"
        f"From: <{sender}>\r\nTo: <{recipient}>\r\n"
        f"Subject: oauth-relay test message from {socket.gethostname()}\r\n\r\n"
        "This is a test message sent by `oauth-relay send-test`.\r\n"
        "If you can read it, the relay delivers to Exchange Online.\r\n"
    ).encode()


def submit(
    settings: Settings,
    sender: str,
    recipient: str,
    timeout: float,
    server: tuple[str, int] | None = None,
) -> str:
    """Send the test message like a device; return the queue id from the relay's 250."""
    host, port = server or relay_address(settings)
    data = test_message(sender, recipient, settings.smtp.hostname)
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as client:
            client.ehlo("send-test.oauth-relay")
            for code, reply in (client.mail(sender), client.rcpt(recipient)):
                if code != 250:
                    raise SendTestError(
                        f"the relay refused: {code} {reply.decode(errors='replace')}"
                    )
            code, reply = client.data(data)
    except (OSError, smtplib.SMTPException) as exc:
        raise SendTestError(f"the relay at {host}:{port} did not take the message: {exc}") from None
    match = re.search(rb"queued as ([0-9A-F]+)", reply)
    if code != 250 or match is None:
        raise SendTestError(f"the relay did not queue it: {code} {reply.decode(errors='replace')}")
    return match.group(1).decode()


def follow(settings: Settings, queue_id: str, timeout: float) -> Outcome:
    """Watch the spool until the message is delivered (it leaves the spool), fails or waits."""
    spool = Spool(settings.spool.path)
    deadline = time.monotonic() + timeout
    while True:
        state = spool.find(queue_id)
        if state is None:
            return Outcome(queue_id, True, "delivered: the upstream accepted it")
        if state in (State.FAILED, State.HOLD, State.CORRUPT) or time.monotonic() > deadline:
            return _undelivered(spool, state, queue_id)
        time.sleep(POLL_SECONDS)


def _undelivered(spool: Spool, state: State, queue_id: str) -> Outcome:
    try:
        entry = spool.load(state, queue_id)
    except (OSError, RelayError):
        return Outcome(queue_id, False, f"{state.value}: (metadata unreadable)")
    last = entry.history[-1].reply if entry.history else ""
    if state is State.FAILED:
        replies = "; ".join(f"{r.address}: {r.reply}" for r in entry.recipients)
        refused = next((r.reply for r in entry.recipients if r.reply), last)
        return Outcome(queue_id, False, f"failed: {replies}", refused)
    summary = f"still {state.value} after the wait; last reply: {last or 'no attempt yet'}"
    return Outcome(queue_id, False, summary, last)
