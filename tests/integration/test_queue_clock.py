"""The outbound queue on a test clock (task.Clock), delivering over loopback to a
scripted SMTP server, with MX records from the tests' DNS server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.names import client
from twisted.trial.unittest import TestCase

from gehirn_ts.mta.outbound import Outbound
from gehirn_ts.mta.queue import MailQueue
from gehirn_ts.mta.relay import MxCourier, Settings
from gehirn_ts.mta.schedule import MailRetry
from gehirn_ts.store.db import Store
from gehirn_ts.store.queue import NewRecipient, QueuedMessage, RecipientState
from gehirn_ts.store.schema import migrate
from tests.dnstest import dns_server
from tests.scripted_smtp import Script, listen
from tests.support import inline, recording_workers, sleep, until

MESSAGE = b"From: a@src.test\r\nSubject: x\r\n\r\n.leading dot\r\nbody\r\n"


class QueueOnClockTests(TestCase):
    timeout = 30

    def _setup(self, script: Script, domain: str, retry: MailRetry, threads: Any = None) -> None:
        port = listen(self, script)
        zone = dns_server()
        zone.mx(domain, "127.0.0.1")
        tmp = Path(self.mktemp())
        tmp.mkdir()
        migrate(tmp / "db.sqlite")
        self.clock = Clock()
        self.store = Store(tmp / "db.sqlite", self.clock)
        self.addCleanup(self.store.close)
        from gehirn_ts.store.queue import QueueStore

        self.qs = QueueStore(self.store)
        resolver = client.Resolver(servers=[("127.0.0.1", zone.port)], reactor=reactor)
        courier = MxCourier(reactor, resolver, Settings(helo="mta.test", port=port, timeout=5))
        self.courier = courier
        self.queue = MailQueue(
            store=self.qs,
            courier=courier,
            directory=tmp / "queue",
            clock=self.clock,
            retry=retry,
            **({} if threads is None else {"threads": threads}),
        )
        self.reports: list[tuple[str, list[tuple[str, str | None]]]] = []

        async def reporter(msg: QueuedMessage, rcpts: list[RecipientState]) -> None:
            self.reports.append((msg.id, [(r.address, r.report) for r in rcpts]))

        self.queue.reporter = reporter
        self.queue.startService()
        self.addCleanup(self.queue.stopService)
        self.outbound = Outbound(
            store=self.qs, queue=self.queue, keys=None, clock=self.clock, hostname="mta.test"
        )

    async def _submit(self, *rcpts: NewRecipient, **kw: Any) -> str:
        mid, created = await self.outbound.submit(
            sender="a@src.test",
            recipients=rcpts,
            account_id=None,
            origin="api",
            data=MESSAGE,
            **kw,
        )
        assert created
        return mid

    async def _attempts(self, mid: str, n: int) -> Any:
        async def done() -> Any:
            _, rcpts, attempts = await self.qs.get(mid)
            return (
                (rcpts, attempts) if len(attempts) >= n and self.queue._attempts == set() else None
            )

        return await until(done)

    @inline
    async def test_451_twice_then_250_is_delivered_on_the_third_try(self) -> None:
        script = Script(plan={"RCPT": ["451 4.3.0 try later", "451 4.3.0 try later"]})
        self._setup(script, "flaky.test", MailRetry(jitter=0))
        mid = await self._submit(NewRecipient("r@flaky.test"))
        rcpts, _ = await self._attempts(mid, 1)
        assert rcpts[0].status == "queued" and rcpts[0].next_attempt_at == 300
        self.clock.advance(299)
        await sleep(0.2)
        assert script.sessions == 1  # not before its time
        self.clock.advance(1)
        rcpts, _ = await self._attempts(mid, 2)
        assert rcpts[0].next_attempt_at == 300 + 600  # the wait doubles
        self.clock.advance(600)
        rcpts, attempts = await self._attempts(mid, 3)
        assert rcpts[0].status == "delivered" and rcpts[0].attempts == 3
        assert [a.outcome for a in attempts] == ["deferred", "deferred", "delivered"]
        assert [a.started_at for a in attempts] == [0, 300, 900]
        await until(lambda: self.reports)
        assert self.reports == [(mid, [("r@flaky.test", "delivered")])]
        # The message crossed the wire dot-stuffed and came out whole.
        assert script.messages[0] == MESSAGE
        # Done: the file goes once the report is recorded (after the reporter returns).
        await until(lambda: not os.path.exists(self.queue.path(mid)))

    @inline
    async def test_delayed_at_the_threshold_then_per_interval_then_failed_at_lifetime(
        self,
    ) -> None:
        script = Script(plan={"RCPT": ["451 4.7.1 greylisted"] * 50})
        retry = MailRetry(
            first=100, factor=1, max_interval=100, lifetime=1000, delay_warning=300, jitter=0
        )
        self._setup(script, "slow.test", retry)
        mid = await self._submit(NewRecipient("r@slow.test", ["DELAY", "FAILURE"]))
        for n in range(1, 12):
            await self._attempts(mid, n)
            await until(lambda: self.queue._running_tick is None)
            self.clock.advance(100)
        rcpts, attempts = await self._attempts(mid, 11)
        await until(lambda: any(k == "failed" for _, rs in self.reports for _, k in rs))
        kinds = [k for _, rs in self.reports for _, k in rs]
        # 11 tries (t=0..1000); a delay notice at t=300, 600 and 900 only; failed at 1000.
        assert len(attempts) == 11
        assert kinds == ["delayed", "delayed", "delayed", "failed"]
        assert rcpts[0].status == "failed" and rcpts[0].smtp_status == "4.7.1"

    @inline
    async def test_next_hop_without_dsn_makes_success_a_relayed_report(self) -> None:
        script = Script(extensions=["PIPELINING", "8BITMIME"])
        self._setup(script, "nodsn.test", MailRetry(jitter=0))
        mid = await self._submit(
            NewRecipient("a@nodsn.test", ["SUCCESS"], ("rfc822", "A@nodsn.test")),
            NewRecipient("b@nodsn.test"),
            envid="E1",
            ret="HDRS",
        )
        await until(lambda: self.reports)
        assert self.reports == [(mid, [("a@nodsn.test", "relayed"), ("b@nodsn.test", "delivered")])]
        # No DSN offered: no DSN parameters sent (RFC 3461 section 4).
        assert script.commands[1:4] == [
            "MAIL FROM:<a@src.test>",
            "RCPT TO:<a@nodsn.test>",
            "RCPT TO:<b@nodsn.test>",
        ]

    @inline
    async def test_dsn_parameters_and_size_go_to_a_peer_that_offers_them(self) -> None:
        script = Script(extensions=["PIPELINING", "8BITMIME", "DSN", "SIZE 1000000"])
        self._setup(script, "dsn.test", MailRetry(jitter=0))
        await self._submit(
            NewRecipient("a@dsn.test", ["SUCCESS", "DELAY"], ("rfc822", "A+b=c@dsn.test")),
            envid="E 1",
            ret="HDRS",
            body="8BITMIME",
        )
        await until(lambda: self.reports)
        assert script.commands[1:3] == [
            f"MAIL FROM:<a@src.test> SIZE={len(MESSAGE)} BODY=8BITMIME RET=HDRS ENVID=E+201",
            "RCPT TO:<a@dsn.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;A+2Bb+3Dc@dsn.test",
        ]

    @inline
    async def test_too_large_for_the_peer_fails_without_mail(self) -> None:
        script = Script(extensions=["SIZE 10"])
        self._setup(script, "small.test", MailRetry(jitter=0))
        mid = await self._submit(NewRecipient("a@small.test"))
        await until(lambda: self.reports)
        _, rcpts, _ = await self.qs.get(mid)
        assert rcpts[0].status == "failed" and rcpts[0].smtp_status == "5.3.4"
        assert not any(c.startswith("MAIL") for c in script.commands)

    @inline
    async def test_null_mx_and_nxdomain_fail_at_once_a_dns_failure_defers(self) -> None:
        self._setup(Script(), "unused.test", MailRetry(jitter=0))
        zone = dns_server()
        zone.set("nullmx.test", "MX", [0, "."])
        mid = await self._submit(NewRecipient("a@nullmx.test"), NewRecipient("b@nxdomain.invalid"))
        await until(lambda: self.reports)
        _, rcpts, _ = await self.qs.get(mid)
        assert [(r.status, r.smtp_status) for r in rcpts] == [
            ("failed", "5.1.10"),
            ("failed", "5.1.2"),
        ]
        assert rcpts[0].reply is not None and rcpts[0].reply.startswith("556 5.1.10")

    @inline
    async def test_mx_hosts_are_tried_in_preference_order(self) -> None:
        script = Script()
        self._setup(script, "pref.test", MailRetry(jitter=0))
        zone = dns_server()
        # The preferred MX has no address; the second refuses at the greeting; the
        # third takes the message.
        zone.set(
            "pref2.test",
            "MX",
            [5, "gone.pref2.test"],
            [10, "busy.pref2.test"],
            [20, "mx.pref.test"],
        )
        zone.set("gone.pref2.test", "TXT", "no address here")
        zone.set("busy.pref2.test", "A", "127.0.0.1")
        script.plan["CONNECT"] = ["421 4.3.2 busy"]
        mid = await self._submit(NewRecipient("a@pref2.test"))
        await until(lambda: self.reports)
        _, rcpts, _ = await self.qs.get(mid)
        assert rcpts[0].status == "delivered" and rcpts[0].remote_mta == "mx.pref.test"
        assert script.sessions == 2

    @inline
    async def test_per_domain_concurrency_limit_and_the_implicit_mx(self) -> None:
        from twisted.internet.defer import Deferred

        script = Script()
        gate: Deferred[None] = Deferred()
        script.hold = gate
        self._setup(script, "unused2.test", MailRetry(jitter=0))
        self.queue._per_domain = 2
        zone = dns_server()
        zone.set("busy.test", "A", "127.0.0.1")  # no MX: the domain itself (RFC 5321 5.1)
        reads: list[tuple[int, list[str], int]] = []
        due = self.qs.due

        async def spy(now: float, limit: int, skip_domains: list[str] = (), **kw: Any) -> Any:  # type: ignore[assignment]
            found = await due(now, limit, skip_domains, **kw)
            reads.append((limit, list(skip_domains), len(found)))
            return found

        self.qs.due = spy  # type: ignore[method-assign]
        ids = [await self._submit(NewRecipient(f"r{n}@busy.test")) for n in range(5)]
        await until(lambda: len(script.messages) + script.held == 2)
        await sleep(0.3)
        assert script.sessions == 2  # the other three wait for a slot
        # While the domain is at its limit, queue runs do not read its waiting recipients.
        assert reads[-1][1] == ["busy.test"] and reads[-1][2] == 0, reads
        gate.callback(None)
        await until(lambda: len(script.messages) == 5)
        await until(lambda: len(self.reports) == 5)
        assert {mid for mid, _ in self.reports} == set(ids)
        assert script.concurrent_peak == 2

    @inline
    async def test_stopping_during_a_queue_run_leaves_no_timer(self) -> None:
        from twisted.internet.defer import Deferred

        self._setup(Script(), "stop.test", MailRetry(jitter=0))
        await until(lambda: self.queue._running_tick is None)
        # The run's last step (when the next is due, then the timer) waits on the store ...
        gate: Deferred[None] = Deferred()
        asked: list[bool] = []
        next_due = self.qs.next_due

        def slow_next_due() -> Deferred[float | None]:
            asked.append(True)
            return gate.addCallback(lambda _: next_due())

        self.qs.next_due = slow_next_due  # type: ignore[method-assign]
        self.queue.wake()
        await until(lambda: asked)
        stopped = self.queue.stopService()  # ... while the queue stops
        gate.callback(None)
        await stopped
        assert [c for c in self.clock.getDelayedCalls() if c.active()] == []

    @inline
    async def test_an_api_message_gives_the_threads_its_signature_and_fsyncs_only(self) -> None:
        from gehirn_ts.mta import dkim

        workers, recorded = recording_workers(self)
        self._setup(Script(), "unused4.test", MailRetry(jitter=0), threads=workers)
        await self.queue.stopService()  # only the submission is looked at here
        private, _record = dkim.generate("ed25519")

        async def keys(domain: str) -> list[dkim.SigningKey]:
            return [dkim.SigningKey(domain, "s1", "ed25519", private)]

        for lookup, expected in (
            (None, ["_fsync_file_and_dir"]),
            (keys, ["sign", "_fsync_file_and_dir"]),
        ):
            recorded.clear()
            self.outbound._keys = lookup
            mid = await self._submit(NewRecipient("r@unused4.test"))
            assert [name for name, _ in recorded] == expected
            assert all(thread == "io-0" for _, thread in recorded)
            written = Path(self.queue.path(mid)).read_bytes()
            assert written.endswith(MESSAGE)
            assert written.startswith(b"DKIM-Signature:") == (lookup is not None)

    @inline
    async def test_a_reported_message_s_file_goes_without_a_thread_job(self) -> None:
        workers, recorded = recording_workers(self)
        self._setup(Script(), "unused5.test", MailRetry(jitter=0), threads=workers)
        await until(lambda: self.queue._sweeping.called)  # the start's sweep is done
        recorded.clear()
        mid = await self._submit(NewRecipient("r@unused5.test"))
        await until(lambda: self.reports and not os.path.exists(self.queue.path(mid)))
        assert [name for name, _ in recorded] == ["_fsync_file_and_dir"]

    @inline
    async def test_the_due_read_leaves_out_the_domains_asked(self) -> None:
        self._setup(Script(), "unused3.test", MailRetry(jitter=0))
        await self.queue.stopService()  # only the store is used here
        for n, domain in enumerate(["a.test", "b.test", "a.test", "c.test"]):
            await self._submit(NewRecipient(f"r{n}@{domain}"))
        now = self.clock.seconds() + 1
        everything = await self.qs.due(now, 10)
        assert sorted(r.domain for _, r in everything) == ["a.test", "a.test", "b.test", "c.test"]
        some = await self.qs.due(now, 10, skip_domains=["a.test", "c.test"])
        assert [r.domain for _, r in some] == ["b.test"]
        assert len(await self.qs.due(now, 2)) == 2
        # Keys asked to be left out (running attempts) are not read.
        key = (everything[0][0].id, everything[0][1].n)
        rest = await self.qs.due(now, 10, exclude={key})
        assert len(rest) == 3 and key not in {(m.id, r.n) for m, r in rest}
        # With room, a domain gives no more messages than it may start; the recipients
        # of one message stay together.
        both = await self._submit(NewRecipient("x1@d.test"), NewRecipient("x2@d.test"))
        self.clock.advance(1)  # the later message is due later: a fixed order
        await self._submit(NewRecipient("y@d.test"))
        now = self.clock.seconds() + 1
        capped = await self.qs.due(now, 10, room={"a.test": 1, "d.test": 1})
        assert sorted((r.domain, m.id == both) for m, r in capped) == [
            ("a.test", False),
            ("d.test", True),
            ("d.test", True),
        ]
        opened = await self.qs.due(now, 10, room={"a.test": 0}, room_default=9)
        assert (
            sorted(r.domain for _, r in opened) == ["b.test", "c.test", "d.test"] + ["d.test"] * 2
        )

    @inline
    async def test_queue_runs_read_the_next_due_time_and_scrapes_read_the_gauges(self) -> None:
        from gehirn_ts.metrics import Metrics

        self._setup(Script(), "unused5.test", MailRetry(jitter=0))
        await self.queue.stopService()
        metrics = Metrics()
        self.queue = MailQueue(
            store=self.qs,
            courier=self.courier,
            directory=self.queue.directory,
            clock=self.clock,
            retry=MailRetry(jitter=0),
            metrics=metrics,
        )
        assert await self.qs.next_due() is None
        assert await self.qs.stats() == (0, None)
        first = await self._submit(NewRecipient("a@later.test"), NewRecipient("b@later.test"))
        self.clock.advance(5)
        await self._submit(NewRecipient("c@later.test"))
        assert await self.qs.next_due() == 0.0
        assert await self.qs.stats() == (3, 0.0)
        await self.qs.hold(first, True)
        # A held message is never due, but it is still queued (and counted).
        assert await self.qs.next_due() == 5.0
        assert await self.qs.stats() == (3, 0.0)
        # The gauges are read when scraped: the queue has not run at all here.
        self.clock.advance(10)
        await metrics.refresh()
        rendered = metrics.render().decode()
        assert "gehirn_queue_recipients 3.0" in rendered
        assert "gehirn_queue_oldest_seconds 15.0" in rendered
        # A queue run asks only when the next attempt is due: counting the whole
        # backlog in every run made each run cost as much as the backlog.
        counted: list[bool] = []
        stats = self.qs.stats

        def spy() -> Any:
            counted.append(True)
            return stats()

        self.qs.stats = spy  # type: ignore[method-assign]
        self.queue.startService()
        self.addCleanup(self.queue.stopService)
        await until(lambda: self.queue._running_tick is None and self.queue._timer is not None)
        assert counted == []

    @inline
    async def test_a_session_carries_the_next_messages_to_its_host_then_ends(self) -> None:
        script = Script()
        self._setup(script, "reuse.test", MailRetry(jitter=0))
        self.courier._settings.reuse_limit = 3
        self.courier._settings.reuse_idle = 0.3
        for n in range(4):
            await self._submit(NewRecipient(f"r{n}@reuse.test"))
            await until(lambda n=n: len(script.messages) == n + 1)  # one after another
        # Three messages share the first session (RSET before each next one, RFC 5321
        # 4.1.1.5); the reuse limit sends the fourth through a second one.
        assert script.sessions == 2
        words = [c.split(" ")[0].split(":")[0].upper() for c in script.commands]
        assert words.count("EHLO") == 2 and words.count("RSET") == 2
        assert words[:5] == ["EHLO", "MAIL", "RCPT", "DATA", "RSET"]
        assert words.count("QUIT") == 1  # the first session, at its limit
        # Idle past reuse_idle: the second session ends with QUIT too.
        await until(lambda: script.open == 0)
        assert script.commands.count("QUIT") == 2 and script.commands[-1] == "QUIT"

    @inline
    async def test_a_kept_session_the_server_dropped_is_replaced(self) -> None:
        script = Script()
        self._setup(script, "dropped.test", MailRetry(jitter=0))
        self.courier._settings.reuse_idle = 30
        await self._submit(NewRecipient("a@dropped.test"))
        await until(lambda: len(script.messages) == 1)
        # The kept session answers the next RSET with 421 (RFC 5321 section 3.8): it is
        # dropped, and the message goes through a new one.
        script.plan["RSET"] = ["421 4.4.2 closing"]
        await self._submit(NewRecipient("b@dropped.test"))
        await until(lambda: len(script.messages) == 2)
        assert "RSET" in script.commands and script.sessions == 2
        await self.queue.stopService()  # QUITs the kept session
        await until(lambda: script.open == 0)
