"""The daemon: builds the relay from its settings and runs its lifecycle.

One job: composition and lifecycle. Start-up: recover the spool, schedule what is queued, start
metrics, bind every listener, start delivery, log one "ready" line and tell systemd READY=1.
SIGHUP: reload the configuration (listeners, TLS, allowlists, users, limits, routes, upstream
credentials and sender policy) without dropping a session or touching the queue; a config that
does not validate is refused and the running one stays. Shutdown (first SIGTERM or SIGINT, or
the injected trigger): STOPPING=1, stop accepting, let SMTP sessions and deliveries finish
within the grace period, requeue what is still in flight. A second signal exits at once; the
spool is crash-safe, so nothing acknowledged is lost either way. No argv parsing, no exit codes
(cli.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.bounces import Bouncer
from relay.config import (
    DEFAULT_UPSTREAM,
    Settings,
    UpstreamSettings,
    parse_host_port,
    parse_network,
    restart_needed,
)
from relay.delivery import Delivery, requeue_active
from relay.errors import ConfigError
from relay.ingress import Ingress, IngressLimits, Listener, RelayHandler
from relay.localauth import LocalUser
from relay.logs import register_secret
from relay.metrics import Metrics, MetricsServer
from relay.model import QueueEntry
from relay.osutil import (
    install_reload_handler,
    install_stop_handlers,
    remove_reload_handler,
    remove_stop_handlers,
    sd_notify,
    watchdog_interval,
)
from relay.pacing import Budget, Pacer
from relay.policy import Routed, RouteRule, choose_route, fallback_upstream, first_open
from relay.sender import SenderPolicy
from relay.servertls import TlsConfigError
from relay.spool import RecoveryReport, Spool, State
from relay.upstream import (
    ExchangeOnlineUpstream,
    MaildirUpstream,
    SmtpUpstream,
    Upstream,
    client_tls_context,
)

if TYPE_CHECKING:  # imported where used: msal and httpx only for the upstreams that need them
    from relay.graph import GraphUpstream
    from relay.tokens import MsalTokenProvider

log = logging.getLogger("relay.daemon")

FORCED_EXIT_CODE = 1


@dataclass
class Running:
    """What a started daemon exposes to tests and to the readiness probe."""

    smtp: list[tuple[str, int]] = field(default_factory=list)
    metrics_port: int | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


def build_upstream(
    name: str, upstream: UpstreamSettings, settings: Settings, metrics: Metrics
) -> Upstream:
    if upstream.kind == "maildir":
        assert upstream.path is not None
        return MaildirUpstream(upstream.path, name=name)
    if upstream.kind == "smtp":
        return smtp_upstream(name, upstream, settings)
    counted_token, provider = token_source(name, upstream, metrics)
    if upstream.kind == "graph":
        return graph_upstream(name, upstream, settings, counted_token, provider)
    return ExchangeOnlineUpstream(
        host=upstream.host,
        port=upstream.port,
        mailbox=upstream.mailbox,
        tokens=counted_token,
        invalidate=provider.invalidate,
        tls_context=client_tls_context(upstream.tls_ca_file),
        timeout=upstream.timeout,
        local_hostname=settings.smtp.hostname,
        policy=SenderPolicy(
            upstream.mailbox, tuple(upstream.send_as), from_header=upstream.from_header
        ),
        name=name,
    )


class Deliveries:
    """One Delivery per upstream, each with its own mailbox, credentials, pacing and circuit
    breaker, so a throttled or broken mailbox never holds up the others."""

    def __init__(self, settings: Settings, spool: Spool, metrics: Metrics) -> None:
        self.by_name: dict[str, Delivery] = {}
        self._spool = spool
        self._senders = {
            name: notice_sender(upstream, settings.smtp.hostname)
            for name, upstream in settings.all_upstreams().items()
        }
        names = set(settings.all_upstreams())
        for name, upstream in settings.all_upstreams().items():
            self.by_name[name] = Delivery(
                spool,
                build_upstream(name, upstream, settings, metrics),
                settings.delivery,
                metrics,
                pacer=Pacer(Budget(*upstream.budget())),
                notices=Bouncer(
                    spool,
                    bounce_to=settings.delivery.bounce_to,
                    warn_after=settings.delivery.warn_after,
                    max_age=settings.delivery.max_age,
                    reporting_mta=settings.smtp.hostname,
                    route=self.notice_route,
                    enqueue=self.enqueue,
                    metrics=metrics,
                ),
                connections=upstream.max_connections(),
                accepts=_accepts(name, names),
                fallbacks=self,
            )

    def reconfigure(self, name: str, upstream: Upstream, sender: str) -> None:
        """A reload changed upstream `name`: new sessions use `upstream`."""
        self._senders[name] = sender
        self.by_name[name].replace_upstream(upstream)

    def notice_route(self, original: str) -> tuple[str, str]:
        """A notice goes out through the upstream of its message, unless that one is paused
        (often the very reason the message failed): then through one that works."""
        own = original if original in self.by_name else DEFAULT_UPSTREAM
        for name in dict.fromkeys([own, DEFAULT_UPSTREAM, *self.by_name]):
            if not self.by_name[name].paused:
                return ("" if name == DEFAULT_UPSTREAM else name), self._senders[name]
        return ("" if own == DEFAULT_UPSTREAM else own), self._senders[own]

    def closed(self, name: str) -> bool:
        """True when upstream `name` is paused for anything but throttling (or unknown)."""
        delivery = self.by_name.get(name)
        return delivery is None or bool(delivery.unready_reason())

    def fallback(self, entry: QueueEntry, current: str, *, for_size: bool) -> str:
        """The upstream of the message's route that takes it over from `current` (the one
        holding it); "" if none. Only one that works is a target for a closed upstream's mail
        (so two broken ones never pass it back and forth); a size refusal may also go to one
        that is paused, to wait there."""
        known = [name for name in entry.route if name in self.by_name]  # a restart removed some?
        return fallback_upstream(
            known, current, entry.refused, self._takes_no_fallbacks, for_size=for_size
        )

    def _takes_no_fallbacks(self, name: str) -> bool:
        return not self.by_name[name].takes_fallbacks

    def open_elsewhere(self, current: str) -> bool:
        return any(d.takes_fallbacks for n, d in self.by_name.items() if n != current)

    def upstream_works(self, name: str) -> None:
        """Upstream `name` works again: the closed ones may hand it what they hold."""
        for other, delivery in self.by_name.items():
            if other != name:
                delivery.request_drain()

    def enqueue(self, entry: QueueEntry) -> None:
        name = entry.upstream or DEFAULT_UPSTREAM
        self.by_name.get(name, self.by_name[DEFAULT_UPSTREAM]).enqueue(entry)

    def unready_reason(self) -> str:
        return next((r for d in self.by_name.values() if (r := d.unready_reason())), "")

    def schedule(self, found: list[tuple[str, State, float, str]]) -> None:
        """Queued messages found at start-up, each to the delivery of its upstream."""
        for queue_id, state, due, upstream in found:
            name = upstream or DEFAULT_UPSTREAM
            delivery = self.by_name.get(name, self.by_name[DEFAULT_UPSTREAM])
            delivery.schedule_found(queue_id, state, due)

    def start(self) -> None:
        for delivery in self.by_name.values():
            delivery.start()

    async def stop(self, grace: float) -> None:
        await asyncio.gather(*(d.stop(grace, requeue=False) for d in self.by_name.values()))
        await requeue_active(self._spool)


def _accepts(name: str, names: set[str]) -> Callable[[str], bool]:
    """Which stored messages a delivery takes: its own; the default one also takes messages
    whose upstream no longer exists in the config (they are never stranded)."""

    def accepts(upstream: str) -> bool:
        wanted = upstream or DEFAULT_UPSTREAM
        return wanted == name or (name == DEFAULT_UPSTREAM and wanted not in names)

    return accepts


def router(settings: Settings, closed: Callable[[str], bool]) -> Callable[[str, str, str], Routed]:
    """The route of a new message, and the first upstream of it that is not `closed`."""
    rules = tuple(
        RouteRule(
            upstreams=tuple(rule.upstream),
            senders=tuple(rule.sender),
            networks=tuple(parse_network(n) for n in rule.client),
            listeners=tuple(rule.listener),
        )
        for rule in settings.route
    )

    def route(sender: str, client: str, listener: str) -> Routed:
        upstreams = choose_route(rules, sender, client, listener)
        return first_open(upstreams, closed), upstreams

    return route


async def run(
    settings: Settings,
    *,
    shutdown_trigger: asyncio.Event | None = None,
    running: Running | None = None,
    handle_signals: bool = True,
    reload_settings: Callable[[], Settings] | None = None,
) -> None:
    """Run the relay until the trigger is set (or a stop signal arrives), then drain."""
    stop = shutdown_trigger or asyncio.Event()
    running = running or Running()
    loop = asyncio.get_running_loop()
    signals_seen: list[str] = []

    def on_signal(name: str) -> None:
        signals_seen.append(name)
        if len(signals_seen) > 1:
            log.warning(
                "second %s: exiting at once; in-flight messages are requeued at start-up", name
            )
            logging.shutdown()
            os._exit(FORCED_EXIT_CODE)
        log.info("%s received: stopping (send it again to exit at once)", name)
        stop.set()

    if handle_signals:
        install_stop_handlers(loop, on_signal)
    spool = Spool(settings.spool.path, group_commit=settings.spool.group_commit)
    spool.open(lock=True)
    log.info(
        "spool %s: %s",
        settings.spool.path,
        "group commit (messages accepted together share syncfs flushes)"
        if spool.shares_flushes
        else "one fsync per file and directory",
    )
    try:
        await _serve(settings, spool, stop, running, reload_settings or (lambda: settings))
    finally:
        spool.close()
        if handle_signals:
            remove_stop_handlers(loop)


class QueueCheck:
    """The start-up check of the queue (`_check_queue`), run beside the serving daemon."""

    def __init__(
        self, spool: Spool, report: RecoveryReport, delivery: Deliveries, metrics: Metrics
    ) -> None:
        self._stop = threading.Event()
        self._task = asyncio.create_task(_check_queue(spool, report, delivery, metrics, self._stop))

    async def stop(self) -> None:
        """Ask a check still running to stop at its next entry, and wait for it."""
        self._stop.set()
        await self._task


async def _check_queue(
    spool: Spool,
    report: RecoveryReport,
    delivery: Deliveries,
    metrics: Metrics,
    stop: threading.Event,
) -> None:
    """After the ready line, while mail is accepted: read every queued entry once, set aside
    what cannot be delivered, and schedule the rest. A large backlog (after an outage) never
    delays accepting mail."""
    started = time.monotonic()
    try:
        await asyncio.to_thread(spool.check_entries, report, stop.is_set)
    except OSError:
        log.exception("could not check the queue; the next rescan schedules what it finds")
        return
    metrics.quarantined.inc(len(report.quarantined))
    if stop.is_set():
        return
    delivery.schedule(report.scheduled)
    log.info(
        "queue: %d messages scheduled, %d set aside in corrupt/ (checked in %.2fs)",
        report.queued,
        len(report.quarantined),
        time.monotonic() - started,
    )
    report.scheduled.clear()


async def _serve(
    settings: Settings,
    spool: Spool,
    stop: asyncio.Event,
    running: Running,
    load: Callable[[], Settings],
) -> None:
    started = time.monotonic()
    metrics = Metrics()
    report = await asyncio.to_thread(spool.recover_start)
    metrics.requeued_in_flight.inc(len(report.requeued))
    metrics.quarantined.inc(len(report.quarantined))
    if report.requeued or report.quarantined or report.removed_partial:
        log.warning(
            "spool recovered: %d in flight requeued (possible duplicates), %d stray files set "
            "aside in corrupt/, %d partial files removed",
            len(report.requeued),
            len(report.quarantined),
            report.removed_partial,
        )
    metrics.watch_queue(
        lambda: {state.value: n for state, n in spool.depth().items()}, spool.oldest_queued
    )
    delivery = Deliveries(settings, spool, metrics)
    smtp = settings.smtp
    limits = IngressLimits.from_settings(smtp)
    handler = RelayHandler(
        spool, limits, metrics, delivery.enqueue, route=router(settings, delivery.closed)
    )
    ingress = Ingress(handler, limits)
    listeners = build_listeners(settings)

    metrics.sessions.set_function(lambda: len(ingress.sessions))

    def readiness() -> tuple[bool, str]:
        if not ingress.listening:
            return False, "not listening"
        if not spool.writable():
            return False, "spool not writable"
        if reason := delivery.unready_reason():
            return False, reason
        return True, ""

    metrics_server = MetricsServer(metrics, readiness)
    host = ""
    if settings.metrics.listen:
        host, port = parse_host_port(settings.metrics.listen)
        running.metrics_port = await metrics_server.start(host, port)
    try:
        reloader = Reloader(settings, load, ingress, delivery, metrics)
        # before the ready line: a SIGHUP's default action would end the process
        install_reload_handler(asyncio.get_running_loop(), reloader.start)
        await ingress.start(listeners)
        delivery.start()
        running.smtp = list(ingress.bound)
        log.info(
            "ready: smtp=%s metrics=%s upstreams=%s startup=%.2fs",
            ",".join(_join_host_port(h, p) for h, p in ingress.bound),
            _join_host_port(host, running.metrics_port) if running.metrics_port else "off",
            ",".join(f"{n}:{u.kind}" for n, u in settings.all_upstreams().items()),
            time.monotonic() - started,
        )
        checking = QueueCheck(spool, report, delivery, metrics)
        watchdog = _start_watchdog()
        reloader.ready = True
        sd_notify("READY=1", "STATUS=ready")
        running.ready.set()
        await stop.wait()
        await checking.stop()  # before deliveries requeue active/ and the lock is released
        sd_notify("STOPPING=1", "STATUS=draining")
        if watchdog is not None:
            watchdog.cancel()
        grace = settings.server.shutdown_grace
        log.info("stopping: no new connections; draining for up to %.0fs", grace)
        # one deadline for both: sessions finish their transactions while deliveries finish
        await asyncio.gather(ingress.drain(grace), delivery.stop(grace))
    finally:
        remove_reload_handler(asyncio.get_running_loop())
        ingress.stop_accepting()
        await metrics_server.stop()
    log.info("stopped")


class Reloader:
    """SIGHUP: read the configuration again and apply what can change while running."""

    def __init__(
        self,
        settings: Settings,
        load: Callable[[], Settings],
        ingress: Ingress,
        deliveries: Deliveries,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self._load = load
        self._ingress = ingress
        self._deliveries = deliveries
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready = False  # set once listening: a reload must not race the start

    def start(self) -> None:
        if not self.ready:
            log.warning("SIGHUP during start-up: ignored (send it again once ready)")
            return
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        async with self._lock:  # a second SIGHUP waits for the first
            sd_notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                await self._reload()
            except Exception:  # never take the daemon down for a reload
                log.exception("reload failed; the running configuration stays")
            finally:
                sd_notify("READY=1", "STATUS=ready")

    async def _reload(self) -> None:
        """Everything that can fail (the file, certificates, upstream objects, new sockets)
        is done before anything running changes; then the new parts are swapped in."""
        log.info("SIGHUP received: reloading the configuration")
        old = self.settings
        try:
            new = await asyncio.to_thread(self._load)
            reloadable(old, new)
            listeners = await asyncio.to_thread(build_listeners, new)
            changed = {
                name: build_upstream(name, upstream, new, self._metrics)
                for name, upstream in new.all_upstreams().items()
                if upstream != old.all_upstreams()[name] or new.smtp.hostname != old.smtp.hostname
            }
            await self._ingress.apply(listeners, IngressLimits.from_settings(new.smtp))
        except (ConfigError, OSError, ValueError) as exc:
            log.error("reload refused, the running configuration stays: %s", _reason(exc))
            return
        for secret in new.secret_values():
            register_secret(secret)
        self._ingress.handler.route = router(new, self._deliveries.closed)
        for name, built in changed.items():
            sender = notice_sender(new.all_upstreams()[name], new.smtp.hostname)
            self._deliveries.reconfigure(name, built, sender)
        logging.getLogger().setLevel(new.log.level.upper())
        self.settings = new
        later = restart_needed(old, new)
        if later:
            log.warning("reloaded; these changes take effect after a restart: %s", ", ".join(later))
        log.info(
            "reloaded: %d listeners, %d upstreams, %d routes",
            len(listeners),
            len(new.all_upstreams()),
            len(new.route),
        )


def _reason(exc: Exception) -> str:
    if isinstance(exc, ConfigError):
        return "; ".join(f"{key}: {reason}" for key, reason in exc.problems)
    return f"{type(exc).__name__}: {exc}"


def reloadable(old: Settings, new: Settings) -> None:
    """Raise ConfigError for a change a reload cannot make."""
    if set(old.all_upstreams()) != set(new.all_upstreams()):
        raise ConfigError(
            [("upstreams", "adding or removing an upstream needs a restart (systemctl restart)")]
        )
    for name, upstream in new.all_upstreams().items():
        if upstream.kind != old.all_upstreams()[name].kind:
            raise ConfigError(
                [(name, "changing an upstream's kind needs a restart (its pacing and limits)")]
            )


def _start_watchdog() -> asyncio.Task[None] | None:
    """WATCHDOG=1 at half of WatchdogSec=, from the event loop itself: a loop that is stuck
    stops the pings, and systemd restarts the service."""
    interval = watchdog_interval()
    if interval is None:
        return None

    async def ping() -> None:
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(ping())


def local_users(settings: Settings) -> dict[str, LocalUser]:
    return {
        user.name: LocalUser(user.name, user.password_hash.get_secret_value(), tuple(user.senders))
        for user in settings.user
    }


def build_listeners(settings: Settings) -> list[Listener]:
    """The listeners with their TLS contexts loaded; an unusable certificate is a
    configuration error (exit 2), found before anything listens."""
    users = local_users(settings)
    listeners = []
    for listener in settings.listeners():
        try:
            listeners.append(Listener.build(listener, users))
        except TlsConfigError as exc:
            raise ConfigError([(f"listener {listener.label}", str(exc))]) from None
    return listeners


def token_source(
    name: str, upstream: UpstreamSettings, metrics: Metrics
) -> tuple[Callable[[], Awaitable[str]], MsalTokenProvider]:
    """Tokens from MSAL for the upstream's app, counted and with their expiry exported."""
    from relay.tokens import MsalTokenProvider  # noqa: PLC0415 - msal: OAuth upstreams only

    provider = MsalTokenProvider(upstream.oauth)
    metrics.token_expiry.labels(upstream=name).set_function(
        lambda: max(0.0, provider.expires_at - time.time())
    )

    async def counted_token() -> str:
        try:
            token = await provider()
        except Exception:
            metrics.token_requests.labels(result="error").inc()
            raise
        metrics.token_requests.labels(result="ok").inc()
        return token

    return counted_token, provider


