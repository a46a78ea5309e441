"""Access tokens for Exchange Online from MSAL's client-credentials flow.

One job: `await provider()` returns a bearer token for the configured app, from MSAL's own
cache when it is still good (MSAL renews five minutes before expiry), so there is no token per
message. MSAL is synchronous and its constructor does network I/O: both run in a worker thread,
one request in flight at a time. Every failure becomes TokenError carrying the AADSTS code.
Tokens, secrets and private keys never reach a log or a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

import msal
import requests
from requests.adapters import HTTPAdapter

from relay.config import OAuthSettings
from relay.errors import TokenError

if TYPE_CHECKING:
    from requests.sessions import _Settings

log = logging.getLogger("relay.tokens")

T = TypeVar("T")


class _PinnedCASession(requests.Session):
    """A requests session that trusts exactly `ca_file`, whatever REQUESTS_CA_BUNDLE says.

    requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's `verify`; a configured
    CA bundle must win. Proxy variables are still honoured.
    """

    def __init__(self, ca_file: str) -> None:
        super().__init__()
        self._ca_file = ca_file
        self.verify = ca_file

    def merge_environment_settings(
        self,
        url: str | bytes | None,
        proxies: MutableMapping[str, str] | None,
        stream: bool | None,
        verify: bool | str | None,
        cert: str | tuple[str, str] | None,
    ) -> _Settings:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings["verify"] = self._ca_file
        return settings


def _http_session(oauth: OAuthSettings) -> requests.Session:
    session = (
        _PinnedCASession(str(oauth.ca_file)) if oauth.ca_file is not None else requests.Session()
    )
    adapter = HTTPAdapter(max_retries=1)
    session.mount("https://", adapter)
    session.request = functools.partial(session.request, timeout=oauth.timeout)  # type: ignore[method-assign]
    return session


def _credential(oauth: OAuthSettings) -> str | dict[str, str]:
    if oauth.certificate_file is not None:
        pem = oauth.certificate_file.read_text(encoding="ascii")
        return {
            "private_key": _pem_blocks(pem, "PRIVATE KEY"),
            "public_certificate": _pem_blocks(pem, "CERTIFICATE"),
        }
    if oauth.client_secret is None:
        raise TokenError("no_credential", description="no client secret or certificate configured")
    return oauth.client_secret.get_secret_value()


def _pem_blocks(pem: str, kind: str) -> str:
    """The PEM blocks of one kind ('CERTIFICATE' or 'PRIVATE KEY', any key algorithm)."""
    blocks, current = [], []
    for line in pem.splitlines():
        if line.startswith("-----BEGIN") and kind in line:
            current = [line]
        elif current:
            current.append(line)
            if line.startswith("-----END"):
                blocks.append("\n".join(current))
                current = []
    return "\n".join(blocks) + "\n"


def token_error_from_result(result: dict[str, Any]) -> TokenError:
    """MSAL's error dict -> TokenError; the AADSTS code comes from `error_codes`."""
    codes = result.get("error_codes") or []
    aadsts = int(codes[0]) if codes and str(codes[0]).isdigit() else None
    description = str(result.get("error_description", "")).split("\r\n", 1)[0]
    return TokenError(
        str(result.get("error", "unknown_error")), aadsts=aadsts, description=description
    )


def in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run blocking `fn` in a daemon thread and return a future for its result.

    Unlike asyncio.to_thread, a request hanging in MSAL can never hold up the process exit;
    and callers that give up do not cancel the one request every caller shares.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    future.add_done_callback(_retrieve)

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="msal", daemon=True).start()
    return future


def _retrieve(future: asyncio.Future[T]) -> None:
    """Mark an exception as seen even when every caller gave up waiting for it."""
    if not future.cancelled():
        future.exception()


