"""Listeners with their own TLS policy, per-listener sender and recipient-domain rules, the
open-relay guard and certificate reload on SIGHUP, against the real daemon on real sockets.
TLS uses a trustme PKI; every test checks the negotiated version, not only success."""

from __future__ import annotations

import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.pki import TestPKI, make_pki
from tests.relayproc import RelayProcess, toml_value, wait_until

TIMEOUT = 10


def toml(sections: dict[str, Any]) -> str:
    """TOML text; a list of dicts becomes an array of tables ([[listener]])."""
    lines: list[str] = []
    for name, body in sections.items():
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            lines.append(f"[[{name}]]" if isinstance(body, list) else f"[{name}]")
            lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
            lines.append("")
    return "\n".join(lines)


def base_sections(tmp_path: Path, **smtp: Any) -> dict[str, Any]:
    return {
        "smtp": {
            "listen": ["127.0.0.1:0"],
            "allow": ["127.0.0.1/32"],
            "hostname": "relay.test.lan",
            **smtp,
        },
        "spool": {"path": str(tmp_path / "spool")},
        "upstream": {"kind": "maildir", "path": str(tmp_path / "maildir")},
        "metrics": {"listen": ""},
        "server": {"shutdown_grace": "2s"},
    }


def tls_listener(pki: TestPKI, name: str, tls: str, **extra: Any) -> dict[str, Any]:
    return {
        "address": "127.0.0.1:0",
        "name": name,
        "tls": tls,
        "tls_cert_file": str(pki.server_cert_file),
        "tls_key_file": str(pki.server_key_file),
        **extra,
    }


def ports_of(relay: RelayProcess) -> list[int]:
    """Every bound port, in listener order ([smtp] listen first, then [[listener]]s)."""
    line = next(line for line in relay.lines if "ready: smtp=" in line)
    match = re.search(r"smtp=(\S+)", line)
    assert match is not None
    return [int(item.rsplit(":", 1)[1]) for item in match.group(1).split(",")]


def start(tmp_path: Path, sections: dict[str, Any]) -> RelayProcess:
    config = tmp_path / "relay.toml"
    config.write_text(toml(sections), encoding="utf-8")
    return RelayProcess(config, cwd=tmp_path).start()


