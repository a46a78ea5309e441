"""dsn.py: delivery status notifications (RFC 3464 reports inside RFC 6522 multipart/report).

One job: turn a queue entry into the bytes of a failure or delay notice, and decide who gets
it (`notice_recipient`). The caller queues the `Notice` like any other message, with
MAIL FROM:<> so that a notice never causes another notice.

Layout of every notice: a text/plain part in plain words, a message/delivery-status part (one
per-message block, then one block per reported recipient) and a text/rfc822-headers part with
the original header block. The original body is never included (privacy and size).

Limits: the output is CRLF throughout, no line exceeds 998 octets, and the boundary occurs in
no part. The delivery-status part is 7-bit: non-ASCII addresses use the RFC 6533 `utf-8;`
type in its 7-bit form (\\x{HEX}), and non-ASCII or control characters in reply texts are
written the same way. Field values are folded at spaces; a run of more than 900 characters
without a space is split, which adds a space when the field is unfolded. Diagnostic texts are
cut at 4,000 characters and the original header block at 64 KiB. The notice itself is 7-bit
unless its own recipient or sender address is non-ASCII (see `Notice.smtputf8`).

Pure: stdlib only, no I/O, no clock (time is passed in; datetimes must be timezone-aware).
"""

from __future__ import annotations

import binascii
import hashlib
import re
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from relay.model import QueueEntry, RcptState, Recipient

CRLF = "\r\n"
FOLD_WIDTH = 78
MAX_WORD = 900  # longest unbroken run written on one line (the hard limit is 998 octets)
MAX_DIAGNOSTIC = 4000
MAX_HEADER_BYTES = 64 * 1024
FAILURE_SUBJECT = "Undelivered Mail Returned to Sender"
DELAY_SUBJECT = "Delayed Mail (still being retried)"
QUEUE_ID_FIELD = "X-Oauth-Relay-Queue-Id"

_REPLY = re.compile(r"([2-5])\d\d(?:[ -]([245])\.(\d{1,3})\.(\d{1,3}))?(?=[\s-]|$)", re.ASCII)
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*"
)
_HELO = re.compile(r"[!-:<-~]{1,255}")  # printable ASCII without ";" (the field's separator)
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_FAILED_HINTS = {  # RFC 3463 subject.detail (or subject) -> the reason in plain words
    "4.7": "the relay kept trying until the longest time a message may wait in its queue ran out",
    "2.2": "the recipient's mailbox is full",
    "3.4": "the message is too large for the receiving system",
    "1": "the address was not accepted (it may be misspelled, or the mailbox may no longer exist)",
    "2": "the recipient's mailbox cannot take messages",
    "7": "the receiving system refused it for security or policy reasons",
}
_DELAYED_HINTS = {
    "2": "the recipient's mailbox cannot take messages at the moment",
    "4": "the receiving system could not be reached or did not answer in time",
}
_FAILED_INTRO = (
    "Your message could not be delivered to the recipients listed below. "
    "The relay has given up on them and will not try again.",
)
_DELAYED_INTRO = (
    "Your message has not been delivered yet to the recipients listed below. "
    "This is only a warning: you do not need to send the message again.",
    "The relay will keep trying until {until}. If it still cannot deliver the message "
    "by then, another notice will follow.",
)


@dataclass(frozen=True)
class Notice:
    """A notice ready to queue: always sent with the null sender (RFC 3464, RFC 5321 4.5.5)."""

    mail_from: str  # always "": notices are sent with MAIL FROM:<>
    recipient: str  # who gets it
    data: bytes  # the complete RFC 5322 message, CRLF line ends

    @property
    def smtputf8(self) -> bool:
        """True when the notice can only travel with SMTPUTF8 (non-ASCII address in it)."""
        return not (self.recipient.isascii() and self.data.isascii())


@dataclass(frozen=True)
class _Report:
    kind: str  # "failure" or "delay": part of the Message-ID
    subject: str
    action: str  # RFC 3464 Action: "failed" or "delayed"
    status_class: str  # "5" or "4"
    recipients: tuple[Recipient, ...]
    will_retry_until: datetime | None = None


