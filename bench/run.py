"""Throughput and scale of oauth-relay, next to Postfix on the same machine (issue #8 item 1).

    python bench/run.py [--runs 3] [--quick] [--only NAME[,NAME]] [--no-postfix]
                        [--output FILE] [--loadgen auto|smtp-source|python]

Run it from the repository root with the dev venv's python (the daemon is started with the
same interpreter: `python -m relay serve --config FILE`). It prints a markdown table,

    measurement | oauth-relay median (min-max) | Postfix median (min-max) | ratio | target | met?

and exits 0 unless something failed to run. No timing is asserted anywhere.

What is measured (each the median of --runs runs, with min and max; every run in a fresh temp
directory with a fresh daemon, and a fresh throwaway Postfix instance when Postfix is installed;
the two alternate run by run):

  ingest5k-cS-kK  5 KB messages (smtp-source -l 5120) over S = 1, 4, 16 concurrent connections,
                  K = 1 or 10 messages per connection; messages/s from the first connect to the
                  last 250. Durable spool (both fsync before 250). The upstream is DOWN (a
                  loopback port that refuses connections), so acceptance is measured without
                  delivery competing for the CPU: oauth-relay pauses the upstream after the
                  first refused connection and the queue grows; Postfix's relayhost points at
                  the same kind of port, so its queue manager defers the mail (its real
                  behaviour during an outage).
  ingest1m        1 MB messages (smtp-source -l 1000000) over 4 connections, one per
                  connection, upstream down; MB/s (10^6 bytes of payload per message).
  e2e             2,000 x 5 KB over 16 connections, upstream = bench/sink.py: messages/s from the
                  first connect until the sink has the last one.
  latency         one 5 KB message at a time (smtplib, one connection), upstream = the sink:
                  from the client reading the 250 to the sink reading the final dot (both
                  CLOCK_MONOTONIC); p50 and p99 in ms of 200 messages per run.
  rss-idle        memory 1 s after start with an empty spool. oauth-relay: VmRSS. Postfix:
                  the sum of PSS over its master and children (for information; no target).
  queued          100,000 messages of 5 KB written straight into a fresh spool in the relay's
                  on-disk format (deferred/<id>.json + data/<id>.eml, as after an outage: one
                  attempt made, next one in an hour) - seconds, not an SMTP run; then the
                  daemon is started with the upstream down: seconds from process start to the
                  `ready:` log line (the queue is scanned before it), and VmRSS once it is
                  stable. oauth-relay only (Postfix does not scan its queue at start).
  peak30m         10 clients each send one 30 MiB scan-shaped message at once (the message of
                  bench/ingress_memory.py), upstream = the sink with oauth-relay's default
                  3 delivery connections (each delivery holds a body): peak memory - idle.
                  oauth-relay: VmHWM - idle VmRSS. Postfix: highest sampled PSS sum - idle.
  calibration     (once, not in the table) the sink alone and the load generator alone, to show
                  neither was the limit.

Load: Postfix's smtp-source when installed (timed from start to exit; 10 messages per
connection are sent in rounds of `smtp-source -d`, see bench/traffic.py), else bench/loadgen.py.
Sink: bench/sink.py for both MTAs. oauth-relay and Postfix get the same delivery concurrency
(10 connections to the sink; 3 for peak30m). Postfix: a throwaway instance per run (see
bench/mta.py); nothing outside the temp directory is changed. Linux only (/proc), loopback
only, root for Postfix (it runs as the postfix user; the temp directories are made 0755).

--quick: small counts and one run, about 35 s. The full default run took 6.6 to 9.7 minutes
on a 2-core machine shared with other work.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from types import FrameType

import ingress_memory
import loadgen
from mta import (
    HOST,
    MIB,
    QUEUE_CHECKED,
    RUNNING,
    ClosedPort,
    Postfix,
    Relay,
    postfix_installed,
)
from traffic import (
    Load,
    Sink,
    generator_capacity,
    send_load,
    sink_capacity,
    smtp_source_installed,
)

REPO = Path(__file__).resolve().parent.parent
RELAY, POSTFIX = "oauth-relay", "Postfix"
SMALL = 5120  # smtp-source -l: payload bytes of a "5 KB" message
LARGE = 1_000_000  # payload bytes of a "1 MB" message
CONCURRENCY = 10  # delivery connections to the sink, both MTAs
DEFAULT_CONCURRENCY = 3  # oauth-relay's default [delivery] concurrency (Exchange's limit)
PAYLOAD = loadgen.payload(SMALL)


# --- sizes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    ingest_small: dict[int, int]  # connections -> messages per run
    ingest_large: int
    e2e: int
    latency: int
    queued: int
    scan_mib: float
    scan_clients: int


FULL = Sizes(
    ingest_small={1: 300, 4: 1000, 16: 2000},
    ingest_large=100,
    e2e=2000,
    latency=200,
    queued=100_000,
    scan_mib=30,
    scan_clients=10,
)
QUICK = Sizes(
    ingest_small={1: 30, 4: 80, 16: 160},
    ingest_large=10,
    e2e=200,
    latency=20,
    queued=5_000,
    scan_mib=3,
    scan_clients=10,
)


@dataclass
class Context:
    sizes: Sizes
    generator: str  # "smtp-source" or "python"
    base: Path
    notes: list[str] = field(default_factory=list)
    _scans: list[bytes] = field(default_factory=list)

    @contextlib.contextmanager
    def workdir(self, label: str) -> Iterator[Path]:
        """A fresh directory for one run, removed afterwards (0755: Postfix's user walks it)."""
        path = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.base))
        path.chmod(0o755)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def scans(self) -> list[bytes]:
        """The 10 scan-shaped messages on the wire (dot-stuffed), built once."""
        if not self._scans:
            content_type, body = ingress_memory.scan_body(int(self.sizes.scan_mib * MIB))
            self._scans = [
                ingress_memory.wire_form(ingress_memory.scan_message(i, content_type, body))
                for i in range(self.sizes.scan_clients)
            ]
        return self._scans


