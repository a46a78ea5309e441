"""End to end: the real daemon in front of an SMTP provider (``[upstream] kind = "smtp"``).

The provider is tests/fakes/smtpserver.py (aiosmtpd): STARTTLS + AUTH PLAIN as on port 587,
implicit TLS + AUTH LOGIN as on port 465, clear text only when the config allows it, a 550 for
one recipient, a wrong password, routing by sender domain next to the Maildir sandbox. The
first tests pin the fake's own contract (AUTH only after TLS, credentials changeable while it
runs), which the relay tests rely on.
"""

from __future__ import annotations

import base64
import email
import email.policy
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RelayFactory
from tests.fakes.pki import TestPKI, write_private_file
from tests.fakes.smtpserver import AUTH_REQUIRED, FakeSmtpProvider, TlsMode
from tests.relayproc import (
    RelayProcess,
    queue_id_of,
    spool_meta,
    spool_state,
    strip_trace,
    wait_until,
    write_config,
)
from tests.smtpwire import maildir_message

USER = "apikey"  # SendGrid's user name for API-key logins
PASSWORD = "SG.fake-Key_9f8e7d6c5b4a.wrong-if-logged"
SENDER = "scanner@contoso.com"
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")

MESSAGE = (
    b"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\n"
    b"From: Scanner <scanner@contoso.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Cc: carol@example.net\r\n"
    b"Subject: scanned document\r\n"
    b"Message-ID: <provider-1@contoso.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that starts with a dot\r\n"
    b"bye\r\n"
)

ProviderFactory = Callable[..., FakeSmtpProvider]


@pytest.fixture
def provider_factory(pki: TestPKI) -> Iterator[ProviderFactory]:
    """`provider_factory(tls=..., credentials=...)`: a started fake, stopped after the test."""
    with ExitStack() as stack:

        def factory(
            *, tls: TlsMode = "starttls", credentials: tuple[str, str] | None = (USER, PASSWORD)
        ) -> FakeSmtpProvider:
            context = pki.server_context() if tls != "none" else None
            fake = FakeSmtpProvider(tls=tls, tls_context=context, credentials=credentials)
            return stack.enter_context(fake)

        yield factory


def relay_config(
    tmp_path: Path, pki: TestPKI, port: int, **upstream: Any
) -> dict[str, dict[str, Any]]:
    """The relay with [upstream] kind = "smtp" on 127.0.0.1:`port`; `upstream` adds or
    overrides keys of [upstream] (None removes one)."""
    settings: dict[str, Any] = {
        "kind": "smtp",
        "host": "127.0.0.1",
        "port": port,
        "tls": "starttls",
        "tls_ca_file": str(pki.ca_file),
        "auth": "plain",
        "username": USER,
        "password": PASSWORD,
        "timeout": "10s",
    }
    for key, value in upstream.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    return {
        "smtp": {
            "listen": ["127.0.0.1:0"],
            "allow": ["127.0.0.1/32"],
            "hostname": "relay.test.lan",
            "max_recipients": 50,
        },
        "spool": {"path": str(tmp_path / "spool")},
        "delivery": {
            "concurrency": 2,
            "retry_initial": "0.3s",
            "retry_max": "2s",
            "max_age": "1h",
        },
        "upstream": settings,
        "metrics": {"listen": "127.0.0.1:0"},
        "server": {"shutdown_grace": "5s"},
        "log": {"level": "debug"},
    }


def submit(
    relay: RelayProcess, rcpts: list[str], data: bytes = MESSAGE, sender: str = SENDER
) -> str:
    code, reply = relay.submit(sender, rcpts, data)
    assert code == 250, (code, reply)
    return queue_id_of(reply)


def drained(tmp_path: Path, queue_ids: list[str], timeout: float = 20) -> None:
    spool = tmp_path / "spool"
    wait_until(
        lambda: all(spool_state(spool, q) is None for q in queue_ids), timeout, "spool cleanup"
    )


def assert_no_secret_in_log(relay: RelayProcess, password: str) -> None:
    text = relay.log_text()
    assert password not in text
    for blob in (f"\0{USER}\0{password}", password):  # AUTH PLAIN / AUTH LOGIN on the wire
        assert base64.b64encode(blob.encode()).decode() not in text


# --- the fake itself ---------------------------------------------------------------------------


