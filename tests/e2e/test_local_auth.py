"""Local SMTP AUTH on the real daemon (issue #5 item 2): listeners with auth = "users",
"accept-any" and "none", STARTTLS before AUTH, auth_without_tls on loopback, require_auth,
auth_relay_anywhere, per-user senders, throttling of failed logins, and passwords kept out of
the log.

One daemon (Maildir upstream, no fakes) serves most tests; it has one listener per policy, so
their ports are read from the "ready:" line in listener order ([smtp] listen first, then the
[[listener]]s). The throttle test has a daemon of its own: a block lasts 15 minutes and is
daemon-wide per client address, so it would lock 127.0.0.1 out of every other test. Every wait
has a timeout; nothing sleeps.
"""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.localauth import hash_password
from tests.fakes.pki import TestPKI, make_pki, write_private_file
from tests.relayproc import TRACE, RelayProcess, toml_value, wait_until, write_config

HOSTNAME = "relay.test.lan"
N = 2**14  # the weakest scrypt cost the config accepts: fast enough for tests
ERP_PASSWORD = "Erp-pass-4711!ok"
SCANNER_PASSWORD = "sc4nner:Secret-Zz"
ERP_SENDERS = ["erp@contoso.com", "@billing.contoso.com"]
SCANNER_SENDERS = ["@scanners.contoso.com"]
RCPT = "bob@example.org"

AUTH_OK = (235, b"2.7.0 Authentication successful")
AUTH_INVALID = (535, b"5.7.8 Authentication credentials invalid")
NEEDS_TLS = (538, b"5.7.11 Encryption required for requested authentication mechanism")
THROTTLED = (454, b"4.7.0 Too many failed logins, try again later")
NOT_AVAILABLE = (502, b"5.5.1 AUTH is not available on this port")
AUTH_REQUIRED = (530, b"5.7.0 Authentication required")
NOT_OWNED = (553, b"5.7.1 Sender address not allowed for this login")
SENDER_OK = (250, b"2.1.0 Sender OK")
ACCESS_DENIED = (554, b"5.7.1 Access denied: this client may not relay here")
ERROR_LOG = r"^\S+ (ERROR|CRITICAL) |Traceback"
READY = re.compile(r"ready: smtp=(\S+) ")
_MAILDIR_ID = re.compile(r"_([0-9A-F]{12,32})\.")

# Every password and AUTH payload a test sent, so the log can be searched for all of them.
SENT_SECRETS: set[str] = set()


# --- config and daemon ---------------------------------------------------------------------------


def write_relay_config(
    path: Path, sections: dict[str, dict[str, Any]], tables: dict[str, list[dict[str, Any]]]
) -> Path:
    """`write_config` for the plain sections, then arrays of tables ([[listener]], [[user]])."""
    write_config(path, sections)
    text = path.read_text(encoding="utf-8")
    for name, items in tables.items():
        for item in items:
            text += f"\n[[{name}]]\n"
            text += "".join(f"{key} = {toml_value(value)}\n" for key, value in item.items())
    path.write_text(text, encoding="utf-8")
    return path


def base_sections(root: Path, listen: list[str]) -> dict[str, dict[str, Any]]:
    return {
        "smtp": {"listen": listen, "allow": ["127.0.0.1/32"], "hostname": HOSTNAME},
        "spool": {"path": str(root / "spool")},
        "delivery": {"retry_initial": "1s", "retry_max": "5s", "max_age": "1h"},
        "upstream": {"kind": "maildir", "path": str(root / "maildir")},
        "metrics": {"listen": "127.0.0.1:0"},
        "server": {"shutdown_grace": "5s"},
        "log": {"level": "debug"},  # the most the daemon ever logs: no password in it either
    }


def users() -> list[dict[str, Any]]:
    return [
        {
            "name": "erp",
            "password_hash": hash_password(ERP_PASSWORD, n=N),
            "senders": ERP_SENDERS,
        },
        {
            "name": "scanner",
            "password_hash": hash_password(SCANNER_PASSWORD, n=N),
            "senders": SCANNER_SENDERS,
        },
    ]


def tls_files(pki: TestPKI) -> dict[str, str]:
    return {"tls_cert_file": str(pki.server_cert_file), "tls_key_file": str(pki.server_key_file)}


