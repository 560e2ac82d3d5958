"""Per-IP limits counted over all SMTP worker processes, as Postfix's anvil(8) counts
them for its smtpd processes (pure: no I/O).

Each worker still counts its own sessions and AUTH failures and refuses by its own
counts. It also reports each session's start and end and each AUTH failure to the main
process (``open``, ``close``, ``authfail`` lines on its stdout), whose ``Anvil`` adds
them up over the workers and tells every worker (a line on its stdin) when a client IP
reaches a limit:

- ``full LISTENER IP``: as many sessions on that listener as ``max_connections_per_ip``;
- ``room LISTENER IP``: fewer again;
- ``block LISTENER IP SECONDS``: ``auth_failures`` failed AUTH attempts within
  ``auth_failure_window``; AUTH is refused from that IP for that long.

The counts travel between processes: sessions that start at the same moment in two
workers can pass the limit by one a worker (docs/operations.md).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gehirn_ts.mta.workers import LISTENERS, words_of

# A client address as a session has it: IPv4 or IPv6 text (a zone index included).
_IP = re.compile(r"[0-9A-Za-z.:%_-]{1,64}")
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")
REPORTS = ("open", "close", "authfail")
NOTICES = ("full", "room", "block")
LINE = 160  # longer than any line of these
FORGET_AT = 4096  # addresses with recent AUTH failures before old ones are dropped


@dataclass(frozen=True)
class Limits:
    max_connections: int
    auth_failures: int
    auth_window: float


@dataclass(frozen=True)
class Line:
    """One line of either direction: a report (worker to main) or a notice."""

    kind: str
    listener: str
    ip: str
    seconds: float = 0.0


def shareable(ip: str) -> bool:
    """Whether a session's client address can be counted over the workers (a UNIX
    socket's peer, which has no IP address, is counted by its worker alone)."""
    return _IP.fullmatch(ip) is not None


def line(kind: str, listener: str, ip: str, seconds: float | None = None) -> bytes:
    text = f"{kind} {listener} {ip}" if seconds is None else f"{kind} {listener} {ip} {seconds:.3f}"
    return text.encode("ascii") + b"\n"


def parse(data: bytes, kinds: tuple[str, ...]) -> Line | None:
    """A line of one of ``kinds`` (without its LF); None for anything else."""
    words = words_of(data, LINE)
    if words is None or len(words) not in (3, 4):
        return None
    if words[0] not in kinds or words[1] not in LISTENERS:
        return None
    if not _IP.fullmatch(words[2]):
        return None
    if (len(words) == 4) != (words[0] == "block"):
        return None
    if len(words) == 4:
        if not _SECONDS.fullmatch(words[3]):
            return None
        return Line(words[0], words[1], words[2], float(words[3]))
    return Line(words[0], words[1], words[2])


