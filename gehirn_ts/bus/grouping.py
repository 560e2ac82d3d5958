"""Events published together travel as one AMQP message per event type.

A message of several events is a CloudEvents JSON batch (``[event,event,...]``,
content type ``application/cloudevents-batch+json``, CloudEvents JSON format section
4), routed by the type all of its events share, so a queue's bindings see the same
routing keys as when each event is a message of its own. The header
``x-gehirn-lengths`` lists each event's length in bytes, so the consumer slices the
events' own JSON out of the body instead of parsing and encoding them again; a batch
without it (or with one that does not fit the body) is parsed as JSON.

No I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gehirn_ts.events import Event, compact_json

EVENT_CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
LENGTHS_HEADER = "x-gehirn-lengths"
# A message holds at most this many events and this many bytes (an event larger than
# that travels alone): the consumer holds up to its prefetch of messages at once.
MAX_EVENTS = 100
MAX_BYTES = 256 * 1024


def group(
    events: Sequence[Event], max_events: int = MAX_EVENTS, max_bytes: int = MAX_BYTES
) -> list[list[Event]]:
    """The events split into messages: each of one type, in publishing order within
    the type, within ``max_events`` and ``max_bytes`` (a batch's brackets and commas
    counted)."""
    open_groups: dict[str, tuple[list[Event], int]] = {}
    out: list[list[Event]] = []
    for event in events:
        size = len(event.to_json())
        current = open_groups.get(event.type)
        if current is not None:
            members, used = current
            if len(members) < max_events and used + 1 + size <= max_bytes:
                members.append(event)
                open_groups[event.type] = (members, used + 1 + size)
                continue
        members = [event]
        out.append(members)
        open_groups[event.type] = (members, 2 + size)
    return out


def pack(bodies: Sequence[bytes]) -> tuple[bytes, list[int]]:
    """A batch body of the events' JSON, and the lengths header's value."""
    return b"[" + b",".join(bodies) + b"]", [len(b) for b in bodies]


def unpack(body: bytes, lengths: Any = None) -> list[bytes]:
    """Each event's JSON from a batch body. ValueError when the body is not a JSON
    array of objects."""
    sliced = _slice(body, lengths)
    if sliced is not None:
        return sliced
    try:
        items = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"a batch that is not JSON: {e}") from None
    if not isinstance(items, list) or not items:
        raise ValueError("a batch must be a non-empty JSON array")
    if not all(isinstance(item, dict) for item in items):
        raise ValueError("a batch holds JSON objects only")
    return [compact_json(item) for item in items]


def _slice(body: bytes, lengths: Any) -> list[bytes] | None:
    """The events cut out by ``lengths``, or None unless they fit the body exactly:
    ``[``, then each event (an object's braces) followed by ``,`` or, last, ``]``."""
    if not isinstance(lengths, list) or not lengths:
        return None
    if not all(type(n) is int and n >= 2 for n in lengths):
        return None
    if sum(lengths) + len(lengths) + 1 != len(body) or body[:1] != b"[":
        return None
    out = []
    at = 1
    last = len(lengths) - 1
    for i, n in enumerate(lengths):
        part = body[at : at + n]
        after = body[at + n : at + n + 1]
        if part[:1] != b"{" or part[-1:] != b"}" or after != (b"]" if i == last else b","):
            return None
        out.append(part)
        at += n + 1
    return out
