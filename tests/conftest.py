"""Shared fixtures: a test PKI, the fake Entra ID, fake Exchange Online and fake Graph, and a
factory for running the real relay daemon against them. Everything listens on 127.0.0.1, port 0."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.graph import GRAPH_RESOURCE, FakeGraph
from tests.fakes.pki import TestPKI, make_pki
from tests.relayproc import RelayProcess, write_config

# Property tests never fail for being slow on a busy machine, and in CI they draw the same
# examples every run (deterministic: a flaky test would block every landing).
settings.register_profile(
    "relay",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI", "").lower() in ("1", "true", "yes"),
)
settings.load_profile("relay")

MAILBOX = "relay@contoso.com"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "s3cr3t-Value~not-the-ID"


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def entra(pki: TestPKI) -> Iterator[FakeEntra]:
    with FakeEntra(pki) as fake:
        fake.register_app(CLIENT_ID, secret=CLIENT_SECRET)
        yield fake


@pytest.fixture
def exchange(pki: TestPKI, entra: FakeEntra) -> Iterator[FakeExchange]:
    fake = FakeExchange(
        tls_context=pki.server_context(), validate_token=entra.validate_access_token
    )
    fake.add_mailbox(MAILBOX, send_as=["scanner@contoso.com", "jürgen@contoso.com"])
    with fake:
        yield fake


@pytest.fixture
def graph(pki: TestPKI, entra: FakeEntra) -> Iterator[FakeGraph]:
    """The fake Graph, with MAILBOX; the app holds Mail.Send (and SMTP.SendAsApp, for the
    tests that have an Exchange upstream on the same mailbox too)."""
    entra.register_app(CLIENT_ID, secret=CLIENT_SECRET, roles=("SMTP.SendAsApp", "Mail.Send"))
    validate = functools.partial(entra.validate_access_token, audiences=(GRAPH_RESOURCE,))
    with FakeGraph(pki, validate) as fake:
        fake.add_mailbox(MAILBOX)
        yield fake


def exchange_config(
    tmp_path: Path, pki: TestPKI, entra: FakeEntra, exchange: FakeExchange, **overrides: Any
) -> dict[str, dict[str, Any]]:
    """A complete config for the relay in front of the fakes; override by 'section.key'."""
    sections: dict[str, dict[str, Any]] = {
        "smtp": {
            "listen": ["127.0.0.1:0"],
            "allow": ["127.0.0.1/32"],
            "hostname": "relay.test.lan",
            "max_recipients": 50,
        },
        "spool": {"path": str(tmp_path / "spool")},
        "delivery": {
            "concurrency": 3,
            "retry_initial": "0.3s",
            "retry_max": "2s",
            "max_age": "1h",
        },
        "upstream": {
            "kind": "exchange-online",
            "host": "127.0.0.1",
            "port": exchange.port,
            "mailbox": MAILBOX,
            "tls_ca_file": str(pki.ca_file),
            "timeout": "10s",
            "messages_per_minute": 0,  # pacing is tested on its own
            "send_as": ["scanner@contoso.com", "jürgen@contoso.com"],  # as the fake's mailbox
        },
        "upstream.oauth": {
            "tenant_id": entra.tenant_id,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "authority": entra.authority_base,
            "ca_file": str(pki.ca_file),
        },
        "metrics": {"listen": "127.0.0.1:0"},
        "server": {"shutdown_grace": "5s"},
        "log": {"level": "debug"},
    }
    for dotted, value in overrides.items():
        section, _, key = dotted.rpartition(".")
        if value is None:
            sections[section].pop(key, None)
        else:
            sections[section][key] = value
    return sections


RelayFactory = Callable[..., RelayProcess]


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator[RelayFactory]:
    """`relay_factory(sections)` writes the config and starts a daemon; all are stopped after."""
    started: list[RelayProcess] = []

    def factory(sections: dict[str, dict[str, Any]], *, start: bool = True) -> RelayProcess:
        config = write_config(tmp_path / f"relay{len(started)}.toml", sections)
        relay = RelayProcess(config, cwd=tmp_path)
        started.append(relay)
        return relay.start() if start else relay

    yield factory
    for relay in started:
        if relay.running:
            relay.kill()


RelayWith = Callable[..., RelayProcess]


@pytest.fixture
def relay_with(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    relay_factory: RelayFactory,
) -> RelayWith:
    """`relay_with(**{"section.key": value})`: a daemon in front of the fakes, with overrides."""

    def start(**overrides: Any) -> RelayProcess:
        return relay_factory(exchange_config(tmp_path, pki, entra, exchange, **overrides))

    return start


@pytest.fixture
def exchange_relay(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    relay_factory: RelayFactory,
) -> RelayProcess:
    return relay_factory(exchange_config(tmp_path, pki, entra, exchange))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.e2e.test_crash import REPORTS

    for line in REPORTS:
        terminalreporter.write_line(line)
