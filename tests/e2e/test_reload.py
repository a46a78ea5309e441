"""SIGHUP while mail flows: a changed allowlist applies to new sessions, a broken config is
refused and the running one stays, no session is dropped and no accepted message is lost. A
secret fixed on disk and reloaded ends a pause at once."""

from __future__ import annotations

import signal
import smtplib
import socket
import threading
from pathlib import Path
from typing import Any

from tests.conftest import CLIENT_SECRET, MAILBOX, exchange_config
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.pki import TestPKI
from tests.relayproc import RelayProcess, queue_id_of, wait_until, write_config

TIMEOUT = 15


def sandbox(tmp_path: Path, allow: list[str], **smtp: Any) -> dict[str, dict[str, Any]]:
    return {
        "smtp": {"listen": ["127.0.0.1:0"], "allow": allow, "hostname": "relay.test", **smtp},
        "spool": {"path": str(tmp_path / "spool")},
        "upstream": {"kind": "maildir", "path": str(tmp_path / "maildir")},
        "metrics": {"listen": ""},
        "server": {"shutdown_grace": "5s"},
    }


def greeting_from(address: str, port: int) -> bytes:
    with socket.create_connection(
        ("127.0.0.1", port), timeout=TIMEOUT, source_address=(address, 0)
    ) as sock:
        return sock.makefile("rb").readline()


