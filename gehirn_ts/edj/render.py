"""What a destination is sent for an event, per kind of destination."""

from __future__ import annotations

from gehirn_ts.events import Event


def render(event: Event, kind: str) -> bytes:
    """HTTP destinations get the structured CloudEvent as JSON."""
    if kind == "webhook":
        return event.to_json()
    if kind == "email":
        from gehirn_ts.edj.destinations.email import text_of

        return text_of(event).encode()
    raise ValueError(f"no renderer for destination kind {kind!r}")
