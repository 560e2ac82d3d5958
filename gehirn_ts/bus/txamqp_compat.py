"""Everything gehirn-ts needs from txamqp 0.8.2, and the fixes it needs, in one place.

txamqp's weak spots, each covered by tests/unit/test_txamqp_compat.py:

1. It does not ship the AMQP 0-9-1 spec file its factory expects: ``amqp0-9-1.xml``
   beside this module is ours (``load_spec``).
2. It decodes body frames as text (``Codec.dec_str`` tries UTF-8): a body with
   multi-byte UTF-8 is then counted in characters, never reaches its byte size, and
   the consumer waits for ever. ``_BinaryBody`` replaces the body-frame decoder so
   bodies stay bytes, across any number of frames.
3. Its field-table codec knows only the types S, I, F and t; RabbitMQ puts arrays,
   timestamps and 64-bit integers into ``x-death`` when it dead-letters a message
   (as our delay queues do), which would break decoding. ``_decode_table`` /
   ``_encode_table`` implement every 0-9-1 field type (RabbitMQ's errata table).
4. It sends the 0-9 protocol header; ``BusClient`` sends 0-9-1's (AMQP 0 0 9 1).
5. It drops unknown content property names silently (``delivery_mode`` instead of
   ``delivery-mode`` is lost with only a log line); ``publish_frames`` refuses them.
6. Publisher confirms (``basic.ack`` / ``basic.nack`` from the broker) and deliveries
   reach ``BusDelegate``, which hands them to callbacks instead of txamqp's queues.
7. It stops and restarts its heartbeat timers for every frame sent and received (a
   LoopingCall restarted, a delayed call cancelled and made again: about 5% of an
   event's CPU on RabbitMQ). ``BusClient`` moves its timers later instead, which
   Twisted does without touching its timer heap.
8. Every frame it sends goes through a DeferredQueue (a Deferred a frame) and its
   Python encoder, a Codec over BytesIO. ``BusClient`` writes frames as they are sent,
   and packs what it sends for every message itself: ``publish_frames``
   (basic.publish, its content header, its body) and ``ack_frame`` (basic.ack), both
   checked byte for byte against txamqp's own encoding. They also write a short
   string's length in bytes: txamqp counts characters, so a non-ASCII routing key or
   message id made a frame the broker could not parse.
9. It hands every frame received through a lock and three inlineCallbacks generators
   (two ending in the deprecated ``returnValue``) and two DeferredQueues before the
   delegate sees a message. ``BusClient.process_frame`` takes a channel that exists
   from its dict and gives the delegate each message in the order its frames came
   (a message with content once its frames are read, as 10 reads them); answers to
   our own requests (``queue.declare-ok``...) still go to the channel's queue, where
   txamqp waits for them. ``unpack_frame`` reads the basic.deliver, basic.ack,
   content header, body and heartbeat frames that come this way (those of a channel
   not open yet) with struct instead of txamqp's Codec, into the same objects
   (checked against txamqp's decoder); any other frame is left to txamqp. A header
   table of immutable values is decoded once and copied after (``_read_table``).
10. Its frame reader (``FrameReceiver.dataReceived``) cuts each frame off the front of
   its buffer, copying the rest every time (a read of a hundred frames copies it a
   hundred times), and makes txamqp objects of every frame. ``BusClient.dataReceived``
   reads the frames where they lie and hands the bus each delivery (basic.deliver and
   its content, as a ``Delivery``) and each confirm itself; every other frame goes the
   way of 9. One reader puts every message's content together (a delivery's, or a
   basic.return's). Together about a tenth of an event's CPU on RabbitMQ
   (docs/performance.md).

Patches 2 and 3 apply process-wide when this module is imported; nothing else in
gehirn-ts imports txamqp.
"""

from __future__ import annotations

import functools
import io
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from txamqp import codec as _codec
from txamqp import spec as _spec
from txamqp.client import TwistedDelegate
from txamqp.connection import Body, Frame, Header, Heartbeat, Method
from txamqp.content import Content
from txamqp.message import Message
from txamqp.protocol import AMQClient

from gehirn_ts.logs import Logger

log = Logger()

SPEC_PATH = Path(__file__).with_name("amqp0-9-1.xml")
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"  # AMQP 0-9-1 section 4.2.2


@functools.cache
def load_spec() -> Any:
    return _spec.load(str(SPEC_PATH))


# --- 2: binary bodies ---


