"""What a destination is sent for an event, per kind of destination (pure).

Webhooks get the CloudEvent as JSON. Every other kind gets readable text: a title line
(severity, type, subject) and a few lines of the event's key fields, chosen per event
type (``mail.received``: sender, subject, excerpt; ``mail.failed``: recipient and
diagnostic), and a link where the event has one.

A subscription may replace the body with its own template: text with ``{field}``
placeholders naming the event's attributes or ``data`` fields by dotted path
(``{data.from}``); ``{{`` and ``}}`` are literal braces. Nothing else is interpreted: no
expressions, no attribute access, no code, so a template is safe from any user.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from gehirn_ts.events import Event

MAX_TEMPLATE = 2000
MAX_FIELD = 300
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_\-]+)*)\}|[{}]")
ROOTS = ("id", "type", "source", "subject", "time", "severity", "account", "data")


class TemplateError(ValueError):
    pass


def check_template(template: Any) -> str:
    """The template if it is usable; TemplateError says why not."""
    if not isinstance(template, str) or not template.strip():
        raise TemplateError("must be a non-empty string")
    if len(template) > MAX_TEMPLATE:
        raise TemplateError(f"longer than {MAX_TEMPLATE} characters")
    for m in _PLACEHOLDER.finditer(template):
        piece = m.group(0)
        if piece in ("{{", "}}"):
            continue
        if m.group(1) is None:
            raise TemplateError(
                f"stray {piece!r} at {m.start()}: write {{{{ or }}}} for a literal brace"
            )
        root = m.group(1).split(".", 1)[0]
        if root not in ROOTS:
            raise TemplateError(f"unknown field {{{m.group(1)}}} (known: {', '.join(ROOTS)})")
    return template


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = json.dumps(value)
    else:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text[:MAX_FIELD]


def lookup(event: Event, path: str) -> Any:
    root, _, rest = path.partition(".")
    value: Any = event.to_dict().get(root) if root != "data" else event.data
    for key in rest.split(".") if rest else ():
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def fill(template: str, event: Event) -> str:
    def sub(m: re.Match[str]) -> str:
        piece = m.group(0)
        if piece in ("{{", "}}"):
            return piece[0]
        if m.group(1) is None:
            return piece
        return _text(lookup(event, m.group(1)))

    return _PLACEHOLDER.sub(sub, template)


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    url: str | None

    def as_text(self) -> str:
        return (
            self.title
            + ("\n" + self.body if self.body else "")
            + ("\n" + self.url if self.url else "")
        )


def _fields(event: Event) -> list[tuple[str, Any]]:
    data = event.data if isinstance(event.data, dict) else {}
    get = data.get
    if event.type == "mail.received":
        return [
            ("From", get("from")),
            ("To", get("to")),
            ("Subject", get("subject")),
            ("", get("excerpt")),
        ]
    if event.type == "mail.failed":
        return [
            ("Recipient", get("recipient")),
            ("Status", get("status")),
            ("Diagnostic", get("diagnostic")),
            ("Subject", get("subject")),
        ]
    if event.type == "mail.delayed":
        return [
            ("Recipient", get("recipient")),
            ("Diagnostic", get("diagnostic")),
            ("Next attempt", get("next_attempt_at")),
        ]
    if event.type == "mail.delivered":
        return [
            ("Recipient", get("recipient")),
            ("Remote", get("remote_mta")),
            ("Subject", get("subject")),
        ]
    if event.type == "edj.delivery.failed":
        return [
            ("Destination", get("destination")),
            ("Reason", get("reason")),
            ("Event", get("event_id")),
        ]
    if not isinstance(event.data, dict):
        return [("", event.data)] if event.data is not None else []
    scalars = [(k, v) for k, v in data.items() if isinstance(v, str | int | float | bool)]
    return scalars[:8]


def _link(event: Event) -> str | None:
    if isinstance(event.data, dict):
        for key in ("url", "link", "href"):
            value = event.data.get(key)
            if isinstance(value, str) and re.match(r"^https?://\S+$", value):
                return value[:1000]
    return None


def message(event: Event, template: str | None = None) -> Message:
    """The readable message of an event (a template replaces the body)."""
    title = f"[{event.severity}] {event.type}" + (f": {event.subject}" if event.subject else "")
    title = " ".join(title.split())  # one line, whatever the subject holds
    if template is not None:
        body = fill(template, event)
    else:
        lines = []
        for name, value in _fields(event):
            text = " ".join(_text(value).split())
            if text:
                lines.append(f"{name}: {text}" if name else text)
        body = "\n".join(lines)
    return Message(title[:250], body, _link(event))


def render(event: Event, kind: str, template: str | None = None) -> bytes:
    """HTTP webhooks get the structured CloudEvent as JSON; the others readable text."""
    if kind == "webhook":
        return event.to_json()
    if kind == "email" and template is None:
        from gehirn_ts.edj.destinations.email import text_of

        return text_of(event).encode()
    return message(event, template).as_text().encode()


def split_message(rendered: bytes) -> Message:
    """A rendered text back into title and body (the destination side of ``render``)."""
    text = rendered.decode("utf-8", "replace")
    title, _, body = text.partition("\n")
    url = None
    lines = body.split("\n") if body else []
    if lines and re.match(r"^https?://\S+$", lines[-1]):
        url = lines.pop()
    return Message(title, "\n".join(lines), url)
