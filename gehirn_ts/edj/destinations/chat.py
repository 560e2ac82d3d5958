"""Slack incoming webhooks and Pushover: hosted HTTP APIs with a readable message.

Slack: ``https://hooks.slack.com/services/T/B/X`` or ``slack://T/B/X``; JSON with ``text``
(the fallback for notifications) and ``blocks``. Its documented errors (400
invalid_payload, 403 action_prohibited, 404 channel_not_found / no_service, 410
channel_is_archived) are permanent; 429 is retried after its Retry-After.

Pushover: ``pushover://USER_KEY@APP_TOKEN[?device=&sound=&priority=]`` -> ``POST
/1/messages.json`` (form fields of its API). A 4xx is permanent except 429 (its docs:
"4xx: do not retry the same request"); 5xx and network errors are retried. Severity
sets the priority unless the URL does: info 0, warning 1 (high), critical 2
(emergency, which Pushover repeats every ``retry`` seconds until acknowledged or
``expire``).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from twisted.internet.defer import Deferred
from zope.interface import implementer

from gehirn_ts.edj.destinations.http import HttpReply, classify, post, post_form
from gehirn_ts.edj.render import split_message
from gehirn_ts.events import Event
from gehirn_ts.interfaces import Delivered, IDestination, PermFail, Result, TempFail
from gehirn_ts.redact import MASK

_SLACK_PART = re.compile(r"^[A-Za-z0-9]{1,64}$")
_PUSHOVER_KEY = re.compile(r"^[A-Za-z0-9]{30}$")
PRIORITY_OF_SEVERITY = {"info": 0, "warning": 1, "critical": 2}
EMERGENCY_RETRY = 60  # seconds between repeats (Pushover's minimum is 30)
EMERGENCY_EXPIRE = 3600  # stop repeating after (at most 10800)


def _reason(reply: HttpReply) -> str:
    text = reply.body.decode("utf-8", "replace").strip()
    return f"HTTP {reply.status}" + (f": {text[:200]}" if text else "")


def slack_path(url: str) -> str:
    """The /services/T/B/X path of a Slack webhook URL; ValueError when it is not one."""
    parts = urlsplit(url)
    if parts.scheme == "slack":
        segments = [parts.netloc, *parts.path.strip("/").split("/")]
    elif parts.scheme == "https" and parts.path.startswith("/services/"):
        segments = parts.path[len("/services/") :].strip("/").split("/")
    else:
        raise ValueError("not a Slack webhook URL")
    if len(segments) != 3 or not all(_SLACK_PART.match(s) for s in segments):
        raise ValueError("a Slack webhook URL is .../services/TEAM/CHANNEL/TOKEN")
    if parts.query or parts.fragment:
        raise ValueError("a Slack webhook URL has no ?query or #fragment")
    return "/services/" + "/".join(segments)


def slack_escape(text: str) -> str:
    # Slack's message formatting: only &, < and > are control characters.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(rendered: bytes) -> dict[str, Any]:
    msg = split_message(rendered)
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": msg.title[:150]}}
    ]
    if msg.body:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": slack_escape(msg.body)[:3000]}}
        )
    text = slack_escape(msg.title)
    if msg.url:
        link = msg.url.replace("|", "%7C").replace(">", "%3E")
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{link}|Open>"}]}
        )
        text += f" <{link}>"
    return {"text": text, "blocks": blocks}


@implementer(IDestination)
class SlackDestination:
    kind = "slack"

    def __init__(self, url: str, *, http: Any, clock: Any, timeout: float, base: str) -> None:
        self._path = slack_path(url)
        self._target = base.rstrip("/") + self._path
        self._http = http
        self._clock = clock
        self._timeout = timeout

    def redacted_url(self) -> str:
        team, channel, _ = self._path.split("/")[2:]
        return f"slack://{team}/{channel}/{MASK}"

    def deliver(self, event: Event, rendered: bytes, delivery_id: str) -> Deferred[Result]:
        return Deferred.fromCoroutine(self._deliver(rendered))

    async def _deliver(self, rendered: bytes) -> Result:
        body = json.dumps(slack_payload(rendered)).encode()
        reply = await post(
            self._http,
            self._clock,
            self._target,
            body,
            {"content-type": "application/json"},
            None,
            self._timeout,
        )
        if isinstance(reply, Result):
            return reply
        result = classify(reply.status, reply.retry_after)
        if isinstance(result, Delivered):
            return result
        if isinstance(result, PermFail):
            return PermFail(_reason(reply), status_code=reply.status)
        return TempFail(_reason(reply), retry_after=reply.retry_after, status_code=reply.status)


def pushover_settings(url: str) -> dict[str, str]:
    """The user key, app token and options of a pushover:// URL; ValueError naming
    what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "pushover" or "@" not in parts.netloc:
        raise ValueError("pushover://USER_KEY@APP_TOKEN[?device=&sound=&priority=]")
    user, _, token = parts.netloc.rpartition("@")
    if not _PUSHOVER_KEY.match(user):
        raise ValueError("the user key is 30 letters and digits")
    if not _PUSHOVER_KEY.match(token):
        raise ValueError("the application token is 30 letters and digits")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError("pushover:// takes options as ?device=&sound=&priority= only")
    out = {"user": user, "token": token}
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        value = values[-1]
        if name == "priority":
            if value not in ("-2", "-1", "0", "1", "2"):
                raise ValueError("priority is -2, -1, 0, 1 or 2")
        elif name == "sound":
            if not re.match(r"^[a-z_]{1,20}$", value):
                raise ValueError("sound is a Pushover sound name, e.g. siren")
        elif name == "device":
            if not re.match(r"^[A-Za-z0-9_-]{1,25}(,[A-Za-z0-9_-]{1,25})*$", value):
                raise ValueError("device is a device name (or a comma-separated list)")
        else:
            raise ValueError(f"unknown option {name!r} (device, sound, priority)")
        out[name] = value
    return out


