"""SMTP ingress: accept mail from allowlisted clients and answer 250 only once it is spooled.

One job: the aiosmtpd side of the relay, running on the daemon's own event loop. A client
outside the allowlist gets `554 5.7.1` instead of a greeting and the connection is closed, so no
command is ever accepted from it. The recipient limit is enforced at RCPT; the size limit at
MAIL (SIZE=) and on the received body, while aiosmtpd stops storing past a hard cap. A message
is acknowledged only after `Spool.commit` has made it durable; any failure on the way answers
`451 4.3.0` with no internal detail, and the detail is logged with the queue id. The spool
commit runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import replies
from relay.metrics import Metrics
from relay.model import QueueEntry, Recipient
from relay.normalize import Normalized, normalize_message
from relay.policy import Network, peer_allowed, recipient_limit_reached
from relay.smtpdata import DataAborted, DataReader
from relay.spool import Spool, new_queue_id

log = logging.getLogger("relay.ingress")

IDENT = "ESMTP oauth-relay"
COMMAND_TIMEOUT = 300.0
REFUSED_COMMANDS = 5  # lines answered after a 554 greeting before the connection is closed
REFUSED_WAIT = 5.0  # seconds to wait for each of them
MAX_REFUSED_SESSIONS = 16  # beyond this many at once, a refused client is closed at once


@dataclass(frozen=True)
class IngressLimits:
    hostname: str
    networks: Sequence[Network]
    max_message_size: int
    max_recipients: int


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


_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^<>\s]{1,500}>)")


def header_message_id(data: bytes) -> str:
    """The Message-ID: of a (normalised) message, for the log line that traces it."""
    end = data.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(data[: end if end >= 0 else min(len(data), 65536)])
    return match.group(1).decode("ascii", "replace") if match else ""


def declared_size(options: Sequence[str]) -> int:
    """The SIZE= a client declared at MAIL (RFC 1870), 0 when absent."""
    for option in options:
        key, _, value = option.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


def receive_cap(max_message_size: int) -> int:
    """aiosmtpd's own hard limit while receiving. It counts dot-stuffed bytes on the wire
    (RFC 1870 says they do not count), so it gets slack; the relay's exact limit is checked on
    the unstuffed body, with the relay's own reply."""
    return max_message_size + max_message_size // 2 + 65536


