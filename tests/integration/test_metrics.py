"""/metrics: what the daemon did, counted, in Prometheus' text format (parsed here with
prometheus_client's own parser)."""

from __future__ import annotations

import smtplib
import ssl

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gehirn_ts.store.db import MailStore
from tests.dnstest import dns_server
from tests.harness import Daemon, Receiver
from tests.sink import Sink
from tests.support import free_port, inline, until


class MetricsTests(TestCase):
    timeout = 60

    async def _metrics(self, d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = await d.http.get(d.base + "/metrics")
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        text = (await response.content()).decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    @inline
    async def test_mail_events_and_smtp_are_counted(self) -> None:
        zone = dns_server()
        port = free_port()
        sink = Sink("127.0.0.2", port=port)
        self.addCleanup(sink.stop)
        zone.mx("m-dest.test", "127.0.0.2")
        submission = free_port()
        d = await Daemon(
            self,
            dns=zone.config(),
            outbound={"port": port},
            smtp={"submission": f"tcp:{submission}:interface=127.0.0.1"},
        ).start()
        token = await d.account("acme")
        mail = MailStore(d.store)
        await mail.add_domain("m-src.test", "acme")
        password = await mail.create_credential("acme", "app")
        receiver = Receiver()
        await d.subscribe(token, "notice.#", receiver.listen(self))
        status, _ = await d.call(
            "POST", "/v1/events", {"type": "notice.fault", "source": "/x"}, token=token
        )
        assert status == 202
        status, _ = await d.call(
            "POST",
            "/v1/messages",
            {"from": "a@m-src.test", "to": ["b@m-dest.test", "c@m-dest.test"], "text": "x"},
            token=token,
        )
        assert status == 202

        def smtp_session() -> None:
            with smtplib.SMTP("127.0.0.1", submission, timeout=10) as s:
                s.starttls(context=ssl._create_unverified_context())
                try:
                    s.login("app", "wrong")
                except smtplib.SMTPAuthenticationError:
                    pass
                s.login("app", password)
                s.sendmail("a@m-src.test", ["someone@m-src.test"], b"Subject: x\r\n\r\nhi\r\n")

        await deferToThread(smtp_session)
        await until(lambda: receiver.hits and len(sink.captured()) == 1)

        async def settled() -> object:
            m = await self._metrics(d)
            # The queue gauges are read from the store when they are scraped.
            done = m.get(("gehirn_mail_sent_total", ())) == 2
            return m if done and m.get(("gehirn_queue_recipients", ())) == 0 else None

        m = await until(settled)
        assert m[("gehirn_events_published_total", ())] >= 1
        assert (
            m[("gehirn_event_deliveries_total", (("kind", "webhook"), ("outcome", "delivered")))]
            == 1
        )
        assert m[("gehirn_event_delivery_seconds_count", (("kind", "webhook"),))] == 1
        assert m[("gehirn_mail_delivery_seconds_count", ())] == 2
        assert m[("gehirn_mail_received_total", (("listener", "submission"),))] == 1
        assert m[("gehirn_smtp_sessions_total", (("listener", "submission"),))] == 1
        assert m[("gehirn_smtp_tls_sessions_total", (("listener", "submission"),))] == 1
        # smtplib tries each offered mechanism (PLAIN, then LOGIN) with the wrong password.
        assert m[("gehirn_smtp_auth_failures_total", (("listener", "submission"),))] == 2
        assert m[("gehirn_mail_bounced_total", ())] == 0
        # A message to an MX that does not answer stays queued: the gauges show it.
        zone.mx("m-down.test", "127.0.0.9")
        status, _ = await d.call(
            "POST",
            "/v1/messages",
            {"from": "a@m-src.test", "to": "x@m-down.test", "text": "x"},
            token=token,
        )
        assert status == 202

        async def waiting() -> object:
            m = await self._metrics(d)
            queued = m.get(("gehirn_queue_recipients", ())) == 1
            return m if queued and m[("gehirn_mail_deferred_total", ())] == 1 else None

        m = await until(waiting)
        assert m[("gehirn_queue_oldest_seconds", ())] > 0
