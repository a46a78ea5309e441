"""A local fake of Exchange Online SMTP client submission (``smtp.office365.com:587``).

Job: stand in for Exchange Online when testing the relay. It listens on an
ephemeral port of 127.0.0.1, speaks the submission dialogue the way Exchange
does (banner, EHLO lists before and after STARTTLS, ``AUTH XOAUTH2`` with the
initial response or in two steps) and enforces what Exchange enforces: TLS 1.2
or newer, no AUTH before STARTTLS, no MAIL before AUTH, a token that the
injected ``validate_token`` accepts and that carries the ``SMTP.SendAsApp``
role, an existing mailbox with SMTP AUTH enabled for it and for the tenant,
Send As on the envelope sender and every ``From:`` address (after the body, as
the service does today; ``send_as_checked_at = "mail"`` models the older
``550 5.7.60`` at MAIL FROM), no bare line feeds,
the SIZE limit and (when switched on) the per-mailbox rate, concurrency and
recipient limits. Every reply uses Exchange's own text where
``/work/shared/design/exchange-online.md`` (section 3) gives one; texts marked
*[INF]* below are Exchange Server texts assumed to be shared by Exchange
Online. Tests can inject replies, stalls and dropped connections at each stage,
read the accepted messages byte for byte and wait for them (or for any counter)
on a ``threading.Condition``.

How it is built: each connection is an :class:`aiosmtpd.smtp.SMTP` subclass
(aiosmtpd 1.4.6) running in an asyncio loop on a background thread, so the
relay under test can run in the test's own loop, in a subprocess, or be driven
with blocking :mod:`smtplib`. aiosmtpd provides the transport plumbing and the
STARTTLS upgrade; its command loop (the private ``_handle_client``), DATA
reader and command handlers are replaced, because their reply texts, 512-byte
command limit, 1001-byte line limit and DSN-less parameter checks are not
Exchange's.

Limits (what this fake does not reproduce):

* ``BDAT``/``CHUNKING``/``BINARYMIME`` are not implemented and not advertised
  (real Exchange advertises them; the relay's client, aiosmtplib, never uses
  them).
* TLS 1.0/1.1 clients fail in the TLS handshake (the fake raises the given
  context's ``minimum_version`` to TLS 1.2). Real Exchange completes the
  handshake and answers ``421 4.7.66 TLS 1.0 and 1.1 are not supported...``
  at AUTH; that reply is not modelled.
* Exchange's order of token/tenant/mailbox checks is unknown; this fake checks
  blob format, token (``validate_token``), role, tenant switch, mailbox
  existence, app permission, mailbox switch - the first failure answers.
* The 10,000 recipients/24 h quota, ``MaxSendSize`` per mailbox, the "delay"
  flavour of the 30 messages/minute limit, Sent Items, NDRs for bad
  recipients and the total-session timeout are not modelled.
* An authenticated session stays authenticated after the token's ``exp``
  (Exchange's behaviour is undocumented).
* Line-too-long, sequence and syntax errors use *[INF]* texts. AUTH after
  STARTTLS without a new EHLO gets ``503 5.5.2 Send hello first`` [INF].
* ``validate_token`` runs in a worker thread of the fake's loop; the first
  failing check is only recorded as a ``FakeEvent`` detail, the client sees
  Exchange's uniform ``535 5.7.3``.
* The listener binds one address: give ``host`` as an IP literal.
* The rate window counts admitted ``MAIL FROM`` commands per mailbox, the
  concurrency limit counts open mail transactions (``MAIL`` .. end of DATA).

Configuration attributes (``require_role``, limits, ...) are plain attributes:
set them before the client connects. Fault injection and all read accessors
are thread-safe. From a test's event loop use ``wait_for_messages_async`` (the
blocking waits would stall a relay running in that loop).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import email.message
import email.parser
import email.utils
import json
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, AnyStr, Literal, NoReturn, get_args

from aiosmtpd.smtp import SMTP, TLSSetupException

__all__ = [
    "AUTH_SUCCESSFUL",
    "AUTH_UNSUCCESSFUL",
    "BARE_LINEFEEDS",
    "BASIC_AUTH_DISABLED",
    "BASIC_AUTH_NOT_SUPPORTED",
    "CONCURRENCY_LIMITED",
    "DEFAULT_BACKEND_HOSTNAME",
    "DEFAULT_HOSTNAME",
    "IDLE_TIMEOUT",
    "NOT_AUTHENTICATED",
    "RATE_LIMITED",
    "RECIPIENT_OK",
    "SENDER_OK",
    "SEND_AS_DENIED_AT_MAIL",
    "SEND_AS_ROLE",
    "SIZE_EXCEEDED",
    "SIZE_LIMIT",
    "SMTP_AUTH_DISABLED_MAILBOX",
    "SMTP_AUTH_DISABLED_TENANT",
    "START_MAIL_INPUT",
    "TOO_MANY_RECIPIENTS",
    "UNRECOGNIZED_AUTH_TYPE",
    "FakeEvent",
    "FakeExchange",
    "ReceivedMessage",
    "Stage",
    "message_accepted",
    "reply_key",
    "send_as_denied",
    "unrecognized_command",
]

# --------------------------------------------------------------------------- texts

DEFAULT_HOSTNAME = "SY5P282CA0097.outlook.office365.com"
DEFAULT_BACKEND_HOSTNAME = "SYBP282MB2635.AUSP282.PROD.OUTLOOK.COM"
SIZE_LIMIT = 157_286_400
SEND_AS_ROLE = "SMTP.SendAsApp"

STARTTLS_READY = "220 2.0.0 SMTP server ready"
QUIT_REPLY = "221 2.0.0 Service closing transmission channel"
AUTH_SUCCESSFUL = "235 2.7.0 Authentication successful"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
START_MAIL_INPUT = "354 Start mail input; end with <CRLF>.<CRLF>"
IDLE_TIMEOUT = "421 4.4.1 Connection timed out"
RATE_LIMITED = "421 4.4.2 Message submission rate for this client has exceeded the configured limit"
CONCURRENCY_LIMITED = "432 4.3.2 Concurrent connections limit exceeded."
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
UNRECOGNIZED_AUTH_TYPE = "504 5.7.4 Unrecognized authentication type"
NOT_AUTHENTICATED = "530 5.7.57 Client not authenticated to send mail."
AUTH_UNSUCCESSFUL = "535 5.7.3 Authentication unsuccessful"  # + " [<host> <ts> <session>]"
SMTP_AUTH_DISABLED_TENANT = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
    "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
)
SMTP_AUTH_DISABLED_MAILBOX = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
    "Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information."
)
BASIC_AUTH_DISABLED = "535 5.7.139 Authentication unsuccessful, basic authentication is disabled."
BASIC_AUTH_NOT_SUPPORTED = "550 5.7.30 Basic authentication is not supported for Client Submission."
BARE_LINEFEEDS = (
    "550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal; message contains bare linefeeds, which "
    "cannot be sent via DATA and receiving system does not support BDAT"
)
SIZE_EXCEEDED = "552 5.3.4 Message size exceeds fixed maximum message size"
# [INF] Exchange Server texts, assumed for Exchange Online.
NOOP_OK = "250 2.0.0 OK"
RSET_OK = "250 2.0.0 Resetting"
LINE_TOO_LONG = "500 5.5.2 Line too long"
CANNOT_DECODE_BASE64 = "501 5.5.2 Cannot Base64-decode Client responses"
INVALID_ARGUMENTS = "501 5.5.4 Invalid arguments"
INVALID_DOMAIN = "501 5.5.4 Invalid domain name"
UNRECOGNIZED_PARAMETER = "501 5.5.4 Unrecognized parameter"
INVALID_SENDER = "501 5.1.7 Invalid address"
INVALID_RECIPIENT = "501 5.1.3 Invalid address"
AUTH_CANCELLED = "501 5.0.0 Authentication cancelled"
NOT_IMPLEMENTED = "502 5.3.3 Command not implemented"
SEND_HELLO_FIRST = "503 5.5.2 Send hello first"
NEED_MAIL = "503 5.5.2 Need mail command"
NEED_RCPT = "503 5.5.2 Need rcpt command"
SENDER_ALREADY_SPECIFIED = "503 5.5.2 Sender already specified"
ALREADY_AUTHENTICATED = "503 5.5.2 Already authenticated"
HELP_REPLY = (
    "214-This server supports the following commands:\r\n"
    "214 HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH"
)

# aiosmtpd built-in replies that still reach the wire through reused aiosmtpd code.
_AIOSMTPD_REWRITES = {"220 Ready to start TLS": STARTTLS_READY}


SEND_AS_DENIED_AT_MAIL = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"


def send_as_denied(mailbox: str, address: str) -> str:
    """The end-of-data reply when ``mailbox`` may not send as ``address``."""
    return (
        f"554 5.2.252 SendAsDenied; {mailbox} not allowed to send as {address}; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
        "Failed to process message due to a permanent exception with message "
        "[BeginDiagnosticData]Cannot submit message."
    )


def unrecognized_command(command: str, diagnostic: str) -> str:
    return f"500 5.3.3 Unrecognized command '{command}' [{diagnostic}]"


def message_accepted(message_id: str, backend_hostname: str = DEFAULT_BACKEND_HOSTNAME) -> str:
    return f"250 2.0.0 OK {message_id} [Hostname={backend_hostname}]"


_REPLY_KEY = re.compile(r"(\d{3})(?: (\d\.\d{1,3}\.\d{1,3}))?")


def reply_key(reply: str) -> str:
    """Counter key of a reply: basic code plus enhanced code, e.g. ``"535 5.7.3"``."""
    last_line = reply.rsplit("\r\n", 1)[-1]
    match = _REPLY_KEY.match(last_line)
    if match is None:
        return last_line[:3]
    return " ".join(part for part in match.groups() if part)


# --------------------------------------------------------------------------- public data

Stage = Literal["connect", "ehlo", "auth", "mail", "rcpt", "data", "eod"]
_STAGES: frozenset[str] = frozenset(get_args(Stage))


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the fake accepted (answered with ``250 2.0.0 OK``, or dropped after EOD)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # exactly as received after dot-unstuffing, without the final ".\r\n"
    mail_options: tuple[str, ...]  # MAIL FROM parameters as sent, e.g. ("size=12", "BODY=8BITMIME")
    rcpt_options: tuple[tuple[str, ...], ...]  # RCPT TO parameters, one tuple per recipient
    auth_user: str  # the authenticated mailbox (as registered with add_mailbox)
    tls_version: str  # e.g. "TLSv1.3"
    message_id_reply: str  # the Message-ID carried by the 250 reply ("<...>")
    session_id: str  # the connection's 16-hex session id (banner and diagnostics)


@dataclass(frozen=True)
class FakeEvent:
    """Something that happened on a connection, in order.

    Kinds: ``connect``, ``disconnect``, ``tls``, ``tls_failed``, ``auth_ok``,
    ``auth_failed``, ``throttled``, ``delivered``, ``dropped``, ``idle_timeout``,
    ``internal_error``.
    """

    kind: str
    session_id: str
    detail: str = ""


# --------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Mailbox:
    address: str
    send_as: frozenset[str]  # lower-cased
    smtp_auth_enabled: bool
    apps: frozenset[str] | None  # app ids / object ids allowed; None = any app


@dataclass
class _Fault:
    action: Literal["reply", "stall", "drop"]
    reply: str = ""
    close: bool = False
    rcpt: str | None = None
    seconds: float = 0.0
    delivered: bool = True  # for drops after EOD: store the message first
    remaining: int = 1

    def matches(self, rcpt: str | None) -> bool:
        if self.rcpt is None:
            return True
        return rcpt is not None and rcpt.lower() == self.rcpt.lower()


@dataclass(frozen=True)
class _AuthOutcome:
    mailbox: str | None  # None: failed
    reply: str


@dataclass
class _Transaction:
    mailbox: str
    mail_from: str
    mail_options: tuple[str, ...]
    smtputf8: bool
    rcpt_tos: list[str] = field(default_factory=list)
    rcpt_options: list[tuple[str, ...]] = field(default_factory=list)


@dataclass(frozen=True)
class _Body:
    data: bytes
    too_big: bool


class _Hangup(Exception):
    """The server ended the session (reply sent or deliberately not)."""


class _Reject(Exception):
    """Answer the current command with ``reply`` (and optionally close)."""

    def __init__(self, reply: str, *, close: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        self.close = close


_READ_LIMIT = 64 * 1024  # StreamReader limit: longest line read in one piece
_AUTH_LINE_LIMIT = 32 * 1024  # AUTH lines carry a 1.5-3 kB token (RFC 4954 allows 12,288)
_COMMAND_LINE_LIMIT = 2048  # [INF] generous: Exchange's real limit is unknown
_AIOSMTPD_TIMER = 365 * 24 * 3600.0  # aiosmtpd's own idle timer, effectively off
_PARTIAL_DATA = 4096
_GMAIL_STYLE_ERROR = base64.b64encode(
    json.dumps(
        {"status": "401", "schemes": "bearer", "scope": "https://outlook.office365.com/.default"}
    ).encode()
).decode()
_SHUTDOWN_TIMEOUT = 10.0

_PATH = re.compile(r"(?i)(FROM|TO):\s*<([^<>]*)>(.*)\Z", re.DOTALL)
_ADDRESS = re.compile(r"[^\s<>@]+@[^\s<>@]+\Z")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_FOLD = re.compile(r"\r?\n[ \t]")
_MAIL_PARAMS: Mapping[str, re.Pattern[str] | None] = {
    "SIZE": re.compile(r"\d{1,20}"),
    "BODY": re.compile(r"(?i)7BIT|8BITMIME"),
    "SMTPUTF8": None,
    "RET": re.compile(r"(?i)FULL|HDRS"),
    "ENVID": re.compile(r"\S+"),
    "AUTH": re.compile(r"\S+"),
}
_RCPT_PARAMS: Mapping[str, re.Pattern[str] | None] = {
    "NOTIFY": re.compile(r"(?i)NEVER|(SUCCESS|FAILURE|DELAY)(,(SUCCESS|FAILURE|DELAY))*"),
    "ORCPT": re.compile(r"\S+"),
}


def _parse_path(arg: str, keyword: str) -> tuple[str, tuple[str, ...]] | None:
    """Split ``FROM:<addr> params`` / ``TO:<addr> params``; None if malformed."""
    match = _PATH.match(arg)
    if match is None or match.group(1).upper() != keyword:
        return None
    return match.group(2), tuple(match.group(3).split())


def _check_params(
    tokens: tuple[str, ...], allowed: Mapping[str, re.Pattern[str] | None]
) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for token in tokens:
        key, eq, value = token.partition("=")
        key = key.upper()
        if key not in allowed:
            raise _Reject(UNRECOGNIZED_PARAMETER)
        pattern = allowed[key]
        valid = not eq if pattern is None else bool(eq and pattern.fullmatch(value))
        if not valid:
            raise _Reject(INVALID_ARGUMENTS)
        params[key] = value if eq else None
    return params


def _address_ok(address: str, *, smtputf8: bool) -> bool:
    return bool(_ADDRESS.match(address)) and (smtputf8 or address.isascii())


def _parse_xoauth2(blob: bytes) -> tuple[str, str] | None:
    """``user=<mailbox>\\x01auth=Bearer <token>\\x01\\x01`` -> (mailbox, token)."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\x01\x01"):
        return None
    fields: dict[str, str] = {}
    for item in text[:-2].split("\x01"):
        key, eq, value = item.partition("=")
        if not eq:
            return None
        fields[key.lower()] = value
    scheme, _, token = fields.get("auth", "").partition(" ")
    user = fields.get("user", "")
    if not user or scheme.lower() != "bearer" or not token:
        return None
    return user, token


