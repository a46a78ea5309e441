"""Delivery: up to `concurrency` workers that drain the spool upstream.

One job: take due messages from the scheduler, send them through an upstream session (reusing
it for as many due messages as there are), let policy.py classify every outcome, and record the
result per recipient in the spool: delivered recipients are never sent again, temporary
failures wait for the next try (exponential backoff with jitter, persisted), permanent ones and
expired messages go to failed/ with the upstream's reply. When the upstream cannot be used
(unreachable, throttling, a tenant problem) new sessions pause instead of burning every
message's retries. An outcome that cannot be written to the spool is kept in memory and the
write retried; the message is not sent again meanwhile. Spool writes are shielded from
cancellation, so shutdown never races a half-done state change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ParamSpec, Protocol, TypeVar

from relay.config import DEFAULT_UPSTREAM, DeliverySettings
from relay.errors import CorruptEntry, SpoolError, UpstreamError
from relay.logs import redact
from relay.metrics import Metrics
from relay.model import Attempt, QueueEntry, RcptState, Recipient
from relay.pacing import Budget, Pacer
from relay.policy import (
    RATE_PAUSE,
    TENANT_PAUSE,
    Action,
    Decision,
    Stage,
    Verdict,
    classify_error,
    classify_reply,
    expired,
    next_attempt,
    refused_for_size,
)
from relay.policy import retry_delay as backoff
from relay.replies import SmtpReply
from relay.scheduler import Scheduler
from relay.spool import QUEUED_STATES, Spool, State
from relay.upstream import Upstream, UpstreamSession

log = logging.getLogger("relay.delivery")

EXPIRED = SmtpReply(
    554, "5.4.7", "delivery time expired: message stayed queued longer than max_age"
)
IDLE_SESSION_SECONDS = 15.0  # an idle session is kept this long for the next paced message
PAUSE_INITIAL = 5.0
RECONCILE_SECONDS = 60.0  # default of [delivery] rescan
SPOOL_DRAIN_SECONDS = 10.0
IN_MEMORY_BODY = 1024 * 1024  # larger bodies are sent from their file, a piece at a time

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class _Outcome:
    """A recorded attempt waiting to be written to the spool."""

    entry: QueueEntry
    summary: str
    due: float
    warn: bool = False  # send a delay notice once this is stored


class Notices(Protocol):
    """Where failure and delay notices go (bounces.Bouncer); delivery only reports."""

    def wants_delay_warning(self, entry: QueueEntry, now: float) -> bool: ...

    async def failed(self, entry: QueueEntry) -> None: ...

    async def delayed(self, entry: QueueEntry) -> None: ...


class Fallbacks(Protocol):
    """The other upstreams (daemon.Deliveries): which one of a message's route takes it over
    from `current`, handing it to that one, and news of an upstream that works again."""

    def fallback(self, entry: QueueEntry, current: str, *, for_size: bool) -> str: ...

    def open_elsewhere(self, current: str) -> bool: ...

    def enqueue(self, entry: QueueEntry) -> None: ...

    def upstream_works(self, name: str) -> None: ...


class Delivery:
    def __init__(
        self,
        spool: Spool,
        upstream: Upstream,
        settings: DeliverySettings,
        metrics: Metrics,
        *,
        pacer: Pacer | None = None,
        notices: Notices | None = None,
        accepts: Callable[[str], bool] = lambda _upstream: True,
        fallbacks: Fallbacks | None = None,
        connections: int = 64,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._pacer = pacer or Pacer(Budget())
        self._notices = notices
        self._accepts = accepts
        self._fallbacks = fallbacks
        self._drain_task: asyncio.Task[None] | None = None
        self._drain_again = False
        self._proven = True  # no set-up problem or outage since the last working session
        self._workers = max(1, min(settings.concurrency, connections))
        self._spool = spool
        self._upstream = upstream
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self.scheduler = Scheduler(clock)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._paused_until = 0.0
        self._session_failures = 0
        self._spool_ops: set[asyncio.Future[object]] = set()
        self._unsaved: dict[str, _Outcome] = {}
        self._stop_requested = asyncio.Event()
        self._last_delivery = time.monotonic()
        self._pause_kind = ""
        metrics.since_delivery.labels(upstream=upstream.name).set_function(
            lambda: time.monotonic() - self._last_delivery
        )
        for outcome in ("delivered", "deferred", "failed"):
            metrics.recipients.labels(outcome=outcome, upstream=upstream.name)

    # --- spool access --------------------------------------------------------------------------

    async def _spool_call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a spool operation in a thread, shielded: a cancelled worker never leaves it
        half-observed, and stop() waits for it before requeueing."""
        future: asyncio.Future[T] = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        self._spool_ops.add(future)  # type: ignore[arg-type]
        future.add_done_callback(self._spool_ops.discard)
        return await asyncio.shield(future)

    # --- feeding the scheduler -----------------------------------------------------------------

    async def load_queue(self) -> int:
        """Schedule every queued message the scheduler does not know yet (metadata only)."""
        entries = await self._spool_call(self._scan_queued)
        for queue_id, due, state in entries:
            self.scheduler.add(queue_id, due, state)
        return len(entries)

    def _scan_queued(self) -> list[tuple[str, float, State]]:
        found = []
        for state in QUEUED_STATES:
            for queue_id in list(self._spool.ids(state)):
                if self.scheduler.state_of(queue_id) is state:
                    continue  # scheduled as it is; a state change (put back by hand) rereads
                try:
                    entry = self._spool.load(state, queue_id)
                except FileNotFoundError:
                    continue
                except CorruptEntry as exc:
                    self._spool.quarantine(queue_id, state, exc.reason)
                    self._metrics.quarantined.inc()
                    continue
                if not self._accepts(entry.upstream):
                    continue  # another upstream's message
                due = entry.next_attempt_at if state is State.DEFERRED else 0.0
                found.append((queue_id, due, state))
        return found

    def schedule_found(self, queue_id: str, state: State, due: float) -> None:
        """A queued message found by the start-up check; one the scheduler already knows
        (enqueued or moved since) is left as it is."""
        if not self._stopping and self.scheduler.state_of(queue_id) is None:
            self.scheduler.add(queue_id, due, state)

    def enqueue(self, entry: QueueEntry) -> None:
        """A new message was committed to incoming/: deliver it as soon as a worker is free."""
        if not self._stopping:
            self.scheduler.add(entry.queue_id, 0.0, State.INCOMING)
            if entry.route and self._closed():
                self.request_drain()

    async def _reconcile(self) -> None:
        """Now and then, pick up queued messages nobody scheduled (a client that vanished
        during its commit, a message put back by hand)."""
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), self._settings.rescan)
            if self._stopping:
                return
            try:
                found = await self.load_queue()
                if self.paused:
                    await self._expire_while_paused()
                self.request_drain()  # closed: what an upstream opened meanwhile can take
            except OSError:
                log.exception("could not scan the spool")
                continue
            if found:
                log.info("scheduled %d queued messages found in the spool", found)

    async def _expire_while_paused(self) -> None:
        """While the upstream is paused no message is attempted, so none would ever reach
        max_age: fail the expired ones now (and notify their senders)."""
        now = self._clock()
        for queue_id, state in await self._spool_call(self._expired_ids, now):
            if not await self._spool_call(self._spool.claim, queue_id, state):
                continue
            entry = await self._load_active(queue_id)
            if entry is not None:
                await self._record(entry, {})

    def _expired_ids(self, now: float) -> list[tuple[str, State]]:
        found = []
        for state in QUEUED_STATES:
            for queue_id in list(self._spool.ids(state)):
                try:
                    entry = self._spool.load(state, queue_id)
                except (OSError, CorruptEntry):
                    continue
                if self._accepts(entry.upstream) and expired(
                    entry.received_at, now, self._settings.max_age
                ):
                    found.append((queue_id, state))
        return found

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"delivery-{n}") for n in range(self._workers)
        ]
        self._tasks.append(asyncio.create_task(self._reconcile(), name="delivery-reconcile"))

    async def stop(self, grace: float, *, requeue: bool = True) -> None:
        """Let workers finish the message in hand within `grace`, then cancel; with `requeue`,
        put what is left in active/ back (only when this is the spool's only Delivery)."""
        self._stopping = True
        self._stop_requested.set()
        self.scheduler.poke()
        pending: set[asyncio.Task[None]] = set()
        tasks = [*self._tasks, *([self._drain_task] if self._drain_task else [])]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if self._spool_ops:
            await asyncio.wait(set(self._spool_ops), timeout=SPOOL_DRAIN_SECONDS)
        if requeue:
            await requeue_active(self._spool)

    @property
    def paused(self) -> bool:
        return self._clock() < self._paused_until

    def _pause(self, seconds: float, reason: str, kind: str, hint: str = "") -> None:
        """Open the circuit: no new session to this upstream for `seconds`. Said loudly, every
        time, with what to fix, until the upstream works again."""
        until = self._clock() + seconds
        if until <= self._paused_until:
            return
        self._paused_until = until
        self._pause_kind = kind
        self._proven = self._proven and kind == "throttled"
        name = self._upstream.name
        self._metrics.upstream_paused.labels(upstream=name).set(1)
        self._metrics.upstream_pauses.labels(upstream=name, reason=kind).inc()
        fix = f"; fix: {hint}" if hint else ""
        log.error("upstream %s paused for %.0fs (%s): %s%s", name, seconds, kind, reason, fix)
        self.request_drain()

    def replace_upstream(self, upstream: Upstream) -> None:
        """A reload changed this upstream's settings (credentials, sender policy, host): new
        sessions use them. A pause for anything but throttling ends now, because the reload
        may be its fix; the messages it held back are due again at once."""
        old, self._upstream = self._upstream, upstream
        release = getattr(old, "aclose", None)  # Graph: its HTTP connection pool
        if release is not None:  # later: a worker may still be sending with it
            loop = asyncio.get_running_loop()
            loop.call_later(RELEASE_AFTER, lambda: loop.create_task(release()))
        if self.paused and self._pause_kind != "throttled":
            held_until = self._paused_until
            self._paused_until = self._clock()
            moved = self.scheduler.bring_forward(held_until)
            log.info(
                "upstream %s reconfigured: trying again now (%d messages due)", upstream.name, moved
            )

    def _resume(self) -> None:
        if self._session_failures:
            log.info("upstream %s works again", self._upstream.name)
        self._session_failures = 0
        self._metrics.upstream_paused.labels(upstream=self._upstream.name).set(0)

    def _answered(self, decisions: list[Decision]) -> None:
        """The upstream answered a message without a set-up problem: it works (a session
        alone proves little: Graph's is only a token)."""
        if self._proven or any(d.action is Action.PAUSE_UPSTREAM for d in decisions):
            return
        self._proven = True
        if self._fallbacks is not None:
            self._fallbacks.upstream_works(self._upstream.name)  # closed ones may hand it mail

    @property
    def takes_fallbacks(self) -> bool:
        """True when other upstreams may hand messages to this one: not paused, and no set-up
        problem or outage since it last worked (a pause that merely ran out does not count,
        so two broken upstreams never pass their mail back and forth)."""
        return self._proven and not self._closed()

    def unready_reason(self) -> str:
        """Why this upstream makes the relay not ready: paused for anything but throttling."""
        if self.paused and self._pause_kind != "throttled":
            return f"upstream {self._upstream.name} paused ({self._pause_kind})"
        return ""

    def _pause_of(self, decision: Decision) -> float:
        """How long a decision pauses the upstream: a set-up problem only an admin can fix
        (5.7.139 and the like) for [delivery] setup_pause."""
        return self._settings.setup_pause if decision.pause == TENANT_PAUSE else decision.pause

    def _closed(self) -> bool:
        return bool(self.unready_reason())

    def _pause_left(self) -> float:
        return max(0.0, self._paused_until - self._clock())

    # --- the workers ---------------------------------------------------------------------------

    async def _worker(self) -> None:
        session: UpstreamSession | None = None
        opened_by: Upstream | None = None
        last_used = 0.0
        try:
            while not self._stopping:
                # a reload replaced the upstream: its sessions carry the old settings
                stale = session is not None and opened_by is not self._upstream
                if session is not None and (stale or not session.usable):
                    await session.close()
                    session = None
                opened_by = self._upstream if session is None else opened_by
                if self.paused:
                    await self.scheduler.wait(self._pause_left(), ignore_due=True)
                    continue
                item = self._next_paced()
                if isinstance(item, float):
                    await self.scheduler.wait(item, ignore_due=True)
                    continue
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

    def _next_paced(self) -> tuple[str, State] | float | None:
        """The next due message if the mailbox's budget has a slot for it (the slot is then
        taken), the seconds until the next slot, or None when nothing is due."""
        if self.scheduler.seconds_until_due() != 0:
            return None
        wait = self._pacer.reserve_message(self._clock())
        if wait > 0:
            return wait
        return self.scheduler.pop_due()

    async def _deliver_guarded(
        self, item: tuple[str, State], session: UpstreamSession | None
    ) -> UpstreamSession | None:
        """Deliver one message. An unexpected error is logged and counts as a temporary failure
        of the message (so max_age still applies); the worker lives on, since a dead worker
        would stall the queue silently."""
        try:
            return await self._deliver(item, session)
        except Exception as exc:
            queue_id, _ = item
            log.exception("unexpected delivery error", extra={"queue_id": queue_id})
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()
            await self._after_unexpected(queue_id, exc)
            return None

    async def _after_unexpected(self, queue_id: str, error: Exception) -> None:
        try:
            entry = await self._spool_call(self._spool.load, State.ACTIVE, queue_id)
        except (OSError, SpoolError):
            entry = None
        try:
            if entry is not None:
                await self._record(entry, {r.address: classify_error(error) for r in entry.pending})
            elif await self._spool_call(self._spool.move, queue_id, State.ACTIVE, State.INCOMING):
                self.scheduler.add(
                    queue_id, self._clock() + self._settings.retry_initial, State.INCOMING
                )
        except Exception:
            log.exception(
                "could not put the message back; it is requeued at the next start",
                extra={"queue_id": queue_id},
            )

    async def _deliver(
        self, item: tuple[str, State], session: UpstreamSession | None
    ) -> UpstreamSession | None:
        queue_id, state = item
        if queue_id in self._unsaved:
            self._pacer.release_message()
            await self._store_outcome(self._unsaved.pop(queue_id))
            return session
        try:
            entry = await self._spool_call(self._spool.claim_and_load, queue_id, state)
        except (CorruptEntry, FileNotFoundError) as exc:  # claimed, then unreadable or gone
            await self._unloadable(queue_id, exc)
            entry = None
        else:
            if entry is None:
                self._pacer.release_message()
                return session  # gone: delivered, deleted or claimed by someone else
        if entry is not None and not self._accepts(entry.upstream):
            self._pacer.release_message()
            await self._give_back(entry)
            return session
        if entry is None or not await self._within_recipient_budget(entry):
            self._pacer.release_message()
            return session
        if session is None:
            try:
                session = await self._upstream.open()
            except Exception as exc:
                self._pacer.release_message()
                await self._session_failed(entry, exc)
                return None
            self._resume()
        await self._attempt(entry, session)
        return session

    async def _give_back(self, entry: QueueEntry) -> None:
        """Claimed, but another upstream's (handed over while this one had it scheduled):
        back to incoming/, scheduled by its own upstream."""
        back = await self._spool_call(
            self._spool.move, entry.queue_id, State.ACTIVE, State.INCOMING
        )
        if back and self._fallbacks is not None:
            self._fallbacks.enqueue(entry)

    async def _within_recipient_budget(self, entry: QueueEntry) -> bool:
        """True when the message's recipients fit today's budget (they are charged once the
        upstream accepted them); else it waits in deferred/ until they do."""
        now = self._clock()
        wait = self._pacer.recipient_delay(now, len(entry.pending))
        if wait <= 0:
            return True
        log.warning(
            "daily recipient budget of the mailbox reached; waiting %.0fs",
            wait,
            extra={"queue_id": entry.queue_id},
        )
        if await self._spool_call(self._spool.move, entry.queue_id, State.ACTIVE, State.DEFERRED):
            self.scheduler.add(entry.queue_id, now + wait, State.DEFERRED)
        return False

    async def _load_active(self, queue_id: str) -> QueueEntry | None:
        try:
            return await self._spool_call(self._spool.load, State.ACTIVE, queue_id)
        except (CorruptEntry, FileNotFoundError) as exc:
            await self._unloadable(queue_id, exc)
        return None

    async def _unloadable(self, queue_id: str, error: CorruptEntry | FileNotFoundError) -> None:
        """A claimed message whose metadata cannot be read (quarantined) or is gone."""
        if isinstance(error, CorruptEntry):
            await self._spool_call(self._spool.quarantine, queue_id, State.ACTIVE, error.reason)
            self._metrics.quarantined.inc()
        else:
            log.warning("vanished from active/ while claimed", extra={"queue_id": queue_id})

    async def _session_failed(self, entry: QueueEntry, error: Exception) -> None:
        """The circuit breaker: no session could be had, which is never the message's fault.
        The upstream pauses with a growing delay; the message goes back to the queue without
        spending an attempt (unless it is past max_age)."""
        decision = classify_error(error)
        self._session_failures += 1
        pause = backoff(
            self._session_failures, PAUSE_INITIAL, self._settings.retry_max, self._rand()
        )
        if decision.pause and decision.pause <= RATE_PAUSE:
            kind = "throttled"  # e.g. 421 4.4.2 or 432 4.3.2 already at connect or AUTH
        elif decision.action is Action.PAUSE_UPSTREAM:
            kind = "configuration"
        else:
            kind = "unreachable"
        self._metrics.attempts.labels(upstream=self._upstream.name, outcome="no_session").inc()
        seconds = max(pause, self._pause_of(decision))
        if kind == "configuration":  # tried again after setup_pause at the latest
            seconds = min(seconds, self._settings.setup_pause)
        self._pause(seconds, str(error), kind, decision.hint)
        if decision.refresh_token:
            await self._upstream.token_refused()
        if expired(entry.received_at, self._clock(), self._settings.max_age):
            await self._record(entry, {r.address: decision for r in entry.pending})
            return
        if await self._handed_over(entry):
            return
        if await self._spool_call(self._spool.move, entry.queue_id, State.ACTIVE, State.DEFERRED):
            self.scheduler.add(entry.queue_id, self._paused_until, State.DEFERRED)

    async def _attempt(self, entry: QueueEntry, session: UpstreamSession) -> None:
        try:
            body = await self._spool_call(
                self._spool.body_for_delivery, entry.queue_id, IN_MEMORY_BODY
            )
        except FileNotFoundError:
            await self._spool_call(
                self._spool.quarantine, entry.queue_id, State.ACTIVE, "message body is missing"
            )
            self._metrics.quarantined.inc()
            return
        try:
            outcomes = await session.send(entry, body)
        except Exception as exc:
            session.usable = False
            if _session_level(exc):  # no session after all (Graph: unreachable, 401, 403)
                self._pacer.release_message()
                await self._session_failed(entry, exc)
                return
            decision = classify_error(exc)
            decisions = {r.address: decision for r in entry.pending}
            if decision.ambiguous:
                self._metrics.ambiguous.inc()
                if self._settings.on_ambiguous == "hold":
                    await self._hold(entry, decision)
                    return
                log.warning(
                    "outcome unknown (connection lost after the data): will resend; "
                    "the upstream may deliver a duplicate",
                    extra={"queue_id": entry.queue_id},
                )
        else:
            decisions = {a: classify_reply(stage, reply) for a, (stage, reply) in outcomes.items()}
            accepted = sum(1 for stage, _ in outcomes.values() if stage is not Stage.RCPT)
            self._pacer.take_recipients(self._clock(), accepted)  # what passed RCPT counts
            self._answered(list(decisions.values()))
        await self._react(list(decisions.values()), session)
        if await self._handed_over_for_size(entry, decisions):
            return
        await self._record(entry, decisions)

    async def _hold(self, entry: QueueEntry, decision: Decision) -> None:
        """on_ambiguous = "hold": the upstream may have the message; an admin decides."""
        held = entry.after_attempt(
            Attempt(self._clock(), "ambiguous", redact(str(decision.reply))), 0.0
        )
        try:
            await self._spool_call(self._spool.save, held, State.ACTIVE, State.HOLD)
        except (SpoolError, OSError):
            log.exception("could not hold the message", extra={"queue_id": entry.queue_id})
            return
        self._metrics.held.inc()
        self._metrics.attempts.labels(upstream=self._upstream.name, outcome="ambiguous").inc()
        log.warning(
            "outcome unknown (connection lost after the data): held in hold/ for review "
            "(on_ambiguous = hold); release it to resend or delete it",
            extra={"queue_id": entry.queue_id},
        )

    async def _react(self, decisions: list[Decision], session: UpstreamSession) -> None:
        """What an outcome means for the session and the upstream, beyond this message."""
        for decision in decisions:
            if not decision.session_ok:
                session.usable = False
            if decision.pause:
                kind = "throttled" if decision.pause <= RATE_PAUSE else "configuration"
                self._pause(self._pause_of(decision), str(decision.reply), kind, decision.hint)
        if any(d.refresh_token for d in decisions):
            await self._upstream.token_refused()

    # --- fallback: handing messages to the next upstream of their route ------------------------

    async def _handed_over(self, entry: QueueEntry) -> bool:
        """The message in hand could not be sent because this upstream closed: it goes to the
        next open upstream of its route, if it has one."""
        if self._fallbacks is None or not entry.route or not self._closed():
            return False
        target = self._fallbacks.fallback(entry, self._upstream.name, for_size=False)
        return bool(target) and await self._hand_over(entry, State.ACTIVE, target, self._pause_kind)

    async def _handed_over_for_size(
        self, entry: QueueEntry, decisions: dict[str, Decision]
    ) -> bool:
        """This upstream refused the message's size: the recipients it refused stay pending and
        the message goes to the next upstream of its route that has not refused it, rather
        than failing. Other outcomes of the attempt are kept."""
        too_big = {
            address
            for address, decision in decisions.items()
            if decision.verdict is Verdict.FAIL and refused_for_size(decision.reply)
        }
        if not too_big or self._fallbacks is None or not entry.route:
            return False
        name = self._upstream.name
        target = self._fallbacks.fallback(entry, name, for_size=True)
        if not target:
            return False
        recipients = []
        for rcpt in entry.recipients:
            decision = decisions.get(rcpt.address)
            if rcpt.address in too_big and decision is not None:
                recipients.append(replace(rcpt, reply=redact(str(decision.reply)), via=name))
            else:
                recipients.append(_apply(rcpt, decision, name))
            if rcpt.state is RcptState.PENDING and decision is not None:
                self._log_recipient(entry.queue_id, recipients[-1], decision)
        now = self._clock()
        reply = redact(str(decisions[next(iter(too_big))].reply))
        updated = replace(
            entry.with_recipients(tuple(recipients)), refused=(*entry.refused, name)
        ).after_attempt(Attempt(now, "deferred", reply), 0.0)
        if await self._hand_over(updated, State.ACTIVE, target, "size"):
            self._metrics.attempts.labels(upstream=name, outcome="handed_over").inc()
            return True
        # not saved: keep what this attempt learnt (delivered recipients are never sent
        # again); the next try here is refused again and hands over again
        due = now + self._settings.retry_initial
        await self._store_outcome(_Outcome(replace(updated, next_attempt_at=due), "deferred", due))
        return True

    async def _hand_over(
        self, entry: QueueEntry, src: State, target: str, reason: str, *, quiet: bool = False
    ) -> bool:
        """Give a claimed message to upstream `target`: it is saved as that upstream's, due
        now, in incoming/, and scheduled there. False when it could not be saved (it stays).
        `quiet`: one of many (a drain logs a summary), so logged at INFO."""
        assert self._fallbacks is not None
        moved = replace(
            entry,
            upstream="" if target == DEFAULT_UPSTREAM else target,
            next_attempt_at=0.0,
        )
        try:
            await self._spool_call(self._spool.save, moved, src, State.INCOMING)
        except FileNotFoundError:
            return True  # gone meanwhile (deleted by hand): nothing left to hand over
        except (SpoolError, OSError):
            log.exception(
                "could not hand the message to upstream %s",
                target,
                extra={"queue_id": entry.queue_id},
            )
            return False
        self.scheduler.discard(entry.queue_id)
        name = self._upstream.name
        self._metrics.handovers.labels(upstream=name, to=target, reason=reason).inc()
        log.log(
            logging.INFO if quiet else logging.WARNING,
            "handed over from upstream %s to %s (%s)",
            name,
            target,
            "refused for its size" if reason == "size" else f"{name} is paused: {reason}",
            extra={"queue_id": entry.queue_id},
        )
        self._fallbacks.enqueue(moved)
        return True

    def request_drain(self) -> None:
        """While this upstream is closed, its queued messages whose route has an upstream that
        takes fallbacks go there (in the background; one pass at a time, another if asked
        meanwhile). Nothing is read when no other upstream could take anything."""
        if (
            self._fallbacks is None
            or self._stopping
            or not self._closed()
            or not self._fallbacks.open_elsewhere(self._upstream.name)
        ):
            return
        self._drain_again = True
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain(), name="delivery-drain")

    async def _drain(self) -> None:
        while self._drain_again and self._closed() and not self._stopping:
            self._drain_again = False
            queued = [item for item in self.scheduler.snapshot() if item[1] is not State.ACTIVE]
            moved = 0
            for start in range(0, len(queued), DRAIN_BATCH):
                if self._stopping or not self._closed():
                    break
                moved += await self._drain_some(queued[start : start + DRAIN_BATCH])
            if moved:
                log.warning(
                    "upstream %s is paused (%s): %d queued messages handed to the next "
                    "upstream of their route",
                    self._upstream.name,
                    self._pause_kind,
                    moved,
                )

    async def _drain_some(self, items: list[tuple[str, State]]) -> int:
        assert self._fallbacks is not None
        try:
            routed = await self._spool_call(self._routed_entries, items)
        except OSError:
            log.exception("could not scan the queue for fallbacks")
            return 0
        moved = 0
        name = self._upstream.name
        for queue_id, state, entry in routed:
            if self._stopping or not self._closed():
                break
            if self.scheduler.state_of(queue_id) is not state:
                continue  # taken or rescheduled meanwhile
            if not self._fallbacks.fallback(entry, name, for_size=False):
                continue  # decided before claiming: nothing is claimed only to be put back
            try:
                moved += await self._hand_over_queued(queue_id, state)
            except Exception:
                log.exception("could not hand the message over", extra={"queue_id": queue_id})
                # it may be left in active/: a worker retries it from there
                self.scheduler.add(
                    queue_id, self._clock() + self._settings.retry_initial, State.ACTIVE
                )
        return moved

    def _routed_entries(
        self, items: list[tuple[str, State]]
    ) -> list[tuple[str, State, QueueEntry]]:
        found = []
        for queue_id, state in items:
            try:
                entry = self._spool.load(state, queue_id)
            except (OSError, SpoolError):
                continue  # moved meanwhile, or corrupt (its delivery attempt quarantines it)
            if entry.route and self._accepts(entry.upstream):
                found.append((queue_id, state, entry))
        return found

    async def _hand_over_queued(self, queue_id: str, state: State) -> bool:
        """Claim a queued message, hand it over if it is still this upstream's and still has
        somewhere to go, else put it back where it was and schedule it again."""
        assert self._fallbacks is not None
        if not await self._spool_call(self._spool.claim, queue_id, state):
            return False  # a worker or the CLI got there first
        try:
            entry: QueueEntry | None = await self._spool_call(
                self._spool.load, State.ACTIVE, queue_id
            )
        except (OSError, SpoolError):
            entry = None
        if entry is not None and self._accepts(entry.upstream):
            target = self._fallbacks.fallback(entry, self._upstream.name, for_size=False)
            if target and await self._hand_over(
                entry, State.ACTIVE, target, self._pause_kind, quiet=True
            ):
                return True
        if await self._spool_call(self._spool.move, queue_id, State.ACTIVE, state):
            due = entry.next_attempt_at if entry is not None and state is State.DEFERRED else 0.0
            self.scheduler.add(queue_id, due, state)
        return False

    # --- recording outcomes --------------------------------------------------------------------

    async def _record(self, entry: QueueEntry, decisions: dict[str, Decision]) -> None:
        now = self._clock()
        name = self._upstream.name
        recipients = tuple(_apply(r, decisions.get(r.address), name) for r in entry.recipients)
        for old, new in zip(entry.recipients, recipients, strict=True):
            if old.state is RcptState.PENDING:
                self._log_recipient(entry.queue_id, new, decisions.get(new.address))
        updated = entry.with_recipients(recipients)
        if not updated.done and expired(entry.received_at, now, self._settings.max_age):
            updated = updated.with_recipients(tuple(_expire(r) for r in updated.recipients))
            log.error(
                "expired after %d attempts", entry.attempts + 1, extra={"queue_id": entry.queue_id}
            )
        summary = _summary(updated)
        warn = (
            summary == "deferred"
            and self._notices is not None
            and self._notices.wants_delay_warning(updated, now)
        )
        if warn:
            updated = replace(updated, warned=True)
        reply = next((redact(str(d.reply)) for d in decisions.values()), "")
        due = next_attempt(
            entry.attempts + 1,
            now,
            self._settings.retry_initial,
            self._settings.retry_max,
            self._rand(),
        )
        updated = updated.after_attempt(
            Attempt(now, summary, reply), due if not updated.done else 0.0
        )
        await self._store_outcome(_Outcome(updated, summary, due, warn))

    async def _store_outcome(self, outcome: _Outcome) -> None:
        entry = outcome.entry
        try:
            await self._spool_call(self._store, entry)
        except FileNotFoundError:
            log.warning(
                "left active/ while being delivered (removed by hand?); outcome not recorded",
                extra={"queue_id": entry.queue_id},
            )
            return
        except (SpoolError, OSError):
            log.exception(
                "could not record the outcome; keeping it in memory and retrying the write "
                "(the message is not sent again meanwhile)",
                extra={"queue_id": entry.queue_id},
            )
            self._unsaved[entry.queue_id] = outcome
            retry_at = self._clock() + self._settings.retry_initial
            self.scheduler.add(entry.queue_id, retry_at, State.ACTIVE)
            return
        self._count(entry, outcome.summary)
        if not entry.done:
            self.scheduler.add(entry.queue_id, outcome.due, State.DEFERRED)
            if entry.route and self._closed():
                self.request_drain()
        if self._notices is None:
            return
        if entry.done and entry.any_failed:
            await self._notices.failed(entry)
        elif outcome.warn:
            await self._notices.delayed(entry)

    def _store(self, entry: QueueEntry) -> None:
        if not entry.done:
            self._spool.save(entry, State.ACTIVE, State.DEFERRED)
        elif entry.any_failed:
            self._spool.save(entry, State.ACTIVE, State.FAILED)
        else:
            self._spool.remove(entry.queue_id, State.ACTIVE, durable=False)

    def _count(self, entry: QueueEntry, summary: str) -> None:
        self._metrics.attempts.labels(upstream=self._upstream.name, outcome=summary).inc()
        if summary == "deferred":
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
            self._metrics.latency.observe(max(0.0, self._clock() - entry.received_at))
            self._last_delivery = time.monotonic()
            log.info(
                "delivered to all %d recipients",
                len(entry.recipients),
                extra={"queue_id": entry.queue_id},
            )

    def _log_recipient(self, queue_id: str, rcpt: Recipient, decision: Decision | None) -> None:
        outcome = {RcptState.DELIVERED: "delivered", RcptState.FAILED: "failed"}.get(
            rcpt.state, "deferred"
        )
        self._metrics.recipients.labels(outcome=outcome, upstream=self._upstream.name).inc()
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