class _BinaryBody(Body):  # type: ignore[misc]
    """A body frame whose payload stays bytes (registered as the body-frame decoder)."""

    type = Frame.BODY

    def encode(self, enc: Any) -> None:
        enc.encode_longbytes(bytes(self.content))

    @staticmethod
    def decode(spec: Any, dec: Any) -> _BinaryBody:
        return _BinaryBody(dec.decode_longbytes())


# --- 3: complete field tables (AMQP 0-9-1 section 4.2.5.5, RabbitMQ's type letters) ---


def _decode_value(c: Any, kind: bytes) -> Any:
    fixed = {
        b"b": "!b",
        b"B": "!B",
        b"s": "!h",
        b"u": "!H",
        b"I": "!i",
        b"i": "!I",
        b"l": "!q",
        b"L": "!Q",
        b"f": "!f",
        b"d": "!d",
    }
    if kind in fixed:
        fmt = fixed[kind]
        (value,) = struct.unpack(fmt, c.read(struct.calcsize(fmt)))
        return value
    if kind == b"t":
        return c.read(1) != b"\x00"
    if kind == b"S":
        return c.dec_str("!L")
    if kind == b"x":
        return c.dec_bytes("!L")
    if kind == b"T":
        (ts,) = struct.unpack("!Q", c.read(8))
        return datetime.fromtimestamp(ts, UTC)
    if kind == b"D":
        (scale,) = struct.unpack("!B", c.read(1))
        (raw,) = struct.unpack("!i", c.read(4))
        return Decimal(raw).scaleb(-scale)
    if kind == b"F":
        return _decode_table(c)
    if kind == b"A":
        (size,) = struct.unpack("!L", c.read(4))
        end = c.nread + size
        items = []
        while c.nread < end:
            items.append(_decode_value(c, c.read(1)))
        return items
    if kind == b"V":
        return None
    raise ValueError(f"unknown AMQP field type {kind!r}")


def _decode_table(c: Any) -> dict[str, Any]:
    (size,) = struct.unpack("!L", c.read(4))
    end = c.nread + size
    table: dict[str, Any] = {}
    while c.nread < end:
        key = c.decode_shortstr()
        table[key] = _decode_value(c, c.read(1))
    return table


def _encode_value(value: Any) -> bytes:
    if value is None:
        return b"V"
    if isinstance(value, bool):
        return b"t" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"I" + struct.pack("!i", value)
        return b"l" + struct.pack("!q", value)
    if isinstance(value, float):
        return b"d" + struct.pack("!d", value)
    if isinstance(value, str):
        data = value.encode()
        return b"S" + struct.pack("!L", len(data)) + data
    if isinstance(value, bytes | bytearray):
        return b"x" + struct.pack("!L", len(value)) + bytes(value)
    if isinstance(value, datetime):
        return b"T" + struct.pack("!Q", int(value.timestamp()))
    if isinstance(value, dict):
        return b"F" + _table_bytes(value)
    if isinstance(value, list | tuple):
        body = b"".join(_encode_value(v) for v in value)
        return b"A" + struct.pack("!L", len(body)) + body
    raise TypeError(f"cannot put {type(value).__name__} into an AMQP table")


def _table_bytes(table: dict[str, Any]) -> bytes:
    body = b""
    for key, value in table.items():
        name = key.encode()
        if len(name) > 255:
            raise ValueError(f"table key too long: {key[:20]}...")
        body += struct.pack("!B", len(name)) + name + _encode_value(value)
    return struct.pack("!L", len(body)) + body


# A message's headers are one of a few tables (the bus's attempt counters), read for
# every message: each is decoded once (5.6 -> 0.2 us; 3% of an event's CPU on
# RabbitMQ). Only a table whose values are all immutable is kept, so that a copy of the
# dict is as good as a new one; tables with arrays or nested tables (x-death) are
# always decoded.
_SCALARS = (bool, int, float, str, bytes, type(None))
_TABLES_KEPT = 256
_read_tables: dict[bytes, dict[str, Any]] = {}


def _read_table(data: bytes) -> dict[str, Any]:
    """A field table (its length first) from bytes, through the cache."""
    known = _read_tables.get(data)
    if known is not None:
        return dict(known)
    table = _decode_table(_codec.Codec(io.BytesIO(data)))
    if all(type(v) in _SCALARS for v in table.values()):
        if len(_read_tables) >= _TABLES_KEPT:
            _read_tables.clear()
        _read_tables[data] = dict(table)
    return table


