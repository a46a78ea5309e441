"""Ingress memory on large messages (issue #5 item 5).

"A 30 MB scan from each of 10 copiers at once must not need more than a small multiple of the
bytes in flight." This script measures it against the real daemon (`python -m relay serve`):

    /tmp/v/bin/python bench/ingress_memory.py [--clients 10] [--size-mb 30] [--runs 3]

For every run it writes a sandbox config (maildir upstream) in a fresh temp directory, starts a
fresh daemon (so VmHWM is that run's peak), reads its idle VmRSS, then N client threads each
send one S MiB message (a copier's scan: multipart/mixed with a base64 PDF attachment, CRLF
lines of 76 characters) at the same moment over loopback. A sampler thread reads the daemon's
VmRSS every 20 ms; at the end VmHWM gives the peak. The same is done with one client as a
baseline, so the per-message multiple is visible next to the concurrent one.

Reported per configuration (median / min / max over --runs):
  idle RSS, peak RSS (VmHWM), peak - idle, bytes in flight (N x message size) and
  ratio = (peak - idle) / bytes in flight.

`--upstream blocked` points the maildir at a path that cannot be created, so delivery never
opens a session and never reads a body back: only ingress (DATA -> normalise -> spool commit)
is measured. The default `maildir` lets the daemon deliver, as the sandbox does, and delivery
(read the body back, prepend Return-Path) overlaps with the other clients' DATA.

Linux only (reads /proc/<pid>/status). Loopback only. No timing assertions: it prints a markdown
table and exits 0 (1 only when the daemon or a client failed).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from pathlib import Path

from mta import proc_status, write_toml

MIB = 1024 * 1024
HOST = "127.0.0.1"
READY = re.compile(r"ready: smtp=(\S+) metrics=(\S+)")
SAMPLE_EVERY = 0.02
MAX_MESSAGE_SIZE = 40 * MIB  # 41943040: room for a 30 MiB scan plus headers


# --- the message ---------------------------------------------------------------------------------


def scan_body(size: int) -> tuple[bytes, bytes]:
    """(top-level Content-Type value, MIME body) of a copier's scan about `size` bytes long:
    a short text part and a PDF-like attachment, base64 in CRLF lines of 76 characters."""
    boundary = b"----=_Part_scan_" + os.urandom(8).hex().encode()
    text = (
        b"--" + boundary + b"\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n"
        b"Please open the attached PDF file.\r\n"
        b"Device: MFP-3F-EAST  Resolution: 300dpi  Pages: 412\r\n\r\n"
        b"--" + boundary + b"\r\n"
        b'Content-Type: application/pdf; name="scan_0001.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="scan_0001.pdf"\r\n\r\n'
    )
    closing = b"\r\n--" + boundary + b"--\r\n"
    # base64: 4 characters per 3 bytes, plus CRLF per 76 characters (57 bytes)
    room = max(size - len(text) - len(closing) - 600, 57)
    raw_len = room * 57 // 78
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + os.urandom(max(raw_len - 16, 0))
    encoded = base64.encodebytes(pdf).replace(b"\n", b"\r\n").rstrip(b"\r\n")
    content_type = b'multipart/mixed; boundary="' + boundary + b'"'
    return content_type, text + encoded + closing


def scan_message(index: int, content_type: bytes, body: bytes) -> bytes:
    header = (
        f"From: Scanner MFP-3F-EAST <scanner{index}@example.com>\r\n"
        f"To: you@example.com\r\n"
        f"Subject: Scanned document {index:04d}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: {make_msgid(idstring=f'scan{index}', domain='mfp.example.com')}\r\n"
        f"MIME-Version: 1.0\r\n"
    ).encode("ascii")
    return header + b"Content-Type: " + content_type + b"\r\n\r\n" + body


def wire_form(message: bytes) -> bytes:
    """The DATA payload as sent: dot-stuffed, ended by <CRLF>.<CRLF>."""
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


# --- the daemon ----------------------------------------------------------------------------------


def write_config(directory: Path, *, blocked: bool) -> Path:
    if blocked:
        # a path under a regular file: the maildir cannot be created, delivery never opens a
        # session, so it never reads a body back (messages are deferred for an hour)
        (directory / "not-a-dir").write_bytes(b"")
        maildir = directory / "not-a-dir" / "maildir"
    else:
        maildir = directory / "maildir"
    sections: dict[str, dict[str, object]] = {
        "smtp": {
            "listen": [f"{HOST}:0"],
            "allow": ["127.0.0.1/32"],
            "hostname": "relay.bench.lan",
            "max_message_size": MAX_MESSAGE_SIZE,
            "max_recipients": 10,
        },
        "spool": {"path": str(directory / "spool")},
        "delivery": {"max_age": "1d", "retry_initial": "1h", "retry_max": "1h"},
        "upstream": {"kind": "maildir", "path": str(maildir)},
        "metrics": {"listen": ""},
        "log": {"level": "info", "format": "text"},
    }
    return write_toml(directory / "relay.toml", sections)


class Daemon:
    """`python -m relay serve --config CONFIG` (or `command`), its output kept in `lines`."""

    def __init__(self, config: Path, cwd: Path, command: list[str] | None = None) -> None:
        env = {**os.environ}
        env.pop("RELAY_CONFIG", None)
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    match = READY.search(line)
                    if match:
                        self.port = int(match.group(1).split(",")[0].rpartition(":")[2])
                        return
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise RuntimeError("daemon not ready:\n" + "\n".join(self.lines[-30:]))
                self._changed.wait(min(remaining, 0.5))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


class Sampler(threading.Thread):
    """VmRSS of the daemon every 20 ms: (seconds since start, bytes)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.stopped = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                rss = proc_status(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.samples.append((time.monotonic() - self.t0, rss))
            self.stopped.wait(SAMPLE_EVERY)

    def peak(self, until: float | None = None) -> int:
        return max((r for t, r in self.samples if until is None or t <= until), default=0)


# --- one run -------------------------------------------------------------------------------------


@dataclass
class RunResult:
    clients: int
    message_size: int
    idle: int
    peak_hwm: int  # the run's peak: VmHWM at the end (or a higher 20 ms sample, see below)
    peak_ingress: int  # highest sampled VmRSS until the last 250 reply
    after: int  # VmRSS once everything settled
    seconds: float  # first DATA byte to last 250 reply
    errors: list[str] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return self.clients * self.message_size

    @property
    def ratio(self) -> float:
        return (self.peak_hwm - self.idle) / self.in_flight


def send(
    port: int, index: int, wire: bytes, size: int, start: threading.Barrier, replies: list[object]
) -> None:
    try:
        with smtplib.SMTP(HOST, port, timeout=600) as client:
            client.ehlo("mfp-3f-east.example.com")
            code, reply = client.mail(f"scanner{index}@example.com", [f"SIZE={size}"])
            if code != 250:
                raise RuntimeError(f"MAIL: {code} {reply!r}")
            code, reply = client.rcpt("you@example.com")
            if code != 250:
                raise RuntimeError(f"RCPT: {code} {reply!r}")
            start.wait(timeout=120)  # every client starts its DATA at the same moment
            code, reply = client.docmd("DATA")
            if code != 354:
                raise RuntimeError(f"DATA: {code} {reply!r}")
            assert client.sock is not None
            client.sock.sendall(wire)
            code, reply = client.getreply()
            replies[index] = (code, reply, time.monotonic())
    except Exception as exc:  # reported, not raised: the table still gets printed
        replies[index] = exc
        start.abort()  # nobody waits for a client that is gone


def count_files(directory: Path) -> int:
    try:
        return sum(1 for item in directory.iterdir() if item.is_file())
    except FileNotFoundError:
        return 0


def one_run(
    clients: int,
    wires: list[bytes],
    message_size: int,
    *,
    blocked: bool,
    timeline: Path | None = None,
) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        config = write_config(work, blocked=blocked)
        daemon = Daemon(config, cwd=work)
        errors: list[str] = []
        try:
            daemon.wait_ready()
            pid = daemon.proc.pid
            time.sleep(0.5)  # let start-up garbage settle before reading the idle size
            idle = proc_status(pid)["VmRSS"]
            sampler = Sampler(pid)
            sampler.start()
            start = threading.Barrier(clients + 1)
            replies: list[object] = [None] * clients
            threads = [
                threading.Thread(
                    target=send, args=(daemon.port, i, wires[i], message_size, start, replies)
                )
                for i in range(clients)
            ]
            for thread in threads:
                thread.start()
            with contextlib.suppress(threading.BrokenBarrierError):
                start.wait(timeout=120)  # broken: a client failed before DATA (see `replies`)
            began = time.monotonic()
            for thread in threads:
                thread.join()
            last_reply = began
            for index, reply in enumerate(replies):
                if isinstance(reply, tuple) and reply[0] == 250:
                    last_reply = max(last_reply, reply[2])
                else:
                    errors.append(f"client {index}: {reply!r}")
            ingress_until = last_reply - sampler.t0
            # let delivery finish (maildir) or let the daemon settle (blocked), then read the peak
            deadline = time.monotonic() + 300
            if not blocked:
                new = work / "maildir" / "new"
                delivered = clients - len(errors)
                while count_files(new) < delivered and time.monotonic() < deadline:
                    time.sleep(0.05)
                if count_files(new) < delivered:
                    errors.append(f"only {count_files(new)} of {delivered} delivered")
            time.sleep(0.5)
            status = proc_status(pid)
            sampler.stopped.set()
            sampler.join()
            if timeline is not None:
                with timeline.open("a", encoding="ascii") as out:
                    out.writelines(
                        f"{clients},{t - (began - sampler.t0):.3f},{rss}\n"
                        for t, rss in sampler.samples
                    )
            return RunResult(
                clients=clients,
                message_size=message_size,
                idle=idle,
                # the kernel updates hiwater_rss lazily and counts RSS per thread in batches,
                # so a sample can read a few pages above VmHWM: the peak is the larger one
                peak_hwm=max(status["VmHWM"], sampler.peak()),
                peak_ingress=sampler.peak(until=ingress_until),
                after=status["VmRSS"],
                seconds=last_reply - began,
                errors=errors,
            )
        finally:
            daemon.stop()
            if daemon.proc.returncode not in (0, None):
                print(f"daemon exited with {daemon.proc.returncode}:", file=sys.stderr)
                print("\n".join(daemon.lines[-30:]), file=sys.stderr)


# --- report --------------------------------------------------------------------------------------


def mib(value: float) -> str:
    return f"{value / MIB:.0f}"


def spread(values: list[float], fmt: str = "{:.0f}", scale: float = MIB) -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    return f"{fmt.format(med / scale)} ({fmt.format(lo / scale)}-{fmt.format(hi / scale)})"


def table(results: dict[int, list[RunResult]], upstream: str) -> str:
    rows = [
        f"upstream: {upstream}; values are median (min-max) of the runs; sizes in MiB; "
        "ratio = (peak - idle) / in flight",
        "",
        "| clients | msg MiB | in flight | idle RSS | peak RSS (VmHWM) | peak - idle | ratio | "
        "peak until last 250 | ratio until last 250 | RSS after | DATA s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clients, runs in results.items():
        in_flight = runs[0].in_flight
        ingress_ratio = [(r.peak_ingress - r.idle) / in_flight for r in runs]
        rows.append(
            "| "
            + " | ".join(
                [
                    str(clients),
                    f"{runs[0].message_size / MIB:.1f}",
                    mib(in_flight),
                    spread([r.idle for r in runs]),
                    spread([r.peak_hwm for r in runs]),
                    spread([r.peak_hwm - r.idle for r in runs]),
                    spread([r.ratio for r in runs], "{:.2f}", 1),
                    spread([r.peak_ingress for r in runs]),
                    spread(ingress_ratio, "{:.2f}", 1),
                    spread([r.after for r in runs]),
                    spread([r.seconds for r in runs], "{:.1f}", 1),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10, help="concurrent clients (10)")
    parser.add_argument("--size-mb", type=float, default=30, help="message size in MiB (30)")
    parser.add_argument("--runs", type=int, default=3, help="fresh daemon runs per setting (3)")
    parser.add_argument(
        "--upstream",
        choices=("maildir", "blocked"),
        default="maildir",
        help="maildir: deliver as the sandbox does; blocked: no delivery, ingress only",
    )
    parser.add_argument(
        "--timeline", type=Path, help="append the RSS samples here (clients,seconds,bytes)"
    )
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("needs Linux (/proc/<pid>/status)", file=sys.stderr)
        return 2
    blocked = args.upstream == "blocked"
    counts = [args.clients] if args.clients == 1 else [args.clients, 1]
    content_type, body = scan_body(int(args.size_mb * MIB))
    messages = [scan_message(i, content_type, body) for i in range(max(counts))]
    del body
    wires = [wire_form(m) for m in messages]
    size = len(messages[0])
    del messages
    print(
        f"message: {size} bytes ({size / MIB:.2f} MiB), {size // 78} lines; "
        f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    results: dict[int, list[RunResult]] = {}
    failed = False
    for clients in counts:
        for run in range(args.runs):
            result = one_run(clients, wires, size, blocked=blocked, timeline=args.timeline)
            results.setdefault(clients, []).append(result)
            print(
                f"clients={clients} run={run + 1}: idle={mib(result.idle)} "
                f"hwm={mib(result.peak_hwm)} until-250={mib(result.peak_ingress)} "
                f"after={mib(result.after)} MiB ratio={result.ratio:.2f} "
                f"data={result.seconds:.1f}s",
                file=sys.stderr,
            )
            for error in result.errors:
                failed = True
                print(f"  error: {error}", file=sys.stderr)
    print(table(results, args.upstream))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
