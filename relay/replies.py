"""SMTP replies as values, and every reply the relay itself sends to its clients.

One job: name each reply in one place so codes, enhanced codes and wording can be audited.
No I/O. Replies to clients are generic on purpose; the detail goes to the log with the queue id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")


@dataclass(frozen=True, slots=True)
class SmtpReply:
    """One SMTP reply: basic code, optional RFC 3463 enhanced code, and text."""

    code: int
    enhanced: str = ""
    text: str = ""

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if self.enhanced and not _ENHANCED.fullmatch(self.enhanced):
            raise ValueError(f"malformed enhanced status code: {self.enhanced!r}")

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)

    @classmethod
    def parse(cls, code: int, message: str) -> SmtpReply:
        """Build a reply from a code and the server's text, splitting off an enhanced code."""
        text = " ".join(message.split())
        first, _, rest = text.partition(" ")
        if _ENHANCED.fullmatch(first) and first[0] == str(code)[0]:
            return cls(code, first, rest)
        return cls(code, "", text)


# --- Replies the ingress sends (RFC 5321 codes, RFC 3463 enhanced codes) ---
ACCESS_DENIED = SmtpReply(554, "5.7.1", "Access denied: this client may not relay here")
REFUSED_SESSION = SmtpReply(503, "5.7.1", "Access denied, send QUIT")
BYE = SmtpReply(221, "2.0.0", "Bye")
SENDER_OK = SmtpReply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = SmtpReply(250, "2.1.5", "Recipient OK")
BAD_ADDRESS = SmtpReply(553, "5.1.7", "The address is not valid UTF-8")
START_DATA = SmtpReply(354, "", "End data with <CR><LF>.<CR><LF>")
NEED_RCPT = SmtpReply(503, "5.5.1", "Error: need RCPT command")
DATA_SYNTAX = SmtpReply(501, "5.5.4", "Syntax: DATA")
TOO_MANY_RECIPIENTS = SmtpReply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = SmtpReply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TEMPORARY_FAILURE = SmtpReply(451, "4.3.0", "Temporary failure, please try again later")
SHUTTING_DOWN = SmtpReply(421, "4.3.2", "Service shutting down, try again later")
TIMED_OUT = SmtpReply(421, "4.4.2", "Timeout exceeded, closing the connection")
TOO_MANY_SESSIONS = SmtpReply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_ERRORS = SmtpReply(421, "4.7.0", "Too many errors, closing the connection")
TOO_MANY_MESSAGES = SmtpReply(421, "4.7.0", "Too many messages in one session, reconnect")
HEADER_TOO_BIG = SmtpReply(552, "5.3.4", "Message header size exceeds the limit")
AUTH_REQUIRED = SmtpReply(530, "5.7.0", "Authentication required")
AUTH_THROTTLED = SmtpReply(454, "4.7.0", "Too many failed logins, try again later")
AUTH_NOT_AVAILABLE = SmtpReply(502, "5.5.1", "AUTH is not available on this port")
SENDER_NOT_ALLOWED = SmtpReply(553, "5.7.1", "Sender address not allowed on this port")
SENDER_NOT_OWNED = SmtpReply(553, "5.7.1", "Sender address not allowed for this login")
RELAY_DENIED = SmtpReply(550, "5.7.1", "Relaying denied for this recipient domain")


def queued(queue_id: str) -> SmtpReply:
    """The reply that acknowledges a message: sent only after the spool commit is durable."""
    return SmtpReply(250, "2.0.0", f"Ok: queued as {queue_id}")


INGRESS_REPLIES: tuple[SmtpReply, ...] = (
    ACCESS_DENIED,
    REFUSED_SESSION,
    BYE,
    SENDER_OK,
    RECIPIENT_OK,
    START_DATA,
    NEED_RCPT,
    DATA_SYNTAX,
    BAD_ADDRESS,
    TOO_MANY_RECIPIENTS,
    MESSAGE_TOO_BIG,
    TEMPORARY_FAILURE,
    SHUTTING_DOWN,
    TIMED_OUT,
    TOO_MANY_SESSIONS,
    TOO_MANY_ERRORS,
    TOO_MANY_MESSAGES,
    HEADER_TOO_BIG,
    AUTH_REQUIRED,
    AUTH_THROTTLED,
    AUTH_NOT_AVAILABLE,
    SENDER_NOT_ALLOWED,
    SENDER_NOT_OWNED,
    RELAY_DENIED,
    queued("X"),
)
