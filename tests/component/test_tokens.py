"""Component tests of relay.tokens.MsalTokenProvider: real MSAL against the fake Entra ID.

Everything runs on 127.0.0.1 over HTTPS signed by the per-test CA. REQUESTS_CA_BUNDLE and
CURL_CA_BUNDLE are set on the development and CI machines (to a bundle without the test CA);
these tests pin them explicitly where it matters and never depend on them being absent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import OAuthSettings
from relay.errors import TokenError
from relay.tokens import MsalTokenProvider
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.fakes.entra import FakeEntra
from tests.fakes.pki import TestPKI, make_pki

EXCHANGE_AUDIENCE = "https://outlook.office365.com"
SEND_AS_ROLE = "SMTP.SendAsApp"
UNKNOWN_CLIENT_ID = "99999999-8888-7777-6666-555555555555"
CERT_CLIENT_ID = "22222222-3333-4444-5555-666666666666"
EXPIRED_CLIENT_ID = "33333333-4444-5555-6666-777777777777"
EXPIRED_SECRET = "old-s3cr3t~expired"
OTHER_TENANT_ID = "0d0d0d0d-1e1e-4f4f-8a8a-9b9b9b9b9b9b"
GATE_SECONDS = 5.0  # upper bound on how long a gated fake request may wait (never reached)


def settings(entra: FakeEntra, pki: TestPKI, **overrides: Any) -> OAuthSettings:
    values: dict[str, Any] = {
        "tenant_id": entra.tenant_id,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "authority": entra.authority_base,
        "ca_file": pki.ca_file,
        "timeout": 5,
    }
    values.update(overrides)
    return OAuthSettings(**values)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts TCP connections (kernel backlog) but never says a word."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A CA bundle that does not contain the test CA."""
    return make_pki(tmp_path / "other-pki").ca_file


def token_posts(entra: FakeEntra) -> int:
    return len(entra.token_requests)


# --------------------------------------------------------------------------- success and cache


async def test_secret_credential_gives_an_exchange_token(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki))

    token = await provider()

    claims = entra.validate_access_token(token)
    assert claims["aud"] == EXCHANGE_AUDIENCE
    assert SEND_AS_ROLE in claims["roles"]
    assert claims["appid"] == CLIENT_ID
    assert claims["appidacr"] == "1"
    [request] = entra.token_requests
    assert request.result == "ok"
    assert request.auth_method == "secret"
    assert request.scope == "https://outlook.office365.com/.default"
    assert provider.expires_at > time.time() + 3000


async def test_second_call_is_served_from_msal_cache(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki))

    first = await provider()
    second = await provider()

    assert second == first
    assert token_posts(entra) == 1


async def test_concurrent_calls_make_a_single_token_request(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki))

    tokens = await asyncio.gather(*(provider() for _ in range(20)))

    assert len(set(tokens)) == 1
    assert token_posts(entra) == 1
    entra.validate_access_token(tokens[0])


async def test_invalidate_forces_a_new_request(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki))
    first = await provider()

    await provider.invalidate()
    second = await provider()

    assert token_posts(entra) == 2
    assert second != first
    entra.validate_access_token(second)
    assert await provider() == second  # cached again after the refresh
    assert token_posts(entra) == 2


async def test_invalidate_before_any_token_is_harmless(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki))

    await provider.invalidate()

    assert entra.http_requests == []
    entra.validate_access_token(await provider())


@pytest.mark.parametrize(
    "gated_path",
    ["/v2.0/.well-known/openid-configuration", "/oauth2/v2.0/token"],
    ids=["tenant-discovery", "token-request"],
)
async def test_acquisition_does_not_block_the_event_loop(
    entra: FakeEntra, pki: TestPKI, monkeypatch: pytest.MonkeyPatch, gated_path: str
) -> None:
    """Hold the fake's answer until a coroutine has run on the loop, then let it go.

    If MSAL ran on the event loop (constructor discovery or token POST), the loop would be
    stuck in the gated request: the other coroutine could not run, the gate would time out
    and `released_in_time` would be False.
    """
    entered = threading.Event()
    release = threading.Event()
    released_in_time: list[bool] = []
    serve = entra._serve_http

    def gated(method: str, path: str, headers: Any, body: bytes) -> Any:
        if path.endswith(gated_path):
            entered.set()
            released_in_time.append(release.wait(GATE_SECONDS))
        return serve(method, path, headers, body)

    monkeypatch.setattr(entra, "_serve_http", gated)
    provider = MsalTokenProvider(settings(entra, pki))
    other_ran = asyncio.Event()

    async def other() -> None:
        other_ran.set()

    task = asyncio.create_task(provider())
    try:
        assert await asyncio.to_thread(entered.wait, GATE_SECONDS)
        asyncio.create_task(other())
        await asyncio.wait_for(other_ran.wait(), GATE_SECONDS)
        assert not task.done()
    finally:
        release.set()
    token = await task

    assert released_in_time == [True]
    entra.validate_access_token(token)