@dataclass
class Daemon:
    relay: RelayProcess
    root: Path
    pki: TestPKI
    ports: dict[str, int] = field(default_factory=dict)  # listener name -> port

    @property
    def maildir(self) -> Path:
        return self.root / "maildir"

    def delivered(self) -> dict[str, Path]:
        new = self.maildir / "new"
        if not new.is_dir():
            return {}
        found = {}
        for path in new.iterdir():
            match = _MAILDIR_ID.search(path.name)
            assert match is not None, path.name
            found[match.group(1)] = path
        return found

    def wait_delivered(self, queue_id: str, timeout: float = 30.0) -> bytes:
        """The message as delivered (without the maildir's Return-Path and Delivered-To)."""
        path: Path = wait_until(
            lambda: self.delivered().get(queue_id), timeout, f"{queue_id} delivered"
        )
        data = path.read_bytes()
        match = re.match(rb"Return-Path: <.*>\r\n(?:Delivered-To: .*\r\n)*", data)
        assert match is not None, data[:300]
        return data[match.end() :]

    def stop(self) -> None:
        if self.relay.running:
            try:
                self.relay.stop(timeout=20)
            finally:
                if self.relay.running:
                    self.relay.kill()


def start_daemon(
    root: Path, pki: TestPKI, sections: dict[str, dict[str, Any]], tables: dict[str, list[Any]]
) -> Daemon:
    config = write_relay_config(root / "relay.toml", sections, tables)
    relay = RelayProcess(config, cwd=root).start()
    match = READY.search(relay.wait_for_log(READY))
    assert match is not None
    bound = [int(item.rpartition(":")[2]) for item in match.group(1).split(",")]
    names = ["plain"] * len(sections["smtp"]["listen"]) + [
        listener["name"] for listener in tables.get("listener", [])
    ]
    assert len(bound) == len(names), (bound, names)
    return Daemon(relay, root, pki, dict(zip(names, bound, strict=True)))