def _apply(rcpt: Recipient, decision: Decision | None, via: str) -> Recipient:
    if rcpt.state is not RcptState.PENDING or decision is None:
        return rcpt
    state = {Verdict.DELIVERED: RcptState.DELIVERED, Verdict.FAIL: RcptState.FAILED}.get(
        decision.verdict, RcptState.PENDING
    )
    return replace(rcpt, state=state, reply=redact(str(decision.reply)), via=via)


def _expire(rcpt: Recipient) -> Recipient:
    if rcpt.state is RcptState.PENDING:
        last = f" (last reply: {rcpt.reply})" if rcpt.reply else ""
        return replace(rcpt, state=RcptState.FAILED, reply=f"{EXPIRED}{last}")
    return rcpt


def _summary(entry: QueueEntry) -> str:
    if not entry.done:
        return "deferred"
    return "failed" if entry.any_failed else "delivered"


async def requeue_active(spool: Spool) -> None:
    """At shutdown, once every Delivery of the spool has stopped: what is left in active/ is
    unfinished (the spool is locked to this process) and goes back to incoming/."""

    def requeue() -> int:
        return sum(
            spool.move(queue_id, State.ACTIVE, State.INCOMING)
            for queue_id in list(spool.ids(State.ACTIVE))
        )

    requeued = await asyncio.to_thread(requeue)
    if requeued:
        log.warning("requeued %d messages still in flight at shutdown", requeued)


DRAIN_BATCH = 500  # queued messages read per step of a drain
RELEASE_AFTER = 600.0  # seconds a replaced upstream's resources are kept for sessions in use


def _session_level(error: BaseException) -> bool:
    """An error raised while sending that means there was no usable session (nothing can have
    been sent): it pauses the upstream without spending the message's attempt."""
    return (
        isinstance(error, UpstreamError)
        and error.stage in ("connect", "tls", "auth")
        and not error.retry_after
    )