def _roles(claims: Mapping[str, Any]) -> list[str]:
    roles = claims.get("roles") or []
    return [roles] if isinstance(roles, str) else [str(role) for role in roles]


def _app_ids(claims: Mapping[str, Any]) -> set[str]:
    return {str(claims[key]) for key in ("appid", "azp", "oid") if claims.get(key)}


def _headers(data: bytes) -> email.message.Message:
    """The header section of ``data`` (decoded as UTF-8 so SMTPUTF8 headers parse)."""
    if data.startswith(b"\r\n"):
        return email.message.Message()
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    return email.parser.HeaderParser().parsestr(head.decode("utf-8", "replace"))


def _header_from_addresses(data: bytes) -> list[str]:
    values = [_FOLD.sub(" ", str(value)) for value in _headers(data).get_all("From", [])]
    return [address for _, address in email.utils.getaddresses(values) if address]


def _header_message_id(data: bytes) -> str | None:
    value = _headers(data).get("Message-ID")
    if value is None:
        return None
    value = _FOLD.sub(" ", str(value)).strip()
    return value if value.startswith("<") and value.endswith(">") else None


def _b64decode(text: str) -> bytes | None:
    if text == "=":  # RFC 4954: an empty initial response
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# --------------------------------------------------------------------------- the fake