def check_config(tmp_path: Path, sections: dict[str, Any]) -> tuple[int, str]:
    config = tmp_path / "check.toml"
    config.write_text(toml(sections), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stderr


def delivered(tmp_path: Path, count: int) -> list[bytes]:
    new = tmp_path / "maildir" / "new"
    wait_until(
        lambda: new.is_dir() and len(list(new.iterdir())) >= count, TIMEOUT, f"{count} delivered"
    )
    return [path.read_bytes() for path in sorted(new.iterdir())]


def legacy_client_context(pki: TestPKI) -> ssl.SSLContext:
    """A client that speaks TLS 1.0 only, like a 2008 copier."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_relay(tmp_path: Path, pki: TestPKI) -> Iterator[tuple[RelayProcess, list[int]]]:
    """[smtp] listen (plain), then: STARTTLS optional, STARTTLS required, implicit TLS,
    and a legacy listener that allows TLS 1.0."""
    sections = base_sections(tmp_path)
    sections["listener"] = [
        tls_listener(pki, "starttls", "starttls"),
        tls_listener(pki, "required", "starttls", require_tls=True),
        tls_listener(pki, "smtps", "implicit"),
        tls_listener(pki, "printers", "starttls", tls_min_version="1.0", legacy_tls=True),
    ]
    relay = start(tmp_path, sections)
    try:
        yield relay, ports_of(relay)
    finally:
        relay.stop()


def send(client: smtplib.SMTP, sender: str = "scanner@contoso.com") -> bytes:
    client.ehlo_or_helo_if_needed()
    assert client.mail(sender)[0] == 250
    assert client.rcpt("ap@contoso.com")[0] == 250
    code, reply = client.data(b"Subject: scan\r\n\r\nscan attached\r\n")
    assert code == 250, reply
    return reply


def test_starttls_upgrades_with_a_verified_certificate_and_tls_1_2_or_newer(
    tmp_path: Path, pki: TestPKI, tls_relay: tuple[RelayProcess, list[int]]
) -> None:
    relay, ports = tls_relay
    with smtplib.SMTP("127.0.0.1", ports[1], timeout=TIMEOUT) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=pki.client_context())
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo()
        assert not client.has_extn("starttls")
        send(client)
    (message,) = delivered(tmp_path, 1)
    assert b"with ESMTPS id" in message
    assert "listener=starttls tls=TLSv1." in relay.log_text()


def test_the_plain_listener_offers_no_starttls(tls_relay: tuple[RelayProcess, list[int]]) -> None:
    _, ports = tls_relay
    with smtplib.SMTP("127.0.0.1", ports[0], timeout=TIMEOUT) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.docmd("STARTTLS")[0] == 454


def test_require_tls_refuses_mail_before_starttls(
    pki: TestPKI, tls_relay: tuple[RelayProcess, list[int]]
) -> None:
    _, ports = tls_relay
    with smtplib.SMTP("127.0.0.1", ports[2], timeout=TIMEOUT) as client:
        client.ehlo()
        code, reply = client.mail("scanner@contoso.com")
        assert code == 530 and b"STARTTLS" in reply
        client.starttls(context=pki.client_context())
        client.ehlo()
        send(client)


def test_implicit_tls_listener(
    tmp_path: Path, pki: TestPKI, tls_relay: tuple[RelayProcess, list[int]]
) -> None:
    _, ports = tls_relay
    with smtplib.SMTP_SSL(
        "127.0.0.1", ports[3], context=pki.client_context(), timeout=TIMEOUT
    ) as client:
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr]
        client.ehlo()
        assert not client.has_extn("starttls")
        send(client)
    (message,) = delivered(tmp_path, 1)
    assert b"with ESMTPS id" in message


def test_tls_1_0_is_refused_by_default_and_accepted_on_the_legacy_listener(
    tmp_path: Path, pki: TestPKI, tls_relay: tuple[RelayProcess, list[int]]
) -> None:
    relay, ports = tls_relay
    with smtplib.SMTP("127.0.0.1", ports[1], timeout=TIMEOUT) as client:
        client.ehlo()
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            client.starttls(context=legacy_client_context(pki))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with smtplib.SMTP_SSL(
            "127.0.0.1", ports[3], context=legacy_client_context(pki), timeout=TIMEOUT
        ):
            pass
    with smtplib.SMTP("127.0.0.1", ports[4], timeout=TIMEOUT) as client:
        client.ehlo()
        client.starttls(context=legacy_client_context(pki))
        assert client.sock.version() == "TLSv1"  # type: ignore[union-attr]
        client.ehlo()
        send(client)
    delivered(tmp_path, 1)
    assert re.search(r"WARNING .*listener printers accepts TLS 1\.0", relay.log_text())


def test_tls_garbage_does_not_hurt_the_next_client(
    pki: TestPKI, tls_relay: tuple[RelayProcess, list[int]]
) -> None:
    relay, ports = tls_relay
    for port in (ports[3], ports[0]):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)
            raw.settimeout(TIMEOUT)
            try:
                while raw.recv(4096):
                    pass
            except (ConnectionError, TimeoutError):
                pass
    with smtplib.SMTP_SSL(
        "127.0.0.1", ports[3], context=pki.client_context(), timeout=TIMEOUT
    ) as client:
        assert client.noop()[0] == 250
    assert relay.running


def test_sighup_reloads_the_certificate_and_keeps_a_good_one_over_a_broken_one(
    tmp_path: Path, pki: TestPKI
) -> None:
    live_cert = tmp_path / "live-cert.pem"
    live_key = tmp_path / "live-key.pem"
    shutil.copy(pki.server_cert_file, live_cert)
    shutil.copy(pki.server_key_file, live_key)
    sections = base_sections(tmp_path)
    listener = tls_listener(pki, "smtps", "implicit")
    listener.update(tls_cert_file=str(live_cert), tls_key_file=str(live_key))
    sections["listener"] = [listener]
    relay = start(tmp_path, sections)
    try:
        port = ports_of(relay)[1]
        old_session = smtplib.SMTP_SSL(
            "127.0.0.1", port, context=pki.client_context(), timeout=TIMEOUT
        )
        old_session.ehlo()

        renewed = make_pki(tmp_path / "renewed")
        shutil.copy(renewed.server_cert_file, live_cert)
        shutil.copy(renewed.server_key_file, live_key)
        relay.signal(signal.SIGHUP)
        relay.wait_for_log(re.compile(r"reloaded: 2 listeners"), TIMEOUT)
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, context=renewed.client_context(), timeout=TIMEOUT
        ) as client:
            send(client)
        send(old_session)  # the session that was open keeps going
        old_session.quit()

        live_key.write_text("not a key\n")
        relay.signal(signal.SIGHUP)
        relay.wait_for_log(
            re.compile(
                r"reload refused, the running configuration stays: "
                r"listener smtps: cannot use the certificate in .*live-key"
            ),
            TIMEOUT,
        )
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, context=renewed.client_context(), timeout=TIMEOUT
        ) as client:
            send(client)
        delivered(tmp_path, 3)
        assert relay.running
    finally:
        relay.stop()


def test_an_unusable_certificate_stops_the_start_with_exit_2(tmp_path: Path, pki: TestPKI) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    sections = base_sections(tmp_path)
    sections["listener"] = [tls_listener(pki, "smtps", "implicit", tls_cert_file=str(bad))]
    config = tmp_path / "relay.toml"
    config.write_text(toml(sections), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "listener smtps: cannot use the certificate in" in proc.stderr


def test_sender_and_recipient_domain_rules_per_listener(tmp_path: Path) -> None:
    sections = base_sections(tmp_path)
    sections["listener"] = [
        {
            "address": "127.0.0.1:0",
            "name": "copiers",
            "senders": ["@contoso.com"],
            "recipient_domains": ["contoso.com"],
        }
    ]
    relay = start(tmp_path, sections)
    try:
        port = ports_of(relay)[1]
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
            client.ehlo()
            assert client.mail("spam@evil.example")[0] == 553
            assert client.mail("scanner@contoso.com")[0] == 250
            assert client.rcpt("victim@gmail.example")[0] == 550
            assert client.rcpt("ap@sub.contoso.com")[0] == 550
            assert client.rcpt("ap@CONTOSO.com")[0] == 250
            assert client.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250
        (message,) = delivered(tmp_path, 1)
        assert b"Delivered-To: ap@CONTOSO.com" in message
        # the plain [smtp] listen entry has no such rules
        with smtplib.SMTP("127.0.0.1", ports_of(relay)[0], timeout=TIMEOUT) as client:
            client.ehlo()
            client.mail("anyone@example.org")
            assert client.rcpt("someone@example.net")[0] == 250
        log = relay.log_text()
        assert "refused RCPT TO:<victim@gmail.example> from 127.0.0.1" in log
    finally:
        relay.stop()


@pytest.mark.parametrize(
    ("listen", "allow", "extra", "refused"),
    [
        ("0.0.0.0:2525", ["0.0.0.0/0"], {}, True),
        ("[::]:2525", ["::/0"], {}, True),
        ("0.0.0.0:2525", ["0.0.0.0/1", "128.0.0.0/1"], {}, True),
        ("0.0.0.0:2525", ["0.0.0.0/0"], {"i_understand_open_relay": True}, False),
        ("127.0.0.1:2525", ["0.0.0.0/0"], {}, False),  # loopback only: not reachable
        ("0.0.0.0:2525", ["192.168.0.0/16"], {}, False),
    ],
)
def test_the_open_relay_guard(
    tmp_path: Path, listen: str, allow: list[str], extra: dict[str, Any], refused: bool
) -> None:
    sections = base_sections(tmp_path, listen=[], allow=["127.0.0.1/32"])
    sections["listener"] = [{"address": listen, "allow": allow, **extra}]
    code, err = check_config(tmp_path, sections)
    assert (code == 2) == refused, err
    if refused:
        assert "would be an open relay" in err and "i_understand_open_relay" in err


def test_an_open_allowlist_behind_required_auth_is_not_an_open_relay(
    tmp_path: Path, pki: TestPKI
) -> None:
    from relay.localauth import hash_password

    sections = base_sections(tmp_path, listen=[])
    sections["listener"] = [
        tls_listener(
            pki,
            "submission",
            "starttls",
            address="0.0.0.0:2587",
            allow=["0.0.0.0/0"],
            auth="users",
            require_auth=True,
        )
    ]
    sections["user"] = [
        {"name": "erp", "password_hash": hash_password("pw", n=2**14), "senders": ["@c.com"]}
    ]
    code, err = check_config(tmp_path, sections)
    assert code == 0, err


@pytest.mark.parametrize(
    ("listener", "problem"),
    [
        ({"tls": "starttls"}, "listener.0.tls_cert_file"),
        ({"require_tls": True}, "listener.0.require_tls"),
        ({"tls_min_version": "1.0"}, "listener.0.tls_min_version"),
        ({"auth_relay_anywhere": True, "auth": "accept-any"}, "listener.0.auth_relay_anywhere"),
        ({"auth": "users"}, "listener.0.auth"),
        ({"address": "127.0.0.1:2525"}, "listener.0"),  # the same as [smtp] listen
    ],
)
def test_inconsistent_listeners_are_configuration_errors(
    tmp_path: Path, listener: dict[str, Any], problem: str
) -> None:
    sections = base_sections(tmp_path, listen=["127.0.0.1:2525"])
    sections["listener"] = [{"address": "127.0.0.1:2526", **listener}]
    code, err = check_config(tmp_path, sections)
    assert code == 2
    assert f"  {problem}" in err, err


def test_hash_password_prints_a_hash_that_verifies() -> None:
    from relay.localauth import check_hash_format, verify_password

    proc = subprocess.run(
        [sys.executable, "-m", "relay", "hash-password"],
        input="correct horse\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    encoded = proc.stdout.strip()
    assert check_hash_format(encoded) is None
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horse\n", encoded)


@pytest.mark.parametrize(
    ("login", "logged"),
    [
        ("erp", "erp"),
        ("scanner@contoso.com", "scanner@contoso.com"),
        ("nobody tls=TLSv1.3 user=erp", "nobody?tls?TLSv1.3?user?erp"),
        ("a\nb", "a?b"),
        ("", "?"),
    ],
)
def test_a_login_name_cannot_fake_log_fields(login: str, logged: str) -> None:
    from relay.ingress import loggable_login

    assert loggable_login(login) == logged
