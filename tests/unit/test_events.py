import json
import time
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from gehirn_ts.events import (
    Event,
    EventError,
    PatternError,
    event_from_dict,
    event_from_json,
    event_from_own_json,
    new_event_id,
    topic_matches,
    uuid7_text,
    validate_pattern,
)
from gehirn_ts.stamps import now_rfc3339, rfc3339


def test_minimal_event_gets_defaults():
    event = event_from_dict({"type": "notice.fault"}, default_source="/x")
    assert event.source == "/x"
    assert event.severity == "info"
    assert event.id and event.time.endswith("Z")
    out = event.to_dict()
    assert out["specversion"] == "1.0"
    assert "data" not in out and "account" not in out


def test_round_trip():
    raw = {
        "specversion": "1.0",
        "id": "abc",
        "source": "/billing",
        "type": "payment.received",
        "time": "2026-01-02T03:04:05Z",
        "subject": "invoice 7",
        "datacontenttype": "application/json",
        "account": "acme",
        "severity": "warning",
        "data": {"amount": 12, "note": "grüße"},
    }
    event = event_from_dict(raw)
    assert json.loads(event.to_json()) == raw
    assert event_from_json(event.to_json()) == event


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({}, "type"),
        ({"type": "Notice.Fault"}, "type"),
        ({"type": "notice..fault"}, "type"),
        ({"type": 5}, "type"),
        ({"type": "a", "specversion": "0.3"}, "specversion"),
        ({"type": "a", "severity": "panic"}, "severity"),
        ({"type": "a", "account": "Has Space"}, "account"),
        ({"type": "a", "time": "yesterday"}, "time"),
        ({"type": "a", "time": "2026-01-02"}, "time"),
        ({"type": "a", "time": "2026-01-02T03:04:05"}, "time"),
        ({"type": "a", "colour": "red"}, "colour"),
        ({"type": "a", "id": ""}, "id"),
        ({"type": "a", "source": 7}, "source"),
        ({"type": "a", "subject": "x" * 2000}, "subject"),
    ],
)
def test_invalid_events_name_the_field(raw, field):
    with pytest.raises(EventError) as e:
        event_from_dict(raw)
    assert e.value.field == field


def test_not_an_object_and_not_json():
    with pytest.raises(EventError) as e:
        event_from_dict([1])
    assert e.value.field == "body"
    with pytest.raises(EventError):
        event_from_json(b"{nope")


@given(st.dictionaries(st.text(max_size=12), st.none() | st.text(max_size=30) | st.integers()))
def test_event_parser_never_crashes(raw):
    try:
        event = event_from_dict(raw)
    except EventError as e:
        assert isinstance(e.field, str) and e.message
        return
    assert json.loads(event.to_json())["type"] == raw["type"]


# --- topic patterns ---

WORDS = st.sampled_from(["mail", "notice", "fault", "a", "b", "received", "x1"])
KEYS = st.lists(WORDS, min_size=1, max_size=6).map(".".join)
PATTERN_WORDS = WORDS | st.just("*") | st.just("#")
PATTERNS = st.lists(PATTERN_WORDS, min_size=1, max_size=6).map(".".join)


def reference_match(pattern: str, key: str) -> bool:
    """An independent, recursive reading of the AMQP topic rules."""

    def match(pw: list[str], kw: list[str]) -> bool:
        if not pw:
            return not kw
        head, rest = pw[0], pw[1:]
        if head == "#":
            return any(match(rest, kw[i:]) for i in range(len(kw) + 1))
        return bool(kw) and head in ("*", kw[0]) and match(rest, kw[1:])

    return match(pattern.split("."), key.split("."))


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("mail.*", "mail.received", True),
        ("mail.*", "mail", False),
        ("mail.*", "mail.a.b", False),
        ("mail.#", "mail", True),
        ("mail.#", "mail.a.b", True),
        ("#", "anything.at.all", True),
        ("*", "one", True),
        ("*", "one.two", False),
        ("#.fault", "notice.fault", True),
        ("#.fault", "fault", True),
        ("notice.#.x", "notice.x", True),
        ("notice.#.x", "notice.a.b.x", True),
        ("*.*", "a.b", True),
        ("a.#.#.b", "a.b", True),
        ("mail.received", "mail.received", True),
        ("mail.received", "mail.delivered", False),
    ],
)
def test_topic_examples(pattern, key, expected):
    assert topic_matches(pattern, key) is expected


@given(PATTERNS, KEYS)
def test_matches_reference_implementation(pattern, key):
    assert topic_matches(pattern, key) == reference_match(pattern, key)


@given(KEYS)
def test_a_key_matches_itself_and_hash(key):
    assert topic_matches(key, key)
    assert topic_matches("#", key)


@given(KEYS, st.data())
def test_star_for_any_word_still_matches(key, data):
    words = key.split(".")
    i = data.draw(st.integers(0, len(words) - 1))
    words[i] = "*"
    assert topic_matches(".".join(words), key)