class Traffic(threading.Thread):
    """Sends messages without pause over one long session (it must survive every reload) and
    over short sessions; records every queue id the relay acknowledged."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acknowledged: list[str] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def send(self, client: smtplib.SMTP, n: int) -> None:
        client.mail("erp@contoso.com")
        client.rcpt("ap@contoso.com")
        code, reply = client.data(f"Subject: invoice {n}\r\n\r\nbody {n}\r\n".encode())
        assert code == 250, reply
        self.acknowledged.append(queue_id_of(reply))

    def run(self) -> None:
        n = 0
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as long_lived:
                long_lived.ehlo("erp.contoso.com")
                while not self.stop.is_set():
                    n += 1
                    self.send(long_lived, n)
                    if n % 10 == 0:
                        with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as short:
                            short.ehlo("erp.contoso.com")
                            self.send(short, n)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)


def test_reload_changes_the_allowlist_refuses_a_broken_config_and_loses_nothing(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "relay.toml", sandbox(tmp_path, ["127.0.0.1/32"]))
    relay = RelayProcess(config, cwd=tmp_path).start()
    traffic = Traffic(relay.smtp_port)
    try:
        assert greeting_from("127.0.0.2", relay.smtp_port).startswith(b"554 5.7.1")
        traffic.start()
        wait_until(lambda: len(traffic.acknowledged) >= 20, TIMEOUT, "traffic flowing")

        write_config(config, sandbox(tmp_path, ["127.0.0.1/32", "127.0.0.2/32"]))
        relay.signal(signal.SIGHUP)
        relay.wait_for_log(r"reloaded: 1 listeners, 1 upstreams")
        assert greeting_from("127.0.0.2", relay.smtp_port).startswith(b"220 ")
        with smtplib.SMTP(
            "127.0.0.1", relay.smtp_port, timeout=TIMEOUT, source_address=("127.0.0.2", 0)
        ) as other:
            other.ehlo("scanner")
            traffic.send(other, 0)

        config.write_text(config.read_text().replace("[smtp]", "[smtp]\nallow_typo = 1"))
        before = len(traffic.acknowledged)
        relay.signal(signal.SIGHUP)
        relay.wait_for_log(
            r"reload refused, the running configuration stays: smtp\.allow_typo: unknown key"
        )
        wait_until(lambda: len(traffic.acknowledged) > before + 20, TIMEOUT, "still flowing")
        assert greeting_from("127.0.0.2", relay.smtp_port).startswith(b"220 ")  # unchanged

        write_config(config, sandbox(tmp_path, ["127.0.0.1/32"], max_recipients=10))
        relay.signal(signal.SIGHUP)
        relay.wait_for_log(r"reloaded: 1 listeners", since=len(relay.lines) - 1)
        assert greeting_from("127.0.0.2", relay.smtp_port).startswith(b"554 5.7.1")
    finally:
        traffic.stop.set()
        traffic.join(TIMEOUT)
    assert traffic.errors == []  # the long session was never dropped
    acknowledged = set(traffic.acknowledged)
    new = tmp_path / "maildir" / "new"
    wait_until(
        lambda: new.is_dir() and len(list(new.iterdir())) == len(acknowledged),
        TIMEOUT,
        f"{len(acknowledged)} messages delivered",
    )
    delivered = {path.name.split("_", 1)[1].split(".", 1)[0] for path in new.iterdir()}
    assert delivered == acknowledged
    assert relay.stop() == 0


def test_reloaded_credentials_and_mailbox_end_a_pause_at_once(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
) -> None:
    """The secret file is read again on SIGHUP; a change of upstream settings ends a pause for
    a configuration problem at once instead of after its 300 s."""
    exchange.add_mailbox(MAILBOX, send_as=["scanner@contoso.com"], smtp_auth_enabled=False)
    exchange.add_mailbox("relay2@contoso.com", send_as=["scanner@contoso.com"])
    secret_file = tmp_path / "client_secret"
    secret_file.write_text("the-secret-id-not-its-value\n")
    overrides = {
        "upstream.oauth.client_secret": None,
        "upstream.oauth.client_secret_file": str(secret_file),
        "upstream.send_as": ["scanner@contoso.com"],
    }
    config = tmp_path / "relay.toml"
    write_config(config, exchange_config(tmp_path, pki, entra, exchange, **overrides))
    relay = RelayProcess(config, cwd=tmp_path).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
            client.sendmail("scanner@contoso.com", ["ap@contoso.com"], b"Subject: x\r\n\r\nx\r\n")
        relay.wait_for_log(r"AADSTS7000215")

        secret_file.write_text(CLIENT_SECRET + "\n")  # the secret is fixed ...
        relay.signal(signal.SIGHUP)
        # ... so the token works, and Exchange says what is still wrong: a 300 s pause
        relay.wait_for_log(r"upstream default paused for 300s \(configuration\): .*5\.7\.139")
        assert relay.http_status("/readyz") == 503

        overrides["upstream.mailbox"] = "relay2@contoso.com"
        write_config(config, exchange_config(tmp_path, pki, entra, exchange, **overrides))
        since = len(relay.lines)
        relay.signal(signal.SIGHUP)
        relay.wait_for_log(r"upstream default reconfigured: trying again now", since=since)
        (message,) = exchange.wait_for_messages(1, TIMEOUT)  # not 300 s later
        assert message.auth_user == "relay2@contoso.com"
        wait_until(lambda: relay.http_status("/readyz") == 200, TIMEOUT, "ready again")
        log = relay.log_text()
        assert "the-secret-id-not-its-value" not in log and CLIENT_SECRET not in log
    finally:
        relay.stop()


def test_a_reload_that_cannot_be_applied_changes_nothing(tmp_path: Path) -> None:
    """A bad CA file for an upstream, found after the listeners were already built: the
    allowlist must not be widened by a reload that is refused."""
    config = write_config(tmp_path / "relay.toml", sandbox(tmp_path, ["127.0.0.1/32"]))
    relay = RelayProcess(config, cwd=tmp_path).start()
    try:
        not_a_ca = tmp_path / "not-a-ca.pem"
        not_a_ca.write_text("this is not a certificate\n")
        broken = sandbox(tmp_path, ["127.0.0.1/32", "127.0.0.2/32"])
        broken["upstream"] = {
            "kind": "smtp",
            "host": "127.0.0.1",
            "port": 2,
            "tls_ca_file": str(not_a_ca),
        }
        write_config(config, broken)
        relay.signal(signal.SIGHUP)
        relay.wait_for_log(r"reload refused, the running configuration stays: ")
        assert greeting_from("127.0.0.2", relay.smtp_port).startswith(b"554 5.7.1")
    finally:
        relay.stop()


def test_a_narrowed_allowlist_applies_to_sessions_already_open(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "relay.toml", sandbox(tmp_path, ["127.0.0.1/32", "127.0.0.2/32"])
    )
    relay = RelayProcess(config, cwd=tmp_path).start()
    try:
        with smtplib.SMTP(
            "127.0.0.1", relay.smtp_port, timeout=TIMEOUT, source_address=("127.0.0.2", 0)
        ) as open_session:
            open_session.ehlo("scanner")
            write_config(config, sandbox(tmp_path, ["127.0.0.1/32"]))
            relay.signal(signal.SIGHUP)
            relay.wait_for_log(r"reloaded: 1 listeners")
            code, _ = open_session.mail("scanner@contoso.com")
            assert code == 554
        relay.wait_for_log(r"refused MAIL from 127\.0\.0\.2: no longer in the allow list")
    finally:
        relay.stop()


def test_changing_an_upstreams_kind_needs_a_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.toml", sandbox(tmp_path, ["127.0.0.1/32"]))
    relay = RelayProcess(config, cwd=tmp_path).start()
    try:
        changed = sandbox(tmp_path, ["127.0.0.1/32"])
        changed["upstream"] = {"kind": "smtp", "host": "127.0.0.1", "port": 2}
        write_config(config, changed)
        relay.signal(signal.SIGHUP)
        relay.wait_for_log(
            r"reload refused, .*default: changing an upstream's kind needs a restart"
        )
    finally:
        relay.stop()
