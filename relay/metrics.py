"""Prometheus metrics and the small HTTP endpoint that serves them.

One job: declare every metric (prefix `relay_`, bounded labels: never an address or a queue id)
and serve GET /metrics, /healthz (the process is up) and /readyz (listening and the spool
writable). Queue depth per state is read from the spool at scrape time, in a worker thread so
a large queue never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from relay import __version__

log = logging.getLogger("relay.metrics")


class _QueueDepth(Collector):
    def __init__(
        self,
        depth: Callable[[], Mapping[str, int]],
        oldest: Callable[[], float | None],
        clock: Callable[[], float],
    ) -> None:
        self._depth = depth
        self._oldest = oldest
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "relay_queue_messages", "Messages in the spool by state", labels=["state"]
        )
        try:
            depth = self._depth()
            oldest = self._oldest()
        except OSError:
            depth, oldest = {}, None
        for state, count in sorted(depth.items()):
            family.add_metric([state], count)
        yield family
        age = GaugeMetricFamily(
            "relay_queue_oldest_age_seconds",
            "Age of the oldest message waiting for delivery (incoming, active, deferred)",
        )
        age.add_metric([], 0.0 if oldest is None else max(0.0, self._clock() - oldest))
        yield age


RECEIVED_RESULTS = (
    "accepted",
    "refused_allowlist",
    "too_big",
    "too_many_recipients",
    "aborted",
    "bare_lf_end",
    "refused_policy",
    "refused_limit",
    "error",
)


class Metrics:
    """All of the relay's metrics, in a registry of their own."""

    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created: noise
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "relay_messages_received", "SMTP transactions by result", ["result"], registry=r
        )
        self.delivered = Counter(
            "relay_messages_delivered", "Messages delivered to every recipient", registry=r
        )
        self.deferred = Counter(
            "relay_messages_deferred", "Delivery attempts that left a message queued", registry=r
        )
        self.failed = Counter(
            "relay_messages_failed", "Messages moved to failed/", ["reason"], registry=r
        )
        self.recipients = Counter(
            "relay_recipients",
            "Recipient outcomes, by the upstream that gave them",
            ["outcome", "upstream"],
            registry=r,
        )
        self.handovers = Counter(
            "relay_handovers",
            "Messages handed to the next upstream of their route (fallback), by reason: the "
            "upstream's pause kind, or size",
            ["upstream", "to", "reason"],
            registry=r,
        )
        self.ambiguous = Counter(
            "relay_delivery_ambiguous",
            "Attempts whose outcome is unknown (connection lost after the data): a resend may "
            "duplicate",
            registry=r,
        )
        self.held = Counter(
            "relay_messages_held",
            "Messages put in hold/ after an ambiguous outcome (on_ambiguous = hold)",
            registry=r,
        )
        self.requeued_in_flight = Counter(
            "relay_recovered_in_flight",
            "Messages found in flight at start-up and queued again (possible duplicates)",
            registry=r,
        )
        self.token_requests = Counter(
            "relay_token_requests", "Access token requests by result", ["result"], registry=r
        )
        self.notices = Counter(
            "relay_notices_queued", "Failure and delay notices queued", ["kind"], registry=r
        )
        self.upstream_paused = Gauge(
            "relay_upstream_paused",
            "1 while the upstream's circuit breaker holds new sessions back",
            ["upstream"],
            registry=r,
        )
        self.upstream_pauses = Counter(
            "relay_upstream_pauses",
            "Times an upstream was paused, by reason (throttled, configuration, unreachable)",
            ["upstream", "reason"],
            registry=r,
        )
        self.attempts = Counter(
            "relay_delivery_attempts",
            "Delivery attempts by upstream and outcome (delivered, deferred, failed, "
            "ambiguous, no_session)",
            ["upstream", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "relay_delivery_latency_seconds",
            "From acceptance to the upstream's 250 for the last recipient",
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400),
            registry=r,
        )
        self.message_size = Histogram(
            "relay_message_size_bytes",
            "Size of accepted messages",
            buckets=(4096, 65536, 262144, 1 << 20, 5 << 20, 10 << 20, 25 << 20, 50 << 20),
            registry=r,
        )
        self.sessions = Gauge(
            "relay_smtp_sessions_open", "SMTP client sessions open now", registry=r
        )
        self.token_expiry = Gauge(
            "relay_token_expiry_seconds",
            "Seconds until the current access token of the upstream expires (0: none)",
            ["upstream"],
            registry=r,
        )
        self.since_delivery = Gauge(
            "relay_seconds_since_last_delivery",
            "Seconds since the upstream last accepted a message (since start if never)",
            ["upstream"],
            registry=r,
        )
        self.quarantined = Counter(
            "relay_spool_quarantined", "Spool entries moved to corrupt/", registry=r
        )
        self.build_info = Gauge(
            "relay_build_info", "Version of the running relay", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        for result in RECEIVED_RESULTS:
            self.received.labels(result=result)
        for result in ("ok", "error"):
            self.token_requests.labels(result=result)

    def watch_queue(
        self,
        depth: Callable[[], Mapping[str, int]],
        oldest: Callable[[], float | None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry.register(_QueueDepth(depth, oldest, clock))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# --- the HTTP endpoint -------------------------------------------------------------------------

_STATUS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class MetricsServer:
    """GET /metrics, /healthz and /readyz over plain HTTP/1.0, on the daemon's event loop."""

    def __init__(self, metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> None:
        self._metrics = metrics
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=10)
            method, path = _request_line(request)
            while (await asyncio.wait_for(reader.readline(), timeout=10)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass
            # off the event loop: the queue depth and the spool probe touch the disk
            status, body, ctype = await asyncio.to_thread(self._respond, method, path)
            head = (
                f"HTTP/1.0 {status} {_STATUS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    def _respond(self, method: str, path: str) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", text
        route = path.split("?", 1)[0]
        if route == "/metrics":
            return 200, self._metrics.render(), "text/plain; version=0.0.4; charset=utf-8"
        if route == "/healthz":
            return 200, b"ok\n", text
        if route == "/readyz":
            ready, reason = self._ready()
            return (
                (200, b"ready\n", text) if ready else (503, f"not ready: {reason}\n".encode(), text)
            )
        return 404, b"not found\n", text


def _request_line(line: bytes) -> tuple[str, str]:
    parts = line.decode("latin-1").split()
    if len(parts) < 2:
        raise ValueError("bad request line")
    return parts[0].upper(), parts[1]
