"""A local HTTPS fake of the Microsoft identity platform (Entra ID) for MSAL.

Job: let the *real* MSAL Python (1.39) run the client-credentials flow against
``https://127.0.0.1:<port>/<tenant>`` and get back access tokens shaped like
the ones Exchange Online receives, so that the relay's token code and the
Exchange fake can be tested without the internet. What it serves:

* ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (tenant discovery),
* ``GET /{tenant}/discovery/v2.0/keys`` (JWKS with ``kid``),
* ``POST /{tenant}/oauth2/v2.0/token`` with ``grant_type=client_credentials``,
  authenticated by ``client_secret`` (form body or HTTP Basic) or by a
  ``private_key_jwt`` client assertion (PS256 + ``x5t#S256`` or RS256 +
  ``x5t``), answering with Entra's error JSON and AADSTS codes
  (see /work/shared/design/exchange-online.md, section 2).

Tokens are v1-format RS256 JWTs (``iss=https://sts.windows.net/{tid}/``,
``appid``, ``appidacr``, ``roles``, ...) signed with a key generated per
instance; :meth:`FakeEntra.validate_access_token` checks them the way
Exchange does (signature, 5 min clock skew, ``aud``, ``iss``, ``tid``).

Limits: one tenant per instance, addressed by its GUID only (no verified
domain names, no ``/common``); no instance discovery endpoint (MSAL must get
``instance_discovery=False``); only the v2 endpoints and the client-credentials
grant; one scope per request; roles are granted for every resource; a request
carrying both a secret and an assertion is judged on the assertion; client
assertions may be reused until they expire (MSAL reuses them for 10 min), so
``jti`` is not checked; AADSTS texts marked [INF] in the facts file are
best-effort. The server speaks HTTP/1.0 (one request per TLS connection).
Nothing secret (secrets, assertions, tokens) is logged or recorded.
"""

from __future__ import annotations

import base64
import datetime
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote_plus, urlsplit

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.https import HttpsFake, TLSServer
from tests.fakes.pki import ClientCertificate, TestPKI, b64url, make_self_signed_certificate

_log = logging.getLogger(__name__)

DEFAULT_TENANT_ID = "3f6c2a1e-8b4d-4e27-9a51-7c0d2e9b4f18"
EXCHANGE_AUDIENCES: tuple[str, ...] = (
    "https://outlook.office365.com",
    "https://outlook.office.com",
)
DEFAULT_RESOURCES: tuple[str, ...] = EXCHANGE_AUDIENCES + ("https://graph.microsoft.com",)
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLOCK_SKEW_SECONDS = 300  # Microsoft.IdentityModel default, also Entra's iat back-dating
ASSERTION_ALGORITHMS = ("RS256", "PS256")
_SP_NAMESPACE = uuid.UUID("0c7b7f0e-0d55-4c8e-a3f4-2a6f5d1b9e60")
_IO_TIMEOUT_SECONDS = 5.0
_MAX_BODY_BYTES = 64 * 1024


