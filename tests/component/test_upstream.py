"""Component tests of relay.upstream: ExchangeOnlineUpstream against the fake Exchange Online,
with real tokens from MsalTokenProvider and the fake Entra ID, and the sandbox MaildirUpstream.

Everything listens on 127.0.0.1; faults are scripted per test through the fakes' own switches.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from relay.config import OAuthSettings
from relay.errors import TokenError, UpstreamError, UpstreamTimeout
from relay.model import QueueEntry, RcptState, Recipient
from relay.policy import Stage, Verdict, classify_error
from relay.replies import SmtpReply
from relay.sender import SenderPolicy
from relay.storedbody import StoredBody
from relay.tokens import MsalTokenProvider
from relay.upstream import (
    NO_SMTPUTF8,
    ExchangeOnlineSession,
    ExchangeOnlineUpstream,
    MaildirUpstream,
    client_tls_context,
    final_reply_timeout,
)
from tests.conftest import CLIENT_ID, CLIENT_SECRET, MAILBOX
from tests.fakes import exchange as fake_exchange
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.pki import TestPKI

SENDER = "scanner@contoso.com"  # the mailbox holds Send As on it (conftest)
NO_ROLE_CLIENT_ID = "44444444-5555-6666-7777-888888888888"
NO_ROLE_SECRET = "no-r0le~secret"
SEND_AS_DENIED_MAIL = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
WAIT = 5.0

BODY = (
    b"From: Scanner <scanner@contoso.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: scan 0042\r\n"
    b"Message-ID: <scan-0042@relay.test>\r\n"
    b"\r\n"
    b"page 1\r\n"
    b".a line starting with a dot\r\n"
    b"..and one with two\r\n"
    b"last line\r\n"
)


def make_entry(
    *recipients: str,
    sender: str = SENDER,
    body: bytes = BODY,
    smtputf8: bool = False,
    eightbit: bool = False,
    queue_id: str = "Q0042",
) -> QueueEntry:
    return QueueEntry(
        queue_id=queue_id,
        mail_from=sender,
        recipients=tuple(Recipient(address) for address in recipients),
        received_at=time.time(),
        size=len(body),
        smtputf8=smtputf8,
        eightbit=eightbit,
    )


def oauth(entra: FakeEntra, pki: TestPKI, **overrides: Any) -> OAuthSettings:
    values: dict[str, Any] = {
        "tenant_id": entra.tenant_id,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "authority": entra.authority_base,
        "ca_file": pki.ca_file,
        "timeout": 5,
    }
    values.update(overrides)
    return OAuthSettings(**values)


@pytest.fixture
def provider(entra: FakeEntra, pki: TestPKI) -> MsalTokenProvider:
    return MsalTokenProvider(oauth(entra, pki))


UpstreamFactory = Callable[..., ExchangeOnlineUpstream]


@pytest.fixture
def make_upstream(
    pki: TestPKI, exchange: FakeExchange, provider: MsalTokenProvider
) -> UpstreamFactory:
    def factory(
        *,
        tokens: MsalTokenProvider | None = None,
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 5,
        policy: SenderPolicy | None = None,
    ) -> ExchangeOnlineUpstream:
        source = tokens or provider
        return ExchangeOnlineUpstream(
            host="127.0.0.1",
            port=exchange.port,
            mailbox=MAILBOX,
            tokens=source,
            invalidate=source.invalidate,
            tls_context=tls_context or client_tls_context(pki.ca_file),
            timeout=timeout,
            local_hostname="relay.test",
            policy=policy,
        )

    return factory


@pytest.fixture
async def sessions() -> AsyncIterator[list[ExchangeOnlineSession]]:
    """Sessions to close at the end of the test (whatever state they are in)."""
    opened: list[ExchangeOnlineSession] = []
    yield opened
    for session in opened:
        await session.close()


async def open_session(
    upstream: ExchangeOnlineUpstream, sessions: list[ExchangeOnlineSession]
) -> ExchangeOnlineSession:
    session = await upstream.open()
    sessions.append(session)
    return session


def assert_delivered(outcome: tuple[Stage, SmtpReply]) -> None:
    stage, reply = outcome
    assert stage is Stage.EOD
    assert (reply.code, reply.enhanced) == (250, "2.0.0")
    assert reply.text.startswith("OK <")


async def wait_until(exchange: FakeExchange, predicate: Callable[[], bool]) -> None:
    await asyncio.to_thread(exchange.wait_for, predicate, WAIT)


# --------------------------------------------------------------------------- delivery


async def test_send_delivers_exact_bytes(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    entra: FakeEntra,
    sessions: list[ExchangeOnlineSession],
) -> None:
    session = await open_session(make_upstream(), sessions)
    entry = make_entry("bob@example.org", "carol@example.net")

    outcomes = await session.send(entry, BODY)

    assert set(outcomes) == {"bob@example.org", "carol@example.net"}
    for outcome in outcomes.values():
        assert_delivered(outcome)
    assert outcomes["bob@example.org"][1].text.startswith("OK <scan-0042@relay.test>")
    [message] = exchange.messages
    assert message.data == BODY
    assert message.mail_from == SENDER
    assert message.rcpt_tos == ("bob@example.org", "carol@example.net")
    assert message.auth_user == MAILBOX
    assert message.tls_version in ("TLSv1.2", "TLSv1.3")
    assert f"SIZE={len(BODY)}" in message.mail_options
    assert session.usable
    entra.validate_access_token(session.token or "")


async def test_session_carries_several_messages_with_one_auth(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    entra: FakeEntra,
    sessions: list[ExchangeOnlineSession],
) -> None:
    session = await open_session(make_upstream(), sessions)
    second_body = BODY.replace(b"scan-0042", b"scan-0043")

    first = await session.send(make_entry("bob@example.org"), BODY)
    second = await session.send(make_entry("dave@example.org", body=second_body), second_body)

    assert_delivered(first["bob@example.org"])
    assert_delivered(second["dave@example.org"])
    assert [m.data for m in exchange.messages] == [BODY, second_body]
    assert len({m.session_id for m in exchange.messages}) == 1
    assert exchange.auth_ok == 1
    assert exchange.connections == 1
    assert len(entra.token_requests) == 1


async def test_body_without_final_crlf_is_completed(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    body = BODY.rstrip(b"\r\n")

    outcomes = await session.send(make_entry("bob@example.org", body=body), body)

    assert_delivered(outcomes["bob@example.org"])
    assert exchange.messages[0].data == body + b"\r\n"


async def test_only_pending_recipients_are_offered(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    entry = make_entry("bob@example.org", "carol@example.net")
    entry = entry.with_recipients(
        (Recipient("bob@example.org", RcptState.DELIVERED), Recipient("carol@example.net"))
    )

    outcomes = await session.send(entry, BODY)

    assert set(outcomes) == {"carol@example.net"}
    assert exchange.messages[0].rcpt_tos == ("carol@example.net",)


async def test_close_says_quit(make_upstream: UpstreamFactory, exchange: FakeExchange) -> None:
    session = await make_upstream().open()

    await session.close()

    assert not session.usable
    assert exchange.replies["221 2.0.0"] == 1
    await wait_until(exchange, lambda: exchange.active_connections == 0)


# --------------------------------------------------------------------------- TLS


def test_client_tls_context_verifies_and_needs_tls_1_2(pki: TestPKI) -> None:
    context = client_tls_context(pki.ca_file)

    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


async def test_untrusted_server_certificate_fails_at_tls(
    make_upstream: UpstreamFactory, exchange: FakeExchange, entra: FakeEntra
) -> None:
    # client_tls_context(None) trusts the system store (SSL_CERT_FILE), not the test CA.
    upstream = make_upstream(tls_context=client_tls_context(None))

    with pytest.raises(UpstreamError) as caught:
        await upstream.open()

    assert caught.value.stage == "tls"
    assert not isinstance(caught.value, UpstreamTimeout)
    assert exchange.auth_ok == exchange.auth_failed == 0
    assert entra.token_requests == []  # no token is fetched before TLS is up


async def test_server_without_starttls_is_refused_at_tls(
    make_upstream: UpstreamFactory, exchange: FakeExchange, entra: FakeEntra
) -> None:
    exchange.inject("ehlo", "250-fake.test Hello [127.0.0.1]\r\n250-AUTH LOGIN XOAUTH2\r\n250 SIZE")

    with pytest.raises(UpstreamError) as caught:
        await make_upstream().open()

    assert caught.value.stage == "tls"
    assert exchange.auth_ok == exchange.auth_failed == 0
    assert entra.token_requests == []  # the token never travels in clear text


# --------------------------------------------------------------------------- AUTH


@pytest.fixture
def no_role_provider(entra: FakeEntra, pki: TestPKI) -> MsalTokenProvider:
    entra.register_app(NO_ROLE_CLIENT_ID, secret=NO_ROLE_SECRET, roles=())
    return MsalTokenProvider(
        oauth(entra, pki, client_id=NO_ROLE_CLIENT_ID, client_secret=NO_ROLE_SECRET)
    )


async def test_token_without_role_is_refused_at_auth(
    make_upstream: UpstreamFactory, exchange: FakeExchange, no_role_provider: MsalTokenProvider
) -> None:
    upstream = make_upstream(tokens=no_role_provider)

    with pytest.raises(UpstreamError) as caught:
        await upstream.open()

    assert caught.value.stage == "auth"
    reply = caught.value.reply
    assert reply is not None
    assert (reply.code, reply.enhanced) == (535, "5.7.3")
    assert reply.text.startswith("Authentication unsuccessful")
    decision = classify_error(caught.value)
    assert decision.verdict is Verdict.DEFER
    assert decision.refresh_token
    assert exchange.auth_failed == 1


async def test_smtp_auth_disabled_for_tenant(
    make_upstream: UpstreamFactory, exchange: FakeExchange
) -> None:
    exchange.tenant_smtp_auth_enabled = False

    with pytest.raises(UpstreamError) as caught:
        await make_upstream().open()

    assert caught.value.stage == "auth"
    reply = caught.value.reply
    assert reply is not None
    assert (reply.code, reply.enhanced) == (535, "5.7.139")
    assert "SmtpClientAuthentication is disabled for the Tenant" in reply.text


async def test_token_refused_invalidates_once_per_token(
    make_upstream: UpstreamFactory,
    entra: FakeEntra,
    exchange: FakeExchange,
    no_role_provider: MsalTokenProvider,
) -> None:
    upstream = make_upstream(tokens=no_role_provider)
    with pytest.raises(UpstreamError):
        await upstream.open()
    assert len(entra.token_requests) == 1

    await upstream.token_refused()
    await no_role_provider()  # the refused token was dropped: a fresh one is fetched
    assert len(entra.token_requests) == 2

    await upstream.token_refused()  # same refused token again: no second invalidation
    await no_role_provider()
    assert len(entra.token_requests) == 2

    with pytest.raises(UpstreamError):  # a new session with the fresh token, refused too
        await upstream.open()
    await upstream.token_refused()  # a different token: one more refresh is allowed
    await no_role_provider()
    assert len(entra.token_requests) == 3
    assert exchange.auth_failed == 2


async def test_token_refused_before_any_session_does_nothing(
    make_upstream: UpstreamFactory, entra: FakeEntra, provider: MsalTokenProvider
) -> None:
    upstream = make_upstream()
    await provider()

    await upstream.token_refused()
    await provider()

    assert len(entra.token_requests) == 1


async def test_token_error_propagates_from_open(
    make_upstream: UpstreamFactory, entra: FakeEntra, pki: TestPKI, exchange: FakeExchange
) -> None:
    bad = MsalTokenProvider(oauth(entra, pki, client_secret="not-the-secret"))

    with pytest.raises(TokenError) as caught:
        await make_upstream(tokens=bad).open()

    assert caught.value.aadsts == 7000215
    assert exchange.auth_ok == exchange.auth_failed == 0
    await wait_until(exchange, lambda: exchange.active_connections == 0)


# --------------------------------------------------------------------------- MAIL / RCPT / DATA


async def test_mail_refused_answers_every_recipient_and_session_goes_on(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    exchange.inject("mail", SEND_AS_DENIED_MAIL)
    entry = make_entry("bob@example.org", "carol@example.net")

    outcomes = await session.send(entry, BODY)

    expected = SmtpReply(
        550, "5.7.60", "SMTP; Client does not have permissions to send as this sender"
    )
    assert outcomes == {
        "bob@example.org": (Stage.MAIL, expected),
        "carol@example.net": (Stage.MAIL, expected),
    }
    assert session.usable
    assert exchange.replies["250 2.0.0"] >= 1  # "250 2.0.0 Resetting": the RSET went out
    again = await session.send(make_entry("bob@example.org"), BODY)
    assert_delivered(again["bob@example.org"])
    assert len(exchange.messages) == 1


async def test_421_at_mail_makes_the_session_unusable(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    reply = "421 4.4.2 Message submission rate for this client has exceeded the configured limit"
    exchange.inject("mail", reply, close=True)

    outcomes = await session.send(make_entry("bob@example.org"), BODY)

    stage, got = outcomes["bob@example.org"]
    assert (stage, got.code, got.enhanced) == (Stage.MAIL, 421, "4.4.2")
    assert not session.usable


async def test_one_recipient_refused_others_delivered(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    exchange.inject("rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", rcpt="ghost@example.org")
    entry = make_entry("bob@example.org", "ghost@example.org", "carol@example.net")

    outcomes = await session.send(entry, BODY)

    assert outcomes["ghost@example.org"] == (
        Stage.RCPT,
        SmtpReply(550, "5.1.10", "RESOLVER.ADR.RecipientNotFound"),
    )
    assert_delivered(outcomes["bob@example.org"])
    assert_delivered(outcomes["carol@example.net"])
    [message] = exchange.messages
    assert message.rcpt_tos == ("bob@example.org", "carol@example.net")
    assert message.data == BODY
    assert session.usable


async def test_all_recipients_refused_sends_no_data_and_session_goes_on(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    exchange.inject("rcpt", "452 4.5.3 Too many recipients", times=2)

    outcomes = await session.send(make_entry("bob@example.org", "carol@example.net"), BODY)

    assert {address: (stage, reply.code) for address, (stage, reply) in outcomes.items()} == {
        "bob@example.org": (Stage.RCPT, 452),
        "carol@example.net": (Stage.RCPT, 452),
    }
    assert exchange.replies["354"] == 0
    assert session.usable
    again = await session.send(make_entry("bob@example.org"), BODY)
    assert_delivered(again["bob@example.org"])


async def test_421_at_rcpt_makes_the_session_unusable(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    reply = "421 4.3.2 Service not available, closing transmission channel"
    exchange.inject("rcpt", reply, close=True, rcpt="carol@example.net")
    entry = make_entry("bob@example.org", "carol@example.net", "dave@example.org")

    outcomes = await session.send(entry, BODY)

    assert not session.usable
    assert set(outcomes) == {"bob@example.org", "carol@example.net", "dave@example.org"}
    for stage, got in outcomes.values():
        assert (stage, got.code, got.enhanced) == (Stage.RCPT, 421, "4.3.2")
    assert exchange.messages == []


@pytest.mark.parametrize(
    ("reply", "code", "enhanced"),
    [
        ("451 4.4.0 STOREDRV.Submission.Exception:StorageTransientException", 451, "4.4.0"),
        (
            "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException",
            554,
            "5.2.2",
        ),
    ],
    ids=["4xx", "5xx"],
)
async def test_refusal_at_end_of_data(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    sessions: list[ExchangeOnlineSession],
    reply: str,
    code: int,
    enhanced: str,
) -> None:
    session = await open_session(make_upstream(), sessions)
    exchange.inject("rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", rcpt="ghost@example.org")
    exchange.inject("eod", reply)
    entry = make_entry("bob@example.org", "ghost@example.org", "carol@example.net")

    outcomes = await session.send(entry, BODY)

    for address in ("bob@example.org", "carol@example.net"):
        stage, got = outcomes[address]
        assert (stage, got.code, got.enhanced) == (Stage.EOD, code, enhanced)
    assert outcomes["ghost@example.org"][0] is Stage.RCPT
    assert exchange.messages == []
    assert session.usable
    again = await session.send(make_entry("bob@example.org"), BODY)
    assert_delivered(again["bob@example.org"])


async def test_send_as_denied_after_the_body(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    body = BODY.replace(b"From: Scanner <scanner@contoso.com>", b"From: <noreply@contoso.com>")

    outcomes = await session.send(make_entry("bob@example.org", body=body), body)

    stage, reply = outcomes["bob@example.org"]
    assert (stage, reply.code, reply.enhanced) == (Stage.EOD, 554, "5.2.252")
    assert reply.text.startswith("SendAsDenied;")


async def test_refusal_of_the_data_command(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    exchange.inject("data", "451 4.7.0 Temporary server error. Please try again later. PRX4")

    outcomes = await session.send(make_entry("bob@example.org"), BODY)

    stage, reply = outcomes["bob@example.org"]
    assert stage in (Stage.DATA, Stage.EOD)
    assert (reply.code, reply.enhanced) == (451, "4.7.0")
    assert exchange.messages == []
    assert session.usable


async def test_refusal_of_the_data_command_is_stage_data(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    exchange.inject("data", "451 4.7.0 Temporary server error. Please try again later. PRX4")

    outcomes = await session.send(make_entry("bob@example.org"), BODY)

    assert outcomes["bob@example.org"][0] is Stage.DATA


async def test_no_answer_to_the_data_command_is_not_ambiguous(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    provider: MsalTokenProvider,
    sessions: list[ExchangeOnlineSession],
) -> None:
    await provider()
    session = await open_session(make_upstream(timeout=1), sessions)
    exchange.stall("data", 30)  # no 354: the body is never sent

    with pytest.raises(UpstreamError) as caught:
        await session.send(make_entry("bob@example.org"), BODY)

    assert caught.value.stage == "data"
    assert not classify_error(caught.value).ambiguous


# --------------------------------------------------------------------------- large bodies

# A body sent from its spool file, read in pieces that do not end where lines do in general
# (each piece is cut back to its last line end): dot-led lines land on piece starts too.
LARGE = BODY + b"".join(
    (b"." if n % 7 == 0 else b"") + b"line %d " % n + b"x" * (n % 90) + b"\r\n" for n in range(3000)
)


def stored(tmp_path: Path, body: bytes, piece: int = 97) -> StoredBody:
    path = tmp_path / "body.eml"
    path.write_bytes(body)
    return StoredBody(path, len(body), piece)


@pytest.mark.parametrize("ending", [b"\r\n", b""], ids=["crlf", "no-final-crlf"])
async def test_stored_body_is_sent_piece_by_piece_byte_exact(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    sessions: list[ExchangeOnlineSession],
    tmp_path: Path,
    ending: bytes,
) -> None:
    session = await open_session(make_upstream(), sessions)
    body = LARGE.removesuffix(b"\r\n") + ending

    outcomes = await session.send(make_entry("bob@example.org", body=body), stored(tmp_path, body))

    assert_delivered(outcomes["bob@example.org"])
    [message] = exchange.messages
    assert message.data == LARGE
    assert f"SIZE={len(body)}" in message.mail_options
    assert session.usable


async def test_stored_body_gets_the_sender_policy_on_its_header_only(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    sessions: list[ExchangeOnlineSession],
    tmp_path: Path,
) -> None:
    policy = SenderPolicy(MAILBOX, (), "rewrite")
    session = await open_session(make_upstream(policy=policy), sessions)

    outcomes = await session.send(make_entry("bob@example.org"), stored(tmp_path, LARGE))

    assert_delivered(outcomes["bob@example.org"])
    [message] = exchange.messages
    assert message.mail_from == MAILBOX
    head, _, rest = message.data.partition(b"\r\n\r\n")
    assert f"<{MAILBOX}>".encode() in head
    assert b"From: Scanner <scanner@contoso.com>" not in head
    assert rest == LARGE.partition(b"\r\n\r\n")[2]


async def test_stored_message_that_is_all_header_is_sent_whole(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    sessions: list[ExchangeOnlineSession],
    tmp_path: Path,
) -> None:
    """No empty line at all (a header-only message over 1 MiB): everything is header."""
    session = await open_session(make_upstream(), sessions)
    body = BODY.partition(b"\r\n\r\n")[0] + b"\r\n"
    body += b"".join(b"X-Field-%d: value\r\n" % n for n in range(60_000))

    outcomes = await session.send(make_entry("bob@example.org", body=body), stored(tmp_path, body))

    assert_delivered(outcomes["bob@example.org"])
    assert exchange.messages[0].data == body


async def test_disconnect_while_a_stored_body_is_sent_is_not_ambiguous(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    sessions: list[ExchangeOnlineSession],
    tmp_path: Path,
) -> None:
    """The final dot was never sent: the upstream cannot have the message."""
    session = await open_session(make_upstream(), sessions)
    exchange.drop_connection_mid_data()
    body = LARGE * 40  # far more than the fake reads before dropping

    with pytest.raises(UpstreamError) as caught:
        await session.send(make_entry("bob@example.org", body=body), stored(tmp_path, body, 65536))

    assert caught.value.stage == "data"
    assert not classify_error(caught.value).ambiguous
    assert not session.usable
    assert exchange.messages == []


async def test_maildir_copies_a_stored_body(tmp_path: Path) -> None:
    root = tmp_path / "md"
    session = await MaildirUpstream(root).open()

    await session.send(make_entry("bob@example.org"), stored(tmp_path, LARGE))

    [path] = list((root / "new").iterdir())
    assert path.read_bytes() == (
        b"Return-Path: <scanner@contoso.com>\r\nDelivered-To: bob@example.org\r\n" + LARGE
    )
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert list((root / "tmp").iterdir()) == []


# --------------------------------------------------------------------------- lost and stalled


async def test_disconnect_mid_data_is_an_ambiguous_eod_error(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    exchange.drop_connection_mid_data()
    body = BODY + (b"y" * 998 + b"\r\n") * 64  # far more than the fake reads before dropping

    with pytest.raises(UpstreamError) as caught:
        await session.send(make_entry("bob@example.org", body=body), body)

    assert caught.value.stage == "eod"
    assert not session.usable
    decision = classify_error(caught.value)
    assert decision.verdict is Verdict.DEFER
    assert decision.ambiguous
    assert not decision.session_ok
    assert exchange.messages == []


async def test_connection_lost_after_the_dot_is_ambiguous(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)
    exchange.drop_after_eod(delivered=True)

    with pytest.raises(UpstreamError) as caught:
        await session.send(make_entry("bob@example.org"), BODY)

    assert caught.value.stage == "eod"
    assert classify_error(caught.value).ambiguous
    assert len(exchange.messages) == 1  # it was delivered: a resend would duplicate it


async def test_stall_past_the_timeout_at_end_of_data_fails_quickly(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    provider: MsalTokenProvider,
    sessions: list[ExchangeOnlineSession],
) -> None:
    await provider()  # the token is cached: the 1 s budget is all SMTP
    session = await open_session(make_upstream(timeout=1), sessions)
    exchange.stall("eod", 30)

    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        await session.send(make_entry("bob@example.org"), BODY)

    assert time.monotonic() - started < 5
    assert caught.value.stage == "eod"
    assert not session.usable
    decision = classify_error(caught.value)
    assert decision.verdict is Verdict.DEFER
    assert decision.ambiguous
    assert not decision.session_ok


@pytest.mark.parametrize("stage", ["mail", "eod"])
async def test_stall_past_the_timeout_is_upstream_timeout(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    provider: MsalTokenProvider,
    sessions: list[ExchangeOnlineSession],
    stage: Any,
) -> None:
    await provider()
    session = await open_session(make_upstream(timeout=1), sessions)
    exchange.stall(stage, 30)

    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await session.send(make_entry("bob@example.org"), BODY)

    assert time.monotonic() - started < 5
    assert caught.value.stage == stage
    assert classify_error(caught.value).reply.text == "upstream timed out"


async def test_stall_at_the_banner_is_a_connect_timeout(
    make_upstream: UpstreamFactory, exchange: FakeExchange
) -> None:
    exchange.stall("connect", 30)

    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await make_upstream(timeout=1).open()

    assert time.monotonic() - started < 5
    assert caught.value.stage == "connect"


async def test_nothing_listening_is_a_connect_error(
    pki: TestPKI, provider: MsalTokenProvider
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    upstream = ExchangeOnlineUpstream(
        host="127.0.0.1",
        port=port,
        mailbox=MAILBOX,
        tokens=provider,
        invalidate=provider.invalidate,
        tls_context=client_tls_context(pki.ca_file),
        timeout=2,
        local_hostname="relay.test",
    )

    with pytest.raises(UpstreamError) as caught:
        await upstream.open()

    assert caught.value.stage == "connect"
    assert classify_error(caught.value).verdict is Verdict.DEFER


# --------------------------------------------------------------------------- SMTPUTF8 / 8BITMIME


async def test_smtputf8_and_8bitmime_options(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    sender = "jörg@contoso.com"
    exchange.add_mailbox(MAILBOX, send_as=[SENDER, sender])
    body = (
        "From: Jörg <jörg@contoso.com>\r\n"
        "To: josé@example.org\r\n"
        "Subject: Grüße\r\n"
        "\r\n"
        "Ça marche, 日本語も.\r\n"
    ).encode()
    entry = make_entry(
        "josé@example.org",
        "bob@example.org",
        sender=sender,
        body=body,
        smtputf8=True,
        eightbit=True,
    )
    session = await open_session(make_upstream(), sessions)

    outcomes = await session.send(entry, body)

    assert_delivered(outcomes["josé@example.org"])
    assert_delivered(outcomes["bob@example.org"])
    [message] = exchange.messages
    assert message.mail_from == sender
    assert message.rcpt_tos == ("josé@example.org", "bob@example.org")
    assert message.data == body
    options = [option.upper() for option in message.mail_options]
    assert "SMTPUTF8" in options
    assert "BODY=8BITMIME" in options
    assert f"SIZE={len(body)}" in options
    assert options.count("SMTPUTF8") == 1


async def test_8bit_body_with_ascii_envelope(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    body = BODY + "Grüße\r\n".encode()
    session = await open_session(make_upstream(), sessions)

    outcomes = await session.send(make_entry("bob@example.org", body=body, eightbit=True), body)

    assert_delivered(outcomes["bob@example.org"])
    options = [option.upper() for option in exchange.messages[0].mail_options]
    assert "BODY=8BITMIME" in options
    assert "SMTPUTF8" not in options
    assert f"SIZE={len(body)}" in options


async def test_plain_ascii_message_has_only_size(
    make_upstream: UpstreamFactory, exchange: FakeExchange, sessions: list[ExchangeOnlineSession]
) -> None:
    session = await open_session(make_upstream(), sessions)

    await session.send(make_entry("bob@example.org"), BODY)

    assert [o.upper() for o in exchange.messages[0].mail_options] == [f"SIZE={len(BODY)}"]


async def test_smtputf8_entry_refused_when_upstream_lacks_smtputf8(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    sessions: list[ExchangeOnlineSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ehlo_lines = fake_exchange._ExchangeSession._ehlo_lines

    def without_smtputf8(self: Any) -> list[str]:
        return [line for line in ehlo_lines(self) if line != "SMTPUTF8"]

    monkeypatch.setattr(fake_exchange._ExchangeSession, "_ehlo_lines", without_smtputf8)
    session = await open_session(make_upstream(), sessions)
    entry = make_entry("josé@example.org", sender=SENDER, smtputf8=True)

    outcomes = await session.send(entry, BODY)

    assert outcomes == {"josé@example.org": (Stage.MAIL, NO_SMTPUTF8)}
    assert exchange.messages == []
    assert exchange.replies["250 2.1.0"] == 0  # no MAIL FROM went out
    assert session.usable
    ascii_entry = make_entry("bob@example.org")
    assert_delivered((await session.send(ascii_entry, BODY))["bob@example.org"])


# --------------------------------------------------------------------------- Maildir sandbox


async def test_maildir_writes_one_private_file(tmp_path: Path) -> None:
    root = tmp_path / "md"
    upstream = MaildirUpstream(root)
    session = await upstream.open()
    entry = make_entry("bob@example.org", "carol@example.net")

    outcomes = await session.send(entry, BODY)
    await session.close()

    assert set(outcomes) == {"bob@example.org", "carol@example.net"}
    for stage, reply in outcomes.values():
        assert stage is Stage.EOD
        assert reply.code == 250
    [path] = list((root / "new").iterdir())
    assert path.read_bytes() == (
        b"Return-Path: <scanner@contoso.com>\r\n"
        b"Delivered-To: bob@example.org\r\n"
        b"Delivered-To: carol@example.net\r\n" + BODY
    )
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert list((root / "tmp").iterdir()) == []
    assert list((root / "cur").iterdir()) == []
    assert entry.queue_id in path.name


async def test_maildir_keeps_every_message(tmp_path: Path) -> None:
    upstream = MaildirUpstream(tmp_path / "md")
    session = await upstream.open()

    await session.send(make_entry("bob@example.org", queue_id="Q1"), BODY)
    await session.send(make_entry("bob@example.org", queue_id="Q2"), BODY)
    await upstream.token_refused()  # a no-op for the sandbox

    assert len(list((tmp_path / "md" / "new").iterdir())) == 2


async def test_maildir_that_cannot_be_created_fails_at_connect(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(UpstreamError) as caught:
        await MaildirUpstream(blocker / "md").open()

    assert caught.value.stage == "connect"


async def test_a_token_source_that_never_answers_fails_the_session_in_time(
    pki: TestPKI, exchange: FakeExchange
) -> None:
    never = asyncio.Event()

    async def stuck_tokens() -> str:
        await never.wait()
        return "unreachable"

    async def no_invalidate() -> None:
        return None

    upstream = ExchangeOnlineUpstream(
        host="127.0.0.1",
        port=exchange.port,
        mailbox=MAILBOX,
        tokens=stuck_tokens,
        invalidate=no_invalidate,
        tls_context=client_tls_context(pki.ca_file),
        timeout=5,
        local_hostname="relay.test",
        token_timeout=0.3,
    )
    with pytest.raises(TokenError) as refused:
        await asyncio.wait_for(upstream.open(), 10)
    assert refused.value.error == "token_timeout"


async def test_a_positive_reply_to_rcpt_is_never_taken_for_a_delivery(
    make_upstream: UpstreamFactory,
    exchange: FakeExchange,
    sessions: list[ExchangeOnlineSession],
) -> None:
    """aiosmtplib raises on RCPT 252; that recipient was not accepted for delivery."""
    session = await open_session(make_upstream(), sessions)
    exchange.inject("rcpt", "252 2.1.5 Cannot VRFY user, but will accept", rcpt="odd@example.org")
    outcomes = await session.send(make_entry("bob@example.org", "odd@example.org"), BODY)
    stage, reply = outcomes["odd@example.org"]
    assert (stage, reply.code, reply.enhanced) == (Stage.RCPT, 451, "4.4.0")
    assert_delivered(outcomes["bob@example.org"])


def test_final_reply_timeout_grows_with_the_size_up_to_ten_minutes() -> None:
    assert final_reply_timeout(60, 1000) == pytest.approx(60.01)
    assert final_reply_timeout(60, 35_000_000) == 410
    assert final_reply_timeout(60, 150 * 2**20) == 600
    assert final_reply_timeout(900, 10) == 900
