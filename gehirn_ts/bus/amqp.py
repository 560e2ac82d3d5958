"""The event bus on RabbitMQ (AMQP 0-9-1, through txamqp via ``txamqp_compat``).

Topology, declared idempotently on every connect (names under ``namespace``):
- ``NS.events``: a durable topic exchange; routing key = event type.
- a durable queue per bound or consumed queue name (``NS.q.NAME``), with its bindings.
- delay queues ``NS.delay.MS.NAME``: a message TTL of MS and a dead-letter route back
  to ``NS.q.NAME``. Delays are rounded up to a grid 10% apart, so a few dozen
  queues serve every delay; per-message TTL is not used because RabbitMQ expires
  messages only at the head of a queue.
- ``NS.dead``: messages that failed ``max_failures`` times unexpectedly.

Messages are persistent; publishes fire only when the broker confirms them (a nack
is an error); a consumer acks only after its handler succeeded. On a lost connection
the bus reconnects with backoff; publishes made meanwhile wait ``publish_timeout``
and then fail with BusUnavailable (the API answers 503).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from zope.interface import implementer

from gehirn_ts.bus import grouping
from gehirn_ts.bus import txamqp_compat as compat
from gehirn_ts.events import Event
from gehirn_ts.interfaces import BusMessage, BusUnavailable, Handler, IEventBus, Requeue
from gehirn_ts.logs import Logger
from gehirn_ts.slots import Slots

log = Logger()

PUBLISH_CHANNEL = 1
CONSUME_CHANNEL = 2
ATTEMPT_HEADER = "x-gehirn-attempt"
FAILURES_HEADER = "x-gehirn-failures"
PERSISTENT = 2  # delivery-mode (AMQP 0-9-1 basic properties)
DELAY_GRID = 1.1  # delay buckets 10% apart
MIN_DELAY_MS = 50


@dataclass(frozen=True)
class AmqpUrl:
    host: str
    port: int
    user: str
    password: str
    vhost: str
    tls: bool

    @classmethod
    def parse(cls, url: str) -> AmqpUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError("expected amqp:// or amqps://")
        tls = parts.scheme == "amqps"
        if not parts.hostname:
            raise ValueError("has no host")
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(
            host=parts.hostname,
            port=parts.port or (5671 if tls else 5672),
            user=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            vhost=vhost,
            tls=tls,
        )


def delay_bucket(seconds: float) -> int:
    """The delay queue's TTL (ms) for a delay: rounded up on a geometric grid."""
    ms = max(seconds * 1000.0, MIN_DELAY_MS)
    step = math.ceil(math.log(ms / MIN_DELAY_MS, DELAY_GRID) - 1e-9)
    return math.ceil(MIN_DELAY_MS * DELAY_GRID**step)


class _Connection:
    """One live AMQP connection with its publish (confirm mode) and consume channels."""

    def __init__(self, client: Any, publish: Any, consume: Any) -> None:
        self.client = client
        self.publish_ch = publish
        self.consume_ch = consume
        self.next_tag = 1
        self.pending: dict[int, Deferred[None]] = {}
        self.declared: set[str] = set()
        self.alive = True

    def confirmed(self, channel: int, tag: int, multiple: bool, ack: bool) -> None:
        if channel != PUBLISH_CHANNEL:
            return
        tags = [t for t in self.pending if t <= tag] if multiple else [tag]
        for t in sorted(tags):
            d = self.pending.pop(t, None)
            if d is None:
                continue
            if ack:
                d.callback(None)
            else:
                d.errback(BusUnavailable("the broker refused the message (nack)"))

    def lost(self) -> None:
        self.alive = False
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(
                BusUnavailable(
                    "the connection to the broker was lost before it confirmed the message"
                )
            )


