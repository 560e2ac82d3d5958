"""The event: CloudEvents 1.0 structured JSON, plus topic patterns.

Extension attributes (CloudEvents 1.0 section 3.1.1 naming rules): ``account``
(the owning account's name; absent for a provider-wide broadcast) and
``severity`` (info | warning | critical).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from typing import Any

from gehirn_ts.stamps import now_rfc3339

SPECVERSION = "1.0"
SEVERITIES = ("info", "warning", "critical")

# The types gehirn-ts itself emits or documents.
NOTICE_MAINTENANCE = "notice.maintenance"
NOTICE_FAULT = "notice.fault"
MAIL_RECEIVED = "mail.received"
MAIL_DELIVERED = "mail.delivered"
MAIL_DELAYED = "mail.delayed"
MAIL_FAILED = "mail.failed"
EDJ_DELIVERY_FAILED = "edj.delivery.failed"
KNOWN_TYPES = (
    NOTICE_MAINTENANCE,
    NOTICE_FAULT,
    "payment.*",
    "permission.*",
    MAIL_RECEIVED,
    MAIL_DELIVERED,
    MAIL_DELAYED,
    MAIL_FAILED,
    EDJ_DELIVERY_FAILED,
)
# Only the daemon may publish these: a client must not forge mail or delivery events.
RESERVED_PREFIXES = ("mail.", "edj.")

_WORD = r"[a-z0-9][a-z0-9_-]*"
_TYPE_RE = re.compile(rf"^{_WORD}(\.{_WORD})*$")
_ACCOUNT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_TYPE_LENGTH = 255
_ATTRIBUTES = (
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "data",
    "account",
    "severity",
)


class EventError(ValueError):
    """An event attribute is missing or malformed; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True, init=False)