class FakeExchange:
    """Exchange Online client submission on 127.0.0.1:<ephemeral port>. See the module doc."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext,
        validate_token: Callable[[str], Mapping[str, Any]],
        host: str = "127.0.0.1",
        hostname: str = DEFAULT_HOSTNAME,
        backend_hostname: str = DEFAULT_BACKEND_HOSTNAME,
        idle_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tls_context.minimum_version < ssl.TLSVersion.TLSv1_2:
            tls_context.minimum_version = ssl.TLSVersion.TLSv1_2  # Exchange: TLS 1.2 minimum
        self.tls_context = tls_context
        self.host = host
        self.hostname = hostname
        self.backend_hostname = backend_hostname
        self.idle_timeout = idle_timeout
        self.clock = clock
        # What Exchange checks (switch off to model other tenants' settings).
        self.tenant_smtp_auth_enabled = True
        self.require_role = True  # False models App RBAC (no roles claim needed)
        self.check_header_from = True
        # Where Send As is checked: "eod" (current service: after the body, 554 5.2.252) or
        # "mail" (older variant: 550 5.7.60 at MAIL FROM, envelope sender only).
        self.send_as_checked_at = "eod"
        # Behaviour options (section 3.1/3.2 of the facts file).
        self.close_after_auth_failure = False
        self.xoauth2_error_challenge = False  # Gmail-style 334 <b64 JSON> before the 535
        self.basic_auth_reply = BASIC_AUTH_DISABLED
        # Per-mailbox limits; None = off.
        self.messages_per_minute: int | None = None
        self.max_concurrent_per_mailbox: int | None = None
        self.concurrency_reply = CONCURRENCY_LIMITED
        self.max_recipients_per_message = 500
        self.max_message_size = SIZE_LIMIT

        self._validate_token = validate_token
        self._cond = threading.Condition(threading.RLock())
        self._mailboxes: dict[str, _Mailbox] = {}
        self._faults: dict[str, list[_Fault]] = {stage: [] for stage in _STAGES}
        self._messages: list[ReceivedMessage] = []
        self._events: list[FakeEvent] = []
        self._replies: collections.Counter[str] = collections.Counter()
        self._internal_errors: list[BaseException] = []
        self._submissions: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )
        self._open_transactions: collections.Counter[str] = collections.Counter()
        self._sessions: set[_ExchangeSession] = set()  # event-loop thread only
        self._server: _ServerThread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FakeExchange already started")
        server = _ServerThread(self._new_session, self.host, on_shutdown=self._abort_sessions)
        server.start()
        self._server = server

    def stop(self) -> None:
        """Close the listener and every connection (stalls included); idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> FakeExchange:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeExchange is not running")
        return self._server.port

    # ----------------------------------------------------------------- directory

    def add_mailbox(
        self,
        address: str,
        *,
        send_as: Iterable[str] = (),
        smtp_auth_enabled: bool = True,
        apps: Iterable[str] | None = None,
    ) -> None:
        """Create (or replace) a mailbox.

        ``send_as``: addresses it holds Send As on. ``apps``: app ids (``appid``)
        or service-principal object ids (``oid``) with FullAccess; None = any app.
        """
        mailbox = _Mailbox(
            address=address,
            send_as=frozenset(item.lower() for item in send_as),
            smtp_auth_enabled=smtp_auth_enabled,
            apps=None if apps is None else frozenset(apps),
        )
        with self._cond:
            self._mailboxes[address.lower()] = mailbox

    # ----------------------------------------------------------------- fault injection

    def inject(
        self,
        stage: Stage,
        reply: str,
        *,
        times: int = 1,
        close: bool = False,
        rcpt: str | None = None,
    ) -> None:
        """Answer the next ``times`` commands of ``stage`` with ``reply`` (then close if asked).

        ``connect`` replaces the banner, ``data`` the 354, ``eod`` the final reply
        (the message is then not stored). ``rcpt`` limits a ``rcpt`` fault to that
        recipient. Faults of a stage are consumed in the order they were added.
        """
        if not re.match(r"\d{3}(?:[ -]|\Z)", reply):
            raise ValueError(f"not an SMTP reply: {reply!r}")
        if rcpt is not None and stage != "rcpt":
            raise ValueError("rcpt= only applies to the 'rcpt' stage")
        self._add_fault(stage, _Fault("reply", reply=reply, close=close, rcpt=rcpt), times)

    def stall(self, stage: Stage, seconds: float, *, times: int = 1) -> None:
        """Hang ``seconds`` before handling the next command of ``stage``, then carry on."""
        self._add_fault(stage, _Fault("stall", seconds=seconds), times)

    def drop_connection_mid_data(self, times: int = 1) -> None:
        """After the 354, read part of the message and close the socket without a reply."""
        self._add_fault("data", _Fault("drop"), times)

    def drop_after_eod(self, times: int = 1, *, delivered: bool = True) -> None:
        """Read the whole message, then close without a reply (ambiguous outcome).

        With ``delivered`` the message is stored first, the worst case for a
        relay that retries (a duplicate).
        """
        self._add_fault("eod", _Fault("drop", delivered=delivered), times)

    def clear_faults(self) -> None:
        with self._cond:
            for queue in self._faults.values():
                queue.clear()

    def _add_fault(self, stage: str, fault: _Fault, times: int) -> None:
        if stage not in _STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(_STAGES)}")
        if times < 1:
            raise ValueError("times must be >= 1")
        fault.remaining = times
        with self._cond:
            self._faults[stage].append(fault)

    def _take_fault(self, stage: str, rcpt: str | None = None) -> _Fault | None:
        with self._cond:
            queue = self._faults[stage]
            for index, fault in enumerate(queue):
                if fault.matches(rcpt):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        del queue[index]
                    return fault
        return None

    # ----------------------------------------------------------------- observations

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._cond:
            return list(self._messages)

    @property
    def events(self) -> list[FakeEvent]:
        with self._cond:
            return list(self._events)

    @property
    def replies(self) -> collections.Counter[str]:
        """Final replies sent, keyed by :func:`reply_key` (``"535 5.7.3"``, ``"354"``)."""
        with self._cond:
            return collections.Counter(self._replies)

    @property
    def internal_errors(self) -> list[BaseException]:
        """Exceptions raised by the fake itself (a bug in the fake); tests may assert empty."""
        with self._cond:
            return list(self._internal_errors)

    def count_events(self, kind: str) -> int:
        with self._cond:
            return sum(1 for event in self._events if event.kind == kind)

    @property
    def connections(self) -> int:
        return self.count_events("connect")

    @property
    def active_connections(self) -> int:
        with self._cond:
            return self.count_events("connect") - self.count_events("disconnect")

    @property
    def auth_ok(self) -> int:
        return self.count_events("auth_ok")

    @property
    def auth_failed(self) -> int:
        return self.count_events("auth_failed")

    @property
    def throttled(self) -> int:
        """Replies sent because of the rate or concurrency limit."""
        return self.count_events("throttled")

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Block until ``predicate()`` is true (re-checked on every change); TimeoutError if not."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(
                    f"condition not met within {timeout} s; replies so far: {dict(self._replies)}"
                )

    def wait_for_messages(self, n: int, timeout: float) -> list[ReceivedMessage]:
        """Block until at least ``n`` messages were accepted; return all of them."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= n, timeout):
                raise TimeoutError(
                    f"{len(self._messages)} of {n} messages after {timeout} s; "
                    f"replies so far: {dict(self._replies)}"
                )
            return list(self._messages)

    async def wait_for_messages_async(self, n: int, timeout: float) -> list[ReceivedMessage]:
        """:meth:`wait_for_messages` without blocking the caller's event loop."""
        return await asyncio.to_thread(self.wait_for_messages, n, timeout)

    def wait_for_reply(self, key: str, timeout: float, *, count: int = 1) -> None:
        """Block until the reply ``key`` (e.g. ``"421 4.4.1"``) was sent ``count`` times."""
        self.wait_for(lambda: self._replies[key] >= count, timeout)

    # ----------------------------------------------------------------- used by sessions

    def _new_session(self, loop: asyncio.AbstractEventLoop) -> _ExchangeSession:
        return _ExchangeSession(self, loop)

    def _register(self, session: _ExchangeSession) -> None:
        self._sessions.add(session)
        self._note("connect", session.session_id, session.peer_ip)

    def _unregister(self, session: _ExchangeSession) -> None:
        self._sessions.discard(session)
        self._note("disconnect", session.session_id)

    def _abort_sessions(self) -> None:
        for session in list(self._sessions):
            session.abort()

    def _note(self, kind: str, session_id: str, detail: str = "") -> None:
        with self._cond:
            self._events.append(FakeEvent(kind, session_id, detail))
            self._cond.notify_all()

    def _record_reply(self, reply: str) -> None:
        with self._cond:
            self._replies[reply_key(reply)] += 1
            self._cond.notify_all()

    def _record_internal_error(self, session_id: str, error: BaseException) -> None:
        with self._cond:
            self._internal_errors.append(error)
        self._note("internal_error", session_id, repr(error))

    def _deliver(self, message: ReceivedMessage) -> None:
        with self._cond:
            self._messages.append(message)
        self._note("delivered", message.session_id, message.message_id_reply)

    def _diagnostic(self, session_id: str) -> str:
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S") + f".{now.microsecond // 1000:03d}Z"
        return f"{self.hostname} {stamp} {session_id}"

    def _check_xoauth2(self, blob: bytes, session_id: str) -> _AuthOutcome:
        """Exchange's checks of an XOAUTH2 blob (runs in a worker thread)."""
        parsed = _parse_xoauth2(blob)
        if parsed is None:
            return self._auth_failure(session_id, "malformed XOAUTH2 blob")
        user, token = parsed
        try:
            claims = self._validate_token(token)
        except Exception as error:
            return self._auth_failure(session_id, f"token rejected: {error!r}")
        return self._check_claims(user, claims, session_id)

    def _check_claims(self, user: str, claims: Mapping[str, Any], session_id: str) -> _AuthOutcome:
        if self.require_role and SEND_AS_ROLE not in _roles(claims):
            return self._auth_failure(session_id, f"token has no {SEND_AS_ROLE} role")
        if not self.tenant_smtp_auth_enabled:
            reply = SMTP_AUTH_DISABLED_TENANT
            return self._auth_failure(session_id, "tenant SMTP AUTH off", reply)
        with self._cond:
            mailbox = self._mailboxes.get(user.lower())
        if mailbox is None:
            return self._auth_failure(session_id, f"no mailbox {user}")
        if mailbox.apps is not None and not _app_ids(claims) & mailbox.apps:
            return self._auth_failure(session_id, f"app has no permission on {user}")
        if not mailbox.smtp_auth_enabled:
            reply = SMTP_AUTH_DISABLED_MAILBOX
            return self._auth_failure(session_id, "mailbox SMTP AUTH off", reply)
        self._note("auth_ok", session_id, mailbox.address)
        return _AuthOutcome(mailbox.address, AUTH_SUCCESSFUL)

    def _auth_failure(self, session_id: str, reason: str, reply: str | None = None) -> _AuthOutcome:
        self._note("auth_failed", session_id, reason)
        if reply is None:
            reply = f"{AUTH_UNSUCCESSFUL} [{self._diagnostic(session_id)}]"
        return _AuthOutcome(None, reply)

    def _admit_transaction(self, mailbox: str, session_id: str) -> None:
        """Apply the per-mailbox rate and concurrency limits to a MAIL FROM; raise _Reject."""
        key = mailbox.lower()
        with self._cond:
            now = self.clock()
            window = self._submissions[key]
            while window and window[0] <= now - 60.0:
                window.popleft()
            if self.messages_per_minute is not None and len(window) >= self.messages_per_minute:
                self._note("throttled", session_id, "rate")
                raise _Reject(RATE_LIMITED, close=True)
            limit = self.max_concurrent_per_mailbox
            if limit is not None and self._open_transactions[key] >= limit:
                self._note("throttled", session_id, "concurrency")
                raise _Reject(self.concurrency_reply)
            window.append(now)
            self._open_transactions[key] += 1

    def _release_transaction(self, mailbox: str) -> None:
        with self._cond:
            self._open_transactions[mailbox.lower()] -= 1
            self._cond.notify_all()

    def _send_as_violation(
        self, mailbox: str, mail_from: str, data: bytes, *, with_headers: bool = True
    ) -> str | None:
        """The first sender address ``mailbox`` may not send as, or None."""
        with self._cond:
            record = self._mailboxes.get(mailbox.lower())
        allowed = {mailbox.lower()} | (record.send_as if record is not None else frozenset())
        candidates = [mail_from]
        if self.check_header_from and with_headers:
            candidates += _header_from_addresses(data)
        return next((address for address in candidates if address.lower() not in allowed), None)


# --------------------------------------------------------------------------- one connection


class _ExchangeSession(SMTP):
    """One client connection. Reuses aiosmtpd's transport handling and STARTTLS upgrade."""

    line_length_limit = _READ_LIMIT  # aiosmtpd sizes its StreamReader with this

    def __init__(self, fake: FakeExchange, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(
            object(),
            hostname=fake.hostname,
            tls_context=fake.tls_context,
            enable_SMTPUTF8=True,
            data_size_limit=None,
            timeout=_AIOSMTPD_TIMER,
            loop=loop,
        )
        self._fake = fake
        self.session_id = secrets.token_hex(8).upper()
        self.peer_ip = ""
        self._raw_transport: asyncio.Transport | None = None
        self._greeted = False
        self._tls_version: str | None = None
        self._auth_user: str | None = None
        self._txn: _Transaction | None = None
        self._commands: dict[str, Callable[[str], Coroutine[Any, Any, None]]] = {
            "EHLO": self._cmd_ehlo,
            "HELO": self._cmd_helo,
            "STARTTLS": self._cmd_starttls,
            "AUTH": self._cmd_auth,
            "MAIL": self._cmd_mail,
            "RCPT": self._cmd_rcpt,
            "DATA": self._cmd_data,
            "RSET": self._cmd_rset,
            "NOOP": self._cmd_noop,
            "HELP": self._cmd_help,
            "VRFY": self._cmd_not_implemented,
            "EXPN": self._cmd_not_implemented,
            "QUIT": self._cmd_quit,
        }

    # ----------------------------------------------------------------- aiosmtpd hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._raw_transport is None:  # the TCP transport; later calls bring the TLS one
            assert isinstance(transport, asyncio.Transport)
            self._raw_transport = transport
            peer = transport.get_extra_info("peername")
            self.peer_ip = str(peer[0]) if peer else ""
        super().connection_made(transport)

    async def push(self, status: AnyStr) -> None:
        text = status.decode("utf-8", "surrogateescape") if isinstance(status, bytes) else status
        text = _AIOSMTPD_REWRITES.get(text, text)
        self._fake._record_reply(text)
        await super().push(text.encode("utf-8", "surrogateescape"))

    async def _handle_client(self) -> None:
        """Replaces aiosmtpd's command loop (private in aiosmtpd 1.4.6)."""
        self._fake._register(self)
        try:
            await self._converse()
        except (_Hangup, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as error:
            self._fake._record_internal_error(self.session_id, error)
        finally:
            self._finish_transaction()
            self._close_transport()
            self._fake._unregister(self)

    def abort(self) -> None:
        if self._raw_transport is not None:
            self._raw_transport.abort()

    # ----------------------------------------------------------------- plumbing

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _hangup(self, *, abort: bool = False) -> NoReturn:
        if abort:
            self.abort()
        else:
            self._close_transport()
        raise _Hangup

    async def _idle(self, awaitable: Coroutine[Any, Any, bytes]) -> bytes:
        """Await a read; after ``idle_timeout`` s of silence say 421 4.4.1 and close."""
        try:
            return await asyncio.wait_for(awaitable, self._fake.idle_timeout)
        except TimeoutError:
            self._fake._note("idle_timeout", self.session_id)
            await self.push(IDLE_TIMEOUT)
            self._hangup()

    async def _read_line(self) -> bytes | None:
        """One command line, or None if it exceeded the read limit (and was discarded)."""
        try:
            return await self._idle(self._reader.readuntil(b"\n"))
        except asyncio.LimitOverrunError as overrun:
            consumed = overrun.consumed
        while True:
            await self._idle(self._reader.readexactly(consumed))
            try:
                await self._idle(self._reader.readuntil(b"\n"))
                return None
            except asyncio.LimitOverrunError as overrun:
                consumed = overrun.consumed

    async def _read_data_piece(self) -> bytes:
        """A DATA line ending in CRLF, or a fragment of a longer one (no CRLF at its end)."""
        try:
            return await self._idle(self._reader.readuntil(b"\r\n"))
        except asyncio.LimitOverrunError as overrun:
            return await self._idle(self._reader.readexactly(overrun.consumed))

    async def _read_body(self) -> _Body:
        """Read DATA up to CRLF.CRLF, dot-unstuffed, keeping bare LFs as they came."""
        chunks: list[bytes] = []
        size = 0
        line_start = True
        limit = self._fake.max_message_size
        while True:
            piece = await self._read_data_piece()
            if line_start and piece == b".\r\n":
                break
            if line_start and piece.startswith(b"."):
                piece = piece[1:]
            line_start = piece.endswith(b"\r\n")
            size += len(piece)
            if size <= limit:
                chunks.append(piece)
        return _Body(b"".join(chunks), too_big=size > limit)

    async def _sasl_response(self, challenge: str) -> str:
        """Send ``334 <challenge>`` and return the client's line (``*`` cancels)."""
        await self.push(f"334 {challenge}")
        raw = await self._read_line()
        if raw is None or len(raw) > _AUTH_LINE_LIMIT:
            raise _Reject(LINE_TOO_LONG)
        response = raw.rstrip(b"\r\n").decode("ascii", "replace").strip()
        if response == "*":
            raise _Reject(AUTH_CANCELLED)
        return response

    async def _next_fault(self, stage: str, rcpt: str | None = None) -> _Fault | None:
        """Take the next fault of ``stage``; stalls are served here and yield None."""
        fault = self._fake._take_fault(stage, rcpt)
        if fault is not None and fault.action == "stall":
            await asyncio.sleep(fault.seconds)
            return None
        return fault

    async def _answer_fault(self, fault: _Fault) -> None:
        await self.push(fault.reply)
        if fault.close:
            self._hangup()

    async def _answered_by_fault(self, stage: str, rcpt: str | None = None) -> bool:
        fault = await self._next_fault(stage, rcpt)
        if fault is None:
            return False
        await self._answer_fault(fault)
        return True

    def _finish_transaction(self) -> None:
        if self._txn is not None:
            self._fake._release_transaction(self._txn.mailbox)
            self._txn = None

    def _require_auth(self) -> str:
        if self._auth_user is None:
            raise _Reject(NOT_AUTHENTICATED)
        return self._auth_user

    def _require_txn(self) -> _Transaction:
        self._require_auth()
        if self._txn is None:
            raise _Reject(NEED_MAIL)
        return self._txn

    # ----------------------------------------------------------------- the dialogue

    async def _converse(self) -> None:
        if not await self._answered_by_fault("connect"):
            await self.push(self._banner())
        while True:
            raw = await self._read_line()
            try:
                await self._dispatch(raw)
            except _Reject as reject:
                await self.push(reject.reply)
                if reject.close:
                    self._hangup()

    def _banner(self) -> str:
        when = email.utils.format_datetime(datetime.now(UTC))
        return (
            f"220 {self._fake.hostname} Microsoft ESMTP MAIL Service ready at {when} "
            f"[{self.session_id}]"
        )

    async def _dispatch(self, raw: bytes | None) -> None:
        if raw is None:
            raise _Reject(LINE_TOO_LONG)
        line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        verb, _, arg = line.partition(" ")
        limit = _AUTH_LINE_LIMIT if verb.upper() == "AUTH" else _COMMAND_LINE_LIMIT
        if len(raw) > limit:
            raise _Reject(LINE_TOO_LONG)
        command = self._commands.get(verb.upper())
        if command is None:
            shown = verb.encode("utf-8", "surrogateescape").decode("ascii", "replace")
            raise _Reject(unrecognized_command(shown, self._fake._diagnostic(self.session_id)))
        await command(arg.strip())

    def _ehlo_lines(self) -> list[str]:
        security = "AUTH LOGIN XOAUTH2" if self._tls_version else "STARTTLS"
        return [
            f"{self._fake.hostname} Hello [{self.peer_ip}]",
            f"SIZE {self._fake.max_message_size}",
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            security,
            "8BITMIME",
            "SMTPUTF8",
        ]

    async def _cmd_ehlo(self, arg: str) -> None:
        if await self._answered_by_fault("ehlo"):
            return
        if not arg:
            raise _Reject(INVALID_DOMAIN)
        self._finish_transaction()
        self._greeted = True
        lines = self._ehlo_lines()
        reply = [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]
        await self.push("\r\n".join(reply))

    async def _cmd_helo(self, arg: str) -> None:
        if await self._answered_by_fault("ehlo"):
            return
        if not arg:
            raise _Reject(INVALID_DOMAIN)
        self._finish_transaction()
        self._greeted = True
        await self.push(f"250 {self._fake.hostname} Hello [{self.peer_ip}]")

    async def _cmd_starttls(self, arg: str) -> None:
        if self._tls_version is not None:
            raise _Reject(unrecognized_command("STARTTLS", self._fake._diagnostic(self.session_id)))
        if arg:
            raise _Reject(INVALID_ARGUMENTS)
        try:
            await self.smtp_STARTTLS("")  # aiosmtpd: 220 (rewritten) + TLS handshake
        except TLSSetupException as error:
            self._fake._note("tls_failed", self.session_id, repr(error.__cause__))
            self._hangup(abort=True)
        assert self.transport is not None
        ssl_object = self.transport.get_extra_info("ssl_object")
        self._tls_version = str(ssl_object.version())
        self._fake._note("tls", self.session_id, self._tls_version)
        self._greeted = False  # RFC 3207: forget everything learnt before TLS
        self._finish_transaction()

    async def _cmd_auth(self, arg: str) -> None:
        if await self._answered_by_fault("auth"):
            return
        if self._tls_version is None:
            raise _Reject(UNRECOGNIZED_AUTH_TYPE)
        if not self._greeted:
            raise _Reject(SEND_HELLO_FIRST)
        if self._auth_user is not None:
            raise _Reject(ALREADY_AUTHENTICATED)
        mechanism, _, initial = arg.partition(" ")
        if mechanism.upper() == "XOAUTH2":
            await self._auth_xoauth2(initial.strip())
        elif mechanism.upper() == "LOGIN":
            await self._auth_login(initial.strip())
        else:
            raise _Reject(UNRECOGNIZED_AUTH_TYPE)

    async def _auth_xoauth2(self, initial: str) -> None:
        response = initial or await self._sasl_response("")
        blob = _b64decode(response)
        if blob is None:
            raise _Reject(CANNOT_DECODE_BASE64)
        outcome = await asyncio.to_thread(self._fake._check_xoauth2, blob, self.session_id)
        if outcome.mailbox is None and self._fake.xoauth2_error_challenge:
            await self._sasl_response(_GMAIL_STYLE_ERROR)
        await self.push(outcome.reply)
        if outcome.mailbox is not None:
            self._auth_user = outcome.mailbox
        elif self._fake.close_after_auth_failure:
            self._hangup()

    async def _auth_login(self, initial: str) -> None:
        if not initial:
            await self._sasl_response("VXNlcm5hbWU6")  # "Username:"
        await self._sasl_response("UGFzc3dvcmQ6")  # "Password:"
        self._fake._note("auth_failed", self.session_id, "basic authentication")
        await self.push(self._fake.basic_auth_reply)
        if self._fake.close_after_auth_failure:
            self._hangup()

    async def _cmd_mail(self, arg: str) -> None:
        if await self._answered_by_fault("mail"):
            return
        mailbox = self._require_auth()
        if self._txn is not None:
            raise _Reject(SENDER_ALREADY_SPECIFIED)
        path = _parse_path(arg, "FROM")
        if path is None:
            raise _Reject(INVALID_ARGUMENTS)
        address, options = path
        params = _check_params(options, _MAIL_PARAMS)
        smtputf8 = "SMTPUTF8" in params
        if address and not _address_ok(address, smtputf8=smtputf8):
            raise _Reject(INVALID_SENDER)
        if int(params.get("SIZE") or 0) > self._fake.max_message_size:
            raise _Reject(SIZE_EXCEEDED)
        if (
            address
            and self._fake.send_as_checked_at == "mail"
            and self._fake._send_as_violation(mailbox, address, b"", with_headers=False)
        ):
            raise _Reject(SEND_AS_DENIED_AT_MAIL)
        self._fake._admit_transaction(mailbox, self.session_id)
        self._txn = _Transaction(mailbox, address, options, smtputf8)
        await self.push(SENDER_OK)

    async def _cmd_rcpt(self, arg: str) -> None:
        path = _parse_path(arg, "TO")
        if await self._answered_by_fault("rcpt", path[0] if path else None):
            return
        txn = self._require_txn()
        if path is None:
            raise _Reject(INVALID_ARGUMENTS)
        address, options = path
        _check_params(options, _RCPT_PARAMS)
        if not _address_ok(address, smtputf8=txn.smtputf8):
            raise _Reject(INVALID_RECIPIENT)
        if len(txn.rcpt_tos) >= self._fake.max_recipients_per_message:
            raise _Reject(TOO_MANY_RECIPIENTS)
        txn.rcpt_tos.append(address)
        txn.rcpt_options.append(options)
        await self.push(RECIPIENT_OK)

    async def _cmd_data(self, arg: str) -> None:
        fault = await self._next_fault("data")
        if fault is not None and fault.action == "reply":
            await self._answer_fault(fault)
            return
        txn = self._require_txn()
        if not txn.rcpt_tos:
            raise _Reject(NEED_RCPT)
        if arg:
            raise _Reject(INVALID_ARGUMENTS)
        await self.push(START_MAIL_INPUT)
        if fault is not None:  # a drop: take some of the message, then vanish
            await self._reader.read(_PARTIAL_DATA)
            self._fake._note("dropped", self.session_id, "mid-data")
            self._hangup(abort=True)
        body = await self._read_body()
        reply, close = await self._end_of_data(txn, body)
        self._finish_transaction()  # before the reply: the client may go on at once
        await self.push(reply)
        if close:
            self._hangup()

    async def _end_of_data(self, txn: _Transaction, body: _Body) -> tuple[str, bool]:
        """Decide the reply to the final dot (storing the message if accepted)."""
        fault = await self._next_fault("eod")
        if fault is not None and fault.action == "drop":
            if fault.delivered:
                self._store(txn, body.data)
            self._fake._note("dropped", self.session_id, "after end of data")
            self._hangup(abort=True)
        if fault is not None:
            return fault.reply, fault.close
        if body.too_big:
            return SIZE_EXCEEDED, False
        if _BARE_LF.search(body.data):
            return BARE_LINEFEEDS, False
        denied = self._fake._send_as_violation(txn.mailbox, txn.mail_from, body.data)
        if denied is not None:
            return send_as_denied(txn.mailbox, denied), False
        message_id = self._store(txn, body.data)
        return message_accepted(message_id, self._fake.backend_hostname), False

    def _store(self, txn: _Transaction, data: bytes) -> str:
        message_id = _header_message_id(data) or (
            f"<{secrets.token_hex(16).upper()}@{self._fake.backend_hostname}>"
        )
        self._fake._deliver(
            ReceivedMessage(
                mail_from=txn.mail_from,
                rcpt_tos=tuple(txn.rcpt_tos),
                data=data,
                mail_options=txn.mail_options,
                rcpt_options=tuple(txn.rcpt_options),
                auth_user=txn.mailbox,
                tls_version=self._tls_version or "",
                message_id_reply=message_id,
                session_id=self.session_id,
            )
        )
        return message_id

    async def _cmd_rset(self, arg: str) -> None:
        self._finish_transaction()
        await self.push(RSET_OK)

    async def _cmd_noop(self, arg: str) -> None:
        await self.push(NOOP_OK)

    async def _cmd_help(self, arg: str) -> None:
        await self.push(HELP_REPLY)

    async def _cmd_not_implemented(self, arg: str) -> None:
        await self.push(NOT_IMPLEMENTED)

    async def _cmd_quit(self, arg: str) -> None:
        await self.push(QUIT_REPLY)
        self._hangup()


# --------------------------------------------------------------------------- event-loop thread


class _ServerThread:
    """Runs an asyncio server on 127.0.0.1:0 in a daemon thread."""

    def __init__(
        self,
        factory: Callable[[asyncio.AbstractEventLoop], asyncio.Protocol],
        host: str,
        *,
        on_shutdown: Callable[[], None],
    ) -> None:
        self._factory = factory
        self._host = host
        self._on_shutdown = on_shutdown
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fake-exchange", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(_SHUTDOWN_TIMEOUT):
            raise TimeoutError("fake Exchange did not start")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_SHUTDOWN_TIMEOUT)
        if self._thread.is_alive():
            raise TimeoutError("fake Exchange did not stop")

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                loop.create_server(lambda: self._factory(loop), self._host, 0)
            )
        except BaseException as error:
            self._error = error
            self._ready.set()
            loop.close()
            return
        self.port = int(server.sockets[0].getsockname()[1])
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
            loop.run_until_complete(self._shutdown(server))
        finally:
            loop.close()  # does not wait for a validate_token call still running in a worker

    async def _shutdown(self, server: asyncio.Server) -> None:
        server.close()
        self._on_shutdown()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
