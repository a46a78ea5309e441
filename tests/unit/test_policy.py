"""policy.py: the allowlist, limits, the reply classification table, and the retry schedule.

Pure functions only: no sockets, no clock, no randomness except what the tests pass in.
Reply texts are the ones Exchange Online really sends (docs/design exchange-online.md §3.5).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import TokenError, UpstreamError, UpstreamTimeout
from relay.policy import (
    JITTER,
    LOCAL_CONNECTION_LOST,
    LOCAL_TIMEOUT,
    LOCAL_TOKEN_FAILURE,
    LOCAL_UNKNOWN,
    REPLY_RULES,
    Action,
    Decision,
    Stage,
    Verdict,
    classify_error,
    classify_reply,
    expired,
    header_too_large,
    next_attempt,
    peer_allowed,
    recipient_limit_reached,
    retry_delay,
)
from relay.replies import SmtpReply


def nets(*specs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(s) for s in specs)


def reply(code: int, text: str) -> SmtpReply:
    return SmtpReply.parse(code, text)


# --- peer_allowed ---------------------------------------------------------------------------------

LAN = nets("192.168.1.0/24", "127.0.0.1/32", "fd00::/8", "fe80::/10")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("192.168.1.10", True),
        ("192.168.1.0", True),
        ("192.168.1.255", True),
        ("192.168.2.1", False),
        ("127.0.0.1", True),
        ("127.0.0.2", False),  # 127.0.0.1/32 is one address, not the loopback /8
        ("10.0.0.1", False),
        ("fd12:3456::1", True),
        ("fe80::1%eth0", True),  # link-local with a scope id
        ("fe80::1%2", True),
        ("2001:db8::1", False),
        ("::1", False),  # not listed: IPv6 loopback is not 127.0.0.1
        ("::ffff:127.0.0.1", True),  # IPv4-mapped IPv6, as a dual-stack socket reports it
        ("::ffff:192.168.1.77", True),
        ("::ffff:127.0.0.2", False),
        ("::FFFF:C0A8:0101", True),  # the same mapped address in hex form
    ],
)
def test_peer_allowed_addresses(address: str, expected: bool) -> None:
    assert peer_allowed(address, LAN) is expected


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        " ",
        "localhost",
        "192.168.1",
        "192.168.1.300",
        "192.168.1.10/32",
        " 192.168.1.10",
        "192.168.1.10:25",
        "[::1]",
        "%eth0",
        "::ffff:999.0.0.1",
        "fd00::1::2",
        "0x7f000001",
    ],
)
def test_peer_allowed_fails_closed_on_garbage(garbage: str) -> None:
    assert peer_allowed(garbage, nets("0.0.0.0/0", "::/0")) is False


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "fe80::1%lo"])
def test_empty_network_list_fails_closed(address: str) -> None:
    assert peer_allowed(address, ()) is False
    assert peer_allowed(address, []) is False


def test_ipv6_network_does_not_admit_ipv4_and_vice_versa() -> None:
    assert peer_allowed("127.0.0.1", nets("::/0")) is False
    assert peer_allowed("::1", nets("0.0.0.0/0")) is False


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(min_value=0, max_value=32))
def test_peer_allowed_matches_membership_for_ipv4(address, base, prefix) -> None:
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    expected = address in network
    assert peer_allowed(str(address), [network]) is expected
    assert peer_allowed(f"::ffff:{address}", [network]) is expected


@given(st.ip_addresses(v=6), st.ip_addresses(v=6), st.integers(min_value=0, max_value=128))
def test_peer_allowed_matches_membership_for_ipv6(address, base, prefix) -> None:
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    mapped = address.ipv4_mapped
    expected = address in network if mapped is None else False  # mapped -> compared as IPv4
    assert peer_allowed(str(address), [network]) is expected


# --- recipient_limit_reached ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "limit", "expected"),
    [
        (0, 1, False),
        (1, 1, True),
        (0, 500, False),
        (499, 500, False),
        (500, 500, True),
        (501, 500, True),
    ],
)
def test_recipient_limit_reached(current: int, limit: int, expected: bool) -> None:
    assert recipient_limit_reached(current, limit) is expected


# --- classify_reply: one test per row of REPLY_RULES ----------------------------------------------

RATE = "30 messages a minute per mailbox exceeded: slow down"
CONCURRENCY = "more than 3 concurrent connections for the mailbox"
BUSY = "server busy: Exchange throttles this sender"
CLOSING = "server closing the channel"
AUTH_DISABLED = "SMTP AUTH disabled for the tenant or mailbox, or blocked by policy"
TOKEN = "token refused: refresh once, keep the message queued"
SETUP = "session set-up refused: a configuration problem, not the message's fault"
NOT_AUTHENTICATED = "not authenticated: a relay or configuration bug"
MAIL_530 = "530 at MAIL: authentication required, whatever the enhanced code says"
MAILBOX_FULL = "the sending mailbox is full (Sent Items)"
QUOTA = "daily recipient quota of the mailbox reached"
DAILY_LIMIT = "daily recipient limit of the mailbox reached"
SPAM_BLOCK = "tenant blocked for sending spam"
IP_BLOCK = "traffic from this IP not accepted"
DOMAIN = "sender domain not registered in the tenant"
RCPT_552 = "RFC 5321 4.5.3.1.10: 552 on RCPT means too many recipients"
TEMPORARY = "temporary failure"
PERMANENT = "permanent failure"


def test_reply_rules_table_has_the_rows_these_tests_cover() -> None:
    # A new row needs a new test below; this fails first to say so.
    assert [r.note for r in REPLY_RULES] == [
        RATE,
        CONCURRENCY,
        BUSY,
        CLOSING,
        AUTH_DISABLED,
        NOT_AUTHENTICATED,
        MAIL_530,
        MAILBOX_FULL,
        QUOTA,
        DAILY_LIMIT,
        SPAM_BLOCK,
        IP_BLOCK,
        DOMAIN,
        TOKEN,
        SETUP,
        RCPT_552,
        TEMPORARY,
        PERMANENT,
    ]


def core(decision: Decision) -> Decision:
    """A decision without its operator-facing action and hint (tested on their own below)."""
    return replace(decision, action=Action.RETRY_MESSAGE, hint="")


def first_rule(stage: Stage, smtp_reply: SmtpReply) -> str:
    return next(rule.note for rule in REPLY_RULES if rule.matches(stage, smtp_reply))


@pytest.mark.parametrize("stage", list(Stage))
def test_row_submission_rate_pauses_a_minute(stage: Stage) -> None:
    r = reply(
        421, "4.4.2 Message submission rate for this client has exceeded the configured limit"
    )
    assert first_rule(stage, r) == RATE
    assert core(classify_reply(stage, r)) == Decision(
        Verdict.DEFER, r, session_ok=False, pause=60.0
    )


@pytest.mark.parametrize(
    "text",
    [
        "4.3.2 Concurrent connections limit exceeded.",
        "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        "4.3.2 Concurrent connections limit exceeded (aka.ms/concurrent_sending)",
    ],
)
def test_row_432_concurrency_pauses_briefly(text: str) -> None:
    r = reply(432, text)
    assert first_rule(Stage.MAIL, r) == CONCURRENCY
    assert core(classify_reply(Stage.MAIL, r)) == Decision(
        Verdict.DEFER, r, session_ok=False, pause=10.0
    )


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize(
    "text",
    [
        "4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to support "
        "TLS 1.2. Visit https://aka.ms/smtp_auth_tls.",
        "4.3.2 Service not available, closing transmission channel",
        "4.4.1 Connection timed out. Total session duration: 00:20:55",
    ],
)
def test_row_421_anywhere_defers_and_drops_the_session(stage: Stage, text: str) -> None:
    r = reply(421, text)
    assert first_rule(stage, r) == CLOSING
    assert core(classify_reply(stage, r)) == Decision(Verdict.DEFER, r, session_ok=False)


@pytest.mark.parametrize(
    "text",
    [
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        "Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.",
        "5.7.139 Authentication unsuccessful, the request did not meet the criteria to be "
        "authenticated successfully. Contact your administrator.",
    ],
)
def test_row_smtp_auth_disabled_keeps_the_queue_and_pauses(text: str) -> None:
    r = reply(535, text)
    assert first_rule(Stage.AUTH, r) == AUTH_DISABLED
    assert core(classify_reply(Stage.AUTH, r)) == Decision(
        Verdict.DEFER, r, session_ok=False, pause=300.0
    )


@pytest.mark.parametrize("text", ["", "5.7.0 Authentication required", "5.5.1 Need AUTH"])
def test_row_530_at_mail_pauses_like_not_authenticated(text: str) -> None:
    r = reply(530, text)
    assert first_rule(Stage.MAIL, r) == MAIL_530
    assert core(classify_reply(Stage.MAIL, r)) == Decision(
        Verdict.DEFER, r, session_ok=False, pause=300.0
    )
    assert classify_reply(Stage.MAIL, r).action is Action.PAUSE_UPSTREAM


def test_row_535_at_auth_defers_and_refreshes_the_token() -> None:
    r = reply(
        535,
        "5.7.3 Authentication unsuccessful [SN4PR0601CA0012.namprd06.prod.outlook.com "
        "2025-11-29T18:00:00.000Z 08DE2F0C7A1B2C3D]",
    )
    assert first_rule(Stage.AUTH, r) == TOKEN
    assert core(classify_reply(Stage.AUTH, r)) == Decision(
        Verdict.DEFER, r, refresh_token=True, session_ok=False
    )


@pytest.mark.parametrize(
    ("stage", "code", "text"),
    [
        (Stage.CONNECT, 554, "5.7.1 Access denied"),
        (Stage.TLS, 554, "5.7.3 Unable to initialize security subsystem"),
        (Stage.AUTH, 504, "5.7.4 Unrecognized authentication type"),
        (Stage.AUTH, 550, "5.7.30 Basic authentication is not supported for Client Submission."),
        (Stage.AUTH, 501, "5.5.2 Cannot Decode response"),
    ],
)
def test_row_5xx_during_session_setup_defers_and_drops_the_session(
    stage: Stage, code: int, text: str
) -> None:
    r = reply(code, text)
    assert first_rule(stage, r) == SETUP
    assert core(classify_reply(stage, r)) == Decision(Verdict.DEFER, r, session_ok=False)


TENANT_ROWS = [
    (Stage.MAIL, 530, "5.7.57 Client not authenticated to send mail.", NOT_AUTHENTICATED),
    (Stage.RCPT, 530, "5.7.57 Client not authenticated to send mail.", NOT_AUTHENTICATED),
    (
        Stage.EOD,
        554,
        "5.2.2 mailbox full; STOREDRV.Submission.Exception:"
        "QuotaExceededException.MapiExceptionShutoffQuotaExceeded",
        MAILBOX_FULL,
    ),
    (
        Stage.EOD,
        554,
        "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to "
        "process message. The message can't be submitted because the sender's submission "
        "quota was exceeded.",
        QUOTA,
    ),
    (
        Stage.EOD,
        550,
        "5.1.90 Your message can't be sent because you've reached your daily limit for "
        "message recipients.",
        DAILY_LIMIT,
    ),
    (Stage.MAIL, 550, "5.7.705 Access denied, tenant has exceeded threshold", SPAM_BLOCK),
    (Stage.MAIL, 550, "5.7.708 Access denied, traffic not accepted from this IP", IP_BLOCK),
    (Stage.CONNECT, 550, "5.7.708 Access denied, traffic not accepted from this IP", IP_BLOCK),
    (Stage.MAIL, 550, "5.7.750 Client blocked from sending from unregistered domain", DOMAIN),
]


@pytest.mark.parametrize(("stage", "code", "text", "row"), TENANT_ROWS)
def test_rows_tenant_problems_keep_the_queue_and_pause(
    stage: Stage, code: int, text: str, row: str
) -> None:
    r = reply(code, text)
    assert first_rule(stage, r) == row
    assert core(classify_reply(stage, r)) == Decision(
        Verdict.DEFER, r, session_ok=False, pause=300.0
    )


def test_row_552_at_rcpt_is_too_many_recipients_and_defers() -> None:
    r = reply(552, "5.5.3 Too many recipients")
    assert first_rule(Stage.RCPT, r) == RCPT_552
    assert core(classify_reply(Stage.RCPT, r)) == Decision(Verdict.DEFER, r)


@pytest.mark.parametrize(
    ("stage", "code", "text"),
    [
        (Stage.RCPT, 452, "4.5.3 Too many recipients"),
        (Stage.EOD, 451, "4.4.0 STOREDRV.Submission.Exception:StorageTransientException"),
        (Stage.DATA, 451, "4.7.0 Temporary server error. Please try again later. PRX4"),
        (Stage.CONNECT, 451, "4.7.0 Temporary server error. Please try again later. PRX4"),
        (Stage.AUTH, 454, "4.7.0 Temporary authentication failure"),
    ],
)
def test_row_other_4xx_defers_and_keeps_the_session(stage: Stage, code: int, text: str) -> None:
    r = reply(code, text)
    assert first_rule(stage, r) == TEMPORARY
    assert core(classify_reply(stage, r)) == Decision(Verdict.DEFER, r)


@pytest.mark.parametrize(
    ("stage", "code", "text"),
    [
        (
            Stage.EOD,
            554,
            "5.2.252 SendAsDenied; info@bizadmin.com.au not allowed to send as "
            "noreply@bizadmin.com.au; STOREDRV.Submission.Exception:SendAsDeniedException."
            "MapiExceptionSendAsDenied; Failed to process message due to a permanent exception "
            "with message [BeginDiagnosticData]Cannot submit message. 1.84300:0A000000",
        ),
        (
            Stage.EOD,
            554,
            "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException."
            "MapiExceptionSendAsDenied; Failed to process message due to a permanent exception "
            "with message Cannot submit message.",
        ),
        (Stage.MAIL, 550, "5.7.60 SMTP; Client does not have permissions to send as this sender"),
        (Stage.EOD, 552, "5.3.4 Message size exceeds fixed maximum message size"),  # not RCPT
        (Stage.MAIL, 535, "5.7.3 Authentication unsuccessful"),  # not AUTH
        (
            Stage.RCPT,
            550,
            "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        ),
    ],
)
def test_row_other_5xx_fails(stage: Stage, code: int, text: str) -> None:
    r = reply(code, text)
    assert first_rule(stage, r) == PERMANENT
    assert core(classify_reply(stage, r)) == Decision(Verdict.FAIL, r)


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize(
    ("code", "text"),
    [
        (
            250,
            "2.0.0 OK <AM0PR01MB1234.eurprd01.prod.exchangelabs.com> "
            "[Hostname=AM0PR01MB1234.eurprd01.prod.exchangelabs.com]",
        ),
        (250, "2.1.5 Recipient OK"),
        (235, "2.7.0 Authentication successful"),
        (220, "2.0.0 SMTP server ready"),
    ],
)
def test_positive_replies_are_delivered(stage: Stage, code: int, text: str) -> None:
    r = reply(code, text)
    assert core(classify_reply(stage, r)) == Decision(Verdict.DELIVERED, r)


def test_the_exchange_samples_named_in_the_design() -> None:
    send_as = reply(554, "5.2.252 SendAsDenied; a@x.example not allowed to send as b@x.example")
    concurrency = reply(432, "4.3.2 Concurrent connections limit exceeded.")
    disabled = reply(
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
        "disabled for the Mailbox.",
    )
    assert classify_reply(Stage.EOD, send_as).verdict is Verdict.FAIL
    assert classify_reply(Stage.MAIL, concurrency).verdict is Verdict.DEFER
    assert classify_reply(Stage.AUTH, disabled).verdict is Verdict.DEFER
    assert send_as.enhanced == "5.2.252"
    assert concurrency.enhanced == "4.3.2"
    assert disabled.enhanced == "5.7.139"


@given(st.sampled_from(list(Stage)), st.integers(min_value=400, max_value=599))
def test_every_negative_reply_gets_a_verdict_and_only_5xx_fails(stage: Stage, code: int) -> None:
    decision = classify_reply(stage, SmtpReply(code))
    assert decision.verdict in (Verdict.DEFER, Verdict.FAIL)
    assert (decision.verdict is Verdict.FAIL) == (
        code >= 500
        and stage not in (Stage.CONNECT, Stage.TLS, Stage.AUTH)
        and not (stage is Stage.MAIL and code == 530)
        and not (stage is Stage.RCPT and code == 552)
    )


# --- classify_error -------------------------------------------------------------------------------


def test_upstream_error_with_reply_is_classified_by_the_table() -> None:
    refused = reply(535, "5.7.3 Authentication unsuccessful")
    error = UpstreamError("auth", "authentication refused", refused)
    assert core(classify_error(error)) == Decision(
        Verdict.DEFER, refused, refresh_token=True, session_ok=False
    )
    assert core(classify_error(error, after_data_sent=True)) == Decision(
        Verdict.DEFER, refused, refresh_token=True, session_ok=False
    )


def test_upstream_error_with_a_permanent_reply_after_the_data_fails() -> None:
    denied = reply(554, "5.2.252 SendAsDenied; a@x.example not allowed to send as b@x.example")
    assert core(classify_error(UpstreamError("eod", "refused", denied))) == Decision(
        Verdict.FAIL, denied
    )


def test_upstream_error_with_an_unknown_stage_counts_as_connect() -> None:
    refused = reply(554, "5.7.1 Access denied")
    assert core(classify_error(UpstreamError("greeting", "refused", refused))) == Decision(
        Verdict.DEFER, refused, session_ok=False
    )


def test_upstream_error_carrying_a_positive_reply_is_not_delivered() -> None:
    odd = reply(250, "2.0.0 OK")
    assert core(classify_error(UpstreamError("connect", "odd", odd))) == Decision(
        Verdict.DEFER, odd, session_ok=False
    )


@pytest.mark.parametrize("after_data_sent", [False, True])
@pytest.mark.parametrize(
    ("error", "local_reply"),
    [
        (UpstreamError("connect", "ConnectionRefusedError: refused"), LOCAL_CONNECTION_LOST),
        (UpstreamError("rcpt", "connection lost: reset"), LOCAL_CONNECTION_LOST),
        (UpstreamTimeout("connect", "timed out while connecting"), LOCAL_TIMEOUT),
        (UpstreamTimeout("mail", "upstream stopped answering"), LOCAL_TIMEOUT),
        (TimeoutError(), LOCAL_TIMEOUT),
        (ConnectionResetError(104, "Connection reset by peer"), LOCAL_CONNECTION_LOST),
        (OSError(113, "No route to host"), LOCAL_CONNECTION_LOST),
        (RuntimeError("something nobody expected"), LOCAL_UNKNOWN),
        (KeyError("x"), LOCAL_UNKNOWN),
    ],
)
def test_errors_without_a_reply_defer_with_a_local_reply(
    error: BaseException, local_reply: SmtpReply, after_data_sent: bool
) -> None:
    assert core(classify_error(error, after_data_sent=after_data_sent)) == Decision(
        Verdict.DEFER, local_reply, ambiguous=after_data_sent, session_ok=False
    )


@pytest.mark.parametrize("after_data_sent", [False, True])
@pytest.mark.parametrize(
    ("error", "local_reply"),
    [
        (UpstreamError("eod", "connection lost: reset"), LOCAL_CONNECTION_LOST),
        (UpstreamTimeout("eod", "upstream stopped answering"), LOCAL_TIMEOUT),
    ],
)
def test_connection_lost_at_end_of_data_is_ambiguous(
    error: BaseException, local_reply: SmtpReply, after_data_sent: bool
) -> None:
    # The dot may have reached Exchange: a resend may duplicate the message.
    assert core(classify_error(error, after_data_sent=after_data_sent)) == Decision(
        Verdict.DEFER, local_reply, ambiguous=True, session_ok=False
    )


@pytest.mark.parametrize("after_data_sent", [False, True])
def test_token_error_defers_and_is_never_ambiguous(after_data_sent: bool) -> None:
    error = TokenError("invalid_client", aadsts=7000215, http_status=401)
    assert core(classify_error(error, after_data_sent=after_data_sent)) == Decision(
        Verdict.DEFER, LOCAL_TOKEN_FAILURE, session_ok=False
    )


def test_local_replies_are_transient_and_carry_no_detail() -> None:
    assert [
        str(r) for r in (LOCAL_TIMEOUT, LOCAL_CONNECTION_LOST, LOCAL_TOKEN_FAILURE, LOCAL_UNKNOWN)
    ] == [
        "451 4.4.2 upstream timed out",
        "451 4.4.2 upstream connection lost",
        "451 4.7.0 could not obtain an access token",
        "451 4.3.0 unexpected error while delivering",
    ]


# --- retry schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [
        (0, 60.0),
        (1, 60.0),
        (2, 120.0),
        (3, 240.0),
        (4, 480.0),
        (5, 960.0),
        (6, 1920.0),
        (7, 3600.0),
        (8, 3600.0),
        (100, 3600.0),
        (10_000, 3600.0),
    ],
)
def test_retry_delay_doubles_from_initial_and_is_capped(attempts: int, expected: float) -> None:
    assert retry_delay(attempts, 60.0, 3600.0, 0.0) == expected


@pytest.mark.parametrize(
    ("rand", "expected"),
    [
        (0.0, 240.0),
        (0.5, 216.0),
        (0.999, 240.0 * (1 - 0.2 * 0.999)),
        (1.0, 192.0),
        (-3.0, 240.0),
        (7.0, 192.0),
    ],
)
def test_retry_jitter_shortens_by_at_most_20_percent(rand: float, expected: float) -> None:
    assert JITTER == 0.2
    assert retry_delay(3, 60.0, 3600.0, rand) == pytest.approx(expected, rel=1e-12)


def test_next_attempt_adds_the_delay_to_now() -> None:
    assert next_attempt(3, 1_000_000.0, 60.0, 3600.0, 0.0) == 1_000_240.0
    assert next_attempt(1, 50.0, 10.0, 300.0, 0.5) == 59.0
    assert next_attempt(30, 0.0, 10.0, 300.0, 1.0) == 240.0


backoff_params = st.tuples(
    st.floats(min_value=0.001, max_value=10_000, allow_nan=False, allow_infinity=False),
    st.floats(min_value=1.0, max_value=1000.0, allow_nan=False, allow_infinity=False),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
).map(lambda t: (t[0], t[0] * t[1], t[2]))  # (initial, maximum >= initial, rand)


@given(backoff_params, st.integers(min_value=0, max_value=200))
def test_retry_delay_is_monotone_in_attempts(params, attempts: int) -> None:
    initial, maximum, rand = params
    assert retry_delay(attempts, initial, maximum, rand) <= retry_delay(
        attempts + 1, initial, maximum, rand
    )


@given(backoff_params, st.integers(min_value=1, max_value=200))
def test_retry_delay_stays_within_its_bounds(params, attempts: int) -> None:
    initial, maximum, rand = params
    base = min(maximum, initial * 2.0 ** (attempts - 1))
    delay = retry_delay(attempts, initial, maximum, rand)
    assert 0.8 * base <= delay <= base <= maximum


@pytest.mark.parametrize(
    ("received_at", "now", "max_age", "expected"),
    [
        (1000.0, 1000.0, 432_000.0, False),
        (1000.0, 1000.0 + 432_000.0 - 0.001, 432_000.0, False),
        (1000.0, 1000.0 + 432_000.0, 432_000.0, True),
        (1000.0, 1000.0 + 432_001.0, 432_000.0, True),
        (1000.0, 500.0, 60.0, False),  # clock stepped back: not expired
    ],
)
def test_expired(received_at: float, now: float, max_age: float, expected: bool) -> None:
    assert expired(received_at, now, max_age) is expected


ACTIONS = [
    (
        Stage.MAIL,
        421,
        "4.4.2 Message submission rate for this client has exceeded the configured limit",
        Action.PAUSE_UPSTREAM,
    ),
    (Stage.MAIL, 432, "4.3.2 Concurrent connections limit exceeded.", Action.PAUSE_UPSTREAM),
    (
        Stage.EOD,
        421,
        "4.3.2 Service not available, closing transmission channel",
        Action.RETRY_MESSAGE,
    ),
    (
        Stage.AUTH,
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        Action.PAUSE_UPSTREAM,
    ),
    (Stage.AUTH, 535, "5.7.3 Authentication unsuccessful", Action.PAUSE_UPSTREAM),
    (Stage.CONNECT, 554, "5.7.1 Access denied", Action.PAUSE_UPSTREAM),
    (
        Stage.EOD,
        554,
        "5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException",
        Action.PAUSE_UPSTREAM,
    ),
    (Stage.RCPT, 552, "5.5.3 Too many recipients", Action.RETRY_RECIPIENT),
    (Stage.RCPT, 452, "4.5.3 Too many recipients", Action.RETRY_RECIPIENT),
    (Stage.EOD, 451, "4.7.500 Server busy. Please try again later", Action.PAUSE_UPSTREAM),
    (Stage.EOD, 451, "4.4.0 STOREDRV.Submission.Exception:StorageTransient", Action.RETRY_MESSAGE),
    (Stage.RCPT, 550, "5.1.10 RESOLVER.ADR.RecipientNotFound", Action.FAIL_RECIPIENT),
    (Stage.EOD, 554, "5.2.252 SendAsDenied; a not allowed to send as b", Action.FAIL_MESSAGE),
    (Stage.EOD, 250, "2.0.0 OK <id> [Hostname=x]", Action.DELIVER),
]


@pytest.mark.parametrize(("stage", "code", "text", "action"), ACTIONS)
def test_each_reply_maps_to_an_operator_action(
    stage: Stage, code: int, text: str, action: Action
) -> None:
    assert classify_reply(stage, reply(code, text)).action is action


def test_every_row_that_pauses_the_upstream_tells_the_admin_what_to_fix() -> None:
    for rule in REPLY_RULES:
        if rule.action is Action.PAUSE_UPSTREAM:
            assert rule.hint, rule.note
            assert rule.pause or rule.refresh_token or rule.stages, rule.note


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (7000215, "Value, not its Secret ID"),
        (7000222, "expired"),
        (700016, "client_id"),
        (90002, "tenant_id"),
        (700027, "upload this certificate"),
        (None, "app registration"),
    ],
)
def test_token_errors_pause_the_upstream_with_the_aadsts_fix(code: int | None, fix: str) -> None:
    decision = classify_error(TokenError("invalid_client", aadsts=code))
    assert decision.action is Action.PAUSE_UPSTREAM
    assert decision.verdict is Verdict.DEFER
    assert fix in decision.hint


# --- header size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "limit", "too_large"),
    [
        (b"Subject: x\r\n\r\n" + b"b" * 5000, 1024, False),
        (b"Subject: x\n\n" + b"b" * 5000, 1024, False),
        (b"X: " + b"h" * 2000 + b"\r\n\r\nbody", 1024, True),
        (b"X: " + b"h" * 1015 + b"\r\n\r\n", 1024, False),  # the header is exactly 1020 bytes
        (b"no empty line at all " * 100, 1024, True),
        (b"short, no empty line", 1024, False),
    ],
)
def test_header_too_large(data: bytes, limit: int, too_large: bool) -> None:
    assert header_too_large(data, limit) is too_large


@given(
    data=st.lists(st.sampled_from([b"X: v", b"\r\n", b"\n", b"\r", b"h" * 40]), max_size=60).map(
        b"".join
    ),
    limit=st.integers(0, 400),
)
def test_header_too_large_matches_the_first_empty_line_whatever_its_line_ends(
    data: bytes, limit: int
) -> None:
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    assert header_too_large(data, limit) is ((min(ends) if ends else len(data)) > limit)
