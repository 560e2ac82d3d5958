"""Logging: the level threshold, and log output for log shippers.

Every module logs through ``gehirn_ts.logs.Logger``: events below the configured level
(``[log] level``, info by default) are dropped before any observer formats them, which
keeps per-message debug lines off the hot paths.

JSON output, one flat object per line:

    twistd --logger gehirn_ts.logs.json_observer --nodaemon --pidfile= gehirn-ts ...

Each line has ``time`` (RFC 3339, UTC), ``level``, ``namespace``, ``message`` (the
formatted text) and the event's own structured fields (``qid``, ``event_id``,
``delivery_id``, ``destination``...); a failure adds ``traceback``. What is logged was
written without secrets in the first place (destination URLs are redacted where they are
logged), so this observer changes the shape, not the content.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.logger import Logger as _TwistedLogger
from zope.interface import implementer

LEVELS = ("debug", "info", "warn", "error")
_threshold = LogLevel.info


def set_level(name: str) -> None:
    """Drop events below this level from now on (``debug``, ``info``, ``warn``, ``error``)."""
    global _threshold
    _threshold = LogLevel.levelWithName(name)


class Logger(_TwistedLogger):
    """A twisted.logger Logger that honours the configured level."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if level < _threshold:
            return
        if format and kwargs:
            # The text is made here by str.format_map (C); twisted.logger's formatter is
            # string.Formatter, in Python: about half of a line's 44 us. The fields stay
            # in the event (the JSON observer writes them); the format handed on is the
            # text, its braces doubled. A format only twisted.logger reads (a field of
            # the event it adds, such as {log_source}) is left to it.
            try:
                text = format.format_map(kwargs)
            except Exception:  # noqa: S110 - twisted.logger formats it, or says it cannot
                pass
            else:
                format = text.replace("{", "{{").replace("}", "}}")
        super().emit(level, format, **kwargs)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


@implementer(ILogObserver)
class JsonLineObserver:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        when = datetime.fromtimestamp(event.get("log_time", 0), UTC)
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace"),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in ("format", "message", "isError"):
                record.setdefault(key, _jsonable(value))
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()


def json_observer() -> JsonLineObserver:
    """The factory ``twistd --logger`` takes."""
    return JsonLineObserver(sys.stdout)