@implementer(IEventBus)
class AmqpBus(Service):
    name = "bus"

    def __init__(
        self,
        url: str,
        reactor: Any,
        *,
        namespace: str = "gehirn-ts",
        prefetch: int = 512,
        default_delay: float = 5.0,
        publish_timeout: float = 5.0,
        heartbeat: int = 30,
        max_reconnect_delay: float = 30.0,
        max_failures: int = 20,
        stop_grace: float = 15.0,
    ) -> None:
        self._url = AmqpUrl.parse(url)
        self._reactor = reactor
        self._ns = namespace
        self._prefetch = prefetch
        self._default_delay = default_delay
        self._publish_timeout = publish_timeout
        self._heartbeat = heartbeat
        self._max_reconnect_delay = max_reconnect_delay
        self._max_failures = max_failures
        self._stop_grace = stop_grace
        self._bindings: dict[str, set[str]] = {}
        self._handlers: dict[str, Handler] = {}
        self._conn: _Connection | None = None
        self._waiters: list[Deferred[_Connection]] = []
        self._loop: Deferred[None] | None = None
        self._sleep: Any = None
        self._inflight: set[Deferred[None]] = set()
        self._binding: set[Deferred[None]] = set()
        self._part_slots = Slots(prefetch)
        self._spec = compat.load_spec()

    # --- names ---

    @property
    def exchange(self) -> str:
        return f"{self._ns}.events"

    def queue_name(self, queue: str) -> str:
        return f"{self._ns}.q.{queue}"

    def _delay_queue(self, queue: str, ms: int) -> str:
        return f"{self._ns}.delay.{ms}.{queue}"

    # --- lifecycle ---

    def startService(self) -> None:
        super().startService()
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.failure("AMQP bus loop failed", f))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._sleep is not None and self._sleep.active():
            self._sleep.cancel()
        for waiter in self._waiters:
            waiter.errback(BusUnavailable("the bus is stopping"))
        self._waiters = []
        conn = self._conn
        if conn is not None and conn.alive:
            for queue in self._handlers:
                try:
                    await conn.consume_ch.basic_cancel(consumer_tag=f"{self._ns}|{queue}")
                except Exception:  # noqa: S110 - closing anyway
                    pass
        if self._inflight:
            pending = defer.DeferredList(list(self._inflight), consumeErrors=True)
            pending.addTimeout(self._stop_grace, self._reactor)
            try:
                await pending
            except defer.TimeoutError:
                log.warn("AMQP bus stopped with {n} messages unacked", n=len(self._inflight))
        if conn is not None and conn.alive:
            try:
                await conn.client.close(within=2)
            except Exception:  # noqa: S110
                pass
            conn.client.transport.loseConnection()
        if self._loop is not None:
            await self._loop

    async def _run(self) -> None:
        delay = 0.5
        while self.running:
            try:
                conn = await self._connect()
            except Exception as e:
                log.warn(
                    "AMQP connection to {host}:{port} failed: {error}; retrying in {delay:.1f}s",
                    host=self._url.host,
                    port=self._url.port,
                    error=str(e) or type(e).__name__,
                    delay=delay,
                )
            else:
                delay = 0.5
                self._conn = conn
                log.info(
                    "AMQP bus connected to {host}:{port}", host=self._url.host, port=self._url.port
                )
                waiters, self._waiters = self._waiters, []
                for waiter in waiters:
                    waiter.callback(conn)
                await conn.client.disconnected.wait()
                conn.lost()
                self._conn = None
                if not self.running:
                    return
            if not self.running:
                return
            wait = delay * random.uniform(0.8, 1.2)
            sleeper: Deferred[None] = Deferred()
            self._sleep = self._reactor.callLater(wait, sleeper.callback, None)
            await sleeper
            delay = min(delay * 2, self._max_reconnect_delay)

    async def _connect(self) -> _Connection:
        delegate = compat.BusDelegate()
        client = compat.BusClient(
            delegate, self._url.vhost, self._spec, heartbeat=self._heartbeat, clock=self._reactor
        )
        endpoint: Any = HostnameEndpoint(self._reactor, self._url.host, self._url.port, timeout=10)
        if self._url.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(self._url.host), endpoint)
        await connectProtocol(endpoint, client)
        # A publish is three small frames and its confirm comes back later: with Nagle's
        # algorithm on, a frame written while the previous one is unacknowledged waits for
        # the broker's delayed ACK (about 40 ms on Linux).
        client.transport.setTcpNoDelay(True)
        try:
            await client.login(self._url.user, self._url.password)
            publish = await client.channel(PUBLISH_CHANNEL)
            await publish.channel_open()
            await publish.confirm_select()
            consume = await client.channel(CONSUME_CHANNEL)
            await consume.channel_open()
            await consume.basic_qos(prefetch_count=self._prefetch)
            conn = _Connection(client, publish, consume)
            delegate.on_confirm = conn.confirmed
            delegate.on_deliver = lambda ch, msg: self._delivered(conn, msg)
            await publish.exchange_declare(exchange=self.exchange, type="topic", durable=True)
            await self._declare(conn, f"{self._ns}.dead")
            for queue, patterns in self._bindings.items():
                await self._declare_queue(conn, queue)
                for pattern in sorted(patterns):
                    await publish.queue_bind(
                        queue=self.queue_name(queue), exchange=self.exchange, routing_key=pattern
                    )
            for queue in self._handlers:
                await self._start_consumer(conn, queue)
        except BaseException:
            client.transport.abortConnection()
            raise
        return conn

    async def _declare(self, conn: _Connection, name: str, **arguments: Any) -> None:
        if name in conn.declared:
            return
        await conn.publish_ch.queue_declare(queue=name, durable=True, arguments=arguments)
        conn.declared.add(name)

    async def _declare_queue(self, conn: _Connection, queue: str) -> None:
        await self._declare(conn, self.queue_name(queue))

    async def _start_consumer(self, conn: _Connection, queue: str) -> None:
        await self._declare_queue(conn, queue)
        await conn.consume_ch.basic_consume(
            queue=self.queue_name(queue), consumer_tag=f"{self._ns}|{queue}"
        )

    async def _connection(self) -> _Connection:
        if self._conn is not None and self._conn.alive:
            return self._conn
        if not self.running:
            raise BusUnavailable("the bus is not running")
        waiter: Deferred[_Connection] = Deferred()
        self._waiters.append(waiter)
        waiter.addTimeout(self._publish_timeout, self._reactor)
        try:
            return await waiter
        except defer.TimeoutError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise BusUnavailable(f"no connection to the broker within {self._publish_timeout:g}s")

    # --- IEventBus ---

    def bind(self, queue: str, patterns: Sequence[str]) -> Deferred[None]:
        self._bindings.setdefault(queue, set()).update(patterns)
        d = Deferred.fromCoroutine(self._bind(queue, list(patterns)))
        # Publishes wait for bindings in progress, so none can reach the exchange before
        # the queue that should get it is bound (the broker would drop it).
        self._binding.add(d)
        d.addBoth(self._bound, d)
        return d

    def _bound(self, result: object, d: Deferred[None]) -> object:
        self._binding.discard(d)
        return result

    async def _bind(self, queue: str, patterns: list[str]) -> None:
        conn = await self._connection()
        await self._declare_queue(conn, queue)
        for pattern in patterns:
            await conn.publish_ch.queue_bind(
                queue=self.queue_name(queue), exchange=self.exchange, routing_key=pattern
            )

    def publish(self, event: Event) -> Deferred[None]:
        return Deferred.fromCoroutine(self._publish_events([event]))

    def publish_many(self, events: Sequence[Event]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._publish_events(events))

    async def _publish_events(self, events: Sequence[Event]) -> None:
        if self._binding:
            await defer.DeferredList(list(self._binding), consumeErrors=True)
        conn = await self._connection()
        # All published at once, then their confirms awaited: the broker confirms them
        # in one go (multiple) when they arrive together. Events of one type published
        # together go as one message (grouping.py): 13-28% more events a second with
        # batches both ways than a message each (docs/performance.md, session 16).
        confirms = []
        for members in grouping.group(events):
            first = members[0]
            if len(members) == 1:
                body = first.to_json()
                headers: dict[str, Any] = {ATTEMPT_HEADER: 1}
                content_type, message_id = grouping.EVENT_CONTENT_TYPE, first.id
            else:
                body, lengths = grouping.pack([e.to_json() for e in members])
                headers = {ATTEMPT_HEADER: 1, grouping.LENGTHS_HEADER: lengths}
                content_type, message_id = grouping.BATCH_CONTENT_TYPE, None
            confirms.append(
                self._publish_now(
                    conn, self.exchange, first.type, body, headers, content_type, message_id
                )
            )
        for n, confirmed in enumerate(confirms):
            try:
                await confirmed
            except BaseException:
                for later in confirms[n + 1 :]:
                    later.addErrback(lambda _: None)  # answered for by this error
                raise

    def send(self, queue: str, body: bytes, delay: float = 0.0) -> Deferred[None]:
        return Deferred.fromCoroutine(self._send(queue, body, delay, 1, 0))

    async def _send(
        self, queue: str, body: bytes, delay: float, attempt: int, failures: int
    ) -> None:
        conn = await self._connection()
        headers = {ATTEMPT_HEADER: attempt, FAILURES_HEADER: failures}
        if delay > 0:
            ms = delay_bucket(delay)
            target = self._delay_queue(queue, ms)
            await self._declare(
                conn,
                target,
                **{
                    "x-message-ttl": ms,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.queue_name(queue),
                },
            )
            await self._declare_queue(conn, queue)
        else:
            target = self.queue_name(queue)
            await self._declare_queue(conn, queue)
        await self._publish_now(conn, "", target, body, headers, "application/octet-stream", None)

    def _publish_now(
        self,
        conn: _Connection,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any],
        content_type: str,
        message_id: str | None,
    ) -> Deferred[None]:
        """Publish on ``conn``; the Deferred fires on the broker's confirm."""
        props: dict[str, Any] = {
            "delivery-mode": PERSISTENT,
            "content-type": content_type,
            "headers": headers,
        }
        if message_id:
            props["message-id"] = message_id
        confirmed: Deferred[None] = Deferred()
        tag = conn.next_tag
        conn.next_tag += 1
        conn.pending[tag] = confirmed
        try:
            conn.client.publish(conn.publish_ch, exchange, routing_key, body, props)
        except Exception as e:
            conn.pending.pop(tag, None)
            return defer.fail(BusUnavailable(f"publish failed: {e}"))
        return confirmed

    def consume(self, queue: str, handler: Handler) -> None:
        if queue in self._handlers:
            raise ValueError(f"queue {queue!r} has a consumer already")
        self._handlers[queue] = handler
        conn = self._conn
        if conn is not None and conn.alive:
            d = Deferred.fromCoroutine(self._start_consumer(conn, queue))
            d.addErrback(lambda f: log.failure("could not start consuming {queue}", f, queue=queue))

    # --- consuming ---

    def _delivered(self, conn: _Connection, msg: Any) -> None:
        queue = msg.consumer_tag.split("|", 1)[1]
        d = Deferred.fromCoroutine(self._handle(conn, queue, msg))
        self._inflight.add(d)
        d.addBoth(self._forget, d)

    def _forget(self, result: object, d: Deferred[None]) -> None:
        self._inflight.discard(d)

    async def _handle(self, conn: _Connection, queue: str, msg: Any) -> None:
        props = msg.content.properties
        headers = props.get("headers") or {}
        attempt = int(headers.get(ATTEMPT_HEADER, 1))
        failures = int(headers.get(FAILURES_HEADER, 0))
        if msg.redelivered:
            attempt += 1  # delivered before, not acked (a consumer died)
        body = bytes(msg.content.body)
        handler = self._handlers[queue]
        tag = str(msg.delivery_tag)
        parts = [body]
        if props.get("content-type") == grouping.BATCH_CONTENT_TYPE:
            try:
                parts = grouping.unpack(body, headers.get(grouping.LENGTHS_HEADER))
            except ValueError as e:
                # Handed over whole: its handler refuses it, and after max_failures
                # it is in the dead-letter queue for someone to look at.
                log.warn("a batch on {queue} could not be split: {error}", queue=queue, error=e)
        if len(parts) == 1:
            message = BusMessage(queue, parts[0], msg.routing_key, tag, attempt)
            outcomes = [await self._call(handler, message)]
        else:
            outcomes = await self._call_parts(handler, queue, parts, msg.routing_key, tag, attempt)
        if not conn.alive:
            return  # unacked on a lost connection: the broker delivers it again
        try:
            # Each event of a batch that failed goes back alone (without the batch's
            # lengths); the rest are done.
            for part, (redeliver, failed) in zip(parts, outcomes, strict=True):
                if redeliver is not None:
                    if len(parts) > 1:
                        headers = {k: v for k, v in headers.items() if k != grouping.LENGTHS_HEADER}
                    await self._redeliver(
                        conn, queue, part, redeliver, attempt, failures + failed, headers
                    )
            if conn.alive:
                conn.client.ack(conn.consume_ch, msg.delivery_tag)
        except Exception as e:
            # The connection went away: the broker gives the message to a consumer again.
            log.info(
                "could not settle a message of {queue}: {error}",
                queue=queue,
                error=str(e) or type(e).__name__,
            )

    async def _call(self, handler: Handler, message: BusMessage) -> tuple[float | None, int]:
        """Call the handler: (None, 0) when it succeeded, else (when to deliver the
        message again, 1 for an unexpected failure or 0 for a Requeue)."""
        try:
            await handler(message)
        except Requeue as r:
            return r.delay, 0
        except Exception:
            log.failure("handler for queue {queue} failed; message requeued", queue=message.queue)
            return self._default_delay, 1
        return None, 0

    async def _call_parts(
        self,
        handler: Handler,
        queue: str,
        parts: list[bytes],
        routing_key: str,
        tag: str,
        attempt: int,
    ) -> list[tuple[float | None, int]]:
        """``_call`` for each event of a batch. The broker's prefetch counts messages, so
        the events of batches in hand at once are held to the prefetch here; an event
        waiting for its turn is only its bytes."""
        runs = []
        for n, part in enumerate(parts):
            await self._part_slots.take()  # a finished event hands its slot over
            message = BusMessage(queue, part, routing_key, f"{tag}.{n}", attempt)
            run = Deferred.fromCoroutine(self._call(handler, message))
            run.addBoth(self._part_done)
            runs.append(run)
        # Each run fires with its outcome (``_call`` does not raise); most have fired by
        # now. A DeferredList was 3% of an event's CPU here.
        return [await run for run in runs]

    def _part_done(self, outcome: Any) -> Any:
        self._part_slots.release()
        return outcome

    async def _redeliver(
        self,
        conn: _Connection,
        queue: str,
        body: bytes,
        delay: float,
        attempt: int,
        failures: int,
        headers: dict[str, Any],
    ) -> None:
        if failures >= self._max_failures:
            log.error(
                "message on {queue} failed {n} times; moved to {dead}",
                queue=queue,
                n=failures,
                dead=f"{self._ns}.dead",
            )
            await self._publish_now(
                conn, "", f"{self._ns}.dead", body, headers, "application/octet-stream", None
            )
        else:
            # A copy goes to the delay queue (confirmed) before the original is acked:
            # a crash in between repeats the message, never loses it.
            await self._send(queue, body, delay, attempt + 1, failures)

    def connected(self) -> bool:
        return self._conn is not None and self._conn.alive