def _encode_table(c: Any, table: dict[str, Any]) -> None:
    c.write(_table_bytes(table))


_codec.Codec.decode_table = _decode_table
_codec.Codec.encode_table = _encode_table


# --- 4 and 6: the client and its delegate ---


class BusDelegate(TwistedDelegate):  # type: ignore[misc]
    """Routes broker-initiated methods to callbacks set by the bus."""

    on_confirm: Callable[[int, int, bool, bool], None] | None = None
    on_deliver: Callable[[Any, Any], None] | None = None

    def basic_ack(self, ch: Any, msg: Any) -> None:
        if self.on_confirm is not None:
            self.on_confirm(ch.id, msg.delivery_tag, msg.multiple, True)

    def basic_nack(self, ch: Any, msg: Any) -> None:
        if self.on_confirm is not None:
            self.on_confirm(ch.id, msg.delivery_tag, msg.multiple, False)

    def basic_deliver(self, ch: Any, msg: Any) -> None:
        if self.on_deliver is not None:
            self.on_deliver(ch, msg)

    def basic_return_(self, ch: Any, msg: Any) -> None:
        log.warn("AMQP message returned: {text}", text=msg.reply_text)


class Delivery:
    """A message the broker delivered: basic.deliver's fields and its content, read by
    attribute as txamqp's ``Message`` is (``msg.delivery_tag``, ``msg.content.body``)."""

    __slots__ = (
        "consumer_tag",
        "content",
        "delivery_tag",
        "exchange",
        "redelivered",
        "routing_key",
    )

    def __init__(
        self,
        consumer_tag: str | bytes,
        delivery_tag: int,
        redelivered: bool,
        exchange: str | bytes,
        routing_key: str | bytes,
    ) -> None:
        self.consumer_tag = consumer_tag
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self.content: Any = None


class _Incoming:
    """A message whose content header and body frames are still to come (10): a
    delivery, or another method with content (txamqp's ``Method``, e.g. basic.return)."""

    __slots__ = ("chunks", "message", "properties", "read", "size")

    def __init__(self, message: Delivery | Method) -> None:
        self.message = message
        self.size = -1  # no content header yet
        self.properties: dict[str, Any] = {}
        self.chunks: list[bytes] = []
        self.read = 0


