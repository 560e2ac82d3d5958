"""Each hosted-API destination end to end through the running daemon (events published
over the API, seen arriving at a local server that checks them as the API documents),
and the e-mail loop stopping at its hop limit."""

from __future__ import annotations

import json
import smtplib
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gehirn_ts.store.db import MailStore
from tests.dnstest import dns_server
from tests.fake_apis import FakePushover, FakeSlack, FakeTwilio, Planned
from tests.harness import Daemon
from tests.support import free_port, inline, sleep, until

USER = "u" * 29 + "1"
TOKEN = "a" * 29 + "2"
SID = "AC" + "fedcba9876543210" * 2


class DestinationTests(TestCase):
    timeout = 60

    @inline
    async def test_slack_pushover_and_sms_through_the_daemon(self) -> None:
        slack, pushover, twilio = FakeSlack(), FakePushover(), FakeTwilio(SID, "tok")
        d = await Daemon(
            self,
            edj={
                "slack_url": slack.listen(self),
                "pushover_url": pushover.listen(self),
                "twilio_url": twilio.listen(self),
            },
        ).start()
        token = await d.account("acme")
        # Bad destination URLs are refused when the subscription is made.
        for url, field in (
            ("slack://T1/B2", "url"),
            ("pushover://short@" + TOKEN, "url"),
            (f"twilio://{SID}:tok@+15550001111/5550002222", "url"),
            ("irc://9bad@irc.example.org/#x", "url"),
        ):
            status, body = await d.call(
                "POST", "/v1/subscriptions", {"pattern": "#", "url": url}, token=token
            )
            assert (status, body["error"]["field"]) == (400, field), (url, body)
        status, body = await d.call(
            "POST",
            "/v1/subscriptions",
            {"pattern": "#", "url": "slack://T1/B2/C3", "template": "{nope}"},
            token=token,
        )
        assert (status, body["error"]["field"]) == (400, "template")
        slack_sub = await d.subscribe(
            token, "payment.*", "https://hooks.slack.com/services/T1/B2/SECRETtoken"
        )
        assert "SECRETtoken" not in json.dumps(slack_sub)
        await d.subscribe(token, "payment.*", f"pushover://{USER}@{TOKEN}")
        await d.subscribe(
            token,
            "payment.*",
            f"twilio://{SID}:tok@+15550001111/+15550002222",
            template="Payment of {data.amount} from {data.customer}",
        )
        # Slack is rate limited once: the delivery waits for Retry-After and succeeds.
        slack.plan = [Planned(429, b"rate_limited", {"Retry-After": "1"})]
        status, body = await d.call(
            "POST",
            "/v1/events",
            {
                "type": "payment.failed",
                "source": "/shop",
                "subject": "order 42",
                "severity": "warning",
                "data": {
                    "amount": "12.50 EUR",
                    "customer": "Ann",
                    "url": "https://shop.example/orders/42",
                },
            },
            token=token,
        )
        assert status == 202
        event = await d.wait_status(token, body["id"], "delivered")
        assert len(event["deliveries"]) == 3
        (payload,) = slack.accepted
        assert payload["text"].startswith("[warning] payment.failed: order 42")
        assert "amount: 12.50 EUR" in payload["blocks"][1]["text"]["text"]
        assert len(slack.requests) == 2  # the 429, then the retry
        (form,) = pushover.accepted
        assert (form["title"], form["priority"]) == ("[warning] payment.failed: order 42", "1")
        assert form["url"] == "https://shop.example/orders/42"
        (sms,) = twilio.accepted
        assert (sms["To"], sms["From"]) == ("+15550002222", "+15550001111")
        assert sms["Body"] == (
            "[warning] payment.failed: order 42: Payment of 12.50 EUR from Ann "
            "https://shop.example/orders/42"
        )
        # A permanent error is not retried: dead at once, with the API's reason.
        pushover.plan = [Planned(400, {"status": 0, "errors": ["user key is invalid"]})]
        status, body = await d.call(
            "POST", "/v1/events", {"type": "payment.ok", "source": "/shop"}, token=token
        )

        async def pushover_dead() -> Any:
            ev = await d.event(token, body["id"])
            dead = [x for x in ev["deliveries"] if x["status"] == "dead"]
            return dead or None

        (dead,) = await until(pushover_dead)
        assert dead["attempts"] == 1 and "user key is invalid" in dead["last_error"]

    @inline
    async def test_a_mail_loop_stops_at_the_hop_limit(self) -> None:
        zone = dns_server()
        port = free_port()
        zone.mx("loop.test", "127.0.0.3")
        d = await Daemon(
            self,
            dns=zone.config(),
            smtp={"hostname": "mx.loop.test", "listen": f"tcp:{port}:interface=127.0.0.3"},
            outbound={"port": port},
            edj={"mail_loop_limit": 3},
        ).start()
        token = await d.account("acme")
        await MailStore(d.store).add_domain("loop.test", "acme")
        # Every received mail is mailed to an address served here: a loop.
        await d.subscribe(token, "mail.received", "mailto:inbox@loop.test")

        def first() -> None:
            with smtplib.SMTP("127.0.0.3", port, timeout=10) as s:
                s.sendmail(
                    "someone@example.org", ["inbox@loop.test"], b"Subject: start\r\n\r\nhello\r\n"
                )

        await deferToThread(first)

        async def received() -> list[dict[str, Any]]:
            _, listed = await d.call("GET", "/v1/deliveries?limit=100", token=token)
            return list(listed["deliveries"])

        await until(lambda: _dead(received), timeout=30)
        await sleep(1.0)  # nothing more comes
        deliveries = await received()
        assert sorted(x["status"] for x in deliveries) == [
            "dead",
            "delivered",
            "delivered",
            "delivered",
        ]
        dead = next(x for x in deliveries if x["status"] == "dead")
        assert "mail loop" in dead["last_error"] and "3" in dead["last_error"]


async def _dead(fetch: Any) -> bool:
    return any(x["status"] == "dead" for x in await fetch())
