"""kind = "graph" end to end: the real daemon, real MSAL against the fake Entra ID, httpx
against the fake Graph. Bcc recipients arrive and nobody outside the envelope does; a 429 storm
is waited out (Retry-After) without losing or failing anything; a missing Mail.Send role pauses
the upstream with the fix; a message over Graph's limit fails, never truncated; doctor checks
the set-up."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import CLIENT_ID, CLIENT_SECRET, MAILBOX, RelayFactory
from tests.fakes.entra import FakeEntra
from tests.fakes.graph import FakeGraph
from tests.fakes.pki import TestPKI
from tests.relayproc import RelayProcess, spool_state, wait_until, write_config

TIMEOUT = 20
MESSAGE = (
    b"From: Scanner <scanner@contoso.com>\r\n"
    b"To: Bob <bob@example.org>, Not Sent <elsewhere@example.org>\r\n"
    b"Subject: scan\r\nMessage-ID: <graph-1@contoso.com>\r\n\r\nscan attached\r\n"
)


def graph_config(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, graph: FakeGraph, **upstream: Any
) -> dict[str, dict[str, Any]]:
    return {
        "smtp": {"listen": ["127.0.0.1:0"], "allow": ["127.0.0.1/32"], "hostname": "relay.test"},
        "spool": {"path": str(tmp_path / "spool")},
        "delivery": {"retry_initial": "0.3s", "retry_max": "2s", "max_age": "1h"},
        "upstream": {
            "kind": "graph",
            "mailbox": MAILBOX,
            "graph_base_url": graph.base_url,
            "tls_ca_file": str(pki.ca_file),
            "send_as": ["scanner@contoso.com"],
            "messages_per_minute": 0,
            **upstream,
        },
        "upstream.oauth": {
            "tenant_id": entra.tenant_id,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "authority": entra.authority_base,
            "ca_file": str(pki.ca_file),
        },
        "metrics": {"listen": "127.0.0.1:0"},
        "log": {"level": "debug"},
    }


def submit(relay: RelayProcess, recipients: list[str], data: bytes = MESSAGE) -> str:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=TIMEOUT) as client:
        client.ehlo("scanner")
        client.mail("scanner@contoso.com")
        for address in recipients:
            client.rcpt(address)
        code, reply = client.data(data)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def test_graph_delivers_to_the_envelope_bcc_included(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, graph: FakeGraph, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(graph_config(tmp_path, pki, entra, graph))
    queue_id = submit(relay, ["bob@example.org", "hidden@example.com"])
    [sent] = graph.wait_for_sent(1, TIMEOUT)
    assert sent.mailbox == MAILBOX and sent.app_id == CLIENT_ID
    assert sent.to == ("bob@example.org",)
    assert sent.bcc == ("hidden@example.com",)
    assert sent.cc == ()
    assert b"elsewhere@example.org" not in sent.mime  # in the headers, not in the envelope
    assert b"Message-ID: <graph-1@contoso.com>" in sent.mime
    assert b"by relay.test (oauth-relay)" in sent.mime  # our Received: line went up too
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) is None, TIMEOUT, "gone")
    relay.wait_for_log(rf"\[{queue_id}\] to=<hidden@example.com> delivered via default: 250")
    assert "request-id" in relay.wait_for_log(rf"\[{queue_id}\] to=<bob@example.org> delivered")
    assert CLIENT_SECRET not in relay.log_text()


def test_a_429_storm_is_waited_out_and_nothing_is_lost(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, graph: FakeGraph, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(graph_config(tmp_path, pki, entra, graph))
    graph.throttle(6, retry_after=1)
    queue_ids = [submit(relay, [f"user{n}@example.org"]) for n in range(5)]
    sent = graph.wait_for_sent(5, TIMEOUT * 2)
    assert sorted(m.bcc[0] for m in sent) == [f"user{n}@example.org" for n in range(5)]
    assert graph.throttled_count >= 1
    for queue_id in queue_ids:
        wait_until(lambda q=queue_id: spool_state(tmp_path / "spool", q) is None, TIMEOUT, queue_id)
    relay.wait_for_log(r"upstream default paused for 1s \(throttled\)")
    metrics = relay.metrics()
    assert metrics.get('relay_messages_failed_total{reason="rejected"}', 0) == 0
    assert metrics['relay_upstream_pauses_total{reason="throttled",upstream="default"}'] >= 1


def test_a_missing_mail_send_role_pauses_with_the_fix(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, graph: FakeGraph, relay_factory: RelayFactory
) -> None:
    entra.register_app(CLIENT_ID, secret=CLIENT_SECRET, roles=())
    relay = relay_factory(graph_config(tmp_path, pki, entra, graph))
    queue_id = submit(relay, ["bob@example.org"])
    line = relay.wait_for_log(r"upstream default paused for \d+s \(configuration\)")
    assert "403" in line and "Mail.Send" in line
    assert relay.http_status("/readyz") == 503
    assert spool_state(tmp_path / "spool", queue_id) in ("incoming", "deferred", "active")
    entra.register_app(CLIENT_ID, secret=CLIENT_SECRET, roles=("Mail.Send",))
    graph.wait_for_sent(1, TIMEOUT)  # once granted, the queued message goes


def test_a_message_over_the_graph_limit_fails_and_is_not_truncated(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, graph: FakeGraph, relay_factory: RelayFactory
) -> None:
    relay = relay_factory(graph_config(tmp_path, pki, entra, graph, max_request_size=65536))
    big = MESSAGE + b"x" * 76 * 1000 + b"\r\n"
    queue_id = submit(relay, ["bob@example.org"], big)
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) == "failed", TIMEOUT, "failed")
    relay.wait_for_log(rf"\[{queue_id}\] to=<bob@example.org> failed via default: 552 5\.3\.4")
    assert all(b"graph-1" not in m.mime for m in graph.sent if b"scan attached" in m.mime)


def test_doctor_checks_the_graph_setup(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, graph: FakeGraph
) -> None:
    config = write_config(tmp_path / "graph.toml", graph_config(tmp_path, pki, entra, graph))

    def doctor() -> tuple[int, list[dict[str, str]]]:
        proc = subprocess.run(
            [sys.executable, "-m", "relay", "doctor", "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return proc.returncode, json.loads(proc.stdout[proc.stdout.index("[") :])

    code, steps = doctor()
    assert code == 0, steps
    assert [s["name"] for s in steps][2:] == ["dns", "tcp", "token", "claims", "mailbox"]
    assert "aud=https://graph.microsoft.com" in steps[-2]["detail"]
    entra.register_app(CLIENT_ID, secret=CLIENT_SECRET, roles=())
    code, steps = doctor()
    assert code == 1
    assert steps[-1]["name"] == "claims" and "Mail.Send" in steps[-1]["fix"]


def test_graph_unreachable_pauses_and_is_not_an_ambiguous_outcome(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, graph: FakeGraph, relay_factory: RelayFactory
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    sections = graph_config(
        tmp_path, pki, entra, graph, graph_base_url=f"https://127.0.0.1:{closed}/v1.0"
    )
    sections["delivery"]["on_ambiguous"] = "hold"
    relay = relay_factory(sections)
    queue_id = submit(relay, ["bob@example.org"])
    relay.wait_for_log(r"upstream default paused for \d+s \(unreachable\): .*Graph unreachable")
    metrics = relay.metrics()
    assert metrics["relay_delivery_ambiguous_total"] == 0
    assert spool_state(tmp_path / "spool", queue_id) != "hold"
    assert metrics['relay_delivery_attempts_total{outcome="no_session",upstream="default"}'] >= 1


def test_a_graph_setup_error_pauses_instead_of_failing_the_queue(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, graph: FakeGraph, relay_factory: RelayFactory
) -> None:
    graph.fail_next(400, "BadRequest", "Invalid version: users")
    relay = relay_factory(graph_config(tmp_path, pki, entra, graph))
    queue_id = submit(relay, ["bob@example.org"])
    line = relay.wait_for_log(r"upstream default paused for \d+s \(configuration\)")
    assert "graph_base_url" in line
    graph.wait_for_sent(1, TIMEOUT)  # the next try goes through: nothing failed
    wait_until(lambda: spool_state(tmp_path / "spool", queue_id) is None, TIMEOUT, "delivered")
