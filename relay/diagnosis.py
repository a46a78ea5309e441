"""What `oauth-relay doctor` concludes: access-token claims and Exchange's refusals, as fixes.

One job: turn what the doctor observed (a token's claims, a reply from Exchange Online) into a
verdict and the fix in plain words, with the admin's own ids filled in. Pure: no I/O, no
logging, injected time. The token is decoded only to read its claims; its signature is not
checked (Exchange does that) and the token itself is never returned or printed.

Facts used (design/exchange-online.md §2.6, §3.2, §3.5): the audience Exchange accepts, the
`SMTP.SendAsApp` application role (absent under App RBAC), `oid` = the service principal id
that `New-ServicePrincipal` and `Add-MailboxPermission` name, and the reply codes 5.7.139
(SMTP AUTH off), 5.7.3 (token refused), 5.7.57 (not authenticated), 5.7.60 and 5.2.252 (no
Send As right).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relay.replies import SmtpReply

SEND_AS_ROLE = "SMTP.SendAsApp"
EXCHANGE_AUDIENCES = frozenset(
    {
        "https://outlook.office365.com",
        "https://outlook.office.com",
        "00000002-0000-0ff1-ce00-000000000000",  # Exchange Online's app id, in some tokens
    }
)
CLOCK_SKEW = 300.0  # Exchange's tolerance for nbf/exp, and Entra's for client assertions
_GUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class Finding:
    """One conclusion: `ok` False is a failure, `warning` a doubt that does not stop the run."""

    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False


@dataclass(frozen=True)
class Ids:
    """The admin's own names, so that each fix can be pasted as it is."""

    mailbox: str
    client_id: str
    service_principal: str = "<service principal object id>"


def decode_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT access token (payload only, unverified). ValueError if it is not
    one: Entra's Exchange tokens are JWTs, so that is itself a finding."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("the access token is not a JWT")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the access token's claims cannot be decoded") from exc
    if not isinstance(claims, dict):
        raise ValueError("the access token's claims are not an object")
    return claims


def roles_of(claims: Mapping[str, Any]) -> list[str]:
    roles = claims.get("roles") or []
    return [roles] if isinstance(roles, str) else [str(role) for role in roles]


def describe_claims(claims: Mapping[str, Any]) -> str:
    """One line an admin can compare with the Entra portal; nothing secret in it."""
    expires = _utc(claims.get("exp"))
    return (
        f"aud={claims.get('aud', '?')} tid={claims.get('tid', '?')} "
        f"app={claims.get('appid') or claims.get('azp') or '?'} "
        f"roles={','.join(roles_of(claims)) or '(none)'} expires={expires}"
    )


GRAPH_AUDIENCES = frozenset({"https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"})
GRAPH_ROLE = "Mail.Send"


def check_claims(
    claims: Mapping[str, Any],
    *,
    tenant_id: str,
    client_id: str,
    now: float,
    local_expiry: float | None = None,
    graph: bool = False,
) -> list[Finding]:
    """Everything in the claims that Exchange Online would refuse, worst first. An empty list
    means the token looks right. `local_expiry` is now + the `expires_in` Entra answered with:
    its distance to the `exp` claim is the clock difference (Entra backdates `iat` and `nbf`
    by five minutes, so those say nothing about the clock)."""
    findings: list[Finding] = []
    audience = str(claims.get("aud", "")).rstrip("/")
    if graph and audience not in GRAPH_AUDIENCES:
        findings.append(
            Finding(
                False,
                f"the token is for {audience or 'no audience'}, not Microsoft Graph",
                'set [upstream.oauth] scope = "https://graph.microsoft.com/.default" (or leave '
                "it unset)",
            )
        )
    elif not graph and audience not in EXCHANGE_AUDIENCES:
        findings.append(
            Finding(
                False,
                f"the token is for {audience or 'no audience'}, not Exchange Online",
                'set [upstream.oauth] scope = "https://outlook.office365.com/.default" '
                "(a Graph token is refused by SMTP)",
            )
        )
    tid = str(claims.get("tid", ""))
    if _GUID.fullmatch(tenant_id) and tid.lower() != tenant_id.lower():
        findings.append(
            Finding(
                False,
                f"the token is from tenant {tid or '?'}, not {tenant_id}",
                "check [upstream.oauth] tenant_id and authority",
            )
        )
    app = str(claims.get("appid") or claims.get("azp") or "")
    if app and app.lower() != client_id.lower():
        findings.append(
            Finding(
                False,
                f"the token names app {app}, not {client_id}",
                "check [upstream.oauth] client_id",
            )
        )
    findings.extend(_time_findings(claims, now, local_expiry))
    if graph:
        if GRAPH_ROLE not in roles_of(claims):
            findings.append(
                Finding(
                    False,
                    f"no {GRAPH_ROLE} role in the token: Graph refuses to send",
                    f"in Entra ID > App registrations > {client_id} > API permissions: add "
                    f"'Microsoft Graph' > Application permissions > {GRAPH_ROLE}, then "
                    "'Grant admin consent'",
                )
            )
        return findings
    if SEND_AS_ROLE not in roles_of(claims):
        findings.append(
            Finding(
                True,
                f"no {SEND_AS_ROLE} role in the token: Exchange refuses it unless the app is "
                "authorised through App RBAC",
                role_fix(client_id),
                warning=True,
            )
        )
    return findings


