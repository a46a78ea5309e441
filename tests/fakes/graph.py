"""A local HTTPS fake of the Microsoft Graph mail endpoints used to send mail as an app.

Job: stand in for ``https://graph.microsoft.com/v1.0`` when testing the relay's
Graph upstream and its doctor probes, without the internet. It listens on an
ephemeral port of 127.0.0.1 (TLS from :mod:`tests.fakes.pki`), checks the
bearer token with an injected ``validate_token`` (normally
:meth:`tests.fakes.entra.FakeEntra.validate_access_token` with the Graph
audience allowed) and serves, under ``/v1.0``:

* ``POST /users/{u}/messages`` with ``Content-Type: text/plain`` and a base64
  MIME body: creates a draft, ``201`` with the message JSON (``id``,
  ``subject``, ``toRecipients``, ``ccRecipients``, ``bccRecipients`` taken
  from the To/Cc/Bcc headers),
* ``PATCH /users/{u}/messages/{id}`` (JSON): replaces any of the three
  recipient lists, ``200`` with the message JSON,
* ``POST /users/{u}/messages/{id}/send``: ``202``, records a
  :class:`SentMessage` and removes the draft,
* ``DELETE /users/{u}/messages/{id}``: ``204``,
* ``POST /users/{u}/sendMail`` with a base64 MIME body: ``202``, recipients
  from the MIME headers,
* ``GET /users/{u}``: ``200`` with ``id``, ``mail``, ``userPrincipalName``.

Users are named by address or by their (stable, generated) object id, case-
insensitively, percent-encoded or not. Every answer carries a ``request-id``
header (and echoes ``client-request-id``); errors are Graph's JSON
``{"error": {"code", "message", "innerError": {"date", "request-id", ...}}}``.

Checks, in this order; the first failure answers:

1. injected faults (:meth:`FakeGraph.throttle`, :meth:`FakeGraph.fail_next`;
   first in, first out; they consume the request before anything else),
2. the token: missing -> ``401 InvalidAuthenticationToken`` "Access token is
   empty."; refused by ``validate_token`` -> ``401`` (an exception whose
   ``reason`` is ``"expired"`` gets Graph's lifetime text); ``aud`` neither
   ``https://graph.microsoft.com`` (trailing slash ignored) nor Graph's app id
   ``00000003-0000-0000-c000-000000000000`` -> ``401`` "... Invalid audience.",
3. the body size (``max_request_bytes``, 4 MiB like Graph's request limit) ->
   ``413 ErrorMessageSizeExceeded``,
4. the route (unknown segment -> ``400 BadRequest``; ``/me`` -> Graph's
   "delegated authentication flow" ``400``; an unmodelled method on a known
   path -> ``405``),
5. the app role -> ``403 ErrorAccessDenied``: by default ``Mail.Send`` is
   enough for everything (as the relay's design assumes). With
   ``strict_permissions = True`` the fake applies Graph's documented
   least-privilege table instead: creating, updating and deleting a message
   need ``Mail.ReadWrite``, ``send``/``sendMail`` need ``Mail.Send``, and
   ``GET /users/{u}`` needs a directory role (``User.Read.All`` and friends,
   else ``403 Authorization_RequestDenied``),
6. the mailbox (``404 ErrorInvalidUser``; under ``strict_permissions`` the
   directory's ``404 Request_ResourceNotFound`` for ``GET /users/{u}``),
7. the app's access to that mailbox (``add_mailbox(allowed_apps=...)``, a
   stand-in for an application access policy or RBAC for Applications
   scope) -> ``403 ErrorAccessDenied`` with the policy text [INF]; not applied
   to ``GET /users/{u}`` under ``strict_permissions`` (a directory read).

Then the operation: bad base64 -> ``400 ErrorMimeContentInvalidBase64String``
(Graph's documented text); decodable but without a single header field ->
``400 ErrorMimeContentInvalid`` [INF text]; unknown draft id ->
``404 ErrorItemNotFound``; sending without any recipient, or to an address
without ``@`` -> ``400 ErrorInvalidRecipients`` (texts as reported by Graph
users [INF]).

Limits (not modelled): JSON message bodies (only MIME via ``text/plain``),
mail folders, attachments and upload sessions, GET/LIST of messages, Sent
Items, ``saveToSentItems``, ``$select`` and other query options (ignored),
``/users('x')`` key syntax, batching (``$batch``), real throttling (per app
and mailbox rate, concurrency and bytes limits: only on demand here), the
Exchange message size limit (35 MB), RBAC for Applications granting access
without a ``roles`` claim, delivery itself (no NDRs). A ``PATCH`` changes the
fake's recipient lists only: the recorded ``mime`` stays as uploaded, whereas
Exchange renders the sent message from the item, so PATCHed recipients would
(presumably) show up in its To/Cc headers. Other ``PATCH`` properties are
accepted and ignored. Chunked request bodies get ``411``. Error texts marked
[INF] are best guesses. The server speaks HTTP/1.1 with keep-alive; idle
connections are closed after ``_IO_TIMEOUT_SECONDS`` and on :meth:`stop`.
Tokens are never logged or recorded.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from email import policy
from email.message import Message
from email.parser import Parser
from email.utils import getaddresses
from http.server import BaseHTTPRequestHandler
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from tests.fakes.https import HttpsFake, TLSServer
from tests.fakes.pki import TestPKI

_log = logging.getLogger(__name__)

GRAPH_RESOURCE = "https://graph.microsoft.com"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
MAIL_SEND = "Mail.Send"
MAIL_READWRITE = "Mail.ReadWrite"
DIRECTORY_READ_ROLES: tuple[str, ...] = (
    "User.ReadBasic.All",
    "User.Read.All",
    "User.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
)
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
ACCESS_DENIED = "Access is denied. Check credentials and try again."
POLICY_DENIED = (  # [INF] what an application access policy answers
    "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly "
    "AccessPolicy settings."
)
THROTTLE_CODES: Mapping[int, tuple[str, str]] = {
    429: ("ApplicationThrottled", "Application is over its MailboxConcurrency limit."),
    503: ("ServiceUnavailable", "Service temporarily unavailable. Please try again later."),
}
_USER_NAMESPACE = uuid.UUID("6b1f7a52-3c0e-4d8b-9e21-58a4c7d0f3b9")
_IO_TIMEOUT_SECONDS = 10.0
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # larger oversized bodies are not read: connection closed

Validator = Callable[[str], Mapping[str, Any]]


class Recipient(NamedTuple):
    address: str
    name: str


@dataclass(frozen=True)
class Draft:
    """A message created with ``POST /users/{u}/messages`` and not yet sent or deleted."""

    id: str
    mailbox: str
    mime: bytes
    subject: str
    to_recipients: tuple[Recipient, ...]
    cc_recipients: tuple[Recipient, ...]
    bcc_recipients: tuple[Recipient, ...]
    app_id: str
    created: str


@dataclass(frozen=True)
class SentMessage:
    """A message the fake accepted for delivery (``/send`` or ``sendMail``)."""

    mailbox: str  # the address as given to add_mailbox
    mime: bytes  # as uploaded (base64-decoded), never rewritten
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    app_id: str
    request_id: str  # of the request that sent it


class GraphRequest(NamedTuple):
    method: str
    path: str  # as sent, without the query
    status: int


@dataclass(frozen=True)
class _Mailbox:
    address: str
    user_id: str
    allowed_apps: frozenset[str] | None  # lower-case app ids; None: any app


@dataclass
class _Fault:
    remaining: int
    status: int
    code: str
    message: str
    retry_after: int | None


@dataclass(frozen=True)
class _Response:
    status: int
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class _GraphError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class _Route(NamedTuple):
    operation: str  # create, update, delete, send, sendMail, getUser
    user: str
    message_id: str | None


# Path shapes below /v1.0/users/{u} ("*" = a message id) -> method -> operation.
_SHAPES: Mapping[tuple[str, ...], Mapping[str, str]] = {
    (): {"GET": "getUser"},
    ("messages",): {"POST": "create"},
    ("sendmail",): {"POST": "sendMail"},
    ("messages", "*"): {"PATCH": "update", "DELETE": "delete"},
    ("messages", "*", "send"): {"POST": "send"},
}
_LENIENT_ROLES: tuple[str, ...] = (MAIL_SEND,)
_STRICT_ROLES: Mapping[str, tuple[str, ...]] = {
    "create": (MAIL_READWRITE,),
    "update": (MAIL_READWRITE,),
    "delete": (MAIL_READWRITE,),
    "send": (MAIL_SEND,),
    "sendMail": (MAIL_SEND,),
    "getUser": DIRECTORY_READ_ROLES,
}


class FakeGraph(HttpsFake):
    """Fake Microsoft Graph mail endpoints over HTTPS on an ephemeral local port."""

    name = "fake-graph"
    io_timeout = _IO_TIMEOUT_SECONDS

    def __init__(
        self,
        pki: TestPKI,
        validate_token: Validator,
        host: str = "127.0.0.1",
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        strict_permissions: bool = False,
    ) -> None:
        self.pki = pki
        self.validate_token = validate_token
        self.host = host
        self.max_request_bytes = max_request_bytes
        self.strict_permissions = strict_permissions
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._mailboxes: dict[str, _Mailbox] = {}  # by lower-case address and user id
        self._drafts: dict[str, Draft] = {}
        self._sent: list[SentMessage] = []
        self._requests: list[GraphRequest] = []
        self._faults: deque[_Fault] = deque()

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:<port>/v1.0`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}/v1.0"

    # -- configuration ------------------------------------------------------

    def add_mailbox(self, address: str, *, allowed_apps: Iterable[str] | None = None) -> str:
        """Add (or replace) a mailbox; return its user object id.

        ``allowed_apps`` (client ids) restricts which apps may use it, like an
        application access policy; ``None`` lets every app with the role in.
        """
        user_id = str(uuid.uuid5(_USER_NAMESPACE, address.lower()))
        apps = None if allowed_apps is None else frozenset(a.lower() for a in allowed_apps)
        mailbox = _Mailbox(address=address, user_id=user_id, allowed_apps=apps)
        with self._lock:
            self._mailboxes[address.lower()] = mailbox
            self._mailboxes[user_id] = mailbox
        return user_id

    def throttle(self, times: int, retry_after: int = 1, status: int = 429) -> None:
        """Answer the next ``times`` requests with 429 (or 503) and ``Retry-After``."""
        if status not in THROTTLE_CODES:
            raise ValueError(f"throttle status must be 429 or 503, not {status}")
        code, message = THROTTLE_CODES[status]
        self._add_fault(_Fault(times, status, code, message, retry_after))

    def fail_next(
        self,
        status: int,
        code: str,
        message: str,
        times: int = 1,
        *,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next ``times`` requests with this Graph error (queued after earlier ones)."""
        self._add_fault(_Fault(times, status, code, message, retry_after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add_fault(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.append(fault)

    # -- introspection (thread-safe snapshots) --------------------------------

    @property
    def sent(self) -> list[SentMessage]:
        with self._lock:
            return list(self._sent)

    @property
    def drafts(self) -> dict[str, Draft]:
        with self._lock:
            return dict(self._drafts)

    @property
    def requests(self) -> list[GraphRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def throttled_count(self) -> int:
        """How many requests were answered 429."""
        with self._lock:
            return sum(1 for request in self._requests if request.status == 429)

    def user_id(self, address: str) -> str:
        with self._lock:
            return self._mailboxes[address.lower()].user_id

    def wait_for_sent(self, n: int, timeout: float = 5.0) -> list[SentMessage]:
        """Block until at least ``n`` messages were sent; raise ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._sent) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._sent)} of {n} messages sent in {timeout}s")
                self._changed.wait(left)
            return list(self._sent)

    # -- request handling (called from server threads) -----------------------

    def _serve_http(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None
    ) -> _Response:
        """Answer one request; ``body`` is None when it exceeded ``max_request_bytes``."""
        request_id = str(uuid.uuid4())
        path = urlsplit(target).path
        try:
            response = self._answer(method, path, headers, body, request_id)
        except _GraphError as exc:
            response = _error_response(exc, request_id, headers.get("client-request-id"))
        extra = {"request-id": request_id}
        if headers.get("client-request-id"):
            extra["client-request-id"] = headers["client-request-id"]
        response = replace(response, headers={**response.headers, **extra})
        with self._lock:
            self._requests.append(GraphRequest(method, path, response.status))
        _log.debug("%s %s -> %s", method, path, response.status)
        return response

    def _answer(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None,
        request_id: str,
    ) -> _Response:
        self._take_fault()
        claims = self._authenticate(headers.get("authorization", ""))
        if body is None:
            raise _GraphError(
                413,
                "ErrorMessageSizeExceeded",
                "The message exceeds the maximum supported size.",  # [INF]
            )
        route = _parse_route(method, path)
        app_id = str(claims.get("appid") or claims.get("azp") or "")
        self._check_role(route.operation, claims)
        if route.operation == "getUser":
            return self._get_user(route.user, app_id)
        mailbox = self._mailbox_for(route.user, app_id)
        content_type = headers.get("content-type", "")
        if route.operation == "create":
            return self._create(mailbox, content_type, body, app_id)
        if route.operation == "sendMail":
            return self._send_mail(mailbox, content_type, body, app_id, request_id)
        assert route.message_id is not None
        if route.operation == "update":
            return self._update(mailbox, route.message_id, content_type, body)
        if route.operation == "delete":
            self._pop_draft(mailbox, route.message_id)
            return _Response(204)
        return self._send_draft(mailbox, route.message_id, request_id)

    def _take_fault(self) -> None:
        with self._lock:
            if not self._faults:
                return
            fault = self._faults[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.popleft()
        headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        raise _GraphError(fault.status, fault.code, fault.message, headers)

    def _authenticate(self, authorization: str) -> Mapping[str, Any]:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthenticated("Access token is empty.")
        try:
            claims = self.validate_token(token)
        except Exception as exc:
            reason = getattr(exc, "reason", "")
            if reason == "expired":
                raise _unauthenticated("Lifetime validation failed, the token is expired.") from exc
            if reason == "audience":
                raise _unauthenticated(
                    "Access token validation failure. Invalid audience."
                ) from exc
            raise _unauthenticated("Access token validation failure.") from exc  # [INF]
        audience = str(claims.get("aud", "")).rstrip("/")
        if audience not in (GRAPH_RESOURCE, GRAPH_APP_ID):
            raise _unauthenticated("Access token validation failure. Invalid audience.")
        return claims

    def _check_role(self, operation: str, claims: Mapping[str, Any]) -> None:
        roles = claims.get("roles") or ()
        needed = _STRICT_ROLES[operation] if self.strict_permissions else _LENIENT_ROLES
        if any(role in roles for role in needed):
            return
        if operation == "getUser" and self.strict_permissions:
            raise _GraphError(
                403,
                "Authorization_RequestDenied",
                "Insufficient privileges to complete the operation.",
            )
        raise _GraphError(403, "ErrorAccessDenied", ACCESS_DENIED)

    def _mailbox_for(self, user: str, app_id: str) -> _Mailbox:
        with self._lock:
            mailbox = self._mailboxes.get(user.lower())
        if mailbox is None:
            raise _GraphError(404, "ErrorInvalidUser", f"The requested user '{user}' is invalid.")
        if mailbox.allowed_apps is not None and app_id.lower() not in mailbox.allowed_apps:
            raise _GraphError(403, "ErrorAccessDenied", POLICY_DENIED)
        return mailbox

    def _get_user(self, user: str, app_id: str) -> _Response:
        if self.strict_permissions:  # a directory read: no mailbox policy, directory errors
            with self._lock:
                found = self._mailboxes.get(user.lower())
            if found is None:
                raise _GraphError(
                    404,
                    "Request_ResourceNotFound",
                    f"Resource '{user}' does not exist or one of its queried reference-property "
                    "objects are not present.",
                )
            mailbox = found
        else:
            mailbox = self._mailbox_for(user, app_id)
        body = {
            "@odata.context": f"{self.base_url}/$metadata#users/$entity",
            "id": mailbox.user_id,
            "displayName": mailbox.address.partition("@")[0],
            "mail": mailbox.address,
            "userPrincipalName": mailbox.address,
        }
        return _Response(200, body)

    def _create(self, mailbox: _Mailbox, content_type: str, body: bytes, app_id: str) -> _Response:
        mime, headers = _decode_mime(content_type, body)
        draft = Draft(
            id=_new_message_id(),
            mailbox=mailbox.address,
            mime=mime,
            subject=str(headers.get("Subject", "")),
            to_recipients=_header_recipients(headers, "To"),
            cc_recipients=_header_recipients(headers, "Cc"),
            bcc_recipients=_header_recipients(headers, "Bcc"),
            app_id=app_id,
            created=_now(),
        )
        with self._lock:
            self._drafts[draft.id] = draft
        return _Response(201, self._message_json(mailbox, draft))

    def _update(
        self, mailbox: _Mailbox, message_id: str, content_type: str, body: bytes
    ) -> _Response:
        changes = _parse_patch(content_type, body)
        with self._lock:
            draft = self._find_draft(mailbox, message_id)
            draft = replace(
                draft,
                to_recipients=changes.get("toRecipients", draft.to_recipients),
                cc_recipients=changes.get("ccRecipients", draft.cc_recipients),
                bcc_recipients=changes.get("bccRecipients", draft.bcc_recipients),
            )
            self._drafts[message_id] = draft
        return _Response(200, self._message_json(mailbox, draft))

    def _send_draft(self, mailbox: _Mailbox, message_id: str, request_id: str) -> _Response:
        with self._lock:
            draft = self._find_draft(mailbox, message_id)
        recipients = (draft.to_recipients, draft.cc_recipients, draft.bcc_recipients)
        self._record_sent(mailbox, draft.mime, recipients, draft.app_id, request_id, message_id)
        return _Response(202)

    def _send_mail(
        self,
        mailbox: _Mailbox,
        content_type: str,
        body: bytes,
        app_id: str,
        request_id: str,
    ) -> _Response:
        mime, headers = _decode_mime(content_type, body)
        recipients = tuple(_header_recipients(headers, name) for name in ("To", "Cc", "Bcc"))
        self._record_sent(mailbox, mime, recipients, app_id, request_id, None)
        return _Response(202)

    def _record_sent(
        self,
        mailbox: _Mailbox,
        mime: bytes,
        recipients: tuple[tuple[Recipient, ...], ...],
        app_id: str,
        request_id: str,
        draft_id: str | None,
    ) -> None:
        _check_recipients(recipients)
        to, cc, bcc = (tuple(r.address for r in group) for group in recipients)
        message = SentMessage(mailbox.address, mime, to, cc, bcc, app_id, request_id)
        with self._changed:
            if draft_id is not None:
                self._find_draft(mailbox, draft_id)  # deleted meanwhile: 404
                del self._drafts[draft_id]
            self._sent.append(message)
            self._changed.notify_all()

    def _pop_draft(self, mailbox: _Mailbox, message_id: str) -> Draft:
        with self._lock:
            draft = self._find_draft(mailbox, message_id)
            del self._drafts[message_id]
            return draft

    def _find_draft(self, mailbox: _Mailbox, message_id: str) -> Draft:
        """The draft ``message_id`` of ``mailbox``; the caller holds the lock."""
        draft = self._drafts.get(message_id)
        if draft is None or draft.mailbox != mailbox.address:
            raise _GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        return draft

    def _message_json(self, mailbox: _Mailbox, draft: Draft) -> dict[str, Any]:
        return {
            "@odata.context": (
                f"{self.base_url}/$metadata#users('{mailbox.user_id}')/messages/$entity"
            ),
            "id": draft.id,
            "createdDateTime": draft.created,
            "lastModifiedDateTime": _now(),
            "isDraft": True,
            "subject": draft.subject,
            "toRecipients": _recipients_json(draft.to_recipients),
            "ccRecipients": _recipients_json(draft.cc_recipients),
            "bccRecipients": _recipients_json(draft.bcc_recipients),
        }


# ------------------------------------------------------------------ pure helpers


def _parse_route(method: str, path: str) -> _Route:
    if not path.startswith("/v1.0/"):
        first = path.lstrip("/").partition("/")[0]
        raise _GraphError(400, "BadRequest", f"Invalid version: {first}")
    segments = [unquote(part) for part in path[len("/v1.0/") :].split("/")]
    head = segments[0].lower()
    if head == "me":
        raise _GraphError(
            400, "BadRequest", "/me request is only valid with delegated authentication flow."
        )
    if head != "users" or len(segments) < 2 or not segments[1]:
        raise _GraphError(400, "BadRequest", f"Resource not found for the segment '{segments[0]}'.")
    user, rest = segments[1], [part.lower() for part in segments[2:]]
    if len(rest) >= 2 and rest[0] == "messages":
        rest[1] = "*"  # the message id
    shape = tuple(rest)
    if shape not in _SHAPES:
        depth = next(
            i for i in range(len(shape)) if not any(k[: i + 1] == shape[: i + 1] for k in _SHAPES)
        )
        raise _GraphError(
            400, "BadRequest", f"Resource not found for the segment '{segments[2 + depth]}'."
        )
    operation = _SHAPES[shape].get(method)
    if operation is None:
        raise _GraphError(405, "BadRequest", f"FakeGraph does not model {method} on {path}.")
    message_id = segments[3] if len(segments) > 3 else None
    return _Route(operation, user, message_id)


def _decode_mime(content_type: str, body: bytes) -> tuple[bytes, Message]:
    """The decoded MIME and its parsed header block, or the error Graph gives."""
    if content_type.partition(";")[0].strip().lower() != "text/plain":
        raise _GraphError(
            400,
            "BadRequest",
            "FakeGraph models MIME bodies (Content-Type: text/plain) only.",
        )
    try:
        mime = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _GraphError(
            400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."
        ) from exc
    text = mime.decode("utf-8", errors="replace")
    headers = Parser(policy=policy.default).parsestr(text, headersonly=True)
    if not headers.keys():
        raise _GraphError(400, "ErrorMimeContentInvalid", "Invalid MIME content.")  # [INF]
    return mime, headers


def _header_recipients(headers: Message, name: str) -> tuple[Recipient, ...]:
    values = [str(value) for value in headers.get_all(name, [])]
    return tuple(
        Recipient(address, display or address)
        for display, address in getaddresses(values)
        if address
    )


def _parse_patch(content_type: str, body: bytes) -> dict[str, tuple[Recipient, ...]]:
    """The recipient lists of a PATCH body, by Graph property name."""
    try:
        if content_type.partition(";")[0].strip().lower() != "application/json":
            raise ValueError(content_type)
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise _GraphError(
            400,
            "BadRequest",
            "Unable to read JSON request payload. Please ensure Content-Type header is set "
            "and payload is of valid JSON format.",
        ) from exc
    return {
        prop: _json_recipients(prop, document[prop])
        for prop in ("toRecipients", "ccRecipients", "bccRecipients")
        if prop in document
    }


def _json_recipients(prop: str, value: Any) -> tuple[Recipient, ...]:
    bad = _GraphError(400, "RequestBodyRead", f"Invalid value for property '{prop}'.")  # [INF]
    if not isinstance(value, list):
        raise bad
    recipients = []
    for item in value:
        email = item.get("emailAddress") if isinstance(item, dict) else None
        address = email.get("address") if isinstance(email, dict) else None
        if not isinstance(address, str):
            raise bad
        name = email.get("name") if isinstance(email, dict) else None
        recipients.append(Recipient(address, name if isinstance(name, str) and name else address))
    return tuple(recipients)


def _check_recipients(recipients: tuple[tuple[Recipient, ...], ...]) -> None:
    everyone = [r for group in recipients for r in group]
    if not everyone:
        raise _GraphError(
            400,
            "ErrorInvalidRecipients",
            "At least one recipient isn't valid., A message can't be sent because it contains "
            "no recipients.",
        )
    for recipient in everyone:
        if "@" not in recipient.address.strip("@"):
            raise _GraphError(
                400,
                "ErrorInvalidRecipients",
                f"At least one recipient isn't valid., Recipient '{recipient.address}' is not "
                "resolved. All recipients must be resolved before a message can be submitted.",
            )


def _recipients_json(recipients: Iterable[Recipient]) -> list[dict[str, Any]]:
    return [{"emailAddress": {"name": r.name, "address": r.address}} for r in recipients]


def _new_message_id() -> str:
    # Shaped like Exchange ids: "AAMkA..." url-safe base64, one "=" of padding.
    return "AAMkA" + base64.urlsafe_b64encode(os.urandom(101)).decode("ascii")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unauthenticated(message: str) -> _GraphError:
    challenge = (
        'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/'
        f'oauth2/authorize", client_id="{GRAPH_APP_ID}"'
    )
    return _GraphError(401, "InvalidAuthenticationToken", message, {"WWW-Authenticate": challenge})


def _error_response(
    error: _GraphError, request_id: str, client_request_id: str | None
) -> _Response:
    inner = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "request-id": request_id,
        "client-request-id": client_request_id or request_id,
    }
    body = {"error": {"code": error.code, "message": error.message, "innerError": inner}}
    return _Response(error.status, body, error.headers)


# ------------------------------------------------------------------ HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    server: TLSServer
    protocol_version = "HTTP/1.1"
    server_version = "FakeGraph/1.0"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._handle()

    do_POST = do_PATCH = do_DELETE = do_PUT = do_GET

    def _handle(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self.send_error(411, "Length Required")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            self.send_error(400, "Bad Content-Length")
            return
        body: bytes | None = None
        if length <= self.server.owner.max_request_bytes:
            body = self.rfile.read(length)
        elif length <= _DRAIN_LIMIT_BYTES:
            self._drain(length)
        else:
            self.close_connection = True
        headers = {name.lower(): value for name, value in self.headers.items()}
        self._send(self.server.owner._serve_http(self.command, self.path, headers, body))

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def _send(self, response: _Response) -> None:
        payload = b"" if response.body is None else json.dumps(response.body).encode("utf-8")
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        if response.status != 204:
            self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        _log.debug("%s " + format, self.address_string(), *args)


__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "GRAPH_APP_ID",
    "GRAPH_RESOURCE",
    "MAIL_READWRITE",
    "MAIL_SEND",
    "Draft",
    "FakeGraph",
    "GraphRequest",
    "Recipient",
    "SentMessage",
]


FakeGraph.handler = _Handler