def notice_recipient(bounce_to: str, original_sender: str) -> str | None:
    """Who gets the notice about a message from `original_sender`; None means send none.

    `bounce_to` is "sender", "none" or an address. A message with the null sender was itself a
    notice and never gets one. In "sender" mode, a MAILER-DAEMON sender or an address that
    cannot be written into a header also gets none.
    """
    setting = bounce_to.strip()
    sender = original_sender.strip()
    if setting.casefold() == "none" or sender in ("", "<>"):
        return None
    if setting.casefold() == "sender":
        if not _usable_address(sender):
            return None
        local = sender.rpartition("@")[0]
        return None if local.casefold() == "mailer-daemon" else sender
    if not _usable_address(setting):
        raise ValueError(f"bounce_to is neither 'sender', 'none' nor an address: {bounce_to!r}")
    return setting


def failure_notice(
    entry: QueueEntry,
    *,
    recipient: str,
    reporting_mta: str,
    now: datetime,
    original_headers: bytes,
    from_address: str,
) -> Notice:
    """The notice for the recipients of `entry` that failed permanently (or expired).

    Call it once, when the entry is done: it reports every FAILED recipient and no other.
    """
    failed = tuple(r for r in entry.recipients if r.state is RcptState.FAILED)
    report = _Report("failure", FAILURE_SUBJECT, "failed", "5", failed)
    return _notice(
        entry,
        report,
        recipient=recipient,
        reporting_mta=reporting_mta,
        now=now,
        original_headers=original_headers,
        from_address=from_address,
    )


def delay_notice(
    entry: QueueEntry,
    *,
    recipient: str,
    reporting_mta: str,
    now: datetime,
    original_headers: bytes,
    from_address: str,
    will_retry_until: datetime,
) -> Notice:
    """The warning that the PENDING recipients of `entry` are still being retried."""
    _aware(will_retry_until)
    report = _Report("delay", DELAY_SUBJECT, "delayed", "4", entry.pending, will_retry_until)
    return _notice(
        entry,
        report,
        recipient=recipient,
        reporting_mta=reporting_mta,
        now=now,
        original_headers=original_headers,
        from_address=from_address,
    )


def _notice(
    entry: QueueEntry,
    report: _Report,
    *,
    recipient: str,
    reporting_mta: str,
    now: datetime,
    original_headers: bytes,
    from_address: str,
) -> Notice:
    _aware(now)
    if not report.recipients:
        raise ValueError(f"no {report.action} recipients to report for {entry.queue_id}")
    if not _HOSTNAME.fullmatch(reporting_mta):
        raise ValueError(f"reporting_mta is not a host name: {reporting_mta!r}")
    for what, address in (("recipient", recipient), ("from_address", from_address)):
        if not _usable_address(address):
            raise ValueError(f"{what} is not a usable address: {address!r}")
    parts = [
        _text_part(_human_text(entry, report, reporting_mta)),
        _status_part(entry, report, reporting_mta),
        _headers_part(original_headers),
    ]
    boundary = _boundary(entry.queue_id, now, parts)
    stamp = int(now.timestamp() * 1_000_000)
    queue_id = re.sub(r"[^A-Za-z0-9-]", "", entry.queue_id) or "unknown"
    headers = [
        ("From", f"Mail Delivery System <{from_address}>"),
        ("To", f"<{recipient}>"),
        ("Subject", report.subject),
        ("Date", _date(now)),
        ("Message-ID", f"<{report.kind}.{queue_id}.{stamp}@{reporting_mta}>"),
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
    ]
    return Notice(mail_from="", recipient=recipient, data=_assemble(headers, parts, boundary))


def _assemble(headers: list[tuple[str, str]], parts: list[bytes], boundary: str) -> bytes:
    head = "".join(line + CRLF for name, value in headers for line in _fold(name, value))
    body = [b"This is a MIME-encapsulated delivery status notification."]
    body += [f"--{boundary}".encode() + b"\r\n" + part for part in parts]
    body.append(f"--{boundary}--".encode())
    return head.encode() + b"\r\n" + b"\r\n".join(body) + b"\r\n"


# --- part 2: message/delivery-status ------------------------------------------------------------