def pushover_form(settings: dict[str, str], event: Event, rendered: bytes) -> dict[str, str]:
    msg = split_message(rendered)
    form = {
        "token": settings["token"],
        "user": settings["user"],
        "title": msg.title[:250],
        "message": (msg.body or msg.title)[:1024],
        "priority": settings.get("priority", str(PRIORITY_OF_SEVERITY.get(event.severity, 0))),
    }
    if msg.url:
        form["url"] = msg.url[:512]
        form["url_title"] = "Open"
    for name in ("sound", "device"):
        if name in settings:
            form[name] = settings[name]
    if form["priority"] == "2":
        form["retry"] = str(EMERGENCY_RETRY)
        form["expire"] = str(EMERGENCY_EXPIRE)
    return form


@implementer(IDestination)
class PushoverDestination:
    kind = "pushover"

    def __init__(self, url: str, *, http: Any, clock: Any, timeout: float, base: str) -> None:
        self._settings = pushover_settings(url)
        self._target = base.rstrip("/") + "/1/messages.json"
        self._http = http
        self._clock = clock
        self._timeout = timeout

    def redacted_url(self) -> str:
        s = self._settings
        query = "&".join(f"{k}={quote(s[k])}" for k in ("device", "sound", "priority") if k in s)
        return f"pushover://{s['user'][:4]}{MASK}@{s['token'][:4]}{MASK}" + (
            f"?{query}" if query else ""
        )

    def deliver(self, event: Event, rendered: bytes, delivery_id: str) -> Deferred[Result]:
        return Deferred.fromCoroutine(self._deliver(event, rendered))

    async def _deliver(self, event: Event, rendered: bytes) -> Result:
        form = pushover_form(self._settings, event, rendered)
        reply = await post_form(self._http, self._clock, self._target, form, None, self._timeout)
        if isinstance(reply, Result):
            return reply
        reason = _pushover_reason(reply)
        if reply.status == 200:
            return Delivered(status_code=200)
        if reply.status == 429 or reply.status >= 500 or reply.status == 408:
            # Pushover asks for no more than one retry every 5 seconds after a 5xx.
            return TempFail(
                reason, retry_after=max(reply.retry_after or 0, 5), status_code=reply.status
            )
        return PermFail(reason, status_code=reply.status)


def _pushover_reason(reply: HttpReply) -> str:
    try:
        errors = json.loads(reply.body).get("errors")
    except (ValueError, AttributeError):
        errors = None
    if isinstance(errors, list) and errors:
        return f"HTTP {reply.status}: " + "; ".join(str(e) for e in errors)[:200]
    return _reason(reply)
