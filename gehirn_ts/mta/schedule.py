"""When the outbound queue tries a recipient again, gives up, or warns of a delay (pure).

The defaults follow DESIGN.md, close to Postfix: the first retry after 5 minutes, then
twice the previous wait with jitter, never more than an hour between tries; give up 5 days
after the message was queued (``maximal_queue_lifetime``); one delay notice after 4 hours,
then at most one every 4 hours (``delay_warning_time``, repeated).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class MailRetry:
    first: float = 300.0
    factor: float = 2.0
    max_interval: float = 3600.0
    lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    jitter: float = 0.1

    def next_attempt(
        self, attempts: int, queued_at: float, now: float, rng: random.Random | None = None
    ) -> float | None:
        """When to try again after ``attempts`` failed tries; None once the lifetime is over."""
        if now - queued_at >= self.lifetime:
            return None
        wait = min(self.first * self.factor ** max(attempts - 1, 0), self.max_interval)
        if self.jitter:
            wait *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        # The last try is at the end of the lifetime, not past it.
        return min(now + wait, queued_at + self.lifetime)

    def delay_notice_due(self, queued_at: float, last_notice: float | None, now: float) -> bool:
        """Whether a still-queued recipient is due a ``mail.delayed`` notice now: once past
        the threshold, then at most once per interval, however often it is tried."""
        if now - queued_at < self.delay_warning:
            return False
        return last_notice is None or now - last_notice >= self.delay_warning
