"""`oauth-relay doctor`: check the set-up step by step and stop at the first broken step.

One job: walk what a delivery needs, in the order it needs it, and say for the first step that
fails what to fix in plain words. For the relay: config valid, spool writable. For each
Exchange Online upstream: DNS, TCP, the TLS handshake and certificate, an access token (AADSTS
codes mapped to fixes), the token's claims, `AUTH XOAUTH2`, then `MAIL FROM` for the mailbox and
each send-as address, reset before any message is sent. With `--send-to`, a real test message
through the running relay's queue. The conclusions come from diagnosis.py (pure); this module
is the I/O around them. Nothing secret is printed: the token is decoded only for its claims.

Limits: Exchange Online checks Send As again after the body (554 5.2.252); a MAIL FROM that
passes proves the right only on tenants that check it there (550 5.7.60). `--send-to` is the
proof, and it needs the relay running (it goes through the relay's own listener and queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NoReturn

import aiosmtplib
import httpx

from relay import diagnosis, sendtest
from relay.config import Settings, UpstreamSettings, format_duration
from relay.diagnosis import Ids
from relay.errors import RelayError, TokenError
from relay.osutil import make_private_dir, owner_name, unlink_quietly, write_private_file
from relay.policy import Stage, aadsts_hint, classify_reply
from relay.replies import SmtpReply
from relay.servertls import TlsConfigError, certificate_expiry, server_context
from relay.tokens import MsalTokenProvider
from relay.upstream import client_tls_context, smtp_client, smtp_login

LOW_DISK_BYTES = 512 * 1024 * 1024
CERT_WARN_DAYS = 21
SEND_AS_CAVEAT = "Exchange checks Send As again after the body: --send-to proves it"


@dataclass(frozen=True)
class Step:
    scope: str  # "relay", or the upstream's name
    name: str
    status: str  # "ok", "warn" or "FAIL"
    detail: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return asdict(self)


class _Stop(Exception):
    """The current chain of checks failed at a step; the report says which."""


class Checks:
    """The steps so far, in order; `scope` names what they are about. `fail` records the
    step and stops the run."""

    def __init__(self, scope: str, emit: Callable[[Step], None]) -> None:
        self.scope = scope
        self.steps: list[Step] = []
        self._emit = emit

    def _add(self, step: Step) -> None:
        self.steps.append(step)
        self._emit(step)

    def ok(self, name: str, detail: str) -> None:
        self._add(Step(self.scope, name, "ok", detail))

    def warn(self, name: str, detail: str, fix: str) -> None:
        self._add(Step(self.scope, name, "warn", detail, fix))

    def fail(self, name: str, detail: str, fix: str) -> NoReturn:
        self._add(Step(self.scope, name, "FAIL", detail, fix))
        raise _Stop(name)


@dataclass(frozen=True)
class Options:
    timeout: float = 20.0
    upstream: str | None = None  # only this one
    send_to: str | None = None
    sender: str | None = None
    wait: float = 120.0


def run(
    settings: Settings, source: str, options: Options, emit: Callable[[Step], None]
) -> list[Step]:
    """Every check for the loaded settings, in order, up to the first that fails."""
    checks = Checks("relay", emit)
    upstreams = settings.all_upstreams()
    if options.upstream is not None:
        upstreams = {options.upstream: upstreams[options.upstream]}
    with contextlib.suppress(_Stop):
        checks.ok("config", f"{source} is valid: {_config_summary(settings)}")
        _spool(checks, settings)
        _listener_certificates(checks, settings)
        for name, upstream in upstreams.items():
            checks.scope = name
            asyncio.run(_UpstreamProbe(checks, upstream, settings, options.timeout).run())
        if options.send_to:
            checks.scope = "relay"
            _send_test(checks, settings, options)
    return checks.steps


# --- the relay itself ------------------------------------------------------------------------


def config_failed(source: str, problems: list[tuple[str, str]]) -> Step:
    """The first step, when the configuration does not load."""
    listed = "; ".join(f"{path}: {reason}" for path, reason in problems)
    return Step(
        "relay",
        "config",
        "FAIL",
        f"{source} is invalid: {listed}",
        "correct these fields (oauth-relay check-config lists them with the whole config)",
    )


def _config_summary(settings: Settings) -> str:
    listeners = ", ".join(settings.smtp.listen)
    upstreams = ", ".join(
        f"{name} ({u.kind}{': ' + u.mailbox if u.mailbox else ''})"
        for name, u in settings.all_upstreams().items()
    )
    return f"listening on {listeners}; upstreams {upstreams}"


def _spool(checks: Checks, settings: Settings) -> None:
    root = settings.spool.path.absolute()
    existing = next(p for p in (root, *root.parents) if p.exists())
    probe = existing / f".doctor-{uuid.uuid4().hex}"
    try:
        write_private_file(probe, b"oauth-relay doctor\n")
    except OSError as exc:
        checks.fail(
            "spool",
            f"cannot write in {existing}: {exc.strerror or exc}",
            "create the spool directory and give it to the user the relay runs as "
            "(StateDirectory= in the systemd unit does both), or change [spool] path",
        )
    unlink_quietly(probe)
    free = shutil.disk_usage(existing).free
    where = str(root) if existing == root else f"{root} (created at start, in {existing})"
    owner = owner_name(existing)
    detail = f"{where} is writable{' (owner ' + owner + ')' if owner else ''}"
    detail += f", {free / 2**30:.1f} GiB free"
    if free < LOW_DISK_BYTES:
        checks.warn("spool", detail, "free some space: the relay refuses mail (4xx) when full")
    else:
        checks.ok("spool", detail)


def _listener_certificates(checks: Checks, settings: Settings) -> None:
    """Each TLS listener's certificate loads, matches its key, and is not about to expire."""
    for listener in settings.listeners():
        if listener.tls == "none":
            continue
        try:
            server_context(listener)
        except TlsConfigError as exc:
            checks.fail(
                "tls-cert",
                f"listener {listener.label}: {exc}",
                "point tls_cert_file and tls_key_file at a PEM chain and its key; the relay "
                "will not start without them",
            )
        assert listener.tls_cert_file is not None
        expires = certificate_expiry(listener.tls_cert_file)
        days = (expires - time.time()) / 86400 if expires is not None else None
        detail = f"listener {listener.label}: {listener.tls_cert_file} loads" + (
            f", expires in {days:.0f} days" if days is not None else ""
        )
        if days is not None and days < 0:
            checks.fail(
                "tls-cert", detail, "renew the certificate, then: systemctl kill -s HUP oauth-relay"
            )
        elif days is not None and days < CERT_WARN_DAYS:
            checks.warn(
                "tls-cert", detail, "renew it soon, then: systemctl kill -s HUP oauth-relay"
            )
        else:
            checks.ok("tls-cert", detail)


