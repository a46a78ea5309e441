"""Logging: one event per line, the queue id on every line about a message, secrets redacted.

One job: configure the stdlib logging tree for the daemon and the CLI. The queue id comes from
`extra={"queue_id": ...}` or from the `current_queue_id` context variable. Redaction happens in
the formatter, the last step before a line leaves the process, so no handler can bypass it:
registered secret values, bearer tokens, JWTs and XOAUTH2 / AUTH payloads are replaced.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable

current_queue_id: contextvars.ContextVar[str] = contextvars.ContextVar("queue_id", default="-")

REDACTED = "[redacted]"
_PATTERNS = (
    re.compile(r"(?i)(auth=Bearer\s+|Bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),  # JWT
    re.compile(r"dXNlcj[A-Za-z0-9+/=]{8,}"),  # base64 of "user=": an XOAUTH2 payload
    re.compile(r"(?i)(AUTH\s+(?:XOAUTH2|PLAIN|LOGIN)\s+)\S+"),
    re.compile(
        r"(?i)(client_secret|client_assertion|password|access_token)(['\"]?\s*[=:]\s*['\"]?)[^\s'\"&,}]+"
    ),
)
_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Make a secret value (client secret, key material) impossible to log verbatim."""
    if len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(_keep_prefix, text)
    return text


def _keep_prefix(match: re.Match[str]) -> str:
    groups = [g for g in match.groups() if g is not None]
    if not groups:
        return REDACTED
    if len(groups) >= 2:
        return groups[0] + groups[1] + REDACTED
    return groups[0] + REDACTED


class _QueueIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "queue_id", None):
            record.queue_id = current_queue_id.get()
        return True


class TextFormatter(logging.Formatter):
    """`2026-11-29T18:00:00Z INFO relay.delivery [1A2B3C] message` (journald adds its own time
    when `timestamps` is off)."""

    def __init__(self, timestamps: bool = True) -> None:
        fmt = "%(levelname)s %(name)s [%(queue_id)s] %(message)s"
        super().__init__(f"%(asctime)s {fmt}" if timestamps else fmt)
        self.converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + (
            f".{int(record.msecs):03d}Z"
        )

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record)).replace("\n", "\n  ")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "queue_id": getattr(record, "queue_id", "-"),
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            event["exc"] = redact(self.formatException(record.exc_info))
        return redact(json.dumps(event, ensure_ascii=False))


def setup_logging(level: str = "info", fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    for secret in secrets:
        register_secret(secret)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_QueueIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("mail.log", "msal", "urllib3", "asyncio", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("mail.log").addFilter(_drop_aiosmtpd_deprecation)


def _drop_aiosmtpd_deprecation(record: logging.LogRecord) -> bool:
    """aiosmtpd 1.4 warns about its own `login_data` on every successful AUTH."""
    return "login_data is deprecated" not in record.getMessage()