# --- running an MTA -----------------------------------------------------------------------------


Mta = Relay | Postfix


@contextlib.contextmanager
def running(
    system: str, work: Path, upstream_port: int, concurrency: int = CONCURRENCY
) -> Iterator[Mta]:
    mta: Mta = (Relay if system == RELAY else Postfix)(work, upstream_port, concurrency)
    try:
        mta.start()
        yield mta
    finally:
        mta.stop()


@contextlib.contextmanager
def upstream_down() -> Iterator[int]:
    closed = ClosedPort()
    try:
        yield closed.port
    finally:
        closed.close()


@contextlib.contextmanager
def sink() -> Iterator[Sink]:
    started = Sink()
    try:
        yield started
    finally:
        started.stop()


def warm_up(port: int, sessions: int, generator: str) -> None:
    """A few messages first: Postfix starts its smtpd processes, the relay its threads."""
    send_load(port, Load(sessions, 1, 2 * sessions, SMALL), generator)


def five_kb_message(bench_id: str) -> bytes:
    head = (
        "From: <from@bench.test>\r\nTo: <to@bench.test>\r\nSubject: latency probe\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <{bench_id}@bench.test>\r\nX-Bench-Id: {bench_id}\r\n\r\n"
    )
    return head.encode() + PAYLOAD


# --- measurements -------------------------------------------------------------------------------


def ingest_small(sessions: int, per_connection: int) -> Callable[[Context, str], dict[str, float]]:
    def measure(ctx: Context, system: str) -> dict[str, float]:
        count = ctx.sizes.ingest_small[sessions]
        with (
            ctx.workdir(system) as work,
            upstream_down() as port,
            running(system, work, port) as mta,
        ):
            warm_up(mta.port, sessions, ctx.generator)
            load = Load(sessions, per_connection, count, SMALL)
            seconds = send_load(mta.port, load, ctx.generator)
        return {f"ingest5k-c{sessions}-k{per_connection}": count / seconds}

    return measure


def ingest_large(ctx: Context, system: str) -> dict[str, float]:
    count = ctx.sizes.ingest_large
    with ctx.workdir(system) as work, upstream_down() as port, running(system, work, port) as mta:
        warm_up(mta.port, 4, ctx.generator)
        seconds = send_load(mta.port, Load(4, 1, count, LARGE), ctx.generator)
    return {"ingest1m": count * LARGE / 1e6 / seconds}


