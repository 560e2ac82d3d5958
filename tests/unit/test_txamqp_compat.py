"""Each weak spot of txamqp 0.8.2 that gehirn_ts.bus.txamqp_compat handles."""

from __future__ import annotations

import io
import struct
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from txamqp.codec import Codec
from txamqp.connection import Body, Frame, Header, Method
from txamqp.protocol import FrameReceiver

from gehirn_ts.bus import txamqp_compat as compat
from gehirn_ts.bus.amqp import AmqpUrl, delay_bucket

# Class and method indexes, and the fields of the methods a client sends, as the
# AMQP 0-9-1 specification (and RabbitMQ's extensions for confirms) define them.
SPEC_IDS = {
    "connection": (
        10,
        {
            "start": 10,
            "start-ok": 11,
            "secure": 20,
            "secure-ok": 21,
            "tune": 30,
            "tune-ok": 31,
            "open": 40,
            "open-ok": 41,
            "close": 50,
            "close-ok": 51,
        },
    ),
    "channel": (
        20,
        {"open": 10, "open-ok": 11, "flow": 20, "flow-ok": 21, "close": 40, "close-ok": 41},
    ),
    "exchange": (40, {"declare": 10, "declare-ok": 11}),
    "queue": (
        50,
        {
            "declare": 10,
            "declare-ok": 11,
            "bind": 20,
            "bind-ok": 21,
            "purge": 30,
            "purge-ok": 31,
            "delete": 40,
            "delete-ok": 41,
        },
    ),
    "basic": (
        60,
        {
            "qos": 10,
            "qos-ok": 11,
            "consume": 20,
            "consume-ok": 21,
            "cancel": 30,
            "cancel-ok": 31,
            "publish": 40,
            "return": 50,
            "deliver": 60,
            "get": 70,
            "get-ok": 71,
            "get-empty": 72,
            "ack": 80,
            "reject": 90,
            "recover-async": 100,
            "recover": 110,
            "recover-ok": 111,
            "nack": 120,
        },
    ),
    "confirm": (85, {"select": 10, "select-ok": 11}),
}
SENT_FIELDS = {
    ("connection", "start-ok"): [
        ("client-properties", "table"),
        ("mechanism", "shortstr"),
        ("response", "longstr"),
        ("locale", "shortstr"),
    ],
    ("connection", "tune-ok"): [
        ("channel-max", "short"),
        ("frame-max", "long"),
        ("heartbeat", "short"),
    ],
    ("connection", "open"): [
        ("virtual-host", "shortstr"),
        ("reserved-1", "shortstr"),
        ("reserved-2", "bit"),
    ],
    ("connection", "close"): [
        ("reply-code", "short"),
        ("reply-text", "shortstr"),
        ("class-id", "short"),
        ("method-id", "short"),
    ],
    ("connection", "close-ok"): [],
    ("channel", "open"): [("reserved-1", "shortstr")],
    ("channel", "close-ok"): [],
    ("exchange", "declare"): [
        ("reserved-1", "short"),
        ("exchange", "shortstr"),
        ("type", "shortstr"),
        ("passive", "bit"),
        ("durable", "bit"),
        ("auto-delete", "bit"),
        ("internal", "bit"),
        ("no-wait", "bit"),
        ("arguments", "table"),
    ],
    ("queue", "declare"): [
        ("reserved-1", "short"),
        ("queue", "shortstr"),
        ("passive", "bit"),
        ("durable", "bit"),
        ("exclusive", "bit"),
        ("auto-delete", "bit"),
        ("no-wait", "bit"),
        ("arguments", "table"),
    ],
    ("queue", "bind"): [
        ("reserved-1", "short"),
        ("queue", "shortstr"),
        ("exchange", "shortstr"),
        ("routing-key", "shortstr"),
        ("no-wait", "bit"),
        ("arguments", "table"),
    ],
    ("basic", "qos"): [("prefetch-size", "long"), ("prefetch-count", "short"), ("global", "bit")],
    ("basic", "consume"): [
        ("reserved-1", "short"),
        ("queue", "shortstr"),
        ("consumer-tag", "shortstr"),
        ("no-local", "bit"),
        ("no-ack", "bit"),
        ("exclusive", "bit"),
        ("no-wait", "bit"),
        ("arguments", "table"),
    ],
    ("basic", "cancel"): [("consumer-tag", "shortstr"), ("no-wait", "bit")],
    ("basic", "publish"): [
        ("reserved-1", "short"),
        ("exchange", "shortstr"),
        ("routing-key", "shortstr"),
        ("mandatory", "bit"),
        ("immediate", "bit"),
    ],
    ("basic", "ack"): [("delivery-tag", "longlong"), ("multiple", "bit")],
    ("confirm", "select"): [("nowait", "bit")],
}
BASIC_PROPERTIES = [
    "content-type",
    "content-encoding",
    "headers",
    "delivery-mode",
    "priority",
    "correlation-id",
    "reply-to",
    "expiration",
    "message-id",
    "timestamp",
    "type",
    "user-id",
    "app-id",
    "reserved",
]


