"""The e-mail destination: ``mailto:a@example.org[,b@example.org]`` (RFC 6068).

Loop protection: every message carries ``X-Gehirn-Loop: N``, one more than the hops of
the event it reports (``data.loop_hops``: a ``mail.received`` event counts the marker of
the mail that came in; an ``edj.delivery.failed`` event carries its event's count). At
``limit`` hops the destination sends nothing (PermFail "mail loop"), so a subscription
that mails received mail back to an address served here stops after ``limit`` rounds.

An event becomes a short text message queued in the outbound queue; the destination's
work is done (Delivered) once the message is durably queued, and what then happens to
it is reported by the queue as ``mail.*`` events. The queue id derives from the
delivery id, so a delivery retried after a crash queues its message once.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred
from zope.interface import implementer

from gehirn_ts.events import Event
from gehirn_ts.interfaces import Delivered, IDestination, PermFail, Result, TempFail
from gehirn_ts.mta.compose import FieldError, envelope_address, mailbox, parse_send
from gehirn_ts.mta.compose import build as build_message
from gehirn_ts.store.queue import NewRecipient

MAX_RECIPIENTS = 10
AccountId = Callable[[str], Awaitable[int | None]]


def parse_mailto(url: str) -> list[str]:
    """The addresses of a mailto: URL; ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "mailto":
        raise ValueError("not a mailto: URL")
    if parts.query or parts.fragment:
        raise ValueError("mailto: takes addresses only, no ?headers or #fragment")
    addresses = [unquote(a).strip() for a in parts.path.split(",") if a.strip()]
    if not addresses or len(addresses) > MAX_RECIPIENTS:
        raise ValueError(f"mailto: needs 1 to {MAX_RECIPIENTS} addresses")
    try:
        return [envelope_address(a, "url") for a in addresses]
    except FieldError as e:
        raise ValueError(e.message)


def loop_hops(event: Event) -> int:
    value = event.data.get("loop_hops") if isinstance(event.data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def subject_of(event: Event) -> str:
    subject = f" {event.subject}" if event.subject else ""
    return f"[{event.severity}] {event.type}{subject}"[:200]


def text_of(event: Event) -> str:
    """A readable body: the envelope of the event, then its data."""
    lines = [
        f"Event:    {event.type}",
        f"Severity: {event.severity}",
        f"Time:     {event.time}",
        f"Source:   {event.source}",
        f"Id:       {event.id}",
    ]
    if event.subject:
        lines.append(f"Subject:  {event.subject}")
    if event.data is not None:
        lines += ["", json.dumps(event.data, indent=2, ensure_ascii=False, sort_keys=True)]
    return "\n".join(lines) + "\n"


@implementer(IDestination)
class EmailDestination:
    kind = "email"

    def __init__(
        self,
        url: str,
        *,
        outbound: Any,
        account_id: AccountId,
        sender: str,
        clock: Any,
        loop_limit: int = 3,
    ) -> None:
        self._loop_limit = loop_limit
        self._url = url
        self._to = parse_mailto(url)
        self._outbound = outbound
        self._account_id = account_id
        self._sender = sender
        self._clock = clock

    def redacted_url(self) -> str:
        # The addresses are where the events go, not secrets; shown as configured.
        return "mailto:" + ",".join(self._to)

    def deliver(self, event: Event, rendered: bytes, delivery_id: str) -> Deferred[Result]:
        return Deferred.fromCoroutine(self._deliver(event, rendered, delivery_id))

    async def _deliver(self, event: Event, rendered: bytes, delivery_id: str) -> Result:
        if self._outbound is None:
            return PermFail("no outbound queue in this daemon")
        hops = loop_hops(event)
        if hops >= self._loop_limit:
            return PermFail(
                f"mail loop: the event comes from mail that went through {hops} e-mail "
                f"deliveries (the limit is {self._loop_limit}); not sent"
            )
        qid = f"edj.{delivery_id}"
        request = parse_send(
            {
                "from": str(mailbox(self._sender, "from")),
                "to": self._to,
                "subject": subject_of(event),
                "text": rendered.decode("utf-8", "replace"),
                # RFC 3834: machine-made; auto-responders must not answer it.
                "headers": {
                    "Auto-Submitted": "auto-generated",
                    "X-Gehirn-Event": event.id,
                    "X-Gehirn-Loop": str(hops + 1),
                },
            }
        )
        data = build_message(
            request,
            message_id=f"<{qid}@{self._outbound.hostname}>",
            now=self._clock.seconds(),
        )
        account_id = await self._account_id(event.account) if event.account else None
        try:
            mid, _ = await self._outbound.submit(
                sender=self._sender,
                recipients=[NewRecipient(a) for a in self._to],
                account_id=account_id,
                origin="edj",
                data=data,
                queue_id=qid,
            )
        except Exception as e:
            return TempFail(f"could not queue the message: {type(e).__name__}: {e}")
        return Delivered(reason=f"queued as {mid}")