def _status_part(entry: QueueEntry, report: _Report, reporting_mta: str) -> bytes:
    per_message = [("Reporting-MTA", f"dns; {reporting_mta}")]
    if _HELO.fullmatch(entry.helo):
        per_message.append(("Received-From-MTA", f"dns; {entry.helo}"))
    per_message.append(("Arrival-Date", _date(_from_epoch(entry.received_at))))
    per_message.append((QUEUE_ID_FIELD, _seven_bit(" ".join(entry.queue_id.split()), MAX_WORD)))
    blocks = [per_message]
    last_attempt = _from_epoch(entry.history[-1].at) if entry.history else None
    for rcpt in report.recipients:
        block = [
            ("Final-Recipient", _typed_address(rcpt.address)),
            ("Action", report.action),
            ("Status", _status(rcpt.reply, report.status_class)),
        ]
        diagnostic = _diagnostic(rcpt.reply)
        if diagnostic:
            block.append(("Diagnostic-Code", diagnostic))
        if last_attempt is not None:
            block.append(("Last-Attempt-Date", _date(last_attempt)))
        if report.will_retry_until is not None:
            block.append(("Will-Retry-Until", _date(report.will_retry_until)))
        blocks.append(block)
    text = (CRLF + CRLF).join(
        CRLF.join(line for name, value in block for line in _fold(name, value)) for block in blocks
    )
    return _part("message/delivery-status", "Delivery report", "7bit", text.encode("ascii"))


def _status(reply: str, status_class: str) -> str:
    """The RFC 3463 code of a stored reply, in the class the action demands (X.0.0 if none)."""
    match = _REPLY.match(" ".join(reply.split()))
    if match and match.group(2):
        return f"{status_class}.{match.group(3)}.{match.group(4)}"
    return f"{status_class}.0.0"


def _diagnostic(reply: str) -> str:
    """The Diagnostic-Code value: "smtp; <reply>" for an SMTP reply, else the relay's own."""
    text = " ".join(reply.split())
    if not text:
        return ""
    kind = "smtp" if _REPLY.match(text) else "X-Oauth-Relay"
    return f"{kind}; {_seven_bit(text, MAX_DIAGNOSTIC)}"


def _typed_address(address: str) -> str:
    """`rfc822; a@b` for plain ASCII; RFC 6533 `utf-8;` with \\x{HEX} escapes otherwise."""
    if address and all("!" <= ch <= "~" for ch in address):
        return f"rfc822; {address}"
    return "utf-8; " + "".join(
        ch if "!" <= ch <= "~" and ch not in "\\+=" else f"\\x{{{ord(ch):02X}}}" for ch in address
    )


def _seven_bit(text: str, limit: int) -> str:
    """Printable ASCII kept (spaces too), anything else as \\x{HEX}; cut at `limit` chars."""
    out: list[str] = []
    size = 0
    for ch in text:
        piece = ch if " " <= ch <= "~" else f"\\x{{{ord(ch):02X}}}"
        if size + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


# --- part 1: text/plain, in plain words ---------------------------------------------------------


def _human_text(entry: QueueEntry, report: _Report, reporting_mta: str) -> str:
    until = report.will_retry_until
    intro = _FAILED_INTRO if until is None else _DELAYED_INTRO
    lines = [f"This is the mail relay at {reporting_mta}.", ""]
    for paragraph in intro:
        lines += [*_wrap(paragraph.format(until=_date(until) if until else "")), ""]
    facts = [
        ("Queue ID", entry.queue_id),
        ("Received", _date(_from_epoch(entry.received_at))),
        ("Sender", f"<{entry.mail_from}>"),
        ("Client", f"{entry.helo} [{entry.client}]" if entry.helo or entry.client else ""),
    ]
    for label, fact in facts:
        if fact:
            lines += _wrap(f"{label + ':':<10} {_readable(fact)}", rest=" " * 11)
    for rcpt in report.recipients:
        lines += ["", *_wrap(f"<{_readable(rcpt.address)}>", rest="    ")]
        reason = _reason(_status(rcpt.reply, report.status_class), report.action)
        lines += _wrap(f"Reason: {reason}.", "    ", "    ")
        if rcpt.reply.strip():
            lines += _wrap(f"Details: {_readable(rcpt.reply)}", "    ", "    ")
    delivered = sum(r.state is RcptState.DELIVERED for r in entry.recipients)
    lines.append("")
    if delivered:
        lines.append(f"The message was delivered to {delivered} other recipient(s).")
    lines += [
        "The headers of your message are attached; its body is not.",
        "If you need help, ask your mail administrator and quote the queue ID.",
    ]
    return CRLF.join(lines)


def _reason(status: str, action: str) -> str:
    """The plain-words reason for an RFC 3463 status (subject.detail first, then subject)."""
    _, subject, detail = status.split(".")
    if action == "failed":
        hint = _FAILED_HINTS.get(f"{subject}.{detail}") or _FAILED_HINTS.get(subject)
        return hint or "the receiving system refused it"
    return _DELAYED_HINTS.get(subject) or "the relay could not hand it over yet"


