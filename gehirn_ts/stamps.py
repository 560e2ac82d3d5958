"""Times as text, each form made once a second and reused within it.

Making them anew for every event, message or log line (datetime's isoformat, the email
package's formatdate) was a measurable share of each (docs/performance.md, session 10).
Every form here is property-tested against the library call it stands for.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate


def shown(seconds: float) -> tuple[int, int]:
    """The second and microsecond ``datetime.fromtimestamp`` makes of a POSIX time: it
    rounds to the microsecond, half to even, so x.9999996 is the next second."""
    frac, whole = math.modf(seconds)
    micro = round(frac * 1e6)
    second = int(whole)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    elif micro < 0:
        second, micro = second - 1, micro + 1_000_000
    return second, micro


_stamp: tuple[int, str] = (-1, "")


def _second_text(second: int) -> str:
    global _stamp
    if second != _stamp[0]:
        _stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return _stamp[1]


def rfc3339(seconds: float) -> str:
    """``2026-01-02T03:04:05.678Z``: datetime's ``fromtimestamp(seconds, UTC)``
    ``.isoformat(timespec="milliseconds")``, with ``Z``."""
    second, micro = shown(seconds)
    return f"{_second_text(second)}.{micro // 1000:03d}Z"


def now_rfc3339() -> str:
    """The time now, UTC, to the millisecond (from the clock's nanoseconds: no float
    to round, half the time of ``rfc3339(time.time())``)."""
    second, rest = divmod(time.time_ns(), 1_000_000_000)
    return f"{_second_text(second)}.{rest // 1_000_000:03d}Z"


_dates: dict[tuple[int, bool], str] = {}


def date_text(seconds: float, gmt: bool = True) -> str:
    """An RFC 5322 section 3.3 date-time in UTC as the ``email`` package writes it: zone
    ``GMT`` (``formatdate``, for a Received field) or ``+0000`` (``format_datetime`` of
    an aware time, for a Date field; ``-0000`` would say the zone is unknown)."""
    key = (shown(seconds)[0], gmt)
    text = _dates.get(key)
    if text is None:
        if len(_dates) >= 4:
            _dates.clear()
        text = _dates[key] = (
            formatdate(key[0], usegmt=True)
            if gmt
            else format_datetime(datetime.fromtimestamp(key[0], UTC))
        )
    return text