def test_spec_ids_match_the_specification():
    spec = compat.load_spec()
    assert (spec.major, spec.minor) == (0, 9)
    assert {c.name for c in spec.classes} == set(SPEC_IDS)
    for klass in spec.classes:
        class_id, methods = SPEC_IDS[klass.name]
        assert klass.id == class_id, klass.name
        assert {m.name: m.id for m in klass.methods} == methods, klass.name


def test_fields_of_sent_methods_match_the_specification():
    spec = compat.load_spec()
    for (klass, method), fields in SENT_FIELDS.items():
        m = spec.classes.byname[klass].methods.byname[method]
        assert [(f.name, f.type) for f in m.fields] == fields, (klass, method)
    assert [f.name for f in spec.classes.byname["basic"].fields] == BASIC_PROPERTIES


def test_frame_constants():
    spec = compat.load_spec()
    values = {c.name: c.id for c in spec.constants}
    assert values["frame-method"] == 1 and values["frame-header"] == 2
    assert values["frame-body"] == 3 and values["frame-heartbeat"] == 8
    assert values["frame-end"] == 206


def _frame_bytes(frame: Frame) -> bytes:
    receiver = FrameReceiver(compat.load_spec())
    return receiver._pack_frame(frame)


@pytest.mark.parametrize("body", ["grüße 🚀 日本語".encode(), b"\xff\xfe\x00binary", b""])
def test_body_frames_stay_bytes(body):
    receiver = FrameReceiver(compat.load_spec())
    frame = receiver._unpack_frame(_frame_bytes(Frame(1, Body(body))))
    # Unpatched txamqp returns str here, and counts its length in characters.
    assert isinstance(frame.payload.content, bytes)
    assert frame.payload.content == body


FIELD_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=12), FIELD_VALUES, max_size=6))
def test_tables_round_trip(table):
    buf = io.BytesIO()
    Codec(buf).encode_table(table)
    decoded = Codec(io.BytesIO(buf.getvalue())).decode_table()
    assert decoded == table


def test_x_death_table_from_rabbitmq_decodes():
    # What RabbitMQ puts in headers when a TTL queue dead-letters a message: an array
    # of tables with a 64-bit count and a timestamp. Unpatched txamqp raises on 'A'.
    inner = (
        b"\x05count"
        + b"l"
        + struct.pack("!q", 3)
        + b"\x04time"
        + b"T"
        + struct.pack("!Q", 1_700_000_000)
        + b"\x06reason"
        + b"S"
        + struct.pack("!L", 7)
        + b"expired"
    )
    inner_table = struct.pack("!L", len(inner)) + inner
    array = b"F" + inner_table
    body = b"\x07x-death" + b"A" + struct.pack("!L", len(array)) + array
    raw = struct.pack("!L", len(body)) + body
    decoded = Codec(io.BytesIO(raw)).decode_table()
    assert decoded == {
        "x-death": [
            {
                "count": 3,
                "time": datetime.fromtimestamp(1_700_000_000, UTC),
                "reason": "expired",
            }
        ]
    }


def _txamqp_publish(
    channel: int, exchange: str, key: str, body: bytes, props: dict, frame_max: int
) -> bytes:
    """The frames txamqp's ``basic_publish`` and ``write_content`` send, packed by
    txamqp's own encoder."""
    spec = compat.load_spec()
    basic = spec.classes.byname["basic"]
    frames = [
        Frame(channel, Method(basic.methods.byname["publish"], 0, exchange, key, False, False)),
        Frame(channel, Header(basic, 0, len(body), **props)),
    ]
    step = frame_max - 8
    frames += [Frame(channel, Body(body[i : i + step])) for i in range(0, len(body), step)]
    return b"".join(_frame_bytes(f) for f in frames)


