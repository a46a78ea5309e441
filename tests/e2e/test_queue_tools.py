"""`oauth-relay queue ...` against a live daemon: hold, release, retry, delete while
deliveries run; nothing lost, nothing delivered twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import MAILBOX, RelayWith
from tests.fakes.exchange import FakeExchange
from tests.relayproc import RelayProcess, queue_id_of, spool_state, wait_until


def message(name: str) -> bytes:
    return (
        f"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\nMessage-ID: <{name}@contoso.com>\r\n"
        f"From: <{MAILBOX}>\r\nTo: <bob@example.org>\r\nSubject: {name}\r\n\r\n{name}\r\n"
    ).encode()


def queue(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "queue", "--config", str(relay.config), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=relay.cwd,
    )


def listing(relay: RelayProcess, *args: str) -> list[dict[str, Any]]:
    result = queue(relay, "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_hold_release_retry_delete_on_a_live_daemon(
    relay_with: RelayWith,
    tmp_path: Path,
    exchange: FakeExchange,
) -> None:
    relay = relay_with(
        **{
            "delivery.retry_initial": "1h",
            "delivery.retry_max": "1h",
            "delivery.rescan": "0.3s",
        }
    )
    exchange.inject(
        "eod", "451 4.4.0 STOREDRV.Submission.Exception:StorageTransientException", times=4
    )
    ids = {
        n: queue_id_of(relay.submit(MAILBOX, ["bob@example.org"], message(n))[1]) for n in "ABCD"
    }
    spool = tmp_path / "spool"
    wait_until(
        lambda: all(spool_state(spool, q) == "deferred" for q in ids.values()), 20, "all deferred"
    )
    rows = {row["queue_id"]: row for row in listing(relay, "--state", "deferred")}
    assert set(rows) == set(ids.values())
    assert rows[ids["A"]]["last_error"].startswith("451 4.4.0")

    assert queue(relay, "hold", ids["A"]).returncode == 0
    assert queue(relay, "delete", ids["B"]).returncode == 0
    assert queue(relay, "retry", ids["C"]).returncode == 0
    exchange.wait_for_messages(1, timeout=20)  # C, picked up at the next rescan
    assert spool_state(spool, ids["A"]) == "hold"
    assert spool_state(spool, ids["B"]) is None
    assert not (spool / "data" / f"{ids['B']}.eml").exists()

    summary = json.loads(queue(relay, "summary", "--json").stdout)
    assert summary["default"]["total"] == 2  # A held, D deferred
    shown = json.loads(queue(relay, "show", ids["A"]).stdout)
    assert shown["state"] == "hold"
    assert "Subject: A" in shown["headers"]
    assert queue(relay, "export", ids["A"]).stdout.endswith("\nSubject: A\n\nA\n")  # text mode

    assert queue(relay, "retry", "--all").returncode == 0  # D
    assert queue(relay, "release", ids["A"]).returncode == 0
    delivered = exchange.wait_for_messages(3, timeout=20)
    assert sorted(m.message_id_reply for m in delivered) == [
        "<A@contoso.com>",
        "<C@contoso.com>",
        "<D@contoso.com>",
    ]
    wait_until(lambda: listing(relay) == [], 10, "an empty queue")
    assert len(exchange.messages) == 3  # nothing twice, B never


def test_queue_tools_refuse_what_they_cannot_do(exchange_relay: RelayProcess) -> None:
    unknown = queue(exchange_relay, "hold", "19AB697E800000000")
    assert unknown.returncode == 1
    assert "no such message" in unknown.stderr
    assert queue(exchange_relay, "show", "../../etc/passwd").returncode == 1
    assert queue(exchange_relay, "retry").returncode == 1


def send_test(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "send-test",
            "--config",
            str(relay.config),
            "--server",
            f"127.0.0.1:{relay.smtp_port}",
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=relay.cwd,
    )


def test_send_test_reports_delivery(exchange_relay: RelayProcess, exchange: FakeExchange) -> None:
    result = send_test(exchange_relay, "--to", "it@example.org", "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "delivered: the upstream accepted it" in result.stdout
    [message] = exchange.messages
    assert message.rcpt_tos == ("it@example.org",)
    assert message.mail_from == MAILBOX
    assert b"Subject: oauth-relay test message from " in message.data


def test_send_test_reports_the_upstreams_refusal(
    exchange_relay: RelayProcess, exchange: FakeExchange
) -> None:
    exchange.inject("eod", "554 5.2.252 SendAsDenied; relay@contoso.com not allowed to send as x")
    result = send_test(exchange_relay, "--to", "it@example.org", "--timeout", "30")
    assert result.returncode == 1
    assert "failed: it@example.org: 554 5.2.252 SendAsDenied" in result.stdout
