"""Slack, Pushover and Twilio destinations against local servers that check requests as
each API documents them; rendering, templates and SMS segments (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from gehirn_ts.edj.destinations.chat import (
    PushoverDestination,
    SlackDestination,
    pushover_settings,
    slack_path,
)
from gehirn_ts.edj.destinations.sms import SmsDestination, fit, segments, twilio_settings
from gehirn_ts.edj.render import TemplateError, check_template, fill, message, render
from gehirn_ts.edj.webclient import WebClient
from gehirn_ts.events import Event
from gehirn_ts.interfaces import Delivered, PermFail, TempFail
from tests.fake_apis import FakePushover, FakeSlack, FakeTwilio, Planned
from tests.support import inline

USER = "u" * 29 + "1"
TOKEN = "a" * 29 + "2"
SID = "AC" + "0123456789abcdef" * 2
EVENT = Event(
    type="notice.fault",
    source="/billing",
    subject="db-1",
    severity="critical",
    data={"disk": "98%", "host": "db-1.example", "url": "https://status.example/db-1"},
)


def _http(testcase: TestCase) -> WebClient:
    pool = HTTPConnectionPool(reactor, persistent=False)
    return WebClient(Agent(reactor, pool=pool), reactor)


class HostedApiTests(TestCase):
    @inline
    async def test_slack_posts_text_and_blocks_and_classifies_its_errors(self) -> None:
        api = FakeSlack()
        base = api.listen(self)
        dest = SlackDestination(
            "slack://T0001/B0002/XXXXtoken", http=_http(self), clock=reactor, timeout=5, base=base
        )
        assert dest.redacted_url() == "slack://T0001/B0002/****"
        rendered = render(EVENT, "slack")
        assert isinstance(await dest.deliver(EVENT, rendered, "d1"), Delivered)
        (payload,) = api.accepted
        assert payload["text"].startswith("[critical] notice.fault: db-1")
        assert [b["type"] for b in payload["blocks"]] == ["header", "section", "context"]
        assert "disk: 98%" in payload["blocks"][1]["text"]["text"]
        api.plan = [
            Planned(429, b"rate_limited", {"Retry-After": "30"}),
            Planned(404, b"channel_not_found"),
            Planned(410, b"channel_is_archived"),
            Planned(500, b"oops"),
        ]
        limited = await dest.deliver(EVENT, rendered, "d1")
        assert isinstance(limited, TempFail) and limited.retry_after == 30
        gone = await dest.deliver(EVENT, rendered, "d1")
        assert isinstance(gone, PermFail) and "channel_not_found" in gone.reason
        assert isinstance(await dest.deliver(EVENT, rendered, "d1"), PermFail)
        assert isinstance(await dest.deliver(EVENT, rendered, "d1"), TempFail)
        # The hooks.slack.com form of the URL goes to the same path.
        assert slack_path("https://hooks.slack.com/services/T0001/B0002/XXXXtoken") == (
            "/services/T0001/B0002/XXXXtoken"
        )

    @inline
    async def test_pushover_form_priority_emergency_and_errors(self) -> None:
        api = FakePushover()
        base = api.listen(self)
        dest = PushoverDestination(
            f"pushover://{USER}@{TOKEN}?sound=siren",
            http=_http(self),
            clock=reactor,
            timeout=5,
            base=base,
        )
        assert USER not in dest.redacted_url() and TOKEN not in dest.redacted_url()
        assert isinstance(await dest.deliver(EVENT, render(EVENT, "pushover"), "d"), Delivered)
        (form,) = api.accepted
        assert form["title"] == "[critical] notice.fault: db-1"
        assert "disk: 98%" in form["message"]
        # critical -> emergency priority, with retry and expire as Pushover requires.
        assert (form["priority"], form["retry"], form["expire"]) == ("2", "60", "3600")
        assert form["url"] == "https://status.example/db-1" and form["sound"] == "siren"
        info = Event(type="notice.maintenance", source="/x", data={"window": "2h"})
        await dest.deliver(info, render(info, "pushover"), "d")
        assert api.accepted[1]["priority"] == "0" and "retry" not in api.accepted[1]
        bad = PushoverDestination(
            f"pushover://{USER}@{'b' * 30}",
            http=_http(self),
            clock=reactor,
            timeout=5,
            base=base,
        )
        api.plan = [Planned(400, {"status": 0, "errors": ["application token is invalid"]})]
        refused = await bad.deliver(EVENT, render(EVENT, "pushover"), "d")
        assert isinstance(refused, PermFail) and "application token is invalid" in refused.reason
        api.plan = [Planned(429, {"status": 0, "errors": ["over quota"]}), Planned(503, b"")]
        assert isinstance(await dest.deliver(EVENT, render(EVENT, "pushover"), "d"), TempFail)
        later = await dest.deliver(EVENT, render(EVENT, "pushover"), "d")
        assert isinstance(later, TempFail) and later.retry_after is not None
        assert later.retry_after >= 5

    @inline
    async def test_twilio_sends_one_message_per_number_with_basic_auth(self) -> None:
        api = FakeTwilio(SID, "secret-token")
        base = api.listen(self)
        url = f"twilio://{SID}:secret-token@+15550001111/+15550002222/+4915112345678"
        dest = SmsDestination(url, http=_http(self), clock=reactor, timeout=5, base=base)
        assert "secret-token" not in dest.redacted_url() and "2222" not in dest.redacted_url()
        long_text = ("[info] notice.fault\n" + "ä " * 2000).encode()
        result = await dest.deliver(EVENT, long_text, "d")
        assert isinstance(result, Delivered)
        assert [f["To"] for f in api.accepted] == ["+15550002222", "+4915112345678"]
        body = api.accepted[0]["Body"]
        assert segments(body) == ("GSM-7", 10) and body.endswith("...")
        wrong = SmsDestination(
            url.replace("secret-token", "wrong"),
            http=_http(self),
            clock=reactor,
            timeout=5,
            base=base,
        )
        refused = await wrong.deliver(EVENT, render(EVENT, "sms"), "d")
        assert isinstance(refused, PermFail) and "20003" in refused.reason
        api.plan = [Planned(400, {"code": 21211, "message": "Invalid 'To' Phone Number"})]
        invalid = await dest.deliver(EVENT, render(EVENT, "sms"), "d")
        assert isinstance(invalid, PermFail) and "21211" in invalid.reason
        api.plan = [Planned(429, {"code": 20429, "message": "Too Many Requests"})]
        assert isinstance(await dest.deliver(EVENT, render(EVENT, "sms"), "d"), TempFail)


@pytest.mark.parametrize(
    "url",
    [
        "pushover://short@" + TOKEN,
        f"pushover://{USER}@{TOKEN}?priority=5",
        f"pushover://{USER}@{TOKEN}?volume=11",
        "twilio://ACnothex:tok@+15550001111/+15550002222",
        f"twilio://{SID}:tok@+15550001111/5550002222",
        f"twilio://{SID}:tok@+15550001111",
        f"twilio://{SID}@+15550001111/+15550002222",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    parse = pushover_settings if url.startswith("pushover") else twilio_settings
    with pytest.raises(ValueError):
        parse(url)


# --- SMS segments ---


def test_segment_counts() -> None:
    assert segments("a" * 160) == ("GSM-7", 1)
    assert segments("a" * 161) == ("GSM-7", 2)
    assert segments("€" * 80) == ("GSM-7", 1)  # extension characters count two
    assert segments("€" * 81) == ("GSM-7", 2)
    assert segments("ж" * 70) == ("UCS-2", 1)
    assert segments("ж" * 71) == ("UCS-2", 2)
    assert segments("😀" * 35) == ("UCS-2", 1)  # a surrogate pair is two units


@settings(max_examples=300)
@given(st.text(max_size=3000), st.integers(1, 10))
def test_fit_always_fits_and_keeps_a_prefix(text: str, n: int) -> None:
    out = fit(text, n)
    _, count = segments(out)
    assert count <= n
    if out != text:
        stem = out.removesuffix("...").removesuffix("…")
        assert text.startswith(stem)


# --- rendering and templates ---


def test_mail_events_render_their_key_fields() -> None:
    received = Event(
        type="mail.received",
        source="/m",
        subject="Q1",
        data={"from": "Ann <ann@x.test>", "to": "b@y.test", "subject": "Hi", "excerpt": "Hello"},
    )
    assert message(received).body == "From: Ann <ann@x.test>\nTo: b@y.test\nSubject: Hi\nHello"
    failed = Event(
        type="mail.failed",
        source="/m",
        severity="warning",
        data={"recipient": "b@y.test", "status": "5.1.1", "diagnostic": "550 5.1.1 unknown"},
    )
    text = render(failed, "irc").decode()
    assert text.startswith("[warning] mail.failed")
    assert "Recipient: b@y.test" in text and "Diagnostic: 550 5.1.1 unknown" in text
    assert json.loads(render(failed, "webhook"))["type"] == "mail.failed"


def test_templates_fill_fields_and_refuse_what_they_cannot() -> None:
    template = "{severity}: {data.host} at {data.disk} {{literal}} {data.missing}."
    assert check_template(template) == template
    assert fill(template, EVENT) == "critical: db-1.example at 98% {literal} ."
    for bad, why in (
        ("{__class__}", "unknown field"),
        ("{data.x", "stray"),
        ("x}", "stray"),
        ("", "non-empty"),
        ("{os.system}", "unknown field"),
    ):
        with pytest.raises(TemplateError, match=why):
            check_template(bad)


@settings(max_examples=300)
@given(st.text(max_size=200), st.dictionaries(st.text(max_size=8), st.text(max_size=20)))
def test_any_template_either_is_refused_or_fills_without_error(
    template: str, data: dict[str, Any]
) -> None:
    try:
        check_template(template)
    except TemplateError:
        return
    fill(template, Event(type="x.y", source="/s", data=data))
