"""Queue tools: look at and act on the spool while the daemon runs (`oauth-relay queue ...`).

One job: the admin's verbs on queued messages, built only from the spool's atomic renames, so
they are safe against the daemon's own moves: whoever renames first wins, and a message in
active/ (being delivered right now) is never touched. The daemon picks up what is put back
(retry, release) at its next rescan ([delivery] rescan, 60 s by default). No network, no
asyncio; the same functions serve the CLI and the tests.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from relay.errors import CorruptEntry, RelayError
from relay.model import QueueEntry
from relay.spool import Spool, State, valid_queue_id

LISTED = (State.INCOMING, State.ACTIVE, State.DEFERRED, State.HOLD, State.FAILED)
AGE_BUCKETS = ((300, "5m"), (3600, "1h"), (4 * 3600, "4h"), (86400, "1d"), (float("inf"), "older"))


class QueueToolError(RelayError):
    """An admin's request that cannot be done (unknown id, message in delivery...)."""


@dataclass(frozen=True)
class Listed:
    state: State
    entry: QueueEntry

    def as_json(self, now: float) -> dict[str, Any]:
        last = self.entry.history[-1].reply if self.entry.history else ""
        return {
            "queue_id": self.entry.queue_id,
            "state": self.state.value,
            "age_seconds": round(now - self.entry.received_at, 1),
            "sender": self.entry.mail_from,
            "recipients": [r.address for r in self.entry.recipients],
            "pending": len(self.entry.pending),
            "attempts": self.entry.attempts,
            "upstream": self.entry.upstream or "default",
            "last_error": last,
        }


def entries(spool: Spool, states: tuple[State, ...] = LISTED, sender: str = "") -> list[Listed]:
    """Queued messages, oldest first, optionally only those from `sender` (or @domain)."""
    found = []
    for state in states:
        for queue_id in spool.ids(state):
            try:
                entry = spool.load(state, queue_id)
            except (FileNotFoundError, CorruptEntry):
                continue  # moved meanwhile, or for recovery to quarantine
            if _sender_matches(entry.mail_from, sender):
                found.append(Listed(state, entry))
    return sorted(found, key=lambda item: item.entry.queue_id)


def _sender_matches(mail_from: str, wanted: str) -> bool:
    wanted = wanted.lower()
    if not wanted:
        return True
    if wanted.startswith("@"):
        return mail_from.lower().endswith(wanted)
    return mail_from.lower() == wanted


def locate(spool: Spool, queue_id: str) -> State:
    if not valid_queue_id(queue_id):
        raise QueueToolError(f"{queue_id!r} is not a queue id")
    state = spool.find(queue_id)
    if state is None:
        raise QueueToolError(f"{queue_id}: no such message in the queue")
    return state


def show(spool: Spool, queue_id: str) -> dict[str, Any]:
    state = locate(spool, queue_id)
    entry = spool.load(state, queue_id)
    with spool.body_path(queue_id).open("rb") as body:
        head = body.read(64 * 1024)
    end = head.find(b"\r\n\r\n")
    return {
        "state": state.value,
        **entry.to_json(),
        "headers": head[: end if end >= 0 else len(head)].decode("utf-8", "replace"),
    }


def export(spool: Spool, queue_id: str) -> bytes:
    locate(spool, queue_id)
    return spool.read_body(queue_id)


def _move(spool: Spool, queue_id: str, sources: tuple[State, ...], dst: State, verb: str) -> None:
    state = locate(spool, queue_id)
    if state is State.ACTIVE:
        raise QueueToolError(f"{queue_id}: being delivered right now; try again in a moment")
    if state not in sources:
        raise QueueToolError(f"{queue_id}: cannot {verb} a message in {state.value}/")
    if not spool.move(queue_id, state, dst):
        raise QueueToolError(f"{queue_id}: moved meanwhile; look again")


def retry(spool: Spool, queue_id: str) -> None:
    """Due now: deferred/ -> incoming/."""
    _move(spool, queue_id, (State.DEFERRED,), State.INCOMING, "retry")


def retry_all(spool: Spool) -> int:
    """Every deferred message due now (the daemon's pacing still bounds the rate)."""
    return sum(
        spool.move(queue_id, State.DEFERRED, State.INCOMING)
        for queue_id in list(spool.ids(State.DEFERRED))
    )


def hold(spool: Spool, queue_id: str) -> None:
    _move(spool, queue_id, (State.INCOMING, State.DEFERRED), State.HOLD, "hold")


def release(spool: Spool, queue_id: str) -> None:
    _move(spool, queue_id, (State.HOLD,), State.INCOMING, "release")


def delete(spool: Spool, queue_id: str) -> None:
    state = locate(spool, queue_id)
    if state is State.ACTIVE:
        raise QueueToolError(f"{queue_id}: being delivered right now; hold it first")
    if not spool.delete(queue_id, state):
        raise QueueToolError(f"{queue_id}: moved meanwhile; look again")


def summary(spool: Spool, now: float | None = None) -> dict[str, dict[str, int]]:
    """Like Postfix's qshape: messages waiting, by upstream and age bucket."""
    now = time.time() if now is None else now
    shape: dict[str, Counter[str]] = {}
    for item in entries(spool, (State.INCOMING, State.ACTIVE, State.DEFERRED, State.HOLD)):
        age = now - item.entry.received_at
        bucket = next(name for limit, name in AGE_BUCKETS if age < limit)
        row = shape.setdefault(item.entry.upstream or "default", Counter())
        row[bucket] += 1
        row["total"] += 1
    names = [name for _, name in AGE_BUCKETS] + ["total"]
    return {upstream: {name: row[name] for name in names} for upstream, row in shape.items()}
