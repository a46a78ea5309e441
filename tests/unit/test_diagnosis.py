"""The doctor's conclusions, without sockets: token claims and Exchange's refusals as fixes."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from relay.diagnosis import (
    Ids,
    auth_fix,
    check_claims,
    decode_claims,
    describe_claims,
    is_send_as_refusal,
    send_as_fix,
    tls_fix,
)
from relay.replies import SmtpReply

TENANT = "3f6c2a1e-8b4d-4e27-9a51-7c0d2e9b4f18"
APP = "11111111-2222-3333-4444-555555555555"
NOW = 1_800_000_000.0
IDS = Ids("relay@contoso.com", APP, "9a8b7c6d-0000-4000-8000-000000000001")


def jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def good_claims(**changes: Any) -> dict[str, Any]:
    claims = {
        "aud": "https://outlook.office365.com",
        "tid": TENANT,
        "appid": APP,
        "oid": IDS.service_principal,
        "roles": ["SMTP.SendAsApp"],
        "iat": NOW - 300,
        "exp": NOW + 3600,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def findings(claims: dict[str, Any], **kwargs: Any) -> list[Any]:
    return check_claims(claims, tenant_id=TENANT, client_id=APP, now=NOW, **kwargs)


def test_decode_reads_the_payload_of_a_jwt_without_padding() -> None:
    assert decode_claims(jwt(good_claims()))["tid"] == TENANT


@pytest.mark.parametrize("token", ["opaque-token", "a.b", "a.!!!.c", f"a.{'W10'}.c"])
def test_decode_refuses_what_is_not_a_jwt(token: str) -> None:
    with pytest.raises(ValueError, match="token"):
        decode_claims(token)


def test_good_claims_have_no_findings_and_describe_without_the_token() -> None:
    assert findings(good_claims(), local_expiry=NOW + 3600) == []
    line = describe_claims(good_claims())
    assert "roles=SMTP.SendAsApp" in line and f"tid={TENANT}" in line and "UTC" in line


@pytest.mark.parametrize(
    "audience", ["https://outlook.office.com", "https://outlook.office365.com/"]
)
def test_both_exchange_audiences_are_accepted(audience: str) -> None:
    assert findings(good_claims(aud=audience)) == []


def test_a_graph_token_fails_with_the_scope_fix() -> None:
    (finding,) = findings(good_claims(aud="https://graph.microsoft.com"))
    assert not finding.ok and "outlook.office365.com/.default" in finding.fix


def test_another_tenant_or_app_fails() -> None:
    other = findings(good_claims(tid="00000000-0000-0000-0000-000000000000", appid="x"))
    assert [f.ok for f in other] == [False, False]
    assert "tenant_id" in other[0].fix and "client_id" in other[1].fix


def test_a_domain_tenant_id_is_not_compared_with_the_guid() -> None:
    claims = good_claims()
    assert check_claims(claims, tenant_id="contoso.onmicrosoft.com", client_id=APP, now=NOW) == []


def test_a_missing_role_is_a_warning_with_the_consent_fix() -> None:
    (finding,) = findings(good_claims(roles=None))
    assert finding.ok and finding.warning
    assert "Grant admin consent" in finding.fix and "App RBAC" in finding.fix


def test_an_expired_token_and_a_wrong_clock() -> None:
    (expired,) = findings(good_claims(exp=NOW - 3600))
    assert not expired.ok and "NTP" in expired.fix
    (skewed,) = findings(good_claims(), local_expiry=NOW + 3600 + 900)
    assert skewed.warning and "15 min" in skewed.detail
    assert findings(good_claims(), local_expiry=NOW + 3600 + 120) == []


def reply(code: int, text: str) -> SmtpReply:
    return SmtpReply.parse(code, text)


def test_smtp_auth_disabled_for_the_tenant_or_the_mailbox() -> None:
    tenant = reply(
        535,
        "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
    )
    mailbox = reply(535, "5.7.139 Authentication unsuccessful, ... disabled for the Mailbox.")
    command = "Set-CASMailbox -Identity relay@contoso.com -SmtpClientAuthenticationDisabled $false"
    assert command in auth_fix(tenant, IDS, role_missing=False)
    assert "Set-TransportConfig" in auth_fix(tenant, IDS, role_missing=False)
    assert command in auth_fix(mailbox, IDS, role_missing=False)
    assert "Set-TransportConfig" not in auth_fix(mailbox, IDS, role_missing=False)


def test_security_defaults_and_conditional_access() -> None:
    defaults = reply(535, "5.7.139 ... user is locked by your organization's security defaults")
    policy = reply(535, "5.7.139 ... the request did not meet the criteria to be authenticated")
    assert "Security Defaults" in auth_fix(defaults, IDS, role_missing=False)
    assert "Conditional Access" in auth_fix(policy, IDS, role_missing=False)


def test_a_refused_token_names_the_service_principal_commands_or_the_role() -> None:
    refused = reply(535, "5.7.3 Authentication unsuccessful [X 2026-11-29T10:00:00Z 08DE]")
    fix = auth_fix(refused, IDS, role_missing=False)
    assert f"New-ServicePrincipal -AppId {APP} -ObjectId {IDS.service_principal}" in fix
    assert f"-User {IDS.service_principal} -AccessRights FullAccess" in fix
    assert "SMTP.SendAsApp" in auth_fix(refused, IDS, role_missing=True)


def test_not_authenticated_points_at_host_and_port() -> None:
    fix = auth_fix(
        reply(530, "5.7.57 Client not authenticated to send mail."), IDS, role_missing=False
    )
    assert "smtp.office365.com:587" in fix


@pytest.mark.parametrize(
    "refusal",
    [
        reply(550, "5.7.60 SMTP; Client does not have permissions to send as this sender"),
        reply(554, "5.2.252 SendAsDenied; relay@contoso.com not allowed to send as x@contoso.com"),
        reply(
            554,
            "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
        ),
    ],
)
def test_send_as_refusals_get_the_recipient_permission_fix(refusal: SmtpReply) -> None:
    assert is_send_as_refusal(refusal)
    fix = send_as_fix(refusal, "x@contoso.com", "relay@contoso.com")
    assert "Add-RecipientPermission -Identity x@contoso.com -Trustee relay@contoso.com" in fix


def test_other_sender_refusals_are_not_called_send_as() -> None:
    other = reply(550, "5.7.750 Client blocked from sending from unregistered domain")
    assert not is_send_as_refusal(other)
    assert "Add-RecipientPermission" not in send_as_fix(other, "x@f.example", "relay@contoso.com")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed certificate in certificate chain",
            "tls_ca_file",
        ),
        ("[SSL: CERTIFICATE_VERIFY_FAILED] unable to get local issuer certificate", "inspecting"),
        ("Hostname mismatch, certificate is not valid for 'x'", "[upstream] host"),
        ("certificate has expired", "NTP"),
    ],
)
def test_tls_failures(error: str, expected: str) -> None:
    assert expected in tls_fix(error, "smtp.office365.com")
