"""Received mail -> the KVS, the index in the store, and a ``mail.received`` event.

Runs after the 250 (the message is in the spool, durable) and again at every start for
whatever the spool still holds, so each step is idempotent: the KVS object is a file
named by the queue id, the index row is keyed by (queue id, account), and the
event id is derived from both, so a repeat stores and publishes nothing twice.
Recipients outside the served domains (relayed mail from authenticated or trusted
clients) and the targets of forward routes go to the outbound queue, under ids derived
from the queue id (``QID`` and ``QID.fwd``), so a repeat queues nothing twice.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from gehirn_ts.edj.publisher import Publisher
from gehirn_ts.events import MAIL_RECEIVED, Event
from gehirn_ts.logs import Logger
from gehirn_ts.mta.dkim import DkimResult, is_signed
from gehirn_ts.mta.headers import authentication_results
from gehirn_ts.mta.outbound import Outbound
from gehirn_ts.mta.spf import SpfResult
from gehirn_ts.mta.spool import Envelope, Recipient, Spool, _fsync_dir
from gehirn_ts.mta.summary import summarize_bytes
from gehirn_ts.store.db import MailStore, Received
from gehirn_ts.store.queue import NewRecipient

log = Logger()

SUMMARY_BYTES = 256 * 1024  # what is parsed for headers and the excerpt
# Messages up to this size are read and copied to the KVS on the reactor thread; a
# larger copy would hold the reactor up (256 KiB: about 0.1 ms to the page cache).
INLINE_BYTES = 256 * 1024


def _commit_object(fd: int, tmp: str | Path, target: str | Path) -> None:
    """In a thread: the KVS object's data, its name, then the directory, on disk."""
    os.fsync(fd)
    os.replace(tmp, target)
    _fsync_dir(os.path.dirname(target))


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
    ) -> None:
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
        self._active: set[str] = set()

    def accepted(self, envelope: Envelope, kinds: dict[str, str] | None = None) -> None:
        d = Deferred.fromCoroutine(self.process(envelope))
        d.addErrback(
            lambda f: log.failure(
                "processing received {qid} failed; it stays spooled for the next start",
                f,
                qid=envelope.queue_id,
            )
        )

    async def resume(self) -> int:
        pending = self._spool.pending()
        for envelope in pending:
            try:
                await self.process(envelope)
            except Exception:
                log.failure(
                    "processing spooled {qid} failed; it stays spooled", qid=envelope.queue_id
                )
        return len(pending)

    async def process(self, envelope: Envelope) -> None:
        qid = envelope.queue_id
        if qid in self._active:
            return
        self._active.add(qid)
        try:
            await self._process(envelope)
        finally:
            self._active.discard(qid)

    async def _process(self, envelope: Envelope) -> None:
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
        if envelope.size <= INLINE_BYTES:
            summary, dkim_results = await self._examine_here(qid, spf, bool(by_account))
        else:
            # One trip to a thread for the reading, the checks and the KVS copy.
            target = self._kvs / obj if by_account else None
            summary, dkim_results = await self._spool.threads.run(
                self._examine, self._spool.message_path(qid), spf, target
            )
        auth = {"spf": spf_data, "dkim": [d.as_dict() for d in dkim_results]}
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
            }
            await self._mail.record_received(
                Received(
                    id=qid,
                    account=account,
                    object=obj,
                    sender=envelope.sender,
                    recipients=[r["address"] for r in rcpts],
                    size=envelope.size,
                    received_at=envelope.received_at,
                    meta=meta,
                )
            )
            if account is not None:
                await self._publisher.publish(self._event(envelope, account, rcpts, meta))
        if relayed or forwarded:
            await self._queue_onwards(envelope, self._spool.message_path(qid), relayed, forwarded)
        if envelope.size <= INLINE_BYTES:
            self._spool.remove(qid)  # two small files: metadata work, as the renames
        else:
            # Freeing a large file's blocks can take a while: not on the reactor.
            await self._spool.threads.run(self._spool.remove, qid)
        log.info(
            "received {qid} stored for {accounts}{relay}",
            qid=qid,
            accounts=sorted(a or "postmaster" for a in by_account),
            relay=f", {len(relayed)} recipients relayed" if relayed else "",
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
        when = datetime.fromtimestamp(envelope.received_at, UTC)
        return Event(
            type=MAIL_RECEIVED,
            source=f"/gehirn-ts/mta/{self._hostname}",
            id=f"received.{envelope.queue_id}.{account}",
            time=when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
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
        self, qid: str, spf: SpfResult | None, store: bool
    ) -> tuple[dict[str, Any], list[DkimResult]]:
        """``_examine`` for a small message: the reading, the summary and the KVS
        object's writes here, on the reactor thread (page-cache work, as the DATA lines
        were); only a DKIM check (it asks DNS) and the fsyncs go to a thread. A thread
        job of a dozen system calls takes the interpreter lock back after each one, and
        the reactor thread waits for it (docs/performance.md)."""
        threads = self._spool.threads
        with open(f"{self._spool.incoming_dir}/{qid}.eml", "rb") as f:
            whole = f.read()
        dkim_results: list[DkimResult] = []
        if self._dkim_verify is not None and is_signed(whole):
            dkim_results = await threads.run(self._dkim_verify, whole)
        summary = summarize(whole[:SUMMARY_BYTES])
        target = f"{self._kvs_dir}/{qid}.eml"
        if store and not os.path.exists(target):
            header = authentication_results(self._hostname, spf, dkim_results)
            tmp = f"{self._kvs_dir}/.{qid}.eml"
            with open(tmp, "wb") as out:
                out.write(header)
                out.write(whole)
                out.flush()
                await threads.run(_commit_object, out.fileno(), tmp, target)
        return summary, dkim_results

    def _examine(
        self, source: Path, spf: SpfResult | None, target: Path | None
    ) -> tuple[dict[str, Any], list[DkimResult]]:
        """Summary and DKIM results of a spooled message, and its KVS object when
        ``target`` is given (blocking: runs in a thread)."""
        whole: bytes | None = None
        if self._dkim_verify is None:
            with source.open("rb") as f:
                head = f.read(SUMMARY_BYTES)
            dkim_results = []
        else:
            # DKIM hashes the whole message (RFC 6376 section 3.7).
            head = whole = source.read_bytes()
            dkim_results = self._dkim_verify(whole)
        summary = summarize(head[:SUMMARY_BYTES])
        if target is not None:
            header = authentication_results(self._hostname, spf, dkim_results)
            self._store_object(source, target, header, whole)
        return summary, dkim_results

    @staticmethod
    def _store_object(source: Path, target: Path, header: bytes, whole: bytes | None) -> None:
        """The KVS object: our Authentication-Results field, then the message as spooled
        (``whole``, when it was read already)."""
        if target.exists():
            return
        tmp = target.with_name("." + target.name)
        with tmp.open("wb") as out:
            out.write(header)
            if whole is not None:
                out.write(whole)
            else:
                with source.open("rb") as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
            out.flush()
            _commit_object(out.fileno(), tmp, target)

    def object_path(self, obj: str) -> Path:
        return self._kvs / obj
