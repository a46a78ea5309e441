"""Upstream sessions: where queued mail goes. One session carries many messages.

One job: speak to one upstream and report, per recipient, the stage and reply that decided it.
It decides nothing (policy.py does) and touches no spool state. Two kinds:
- ExchangeOnlineUpstream: aiosmtplib to smtp.office365.com:587, STARTTLS required (TLS 1.2+,
  certificate verified), AUTH XOAUTH2 with a token from the injected async token provider.
- SmtpUpstream: any SMTP server (provider, smart host, MX connector), STARTTLS / implicit TLS
  / none, AUTH PLAIN or LOGIN with a password, or no AUTH. The same session class sends.
- MaildirUpstream: the sandbox; writes each message into a Maildir folder.
A body over 1 MiB comes as a StoredBody: the SMTP session sends it from its file a piece at
a time (the sender policy edits the header block only; each write waits for the connection
to take the last one), the maildir copies it. Library exceptions become UpstreamError(stage,
detail, reply) here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Protocol

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from relay.errors import TokenError, UpstreamError, UpstreamTimeout
from relay.model import QueueEntry
from relay.osutil import (
    copy_range,
    fsync_dir,
    make_private_dir,
    open_private_file,
    unlink_quietly,
    write_private_file,
)
from relay.policy import Stage
from relay.replies import SmtpReply
from relay.sender import SenderPolicy, apply_sender_policy, header_end
from relay.storedbody import MessageBody, StoredBody

log = logging.getLogger("relay.upstream")

TokenSource = Callable[[], Awaitable[str]]
FINAL_REPLY_MAX = 600.0
SLOW_UPLINK_BYTES_PER_SECOND = 100_000
LARGE_BODY = 256 * 1024  # bodies above this are prepared off the event loop
Outcomes = dict[str, tuple[Stage, SmtpReply]]
Content = bytes | tuple[bytes, StoredBody, int]  # in memory, or a new head + the rest of a file

NO_SMTPUTF8 = SmtpReply(554, "5.6.7", "upstream does not support SMTPUTF8 for a non-ASCII address")


_LINE_END = re.compile(rb"\r\n|\n|\r")


def smtp_data(body: bytes) -> bytes:
    """The body as DATA content: every line ending CRLF, leading dots doubled (RFC 5321
    4.5.2), and the end-of-data line appended."""
    data = dot_stuffed(body)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def dot_stuffed(piece: bytes, *, line_start: bool = True) -> bytes:
    """`piece` with every line end CRLF and every dot that starts a line doubled; its first
    byte starts a line when `line_start`. The same object when nothing needs it (the spool
    holds CRLF already)."""
    data = piece
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n"):
        data = _LINE_END.sub(b"\r\n", data)
    if b"\n." in data:
        data = data.replace(b"\n.", b"\n..")
    if line_start and data.startswith(b"."):
        data = b"." + data
    return data


def _next_stuffed(pieces: Generator[bytes, None, None], line_start: bool) -> bytes:
    """The next piece of a stored body, dot-stuffed; b"" at the end."""
    try:
        piece = next(pieces, b"")
    except OSError as exc:  # the spool, not the upstream: the session is cut all the same
        raise UpstreamError("data", f"cannot read the message from the spool: {exc}") from None
    return dot_stuffed(piece, line_start=line_start) if piece else b""


class UpstreamSession(Protocol):
    usable: bool

    async def send(self, entry: QueueEntry, body: MessageBody) -> Outcomes:
        """Offer `body` to every pending recipient of `entry`; raise UpstreamError when the
        session fails without a per-recipient answer."""
        ...

    async def close(self) -> None: ...


class Upstream(Protocol):
    name: str

    async def open(self) -> UpstreamSession: ...

    async def token_refused(self) -> None:
        """AUTH was refused: make the next session use fresh credentials (at most once per
        credential)."""
        ...


# --- Exchange Online over SMTP -----------------------------------------------------------------


def client_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the upstream's certificate and name; TLS 1.2 or newer."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _reply(exc: aiosmtplib.SMTPResponseException) -> SmtpReply:
    """A refusal as a reply. A positive or malformed code where a refusal (or the 354) was due
    is a protocol error: it becomes a temporary failure, never a delivery."""
    if 400 <= exc.code <= 599:
        return SmtpReply.parse(exc.code, exc.message)
    return SmtpReply(451, "4.4.0", f"unexpected reply {exc.code} from the upstream")


def final_reply_timeout(base: float, size: int) -> float:
    """How long to wait for the reply after the final dot: the per-command timeout plus time
    for the body to leave a slow uplink, up to RFC 5321's 10 minutes."""
    return max(base, min(FINAL_REPLY_MAX, base + size / SLOW_UPLINK_BYTES_PER_SECOND))


