"""Logging: the level threshold, and log output for log shippers.

Every module logs through ``gehirn_ts.logs.Logger``: events below the configured level
(``[log] level``, info by default) are dropped before any observer formats them, which
keeps per-message debug lines off the hot paths.

Text output, the lines of twistd's own text observer made for less CPU (the time
formatted once a second, the text made once, by ``Logger``):

    twistd --logger gehirn_ts.logs.text_observer --nodaemon --pidfile= gehirn-ts ...

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
import time
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.logger import Logger as _TwistedLogger
from zope.interface import implementer

from gehirn_ts.stamps import shown

LEVELS = ("debug", "info", "warn", "error")
_threshold = LogLevel.info
_LOG_LEVELS = frozenset(LogLevel.iterconstants())


def set_level(name: str) -> None:
    """Drop events below this level from now on (``debug``, ``info``, ``warn``, ``error``)."""
    global _threshold
    _threshold = LogLevel.levelWithName(name)


class Logger(_TwistedLogger):
    """A twisted.logger Logger that honours the configured level."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if level not in _LOG_LEVELS:
            super().emit(level, format, **kwargs)  # twisted.logger reports the bad level
            return
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
                kwargs["log_text"] = text
        # The event twisted.logger's emit makes. Its own emit checks the level against a
        # list of every level made anew for each line (about half of a line's time here).
        kwargs.update(
            log_logger=self,
            log_level=level,
            log_namespace=self.namespace,
            log_source=self.source,
            log_format=format,
            log_time=time.time(),
        )
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))
        self.observer(kwargs)


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


_WORKER_SKIP = frozenset({"format", "message", "isError", "system", "time", "why", "failure"})


@implementer(ILogObserver)
class WorkerLineObserver:
    """A worker process's events for the main process (``mta/workers.py``), one JSON
    object a line: the time, level, namespace, text and the event's own fields.
    twisted.logger's ``eventAsJSON`` keeps whole events, and it and its reader took a
    tenth of a received message's CPU in the two processes (docs/performance.md)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        text = event.get("log_text")
        if text is None:
            text = formatEvent(event)
        fields = {
            key: _jsonable(value)
            for key, value in event.items()
            if not key.startswith("log_") and key not in _WORKER_SKIP
        }
        failure = event.get("log_failure")
        if failure is not None:
            fields["traceback"] = failure.getTraceback()
        level = event.get("log_level")
        record = {
            "time": event.get("log_time"),
            "level": level.name if level is not None and level in _LOG_LEVELS else "info",
            "namespace": event.get("log_namespace") or "-",
            "text": text,
            "fields": fields,
        }
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()


def event_from_worker(line: str, system: str) -> dict[str, Any] | None:
    """The event of a ``WorkerLineObserver`` line, as this process's observers take it
    (``log_system`` names the worker); None if the line is no such record."""
    try:
        record = json.loads(line)
        when, text = record["time"], record["text"]
        level = LogLevel.levelWithName(record["level"])
        namespace, fields = record["namespace"], record["fields"]
    except (ValueError, KeyError, TypeError, InvalidLogLevelError):
        return None
    if not (
        isinstance(when, int | float)
        and isinstance(text, str)
        and isinstance(namespace, str)
        and isinstance(fields, dict)
    ):
        return None
    traceback = fields.get("traceback")
    if isinstance(traceback, str):
        text = f"{text}\n{traceback}"
    event = {key: value for key, value in fields.items() if not key.startswith("log_")}
    event.update(
        log_time=float(when),
        log_level=level,
        log_namespace=namespace,
        log_system=system,
        log_text=text,
        log_format=text.replace("{", "{{").replace("}", "}}"),
    )
    return event


def json_observer() -> JsonLineObserver:
    """The factory ``twistd --logger`` takes."""
    return JsonLineObserver(sys.stdout)


@implementer(ILogObserver)
class TextLineObserver:
    """The lines of twistd's text observer, ``{time} [{system}] {text}``, the same
    byte for byte. twisted.logger formats the local time of every line anew and runs
    the text through string.Formatter: about a tenth of an event's CPU went on two
    lines (docs/performance.md). Here the time is made once a second and the text is
    the one ``Logger`` made; any other event is formatted as twisted.logger does."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._second: int | None = None
        self._stamp = "-"

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        # The second twistd's stamp shows: datetime rounds to the microsecond, half to
        # even, so a time just short of a second (x.9999995) is stamped with the next.
        second = shown(when)[0]
        if second != self._second:
            # The local offset can change from one second to the next (a DST change),
            # never within one.
            self._stamp = formatTime(when)
            self._second = second
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> None:
        text = event.get("log_text")
        system = event.get("log_system")
        if text is None or "log_failure" in event or not isinstance(system, str | None):
            line = formatEventAsClassicLogText(event, formatTime=self._time)
            if not line:
                return
        else:
            if not text:
                return  # twisted.logger writes no line for an empty text
            if system is None:
                level = event.get("log_level")
                name = level.name if level is not None else "-"
                system = f"{event.get('log_namespace', '-')}#{name}"
            line = f"{self._time(event.get('log_time'))} [{system}] {text}"
            line = line.replace("\n", "\n\t") + "\n"
        self._out.write(line)
        self._out.flush()


def text_observer() -> TextLineObserver:
    """The factory ``twistd --logger`` takes."""
    return TextLineObserver(sys.stdout)
