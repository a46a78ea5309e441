"""The daemon: builds the relay from its settings and runs its lifecycle.

One job: composition and lifecycle. Start-up: recover the spool, schedule what is queued, start
metrics, bind every listener, start delivery, log one "ready" line. Shutdown (first SIGTERM or
SIGINT, or the injected trigger): stop accepting, let SMTP sessions and deliveries finish within
the grace period, requeue what is still in flight. A second signal exits at once; the spool is
crash-safe, so nothing acknowledged is lost either way. No argv parsing, no exit codes (cli.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from relay.bounces import Bouncer
from relay.config import Settings, parse_host_port
from relay.delivery import Delivery
from relay.ingress import Ingress, IngressLimits, RelayHandler
from relay.metrics import Metrics, MetricsServer
from relay.osutil import install_stop_handlers, remove_stop_handlers
from relay.pacing import Budget, Pacer
from relay.sender import SenderPolicy
from relay.spool import Spool
from relay.tokens import MsalTokenProvider
from relay.upstream import (
    ExchangeOnlineUpstream,
    MaildirUpstream,
    Upstream,
    client_tls_context,
)

log = logging.getLogger("relay.daemon")

FORCED_EXIT_CODE = 1


@dataclass
class Running:
    """What a started daemon exposes to tests and to the readiness probe."""

    smtp: list[tuple[str, int]] = field(default_factory=list)
    metrics_port: int | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


def build_upstream(settings: Settings, metrics: Metrics) -> Upstream:
    upstream = settings.upstream
    if upstream.kind == "maildir":
        assert upstream.path is not None
        return MaildirUpstream(upstream.path)
    provider = MsalTokenProvider(upstream.oauth)

    async def counted_token() -> str:
        try:
            token = await provider()
        except Exception:
            metrics.token_requests.labels(result="error").inc()
            raise
        metrics.token_requests.labels(result="ok").inc()
        return token

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
    )


async def run(
    settings: Settings,
    *,
    shutdown_trigger: asyncio.Event | None = None,
    running: Running | None = None,
    handle_signals: bool = True,
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
    spool = Spool(settings.spool.path)
    spool.open(lock=True)
    try:
        await _serve(settings, spool, stop, running)
    finally:
        spool.close()
        if handle_signals:
            remove_stop_handlers(loop)


async def _serve(settings: Settings, spool: Spool, stop: asyncio.Event, running: Running) -> None:
    started = time.monotonic()
    metrics = Metrics()
    report = await asyncio.to_thread(spool.recover)
    metrics.requeued_in_flight.inc(len(report.requeued))
    metrics.quarantined.inc(len(report.quarantined))
    if report.requeued or report.quarantined or report.removed_partial:
        log.warning(
            "spool recovered: %d in flight requeued (possible duplicates), %d quarantined in "
            "corrupt/, %d partial files removed",
            len(report.requeued),
            len(report.quarantined),
            report.removed_partial,
        )
    metrics.watch_queue(lambda: {state.value: n for state, n in spool.depth().items()})
    per_minute, per_day = settings.upstream.budget()
    bouncer = Bouncer(
        spool,
        bounce_to=settings.delivery.bounce_to,
        warn_after=settings.delivery.warn_after,
        max_age=settings.delivery.max_age,
        reporting_mta=settings.smtp.hostname,
        from_address=notice_sender(settings),
        enqueue=lambda entry: delivery.enqueue(entry),  # noqa: PLW0108 - bound below
        metrics=metrics,
    )
    delivery = Delivery(
        spool,
        build_upstream(settings, metrics),
        settings.delivery,
        metrics,
        pacer=Pacer(Budget(per_minute, per_day)),
        notices=bouncer,
        connections=settings.upstream.max_connections(),
    )
    queued = await delivery.load_queue()
    smtp = settings.smtp
    limits = IngressLimits(
        smtp.hostname, smtp.networks(), smtp.max_message_size, smtp.max_recipients
    )
    ingress = Ingress(RelayHandler(spool, limits, metrics, delivery.enqueue), limits)

    def readiness() -> tuple[bool, str]:
        if not ingress.listening:
            return False, "not listening"
        if not spool.writable():
            return False, "spool not writable"
        return True, ""

    metrics_server = MetricsServer(metrics, readiness)
    host = ""
    if settings.metrics.listen:
        host, port = parse_host_port(settings.metrics.listen)
        running.metrics_port = await metrics_server.start(host, port)
    try:
        await ingress.start(smtp.listen_addresses())
        delivery.start()
        running.smtp = list(ingress.bound)
        log.info(
            "ready: smtp=%s metrics=%s upstream=%s queued=%d startup=%.2fs",
            ",".join(_join_host_port(h, p) for h, p in ingress.bound),
            _join_host_port(host, running.metrics_port) if running.metrics_port else "off",
            settings.upstream.kind,
            queued,
            time.monotonic() - started,
        )
        running.ready.set()
        await stop.wait()
        grace = settings.server.shutdown_grace
        log.info("stopping: no new connections; draining for up to %.0fs", grace)
        # one deadline for both: sessions finish their transactions while deliveries finish
        await asyncio.gather(ingress.drain(grace), delivery.stop(grace))
    finally:
        ingress.stop_accepting()
        await metrics_server.stop()
    log.info("stopped")


def notice_sender(settings: Settings) -> str:
    """The From: of failure notices: the mailbox, which may always send as itself."""
    if settings.upstream.kind == "exchange-online":
        return settings.upstream.mailbox
    return f"MAILER-DAEMON@{settings.smtp.hostname}"


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
