"""SMTP worker processes: the report lines, the worker's channel, the main process's side."""

from __future__ import annotations

import io
import os
import signal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from gehirn_ts.config import ConfigError, from_mapping
from gehirn_ts.logs import Logger, TextLineObserver, WorkerLineObserver, event_from_worker
from gehirn_ts.metrics import Metrics
from gehirn_ts.mta import workers
from gehirn_ts.mta.anvil import Anvil, Limits
from gehirn_ts.mta.workers import (
    Accepted,
    Count,
    Listening,
    MainChannel,
    WorkerProcesses,
    accepted_line,
    count_line,
    count_lines,
    counter_values,
    parse_report,
    smtp_reports,
)
from gehirn_ts.smtpworker import parse_args
from gehirn_ts.tap import worker_command


@given(st.binary(max_size=300))
def test_any_line_is_a_report_or_none(line: bytes) -> None:
    found = parse_report(line)
    assert found is None or isinstance(found, Accepted | Count)
    if isinstance(found, Count):
        assert found.amount >= 0


@given(st.text(alphabet="0123456789ABCDEF", min_size=1, max_size=64))
def test_accepted_lines_read_back(qid: str) -> None:
    assert parse_report(accepted_line(qid)[:-1]) == Accepted(qid)


@given(
    st.sampled_from(workers.COUNTERS),
    st.sampled_from(workers.LISTENERS),
    st.integers(min_value=0, max_value=10**11),
)
def test_count_lines_read_back(counter: str, listener: str, amount: int) -> None:
    assert parse_report(count_line(counter, listener, amount)[:-1]) == Count(
        counter, listener, amount
    )


def test_lines_that_are_no_report() -> None:
    for line in (
        b"",
        b"accepted",
        b"accepted ../../etc/passwd",
        b"accepted A B",
        b"count events_published smtp 1",  # not a counter of the sessions
        b"count mail_received other 1",
        b"count mail_received smtp -1",
        "count mail_received smtp \u0663".encode(),  # a digit, but not ASCII
        b"count mail_received smtp 1234567890123",
        b"accepted " + b"A" * 300,
    ):
        assert parse_report(line) is None, line


def test_count_lines_carry_what_moved() -> None:
    metrics = Metrics()
    metrics.smtp_sessions.labels("smtp").inc(3)
    first = counter_values(metrics)
    assert count_lines({}, first) == count_line("smtp_sessions", "smtp", 3)
    metrics.smtp_sessions.labels("smtp").inc(2)
    metrics.mail_received.labels("submission").inc()
    assert count_lines(first, counter_values(metrics)) == (
        count_line("mail_received", "submission", 1) + count_line("smtp_sessions", "smtp", 2)
    )
    assert count_lines(counter_values(metrics), counter_values(metrics)) == b""


class _Envelope:
    queue_id = "ABC123"


class MainChannelTests(TestCase):
    def test_reports_go_down_the_pipe_and_a_closed_pipe_stops_the_worker(self) -> None:
        read, write = os.pipe()
        gone: list[bool] = []
        metrics = Metrics()
        clock = Clock()
        channel = MainChannel(write, metrics, clock, lambda: gone.append(True))
        channel.startService()
        channel.accepted(_Envelope())
        metrics.smtp_sessions.labels("smtp").inc()
        clock.advance(1.0)
        assert os.read(read, 1000) == b"accepted ABC123\ncount smtp_sessions smtp 1\n"
        clock.advance(1.0)  # nothing moved: nothing written
        metrics.mail_received.labels("smtp").inc()
        channel.stopService()  # what moved since the last second goes too
        assert os.read(read, 1000) == b"count mail_received smtp 1\n"
        assert clock.getDelayedCalls() == []
        os.close(read)
        channel.accepted(_Envelope())
        assert gone == [True]
        os.close(write)


class _Transport:
    def __init__(self) -> None:
        self.signals: list[int] = []
        self.stdin = b""

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == 0
        self.stdin += data


class _Port:
    def __init__(self) -> None:
        self.stopped = False

    def stopListening(self) -> None:
        self.stopped = True


