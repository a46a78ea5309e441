"""The Microsoft Graph fake (tests/fakes/graph.py) driven over HTTPS with httpx.

Tokens come from the Entra fake, so the audience and role checks see real
v1 access tokens; these tests pin down the answers the relay's Graph upstream
and doctor will have to classify.
"""

from __future__ import annotations

import base64
import functools
import threading
import time
from collections.abc import Iterator, Sequence
from email.message import EmailMessage
from typing import Any

import httpx
import pytest

from tests.fakes.entra import EXCHANGE_AUDIENCES, FakeEntra
from tests.fakes.graph import GRAPH_APP_ID, GRAPH_RESOURCE, FakeGraph, SentMessage
from tests.fakes.pki import TestPKI

MAILBOX = "relay@contoso.com"
APP = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
OTHER_APP = "1f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b"
NO_ROLE_APP = "5c4b3a29-1807-4f6e-9d8c-7b6a5f4e3d2c"
SECRET = "graph-test-secret"


@pytest.fixture
def graph(pki: TestPKI, entra: FakeEntra) -> Iterator[FakeGraph]:
    entra.register_app(APP, secret=SECRET, roles=["Mail.Send"])
    entra.register_app(OTHER_APP, secret=SECRET, roles=["Mail.Send"])
    entra.register_app(NO_ROLE_APP, secret=SECRET, roles=["SMTP.SendAsApp"])
    validate = functools.partial(
        entra.validate_access_token,
        audiences=(GRAPH_RESOURCE, GRAPH_RESOURCE + "/", GRAPH_APP_ID, *EXCHANGE_AUDIENCES),
    )
    with FakeGraph(pki, validate) as fake:
        fake.add_mailbox(MAILBOX)
        yield fake


@pytest.fixture
def client(pki: TestPKI, graph: FakeGraph) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=graph.base_url, verify=pki.client_context(), trust_env=False, timeout=10
    ) as http:
        yield http


def bearer(entra: FakeEntra, client_id: str = APP, **kwargs: Any) -> dict[str, str]:
    kwargs.setdefault("audience", GRAPH_RESOURCE)
    return {"Authorization": f"Bearer {entra.issue_token_for(client_id, **kwargs)}"}


def mime(
    *,
    to: Sequence[str] = ("Alice Doe <alice@example.com>",),
    cc: Sequence[str] = (),
    bcc: Sequence[str] = (),
    subject: str = "Scan 42",
) -> bytes:
    message = EmailMessage()
    message["From"] = "scanner@contoso.com"
    for name, values in (("To", to), ("Cc", cc), ("Bcc", bcc)):
        if values:
            message[name] = ", ".join(values)
    message["Subject"] = subject
    message.set_content("page 1\n")
    return message.as_bytes()


def upload(raw: bytes, auth: dict[str, str]) -> dict[str, Any]:
    """httpx keyword arguments posting ``raw`` as base64 MIME with ``auth``."""
    return {"content": base64.b64encode(raw), "headers": {**auth, "Content-Type": "text/plain"}}


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["innerError"]["request-id"] == response.headers["request-id"]
    assert error["innerError"]["date"]
    return error


def create_draft(client: httpx.Client, headers: dict[str, str], raw: bytes) -> dict[str, Any]:
    response = client.post(f"/users/{MAILBOX}/messages", **upload(raw, headers))
    assert response.status_code == 201, response.text
    draft: dict[str, Any] = response.json()
    return draft


def addresses(recipients: list[dict[str, Any]]) -> list[str]:
    return [r["emailAddress"]["address"] for r in recipients]


# ------------------------------------------------------------------ the draft flow


