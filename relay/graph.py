"""Microsoft Graph as an upstream: the way out when a tenant has SMTP AUTH switched off.

One job: hand one queued message to Graph for one mailbox with `POST /users/{mailbox}/sendMail`
(the raw MIME, base64, text/plain; the app needs only the Mail.Send application permission)
and report, per recipient, a reply the relay's reply table understands. Graph takes the
recipients from the MIME headers, so the headers are made to match the envelope first
(`envelope_headers`): envelope recipients missing from To:/Cc: are added as Bcc:, header
addresses outside the envelope are dropped from To:/Cc:, an old Bcc: goes. Nobody gets a copy
the envelope did not ask for. Graph's answers become SMTP-style replies: 202 -> 250,
413 -> 552 5.3.4, other 4xx -> 554 5.6.0, 401/403/404 -> a paused upstream with the fix,
429/503 -> a pause of Retry-After seconds, and a lost connection or a 5xx is ambiguous (Graph
may have sent it). Messages over Graph's request limit are refused before any request, never
truncated; Graph's large-message upload path is not implemented. httpx does the HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from email.utils import formataddr, getaddresses, parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx

from relay.errors import TokenError, UpstreamError, UpstreamTimeout
from relay.model import QueueEntry
from relay.policy import Stage
from relay.replies import SmtpReply
from relay.sender import SenderPolicy, apply_sender_policy
from relay.storedbody import MessageBody, StoredBody

log = logging.getLogger("relay.graph")

TokenSource = Callable[[], Awaitable[str]]
Outcomes = dict[str, tuple[Stage, SmtpReply]]
DEFAULT_RETRY_AFTER = 30.0
MAX_RETRY_AFTER = 60.0
TOKEN_TIMEOUT = 90.0


_LINE_END = b"\r\n"


def envelope_headers(data: bytes, pending: Sequence[str]) -> bytes:
    """`data` with To:/Cc:/Bcc: made to match the envelope (see the module doc); unchanged
    when they already do. Only those fields are touched; display names are kept as sent."""
    split = data.find(b"\r\n\r\n")
    if split < 0 and b"\n\n" in data:  # not normalised (bare LF, a fallback path): as is
        return data
    head, rest = (data[: split + 2], data[split + 2 :]) if split >= 0 else (data, b"")
    fields = _fields(head)
    wanted = {address.lower(): address for address in pending}
    shown: set[str] = set()
    kept: dict[str, list[tuple[str, str]]] = {"to": [], "cc": []}
    dropped = False
    for name, raw in fields:
        if name not in kept:
            continue
        value = raw.split(b":", 1)[1].decode("utf-8", "surrogateescape")
        for display, address in getaddresses([value.replace("\r\n", "")]):
            if address.lower() in wanted and address.lower() not in shown:
                shown.add(address.lower())
                kept[name].append((display, address))
            else:
                dropped = True
    hidden = [original for lowered, original in wanted.items() if lowered not in shown]
    names = [name for name, _ in fields]
    single = names.count("to") <= 1 and names.count("cc") <= 1 and "bcc" not in names
    if not dropped and not hidden and single:
        return data
    new = [(b"To", kept["to"]), (b"Cc", kept["cc"]), (b"Bcc", [("", a) for a in hidden])]
    replacement = b"".join(_field(label, items) for label, items in new if items)
    out, placed = [], False
    for name, raw in fields:
        if name in ("to", "cc", "bcc"):
            if not placed:
                out.append(replacement)
                placed = True
            continue
        out.append(raw)
    if not placed:
        out.insert(0, replacement)
    return b"".join(out) + rest


def _address(display: str, address: str) -> str:
    if not display:
        return f"<{address}>"
    try:
        return formataddr((display, address))
    except UnicodeError:  # undecodable bytes in the name: keep them, unquoted as sent
        return f"{display} <{address}>"


def _fields(head: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw bytes with CRLF and continuation lines) of each header field."""
    fields: list[tuple[str, bytes]] = []
    for line in head.split(_LINE_END)[:-1] if head.endswith(_LINE_END) else head.split(_LINE_END):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + _LINE_END)
        else:
            name = line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
            fields.append((name, line + _LINE_END))
    return fields


