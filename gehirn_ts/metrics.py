"""Prometheus metrics (prometheus_client), on the HTTP API at ``/metrics``.

One registry per daemon (not the library's global one), so tests build as many as
they like. Labels stay few and bounded: the listener, the destination kind, the
outcome; never an event type, an address or an account, which users choose.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        # Gauges that take a store read are set when they are scraped, by these.
        self.refreshers: list[Callable[[], Awaitable[None]]] = []
        r = self.registry = CollectorRegistry()
        self.mail_received = Counter(
            "gehirn_mail_received", "Messages accepted (250 after DATA).", ["listener"], registry=r
        )
        self.mail_sent = Counter(
            "gehirn_mail_sent", "Recipients delivered to the next hop.", registry=r
        )
        self.mail_deferred = Counter(
            "gehirn_mail_deferred", "Delivery attempts deferred, per recipient.", registry=r
        )
        self.mail_bounced = Counter(
            "gehirn_mail_bounced", "Recipients failed for good.", registry=r
        )
        self.queue_recipients = Gauge(
            "gehirn_queue_recipients", "Recipients waiting in the outbound queue.", registry=r
        )
        self.queue_oldest = Gauge(
            "gehirn_queue_oldest_seconds",
            "Age of the oldest message still queued (0 when empty).",
            registry=r,
        )
        self.spool_messages = Gauge(
            "gehirn_spool_messages",
            "Received messages in the spool, not yet processed.",
            registry=r,
        )
        self.mail_latency = Histogram(
            "gehirn_mail_delivery_seconds",
            "From queueing to delivery, per recipient.",
            buckets=(1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400),
            registry=r,
        )
        self.events_published = Counter(
            "gehirn_events_published", "Events accepted on the bus.", registry=r
        )
        self.deliveries = Counter(
            "gehirn_event_deliveries",
            "Event delivery attempts by destination kind and outcome (delivered, retry, dead).",
            ["kind", "outcome"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "gehirn_event_delivery_seconds",
            "From an event's time to its delivery, by destination kind.",
            ["kind"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200),
            registry=r,
        )
        self.smtp_sessions = Counter(
            "gehirn_smtp_sessions", "SMTP sessions opened.", ["listener"], registry=r
        )
        self.smtp_tls_sessions = Counter(
            "gehirn_smtp_tls_sessions",
            "SMTP sessions that turned TLS on (STARTTLS or implicit); divided by "
            "gehirn_smtp_sessions, the TLS share.",
            ["listener"],
            registry=r,
        )
        self.smtp_auth_failures = Counter(
            "gehirn_smtp_auth_failures", "Failed SMTP AUTH attempts.", ["listener"], registry=r
        )

    async def refresh(self) -> None:
        for refresh in self.refreshers:
            await refresh()

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