# --- one upstream ----------------------------------------------------------------------------


@dataclass
class _UpstreamProbe:
    """The checks of one upstream, in delivery order; `seconds` bounds each network step."""

    checks: Checks
    upstream: UpstreamSettings
    settings: Settings
    seconds: float
    host_port: tuple[str, int] | None = None

    async def run(self) -> None:
        if self.upstream.kind == "maildir":
            await asyncio.to_thread(self.maildir)
            return
        if self.upstream.kind == "graph":
            await self.graph()
            return
        addresses = await self.dns()
        await self.tcp(addresses)
        if self.upstream.kind == "smtp":
            await self.smtp_server()
            return
        await self.tls()
        token, local_expiry = await self.token()
        claims = self.claims(token, local_expiry)
        ids = Ids(
            self.upstream.mailbox,
            self.upstream.oauth.client_id,
            str(claims.get("oid") or "<service principal object id>"),
        )
        role_missing = diagnosis.SEND_AS_ROLE not in diagnosis.roles_of(claims)
        await self.auth_and_senders(token, ids, role_missing=role_missing)

    def maildir(self) -> None:
        path = self.upstream.path
        assert path is not None
        probe = path / "tmp" / f".doctor-{uuid.uuid4().hex}"
        try:
            for sub in ("tmp", "new", "cur"):
                make_private_dir(path / sub)
            write_private_file(probe, b"oauth-relay doctor\n")
        except OSError as exc:
            self.checks.fail(
                "maildir",
                f"cannot write in {path}: {exc.strerror or exc}",
                "give the folder to the user the relay runs as, or change [upstream] path",
            )
        unlink_quietly(probe)
        self.checks.ok("maildir", f"{path} is writable (sandbox: mail stays on this machine)")

    @property
    def target(self) -> tuple[str, int]:
        """Where DNS and TCP are checked: the SMTP host, or the Graph endpoint's host."""
        return self.host_port or (self.upstream.host, self.upstream.port)

    async def dns(self) -> list[str]:
        host, port = self.target
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.seconds):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            self.checks.fail(
                "dns",
                f"{host} does not resolve: {_text(exc)}",
                "check [upstream] host and this machine's DNS resolver (/etc/resolv.conf)",
            )
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        more = f" (and {len(addresses) - 1} more)" if len(addresses) > 1 else ""
        self.checks.ok("dns", f"{host} is {addresses[0]}{more}")
        return addresses

    async def tcp(self, addresses: list[str]) -> None:
        host, port = self.target
        errors = []
        for address in addresses[:4]:
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.seconds):
                    _, writer = await asyncio.open_connection(address, port)
            except (OSError, TimeoutError) as exc:
                errors.append(f"{address}: {_text(exc)}")
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            elapsed = (time.monotonic() - started) * 1000
            self.checks.ok("tcp", f"connected to {address} port {port} in {elapsed:.0f} ms")
            return
        self.checks.fail(
            "tcp",
            "; ".join(errors),
            f"allow outbound TCP port {port} to {host} in the firewall and any "
            "proxy, and check [upstream] port (587 for Exchange Online)",
        )

    def smtp_client(self, *, start_tls: bool) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(
            hostname=self.upstream.host,
            port=self.upstream.port,
            timeout=self.seconds,
            local_hostname=self.settings.smtp.hostname,
            start_tls=start_tls,
            tls_context=client_tls_context(self.upstream.tls_ca_file),
        )

    async def tls(self) -> None:
        host, port = self.upstream.host, self.upstream.port
        wrong_endpoint = "check [upstream] host and port: Exchange Online is smtp.office365.com:587"
        client = self.smtp_client(start_tls=False)
        try:
            await client.connect()
            await client.ehlo()
            if not client.supports_extension("starttls"):
                self.checks.fail("tls", f"{host}:{port} does not offer STARTTLS", wrong_endpoint)
            await client.starttls()
            detail = _tls_detail(client)
            await client.ehlo()
            mechanisms = client.server_auth_methods
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError) as exc:
            self.checks.fail("tls", f"TLS with {host} failed: {_text(exc)}", self.tls_fix(exc))
        finally:
            await _quit(client)
        if "xoauth2" not in [m.lower() for m in mechanisms]:
            offered = " ".join(mechanisms) or "none"
            self.checks.fail(
                "tls",
                f"{detail}; but AUTH XOAUTH2 is not offered (only: {offered})",
                wrong_endpoint,
            )
        self.checks.ok("tls", f"{detail}; AUTH XOAUTH2 offered")

    async def graph(self) -> None:
        """kind = "graph": DNS and TCP to the Graph host, a token and its claims (audience
        Graph, role Mail.Send), then GET /users/{mailbox}, which needs the same access as
        sending (nothing is sent)."""
        upstream = self.upstream
        url = httpx.URL(upstream.graph_base_url)
        self.host_port = (url.host, url.port or 443)
        addresses = await self.dns()
        await self.tcp(addresses)
        token, local_expiry = await self.token()
        self.claims(token, local_expiry)
        mailbox = upstream.mailbox
        probe = f"{upstream.graph_base_url.rstrip('/')}/users/{mailbox}"
        try:
            async with httpx.AsyncClient(
                verify=client_tls_context(upstream.tls_ca_file), timeout=self.seconds
            ) as client:
                response = await client.get(probe, headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            self.checks.fail("mailbox", f"GET {probe}: {_text(exc)}", self.tls_fix(exc))
        if response.is_success:
            self.checks.ok("mailbox", f"Graph knows {mailbox} and lets this app use it")
            return
        detail = f"GET /users/{mailbox}: {response.status_code} {response.text[:200]}"
        if response.status_code == 404:
            self.checks.fail(
                "mailbox", detail, f"{mailbox} does not exist: check [upstream] mailbox"
            )
        self.checks.fail(
            "mailbox",
            detail,
            f"the app may not use {mailbox}: grant Mail.Send (Application) with admin consent, "
            "and make sure the app's RBAC scope (New-ManagementRoleAssignment -Role "
            f'"Application Mail.Send") or application access policy covers {mailbox}',
        )

    async def smtp_server(self) -> None:
        """kind = "smtp": the session the relay would open (its TLS mode and login), then
        MAIL FROM for the mailbox and each send-as address when a mailbox is set."""
        upstream = self.upstream
        client = smtp_client(
            upstream.host,
            upstream.port,
            upstream.tls,
            client_tls_context(upstream.tls_ca_file),
            self.seconds,
            self.settings.smtp.hostname,
        )
        try:
            try:
                await client.connect()
            except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TimeoutError) as exc:
                self.checks.fail(
                    "tls", f"{upstream.host}:{upstream.port}: {_text(exc)}", self.tls_fix(exc)
                )
            if upstream.tls == "none":
                self.checks.warn(
                    "tls",
                    f"{upstream.host}:{upstream.port} answers; mail goes in clear text",
                    'use tls = "starttls" if the server offers it',
                )
            else:
                self.checks.ok("tls", _tls_detail(client))
            await self.smtp_login(client)
            if upstream.mailbox:
                await self.senders(client)
        finally:
            await _quit(client)

    async def smtp_login(self, client: aiosmtplib.SMTP) -> None:
        upstream = self.upstream
        if upstream.auth == "none" or upstream.password is None:
            return
        password = upstream.password.get_secret_value()
        try:
            response = await smtp_login(client, upstream.auth, upstream.username, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            self.checks.fail(
                "auth",
                f"AUTH {upstream.auth.upper()} as {upstream.username} refused: "
                f"{SmtpReply.parse(exc.code, exc.message)}",
                "check username and password (or password_file); at a provider, that the "
                "API key may send by SMTP",
            )
        except aiosmtplib.SMTPException as exc:
            self.checks.fail(
                "auth",
                f"AUTH {upstream.auth.upper()} failed: {_text(exc)}",
                f'the server does not offer AUTH {upstream.auth.upper()}: try auth = "plain" '
                'or "login", or TLS first (tls = "starttls")',
            )
        said = f"{response.code} {response.message}" if response is not None else "no login"
        self.checks.ok("auth", f"AUTH {upstream.auth.upper()} as {upstream.username}: {said}")

    def tls_fix(self, exc: BaseException) -> str:
        host, port = self.upstream.host, self.upstream.port
        if isinstance(exc, ssl.SSLError) or "certificate" in str(exc).lower():
            return diagnosis.tls_fix(str(exc), host)
        return (
            f"{host}:{port} did not complete an SMTP greeting and STARTTLS: check [upstream] "
            "host and port, and that nothing in between answers instead"
        )

    async def token(self) -> tuple[str, float]:
        """The token, and when it expires by this machine's clock."""
        oauth = self.upstream.oauth
        provider = MsalTokenProvider(oauth)
        try:
            async with asyncio.timeout(self.seconds):
                token = await provider()
        except TokenError as exc:
            code = f"AADSTS{exc.aadsts}" if exc.aadsts is not None else exc.error
            detail = f"{code}: {exc.description}" if exc.description else code
            self.checks.fail(
                "token", f"Entra ID refused: {detail}", aadsts_hint(exc.aadsts, exc.error)
            )
        except TimeoutError:
            self.checks.fail(
                "token",
                f"no answer from {oauth.authority} in {format_duration(self.seconds)}",
                aadsts_hint(None, "token_timeout"),
            )
        credential = "certificate" if oauth.certificate_file is not None else "client secret"
        minutes = max(0.0, provider.expires_at - time.time()) / 60
        self.checks.ok(
            "token",
            f"obtained with the {credential} for {oauth.scope}, valid for {minutes:.0f} min",
        )
        return token, provider.expires_at

    def claims(self, token: str, local_expiry: float) -> dict[str, object]:
        oauth = self.upstream.oauth
        try:
            claims = diagnosis.decode_claims(token)
        except ValueError as exc:
            self.checks.fail(
                "claims",
                str(exc),
                "check [upstream.oauth] authority: it must be Entra ID (login.microsoftonline.com)",
            )
        summary = diagnosis.describe_claims(claims)
        findings = diagnosis.check_claims(
            claims,
            tenant_id=oauth.tenant_id,
            client_id=oauth.client_id,
            now=time.time(),
            local_expiry=local_expiry,
            graph=self.upstream.kind == "graph",
        )
        for finding in findings:
            if not finding.ok:
                self.checks.fail("claims", f"{finding.detail} ({summary})", finding.fix)
        warnings = [finding for finding in findings if finding.warning]
        if warnings:
            self.checks.warn(
                "claims",
                "; ".join(w.detail for w in warnings) + f" ({summary})",
                "; ".join(w.fix for w in warnings),
            )
        else:
            self.checks.ok("claims", summary)
        return claims

    async def auth_and_senders(self, token: str, ids: Ids, *, role_missing: bool) -> None:
        client = self.smtp_client(start_tls=True)
        try:
            await client.connect()
            await self.auth(client, token, ids, role_missing=role_missing)
            await self.senders(client)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.checks.fail(
                "auth",
                f"the session with {self.upstream.host} failed: {_text(exc)}",
                "run doctor again; if it recurs, check the network path to the upstream",
            )
        finally:
            await _quit(client)

    async def auth(
        self, client: aiosmtplib.SMTP, token: str, ids: Ids, *, role_missing: bool
    ) -> None:
        mailbox = self.upstream.mailbox
        try:
            response = await client.auth_xoauth2(mailbox, token)
        except aiosmtplib.SMTPAuthenticationError as exc:
            reply = SmtpReply.parse(exc.code, exc.message)
            self.checks.fail(
                "auth",
                f"AUTH XOAUTH2 as {mailbox} refused: {reply}",
                diagnosis.auth_fix(reply, ids, role_missing=role_missing),
            )
        self.checks.ok("auth", f"AUTH XOAUTH2 as {mailbox}: {response.code} {response.message}")

    async def senders(self, client: aiosmtplib.SMTP) -> None:
        addresses, domains = sender_addresses(self.upstream)
        for address in addresses:
            utf8 = not address.isascii()
            try:
                await client.mail(
                    address,
                    options=["SMTPUTF8"] if utf8 else [],
                    encoding="utf-8" if utf8 else "ascii",
                )
            except aiosmtplib.SMTPSenderRefused as exc:
                reply = SmtpReply.parse(exc.code, exc.message)
                self.checks.fail(
                    "send-as",
                    f"MAIL FROM:<{address}> refused: {reply}",
                    diagnosis.send_as_fix(reply, address, self.upstream.mailbox),
                )
            await client.rset()
        untested = f"; domains {', '.join(domains)} not tried" if domains else ""
        self.checks.ok(
            "send-as",
            f"MAIL FROM accepted for {', '.join(addresses)}{untested} ({SEND_AS_CAVEAT})",
        )


def _tls_detail(client: aiosmtplib.SMTP) -> str:
    ssl_object = client.get_transport_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return "TLS"
    cert = ssl_object.getpeercert() or {}
    subject = dict(pair[0] for pair in cert.get("subject", ()) if pair)  # type: ignore[misc]
    alt_names = [str(pair[1]) for pair in cert.get("subjectAltName", ())]
    name = subject.get("commonName") or (alt_names[0] if alt_names else "?")
    until = cert.get("notAfter", "?")
    return f"{ssl_object.version()}, certificate {name} verified, valid until {until}"


def sender_addresses(upstream: UpstreamSettings) -> tuple[list[str], list[str]]:
    """(addresses to try in MAIL FROM, domain entries that cannot be tried without one)."""
    addresses = [upstream.mailbox]
    domains = []
    for entry in upstream.send_as:
        if entry.startswith("@") or "@" not in entry:
            domains.append(entry)
        elif entry.lower() not in (a.lower() for a in addresses):
            addresses.append(entry)
    return addresses, domains


async def _quit(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        return
    try:
        async with asyncio.timeout(5):
            await client.quit()
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        client.close()


# --- a real message through the running relay ------------------------------------------------


def _send_test(checks: Checks, settings: Settings, options: Options) -> None:
    assert options.send_to is not None
    if not (settings.spool.path / "lock").is_file():
        checks.fail(
            "send-to",
            f"no relay runs on the spool {settings.spool.path}",
            "start the relay (systemctl start oauth-relay), then run doctor --send-to again "
            "with the same config and environment",
        )
    sender = options.sender or settings.upstream.mailbox or f"postmaster@{settings.smtp.hostname}"
    try:
        queue_id = sendtest.submit(settings, sender, options.send_to, timeout=options.timeout)
    except RelayError as exc:
        checks.fail(
            "send-to",
            str(exc),
            "start the relay, and check that [smtp] listen and allow let this machine in",
        )
    outcome = sendtest.follow(settings, queue_id, options.wait)
    if outcome.delivered:
        checks.ok("send-to", f"{queue_id} from {sender} delivered for {options.send_to}")
        return
    fix = _delivery_fix(outcome, sender, settings)
    checks.fail("send-to", f"{queue_id} {outcome.summary}", fix)


def _delivery_fix(outcome: sendtest.Outcome, sender: str, settings: Settings) -> str:
    reply = _parse_reply(outcome.reply)
    if reply is None:
        return f"see oauth-relay queue show {outcome.queue_id}, and the relay's log"
    if diagnosis.is_send_as_refusal(reply):
        return diagnosis.send_as_fix(reply, sender, settings.upstream.mailbox)
    hint = classify_reply(Stage.EOD, reply).hint
    return hint or f"see oauth-relay queue show {outcome.queue_id}, and the relay's log"


def _parse_reply(text: str) -> SmtpReply | None:
    code, _, rest = text.partition(" ")
    if not (code.isdigit() and 200 <= int(code) <= 599):
        return None
    return SmtpReply.parse(int(code), rest)


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
