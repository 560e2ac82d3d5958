"""Events published together as one AMQP message per type (bus/grouping.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gehirn_ts.bus import grouping
from gehirn_ts.events import Event

TYPES = st.sampled_from(["mail.received", "notice.fault", "payment.done"])
SUBJECTS = st.text(max_size=300)


def _event(n: int, type_: str, subject: str) -> Event:
    return Event(type=type_, source="/t", id=f"e{n}", subject=subject)


@given(
    st.lists(st.tuples(TYPES, SUBJECTS), max_size=40),
    st.integers(1, 7),
    st.integers(200, 3000),
)
def test_groups_keep_every_event_once_by_type_in_order_within_the_limits(
    specs: list[tuple[str, str]], max_events: int, max_bytes: int
) -> None:
    events = [_event(n, t, s) for n, (t, s) in enumerate(specs)]
    groups = grouping.group(events, max_events, max_bytes)
    assert sorted(e.id for g in groups for e in g) == sorted(e.id for e in events)
    for members in groups:
        assert members and len({e.type for e in members}) == 1
        assert len(members) <= max_events
        body, _ = grouping.pack([e.to_json() for e in members])
        assert len(members) == 1 or len(body) <= max_bytes
    for type_ in {e.type for e in events}:
        in_groups = [e.id for g in groups for e in g if e.type == type_]
        assert in_groups == [e.id for e in events if e.type == type_]


def test_events_of_one_type_share_messages_up_to_the_limit() -> None:
    events = [_event(n, "a.b", "") for n in range(250)] + [_event(999, "c.d", "")]
    sizes = [len(g) for g in grouping.group(events)]
    assert sizes == [grouping.MAX_EVENTS, grouping.MAX_EVENTS, 50, 1]


def test_an_event_larger_than_a_message_travels_alone() -> None:
    big = _event(1, "a.b", "x" * 900)
    small = [_event(n, "a.b", "") for n in range(2, 5)]
    groups = grouping.group([small[0], big, *small[1:]], max_bytes=1000)
    assert [[e.id for e in g] for g in groups] == [["e2"], ["e1"], ["e3", "e4"]]


JSON_OBJECTS = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=6,
    ),
    max_size=5,
)


@given(st.lists(JSON_OBJECTS, min_size=1, max_size=8))
def test_a_packed_batch_is_a_json_array_and_unpacks_to_the_same_bytes(
    objects: list[dict[str, Any]],
) -> None:
    bodies = [json.dumps(o, ensure_ascii=False, separators=(",", ":")).encode() for o in objects]
    body, lengths = grouping.pack(bodies)
    assert json.loads(body) == objects
    assert grouping.unpack(body, lengths) == bodies
    # Without the lengths (another publisher's batch): parsed, the same objects.
    assert [json.loads(b) for b in grouping.unpack(body)] == objects


def test_lengths_that_do_not_fit_the_body_are_not_trusted() -> None:
    bodies = [b'{"a":1}', b'{"b":"x,y"}']
    body, lengths = grouping.pack(bodies)
    assert lengths == [7, 11]
    # Lengths that fit but cut elsewhere ([19] here) are taken: the header is this
    # bus's own, and the handler refuses a part that is not an event's JSON.
    for wrong in ([7, 10], [6, 12], [7], "7,11", [7.0, 11.0], [True, 11], []):
        assert grouping.unpack(body, wrong) == bodies, wrong


@pytest.mark.parametrize(
    "body", [b"", b"{}", b"[]", b"[1,2]", b'[{"a":1},3]', b"[" * 100_000, b"\xff\xfe", b"null"]
)
def test_a_body_that_is_not_a_batch_of_objects_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        grouping.unpack(body)


@given(st.binary(max_size=200), st.none() | st.lists(st.integers(-5, 300), max_size=6))
def test_any_body_and_lengths_give_events_or_a_value_error(body: bytes, lengths: Any) -> None:
    try:
        parts = grouping.unpack(body, lengths)
    except ValueError:
        return
    assert parts and all(p[:1] == b"{" and p[-1:] == b"}" for p in parts)
