"""Real MSAL 1.39 against the fake Entra token service (tests/fakes/entra.py).

These tests pin down both the fake's answers and how MSAL surfaces them
(raised exception vs. returned error dict, its own caches), which is what the
relay's token provider has to cope with.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.entra import FakeEntra, InvalidToken
from tests.fakes.pki import ClientCertificate, TestPKI, make_pki

EXCHANGE_SCOPE = ["https://outlook.office365.com/.default"]
CLIENT_ID = "0b9e6a54-2f1c-4d7e-8a3b-5c6d7e8f9a01"
OTHER_CLIENT_ID = "7d4c3b2a-1e0f-4a9b-8c7d-6e5f4a3b2c1d"
SECRET = "test-only-client-secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def app_cert(pki: TestPKI) -> ClientCertificate:
    return pki.make_client_certificate("relay-app")


@pytest.fixture
def entra(pki: TestPKI) -> Iterator[FakeEntra]:
    with FakeEntra(pki) as fake:
        yield fake


@pytest.fixture
def session(pki: TestPKI) -> Iterator[requests.Session]:
    # REQUESTS_CA_BUNDLE is set on these machines and would override `verify`.
    http = requests.Session()
    http.trust_env = False
    http.verify = str(pki.ca_file)
    yield http
    http.close()


def make_app(
    entra: FakeEntra,
    session: requests.Session,
    credential: Any,
    *,
    client_id: str = CLIENT_ID,
    authority: str | None = None,
) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(
        client_id,
        client_credential=credential,
        authority=authority or entra.authority,
        instance_discovery=False,
        http_client=session,
    )


def post_token(session: requests.Session, url: str, form: dict[str, str]) -> requests.Response:
    return session.post(url, data=form, headers={"client-request-id": "corr-1"}, timeout=5)


# ----------------------------------------------------------------- secrets


def test_secret_credential_yields_exchange_token(
    entra: FakeEntra, session: requests.Session
) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)

    result = make_app(entra, session, SECRET).acquire_token_for_client(EXCHANGE_SCOPE)

    assert result["token_type"] == "Bearer"
    assert result["expires_in"] == 3599
    assert result["token_source"] == "identity_provider"
    claims = entra.validate_access_token(result["access_token"])
    assert claims["aud"] == "https://outlook.office365.com"
    assert claims["iss"] == f"https://sts.windows.net/{entra.tenant_id}/"
    assert claims["roles"] == ["SMTP.SendAsApp"]
    assert (claims["appid"], claims["appidacr"], claims["idtyp"], claims["ver"]) == (
        CLIENT_ID,
        "1",
        "app",
        "1.0",
    )
    assert claims["oid"] == claims["sub"] == entra.service_principal_id(CLIENT_ID)
    assert claims["tid"] == entra.tenant_id
    [seen] = entra.token_requests
    assert (seen.client_id, seen.grant_type, seen.scope, seen.auth_method, seen.result) == (
        CLIENT_ID,
        "client_credentials",
        EXCHANGE_SCOPE[0],
        "secret",
        "ok",
    )


def test_app_without_roles_gets_token_without_roles_claim(
    entra: FakeEntra, session: requests.Session
) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET, roles=())

    result = make_app(entra, session, SECRET).acquire_token_for_client(EXCHANGE_SCOPE)

    assert "roles" not in entra.validate_access_token(result["access_token"])


def test_wrong_secret_is_returned_as_7000215_and_not_cached_by_msal(
    entra: FakeEntra, session: requests.Session
) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)
    app = make_app(entra, session, "not-the-secret")

    result = app.acquire_token_for_client(EXCHANGE_SCOPE)
    app.acquire_token_for_client(EXCHANGE_SCOPE)

    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [7000215]
    assert result["error_description"].startswith("AADSTS7000215: Invalid client secret")
    assert result["correlation_id"] == entra.token_requests[0].correlation_id
    assert [r.status for r in entra.token_requests] == [401, 401]  # 401s reach the server


def test_expired_secret_is_7000222(entra: FakeEntra, session: requests.Session) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET, secret_expired=True)

    result = make_app(entra, session, SECRET).acquire_token_for_client(EXCHANGE_SCOPE)

    assert (result["error"], result["error_codes"]) == ("invalid_client", [7000222])


def test_unknown_app_is_700016_and_msal_replays_the_400(
    entra: FakeEntra, session: requests.Session
) -> None:
    app = make_app(entra, session, SECRET)

    first = app.acquire_token_for_client(EXCHANGE_SCOPE)
    entra.register_app(CLIENT_ID, secret=SECRET)  # fixing it does not help this app object
    second = app.acquire_token_for_client(EXCHANGE_SCOPE)

    assert (first["error"], first["error_codes"]) == ("unauthorized_client", [700016])
    assert second["error_codes"] == [700016]
    assert len(entra.token_requests) == 1  # MSAL's http cache keeps HTTP 400 for 60 s


def test_scope_without_default_suffix_is_1002012(
    entra: FakeEntra, session: requests.Session
) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)

    result = make_app(entra, session, SECRET).acquire_token_for_client(
        ["https://outlook.office365.com/SMTP.SendAsApp"]
    )

    assert (result["error"], result["error_codes"]) == ("invalid_scope", [1002012])


def test_missing_credential_is_7000218(entra: FakeEntra, session: requests.Session) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)

    response = post_token(
        session,
        entra.token_endpoint,
        {"grant_type": "client_credentials", "client_id": CLIENT_ID, "scope": EXCHANGE_SCOPE[0]},
    )

    assert response.status_code == 401
    assert response.json()["error_codes"] == [7000218]
    assert response.json()["correlation_id"] == "corr-1"


def test_client_secret_basic_is_accepted(entra: FakeEntra, session: requests.Session) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)

    response = session.post(
        entra.token_endpoint,
        auth=(CLIENT_ID, SECRET),
        timeout=5,
        data={"grant_type": "client_credentials", "scope": EXCHANGE_SCOPE[0]},
    )

    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store, no-cache"


# ----------------------------------------------------------------- tenants


def test_unknown_tenant_fails_in_msal_constructor(
    entra: FakeEntra, session: requests.Session
) -> None:
    other = f"{entra.authority_base}/00000000-0000-0000-0000-00000000dead"

    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        make_app(entra, session, SECRET, authority=other)

    assert entra.http_requests[-1].status == 400
    assert entra.token_requests == []


def test_unknown_tenant_token_request_is_90002(entra: FakeEntra, session: requests.Session) -> None:
    url = f"{entra.authority_base}/contoso.example/oauth2/v2.0/token"

    response = post_token(
        session,
        url,
        {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "scope": EXCHANGE_SCOPE[0],
        },
    )
    discovery = session.get(
        f"{entra.authority_base}/contoso.example/v2.0/.well-known/openid-configuration", timeout=5
    )

    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")
    assert response.json()["error_codes"] == [90002]
    assert (discovery.status_code, discovery.json()["error"]) == (400, "invalid_tenant")


# ----------------------------------------------------------------- certificates


@pytest.mark.parametrize("form,alg", [("public_certificate", "PS256"), ("thumbprint", "RS256")])
def test_certificate_credential(
    entra: FakeEntra, session: requests.Session, app_cert: ClientCertificate, form: str, alg: str
) -> None:
    entra.register_app(CLIENT_ID, certificate=app_cert)
    credential = {
        "private_key": app_cert.private_key_pem,
        form: app_cert.certificate_pem
        if form == "public_certificate"
        else app_cert.thumbprint_sha1_hex,
    }

    result = make_app(entra, session, credential).acquire_token_for_client(EXCHANGE_SCOPE)

    assert entra.validate_access_token(result["access_token"])["appidacr"] == "2"
    [seen] = entra.token_requests
    assert (seen.auth_method, seen.assertion_alg) == ("assertion", alg)


def test_unregistered_certificate_is_700027(
    entra: FakeEntra, session: requests.Session, pki: TestPKI, app_cert: ClientCertificate
) -> None:
    entra.register_app(CLIENT_ID, certificate=pki.make_client_certificate("other-app"))
    credential = {
        "private_key": app_cert.private_key_pem,
        "public_certificate": app_cert.certificate_pem,
    }

    result = make_app(entra, session, credential).acquire_token_for_client(EXCHANGE_SCOPE)

    assert (result["error"], result["error_codes"]) == ("invalid_client", [700027])
    assert "The key was not found." in result["error_description"]


def test_expired_registered_certificate_is_700027(
    entra: FakeEntra, session: requests.Session, pki: TestPKI
) -> None:
    expired = pki.make_client_certificate("expired-app", valid_days=-1)
    entra.register_app(CLIENT_ID, certificate=expired)
    credential = {
        "private_key": expired.private_key_pem,
        "public_certificate": expired.certificate_pem,
    }

    result = make_app(entra, session, credential).acquire_token_for_client(EXCHANGE_SCOPE)

    assert result["error_codes"] == [700027]
    assert "The key used is expired." in result["error_description"]


# ----------------------------------------------------------------- MSAL caching


def test_second_acquire_is_served_from_msal_token_cache(
    entra: FakeEntra, session: requests.Session
) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)
    app = make_app(entra, session, SECRET)

    first = app.acquire_token_for_client(EXCHANGE_SCOPE)
    second = app.acquire_token_for_client(EXCHANGE_SCOPE)

    assert second["token_source"] == "cache"
    assert second["access_token"] == first["access_token"]
    assert len(entra.token_requests) == 1


def test_already_expired_tokens_are_not_reused(entra: FakeEntra, session: requests.Session) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)
    entra.token_lifetime = -600
    app = make_app(entra, session, SECRET)

    first = app.acquire_token_for_client(EXCHANGE_SCOPE)
    app.acquire_token_for_client(EXCHANGE_SCOPE)

    assert first["expires_in"] == -600
    assert len(entra.token_requests) == 2
    with pytest.raises(InvalidToken) as caught:
        entra.validate_access_token(first["access_token"])
    assert caught.value.reason == "expired"


def test_refresh_in_is_passed_to_msal(entra: FakeEntra, session: requests.Session) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)
    entra.refresh_in = 1800

    result = make_app(entra, session, SECRET).acquire_token_for_client(EXCHANGE_SCOPE)

    assert "refresh_on" in result


def test_transient_failure_raises_and_msal_throttles_for_5_s(
    entra: FakeEntra, session: requests.Session
) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)
    entra.fail_next(1)
    app = make_app(entra, session, SECRET)

    with pytest.raises(msal.exceptions.MsalServiceError, match="HTTP Error: 503"):
        app.acquire_token_for_client(EXCHANGE_SCOPE)
    with pytest.raises(msal.exceptions.MsalServiceError):
        app.acquire_token_for_client(EXCHANGE_SCOPE)  # replayed from MSAL's cache

    assert [r.result for r in entra.token_requests] == ["AADSTS90033"]


def test_transient_failure_with_retry_after_zero_can_be_retried(
    entra: FakeEntra, session: requests.Session
) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)
    entra.fail_next(1, retry_after=0)
    app = make_app(entra, session, SECRET)

    with pytest.raises(msal.exceptions.MsalServiceError):
        app.acquire_token_for_client(EXCHANGE_SCOPE)
    result = app.acquire_token_for_client(EXCHANGE_SCOPE)

    assert "access_token" in result
    assert [(r.status, r.result) for r in entra.token_requests] == [
        (503, "AADSTS90033"),
        (200, "ok"),
    ]


# ----------------------------------------------------------------- token validation


def _b64url_json(part: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = _b64url_json(payload)
    claims["roles"] = ["SMTP.SendAsApp", "full_access_as_app"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"lifetime": -400}, "expired"),
        ({"audience": "https://graph.microsoft.com"}, "audience"),
        ({"overrides": {"nbf": 4_000_000_000}}, "not_yet_valid"),
        ({"overrides": {"iss": "https://sts.windows.net/another-tenant/"}}, "issuer"),
        ({"overrides": {"tid": "another-tenant"}}, "tenant"),
        ({"overrides": {"exp": None}}, "missing_claim"),
    ],
)
def test_validate_rejects(entra: FakeEntra, kwargs: dict[str, Any], reason: str) -> None:
    token = entra.issue_token_for(CLIENT_ID, **kwargs)

    with pytest.raises(InvalidToken) as caught:
        entra.validate_access_token(token)

    assert caught.value.reason == reason


def test_validate_allows_five_minutes_of_clock_skew(entra: FakeEntra) -> None:
    token = entra.issue_token_for(CLIENT_ID, lifetime=-60)

    assert entra.validate_access_token(token)["appid"] == CLIENT_ID


def test_validate_rejects_tampered_and_foreign_tokens(entra: FakeEntra, pki: TestPKI) -> None:
    with FakeEntra(pki, tenant_id=entra.tenant_id) as other:
        foreign = other.issue_token_for(CLIENT_ID)
    tampered = _tamper(entra.issue_token_for(CLIENT_ID))

    reasons = []
    for token in (tampered, foreign, "not-a-jwt"):
        with pytest.raises(InvalidToken) as caught:
            entra.validate_access_token(token)
        reasons.append(caught.value.reason)

    assert reasons == ["signature", "unknown_key", "malformed"]


def test_validate_accepts_outlook_office_com_audience(
    entra: FakeEntra, session: requests.Session
) -> None:
    entra.register_app(CLIENT_ID, secret=SECRET)

    result = make_app(entra, session, SECRET).acquire_token_for_client(
        ["https://outlook.office.com/.default"]
    )

    assert entra.validate_access_token(result["access_token"])["aud"] == (
        "https://outlook.office.com"
    )


# ----------------------------------------------------------------- discovery, TLS, lifecycle


def test_discovery_documents(entra: FakeEntra, pki: TestPKI) -> None:
    config, config_headers = _get_json(pki, entra.openid_configuration_url)
    keys, _ = _get_json(pki, config["jwks_uri"])

    assert config_headers["Cache-Control"] == "max-age=86400, private"
    assert config["token_endpoint"] == entra.token_endpoint
    assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
    [key] = keys["keys"]
    token_header = _b64url_json(entra.issue_token_for(CLIENT_ID).split(".")[0])
    assert key["kid"] == token_header["kid"]


def _get_json(pki: TestPKI, url: str) -> tuple[dict[str, Any], http.client.HTTPMessage]:
    """GET with the stdlib client and ``pki.client_context()`` (not requests)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    connection = http.client.HTTPSConnection(
        parts.hostname, parts.port, context=pki.client_context(), timeout=5
    )
    try:
        connection.request("GET", parts.path)
        response = connection.getresponse()
        return json.loads(response.read()), response.headers
    finally:
        connection.close()


def test_stop_releases_port_and_threads(pki: TestPKI, session: requests.Session) -> None:
    threads_before = set(threading.enumerate())
    fake = FakeEntra(pki)
    fake.start()
    port = fake.port
    session.get(fake.openid_configuration_url, timeout=5)
    fake.stop()

    assert set(threading.enumerate()) <= threads_before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_pki_files_are_private_and_pem_file_holds_cert_and_key(
    pki: TestPKI, app_cert: ClientCertificate
) -> None:
    for path in (pki.ca_file, pki.server_cert_file, pki.server_key_file, app_cert.pem_file):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    blob = app_cert.pem_file.read_bytes()
    certificate = x509.load_pem_x509_certificate(blob)
    key = serialization.load_pem_private_key(blob, password=None)
    public_key = certificate.public_key()
    assert isinstance(key, rsa.RSAPrivateKey) and isinstance(public_key, rsa.RSAPublicKey)

    assert public_key.public_numbers() == key.public_key().public_numbers()
    assert certificate.issuer == certificate.subject
    assert key.key_size == 2048
