"""Received mail -> the KVS, the index in the store, and a ``mail.received`` event.

Runs after the 250 (the message is in the spool, durable) and again at every start for
whatever the spool still holds, so each step is idempotent: the KVS object is the
spooled file under a second name (the queue id), the index row is keyed by (queue id,
account), and the event id is derived from both, so a repeat stores and publishes
nothing twice.
Recipients outside the served domains (relayed mail from authenticated or trusted
clients) and the targets of forward routes go to the outbound queue, under ids derived
from the queue id (``QID`` and ``QID.fwd``), so a repeat queues nothing twice.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from sqlite3 import Cursor
from typing import Any

from twisted.internet.defer import Deferred, DeferredList

from gehirn_ts.edj.publisher import Publisher
from gehirn_ts.events import MAIL_RECEIVED, Event
from gehirn_ts.groupcommit import DirectorySync, Group, Outcomes, fsync_directory
from gehirn_ts.logs import Logger
from gehirn_ts.metrics import Metrics
from gehirn_ts.mta.dkim import DkimResult, is_signed
from gehirn_ts.mta.headers import authentication_results
from gehirn_ts.mta.outbound import Outbound
from gehirn_ts.mta.spf import SpfResult
from gehirn_ts.mta.spool import Envelope, Recipient, Spool, read_all
from gehirn_ts.mta.summary import summarize_bytes
from gehirn_ts.stamps import rfc3339
from gehirn_ts.store.db import MailStore, Received
from gehirn_ts.store.queue import NewRecipient

log = Logger()

SUMMARY_BYTES = 256 * 1024  # what is parsed for headers and the excerpt
# Messages up to this size are read on the reactor thread (for the summary and a DKIM
# check); a larger read would hold the reactor up (256 KiB: about 0.1 ms from the page
# cache).
INLINE_BYTES = 256 * 1024
# What the spooled file holds beyond the message's DATA: the trace fields added on
# receipt (Received, Received-SPF), about; a longer one costs one read more.
RECEIVED_FIELDS_BYTES = 1024


def _link_object(source: str, target: str) -> bool:
    """The spooled file under its KVS name: a second name for the same file, whose data
    is on disk since before the 250. False where the file system has no hard links (or
    the spool and the KVS are on two of them): the caller copies."""
    try:
        os.link(source, target)
    except FileExistsError:
        pass  # a repeat after a crash: the same file
    except OSError:
        return False
    return True


def _copy_object(source: str, target: str) -> None:
    """In a thread: the KVS object as a copy, its data, its name, then the directory,
    on disk (where ``_link_object`` cannot link)."""
    if os.path.exists(target):
        fsync_directory(os.path.dirname(target))
        return
    tmp = f"{os.path.dirname(target)}/.{os.path.basename(target)}"
    with open(source, "rb") as src, open(tmp, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    fsync_directory(os.path.dirname(target))


@dataclass
class _Prepared:
    """A received message ready for the store, and what ``Inbound._settle`` needs after."""

    envelope: Envelope
    linked: bool  # its KVS object is a new name in the KVS directory
    relayed: list[Recipient]
    forwarded: dict[str, list[NewRecipient]]
    accounts: list[str]
    published: list[tuple[Event, Callable[[Cursor], object]]] = field(default_factory=list)
    unowned: list[Received] = field(default_factory=list)


# Messages whose rows and events are stored in one call, at most (``Inbound._store_many``).
BATCH = 64

OwnerLookup = Callable[[str], Awaitable[str | None]]
AccountId = Callable[[str], Awaitable[int | None]]


def summarize(head: bytes) -> dict[str, Any]:
    """The event's header fields and excerpt; a message the parser chokes on gets none."""
    try:
        return summarize_bytes(head)
    except Exception:
        # summarize_bytes is property-tested not to raise; should a message still find
        # a way, it is stored and published without a summary rather than left spooled.
        log.failure("summarizing a received message failed")
        return summarize_bytes(b"")


# Spooled messages looked at again at a time (``Inbound.retry``).
RETRY_BATCH = 500


