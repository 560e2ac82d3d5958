"""Retry schedules for event deliveries (pure).

The default schedule follows Svix: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, each
spread by +-20% so that many failed deliveries do not come back at one moment.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from email.utils import parsedate_to_datetime


def next_delay(
    failures: int,
    schedule: Sequence[float],
    *,
    jitter: float = 0.2,
    retry_after: float | None = None,
    max_retry_after: float = 86400.0,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait after the ``failures``-th failed attempt, or None when exhausted.

    A destination's Retry-After (capped at ``max_retry_after``) is honoured when it
    asks for a longer wait than the schedule.
    """
    if failures < 1:
        raise ValueError("failures counts from 1")
    if failures > len(schedule):
        return None
    base = schedule[failures - 1]
    spread = (rng or random).uniform(-jitter, jitter) if jitter else 0.0
    delay = base * (1.0 + spread)
    if retry_after is not None:
        delay = max(delay, min(retry_after, max_retry_after))
    return max(delay, 0.0)


def parse_retry_after(value: str | bytes | None, now: float) -> float | None:
    """Seconds from a Retry-After header (RFC 9110 section 10.2.3), None if absent or bad."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    # ASCII digits only: str.isdigit() accepts '¹' and other digits int() refuses.
    if value.isascii() and value.isdigit():
        # Capped: the caller caps again (max_retry_after); this only keeps it a float.
        return float(min(int(value[:12]), 10**9))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(when.timestamp() - now, 0.0)