def graph_upstream(
    name: str,
    upstream: UpstreamSettings,
    settings: Settings,
    tokens: Callable[[], Awaitable[str]],
    provider: MsalTokenProvider,
) -> GraphUpstream:
    from relay.graph import GraphUpstream  # noqa: PLC0415 - httpx: Graph upstreams only

    mailbox = upstream.mailbox
    app = upstream.oauth.client_id
    return GraphUpstream(
        base_url=upstream.graph_base_url,
        mailbox=mailbox,
        tokens=tokens,
        invalidate=provider.invalidate,
        tls_context=client_tls_context(upstream.tls_ca_file),
        timeout=upstream.timeout,
        max_request=upstream.max_request_size,
        policy=SenderPolicy(mailbox, tuple(upstream.send_as), from_header=upstream.from_header),
        name=name,
        hints={
            "token": "Graph refused the token: check that the app has the Mail.Send application "
            "permission with admin consent, and the tenant and scope (graph.microsoft.com)",
            "access": f"Graph denied access to {mailbox}: grant Mail.Send (Application) with "
            f"admin consent, and make sure the app's RBAC scope or application access policy "
            f"covers {mailbox} (New-ManagementRoleAssignment -App {app} -Role "
            '"Application Mail.Send" ...)',
            "mailbox": f"Graph does not know {mailbox}: check [upstream] mailbox",
            "setup": "Graph refused the request itself: check graph_base_url (it ends in "
            "/v1.0) and mailbox (a licensed Exchange Online mailbox)",
        },
    )


def smtp_upstream(name: str, upstream: UpstreamSettings, settings: Settings) -> SmtpUpstream:
    section = "upstream" if name == DEFAULT_UPSTREAM else f"upstreams.{name}"
    policy = (
        SenderPolicy(upstream.mailbox, tuple(upstream.send_as), from_header=upstream.from_header)
        if upstream.mailbox
        else None
    )
    return SmtpUpstream(
        host=upstream.host,
        port=upstream.port,
        tls=upstream.tls,
        auth=upstream.auth,
        username=upstream.username,
        password=upstream.password.get_secret_value() if upstream.password else None,
        tls_context=client_tls_context(upstream.tls_ca_file),
        timeout=upstream.timeout,
        local_hostname=settings.smtp.hostname,
        policy=policy,
        name=name,
        auth_hint=f"the server refused the login: check [{section}] username, password "
        "(or password_file) and auth, and the account at the provider",
    )


def notice_sender(upstream: UpstreamSettings, hostname: str) -> str:
    """The From: of failure notices: the mailbox, which may always send as itself."""
    if upstream.kind != "maildir" and upstream.mailbox:
        return upstream.mailbox
    return f"MAILER-DAEMON@{hostname}"


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
