"""Failure and delay notices: queue an RFC 3464 report for a message that failed or waits.

One job: when delivery reports a permanently failed message (or one delayed past
`warn_after`), build the notice (dsn.py), commit it to the spool like any received message,
with the null sender so a notice never causes another notice, and schedule it. Reads only the
header block of the original message from the spool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from relay import dsn
from relay.metrics import Metrics
from relay.model import QueueEntry, Recipient
from relay.spool import Spool, new_queue_id

log = logging.getLogger("relay.bounces")

HEADER_READ_LIMIT = 256 * 1024


def header_block(path_bytes: bytes) -> bytes:
    """The original message up to its first empty line (CRLF or bare LF)."""
    ends = [i for i in (path_bytes.find(b"\r\n\r\n"), path_bytes.find(b"\n\n")) if i >= 0]
    return path_bytes[: min(ends)] if ends else path_bytes


class Bouncer:
    def __init__(
        self,
        spool: Spool,
        *,
        bounce_to: str,
        warn_after: float | None,
        max_age: float,
        reporting_mta: str,
        route: Callable[[str], tuple[str, str]],
        enqueue: Callable[[QueueEntry], None],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._bounce_to = bounce_to
        self.warn_after = warn_after
        self._max_age = max_age
        self._mta = reporting_mta
        self._route = route  # original upstream -> (upstream for the notice, its From: address)
        self._enqueue = enqueue
        self._metrics = metrics
        self._clock = clock

    async def failed(self, entry: QueueEntry) -> None:
        await self._notify(entry, "failure")

    async def delayed(self, entry: QueueEntry) -> None:
        await self._notify(entry, "delay")

    def wants_delay_warning(self, entry: QueueEntry, now: float) -> bool:
        if self.warn_after is None or entry.warned or now - entry.received_at < self.warn_after:
            return False
        try:
            return dsn.notice_recipient(self._bounce_to, entry.mail_from) is not None
        except ValueError:
            return False

    async def _notify(self, entry: QueueEntry, kind: str) -> None:
        recipient = dsn.notice_recipient(self._bounce_to, entry.mail_from)
        if recipient is None:
            return
        upstream, from_address = self._route(entry.upstream)
        try:
            notice = await asyncio.to_thread(self._build, entry, recipient, kind, from_address)
            queued = self._as_entry(notice, upstream)
            await asyncio.to_thread(self._spool.commit, queued, notice.data)
        except Exception:
            log.exception("could not queue a %s notice", kind, extra={"queue_id": entry.queue_id})
            return
        self._metrics.notices.labels(kind=kind).inc()
        log.info(
            "%s notice %s queued for <%s>",
            kind,
            queued.queue_id,
            recipient,
            extra={"queue_id": entry.queue_id},
        )
        self._enqueue(queued)

    def _build(self, entry: QueueEntry, recipient: str, kind: str, from_address: str) -> dsn.Notice:
        now = datetime.fromtimestamp(self._clock(), UTC)
        try:
            with self._spool.body_path(entry.queue_id).open("rb") as body:
                headers = header_block(body.read(HEADER_READ_LIMIT))
        except FileNotFoundError:
            headers = b""
        if kind == "failure":
            return dsn.failure_notice(
                entry,
                recipient=recipient,
                reporting_mta=self._mta,
                now=now,
                original_headers=headers,
                from_address=from_address,
            )
        return dsn.delay_notice(
            entry,
            recipient=recipient,
            reporting_mta=self._mta,
            now=now,
            original_headers=headers,
            from_address=from_address,
            will_retry_until=datetime.fromtimestamp(entry.received_at + self._max_age, UTC),
        )

    def _as_entry(self, notice: dsn.Notice, upstream: str) -> QueueEntry:
        now = self._clock()
        return QueueEntry(
            queue_id=new_queue_id(now),
            mail_from=notice.mail_from,
            recipients=(Recipient(notice.recipient),),
            received_at=now,
            size=len(notice.data),
            client="",
            helo=self._mta,
            smtputf8=notice.smtputf8,
            eightbit=not notice.data.isascii(),
            upstream=upstream,
        )
