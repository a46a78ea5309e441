"""End to end: the real daemon between smtplib and the fake Exchange Online / Entra ID."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

from tests.conftest import CLIENT_ID, MAILBOX, RelayFactory, RelayWith, exchange_config
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.pki import TestPKI
from tests.relayproc import (
    RelayProcess,
    queue_id_of,
    spool_meta,
    spool_state,
    strip_trace,
    wait_until,
)

MESSAGE = (
    b"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\n"
    b"From: Relay <relay@contoso.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <e2e-1@contoso.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that starts with a dot\r\n"
    b"bye\r\n"
)


def test_message_arrives_with_same_envelope_and_bytes(
    exchange_relay: RelayProcess, exchange: FakeExchange, tmp_path: Path
) -> None:
    code, reply = exchange_relay.submit(MAILBOX, ["bob@example.org", "carol@example.net"], MESSAGE)
    assert code == 250
    queue_id = queue_id_of(reply)
    [received] = exchange.wait_for_messages(1, timeout=20)
    assert received.mail_from == MAILBOX
    assert received.rcpt_tos == ("bob@example.org", "carol@example.net")
    assert strip_trace(received.data, queue_id) == MESSAGE
    assert received.auth_user == MAILBOX
    assert received.tls_version in ("TLSv1.2", "TLSv1.3")
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) is None, 10, "spool cleanup")
    line = exchange_relay.wait_for_log(rf"\[{queue_id}\] to=<carol@example.net> delivered")
    assert "250 2.0.0 OK <e2e-1@contoso.com>" in line
    metrics = exchange_relay.metrics()
    assert metrics['relay_messages_received_total{result="accepted"}'] == 1
    assert metrics["relay_messages_delivered_total"] == 1


def test_client_outside_allowlist_is_refused_and_nothing_spooled(
    exchange_relay: RelayProcess, tmp_path: Path
) -> None:
    import socket

    with socket.create_connection(
        ("127.0.0.1", exchange_relay.smtp_port), timeout=10, source_address=("127.0.0.2", 0)
    ) as sock:
        greeting = sock.makefile("rb").readline()
        assert greeting.startswith(b"554 5.7.1 ")
        try:
            sock.sendall(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\n")
            rest = sock.recv(1024)
        except (ConnectionResetError, BrokenPipeError):
            rest = b""  # closed after the 554: the expected outcome
    assert b"250" not in rest
    assert not list((tmp_path / "spool" / "incoming").iterdir())
    assert not list((tmp_path / "spool" / "data").iterdir())
    exchange_relay.wait_for_log(r"refused client 127\.0\.0\.2: not in smtp\.allow")
    assert (
        exchange_relay.metrics()['relay_messages_received_total{result="refused_allowlist"}'] == 1
    )


def test_wrong_secret_pauses_the_upstream_and_fixing_it_resumes_delivery(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    relay_factory: RelayFactory,
) -> None:
    """The circuit breaker: a credential problem pauses the upstream instead of spending the
    messages' retries; no message reaches failed/; once the admin fixes the secret (here: the
    app registration gets the value the relay has), delivery resumes by itself."""
    new_secret = "N3w-s3cret-Value~from-the-portal"
    sections = exchange_config(
        tmp_path, pki, entra, exchange, **{"upstream.oauth.client_secret": new_secret}
    )
    relay = relay_factory(sections)
    queue_ids = [
        queue_id_of(relay.submit(MAILBOX, ["bob@example.org"], MESSAGE)[1]) for _ in range(3)
    ]
    relay.wait_for_log(r"upstream default paused .*AADSTS7000215.*fix: wrong client secret")
    relay.wait_for_log(r"upstream default paused .*AADSTS7000215", since=len(relay.lines))
    spool = tmp_path / "spool"
    for queue_id in queue_ids:
        assert spool_state(spool, queue_id) in ("deferred", "incoming", "active")
        assert spool_meta(spool, queue_id)["attempts"] == 0, "no retry spent on a config error"
    metrics = relay.metrics()
    assert metrics['relay_upstream_paused{upstream="default"}'] == 1
    assert metrics['relay_upstream_pauses_total{reason="configuration",upstream="default"}'] >= 2
    assert exchange.messages == []
    assert new_secret not in relay.log_text()
    assert relay.http_status("/readyz") == 503  # paused for a configuration problem
    assert relay.http_status("/healthz") == 200

    entra.register_app(CLIENT_ID, secret=new_secret)  # the admin fixes the secret
    exchange.wait_for_messages(3, timeout=30)
    wait_until(lambda: not any(spool_state(spool, q) for q in queue_ids), 10, "queue drained")
    assert not list((spool / "failed").iterdir())
    relay.wait_for_log("upstream default works again")
    assert relay.metrics()['relay_upstream_paused{upstream="default"}'] == 0
    wait_until(lambda: relay.http_status("/readyz") == 200, 30, "ready again")


def _deliver_once(relay: RelayProcess, exchange: FakeExchange, data: bytes = MESSAGE) -> str:
    code, reply = relay.submit(MAILBOX, ["bob@example.org"], data)
    assert code == 250
    return queue_id_of(reply)


def test_expired_token_is_refreshed_once_and_message_retried(
    relay_with: RelayWith,
    tmp_path: Path,
    entra: FakeEntra,
    exchange: FakeExchange,
) -> None:
    """Exchange refuses the first token as expired (535 5.7.3): the relay drops it from MSAL's
    cache, defers the message, and the next attempt uses a fresh token."""
    refused: list[str] = []

    def validate(token: str) -> dict[str, object]:
        if not refused:
            refused.append(token)
            raise ValueError("token expired")
        return entra.validate_access_token(token)

    exchange._validate_token = validate  # the fake takes its validator at construction
    relay = relay_with()
    queue_id = _deliver_once(relay, exchange)
    relay.wait_for_log(r"upstream default paused .*535 5\.7\.3")
    [received] = exchange.wait_for_messages(1, timeout=20)
    assert received.rcpt_tos == ("bob@example.org",)
    ok_requests = [r for r in entra.token_requests if r.result == "ok"]
    assert len(ok_requests) == 2, "exactly one refresh after the 535"
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) is None, 10, "spool cleanup")


def test_upstream_4xx_defers_then_delivers(
    exchange_relay: RelayProcess, exchange: FakeExchange, tmp_path: Path
) -> None:
    exchange.inject("eod", "451 4.4.0 STOREDRV.Submission.Exception:StorageTransientException")
    queue_id = _deliver_once(exchange_relay, exchange)
    exchange_relay.wait_for_log(rf"\[{queue_id}\] to=<bob@example.org> deferred .*451 4\.4\.0")
    [received] = exchange.wait_for_messages(1, timeout=20)
    assert strip_trace(received.data, queue_id) == MESSAGE
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) is None, 10, "spool cleanup")
    assert exchange_relay.metrics()["relay_messages_deferred_total"] == 1


def test_upstream_5xx_moves_message_to_failed_and_the_sender_gets_a_dsn(
    exchange_relay: RelayProcess, exchange: FakeExchange, tmp_path: Path
) -> None:
    """Exchange refuses the message after the data (554 5.2.252): it goes to failed/ with the
    reply, and an RFC 3464 report goes back to the sender through the relay."""
    exchange.inject(
        "eod",
        "554 5.2.252 SendAsDenied; relay@contoso.com not allowed to send as "
        "noreply@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException",
    )
    code, reply = exchange_relay.submit("noreply@contoso.com", ["bob@example.org"], MESSAGE)
    assert code == 250
    queue_id = queue_id_of(reply)
    spool = tmp_path / "spool"
    wait_until(lambda: spool_state(spool, queue_id) == "failed", 20, "message in failed/")
    meta = spool_meta(spool, queue_id)
    [rcpt] = meta["recipients"]
    assert rcpt["state"] == "failed"
    assert rcpt["reply"].startswith("554 5.2.252 SendAsDenied;")
    assert meta["history"][-1]["outcome"] == "failed"

    [notice] = exchange.wait_for_messages(1, timeout=20)
    assert notice.rcpt_tos == ("noreply@contoso.com",)
    assert notice.mail_from == MAILBOX  # the null sender, made a permitted one by the policy
    report = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = report.get_payload()[1].get_payload()
    assert status[1]["Final-Recipient"] == "rfc822; bob@example.org"
    assert status[1]["Action"] == "failed"
    assert status[1]["Status"] == "5.2.252"
    metrics = exchange_relay.metrics()
    assert metrics['relay_messages_failed_total{reason="rejected"}'] == 1
    assert metrics['relay_notices_queued_total{kind="failure"}'] == 1


def test_connection_dropped_mid_data_is_retried(
    exchange_relay: RelayProcess, exchange: FakeExchange, tmp_path: Path
) -> None:
    exchange.drop_connection_mid_data()
    queue_id = _deliver_once(exchange_relay, exchange)
    exchange_relay.wait_for_log(rf"\[{queue_id}\] to=<bob@example.org> deferred")
    [received] = exchange.wait_for_messages(1, timeout=20)
    assert strip_trace(received.data, queue_id) == MESSAGE
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) is None, 10, "spool cleanup")


def test_connection_lost_after_final_dot_is_resent_and_counted(
    exchange_relay: RelayProcess, exchange: FakeExchange, tmp_path: Path
) -> None:
    """The upstream stored the message but the reply never came: the relay cannot know, so it
    resends (a duplicate) and counts the ambiguous attempt."""
    exchange.drop_after_eod(delivered=True)
    queue_id = _deliver_once(exchange_relay, exchange)
    exchange_relay.wait_for_log(rf"\[{queue_id}\] outcome unknown")
    received = exchange.wait_for_messages(2, timeout=20)
    assert [strip_trace(m.data, queue_id) for m in received] == [MESSAGE, MESSAGE]
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) is None, 10, "spool cleanup")
    assert exchange_relay.metrics()["relay_delivery_ambiguous_total"] == 1


def test_partial_recipient_refusal_never_resends_to_accepted(
    exchange_relay: RelayProcess, exchange: FakeExchange, tmp_path: Path
) -> None:
    exchange.inject(
        "rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found", rcpt="gone@example.org"
    )
    exchange.inject("rcpt", "452 4.5.3 Too many recipients", rcpt="later@example.org")
    rcpts = ["bob@example.org", "gone@example.org", "later@example.org"]
    code, reply = exchange_relay.submit(MAILBOX, rcpts, MESSAGE)
    assert code == 250
    queue_id = queue_id_of(reply)
    spool = tmp_path / "spool"
    wait_until(lambda: spool_state(spool, queue_id) == "failed", 20, "message in failed/")
    received = exchange.wait_for_messages(3, timeout=20)
    copies = [m.rcpt_tos for m in received if m.rcpt_tos != (MAILBOX,)]
    assert copies == [("bob@example.org",), ("later@example.org",)]
    [notice] = [m for m in received if m.rcpt_tos == (MAILBOX,)]  # the sender's DSN
    assert b"Final-Recipient: rfc822; gone@example.org" in notice.data
    assert b"bob@example.org" not in notice.data.split(b"text/rfc822-headers")[0]
    states = {
        r["address"]: (r["state"], r["reply"][:9])
        for r in spool_meta(spool, queue_id)["recipients"]
    }
    assert states == {
        "bob@example.org": ("delivered", "250 2.0.0"),
        "gone@example.org": ("failed", "550 5.1.1"),
        "later@example.org": ("delivered", "250 2.0.0"),
    }


def test_non_ascii_address_and_headers_arrive_intact(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    data = (
        "Date: Sun, 29 Nov 2026 18:00:00 +0000\r\nMessage-ID: <utf8@contoso.com>\r\n"
        "From: Jürgen Müller <jürgen@contoso.com>\r\nTo: <zoë@example.org>\r\n"
        "Subject: Grüße aus Köln\r\n\r\nSchöne Grüße\r\n"
    ).encode()
    code, _ = exchange_relay.submit(
        "jürgen@contoso.com", ["zoë@example.org"], data, mail_options=["SMTPUTF8"]
    )
    assert code == 250
    [received] = exchange.wait_for_messages(1, timeout=20)
    assert received.mail_from == "jürgen@contoso.com"
    assert received.rcpt_tos == ("zoë@example.org",)
    assert strip_trace(received.data) == data
    assert "SMTPUTF8" in [o.upper() for o in received.mail_options]
    assert "BODY=8BITMIME" in [o.upper() for o in received.mail_options]


def test_raw_8bit_body_without_declaration_passes_with_8bitmime(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    data = MESSAGE.replace(b"Hello Bob,", "Grüße, Bob".encode("latin-1"))
    _deliver_once(exchange_relay, exchange, data)
    [received] = exchange.wait_for_messages(1, timeout=20)
    assert strip_trace(received.data) == data
    assert "BODY=8BITMIME" in [o.upper() for o in received.mail_options]


def test_certificate_credential_delivers(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    relay_factory: RelayFactory,
) -> None:
    certificate = pki.make_client_certificate("oauth-relay")
    entra.register_app(CLIENT_ID, certificate=certificate)
    sections = exchange_config(
        tmp_path,
        pki,
        entra,
        exchange,
        **{
            "upstream.oauth.client_secret": None,
            "upstream.oauth.certificate_file": str(certificate.pem_file),
        },
    )
    relay = relay_factory(sections)
    _deliver_once(relay, exchange)
    [received] = exchange.wait_for_messages(1, timeout=20)
    assert received.rcpt_tos == ("bob@example.org",)
    [request] = [r for r in entra.token_requests if r.result == "ok"]
    assert request.auth_method == "assertion"
    assert "PRIVATE KEY" not in relay.log_text()


def test_many_messages_share_one_authenticated_session(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    for n in range(6):
        _deliver_once(exchange_relay, exchange, MESSAGE.replace(b"e2e-1@", f"e2e-s{n}@".encode()))
    exchange.wait_for_messages(6, timeout=20)
    assert exchange.auth_ok <= 3, "no more sessions than delivery.concurrency"
    assert len([r for r in exchange_relay.metrics() if r.startswith("relay_token")]) >= 1


def test_on_ambiguous_hold_keeps_the_message_for_review_instead_of_resending(
    relay_with: RelayWith,
    tmp_path: Path,
    exchange: FakeExchange,
) -> None:
    relay = relay_with(**{"delivery.on_ambiguous": "hold"})
    exchange.drop_after_eod(delivered=True)
    queue_id = _deliver_once(relay, exchange)
    spool = tmp_path / "spool"
    wait_until(lambda: spool_state(spool, queue_id) == "hold", 20, "message in hold/")
    meta = spool_meta(spool, queue_id)
    assert meta["history"][-1]["outcome"] == "ambiguous"
    assert meta["recipients"][0]["state"] == "pending"
    relay.wait_for_log(rf"\[{queue_id}\] outcome unknown .* held in hold/")
    metrics = relay.metrics()
    assert metrics["relay_delivery_ambiguous_total"] == 1
    assert metrics["relay_messages_held_total"] == 1
    assert len(exchange.messages) == 1  # the copy the upstream kept; no resend
    relay.stop()
    relay.start()  # a held message survives a restart untouched
    assert spool_state(spool, queue_id) == "hold"
    assert (spool / "data" / f"{queue_id}.eml").exists()


def test_a_delay_notice_goes_out_once_after_warn_after(
    relay_with: RelayWith,
    exchange: FakeExchange,
) -> None:
    relay = relay_with(**{"delivery.warn_after": "0.5s"})
    exchange.inject(
        "eod", "451 4.4.0 STOREDRV.Submission.Exception:StorageTransientException", times=5
    )
    queue_id = _deliver_once(relay, exchange)
    relay.wait_for_log(rf"\[{queue_id}\] delay notice \w+ queued for <{MAILBOX}>", timeout=20)
    received = exchange.wait_for_messages(2, timeout=30)
    [notice] = [m for m in received if b"Delayed Mail" in m.data]
    report = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload()[1].get_payload()
    assert status[1]["Action"] == "delayed"
    assert [m for m in received if m.message_id_reply == "<e2e-1@contoso.com>"]
    assert relay.log_text().count("delay notice") == 1


def test_metrics_move_with_accept_defer_and_deliver(
    exchange_relay: RelayProcess, exchange: FakeExchange, tmp_path: Path
) -> None:
    before = exchange_relay.metrics()
    assert before["relay_queue_oldest_age_seconds"] == 0
    assert before["relay_smtp_sessions_open"] == 0
    exchange.inject("eod", "451 4.4.0 STOREDRV.Submission.Exception:StorageTransientException")
    queue_id = _deliver_once(exchange_relay, exchange)
    exchange.wait_for_messages(1, timeout=20)
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) is None, 10, "delivered")
    delivered = 'relay_delivery_attempts_total{outcome="delivered",upstream="default"}'
    # the spool entry goes before the counters move: wait for them, not for the file
    m = wait_until(
        lambda: (scrape := exchange_relay.metrics()).get(delivered) and scrape, 10, "counted"
    )
    assert m['relay_delivery_attempts_total{outcome="deferred",upstream="default"}'] == 1
    assert m['relay_delivery_attempts_total{outcome="delivered",upstream="default"}'] == 1
    assert m["relay_delivery_latency_seconds_count"] == 1
    assert m["relay_message_size_bytes_count"] == 1
    assert m["relay_message_size_bytes_sum"] > len(MESSAGE)  # with the Received: line
    assert 3000 < m['relay_token_expiry_seconds{upstream="default"}'] <= 3599
    assert m['relay_seconds_since_last_delivery{upstream="default"}'] < 30
    assert m['relay_queue_messages{state="deferred"}'] == 0


def test_the_logs_alone_trace_a_message_from_its_message_id(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    """What the accountant swears she sent: grep the Message-ID, get the queue id, then every
    recipient's outcome and Exchange's reply (with Exchange's own id for its message trace)."""
    exchange.inject("rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", rcpt="gone@example.org")
    exchange_relay.submit(MAILBOX, ["bob@example.org", "gone@example.org"], MESSAGE)
    exchange.wait_for_messages(1, timeout=20)
    exchange_relay.wait_for_log(r"to=<gone@example.org> failed")
    log = exchange_relay.log_text()
    [accepted] = [line for line in log.splitlines() if "message-id=<e2e-1@contoso.com>" in line]
    queue_id = re.search(r"\[([0-9A-F]+)\] accepted", accepted).group(1)
    lines = [line for line in log.splitlines() if f"[{queue_id}]" in line]
    assert any(
        "to=<bob@example.org> delivered" in line
        and "250 2.0.0 OK <e2e-1@contoso.com>" in line
        and "Hostname=" in line
        for line in lines
    )
    assert any("to=<gone@example.org> failed" in line and "550 5.1.10" in line for line in lines)
