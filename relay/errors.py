"""The relay's exception tree, rooted at RelayError.

One job: exceptions that carry fields (queue id, reply, AADSTS code), never formatted secrets.
Only cli.py maps them to exit codes. No I/O.
"""

from __future__ import annotations

from relay.replies import SmtpReply


class RelayError(Exception):
    """Base class of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """The configuration is invalid; `problems` lists (path, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in problems))


class SpoolError(RelayError):
    """The spool could not be read or written."""


class CorruptEntry(SpoolError):
    """A spool entry that cannot be parsed; it is quarantined, never deleted."""

    def __init__(self, queue_id: str, reason: str) -> None:
        self.queue_id = queue_id
        self.reason = reason
        super().__init__(f"{queue_id}: {reason}")


class SpoolLocked(SpoolError):
    """Another daemon already holds the spool."""


class TokenError(RelayError):
    """A token could not be obtained. `aadsts` is Entra's error code when it gave one."""

    def __init__(
        self,
        error: str,
        *,
        aadsts: int | None = None,
        http_status: int | None = None,
        description: str = "",
    ) -> None:
        self.error = error
        self.aadsts = aadsts
        self.http_status = http_status
        self.description = description
        code = f"AADSTS{aadsts}" if aadsts is not None else "no AADSTS code"
        super().__init__(f"token request failed: {error} ({code})")


class UpstreamError(RelayError):
    """The upstream failed at session level (connect, TLS, AUTH); `reply` when it answered."""

    def __init__(
        self, stage: str, detail: str, reply: SmtpReply | None = None, hint: str = ""
    ) -> None:
        self.stage = stage
        self.detail = detail
        self.reply = reply
        self.hint = hint  # what to fix, when the upstream knows better than the reply table
        self.retry_after = 0.0  # seconds the upstream asked to be left alone (Retry-After)
        super().__init__(f"upstream {stage}: {reply if reply is not None else detail}")


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not answer in time."""
