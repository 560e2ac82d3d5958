"""Coroutines run at once, as far as they go without waiting (asyncio's eager tasks).

``Deferred.fromCoroutine`` makes a Deferred, a context copy and a trampoline for every
coroutine, about 9 us here, even for one that never waits: an SMTP command whose
policy lookups are answered from memory (MAIL and RCPT of most messages).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred


def run_eagerly(coro: Coroutine[Any, Any, None]) -> Deferred[None] | None:
    """Run ``coro`` until it first waits: None if it finished without waiting (an
    exception it raised propagates to the caller), else a Deferred of the rest.

    What a Twisted coroutine waits on is a Deferred. ``fromCoroutine`` starts by
    sending None into the coroutine, and an awaited Deferred answers that by waiting
    again until it has its result, so the rest runs as if it had been started there."""
    try:
        coro.send(None)
    except StopIteration:
        return None
    return Deferred.fromCoroutine(coro)
