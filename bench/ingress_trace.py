"""Where the ingress memory goes: the real daemon under tracemalloc, stage by stage.

Companion to bench/ingress_memory.py (issue #5 item 5). It starts the daemon through this same
file (`--serve CONFIG`), which turns tracemalloc on and wraps, from the outside, the functions a
message goes through on its way in:

    DataReader.read            the DATA lines appended to one BytesIO
    header_too_large           the header size check on the body
    normalize_message          in a worker thread; inside it _parse_entity and _has_long_line
    Spool.commit               in a worker thread; writes the Received: line, then the data

For each call it logs, relative to the traced memory before the first DATA: the traced bytes at
entry, the highest traced bytes during the call (tracemalloc's peak, reset at entry) and at exit,
in units of the message size S. Nothing in relay/ is changed; delivery is blocked (the maildir
cannot be created) so only ingress is seen.

    /tmp/v/bin/python bench/ingress_trace.py [--clients 1] [--size-mb 30]

With more than one client the stages overlap: the peak is then not reset per call, and the
"peak" column is the highest traced memory of the run so far (the last line: the whole run).
Linux only, loopback only, exits 0.
"""

# ruff: noqa: PLC0415  (relay is imported where it is patched or run, on purpose)

from __future__ import annotations

import argparse
import functools
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
MARK = "TRACE "
RECORD = re.compile(
    MARK + r"(?P<name> *[\w.]+) entry=(?P<entry>\d+) peak=(?P<peak>\d+) exit=(?P<exit>\d+) "
    r"rss=(?P<rss>\d+)"
)


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- inside the daemon ---------------------------------------------------------------------------


def _instrument(reset_peak: bool) -> None:
    import relay.ingress
    import relay.normalize
    import relay.smtpdata
    import relay.spool

    lock = threading.Lock()

    def emit(text: str) -> None:
        sys.stderr.write(MARK + text + "\n")  # one write: lines from threads do not mix
        sys.stderr.flush()

    def traced(name: str, fn: Any, is_async: bool = False) -> Any:
        def before() -> int:
            with lock:
                current, _ = tracemalloc.get_traced_memory()
                if reset_peak:
                    tracemalloc.reset_peak()
            return current

        def after(entry: int) -> None:
            current, peak = tracemalloc.get_traced_memory()
            with lock:
                emit(f"{name} entry={entry} peak={peak} exit={current} rss={_rss()}")

        if is_async:

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                entry = before()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    after(entry)

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            entry = before()
            try:
                return fn(*args, **kwargs)
            finally:
                after(entry)

        return wrapper

    targets: list[tuple[Any, str, str, bool]] = [
        (relay.smtpdata.DataReader, "read", "DataReader.read", True),
        (relay.ingress, "header_too_large", "header_too_large", False),  # if it exists
        (relay.ingress, "normalize_message", "normalize_message", False),
        (relay.normalize, "_parse_entity", "  _parse_entity", False),
        (relay.normalize, "_has_long_line", "  _has_long_line", False),
        (relay.spool.Spool, "commit", "Spool.commit", False),
    ]
    for owner, attribute, label, is_async in targets:
        if hasattr(owner, attribute):
            setattr(owner, attribute, traced(label, getattr(owner, attribute), is_async))


def serve(config: str, reset_peak: bool) -> int:
    tracemalloc.start(1)
    _instrument(reset_peak)
    from relay.cli import main

    return main(["serve", "--config", config])


# --- the driver ----------------------------------------------------------------------------------


def drive(clients: int, size_mb: float) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ingress_memory as bench

    content_type, body = bench.scan_body(int(size_mb * MIB))
    wires = [bench.wire_form(bench.scan_message(i, content_type, body)) for i in range(clients)]
    size = len(bench.scan_message(0, content_type, body))
    with tempfile.TemporaryDirectory(prefix="relay-trace-") as tmp:
        work = Path(tmp)
        config = bench.write_config(work, blocked=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(config)]
        if clients > 1:  # stages overlap: keep one peak for the whole run
            command.append("--global-peak")
        daemon = bench.Daemon(config, cwd=work, command=command)
        try:
            daemon.wait_ready()
            time.sleep(0.5)
            base = None
            start = threading.Barrier(clients + 1)
            replies: list[object] = [None] * clients
            threads = [
                threading.Thread(
                    target=bench.send, args=(daemon.port, i, wires[i], size, start, replies)
                )
                for i in range(clients)
            ]
            for thread in threads:
                thread.start()
            start.wait(timeout=120)
            for thread in threads:
                thread.join()
            time.sleep(0.5)
            hwm = bench.proc_status(daemon.proc.pid)["VmHWM"]
        finally:
            daemon.stop()
        records = [RECORD.search(line) for line in daemon.lines if MARK in line]
    print(f"message size S = {size} bytes ({size / MIB:.2f} MiB), clients = {clients}")
    print(f"replies: {[r[0] if isinstance(r, tuple) else r for r in replies]}")
    print()
    print("| stage | traced at entry | peak during | at exit | daemon RSS at exit |")
    print("|---|---:|---:|---:|---:|")
    top = 0
    for match in records:
        if match is None:
            continue
        name = match.group("name")
        entry, peak, exit_, rss = (int(match.group(k)) for k in ("entry", "peak", "exit", "rss"))
        if base is None:
            base = entry
        top = max(top, peak)

        def s(value: int, base: int = base) -> str:
            return f"{(value - base) / size:.2f} S"

        print(
            f"| {name.replace(' ', '&nbsp;')} | {s(entry)} | {s(peak)} | {s(exit_)} | "
            f"{rss / MIB:.0f} MiB |"
        )
    if base is not None:
        print()
        print(
            f"highest traced memory: {(top - base) / size:.2f} S = "
            f"{(top - base) / (size * clients):.2f} x bytes in flight ({clients} x S)"
        )
    print()
    print(f"daemon VmHWM: {hwm / MIB:.0f} MiB (tracemalloc's own bookkeeping included)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--size-mb", type=float, default=30)
    parser.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--global-peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, reset_peak=not args.global_peak)
    return drive(args.clients, args.size_mb)


if __name__ == "__main__":
    sys.exit(main())