def _properties(text: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {},
        optional={
            "content-type": text,
            "content-encoding": text,
            "headers": st.dictionaries(st.text(max_size=12), FIELD_VALUES, max_size=4),
            "delivery-mode": st.integers(0, 255),
            "priority": st.integers(0, 255),
            "correlation-id": text,
            "reply-to": text,
            "expiration": text,
            "message-id": text,
            "timestamp": st.integers(0, 2**63 - 1),
            "type": text,
            "user-id": text,
            "app-id": text,
        },
    )


# txamqp writes a short string's length in characters, not bytes: only ASCII text
# comes out right from it (see the next test).
ASCII = st.text(st.characters(max_codepoint=127), max_size=40)


@given(
    st.integers(0, 65535),
    ASCII,
    ASCII,
    st.binary(max_size=3000),
    _properties(ASCII),
    st.sampled_from([9, 64, 1000, 4096, 131072]),
)
def test_published_frames_are_txamqps_byte_for_byte(channel, exchange, key, body, props, fmax):
    ours = compat.publish_frames(channel, exchange, key, body, props, fmax)
    assert ours == _txamqp_publish(channel, exchange, key, body, props, fmax)


@given(st.text(max_size=40), st.text(max_size=60), _properties(st.text(max_size=30)))
def test_any_text_is_read_back_from_the_published_frames(exchange, key, props):
    # A short string's length is its UTF-8 bytes (AMQP 0-9-1 section 4.2.5.3); with
    # txamqp's length in characters the broker would read past the field.
    data = compat.publish_frames(5, exchange, key, b"body", props, 4096)
    receiver = FrameReceiver(compat.load_spec())
    frames = []
    while data:
        end = 8 + struct.unpack("!L", data[3:7])[0]
        frames.append(receiver._unpack_frame(data[:end]))
        data = data[end:]
    method, header, body = frames
    assert method.payload.args[1:3] == (exchange, key)
    assert header.payload.properties == props
    assert body.payload.content == b"body"


@given(st.integers(0, 65535), st.integers(0, 2**64 - 1))
def test_an_ack_frame_is_txamqps_byte_for_byte(channel, tag):
    ack = compat.load_spec().classes.byname["basic"].methods.byname["ack"]
    assert compat.ack_frame(channel, tag) == _frame_bytes(Frame(channel, Method(ack, tag, False)))


def test_misspelt_property_is_refused():
    with pytest.raises(ValueError, match="deliverymode"):
        compat.publish_frames(1, "", "q", b"", {"deliverymode": 2}, 4096)


HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"


def _client_with_heartbeat(interval: int) -> tuple[compat.BusClient, StringTransport, Clock]:
    clock = Clock()
    client = compat.BusClient(compat.BusDelegate(), "/", compat.load_spec(), interval, clock)
    transport = StringTransport()
    client.makeConnection(transport)
    client.started.fire()  # the broker's connection.open-ok: the heartbeats start
    transport.clear()
    return client, transport, clock


def test_a_heartbeat_goes_out_after_an_interval_with_nothing_sent():
    client, transport, clock = _client_with_heartbeat(10)
    ack = compat.load_spec().classes.byname["basic"].methods.byname["ack"]
    for _ in range(5):  # frames every 9 s: no heartbeat is needed
        clock.advance(9)
        client.send_frame(Frame(1, Method(ack, 1, False)))
    assert HEARTBEAT not in transport.value()
    transport.clear()
    clock.advance(9.9)
    assert transport.value() == b""
    clock.advance(0.2)
    assert transport.value() == HEARTBEAT
    clock.advance(10)  # and one every interval while nothing else goes out
    assert transport.value() == HEARTBEAT * 2


def test_a_silent_peer_is_given_up_after_three_intervals():
    client, transport, clock = _client_with_heartbeat(10)
    for _ in range(6):  # a heartbeat from the broker every 20 s keeps it
        clock.advance(20)
        client.dataReceived(HEARTBEAT)
    assert not transport.disconnecting
    clock.advance(29)
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting
    client.connectionLost(Failure(ConnectionDone()))
    assert [c for c in clock.getDelayedCalls() if c.active()] == []
    # A frame sent or received after the loss arms no timer again.
    ack = compat.load_spec().classes.byname["basic"].methods.byname["ack"]
    client.send_frame(Frame(1, Method(ack, 1, False)))
    client.dataReceived(HEARTBEAT)
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


def test_frames_are_written_when_sent():
    client, transport, _ = _client_with_heartbeat(0)
    ack = compat.load_spec().classes.byname["basic"].methods.byname["ack"]
    client.outgoing.put(Frame(3, Method(ack, 7, False)))
    assert transport.value() == compat.ack_frame(3, 7)