def end_to_end(ctx: Context, system: str) -> dict[str, float]:
    count = ctx.sizes.e2e
    with (
        ctx.workdir(system) as work,
        sink() as upstream,
        running(system, work, upstream.port) as mta,
    ):
        warm_up(mta.port, 16, ctx.generator)
        upstream.wait(32, 60)
        started = time.monotonic()
        submitted = send_load(mta.port, Load(16, 1, count, SMALL), ctx.generator)
        last = upstream.wait(32 + count, 600)
    return {"e2e": count / (last - started), "e2e-submit": count / submitted}


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def latency(ctx: Context, system: str) -> dict[str, float]:
    samples: list[float] = []
    with (
        ctx.workdir(system) as work,
        sink() as upstream,
        running(system, work, upstream.port) as mta,
        smtplib.SMTP(HOST, mta.port, local_hostname="bench.test", timeout=60) as client,
    ):
        for number in range(-5, ctx.sizes.latency):  # the first five warm up, uncounted
            bench_id = f"lat{number + 5}-{os.getpid()}"
            client.sendmail("from@bench.test", ["to@bench.test"], five_kb_message(bench_id))
            accepted = time.monotonic()
            arrived = upstream.wait_id(bench_id, 60)
            if number >= 0:
                samples.append(arrived - accepted)
            time.sleep(0.02)  # idle: the previous delivery's bookkeeping is done
    return {
        "latency-p50": 1000 * percentile(samples, 0.50),
        "latency-p99": 1000 * percentile(samples, 0.99),
        "latency-max": 1000 * max(samples),
    }


def rss_idle(ctx: Context, system: str) -> dict[str, float]:
    with ctx.workdir(system) as work, upstream_down() as port, running(system, work, port) as mta:
        time.sleep(1.0)
        return {"rss-idle": mta.memory() / MIB}


def fill_spool(root: Path, count: int) -> float:
    """`count` deferred messages of 5 KB written straight into a spool; seconds taken."""
    from relay.model import Attempt, QueueEntry, Recipient  # noqa: PLC0415 (the code under test)
    from relay.spool import Spool, State, new_queue_id  # noqa: PLC0415

    started = time.monotonic()
    spool = Spool(root)
    spool.open()
    now = time.time()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for number in range(count):
        received = now - (count - number) / 1000  # one per millisecond: distinct ids
        queue_id = new_queue_id(received)
        body = five_kb_message(f"q{number}")
        entry = QueueEntry(
            queue_id=queue_id,
            mail_from="from@bench.test",
            recipients=(Recipient("to@bench.test"),),
            received_at=received,
            size=len(body),
            client="127.0.0.1",
            helo="bench.test",
            attempts=1,
            next_attempt_at=now + 3600,
            history=(Attempt(received, "deferred", "451 4.4.1 upstream unreachable"),),
        )
        for path, data in (
            (spool.body_path(queue_id), body),
            (spool.meta_path(State.DEFERRED, queue_id), entry.dumps()),
        ):
            fd = os.open(path, flags, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
    return time.monotonic() - started


def settled_memory(mta: Mta, limit: float = 30.0) -> int:
    """Memory once four readings 0.25 s apart are within 1 MiB of each other."""
    readings: list[int] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        readings.append(mta.memory())
        recent = readings[-4:]
        if len(recent) == 4 and max(recent) - min(recent) <= MIB:
            break
        time.sleep(0.25)
    return readings[-1]


def queued(ctx: Context, system: str) -> dict[str, float]:
    count = ctx.sizes.queued
    with ctx.workdir(system) as work, upstream_down() as port:
        filled = fill_spool(work / "spool", count)
        with running(system, work, port) as mta:
            assert isinstance(mta, Relay)
            scheduled = mta.wait_for_log(QUEUE_CHECKED)  # RSS once every entry is scheduled
            memory = settled_memory(mta)
            return {
                "queued-rss": memory / MIB,
                "queued-ready": mta.ready_seconds,
                "queued-startup": mta.startup_logged,
                "queued-scheduled": scheduled,
                "queued-fill": filled,
            }


class Sampler(threading.Thread):
    """The highest value of `read()` every 25 ms until stopped."""

    def __init__(self, read: Callable[[], int]) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, self.read())
            self.stopped.wait(0.025)


def send_scans(port: int, wires: list[bytes]) -> None:
    """Every wire at once from its own client (they meet at a barrier before DATA)."""
    start = threading.Barrier(len(wires) + 1)
    replies: list[object] = [None] * len(wires)
    threads = [
        threading.Thread(
            target=ingress_memory.send, args=(port, i, wire, len(wire), start, replies)
        )
        for i, wire in enumerate(wires)
    ]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait(timeout=120)
    for thread in threads:
        thread.join()
    failed = [r for r in replies if not (isinstance(r, tuple) and r[0] == 250)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(wires)} scans not accepted: {failed[0]!r}")