def _wrap(text: str, first: str = "", rest: str = "") -> list[str]:
    """Wrap at 72 columns; words longer than a line are broken (no line exceeds 998)."""
    wrapped = textwrap.wrap(
        text,
        width=72,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=True,
        break_on_hyphens=False,
    )
    return wrapped or [""]


def _readable(text: str) -> str:
    """Printable characters kept (any script); whitespace runs as one space; others escaped."""
    text = " ".join(text.split())
    return "".join(ch if ch.isprintable() else f"\\x{{{ord(ch):02X}}}" for ch in text)


def _text_part(text: str) -> bytes:
    if text.isascii():
        return _part("text/plain; charset=us-ascii", "Notification", "7bit", text.encode())
    return _part("text/plain; charset=utf-8", "Notification", "quoted-printable", _qp(text))


# --- part 3: text/rfc822-headers ----------------------------------------------------------------


def _headers_part(original_headers: bytes) -> bytes:
    """The original header block only: cut at the first empty line, at most 64 KiB."""
    lines: list[bytes] = []
    size = 0
    field_start = 0
    for line in _LINE_BREAK.split(original_headers):
        if not line:
            break
        if line[:1] not in (b" ", b"\t"):
            field_start = len(lines)
        size += len(line) + 2
        if size > MAX_HEADER_BYTES:
            del lines[field_start:]  # never a field cut in half
            break
        lines.append(line)
    raw = b"\r\n".join(lines)
    plain = all(0x20 <= b <= 0x7E or b == 0x09 for b in raw.replace(b"\r\n", b""))
    if plain and all(len(line) <= 998 for line in lines):
        return _part("text/rfc822-headers", "Undelivered message headers", "7bit", raw)
    # bytes that are not UTF-8 stay visible as \xNN (RFC 6532 allows UTF-8 header text)
    lines = [line.decode("utf-8", errors="backslashreplace").encode() for line in lines]
    kind = "text/rfc822-headers; charset=utf-8"
    return _part(kind, "Undelivered message headers", "quoted-printable", _qp_lines(lines))


# --- assembly -----------------------------------------------------------------------------------


def _part(content_type: str, description: str, encoding: str, body: bytes) -> bytes:
    headers = [
        ("Content-Type", content_type),
        ("Content-Description", description),
        ("Content-Transfer-Encoding", encoding),
    ]
    head = "".join(line + CRLF for name, value in headers for line in _fold(name, value))
    return head.encode() + CRLF.encode() + body


def _boundary(queue_id: str, now: datetime, parts: list[bytes]) -> str:
    """A boundary that occurs in no part ("=_" never occurs in quoted-printable text)."""
    seed = hashlib.sha256(f"{queue_id}/{now.isoformat()}".encode())
    for part in parts:
        seed.update(part)
    for counter in range(1_000):
        boundary = f"=_dsn_{seed.hexdigest()[:32]}_{counter}"
        if not any(boundary.encode() in part for part in parts):
            return boundary
    raise AssertionError("no free MIME boundary")  # pragma: no cover - 1,000 sha256 collisions


def _fold(name: str, value: str) -> list[str]:
    """`Name: value` folded at spaces to 78 columns where possible, never beyond 998 octets."""
    lines: list[str] = []
    line = f"{name}:"
    for word in value.split(" "):
        for start in range(0, max(len(word), 1), MAX_WORD):
            chunk = word[start : start + MAX_WORD]
            if chunk and len(line) + 1 + len(chunk) > FOLD_WIDTH and line != f"{name}:":
                lines.append(line)
                line = ""
            line += " " + chunk
    lines.append(line)
    return lines


def _qp(text: str) -> bytes:
    return _qp_lines([line.encode("utf-8") for line in text.split(CRLF)])


def _qp_lines(lines: list[bytes]) -> bytes:
    """Quoted-printable (RFC 2045 6.7), line by line, with CRLF soft and hard line breaks."""
    encoded = (binascii.b2a_qp(line, quotetabs=False, istext=True) for line in lines)
    return b"\r\n".join(line.replace(b"\n", b"\r\n") for line in encoded)


def usable_address(address: str) -> bool:
    """An address a notice can be sent to (config validation uses the same test)."""
    return _usable_address(address)


def _usable_address(address: str) -> bool:
    """Non-empty, has an @, and nothing that could break a header: no space, control or <>."""
    return (
        "@" in address
        and all(ch.isprintable() and not ch.isspace() for ch in address)
        and not any(ch in "<>" for ch in address)
    )


def _aware(moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"datetime must be timezone-aware: {moment!r}")


def _from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def _date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC))