def test_client_sends_the_0_9_1_protocol_header():
    client = compat.BusClient(compat.BusDelegate(), "/", compat.load_spec())
    transport = StringTransport()
    client.makeConnection(transport)
    assert transport.value() == b"AMQP\x00\x00\x09\x01"


@given(st.floats(min_value=0, max_value=7 * 86400))
def test_delay_buckets_round_up_by_at_most_ten_percent(seconds):
    ms = delay_bucket(seconds)
    wanted = max(seconds * 1000, 50)
    assert wanted <= ms <= wanted * 1.1 + 1


def test_few_delay_queues_cover_a_week():
    buckets = {delay_bucket(s / 10) for s in range(0, 7 * 86400 * 10, 997)}
    assert len(buckets) < 150


def test_amqp_urls():
    url = AmqpUrl.parse("amqps://u%40x:p%2Fw@broker.example:5999/prod%2Fv")
    assert (url.host, url.port, url.user, url.password, url.vhost, url.tls) == (
        "broker.example",
        5999,
        "u@x",
        "p/w",
        "prod/v",
        True,
    )
    assert AmqpUrl.parse("amqp://h/").vhost == "/"
    assert AmqpUrl.parse("amqp://h").port == 5672
    for bad in ("http://h/", "amqp:///x"):
        with pytest.raises(ValueError):
            AmqpUrl.parse(bad)


def test_a_delivery_on_an_open_channel_reaches_the_delegate_whole():
    client, _, _ = _client_with_heartbeat(10)
    got: list = []
    client.delegate.on_deliver = lambda ch, msg: got.append((ch.id, msg))
    client.channel(1)  # opened, as the bus opens its consume channel
    spec = compat.load_spec()
    basic = spec.classes.byname["basic"]
    deliver = basic.methods.byname["deliver"]
    body = "grüße".encode() * 3000  # three body frames at txamqp's 4096-byte frames
    frames = [Frame(1, Method(deliver, "ctag", 7, False, "ex", "a.b"))]
    frames.append(Frame(1, Header(basic, 0, len(body), **{"message-id": "m1"})))
    frames += [Frame(1, Body(body[i : i + 4088])) for i in range(0, len(body), 4088)]
    data = b"".join(_frame_bytes(f) for f in frames)
    for i in range(0, len(data), 1000):  # in pieces, as TCP hands them over
        client.dataReceived(data[i : i + 1000])
    [(channel, message)] = got
    assert channel == 1 and message.delivery_tag == 7 and message.routing_key == "a.b"
    assert message.content.body == body
    assert message.content.properties == {"message-id": "m1"}


def _basic(name: str) -> Any:
    return compat.load_spec().classes.byname["basic"].methods.byname[name]


def _deliver_frames(channel: int, tag: int, body: bytes) -> list[Frame]:
    basic = compat.load_spec().classes.byname["basic"]
    frames = [Frame(channel, Method(_basic("deliver"), "ctag", tag, False, "ex", "k"))]
    frames.append(Frame(channel, Header(basic, 0, len(body))))
    return frames + [Frame(channel, Body(body[i : i + 4088])) for i in range(0, len(body), 4088)]


def test_messages_reach_the_delegate_in_the_order_their_frames_came():
    client, transport, _ = _client_with_heartbeat(0)
    seen: list = []
    client.delegate.on_deliver = lambda ch, msg: seen.append(("deliver", msg.content.body))
    client.delegate.on_confirm = lambda ch, tag, multiple, ack: seen.append(("confirm", tag))
    client.channel(1)
    client.channel(2)
    frames = _deliver_frames(2, 1, b"first")
    frames.append(Frame(1, Method(_basic("ack"), 5, False)))  # a publish confirmed
    frames += _deliver_frames(2, 2, b"")  # an empty body: no body frame
    frames += _deliver_frames(2, 3, b"x" * 5000)
    client.dataReceived(b"".join(_frame_bytes(f) for f in frames))
    assert seen == [
        ("deliver", b"first"),
        ("confirm", 5),
        ("deliver", b""),
        ("deliver", b"x" * 5000),
    ]
    assert not transport.disconnecting