def _time_findings(
    claims: Mapping[str, Any], now: float, local_expiry: float | None
) -> list[Finding]:
    findings: list[Finding] = []
    expires = claims.get("exp")
    if not isinstance(expires, int | float):
        return [Finding(False, "the token has no expiry (exp)", "check [upstream.oauth] authority")]
    if expires < now - CLOCK_SKEW:
        findings.append(
            Finding(
                False,
                f"the token expired at {_utc(expires)} by this machine's clock",
                "set the clock right (NTP): tokens and client assertions depend on it",
            )
        )
    elif local_expiry is not None and abs(expires - local_expiry) > CLOCK_SKEW:
        findings.append(
            Finding(
                True,
                f"this machine's clock is {abs(expires - local_expiry) / 60:.0f} min off "
                "Entra ID's",
                "set the clock right (NTP): certificate credentials fail with AADSTS700024 "
                "when it drifts",
                warning=True,
            )
        )
    return findings


def role_fix(client_id: str) -> str:
    return (
        f"in Entra ID > App registrations > {client_id} > API permissions: add "
        f"'Office 365 Exchange Online' > Application permissions > {SEND_AS_ROLE}, then "
        "'Grant admin consent' (or use App RBAC: New-ManagementRoleAssignment -Role "
        f'"Application {SEND_AS_ROLE}" -App {client_id})'
    )


def auth_fix(reply: SmtpReply, ids: Ids, *, role_missing: bool) -> str:
    """The fix for a refused `AUTH XOAUTH2`."""
    text = reply.text.lower()
    if reply.enhanced == "5.7.139":
        if "for the tenant" in text:
            return (
                "SMTP AUTH is off for the whole organisation: turn it on for this mailbox "
                f"only with Set-CASMailbox -Identity {ids.mailbox} "
                "-SmtpClientAuthenticationDisabled $false (or for everyone: "
                "Set-TransportConfig -SmtpClientAuthenticationDisabled $false)"
            )
        if "security defaults" in text:
            return (
                "Security Defaults block SMTP AUTH: turn them off in Entra ID > Properties, "
                "or use Conditional Access instead"
            )
        if "did not meet the criteria" in text or "conditional access" in text:
            return (
                "a Conditional Access policy blocks this app: exclude it (workload identity) "
                "or allow the relay's public IP"
            )
        return (
            f"SMTP AUTH is off for the mailbox: Set-CASMailbox -Identity {ids.mailbox} "
            "-SmtpClientAuthenticationDisabled $false"
        )
    if reply.enhanced == "5.7.3" or reply.code == 535:
        if role_missing:
            return "the token has no SMTP.SendAsApp role: " + role_fix(ids.client_id)
        return (
            "Exchange does not let this app use the mailbox. In Exchange Online PowerShell: "
            f"New-ServicePrincipal -AppId {ids.client_id} -ObjectId {ids.service_principal}; "
            f"Add-MailboxPermission -Identity {ids.mailbox} -User {ids.service_principal} "
            f"-AccessRights FullAccess. Check that {ids.mailbox} exists and is licensed; "
            "changes can take 30 minutes to apply"
        )
    if reply.enhanced == "5.7.57":
        return "Exchange saw no login: check [upstream] host and port (smtp.office365.com:587)"
    if reply.enhanced == "5.7.4" or reply.code == 504:
        return "the server does not take XOAUTH2: check [upstream] host and port"
    if reply.code == 421 and "tls" in text:
        return "Exchange refused the TLS version: the relay needs TLS 1.2 or newer"
    return "check the app registration, the mailbox and [upstream] host and port"


def send_as_fix(reply: SmtpReply, address: str, mailbox: str) -> str:
    """The fix when Exchange will not let `mailbox` send as `address` (5.7.60, 5.2.252)."""
    if not is_send_as_refusal(reply):
        return "an unexpected refusal of the sender: see the reply"
    if address.lower() == mailbox.lower():
        return f"{mailbox} may not send as itself: check that the mailbox exists and is licensed"
    return (
        f"give {mailbox} the Send As right on {address}: Add-RecipientPermission -Identity "
        f"{address} -Trustee {mailbox} -AccessRights SendAs (if {address} is an alias of "
        f"{mailbox}: Set-OrganizationConfig -SendFromAliasEnabled $true); or remove it from "
        '[upstream] send_as and let from_header = "rewrite" replace it'
    )


def is_send_as_refusal(reply: SmtpReply) -> bool:
    return (
        reply.enhanced in ("5.7.60", "5.2.252")
        or "sendasdenied" in reply.text.lower()
        or "send as" in reply.text.lower()
    )


def tls_fix(error: str, host: str) -> str:
    """The fix for a failed TLS handshake or certificate check."""
    lowered = error.lower()
    if "self-signed" in lowered or "unable to get local issuer" in lowered:
        return (
            f"something between this machine and {host} replaces its certificate (a firewall "
            "or proxy inspecting TLS): exempt the host, or set [upstream] tls_ca_file to that "
            "device's CA certificate"
        )
    if "hostname mismatch" in lowered or "doesn't match" in lowered:
        return f"the certificate is not for {host}: check [upstream] host"
    if "expired" in lowered:
        return "the server's certificate has expired, or this machine's clock is wrong (NTP)"
    if "version" in lowered or "protocol" in lowered:
        return "no common TLS version: the relay needs TLS 1.2 or newer"
    return f"check [upstream] host and tls_ca_file, and that nothing intercepts TLS to {host}"


def _utc(epoch: object) -> str:
    if not isinstance(epoch, int | float):
        return "?"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")