def _field(label: bytes, items: list[tuple[str, str]]) -> bytes:
    addresses = [_address(display, address) for display, address in items]
    return label + b": " + ",\r\n\t".join(addresses).encode("utf-8", "surrogateescape") + _LINE_END


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """Graph's error code and message; any other body is shown, shortened."""
    try:
        body = response.json()
    except ValueError:
        return "", response.text[:200]
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", str(body)[:200]
    return str(error.get("code", "")), str(error.get("message", ""))[:300]


def retry_after(value: str, now: float) -> float:
    """Seconds from a Retry-After header (seconds or an HTTP date), within [1, 60]: longer
    throttling is waited out in steps, each one asking again."""
    seconds = DEFAULT_RETRY_AFTER
    if value.strip().isdigit():
        seconds = float(value.strip())
    elif value.strip():
        with contextlib.suppress(TypeError, ValueError):
            seconds = parsedate_to_datetime(value).timestamp() - now
    return min(MAX_RETRY_AFTER, max(1.0, seconds))


# Codes that say something about the message itself (anything else is about the set-up).
MESSAGE_ERRORS = frozenset(
    {
        "ErrorMimeContentInvalid",
        "ErrorMimeContentInvalidBase64String",
        "ErrorInvalidRecipients",
        "ErrorInvalidInternetMessageHeader",
        "ErrorMessageSizeExceeded",
        "ErrorInvalidIdMalformed",
    }
)
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class GraphSession:
    """Sends with one token; unusable once Graph refuses it or the connection fails."""

    def __init__(self, upstream: GraphUpstream, token: str) -> None:
        self._upstream = upstream
        self._token = token
        self.usable = True

    def _too_large(self, encoded: int) -> SmtpReply:
        limit = self._upstream.max_request
        return SmtpReply(
            552, "5.3.4", f"message too large for Graph ({encoded} bytes encoded, limit {limit})"
        )

    async def send(self, entry: QueueEntry, body: MessageBody) -> Outcomes:
        upstream = self._upstream
        pending = [r.address for r in entry.pending]
        if isinstance(body, StoredBody):  # never read a body Graph cannot take anyway
            encoded = (body.size + 2) // 3 * 4
            if encoded > upstream.max_request:
                return {address: (Stage.EOD, self._too_large(encoded)) for address in pending}
            body = await asyncio.to_thread(body.read)
        mime = await asyncio.to_thread(upstream.prepare, entry, body, pending)
        if len(mime) > upstream.max_request:
            return {address: (Stage.EOD, self._too_large(len(mime))) for address in pending}
        answer = await self._request("POST", "/sendMail", content=mime, stage="eod")
        if isinstance(answer, SmtpReply):
            return {address: (Stage.EOD, answer) for address in pending}
        accepted = SmtpReply(
            250, "2.0.0", f"accepted by Graph [request-id {answer['_request_id']}]"
        )
        return {address: (Stage.EOD, accepted) for address in pending}

    async def _request(
        self, method: str, path: str, *, stage: str, **kwargs: Any
    ) -> dict[str, Any] | SmtpReply:
        """The JSON answer (with its request id), or the reply for a refusal of the message.
        Raises UpstreamError for what is not the message's fault: at the "connect" stage when
        nothing can have been sent (the upstream pauses, no attempt is spent)."""
        upstream = self._upstream
        headers = {"Authorization": f"Bearer {await upstream.token()}"}  # MSAL's cache
        if "content" in kwargs:
            headers["Content-Type"] = "text/plain"
        try:
            response = await upstream.client.request(
                method, upstream.user_url + path, headers=headers, **kwargs
            )
        except CONNECT_ERRORS as exc:
            self.usable = False
            raise UpstreamError("connect", f"Graph unreachable: {type(exc).__name__}") from None
        except httpx.TimeoutException:
            self.usable = False
            raise UpstreamTimeout(stage, "Graph did not answer in time") from None
        except httpx.HTTPError as exc:
            self.usable = False
            raise UpstreamError(stage, f"Graph connection failed: {type(exc).__name__}") from None
        request_id = response.headers.get("request-id", "-")
        if response.is_success:
            try:
                answer = response.json() if response.content else {}
            except ValueError:
                answer = {}
            answer = answer if isinstance(answer, dict) else {}
            answer["_request_id"] = request_id
            return answer
        return self._refusal(response, stage, request_id)

    def _refusal(self, response: httpx.Response, stage: str, request_id: str) -> SmtpReply:
        status = response.status_code
        code, text = _error_of(response)
        said = f"Graph {status} {code}: {text} [request-id {request_id}]".replace("  ", " ")
        hints = self._upstream.hints
        if status in (429, 503):  # refused before anything was done
            self.usable = False
            wait = retry_after(response.headers.get("Retry-After", ""), time.time())
            error = UpstreamError(
                "mail",
                f"Graph throttled ({status}), Retry-After {wait:.0f}s",
                SmtpReply(451, "4.7.0", said),
            )
            error.retry_after = wait
            raise error
        if status in (401, 403):  # as a refused login: a new token may carry a role granted since
            self.usable = False
            hint = hints["token"] if status == 401 else hints["access"]
            raise UpstreamError("auth", said, SmtpReply(535, "5.7.3", said), hint=hint)
        if status == 404:
            self.usable = False
            hint = hints["mailbox"] if code == "ErrorInvalidUser" else hints["setup"]
            raise UpstreamError("auth", said, SmtpReply(550, "5.1.1", said), hint=hint)
        if status == 413 or code == "ErrorMessageSizeExceeded":
            return SmtpReply(552, "5.3.4", said)
        if status == 408:
            self.usable = False
            raise UpstreamError("mail", said, SmtpReply(451, "4.4.2", said))
        if 400 <= status < 500 and code in MESSAGE_ERRORS:
            return SmtpReply(554, "5.6.0", said)
        if 400 <= status < 500:  # about the set-up (a wrong graph_base_url, ...): pause
            self.usable = False
            raise UpstreamError("auth", said, SmtpReply(550, "5.7.0", said), hint=hints["setup"])
        self.usable = False
        if stage == "eod":  # 5xx: Graph may have sent it; the outcome is unknown
            raise UpstreamError("eod", said)
        raise UpstreamError(stage, said, SmtpReply(451, "4.3.0", said))

    async def close(self) -> None:
        self.usable = False


