"""Crash safety: SIGKILL the daemon repeatedly while 500 messages are being submitted and
delivered. Every message that got a 250 must reach the upstream; duplicates may only come from
messages in flight at a kill, and are reported. Every 50th message is over 1 MiB, so bodies
received into a file and sent from it are killed too. Group commit is on (where the kernel has a
trustworthy syncfs), as in production."""

from __future__ import annotations

import itertools
import smtplib
import threading
from collections import Counter
from pathlib import Path

import pytest

from relay.osutil import filesystem_flush
from tests.conftest import MAILBOX, RelayFactory, exchange_config
from tests.fakes.entra import FakeEntra
from tests.fakes.exchange import FakeExchange
from tests.fakes.pki import TestPKI
from tests.relayproc import RelayProcess, wait_until

TOTAL = 500
CLIENTS = 4
KILL_AFTER_ACKS = (70, 190, 310, 420)
CONCURRENCY = 3
REPORTS: list[str] = []


LARGE_EVERY = 50  # every 50th message is over 1 MiB: received into a file, sent from it


def message(n: int) -> bytes:
    lines = 16_000 if n % LARGE_EVERY == LARGE_EVERY // 2 else n % 7 * 8
    return (
        f"From: <{MAILBOX}>\r\nTo: <bob@example.org>\r\nSubject: crash test {n}\r\n"
        f"Message-ID: <crash-{n}@contoso.com>\r\n\r\nbody of message {n}\r\n"
    ).encode() + (b"x" * 76 + b"\r\n") * lines


class Submitter:
    """Client threads that behave like a patient MTA: retry until they get a 250."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.up = threading.Event()
        self.acked: set[int] = set()
        self.retries = 0
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._acked_changed = threading.Condition(self._lock)

    def _next(self) -> int | None:
        with self._lock:
            n = next(self._numbers)
        return n if n < TOTAL else None

    def run(self) -> None:
        while (n := self._next()) is not None:
            while not self._submit(n):
                with self._lock:
                    self.retries += 1

    def _submit(self, n: int) -> bool:
        if not self.up.wait(timeout=60):
            raise AssertionError("relay did not come back")
        try:
            with smtplib.SMTP("127.0.0.1", self.relay.smtp_port, timeout=15) as client:
                client.ehlo("crash-client.example")
                client.mail(MAILBOX)
                client.rcpt("bob@example.org")
                code, _ = client.data(message(n))
        except (OSError, smtplib.SMTPException):
            return False
        assert code < 500, f"message {n} refused permanently: {code}"
        if code != 250:
            return False
        with self._acked_changed:
            self.acked.add(n)
            self._acked_changed.notify_all()
        return True

    def wait_acked(self, count: int, timeout: float) -> None:
        with self._acked_changed:
            if not self._acked_changed.wait_for(lambda: len(self.acked) >= count, timeout):
                raise AssertionError(f"only {len(self.acked)} acked, wanted {count}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_during_load_loses_no_acknowledged_message(
    tmp_path: Path,
    pki: TestPKI,
    entra: FakeEntra,
    exchange: FakeExchange,
    relay_factory: RelayFactory,
) -> None:
    sections = exchange_config(
        tmp_path, pki, entra, exchange, **{"delivery.concurrency": CONCURRENCY, "log.level": "info"}
    )
    relay = relay_factory(sections)
    if filesystem_flush(tmp_path) is not None:  # Linux >= 5.8: the test runs with group commit
        relay.wait_for_log(r"spool .*: group commit")
    submitter = Submitter(relay)
    submitter.up.set()
    threads = [threading.Thread(target=submitter.run, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()

    for threshold in KILL_AFTER_ACKS:
        submitter.wait_acked(threshold, timeout=120)
        submitter.up.clear()
        relay.kill()
        relay.start()
        submitter.up.set()
    for thread in threads:
        thread.join(timeout=180)
        assert not thread.is_alive()

    assert submitter.acked == set(range(TOTAL))
    wanted = {f"<crash-{n}@contoso.com>" for n in submitter.acked}

    def delivered_ids() -> Counter[str]:
        return Counter(m.message_id_reply for m in exchange.messages)

    wait_until(lambda: wanted <= set(delivered_ids()), 180, "every acknowledged message upstream")
    spool = tmp_path / "spool"

    def queued() -> list[str]:
        return [
            f"{s}/{p.name}"
            for s in ("incoming", "active", "deferred")
            for p in (spool / s).iterdir()
        ]

    try:
        wait_until(lambda: not queued(), 60, "an empty queue")
    except AssertionError:
        raise AssertionError(f"still queued: {queued()}\n{relay.log_text()[-4000:]}") from None
    counts = delivered_ids()
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    requeued = relay.log_text().count("in flight requeued")
    report = (
        f"crash test: {TOTAL} acknowledged, {len(KILL_AFTER_ACKS)} SIGKILLs, "
        f"{duplicates} duplicates upstream, {submitter.retries} client retries, "
        f"{requeued} recoveries with in-flight messages"
    )
    REPORTS.append(report)
    print(report)
    assert not list((spool / "corrupt").iterdir()), "a crash must never corrupt the spool"
    assert not list((spool / "failed").iterdir())
    assert set(counts) == wanted, "nothing unacknowledged or foreign delivered"
    large = [m for m in exchange.messages if len(m.data) > 1024 * 1024]
    assert len({m.message_id_reply for m in large}) == TOTAL // LARGE_EVERY
    for sent in large:
        n = int(sent.message_id_reply.removeprefix("<crash-").split("@")[0])
        assert sent.data.endswith(message(n).partition(b"\r\n\r\n")[2]), n
    assert not list((spool / "tmp").glob("*.recv")), "received files are committed or removed"
    in_flight_bound = len(KILL_AFTER_ACKS) * (CONCURRENCY + CLIENTS)
    assert duplicates <= in_flight_bound, "duplicates only from messages in flight at a kill"