def valid_utf8(address: str) -> bool:
    """aiosmtpd keeps undecodable bytes as surrogates; such an address cannot be relayed."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unique(addresses: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(addresses))


class RelayHandler:
    """aiosmtpd handler hooks: recipient limit, spool commit, generic errors."""

    def __init__(
        self,
        spool: Spool,
        limits: IngressLimits,
        metrics: Metrics,
        on_commit: Callable[[QueueEntry], None],
        *,
        clock: Callable[[], float] = time.time,
        route: Callable[[str, str, str], str] | None = None,
    ) -> None:
        self._route = route
        self._spool = spool
        self._limits = limits
        self._metrics = metrics
        self._on_commit = on_commit
        self._clock = clock
        self.draining = False

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        size = f"250-SIZE {self._limits.max_message_size}"
        advertised = [size if line.startswith("250-SIZE") else line for line in responses[:-1]]
        return [*advertised, "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not valid_utf8(address):
            return str(replies.BAD_ADDRESS)
        if declared_size(options) > self._limits.max_message_size:
            self._metrics.received.labels(result="too_big").inc()
            return str(replies.MESSAGE_TOO_BIG)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return str(replies.SENDER_OK)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not valid_utf8(address):
            return str(replies.BAD_ADDRESS)
        if recipient_limit_reached(len(envelope.rcpt_tos), self._limits.max_recipients):
            self._metrics.received.labels(result="too_many_recipients").inc()
            return str(replies.TOO_MANY_RECIPIENTS)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return str(replies.RECIPIENT_OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        body = envelope.original_content or b""
        if isinstance(envelope.content, bytes) and not body:
            body = envelope.content
        if len(body) > self._limits.max_message_size:
            self._metrics.received.labels(result="too_big").inc()
            return str(replies.MESSAGE_TOO_BIG)
        queue_id = new_queue_id(self._clock())
        try:
            normalized = await asyncio.to_thread(self._normalize, envelope, body)
        except Exception:  # never expected (the normaliser is total); keep the message as sent
            log.exception("could not normalise; spooling as received", extra={"queue_id": queue_id})
            normalized = Normalized(body, (), not body.isascii(), False)
        for change in normalized.changes:
            log.info("normalised: %s", change, extra={"queue_id": queue_id})
        body = self._trace(server, session, envelope, queue_id) + normalized.data
        entry = QueueEntry(
            queue_id=queue_id,
            mail_from=envelope.mail_from or "",
            recipients=tuple(Recipient(a) for a in unique(envelope.rcpt_tos)),
            received_at=self._clock(),
            size=len(body),
            client=peer_host(session.peer),
            helo=session.host_name or "",
            smtputf8=needs_smtputf8(envelope) or normalized.needs_smtputf8,
            eightbit=normalized.eightbit,
            upstream=self._upstream_for(server, session, envelope),
        )
        commit = asyncio.ensure_future(asyncio.to_thread(self._spool.commit, entry, body))
        # Scheduling hangs off the commit itself: a client that vanishes mid-commit cancels
        # this handler, not the delivery of a message that did reach the disk.
        message_id = header_message_id(normalized.data)
        commit.add_done_callback(lambda done: self._committed(entry, done, message_id))
        try:
            await asyncio.shield(commit)
        except Exception:
            log.exception("spool commit failed; answered 451", extra={"queue_id": queue_id})
            self._metrics.received.labels(result="error").inc()
            return str(replies.TEMPORARY_FAILURE)
        if self.draining and server.transport is not None:
            asyncio.get_running_loop().call_soon(server.transport.close)
        return str(replies.queued(queue_id))

    def _upstream_for(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self._route is None:
            return ""
        listener = getattr(server, "listener", "")
        name = self._route(envelope.mail_from or "", peer_host(session.peer), listener)
        return "" if name == "default" else name

    def _normalize(self, envelope: Envelope, body: bytes) -> Normalized:
        return normalize_message(
            body,
            envelope_from=envelope.mail_from or "",
            hostname=self._limits.hostname,
            now=datetime.fromtimestamp(self._clock(), UTC),
            smtputf8=envelope.smtp_utf8,
        )

    def _trace(self, server: SMTP, session: Session, envelope: Envelope, queue_id: str) -> bytes:
        """The Received: line this relay adds on top (RFC 5321 4.4)."""
        client = peer_host(session.peer)
        helo = session.host_name or client
        utf8 = envelope.smtp_utf8
        protocol = ("UTF8SMTP" if utf8 else "ESMTP") if session.extended_smtp else "SMTP"
        stamp = formatdate(self._clock(), localtime=False, usegmt=False)
        return received_header(
            helo=helo,
            client=client,
            hostname=self._limits.hostname,
            protocol=protocol,
            queue_id=queue_id,
            stamp=stamp,
        )

    def _committed(self, entry: QueueEntry, commit: asyncio.Future[None], message_id: str) -> None:
        if commit.cancelled() or commit.exception() is not None:
            return
        self._metrics.received.labels(result="accepted").inc()
        self._metrics.message_size.observe(entry.size)
        log.info(
            "accepted from=<%s> rcpts=%d size=%d client=%s helo=%s message-id=%s",
            entry.mail_from,
            len(entry.recipients),
            entry.size,
            entry.client,
            entry.helo,
            message_id or "-",
            extra={"queue_id": entry.queue_id},
        )
        try:
            self._on_commit(entry)
        except Exception:  # the message is safe in incoming/; the reconcile pass finds it
            log.exception("could not schedule the message", extra={"queue_id": entry.queue_id})

    def too_big(self) -> None:
        self._metrics.received.labels(result="too_big").inc()

    def data_aborted(self, server: SMTP, bare_lf_end: bool) -> None:
        client = peer_host(server.session.peer) if server.session else ""
        if bare_lf_end:
            log.warning(
                "client %s ended DATA with a bare LF dot (<LF>.<LF>) and hung up: nothing was "
                "accepted; fix the sender to end lines with CRLF (e.g. printf '.\\r\\n')",
                client,
            )
            self._metrics.received.labels(result="bare_lf_end").inc()
        else:
            log.info("client %s closed the connection during DATA: nothing accepted", client)
            self._metrics.received.labels(result="aborted").inc()

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s: %s", type(error).__name__, error, exc_info=error)
        self._metrics.received.labels(result="error").inc()
        return str(replies.TEMPORARY_FAILURE)


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with the allowlist gate in front, our own DATA reader and a
    registry of open sessions."""

    line_length_limit = 64 * 1024  # the stream buffer; command lines stay at 512 (aiosmtpd)

    def __init__(
        self,
        handler: RelayHandler,
        limits: IngressLimits,
        sessions: SessionRegistry,
        listener: str = "",
    ):
        self.listener = listener  # the [smtp] listen entry this session came in on
        super().__init__(
            handler,
            data_size_limit=receive_cap(limits.max_message_size),
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=limits.hostname,
            ident=IDENT,
            timeout=COMMAND_TIMEOUT,
            loop=asyncio.get_running_loop(),
        )
        self._limits = limits
        self._sessions = sessions
        self._relay_handler = handler

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
        if not peer_allowed(client, self._limits.networks):
            log.warning("refused client %s: not in smtp.allow", client or "(unknown)")
            self._relay_handler._metrics.received.labels(result="refused_allowlist").inc()
            await self.push(str(replies.ACCESS_DENIED))
            if self._sessions.refused_open < MAX_REFUSED_SESSIONS:
                self._sessions.refused_open += 1
                try:
                    await self._refuse_until_quit()
                finally:
                    self._sessions.refused_open -= 1
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def smtp_DATA(self, arg: str) -> None:
        """DATA with our own reader: bare LF and long lines accepted, only <CRLF>.<CRLF> ends
        the data, the size limit applied to the unstuffed body while receiving."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(str(replies.NEED_RCPT))
            return
        if arg:
            await self.push(str(replies.DATA_SYNTAX))
            return
        await self.push(str(replies.START_DATA))
        reader = DataReader(self._reader, self._limits.max_message_size, self._reset_timeout)
        try:
            result = await reader.read()
        except (DataAborted, asyncio.CancelledError):
            self._relay_handler.data_aborted(self, reader.ended_with_bare_lf_dot)
            raise
        if result.data is None:
            self._relay_handler.too_big()
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(str(replies.MESSAGE_TOO_BIG))
            return
        self.envelope.content = self.envelope.original_content = result.data
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
        self._servers: list[asyncio.Server] = []
        self.bound: list[tuple[str, int]] = []

    async def start(self, addresses: Sequence[tuple[str, int]], names: Sequence[str] = ()) -> None:
        loop = asyncio.get_running_loop()
        for index, (host, port) in enumerate(addresses):
            name = names[index] if index < len(names) else f"{host}:{port}"
            server = await loop.create_server(self._protocol_factory(name), host, port)
            self._servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                self.bound.append((str(name[0]), int(name[1])))

    def _protocol_factory(self, listener: str) -> Callable[[], RelaySMTP]:
        def factory() -> RelaySMTP:
            return RelaySMTP(self.handler, self.limits, self.sessions, listener)

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