class Event:
    type: str
    source: str
    id: str
    time: str
    subject: str | None
    account: str | None
    severity: str
    data: Any
    datacontenttype: str
    dataschema: str | None

    def __init__(
        self,
        type: str,
        source: str,
        id: str | None = None,
        time: str | None = None,
        subject: str | None = None,
        account: str | None = None,
        severity: str = "info",
        data: Any = None,
        datacontenttype: str = "application/json",
        dataschema: str | None = None,
    ) -> None:
        # Written into __dict__ at once: the frozen dataclass's own __init__ sets each
        # field through object.__setattr__, a fifth of making an event from the API.
        self.__dict__.update(
            type=type,
            source=source,
            id=new_event_id() if id is None else id,
            time=now_rfc3339() if time is None else time,
            subject=subject,
            account=account,
            severity=severity,
            data=data,
            datacontenttype=datacontenttype,
            dataschema=dataschema,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "datacontenttype": self.datacontenttype,
            "severity": self.severity,
        }
        for name in ("subject", "account", "dataschema"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.data is not None:
            out["data"] = self.data
        return out

    def to_json(self) -> bytes:
        """Structured-mode JSON (CloudEvents JSON format, section 3)."""
        return self._json

    @cached_property
    def _json(self) -> bytes:
        # Encoded once: the store, the bus and each webhook body need the same bytes.
        # An event is not changed once made (frozen; ``data`` is never mutated after).
        return compact_json(self.to_dict())


# One encoder, made once: json.dumps with options makes a new one for every call (a
# fifth of encoding an event). Compact, and UTF-8 as it is.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def compact_json(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON, the encoding of an event's own bytes."""
    return _ENCODER.encode(value).encode()


def uuid7_text(unix_ms: int, random10: bytes) -> str:
    """A version 7 UUID (RFC 9562 section 5.7), as text: ``unix_ms`` (milliseconds since
    the epoch) in its first 48 bits, then 74 of the 80 random bits."""
    raw = bytearray(unix_ms.to_bytes(6, "big") + random10)
    raw[6] = raw[6] & 0x0F | 0x70  # version 7
    raw[8] = raw[8] & 0x3F | 0x80  # variant 10
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_event_id() -> str:
    # Version 7, not 4: an id made later sorts after, so the events table's index takes
    # it at its end. Random ids put every insert anywhere in the index, and once the
    # index outgrew SQLite's cache each commit rewrote pages all over it: 0.70 ms of CPU
    # an event instead of 0.50 (docs/decisions.md, "Time-ordered ids").
    return uuid7_text(time.time_ns() // 1_000_000, os.urandom(10))


def validate_type(value: Any, field_name: str = "type") -> str:
    if not isinstance(value, str) or not value:
        raise EventError(field_name, 'required, a string such as "notice.maintenance"')
    if len(value) > MAX_TYPE_LENGTH or not _TYPE_RE.match(value):
        raise EventError(
            field_name,
            "must be dot-separated lowercase words (letters, digits, '-', '_'), "
            'e.g. "notice.fault"',
        )
    return value


def validate_account_name(value: Any, field_name: str = "account") -> str:
    if not isinstance(value, str) or not _ACCOUNT_RE.match(value):
        raise EventError(
            field_name,
            "must be 1-63 lowercase letters, digits, '.', '-' or '_', starting "
            "with a letter or digit",
        )
    return value


def _opt_str(raw: Mapping[str, Any], name: str, limit: int = 1024) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise EventError(name, f"must be a non-empty string of at most {limit} characters")
    return value


def _check_time(value: str) -> str:
    # RFC 3339 timestamp (CloudEvents 1.0 section 3.1.4 "Timestamp").
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise EventError("time", "must be an RFC 3339 timestamp such as 2026-01-02T03:04:05Z")
    if parsed.tzinfo is None or "T" not in value.upper():
        raise EventError("time", "must be an RFC 3339 timestamp with a time zone")
    return value


def event_from_dict(raw: Any, *, default_source: str = "/gehirn-ts") -> Event:
    """Validate a structured-mode event; missing optional attributes get defaults."""
    if not isinstance(raw, dict):
        raise EventError("body", "must be a JSON object")
    for name in raw:
        if name not in _ATTRIBUTES:
            raise EventError(name, "unknown attribute")
    spec = raw.get("specversion", SPECVERSION)
    if spec != SPECVERSION:
        raise EventError("specversion", 'must be "1.0"')
    type_ = validate_type(raw.get("type"))
    severity = raw.get("severity", "info")
    if severity not in SEVERITIES:
        raise EventError("severity", f"must be one of {', '.join(SEVERITIES)}")
    account = raw.get("account")
    if account is not None:
        validate_account_name(account)
    time = _opt_str(raw, "time", 64)
    if time is not None:
        _check_time(time)
    content_type = _opt_str(raw, "datacontenttype", 255) or "application/json"
    event = Event(
        type=type_,
        source=_opt_str(raw, "source") or default_source,
        id=_opt_str(raw, "id", 255),
        time=time,
        subject=_opt_str(raw, "subject"),
        account=account,
        severity=severity,
        data=raw.get("data"),
        datacontenttype=content_type,
        dataschema=_opt_str(raw, "dataschema"),
    )
    return event


def event_from_json(body: bytes) -> Event:
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise EventError("body", "is not valid JSON")
    return event_from_dict(raw)


def event_from_own_json(body: bytes | str) -> Event:
    """An event from the bytes its ``to_json`` made (the bus's message, the store's
    row), which stay its JSON: the store and each webhook body need them again, and
    encoding them anew was 3% of an event's CPU on RabbitMQ."""
    # SQLite gives a TEXT column back as str.
    data = body.encode() if isinstance(body, str) else bytes(body)
    event = event_from_json(data)
    event.__dict__["_json"] = data  # the cached_property's own slot
    return event


# --- topic patterns (AMQP 0-9-1 topic exchange semantics) ---


class PatternError(ValueError):
    pass


def validate_pattern(pattern: Any) -> str:
    """A subscription pattern: words separated by '.', '*' = one word, '#' = zero or more."""
    if not isinstance(pattern, str) or not pattern:
        raise PatternError('must be a non-empty string such as "mail.*" or "notice.#"')
    if len(pattern) > MAX_TYPE_LENGTH:
        raise PatternError(f"longer than {MAX_TYPE_LENGTH} characters")
    for word in pattern.split("."):
        if word in ("*", "#"):
            continue
        if not re.fullmatch(_WORD, word):
            raise PatternError(
                f"word {word!r} is not valid: use lowercase words, '*' (one word) or "
                "'#' (zero or more words) separated by '.'"
            )
    return pattern


@lru_cache(maxsize=4096)
def topic_matches(pattern: str, routing_key: str) -> bool:
    """True when ``routing_key`` matches ``pattern`` as an AMQP topic binding would."""
    # Kept per (pattern, type): routing asks it for every event and subscription, and
    # a few patterns meet a few types.
    pwords = pattern.split(".")
    kwords = routing_key.split(".")
    # reachable[j]: the pattern prefix consumed so far can match the first j key words.
    reachable = [True] + [False] * len(kwords)
    for word in pwords:
        nxt = [False] * (len(kwords) + 1)
        if word == "#":
            seen = False
            for j in range(len(kwords) + 1):
                seen = seen or reachable[j]
                nxt[j] = seen
        else:
            for j in range(len(kwords)):
                if reachable[j] and (word == "*" or word == kwords[j]):
                    nxt[j + 1] = True
        reachable = nxt
    return reachable[len(kwords)]