def test_an_answer_goes_to_the_waiting_request_and_a_broken_sequence_closes():
    client, transport, _ = _client_with_heartbeat(0)
    channel = client.channel(1).result
    queue = compat.load_spec().classes.byname["queue"]
    waiting = channel.responses.get()
    declare_ok = Frame(1, Method(queue.methods.byname["declare-ok"], "q", 0, 0))
    client.dataReceived(_frame_bytes(declare_ok))
    assert waiting.result.payload.args == ("q", 0, 0)
    # A body frame where a content header belongs: the connection is given up, as
    # txamqp gives it up when a message cannot be handled.
    frames = _deliver_frames(1, 1, b"abc")
    client.dataReceived(_frame_bytes(frames[0]) + _frame_bytes(frames[2]))
    assert transport.disconnecting or client.closed


STREAM_ITEMS = st.lists(
    st.one_of(
        st.tuples(
            st.just("deliver"),
            st.binary(max_size=9000),
            # ASCII: txamqp's encoder, which makes these frames, counts characters.
            st.dictionaries(
                st.sampled_from(["message-id", "content-type"]),
                st.text(st.characters(max_codepoint=127), max_size=20),
            ),
        ),
        st.tuples(st.just("ack"), st.booleans()),
        st.tuples(st.just("nack"), st.booleans()),
        st.tuples(st.just("heartbeat")),
        st.tuples(st.just("declare-ok")),
    ),
    max_size=12,
)


@given(STREAM_ITEMS, st.lists(st.integers(1, 5000), min_size=1, max_size=8))
def test_any_stream_in_any_pieces_reaches_the_bus_in_order(items, cuts):
    """Deliveries, confirms, heartbeats and answers, in one stream cut anywhere: each
    delivery whole with its properties, each confirm as ack or nack, all in order;
    answers still reach the request that waits."""
    client, transport, _ = _client_with_heartbeat(0)
    seen: list = []
    client.delegate.on_deliver = lambda ch, msg: seen.append(
        ("deliver", ch.id, msg.delivery_tag, msg.content.body, msg.content.properties)
    )
    client.delegate.on_confirm = lambda ch, tag, multiple, ack: seen.append(
        ("ack" if ack else "nack", ch, tag, multiple)
    )
    channel = client.channel(1).result
    client.channel(2)
    basic = compat.load_spec().classes.byname["basic"]
    declare_ok = compat.load_spec().classes.byname["queue"].methods.byname["declare-ok"]
    data, expected, answers = b"", [], []
    for n, item in enumerate(items):
        if item[0] == "deliver":
            _, body, properties = item
            frames = [Frame(2, Method(_basic("deliver"), "ctag", n, False, "ex", "k"))]
            frames.append(Frame(2, Header(basic, 0, len(body), **properties)))
            frames += [Frame(2, Body(body[i : i + 4088])) for i in range(0, len(body), 4088)]
            data += b"".join(_frame_bytes(f) for f in frames)
            expected.append(("deliver", 2, n, body, properties))
        elif item[0] in ("ack", "nack"):
            fields = (n, item[1]) if item[0] == "ack" else (n, item[1], False)  # requeue
            data += _frame_bytes(Frame(1, Method(_basic(item[0]), *fields)))
            expected.append((item[0], 1, n, item[1]))
        elif item[0] == "heartbeat":
            data += HEARTBEAT
        else:
            answers.append(channel.responses.get())
            data += _frame_bytes(Frame(1, Method(declare_ok, f"q{n}", n, 0)))
    at = 0
    for cut in cuts:
        client.dataReceived(data[at : at + cut])
        at += cut
    client.dataReceived(data[at:])
    assert seen == expected
    assert [a.result.payload.args[0] for a in answers] == [
        f"q{n}" for n, item in enumerate(items) if item[0] == "declare-ok"
    ]
    assert not transport.disconnecting


def test_another_method_with_content_reaches_the_delegate_whole():
    """basic.return (a message the broker could not route) carries content too: its
    frames are read as a delivery's and the delegate gets txamqp's Message."""
    client, transport, _ = _client_with_heartbeat(0)
    returned: list = []
    client.delegate.basic_return_ = lambda ch, msg: returned.append((ch.id, msg))
    client.channel(1)
    basic = compat.load_spec().classes.byname["basic"]
    body = b"r" * 5000
    frames = [Frame(1, Method(_basic("return"), 312, "NO_ROUTE", "ex", "k"))]
    frames.append(Frame(1, Header(basic, 0, len(body), **{"message-id": "m9"})))
    frames += [Frame(1, Body(body[i : i + 4088])) for i in range(0, len(body), 4088)]
    data = b"".join(_frame_bytes(f) for f in frames)
    for i in range(0, len(data), 700):
        client.dataReceived(data[i : i + 700])
    [(channel, message)] = returned
    assert channel == 1 and message.reply_code == 312 and message.routing_key == "k"
    assert message.content.body == body
    assert message.content.properties == {"message-id": "m9"}
    assert not transport.disconnecting


