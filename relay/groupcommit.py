"""Group commit: new messages that finish DATA together share the spool's flushes.

One job: collect commits from concurrent SMTP sessions while a flush is under way and hand
them to `Spool.commit_batch` together, in a worker thread, one batch at a time. A message's
caller is answered only when its own files are on stable storage (or with its error). Alone,
a message is committed at once (no waiting for company); under load, the batch is whatever
arrived during the previous flush, up to a cap. Where the spool cannot share a flush (no
syncfs), each commit runs in its own thread as before, so concurrent fsyncs still overlap.
"""

from __future__ import annotations

import asyncio
import logging

from relay.errors import SpoolError
from relay.model import QueueEntry
from relay.spool import Body, Spool, body_size

log = logging.getLogger("relay.groupcommit")

MAX_BATCH = 64
MAX_BATCH_BYTES = 32 * 1024 * 1024


class GroupCommit:
    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._waiting: list[tuple[QueueEntry, Body, bytes, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0  # flushes shared so far, and the messages in them (for tests, bench)
        self.batched = 0

    async def commit(self, entry: QueueEntry, body: Body, head: bytes = b"") -> None:
        """Return once the message is durable in incoming/; raise SpoolError if it is not.
        Cancelling the caller does not cancel the commit (the batch goes on)."""
        if not self._spool.shares_flushes:
            await asyncio.to_thread(self._spool.commit, entry, body, head)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((entry, body, head, done))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="group-commit")
            self._runner.add_done_callback(self._runner_ended)
        await asyncio.shield(done)

    def _runner_ended(self, runner: asyncio.Task[None]) -> None:
        """A runner that was cancelled (even before it ran: loop teardown) or failed leaves
        nobody waiting: what it did not commit fails with SpoolError (the client gets 451).
        One that finished had nothing left; what arrived since belongs to a newer runner."""
        if runner is not self._runner or not (runner.cancelled() or runner.exception()):
            return
        waiting, self._waiting = self._waiting, []
        failure = SpoolError("group commit interrupted")
        for _, _, _, done in waiting:
            if not done.done():
                done.set_exception(failure)

    async def _run(self) -> None:
        while self._waiting:
            batch = self._take_batch()
            messages = [(entry, body, head) for entry, body, head, _ in batch]
            errors: list[BaseException | None]
            try:
                errors = list(await asyncio.to_thread(self._spool.commit_batch, messages))
            except BaseException as exc:  # a bug, or cancelled: fail the batch, never hang it
                if not isinstance(exc, asyncio.CancelledError):
                    log.exception("group commit failed")
                errors = [exc] * len(batch)
                self._settle(batch, errors)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            self.batches += 1
            self.batched += len(batch)
            self._settle(batch, errors)

    @staticmethod
    def _settle(
        batch: list[tuple[QueueEntry, Body, bytes, asyncio.Future[None]]],
        errors: list[BaseException | None],
    ) -> None:
        for (_, _, _, done), error in zip(batch, errors, strict=True):
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            elif isinstance(error, asyncio.CancelledError):
                done.set_exception(SpoolError("group commit interrupted"))
            else:
                done.set_exception(error)

    def _take_batch(self) -> list[tuple[QueueEntry, Body, bytes, asyncio.Future[None]]]:
        size = 0
        count = 0
        for _entry, body, head, _ in self._waiting:
            if count and (count >= MAX_BATCH or size + body_size(body, head) > MAX_BATCH_BYTES):
                break
            size += body_size(body, head)
            count += 1
        batch, self._waiting = self._waiting[:count], self._waiting[count:]
        return batch
