"""Answers kept for a few seconds: the mail paths' lookups and checks.

Every received message asks who owns its recipients' domain and how their address is
routed twice (at RCPT, and when it is processed after the 250), and each read is a
round trip to the store's reader thread: about a fifth of processing a message under
load (docs/performance.md). The answers change rarely. A change made through this
process (a route over the API, a domain through the store's methods, routes from the
config on SIGHUP) drops every kept answer at once; a change made by another process
(the CLI adding or removing a domain) is seen within ``LOOKUP_SECONDS``, as Postfix's
daemons pick up a changed lookup table on their next request, not in the middle of one.
The DKIM signing keys of a sender's domain are kept with them (``store/keys.py``), and
SPF verdicts the same way (``mta/spf.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed

T = TypeVar("T")

LOOKUP_SECONDS = 5.0
LOOKUP_ANSWERS = 10_000  # past this many, all are dropped (a flood of unknown addresses)


class Recent:
    def __init__(
        self,
        now: Callable[[], float],
        seconds: float = LOOKUP_SECONDS,
        size: int = LOOKUP_ANSWERS,
    ) -> None:
        self._now = now
        self._seconds = seconds
        self._size = size
        self._answers: dict[Hashable, tuple[float, Any]] = {}
        self._generation = 0

    def changed(self) -> None:
        """Something the answers depend on was written: drop them, and the answers of
        reads still running (they may have read the old state)."""
        self._answers.clear()
        self._generation += 1

    def lookup(
        self,
        key: Hashable,
        read: Callable[[], Deferred[T]],
        keep_if: Callable[[T], bool] | None = None,
    ) -> Deferred[T]:
        """The kept answer for ``key`` while it is fresh, else ``read()``'s (kept when
        ``keep_if`` says so, or always)."""
        now = self._now()
        kept = self._answers.get(key)
        if kept is not None and kept[0] > now:
            return succeed(kept[1])
        generation = self._generation

        def keep(answer: T) -> T:
            if generation != self._generation or self._seconds <= 0:
                return answer
            if keep_if is None or keep_if(answer):
                if len(self._answers) >= self._size:
                    self._answers.clear()
                self._answers[key] = (now + self._seconds, answer)
            return answer

        return read().addCallback(keep)
