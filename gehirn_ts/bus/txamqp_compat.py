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
   ``delivery-mode`` is lost with only a log line); ``content`` refuses them.
6. Publisher confirms (``basic.ack`` / ``basic.nack`` from the broker) and deliveries
   reach ``BusDelegate``, which hands them to callbacks instead of txamqp's queues.

Patches 2 and 3 apply process-wide when this module is imported; nothing else in
gehirn-ts imports txamqp.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from txamqp import codec as _codec
from txamqp import spec as _spec
from txamqp.client import TwistedDelegate
from txamqp.connection import Body, Frame
from txamqp.content import Content
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


def _encode_table(c: Any, table: dict[str, Any]) -> None:
    c.write(_table_bytes(table))


_codec.Codec.decode_table = _decode_table
_codec.Codec.encode_table = _encode_table


# --- 5: content properties by their specification names ---


def content(body: bytes, **properties: Any) -> Content:
    """A message body with properties named as in the spec (``delivery-mode``...).

    Python keyword names use '_' (``delivery_mode=2``); they are mapped to the spec's
    names, and a name the spec does not know raises instead of being dropped.
    """
    known = {f.name for f in load_spec().classes.byname["basic"].fields}
    props = {}
    for name, value in properties.items():
        spec_name = name.replace("_", "-")
        if spec_name not in known:
            raise ValueError(f"unknown AMQP basic property {name!r}")
        props[spec_name] = value
    return Content(bytes(body), properties=props)


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


class BusClient(AMQClient):  # type: ignore[misc]
    def send_init_string(self) -> None:
        self.transport.write(PROTOCOL_HEADER)

    def connectionLost(self, reason: Any) -> None:
        log.info("AMQP connection lost: {reason}", reason=reason.getErrorMessage())
        super().connectionLost(reason)

    def login(self, user: str, password: str) -> Deferred[Any]:
        """SASL PLAIN (RFC 4616), as bytes so that non-ASCII passwords keep their length."""
        response = b"\0" + user.encode() + b"\0" + password.encode()
        d: Deferred[Any] = self.start(response, mechanism="PLAIN")
        return d