@given(KEYS, st.data())
def test_hash_inserted_anywhere_still_matches(key, data):
    words = key.split(".")
    i = data.draw(st.integers(0, len(words)))
    assert topic_matches(".".join([*words[:i], "#", *words[i:]]), key)


@given(KEYS, KEYS)
def test_different_literal_keys_do_not_match(a, b):
    assume(a != b)
    assert not topic_matches(a, b)


@pytest.mark.parametrize("bad", ["", "mail.", ".mail", "mail..x", "ma*l", "MAIL", "a.#b", 5, None])
def test_invalid_patterns(bad):
    with pytest.raises(PatternError):
        validate_pattern(bad)


@given(st.text(max_size=30))
def test_pattern_validation_never_crashes(text):
    try:
        validate_pattern(text)
    except PatternError:
        return
    topic_matches(text, "a.b")


@given(st.integers(0, 2**48 - 1), st.binary(min_size=10, max_size=10))
def test_an_event_id_is_a_version_7_uuid_of_its_time_and_random_bits(ms, random10):
    made = uuid.UUID(uuid7_text(ms, random10))
    assert made.version == 7 and made.variant == uuid.RFC_4122
    assert made.int >> 80 == ms  # unix_ts_ms, RFC 9562 section 5.7
    assert str(made) == uuid7_text(ms, random10)
    # rand_a and rand_b: the random bits but the version's four and the variant's two.
    mask = (1 << 80) - 1 ^ (0xF << 76) ^ (0x3 << 62)
    assert made.int & mask == int.from_bytes(random10, "big") & mask


@given(
    st.integers(0, 2**48 - 2),
    st.integers(1, 2**47),
    st.binary(min_size=10, max_size=10),
    st.binary(min_size=10, max_size=10),
)
def test_an_id_made_a_millisecond_later_or_more_sorts_after(ms, later, a, b):
    assume(ms + later < 2**48)
    assert uuid7_text(ms, a) < uuid7_text(ms + later, b)


def test_event_ids_are_version_7_uuids_of_now():
    before = time.time_ns() // 1_000_000
    ids = [new_event_id() for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000
    assert {uuid.UUID(i).version for i in ids} == {7}
    assert all(before <= uuid.UUID(i).int >> 80 <= after for i in ids)


def test_the_time_now_is_what_datetime_writes_to_the_millisecond():
    for _ in range(3):
        before = datetime.now(UTC)
        stamp = now_rfc3339()
        after = datetime.now(UTC)
        # The second's text is kept and reused: a stamp from the next second must not
        # carry the old one.
        time.sleep(0.4)
        parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= parsed <= after
        assert stamp == parsed.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(st.lists(st.floats(min_value=0, max_value=4e9), min_size=1, max_size=8))
@example([0.9999996, 0.9995, 3999999999.9999995, 1.0005, 12.0004999])
def test_a_time_is_written_as_datetime_writes_it(times: list[float]) -> None:
    # In any order, some within a second of each other: a second's kept text is used
    # for that second only.
    for t in [*times, *(x + 0.5 for x in times), *times]:
        expected = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
        assert rfc3339(t) == expected.replace("+00:00", "Z")


def test_an_event_made_without_id_or_time_gets_both_and_keeps_given_ones():
    made = Event(type="a", source="/s")
    assert uuid.UUID(made.id).version == 7 and made.time.endswith("Z")
    given_ = Event(type="a", source="/s", id="", time="2026-01-02T03:04:05Z")
    assert given_.id == "" and given_.time == "2026-01-02T03:04:05Z"
    assert given_ == Event("a", "/s", "", "2026-01-02T03:04:05Z")


def test_event_is_frozen():
    event = Event(type="a", source="/s")
    with pytest.raises(AttributeError):
        event.type = "b"  # type: ignore[misc]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@given(JSON_VALUES, st.text(max_size=20))
def test_an_event_is_encoded_as_json_dumps_writes_it_compact_and_unescaped(data, subject):
    event = Event(type="a.b", source="/x", subject=subject or None, data=data)
    expected = json.dumps(event.to_dict(), separators=(",", ":"), ensure_ascii=False)
    assert event.to_json() == expected.encode()


@given(
    st.fixed_dictionaries(
        {"type": KEYS},
        optional={
            "id": st.text(min_size=1, max_size=20),
            "subject": st.text(max_size=20),
            "severity": st.sampled_from(["info", "warning", "critical"]),
            "data": JSON_VALUES,
        },
    )
)
def test_an_event_read_back_from_its_own_json_keeps_those_bytes(raw):
    try:
        event = event_from_dict(raw, default_source="/x")
    except EventError:
        assume(False)
    body = event.to_json()
    again = event_from_own_json(body)
    assert again == event and again.to_json() == body
    # The bytes kept are the ones encoding the read event anew would make.
    fresh = event_from_dict(json.loads(body))
    assert fresh.to_json() == body
    assert event_from_own_json(body.decode()).to_json() == body  # a TEXT column
