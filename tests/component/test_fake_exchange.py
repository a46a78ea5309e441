"""Component tests of the Exchange Online fake (tests/fakes/exchange.py).

Drives the fake with aiosmtplib 5.1.3 (the relay's client) and, where raw
control of the wire is needed, with smtplib. Tokens come from a small local
RS256 signer; the real Entra fake plugs in through ``validate_token``.
"""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiosmtplib
import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.exchange import (
    AUTH_SUCCESSFUL,
    BARE_LINEFEEDS,
    BASIC_AUTH_DISABLED,
    CONCURRENCY_LIMITED,
    IDLE_TIMEOUT,
    NOT_AUTHENTICATED,
    RATE_LIMITED,
    SIZE_EXCEEDED,
    SMTP_AUTH_DISABLED_MAILBOX,
    SMTP_AUTH_DISABLED_TENANT,
    TOO_MANY_RECIPIENTS,
    UNRECOGNIZED_AUTH_TYPE,
    FakeExchange,
    Stage,
    message_accepted,
    send_as_denied,
)

TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"
APP_ID = "6731de76-14a6-49ae-97bc-6eba6914391e"
MAILBOX = "relay@contoso.com"
ALIAS = "noreply@contoso.com"
AUDIENCE = "https://outlook.office365.com"
HOST = "SY5P282CA0097.outlook.office365.com"
DIAG = rf"\[{re.escape(HOST)} \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z [0-9A-F]{{16}}\]"
AUTH_UNSUCCESSFUL_RE = re.compile(rf"535 5\.7\.3 Authentication unsuccessful {DIAG}")
WAIT = 5.0


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenSigner:
    """Issues and checks v1 app-only tokens like Entra's for outlook.office365.com."""

    key: rsa.RSAPrivateKey

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": AUDIENCE,
            "iss": f"https://sts.windows.net/{TENANT}/",
            "tid": TENANT,
            "appid": APP_ID,
            "appidacr": "2",
            "oid": "f2e9b4a0-0000-4000-8000-000000000001",
            "sub": "f2e9b4a0-0000-4000-8000-000000000001",
            "idtyp": "app",
            "roles": ["SMTP.SendAsApp"],
            "ver": "1.0",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "uti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        claims = {name: value for name, value in claims.items() if value is not None}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "test-key"})

    def validate(self, token: str) -> Mapping[str, Any]:
        return jwt.decode(
            token,
            self.key.public_key(),
            algorithms=["RS256"],
            audience=[AUDIENCE, "https://outlook.office.com"],
            issuer=f"https://sts.windows.net/{TENANT}/",
            leeway=300,
            options={"require": ["exp", "nbf", "iat"]},
        )


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def signer() -> TokenSigner:
    return TokenSigner(_rsa_key())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "localhost", "smtp.office365.com")


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def fake(server_cert: trustme.LeafCert, signer: TokenSigner) -> Iterator[FakeExchange]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_ctx)
    exchange = FakeExchange(tls_context=server_ctx, validate_token=signer.validate)
    exchange.add_mailbox(MAILBOX, send_as=[ALIAS])
    with exchange:
        yield exchange
    assert exchange.internal_errors == []


# --------------------------------------------------------------------------- helpers

MESSAGE = (
    b"From: Relay <relay@contoso.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@relay.test>\r\n"
    b"\r\n"
    b"first line\r\n"
    b".starts with a dot\r\n"
    b"last line\r\n"
)


def message_from(sender: str, body: bytes = b"hi\r\n") -> bytes:
    return f"From: {sender}\r\nTo: bob@example.org\r\nSubject: t\r\n\r\n".encode() + body


def client(fake: FakeExchange, ctx: ssl.SSLContext, **options: Any) -> aiosmtplib.SMTP:
    options.setdefault("timeout", WAIT)
    options.setdefault("start_tls", True)
    return aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=fake.port,
        tls_context=ctx,
        local_hostname="relay.test",
        **options,
    )


async def connected(fake: FakeExchange, ctx: ssl.SSLContext, token: str) -> aiosmtplib.SMTP:
    smtp = client(fake, ctx)
    await smtp.connect()
    await smtp.auth_xoauth2(MAILBOX, token)
    return smtp


