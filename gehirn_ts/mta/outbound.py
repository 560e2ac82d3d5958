"""Into the outbound queue, and the reports out of it.

``Outbound.submit`` is the one way in (HTTP API, SMTP submission and trusted relay,
forward routes, DSN reports, the e-mail destination): it DKIM-signs for the From
domain when the store has keys for it, writes the message file durably, then commits
the queue row; only then does its caller acknowledge (202, 250).

``Reporter`` turns recipients whose final status (or delay) is recorded into
``mail.delivered`` / ``mail.delayed`` / ``mail.failed`` events and, where NOTIFY asks,
RFC 3464 reports. Event ids and report queue ids derive from the message id and the
recipient, so a repeat after a crash publishes and queues nothing twice.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from gehirn_ts.edj.publisher import Publisher
from gehirn_ts.events import MAIL_DELAYED, MAIL_DELIVERED, MAIL_FAILED, Event
from gehirn_ts.groupcommit import fsync_directory
from gehirn_ts.logs import Logger
from gehirn_ts.mta import dkim
from gehirn_ts.mta.compose import Head
from gehirn_ts.mta.dsn import RecipientStatus, build_report, wants_report
from gehirn_ts.mta.queue import MailQueue, group_by_kind
from gehirn_ts.mta.spool import new_queue_id, unlink_quietly
from gehirn_ts.stamps import date_text, rfc3339
from gehirn_ts.store.queue import (
    NewMessage,
    NewRecipient,
    QueuedMessage,
    QueueStore,
    RecipientState,
)

log = Logger()

KeyLookup = Callable[[str], Awaitable[list[dkim.SigningKey]]]
HEAD_BYTES = 256 * 1024


def _write(path: str, source: Path, keys: list[dkim.SigningKey]) -> int:
    """The queue file of spooled mail, durable (blocking: in a thread). Unsigned mail is
    hard-linked; signed mail is read, signed and written."""
    if not keys:
        unlink_quietly(path)
        os.link(source, path)
        fsync_directory(os.path.dirname(path))
        return os.stat(path).st_size
    data = source.read_bytes()
    signature = dkim.sign(data, keys)
    with open(path, "wb") as f:
        f.write(signature)
        f.write(data)
        f.flush()
        _fsync_file_and_dir(f.fileno(), path)
    return len(signature) + len(data)


def _fsync_file_and_dir(fd: int, path: str) -> None:
    os.fsync(fd)
    fsync_directory(os.path.dirname(path))


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_head(source: Path) -> bytes:
    with source.open("rb") as f:
        return f.read(HEAD_BYTES)


class Outbound:
    def __init__(
        self,
        *,
        store: QueueStore,
        queue: MailQueue,
        keys: KeyLookup | None,
        clock: Any,
        hostname: str,
    ) -> None:
        self._store = store
        self._queue = queue
        self._keys = keys
        self._clock = clock
        self.hostname = hostname

    async def submit(
        self,
        *,
        sender: str,
        recipients: Sequence[NewRecipient],
        account_id: int | None,
        origin: str,
        data: bytes | None = None,
        source: Path | None = None,
        queue_id: str | None = None,
        fresh: bool = False,
        body: str | None = None,
        ret: str | None = None,
        envid: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """Queue a message durably; (id, created). A given ``queue_id`` already queued
        is left alone (a repeat after a crash) unless the caller made it ``fresh``."""
        if queue_id is not None and not fresh:
            if await self._store.exists(queue_id):
                return queue_id, False
        qid = queue_id or new_queue_id()
        self._queue.writing.add(qid)
        try:
            return await self._submit(
                qid,
                sender,
                recipients,
                account_id,
                origin,
                data,
                source,
                body,
                ret,
                envid,
                idempotency_key,
                request_hash,
                tags,
                metadata,
            )
        finally:
            self._queue.writing.discard(qid)

    async def _write_here(self, path: str, data: bytes, keys: list[dkim.SigningKey]) -> int:
        """``_write`` for a message in memory: the signature made in a thread (dkimpy's
        RSA runs outside the interpreter lock, so signatures overlap), the file written
        here (page-cache work) and only its fsyncs in a thread: a thread job of many
        system calls takes the interpreter lock back after each (docs/performance.md).
        Not a group commit as the spool's: a request waits for its fsyncs, and one job's
        fsyncs run one after another (docs/decisions.md, "Group commit")."""
        threads = self._queue.threads
        signature = await threads.run(dkim.sign, data, keys) if keys else b""
        # Straight to its name, no rename: the queue row, committed after this, is the
        # commit point; a file without a row is removed at the next start.
        with open(path, "wb") as f:
            f.write(signature)
            f.write(data)
            f.flush()
            await threads.run(_fsync_file_and_dir, f.fileno(), path)
        return len(signature) + len(data)

    async def _submit(
        self,
        qid: str,
        sender: str,
        recipients: Sequence[NewRecipient],
        account_id: int | None,
        origin: str,
        data: bytes | None,
        source: Path | None,
        body: str | None,
        ret: str | None,
        envid: str | None,
        idempotency_key: str | None,
        request_hash: str | None,
        tags: Sequence[str],
        metadata: dict[str, Any] | None,
    ) -> tuple[str, bool]:
        if data is not None:
            head = Head(data[:HEAD_BYTES])  # in memory already: no thread needed
        else:
            assert source is not None
            head = Head(await self._queue.threads.run(_read_head, source))
        keys: list[dkim.SigningKey] = []
        if self._keys is not None:
            senders = head.addresses("From")
            domain = (senders[0] if senders else sender).rpartition("@")[2].lower()
            if domain:
                keys = await self._keys(domain)
        path = self._queue.path(qid)
        if data is not None:
            size = await self._write_here(path, data, keys)
        else:
            size = await self._queue.threads.run(_write, path, source, keys)
        message = NewMessage(
            id=qid,
            account_id=account_id,
            origin=origin,
            sender=sender,
            size=size,
            recipients=recipients,
            body=body,
            ret=ret,
            envid=envid,
            header_message_id=head.value("Message-ID"),
            subject=head.value("Subject"),
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            tags=tags,
            metadata=metadata or {},
        )
        try:
            mid, created = await self._store.enqueue(message, self._clock.seconds())
        except BaseException:
            await self._queue.threads.run(unlink_quietly, path)
            raise
        if mid != qid:
            # The Idempotency-Key matched an earlier request: keep that message only.
            await self._queue.threads.run(unlink_quietly, path)
        if created:
            self._queue.wake()
            log.info(
                "queued {qid} from <{sender}> for {n} recipients ({origin}, {size} bytes, "
                "{signed})",
                qid=mid,
                sender=sender,
                n=len(recipients),
                origin=origin,
                size=size,
                signed="DKIM " + ",".join(f"{k.domain}/{k.selector}" for k in keys)
                if keys
                else "unsigned",
            )
        return mid, created


class Reporter:
    def __init__(
        self,
        *,
        outbound: Outbound,
        publisher: Publisher,
        queue: MailQueue,
        hostname: str,
        clock: Any,
    ) -> None:
        self._outbound = outbound
        self._publisher = publisher
        self._queue = queue
        self._hostname = hostname
        self._clock = clock

    async def __call__(self, msg: QueuedMessage, rcpts: list[RecipientState]) -> None:
        # Reports about reports are never made (RFC 3461 section 6.2: a DSN's envelope
        # sender is null), and their delivery status is not an event of the account.
        if msg.origin != "report" and msg.account is not None:
            for r in rcpts:
                await self._publisher.publish(self.event(msg, r))
        for kind, group in group_by_kind(rcpts).items():
            if kind == "delivered":
                # Handed to a next hop that offers DSN: a SUCCESS request travelled with
                # the message and the final MTA answers it (RFC 3461 section 5.2.2).
                continue
            wanted = [r for r in group if wants_report(msg.sender, r.notify, kind)]
            if wanted:
                await self._report(msg, kind, wanted)

    def event(self, msg: QueuedMessage, r: RecipientState) -> Event:
        kind = r.report or r.status
        data: dict[str, Any] = {
            "message_id": msg.id,
            "recipient": r.address,
            "sender": msg.sender,
            "header_message_id": msg.header_message_id,
            "subject": msg.subject,
            "attempts": r.attempts,
            "remote_mta": r.remote_mta,
            "reply": r.reply,
            "status": r.smtp_status,
            "tls": r.tls,
            "queued_at": rfc3339(msg.created_at),
            "tags": msg.tags,
            "metadata": msg.metadata,
        }
        if kind in ("delivered", "relayed"):
            etype, eid, severity = MAIL_DELIVERED, f"delivered.{msg.id}.{r.n}", "info"
            data["relayed"] = kind == "relayed"
        elif kind == "failed":
            etype, eid, severity = MAIL_FAILED, f"failed.{msg.id}.{r.n}", "warning"
            data["diagnostic"] = r.reply
        else:
            etype = MAIL_DELAYED
            eid = f"delayed.{msg.id}.{r.n}.{r.delay_notices}"
            severity = "warning"
            data["diagnostic"] = r.reply
            data["next_attempt_at"] = rfc3339(r.next_attempt_at) if r.next_attempt_at else None
        return Event(
            type=etype,
            source=f"/gehirn-ts/mta/{self._hostname}",
            id=eid,
            time=rfc3339(r.updated_at),
            account=msg.account,
            subject=msg.id,
            severity=severity,
            data=data,
        )

    async def _report(self, msg: QueuedMessage, kind: str, rcpts: list[RecipientState]) -> None:
        original = await self._queue.threads.run(_read_bytes, self._queue.path(msg.id))
        retry_until = None
        if kind == "delayed":
            retry_until = msg.created_at + self._queue._retry.lifetime
        statuses = [
            RecipientStatus(
                recipient=r.address,
                action=kind,
                status=r.smtp_status or ("2.0.0" if kind in ("delivered", "relayed") else "5.0.0"),
                diagnostic=r.reply,
                remote_mta=r.remote_mta,
                orcpt=r.orcpt,
                last_attempt=r.updated_at,
                will_retry_until=retry_until,
            )
            for r in rcpts
        ]
        suffix = f"{kind}.{rcpts[0].n}" + (
            f".{rcpts[0].delay_notices}" if kind == "delayed" else ""
        )
        report_id = f"{msg.id}.{suffix}"
        report = build_report(
            reporting_mta=self._hostname,
            to=msg.sender,
            original=original,
            arrival=msg.created_at,
            now=rcpts[0].updated_at,
            statuses=statuses,
            envid=msg.envid,
            ret=msg.ret,
            message_id=f"<{report_id}@{self._hostname}>",
        )
        eight_bit = any(b > 127 for b in report)
        await self._outbound.submit(
            sender="",
            recipients=[NewRecipient(msg.sender)],
            account_id=msg.account_id,
            origin="report",
            data=report,
            queue_id=report_id,
            body="8BITMIME" if eight_bit else None,
        )


def message_id_header(qid: str, hostname: str) -> str:
    return f"<{qid}@{hostname}>"


def rfc5322_date(now: float) -> str:
    return date_text(now, gmt=False)