LISTENERS = (
    "plain",  # the [smtp] listen entry: auth = "none", [smtp] allow (127.0.0.1 only)
    "submission",  # STARTTLS, auth = "users"; 127.0.0.1 and 127.0.0.2 allowed
    "anyauth",  # STARTTLS, auth = "accept-any"; certificate and key in one PEM file
    "clear",  # no TLS, auth = "users", auth_without_tls (a loopback listener)
    "required",  # STARTTLS, auth = "users", require_auth
    "anywhere",  # STARTTLS, auth = "users", auth_relay_anywhere; 127.0.0.1 allowed
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("local_auth")
    pki = make_pki(root / "pki")
    combined = write_private_file(
        root / "pki" / "cert-and-key.pem",
        pki.server_cert_file.read_bytes() + pki.server_key_file.read_bytes(),
    )
    tls = {"tls": "starttls", **tls_files(pki)}
    here = "127.0.0.1:0"
    listeners = [
        {"address": here, "name": "submission", **tls, "auth": "users"}
        | {"allow": ["127.0.0.1/32", "127.0.0.2/32"]},
        {"address": here, "name": "anyauth", "tls": "starttls", "tls_cert_file": str(combined)}
        | {"auth": "accept-any"},
        {"address": here, "name": "clear", "auth": "users", "auth_without_tls": True},
        {"address": here, "name": "required", **tls, "auth": "users", "require_auth": True},
        {"address": here, "name": "anywhere", **tls, "auth": "users"}
        | {"auth_relay_anywhere": True, "allow": ["127.0.0.1/32"]},
    ]
    box = start_daemon(
        root,
        pki,
        base_sections(root, ["127.0.0.1:0"]),
        {"listener": listeners, "user": users()},
    )
    assert tuple(box.ports) == LISTENERS
    yield box
    box.stop()


@pytest.fixture(autouse=True)
def healthy(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test on the shared daemon: still up, nothing logged as an error, and no
    password or AUTH payload in the whole log."""
    if "daemon" not in request.fixturenames:
        yield
        return
    box: Daemon = request.getfixturevalue("daemon")
    since = len(box.relay.lines)
    yield
    assert box.relay.running, "the daemon died:\n" + "\n".join(box.relay.lines[-40:])
    errors = [line for line in box.relay.lines[since:] if re.search(ERROR_LOG, line)]
    assert not errors, "\n".join(errors[:20])
    assert_no_secrets(box.relay.log_text())


def assert_no_secrets(log: str) -> None:
    leaked = sorted(secret for secret in SENT_SECRETS if secret in log)
    assert not leaked, f"in the daemon log: {leaked}"


# --- SMTP helpers --------------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def connect(port: int, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0))
    client.ehlo("app.contoso.com")
    return client


def connect_tls(box: Daemon, listener: str, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = connect(box.ports[listener], source)
    assert client.has_extn("starttls")
    client.starttls(context=box.pki.client_context())
    client.ehlo("app.contoso.com")
    return client


def auth_plain(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    payload = b64(f"\0{user}\0{password}")
    SENT_SECRETS.update({password, payload})
    return client.docmd("AUTH", f"PLAIN {payload}")


def auth_login(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    SENT_SECRETS.update({password, b64(password)})
    assert client.docmd("AUTH", "LOGIN")[0] == 334  # aiosmtpd asks b64("User Name\0")
    assert client.docmd(b64(user))[0] == 334  # and b64("Password\0")
    return client.docmd(b64(password))


def message(subject: str, sender: str) -> bytes:
    return (
        f"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\n"
        f"From: <{sender}>\r\n"
        f"To: <{RCPT}>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@local-auth.test>\r\n"
        f"\r\n"
        f"Hello\r\n"
    ).encode()


def send(client: smtplib.SMTP, sender: str, subject: str) -> str:
    """MAIL, RCPT, DATA on an open session; returns the queue id."""
    assert client.mail(sender) == SENDER_OK
    assert client.rcpt(RCPT)[0] == 250
    code, reply = client.data(message(subject, sender))
    match = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]+)", reply)
    assert code == 250 and match is not None, (code, reply)
    return match.group(1).decode()


def received_with(box: Daemon, queue_id: str) -> str:
    """The `with` of the Received: line the relay put on top of the delivered message."""
    match = TRACE.match(box.wait_delivered(queue_id))
    assert match is not None
    assert match.group("id").decode() == queue_id
    return match.group("proto").decode()


def accepted_line(box: Daemon, queue_id: str) -> str:
    return box.relay.wait_for_log(rf"\[{queue_id}\] accepted from=")


# --- auth = "users" on a STARTTLS listener -------------------------------------------------------


def test_auth_is_offered_only_after_starttls(daemon: Daemon) -> None:
    with connect(daemon.ports["submission"]) as client:
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        assert auth_plain(client, "erp", ERP_PASSWORD) == NEEDS_TLS
        assert client.docmd("AUTH", "LOGIN") == NEEDS_TLS
        assert client.mail("erp@contoso.com") == SENDER_OK  # auth is not required here
        client.rset()
        client.starttls(context=daemon.pki.client_context())
        client.ehlo("app.contoso.com")
        assert client.has_extn("auth")
        mechanisms = client.esmtp_features["auth"].split()
        assert sorted(mechanisms) == ["LOGIN", "PLAIN"]
        assert not client.has_extn("starttls")


def test_plain_and_login_log_in_and_the_user_sends_as_its_senders(daemon: Daemon) -> None:
    with connect_tls(daemon, "submission") as client:
        assert auth_plain(client, "erp", ERP_PASSWORD) == AUTH_OK
        plain_id = send(client, "erp@contoso.com", "plain login")
    with connect_tls(daemon, "submission") as client:
        assert auth_login(client, "erp", ERP_PASSWORD) == AUTH_OK
        login_id = send(client, "Invoices@Billing.Contoso.com", "login login")  # an @domain
    for queue_id in (plain_id, login_id):
        assert received_with(daemon, queue_id) == "ESMTPSA"
        line = accepted_line(daemon, queue_id)
        assert re.search(r" listener=submission tls=TLSv1\.[23] user=erp$", line), line
    assert daemon.relay.wait_for_log(r"AUTH from 127\.0\.0\.1 as user erp")


def test_a_wrong_password_gets_535_and_a_retry_may_succeed(daemon: Daemon) -> None:
    since = len(daemon.relay.lines)
    with connect_tls(daemon, "submission") as client:
        assert auth_plain(client, "erp", ERP_PASSWORD + "x") == AUTH_INVALID
        assert auth_login(client, "erp", SCANNER_PASSWORD) == AUTH_INVALID
        assert auth_plain(client, "nobody", ERP_PASSWORD) == AUTH_INVALID  # unknown user
        assert client.mail("erp@contoso.com") == SENDER_OK  # not logged in, not required
        client.rset()
        # Three failures are under the throttle's five, and a success forgets them.
        assert auth_login(client, "scanner", SCANNER_PASSWORD) == AUTH_OK
        assert client.docmd("AUTH", "PLAIN " + b64("\0erp\0" + ERP_PASSWORD)) == (
            503,
            b"Already authenticated",
        )
    daemon.relay.wait_for_log(r"AUTH from 127\.0\.0\.1 as user scanner", since=since)
    failed = [line for line in daemon.relay.lines[since:] if "AUTH failed" in line]
    assert len(failed) == 3, failed
    assert "for user erp" in failed[0] and "for user nobody" in failed[2]


def test_a_user_may_use_only_its_own_senders(daemon: Daemon) -> None:
    since = len(daemon.relay.lines)
    with connect_tls(daemon, "submission") as client:
        assert auth_plain(client, "erp", ERP_PASSWORD) == AUTH_OK
        for foreign in (
            "boss@contoso.com",  # another address at the domain of one of its addresses
            "scan1@scanners.contoso.com",  # another user's domain
            "x@sub.billing.contoso.com",  # a subdomain of its @domain
            "billing.contoso.com@evil.example",
        ):
            assert client.mail(foreign) == NOT_OWNED, foreign
        code, _ = client.mail("")  # the null sender belongs to nobody
        assert code == 553
        assert client.rcpt(RCPT)[0] == 503  # no transaction was started
        client.rset()
        queue_id = send(client, "ERP@contoso.com", "own sender after refusals")
    assert received_with(daemon, queue_id) == "ESMTPSA"
    assert daemon.relay.wait_for_log(
        r"refused MAIL FROM:<boss@contoso\.com> from 127\.0\.0\.1: user erp may not send as it",
        since=since,
    )


def test_the_password_is_never_logged(daemon: Daemon) -> None:
    """Right and wrong passwords, PLAIN and LOGIN, before and after TLS, on every listener
    that takes AUTH: the daemon (at log level debug) never writes a password or a payload."""
    since = len(daemon.relay.lines)
    marker = "leak-check"
    with connect(daemon.ports["submission"]) as client:
        assert auth_plain(client, "erp", ERP_PASSWORD) == NEEDS_TLS  # in clear text, refused
    for listener in ("submission", "required", "anywhere"):
        with connect_tls(daemon, listener) as client:
            assert auth_login(client, "erp", ERP_PASSWORD + "-wrong") == AUTH_INVALID
            assert auth_plain(client, "erp", ERP_PASSWORD) == AUTH_OK
    with connect(daemon.ports["clear"]) as client:
        assert auth_login(client, "scanner", SCANNER_PASSWORD) == AUTH_OK
    with connect_tls(daemon, "anyauth") as client:
        assert auth_plain(client, marker, "accept-any-Passw0rd") == AUTH_OK
    daemon.relay.wait_for_log(rf"AUTH accepted from 127\.0\.0\.1 as {marker} ", since=since)
    log = daemon.relay.log_text()
    assert_no_secrets(log)
    for secret in (ERP_PASSWORD, SCANNER_PASSWORD, "accept-any-Passw0rd"):
        assert secret not in log
        assert b64(secret) not in log
    assert "scrypt$" not in log  # nor a password hash


# --- failed logins are throttled per client address ----------------------------------------------


@pytest.fixture(scope="module")
def throttle_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("auth_throttle")
    pki = make_pki(root / "pki")
    listener = {
        "address": "127.0.0.1:0",
        "name": "submission",
        "tls": "starttls",
        **tls_files(pki),
        "allow": ["127.0.0.1/32", "127.0.0.2/32", "127.0.0.3/32"],
        "auth": "users",
    }
    box = start_daemon(
        root, pki, base_sections(root, []), {"listener": [listener], "user": users()}
    )
    yield box
    box.stop()


def test_five_failed_logins_block_that_client_address_only(throttle_daemon: Daemon) -> None:
    box = throttle_daemon
    with connect_tls(box, "submission") as client:
        for attempt in range(5):
            login = auth_plain if attempt % 2 else auth_login
            assert login(client, "erp", f"wrong-{attempt}") == AUTH_INVALID, attempt
        # Blocked now: the right password is refused (temporarily), for either mechanism...
        assert auth_plain(client, "erp", ERP_PASSWORD) == THROTTLED
        # ...while another client address, also in allow, logs in and sends.
        with connect_tls(box, "submission", source="127.0.0.2") as other:
            assert auth_plain(other, "erp", ERP_PASSWORD) == AUTH_OK
            queue_id = send(other, "erp@contoso.com", "from the other client")
        assert auth_login(client, "scanner", SCANNER_PASSWORD) == THROTTLED
    assert received_with(box, queue_id) == "ESMTPSA"
    box.relay.wait_for_log(r"AUTH from 127\.0\.0\.1 refused: blocked for \d+s after failed logins")
    box.relay.wait_for_log(r"AUTH from 127\.0\.0\.2 as user erp")
    assert_no_secrets(box.relay.log_text())
    assert not [line for line in box.relay.lines if re.search(ERROR_LOG, line)]


def test_the_block_outlives_the_session(throttle_daemon: Daemon) -> None:
    box = throttle_daemon
    client_address = "127.0.0.3"  # its own address: the test above blocks 127.0.0.1
    with connect_tls(box, "submission", source=client_address) as client:
        for attempt in range(5):
            assert auth_plain(client, "erp", f"wrong-again-{attempt}") == AUTH_INVALID, attempt
        assert auth_plain(client, "erp", ERP_PASSWORD) == THROTTLED
    with connect_tls(box, "submission", source=client_address) as client:
        assert auth_plain(client, "erp", ERP_PASSWORD) == THROTTLED  # reconnecting does not help


# --- accept-any, auth_without_tls, require_auth, auth_relay_anywhere, auth = "none" --------------


def test_accept_any_takes_any_login_and_any_sender(daemon: Daemon) -> None:
    with connect(daemon.ports["anyauth"]) as client:
        assert not client.has_extn("auth")  # STARTTLS first here too
        assert auth_plain(client, "whoever", "any-Password-before-TLS") == NEEDS_TLS
    with connect_tls(daemon, "anyauth") as client:
        assert auth_plain(client, "whoever", "anything-at-all") == AUTH_OK
        first = send(client, "someone@anywhere.example", "accept any one")
        second = send(client, "erp@contoso.com", "accept any two")
    with connect_tls(daemon, "anyauth") as client:
        assert auth_login(client, "erp", "not-erps-password") == AUTH_OK  # users are not checked
        third = send(client, "scan1@scanners.contoso.com", "accept any three")
    for queue_id, user in ((first, "whoever"), (second, "whoever"), (third, "erp")):
        assert received_with(daemon, queue_id) == "ESMTPSA"
        line = accepted_line(daemon, queue_id)
        assert re.search(rf" listener=anyauth tls=TLSv1\.[23] user={user}$", line), line


def test_auth_without_tls_works_on_a_loopback_listener(daemon: Daemon) -> None:
    with connect(daemon.ports["clear"]) as client:
        assert not client.has_extn("starttls")
        assert sorted(client.esmtp_features["auth"].split()) == ["LOGIN", "PLAIN"]
        assert auth_plain(client, "scanner", ERP_PASSWORD) == AUTH_INVALID
        assert auth_plain(client, "scanner", SCANNER_PASSWORD) == AUTH_OK
        assert client.mail("erp@contoso.com") == NOT_OWNED
        queue_id = send(client, "scan7@scanners.contoso.com", "clear text auth")
    assert received_with(daemon, queue_id) == "ESMTPA"
    line = accepted_line(daemon, queue_id)
    assert line.endswith(" listener=clear user=scanner"), line


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_auth_without_tls_is_refused_on_a_listener_beyond_loopback(tmp_path: Path) -> None:
    sections = base_sections(tmp_path, [])
    listener = {
        "address": "0.0.0.0:2525",
        "name": "lan",
        "allow": ["192.168.1.0/24"],
        "auth": "users",
        "auth_without_tls": True,
    }
    user = users()[:1]
    bad = write_relay_config(
        tmp_path / "bad.toml", sections, {"listener": [listener], "user": user}
    )
    result = check_config(bad)
    assert result.returncode == 2, result
    assert re.search(
        r"^  listener\.0\.auth_without_tls: .*loopback", result.stderr, re.MULTILINE
    ), result.stderr
    assert ERP_PASSWORD not in result.stderr + result.stdout
    # The same listener on a loopback address is valid, and the hash is not printed.
    good = write_relay_config(
        tmp_path / "good.toml",
        sections,
        {"listener": [listener | {"address": "127.0.0.1:2525"}], "user": user},
    )
    result = check_config(good)
    assert result.returncode == 0, result.stderr
    assert "auth_without_tls = true" in result.stdout
    assert user[0]["password_hash"] not in result.stdout + result.stderr


def test_require_auth_refuses_mail_before_auth_even_from_an_allowed_client(
    daemon: Daemon,
) -> None:
    with connect(daemon.ports["required"]) as client:
        assert client.mail("erp@contoso.com") == AUTH_REQUIRED  # before STARTTLS
    with connect_tls(daemon, "required") as client:
        assert client.mail("erp@contoso.com") == AUTH_REQUIRED  # after STARTTLS, before AUTH
        assert client.rcpt(RCPT)[0] == 503
        assert auth_login(client, "erp", ERP_PASSWORD) == AUTH_OK
        queue_id = send(client, "erp@contoso.com", "required auth")
    assert received_with(daemon, queue_id) == "ESMTPSA"
    assert accepted_line(daemon, queue_id).endswith(" user=erp")


def test_auth_relay_anywhere_lets_a_user_send_from_outside_allow(daemon: Daemon) -> None:
    outsider = "127.0.0.2"
    with connect(daemon.ports["anywhere"], source=outsider) as client:  # a 220 greeting
        assert client.mail("erp@contoso.com") == AUTH_REQUIRED
    with connect_tls(daemon, "anywhere", source=outsider) as client:
        assert client.mail("erp@contoso.com") == AUTH_REQUIRED
        assert auth_plain(client, "erp", ERP_PASSWORD) == AUTH_OK
        assert client.mail("boss@contoso.com") == NOT_OWNED
        queue_id = send(client, "erp@contoso.com", "relay anywhere")
    assert received_with(daemon, queue_id) == "ESMTPSA"
    line = accepted_line(daemon, queue_id)
    assert f"client={outsider} " in line and line.endswith(" user=erp"), line
    # A client inside allow needs no AUTH there (no require_auth).
    with connect_tls(daemon, "anywhere") as client:
        anonymous = send(client, "anyone@anywhere.example", "anywhere from inside allow")
    assert received_with(daemon, anonymous) == "ESMTPS"
    # The same outsider on a listener without auth_relay_anywhere gets no greeting at all.
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", daemon.ports["plain"], timeout=15, source_address=(outsider, 0))
    assert (refused.value.smtp_code, refused.value.smtp_error) == ACCESS_DENIED


def test_a_plain_listen_entry_has_no_auth(daemon: Daemon) -> None:
    with connect(daemon.ports["plain"]) as client:
        assert not client.has_extn("auth")
        assert not client.has_extn("starttls")
        assert auth_plain(client, "erp", ERP_PASSWORD) == NOT_AVAILABLE
        assert client.docmd("AUTH", "LOGIN") == NOT_AVAILABLE
        assert client.docmd("AUTH", "CRAM-MD5") == NOT_AVAILABLE
        queue_id = send(client, "anyone@anywhere.example", "plain listener")
    assert received_with(daemon, queue_id) == "ESMTP"
    line = accepted_line(daemon, queue_id)
    assert "user=" not in line and "listener=" not in line, line


def test_auth_on_the_starttls_listener_needs_tls_even_for_an_unknown_mechanism(
    daemon: Daemon,
) -> None:
    with connect(daemon.ports["submission"]) as client:
        assert client.docmd("AUTH", "CRAM-MD5") == NEEDS_TLS
    with connect_tls(daemon, "submission") as client:
        assert client.docmd("AUTH", "CRAM-MD5") == (504, b"5.5.4 Unrecognized authentication type")


def test_starttls_presents_the_configured_certificate(daemon: Daemon) -> None:
    """A client that trusts only the test CA verifies the listener's certificate."""
    with connect(daemon.ports["submission"]) as client:
        client.starttls(context=daemon.pki.client_context())
        assert client.sock is not None and isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