class Inbound:
    def __init__(
        self,
        *,
        spool: Spool,
        kvs: Path,
        mail: MailStore,
        publisher: Publisher,
        owner: OwnerLookup,
        hostname: str,
        dkim_verify: Callable[[bytes], list[DkimResult]] | None = None,
        routes: Callable[[str], Awaitable[Any]] | None = None,
        outbound: Outbound | None = None,
        account_id: AccountId | None = None,
        forward_sender: str = "",
        metrics: Metrics | None = None,
    ) -> None:
        if metrics is not None:
            metrics.refreshers.append(self._refresh_gauges)
            self._metrics = metrics
        self._outbound_queue = outbound
        self._account_id = account_id
        self._forward_sender = forward_sender or f"postmaster@{hostname}"
        self._routes = routes
        self._dkim_verify = dkim_verify
        self._spool = spool
        self._kvs = kvs
        self._kvs_dir = str(kvs)  # per-message paths as strings (see Spool.tmp_dir)
        self._mail = mail
        self._publisher = publisher
        self._owner = owner
        self._hostname = hostname
        kvs.mkdir(parents=True, exist_ok=True)
        # The KVS directory's new names on disk, many messages' in one fsync.
        self._kvs_names = DirectorySync(spool.threads, self._kvs_dir)
        self._active: set[str] = set()
        # Received messages' rows and events, stored together as a group commit.
        self._stores: Group[_Prepared] = Group(self._store_many, BATCH)

    def accepted(self, envelope: Envelope, kinds: dict[str, str] | None = None) -> None:
        d = Deferred.fromCoroutine(self.process(envelope))
        d.addErrback(
            lambda f: log.failure(
                "processing received {qid} failed; it stays spooled and is tried again later",
                f,
                qid=envelope.queue_id,
            )
        )

    async def resume(self) -> int:
        """Process what the spool holds (at a start), many at a time: their rows and
        events are stored together (``_store_many``)."""
        pending = self._spool.pending()
        for start in range(0, len(pending), BATCH):
            chunk = pending[start : start + BATCH]
            results = await DeferredList(
                [Deferred.fromCoroutine(self.process(e)) for e in chunk], consumeErrors=True
            )
            for envelope, (ok, failure) in zip(chunk, results, strict=True):
                if not ok:
                    log.failure(
                        "processing spooled {qid} failed; it stays spooled",
                        failure,
                        qid=envelope.queue_id,
                    )
        return len(pending)

    async def _refresh_gauges(self) -> None:
        """The spool's gauge, counted when it is scraped."""
        self._metrics.spool_messages.set(await self._spool.threads.run(self._spool.count))

    async def retry(self, before: float) -> int:
        """Process the committed messages still spooled that were written before
        ``before`` and are not being processed: a processing that failed (a store or a
        disk that failed for a while), or a message an SMTP worker committed and died
        before reporting. Returns how many were processed.

        A batch at a time, oldest first, until one has a failure: a store that still
        fails is tried again at the next look, not once per message now, and the log
        gets one traceback a look, not one a message."""
        done = 0
        while True:
            stale = await self._spool.threads.run(self._spool.stale, before, RETRY_BATCH)
            failed, done_before = 0, done
            for envelope in stale:
                if envelope.queue_id in self._active:
                    continue
                try:
                    await self.process(envelope)
                except Exception:
                    failed += 1
                    if failed == 1:
                        log.failure(
                            "processing spooled {qid} failed again; it stays spooled",
                            qid=envelope.queue_id,
                        )
                else:
                    done += 1
            if failed > 1:
                log.warn("{n} more spooled messages failed again", n=failed - 1)
            # A batch all being processed already would come back as it was.
            if failed or len(stale) < RETRY_BATCH or done == done_before:
                return done

    async def process(self, envelope: Envelope) -> None:
        qid = envelope.queue_id
        if qid in self._active:
            return
        self._active.add(qid)
        try:
            prepared = await self._prepare(envelope)
            if prepared.linked and not prepared.published:
                # (With events, the store call makes the name durable: _publish_batch.)
                await self._kvs_names.sync()
            if prepared.published:
                await self._stores.submit(prepared)
            await self._settle(prepared)
        finally:
            self._active.discard(qid)

    def _store_many(self, batch: list[_Prepared]) -> Deferred[Outcomes]:
        """The index rows and events of the messages that came while the store call
        before ran, in one store call and one bus interaction (``self._stores``). Each
        message's own waits before it (a DKIM key's lookup, a large file read in a
        thread) stay its own. For each message: stored, or the Conflict of an event id
        taken by another event."""
        return Deferred.fromCoroutine(self._publish_batch(batch))

    async def _publish_batch(self, batch: list[_Prepared]) -> Outcomes:
        published = [(n, event, tx) for n, p in enumerate(batch) for event, tx in p.published]
        txs = [tx for _, _, tx in published]
        linked = any(p.linked for p in batch)

        def with_store(cur: Cursor) -> None:
            if linked:
                # The KVS objects' new names durable before the rows and events that
                # name them commit: their directory's fsync here, in the store's
                # thread, instead of a thread job of its own for each batch.
                fsync_directory(self._kvs_dir)
            for tx in txs:
                tx(cur)

        conflicts = await self._publisher.publish_many(
            [event for _, event, _ in published], with_store=with_store
        )
        taken = {n: c for (n, _, _), c in zip(published, conflicts, strict=True) if c}
        return [(False, taken[n]) if n in taken else (True, None) for n in range(len(batch))]

    async def _prepare(self, envelope: Envelope) -> _Prepared:
        """The routes of a message's recipients, its summary and DKIM results, its KVS
        object, and the index rows and events to store."""
        qid = envelope.queue_id
        by_account: dict[str | None, list[dict[str, Any]]] = {}
        relayed: list[Recipient] = []
        forwarded: dict[str, list[NewRecipient]] = {}
        for rcpt in envelope.recipients:
            domain = rcpt.address.rpartition("@")[2] if "@" in rcpt.address else ""
            if domain == "":
                by_account.setdefault(None, []).append(vars(rcpt))
                continue
            # The route lookup names the owner too: one store read for both, and the
            # owner alone only for an address the routes do not know.
            found = await self._routes(rcpt.address) if self._routes is not None else None
            owner = found[0] if found else await self._owner(domain)
            if owner is None:
                relayed.append(rcpt)
                continue
            by_account.setdefault(owner, []).append(vars(rcpt))
            route = found[1] if found else None
            if route is not None and route.action == "forward":
                # Stored and published like any mail, and also handed to the outbound
                # queue for the route's addresses.
                # ORCPT keeps the address the sender wrote (RFC 3461 section 4.2).
                forwarded.setdefault(owner, []).extend(
                    NewRecipient(address, None, ("rfc822", rcpt.address))
                    for address in route.forward_to
                )
        spf_data = envelope.extra.get("spf")
        spf = SpfResult(**{**spf_data, "header": ""}) if spf_data else None
        obj = f"{qid}.eml"
        linked = False
        if envelope.size <= INLINE_BYTES:
            summary, dkim_results, linked = await self._examine_here(
                qid, envelope.size, bool(by_account)
            )
        else:
            # One trip to a thread for the reading, the checks and the KVS object.
            summary, dkim_results = await self._spool.threads.run(
                self._examine, qid, bool(by_account)
            )
        auth = {"spf": spf_data, "dkim": [d.as_dict() for d in dkim_results]}
        # The KVS object is the message as spooled; our Authentication-Results field
        # (RFC 8601) is kept here and put on top when the raw message is read.
        results_field = (
            authentication_results(self._hostname, spf, dkim_results).decode() if by_account else ""
        )
        prepared = _Prepared(
            envelope, linked, relayed, forwarded, sorted(a or "postmaster" for a in by_account)
        )
        for account, rcpts in by_account.items():
            meta = {
                **summary,
                "client": {
                    "ip": envelope.client_ip,
                    "helo": envelope.helo,
                    "tls": envelope.tls,
                    "authenticated": envelope.authenticated,
                },
                "dsn": {"ret": envelope.ret, "envid": envelope.envid},
                "body": envelope.body,
                "auth": auth,
                "authentication_results": results_field,
            }
            received = Received(
                id=qid,
                account=account,
                object=obj,
                sender=envelope.sender,
                recipients=[r["address"] for r in rcpts],
                size=envelope.size,
                received_at=envelope.received_at,
                meta=meta,
            )
            if account is None:
                prepared.unowned.append(received)
            else:
                # The index row and the event in one transaction: a received message
                # is listed exactly when its event is stored (and one store round trip
                # a message fewer).
                prepared.published.append(
                    (self._event(envelope, account, rcpts, meta), self._mail.received_tx(received))
                )
        return prepared

    async def _settle(self, p: _Prepared) -> None:
        """After the store: the postmaster's rows, the mail to pass on, and the spool."""
        envelope = p.envelope
        qid = envelope.queue_id
        for received in p.unowned:
            await self._mail.record_received(received)
        if p.relayed or p.forwarded:
            await self._queue_onwards(
                envelope, self._spool.message_path(qid), p.relayed, p.forwarded
            )
        if envelope.size <= INLINE_BYTES:
            self._spool.remove(qid)  # two small files: metadata work, as the renames
        else:
            # Freeing a large file's blocks can take a while: not on the reactor.
            await self._spool.threads.run(self._spool.remove, qid)
        log.info(
            "received {qid} stored for {accounts}{relay}",
            qid=qid,
            accounts=p.accounts,
            relay=f", {len(p.relayed)} recipients relayed" if p.relayed else "",
        )

    async def _queue_onwards(
        self,
        envelope: Envelope,
        source: Path,
        relayed: list[Recipient],
        forwarded: dict[str, list[NewRecipient]],
    ) -> None:
        if self._outbound_queue is None or self._account_id is None:
            raise RuntimeError("no outbound queue to relay to")
        qid = envelope.queue_id
        if relayed:
            # The account: the authenticated one, else (trusted network) the sender
            # domain's owner, if any.
            owner = envelope.authenticated
            if owner is None and "@" in envelope.sender:
                owner = await self._owner(envelope.sender.rpartition("@")[2].lower())
            await self._outbound_queue.submit(
                sender=envelope.sender,
                recipients=[
                    NewRecipient(
                        r.address,
                        r.notify,
                        (r.orcpt[0], r.orcpt[1]) if r.orcpt else None,
                    )
                    for r in relayed
                ],
                account_id=await self._account_id(owner) if owner else None,
                origin="submission" if envelope.authenticated else "relay",
                source=source,
                queue_id=qid,
                body=envelope.body,
                ret=envelope.ret,
                envid=envelope.envid,
            )
        for n, (account, rcpts) in enumerate(sorted(forwarded.items())):
            await self._outbound_queue.submit(
                sender=self._forward_sender,
                recipients=rcpts,
                account_id=await self._account_id(account),
                origin="forward",
                source=source,
                queue_id=f"{qid}.fwd{n}",
                body=envelope.body,
            )

    def _event(
        self, envelope: Envelope, account: str, rcpts: list[dict[str, Any]], meta: dict[str, Any]
    ) -> Event:
        # Everything, the time included, derives from the spooled envelope: a repeat after
        # a crash builds the very same event, which the store then keeps once.
        return Event(
            type=MAIL_RECEIVED,
            source=f"/gehirn-ts/mta/{self._hostname}",
            id=f"received.{envelope.queue_id}.{account}",
            time=rfc3339(envelope.received_at),
            account=account,
            subject=envelope.queue_id,
            data={
                "queue_id": envelope.queue_id,
                "envelope": {
                    "sender": envelope.sender,
                    "recipients": rcpts,
                    "ret": envelope.ret,
                    "envid": envelope.envid,
                    "body": envelope.body,
                },
                "from": meta["from"],
                "to": meta["to"],
                "cc": meta["cc"],
                "subject": meta["subject"],
                "message_id": meta["message_id"],
                "date": meta["date"],
                "size": envelope.size,
                "kvs_key": envelope.queue_id,
                "excerpt": meta["excerpt"],
                "loop_hops": meta.get("loop_hops", 0),
                "client": meta["client"],
                "auth": meta["auth"],
            },
        )

    async def _examine_here(
        self, qid: str, size: int, store: bool
    ) -> tuple[dict[str, Any], list[DkimResult], bool]:
        """``_examine`` for a small message: the reading and the summary here, on the
        reactor thread (page-cache work, as the DATA lines were), and the KVS object's
        link; only a DKIM check (it asks DNS) and the directory's fsync go to a thread,
        the fsync shared with the other messages that ask meanwhile. A thread job of a
        dozen system calls takes the interpreter lock back after each one, and the
        reactor thread waits for it (docs/performance.md)."""
        threads = self._spool.threads
        source = f"{self._spool.incoming_dir}/{qid}.eml"
        # os.open and os.read: Python's open() and read() add four system calls
        # (``Incoming``).
        fd = os.open(source, os.O_RDONLY)
        try:
            whole = read_all(fd, size + RECEIVED_FIELDS_BYTES)
        finally:
            os.close(fd)
        dkim_results: list[DkimResult] = []
        if self._dkim_verify is not None and is_signed(whole):
            dkim_results = await threads.run(self._dkim_verify, whole)
        summary = summarize(whole[:SUMMARY_BYTES])
        linked = False
        if store:
            target = f"{self._kvs_dir}/{qid}.eml"
            linked = _link_object(source, target)
            if not linked:
                await threads.run(_copy_object, source, target)
        return summary, dkim_results, linked

    def _examine(self, qid: str, store: bool) -> tuple[dict[str, Any], list[DkimResult]]:
        """Summary and DKIM results of a spooled message, and its KVS object when
        ``store`` (blocking: runs in a thread)."""
        source = f"{self._spool.incoming_dir}/{qid}.eml"
        with open(source, "rb") as f:
            head = f.read(SUMMARY_BYTES)
            dkim_results = []
            if self._dkim_verify is not None and (is_signed(head) or b"\r\n\r\n" not in head):
                # DKIM hashes the whole message (RFC 6376 section 3.7); a header section
                # longer than the head is left to the checker to look through.
                f.seek(0)
                dkim_results = self._dkim_verify(f.read())
        summary = summarize(head)
        if store:
            target = f"{self._kvs_dir}/{qid}.eml"
            if _link_object(source, target):
                fsync_directory(self._kvs_dir)
            else:
                _copy_object(source, target)
        return summary, dkim_results

    def object_path(self, obj: str) -> Path:
        return self._kvs / obj