# --------------------------------------------------------------------------- Entra refuses


async def test_wrong_secret(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki, client_secret="not-the-secret"))

    with pytest.raises(TokenError) as caught:
        await provider()

    assert caught.value.aadsts == 7000215
    assert caught.value.error == "invalid_client"
    assert "7000215" in str(caught.value)
    assert provider.acquisitions == {"ok": 0, "error": 1}


async def test_unknown_client_id(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki, client_id=UNKNOWN_CLIENT_ID))

    with pytest.raises(TokenError) as caught:
        await provider()

    assert caught.value.aadsts == 700016
    assert caught.value.error == "unauthorized_client"


async def test_expired_secret(entra: FakeEntra, pki: TestPKI) -> None:
    entra.register_app(EXPIRED_CLIENT_ID, secret=EXPIRED_SECRET, secret_expired=True)
    provider = MsalTokenProvider(
        settings(entra, pki, client_id=EXPIRED_CLIENT_ID, client_secret=EXPIRED_SECRET)
    )

    with pytest.raises(TokenError) as caught:
        await provider()

    assert caught.value.aadsts == 7000222
    assert caught.value.error == "invalid_client"


async def test_unknown_tenant_is_a_token_error(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki, tenant_id=OTHER_TENANT_ID))

    with pytest.raises(TokenError) as caught:
        await provider()

    # MSAL's constructor raises ValueError on the 400 from tenant discovery; the provider turns
    # it into a TokenError carrying Entra's code.
    assert caught.value.error == "invalid_authority"
    assert caught.value.aadsts == 90002
    assert entra.token_requests == []


async def test_wrong_authority_path_is_not_reported_as_unknown_tenant(
    entra: FakeEntra, pki: TestPKI
) -> None:
    provider = MsalTokenProvider(settings(entra, pki, authority=f"{entra.authority_base}/wrong"))

    with pytest.raises(TokenError) as caught:
        await provider()

    assert [r.status for r in entra.http_requests] == [404]  # Entra gave no AADSTS code
    assert caught.value.error == "invalid_authority"
    assert caught.value.aadsts is None


async def test_failed_app_construction_is_retried_on_the_next_call(
    entra: FakeEntra, pki: TestPKI
) -> None:
    provider = MsalTokenProvider(settings(entra, pki, tenant_id=OTHER_TENANT_ID))
    with pytest.raises(TokenError):
        await provider()
    discovery_gets = len(entra.http_requests)

    with pytest.raises(TokenError):
        await provider()

    assert len(entra.http_requests) > discovery_gets


async def test_token_endpoint_unreachable(entra: FakeEntra, pki: TestPKI) -> None:
    authority = f"https://127.0.0.1:{closed_port()}"
    provider = MsalTokenProvider(settings(entra, pki, authority=authority, timeout=2))

    started = time.monotonic()
    with pytest.raises(TokenError) as caught:
        await provider()

    assert time.monotonic() - started < 5
    assert caught.value.aadsts is None
    assert caught.value.error in ("authority_unreachable", "token_endpoint_unreachable")


async def test_silent_token_endpoint_times_out(
    entra: FakeEntra, pki: TestPKI, black_hole: int
) -> None:
    authority = f"https://127.0.0.1:{black_hole}"
    provider = MsalTokenProvider(settings(entra, pki, authority=authority, timeout=0.5))

    started = time.monotonic()
    with pytest.raises(TokenError):
        await provider()

    # timeout 0.5 s, one retry by the adapter: well under the MSAL/requests default (none)
    assert time.monotonic() - started < 5


async def test_service_unavailable_is_a_token_error(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki))
    entra.fail_next(1, retry_after=0)

    with pytest.raises(TokenError):
        await provider()

    assert [r.status for r in entra.token_requests] == [503]
    assert provider.acquisitions["error"] == 1


async def test_service_unavailable_keeps_the_http_status(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki))
    entra.fail_next(1, retry_after=0)

    with pytest.raises(TokenError) as caught:
        await provider()

    assert caught.value.http_status == 503


async def test_service_unavailable_then_recovers(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki))
    entra.fail_next(1, retry_after=0)
    with pytest.raises(TokenError):
        await provider()

    token = await provider()

    entra.validate_access_token(token)
    assert [r.status for r in entra.token_requests] == [503, 200]


async def test_no_credential_is_a_token_error(entra: FakeEntra, pki: TestPKI) -> None:
    provider = MsalTokenProvider(settings(entra, pki, client_secret=None))

    with pytest.raises(TokenError) as caught:
        await provider()

    assert caught.value.error == "no_credential"
    assert entra.http_requests == []


# --------------------------------------------------------------------------- certificate