class _WriteNow:
    """Stands for txamqp's outgoing DeferredQueue: a frame put is a frame sent."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        self.put = send


class BusClient(AMQClient):  # type: ignore[misc]
    checkHB: Any  # txamqp's timer that gives up on a silent peer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Channels take the client's queue when they are made, after this (8).
        self.outgoing = _WriteNow(self.send_frame)
        self._heartbeat_call: Any = None
        self._incoming: dict[int, _Incoming] = {}
        self._inbuf = b""
        # txamqp never sets its own ``closed`` on the client: no timer is armed once
        # the connection is gone, whatever sends a frame after.
        self._lost = False

    def send_init_string(self) -> None:
        self.transport.write(PROTOCOL_HEADER)

    def connectionLost(self, reason: Any) -> None:
        log.info("AMQP connection lost: {reason}", reason=reason.getErrorMessage())
        self._lost = True
        if self._heartbeat_call is not None and self._heartbeat_call.active():
            self._heartbeat_call.cancel()
        super().connectionLost(reason)

    # --- 9: frames received ---

    # --- 10: the frame reader ---

    def dataReceived(self, data: bytes) -> None:
        """The frames in what came, read where they lie; a delivery's frames and the
        broker's confirms are handled here, any other frame the way of 9."""
        if not self.frame_mode:
            super().dataReceived(data)
            return
        buf = self._inbuf + data if self._inbuf else data
        at, end = 0, len(buf)
        try:
            while end - at >= 8 and not self.paused:
                kind, channel, size = _FRAME_HEAD.unpack_from(buf, at)
                stop = at + size + 8
                if stop > end:
                    if end - at > self.MAX_LENGTH:
                        # As txamqp: a frame longer than the negotiated frame_max.
                        log.warn("AMQP frame of {n} bytes is over frame_max", n=size + 8)
                        self.transport.loseConnection()
                        at = end
                    break
                frame = buf[at:stop]
                at = stop
                if not self._take(kind, channel, frame):
                    self.process_frame(self._unpack_frame(frame))
                if self.transport is None or self.transport.disconnecting:
                    break
        finally:
            self._inbuf = buf[at:] if at < end else b""
        self.reschedule_check_heartbeat()

    def _take(self, kind: int, channel_id: int, frame: bytes) -> bool:
        """Handle a frame of a message received or a confirm; False for any other."""
        if frame[-1] != 0xCE:
            return False  # txamqp says what is wrong with it
        if kind == _HEARTBEAT:
            self.last_heartbeat_received = time.time()
            return True
        channel = self.channels.get(channel_id)
        if channel is None:
            return False
        incoming = self._incoming.get(channel_id)
        try:
            if incoming is not None:
                # A content header, then body frames, follow their method with nothing
                # between them on the channel (AMQP 0-9-1 section 4.2.6).
                self._content_frame(incoming, kind, frame)
                if incoming.read >= incoming.size >= 0:
                    del self._incoming[channel_id]
                    message = incoming.message
                    content = Content(b"".join(incoming.chunks), [], incoming.properties)
                    if isinstance(message, Delivery):
                        message.content = content
                        on_deliver = self.delegate.on_deliver
                        if on_deliver is not None:
                            on_deliver(channel, message)
                    else:
                        self.delegate.dispatch(
                            channel, Message(message.method, message.args, content)
                        )
                return True
            if kind != _METHOD or len(frame) < 12:
                return False
            class_id, method_id = _METHOD_ID.unpack_from(frame, 7)
            if class_id != _BASIC:
                return False
            if method_id == _DELIVER:
                self._incoming[channel_id] = _Incoming(Delivery(*_deliver_fields(frame[7:-1])))
                return True
            if method_id in (_BASIC_ACK, _BASIC_NACK) and len(frame) == 21:
                delivery_tag, bits = struct.unpack_from("!QB", frame, 11)
                on_confirm = self.delegate.on_confirm
                if on_confirm is not None:
                    on_confirm(channel_id, delivery_tag, bool(bits & 1), method_id == _BASIC_ACK)
                return True
            return False
        except Exception:
            # As txamqp's worker does when a message cannot be handled.
            self.close(Failure())
            return True

    @staticmethod
    def _content_frame(incoming: _Incoming, kind: int, frame: bytes) -> None:
        if incoming.size < 0:
            if kind != _HEADER or len(frame) < 22:
                raise ValueError(f"expected a content header, got a frame of type {kind}")
            class_id, weight, size, flags = struct.unpack_from("!HHQH", frame, 7)
            if class_id != _BASIC or weight or flags & 1:
                raise ValueError("expected basic's content header")
            incoming.size = size
            incoming.properties = _read_properties(frame[7:-1], flags)
        elif kind == _BODY:
            incoming.chunks.append(frame[7:-1])
            incoming.read += len(frame) - 8
        else:
            raise ValueError(f"expected a body frame, got a frame of type {kind}")

    def _unpack_frame(self, data: bytes) -> Any:
        frame = unpack_frame(data)
        return frame if frame is not None else super()._unpack_frame(data)

    def process_frame(self, frame: Any) -> Any:
        """A frame of a channel that exists (9); the first frame of a new channel goes
        the way txamqp makes channels."""
        channel = self.channels.get(frame.channel)
        if channel is None:
            return super().process_frame(frame)
        if frame.payload.type == Frame.HEARTBEAT:
            self.last_heartbeat_received = time.time()
        else:
            try:
                self._frame_in(channel, frame)
            except Exception:
                # As txamqp's worker does when a message cannot be handled.
                self.close(Failure())
        self.reschedule_check_heartbeat()
        return None

    def _frame_in(self, channel: Any, frame: Any) -> None:
        payload = frame.payload
        if isinstance(payload, Method) and not payload.method.response:
            if payload.method.content:
                # Its content header and body frames are read as a delivery's are (10).
                self._incoming[channel.id] = _Incoming(payload)
            else:
                self.delegate.dispatch(channel, Message(payload.method, payload.args))
            return
        channel.dispatch(frame, self.work)  # an answer that invoke waits for

    # --- 7: heartbeats (AMQP 0-9-1 section 4.2.7) ---

    def reschedule_send_heartbeat(self) -> None:
        """A frame went out: the next heartbeat is due an interval from now."""
        if self.heartbeatInterval <= 0 or self._lost:
            return
        call = self._heartbeat_call
        if call is not None and call.active():
            call.reset(self.heartbeatInterval)
        else:
            self._heartbeat_call = self.clock.callLater(self.heartbeatInterval, self._beat)

    def _beat(self) -> None:
        if self._lost:
            return
        self.send_heartbeat()  # a heartbeat frame does not reschedule itself
        self._heartbeat_call = self.clock.callLater(self.heartbeatInterval, self._beat)

    def reschedule_check_heartbeat(self) -> None:
        """A frame came in: the peer is given up MAX_UNSEEN_HEARTBEAT intervals from now."""
        if self.heartbeatInterval <= 0 or self._lost:
            return
        limit = self.heartbeatInterval * self.MAX_UNSEEN_HEARTBEAT
        if self.checkHB.active():
            self.checkHB.reset(limit)
        else:
            self.checkHB = self.clock.callLater(limit, self.check_heartbeat)

    # --- 8: the frames of every message, packed here ---

    def publish(
        self,
        channel: Any,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: dict[str, Any],
    ) -> None:
        """basic.publish on ``channel`` (as its ``basic_publish``, without a Deferred);
        ``properties`` by their spec names (``delivery-mode``)."""
        if channel.closed:
            channel._raise_closed(channel.reason)
        data = publish_frames(channel.id, exchange, routing_key, body, properties, self.MAX_LENGTH)
        self.reschedule_send_heartbeat()
        self.transport.write(data)

    def ack(self, channel: Any, delivery_tag: int) -> None:
        """basic.ack of one message on ``channel`` (as its ``basic_ack``)."""
        if channel.closed:
            channel._raise_closed(channel.reason)
        self.reschedule_send_heartbeat()
        self.transport.write(ack_frame(channel.id, delivery_tag))

    def login(self, user: str, password: str) -> Deferred[Any]:
        """SASL PLAIN (RFC 4616), as bytes so that non-ASCII passwords keep their length."""
        response = b"\0" + user.encode() + b"\0" + password.encode()
        d: Deferred[Any] = self.start(response, mechanism="PLAIN")
        return d