def peak_scans(ctx: Context, system: str) -> dict[str, float]:
    wires = ctx.scans()
    with (
        ctx.workdir(system) as work,
        sink() as upstream,
        running(system, work, upstream.port, DEFAULT_CONCURRENCY) as mta,
    ):
        time.sleep(1.0)
        idle = mta.memory()
        sampler = Sampler(mta.memory)
        sampler.start()
        try:
            send_scans(mta.port, wires)
            upstream.wait(len(wires), 300)
            time.sleep(0.5)
        finally:
            sampler.stopped.set()
            sampler.join()
        peak = max(sampler.peak, mta.peak_memory())
    return {"peak30m": (peak - idle) / MIB, "peak30m-idle": idle / MIB, "peak30m-peak": peak / MIB}


# --- what the table shows -----------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    fmt: str = "{:.0f}"
    min_ratio: float | None = None  # target: oauth-relay / Postfix at least this
    max_value: float | None = None  # target: oauth-relay's figure at most this

    @property
    def target(self) -> str:
        if self.min_ratio is not None:
            return f"≥ {self.min_ratio:g} x Postfix"
        if self.max_value is not None:
            return f"≤ {self.max_value:g}"
        return "-"

    def met(self, ours: float | None, ratio: float | None) -> str:
        """yes, **no**, or - when there is no target or nothing to compare."""
        if self.min_ratio is not None and ratio is not None:
            return "yes" if ratio >= self.min_ratio else "**no**"
        if self.max_value is not None and ours is not None:
            return "yes" if ours <= self.max_value else "**no**"
        return "-"


@dataclass(frozen=True)
class Measurement:
    name: str
    rows: tuple[Row, ...]
    measure: Callable[[Context, str], dict[str, float]]
    postfix: bool = True  # also run against Postfix


def ingest_measurements() -> list[Measurement]:
    found = []
    for sessions in (1, 4, 16):
        for per_connection in (1, 10):
            key = f"ingest5k-c{sessions}-k{per_connection}"
            title = f"ingest 5 KB, {sessions} conn., {per_connection} msg/conn. (msg/s)"
            row = Row(key, title, min_ratio=1.1) if sessions == 16 else Row(key, title)
            found.append(Measurement(key, (row,), ingest_small(sessions, per_connection)))
    return found


def measurements(sizes: Sizes) -> list[Measurement]:
    """Every measurement, in the order of the table; titles give the counts actually used."""
    queued_title = f"{sizes.queued:,} queued"
    scans = f"{sizes.scan_clients} x {sizes.scan_mib:g} MiB"
    return [
        *ingest_measurements(),
        Measurement(
            "ingest1m",
            (
                Row(
                    "ingest1m",
                    "ingest 1 MB, 4 conn. (MB/s)",
                    "{:.1f}",
                    min_ratio=1.1,
                ),
            ),
            ingest_large,
        ),
        Measurement(
            "e2e",
            (
                Row(
                    "e2e",
                    f"end to end {sizes.e2e:,} x 5 KB, 16 conn. (msg/s)",
                    "{:.0f}",
                    min_ratio=1.1,
                ),
            ),
            end_to_end,
        ),
        Measurement(
            "latency",
            (
                Row("latency-p50", "delivery latency idle, p50 (ms)", "{:.1f}"),
                Row("latency-p99", "delivery latency idle, p99 (ms)", "{:.1f}"),
            ),
            latency,
        ),
        Measurement(
            "rss-idle",
            (Row("rss-idle", "RSS idle (MiB)", "{:.1f}", max_value=60),),
            rss_idle,
        ),
        Measurement(
            "queued",
            (
                Row("queued-rss", f"RSS with {queued_title} (MiB)", "{:.0f}", max_value=150),
                Row(
                    "queued-ready",
                    f"start to ready with {queued_title} (s)",
                    "{:.2f}",
                    max_value=5,
                ),
            ),
            queued,
            postfix=False,
        ),
        Measurement(
            "peak30m",
            (
                Row(
                    "peak30m",
                    f"peak RSS above idle, {scans} at once (MiB)",
                    "{:.0f}",
                    max_value=100,
                ),
            ),
            peak_scans,
        ),
    ]


ALL_NAMES = ["calibration", "ingest5k", *(m.name for m in measurements(FULL))]


