"""Which subscriptions an event goes to (pure)."""

from __future__ import annotations

from collections.abc import Iterable

from gehirn_ts.events import Event, topic_matches
from gehirn_ts.store.db import Subscription


def route(event: Event, subscriptions: Iterable[Subscription]) -> list[Subscription]:
    """Live subscriptions whose pattern matches the event's type.

    An event with an account goes only to that account's subscriptions; an event
    without one (a provider-wide notice) goes to every account's.
    """
    return [
        s
        for s in subscriptions
        if s.deleted_at is None
        and (event.account is None or s.account == event.account)
        and topic_matches(s.pattern, event.type)
    ]