class _Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any]]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
        protocol.transport = _Transport()
        self.spawned.append((protocol, args, kw["childFDs"]))
        return protocol.transport


def _ended(protocol: Any) -> None:
    protocol.processEnded(Failure(Exception("killed")))


class WorkerProcessesTests(TestCase):
    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.accepted: list[str] = []
        self.metrics = Metrics()
        self.port = _Port()
        self.workers = WorkerProcesses(
            reactor=self.reactor,
            count=2,
            name="SMTP worker",
            listen=lambda: [Listening("smtp", 7, 2, self.port)],
            command=lambda index, listening: ["python", "-m", "w", str(index)],
            on_line=smtp_reports(self.accepted.append, self.metrics),
        )
        self.workers.startService()

    def test_the_listeners_are_bound_once_before_privileges_go(self) -> None:
        binds: list[int] = []
        pool = WorkerProcesses(
            reactor=self.reactor,
            count=1,
            name="SMTP worker",
            listen=lambda: binds.append(1) or [],
            command=lambda index, listening: ["python"],
            on_line=lambda index, line: None,
        )
        pool.privilegedStartService()
        assert binds == [1] and len(self.reactor.spawned) == 2  # setUp's two only
        pool.startService()
        assert binds == [1] and len(self.reactor.spawned) == 3

    def test_workers_get_the_listening_sockets_and_report(self) -> None:
        assert [args[-1] for _, args, _ in self.reactor.spawned] == ["1", "2"]
        first, _, fds = self.reactor.spawned[0]
        assert fds == {0: "w", 1: "r", 2: "r", 3: 7}
        first.outReceived(b"accepted AB12\ncount mail_received smtp 2\naccep")
        first.outReceived(b"ted CD34\n")
        assert self.accepted == ["AB12", "CD34"]
        assert self.metrics.mail_received.labels("smtp")._value.get() == 2

    def test_a_worker_that_ends_starts_again_later_and_later(self) -> None:
        first = self.reactor.spawned[0][0]
        _ended(first)
        assert len(self.reactor.spawned) == 2
        self.reactor.advance(workers.RESTART_FIRST)
        assert len(self.reactor.spawned) == 3
        _ended(self.reactor.spawned[2][0])
        self.reactor.advance(workers.RESTART_FIRST)
        assert len(self.reactor.spawned) == 3  # the second wait is twice the first
        self.reactor.advance(workers.RESTART_FIRST)
        assert len(self.reactor.spawned) == 4
        # One that ran a while starts again after the first wait.
        self.reactor.advance(workers.RESTART_HEALTHY)
        _ended(self.reactor.spawned[3][0])
        self.reactor.advance(workers.RESTART_FIRST)
        assert len(self.reactor.spawned) == 5

    def test_per_ip_counts_over_the_workers_go_to_every_worker(self) -> None:
        self.workers.stopService()
        self.reactor.spawned.clear()
        anvil = Anvil(Limits(2, 5, 600.0), self.reactor.seconds)
        pool = WorkerProcesses(
            reactor=self.reactor,
            count=2,
            name="SMTP worker",
            command=lambda index, listening: ["python", "-m", "w", str(index)],
            on_line=smtp_reports(
                self.accepted.append, self.metrics, anvil, lambda d: pool.broadcast(d)
            ),
            greeting=anvil.state,
            on_end=lambda index: pool.broadcast(anvil.worker_gone(index)),
        )
        pool.startService()
        (one, _, _), (two, _, _) = self.reactor.spawned
        one.outReceived(b"open smtp 192.0.2.1\n")
        two.outReceived(b"open smtp 192.0.2.1\naccepted AB12\n")
        assert one.transport.stdin == two.transport.stdin == b"full smtp 192.0.2.1\n"
        assert self.accepted == ["AB12"]
        # A worker that starts again is told what is in force; the sessions of the one
        # that ended are gone with it.
        one.transport.stdin = two.transport.stdin = b""
        two.outReceived(b"open smtp 192.0.2.9\n")
        _ended(one)
        assert two.transport.stdin == b"room smtp 192.0.2.1\n"
        two.outReceived(b"open smtp 192.0.2.9\n")
        self.reactor.advance(workers.RESTART_FIRST)
        again = self.reactor.spawned[2][0]
        assert again.transport.stdin == b"full smtp 192.0.2.9\n"

    def test_log_lines_are_logged_here(self) -> None:
        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        protocol = self.reactor.spawned[1][0]
        out = io.StringIO()
        Logger(namespace="x", observer=WorkerLineObserver(out)).info("hello {who}", who="there")
        protocol.errReceived(out.getvalue().encode() + b"not json\n")
        mine = [e for e in seen if e.get("log_system") == "smtp-worker-2"]
        assert mine and mine[0]["who"] == "there" and mine[0]["log_text"] == "hello there"
        assert any(e.get("line") == "not json" for e in seen)

    def test_stop_signals_the_workers_waits_for_them_and_closes_the_listeners(self) -> None:
        d = self.workers.stopService()
        protocols = [p for p, _, _ in self.reactor.spawned]
        assert [p.transport.signals for p in protocols] == [[signal.SIGTERM]] * 2
        _ended(protocols[0])
        assert not self.port.stopped
        self.reactor.advance(workers.STOP_GRACE)  # one did not end: killed
        assert protocols[1].transport.signals == [signal.SIGTERM, signal.SIGKILL]
        _ended(protocols[1])
        self.successResultOf(d)
        assert self.port.stopped
        assert len(self.reactor.spawned) == 2  # none started again