def _connect_error(exc: BaseException) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return UpstreamError("auth", "authentication refused", _reply(exc))
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout("connect", "timed out while connecting")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        stage = "tls" if "tls" in exc.message.lower() else "connect"
        return UpstreamError(stage, "refused during session set-up", _reply(exc))
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return UpstreamError("tls", f"TLS failed: {exc}")
    if isinstance(exc, aiosmtplib.SMTPNotSupported) or "STARTTLS" in str(exc):
        return UpstreamError("tls", "upstream does not offer STARTTLS")
    if isinstance(exc, aiosmtplib.SMTPException) and "XOAUTH2" in str(exc):
        return UpstreamError("auth", "upstream does not offer AUTH XOAUTH2")
    return UpstreamError("connect", f"{type(exc).__name__}: {exc}")


class ExchangeOnlineSession:
    """One authenticated SMTP session; reusable until `usable` turns False."""

    def __init__(
        self, client: aiosmtplib.SMTP, token: str | None, policy: SenderPolicy | None = None
    ) -> None:
        self._client = client
        self.token = token
        self.usable = True
        self._stage = "mail"
        self._policy = policy

    async def send(self, entry: QueueEntry, body: MessageBody) -> Outcomes:
        pending = [r.address for r in entry.pending]
        content: Content
        if isinstance(body, StoredBody):  # the policy edits the header block only
            start = await asyncio.to_thread(body.start)
            end = header_end(start, whole=len(start) == body.size)
            if end is None:  # a header block longer than StoredBody.start: read it all
                body = await asyncio.to_thread(body.read)
            else:
                mail_from, head = await asyncio.to_thread(self._apply_policy, entry, start[:end])
                content = (head, body, end)
        if isinstance(body, bytes) and self._policy is None:
            mail_from, content = entry.mail_from, body
        elif isinstance(body, bytes):
            mail_from, content = await asyncio.to_thread(self._apply_policy, entry, body)
        if entry.smtputf8 and not self._client.supports_extension("smtputf8"):
            return {address: (Stage.MAIL, NO_SMTPUTF8) for address in pending}
        options, encoding = self._mail_options(entry)
        try:
            return await self._transaction(mail_from, pending, content, options, encoding)
        except (TimeoutError, aiosmtplib.SMTPTimeoutError):  # before OSError: it is one
            self.usable = False
            raise UpstreamTimeout(self._stage, "upstream stopped answering") from None
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError, OSError) as exc:
            self.usable = False
            raise UpstreamError(self._stage, f"connection lost: {exc}") from None

    def _apply_policy(self, entry: QueueEntry, body: bytes) -> tuple[str, bytes]:
        """The sender policy (SendAs) of this upstream; what it changes is logged."""
        if self._policy is None:
            return entry.mail_from, body
        rewrite = apply_sender_policy(self._policy, entry.mail_from, body)
        for change in rewrite.changes:
            log.info("sender policy: %s", change, extra={"queue_id": entry.queue_id})
        return rewrite.mail_from, rewrite.data

    def _mail_options(self, entry: QueueEntry) -> tuple[list[str], str]:
        options: list[str] = []
        if self._client.supports_extension("size"):
            options.append(f"SIZE={entry.size}")
        if entry.eightbit and self._client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if entry.smtputf8:
            options.append("SMTPUTF8")
            return options, "utf-8"
        return options, "ascii"

    async def _transaction(
        self, sender: str, recipients: list[str], body: Content, options: list[str], encoding: str
    ) -> Outcomes:
        client = self._client
        self._stage = "mail"
        try:
            await client.mail(sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPSenderRefused as exc:
            await self._reset(exc)
            return {address: (Stage.MAIL, _reply(exc)) for address in recipients}
        outcomes: Outcomes = {}
        accepted: list[str] = []
        self._stage = "rcpt"
        for address in recipients:
            try:
                await client.rcpt(address, encoding=encoding)
                accepted.append(address)
            except aiosmtplib.SMTPRecipientRefused as exc:
                outcomes[address] = (Stage.RCPT, _reply(exc))
                if exc.code == 421:
                    self.usable = False
                    return {a: outcomes.get(a, (Stage.RCPT, _reply(exc))) for a in recipients}
        if not accepted:
            await self._reset(None)
            return outcomes
        stage, reply = await self._data(body)
        return {**outcomes, **{a: (stage, reply) for a in accepted}}

    async def _data(self, body: Content) -> tuple[Stage, SmtpReply]:
        """DATA and the body as two steps, so that a refusal or a silence before the 354 is
        known to have sent nothing (not ambiguous), unlike one after the final dot."""
        client = self._client
        self._stage = "data"
        response = await client.execute_command(b"DATA")
        if response.code != 354:
            return await self._refused(Stage.DATA, response.code, response.message)
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        if isinstance(body, bytes):
            data = (
                await asyncio.to_thread(smtp_data, body)
                if len(body) > LARGE_BODY
                else smtp_data(body)
            )
            self._stage = "eod"
            protocol.write(data)
            size = len(data)
        else:
            size = await self._stream(protocol, *body)
        timeout = final_reply_timeout(client.timeout or FINAL_REPLY_MAX, size)
        response = await protocol.read_response(timeout=timeout)
        if response.code != 250:
            return await self._refused(Stage.EOD, response.code, response.message)
        return Stage.EOD, SmtpReply.parse(response.code, response.message)

    async def _stream(
        self, protocol: SMTPProtocol, head: bytes, body: StoredBody, offset: int
    ) -> int:
        """Send `head`, then the stored body from `offset` on, a piece at a time (read and
        stuffed in a worker thread, written once the connection has taken the previous
        one), then the final dot. Returns the bytes sent. A connection that takes nothing
        for the client's timeout raises TimeoutError (before the dot: not ambiguous)."""
        sent, last = 0, b"\n"
        if head:
            data = dot_stuffed(head)
            protocol.write(data)
            sent, last = len(data), data[-1:]
        with contextlib.closing(body.pieces(offset)) as pieces:
            while data := await asyncio.to_thread(_next_stuffed, pieces, last == b"\n"):
                await self._drained(protocol)
                protocol.write(data)
                sent, last = sent + len(data), data[-1:]
        await self._drained(protocol)
        end = b".\r\n" if last == b"\n" else b"\r\n.\r\n"
        self._stage = "eod"
        protocol.write(end)
        return sent + len(end)

    async def _drained(self, protocol: SMTPProtocol) -> None:
        """Wait until the transport's buffer is below its high-water mark (aiosmtplib's
        protocol keeps asyncio's flow control in `_drain_helper`; without it, no wait)."""
        drain = getattr(protocol, "_drain_helper", None)
        if drain is not None:
            await asyncio.wait_for(drain(), self._client.timeout or FINAL_REPLY_MAX)

    async def _refused(self, stage: Stage, code: int, message: str) -> tuple[Stage, SmtpReply]:
        exc = aiosmtplib.SMTPResponseException(code, message)
        await self._reset(exc)
        return stage, _reply(exc)

    async def _reset(self, exc: aiosmtplib.SMTPResponseException | None) -> None:
        if exc is not None and exc.code == 421:
            self.usable = False
            return
        try:
            await self._client.rset()
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            self.usable = False

    async def close(self) -> None:
        self.usable = False
        try:
            await asyncio.wait_for(self._client.quit(), timeout=5)
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            self._client.close()


class ExchangeOnlineUpstream:
    """Opens authenticated sessions to Exchange Online (or anything that speaks like it)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        mailbox: str,
        tokens: TokenSource,
        invalidate: Callable[[], Awaitable[None]],
        tls_context: ssl.SSLContext,
        timeout: float,
        local_hostname: str,
        token_timeout: float = 90.0,
        policy: SenderPolicy | None = None,
        name: str = "exchange-online",
    ) -> None:
        self._policy = policy
        self._token_timeout = token_timeout
        self.name = name
        self._host, self._port, self._mailbox = host, port, mailbox
        self._tokens, self._invalidate = tokens, invalidate
        self._tls, self._timeout, self._helo = tls_context, timeout, local_hostname
        self._last_token: str | None = None
        self._refreshed_for: str | None = None

    async def _token(self) -> str:
        try:
            token = await asyncio.wait_for(self._tokens(), self._token_timeout)
        except TimeoutError:
            raise TokenError("token_timeout", description="no token in time") from None
        self._last_token = token
        return token

    async def open(self) -> ExchangeOnlineSession:
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            username=self._mailbox,
            oauth_token_generator=self._token,
            start_tls=True,
            tls_context=self._tls,
            timeout=self._timeout,
            local_hostname=self._helo,
        )
        try:
            await client.connect()
        except (Exception, asyncio.CancelledError) as exc:
            client.close()
            if isinstance(exc, asyncio.CancelledError | TokenError):
                raise
            raise _connect_error(exc) from None
        return ExchangeOnlineSession(client, self._last_token, self._policy)

    async def token_refused(self) -> None:
        token = self._last_token
        if token is not None and token != self._refreshed_for:
            self._refreshed_for = token
            await self._invalidate()


# --- any SMTP server -------------------------------------------------------------------------


def smtp_client(  # noqa: PLR0917 - the settings of one connection
    host: str,
    port: int,
    tls: str,
    tls_context: ssl.SSLContext,
    timeout: float,
    local_hostname: str,
) -> aiosmtplib.SMTP:
    """A client for kind = "smtp": STARTTLS required, implicit TLS, or none."""
    return aiosmtplib.SMTP(
        hostname=host,
        port=port,
        use_tls=tls == "implicit",
        start_tls=tls == "starttls",
        tls_context=tls_context,
        timeout=timeout,
        local_hostname=local_hostname,
    )


async def smtp_login(
    client: aiosmtplib.SMTP, auth: str, username: str, password: str | None
) -> aiosmtplib.SMTPResponse | None:
    """AUTH PLAIN or LOGIN on a connected client (EHLO again after STARTTLS); None when the
    upstream takes no login. aiosmtplib's exceptions pass through."""
    if auth == "none" or password is None:
        return None
    if client.is_ehlo_or_helo_needed:  # after STARTTLS the server forgot the EHLO
        await client.ehlo()
    if auth == "plain":
        return await client.auth_plain(username, password)
    return await client.auth_login(username, password)


class SmtpUpstream:
    """Any SMTP server: a provider (SendGrid, Mailjet, Brevo, SMTP2Go), a smart host, the
    tenant's MX endpoint. TLS: STARTTLS required, implicit (port 465), or none when the config
    allows clear text; AUTH PLAIN or LOGIN with a password, or none."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: str,
        auth: str,
        username: str,
        password: str | None,
        tls_context: ssl.SSLContext,
        timeout: float,
        local_hostname: str,
        policy: SenderPolicy | None = None,
        name: str = "smtp",
        auth_hint: str = "",
    ) -> None:
        self.name = name
        self._host, self._port, self._tls, self._auth = host, port, tls, auth
        self._username, self._password = username, password
        self._context, self._timeout, self._helo = tls_context, timeout, local_hostname
        self._policy = policy
        self._auth_hint = auth_hint

    def __repr__(self) -> str:
        return f"SmtpUpstream({self.name!r}, {self._host}:{self._port}, tls={self._tls})"

    async def open(self) -> ExchangeOnlineSession:
        client = smtp_client(
            self._host, self._port, self._tls, self._context, self._timeout, self._helo
        )
        try:
            await client.connect()
            await smtp_login(client, self._auth, self._username, self._password)
        except (Exception, asyncio.CancelledError) as exc:
            client.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            error = _connect_error(exc)
            if error.stage == "auth":
                error.hint = self._auth_hint
            raise error from None
        return ExchangeOnlineSession(client, None, self._policy)

    async def token_refused(self) -> None:
        return None


# --- the sandbox: a Maildir --------------------------------------------------------------------

DELIVERED = SmtpReply(250, "2.0.0", "delivered to the sandbox maildir")


class MaildirSession:
    usable = True

    def __init__(self, root: Path) -> None:
        self._root = root

    async def send(self, entry: QueueEntry, body: MessageBody) -> Outcomes:
        await asyncio.to_thread(self._write, entry, body)
        return {r.address: (Stage.EOD, DELIVERED) for r in entry.pending}

    def _write(self, entry: QueueEntry, body: MessageBody) -> None:
        trace = f"Return-Path: <{entry.mail_from}>\r\n".encode()
        trace += b"".join(f"Delivered-To: {r.address}\r\n".encode() for r in entry.pending)
        name = f"{time.time_ns()}.{os.getpid()}_{entry.queue_id}.{socket.gethostname()}"
        tmp = self._root / "tmp" / name
        if isinstance(body, bytes):
            write_private_file(tmp, trace, body)
        else:
            _copy_with_trace(tmp, trace, body)
        os.replace(tmp, self._root / "new" / name)
        fsync_dir(self._root / "new")

    async def close(self) -> None:
        return None


def _copy_with_trace(path: Path, trace: bytes, body: StoredBody) -> None:
    """`path` = `trace` + the stored body (copied in the kernel where it can), fsynced."""
    with open_private_file(path) as out:
        try:
            out.write(trace)
            out.flush()
            with body.path.open("rb") as source:
                copy_range(source, out, 0, body.size)
            os.fsync(out.fileno())
        except BaseException:
            unlink_quietly(path)
            raise


class MaildirUpstream:
    """The sandbox upstream: every message lands in `<path>/new/`, with its envelope in
    Return-Path and Delivered-To lines, the way local delivery agents write them."""

    def __init__(self, path: Path, name: str = "maildir") -> None:
        self.name = name
        self._root = path

    async def open(self) -> MaildirSession:
        try:
            for sub in ("tmp", "new", "cur"):
                make_private_dir(self._root / sub)
        except OSError as exc:
            raise UpstreamError("connect", f"cannot create the maildir: {exc}") from None
        return MaildirSession(self._root)

    async def token_refused(self) -> None:
        return None
