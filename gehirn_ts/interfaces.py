"""The interfaces the parts meet at (zope.interface).

Bus vocabulary, shared by the embedded and the AMQP bus:
- ``publish(event)`` puts an event on the topic exchange (routing key = its type);
  every queue bound with a matching pattern gets a copy.
- ``send(queue, body, delay)`` puts a message straight on one work queue, optionally
  to become visible after ``delay`` seconds.
- ``consume(queue, handler)`` calls ``handler(message)`` for each message; the message is
  acked when the handler's Deferred succeeds. If it fails with ``Requeue(delay)`` the
  message comes back after ``delay`` seconds; any other failure requeues it after the
  bus's default delay. Delivery is at least once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from gehirn_ts.events import Event


@dataclass(frozen=True)
class BusMessage:
    queue: str
    body: bytes
    routing_key: str
    message_id: str
    # 1 on first delivery; grows with each redelivery (requeue or crash).
    attempt: int
    # The published Event itself, when the bus still holds it (the embedded bus, in
    # the publishing process): the router takes it instead of parsing ``body`` again.
    event: Event | None = None


class Requeue(Exception):
    """Raised by a consumer's handler: deliver this message again after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"requeue after {delay:.3f}s")
        self.delay = delay


class BusUnavailable(Exception):
    """The bus cannot take a message now (the HTTP API answers 503)."""


Handler = Callable[[BusMessage], Awaitable[None]]


class IEventBus(Interface):
    def bind(queue: str, patterns: Sequence[str]) -> Deferred[None]:
        """Declare a durable queue that receives events whose type matches a pattern."""

    def publish(event: Event) -> Deferred[None]:
        """Publish an event; fires once it is durable."""

    def publish_many(events: Sequence[Event]) -> Deferred[None]:
        """Publish events together; fires once all are durable."""

    def send(queue: str, body: bytes, delay: float = 0.0) -> Deferred[None]:
        """Put a message on a work queue; fires once it is durable."""

    def consume(queue: str, handler: Handler) -> None:
        """Start calling ``handler`` for the messages of ``queue``."""


class Result:
    """Outcome of one delivery attempt."""

    retry_after: float | None = None
    reason: str = ""
    status_code: int | None = None


@dataclass(frozen=True)
class Delivered(Result):
    status_code: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class TempFail(Result):
    reason: str
    retry_after: float | None = None
    status_code: int | None = None


@dataclass(frozen=True)
class PermFail(Result):
    reason: str
    status_code: int | None = None


class IDestination(Interface):
    kind = Attribute("Short name of the destination kind, e.g. 'webhook'.")

    def deliver(event: Event, rendered: bytes, delivery_id: str) -> Deferred[Result]:
        """Deliver one rendered event; never raises, the Result says what happened."""

    def redacted_url() -> str:
        """The destination URL with its secrets hidden."""


@dataclass(frozen=True)
class ParcelRecipient:
    n: int
    address: str
    notify: list[str] | None = None
    orcpt: tuple[str, str] | None = None  # (addr-type, address)


@dataclass(frozen=True)
class Parcel:
    """One outbound message for the recipients of one destination domain."""

    queue_id: str
    sender: str
    domain: str
    recipients: Sequence[ParcelRecipient]
    path: str  # the message file
    size: int
    body: str | None = None  # 7BIT | 8BITMIME
    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True)
class RcptOutcome:
    """What became of one recipient: delivered, relayed (delivered to a next hop that
    offers no DSN while SUCCESS was asked: RFC 3461 section 4.2), deferred or failed."""

    n: int
    kind: str
    reply: str  # the reply that decided it, e.g. "250 2.0.0 Ok: queued as X"
    status: str  # RFC 3463 code
    remote_mta: str | None = None
    tls: bool = False


class ICourier(Interface):
    def deliver(parcel: Parcel) -> Deferred[list[RcptOutcome]]:
        """Try once to deliver ``parcel``: one outcome per recipient, never an error."""

    def close() -> Deferred[None]:
        """End the sessions kept for reuse (the queue calls it at stop)."""