class InvalidToken(Exception):
    """An access token that Exchange would refuse; ``reason`` says why.

    Reasons: ``malformed``, ``unknown_key``, ``signature``, ``expired``,
    ``not_yet_valid``, ``audience``, ``issuer``, ``tenant``, ``missing_claim``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TokenRequest:
    """One POST to the token endpoint as the fake saw it (no secrets)."""

    tenant: str
    client_id: str | None
    grant_type: str | None
    scope: str | None
    auth_method: str | None  # "secret", "assertion" or None
    assertion_alg: str | None  # JWS "alg" of the client assertion, if any
    status: int
    result: str  # "ok" or "AADSTS<code>"
    correlation_id: str


class HttpRequest(NamedTuple):
    method: str
    path: str
    status: int


@dataclass(frozen=True)
class _App:
    client_id: str
    object_id: str
    secret: str | None
    secret_expired: bool
    certificates: tuple[ClientCertificate, ...]
    roles: tuple[str, ...]


@dataclass
class _FailurePlan:
    remaining: int
    status: int
    error: str
    code: int
    description: str
    retry_after: int | None


@dataclass(frozen=True)
class _Response:
    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


class _EntraError(Exception):
    """An AADSTS error answer, raised while judging a request."""

    def __init__(
        self,
        status: int,
        error: str,
        code: int,
        text: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"AADSTS{code}")
        self.status = status
        self.error = error
        self.code = code
        self.text = text
        self.headers = dict(headers or {})


# ----------------------------------------------------------------- AADSTS texts


def _tenant_not_found(tenant: str, error: str = "invalid_request") -> _EntraError:
    return _EntraError(
        400,
        error,
        90002,
        (
            f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
            "and are signing into the correct cloud. Check with your subscription administrator, "
            "this may happen if there are no active subscriptions for the tenant."
        ),
    )


def _missing_parameter(name: str) -> _EntraError:
    return _EntraError(
        400,
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{name}'.",
    )


def _app_not_found(client_id: str, tenant: str) -> _EntraError:
    return _EntraError(
        400,
        "unauthorized_client",
        700016,
        (
            f"Application with identifier '{client_id}' was not found in the directory "
            f"'{tenant}'. This can happen if the application has not been installed by the "
            "administrator of the tenant or consented to by any user in the tenant. You may "
            "have sent your authentication request to the wrong tenant."
        ),
    )


def _invalid_secret(client_id: str) -> _EntraError:
    return _EntraError(
        401,
        "invalid_client",
        7000215,
        (
            "Invalid client secret provided. Ensure the secret being sent in the request is the "
            "client secret value, not the client secret ID, for a secret added to app "
            f"'{client_id}'."
        ),
    )


def _expired_secret(client_id: str) -> _EntraError:
    return _EntraError(
        401,
        "invalid_client",
        7000222,
        (
            f"The provided client secret keys for app '{client_id}' are expired. Visit the Azure "
            "portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider "
            "using certificate credentials for added security: https://aka.ms/certCreds."
        ),
    )


def _no_credential() -> _EntraError:
    return _EntraError(
        401,
        "invalid_client",
        7000218,
        (
            "The request body must contain the following parameter: 'client_assertion' or "
            "'client_secret'."
        ),
    )


def _bad_assertion(reason: str, thumbprint: str = "") -> _EntraError:
    used = f", Thumbprint of key used by client: '{thumbprint}'" if thumbprint else ""
    return _EntraError(
        401,
        "invalid_client",
        700027,
        f"Client assertion contains an invalid signature. [Reason - {reason}{used}]",
    )


def _assertion_time_range(claims: Mapping[str, Any]) -> _EntraError:
    now = datetime.datetime.now(datetime.UTC).strftime("%m/%d/%Y %H:%M:%S")
    return _EntraError(
        401,
        "invalid_client",
        700024,
        (
            f"Client assertion is not within its valid time range. Current time: {now}, "
            f"assertion valid from {claims.get('nbf', claims.get('iat'))}, "
            f"expiry time of assertion {claims.get('exp')}."
        ),
    )


def _invalid_scope_suffix(scope: str) -> _EntraError:
    return _EntraError(
        400,
        "invalid_scope",
        1002012,
        (
            f"The provided value for scope {scope} is not valid. Client credential flows must "
            "have a scope value with /.default suffixed to the resource identifier "
            "(application ID URI)."
        ),
    )


def _invalid_scope_value(scope: str) -> _EntraError:  # [INF wording]
    return _EntraError(
        400,
        "invalid_scope",
        70011,
        (
            f"The provided request must include a 'scope' input parameter. The provided value "
            f"for the input parameter 'scope' is not valid. The scope {scope} is not valid."
        ),
    )


def _resource_not_found(resource: str, tenant: str) -> _EntraError:
    return _EntraError(
        400,
        "invalid_resource",
        500011,
        (
            f"The resource principal named {resource} was not found in the tenant named "
            f"{tenant}. This can happen if the application has not been installed by the "
            "administrator of the tenant or consented to by any user in the tenant. You might "
            "have sent your authentication request to the wrong tenant."
        ),
    )


def _unsupported_grant(grant_type: str) -> _EntraError:  # [INF wording]
    return _EntraError(
        400,
        "unsupported_grant_type",
        70003,
        f"The app requested an unsupported grant type '{grant_type}'.",
    )


# ------------------------------------------------------------------ the fake


class FakeEntra(HttpsFake):
    """Fake Entra ID token service over HTTPS on an ephemeral local port."""

    name = "fake-entra"
    io_timeout = _IO_TIMEOUT_SECONDS

    def __init__(
        self,
        pki: TestPKI,
        *,
        tenant_id: str = DEFAULT_TENANT_ID,
        host: str = "127.0.0.1",
        resources: Sequence[str] = DEFAULT_RESOURCES,
    ) -> None:
        self.pki = pki
        self.tenant_id = tenant_id
        self.host = host
        self.resources = tuple(resources)
        self.token_lifetime: int = 3599  # may be negative: already expired tokens
        self.refresh_in: int | None = None  # sent as `refresh_in` when set
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._signing_cert = make_self_signed_certificate(
            self._signing_key, "accounts.accesscontrol.windows.net"
        )
        self.kid = b64url(self._signing_cert.fingerprint(hashes.SHA1()))
        self._lock = threading.Lock()
        self._apps: dict[str, _App] = {}
        self._failure: _FailurePlan | None = None
        self._token_requests: list[TokenRequest] = []
        self._http_requests: list[HttpRequest] = []

    @property
    def authority_base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def authority(self) -> str:
        return f"{self.authority_base}/{self.tenant_id}"

    @property
    def token_endpoint(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    @property
    def openid_configuration_url(self) -> str:
        return f"{self.authority}/v2.0/.well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return f"{self.authority}/discovery/v2.0/keys"

    @property
    def issuer(self) -> str:
        """The ``iss`` of the (v1) access tokens."""
        return f"https://sts.windows.net/{self.tenant_id}/"

    # -- configuration ------------------------------------------------------

    def register_app(
        self,
        client_id: str,
        *,
        secret: str | None = None,
        certificate: ClientCertificate | None = None,
        certificates: Sequence[ClientCertificate] = (),
        roles: Sequence[str] = ("SMTP.SendAsApp",),
        secret_expired: bool = False,
    ) -> None:
        """Register (or replace) an app with its credentials and granted roles.

        ``certificates`` allows several uploaded certificates (rotation).
        """
        certs = tuple(certificates) + ((certificate,) if certificate is not None else ())
        app = _App(
            client_id=client_id,
            object_id=self.service_principal_id(client_id),
            secret=secret,
            secret_expired=secret_expired,
            certificates=certs,
            roles=tuple(roles),
        )
        with self._lock:
            self._apps[client_id.lower()] = app

    def service_principal_id(self, client_id: str) -> str:
        """The stable service-principal object id (token ``oid``/``sub``) of an app."""
        return str(uuid.uuid5(_SP_NAMESPACE, f"{self.tenant_id}/{client_id.lower()}"))

    def fail_next(
        self,
        n: int,
        status: int = 503,
        *,
        error: str = "temporarily_unavailable",
        code: int = 90033,
        description: str = "A transient error has occurred. Please try again.",
        retry_after: int | None = None,
    ) -> None:
        """Answer the next ``n`` token requests with this error (replaces any plan).

        ``retry_after`` adds a ``Retry-After`` header; without it MSAL replays a
        5xx/429 from its own cache for 5 s, with ``retry_after=0`` it does not.
        """
        with self._lock:
            self._failure = _FailurePlan(n, status, error, code, description, retry_after)

    @property
    def token_requests(self) -> list[TokenRequest]:
        """A snapshot of the token requests seen so far."""
        with self._lock:
            return list(self._token_requests)

    @property
    def http_requests(self) -> list[HttpRequest]:
        """A snapshot of every HTTP request (method, path, status) seen so far."""
        with self._lock:
            return list(self._http_requests)

    # -- tokens -------------------------------------------------------------

    def issue_token_for(
        self,
        client_id: str,
        *,
        roles: Sequence[str] | None = None,
        audience: str = EXCHANGE_AUDIENCES[0],
        lifetime: int | None = None,
        appidacr: str = "1",
        overrides: Mapping[str, Any] | None = None,
    ) -> str:
        """Mint an access token directly, without a token request.

        ``roles`` defaults to the registered app's roles (``SMTP.SendAsApp`` for
        an unregistered app). ``overrides`` replaces claims; a ``None`` value
        removes the claim.
        """
        if roles is None:
            with self._lock:
                app = self._apps.get(client_id.lower())
            roles = app.roles if app is not None else ("SMTP.SendAsApp",)
        return self._mint(
            client_id=client_id,
            roles=roles,
            audience=audience,
            lifetime=self.token_lifetime if lifetime is None else lifetime,
            appidacr=appidacr,
            overrides=overrides or {},
        )

    def validate_access_token(
        self, token: str, *, audiences: Sequence[str] = EXCHANGE_AUDIENCES
    ) -> dict[str, Any]:
        """Return the claims of ``token`` or raise :class:`InvalidToken`.

        Checks what Exchange checks: RS256 signature by this fake's key, ``exp``
        and ``nbf`` with 5 min leeway, ``aud`` in ``audiences``, ``iss`` and
        ``tid`` of this tenant. Roles are left to the caller.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise InvalidToken("malformed", str(exc)) from exc
        if header.get("kid") != self.kid:
            raise InvalidToken("unknown_key", f"kid {header.get('kid')!r}")
        claims = _decode_access_token(
            token, self._signing_key.public_key(), audiences=audiences, issuer=self.issuer
        )
        if claims.get("tid") != self.tenant_id:
            raise InvalidToken("tenant", f"tid {claims.get('tid')!r}")
        return claims

    def jwks(self) -> dict[str, Any]:
        numbers = self._signing_key.public_key().public_numbers()
        der = self._signing_cert.public_bytes(serialization.Encoding.DER)
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "kid": self.kid,
                    "x5t": self.kid,
                    "n": b64url(_int_bytes(numbers.n)),
                    "e": b64url(_int_bytes(numbers.e)),
                    "x5c": [base64.b64encode(der).decode("ascii")],
                    "issuer": f"{self.authority}/v2.0",
                }
            ]
        }

    def openid_configuration(self) -> dict[str, Any]:
        base = self.authority
        return {
            "token_endpoint": self.token_endpoint,
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": self.jwks_uri,
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nonce", "tid", "ver"],
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }

    # -- request handling (called from server threads) -----------------------

    def _serve_http(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> _Response:
        response = self._route(method, path, headers, body)
        with self._lock:
            self._http_requests.append(HttpRequest(method, path, response.status))
        return response

    def _route(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> _Response:
        tenant, _, rest = path.lstrip("/").partition("/")
        correlation_id = headers.get("client-request-id") or str(uuid.uuid4())
        if method == "GET" and rest in (
            "v2.0/.well-known/openid-configuration",
            "discovery/v2.0/keys",
        ):
            return self._discovery_response(tenant, rest, correlation_id)
        if method == "POST" and rest == "oauth2/v2.0/token":
            return self._token_response(tenant, headers, _parse_form(body), correlation_id)
        return _Response(404, {"error": "not_found", "error_description": f"no route {path}"})

    def _discovery_response(self, tenant: str, rest: str, correlation_id: str) -> _Response:
        if not self._known_tenant(tenant):
            return self._error_response(_tenant_not_found(tenant, "invalid_tenant"), correlation_id)
        body = self.jwks() if rest.startswith("discovery") else self.openid_configuration()
        return _Response(200, body, {"Cache-Control": "max-age=86400, private"})

    def _token_response(
        self, tenant: str, headers: Mapping[str, str], form: dict[str, str], correlation_id: str
    ) -> _Response:
        basic = _basic_credentials(headers.get("authorization", ""))
        if basic is not None:
            form.setdefault("client_id", basic[0])
            form.setdefault("client_secret", basic[1])
        try:
            self._take_failure()
            app, method = self._authenticate(tenant, form)
            response = self._success(app, form, method)
            result = "ok"
        except _EntraError as exc:
            response = self._error_response(exc, correlation_id)
            result = f"AADSTS{exc.code}"
        self._record(tenant, form, response.status, result, correlation_id)
        _log.debug(
            "token request tenant=%s client_id=%s -> %s", tenant, form.get("client_id"), result
        )
        return response

    def _take_failure(self) -> None:
        with self._lock:
            plan = self._failure
            if plan is None or plan.remaining <= 0:
                return
            plan.remaining -= 1
        headers = {} if plan.retry_after is None else {"Retry-After": str(plan.retry_after)}
        raise _EntraError(plan.status, plan.error, plan.code, plan.description, headers)

    def _authenticate(self, tenant: str, form: Mapping[str, str]) -> tuple[_App, str]:
        """Check tenant, grant, client and credential; return the app and "1"/"2"."""
        if not self._known_tenant(tenant):
            raise _tenant_not_found(tenant)
        grant_type = _required(form, "grant_type")
        if grant_type != "client_credentials":
            raise _unsupported_grant(grant_type)
        client_id = _required(form, "client_id")
        with self._lock:
            app = self._apps.get(client_id.lower())
        if app is None:
            raise _app_not_found(client_id, self.tenant_id)
        if form.get("client_assertion"):
            self._check_assertion(app, form)
            return app, "2"
        if form.get("client_secret"):
            _check_secret(app, form["client_secret"])
            return app, "1"
        raise _no_credential()

    def _check_assertion(self, app: _App, form: Mapping[str, str]) -> None:
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise _EntraError(
                400,
                "invalid_request",
                90014,
                (
                    "The required field 'client_assertion_type' is missing from the credential. "
                    "Ensure that you have all the necessary parameters for the login request."
                ),
            )
        assertion = form["client_assertion"]
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.DecodeError as exc:
            raise _bad_assertion("The assertion is not a valid JWT.") from exc
        alg = header.get("alg")
        if alg not in ASSERTION_ALGORITHMS:
            raise _bad_assertion(f"The algorithm {alg!r} is not supported.")
        certificate, used = _find_certificate(app.certificates, header)
        if certificate is None:
            raise _bad_assertion("The key was not found.", used)
        if certificate.certificate.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
            raise _bad_assertion("The key used is expired.", used)
        claims = _decode_assertion(assertion, certificate, alg, self._assertion_audiences(), used)
        if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
            raise _bad_assertion("The issuer and subject must be the client_id.", used)

    def _assertion_audiences(self) -> list[str]:
        return [self.token_endpoint, f"{self.authority}/oauth2/token"]

    def _success(self, app: _App, form: Mapping[str, str], appidacr: str) -> _Response:
        resource = self._resource_of(_required(form, "scope"))
        lifetime = self.token_lifetime
        token = self._mint(
            client_id=app.client_id,
            roles=app.roles,
            audience=resource,
            lifetime=lifetime,
            appidacr=appidacr,
            overrides={},
        )
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }
        if self.refresh_in is not None:
            body["refresh_in"] = self.refresh_in
        return _Response(200, body, {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"})

    def _resource_of(self, scope: str) -> str:
        scopes = scope.split()
        if len(scopes) != 1:
            raise _invalid_scope_value(scope)
        if not scopes[0].endswith("/.default"):
            raise _invalid_scope_suffix(scope)
        resource = scopes[0][: -len("/.default")]
        if resource not in self.resources:
            raise _resource_not_found(resource, self.tenant_id)
        return resource

    def _mint(
        self,
        *,
        client_id: str,
        roles: Sequence[str],
        audience: str,
        lifetime: int,
        appidacr: str,
        overrides: Mapping[str, Any],
    ) -> str:
        now = int(time.time())
        object_id = self.service_principal_id(client_id)
        claims: dict[str, Any] = {
            "aud": audience,
            "iss": self.issuer,
            "iat": now - CLOCK_SKEW_SECONDS,
            "nbf": now - CLOCK_SKEW_SECONDS,  # Entra back-dates
            "exp": now + lifetime,
            "aio": b64url(os.urandom(48)),
            "appid": client_id,
            "appidacr": appidacr,
            "idp": self.issuer,
            "idtyp": "app",
            "oid": object_id,
            "rh": f"0.{b64url(os.urandom(32))}.",
            "sub": object_id,
            "tid": self.tenant_id,
            "uti": b64url(os.urandom(16)),
            "ver": "1.0",
        }
        if roles:
            claims["roles"] = list(roles)
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return jwt.encode(
            claims,
            self._signing_key,
            algorithm="RS256",
            headers={"typ": "JWT", "kid": self.kid, "x5t": self.kid},
        )

    def _error_response(self, error: _EntraError, correlation_id: str) -> _Response:
        timestamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        trace_id = str(uuid.uuid4())
        body = {
            "error": error.error,
            "error_description": (
                f"AADSTS{error.code}: {error.text}\r\nTrace ID: {trace_id}"
                f"\r\nCorrelation ID: {correlation_id}"
                f"\r\nTimestamp: {timestamp}"
            ),
            "error_codes": [error.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"{self.authority_base}/error?code={error.code}",
        }
        headers = {
            "Cache-Control": "no-store, no-cache",
            "Pragma": "no-cache",
            "x-ms-request-id": trace_id,
            **error.headers,
        }
        return _Response(error.status, body, headers)

    def _record(
        self, tenant: str, form: Mapping[str, str], status: int, result: str, correlation_id: str
    ) -> None:
        request = TokenRequest(
            tenant=tenant,
            client_id=form.get("client_id"),
            grant_type=form.get("grant_type"),
            scope=form.get("scope"),
            auth_method=_auth_method(form),
            assertion_alg=_assertion_alg(form),
            status=status,
            result=result,
            correlation_id=correlation_id,
        )
        with self._lock:
            self._token_requests.append(request)

    def _known_tenant(self, tenant: str) -> bool:
        return tenant.lower() == self.tenant_id.lower()


# ------------------------------------------------------------------ helpers


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _parse_form(body: bytes) -> dict[str, str]:
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def _basic_credentials(authorization: str) -> tuple[str, str] | None:
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:
        return None
    client_id, sep, secret = decoded.partition(":")
    return (unquote_plus(client_id), unquote_plus(secret)) if sep else None


def _required(form: Mapping[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise _missing_parameter(name)
    return value


def _check_secret(app: _App, secret: str) -> None:
    if app.secret is None or not hmac.compare_digest(app.secret.encode(), secret.encode()):
        raise _invalid_secret(app.client_id)
    if app.secret_expired:
        raise _expired_secret(app.client_id)


def _find_certificate(
    certificates: Sequence[ClientCertificate], header: Mapping[str, Any]
) -> tuple[ClientCertificate | None, str]:
    """The registered certificate named by ``x5t#S256`` or ``x5t``, and its thumbprint."""
    sha256 = str(header.get("x5t#S256", "")).rstrip("=")
    sha1 = str(header.get("x5t", "")).rstrip("=")
    for certificate in certificates:
        if sha256 and sha256 == certificate.thumbprint_sha256_b64url:
            return certificate, certificate.thumbprint_sha256_b64url
        if sha1 and sha1 == b64url(bytes.fromhex(certificate.thumbprint_sha1_hex)):
            return certificate, certificate.thumbprint_sha1_hex
    return None, _thumbprint_hex(sha256 or sha1)


def _thumbprint_hex(value: str) -> str:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex().upper()
    except ValueError:
        return value


def _decode_assertion(
    assertion: str, certificate: ClientCertificate, alg: str, audiences: Sequence[str], used: str
) -> dict[str, Any]:
    key = certificate.certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise _bad_assertion("The key is not an RSA key.", used)
    try:
        return jwt.decode(
            assertion,
            key,
            algorithms=[alg],
            audience=list(audiences),
            leeway=CLOCK_SKEW_SECONDS,
            options={"require": ["exp", "aud", "iss", "sub"]},
        )
    except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError) as exc:
        claims = jwt.decode(assertion, options={"verify_signature": False})
        raise _assertion_time_range(claims) from exc
    except jwt.InvalidSignatureError as exc:
        raise _bad_assertion("The signature could not be verified.", used) from exc
    except jwt.InvalidAudienceError as exc:
        raise _bad_assertion("The audience is not the token endpoint.", used) from exc
    except jwt.InvalidTokenError as exc:
        raise _bad_assertion(f"The assertion is not valid: {exc}.", used) from exc


def _decode_access_token(
    token: str, key: rsa.RSAPublicKey, *, audiences: Sequence[str], issuer: str
) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            key,
            algorithms=["RS256"],
            audience=list(audiences),
            issuer=issuer,
            leeway=CLOCK_SKEW_SECONDS,
            options={"require": ["exp", "nbf", "iat", "aud", "iss"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise InvalidToken("expired", str(exc)) from exc
    except jwt.ImmatureSignatureError as exc:
        raise InvalidToken("not_yet_valid", str(exc)) from exc
    except jwt.InvalidAudienceError as exc:
        raise InvalidToken("audience", str(exc)) from exc
    except jwt.InvalidIssuerError as exc:
        raise InvalidToken("issuer", str(exc)) from exc
    except jwt.InvalidSignatureError as exc:
        raise InvalidToken("signature", str(exc)) from exc
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidToken("missing_claim", str(exc)) from exc
    except jwt.InvalidTokenError as exc:
        raise InvalidToken("malformed", str(exc)) from exc


def _auth_method(form: Mapping[str, str]) -> str | None:
    if form.get("client_assertion"):
        return "assertion"
    return "secret" if form.get("client_secret") else None


def _assertion_alg(form: Mapping[str, str]) -> str | None:
    if not form.get("client_assertion"):
        return None
    try:
        return str(jwt.get_unverified_header(form["client_assertion"]).get("alg"))
    except jwt.DecodeError:
        return None


# ------------------------------------------------------------------ HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    server: TLSServer
    server_version = "FakeEntra/1.0"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._dispatch(b"")

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY_BYTES:
            self._send(_Response(413, {"error": "request_too_large"}))
            return
        self._dispatch(self.rfile.read(length))

    def _dispatch(self, body: bytes) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        path = urlsplit(self.path).path
        self._send(self.server.owner._serve_http(self.command, path, headers, body))

    def _send(self, response: _Response) -> None:
        payload = json.dumps(response.body).encode("utf-8")
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        _log.debug("%s " + format, self.address_string(), *args)


FakeEntra.handler = _Handler
