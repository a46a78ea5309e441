"""Lifecycle of the real daemon: the sandbox config, readiness, SIGTERM drain and requeue, a
second signal, exit codes."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MAILBOX, RelayFactory, exchange_config
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.pki import TestPKI
from tests.relayproc import (
    RelayProcess,
    queue_id_of,
    spool_state,
    strip_trace,
    wait_until,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]
MESSAGE = (
    b"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\nMessage-ID: <lifecycle@contoso.com>\r\n"
    b"From: <relay@contoso.com>\r\nTo: <bob@example.org>\r\nSubject: t\r\n\r\nhello\r\n"
)


def test_sandbox_config_delivers_into_its_maildir(tmp_path: Path) -> None:
    """config/sandbox.toml as shipped (only the ports moved to free ones)."""
    relay = RelayProcess(
        REPO / "config" / "sandbox.toml",
        cwd=tmp_path,
        env={"RELAY_SMTP__LISTEN": '["127.0.0.1:0"]', "RELAY_METRICS__LISTEN": "127.0.0.1:0"},
    )
    relay.start()
    try:
        assert relay.http_status("/healthz") == 200
        assert relay.http_status("/readyz") == 200
        code, reply = relay.submit("app@example.com", ["you@example.com"], MESSAGE)
        assert code == 250
        new = tmp_path / "sandbox" / "maildir" / "new"
        [delivered] = wait_until(lambda: list(new.glob("*")) if new.exists() else [], 10, "maildir")
        content = delivered.read_bytes()
        assert content.endswith(MESSAGE)
        assert content.startswith(
            b"Return-Path: <app@example.com>\r\nDelivered-To: you@example.com\r\n"
        )
        assert (tmp_path / "sandbox" / "spool" / "incoming").is_dir()
        assert relay.stop() == 0
        relay.wait_for_log("stopped")
    finally:
        if relay.running:
            relay.kill()


def test_sigterm_requeues_a_delivery_that_does_not_finish_in_grace(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    relay_factory: RelayFactory,
) -> None:
    exchange.stall("eod", 60)
    sections = exchange_config(tmp_path, pki, entra, exchange, **{"server.shutdown_grace": "1s"})
    relay = relay_factory(sections)
    code, reply = relay.submit(MAILBOX, ["bob@example.org"], MESSAGE)
    assert code == 250
    queue_id = queue_id_of(reply)
    spool = tmp_path / "spool"
    wait_until(lambda: spool_state(spool, queue_id) == "active", 10, "delivery in progress")
    started = time.monotonic()
    assert relay.stop(timeout=30) == 0
    assert time.monotonic() - started < 15
    assert spool_state(spool, queue_id) == "incoming"
    relay.wait_for_log("requeued 1 messages still in flight")

    exchange.clear_faults()
    relay.start()
    [received] = exchange.wait_for_messages(1, timeout=20)
    assert strip_trace(received.data, queue_id) == MESSAGE


def test_sigterm_lets_an_open_transaction_finish_and_closes_idle_clients(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    idle = smtplib.SMTP("127.0.0.1", exchange_relay.smtp_port, timeout=10)
    idle.ehlo("idle-copier")
    busy = smtplib.SMTP("127.0.0.1", exchange_relay.smtp_port, timeout=10)
    busy.ehlo("busy-erp")
    busy.mail(MAILBOX)
    busy.rcpt("bob@example.org")
    exchange_relay.signal(signal.SIGTERM)
    exchange_relay.wait_for_log("stopping: no new connections")
    code, _ = idle.noop()
    assert code == 421
    code, reply = busy.data(MESSAGE)
    assert code == 250, reply
    assert exchange_relay.proc is not None
    assert exchange_relay.proc.wait(timeout=30) == 0
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", exchange_relay.smtp_port, timeout=2)


def test_second_signal_exits_at_once_and_loses_nothing(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    relay_factory: RelayFactory,
) -> None:
    exchange.stall("eod", 60)
    sections = exchange_config(tmp_path, pki, entra, exchange, **{"server.shutdown_grace": "60s"})
    relay = relay_factory(sections)
    code, reply = relay.submit(MAILBOX, ["bob@example.org"], MESSAGE)
    queue_id = queue_id_of(reply)
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) == "active", 10, "in flight")
    relay.signal(signal.SIGTERM)
    relay.wait_for_log("stopping: no new connections")
    relay.signal(signal.SIGTERM)
    assert relay.proc is not None
    assert relay.proc.wait(timeout=10) == 1
    exchange.clear_faults()
    relay.start()
    relay.wait_for_log(r"1 in flight requeued")
    exchange.wait_for_messages(1, timeout=20)


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_error_exits_2_with_every_problem(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "bad.toml",
        {
            "smtp": {"allow": []},
            "upstream": {"kind": "exchange-online"},
            "delivery": {"max_age": "soon"},
        },
    )
    result = _run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    for path in ("smtp.allow", "delivery.max_age", "upstream.mailbox", "upstream.oauth.tenant_id"):
        assert f"  {path}: " in result.stderr


def test_second_daemon_on_the_same_spool_exits_1(
    tmp_path: Path, exchange_relay: RelayProcess
) -> None:
    result = _run_cli("serve", "--config", str(exchange_relay.config), cwd=tmp_path)
    assert result.returncode == 1
    assert "another oauth-relay daemon is using" in result.stderr


def test_check_config_on_the_sandbox_and_version(tmp_path: Path) -> None:
    result = _run_cli(
        "check-config", "--config", str(REPO / "config" / "sandbox.toml"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert 'kind = "maildir"' in result.stdout
    version = _run_cli("--version", cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.startswith("oauth-relay ")


def test_example_config_is_valid_once_its_secret_file_exists(tmp_path: Path) -> None:
    secret = tmp_path / "client_secret"
    secret.write_text("value-from-the-portal\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", str(REPO / "config" / "example.toml")],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RELAY_UPSTREAM__OAUTH__CLIENT_SECRET_FILE": str(secret)},
    )
    assert result.returncode == 0, result.stderr
    assert 'client_secret = "**********"' in result.stdout
    assert "value-from-the-portal" not in result.stdout + result.stderr


def test_clients_that_quit_and_close_at_once_leave_no_error_in_the_log(
    exchange_relay: RelayProcess,
) -> None:
    """smtp-source and many scripts send QUIT and close without reading the 221: the relay's
    gentle close (FIN, then linger) meets a socket that is already gone, which is normal."""
    import socket

    for _ in range(40):
        with socket.create_connection(("127.0.0.1", exchange_relay.smtp_port), timeout=10) as sock:
            sock.recv(1024)  # the banner
            sock.sendall(b"EHLO quick.example\r\n")
            sock.recv(1024)
            sock.sendall(b"QUIT\r\n")  # and close without reading the 221
    with smtplib.SMTP("127.0.0.1", exchange_relay.smtp_port, timeout=10) as client:
        assert client.noop()[0] == 250  # still serving, and every session before has ended
    exchange_relay.wait_for_log(r"ready: ")
    errors = [line for line in exchange_relay.lines if " ERROR " in line or "Traceback" in line]
    assert errors == []
