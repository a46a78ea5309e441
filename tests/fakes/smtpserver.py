"""A local fake of an SMTP provider (SendGrid, Mailjet, Brevo, SMTP2Go, an internal smart host).

Job: stand in for the server behind an ``[upstream] kind = "smtp"`` when testing the relay. It
listens on an ephemeral port of 127.0.0.1 in a background thread and speaks plain aiosmtpd
(1.4.6) SMTP with one of three transport modes:

* ``tls = "starttls"``: plain connection, ``STARTTLS`` offered; ``AUTH PLAIN LOGIN`` is offered
  (and accepted) only after the TLS upgrade, as providers on port 587 do;
* ``tls = "implicit"``: TLS from the first byte (port-465 style); ``AUTH`` offered at once;
* ``tls = "none"``: no TLS at all; ``AUTH`` offered in clear text (an internal smart host).

With ``credentials=(user, password)`` the fake checks AUTH PLAIN and AUTH LOGIN against them
(``535 5.7.8 Authentication credentials invalid`` otherwise); ``set_credentials`` changes
them while the fake runs (e.g. to "fix" a wrong password). Without credentials AUTH is not
advertised. ``require_auth`` (default: whether credentials are given) answers MAIL with
``530 5.7.0 Authentication required`` until the client authenticated.

It records each accepted message (:class:`ReceivedMessage`: envelope, data, the authenticated
user and the TLS version of the connection) and each AUTH attempt (:class:`AuthAttempt`), can
answer RCPT for one address or the end of DATA with an injected reply, and lets tests wait for
messages (or any condition) on a ``threading.Condition``.

Limits: no SIZE limit beyond aiosmtpd's default (32 MiB), no rate limits, no DSN, no BDAT;
reply texts are aiosmtpd's; the listener binds one address (give ``host`` as an IP literal).
The blocking waits must not be called from an event loop that runs the relay under test (use
a subprocess relay, as the end-to-end tests do, or ``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = [
    "AUTH_INVALID",
    "AUTH_REQUIRED",
    "AuthAttempt",
    "FakeSmtpProvider",
    "ReceivedMessage",
    "TlsMode",
]

TlsMode = Literal["starttls", "implicit", "none"]

AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"  # aiosmtpd's text
AUTH_REQUIRED = "530 5.7.0 Authentication required"
DEFAULT_HOSTNAME = "smtp.provider.test"
_START_TIMEOUT = 10.0
_REPLY = re.compile(r"[2-5]\d\d(?:[ -]|\Z)")


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the fake accepted (answered ``250`` at the end of DATA)."""

    mail_from: str  # "" for the null sender (MAIL FROM:<>)
    rcpt_tos: tuple[str, ...]  # the recipients accepted at RCPT, in order
    data: bytes  # as received, dot-unstuffed, without the final ".\r\n"
    auth_user: str | None  # the user name that authenticated the connection, if any
    tls_version: str | None  # e.g. "TLSv1.3"; None on a clear-text connection


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH PLAIN or AUTH LOGIN command that reached the credential check."""

    mechanism: str  # "PLAIN" or "LOGIN"
    user: str
    ok: bool
    tls_version: str | None


@dataclass
class _Injection:
    reply: str
    remaining: int | None  # None: every time


def _tls_version(server: SMTP) -> str | None:
    transport = server.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    return None if ssl_object is None else str(ssl_object.version())


def _check_reply(reply: str) -> str:
    if not _REPLY.match(reply):
        raise ValueError(f"not an SMTP reply: {reply!r}")
    return reply


class FakeSmtpProvider:
    """An SMTP provider on 127.0.0.1:<ephemeral port>. See the module doc."""

    def __init__(
        self,
        *,
        tls: TlsMode = "starttls",
        tls_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
        require_auth: bool | None = None,
        host: str = "127.0.0.1",
        hostname: str = DEFAULT_HOSTNAME,
    ) -> None:
        if tls != "none" and tls_context is None:
            raise ValueError(f"tls = {tls!r} needs a tls_context (e.g. TestPKI.server_context())")
        self.tls: TlsMode = tls
        self.tls_context = tls_context if tls != "none" else None
        self.require_auth = credentials is not None if require_auth is None else require_auth
        self.host = host
        self.hostname = hostname
        self._cond = threading.Condition(threading.RLock())
        self._credentials = credentials
        self._messages: list[ReceivedMessage] = []
        self._auth_attempts: list[AuthAttempt] = []
        self._rcpt_injections: dict[str, list[_Injection]] = {}
        self._data_injections: list[_Injection] = []
        self._rejected_rcpts: list[tuple[str, str]] = []
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.Transport] = set()  # event-loop thread only
        self._port = 0

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FakeSmtpProvider already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(
                        self._new_session,
                        self.host,
                        0,
                        ssl=self.tls_context if self.tls == "implicit" else None,
                    )
                )
                self._port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as error:
                errors.append(error)
                ready.set()
                loop.close()
                return
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
                loop.run_until_complete(self._shutdown())
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fake-smtp-provider", daemon=True)
        self._thread.start()
        if not ready.wait(_START_TIMEOUT):
            raise TimeoutError("fake SMTP provider did not start")
        if errors:
            self._thread = None
            raise errors[0]

    def stop(self) -> None:
        """Close the listener and every open connection; idempotent."""
        thread, self._thread = self._thread, None
        if thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        thread.join(_START_TIMEOUT)
        if thread.is_alive():
            raise TimeoutError("fake SMTP provider did not stop")

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for transport in list(self._transports):
            transport.abort()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    def __enter__(self) -> FakeSmtpProvider:
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
        if self._thread is None:
            raise RuntimeError("FakeSmtpProvider is not running")
        return self._port

    # ----------------------------------------------------------------- configuration

    def set_credentials(self, user: str, password: str) -> None:
        """Accept these credentials from now on (connections already authenticated stay so)."""
        with self._cond:
            self._credentials = (user, password)

    def inject_rcpt(self, address: str, reply: str, *, times: int | None = None) -> None:
        """Answer ``RCPT TO:<address>`` (case-insensitive) with ``reply`` instead of accepting it,
        ``times`` times (None: every time). The recipient is then not part of the message."""
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        with self._cond:
            self._rcpt_injections.setdefault(address.lower(), []).append(
                _Injection(_check_reply(reply), times)
            )

    def inject_data(self, reply: str, *, times: int | None = 1) -> None:
        """Answer the end of DATA with ``reply`` (the message is not stored), ``times`` times
        (None: every time)."""
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        with self._cond:
            self._data_injections.append(_Injection(_check_reply(reply), times))

    def clear_injections(self) -> None:
        with self._cond:
            self._rcpt_injections.clear()
            self._data_injections.clear()

    # ----------------------------------------------------------------- observations

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._cond:
            return list(self._messages)

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        with self._cond:
            return list(self._auth_attempts)

    @property
    def rejected_rcpts(self) -> list[tuple[str, str]]:
        """(address, injected reply) of every RCPT answered by an injection."""
        with self._cond:
            return list(self._rejected_rcpts)

    @property
    def connections(self) -> int:
        """Connections that reached the SMTP dialogue so far (with implicit TLS: those whose
        handshake succeeded; with STARTTLS: counted before the upgrade)."""
        with self._cond:
            return self._connections

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str = "") -> None:
        """Block until ``predicate()`` is true (re-checked on every change); TimeoutError if not."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(
                    f"{what or 'condition'} not met within {timeout} s; "
                    f"{len(self._messages)} messages, {len(self._auth_attempts)} AUTH attempts"
                )

    def wait_for_messages(self, n: int, timeout: float) -> list[ReceivedMessage]:
        """Block until at least ``n`` messages were accepted; return all of them."""
        self.wait_for(lambda: len(self._messages) >= n, timeout, f"{n} messages")
        return self.messages

    # ----------------------------------------------------------------- used by sessions

    def _new_session(self) -> _ProviderSession:
        assert self._loop is not None
        return _ProviderSession(self, self._loop)

    def _opened(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a stream server's (TLS or not)
        self._transports.add(transport)
        with self._cond:
            self._connections += 1
            self._cond.notify_all()

    def _closed(self, transport: asyncio.BaseTransport | None) -> None:
        if isinstance(transport, asyncio.Transport):
            self._transports.discard(transport)

    def _offers_auth(self) -> bool:
        with self._cond:
            return self._credentials is not None

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: LoginPassword,
    ) -> AuthResult:
        """aiosmtpd's authenticator callback (AUTH PLAIN and LOGIN)."""
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        with self._cond:
            ok = self._credentials is not None and (user, password) == self._credentials
            self._auth_attempts.append(AuthAttempt(mechanism, user, ok, _tls_version(server)))
            self._cond.notify_all()
        if ok:
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False, message=AUTH_INVALID)

    def _take(self, injections: list[_Injection]) -> str | None:
        with self._cond:
            if not injections:
                return None
            injection = injections[0]
            if injection.remaining is not None:
                injection.remaining -= 1
                if injection.remaining == 0:
                    injections.pop(0)
            return injection.reply

    def _rcpt_reply(self, address: str) -> str | None:
        with self._cond:
            reply = self._take(self._rcpt_injections.get(address.lower(), []))
            if reply is not None:
                self._rejected_rcpts.append((address, reply))
                self._cond.notify_all()
            return reply

    def _data_reply(self) -> str | None:
        return self._take(self._data_injections)

    def _deliver(self, message: ReceivedMessage) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()


