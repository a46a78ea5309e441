"""Run the real relay daemon (`python -m relay serve`) as a subprocess for end-to-end tests.

Readiness and every other wait is on a condition with a timeout: the daemon's "ready:" log
line, a log pattern, a spool state. Nothing sleeps blindly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

_READY = re.compile(r"ready: smtp=(\S+) metrics=(\S+)")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll a cheap predicate (a file listing, a counter) until it holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        event.wait(interval)


def _split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class RelayProcess:
    """One daemon process; `start()` can be called again after `kill()` or `stop()`."""

    def __init__(self, config: Path, *, cwd: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.cwd = cwd
        self.env = {**os.environ, **(env or {})}
        self.env.pop("RELAY_CONFIG", None)
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._lines_changed = threading.Condition()
        self.smtp_port = 0
        self.metrics_port = 0
        self._reader: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> RelayProcess:
        start_index = len(self.lines)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(self.config)],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        line = self.wait_for_log(_READY, timeout=timeout, since=start_index)
        match = _READY.search(line)
        assert match is not None
        self.smtp_port = _split_host_port(match.group(1).split(",")[0])[1]
        if match.group(2) != "off":
            self.metrics_port = _split_host_port(match.group(2))[1]
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._lines_changed:
                self.lines.append(line.rstrip("\n"))
                self._lines_changed.notify_all()
        with self._lines_changed:
            self._lines_changed.notify_all()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        """SIGKILL: the crash the spool must survive."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- observing -----------------------------------------------------------------------------

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, since: int = 0
    ) -> str:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._lines_changed:
            while True:
                for line in self.lines[since:]:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.proc is not None
                    and self.proc.poll() is not None
                    and len(self.lines) == since
                ):
                    raise AssertionError(
                        f"no log line matching {regex.pattern!r} within {timeout}s; log:\n"
                        + "\n".join(self.lines[-40:])
                    )
                since = len(self.lines)
                self._lines_changed.wait(remaining)

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def metrics(self) -> dict[str, float]:
        """Scrape /metrics over HTTP: {'name{labels}': value}."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            text = r.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def http_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5
            ) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    # --- submitting ----------------------------------------------------------------------------

    def submit(
        self,
        mail_from: str,
        rcpts: Iterable[str],
        data: bytes,
        *,
        source: str = "127.0.0.1",
        mail_options: Iterable[str] = (),
        timeout: float = 30.0,
    ) -> tuple[int, bytes]:
        """Send one message with smtplib; returns the reply to the end of DATA."""
        with smtplib.SMTP(
            "127.0.0.1", self.smtp_port, timeout=timeout, source_address=(source, 0)
        ) as client:
            client.ehlo("test-client.example")
            code, reply = client.mail(mail_from, list(mail_options))
            assert code == 250, (code, reply)
            for rcpt in rcpts:
                code, reply = client.rcpt(rcpt)
                assert code == 250, (code, reply)
            return client.data(data)


def queue_id_of(reply: bytes) -> str:
    match = re.search(rb"queued as ([0-9A-F]+)", reply)
    assert match is not None, reply
    return match.group(1).decode()


def spool_state(spool: Path, queue_id: str) -> str | None:
    for state in ("incoming", "active", "deferred", "failed", "hold", "corrupt"):
        if (spool / state / f"{queue_id}.json").exists():
            return state
    return None


def spool_meta(spool: Path, queue_id: str, within: float = 5.0) -> dict[str, Any]:
    """A message's metadata, wherever it is. The daemon may rename it between two reads (a
    claim, a pause that ends), so a pass that misses it looks again, for `within` seconds."""
    states = ("incoming", "active", "deferred", "failed", "hold", "corrupt")

    def read() -> dict[str, Any] | None:
        for state in states:
            with contextlib.suppress(FileNotFoundError):
                path = spool / state / f"{queue_id}.json"
                loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
                return loaded
        return None

    meta: dict[str, Any] = wait_until(read, within, f"{queue_id} in the spool", interval=0.005)
    return meta


TRACE = re.compile(
    rb"\AReceived: from [^\r\n]*\r\n\tby (?P<by>\S+) \(oauth-relay\) with (?P<proto>\S+) "
    rb"id (?P<id>[0-9A-F]+);\r\n\t[^\r\n]+\r\n"
)


def strip_trace(data: bytes, queue_id: str | None = None) -> bytes:
    """The message without the Received: line the relay put on top (which must be there)."""
    match = TRACE.match(data)
    assert match is not None, f"no oauth-relay Received: line on top: {data[:200]!r}"
    if queue_id is not None:
        assert match.group("id").decode() == queue_id
    return data[match.end() :]