def selected(only: list[str] | None, sizes: Sizes) -> tuple[bool, list[Measurement]]:
    """(run the calibration?, the measurements to run) for --only."""
    every = measurements(sizes)
    if not only:
        return True, every
    unknown = [name for name in only if name not in ALL_NAMES]
    if unknown:
        raise SystemExit(f"unknown measurement {', '.join(unknown)}; known: {', '.join(ALL_NAMES)}")
    chosen = [m for m in every if any(m.name == n or m.name.startswith(n + "-") for n in only)]
    return "calibration" in only, chosen


# --- running and reporting ----------------------------------------------------------------------


Results = dict[str, dict[str, list[float]]]  # row key -> system -> one value per run


def run_all(
    ctx: Context, measurements: list[Measurement], systems: list[str], runs: int
) -> tuple[Results, list[str]]:
    results: Results = {}
    errors: list[str] = []
    for measurement in measurements:
        here = [s for s in systems if s == RELAY or measurement.postfix]
        for run in range(runs):
            order = here if run % 2 == 0 else list(reversed(here))  # drift hits both alike
            for system in order:
                began = time.monotonic()
                try:
                    values = measurement.measure(ctx, system)
                except Exception as exc:
                    errors.append(f"{measurement.name} run {run + 1} {system}: {exc}")
                    print(f"[{measurement.name}] run {run + 1} {system}: FAILED {exc}", flush=True)
                    continue
                for key, value in values.items():
                    results.setdefault(key, {}).setdefault(system, []).append(value)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
                print(
                    f"[{measurement.name}] run {run + 1}/{runs} {system}: {shown} "
                    f"({time.monotonic() - began:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return results, errors


def spread(values: list[float] | None, fmt: str) -> str:
    if not values:
        return "-"
    middle = fmt.format(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(results: Results, measurements: list[Measurement], postfix: bool) -> str:
    lines = [
        "| measurement | oauth-relay median (min-max) | Postfix median (min-max) | ratio "
        "| target | met? |",
        "|---|---:|---:|---:|---|:---:|",
    ]
    for measurement in measurements:
        for row in measurement.rows:
            ours = results.get(row.key, {}).get(RELAY)
            theirs = results.get(row.key, {}).get(POSTFIX) if postfix else None
            ratio = (
                statistics.median(ours) / statistics.median(theirs)
                if ours and theirs and statistics.median(theirs)
                else None
            )
            met = row.met(statistics.median(ours) if ours else None, ratio)
            cells = [
                row.title,
                spread(ours, row.fmt),
                spread(theirs, row.fmt),
                f"{ratio:.2f}" if ratio is not None else "-",
                row.target,
                met,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibrate(ctx: Context) -> None:
    count = ctx.sizes.e2e
    for load, shape in (
        (Load(16, 1, count, SMALL), "16 conn., 1 msg/conn."),
        (Load(10, count // 10, count, SMALL), "10 conn. kept open, as the MTAs deliver"),
    ):
        rate, generator = sink_capacity(load, ctx.generator)
        ctx.notes.append(
            f"calibration: bench/sink.py alone takes {rate:.0f} msg/s of 5 KB from {generator} "
            f"({shape})"
        )
    load = Load(16, 1, ctx.sizes.ingest_small[16], SMALL)
    ceiling = generator_capacity(load) if ctx.generator == "smtp-source" else None
    if ceiling is not None:
        ctx.notes.append(
            f"calibration: smtp-source into Postfix's smtp-sink (no disk): {ceiling:.0f} msg/s "
            "(16 conn., 1 msg/conn.): the load generator's own ceiling"
        )


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as info:
        names = (line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        model = next(names, "")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} CPUs ({model or platform.machine()}), {memory:.0f} GiB, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def code_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit


def postfix_version() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["postconf", "-dh", "mail_version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return "?"


def header(args: argparse.Namespace, ctx: Context, with_postfix: bool) -> list[str]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"command: `{' '.join(['python bench/run.py', *args.argv])}`",
        f"date: {now}; machine: {machine()}",
        f"oauth-relay: {code_version()}; Postfix: "
        + (postfix_version() if with_postfix else "not measured")
        + f"; load generator: {ctx.generator}; sink: bench/sink.py",
    ]


EXTRAS = {  # figures a measurement returns besides its table rows
    "e2e-submit": ("end to end: the submission part alone (msg/s)", "{:.0f}"),
    "latency-max": ("delivery latency idle, highest of a run (ms)", "{:.1f}"),
    "queued-startup": ("queued: the ready line's own startup= (s)", "{:.2f}"),
    "queued-scheduled": ("queued: start to every queued message scheduled (s)", "{:.2f}"),
    "queued-fill": ("queued: writing the spool, by this script (s)", "{:.1f}"),
    "peak30m-idle": ("peak: idle memory before the scans (MiB)", "{:.0f}"),
    "peak30m-peak": ("peak: highest memory (MiB)", "{:.0f}"),
}


def extras(results: Results) -> list[str]:
    lines = []
    for key, (label, fmt) in EXTRAS.items():
        if key in results:
            values = results[key]
            shown = f"oauth-relay {spread(values.get(RELAY), fmt)}"
            if values.get(POSTFIX):
                shown += f", Postfix {spread(values.get(POSTFIX), fmt)}"
            lines.append(f"{label}: {shown}")
    return lines


def footnotes(sizes: Sizes, with_postfix: bool, generator: str) -> list[str]:
    notes = [
        "ratio = oauth-relay / Postfix (rates: higher is better; times and memory: lower is "
        "better). Memory in MiB; the issue's MB targets are read as MiB.",
        "Ingest rows: durable spool (fsync before 250), upstream down (a loopback port that "
        "refuses connections): oauth-relay pauses it and queues; Postfix's relayhost is the "
        "same kind of port, so its queue manager defers the mail. A few warm-up messages go "
        "first. End to end and latency: upstream = bench/sink.py, 10 delivery connections "
        "for both. Peak: upstream = the sink, 3 delivery connections (oauth-relay's default).",
        f"Load: {generator}"
        + (
            " (10 msg/conn.: rounds of `smtp-source -d -s S -m 10*S`)"
            if generator == "smtp-source"
            else " (bench/loadgen.py: Python, it competes with the MTA for the CPU)"
        ),
        f"{sizes.queued:,} queued: written straight into the spool in its on-disk format "
        "(deferred/, next attempt in an hour), not sent over SMTP; the page cache is warm.",
    ]
    if with_postfix:
        notes.append(
            "Postfix memory: the sum of PSS over its master and children (for information). "
            "Postfix has no figure for the queued rows (it does not scan its queue at start)."
        )
    return notes


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (3)")
    parser.add_argument("--quick", action="store_true", help="small counts, 1 run: a smoke run")
    parser.add_argument("--only", help=f"comma-separated, of: {', '.join(ALL_NAMES)}")
    parser.add_argument("--no-postfix", action="store_true", help="measure oauth-relay only")
    parser.add_argument("--output", type=Path, help="also write the markdown here")
    parser.add_argument(
        "--loadgen",
        choices=("auto", "smtp-source", "python"),
        default="auto",
        help="auto: smtp-source when installed, else bench/loadgen.py",
    )
    args = parser.parse_args(argv)
    args.argv = argv
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    return args


def stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not sys.platform.startswith("linux"):
        print("needs Linux (/proc)", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    with_calibration, chosen = selected(args.only.split(",") if args.only else None, sizes)
    with_postfix = not args.no_postfix and postfix_installed()
    if with_postfix and os.geteuid() != 0:
        print("Postfix needs root to start: measuring oauth-relay only", file=sys.stderr)
        with_postfix = False
    if args.loadgen == "auto":
        args.loadgen = "smtp-source" if smtp_source_installed() else "python"
    base = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    base.chmod(0o755)
    ctx = Context(sizes, args.loadgen, base)
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        if with_calibration:
            calibrate(ctx)
        systems = [RELAY, POSTFIX] if with_postfix else [RELAY]
        results, errors = run_all(ctx, chosen, systems, args.runs)
    except KeyboardInterrupt:
        print("interrupted: stopping everything that was started", file=sys.stderr)
        return 130
    finally:
        RUNNING.stop_all()
        shutil.rmtree(base, ignore_errors=True)
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()
    lines = [
        *header(args, ctx, with_postfix),
        "",
        table(results, chosen, with_postfix),
        "",
        *(f"* {note}" for note in footnotes(sizes, with_postfix, ctx.generator)),
        *(f"* {note}" for note in extras(results)),
        *(f"* {note}" for note in ctx.notes),
        f"* {args.runs} run(s) per measurement; took {elapsed / 60:.1f} min; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after.",
        *(f"* ERROR: {error}" for error in errors),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        args.output.write_text(report, encoding="utf-8")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
