"""Load and sink for bench/run.py.

`send_load` submits N messages of a given size over S concurrent sessions, K messages per
connection, and returns the wall time: with Postfix's smtp-source when it is installed, else
with bench/loadgen.py (asyncio, same shape). smtp-source sends one message per connection, or
with -d keeps every session open until its shared message count is used up; K > 1 is therefore
sent in rounds of `smtp-source -d -s S -m S*K`, one connection per session per round (S x K
messages), timed together. `Sink` runs bench/sink.py as a subprocess and asks it when messages
arrived.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mta import HOST, RUNNING, free_port, terminate, wait_for_greeting

BENCH = Path(__file__).resolve().parent
SENDER = "from@bench.test"
RECIPIENT = "to@bench.test"


def smtp_source_installed() -> bool:
    return shutil.which("smtp-source") is not None


def smtp_sink_installed() -> bool:
    return shutil.which("smtp-sink") is not None


@dataclass(frozen=True)
class Load:
    sessions: int
    per_connection: int
    count: int
    size: int  # payload bytes, as smtp-source -l


def smtp_source_rounds(load: Load) -> list[list[str]]:
    """The smtp-source invocations for `load` (without the target address)."""
    common = ["-M", "bench.test", "-f", SENDER, "-t", RECIPIENT, "-l", str(load.size)]
    if load.per_connection == 1:
        return [[*common, "-s", str(load.sessions), "-m", str(load.count)]]
    per_round = load.sessions * load.per_connection
    rounds = []
    for number in range(math.ceil(load.count / per_round)):
        count = min(per_round, load.count - number * per_round)
        sessions = math.ceil(count / load.per_connection)
        rounds.append([*common, "-d", "-s", str(sessions), "-m", str(count)])
    return rounds


def send_load(port: int, load: Load, generator: str) -> float:
    """Send `load` to 127.0.0.1:port; seconds from the start to the last reply."""
    if generator == "smtp-source":
        return _smtp_source(port, load)
    return _python_load(port, load)


def _smtp_source(port: int, load: Load) -> float:
    started = time.monotonic()
    for args in smtp_source_rounds(load):
        done = subprocess.run(
            ["smtp-source", *args, f"{HOST}:{port}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        if done.returncode != 0:
            raise RuntimeError(f"smtp-source {' '.join(args)}: {done.stderr.strip()[-500:]}")
    return time.monotonic() - started


def _python_load(port: int, load: Load) -> float:
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "loadgen.py"),
            "--port",
            str(port),
            "--sessions",
            str(load.sessions),
            "--per-connection",
            str(load.per_connection),
            "--count",
            str(load.count),
            "--size",
            str(load.size),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen: {done.stderr.strip()[-500:]}")
    return float(json.loads(done.stdout)["seconds"])


class Sink:
    """bench/sink.py on 127.0.0.1:port, asked over its stdin/stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "sink.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._token = RUNNING.add(self.stop)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "port":
            self.stop()
            raise RuntimeError(f"sink did not start: {line!r}")
        self.port = int(line[1])

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def count(self) -> int:
        return int(self.ask("count"))

    def wait(self, count: int, timeout: float) -> float:
        """CLOCK_MONOTONIC time of the count-th message; RuntimeError after `timeout`."""
        reply = self.ask(f"wait {count} {timeout}")
        if reply.startswith("timeout"):
            raise RuntimeError(f"sink: {reply.split()[1]} of {count} messages after {timeout}s")
        return float(reply)

    def wait_id(self, bench_id: str, timeout: float) -> float:
        reply = self.ask(f"waitid {bench_id} {timeout}")
        if reply.startswith("timeout"):
            raise RuntimeError(f"sink: message {bench_id} not there after {timeout}s")
        return float(reply)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit")
                self.proc.wait(timeout=5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        terminate(self.proc, grace=5)
        RUNNING.done(self._token)


def sink_capacity(load: Load, generator: str) -> tuple[float, str]:
    """Messages per second bench/sink.py takes from the load generator alone."""
    sink = Sink()
    try:
        seconds = send_load(sink.port, load, generator)
        sink.wait(load.count, 60)
    finally:
        sink.stop()
    return load.count / seconds, generator


def generator_capacity(load: Load) -> float | None:
    """Messages per second smtp-source sends into Postfix's smtp-sink (C, no disk): the
    ceiling of the load generator itself. None without smtp-sink/smtp-source."""
    if not (smtp_sink_installed() and smtp_source_installed()):
        return None

    port = free_port()
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "root", f"{HOST}:{port}", "256"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    token = RUNNING.add(lambda: terminate(sink, grace=5))
    try:
        wait_for_greeting(port)
        return load.count / _smtp_source(port, load)
    finally:
        terminate(sink, grace=5)
        RUNNING.done(token)
