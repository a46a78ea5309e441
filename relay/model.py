"""Queue entries: a message's envelope and per-recipient delivery state, and their JSON form.

One job: the data model of the spool's metadata file, with a schema `version`. No I/O; the
spool module reads and writes the bytes. Bodies are never held here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

SCHEMA_VERSION = 1


class RcptState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    state: RcptState = RcptState.PENDING
    reply: str = ""  # the last reply that decided or deferred this recipient
    via: str = ""  # the upstream that gave that reply

    def to_json(self) -> dict[str, Any]:
        data = {"address": self.address, "state": self.state.value, "reply": self.reply}
        if self.via:
            data["via"] = self.via
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipient:
        return cls(
            str(data["address"]),
            RcptState(data["state"]),
            str(data.get("reply", "")),
            str(data.get("via", "")),
        )


@dataclass(frozen=True, slots=True)
class Attempt:
    at: float
    outcome: str  # "delivered", "deferred", "failed" or "ambiguous"
    reply: str

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "outcome": self.outcome, "reply": self.reply}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attempt:
        return cls(float(data["at"]), str(data["outcome"]), str(data["reply"]))


MAX_HISTORY = 20


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """Everything the relay knows about one queued message except its body."""

    queue_id: str
    mail_from: str
    recipients: tuple[Recipient, ...]
    received_at: float
    size: int
    client: str = ""
    helo: str = ""
    smtputf8: bool = False
    eightbit: bool = False
    attempts: int = 0
    next_attempt_at: float = 0.0
    history: tuple[Attempt, ...] = field(default_factory=tuple)
    warned: bool = False  # a delay notice was sent
    upstream: str = ""  # the upstream that has the message now; "" = the default upstream
    route: tuple[str, ...] = ()  # the upstreams its route allows, in order (fallback)
    refused: tuple[str, ...] = ()  # upstreams of the route that refused it for its size

    @property
    def pending(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.state is RcptState.PENDING)

    @property
    def done(self) -> bool:
        return not self.pending

    @property
    def any_failed(self) -> bool:
        return any(r.state is RcptState.FAILED for r in self.recipients)

    def with_recipients(self, recipients: tuple[Recipient, ...]) -> QueueEntry:
        return replace(self, recipients=recipients)

    def after_attempt(self, attempt: Attempt, next_attempt_at: float) -> QueueEntry:
        history = (*self.history, attempt)[-MAX_HISTORY:]
        return replace(
            self, attempts=self.attempts + 1, next_attempt_at=next_attempt_at, history=history
        )

    def to_json(self) -> dict[str, Any]:
        data = {
            "version": SCHEMA_VERSION,
            "queue_id": self.queue_id,
            "mail_from": self.mail_from,
            "recipients": [r.to_json() for r in self.recipients],
            "received_at": self.received_at,
            "size": self.size,
            "client": self.client,
            "helo": self.helo,
            "smtputf8": self.smtputf8,
            "eightbit": self.eightbit,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "history": [a.to_json() for a in self.history],
            "warned": self.warned,
            "upstream": self.upstream,
        }
        if self.route:  # fallbacks only: most messages have none
            data["route"] = list(self.route)
        if self.refused:
            data["refused"] = list(self.refused)
        return data

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueEntry:
        version = data.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"unknown schema version {version!r}")
        recipients = tuple(Recipient.from_json(r) for r in data["recipients"])
        if not recipients:
            raise ValueError("no recipients")
        return cls(
            queue_id=str(data["queue_id"]),
            mail_from=str(data["mail_from"]),
            recipients=recipients,
            received_at=float(data["received_at"]),
            size=int(data["size"]),
            client=str(data.get("client", "")),
            helo=str(data.get("helo", "")),
            smtputf8=bool(data.get("smtputf8", False)),
            eightbit=bool(data.get("eightbit", False)),
            attempts=int(data.get("attempts", 0)),
            next_attempt_at=float(data.get("next_attempt_at", 0.0)),
            history=tuple(Attempt.from_json(a) for a in data.get("history", [])),
            warned=bool(data.get("warned", False)),
            upstream=str(data.get("upstream", "")),
            route=tuple(str(name) for name in data.get("route", ())),
            refused=tuple(str(name) for name in data.get("refused", ())),
        )

    @classmethod
    def loads(cls, raw: bytes) -> QueueEntry:
        """Parse a metadata file; any defect raises ValueError (the caller quarantines)."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("metadata is not a JSON object")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"missing or malformed field: {exc}") from exc
