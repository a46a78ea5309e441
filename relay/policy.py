"""Decisions, as pure functions: who may connect, what an upstream outcome means, when to retry.

One job: every decision the relay makes about a client or a delivery outcome. Imports no
asyncio, socket or filesystem code; time and randomness are passed in, so every rule is tested
from a table without sockets. The upstream adapter turns library exceptions into UpstreamError
before they get here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from relay.errors import TokenError, UpstreamError, UpstreamTimeout
from relay.replies import SmtpReply

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- who may connect ---------------------------------------------------------------------------


def peer_allowed(address: str, networks: Sequence[Network]) -> bool:
    """True when `address` lies in one of `networks`. Fails closed on anything unparseable."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


def parse_network_list(networks: Sequence[str]) -> tuple[Network, ...]:
    """Validated CIDR strings (the config checked them) as networks."""
    return tuple(ipaddress.ip_network(network, strict=True) for network in networks)


def recipient_limit_reached(current: int, limit: int) -> bool:
    """True when a message already has `limit` recipients and must refuse one more."""
    return current >= limit


def address_matches(address: str, patterns: Sequence[str]) -> bool:
    """`address` is one of `patterns` (lower-case addresses and "@domain"s), ignoring case."""
    address = address.lower()
    domain = "@" + address.rpartition("@")[2] if "@" in address else None
    return any(pattern in (address, domain) for pattern in patterns)


def recipient_domain_allowed(address: str, domains: Sequence[str]) -> bool:
    """An empty list allows every domain; otherwise the recipient's domain must be listed
    exactly (lower-case, no subdomains: a compromised device must not mail the world)."""
    if not domains:
        return True
    return "@" in address and address.rpartition("@")[2].lower() in domains


def header_too_large(data: bytes, limit: int) -> bool:
    """The header block (up to the first empty line, CRLF or bare LF) is over `limit` bytes.
    A message without an empty line is all header."""
    window = limit + 4  # never searches a large body past the limit
    crlf = data.find(b"\r\n\r\n", 0, window)
    lf = data.find(b"\n\n", 0, window if crlf < 0 else crlf)  # only an earlier one matters
    ends = [i for i in (crlf, lf) if i >= 0]
    header = min(ends) if ends else len(data)
    return header > limit


_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^<>\s]{1,500}>)")


def header_message_id(data: bytes) -> str:
    """The Message-ID: of a (normalised) message, for the log line that traces it."""
    end = data.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(data[: end if end >= 0 else min(len(data), 65536)])
    return match.group(1).decode("ascii", "replace") if match else ""


# --- what an outcome means ---------------------------------------------------------------------


class Stage(StrEnum):
    """Where in an upstream session an outcome happened."""

    CONNECT = "connect"
    TLS = "tls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    EOD = "eod"  # the reply after the final "."


class Verdict(StrEnum):
    DELIVERED = "delivered"
    DEFER = "defer"
    FAIL = "fail"