class _Handler:
    """aiosmtpd handler hooks of one connection."""

    def __init__(self, fake: FakeSmtpProvider) -> None:
        self._fake = fake

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if not self._fake._offers_auth():  # nothing to authenticate with: AUTH not offered
            responses = [line for line in responses if not line[4:].upper().startswith("AUTH")]
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # Checked here rather than with aiosmtpd's auth_required, which warns on every
        # connection that does not also require STARTTLS (implicit TLS, tls = "none").
        if self._fake.require_auth and not session.authenticated:
            return AUTH_REQUIRED
        envelope.mail_from = address  # "<>" for the null sender (aiosmtpd needs it non-empty)
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        injected = self._fake._rcpt_reply(address)
        if injected is not None:
            return injected
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        injected = self._fake._data_reply()
        if injected is not None:
            return injected
        data = envelope.original_content or b""
        self._fake._deliver(
            ReceivedMessage(
                mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=data,
                auth_user=session.auth_data if session.authenticated else None,
                tls_version=_tls_version(server),
            )
        )
        return "250 2.0.0 OK: queued"


class _ProviderSession(SMTP):
    """One client connection: aiosmtpd's SMTP with the fake's TLS, AUTH and hooks."""

    def __init__(self, fake: FakeSmtpProvider, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(
            _Handler(fake),
            hostname=fake.hostname,
            tls_context=fake.tls_context if fake.tls == "starttls" else None,
            require_starttls=fake.tls == "starttls",
            auth_required=False,  # see _Handler.handle_MAIL
            auth_require_tls=fake.tls == "starttls",  # implicit: TLS already; none: by choice
            authenticator=fake._authenticate,
            enable_SMTPUTF8=True,
            loop=loop,
        )
        self._fake = fake
        self._raw_transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._raw_transport is None:  # later calls bring the STARTTLS transport
            self._raw_transport = transport
            self._fake._opened(transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._fake._closed(self._raw_transport)
        super().connection_lost(error)
