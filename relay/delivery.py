"""Delivery: the scheduler and up to `concurrency` workers that drain the spool upstream.

One job: take due messages from the spool, send them through an upstream session (reusing it
for as many due messages as there are), let policy.py classify every outcome, and record the
result per recipient in the spool: delivered recipients are never sent again, temporary
failures wait for the next try (exponential backoff with jitter, persisted), permanent ones and
expired messages go to failed/ with the upstream's reply. Only queue ids and due times are kept
in memory, never bodies. When the upstream cannot even be reached, new sessions pause for a
growing delay instead of burning every message's retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace

from relay.config import DeliverySettings
from relay.errors import CorruptEntry, SpoolError
from relay.metrics import Metrics
from relay.model import Attempt, QueueEntry, RcptState, Recipient
from relay.policy import Decision, Verdict, classify_error, classify_reply, expired, next_attempt
from relay.policy import retry_delay as backoff
from relay.replies import SmtpReply
from relay.spool import QUEUED_STATES, Spool, State
from relay.upstream import Upstream, UpstreamSession

log = logging.getLogger("relay.delivery")

EXPIRED = SmtpReply(
    554, "5.4.7", "delivery time expired: message stayed queued longer than max_age"
)
IDLE_SESSION_SECONDS = 2.0
PAUSE_INITIAL = 5.0


class Scheduler:
    """Due times of queued messages, smallest first. Waiting is on an event, never a sleep loop."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, str, State]] = []
        self._queued: set[str] = set()
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, queue_id: str, due: float, state: State) -> None:
        if queue_id in self._queued:
            return
        self._queued.add(queue_id)
        heapq.heappush(self._heap, (due, next(self._seq), queue_id, state))
        self._changed.set()

    def pop_due(self) -> tuple[str, State] | None:
        if self._heap and self._heap[0][0] <= self._clock():
            _, _, queue_id, state = heapq.heappop(self._heap)
            self._queued.discard(queue_id)
            return queue_id, state
        return None

    def seconds_until_due(self) -> float | None:
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - self._clock())

    async def wait(self, limit: float | None = None, *, ignore_due: bool = False) -> None:
        """Return when something may be due (the earliest due time or a new item), or after
        `limit` seconds. With `ignore_due`, only a new item or `limit` ends the wait."""
        delay = None if ignore_due else self.seconds_until_due()
        if limit is not None:
            delay = limit if delay is None else min(delay, limit)
        if delay == 0:
            return
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), delay)

    def poke(self) -> None:
        self._changed.set()