async def test_certificate_credential(entra: FakeEntra, pki: TestPKI) -> None:
    cert = pki.make_client_certificate("relay-app")
    entra.register_app(CERT_CLIENT_ID, certificate=cert)
    provider = MsalTokenProvider(
        settings(
            entra,
            pki,
            client_id=CERT_CLIENT_ID,
            client_secret=None,
            certificate_file=cert.pem_file,
        )
    )

    token = await provider()

    claims = entra.validate_access_token(token)
    assert claims["appidacr"] == "2"
    assert claims["appid"] == CERT_CLIENT_ID
    assert SEND_AS_ROLE in claims["roles"]
    [request] = entra.token_requests
    assert request.auth_method == "assertion"


async def test_unregistered_certificate_is_refused(entra: FakeEntra, pki: TestPKI) -> None:
    registered = pki.make_client_certificate("registered")
    presented = pki.make_client_certificate("presented")
    entra.register_app(CERT_CLIENT_ID, certificate=registered)
    provider = MsalTokenProvider(
        settings(
            entra,
            pki,
            client_id=CERT_CLIENT_ID,
            client_secret=None,
            certificate_file=presented.pem_file,
        )
    )

    with pytest.raises(TokenError) as caught:
        await provider()

    assert caught.value.aadsts == 700027
    assert caught.value.error == "invalid_client"


# --------------------------------------------------------------------------- CA bundle


async def test_configured_ca_wins_over_requests_ca_bundle(
    entra: FakeEntra, pki: TestPKI, other_ca: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(other_ca))
    provider = MsalTokenProvider(settings(entra, pki))

    token = await provider()

    entra.validate_access_token(token)


async def test_configured_ca_wins_over_the_system_bundle(
    entra: FakeEntra, pki: TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    if not system.is_file():
        pytest.skip("no system CA bundle at /etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(system))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(system))
    provider = MsalTokenProvider(settings(entra, pki))

    entra.validate_access_token(await provider())


async def test_without_ca_file_requests_ca_bundle_is_honoured(
    entra: FakeEntra, pki: TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca_file))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(pki.ca_file))
    provider = MsalTokenProvider(settings(entra, pki, ca_file=None))

    entra.validate_access_token(await provider())


async def test_without_ca_file_an_untrusted_server_is_a_token_error(
    entra: FakeEntra, pki: TestPKI, other_ca: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(other_ca))
    provider = MsalTokenProvider(settings(entra, pki, ca_file=None))

    with pytest.raises(TokenError):
        await provider()

    assert entra.token_requests == []


# --------------------------------------------------------------------------- no secrets leak


def _secret_fragments(*secrets: str) -> list[str]:
    """The secrets themselves, plus each long line of multi-line ones (PEM bodies)."""
    fragments = []
    for secret in secrets:
        fragments.append(secret)
        fragments.extend(
            line for line in secret.splitlines() if len(line) >= 32 and "-----" not in line
        )
    return fragments


def _leaks(caplog: pytest.LogCaptureFixture, fragments: list[str]) -> list[str]:
    found = []
    for record in caplog.records:
        text = record.getMessage()
        if record.exc_text:
            text += record.exc_text
        text += repr(record.__dict__)
        found.extend(f"{record.name}: {f[:8]}..." for f in fragments if f in text)
    return found


async def test_secret_and_token_never_logged_or_shown(
    entra: FakeEntra, pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = MsalTokenProvider(settings(entra, pki))

    token = await provider()
    await provider.invalidate()
    token2 = await provider()
    entra.fail_next(1, retry_after=0)
    await provider.invalidate()
    with pytest.raises(TokenError) as caught:
        await provider()

    fragments = _secret_fragments(CLIENT_SECRET, token, token2)
    assert caplog.records  # the test would prove nothing without log output
    assert _leaks(caplog, fragments) == []
    for shown in (repr(provider), str(provider), repr(caught.value), str(caught.value)):
        assert not any(f in shown for f in fragments)
    assert not any(f in caught.value.description for f in fragments)


async def test_wrong_secret_never_logged_or_shown(
    entra: FakeEntra, pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wr0ng-Secret~value-123"
    provider = MsalTokenProvider(settings(entra, pki, client_secret=wrong))

    with pytest.raises(TokenError) as caught:
        await provider()

    fragments = _secret_fragments(wrong)
    assert _leaks(caplog, fragments) == []
    for shown in (repr(provider), repr(caught.value), str(caught.value), caught.value.description):
        assert wrong not in shown


async def test_private_key_and_token_never_logged_or_shown(
    entra: FakeEntra, pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cert = pki.make_client_certificate("relay-app")
    entra.register_app(CERT_CLIENT_ID, certificate=cert)
    provider = MsalTokenProvider(
        settings(
            entra,
            pki,
            client_id=CERT_CLIENT_ID,
            client_secret=None,
            certificate_file=cert.pem_file,
        )
    )

    token = await provider()
    entra.register_app(CERT_CLIENT_ID, certificate=pki.make_client_certificate("rotated"))
    await provider.invalidate()
    with pytest.raises(TokenError) as caught:
        await provider()

    fragments = _secret_fragments(cert.private_key_pem, token)
    assert _leaks(caplog, fragments) == []
    for shown in (repr(provider), repr(caught.value), str(caught.value), caught.value.description):
        assert not any(f in shown for f in fragments)
