"""SMTP worker processes: sessions taken by other processes than the main one.

One daemon runs its Python on one core at a time. With ``[smtp] workers = N`` the main
process binds the SMTP listeners and never accepts on them; N worker processes
(``python -m gehirn_ts.smtpworker``) share those sockets and run the sessions: the
commands, the relay policy's lookups, SPF, the spool and its fsync, the 250. What
happens after the 250 (the KVS, the index, the event, relaying) stays in the main
process, which the workers tell of each message they spooled (docs/operations.md,
"SMTP worker processes").

A worker talks to the main process over its standard streams:
- stdout, written by the worker: one line a report, ``accepted QID`` before the 250 of
  that message is sent (written to the pipe at once, so a worker killed after its 250
  has told the main process), and ``count METRIC LISTENER N`` for its counters;
- stderr: its log, one JSON object a line (``logs.WorkerLineObserver``), which the
  main process logs as its own (and any other line, as text);
- stdin: closed by the main process when it ends, and the worker then ends too.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from gehirn_ts.logs import Logger, event_from_worker
from gehirn_ts.metrics import Metrics
from gehirn_ts.mta.spool import write_all

if TYPE_CHECKING:
    from gehirn_ts.mta.anvil import Anvil

log = Logger()

# The counters a worker's sessions move, by their name in the reports.
COUNTERS = ("mail_received", "smtp_sessions", "smtp_tls_sessions", "smtp_auth_failures")
LISTENERS = ("smtp", "submission", "submissions")
# Bounds of what a report line may hold (anything longer is no report).
REPORT_LINE = 200
_QID = re.compile(r"[0-9A-Za-z]{1,64}")
# The first wait before a worker that ended is started again; it doubles up to the
# last, as systemd's restart backoff would, so a worker that cannot start does not spin.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
# A worker that ran this long before it ended starts again after the first wait.
RESTART_HEALTHY = 60.0
STOP_GRACE = 10.0  # SIGTERM, then SIGKILL after this long


@dataclass(frozen=True)
class Accepted:
    queue_id: str


@dataclass(frozen=True)
class Count:
    counter: str
    listener: str
    amount: int


def accepted_line(queue_id: str) -> bytes:
    return f"accepted {queue_id}\n".encode("ascii")


def count_line(counter: str, listener: str, amount: int) -> bytes:
    return f"count {counter} {listener} {amount}\n".encode("ascii")


def words_of(line: bytes, longest: int) -> list[str] | None:
    """The words of a line between the processes (ASCII, one space between words);
    None if it is longer than ``longest`` or not ASCII."""
    if len(line) > longest:
        return None
    try:
        return line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        return None


def parse_report(line: bytes) -> Accepted | Count | None:
    """A worker's report line (without its LF); None for anything else."""
    words = words_of(line, REPORT_LINE)
    if words is None:
        return None
    if len(words) == 2 and words[0] == "accepted" and _QID.fullmatch(words[1]):
        return Accepted(words[1])
    if (
        len(words) == 4
        and words[0] == "count"
        and words[1] in COUNTERS
        and words[2] in LISTENERS
        and words[3].isdigit()
        and words[3].isascii()
        and len(words[3]) <= 12
    ):
        return Count(words[1], words[2], int(words[3]))
    return None


def counter_values(metrics: Metrics) -> dict[tuple[str, str], int]:
    """The worker's counters now, by (counter, listener)."""
    values = {}
    for name in COUNTERS:
        family = getattr(metrics, name)
        for metric in family.collect():
            for sample in metric.samples:
                listener = sample.labels.get("listener")
                if sample.name.endswith("_total") and listener is not None:
                    values[(name, listener)] = int(sample.value)
    return values


def count_lines(before: Mapping[tuple[str, str], int], now: Mapping[tuple[str, str], int]) -> bytes:
    """The report lines that move the main process's counters from ``before`` to ``now``."""
    return b"".join(
        count_line(name, listener, value - before.get((name, listener), 0))
        for (name, listener), value in sorted(now.items())
        if value > before.get((name, listener), 0)
    )


