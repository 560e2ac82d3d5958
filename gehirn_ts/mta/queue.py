"""The outbound queue's scheduler: picks due recipients, hands them to the courier,
records each recipient's outcome, and sends the status events and DSN reports.

It knows nothing about SMTP: an ``ICourier`` takes a Parcel (one message, the
recipients of one domain) and returns one RcptOutcome per recipient. Limits: at most
``concurrency`` attempts at once, ``per_domain`` of them to one destination domain.
The clock is injected (tests run the retry schedule on ``task.Clock``). Besides its own
timer it polls the store every ``poll`` seconds, so that the CLI's flush or release (a
row change in the shared database) is seen without a signal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall

from gehirn_ts.interfaces import ICourier, Parcel, ParcelRecipient, RcptOutcome
from gehirn_ts.logs import Logger
from gehirn_ts.metrics import Metrics
from gehirn_ts.mta.schedule import MailRetry
from gehirn_ts.mta.spool import unlink_quietly
from gehirn_ts.store.queue import (
    AttemptRecord,
    QueuedMessage,
    QueueStore,
    RecipientState,
    Update,
)
from gehirn_ts.threads import REACTOR_THREADS, ThreadRunner

log = Logger()
# Queue files up to this size are unlinked on the reactor thread (as the spool's
# messages up to 256 KiB are: mta/inbound.py).
UNLINK_HERE_BYTES = 256 * 1024


Reporter = Callable[[QueuedMessage, list[RecipientState]], Awaitable[None]]


def decide(
    retry: MailRetry, msg: QueuedMessage, rcpt: RecipientState, outcome: RcptOutcome, now: float
) -> Update:
    """The new state of one recipient after one attempt (pure)."""

    def update(
        status: str, nxt: float | None, kind: str, report: str | None, notice: bool = False
    ) -> Update:
        return Update(
            n=rcpt.n,
            status=status,
            next_attempt_at=nxt,
            reply=outcome.reply,
            smtp_status=outcome.status,
            remote_mta=outcome.remote_mta,
            tls=outcome.tls,
            outcome=kind,
            report=report,
            delay_notice=notice,
        )

    if outcome.kind in ("delivered", "relayed"):
        return update(outcome.kind, None, outcome.kind, outcome.kind)
    if outcome.kind == "failed":
        return update("failed", None, "failed", "failed")
    nxt = retry.next_attempt(rcpt.attempts + 1, msg.created_at, now)
    if nxt is None:
        # Out of time: failed with the last temporary error's status (as Postfix does).
        return update("failed", None, "failed", "failed")
    notice = retry.delay_notice_due(msg.created_at, rcpt.last_delay_notice, now)
    return update("queued", nxt, "deferred", "delayed" if notice else None, notice)


class MailQueue(Service):
    name = "mail-queue"

    def __init__(
        self,
        *,
        store: QueueStore,
        courier: ICourier,
        directory: Path,
        clock: Any,
        retry: MailRetry,
        reporter: Reporter | None = None,
        concurrency: int = 20,
        per_domain: int = 5,
        poll: float = 5.0,
        metrics: Metrics | None = None,
        threads: ThreadRunner = REACTOR_THREADS,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._metrics.refreshers.append(self._refresh_gauges)
        self.threads = threads  # for the queue directory's file work (and Outbound's)
        self.store = store
        self._courier = courier
        self.directory = directory
        self._dir = str(directory)
        self._clock = clock
        self._retry = retry
        self.reporter = reporter
        self._concurrency = concurrency
        self._per_domain = per_domain
        self._poll = poll
        self._timer: IDelayedCall | None = None
        self._running_tick: Deferred[None] | None = None
        self._sweeping: Deferred[None] | None = None
        self._again = False
        self._active: set[tuple[str, int]] = set()
        # A due() read may have begun before an attempt's result was committed: the
        # attempts that finished since the read began are not started again from it.
        self._epoch = 0
        self._finished: dict[tuple[str, int], int] = {}
        self._per_domain_active: dict[str, int] = {}
        self._attempts: set[Deferred[None]] = set()
        # Files being written by a submit whose row is not committed yet: the sweep
        # leaves them alone.
        self.writing: set[str] = set()
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, message_id: str) -> str:
        # A string: a pathlib.Path made and turned back into one for every open, fsync
        # and unlink was 3% of sending's interpreter time.
        return f"{self._dir}/{message_id}.eml"

    # --- lifecycle ---

    def startService(self) -> None:
        super().startService()
        d = self._sweeping = Deferred.fromCoroutine(self._sweep())
        d.addErrback(lambda f: log.failure("sweeping the queue directory failed", f))
        d.addBoth(lambda _: self.wake())

    def stopService(self) -> Any:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        """Attempts in flight finish (their results are recorded) before the store closes;
        a queue run in progress starts none once stopping."""
        if self._sweeping is not None:
            await DeferredList([self._sweeping], consumeErrors=True)
        if self._running_tick is not None:
            await DeferredList([self._running_tick], consumeErrors=True)
        while self._attempts:
            await DeferredList(list(self._attempts), consumeErrors=True)
        await self._courier.close()

    async def _sweep(self) -> None:
        """Files whose message is finished or was never committed are removed."""
        names = await self.threads.run(lambda: [p.stem for p in self.directory.glob("*.eml")])
        keep = await self.store.known(names)
        stale = [n for n in names if n not in keep and n not in self.writing]

        def unlink() -> None:
            for n in stale:
                unlink_quietly(self.path(n))

        await self.threads.run(unlink)
        for tmp in self.directory.glob(".*.eml.tmp"):
            if tmp.name[1 : -len(".eml.tmp")] not in self.writing:
                tmp.unlink(missing_ok=True)

    # --- scheduling ---

    def wake(self) -> None:
        """Look for due work now (after a submit, a finished attempt, or a timer)."""
        if not self.running:
            return
        if self._running_tick is not None:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._running_tick = Deferred.fromCoroutine(self._tick())
        self._running_tick.addErrback(lambda f: log.failure("queue run failed", f))
        self._running_tick.addBoth(self._tick_done)

    def _tick_done(self, _: Any) -> None:
        self._running_tick = None
        if not self.running:
            return
        if self._again:
            self._again = False
            self.wake()

    def _arm(self, when: float | None) -> None:
        if not self.running:
            return  # stopped while this run awaited the store: no timer after stop
        now = self._clock.seconds()
        delay = self._poll if when is None else max(0.0, min(when - now, self._poll))
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self.wake)

    async def _tick(self) -> None:
        try:
            await DeferredList(
                [
                    Deferred.fromCoroutine(self._send_reports()),
                    Deferred.fromCoroutine(self._start_due()),
                ],
                fireOnOneErrback=True,
                consumeErrors=True,
            )
        finally:
            if self.running:
                self._arm(await self.store.next_due())

    async def _refresh_gauges(self) -> None:
        """The queue's gauges, read when they are scraped: counting the backlog in
        every queue run made each run cost as much as the backlog."""
        count, oldest = await self.store.stats()
        self._metrics.queue_recipients.set(count)
        self._metrics.queue_oldest.set(
            max(0.0, self._clock.seconds() - oldest) if oldest is not None else 0
        )

    async def _send_reports(self) -> None:
        # All at once: their store and bus writes share commits (group commit).
        pending = await self.store.pending_reports()
        await DeferredList(
            [Deferred.fromCoroutine(self._report(msg, rcpts)) for msg, rcpts in pending],
            consumeErrors=True,
        )

    async def _report(self, msg: QueuedMessage, rcpts: list[RecipientState]) -> None:
        if self.reporter is None:
            return
        try:
            await self.reporter(msg, rcpts)
        except Exception:
            log.failure("reporting the status of {qid} failed; retried later", qid=msg.id)
            return
        if await self.store.clear_reports(msg.id, [r.n for r in rcpts]):
            if msg.size <= UNLINK_HERE_BYTES:
                # A small file's unlink is metadata work, as the spool's renames: a
                # thread round trip cost more than the call.
                unlink_quietly(self.path(msg.id))
            else:
                # Freeing a large file's blocks can take a while: not on the reactor.
                await self.threads.run(unlink_quietly, self.path(msg.id))

    async def _start_due(self) -> None:
        free = self._concurrency - len(self._attempts)
        if free <= 0:
            return
        now = self._clock.seconds()
        self._epoch += 1
        epoch = self._epoch
        # Recipients in attempts still running are read again (their rows stay queued
        # until the attempt is recorded), and some of the rest share a message or wait
        # for their domain: read that many more than there are free slots.
        busy = [d for d, n in self._per_domain_active.items() if n >= self._per_domain]
        # Rows of running attempts, and messages a domain has no room for, are left out
        # in the read, before they are made into objects. (Attempts that finish while
        # the read runs are left out below.)
        room = {d: self._per_domain - n for d, n in self._per_domain_active.items()}
        due = await self.store.due(
            now,
            limit=len(self._active) + len(self._finished) + free * 8,
            skip_domains=busy,
            exclude=self._active,
            room=room,
            room_default=self._per_domain,
        )
        # Older marks are settled: every later read sees those results.
        self._finished = {k: e for k, e in self._finished.items() if e >= epoch}
        groups: dict[tuple[str, str], tuple[QueuedMessage, list[RecipientState]]] = {}
        for msg, rcpt in due:
            key = (msg.id, rcpt.n)
            if key in self._active or key in self._finished:
                continue
            groups.setdefault((msg.id, rcpt.domain), (msg, []))[1].append(rcpt)
        for (_, domain), (msg, rcpts) in groups.items():
            if not self.running or len(self._attempts) >= self._concurrency:
                break
            if self._per_domain_active.get(domain, 0) >= self._per_domain:
                continue
            self._launch(msg, domain, rcpts)

    def _launch(self, msg: QueuedMessage, domain: str, rcpts: list[RecipientState]) -> None:
        keys = [(msg.id, r.n) for r in rcpts]
        self._active.update(keys)
        self._per_domain_active[domain] = self._per_domain_active.get(domain, 0) + 1
        d = Deferred.fromCoroutine(self._attempt(msg, domain, rcpts))
        self._attempts.add(d)

        def done(result: Any) -> Any:
            self._attempts.discard(d)
            self._active.difference_update(keys)
            for key in keys:
                self._finished[key] = self._epoch
            self._per_domain_active[domain] -= 1
            if not self._per_domain_active[domain]:
                del self._per_domain_active[domain]
            self.wake()
            return result

        d.addBoth(done)
        d.addErrback(lambda f: log.failure("attempt for {qid} failed", f, qid=msg.id))

    async def _attempt(self, msg: QueuedMessage, domain: str, rcpts: list[RecipientState]) -> None:
        parcel = Parcel(
            queue_id=msg.id,
            sender=msg.sender,
            domain=domain,
            recipients=[ParcelRecipient(r.n, r.address, r.notify, r.orcpt) for r in rcpts],
            path=self.path(msg.id),
            size=msg.size,
            body=msg.body,
            ret=msg.ret,
            envid=msg.envid,
        )
        started = self._clock.seconds()
        try:
            outcomes = await self._courier.deliver(parcel)
        except Exception as e:
            log.failure("courier failed on {qid}", qid=msg.id)
            outcomes = [
                RcptOutcome(
                    r.n, "deferred", f"451 4.3.0 internal error: {type(e).__name__}", "4.3.0"
                )
                for r in rcpts
            ]
        now = self._clock.seconds()
        by_n = {o.n: o for o in outcomes}
        updates = [decide(self._retry, msg, r, by_n[r.n], now) for r in rcpts]
        attempts = [
            AttemptRecord(o.n, started, now - started, o.kind, o.reply, o.remote_mta, o.tls)
            for o in outcomes
        ]
        await self.store.record(msg.id, updates, attempts, now)
        for u in updates:
            if u.outcome in ("delivered", "relayed"):
                self._metrics.mail_sent.inc()
                self._metrics.mail_latency.observe(max(0.0, now - msg.created_at))
            elif u.outcome == "failed":
                self._metrics.mail_bounced.inc()
            else:
                self._metrics.mail_deferred.inc()
        for u in updates:
            log.info(
                "{qid} to {rcpt}: {outcome} ({reply})",
                qid=msg.id,
                rcpt=next(r.address for r in rcpts if r.n == u.n),
                outcome=u.outcome,
                reply=u.reply,
            )


def group_by_kind(rcpts: Sequence[RecipientState]) -> dict[str, list[RecipientState]]:
    out: dict[str, list[RecipientState]] = {}
    for r in rcpts:
        if r.report is not None:
            out.setdefault(r.report, []).append(r)
    return out