def test_fake_offers_auth_only_after_starttls_and_takes_new_credentials(
    provider_factory: ProviderFactory, pki: TestPKI
) -> None:
    fake = provider_factory(tls="starttls")
    with smtplib.SMTP("127.0.0.1", fake.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        assert client.mail(SENDER)[0] == 530  # no mail in clear text
        client.starttls(context=pki.client_context())
        client.ehlo("client.test")
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        code, text = client.mail(SENDER)
        assert f"{code} {text.decode()}" == AUTH_REQUIRED
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(USER, "other")
        fake.set_credentials(USER, "other")
        client.login(USER, "other")
        fake.inject_rcpt("gone@example.org", "550 5.1.1 no such user")
        fake.inject_data("451 4.3.0 try later")
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("gone@example.org")[0] == 550
        assert client.rcpt("bob@example.org")[0] == 250
        assert client.data(MESSAGE)[0] == 451
        client.sendmail(SENDER, ["bob@example.org"], MESSAGE)
    [message] = fake.wait_for_messages(1, timeout=10)
    assert message.rcpt_tos == ("bob@example.org",)
    assert message.data == MESSAGE
    assert message.auth_user == USER
    assert message.tls_version in TLS_VERSIONS
    attempts = [(a.mechanism, a.ok) for a in fake.auth_attempts]
    assert attempts == [("PLAIN", False), ("LOGIN", False), ("PLAIN", True)]  # smtplib tries both
    assert fake.rejected_rcpts == [("gone@example.org", "550 5.1.1 no such user")]


def test_fake_in_clear_text_without_credentials_offers_no_auth(
    provider_factory: ProviderFactory,
) -> None:
    fake = provider_factory(tls="none", credentials=None)
    with smtplib.SMTP("127.0.0.1", fake.port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        assert not client.has_extn("auth")
        client.sendmail(SENDER, ["bob@example.org"], MESSAGE)
    [message] = fake.wait_for_messages(1, timeout=10)
    assert (message.auth_user, message.tls_version) == (None, None)


# --- the relay ---------------------------------------------------------------------------------


def test_starttls_and_auth_plain_deliver_the_envelope_bcc_included(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    """Port 587 style: the envelope goes out as received (a Bcc-only recipient included, and
    not added to the headers), over verified TLS 1.2+, authenticated as the configured user;
    the message is the device's bytes under the relay's Received: line; the password is
    never logged."""
    fake = provider_factory(tls="starttls")
    relay = relay_factory(relay_config(tmp_path, pki, fake.port))
    rcpts = ["bob@example.org", "carol@example.net", "hidden@example.com"]
    queue_id = submit(relay, rcpts)
    [received] = fake.wait_for_messages(1, timeout=20)
    assert received.mail_from == SENDER
    assert received.rcpt_tos == tuple(rcpts)
    assert strip_trace(received.data, queue_id) == MESSAGE  # mailbox unset: headers untouched
    assert b"hidden@example.com" not in received.data
    assert received.auth_user == USER
    assert received.tls_version in TLS_VERSIONS
    assert [(a.mechanism, a.ok) for a in fake.auth_attempts] == [("PLAIN", True)]
    assert all(a.tls_version in TLS_VERSIONS for a in fake.auth_attempts)
    drained(tmp_path, [queue_id])
    relay.wait_for_log(rf"\[{queue_id}\] to=<hidden@example.com> delivered via default")
    relay.wait_for_log(r"ready: .*upstreams=default:smtp")
    assert relay.metrics()['relay_recipients_total{outcome="delivered",upstream="default"}'] == 3
    assert_no_secret_in_log(relay, PASSWORD)


def test_implicit_tls_and_auth_login_with_a_password_file(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    """Port 465 style: TLS from the first byte, AUTH LOGIN, the password read from a file
    (a trailing newline, as `echo` leaves it, is not part of it)."""
    fake = provider_factory(tls="implicit")
    password_file = write_private_file(tmp_path / "provider.secret", f"{PASSWORD}\n".encode())
    sections = relay_config(
        tmp_path,
        pki,
        fake.port,
        tls="implicit",
        auth="login",
        password=None,
        password_file=str(password_file),
    )
    relay = relay_factory(sections)
    queue_id = submit(relay, ["bob@example.org"])
    [received] = fake.wait_for_messages(1, timeout=20)
    assert received.rcpt_tos == ("bob@example.org",)
    assert strip_trace(received.data, queue_id) == MESSAGE
    assert received.auth_user == USER
    assert received.tls_version in TLS_VERSIONS
    assert [(a.mechanism, a.ok) for a in fake.auth_attempts] == [("LOGIN", True)]
    drained(tmp_path, [queue_id])
    assert_no_secret_in_log(relay, PASSWORD)


def test_a_550_at_rcpt_fails_that_recipient_and_delivers_the_others(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    fake = provider_factory(tls="starttls")
    rejection = "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown"
    fake.inject_rcpt("gone@example.org", rejection)
    relay = relay_factory(relay_config(tmp_path, pki, fake.port))
    queue_id = submit(relay, ["bob@example.org", "gone@example.org", "carol@example.net"])
    spool = tmp_path / "spool"
    wait_until(lambda: spool_state(spool, queue_id) == "failed", 20, "message in failed/")
    states = {
        r["address"]: (r["state"], r["reply"][:9])
        for r in spool_meta(spool, queue_id)["recipients"]
    }
    assert states == {
        "bob@example.org": ("delivered", "250 2.0.0"),
        "gone@example.org": ("failed", "550 5.1.1"),
        "carol@example.net": ("delivered", "250 2.0.0"),
    }
    line = relay.wait_for_log(rf"\[{queue_id}\] to=<gone@example.org> failed via default")
    assert "550 5.1.1" in line
    relay.wait_for_log(rf"\[{queue_id}\] to=<bob@example.org> delivered")

    # The copy for the others, then the sender's failure notice through the same provider.
    received = fake.wait_for_messages(2, timeout=20)
    copy = next(m for m in received if m.rcpt_tos != (SENDER,))
    assert copy.rcpt_tos == ("bob@example.org", "carol@example.net")
    assert strip_trace(copy.data, queue_id) == MESSAGE
    [notice] = [m for m in received if m.rcpt_tos == (SENDER,)]
    assert notice.mail_from == ""  # the null sender: a notice never causes another one
    report = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload()[1].get_payload()
    assert status[1]["Final-Recipient"] == "rfc822; gone@example.org"
    assert status[1]["Action"] == "failed"
    assert status[1]["Status"] == "5.1.1"
    assert fake.rejected_rcpts == [("gone@example.org", rejection)]  # never offered again
    metrics = relay.metrics()
    assert metrics['relay_recipients_total{outcome="failed",upstream="default"}'] == 1
    assert metrics['relay_messages_failed_total{reason="rejected"}'] == 1


def test_a_wrong_password_pauses_the_upstream_and_mail_waits_until_it_is_fixed(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    """535 at AUTH is a configuration problem, not the messages' fault: the upstream pauses
    (said with a fix naming username/password), /readyz turns 503, no retry is spent and
    nothing fails; once the provider accepts the relay's password, the mail goes out."""
    relays_password = "Typo-in-the-Key_123"
    fake = provider_factory(tls="starttls")  # accepts PASSWORD only
    relay = relay_factory(relay_config(tmp_path, pki, fake.port, password=relays_password))
    queue_ids = [submit(relay, ["bob@example.org"]) for _ in range(2)]
    line = relay.wait_for_log(r"upstream default paused for \S+ \(configuration\): ")
    assert "535" in line
    assert "username" in line and "password" in line, line
    fake.wait_for(lambda: len(fake.auth_attempts) >= 2, 20, "a second AUTH after the pause")
    assert not any(a.ok for a in fake.auth_attempts)
    assert fake.messages == []
    spool = tmp_path / "spool"
    for queue_id in queue_ids:
        assert spool_state(spool, queue_id) in ("deferred", "incoming", "active")
        assert spool_meta(spool, queue_id)["attempts"] == 0, "no retry spent on a config error"
    metrics = relay.metrics()
    assert metrics['relay_upstream_paused{upstream="default"}'] == 1
    assert metrics['relay_upstream_pauses_total{reason="configuration",upstream="default"}'] >= 1
    assert relay.http_status("/readyz") == 503
    assert relay.http_status("/healthz") == 200

    fake.set_credentials(USER, relays_password)  # the admin fixes the key at the provider
    received = fake.wait_for_messages(2, timeout=30)
    assert sorted(m.rcpt_tos for m in received) == [("bob@example.org",)] * 2
    drained(tmp_path, queue_ids)
    assert not list((spool / "failed").iterdir())
    relay.wait_for_log("upstream default works again")
    wait_until(lambda: relay.http_status("/readyz") == 200, 30, "ready again")
    assert relay.metrics()['relay_upstream_paused{upstream="default"}'] == 0
    assert_no_secret_in_log(relay, relays_password)


def test_an_unreachable_host_pauses_the_upstream_as_unreachable(
    tmp_path: Path, pki: TestPKI, relay_factory: RelayFactory
) -> None:
    with socket.socket() as probe:  # a port nobody listens on (bound, then released)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = relay_factory(relay_config(tmp_path, pki, port))
    queue_id = submit(relay, ["bob@example.org"])
    relay.wait_for_log(r"upstream default paused for \S+ \(unreachable\)")
    spool = tmp_path / "spool"
    assert spool_state(spool, queue_id) in ("deferred", "incoming", "active")
    assert spool_meta(spool, queue_id)["attempts"] == 0
    assert relay.http_status("/readyz") == 503
    assert (
        relay.metrics()['relay_upstream_pauses_total{reason="unreachable",upstream="default"}'] >= 1
    )


def test_clear_text_needs_allow_plaintext(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    """tls = "none" is refused by check-config unless allow_plaintext = true; with it, mail
    goes to a smart host that has no TLS at all."""
    fake = provider_factory(tls="none", credentials=None)
    plain = {"tls": "none", "auth": "none", "username": None, "password": None}
    refused = write_config(
        tmp_path / "refused.toml", relay_config(tmp_path, pki, fake.port, **plain)
    )
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(refused)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result
    assert "upstream.tls" in result.stderr
    assert "allow_plaintext" in result.stderr

    sections = relay_config(tmp_path, pki, fake.port, allow_plaintext=True, **plain)
    relay = relay_factory(sections)
    queue_id = submit(relay, ["bob@example.org", "hidden@example.com"])
    [received] = fake.wait_for_messages(1, timeout=20)
    assert received.rcpt_tos == ("bob@example.org", "hidden@example.com")
    assert strip_trace(received.data, queue_id) == MESSAGE
    assert (received.auth_user, received.tls_version) == (None, None)
    drained(tmp_path, [queue_id])


def test_a_mailbox_applies_the_sender_policy(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    """With mailbox and send_as, a permitted sender is kept and any other becomes the
    mailbox, as for Exchange (the provider only accepts verified senders)."""
    fake = provider_factory(tls="starttls")
    sections = relay_config(
        tmp_path, pki, fake.port, mailbox="relay@contoso.com", send_as=["scanner@contoso.com"]
    )
    relay = relay_factory(sections)
    submit(relay, ["bob@example.org"])  # permitted
    stranger = MESSAGE.replace(b"scanner@contoso.com", b"printer@lab.example")
    submit(relay, ["bob@example.org"], stranger, sender="printer@lab.example")
    received = fake.wait_for_messages(2, timeout=20)
    by_sender = {m.mail_from: m for m in received}
    assert set(by_sender) == {SENDER, "relay@contoso.com"}
    kept = email.message_from_bytes(by_sender[SENDER].data, policy=email.policy.default)
    assert kept["From"].addresses[0].addr_spec == SENDER
    rewritten = email.message_from_bytes(
        by_sender["relay@contoso.com"].data, policy=email.policy.default
    )
    assert rewritten["From"].addresses[0].addr_spec == "relay@contoso.com"
    assert rewritten["Reply-To"].addresses[0].addr_spec == "printer@lab.example"


def test_a_sender_domain_is_routed_to_the_provider_and_the_rest_to_the_default(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    fake = provider_factory(tls="starttls")
    sections = relay_config(tmp_path, pki, fake.port)
    sections["upstreams.provider"] = sections["upstream"]
    sections["upstream"] = {"kind": "maildir", "path": str(tmp_path / "maildir")}
    # write_config writes the section "[route]" as [[route]]: an array of tables
    sections["[route]"] = {"sender": ["@provider.test"], "upstream": "provider"}
    relay = relay_factory(sections)
    relay.wait_for_log(r"ready: .*upstreams=default:maildir,provider:smtp")

    routed = MESSAGE.replace(b"scanner@contoso.com", b"app@provider.test")
    routed_id = submit(relay, ["bob@example.org"], routed, sender="app@provider.test")
    other_id = submit(relay, ["carol@example.net"])
    [received] = fake.wait_for_messages(1, timeout=20)
    assert received.mail_from == "app@provider.test"
    assert received.rcpt_tos == ("bob@example.org",)
    assert strip_trace(received.data, routed_id) == routed
    new = tmp_path / "maildir" / "new"
    [path] = wait_until(lambda: list(new.glob("*")) if new.is_dir() else [], 20, "maildir copy")
    return_path, delivered_to, data = maildir_message(path)
    assert (return_path, delivered_to) == (SENDER.encode(), [b"carol@example.net"])
    assert strip_trace(data, other_id) == MESSAGE
    drained(tmp_path, [routed_id, other_id])
    relay.wait_for_log(rf"\[{routed_id}\] to=<bob@example.org> delivered via provider")
    relay.wait_for_log(rf"\[{other_id}\] to=<carol@example.net> delivered via default")
    assert len(fake.messages) == 1


def test_an_untrusted_certificate_gets_no_password_and_no_mail(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    """Without tls_ca_file the test CA is not trusted: the TLS handshake fails, so the password
    and the message never leave the relay; the upstream pauses and the mail stays queued."""
    fake = provider_factory(tls="starttls")
    relay = relay_factory(relay_config(tmp_path, pki, fake.port, tls_ca_file=None))
    queue_id = submit(relay, ["bob@example.org"])
    line = relay.wait_for_log(r"upstream default paused for \S+ \(\w+\): ")
    assert "certificate" in line.lower(), line
    assert fake.connections >= 1
    assert fake.auth_attempts == []
    assert fake.messages == []
    assert spool_state(tmp_path / "spool", queue_id) in ("deferred", "incoming", "active")


def test_starttls_is_required_when_configured(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    """tls = "starttls" against a server that offers no STARTTLS: nothing goes out in clear
    text, the password included."""
    fake = provider_factory(tls="none")  # offers AUTH in clear text, and no STARTTLS
    relay = relay_factory(relay_config(tmp_path, pki, fake.port))
    queue_id = submit(relay, ["bob@example.org"])
    line = relay.wait_for_log(r"upstream default paused for \S+ \(\w+\): ")
    assert "STARTTLS" in line, line
    assert fake.connections >= 1
    assert fake.auth_attempts == []
    assert fake.messages == []
    assert spool_state(tmp_path / "spool", queue_id) in ("deferred", "incoming", "active")


def test_temporary_refusals_are_retried_for_the_refused_recipients_only(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    """4xx at RCPT defers that recipient (the others are delivered and never sent again); 4xx
    after the data defers the whole message, which goes out once on the retry."""
    fake = provider_factory(tls="starttls")
    fake.inject_rcpt("later@example.org", "450 4.2.1 mailbox busy, try later", times=1)
    relay = relay_factory(relay_config(tmp_path, pki, fake.port))
    first = submit(relay, ["bob@example.org", "later@example.org"])
    relay.wait_for_log(rf"\[{first}\] to=<later@example.org> deferred via default")
    received = fake.wait_for_messages(2, timeout=20)
    assert [m.rcpt_tos for m in received] == [("bob@example.org",), ("later@example.org",)]
    drained(tmp_path, [first])

    fake.inject_data("451 4.3.0 queue full, try later", times=1)
    second = submit(relay, ["carol@example.net"])
    relay.wait_for_log(rf"\[{second}\] to=<carol@example.net> deferred via default")
    received = fake.wait_for_messages(3, timeout=20)
    assert received[2].rcpt_tos == ("carol@example.net",)
    assert strip_trace(received[2].data, second) == MESSAGE
    drained(tmp_path, [second])
    assert len(fake.messages) == 3
    assert relay.metrics()['relay_recipients_total{outcome="failed",upstream="default"}'] == 0


def test_a_rotated_password_file_takes_effect_on_reload(
    tmp_path: Path, pki: TestPKI, provider_factory: ProviderFactory, relay_factory: RelayFactory
) -> None:
    """The admin puts the new key into password_file and sends SIGHUP: the pause ends at
    once and the waiting mail goes out with the new password."""
    fake = provider_factory(tls="starttls")  # has the new key already
    password_file = write_private_file(tmp_path / "provider.secret", b"the-old-revoked-key\n")
    sections = relay_config(
        tmp_path, pki, fake.port, password=None, password_file=str(password_file)
    )
    relay = relay_factory(sections)
    queue_id = submit(relay, ["bob@example.org"])
    relay.wait_for_log(r"upstream default paused for \S+ \(configuration\): ")
    write_private_file(password_file, f"{PASSWORD}\n".encode())
    since = len(relay.lines)
    relay.signal(signal.SIGHUP)
    relay.wait_for_log(r"reloaded: ", since=since)
    [received] = fake.wait_for_messages(1, timeout=20)
    assert received.auth_user == USER
    drained(tmp_path, [queue_id])
    assert_no_secret_in_log(relay, PASSWORD)
    assert_no_secret_in_log(relay, "the-old-revoked-key")
