"""`oauth-relay doctor` against the fakes: a good set-up passes every step, and each broken
set-up stops at the step where it breaks, with the fix an admin needs. The real CLI runs in a
subprocess; the fakes check what Entra ID and Exchange Online check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLIENT_ID, CLIENT_SECRET, MAILBOX, RelayFactory, exchange_config
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.pki import TestPKI, make_pki
from tests.relayproc import write_config

UPSTREAM_STEPS = ["dns", "tcp", "tls", "token", "claims", "auth", "send-as"]
Steps = list[dict[str, str]]


def run_doctor(config: Path, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "doctor", "--config", str(config), "--timeout", "10"]
        + list(args),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=180,
        env=env,
        cwd=config.parent,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def doctor_json(config: Path, *args: str) -> tuple[int, Steps]:
    code, output = run_doctor(config, "--json", *args)
    start = output.index("[")
    return code, json.loads(output[start : output.rindex("]") + 1])


def names(steps: Steps, status: str | None = None) -> list[str]:
    return [s["name"] for s in steps if status is None or s["status"] == status]


def last(steps: Steps) -> dict[str, str]:
    return steps[-1]


@pytest.fixture
def config_with(tmp_path: Path, pki: TestPKI, entra: FakeEntra, exchange: FakeExchange) -> Any:
    def write(**overrides: Any) -> Path:
        sections = exchange_config(tmp_path, pki, entra, exchange, **overrides)
        return write_config(tmp_path / "relay.toml", sections)

    return write


def test_a_good_setup_passes_every_step_and_prints_no_secret(config_with: Any) -> None:
    config = config_with()
    code, output = run_doctor(config)
    assert code == 0, output
    for step in ["config", "spool", *UPSTREAM_STEPS]:
        assert "[ ok ] " in output and f" {step} " in output, (step, output)
    assert "FAIL" not in output and "warn" not in output
    assert "every check passed" in output
    assert "aud=https://outlook.office365.com" in output and "roles=SMTP.SendAsApp" in output
    assert "TLSv1.3" in output or "TLSv1.2" in output
    assert "scanner@contoso.com" in output and "jürgen@contoso.com" in output
    assert CLIENT_SECRET not in output
    assert "eyJ" not in output  # no token (a JWT starts with a base64 '{"')


def test_a_good_setup_sends_nothing(config_with: Any, exchange: FakeExchange) -> None:
    code, steps = doctor_json(config_with())
    assert code == 0
    assert names(steps) == ["config", "spool", *UPSTREAM_STEPS]
    assert exchange.messages == []
    assert exchange.auth_ok == 1


def test_wrong_secret_stops_at_the_token_with_the_secret_fix(config_with: Any) -> None:
    code, steps = doctor_json(config_with(**{"upstream.oauth.client_secret": "the-secret-id"}))
    assert code == 1
    assert names(steps)[-1] == "token" and last(steps)["status"] == "FAIL"
    assert "AADSTS7000215" in last(steps)["detail"]
    assert "Value, not its Secret ID" in last(steps)["fix"]
    assert "the-secret-id" not in json.dumps(steps)


def test_unknown_app_stops_at_the_token(config_with: Any) -> None:
    config = config_with(**{"upstream.oauth.client_id": "99999999-2222-3333-4444-555555555555"})
    code, steps = doctor_json(config)
    assert code == 1
    assert names(steps)[-1] == "token"
    assert "AADSTS700016" in last(steps)["detail"]
    assert "client_id and tenant_id" in last(steps)["fix"]


def test_unknown_tenant_stops_at_the_token(config_with: Any) -> None:
    config = config_with(**{"upstream.oauth.tenant_id": "00000000-0000-0000-0000-00000000dead"})
    code, steps = doctor_json(config)
    assert code == 1
    assert names(steps)[-1] == "token"
    assert "90002" in last(steps)["detail"]
    assert "tenant_id" in last(steps)["fix"]


def test_missing_role_warns_at_the_claims_and_stops_at_auth(
    config_with: Any, entra: FakeEntra
) -> None:
    entra.register_app(CLIENT_ID, secret=CLIENT_SECRET, roles=())
    code, steps = doctor_json(config_with())
    assert code == 1
    claims = next(s for s in steps if s["name"] == "claims")
    assert claims["status"] == "warn" and "no SMTP.SendAsApp role" in claims["detail"]
    assert names(steps)[-1] == "auth" and "535 5.7.3" in last(steps)["detail"]
    assert "Grant admin consent" in last(steps)["fix"]
    assert "SMTP.SendAsApp" in last(steps)["fix"]


def test_app_rbac_without_role_passes(
    config_with: Any, entra: FakeEntra, exchange: FakeExchange
) -> None:
    entra.register_app(CLIENT_ID, secret=CLIENT_SECRET, roles=())
    exchange.require_role = False  # App RBAC: Exchange does not look for the role
    code, steps = doctor_json(config_with())
    assert code == 0
    assert [s["status"] for s in steps if s["name"] == "claims"] == ["warn"]


@pytest.mark.parametrize(
    ("where", "command"),
    [
        ("tenant", "Set-TransportConfig -SmtpClientAuthenticationDisabled $false"),
        ("mailbox", f"Set-CASMailbox -Identity {MAILBOX} -SmtpClientAuthenticationDisabled $false"),
    ],
)
def test_smtp_auth_disabled_stops_at_auth(
    config_with: Any, exchange: FakeExchange, where: str, command: str
) -> None:
    if where == "tenant":
        exchange.tenant_smtp_auth_enabled = False
    else:
        exchange.add_mailbox(MAILBOX, send_as=["scanner@contoso.com"], smtp_auth_enabled=False)
    code, steps = doctor_json(config_with())
    assert code == 1
    assert names(steps)[-1] == "auth"
    assert "535 5.7.139" in last(steps)["detail"]
    assert command in last(steps)["fix"]


def test_app_without_mailbox_permission_gets_the_service_principal_commands(
    config_with: Any, entra: FakeEntra, exchange: FakeExchange
) -> None:
    exchange.add_mailbox(MAILBOX, apps=["another-app"])
    code, steps = doctor_json(config_with())
    assert code == 1
    assert names(steps)[-1] == "auth" and "5.7.3" in last(steps)["detail"]
    principal = entra.service_principal_id(CLIENT_ID)
    assert f"New-ServicePrincipal -AppId {CLIENT_ID} -ObjectId {principal}" in last(steps)["fix"]
    assert f"Add-MailboxPermission -Identity {MAILBOX} -User {principal}" in last(steps)["fix"]


def test_no_send_as_right_stops_at_mail_from_where_exchange_checks_it_there(
    config_with: Any, exchange: FakeExchange
) -> None:
    exchange.send_as_checked_at = "mail"  # the older 550 5.7.60 variant
    config = config_with(**{"upstream.send_as": ["scanner@contoso.com", "noright@contoso.com"]})
    code, steps = doctor_json(config)
    assert code == 1
    assert names(steps)[-1] == "send-as"
    assert "noright@contoso.com" in last(steps)["detail"] and "5.7.60" in last(steps)["detail"]
    fix = "Add-RecipientPermission -Identity noright@contoso.com -Trustee relay@contoso.com"
    assert fix in last(steps)["fix"]
    assert exchange.messages == []


def test_no_send_as_right_is_proven_by_send_to(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    relay_factory: RelayFactory,
) -> None:
    """Exchange today accepts MAIL FROM and refuses after the body (554 5.2.252): only a real
    message shows it, and doctor --send-to sends one through the running relay."""
    sections = exchange_config(
        tmp_path,
        pki,
        entra,
        exchange,
        **{"upstream.send_as": ["scanner@contoso.com", "noright@contoso.com"]},
    )
    relay = relay_factory(sections)
    sections["smtp"]["listen"] = [f"127.0.0.1:{relay.smtp_port}"]
    config = write_config(tmp_path / "doctor.toml", sections)
    code, steps = doctor_json(
        config, "--send-to", "bob@example.org", "--from", "noright@contoso.com", "--wait", "30"
    )
    assert code == 1
    assert next(s for s in steps if s["name"] == "send-as")["status"] == "ok"
    assert names(steps)[-1] == "send-to"
    assert "5.2.252" in last(steps)["detail"]
    assert "Add-RecipientPermission -Identity noright@contoso.com" in last(steps)["fix"]

    code, steps = doctor_json(config, "--send-to", "bob@example.org", "--wait", "30")
    assert code == 0, steps
    assert last(steps)["name"] == "send-to" and "delivered" in last(steps)["detail"]
    delivered = [m for m in exchange.messages if "bob@example.org" in m.rcpt_tos]
    assert len(delivered) == 1 and delivered[0].mail_from == MAILBOX


def test_send_to_without_a_running_relay_says_so(config_with: Any) -> None:
    code, steps = doctor_json(config_with(), "--send-to", "bob@example.org")
    assert code == 1
    assert names(steps)[-1] == "send-to"
    assert "start the relay" in last(steps)["fix"]


def test_an_untrusted_certificate_stops_at_tls(config_with: Any, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other-pki")
    code, steps = doctor_json(config_with(**{"upstream.tls_ca_file": str(other.ca_file)}))
    assert code == 1
    assert names(steps)[-1] == "tls"
    assert "certificate" in last(steps)["detail"].lower()
    assert "tls_ca_file" in last(steps)["fix"]


def test_a_closed_port_stops_at_tcp(config_with: Any) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    code, steps = doctor_json(config_with(**{"upstream.port": port}))
    assert code == 1
    assert names(steps) == ["config", "spool", "dns", "tcp"]
    assert "587" in last(steps)["fix"] and "firewall" in last(steps)["fix"]


def test_a_name_that_does_not_resolve_stops_at_dns(config_with: Any) -> None:
    code, steps = doctor_json(config_with(**{"upstream.host": "smtp.doctor-test.invalid"}))
    assert code == 1
    assert names(steps)[-1] == "dns"
    assert "smtp.doctor-test.invalid" in last(steps)["detail"]


def test_an_invalid_config_stops_at_the_first_step(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "bad.toml",
        {"smtp": {"listen": ["127.0.0.1:0"], "allow": []}, "upstream": {"kind": "maildir"}},
    )
    code, steps = doctor_json(config)
    assert code == 2
    assert names(steps) == ["config"] and last(steps)["status"] == "FAIL"
    assert "smtp.allow" in last(steps)["detail"] and "upstream" in last(steps)["detail"]


def test_an_unwritable_spool_stops_there(config_with: Any, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("even root cannot create a directory in a file\n")
    code, steps = doctor_json(config_with(**{"spool.path": str(not_a_directory / "spool")}))
    assert "spool" in names(steps, "FAIL")
    assert "StateDirectory=" in next(s for s in steps if s["name"] == "spool")["fix"]
    assert code == 1


def test_the_sandbox_config_passes(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "sandbox.toml",
        {
            "smtp": {"listen": ["127.0.0.1:0"], "allow": ["127.0.0.1/32"]},
            "spool": {"path": str(tmp_path / "spool")},
            "upstream": {"kind": "maildir", "path": str(tmp_path / "maildir")},
        },
    )
    code, steps = doctor_json(config)
    assert code == 0
    assert names(steps) == ["config", "spool", "maildir"]


def test_every_upstream_is_checked_and_one_can_be_chosen(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, exchange: FakeExchange
) -> None:
    sections = exchange_config(tmp_path, pki, entra, exchange)
    sections["upstreams.archive"] = {"kind": "maildir", "path": str(tmp_path / "archive")}
    config = write_config(tmp_path / "two.toml", sections)
    code, steps = doctor_json(config)
    assert code == 0
    assert [(s["scope"], s["name"]) for s in steps][-2:] == [
        ("default", "send-as"),
        ("archive", "maildir"),
    ]
    code, steps = doctor_json(config, "--upstream", "archive")
    assert code == 0
    assert names(steps) == ["config", "spool", "maildir"]
    code, output = run_doctor(config, "--upstream", "nowhere")
    assert code == 2 and "no upstream 'nowhere'" in output


@pytest.mark.parametrize(("days", "status"), [(365, "ok"), (10, "warn"), (-1, "FAIL")])
def test_listener_certificates_are_checked(tmp_path: Path, days: int, status: str) -> None:
    import datetime

    import trustme

    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.issue_cert(
        "127.0.0.1",
        not_before=now - datetime.timedelta(days=30),
        not_after=now + datetime.timedelta(days=days),
    )
    pem = tmp_path / "relay.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    config = tmp_path / "tls.toml"
    config.write_text(
        '[smtp]\nlisten = []\nallow = ["127.0.0.1/32"]\n'
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
        f'[upstream]\nkind = "maildir"\npath = "{tmp_path / "maildir"}"\n'
        f'[[listener]]\naddress = "127.0.0.1:0"\nname = "smtps"\ntls = "implicit"\n'
        f'tls_cert_file = "{pem}"\n',
        encoding="utf-8",
    )
    code, steps = doctor_json(config)
    step = next(s for s in steps if s["name"] == "tls-cert")
    assert step["status"] == status, step
    assert "listener smtps" in step["detail"]
    assert code == (1 if status == "FAIL" else 0)


@pytest.mark.parametrize(("password", "status"), [("right-password", "ok"), ("Wr0ng-pa55", "FAIL")])
def test_doctor_checks_an_smtp_provider(
    tmp_path: Path, pki: TestPKI, password: str, status: str
) -> None:
    from tests.fakes.smtpserver import FakeSmtpProvider

    with FakeSmtpProvider(
        tls="starttls", tls_context=pki.server_context(), credentials=("apikey", "right-password")
    ) as fake:
        sections = {
            "smtp": {"listen": ["127.0.0.1:0"], "allow": ["127.0.0.1/32"]},
            "spool": {"path": str(tmp_path / "spool")},
            "upstream": {
                "kind": "smtp",
                "host": "127.0.0.1",
                "port": fake.port,
                "tls_ca_file": str(pki.ca_file),
                "auth": "login",
                "username": "apikey",
                "password": password,
                "mailbox": "noreply@contoso.com",
            },
        }
        code, steps = doctor_json(write_config(tmp_path / "smtp.toml", sections))
    assert [s["name"] for s in steps][:5] == ["config", "spool", "dns", "tcp", "tls"]
    auth = next(s for s in steps if s["name"] == "auth")
    assert auth["status"] == status, auth
    if status == "ok":
        assert code == 0 and steps[-1]["name"] == "send-as"
        assert "TLSv1." in next(s for s in steps if s["name"] == "tls")["detail"]
    else:
        assert code == 1 and "username and password" in auth["fix"]
        assert "Wr0ng-pa55" not in json.dumps(steps)