def test_draft_patch_send_records_the_final_recipients(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    auth = bearer(entra)
    raw = mime(
        to=['"Doe, Alice" <alice@example.com>', "bob@example.com"],
        cc=["=?utf-8?q?J=C3=BCrgen?= <juergen@example.com>"],
        bcc=["hidden@example.com"],
        subject="Grüße vom Scanner",
    )
    draft = create_draft(client, auth, raw)

    assert draft["id"].startswith("AAMkA") and draft["isDraft"] is True
    assert draft["subject"] == "Grüße vom Scanner"
    assert draft["toRecipients"] == [
        {"emailAddress": {"name": "Doe, Alice", "address": "alice@example.com"}},
        {"emailAddress": {"name": "bob@example.com", "address": "bob@example.com"}},
    ]
    assert draft["ccRecipients"] == [
        {"emailAddress": {"name": "Jürgen", "address": "juergen@example.com"}}
    ]
    assert addresses(draft["bccRecipients"]) == ["hidden@example.com"]
    assert graph.drafts[draft["id"]].mime == raw

    envelope = {
        "toRecipients": [{"emailAddress": {"address": "alice@example.com"}}],
        "ccRecipients": [],
        "bccRecipients": [
            {"emailAddress": {"address": "bob@example.com"}},
            {"emailAddress": {"address": "x@other.example", "name": "X"}},
        ],
    }
    patched = client.patch(f"/users/{MAILBOX}/messages/{draft['id']}", json=envelope, headers=auth)
    assert patched.status_code == 200, patched.text
    assert addresses(patched.json()["bccRecipients"]) == ["bob@example.com", "x@other.example"]
    assert patched.json()["ccRecipients"] == []

    sent = client.post(f"/users/{MAILBOX}/messages/{draft['id']}/send", headers=auth)
    assert sent.status_code == 202 and sent.content == b""

    assert graph.wait_for_sent(1, timeout=5) == [
        SentMessage(
            mailbox=MAILBOX,
            mime=raw,
            to=("alice@example.com",),
            cc=(),
            bcc=("bob@example.com", "x@other.example"),
            app_id=APP,
            request_id=sent.headers["request-id"],
        )
    ]
    assert graph.drafts == {}
    assert [(r.method, r.status) for r in graph.requests] == [
        ("POST", 201),
        ("PATCH", 200),
        ("POST", 202),
    ]
    assert graph.requests[-1].path == f"/v1.0/users/{MAILBOX}/messages/{draft['id']}/send"


def test_patch_may_replace_a_single_list(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    auth = bearer(entra)
    draft = create_draft(client, auth, mime(to=["a@example.com"], cc=["c@example.com"]))
    url = f"/users/{MAILBOX}/messages/{draft['id']}"
    patched = client.patch(
        url, json={"toRecipients": [{"emailAddress": {"address": "z@example.com"}}]}, headers=auth
    )
    assert addresses(patched.json()["toRecipients"]) == ["z@example.com"]
    assert addresses(patched.json()["ccRecipients"]) == ["c@example.com"]
    assert client.post(f"{url}/send", headers=auth).status_code == 202
    assert graph.sent[0].to == ("z@example.com",) and graph.sent[0].cc == ("c@example.com",)


def test_unknown_or_foreign_draft_ids_are_not_found(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    auth = bearer(entra)
    graph.add_mailbox("other@contoso.com")
    draft = create_draft(client, auth, mime())
    for method, url in (
        ("PATCH", f"/users/{MAILBOX}/messages/AAMkAnope="),
        ("POST", f"/users/{MAILBOX}/messages/AAMkAnope=/send"),
        ("DELETE", f"/users/{MAILBOX}/messages/AAMkAnope="),
        ("POST", f"/users/other@contoso.com/messages/{draft['id']}/send"),
    ):
        response = client.request(method, url, json={}, headers=auth)
        assert response.status_code == 404, (method, url)
        assert error_of(response) | {"innerError": None} == {
            "code": "ErrorItemNotFound",
            "message": "The specified object was not found in the store.",
            "innerError": None,
        }
    assert list(graph.drafts) == [draft["id"]]


def test_delete_removes_the_draft(graph: FakeGraph, entra: FakeEntra, client: httpx.Client) -> None:
    auth = bearer(entra)
    draft = create_draft(client, auth, mime())
    url = f"/users/{MAILBOX}/messages/{draft['id']}"
    deleted = client.delete(url, headers=auth)
    assert deleted.status_code == 204 and deleted.content == b""
    assert graph.drafts == {}
    assert client.post(f"{url}/send", headers=auth).status_code == 404
    assert graph.sent == []


def test_patch_needs_json_recipient_lists(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    auth = bearer(entra)
    url = f"/users/{MAILBOX}/messages/{create_draft(client, auth, mime())['id']}"
    not_json = client.patch(url, content=b"{", headers={**auth, "Content-Type": "application/json"})
    assert not_json.status_code == 400 and error_of(not_json)["code"] == "BadRequest"
    bad_shape = client.patch(url, json={"toRecipients": ["a@example.com"]}, headers=auth)
    assert bad_shape.status_code == 400 and error_of(bad_shape)["code"] == "RequestBodyRead"


def test_sending_without_valid_recipients_is_refused(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    auth = bearer(entra)
    draft = create_draft(client, auth, mime(to=[]))
    assert draft["toRecipients"] == []
    url = f"/users/{MAILBOX}/messages/{draft['id']}"
    empty = client.post(f"{url}/send", headers=auth)
    assert empty.status_code == 400
    assert error_of(empty)["code"] == "ErrorInvalidRecipients"
    assert "contains no recipients" in error_of(empty)["message"]

    client.patch(
        url, json={"toRecipients": [{"emailAddress": {"address": "nobody"}}]}, headers=auth
    )
    unresolved = client.post(f"{url}/send", headers=auth)
    assert unresolved.status_code == 400
    assert "Recipient 'nobody' is not resolved" in error_of(unresolved)["message"]
    assert graph.sent == [] and list(graph.drafts) == [draft["id"]]


# ------------------------------------------------------------------ MIME decoding


def test_bad_base64_and_non_mime_bodies(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    auth = {**bearer(entra), "Content-Type": "text/plain"}
    for path in ("messages", "sendMail"):
        bad = client.post(f"/users/{MAILBOX}/{path}", content=b"not*base64!", headers=auth)
        assert bad.status_code == 400
        assert error_of(bad)["code"] == "ErrorMimeContentInvalidBase64String"
        assert error_of(bad)["message"] == "Invalid base64 string for MIME content."
        prose = base64.b64encode(b"just some words\r\nno headers at all\r\n")
        not_mime = client.post(f"/users/{MAILBOX}/{path}", content=prose, headers=auth)
        assert not_mime.status_code == 400
        assert error_of(not_mime)["code"] == "ErrorMimeContentInvalid"
    assert graph.drafts == {} and graph.sent == []


def test_line_wrapped_base64_is_accepted(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    raw = mime(to=["a@example.com"])
    wrapped = base64.encodebytes(raw)  # 76-column lines, like the Graph docs' example
    assert b"\n" in wrapped
    response = client.post(
        f"/users/{MAILBOX}/messages",
        content=wrapped,
        headers={**bearer(entra), "Content-Type": "text/plain; charset=us-ascii"},
    )
    assert response.status_code == 201
    assert graph.drafts[response.json()["id"]].mime == raw


def test_json_message_bodies_are_not_modelled(entra: FakeEntra, client: httpx.Client) -> None:
    response = client.post(
        f"/users/{MAILBOX}/messages", json={"subject": "hi"}, headers=bearer(entra)
    )
    assert response.status_code == 400 and "text/plain" in error_of(response)["message"]


def test_send_mail_records_the_mime_recipients(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    raw = mime(to=["a@example.com"], cc=["b@example.com"], bcc=["c@example.com", "d@example.com"])
    response = client.post(f"/users/{MAILBOX}/sendMail", **upload(raw, bearer(entra)))
    assert response.status_code == 202 and response.content == b""
    (message,) = graph.sent
    assert (message.to, message.cc, message.bcc) == (
        ("a@example.com",),
        ("b@example.com",),
        ("c@example.com", "d@example.com"),
    )
    assert message.mime == raw and message.request_id == response.headers["request-id"]
    assert graph.drafts == {}


def test_raw_utf8_addresses_in_headers(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    raw = "From: scanner@contoso.com\r\nTo: Jürgen <jürgen@example.com>\r\nSubject: ü\r\n\r\nx\r\n"
    draft = create_draft(client, bearer(entra), raw.encode("utf-8"))
    assert draft["toRecipients"] == [
        {"emailAddress": {"name": "Jürgen", "address": "jürgen@example.com"}}
    ]
    assert draft["subject"] == "ü"


# ------------------------------------------------------------------ authentication


def test_missing_token_is_401_with_a_challenge(client: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwdw=="}):
        response = client.get(f"/users/{MAILBOX}", headers=headers)
        assert response.status_code == 401
        assert error_of(response)["code"] == "InvalidAuthenticationToken"
        assert error_of(response)["message"] == "Access token is empty."
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")


def test_invalid_or_expired_tokens_are_401(entra: FakeEntra, client: httpx.Client) -> None:
    garbage = client.get(f"/users/{MAILBOX}", headers={"Authorization": "Bearer abc.def.ghi"})
    assert garbage.status_code == 401
    assert error_of(garbage)["code"] == "InvalidAuthenticationToken"
    expired = client.get(f"/users/{MAILBOX}", headers=bearer(entra, lifetime=-3600))
    assert expired.status_code == 401
    assert "expired" in error_of(expired)["message"]


def test_exchange_token_has_the_wrong_audience(
    pki: TestPKI, entra: FakeEntra, client: httpx.Client
) -> None:
    exchange_token = bearer(entra, audience=EXCHANGE_AUDIENCES[0])
    # The fixture's validator accepts Exchange audiences: the fake's own check refuses it.
    response = client.get(f"/users/{MAILBOX}", headers=exchange_token)
    assert response.status_code == 401
    assert error_of(response) | {"innerError": None} == {
        "code": "InvalidAuthenticationToken",
        "message": "Access token validation failure. Invalid audience.",
        "innerError": None,
    }
    # A validator that refuses the audience itself gets the same answer.
    graph_only = functools.partial(entra.validate_access_token, audiences=(GRAPH_RESOURCE,))
    with (
        FakeGraph(pki, graph_only) as strict,
        httpx.Client(verify=pki.client_context(), trust_env=False) as http,
    ):
        strict.add_mailbox(MAILBOX)
        refused = http.get(f"{strict.base_url}/users/{MAILBOX}", headers=exchange_token)
        assert refused.status_code == 401
        assert error_of(refused)["message"].endswith("Invalid audience.")


@pytest.mark.parametrize("audience", [GRAPH_RESOURCE + "/", GRAPH_APP_ID])
def test_other_spellings_of_the_graph_audience(
    entra: FakeEntra, client: httpx.Client, audience: str
) -> None:
    assert (
        client.get(f"/users/{MAILBOX}", headers=bearer(entra, audience=audience)).status_code == 200
    )


def test_token_from_the_token_endpoint_works(
    pki: TestPKI, entra: FakeEntra, client: httpx.Client
) -> None:
    with httpx.Client(verify=pki.client_context(), trust_env=False) as http:
        token = http.post(
            entra.token_endpoint,
            data={
                "grant_type": "client_credentials",
                "client_id": APP,
                "client_secret": SECRET,
                "scope": "https://graph.microsoft.com/.default",
            },
        ).json()["access_token"]
    response = client.get(f"/users/{MAILBOX}", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


def test_without_mail_send_role_access_is_denied(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    auth = bearer(entra, NO_ROLE_APP)
    for method, path in (("GET", ""), ("POST", "/messages"), ("POST", "/sendMail")):
        response = client.request(method, f"/users/{MAILBOX}{path}", **upload(mime(), auth))
        assert response.status_code == 403
        assert error_of(response) | {"innerError": None} == {
            "code": "ErrorAccessDenied",
            "message": "Access is denied. Check credentials and try again.",
            "innerError": None,
        }
    assert graph.sent == [] and graph.drafts == {}


# ------------------------------------------------------------------ mailboxes


def test_unknown_mailbox_is_an_invalid_user(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    response = client.post("/users/ghost@contoso.com/messages", **upload(mime(), bearer(entra)))
    assert response.status_code == 404
    assert error_of(response) | {"innerError": None} == {
        "code": "ErrorInvalidUser",
        "message": "The requested user 'ghost@contoso.com' is invalid.",
        "innerError": None,
    }


def test_mailboxes_are_addressed_case_insensitively_or_by_id(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    auth = bearer(entra)
    user_id = graph.user_id(MAILBOX)
    for name in ("RELAY@Contoso.COM", "relay%40contoso.com", user_id, user_id.upper()):
        response = client.get(f"/users/{name}", headers=auth)
        assert response.status_code == 200, name
        assert response.json() | {"@odata.context": None, "displayName": None} == {
            "@odata.context": None,
            "displayName": None,
            "id": user_id,
            "mail": MAILBOX,
            "userPrincipalName": MAILBOX,
        }
    draft = create_draft(client, auth, mime())
    sent = client.post(f"/users/RELAY@CONTOSO.COM/messages/{draft['id']}/send", headers=auth)
    assert sent.status_code == 202
    assert graph.sent[0].mailbox == MAILBOX


def test_allowed_apps_models_an_access_policy(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    graph.add_mailbox("scoped@contoso.com", allowed_apps=[APP.upper()])
    other = bearer(entra, OTHER_APP)
    for method, path in (("GET", ""), ("POST", "/messages"), ("POST", "/sendMail")):
        url = f"/users/scoped@contoso.com{path}"
        denied = client.request(method, url, **upload(mime(), other))
        assert denied.status_code == 403, path
        assert error_of(denied)["code"] == "ErrorAccessDenied"
    allowed = client.post(
        "/users/scoped@contoso.com/sendMail", **upload(mime(), bearer(entra, APP))
    )
    assert allowed.status_code == 202
    assert [(m.mailbox, m.app_id) for m in graph.sent] == [("scoped@contoso.com", APP)]


def test_strict_permissions_follow_the_graph_permission_table(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    graph.strict_permissions = True
    send_only = bearer(entra)  # Mail.Send
    create = client.post(f"/users/{MAILBOX}/messages", **upload(mime(), send_only))
    assert create.status_code == 403 and error_of(create)["code"] == "ErrorAccessDenied"
    assert client.post(f"/users/{MAILBOX}/sendMail", **upload(mime(), send_only)).status_code == 202
    user = client.get(f"/users/{MAILBOX}", headers=send_only)
    assert user.status_code == 403 and error_of(user)["code"] == "Authorization_RequestDenied"

    full = bearer(entra, roles=["Mail.ReadWrite", "Mail.Send", "User.Read.All"])
    draft = create_draft(client, full, mime())
    assert (
        client.post(f"/users/{MAILBOX}/messages/{draft['id']}/send", headers=full).status_code
        == 202
    )
    assert client.get(f"/users/{MAILBOX}", headers=full).status_code == 200
    missing = client.get("/users/ghost@contoso.com", headers=full)
    assert missing.status_code == 404 and error_of(missing)["code"] == "Request_ResourceNotFound"
    # A directory read ignores the mailbox's application access policy.
    graph.add_mailbox("scoped@contoso.com", allowed_apps=[OTHER_APP])
    assert client.get("/users/scoped@contoso.com", headers=full).status_code == 200


# ------------------------------------------------------------------ routing and HTTP


def test_unmodelled_paths_and_methods(entra: FakeEntra, client: httpx.Client) -> None:
    auth = bearer(entra)
    me = client.post("/me/sendMail", **upload(mime(), auth))
    assert me.status_code == 400 and "delegated" in error_of(me)["message"]
    unknown = client.get(f"/users/{MAILBOX}/calendar", headers=auth)
    assert unknown.status_code == 400
    assert error_of(unknown)["message"] == "Resource not found for the segment 'calendar'."
    listing = client.get(f"/users/{MAILBOX}/messages", headers=auth)
    assert listing.status_code == 405


def test_every_response_carries_request_ids(entra: FakeEntra, client: httpx.Client) -> None:
    ok = client.get(f"/users/{MAILBOX}", headers={**bearer(entra), "client-request-id": "abc-123"})
    assert ok.headers["client-request-id"] == "abc-123" and ok.headers["request-id"]
    failed = client.get(
        "/users/ghost@contoso.com", headers={**bearer(entra), "client-request-id": "x"}
    )
    assert error_of(failed)["innerError"]["client-request-id"] == "x"
    assert ok.headers["request-id"] != failed.headers["request-id"]


def test_oversized_request_is_413(graph: FakeGraph, entra: FakeEntra, client: httpx.Client) -> None:
    graph.max_request_bytes = 2048
    raw = mime() + b"x" * 4096
    response = client.post(f"/users/{MAILBOX}/sendMail", **upload(raw, bearer(entra)))
    assert response.status_code == 413
    assert error_of(response)["code"] == "ErrorMessageSizeExceeded"
    # The body was drained: the same keep-alive connection answers the next request.
    assert client.get(f"/users/{MAILBOX}", headers=bearer(entra)).status_code == 200
    assert graph.sent == []


def test_throttle_answers_429_with_retry_after_then_recovers(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    auth = bearer(entra)
    graph.throttle(2, retry_after=7)
    for _ in range(2):
        response = client.post(f"/users/{MAILBOX}/sendMail", **upload(mime(), auth))
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "7"
        assert error_of(response)["code"] == "ApplicationThrottled"
    assert client.post(f"/users/{MAILBOX}/sendMail", **upload(mime(), auth)).status_code == 202
    assert graph.throttled_count == 2 and len(graph.sent) == 1


def test_throttle_503_and_injected_errors_queue_in_order(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    graph.throttle(1, retry_after=2, status=503)
    graph.fail_next(500, "ErrorInternalServerError", "Something went wrong.", times=2)
    statuses = []
    for _ in range(4):
        response = client.get(f"/users/{MAILBOX}")  # faults come before the token check
        statuses.append((response.status_code, response.json().get("error", {}).get("code")))
    assert statuses == [
        (503, "ServiceUnavailable"),
        (500, "ErrorInternalServerError"),
        (500, "ErrorInternalServerError"),
        (401, "InvalidAuthenticationToken"),
    ]
    assert graph.throttled_count == 0
    with pytest.raises(ValueError):
        graph.throttle(1, status=500)


def test_wait_for_sent_wakes_up_and_times_out(
    graph: FakeGraph, entra: FakeEntra, client: httpx.Client
) -> None:
    with pytest.raises(TimeoutError):
        graph.wait_for_sent(1, timeout=0.1)
    request = upload(mime(), bearer(entra))
    sender = threading.Timer(0.2, lambda: client.post(f"/users/{MAILBOX}/sendMail", **request))
    sender.start()
    try:
        assert len(graph.wait_for_sent(1, timeout=5)) == 1
    finally:
        sender.join()


def test_stop_closes_idle_keep_alive_connections(pki: TestPKI, entra: FakeEntra) -> None:
    validate = functools.partial(entra.validate_access_token, audiences=(GRAPH_RESOURCE,))
    fake = FakeGraph(pki, validate)
    fake.start()
    fake.add_mailbox(MAILBOX)
    with httpx.Client(base_url=fake.base_url, verify=pki.client_context(), trust_env=False) as http:
        entra.register_app(APP, secret=SECRET, roles=["Mail.Send"])
        for _ in range(3):
            assert http.get(f"/users/{MAILBOX}", headers=bearer(entra)).status_code == 200
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 2.0
