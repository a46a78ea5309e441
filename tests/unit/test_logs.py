"""logs.py: secret redaction at the logging boundary and the queue id on every line."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator

import pytest

from relay import logs
from relay.logs import REDACTED, current_queue_id, redact, register_secret, setup_logging

CLIENT_SECRET = "Qx8Q~r2.Hk_4Ffh-NpA7sLc9vTzYbW0eJdUoMi3"  # the shape of an Entra client secret
JWT = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiIsIng1dCI6Im5PbzNaRHJPRFhFSzFqS1doWHNsSFJfS1hFZyJ9"
    ".eyJhdWQiOiJodHRwczovL291dGxvb2sub2ZmaWNlMzY1LmNvbSIsInJvbGVzIjpbIlNNVFAuU2VuZEFzQXBwIl19"
    ".dGhpc19pc19ub3RfYV9yZWFsX3NpZ25hdHVyZV9idXRfbG9va3NfbGlrZV9vbmU"
)
XOAUTH2 = base64.b64encode(f"user=relay@contoso.com\x01auth=Bearer {JWT}\x01\x01".encode()).decode()


@pytest.fixture(autouse=True)
def fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered secrets are process-wide: give each test its own set."""
    monkeypatch.setattr(logs, "_secrets", set())


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {
        name: logging.getLogger(name).level for name in ("mail.log", "msal", "urllib3", "asyncio")
    }
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


# --- redact() -------------------------------------------------------------------------------------


def test_registered_secrets_are_removed() -> None:
    register_secret(CLIENT_SECRET)
    assert redact(f"secret is {CLIENT_SECRET}, twice {CLIENT_SECRET}!") == (
        f"secret is {REDACTED}, twice {REDACTED}!"
    )
    assert REDACTED == "[redacted]"


def test_longer_secrets_are_removed_before_their_prefixes() -> None:
    register_secret("abcd")
    register_secret("abcdefgh")
    assert redact("x abcdefgh y abcd z") == f"x {REDACTED} y {REDACTED} z"