def smtp_reports(
    accepted: Callable[[str], None],
    metrics: Metrics,
    anvil: Anvil | None = None,
    broadcast: Callable[[bytes], None] | None = None,
) -> Callable[[int, bytes], None]:
    """What the main process does with an SMTP worker's report lines; the per-IP
    counts go to ``anvil``, and what it answers to every worker (``broadcast``)."""

    def on_line(index: int, line: bytes) -> None:
        found = parse_report(line)
        if isinstance(found, Accepted):
            accepted(found.queue_id)
        elif isinstance(found, Count):
            getattr(metrics, found.counter).labels(found.listener).inc(found.amount)
        else:
            notices = anvil.report(index, line) if anvil is not None else None
            if notices is None:
                log.warn("SMTP worker {index} wrote a line that is no report", index=index)
            elif notices and broadcast is not None:
                broadcast(notices)

    return on_line


class NoAccept(Factory):
    """The main process's factory on listeners the workers take: it never accepts (the
    port stops reading as soon as it listens), and would close a connection if it did."""

    def buildProtocol(self, addr: Any) -> None:
        return None


@dataclass(frozen=True)
class Listening:
    """A bound listener the workers share: its name, the main process's socket (its
    descriptor and address family) and the port, which stops listening at the end."""

    name: str
    fileno: int
    family: int
    port: Any = None


class MainChannel(Service):
    """The worker's side of its stdout: the accepted messages and, every second, what
    its counters moved. Written straight to the pipe (a report is a few dozen bytes,
    one write): an ``accepted`` line is in the main process's pipe before the 250."""

    def __init__(self, fd: int, metrics: Metrics, clock: Any, gone: Callable[[], None]) -> None:
        self._fd = fd
        self._metrics = metrics
        self._clock = clock
        self._gone = gone
        self._sent: dict[tuple[str, str], int] = {}
        self._call: Any = None

    def accepted(self, envelope: Any, kinds: Any = None) -> None:
        self._write(accepted_line(envelope.queue_id))

    def report(self, line: bytes) -> None:
        """A line for the main process's per-IP counts (mta/anvil.py)."""
        self._write(line)

    def flush_counts(self) -> None:
        now = counter_values(self._metrics)
        lines = count_lines(self._sent, now)
        self._sent = now
        if lines:
            self._write(lines)

    def _write(self, data: bytes) -> None:
        try:
            write_all(self._fd, data)
        except OSError:
            # The main process is gone: what was spooled is resumed by its next start.
            log.warn("the main process is gone; this SMTP worker stops")
            self._gone()

    def startService(self) -> None:
        super().startService()
        self._tick()

    def _tick(self) -> None:
        self.flush_counts()
        self._call = self._clock.callLater(1.0, self._tick)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.flush_counts()


class _Worker(ProcessProtocol):
    def __init__(self, owner: WorkerProcesses, index: int) -> None:
        self.owner = owner
        self.index = index
        self.out = b""
        self.err = b""
        self.ended: Deferred[None] = Deferred()
        self.started_at = owner.clock.seconds()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        *lines, self.out = self.out.split(b"\n")
        for line in lines:
            self.owner.on_line(self.index, line)
        if len(self.out) > REPORT_LINE:
            log.warn(
                "{name} {index} wrote a line that is too long",
                name=self.owner.label,
                index=self.index,
            )
            self.out = b""

    def errReceived(self, data: bytes) -> None:
        self.err += data
        *lines, self.err = self.err.split(b"\n")
        for line in lines:
            self.owner.log_line(self.index, line)
        if len(self.err) > 1 << 20:  # a log line of a megabyte: shown cut
            self.owner.log_line(self.index, self.err)
            self.err = b""

    def processEnded(self, reason: Failure) -> None:
        if self.err:
            self.owner.log_line(self.index, self.err)
        self.owner.ended(self, reason)
        self.ended.callback(None)