class Delivery:
    def __init__(
        self,
        spool: Spool,
        upstream: Upstream,
        settings: DeliverySettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._spool = spool
        self._upstream = upstream
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self.scheduler = Scheduler(clock)
        self._workers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._paused_until = 0.0
        self._session_failures = 0

    # --- feeding the scheduler -----------------------------------------------------------------

    async def load_queue(self) -> int:
        """Schedule every queued message found in the spool (metadata only)."""
        entries = await asyncio.to_thread(self._scan_queued)
        for queue_id, due, state in entries:
            self.scheduler.add(queue_id, due, state)
        return len(entries)

    def _scan_queued(self) -> list[tuple[str, float, State]]:
        found = []
        for state in QUEUED_STATES:
            for queue_id in list(self._spool.ids(state)):
                try:
                    entry = self._spool.load(state, queue_id)
                except FileNotFoundError:
                    continue
                except CorruptEntry as exc:
                    self._spool.quarantine(queue_id, state, exc.reason)
                    self._metrics.quarantined.inc()
                    continue
                due = entry.next_attempt_at if state is State.DEFERRED else 0.0
                found.append((queue_id, due, state))
        return found

    def enqueue(self, entry: QueueEntry) -> None:
        """A new message was committed to incoming/: deliver it as soon as a worker is free."""
        if not self._stopping:
            self.scheduler.add(entry.queue_id, 0.0, State.INCOMING)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._worker(n), name=f"delivery-{n}")
            for n in range(self._settings.concurrency)
        ]

    async def stop(self, grace: float) -> None:
        """Let workers finish the message in hand within `grace`, then cancel and requeue."""
        self._stopping = True
        self.scheduler.poke()
        _, pending = await asyncio.wait(self._workers, timeout=grace) if self._workers else ((), ())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        requeued = await asyncio.to_thread(self._requeue_active)
        if requeued:
            log.warning("requeued %d messages still in flight at shutdown", requeued)

    def _requeue_active(self) -> int:
        """Everything left in active/ is ours (the spool is locked) and unfinished."""
        return sum(
            self._spool.move(queue_id, State.ACTIVE, State.INCOMING)
            for queue_id in list(self._spool.ids(State.ACTIVE))
        )

    @property
    def paused(self) -> bool:
        return self._clock() < self._paused_until

    # --- the workers ---------------------------------------------------------------------------

    async def _worker(self, number: int) -> None:
        session: UpstreamSession | None = None
        last_used = 0.0
        try:
            while not self._stopping:
                if session is not None and not session.usable:
                    await session.close()
                    session = None
                if self.paused:
                    await self.scheduler.wait(self._pause_left(), ignore_due=True)
                    continue
                item = self._next_item()
                if item is not None:
                    session = await self._deliver_guarded(item, session)
                    last_used = time.monotonic()
                elif session is None:
                    await self.scheduler.wait()
                elif (idle := time.monotonic() - last_used) >= IDLE_SESSION_SECONDS:
                    await session.close()
                    session = None
                else:
                    await self.scheduler.wait(IDLE_SESSION_SECONDS - idle)
        finally:
            if session is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(session.close())

    def _pause_left(self) -> float:
        return max(0.0, self._paused_until - self._clock())

    def _next_item(self) -> tuple[str, State] | None:
        if self._stopping or self.paused:
            return None
        return self.scheduler.pop_due()

    async def _deliver_guarded(
        self, item: tuple[str, State], session: UpstreamSession | None
    ) -> UpstreamSession | None:
        """Deliver one message; an unexpected error is logged and the message retried later,
        and the worker lives on (a dead worker would stall the queue silently)."""
        try:
            return await self._deliver_claimed(item, session)
        except Exception:
            queue_id, _ = item
            log.exception("unexpected delivery error; retrying later", extra={"queue_id": queue_id})
            if await asyncio.to_thread(self._spool.move, queue_id, State.ACTIVE, State.INCOMING):
                self.scheduler.add(
                    queue_id, self._clock() + self._settings.retry_initial, State.INCOMING
                )
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()
            return None

    async def _deliver_claimed(
        self, item: tuple[str, State], session: UpstreamSession | None
    ) -> UpstreamSession | None:
        queue_id, state = item
        if not await asyncio.to_thread(self._spool.claim, queue_id, state):
            return session  # gone: delivered, deleted or claimed by someone else
        entry = await self._load_active(queue_id)
        if entry is None:
            return session
        if session is None:
            try:
                session = await self._upstream.open()
            except Exception as exc:
                await self._session_failed(entry, exc)
                return None
            self._session_failures = 0
        await self._attempt(entry, session)
        return session

    async def _load_active(self, queue_id: str) -> QueueEntry | None:
        try:
            return await asyncio.to_thread(self._spool.load, State.ACTIVE, queue_id)
        except CorruptEntry as exc:
            await asyncio.to_thread(self._spool.quarantine, queue_id, State.ACTIVE, exc.reason)
            self._metrics.quarantined.inc()
        except FileNotFoundError:
            log.warning("vanished from active/ while claimed", extra={"queue_id": queue_id})
        return None

    async def _session_failed(self, entry: QueueEntry, error: Exception) -> None:
        decision = classify_error(error)
        self._session_failures += 1
        pause = backoff(
            self._session_failures, PAUSE_INITIAL, self._settings.retry_max, self._rand()
        )
        self._paused_until = self._clock() + pause
        log.error(
            "upstream %s unusable: %s; new sessions paused for %.0fs",
            self._upstream.name,
            error,
            pause,
            extra={"queue_id": entry.queue_id},
        )
        if decision.refresh_token:
            await self._upstream.token_refused()
        await self._record(entry, {r.address: decision for r in entry.pending})

    async def _attempt(self, entry: QueueEntry, session: UpstreamSession) -> None:
        try:
            body = await asyncio.to_thread(self._spool.read_body, entry.queue_id)
        except FileNotFoundError:
            await asyncio.to_thread(
                self._spool.quarantine, entry.queue_id, State.ACTIVE, "message body is missing"
            )
            self._metrics.quarantined.inc()
            return
        try:
            outcomes = await session.send(entry, body)
        except Exception as exc:
            decision = classify_error(exc)
            if decision.ambiguous:
                self._metrics.ambiguous.inc()
                log.warning(
                    "outcome unknown (connection lost after the data): will resend; "
                    "the upstream may deliver a duplicate",
                    extra={"queue_id": entry.queue_id},
                )
            decisions = {r.address: decision for r in entry.pending}
        else:
            decisions = {a: classify_reply(stage, reply) for a, (stage, reply) in outcomes.items()}
        if any(d.refresh_token for d in decisions.values()):
            await self._upstream.token_refused()
        await self._record(entry, decisions)

    # --- recording outcomes --------------------------------------------------------------------

    async def _record(self, entry: QueueEntry, decisions: dict[str, Decision]) -> None:
        now = self._clock()
        recipients = tuple(_apply(r, decisions.get(r.address)) for r in entry.recipients)
        for old, new in zip(entry.recipients, recipients, strict=True):
            if old.state is RcptState.PENDING:
                self._log_recipient(entry.queue_id, new, decisions.get(new.address))
        updated = entry.with_recipients(recipients)
        if not updated.done and expired(entry.received_at, now, self._settings.max_age):
            updated = updated.with_recipients(tuple(_expire(r) for r in updated.recipients))
            log.error(
                "expired after %d attempts", entry.attempts + 1, extra={"queue_id": entry.queue_id}
            )
        outcome = _summary(updated)
        reply = next((str(d.reply) for d in decisions.values()), "")
        due = next_attempt(
            entry.attempts + 1,
            now,
            self._settings.retry_initial,
            self._settings.retry_max,
            self._rand(),
        )
        updated = updated.after_attempt(
            Attempt(now, outcome, reply), due if not updated.done else 0.0
        )
        try:
            await asyncio.to_thread(self._store, updated)
        except (SpoolError, OSError):
            log.exception(
                "could not record the outcome; retrying the message later",
                extra={"queue_id": entry.queue_id},
            )
            if await asyncio.to_thread(
                self._spool.move, entry.queue_id, State.ACTIVE, State.INCOMING
            ):
                self.scheduler.add(entry.queue_id, due, State.INCOMING)
            return
        self._count(updated, outcome)
        if not updated.done:
            self.scheduler.add(updated.queue_id, due, State.DEFERRED)

    def _store(self, entry: QueueEntry) -> None:
        if not entry.done:
            self._spool.save(entry, State.ACTIVE, State.DEFERRED)
        elif entry.any_failed:
            self._spool.save(entry, State.ACTIVE, State.FAILED)
        else:
            self._spool.remove(entry.queue_id, State.ACTIVE)

    def _count(self, entry: QueueEntry, outcome: str) -> None:
        if outcome == "deferred":
            self._metrics.deferred.inc()
        elif entry.any_failed:
            reason = (
                "expired"
                if any(r.reply.startswith(str(EXPIRED)) for r in entry.recipients)
                else "rejected"
            )
            self._metrics.failed.labels(reason=reason).inc()
        else:
            self._metrics.delivered.inc()
            log.info(
                "delivered to all %d recipients",
                len(entry.recipients),
                extra={"queue_id": entry.queue_id},
            )

    def _log_recipient(self, queue_id: str, rcpt: Recipient, decision: Decision | None) -> None:
        outcome = {RcptState.DELIVERED: "delivered", RcptState.FAILED: "failed"}.get(
            rcpt.state, "deferred"
        )
        self._metrics.recipients.labels(outcome=outcome).inc()
        level = logging.INFO if outcome == "delivered" else logging.WARNING
        log.log(
            level,
            "to=<%s> %s via %s: %s",
            rcpt.address,
            outcome,
            self._upstream.name,
            decision.reply if decision else "no reply",
            extra={"queue_id": queue_id},
        )


def _apply(rcpt: Recipient, decision: Decision | None) -> Recipient:
    if rcpt.state is not RcptState.PENDING or decision is None:
        return rcpt
    state = {Verdict.DELIVERED: RcptState.DELIVERED, Verdict.FAIL: RcptState.FAILED}.get(
        decision.verdict, RcptState.PENDING
    )
    return replace(rcpt, state=state, reply=str(decision.reply))


def _expire(rcpt: Recipient) -> Recipient:
    if rcpt.state is RcptState.PENDING:
        last = f" (last reply: {rcpt.reply})" if rcpt.reply else ""
        return replace(rcpt, state=RcptState.FAILED, reply=f"{EXPIRED}{last}")
    return rcpt


def _summary(entry: QueueEntry) -> str:
    if not entry.done:
        return "deferred"
    return "failed" if entry.any_failed else "delivered"