# AMQP 0-9-1 section 4.2.3: type, channel, size, payload, frame-end.
_METHOD, _HEADER, _BODY = 1, 2, 3
_FRAME_END = b"\xce"
_BASIC = 60
_HEARTBEAT = 8
_DELIVER = 60
_BASIC_PUBLISH, _BASIC_ACK, _BASIC_NACK = 40, 80, 120
_FRAME_HEAD = struct.Struct("!BHL")
_METHOD_ID = struct.Struct("!HH")
# basic's content properties in their order (section 1.8), and how each is written.
_PROPERTIES = (
    ("content-type", "s"),
    ("content-encoding", "s"),
    ("headers", "F"),
    ("delivery-mode", "o"),
    ("priority", "o"),
    ("correlation-id", "s"),
    ("reply-to", "s"),
    ("expiration", "s"),
    ("message-id", "s"),
    ("timestamp", "q"),
    ("type", "s"),
    ("user-id", "s"),
    ("app-id", "s"),
    ("reserved", "s"),
)
_PROPERTY_NAMES = frozenset(name for name, _ in _PROPERTIES)
# name -> its flag bit: a message carries a few of the fourteen.
_PROPERTY_BITS = {name: 1 << (15 - n) for n, (name, _) in enumerate(_PROPERTIES)}


@functools.lru_cache(maxsize=256)
def _flagged(flags: int) -> tuple[tuple[str, str], ...]:
    """The properties a content header's flags say it carries, in their order."""
    return tuple(p for n, p in enumerate(_PROPERTIES) if flags & (1 << (15 - n)))


