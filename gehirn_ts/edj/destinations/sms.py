"""SMS through a Twilio-compatible API: ``twilio://ACCOUNT_SID:AUTH_TOKEN@FROM/TO[/TO...]``
-> ``POST /2010-04-01/Accounts/{sid}/Messages.json`` (form ``To``, ``From``, ``Body``)
with HTTP Basic auth, one request per recipient.

The text is cut to fit ``MAX_SEGMENTS`` segments (GSM 03.38 text: 160 characters alone,
153 per part when concatenated, extension characters counting two; anything else is
UCS-2: 70 alone, 67 per part, counted in UTF-16 units). Twilio's errors: 400 with an
error code (invalid number, unsubscribed recipient...) and 401 are permanent; 429 and
5xx are retried. A message to several numbers that fails part way is retried whole:
numbers already served may get it twice (at least once, as every retry here).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred
from zope.interface import implementer

from gehirn_ts.edj.destinations.http import HttpReply, post_form
from gehirn_ts.edj.render import split_message
from gehirn_ts.events import Event
from gehirn_ts.interfaces import Delivered, IDestination, PermFail, Result, TempFail
from gehirn_ts.redact import MASK

MAX_SEGMENTS = 10  # Twilio recommends at most 10; its Body limit is 1600 characters
GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = "^{}\\[~]|€\f"
_SET_BASIC = frozenset(GSM7_BASIC)
_SET_EXT = frozenset(GSM7_EXTENSION)
_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_NUMBER = re.compile(r"^\+[1-9][0-9]{6,14}$")  # E.164
_SENDER = re.compile(r"^(\+[1-9][0-9]{6,14}|MG[0-9a-fA-F]{32}|[A-Za-z0-9 ]{1,11})$")


def is_gsm7(text: str) -> bool:
    return all(c in _SET_BASIC or c in _SET_EXT for c in text)


def _gsm_len(text: str) -> int:
    return sum(2 if c in _SET_EXT else 1 for c in text)


def _ucs2_len(text: str) -> int:
    return sum(2 if ord(c) > 0xFFFF else 1 for c in text)


def segments(text: str) -> tuple[str, int]:
    """(encoding, number of segments) of a text."""
    if is_gsm7(text):
        n = _gsm_len(text)
        return "GSM-7", 1 if n <= 160 else -(-n // 153)
    n = _ucs2_len(text)
    return "UCS-2", 1 if n <= 70 else -(-n // 67)


def fit(text: str, max_segments: int = MAX_SEGMENTS) -> str:
    """``text``, cut (with an ellipsis) to fit ``max_segments`` segments."""
    gsm = is_gsm7(text)
    length, single, per_part, mark = (
        (_gsm_len, 160, 153, "...") if gsm else (_ucs2_len, 70, 67, "…")
    )
    limit = single if max_segments == 1 else per_part * max_segments
    if length(text) <= limit:
        return text
    room = limit - length(mark)
    out = []
    used = 0
    for c in text:
        cost = length(c)
        if used + cost > room:
            break
        out.append(c)
        used += cost
    return "".join(out).rstrip() + mark


def twilio_settings(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme != "twilio" or "@" not in parts.netloc:
        raise ValueError("twilio://ACCOUNT_SID:AUTH_TOKEN@FROM/TO[/TO...]")
    creds, _, sender = parts.netloc.rpartition("@")
    sid, _, token = creds.partition(":")
    sender = unquote(sender)
    if not _SID.match(sid):
        raise ValueError("the account SID is AC and 32 hex digits")
    if not token:
        raise ValueError("the auth token is missing")
    if not _SENDER.match(sender):
        raise ValueError(
            "FROM is an E.164 number (+15551234567), a messaging service SID "
            "(MG...) or an alphanumeric sender of up to 11 characters"
        )
    to = [unquote(t) for t in parts.path.strip("/").split("/") if t]
    if not to or len(to) > 10:
        raise ValueError("1 to 10 recipient numbers, each a path segment")
    for number in to:
        if not _NUMBER.match(number):
            raise ValueError(f"{number!r} is not an E.164 number such as +15551234567")
    if parts.query or parts.fragment:
        raise ValueError("twilio:// takes no ?query or #fragment")
    return {"sid": sid, "token": unquote(token), "from": sender, "to": to}


def sms_text(rendered: bytes) -> str:
    msg = split_message(rendered)
    text = " ".join(msg.title.split())
    body = " ".join(msg.body.split())
    if body:
        text += ": " + body
    if msg.url:
        text += " " + msg.url
    return fit(text)


@implementer(IDestination)
class SmsDestination:
    kind = "sms"

    def __init__(self, url: str, *, http: Any, clock: Any, timeout: float, base: str) -> None:
        self._s = twilio_settings(url)
        self._target = f"{base.rstrip('/')}/2010-04-01/Accounts/{self._s['sid']}/Messages.json"
        self._http = http
        self._clock = clock
        self._timeout = timeout

    def redacted_url(self) -> str:
        s = self._s
        return f"twilio://{s['sid'][:6]}{MASK}:{MASK}@{s['from']}/" + "/".join(
            n[:-4] + "****" for n in s["to"]
        )

    def deliver(self, event: Event, rendered: bytes, delivery_id: str) -> Deferred[Result]:
        return Deferred.fromCoroutine(self._deliver(rendered))

    async def _deliver(self, rendered: bytes) -> Result:
        text = sms_text(rendered)
        for number in self._s["to"]:
            form = {"To": number, "From": self._s["from"], "Body": text}
            auth = (self._s["sid"], self._s["token"])
            reply = await post_form(
                self._http, self._clock, self._target, form, auth, self._timeout
            )
            if isinstance(reply, Result):
                return reply
            if reply.status in (200, 201):
                continue
            reason = _twilio_reason(reply)
            if reply.status in (408, 429) or reply.status >= 500:
                return TempFail(reason, retry_after=reply.retry_after, status_code=reply.status)
            return PermFail(reason, status_code=reply.status)
        return Delivered(status_code=201, reason=f"{len(self._s['to'])} SMS")


def _twilio_reason(reply: HttpReply) -> str:
    try:
        error = json.loads(reply.body)
        return f"HTTP {reply.status}: Twilio error {error.get('code')}: {error.get('message')}"[
            :300
        ]
    except (ValueError, AttributeError):
        return f"HTTP {reply.status}"