def test_the_worker_command_line_reads_back() -> None:
    listening = [Listening("smtp", 9, 2), Listening("submissions", 10, 10)]
    argv = worker_command("etc/x.toml", 3, listening)
    assert argv[1:3] == ["-m", "gehirn_ts.smtpworker"]
    args = parse_args(argv[3:])
    assert args.index == 3
    assert args.config == os.path.abspath("etc/x.toml")
    assert args.listener == [("smtp", 3, 2), ("submissions", 4, 10)]
    assert parse_args(worker_command(None, 1, [])[3:]).config is None


def test_workers_config() -> None:
    assert from_mapping({"smtp": {"workers": 2}}).smtp.workers == 2
    for bad in (-1, 65, True, "2"):
        try:
            from_mapping({"smtp": {"workers": bad}})
        except ConfigError as e:
            assert "smtp.workers" in str(e)
        else:
            raise AssertionError(bad)


def _through_a_worker(emit: Any) -> dict[str, Any]:
    """An event a worker's Logger made, as the main process publishes it."""
    out = io.StringIO()
    emit(Logger(namespace="gehirn_ts.mta.esmtp", observer=WorkerLineObserver(out)))
    event = event_from_worker(out.getvalue(), "smtp-worker-1")
    assert event is not None
    return event


def test_worker_events_keep_their_text_fields_and_level() -> None:
    event = _through_a_worker(
        lambda log: log.warn("received {qid} from {ip}", qid="Q1", ip="192.0.2.1")
    )
    assert event["log_text"] == "received Q1 from 192.0.2.1"
    assert (event["qid"], event["ip"]) == ("Q1", "192.0.2.1")
    assert event["log_level"] == LogLevel.warn
    assert event["log_namespace"] == "gehirn_ts.mta.esmtp"
    out = io.StringIO()
    TextLineObserver(out)(event)
    assert out.getvalue().endswith(" [smtp-worker-1] received Q1 from 192.0.2.1\n")


def test_worker_failures_carry_their_traceback() -> None:
    def fail(log: Logger) -> None:
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke {qid}", qid="Q2")

    event = _through_a_worker(fail)
    assert event["log_text"].startswith("it broke Q2\n")
    assert "ZeroDivisionError" in event["traceback"]
    assert event["log_level"] == LogLevel.critical


@given(st.text(max_size=300))
def test_any_worker_line_is_an_event_or_none(line: str) -> None:
    event = event_from_worker(line, "w")
    assert event is None or isinstance(event["log_text"], str)