def sync_client(fake: FakeExchange, ctx: ssl.SSLContext | None = None) -> smtplib.SMTP:
    """smtplib session after EHLO (and STARTTLS + EHLO when ``ctx`` is given)."""
    smtp = smtplib.SMTP("127.0.0.1", fake.port, local_hostname="relay.test", timeout=WAIT)
    smtp.ehlo()
    if ctx is not None:
        smtp.starttls(context=ctx)
        smtp.ehlo()
    return smtp


def xoauth2_blob(user: str, token: str) -> str:
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def authenticated_sync_client(fake: FakeExchange, ctx: ssl.SSLContext, token: str) -> smtplib.SMTP:
    smtp = sync_client(fake, ctx)
    smtp.auth("XOAUTH2", lambda challenge=None: xoauth2_blob(MAILBOX, token))
    return smtp


def text(code: int, message: bytes | str) -> str:
    return f"{code} {message.decode() if isinstance(message, bytes) else message}"


# --------------------------------------------------------------------------- the good path


async def test_good_submission_is_recorded_exactly(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    async with client(fake, client_ctx) as smtp:
        assert (await smtp.auth_xoauth2(MAILBOX, signer.token())).code == 235
        errors, reply = await smtp.sendmail(
            MAILBOX,
            ["bob@example.org", "carol@example.org"],
            MESSAGE,
            rcpt_options=["NOTIFY=NEVER"],
        )
    assert errors == {}
    assert fake.replies["250 2.1.5"] == 2  # "250 2.1.5 Recipient OK"
    assert f"250 {reply}" == message_accepted("<m1@relay.test>")
    [received] = await fake.wait_for_messages_async(1, WAIT)
    assert received.data == MESSAGE  # aiosmtplib dot-stuffed ".starts", the fake unstuffed it
    assert received.mail_from == MAILBOX
    assert received.rcpt_tos == ("bob@example.org", "carol@example.org")
    assert received.rcpt_options == (("NOTIFY=NEVER",), ("NOTIFY=NEVER",))
    assert received.mail_options == (f"size={len(MESSAGE)}",)
    assert received.auth_user == MAILBOX
    assert received.tls_version in {"TLSv1.2", "TLSv1.3"}
    assert received.message_id_reply == "<m1@relay.test>"
    assert fake.auth_ok == 1 and fake.connections == 1
    assert fake.replies["221 2.0.0"] == 1


async def test_reply_makes_a_message_id_when_the_message_has_none(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    async with client(
        fake, client_ctx, oauth_token_generator=_constant(signer.token()), username=MAILBOX
    ) as smtp:
        _, reply = await smtp.sendmail(MAILBOX, ["bob@example.org"], message_from(MAILBOX))
    [received] = fake.messages
    assert re.fullmatch(
        r"<[0-9A-F]{32}@SYBP282MB2635\.AUSP282\.PROD\.OUTLOOK\.COM>", received.message_id_reply
    )
    assert f"250 {reply}" == message_accepted(received.message_id_reply)


def _constant(token: str) -> Callable[[], Any]:
    async def generate() -> str:
        return token

    return generate


async def test_banner_and_ehlo_lists_match_exchange(
    fake: FakeExchange, client_ctx: ssl.SSLContext
) -> None:
    smtp = client(fake, client_ctx, start_tls=False)
    banner = await smtp.connect()
    try:
        assert banner.code == 220
        assert re.fullmatch(
            rf"{re.escape(HOST)} Microsoft ESMTP MAIL Service ready at "
            r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000 \[[0-9A-F]{16}\]",
            banner.message,
        )
        common = ["SIZE 157286400", "PIPELINING", "DSN", "ENHANCEDSTATUSCODES"]
        tail = ["8BITMIME", "SMTPUTF8"]
        hello = f"{HOST} Hello [127.0.0.1]"
        assert (await smtp.ehlo()).message.split("\n") == [hello, *common, "STARTTLS", *tail]
        starttls = await smtp.starttls()
        assert text(starttls.code, starttls.message) == "220 2.0.0 SMTP server ready"
        after_tls = [hello, *common, "AUTH LOGIN XOAUTH2", *tail]
        assert (await smtp.ehlo()).message.split("\n") == after_tls
        assert text(*await smtp.noop()) == "250 2.0.0 OK"
        assert text(*await smtp.rset()) == "250 2.0.0 Resetting"
        assert text(*await smtp.quit()) == "221 2.0.0 Service closing transmission channel"
    finally:
        smtp.close()


def test_two_step_xoauth2_works(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    smtp = sync_client(fake, client_ctx)
    challenges: list[bytes | None] = []

    def respond(challenge: bytes | None = None) -> str:
        challenges.append(challenge)
        return xoauth2_blob(MAILBOX, signer.token())

    try:
        assert text(*smtp.auth("XOAUTH2", respond, initial_response_ok=False)) == AUTH_SUCCESSFUL
    finally:
        smtp.close()
    assert challenges == [b""]  # one empty "334 " challenge


def test_long_token_passes_the_command_limit(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    token = signer.token(padding="x" * 3000)  # a ~4 kB AUTH line
    smtp = authenticated_sync_client(fake, client_ctx, token)
    smtp.close()
    assert fake.auth_ok == 1


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    ("case", "setup"),
    [
        ("expired", lambda f, s: s.token(exp=int(time.time()) - 3600, nbf=None, iat=None)),
        ("graph audience", lambda f, s: s.token(aud="https://graph.microsoft.com")),
        ("wrong issuer", lambda f, s: s.token(iss="https://sts.windows.net/other/")),
        ("foreign key", lambda f, s: TokenSigner(_rsa_key()).token()),
        ("no role", lambda f, s: s.token(roles=None)),
        ("not a jwt", lambda f, s: "not-a-token"),
    ],
)
async def test_token_failures_give_535_5_7_3(
    fake: FakeExchange,
    client_ctx: ssl.SSLContext,
    signer: TokenSigner,
    case: str,
    setup: Callable[[FakeExchange, TokenSigner], str],
) -> None:
    async with client(fake, client_ctx) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await smtp.auth_xoauth2(MAILBOX, setup(fake, signer))
    assert AUTH_UNSUCCESSFUL_RE.fullmatch(f"{failure.value.code} {failure.value.message}"), case
    assert fake.auth_failed == 1 and fake.replies["535 5.7.3"] == 1


async def test_unknown_mailbox_gives_535_5_7_3(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    async with client(fake, client_ctx) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await smtp.auth_xoauth2("nobody@contoso.com", signer.token())
        # a failed AUTH does not close the session: a retry can succeed
        assert (await smtp.auth_xoauth2(MAILBOX.upper(), signer.token())).code == 235
    assert AUTH_UNSUCCESSFUL_RE.fullmatch(f"{failure.value.code} {failure.value.message}")


def test_malformed_blob_and_bad_base64(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    smtp = sync_client(fake, client_ctx)
    try:
        blob = base64.b64encode(f"user={MAILBOX}\x01auth={signer.token()}".encode()).decode()
        assert AUTH_UNSUCCESSFUL_RE.fullmatch(text(*smtp.docmd("AUTH", f"XOAUTH2 {blob}")))
        reply = text(*smtp.docmd("AUTH", "XOAUTH2 %%%"))
        assert reply == "501 5.5.2 Cannot Base64-decode Client responses"
    finally:
        smtp.close()


async def test_app_rbac_needs_no_role(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.require_role = False
    async with client(fake, client_ctx) as smtp:
        assert (await smtp.auth_xoauth2(MAILBOX, signer.token(roles=None))).code == 235


async def test_app_without_mailbox_permission_gets_535_5_7_3(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.add_mailbox("shared@contoso.com", apps=["some-other-app"])
    async with client(fake, client_ctx) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await smtp.auth_xoauth2("shared@contoso.com", signer.token())
    assert failure.value.code == 535 and failure.value.message.startswith("5.7.3 ")


@pytest.mark.parametrize("where", ["tenant", "mailbox"])
async def test_smtp_auth_disabled_gives_535_5_7_139(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner, where: str
) -> None:
    if where == "tenant":
        fake.tenant_smtp_auth_enabled = False
        expected = SMTP_AUTH_DISABLED_TENANT
    else:
        fake.add_mailbox(MAILBOX, smtp_auth_enabled=False)
        expected = SMTP_AUTH_DISABLED_MAILBOX
    async with client(fake, client_ctx) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await smtp.auth_xoauth2(MAILBOX, signer.token())
    assert f"{failure.value.code} {failure.value.message}" == expected


async def test_basic_auth_login_is_refused(fake: FakeExchange, client_ctx: ssl.SSLContext) -> None:
    async with client(fake, client_ctx) as smtp:
        await smtp.ehlo()  # aiosmtplib's auth_login does not re-EHLO after STARTTLS
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await smtp.auth_login(MAILBOX, "password")
    assert f"{failure.value.code} {failure.value.message}" == BASIC_AUTH_DISABLED


async def test_gmail_style_error_challenge_option(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.xoauth2_error_challenge = True
    async with client(fake, client_ctx) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await smtp.auth_xoauth2(MAILBOX, signer.token(roles=None))
    assert failure.value.code == 535
    assert fake.replies["334"] == 1


def test_auth_failure_can_close_the_session(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.close_after_auth_failure = True
    smtp = sync_client(fake, client_ctx)
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("XOAUTH2", lambda challenge=None: xoauth2_blob(MAILBOX, "bad"))
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.noop()
    finally:
        smtp.close()


def test_auth_before_starttls_gives_504(fake: FakeExchange, signer: TokenSigner) -> None:
    smtp = sync_client(fake)
    try:
        blob = base64.b64encode(xoauth2_blob(MAILBOX, signer.token()).encode()).decode()
        assert text(*smtp.docmd("AUTH", f"XOAUTH2 {blob}")) == UNRECOGNIZED_AUTH_TYPE
    finally:
        smtp.close()


@pytest.mark.parametrize("tls", [False, True])
def test_mail_before_auth_gives_530(
    fake: FakeExchange, client_ctx: ssl.SSLContext, tls: bool
) -> None:
    smtp = sync_client(fake, client_ctx if tls else None)
    try:
        assert text(*smtp.mail(MAILBOX)) == NOT_AUTHENTICATED
    finally:
        smtp.close()


def test_unknown_command_gives_500_5_3_3(fake: FakeExchange) -> None:
    smtp = sync_client(fake)
    try:
        assert re.fullmatch(
            rf"500 5\.3\.3 Unrecognized command 'XYZZY' {DIAG}", text(*smtp.docmd("XYZZY"))
        )
    finally:
        smtp.close()


# --------------------------------------------------------------------------- Send As and content


async def test_send_as_alias_is_allowed(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    async with client(fake, client_ctx) as smtp:
        await smtp.auth_xoauth2(MAILBOX, signer.token())
        await smtp.sendmail(ALIAS.upper(), ["bob@example.org"], message_from(f"No Reply <{ALIAS}>"))
    assert len(fake.messages) == 1


@pytest.mark.parametrize(
    ("envelope", "header", "denied"),
    [
        ("ceo@contoso.com", MAILBOX, "ceo@contoso.com"),
        (MAILBOX, '"CEO" <ceo@contoso.com>', "ceo@contoso.com"),
        (MAILBOX, f"{MAILBOX}, ceo@contoso.com", "ceo@contoso.com"),
    ],
)
async def test_send_as_denied_after_the_body(
    fake: FakeExchange,
    client_ctx: ssl.SSLContext,
    signer: TokenSigner,
    envelope: str,
    header: str,
    denied: str,
) -> None:
    async with client(fake, client_ctx) as smtp:
        await smtp.auth_xoauth2(MAILBOX, signer.token())
        with pytest.raises(aiosmtplib.SMTPDataError) as failure:
            await smtp.sendmail(envelope, ["bob@example.org"], message_from(header))
    assert f"{failure.value.code} {failure.value.message}" == send_as_denied(MAILBOX, denied)
    assert fake.messages == []
    assert fake.replies["250 2.1.0"] == 1  # MAIL FROM itself was accepted


async def test_header_from_check_can_be_switched_off(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.check_header_from = False
    async with client(fake, client_ctx) as smtp:
        await smtp.auth_xoauth2(MAILBOX, signer.token())
        await smtp.sendmail(MAILBOX, ["bob@example.org"], message_from("ceo@contoso.com"))
    assert len(fake.messages) == 1


async def test_smtputf8_address_and_8bit_body_pass_intact(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    body = "Grüße aus Zürich — ça va? 日本語\r\n".encode()
    message = "From: relay@contoso.com\r\nTo: josé@exämple.org\r\nSubject: Grüße\r\n\r\n".encode()
    async with client(fake, client_ctx) as smtp:
        await smtp.auth_xoauth2(MAILBOX, signer.token())
        await smtp.sendmail(
            MAILBOX,
            ["josé@exämple.org"],
            message + body,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    [received] = fake.messages
    assert received.rcpt_tos == ("josé@exämple.org",)
    assert received.data == message + body
    assert "SMTPUTF8" in received.mail_options


def test_non_ascii_address_without_smtputf8_is_refused(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    smtp = authenticated_sync_client(fake, client_ctx, signer.token())
    try:
        assert text(*smtp.mail(MAILBOX)) == "250 2.1.0 Sender OK"
        smtp.send("RCPT TO:<josé@exämple.org>\r\n".encode())
        assert text(*smtp.getreply()) == "501 5.1.3 Invalid address"
    finally:
        smtp.close()


@pytest.mark.parametrize("lines", [1, 20_000])
def test_bare_linefeeds_are_refused(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner, lines: int
) -> None:
    smtp = authenticated_sync_client(fake, client_ctx, signer.token())
    try:
        smtp.mail(MAILBOX)
        smtp.rcpt("bob@example.org")
        assert text(*smtp.docmd("DATA")) == "354 Start mail input; end with <CRLF>.<CRLF>"
        smtp.send(b"Subject: lf\r\n\r\n" + b"bare line feed\n" * lines + b"\r\n.\r\n")
        assert text(*smtp.getreply()) == BARE_LINEFEEDS
    finally:
        smtp.close()
    assert fake.messages == []


# --------------------------------------------------------------------------- fault injection

FAULT_REPLY = "451 4.7.0 Temporary server error. Please try again later. PRX4"


def submit_stepwise(fake: FakeExchange, ctx: ssl.SSLContext, token: str) -> tuple[str, str] | None:
    """One submission, command by command: the first unexpected (stage, reply), or None."""
    try:
        smtp = smtplib.SMTP("127.0.0.1", fake.port, local_hostname="relay.test", timeout=WAIT)
    except smtplib.SMTPConnectError as refused:
        return "connect", text(refused.smtp_code, refused.smtp_error)
    blob = base64.b64encode(xoauth2_blob(MAILBOX, token).encode()).decode()
    steps: list[tuple[str, int, Callable[[], tuple[int, bytes]]]] = [
        ("ehlo", 250, smtp.ehlo),
        ("starttls", 220, lambda: smtp.starttls(context=ctx)),
        ("ehlo", 250, smtp.ehlo),
        ("auth", 235, lambda: smtp.docmd("AUTH", f"XOAUTH2 {blob}")),
        ("mail", 250, lambda: smtp.mail(MAILBOX)),
        ("rcpt", 250, lambda: smtp.rcpt("bob@example.org")),
        ("data", 354, lambda: smtp.docmd("DATA")),
        ("eod", 250, lambda: send_raw_body(smtp, MESSAGE.replace(b"\r\n.", b"\r\n.."))),
    ]
    try:
        for stage, expected, step in steps:
            code, reply = step()
            if code != expected:
                return stage, text(code, reply)
        return None
    finally:
        smtp.close()


def send_raw_body(smtp: smtplib.SMTP, stuffed: bytes) -> tuple[int, bytes]:
    smtp.send(stuffed + b".\r\n")
    return smtp.getreply()


@pytest.mark.parametrize("stage", ["connect", "ehlo", "auth", "mail", "rcpt", "data", "eod"])
def test_injected_reply_is_used_once_per_time(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner, stage: Stage
) -> None:
    fake.inject(stage, FAULT_REPLY, times=2)
    for _ in range(2):
        assert submit_stepwise(fake, client_ctx, signer.token()) == (stage, FAULT_REPLY)
    assert submit_stepwise(fake, client_ctx, signer.token()) is None  # both consumed
    assert len(fake.messages) == 1
    assert fake.replies["451 4.7.0"] == 2


async def test_injected_reply_reaches_aiosmtplib(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.inject("eod", FAULT_REPLY)
    async with client(fake, client_ctx) as smtp:
        await smtp.auth_xoauth2(MAILBOX, signer.token())
        with pytest.raises(aiosmtplib.SMTPDataError) as failure:
            await smtp.sendmail(MAILBOX, ["bob@example.org"], MESSAGE)
        assert f"{failure.value.code} {failure.value.message}" == FAULT_REPLY
        await smtp.sendmail(MAILBOX, ["bob@example.org"], MESSAGE)  # same connection, consumed
    assert len(fake.messages) == 1


def test_injected_banner_with_close(fake: FakeExchange) -> None:
    fake.inject(
        "connect",
        "421 4.3.2 Service not available, closing transmission channel",
        close=True,
        times=2,
    )
    for _ in range(2):
        with pytest.raises(smtplib.SMTPConnectError) as failure:
            smtplib.SMTP("127.0.0.1", fake.port, local_hostname="relay.test", timeout=WAIT)
        assert failure.value.smtp_code == 421
    sync_client(fake).close()
    assert fake.replies["421 4.3.2"] == 2 and fake.replies["220"] == 1


async def test_rcpt_fault_for_one_recipient(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.inject("rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", rcpt="Carol@Example.org")
    async with client(fake, client_ctx) as smtp:
        await smtp.auth_xoauth2(MAILBOX, signer.token())
        errors, _ = await smtp.sendmail(
            MAILBOX, ["bob@example.org", "carol@example.org"], message_from(MAILBOX)
        )
    assert errors["carol@example.org"].code == 550
    assert fake.messages[0].rcpt_tos == ("bob@example.org",)


async def test_injected_reply_with_close_disconnects(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.inject("mail", "421 4.3.2 Service not available, closing transmission channel", close=True)
    smtp = await connected(fake, client_ctx, signer.token())
    with pytest.raises(aiosmtplib.SMTPSenderRefused):
        await smtp.mail(MAILBOX)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await smtp.noop()
    smtp.close()


async def test_drop_mid_data_loses_the_message(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.drop_connection_mid_data()
    smtp = await connected(fake, client_ctx, signer.token())
    try:
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.sendmail(MAILBOX, ["bob@example.org"], message_from(MAILBOX, b"x" * 200_000))
    finally:
        smtp.close()
    fake.wait_for(lambda: fake.active_connections == 0, WAIT)
    assert fake.messages == [] and fake.count_events("dropped") == 1


@pytest.mark.parametrize("delivered", [True, False])
async def test_drop_after_eod_leaves_the_outcome_unknown(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner, delivered: bool
) -> None:
    fake.drop_after_eod(delivered=delivered)
    smtp = await connected(fake, client_ctx, signer.token())
    try:
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.sendmail(MAILBOX, ["bob@example.org"], MESSAGE)
    finally:
        smtp.close()
    fake.wait_for(lambda: fake.active_connections == 0, WAIT)
    assert len(fake.messages) == (1 if delivered else 0)
    assert fake.replies["250 2.0.0"] == 0


async def test_stall_times_the_client_out_and_stop_is_prompt(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.stall("eod", 60)
    smtp = await connected(fake, client_ctx, signer.token())
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await smtp.sendmail(MAILBOX, ["bob@example.org"], MESSAGE, timeout=0.3)
    smtp.close()
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 2.0


def test_idle_timeout_says_421_4_4_1(fake: FakeExchange) -> None:
    fake.idle_timeout = 0.2
    smtp = sync_client(fake)
    try:
        assert text(*smtp.getreply()) == IDLE_TIMEOUT
    finally:
        smtp.close()
    assert fake.count_events("idle_timeout") == 1


# --------------------------------------------------------------------------- TLS


def _tls11_client_context() -> ssl.SSLContext | None:
    """A client context limited to TLS 1.1, or None if this OpenSSL cannot make one."""
    if not ssl.HAS_TLSv1_1:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # that is the point here
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        return None
    return ctx


def _speaks_tls11(client: ssl.SSLContext, cert: trustme.LeafCert) -> bool:
    """Can this OpenSSL complete a TLS 1.1 handshake at all (in memory)?"""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1_1
    cert.configure_cert(server)
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    side_c = client.wrap_bio(pipes[0], pipes[1])
    side_s = server.wrap_bio(pipes[1], pipes[0], server_side=True)
    for _ in range(10):
        done = 0
        for side in (side_c, side_s):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                return False
        if done == 2:
            return side_c.version() == "TLSv1.1"
    return False


def test_tls_1_1_client_is_refused(fake: FakeExchange, server_cert: trustme.LeafCert) -> None:
    ctx = _tls11_client_context()
    if ctx is None or not _speaks_tls11(ctx, server_cert):
        pytest.skip("the local OpenSSL cannot negotiate TLS 1.1 even with itself")
    smtp = sync_client(fake)
    try:
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            smtp.starttls(context=ctx)
    finally:
        smtp.close()
    fake.wait_for(lambda: fake.count_events("tls_failed") == 1, WAIT)


def test_tls_version_is_recorded(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    smtp = authenticated_sync_client(fake, client_ctx, signer.token())
    try:
        smtp.sendmail(MAILBOX, ["bob@example.org"], MESSAGE)
    finally:
        smtp.close()
    assert fake.messages[0].tls_version == "TLSv1.2"


# --------------------------------------------------------------------------- limits


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_rate_limit_with_injected_clock(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    clock = ManualClock()
    fake.clock = clock
    fake.messages_per_minute = 2
    smtp = await connected(fake, client_ctx, signer.token())
    try:
        for _ in range(2):
            await smtp.sendmail(MAILBOX, ["bob@example.org"], MESSAGE)
        clock.now += 59.0
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as failure:
            await smtp.sendmail(MAILBOX, ["bob@example.org"], MESSAGE)
        assert f"{failure.value.code} {failure.value.message}" == RATE_LIMITED
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.noop()
    finally:
        smtp.close()
    clock.now += 1.5  # the first two submissions leave the 60 s window
    async with client(fake, client_ctx) as smtp:
        await smtp.auth_xoauth2(MAILBOX, signer.token())
        await smtp.sendmail(MAILBOX, ["bob@example.org"], MESSAGE)
    assert len(fake.messages) == 3 and fake.throttled == 1


async def test_concurrency_limit_at_mail_from(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.max_concurrent_per_mailbox = 1
    first = await connected(fake, client_ctx, signer.token())
    second = await connected(fake, client_ctx, signer.token())
    try:
        await first.mail(MAILBOX)
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as failure:
            await second.mail(MAILBOX)
        assert f"{failure.value.code} {failure.value.message}" == CONCURRENCY_LIMITED
        await first.rcpt("bob@example.org")
        await first.data(MESSAGE)
        await second.sendmail(MAILBOX, ["bob@example.org"], MESSAGE)
    finally:
        first.close()
        second.close()
    assert len(fake.messages) == 2 and fake.throttled == 1


def test_recipient_limit(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.max_recipients_per_message = 2
    smtp = authenticated_sync_client(fake, client_ctx, signer.token())
    try:
        smtp.mail(MAILBOX)
        assert [smtp.rcpt(f"r{i}@example.org")[0] for i in range(2)] == [250, 250]
        assert text(*smtp.rcpt("r3@example.org")) == TOO_MANY_RECIPIENTS
    finally:
        smtp.close()


def test_size_limit_at_mail_from_and_after_data(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    fake.max_message_size = 100
    smtp = authenticated_sync_client(fake, client_ctx, signer.token())
    try:
        assert "SIZE 100" in smtp.ehlo()[1].decode()
        assert text(*smtp.mail(MAILBOX, ["SIZE=101"])) == SIZE_EXCEEDED
        smtp.mail(MAILBOX)
        smtp.rcpt("bob@example.org")
        assert text(*smtp.data(message_from(MAILBOX, b"y" * 200 + b"\r\n"))) == SIZE_EXCEEDED
    finally:
        smtp.close()
    assert fake.messages == []


# --------------------------------------------------------------------------- waiting


def test_wait_for_messages_times_out(fake: FakeExchange) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="0 of 1 messages"):
        fake.wait_for_messages(1, timeout=0.05)
    assert time.monotonic() - started < 1.0


def test_wait_for_messages_wakes_on_delivery(
    fake: FakeExchange, client_ctx: ssl.SSLContext, signer: TokenSigner
) -> None:
    smtp = authenticated_sync_client(fake, client_ctx, signer.token())
    try:
        smtp.sendmail(MAILBOX, ["bob@example.org"], MESSAGE)
        smtp.sendmail(MAILBOX, ["carol@example.org"], MESSAGE)
    finally:
        smtp.close()
    received = fake.wait_for_messages(2, timeout=WAIT)
    assert [m.rcpt_tos for m in received] == [("bob@example.org",), ("carol@example.org",)]
    assert received[0].session_id == received[1].session_id
