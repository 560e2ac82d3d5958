import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gehirn_ts.config import Config
from gehirn_ts.edj.retry import next_delay, parse_retry_after

SCHEDULE = Config().edj.retry_schedule


def test_default_schedule_is_svix_like():
    assert [next_delay(n, SCHEDULE, jitter=0) for n in range(1, 8)] == [
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        36000,
    ]
    assert next_delay(8, SCHEDULE, jitter=0) is None


@given(st.integers(1, 7), st.integers(0, 2**32))
def test_jitter_stays_within_twenty_percent(n, seed):
    delay = next_delay(n, SCHEDULE, jitter=0.2, rng=random.Random(seed))
    base = SCHEDULE[n - 1]
    assert delay is not None and base * 0.8 <= delay <= base * 1.2


def test_jitter_spreads():
    rng = random.Random(1)
    delays = {next_delay(2, SCHEDULE, rng=rng) for _ in range(20)}
    assert len(delays) > 10


def test_retry_after_longer_than_schedule_wins():
    assert next_delay(1, SCHEDULE, jitter=0, retry_after=120) == 120


def test_retry_after_shorter_than_schedule_does_not_shorten():
    assert next_delay(2, SCHEDULE, jitter=0, retry_after=1) == 300


def test_retry_after_is_capped():
    assert next_delay(1, SCHEDULE, jitter=0, retry_after=10**9, max_retry_after=3600) == 3600


def test_failures_count_from_one():
    with pytest.raises(ValueError):
        next_delay(0, SCHEDULE)


def test_parse_retry_after_seconds_and_dates():
    assert parse_retry_after("120", now=0) == 120
    assert parse_retry_after(b" 7 ", now=0) == 7
    when = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_retry_after(format_datetime(when, usegmt=True), now=when.timestamp() - 30) == 30
    assert parse_retry_after(format_datetime(when, usegmt=True), now=when.timestamp() + 30) == 0
    assert parse_retry_after(None, now=0) is None
    assert parse_retry_after("soon", now=0) is None
    assert parse_retry_after("-5", now=0) is None


@given(st.text(max_size=40) | st.binary(max_size=40))
def test_parse_retry_after_never_crashes(value):
    result = parse_retry_after(value, now=1_000_000_000)
    assert result is None or result >= 0


@pytest.mark.parametrize("odd", ["¹", "٣", b"\xb9", "1\u00a0", "9" * 400])
def test_parse_retry_after_odd_digits(odd):
    result = parse_retry_after(odd, now=0)
    assert result is None or result >= 0