class Action(StrEnum):
    """What a reply means for the queue, as an operator reads it."""

    DELIVER = "deliver"
    RETRY_MESSAGE = "retry message"
    RETRY_RECIPIENT = "retry recipient"
    FAIL_RECIPIENT = "fail recipient"
    FAIL_MESSAGE = "fail message"
    PAUSE_UPSTREAM = "pause upstream"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reply: SmtpReply
    refresh_token: bool = False  # the token was refused: fetch a fresh one before the next AUTH
    ambiguous: bool = False  # the upstream may have accepted the message (lost after the dot)
    session_ok: bool = True  # the SMTP session can carry the next message
    pause: float = 0.0  # seconds to open no new upstream session (throttling, tenant problems)
    action: Action = Action.RETRY_MESSAGE
    hint: str = ""  # what an admin should fix, when it is not the message's fault


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the reply classification table; the first matching row decides."""

    verdict: Verdict
    stages: frozenset[Stage] = frozenset()  # empty = any stage
    code: int | None = None
    enhanced_prefix: str = ""
    code_class: int | None = None  # 4 or 5
    text_contains: str = ""  # case-insensitive; for Exchange texts that share a code
    refresh_token: bool = False
    session_ok: bool = True
    pause: float = 0.0
    note: str = ""
    action: Action | None = None  # None: from the verdict and the stage
    hint: str = ""

    def action_at(self, stage: Stage) -> Action:
        if self.action is not None:
            return self.action
        per_recipient = stage is Stage.RCPT
        if self.verdict is Verdict.FAIL:
            return Action.FAIL_RECIPIENT if per_recipient else Action.FAIL_MESSAGE
        return Action.RETRY_RECIPIENT if per_recipient else Action.RETRY_MESSAGE

    def matches(self, stage: Stage, reply: SmtpReply) -> bool:
        return (
            (not self.stages or stage in self.stages)
            and (self.code is None or reply.code == self.code)
            and (self.code_class is None or reply.code // 100 == self.code_class)
            and _enhanced_matches(reply.enhanced, self.enhanced_prefix)
            and self.text_contains.lower() in reply.text.lower()
        )


def _enhanced_matches(enhanced: str, pattern: str) -> bool:
    """'5.2.2' matches 5.2.2 itself and never 5.2.252; '5.7' matches every 5.7.x."""
    return not pattern or enhanced == pattern or enhanced.startswith(pattern + ".")


SESSION_STAGES = frozenset({Stage.CONNECT, Stage.TLS, Stage.AUTH})
RATE_PAUSE = 60.0  # Exchange counts 30 messages per rolling minute and mailbox
CONCURRENCY_PAUSE = 10.0
TENANT_PAUSE = 300.0  # a problem only an admin can fix: retry rarely, keep everything queued


LOGIN_FIRST = (
    "the upstream wants a login first: for Exchange Online check host and port "
    '(smtp.office365.com:587); for kind = "smtp" set auth, username and password'
)


def _tenant_problem(enhanced: str, note: str, hint: str, text: str = "") -> Rule:
    """A reply that no retry of this message can fix: keep the queue, pause, alert."""
    return Rule(
        Verdict.DEFER,
        enhanced_prefix=enhanced,
        text_contains=text,
        session_ok=False,
        pause=TENANT_PAUSE,
        note=note,
        action=Action.PAUSE_UPSTREAM,
        hint=hint,
    )


REPLY_RULES: tuple[Rule, ...] = (
    Rule(
        Verdict.DEFER,
        code=421,
        enhanced_prefix="4.4.2",
        text_contains="submission rate",
        session_ok=False,
        pause=RATE_PAUSE,
        note="30 messages a minute per mailbox exceeded: slow down",
        action=Action.PAUSE_UPSTREAM,
        hint="Exchange throttled the mailbox; lower [upstream] messages_per_minute if it recurs",
    ),
    Rule(
        Verdict.DEFER,
        code=432,
        enhanced_prefix="4.3.2",
        session_ok=False,
        pause=CONCURRENCY_PAUSE,
        note="more than 3 concurrent connections for the mailbox",
        action=Action.PAUSE_UPSTREAM,
        hint="another client uses the same mailbox; lower [upstream] connections",
    ),
    Rule(
        Verdict.DEFER,
        code=451,
        enhanced_prefix="4.7.500",
        session_ok=False,
        pause=RATE_PAUSE,
        note="server busy: Exchange throttles this sender",
        action=Action.PAUSE_UPSTREAM,
        hint="Exchange throttled the connection; it passes by itself",
    ),
    Rule(Verdict.DEFER, code=421, session_ok=False, note="server closing the channel"),
    _tenant_problem(
        "5.7.139",
        "SMTP AUTH disabled for the tenant or mailbox, or blocked by policy",
        "Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false; check "
        "Security Defaults and Conditional Access",
    ),
    _tenant_problem(
        "5.7.57",
        "not authenticated: a relay or configuration bug",
        LOGIN_FIRST,
    ),
    Rule(
        Verdict.DEFER,
        stages=frozenset({Stage.MAIL}),
        code=530,
        session_ok=False,
        pause=TENANT_PAUSE,
        note="530 at MAIL: authentication required, whatever the enhanced code says",
        action=Action.PAUSE_UPSTREAM,
        hint=LOGIN_FIRST,
    ),
    _tenant_problem(
        "5.2.2",
        "the sending mailbox is full (Sent Items)",
        "empty Sent Items or add a retention policy for it (every message sent is kept there)",
    ),
    _tenant_problem(
        "5.2.0",
        "daily recipient quota of the mailbox reached",
        "10,000 recipients a day per mailbox: wait, or spread the traffic over mailboxes",
        "SubmissionQuotaExceeded",
    ),
    _tenant_problem(
        "5.1.90",
        "daily recipient limit of the mailbox reached",
        "10,000 recipients a day per mailbox: wait, or spread the traffic over mailboxes",
    ),
    _tenant_problem(
        "5.7.705",
        "tenant blocked for sending spam",
        "the tenant is blocked for spam: open a case with Microsoft support",
    ),
    _tenant_problem(
        "5.7.708",
        "traffic from this IP not accepted",
        "Exchange refuses this IP (common on new or trial tenants): contact Microsoft support",
    ),
    _tenant_problem(
        "5.7.750",
        "sender domain not registered in the tenant",
        "add the sender's domain as an accepted domain, or let the sender policy rewrite it",
    ),
    Rule(
        Verdict.DEFER,
        stages=frozenset({Stage.AUTH}),
        code=535,
        refresh_token=True,
        session_ok=False,
        note="token refused: refresh once, keep the message queued",
        action=Action.PAUSE_UPSTREAM,
        hint="check the SMTP.SendAsApp consent, New-ServicePrincipal, Add-MailboxPermission "
        "FullAccess, and that [upstream] mailbox exists",
    ),
    Rule(
        Verdict.DEFER,
        stages=SESSION_STAGES,
        code_class=5,
        session_ok=False,
        note="session set-up refused: a configuration problem, not the message's fault",
        action=Action.PAUSE_UPSTREAM,
        hint="check [upstream] host, port and TLS settings",
    ),
    Rule(
        Verdict.DEFER,
        stages=frozenset({Stage.RCPT}),
        code=552,
        note="RFC 5321 4.5.3.1.10: 552 on RCPT means too many recipients",
    ),
    Rule(Verdict.DEFER, code_class=4, note="temporary failure"),
    Rule(Verdict.FAIL, code_class=5, note="permanent failure"),
)


def classify_reply(stage: Stage, reply: SmtpReply) -> Decision:
    """Turn one upstream reply into a decision. Positive replies are DELIVERED."""
    if reply.is_positive:
        return Decision(Verdict.DELIVERED, reply, action=Action.DELIVER)
    for rule in REPLY_RULES:
        if rule.matches(stage, reply):
            return Decision(
                rule.verdict,
                reply,
                refresh_token=rule.refresh_token,
                session_ok=rule.session_ok,
                pause=rule.pause,
                action=rule.action_at(stage),
                hint=rule.hint,
            )
    return Decision(Verdict.DEFER, reply, session_ok=False)


LOCAL_TIMEOUT = SmtpReply(451, "4.4.2", "upstream timed out")
LOCAL_CONNECTION_LOST = SmtpReply(451, "4.4.2", "upstream connection lost")
LOCAL_TOKEN_FAILURE = SmtpReply(451, "4.7.0", "could not obtain an access token")
LOCAL_UNKNOWN = SmtpReply(451, "4.3.0", "unexpected error while delivering")


def classify_error(error: BaseException, *, after_data_sent: bool = False) -> Decision:
    """Turn a failed attempt (no usable reply) into a decision. Unknown errors are temporary.

    A connection lost or timed out while the data was being sent (`after_data_sent`, or an
    UpstreamError at the EOD stage) is ambiguous: the upstream may have accepted the message,
    so a resend may duplicate it.
    """
    if isinstance(error, UpstreamError) and error.reply is not None:
        decision = classify_reply(_stage(error.stage), error.reply)
        if decision.verdict is Verdict.DELIVERED:
            return Decision(Verdict.DEFER, error.reply, session_ok=False)
        if error.hint:
            decision = replace(decision, hint=error.hint)
        if error.retry_after:
            decision = replace(decision, pause=error.retry_after, session_ok=False)
        return decision
    if isinstance(error, TokenError):
        return Decision(
            Verdict.DEFER,
            LOCAL_TOKEN_FAILURE,
            session_ok=False,
            action=Action.PAUSE_UPSTREAM,
            hint=aadsts_hint(error.aadsts, error.error),
        )
    reply = LOCAL_TIMEOUT if isinstance(error, UpstreamTimeout | TimeoutError) else None
    if reply is None:
        reply = (
            LOCAL_CONNECTION_LOST if isinstance(error, UpstreamError | OSError) else LOCAL_UNKNOWN
        )
    lost_in_data = isinstance(error, UpstreamError) and error.stage == Stage.EOD
    return Decision(
        Verdict.DEFER, reply, ambiguous=after_data_sent or lost_in_data, session_ok=False
    )


AADSTS_HINTS: dict[int, str] = {
    7000215: "wrong client secret: use the secret's Value, not its Secret ID",
    7000222: "the client secret expired: create a new one (Certificates & secrets)",
    700016: "unknown application: check client_id and tenant_id",
    90002: "tenant not found: check tenant_id and authority",
    700027: "certificate not accepted: upload this certificate to the app registration",
    700024: "client assertion outside its valid time: check the clock (NTP)",
    7000218: "no credential sent: set client_secret, client_secret_file or certificate_file",
    1002012: "invalid scope: use https://outlook.office365.com/.default",
    500011: "Exchange Online not found in the tenant: check scope and tenant",
}


def aadsts_hint(code: int | None, error: str = "") -> str:
    """What to fix for an Entra ID (AADSTS) error, in one line."""
    if code is not None and code in AADSTS_HINTS:
        return AADSTS_HINTS[code]
    if error in ("authority_unreachable", "token_endpoint_unreachable", "token_timeout"):
        return "the token endpoint cannot be reached: check DNS, proxy and firewall to Entra ID"
    return "token request refused: check the app registration and its credential"


def _stage(name: str) -> Stage:
    try:
        return Stage(name)
    except ValueError:
        return Stage.CONNECT


# --- when to retry -----------------------------------------------------------------------------

JITTER = 0.2


def retry_delay(attempts: int, initial: float, maximum: float, rand: float) -> float:
    """Delay before the next try after `attempts` failed ones: doubling from `initial`, capped
    at `maximum`, shortened by up to 20 % of jitter (`rand` in [0, 1)) so retries spread out."""
    exponent = max(0, min(attempts - 1, 62))
    base = min(maximum, initial * (2.0**exponent))
    return base * (1.0 - JITTER * min(max(rand, 0.0), 1.0))


def next_attempt(attempts: int, now: float, initial: float, maximum: float, rand: float) -> float:
    """The wall-clock time of the next try."""
    return now + retry_delay(attempts, initial, maximum, rand)


def expired(received_at: float, now: float, max_age: float) -> bool:
    """True when a message has been queued longer than `max_age` seconds."""
    return now - received_at >= max_age


# --- where a message goes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Every criterion given must match; each one matches if any of its entries does."""

    upstreams: tuple[str, ...]  # in order of preference: the later ones are fallbacks
    senders: tuple[str, ...] = ()  # lower-case addresses and "@domain"s
    networks: tuple[Network, ...] = ()
    listeners: tuple[str, ...] = ()

    def matches(self, sender: str, client: str, listener: str) -> bool:
        return (
            (not self.senders or address_matches(sender, self.senders))
            and (not self.networks or peer_allowed(client, self.networks))
            and (not self.listeners or listener in self.listeners)
        )


