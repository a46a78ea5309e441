"""SMTP ingress: accept mail from allowed clients and answer 250 only once it is spooled.

One job: the aiosmtpd side of the relay, on the daemon's own event loop. Each listener has its
allowlist, TLS mode (none, STARTTLS, implicit), optional local AUTH and sender/recipient-domain
policy. A client outside the allowlist gets `554 5.7.1` instead of a greeting and no command is
ever accepted from it (unless the listener lets users log in from anywhere: then MAIL needs
AUTH). Limits: sessions overall and per client (421 at connect), command and DATA timeouts,
command line length, recipients per message (452 at RCPT), messages per session, 5xx replies
per session (then 421 and close), message size at MAIL (SIZE=) and while receiving, header
size. A body over `spill_at` (1 MiB) goes to a file in the spool's tmp/ while it arrives
(relay.received), so memory per session stays bounded whatever the message size; such a
message is normalised from its header block when its body needs nothing, else in memory one
at a time. A message is acknowledged only after `Spool.commit` has made it durable; any failure on
the way answers `451 4.3.0` with no internal detail, and the detail is logged with the queue
id. Passwords are checked in worker threads, two at a time; failed logins are throttled per
client address.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from email.utils import formatdate
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay import replies
from relay.config import ListenerSettings, SmtpSettings, parse_host_port
from relay.groupcommit import GroupCommit
from relay.localauth import AuthThrottle, LocalUser, authenticate, sender_allowed
from relay.metrics import Metrics
from relay.model import QueueEntry, Recipient
from relay.normalize import MAX_LINE, Normalized, normalize_message
from relay.osutil import unlink_quietly
from relay.policy import (
    Network,
    Routed,
    address_matches,
    header_message_id,
    header_too_large,
    parse_network_list,
    peer_allowed,
    recipient_domain_allowed,
    recipient_limit_reached,
)
from relay.received import (
    SPILL_AT,
    Normalizing,
    ReceivingBody,
    Spilled,
    as_received,
    inspect_spilled,
    settle_header_only,
    settle_in_memory,
)
from relay.servertls import configure as configure_tls
from relay.servertls import server_context
from relay.smtpdata import DataAborted, DataReader
from relay.spool import Body, BodyFile, Spool, new_queue_id

log = logging.getLogger("relay.ingress")

IDENT = "ESMTP oauth-relay"
COMMAND_TIMEOUT = 300.0
REFUSED_COMMANDS = 5  # lines answered after a 554 greeting before the connection is closed
REFUSED_WAIT = 5.0  # seconds to wait for each of them
MAX_REFUSED_SESSIONS = 16  # beyond this many at once, a refused client is closed at once
VERIFICATIONS = 2  # password checks at once: each takes ~32 MiB and ~0.1 s of a core
LINGER = 2.0  # seconds between our FIN and the close, for the client to read the last reply
EOF_POLL = 0.01
INLINE_NORMALIZE = 16 * 1024  # smaller plain bodies are normalised on the event loop (~50 us)
MAX_NOTES = 20  # normalisation notes logged per message
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_ANGLE_ADDR = re.compile(  # no encoded-word (the email parser decodes those); then
    # the end, or blanks and a parameter (not a comment, nor more whitespace it would skip)
    rf"<(?!=\?)((?:{_ATEXT}\.)*{_ATEXT}@(?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+)>(?=\Z|[ \t]+[^\s(])"
)
AIOSMTPD_GOODBYE = "502 5.5.1 Too many unrecognized commands"  # it closes by itself


def plain_and_small(body: bytes) -> bool:
    """Small, ASCII, no line over 998: normalising it costs tens of microseconds, which the
    event loop can spend (anything else may re-encode and goes to a worker thread)."""
    return (
        len(body) <= INLINE_NORMALIZE
        and body.isascii()
        and max(map(len, body.split(b"\n"))) <= MAX_LINE
    )


@dataclass
class Receipt:
    """One message from its 354 to its commit: its id, Received: line and body."""

    queue_id: str
    head: bytes
    sink: ReceivingBody
    received: bytes | Spilled = b""
    body_file: BodyFile | None = None
    handed_off: bool = False  # a commit or a settling thread owns the files and discards them

    def discard(self) -> None:
        """Remove what was received (harmless once the commit has moved it)."""
        self.sink.discard()
        if self.body_file is not None:
            self.body_file.file.close()
            unlink_quietly(self.body_file.path)


@dataclass(frozen=True)
class Prepared:
    """A message ready for the spool: its data (bytes without the head, or a file with it)."""

    body: Body
    size: int
    normalized: Normalized
    message_id: str


@dataclass(frozen=True)
class IngressLimits:
    hostname: str
    networks: Sequence[Network]  # the default allowlist (listeners may have their own)
    max_message_size: int
    max_recipients: int
    max_sessions: int = 200
    max_sessions_per_client: int = 20
    command_timeout: float = COMMAND_TIMEOUT
    data_timeout: float = 180.0
    max_command_length: int = 2048
    max_header_size: int = 1_048_576
    max_messages_per_session: int = 1000
    max_errors_per_session: int = 20
    spill_at: int = SPILL_AT  # body bytes held in memory before the rest goes to a file

    @classmethod
    def from_settings(cls, smtp: SmtpSettings) -> IngressLimits:
        return cls(
            hostname=smtp.hostname,
            networks=smtp.networks(),
            max_message_size=smtp.max_message_size,
            max_recipients=smtp.max_recipients,
            max_sessions=smtp.max_sessions,
            max_sessions_per_client=smtp.max_sessions_per_client,
            command_timeout=smtp.command_timeout,
            data_timeout=smtp.data_timeout,
            max_command_length=smtp.max_command_length,
            max_header_size=smtp.max_header_size,
            max_messages_per_session=smtp.max_messages_per_session,
            max_errors_per_session=smtp.max_errors_per_session,
        )


@dataclass
class Listener:
    """One listening address at run time: its settings, its allowlist, its live TLS context
    (reloaded in place) and the users that may log in on it."""

    settings: ListenerSettings
    networks: tuple[Network, ...]
    tls_context: ssl.SSLContext | None = None
    users: Mapping[str, LocalUser] = field(default_factory=dict)

    @classmethod
    def build(
        cls, settings: ListenerSettings, users: Mapping[str, LocalUser] | None = None
    ) -> Listener:
        return cls(
            settings,
            parse_network_list(settings.allow),
            server_context(settings),
            users or {},
        )

    @classmethod
    def plain(cls, address: str, networks: Sequence[Network]) -> Listener:
        """A plain listener with the given allowlist (tests and the [smtp] listen entries)."""
        settings = ListenerSettings(address=address, allow=[str(n) for n in networks])
        return cls(settings, tuple(networks))

    @property
    def name(self) -> str:
        return self.settings.label

    @property
    def implicit_tls(self) -> bool:
        return self.settings.tls == "implicit"

    def can_become(self, other: Listener) -> bool:
        """`other` can replace this one in place: same address and TLS mode (an implicit TLS
        server's context is fixed when it binds)."""
        return (
            self.settings.address == other.settings.address
            and self.settings.tls == other.settings.tls
        )

    def become(self, other: Listener) -> None:
        """Take `other`'s settings, allowlist, users and TLS versions and certificate. Open
        sessions keep their connection; their next command sees the new policy."""
        if self.tls_context is not None:
            configure_tls(self.tls_context, other.settings)
        self.settings = other.settings
        self.networks = other.networks
        self.users = other.users


def peer_host(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


def needs_smtputf8(envelope: Envelope) -> bool:
    """The client asked for SMTPUTF8, or an envelope address is not ASCII."""
    addresses = [envelope.mail_from or "", *envelope.rcpt_tos]
    return envelope.smtp_utf8 or not all(address.isascii() for address in addresses)


def received_header(
    *, helo: str, client: str, hostname: str, protocol: str, queue_id: str, stamp: str
) -> bytes:
    """`Received: from <helo> ([<client>]) by <us> (oauth-relay) with <protocol> id <id>; <date>`
    (RFC 5321 4.4), folded. The HELO name is the client's own word: characters that do not
    belong in a host name are replaced, so it can never inject header text."""
    safe_helo = re.sub(r"[^A-Za-z0-9._:\[\]-]", "?", helo)[:255] or "unknown"
    literal = f"IPv6:{client}" if ":" in client else client
    return (
        f"Received: from {safe_helo} ([{literal}])\r\n"
        f"\tby {hostname} (oauth-relay) with {protocol} id {queue_id};\r\n"
        f"\t{stamp}\r\n"
    ).encode("ascii", "replace")


def declared_size(options: Sequence[str]) -> int:
    """The SIZE= a client declared at MAIL (RFC 1870), 0 when absent."""
    for option in options:
        key, _, value = option.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def valid_utf8(address: str) -> bool:
    """aiosmtpd keeps undecodable bytes as surrogates; such an address cannot be relayed. Nor
    can one with control characters: they would reach the log, the spool and the upstream."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not _CONTROL.search(address)


def storable(text: str) -> str:
    """Text a client sent (the EHLO name) as valid UTF-8: bytes aiosmtpd could not decode
    (kept as surrogates) become U+FFFD, so the queue file and the log can hold it."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no decoder made: nothing to restore
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def printable_reply(text: str) -> str:
    """A reply line without control characters (aiosmtpd echoes unknown command words)."""
    return _CONTROL.sub("?", text)


def unique(addresses: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(addresses))


def with_protocol(*, extended: bool, utf8: bool, tls: bool, authenticated: bool) -> str:
    """The `with` of the Received: line (RFC 3848, RFC 6531): SMTP, ESMTP, ESMTPS, ESMTPA,
    ESMTPSA, or the UTF8SMTP forms."""
    if not extended:
        return "SMTP"
    base = "UTF8SMTP" if utf8 else "ESMTP"
    suffix = ("S" if tls else "") + ("A" if authenticated else "")
    return base + suffix


def loggable_login(login: str) -> str:
    """A login name as one log token: an accept-any login is whatever the client sent, and
    must not be able to fake other fields of the line."""
    return re.sub(r"[^\w.@+-]", "?", login)[:64] or "?"


def session_summary(server: SMTP, session: Session) -> str:
    """` listener=... tls=... user=...` for the acceptance log line (nothing on a plain,
    anonymous [smtp] listen entry)."""
    if not isinstance(server, RelaySMTP):
        return ""
    parts = []
    if server.spec.settings.name:
        parts.append(f"listener={server.listener}")
    if server.tls_version:
        parts.append(f"tls={server.tls_version}")
    user = session.auth_data if session.authenticated else None
    if user is not None:
        name = user.name if isinstance(user, LocalUser) else str(user)
        parts.append(f"user={loggable_login(name)}")
    return "".join(" " + part for part in parts)


_DISPATCH_NAMES: dict[tuple[str, tuple[str, ...]], list[str]] = {}


def dispatch_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The attribute names of `cls` that aiosmtpd looks for by prefix (computed once)."""
    key = (f"{cls.__module__}.{cls.__qualname__}", prefixes)
    names = _DISPATCH_NAMES.get(key)
    if names is None:
        names = _DISPATCH_NAMES[key] = sorted(n for n in dir(cls) if n.startswith(prefixes))
    return names


class RelayHandler:
    """aiosmtpd handler hooks: recipient limit, spool commit, generic errors."""

    def __dir__(self) -> list[str]:
        """Only the hooks: aiosmtpd's SMTP.__init__ finds them with dir() and
        inspect.getmembers() on every connection, which on the full listing cost more than
        everything else it does for a session (~0.1 ms)."""
        return dispatch_names(type(self), ("handle_", "auth_"))

    def __init__(
        self,
        spool: Spool,
        limits: IngressLimits,
        metrics: Metrics,
        on_commit: Callable[[QueueEntry], None],
        *,
        clock: Callable[[], float] = time.time,
        route: Callable[[str, str, str], Routed] | None = None,
    ) -> None:
        self.route = route
        self._spool = spool
        self._commits = GroupCommit(spool)
        self.limits = limits
        self._metrics = metrics
        self._on_commit = on_commit
        self._clock = clock
        self.draining = False
        self._whole_message = asyncio.Semaphore(1)  # large messages normalised in memory

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        offers_auth = isinstance(server, RelaySMTP) and server.offers_auth
        greeting, *extensions = [
            line
            for line in responses[:-1]
            if (offers_auth or not line.startswith("250-AUTH")) and not line.startswith("250-SIZE")
        ]
        size = f"250-SIZE {self.limits.max_message_size}"
        return [greeting, size, *extensions, "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self._session_refusal(server, session)
        if refusal is not None:
            return refusal
        if not valid_utf8(address):
            return str(replies.BAD_ADDRESS)
        if declared_size(options) > self.limits.max_message_size:
            self._metrics.received.labels(result="too_big").inc()
            return str(replies.MESSAGE_TOO_BIG)
        refusal = self._sender_refusal(server, session, address)
        if refusal is not None:
            self._metrics.received.labels(result="refused_policy").inc()
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return str(replies.SENDER_OK)

    def _session_refusal(self, server: SMTP, session: Session) -> str | None:
        """Why this session may not start a transaction now, as a reply; None if it may."""
        if not isinstance(server, RelaySMTP):
            return None
        client = peer_host(session.peer)
        if not peer_allowed(client, server.spec.networks):  # a reload may have narrowed it
            if not server.spec.settings.auth_relay_anywhere:
                log.warning("refused MAIL from %s: no longer in the allow list", client)
                server.close_after_reply()
                return str(replies.ACCESS_DENIED)
            server.must_authenticate = True
        if server.messages >= self.limits.max_messages_per_session:
            self._metrics.received.labels(result="refused_limit").inc()
            server.close_after_reply()
            return str(replies.TOO_MANY_MESSAGES)
        if server.must_authenticate and not session.authenticated:
            return str(replies.AUTH_REQUIRED)
        return None

    def _sender_refusal(self, server: SMTP, session: Session, address: str) -> str | None:
        if not isinstance(server, RelaySMTP):
            return None
        allowed = server.spec.settings.senders
        client = peer_host(session.peer)
        if allowed and not address_matches(address, allowed):
            log.warning(
                "refused MAIL FROM:<%s> from %s: not in the senders of listener %s",
                address,
                client,
                server.listener,
            )
            return str(replies.SENDER_NOT_ALLOWED)
        user = session.auth_data if session.authenticated else None
        if isinstance(user, LocalUser) and not sender_allowed(user, address):
            log.warning(
                "refused MAIL FROM:<%s> from %s: user %s may not send as it",
                address,
                client,
                user.name,
            )
            return str(replies.SENDER_NOT_OWNED)
        return None

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not valid_utf8(address):
            return str(replies.BAD_ADDRESS)
        if isinstance(server, RelaySMTP) and not recipient_domain_allowed(
            address, server.spec.settings.recipient_domains
        ):
            log.warning(
                "refused RCPT TO:<%s> from %s: domain not in the recipient_domains of %s",
                address,
                peer_host(session.peer),
                server.listener,
            )
            self._metrics.received.labels(result="refused_policy").inc()
            return str(replies.RELAY_DENIED)
        if recipient_limit_reached(len(envelope.rcpt_tos), self.limits.max_recipients):
            self._metrics.received.labels(result="too_many_recipients").inc()
            return str(replies.TOO_MANY_RECIPIENTS)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return str(replies.RECIPIENT_OK)

    def start_body(self, server: SMTP, session: Session, envelope: Envelope) -> Receipt:
        """At the 354: the queue id, the Received: line and where the body goes."""
        queue_id = new_queue_id(self._clock())
        head = self._trace(server, session, envelope, queue_id)
        spool = self._spool
        sink = ReceivingBody(
            lambda: spool.receive_file(queue_id), head=head, spill_at=self.limits.spill_at
        )
        return Receipt(queue_id, head, sink)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        receipt = server.receipt if isinstance(server, RelaySMTP) else None
        if receipt is None:  # called without our DATA reader: the body is in the envelope
            receipt = self.start_body(server, session, envelope)
            body = envelope.original_content or b""
            if isinstance(envelope.content, bytes) and not body:
                body = envelope.content
            receipt.received = body
        try:
            if isinstance(receipt.received, Spilled):
                prepared = await self._prepare_spilled(session, envelope, receipt)
            else:
                prepared = await self._prepare_in_memory(session, envelope, receipt)
            if isinstance(prepared, str):
                return prepared
            return await self._commit(server, session, envelope, receipt, prepared)
        finally:
            if not receipt.handed_off:
                receipt.discard()

    async def _prepare_in_memory(
        self, session: Session, envelope: Envelope, receipt: Receipt
    ) -> Prepared | str:
        body = receipt.received
        assert isinstance(body, bytes)
        if len(body) > self.limits.max_message_size:
            self._metrics.received.labels(result="too_big").inc()
            return str(replies.MESSAGE_TOO_BIG)
        if header_too_large(body, self.limits.max_header_size):
            return self._header_too_big(session)
        try:
            if plain_and_small(body):  # cheaper than the hop to a worker thread
                normalized = self._normalize(envelope, body)
            else:
                normalized = await asyncio.to_thread(self._normalize, envelope, body)
        except Exception:  # never expected (the normaliser is total); keep the message as sent
            log.exception(
                "could not normalise; spooling as received", extra={"queue_id": receipt.queue_id}
            )
            normalized = Normalized(body, (), not body.isascii(), False)
        data = normalized.data
        return Prepared(data, len(receipt.head) + len(data), normalized, header_message_id(data))

    async def _prepare_spilled(
        self, session: Session, envelope: Envelope, receipt: Receipt
    ) -> Prepared | str:
        """A body that arrived in a file: normalised from its header block when the body
        needs nothing, else in memory, one such message at a time (bounded memory). If the
        session ends meanwhile, the files are removed once the worker thread is done."""
        settling = asyncio.ensure_future(self._settle(session, envelope, receipt))
        try:
            return await asyncio.shield(settling)
        except asyncio.CancelledError:
            receipt.handed_off = True
            settling.add_done_callback(lambda _: receipt.discard())
            raise

    async def _settle(
        self, session: Session, envelope: Envelope, receipt: Receipt
    ) -> Prepared | str:
        spilled = receipt.received
        assert isinstance(spilled, Spilled)
        how = self._normalizing(envelope)
        try:
            found = await asyncio.to_thread(inspect_spilled, spilled, self.limits.max_header_size)
            if found.header_too_large:
                return self._header_too_big(session)
            if found.head is None:
                async with self._whole_message:
                    settled = await asyncio.to_thread(settle_in_memory, spilled, how)
            else:
                settled = await asyncio.to_thread(settle_header_only, spilled, found.head, how)
        except OSError:
            log.exception("could not read back the body", extra={"queue_id": receipt.queue_id})
            self._metrics.received.labels(result="error").inc()
            return str(replies.TEMPORARY_FAILURE)
        except Exception:  # never expected (the normaliser is total); keep the message as sent
            log.exception(
                "could not normalise; spooling as received", extra={"queue_id": receipt.queue_id}
            )
            settled = as_received(spilled)
        receipt.body_file = settled.body
        return Prepared(settled.body, settled.body.size, settled.normalized, settled.message_id)

    def _header_too_big(self, session: Session) -> str:
        log.warning(
            "refused a message from %s: header block over %d bytes",
            peer_host(session.peer),
            self.limits.max_header_size,
        )
        self._metrics.received.labels(result="too_big").inc()
        return str(replies.HEADER_TOO_BIG)

    async def _commit(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        receipt: Receipt,
        prepared: Prepared,
    ) -> str:
        queue_id = receipt.queue_id
        if isinstance(server, RelaySMTP) and server.ending:
            # aiosmtpd goes on through commands already buffered after it closed the session
            # (its 502 goodbye): no reply could reach the client, so nothing is accepted
            log.info("session already closed: the message was not accepted")
            return str(replies.TEMPORARY_FAILURE)
        normalized = prepared.normalized
        for change, times in list(collections.Counter(normalized.changes).items())[:MAX_NOTES]:
            note = change if times == 1 else f"{change} ({times} times)"
            log.info("normalised: %s", note, extra={"queue_id": queue_id})
        if len(set(normalized.changes)) > MAX_NOTES:
            log.info(
                "normalised: %d more kinds of change not listed",
                len(set(normalized.changes)) - MAX_NOTES,
                extra={"queue_id": queue_id},
            )
        entry = QueueEntry(
            queue_id=queue_id,
            mail_from=envelope.mail_from or "",
            recipients=tuple(Recipient(a) for a in unique(envelope.rcpt_tos)),
            received_at=self._clock(),
            size=prepared.size,
            client=peer_host(session.peer),
            helo=storable(session.host_name or ""),
            smtputf8=needs_smtputf8(envelope) or normalized.needs_smtputf8,
            eightbit=normalized.eightbit,
            **self._route_of(server, session, envelope),
        )
        commit = asyncio.ensure_future(self._commits.commit(entry, prepared.body, receipt.head))
        receipt.handed_off = True
        commit.add_done_callback(lambda _: receipt.discard())
        # Scheduling hangs off the commit itself: a client that vanishes mid-commit cancels
        # this handler, not the delivery of a message that did reach the disk.
        how = session_summary(server, session)
        message_id = prepared.message_id
        commit.add_done_callback(lambda done: self._committed(entry, done, message_id, how))
        try:
            await asyncio.shield(commit)
        except Exception:
            log.exception("spool commit failed; answered 451", extra={"queue_id": queue_id})
            self._metrics.received.labels(result="error").inc()
            return str(replies.TEMPORARY_FAILURE)
        if isinstance(server, RelaySMTP):
            server.messages += 1
        if self.draining and isinstance(server, RelaySMTP):
            server.close_after_reply()  # nothing pipelined after this message is taken
        elif self.draining and server.transport is not None:
            asyncio.get_running_loop().call_soon(server.transport.close)
        return str(replies.queued(queue_id))

    def _route_of(self, server: SMTP, session: Session, envelope: Envelope) -> dict[str, Any]:
        """The upstream that gets the message, and its route when it has fallbacks."""
        if self.route is None:
            return {}
        listener = getattr(server, "listener", "")
        name, route = self.route(envelope.mail_from or "", peer_host(session.peer), listener)
        return {
            "upstream": "" if name == "default" else name,
            "route": route if len(route) > 1 else (),
        }

    def _normalizing(self, envelope: Envelope) -> Normalizing:
        return Normalizing(
            envelope_from=envelope.mail_from or "",
            hostname=self.limits.hostname,
            now=datetime.fromtimestamp(self._clock(), UTC),
            smtputf8=envelope.smtp_utf8,
        )

    def _normalize(self, envelope: Envelope, body: bytes) -> Normalized:
        how = self._normalizing(envelope)
        return normalize_message(
            body,
            envelope_from=how.envelope_from,
            hostname=how.hostname,
            now=how.now,
            smtputf8=how.smtputf8,
        )

    def _trace(self, server: SMTP, session: Session, envelope: Envelope, queue_id: str) -> bytes:
        """The Received: line this relay adds on top (RFC 5321 4.4)."""
        client = peer_host(session.peer)
        helo = session.host_name or client
        protocol = with_protocol(
            extended=session.extended_smtp,
            utf8=envelope.smtp_utf8,
            tls=isinstance(server, RelaySMTP) and server.tls_version is not None,
            authenticated=bool(session.authenticated),
        )
        stamp = formatdate(self._clock(), localtime=False, usegmt=False)
        return received_header(
            helo=helo,
            client=client,
            hostname=self.limits.hostname,
            protocol=protocol,
            queue_id=queue_id,
            stamp=stamp,
        )

    def _committed(
        self, entry: QueueEntry, commit: asyncio.Future[None], message_id: str, how: str
    ) -> None:
        if commit.cancelled() or commit.exception() is not None:
            return
        self._metrics.received.labels(result="accepted").inc()
        self._metrics.message_size.observe(entry.size)
        log.info(
            "accepted from=<%s> rcpts=%d size=%d client=%s helo=%s message-id=%s%s",
            entry.mail_from,
            len(entry.recipients),
            entry.size,
            entry.client,
            entry.helo,
            message_id or "-",
            how,
            extra={"queue_id": entry.queue_id},
        )
        try:
            self._on_commit(entry)
        except Exception:  # the message is safe in incoming/; the reconcile pass finds it
            log.exception("could not schedule the message", extra={"queue_id": entry.queue_id})

    def too_big(self) -> None:
        self._metrics.received.labels(result="too_big").inc()

    def spill_failed(self, queue_id: str, error: OSError) -> None:
        log.error(
            "could not write the body to the spool while receiving; answered 451: %s",
            error,
            extra={"queue_id": queue_id},
        )
        self._metrics.received.labels(result="error").inc()

    def data_aborted(self, server: SMTP, bare_lf_end: bool) -> None:
        client = peer_host(server.session.peer) if server.session else ""
        if bare_lf_end:
            log.warning(
                "client %s ended DATA with a bare LF dot (<LF>.<LF>) and hung up: nothing was "
                "accepted; fix the sender to end lines with CRLF (e.g. printf '.\\r\\n')",
                client,
            )
            self._metrics.received.labels(result="bare_lf_end").inc()
        elif isinstance(server, RelaySMTP) and server.timed_out:
            log.warning(
                "client %s was silent for %.0fs during DATA: connection closed, nothing accepted",
                client,
                self.limits.data_timeout,
            )
            self._metrics.received.labels(result="aborted").inc()
        else:
            log.info("client %s closed the connection during DATA: nothing accepted", client)
            self._metrics.received.labels(result="aborted").inc()

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s: %s", type(error).__name__, error, exc_info=error)
        self._metrics.received.labels(result="error").inc()
        return str(replies.TEMPORARY_FAILURE)


# aiosmtpd reads the EHLO hook's signature on every connection (to tell its old 4-argument
# form from the 5-argument one); a precomputed __signature__ makes that a lookup.
RelayHandler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    RelayHandler.handle_EHLO
)


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with the allowlist gate and session limits in front, our own DATA
    reader, local AUTH verified off the event loop, an error budget, and a registry of open
    sessions. Relies on aiosmtpd 1.4's `_handle_client`, `_authenticate`, `_reset_timeout` and
    `_tls_protocol`, which are private."""

    line_length_limit = 64 * 1024  # the stream buffer; command lines have their own limit

    def __dir__(self) -> list[str]:
        """Only the command and AUTH methods, for the tables aiosmtpd builds from dir() and
        inspect.getmembers() on every connection (see RelayHandler.__dir__)."""
        return dispatch_names(type(self), ("smtp_", "auth_"))

    def __init__(  # noqa: PLR0917 - built by one factory
        self,
        handler: RelayHandler,
        limits: IngressLimits,
        sessions: SessionRegistry,
        spec: Listener | None = None,
        throttle: AuthThrottle | None = None,
        verifications: asyncio.Semaphore | None = None,
    ):
        self.spec = spec or Listener.plain("127.0.0.1:0", limits.networks)
        settings = self.spec.settings
        self.listener = self.spec.name  # routes name listeners by this
        starttls = settings.tls == "starttls"
        super().__init__(
            handler,
            data_size_limit=None,  # SIZE= is checked (and counted) in handle_MAIL
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=limits.hostname,
            ident=IDENT,
            timeout=limits.command_timeout,
            tls_context=self.spec.tls_context if starttls else None,
            require_starttls=starttls and settings.require_tls,
            auth_require_tls=not (settings.auth_without_tls or self.spec.implicit_tls),
            auth_exclude_mechanism=["CRAM-MD5"],
            authenticator=self._collect_credentials,
            loop=asyncio.get_running_loop(),
        )
        limit = limits.max_command_length
        self.command_size_limit = limit
        self.command_size_limits = collections.defaultdict(lambda: limit)
        self._limits = limits
        self._sessions = sessions
        self._relay_handler = handler
        # `is None`, not `or`: an empty AuthThrottle is falsy (it has __len__), and a
        # throttle of its own per session would let a blocked client simply reconnect
        self._throttle = AuthThrottle() if throttle is None else throttle
        self._verifications = (
            asyncio.Semaphore(VERIFICATIONS) if verifications is None else verifications
        )
        self.timed_out = False
        self._eof_watch: asyncio.Task[None] | None = None
        self._eof_sent = False
        self.messages = 0
        self.errors = 0
        self.must_authenticate = settings.require_auth
        self._closing = False
        self.receipt: Receipt | None = None  # the message whose DATA is being handled

    # --- properties the handler asks for ------------------------------------------------------

    @property
    def offers_auth(self) -> bool:
        return self.spec.settings.auth != "none"

    @property
    def tls_version(self) -> str | None:
        """The TLS version of this session (implicit or after STARTTLS), or None."""
        transport = self.transport
        if transport is None:
            return None
        ssl_object = transport.get_extra_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else None
        return str(version) if version else None

    # --- connection life ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        assert self.session is not None
        client = peer_host(self.session.peer)
        busy = self._sessions.over_limit(self, client, self._limits)
        if busy is not None:
            log.warning("refused client %s: %s", client or "(unknown)", busy)
            self._relay_handler._metrics.received.labels(result="refused_limit").inc()
            await self.push(str(replies.TOO_MANY_SESSIONS))
            self._close_transport()
            return
        if not peer_allowed(client, self.spec.networks):
            if not self.spec.settings.auth_relay_anywhere:
                await self._refuse(client)
                return
            self.must_authenticate = True  # outside the allowlist: only a user may send
        await super()._handle_client()

    async def _refuse(self, client: str) -> None:
        allow = (
            f"the allow of listener {self.listener}" if self.spec.settings.name else "smtp.allow"
        )
        log.warning("refused client %s: not in %s", client or "(unknown)", allow)
        self._relay_handler._metrics.received.labels(result="refused_allowlist").inc()
        await self.push(str(replies.ACCESS_DENIED))
        if self._sessions.refused_open < MAX_REFUSED_SESSIONS:
            self._sessions.refused_open += 1
            try:
                await self._refuse_until_quit()
            finally:
                self._sessions.refused_open -= 1
        self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        """aiosmtpd's idle timer fired: say why (RFC 5321 4.5.3.2), then close."""
        self.timed_out = True
        transport = self.transport
        if self._eof_sent:  # already ending: the linger timer closes it
            return
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"{replies.TIMED_OUT}\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def close_after_reply(self) -> None:
        """End the session after the reply being sent: whatever the client pipelined after
        it is discarded unanswered, and the connection is closed gently (see `_shut`)."""
        self._closing = True
        buffered = getattr(self._reader, "_buffer", None)  # aiosmtpd clears it the same way
        if isinstance(buffered, bytearray):
            buffered.clear()
        asyncio.get_running_loop().call_soon(self._shut)

    def _shut(self) -> None:
        """Send FIN after the last reply and close a little later: closing a socket that still
        has unread input makes the kernel send RST, which can destroy that last reply."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._sessions.discard(self)  # done: it no longer counts against any limit
        if isinstance(transport, asyncio.WriteTransport) and transport.can_write_eof():
            self._eof_sent = True
            try:
                transport.write_eof()
            except OSError:  # the client closed first (ENOTCONN): nothing left to be gentle to
                transport.close()
                return
            self.loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # the session is over: what the client still sends is not read
        super().data_received(data)

    def eof_received(self) -> bool | None:
        """The client closed its sending side after pipelining its commands (`nc -N`, some
        firmware). aiosmtpd would cancel the session at once, dropping a message whose final
        dot had already arrived; instead answer what was sent, then close."""
        if self._eof_watch is None:
            self._eof_watch = self.loop.create_task(self._close_when_idle())
        transport = self.transport
        over_tls = transport is not None and transport.get_extra_info("sslcontext") is not None
        return not over_tls and self.session is not None and self.session.ssl is None

    async def _close_when_idle(self) -> None:
        """After the client's EOF: once the session waits for input that cannot come (the
        reader waits for more than its buffer holds), end it. Bounded by the DATA timeout."""
        deadline = self.loop.time() + self._limits.data_timeout
        reader = self._reader
        while self.transport is not None and self.loop.time() < deadline:
            if getattr(reader, "_waiter", None) is not None:  # needs more than it has
                break
            await asyncio.sleep(EOF_POLL)
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        self._close_transport()

    async def smtp_QUIT(self, arg: str) -> None:
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        await self.push(str(replies.BYE))
        self.close_after_reply()

    async def push(self, status: Any) -> None:
        """Every reply goes through here: control characters are replaced, 5xx replies spend
        the session's error budget, and the one that exhausts it is followed by 421 and the
        end of the session. Nothing is sent once the session is closing."""
        if self.transport is None or self.transport.is_closing() or self._eof_sent:
            return
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        text = printable_reply(text)
        await super().push(text)
        if not text.startswith("5") or self._closing or text.startswith(AIOSMTPD_GOODBYE):
            return
        self.errors += 1
        if self.errors >= self._limits.max_errors_per_session:
            client = peer_host(self.session.peer) if self.session else ""
            log.warning("closing the session of %s after %d errors", client, self.errors)
            self._relay_handler._metrics.received.labels(result="refused_limit").inc()
            await super().push(str(replies.TOO_MANY_ERRORS))
            self.close_after_reply()

    # --- AUTH ---------------------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.offers_auth:
            await self.push(str(replies.AUTH_NOT_AVAILABLE))
            return
        await super().smtp_AUTH(arg)

    def _collect_credentials(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd decodes PLAIN and LOGIN and calls this synchronously: only collect the
        credentials here; `_verify` checks them off the event loop (scrypt is slow on purpose)."""
        return AuthResult(success=True, handled=False, auth_data=data)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(_, args))

    async def _verify(self, collected: AuthResult) -> AuthResult:
        if not collected.success or not isinstance(collected.auth_data, LoginPassword):
            return collected
        assert self.session is not None
        client = peer_host(self.session.peer)
        now = time.monotonic()
        blocked = self._throttle.blocked(client, now)
        if blocked:
            log.warning(
                "AUTH from %s refused: blocked for %.0fs after failed logins", client, blocked
            )
            return AuthResult(success=False, handled=False, message=str(replies.AUTH_THROTTLED))
        login = collected.auth_data.login.decode("utf-8", "replace")
        password = collected.auth_data.password.decode("utf-8", "replace")
        if self.spec.settings.auth == "accept-any":
            log.info(
                "AUTH accepted from %s as %s (accept-any: not checked)",
                client,
                loggable_login(login),
            )
            return AuthResult(success=True, handled=False, auth_data=login)
        async with self._verifications:  # scrypt is slow and big on purpose: two at a time
            if self._throttle.blocked(client, time.monotonic()):  # blocked while it waited
                return AuthResult(success=False, handled=False, message=str(replies.AUTH_THROTTLED))
            user = await asyncio.to_thread(authenticate, self.spec.users, login, password)
        if user is None:
            self._throttle.failure(client, time.monotonic())
            log.warning("AUTH failed from %s for user %s", client, loggable_login(login))
            return AuthResult(success=False, handled=False)
        self._throttle.success(client, time.monotonic())
        log.info("AUTH from %s as user %s", client, user.name)
        return AuthResult(success=True, handled=False, auth_data=user)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser, unchanged in what it accepts, without the class it
        defines on every call (a typing Protocol: about 5% of the CPU of a MAIL or RCPT),
        and with a regular expression for `<dot.atom@host.name>` first (the email parser
        was 9 % of the event loop's time with one message per connection)."""
        if not arg:
            return "", ""
        simple = _SIMPLE_ANGLE_ADDR.match(arg)
        if simple is not None:  # what devices send: the email parser would give the same
            addr, rest = simple.group(1), arg[simple.end() :].lstrip(" \t")
        else:
            try:
                parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
                address, rest = parse(arg)
                addr = address.addr_spec
            except (HeaderParseError, IndexError):  # IndexError: the parser, on "<" alone
                return None, None
        local_part = addr.rpartition("@")[0]
        if self.local_part_limit and len(local_part) > self.local_part_limit:
            return None, None
        return addr, rest

    # --- DATA ---------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        """DATA with our own reader: bare LF and long lines accepted, only <CRLF>.<CRLF> ends
        the data, the size limit applied to the unstuffed body while receiving."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push(str(replies.NEED_RCPT))
            return
        if arg:
            await self.push(str(replies.DATA_SYNTAX))
            return
        await self.push(str(replies.START_DATA))
        data_timeout = self._limits.data_timeout
        self._reset_timeout(data_timeout)
        receipt = self._relay_handler.start_body(self, self.session, self.envelope)
        reader = DataReader(
            self._reader,
            self._limits.max_message_size,
            lambda: self._reset_timeout(data_timeout),
            receipt.sink,
        )
        try:
            await self._receive(reader, receipt)
        finally:
            self.receipt = None
            if not receipt.handed_off:
                receipt.discard()

    async def _receive(self, reader: DataReader, receipt: Receipt) -> None:
        assert self.envelope is not None
        try:
            result = await reader.read()
        except (DataAborted, asyncio.CancelledError):
            self._relay_handler.data_aborted(self, reader.ended_with_bare_lf_dot)
            raise
        self._reset_timeout()
        if result.data is None:
            self._relay_handler.too_big()
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(str(replies.MESSAGE_TOO_BIG))
            return
        try:
            receipt.received = await receipt.sink.finish()
        except OSError as exc:
            self._relay_handler.spill_failed(receipt.queue_id, exc)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(str(replies.TEMPORARY_FAILURE))
            return
        self.receipt = receipt
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    async def _refuse_until_quit(self) -> None:
        """RFC 5321 3.1: after a 554 greeting, answer 503 until QUIT (a few lines, briefly)."""
        for _ in range(REFUSED_COMMANDS):
            try:
                line = await asyncio.wait_for(self._reader.readline(), REFUSED_WAIT)
            except (TimeoutError, ValueError, ConnectionError):
                return
            if not line:
                return
            if line.strip().upper() == b"QUIT":
                await self.push(str(replies.BYE))
                return
            await self.push(str(replies.REFUSED_SESSION))

    @property
    def ending(self) -> bool:
        """The session is closed or closing: no further reply can reach the client."""
        transport = self.transport
        return transport is None or transport.is_closing() or self._eof_sent or self._closing

    @property
    def idle(self) -> bool:
        """No transaction under way: the session can be closed without losing anything."""
        return self.envelope is None or (
            self.envelope.mail_from is None and not self.envelope.rcpt_tos
        )

    def say_goodbye(self) -> None:
        """Shutdown: tell an idle client to come back later and close."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"{replies.SHUTTING_DOWN}\r\n".encode())
            transport.close()


class SessionRegistry:
    """The open SMTP sessions, so shutdown can wait for them or close them."""

    def __init__(self) -> None:
        self._open: set[RelaySMTP] = set()
        self.refused_open = 0
        self._changed = asyncio.Event()

    def add(self, session: RelaySMTP) -> None:
        self._open.add(session)

    def over_limit(self, session: RelaySMTP, client: str, limits: IngressLimits) -> str | None:
        """Why a new session is one too many (overall, or for its client address), or None."""
        if len(self._open) > limits.max_sessions:
            return f"{len(self._open) - 1} sessions open (max_sessions = {limits.max_sessions})"
        same = sum(
            1
            for other in self._open
            if other is not session and other.session and peer_host(other.session.peer) == client
        )
        if same >= limits.max_sessions_per_client:
            return (
                f"{same} sessions open from it "
                f"(max_sessions_per_client = {limits.max_sessions_per_client})"
            )
        return None

    def discard(self, session: RelaySMTP) -> None:
        self._open.discard(session)
        self._changed.set()

    def __len__(self) -> int:
        return len(self._open)

    def close_idle(self) -> None:
        for session in list(self._open):
            if session.idle:
                session.say_goodbye()

    def close_all(self) -> None:
        for session in list(self._open):
            session.say_goodbye()

    async def wait_empty(self, within: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self._open:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return not self._open
        return True


class Ingress:
    """All SMTP listeners of the daemon."""

    def __init__(self, handler: RelayHandler, limits: IngressLimits) -> None:
        self.handler = handler
        self.limits = limits
        self.sessions = SessionRegistry()
        self.throttle = AuthThrottle()
        self.verifications = asyncio.Semaphore(VERIFICATIONS)
        self.listeners: list[Listener] = []
        self._servers: list[asyncio.Server] = []
        self.bound: list[tuple[str, int]] = []

    async def start(self, listeners: Sequence[Listener]) -> None:
        for listener in listeners:
            await self._listen(listener)
        self._note_bound()

    async def _listen(self, listener: Listener) -> None:
        server = await self._bind(listener)
        self._servers.append(server)
        self.listeners.append(listener)

    async def _bind(self, listener: Listener) -> asyncio.Server:
        host, port = parse_host_port(listener.settings.address)
        server = await asyncio.get_running_loop().create_server(
            self._protocol_factory(listener),
            host,
            port,
            ssl=listener.tls_context if listener.implicit_tls else None,
            ssl_handshake_timeout=min(60.0, self.limits.command_timeout)
            if listener.implicit_tls
            else None,
        )
        if listener.settings.legacy_tls:
            log.warning(
                "listener %s accepts TLS %s: for old devices only, it is not secure",
                listener.name,
                listener.settings.tls_min_version,
            )
        return server

    def _note_bound(self) -> None:
        self.bound = [
            (str(name[0]), int(name[1]))
            for server in self._servers
            for name in (sock.getsockname() for sock in server.sockets)
        ]

    async def apply(self, listeners: Sequence[Listener], limits: IngressLimits) -> None:
        """A reload. New listeners are bound first: if one cannot be (port in use), they are
        closed again and OSError is raised with nothing else changed. Then listeners are
        changed in place, the removed ones stop accepting (their open sessions finish), and
        new sessions get the new limits. Changing the TLS mode of an address needs a restart
        (an implicit TLS server's context is fixed when it binds): ValueError."""
        old = list(zip(self.listeners, self._servers, strict=True))
        matches: list[tuple[Listener, asyncio.Server, Listener]] = []
        added: list[Listener] = []
        for listener in listeners:
            pair = next((p for p in old if p[0].can_become(listener)), None)
            if pair is not None:
                old.remove(pair)
                matches.append((pair[0], pair[1], listener))
            else:
                added.append(listener)
        kept_addresses = {p[0].settings.address for p in old}
        clash = [
            listener.name
            for listener in added
            if listener.settings.address in kept_addresses
            and parse_host_port(listener.settings.address)[1] != 0  # port 0: a new port anyway
        ]
        if clash:
            raise ValueError(f"changing the TLS mode of listener {clash[0]} needs a restart")
        opened: list[tuple[Listener, asyncio.Server]] = []
        try:
            for listener in added:
                opened.append((listener, await self._bind(listener)))
        except OSError:
            for _, server in opened:
                server.close()
            raise
        self.limits = limits
        self.handler.limits = limits
        self.listeners, self._servers = [], []
        for current, server, wanted in matches:
            current.become(wanted)
            self.listeners.append(current)
            self._servers.append(server)
        for listener, server in old:
            log.info("listener %s closed by the reload (open sessions finish)", listener.name)
            server.close()
        for listener, server in opened:
            self.listeners.append(listener)
            self._servers.append(server)
            log.info("listener %s opened by the reload", listener.name)
        self._note_bound()

    def _protocol_factory(self, listener: Listener) -> Callable[[], RelaySMTP]:
        def factory() -> RelaySMTP:
            return RelaySMTP(
                self.handler,
                self.limits,
                self.sessions,
                listener,
                self.throttle,
                self.verifications,
            )

        return factory

    @property
    def listening(self) -> bool:
        return bool(self._servers) and all(s.is_serving() for s in self._servers)

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()

    async def drain(self, grace: float) -> None:
        """Close idle sessions now, let transactions finish within `grace`, then close all."""
        self.handler.draining = True
        self.stop_accepting()
        self.sessions.close_idle()
        if not await self.sessions.wait_empty(grace):
            log.warning(
                "closing %d SMTP sessions still open after the grace period", len(self.sessions)
            )
            self.sessions.close_all()
            await self.sessions.wait_empty(2.0)
        for server in self._servers:
            await server.wait_closed()