class GraphUpstream:
    """Sessions to Graph for one mailbox; one HTTP client (connection reuse) for all."""

    def __init__(
        self,
        *,
        base_url: str,
        mailbox: str,
        tokens: TokenSource,
        invalidate: Callable[[], Awaitable[None]],
        tls_context: ssl.SSLContext,
        timeout: float,
        max_request: int,
        policy: SenderPolicy | None,
        name: str,
        hints: dict[str, str],
    ) -> None:
        self.name = name
        self.max_request = max_request
        self.user_url = f"{base_url.rstrip('/')}/users/{quote(mailbox, safe='@')}"
        self._tokens, self._invalidate = tokens, invalidate
        self._policy = policy
        self.hints = hints
        self.client = httpx.AsyncClient(verify=tls_context, timeout=httpx.Timeout(timeout))
        self._last_token: str | None = None
        self._refreshed_for: str | None = None

    def __repr__(self) -> str:
        return f"GraphUpstream({self.name!r}, {self.user_url})"

    def prepare(self, entry: QueueEntry, body: bytes, pending: Sequence[str]) -> bytes:
        """The base64 MIME Graph receives: the sender policy applied, the recipients made
        to match the envelope (runs in a worker thread)."""
        if self._policy is not None:
            rewrite = apply_sender_policy(self._policy, entry.mail_from, body)
            for change in rewrite.changes:
                log.info("sender policy: %s", change, extra={"queue_id": entry.queue_id})
            body = rewrite.data
        return base64.b64encode(envelope_headers(body, pending))

    async def aclose(self) -> None:
        """Release the HTTP connections (a reload replaced this upstream)."""
        await self.client.aclose()

    async def token(self) -> str:
        """A token from MSAL (its cache: a new one only near expiry), for every request."""
        try:
            async with asyncio.timeout(TOKEN_TIMEOUT):
                token = await self._tokens()
        except TimeoutError:
            raise TokenError("token_timeout", description="no token in time") from None
        self._last_token = token
        return token

    async def open(self) -> GraphSession:
        """A session; getting a token first makes a credential problem a session failure
        (the upstream pauses, no attempt is spent)."""
        return GraphSession(self, await self.token())

    async def token_refused(self) -> None:
        token = self._last_token
        if token is not None and token != self._refreshed_for:
            self._refreshed_for = token
            await self._invalidate()