DEFAULT_ROUTE = ("default",)
Routed = tuple[str, tuple[str, ...]]  # the upstream a new message goes to, and its whole route


def choose_route(
    rules: Sequence[RouteRule], sender: str, client: str, listener: str
) -> tuple[str, ...]:
    """The upstreams of the first rule that matches the envelope sender, the client address
    and the listener the message came in on; `default` alone when none does."""
    for rule in rules:
        if rule.matches(sender, client, listener):
            return rule.upstreams
    return DEFAULT_ROUTE


def first_open(route: Sequence[str], closed: Callable[[str], bool]) -> str:
    """Where a new message goes: the first upstream of its route that is not closed (paused
    for anything but throttling); the first one when all are."""
    return next((name for name in route if not closed(name)), route[0])


def fallback_upstream(
    route: Sequence[str],
    current: str,
    refused: Sequence[str],
    closed: Callable[[str], bool],
    *,
    for_size: bool,
) -> str:
    """Where a message goes when `current` cannot take it; "" when it stays.

    Candidates are the other upstreams of its route that have not refused it for its size, in
    route order. When `current` closed (a set-up problem, an outage), only an open candidate
    helps. When `current` refused the message's size, a closed candidate still beats failing
    it: the message waits there until that one opens."""
    candidates = [name for name in route if name != current and name not in refused]
    open_ones = [name for name in candidates if not closed(name)]
    if open_ones:
        return open_ones[0]
    return candidates[0] if for_size and candidates else ""


SIZE_STATUSES = ("5.3.4", "5.2.3")  # RFC 3463: too big for the system; over a length limit


def refused_for_size(reply: SmtpReply) -> bool:
    """A permanent refusal of the message's size (another upstream may take it); a bare 552
    (no enhanced code) is the RFC 5321 reply for exceeded storage, i.e. size."""
    if reply.code == 552 and not reply.enhanced:
        return True
    return reply.code >= 500 and any(
        _enhanced_matches(reply.enhanced, status) for status in SIZE_STATUSES
    )