def test_very_short_secrets_are_not_registered() -> None:
    register_secret("abc")
    register_secret("")
    assert redact("abc is a common word") == "abc is a common word"
    assert logs._secrets == set()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Authorization: Bearer {JWT}", f"Authorization: Bearer {REDACTED}"),
        (f"authorization: bearer {JWT}", f"authorization: bearer {REDACTED}"),
        ("Bearer opaque-token_value.123~", f"Bearer {REDACTED}"),
        (f"token {JWT} expired", f"token {REDACTED} expired"),
        (
            f"msal returned {{'access_token': '{JWT}'}}",
            f"msal returned {{'access_token': '{REDACTED}'}}",
        ),
        (f"sent {XOAUTH2}", f"sent {REDACTED}"),
        (f"AUTH XOAUTH2 {XOAUTH2}", f"AUTH XOAUTH2 {REDACTED}"),
        (f"auth=Bearer {JWT}\x01\x01", f"auth=Bearer {REDACTED}\x01\x01"),
        ("AUTH PLAIN AHJlbGF5QGNvbnRvc28uY29tAGh1bnRlcjI=", f"AUTH PLAIN {REDACTED}"),
        ("auth login cmVsYXk=", f"auth login {REDACTED}"),
        (
            "client_secret=Qx8Q~r2.Hk_4Ffh&grant_type=client_credentials",
            f"client_secret={REDACTED}&grant_type=client_credentials",
        ),
        (
            '{"client_secret": "Qx8Q~r2.Hk_4Ffh", "scope": "x"}',
            f'{{"client_secret": "{REDACTED}", "scope": "x"}}',
        ),
        ("client_assertion=eyJhbGciOiJQUzI1NiJ9abc rest", f"client_assertion={REDACTED} rest"),
        ("password: hunter22", f"password: {REDACTED}"),
    ],
)
def test_token_shaped_values_are_removed(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_xoauth2_payload_of_the_design_example_is_removed() -> None:
    payload = base64.b64encode(b"user=x@y\x01auth=Bearer tok\x01\x01").decode()
    assert payload == "dXNlcj14QHkBYXV0aD1CZWFyZXIgdG9rAQE="
    assert redact(f"C: {payload}") == f"C: {REDACTED}"
    assert redact(f"C: AUTH XOAUTH2 {payload}") == f"C: AUTH XOAUTH2 {REDACTED}"


@pytest.mark.parametrize(
    "text",
    [
        "accepted from=<scanner@contoso.example> rcpts=2 size=1234 client=192.168.1.20",
        "upstream replied 535 5.7.3 Authentication unsuccessful",
        "432 4.3.2 Concurrent connections limit exceeded.",
        "queued as 0193A1B2C3D4E5F60",
    ],
)
def test_ordinary_lines_are_unchanged(text: str) -> None:
    assert redact(text) == text


# --- setup_logging(): nothing secret leaves the process -------------------------------------------


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logger_never_writes_a_registered_secret(fmt: str, capfd: pytest.CaptureFixture[str]):
    setup_logging("debug", fmt, secrets=[CLIENT_SECRET])
    log = logging.getLogger("relay.test")
    log.info("client secret is %s", CLIENT_SECRET, extra={"queue_id": "0193A1B2C3D4E5F60"})
    log.debug("token response %s", {"access_token": JWT, "client_secret": CLIENT_SECRET})
    log.warning("Bearer %s", JWT)
    try:
        raise RuntimeError(f"MSAL said no for {CLIENT_SECRET} / {JWT}")
    except RuntimeError:
        log.exception("token request failed", extra={"queue_id": "0193A1B2C3D4E5F61"})
    out, err = capfd.readouterr()
    assert out == ""
    assert CLIENT_SECRET not in err
    assert JWT not in err
    assert JWT[:40] not in err
    assert err.count(REDACTED) >= 5
    assert "RuntimeError" in err
    assert "token request failed" in err
    lines = err.splitlines()
    if fmt == "json":
        events = [json.loads(line) for line in lines]
        assert [e["level"] for e in events] == ["info", "debug", "warning", "error"]
        assert [e["queue_id"] for e in events] == [
            "0193A1B2C3D4E5F60",
            "-",
            "-",
            "0193A1B2C3D4E5F61",
        ]
        assert events[0]["msg"] == f"client secret is {REDACTED}"
        assert events[0]["logger"] == "relay.test"
        assert "Traceback" in events[3]["exc"]
    else:
        assert f"INFO relay.test [0193A1B2C3D4E5F60] client secret is {REDACTED}" in lines[0]
        assert "ERROR relay.test [0193A1B2C3D4E5F61] token request failed" in err
        assert any(line.startswith("  Traceback") for line in lines)  # one event, indented


@pytest.mark.usefixtures("restore_logging")
def test_json_format_redacts_secrets_that_json_escapes(capfd: pytest.CaptureFixture[str]):
    # a stub with the shape of key material (split so no real-looking key sits in the tree)
    key = (
        "-----BEGIN "
        + "PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END "
        + "PRIVATE KEY-----"
    )
    password = 'pa"ss\\word-1234'
    setup_logging("info", "json", secrets=[key, password])
    logging.getLogger("relay.test").error("loaded %s and %s", key, password)
    err = capfd.readouterr().err
    assert "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in err
    assert "word-1234" not in err
    assert json.loads(err)["msg"] == f"loaded {REDACTED} and {REDACTED}"


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_queue_id_comes_from_extra_or_the_context(fmt: str, capfd: pytest.CaptureFixture[str]):
    setup_logging("info", fmt)
    log = logging.getLogger("relay.delivery")
    log.info("no message in context")
    token = current_queue_id.set("0193A1B2C3D4E5F62")
    try:
        log.info("from the context")
        log.info("extra wins", extra={"queue_id": "0193A1B2C3D4E5F63"})
    finally:
        current_queue_id.reset(token)
    err = capfd.readouterr().err
    lines = err.splitlines()
    if fmt == "json":
        assert [json.loads(line)["queue_id"] for line in lines] == [
            "-",
            "0193A1B2C3D4E5F62",
            "0193A1B2C3D4E5F63",
        ]
    else:
        assert [line.split(" ", 1)[1] for line in lines] == [
            "INFO relay.delivery [-] no message in context",
            "INFO relay.delivery [0193A1B2C3D4E5F62] from the context",
            "INFO relay.delivery [0193A1B2C3D4E5F63] extra wins",
        ]
        assert lines[0][:20].count("-") == 2 and lines[0][10] == "T"  # ISO 8601 UTC stamp
        assert lines[0].split(" ", 1)[0].endswith("Z")


@pytest.mark.usefixtures("restore_logging")
def test_setup_logging_replaces_handlers_and_sets_the_level(capfd: pytest.CaptureFixture[str]):
    setup_logging("warning", "text")
    setup_logging("warning", "text")  # called twice: still one line per event
    log = logging.getLogger("relay.test")
    log.info("dropped")
    log.warning("kept")
    err = capfd.readouterr().err
    assert len(logging.getLogger().handlers) == 1
    assert "dropped" not in err
    assert err.count("kept") == 1
    assert logging.getLogger("msal").level == logging.WARNING