def _shortstr(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    if len(data) > 255:
        raise ValueError(f"a short string holds 255 bytes, not {len(data)}")
    return bytes((len(data),)) + data


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack("!BHL", kind, channel, len(payload)) + payload + _FRAME_END


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: dict[str, Any],
    frame_max: int,
) -> bytes:
    """The frames of basic.publish (mandatory and immediate off): the method, the
    content header with ``properties`` (spec names), then the body in frames of at
    most ``frame_max`` bytes, as txamqp's ``write_content`` splits it."""
    if not properties.keys() <= _PROPERTY_NAMES:
        unknown = set(properties) - _PROPERTY_NAMES
        raise ValueError(f"unknown AMQP basic properties: {', '.join(sorted(unknown))}")
    method = (
        struct.pack("!HHH", _BASIC, _BASIC_PUBLISH, 0)
        + _shortstr(exchange)
        + _shortstr(routing_key)
        + b"\x00"
    )
    flags = 0
    for name, value in properties.items():
        if value is not None:
            flags |= _PROPERTY_BITS[name]
    values = []
    for name, kind in _flagged(flags):
        value = properties[name]
        if kind == "s":
            values.append(_shortstr(value))
        elif kind == "o":
            values.append(struct.pack("!B", value))
        elif kind == "q":
            values.append(struct.pack("!Q", value))
        else:
            values.append(_table_bytes(value))
    header = struct.pack("!HHQH", _BASIC, 0, len(body), flags) + b"".join(values)
    frames = [_frame(_METHOD, channel, method), _frame(_HEADER, channel, header)]
    step = frame_max - 8
    frames.extend(_frame(_BODY, channel, body[i : i + step]) for i in range(0, len(body), step))
    return b"".join(frames)


def ack_frame(channel: int, delivery_tag: int) -> bytes:
    """basic.ack of one delivery (multiple off)."""
    return _frame(_METHOD, channel, struct.pack("!HHQB", _BASIC, _BASIC_ACK, delivery_tag, 0))


def _text(data: bytes) -> str | bytes:
    # As txamqp's dec_str: text when it is UTF-8, else the bytes.
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data


def _shortstr_at(data: bytes, at: int) -> tuple[str | bytes, int]:
    end = at + 1 + data[at]
    if end > len(data):
        raise ValueError("a short string runs past its frame")
    return _text(data[at + 1 : end]), end


def _deliver_fields(payload: bytes) -> tuple[str | bytes, int, bool, str | bytes, str | bytes]:
    """basic.deliver's consumer tag, delivery tag, redelivered, exchange and routing
    key, from its method frame's payload."""
    tag, at = _shortstr_at(payload, 4)
    delivery_tag, bits = struct.unpack_from("!QB", payload, at)
    exchange, at = _shortstr_at(payload, at + 9)
    key, _ = _shortstr_at(payload, at)
    return tag, delivery_tag, bool(bits & 1), exchange, key


def unpack_frame(data: bytes) -> Frame | None:
    """The frame in ``data`` (one whole frame) as txamqp's decoder makes it, for the
    frames every message brings; None for any other frame (txamqp reads those)."""
    kind, channel, size = struct.unpack_from("!BHL", data)
    if len(data) != size + 8 or data[-1:] != _FRAME_END:
        return None  # txamqp says what is wrong with it
    payload = data[7:-1]
    if kind == _BODY:
        return Frame(channel, _BinaryBody(payload))
    if kind == 8:  # heartbeat
        return Frame(channel, Heartbeat())
    spec = load_spec()
    basic = spec.classes.byid[_BASIC]
    if kind == _METHOD and size >= 4:
        class_id, method_id = struct.unpack_from("!HH", payload)
        if class_id != _BASIC:
            return None
        if method_id == _DELIVER:
            method = basic.methods.byid[_DELIVER]
            return Frame(channel, Method(method, *_deliver_fields(payload)))
        if method_id == _BASIC_ACK and size == 13:
            delivery_tag, bits = struct.unpack_from("!QB", payload, 4)
            return Frame(
                channel, Method(basic.methods.byid[_BASIC_ACK], delivery_tag, bool(bits & 1))
            )
        return None
    if kind == _HEADER and size >= 14:
        class_id, weight, body_size, flags = struct.unpack_from("!HHQH", payload)
        if class_id != _BASIC or flags & 1:
            return None  # more flag words: not basic's 14 properties
        return Frame(channel, Header(basic, weight, body_size, **_read_properties(payload, flags)))
    return None


def _read_properties(payload: bytes, flags: int) -> dict[str, Any]:
    """basic's content properties (spec names) of a content header's payload."""
    properties: dict[str, Any] = {}
    at = 14
    for name, kind in _flagged(flags):
        if kind == "s":
            properties[name], at = _shortstr_at(payload, at)
        elif kind == "o":
            properties[name] = payload[at]
            at += 1
        elif kind == "q":
            properties[name] = struct.unpack_from("!Q", payload, at)[0]
            at += 8
        else:
            length = struct.unpack_from("!L", payload, at)[0]
            table = payload[at : at + 4 + length]
            if len(table) != 4 + length:
                raise ValueError("a table runs past its frame")
            properties[name] = _read_table(table)
            at += 4 + length
    return properties