def test_a_frame_over_frame_max_closes_the_connection():
    client, transport, _ = _client_with_heartbeat(0)
    client.channel(1)
    frame = _frame_bytes(Frame(1, Body(b"x" * 5000)))  # frame_max is txamqp's 4096 here
    client.dataReceived(frame[:4200])
    assert transport.disconnecting


def _same_frame(ours: Any, theirs: Any) -> None:
    assert ours is not None
    assert (ours.channel, type(ours.payload)) == (theirs.channel, type(theirs.payload))
    payload, expected = ours.payload, theirs.payload
    if isinstance(expected, Method):
        assert payload.method is expected.method and payload.args == expected.args
    elif isinstance(expected, Header):
        assert payload.klass is expected.klass
        assert (payload.weight, payload.size) == (expected.weight, expected.size)
        assert payload.properties == expected.properties
    else:
        assert getattr(payload, "content", None) == getattr(expected, "content", None)


@given(
    st.integers(0, 65535),
    st.text(max_size=40),
    st.integers(0, 2**64 - 1),
    st.booleans(),
    st.text(max_size=40),
    st.text(max_size=60),
)
def test_a_delivery_method_frame_reads_as_txamqp_reads_it(channel, tag, n, again, exchange, key):
    spec = compat.load_spec()
    deliver = spec.classes.byname["basic"].methods.byname["deliver"]
    # Packed with short strings counted in bytes (as RabbitMQ sends them).
    method = (
        struct.pack("!HH", 60, 60)
        + compat._shortstr(tag)
        + struct.pack("!QB", n, int(again))
        + compat._shortstr(exchange)
        + compat._shortstr(key)
    )
    data = compat._frame(1, channel, method)
    ours = compat.unpack_frame(data)
    _same_frame(ours, FrameReceiver(spec)._unpack_frame(data))
    assert ours.payload.method is deliver and ours.payload.args[1:3] == (n, again)


@given(
    st.integers(0, 65535),
    st.integers(0, 2**64 - 1),
    st.booleans(),
    _properties(ASCII),
    st.binary(max_size=200),
)
def test_confirms_headers_and_bodies_read_as_txamqp_reads_them(channel, tag, multiple, props, body):
    spec = compat.load_spec()
    ack = spec.classes.byname["basic"].methods.byname["ack"]
    frames = [
        _frame_bytes(Frame(channel, Method(ack, tag, multiple))),
        _frame_bytes(Frame(channel, Header(spec.classes.byname["basic"], 0, len(body), **props))),
        _frame_bytes(Frame(channel, Body(body))),
        HEARTBEAT,
    ]
    for data in frames:
        _same_frame(compat.unpack_frame(data), FrameReceiver(spec)._unpack_frame(data))


def test_a_header_table_read_again_is_a_new_dict_and_nested_tables_are_not_kept():
    spec = compat.load_spec()
    basic = spec.classes.byname["basic"]

    def headers(table: dict) -> dict:
        data = _frame_bytes(Frame(1, Header(basic, 0, 0, headers=table)))
        return compat.unpack_frame(data).payload.properties["headers"]

    for _ in range(2):  # decoded, then kept: what one reader does with its dict stays there
        headers({"x-attempt": 2, "x-failures": 1})["x-attempt"] = 99
    assert headers({"x-attempt": 2, "x-failures": 1}) == {"x-attempt": 2, "x-failures": 1}
    death = {"x-death": [{"count": 1, "queue": "q"}]}
    one, two = headers(death), headers(death)
    assert one == two == death and one["x-death"] is not two["x-death"]


def test_other_frames_are_left_to_txamqp():
    spec = compat.load_spec()
    queue = spec.classes.byname["queue"]
    declare_ok = _frame_bytes(Frame(1, Method(queue.methods.byname["declare-ok"], "q", 0, 0)))
    qos_ok = _frame_bytes(Frame(1, Method(spec.classes.byname["basic"].methods.byname["qos-ok"])))
    assert compat.unpack_frame(declare_ok) is None and compat.unpack_frame(qos_ok) is None
    assert compat.unpack_frame(declare_ok[:-1] + b"\x00") is None  # no frame end