class MsalTokenProvider:
    """`await provider()` -> access token. Shareable by all upstream sessions of one app."""

    def __init__(self, oauth: OAuthSettings) -> None:
        self._oauth = oauth
        self._scopes = [oauth.scope]
        self._app: msal.ConfidentialClientApplication | None = None
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Future[str] | None = None
        self.expires_at: float = 0.0
        self.acquisitions: dict[str, int] = {"ok": 0, "error": 0}

    def __repr__(self) -> str:
        oauth = self._oauth
        return f"MsalTokenProvider(client_id={oauth.client_id!r}, tenant={oauth.tenant_id!r})"

    async def __call__(self) -> str:
        async with self._lock:  # held only to start or join the request in flight
            if self._inflight is None or self._inflight.done():
                self._inflight = in_daemon_thread(self._acquire)
            inflight = self._inflight
        return await asyncio.shield(inflight)

    async def invalidate(self) -> None:
        """Drop cached access tokens so the next call asks Entra again (after a 535)."""
        async with self._lock:
            if self._inflight is not None and not self._inflight.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._inflight)
            await in_daemon_thread(self._drop_cached_tokens)

    # --- worker-thread side --------------------------------------------------------------------

    def _build_app(self) -> msal.ConfidentialClientApplication:
        oauth = self._oauth
        try:
            return msal.ConfidentialClientApplication(
                oauth.client_id,
                client_credential=_credential(oauth),
                authority=f"{oauth.authority}/{oauth.tenant_id}",
                http_client=_http_session(oauth),
                instance_discovery=_is_microsoft_host(oauth.authority),
            )
        except TokenError:
            raise
        except ValueError as exc:
            # MSAL wraps Entra's answer to the discovery request; the code is in the cause
            answer = str(exc.__context__ or "")
            raise TokenError(
                "invalid_authority",
                aadsts=_first_error_code(answer),
                http_status=_http_status(answer),
                description=str(exc).split("\n", 1)[0],
            ) from None
        except (requests.RequestException, msal.exceptions.MsalError, OSError) as exc:
            raise TokenError("authority_unreachable", description=type(exc).__name__) from None

    def _acquire(self) -> str:
        if self._app is None:
            self._app = self._build_app()
        try:
            result = self._app.acquire_token_for_client(scopes=self._scopes)
        except msal.exceptions.MsalServiceError as exc:  # MSAL raises on HTTP 5xx
            self.acquisitions["error"] += 1
            status = _http_status(str(exc))
            raise TokenError(
                "http_error", http_status=status, description=f"HTTP {status}"
            ) from None
        except (requests.RequestException, msal.exceptions.MsalError, ValueError, OSError) as exc:
            self.acquisitions["error"] += 1
            raise TokenError("token_endpoint_unreachable", description=type(exc).__name__) from None
        if "access_token" not in result:
            self.acquisitions["error"] += 1
            error = token_error_from_result(result)
            log.warning("token request refused: %s (AADSTS%s)", error.error, error.aadsts)
            raise error
        self.acquisitions["ok"] += 1
        if result.get("token_source") == "identity_provider":
            log.info("new access token obtained, valid for %ss", result.get("expires_in"))
        self.expires_at = time.time() + float(result.get("expires_in", 0))
        return str(result["access_token"])

    def _drop_cached_tokens(self) -> None:
        if self._app is None:
            return
        cache = self._app.token_cache
        for item in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
            cache.remove_at(item)
        self.expires_at = 0.0


def _first_error_code(text: str) -> int | None:
    match = re.search(r'"error_codes"\s*:\s*\[\s*(\d+)', text)
    return int(match.group(1)) if match else None


def _http_status(text: str) -> int | None:
    match = re.search(r"\b(?:HTTP Error:?|status(?: code)?:?)\s*(\d{3})\b", text, re.IGNORECASE)
    return int(match.group(1)) if match else None


def _is_microsoft_host(authority: str) -> bool:
    """Instance discovery only makes sense for Microsoft's own clouds."""
    host = authority.removeprefix("https://").split("/", 1)[0].lower()
    return host.endswith((".microsoftonline.com", ".microsoftonline.us", ".chinacloudapi.cn"))
