"""The systemd side: the unit passes `systemd-analyze verify` and is rated "OK" or better by
`systemd-analyze security`, and the daemon speaks sd_notify (READY=1, RELOADING=1 with
MONOTONIC_USEC, STOPPING=1, WATCHDOG=1) to a NOTIFY_SOCKET the test listens on."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.relayproc import RelayProcess, write_config

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "oauth-relay.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's oauth-relay (verify checks that
    the program exists)."""
    program = Path(sys.executable).with_name("oauth-relay")
    assert program.exists(), program
    unit = tmp_path / "oauth-relay.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/oauth-relay", str(program)))
    return unit


@needs_analyze
def test_the_unit_verifies(tmp_path: Path) -> None:
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "verify", str(local_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "oauth-relay.service" not in proc.stderr, proc.stderr  # no warning about the unit


@needs_analyze
def test_the_unit_is_rated_ok_or_better(tmp_path: Path) -> None:
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(local_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", proc.stdout)
    assert match is not None, proc.stdout + proc.stderr
    assert match.group(2) in ("PERFECT", "SAFE", "OK"), match.group(0)
    assert float(match.group(1)) < 2.5, match.group(0)


def test_the_unit_keeps_what_the_daemon_needs() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "StateDirectory=oauth-relay",
        "LoadCredential=client_secret:",
        "RELAY_UPSTREAM__OAUTH__CLIENT_SECRET_FILE=%d/client_secret",
        "RELAY_SPOOL__PATH=/var/lib/oauth-relay/spool",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ):
        assert line in text, line
    stop = int(re.search(r"TimeoutStopSec=(\d+)", text).group(1))  # type: ignore[union-attr]
    assert stop > 20 + 5, "TimeoutStopSec must exceed the default shutdown_grace"


class NotifySocket:
    """What a service manager hears: one datagram per sd_notify call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(15)
        self.heard: list[list[str]] = []

    def next_with(self, assignment: str) -> list[str]:
        """The next datagram holding `assignment`; others are kept in `heard`."""
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                raise AssertionError(f"no {assignment} within 15s; heard {self.heard}") from None
            fields = data.decode().split("\n")
            self.heard.append(fields)
            if assignment in fields:
                return fields


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.sock.close()


def test_sd_notify_ready_reloading_stopping_and_watchdog(
    tmp_path: Path, notify: NotifySocket
) -> None:
    config = write_config(
        tmp_path / "relay.toml",
        {
            "smtp": {"listen": ["127.0.0.1:0"], "allow": ["127.0.0.1/32"]},
            "spool": {"path": str(tmp_path / "spool")},
            "upstream": {"kind": "maildir", "path": str(tmp_path / "maildir")},
            "metrics": {"listen": ""},
        },
    )
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    relay = RelayProcess(config, cwd=tmp_path, env=env).start()
    try:
        ready = notify.next_with("READY=1")
        assert any(field.startswith("STATUS=ready") for field in ready)
        notify.next_with("WATCHDOG=1")
        notify.next_with("WATCHDOG=1")  # again: it is periodic

        relay.signal(signal.SIGHUP)
        reloading = notify.next_with("RELOADING=1")
        usec = next(f for f in reloading if f.startswith("MONOTONIC_USEC="))
        assert int(usec.split("=", 1)[1]) > 0
        notify.next_with("READY=1")
        relay.wait_for_log(r"reloaded: 1 listeners")

        relay.signal(signal.SIGTERM)
        notify.next_with("STOPPING=1")
        assert relay.proc is not None
        assert relay.proc.wait(timeout=30) == 0
    finally:
        if relay.running:
            relay.kill()


def test_without_notify_socket_nothing_is_sent(tmp_path: Path) -> None:
    from relay.osutil import sd_notify

    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    assert (
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from relay.osutil import sd_notify; print(sd_notify('READY=1'))",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        == "False"
    )
    assert callable(sd_notify)
