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

from relay.model import QueueEntry
from relay.spool import Spool

log = logging.getLogger("relay.groupcommit")

MAX_BATCH = 64
MAX_BATCH_BYTES = 32 * 1024 * 1024


class GroupCommit:
    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._waiting: list[tuple[QueueEntry, bytes, bytes, asyncio.Future[None]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0  # flushes shared so far, and the messages in them (for tests, bench)
        self.batched = 0

    async def commit(self, entry: QueueEntry, body: bytes, head: bytes = b"") -> None:
        """Return once the message is durable in incoming/; raise SpoolError if it is not.
        Cancelling the caller does not cancel the commit (the batch goes on)."""
        if not self._spool.shares_flushes:
            await asyncio.to_thread(self._spool.commit, entry, body, head)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((entry, body, head, done))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="group-commit")
        await asyncio.shield(done)

    async def _run(self) -> None:
        while self._waiting:
            batch = self._take_batch()
            messages = [(entry, body, head) for entry, body, head, _ in batch]
            errors: list[Exception | None]
            try:
                errors = list(await asyncio.to_thread(self._spool.commit_batch, messages))
            except Exception as exc:  # a bug, not a disk error: fail the batch, never hang it
                log.exception("group commit failed")
                errors = [exc] * len(batch)
            self.batches += 1
            self.batched += len(batch)
            for (_, _, _, done), error in zip(batch, errors, strict=True):
                if done.done():
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    def _take_batch(self) -> list[tuple[QueueEntry, bytes, bytes, asyncio.Future[None]]]:
        size = 0
        count = 0
        for _entry, body, head, _ in self._waiting:
            if count and (count >= MAX_BATCH or size + len(body) > MAX_BATCH_BYTES):
                break
            size += len(body) + len(head)
            count += 1
        batch, self._waiting = self._waiting[:count], self._waiting[count:]
        return batch