class Anvil:
    """The main process's counts over all workers; each method returns the notices to
    send to every worker (b"" for none)."""

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self.limits = limits  # replaced at a reload
        self._now = clock
        self._sessions: dict[tuple[int, str, str], int] = {}  # (worker, listener, ip)
        self._totals: dict[tuple[str, str], int] = {}
        self._full: set[tuple[str, str]] = set()
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._blocked: dict[tuple[str, str], float] = {}  # until
        self._forget_at = FORGET_AT

    def report(self, worker: int, data: bytes) -> bytes | None:
        """A worker's report line; None if it is not one."""
        found = parse(data, REPORTS)
        if found is None:
            return None
        if found.kind == "open":
            return self.opened(worker, found.listener, found.ip)
        if found.kind == "close":
            return self.closed(worker, found.listener, found.ip)
        return self.auth_failed(found.listener, found.ip)

    def opened(self, worker: int, listener: str, ip: str) -> bytes:
        key = (worker, listener, ip)
        self._sessions[key] = self._sessions.get(key, 0) + 1
        return self._total(listener, ip, +1)

    def closed(self, worker: int, listener: str, ip: str) -> bytes:
        key = (worker, listener, ip)
        n = self._sessions.get(key, 0)
        if n <= 0:
            return b""  # opened before this main process knew the worker: not counted
        if n == 1:
            del self._sessions[key]
        else:
            self._sessions[key] = n - 1
        return self._total(listener, ip, -1)

    def worker_gone(self, worker: int) -> bytes:
        """A worker ended: its sessions ended with it."""
        out = b""
        for key in [k for k in self._sessions if k[0] == worker]:
            n = self._sessions.pop(key)
            out += self._total(key[1], key[2], -n)
        return out

    def _total(self, listener: str, ip: str, change: int) -> bytes:
        key = (listener, ip)
        total = self._totals.get(key, 0) + change
        if total > 0:
            self._totals[key] = total
        else:
            self._totals.pop(key, None)
        if total >= self.limits.max_connections and key not in self._full:
            self._full.add(key)
            return line("full", listener, ip)
        if total < self.limits.max_connections and key in self._full:
            self._full.discard(key)
            return line("room", listener, ip)
        return b""

    def auth_failed(self, listener: str, ip: str) -> bytes:
        key = (listener, ip)
        now = self._now()
        if len(self._failures) >= self._forget_at:
            # Many addresses failed: what is past goes, and the next sweep waits until
            # there are twice as many left (a sweep a failure would cost too much).
            self._forget(now)
            self._forget_at = max(FORGET_AT, 2 * len(self._failures))
        failures = self._failures.setdefault(key, deque())
        failures.append(now)
        horizon = now - self.limits.auth_window
        while failures and failures[0] <= horizon:
            failures.popleft()
        if len(failures) < self.limits.auth_failures:
            return b""
        # Blocked until the oldest of the last ``auth_failures`` failures leaves the
        # window: the same moment a worker's own count would let it go.
        until = failures[-self.limits.auth_failures] + self.limits.auth_window
        self._blocked[key] = until
        while len(failures) > self.limits.auth_failures:
            failures.popleft()
        return line("block", listener, ip, until - now)

    def state(self) -> bytes:
        """Every notice in force, for a worker that just started."""
        now = self._now()
        out = b"".join(line("full", listener, ip) for listener, ip in sorted(self._full))
        self._forget(now)
        for key, until in sorted(self._blocked.items()):
            out += line("block", key[0], key[1], until - now)
        return out

    def _forget(self, now: float) -> None:
        """Drop the blocks that ran out and the failures past the window."""
        self._blocked = {k: u for k, u in self._blocked.items() if u > now}
        horizon = now - self.limits.auth_window
        self._failures = {k: f for k, f in self._failures.items() if f and f[-1] > horizon}


class SharedLimits:
    """A worker's copy of the notices in force."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._now = clock
        self._full: set[tuple[str, str]] = set()
        self._blocked: dict[tuple[str, str], float] = {}
        self._forget_at = FORGET_AT

    def notice(self, data: bytes) -> bool:
        """Apply a notice line; False if it is not one."""
        found = parse(data, NOTICES)
        if found is None:
            return False
        key = (found.listener, found.ip)
        if found.kind == "full":
            self._full.add(key)
        elif found.kind == "room":
            self._full.discard(key)
        else:
            now = self._now()
            if len(self._blocked) >= self._forget_at:
                self._blocked = {k: u for k, u in self._blocked.items() if u > now}
                self._forget_at = max(FORGET_AT, 2 * len(self._blocked))
            self._blocked[key] = max(now + found.seconds, self._blocked.get(key, 0.0))
        return True

    def full(self, listener: str, ip: str) -> bool:
        return (listener, ip) in self._full

    def blocked(self, listener: str, ip: str) -> bool:
        until = self._blocked.get((listener, ip))
        if until is None:
            return False
        if until <= self._now():
            del self._blocked[(listener, ip)]
            return False
        return True