class WorkerProcesses(Service):
    """The main process's side of ``count`` worker processes: starts them on the
    listeners ``listen`` binds, hands each line they report to ``on_line``, starts one
    again when it ends, and stops them."""

    def __init__(
        self,
        *,
        reactor: Any,
        count: int,
        name: str,
        command: Callable[[int, Sequence[Listening]], list[str]],
        on_line: Callable[[int, bytes], None],
        listen: Callable[[], list[Listening]] = list,
        greeting: Callable[[], bytes] | None = None,
        on_end: Callable[[int], None] | None = None,
    ) -> None:
        """``greeting``: what to write to a worker's stdin as soon as it starts;
        ``on_end``: told of each worker that ended (with its index)."""
        self.greeting = greeting
        self.on_end = on_end
        self.reactor = reactor
        self.clock = reactor
        self.count = count
        self.label = name
        self.on_line = on_line
        self._listen = listen
        self._command = command
        self._listening: list[Listening] = []
        self._bound = False
        self._workers: dict[int, _Worker] = {}
        self._waits: dict[int, float] = {}
        self._timers: dict[int, Any] = {}
        self._stopping = False

    def privilegedStartService(self) -> None:
        # Bound before twistd gives up root (--uid), as the listeners are without
        # workers, and at once: one that cannot be bound fails the start.
        super().privilegedStartService()
        self._bind()

    def _bind(self) -> None:
        if not self._bound:
            self._listening = self._listen()
            self._bound = True

    def startService(self) -> None:
        super().startService()
        self._bind()
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._timers.pop(index, None)
        if self._stopping:
            return
        argv = self._command(index, self._listening)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for n, listening in enumerate(self._listening):
            child_fds[3 + n] = listening.fileno
        worker = _Worker(self, index)
        self._workers[index] = worker
        self.reactor.spawnProcess(
            worker, argv[0], argv, env=dict(os.environ), path=os.getcwd(), childFDs=child_fds
        )
        log.info("started {name} {index}", name=self.label, index=index)
        if self.greeting is not None:
            _write_to(worker, self.greeting())

    def broadcast(self, data: bytes) -> None:
        """``data`` to every worker's stdin."""
        for worker in self._workers.values():
            _write_to(worker, data)

    def log_line(self, index: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if not text.strip():
            return
        system = f"{self.label.lower().replace(' ', '-')}-{index}"
        event = event_from_worker(text, system)
        if event is None:
            # Not the worker's log: what Python wrote before it ran (an import error).
            log.warn("{name} {index}: {line}", name=self.label, index=index, line=text.rstrip())
            return
        globalLogPublisher(event)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        if self._workers.get(worker.index) is not worker:
            return
        del self._workers[worker.index]
        if self.on_end is not None:
            self.on_end(worker.index)
        if self._stopping:
            return
        lived = self.clock.seconds() - worker.started_at
        wait = self._waits.get(worker.index, RESTART_FIRST)
        if lived >= RESTART_HEALTHY:
            wait = RESTART_FIRST
        self._waits[worker.index] = min(wait * 2, RESTART_MAX)
        log.warn(
            "{name} {index} ended ({reason}); starting it again in {wait:.1f} s",
            name=self.label,
            index=worker.index,
            reason=reason.getErrorMessage(),
            wait=wait,
        )
        self._timers[worker.index] = self.clock.callLater(wait, self._spawn, worker.index)

    def hangup(self) -> None:
        """SIGHUP for every worker: each reads the config again."""
        for worker in self._workers.values():
            _signal(worker, signal.SIGHUP)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        workers = list(self._workers.values())
        for worker in workers:
            _signal(worker, signal.SIGTERM)

        def kill_all() -> None:
            for worker in workers:
                _signal(worker, signal.SIGKILL)

        kill = self.clock.callLater(STOP_GRACE, kill_all)
        for worker in workers:
            await worker.ended
        if kill.active():
            kill.cancel()
        for listening in self._listening:
            if listening.port is not None:
                await maybeDeferred(listening.port.stopListening)


def _signal(worker: _Worker, signum: int) -> None:
    transport = worker.transport
    if transport is None:
        return
    try:
        transport.signalProcess(signum)
    except (ProcessExitedAlready, OSError):
        pass


def _write_to(worker: _Worker, data: bytes) -> None:
    transport = worker.transport
    if data and transport is not None:
        transport.writeToChild(0, data)
