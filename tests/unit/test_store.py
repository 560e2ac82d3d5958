from __future__ import annotations

import sqlite3
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial import unittest

from gehirn_ts.events import Event
from gehirn_ts.store.db import (
    Conflict,
    Delivery,
    NotFound,
    Store,
    Subscription,
    _delivery,
    bootstrap_admin_key,
    hash_secret,
    new_id,
    new_password,
)
from gehirn_ts.store.schema import MIGRATIONS, SchemaError, migrate
from tests.support import inline


def test_migrate_creates_the_schema_and_is_idempotent(tmp_path):
    db = tmp_path / "x.sqlite"
    assert migrate(db) == len(MIGRATIONS)
    assert migrate(db) == len(MIGRATIONS)
    conn = sqlite3.connect(db)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"accounts", "api_keys", "subscriptions", "events", "deliveries", "attempts"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_newer_schema_is_refused(tmp_path):
    db = tmp_path / "x.sqlite"
    migrate(db)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        migrate(db)


def test_routes_made_before_version_6_get_their_domain(tmp_path, monkeypatch):
    from gehirn_ts.store import schema

    db = tmp_path / "x.sqlite"
    monkeypatch.setattr(schema, "MIGRATIONS", MIGRATIONS[:5])
    assert migrate(db) == 5
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO accounts (name, created_at) VALUES ('acme', 0)")
    for n, match in enumerate(["sales@a.test", "@a.test", '"x@y"@b.test']):
        conn.execute(
            "INSERT INTO routes (id, account_id, match, action, created_at) "
            "VALUES (?, 1, ?, 'store', 0)",
            (f"r{n}", match),
        )
    conn.commit()
    monkeypatch.setattr(schema, "MIGRATIONS", MIGRATIONS)
    assert migrate(db) == len(MIGRATIONS)
    rows = conn.execute("SELECT match, domain FROM routes ORDER BY id").fetchall()
    assert rows == [("sales@a.test", "a.test"), ("@a.test", "a.test"), ('"x@y"@b.test', "b.test")]
    # A recipient's lookup reads its domain's routes through the index, not all routes.
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT 1 FROM routes WHERE domain = ? AND match NOT LIKE '@%' LIMIT 1",
        ("a.test",),
    ).fetchall()
    assert "routes_domain" in str(plan)


def test_admin_key_is_made_once_and_stored_hashed(tmp_path):
    db = tmp_path / "x.sqlite"
    migrate(db)
    token = bootstrap_admin_key(db, 0.0)
    assert token and token.startswith("gts_")
    assert bootstrap_admin_key(db, 1.0) is None
    rows = sqlite3.connect(db).execute("SELECT hash, is_admin FROM api_keys").fetchall()
    assert rows == [(hash_secret(token.split("_", 2)[2]), 1)]
    assert token.split("_", 2)[2] not in (tmp_path / "x.sqlite").read_bytes().decode("latin-1")


@given(st.floats(0, 1e11), st.floats(0.001, 1e11))  # 2**48 ms: the year 10889
def test_an_id_made_a_millisecond_later_or_more_sorts_after(now: float, later: float) -> None:
    first, second = new_id("dlv", now), new_id("dlv", now + later)
    if int((now + later) * 1000) > int(now * 1000):
        assert first < second
    assert first.startswith("dlv_") and len(first) == len("dlv_") + 28
    assert int(first[4:16], 16) == int(now * 1000)


def test_ids_made_in_one_millisecond_differ() -> None:
    assert len({new_id("dlv", 1.0) for _ in range(1000)}) == 1000


def test_a_delivery_read_from_a_row_is_the_dataclass_made_of_it():
    row = ("dlv_1", "e1", "sub_1", "pending", 2, 1, 12.5, "HTTP 503", 1.0, 2.0)
    delivery = _delivery(row)
    assert delivery == Delivery(*row) and hash(delivery) == hash(Delivery(*row))
    assert repr(delivery) == repr(Delivery(*row))
    with pytest.raises(FrozenInstanceError):
        delivery.status = "dead"  # type: ignore[misc]
    with pytest.raises(ValueError):
        _delivery(row[:-1])


class StoreTests(unittest.TestCase):
    def setUp(self) -> None:
        path = Path(self.mktemp())
        path.mkdir()
        self.db = path / "db.sqlite"
        migrate(self.db)
        self.store = Store(self.db, reactor)
        self.addCleanup(self.store.close)

    @inline
    async def test_keys_authenticate_and_revoke(self) -> None:
        _account, key_id, token = await self.store.create_account("acme")
        principal = await self.store.authenticate(token)
        assert principal is not None
        assert principal.account == "acme" and not principal.is_admin
        assert await self.store.authenticate(token + "x") is None
        assert await self.store.authenticate("gts_nope_nope") is None
        assert await self.store.authenticate("garbage") is None
        await self.store.revoke_key(key_id)
        assert await self.store.authenticate(token) is None
        with pytest.raises(NotFound):
            await self.store.revoke_key(key_id)

    @inline
    async def test_admin_key_is_separate(self) -> None:
        _, token = await self.store.create_key(None)
        principal = await self.store.authenticate(token)
        assert principal is not None and principal.is_admin and principal.account is None

    @inline
    async def test_duplicate_account(self) -> None:
        await self.store.create_account("acme")
        with pytest.raises(Conflict):
            await self.store.create_account("acme")

    @inline
    async def test_events_are_idempotent_by_id(self) -> None:
        await self.store.create_account("acme")
        event = Event(type="notice.fault", source="/t", id="e1", account="acme")
        assert await self.store.insert_event(event) is True
        assert await self.store.insert_event(event) is False
        with pytest.raises(Conflict):
            await self.store.insert_event(Event(type="notice.other", source="/t", id="e1"))
        assert (await self.store.get_event("e1", None)) == event

    @inline
    async def test_deliveries_are_created_once(self) -> None:
        account, _, _ = await self.store.create_account("acme")
        sub = await self.store.create_subscription(account.id, "#", "http://x.test/", None)
        await self.store.insert_event(Event(type="a", source="/t", id="e1", account="acme"))
        first = await self.store.create_deliveries("e1", [sub.id])
        again = await self.store.create_deliveries("e1", [sub.id])
        assert len(first) == 1 and again == first
        await self.store.record_attempt(
            first[0].id,
            started_at=1,
            duration=0.1,
            outcome="retry",
            status_code=503,
            detail="HTTP 503",
            new_status="pending",
            next_attempt_at=10,
            failed=True,
        )
        d = await self.store.get_delivery(first[0].id)
        assert (d.attempts, d.failures, d.status) == (1, 1, "pending")
        # Attempted: no longer handed out again by routing.
        assert await self.store.create_deliveries("e1", [sub.id]) == []
        history = await self.store.deliveries_of_event("e1")
        assert [a.status_code for a in history[0][1]] == [503]

    @inline
    async def test_routing_picks_live_subscriptions_and_stores_a_missing_event(self) -> None:
        acme, _, _ = await self.store.create_account("acme")
        other, _, _ = await self.store.create_account("other")
        wanted = await self.store.create_subscription(acme.id, "a.#", "http://x.test/", None)
        await self.store.create_subscription(acme.id, "b.#", "http://y.test/", None)
        gone = await self.store.create_subscription(acme.id, "#", "http://z.test/", None)
        await self.store.delete_subscription(gone.id, None)
        await self.store.create_subscription(other.id, "#", "http://w.test/", None)
        event = Event(type="a.x", source="/t", id="e9", account="acme")
        seen: list[list[str]] = []

        def pick(subs: list[Subscription]) -> list[Subscription]:
            seen.append(sorted(s.url for s in subs))
            return [s for s in subs if s.pattern == "a.#"]

        new, picked = await self.store.route_event(event, pick)
        # Only acme's live subscriptions are offered; the event was never stored before.
        assert seen == [["http://x.test/", "http://y.test/"]]
        assert [s.id for s in picked] == [wanted.id]
        assert [d.subscription_id for d in new] == [wanted.id]
        assert (await self.store.get_event("e9", None)).type == "a.x"
        again, _ = await self.store.route_event(event, pick)
        assert [d.id for d in again] == [d.id for d in new]
        assert await self.store.route_event(event, lambda subs: []) == ([], [])

    @inline
    async def test_routing_sees_every_change_of_subscriptions_wherever_it_is_made(
        self,
    ) -> None:
        acme, _, _ = await self.store.create_account("acme")
        first = await self.store.create_subscription(acme.id, "#", "http://x.test/", None)
        n = iter(range(100))

        async def routed() -> list[str]:
            event = Event(type="a.x", source="/t", id=f"e{next(n)}", account="acme")
            _, picked = await self.store.route_event(event, lambda subs: subs)
            return sorted(s.url for s in picked)

        assert await routed() == ["http://x.test/"]
        statements: list[str] = []
        self.store._db._connection().set_trace_callback(statements.append)
        assert await routed() == ["http://x.test/"]
        # Read once and kept: the second event asks only whether the database changed.
        assert not [s for s in statements if "FROM subscriptions" in s]
        # Made here.
        second = await self.store.create_subscription(acme.id, "#", "http://y.test/", None)
        assert await routed() == ["http://x.test/", "http://y.test/"]
        await self.store.delete_subscription(first.id, None)
        assert await routed() == ["http://y.test/"]
        # Made by another connection (another node, the CLI): a second store.
        other = Store(self.db, reactor)
        self.addCleanup(other.close)
        await other.create_subscription(acme.id, "#", "http://z.test/", None)
        assert await routed() == ["http://y.test/", "http://z.test/"]
        await other.delete_subscription(second.id, None)
        assert await routed() == ["http://z.test/"]

    @inline
    async def test_routing_a_stored_event_reads_it_and_another_with_its_id_gets_nothing(
        self,
    ) -> None:
        acme, _, _ = await self.store.create_account("acme")
        sub = await self.store.create_subscription(acme.id, "#", "http://x.test/", None)
        event = Event(type="a.x", source="/t", id="e7", account="acme")
        await self.store.insert_event(event)
        statements: list[str] = []
        self.store._db._connection().set_trace_callback(statements.append)
        new, _ = await self.store.route_event(event, lambda subs: subs)
        assert [d.subscription_id for d in new] == [sub.id]
        # The publisher stored it: one read of it, no insert.
        assert [s.split()[0] for s in statements if " events " in s] == ["SELECT"]
        # The same bytes re-encoded are the same event; another event with its id is not.
        same = Event(type="a.x", source="/t", id="e7", account="acme", time=event.time)
        assert [d.id for d in (await self.store.route_event(same, lambda subs: subs))[0]] == [
            d.id for d in new
        ]
        other = Event(type="b.y", source="/t", id="e7", account="acme")
        assert (await self.store.route_event(other, lambda subs: subs))[0] == []
        assert (await self.store.get_event("e7", None)).type == "a.x"

    @inline
    async def test_events_are_stored_together_each_with_its_own_outcome(self) -> None:
        await self.store.create_account("acme")
        first = Event(type="a", source="/t", id="e1", account="acme")
        await self.store.insert_event(first)
        runs: list[Any] = []
        run = self.store._db.run_merged
        self.store._db.run_merged = lambda fn, item: runs.append(fn) or run(fn, item)  # type: ignore[method-assign]
        outcomes = await self.store.insert_events(
            [
                Event(type="b", source="/t", id="e2", account="acme"),
                first,  # the same again: not stored twice
                Event(type="other", source="/t", id="e1", account="acme"),  # id taken
                Event(type="c", source="/t", id="e3"),
            ]
        )
        assert len(runs) == 1, "not one interaction"
        assert outcomes[:2] == [True, False]
        assert isinstance(outcomes[2], Conflict) and outcomes[2].field == "id"
        assert outcomes[3] is True
        # The conflict left the others stored, and the first e1 as it was.
        assert (await self.store.get_event("e1", None)).type == "a"
        assert (await self.store.get_event("e2", None)).type == "b"
        assert (await self.store.get_event("e3", None)).type == "c"

    @inline
    async def test_the_same_id_twice_in_one_request_is_stored_once(self) -> None:
        await self.store.create_account("acme")
        event = Event(type="a", source="/t", id="e5", account="acme")
        outcomes = await self.store.insert_events(
            [event, event, Event(type="b", source="/t", id="e5", account="acme")]
        )
        assert outcomes[:2] == [True, False]
        assert isinstance(outcomes[2], Conflict)
        assert (await self.store.get_event("e5", None)).type == "a"

    def _count_calls(self, name: str) -> list[int]:
        """The number of items of each call of the store's merged interaction ``name``."""
        sizes: list[int] = []
        inner = getattr(self.store, name)

        def counted(cur: Any, items: list[Any]) -> Any:
            sizes.append(len(items))
            return inner(cur, items)

        setattr(self.store, name, counted)
        return sizes

    @inline
    async def test_events_routed_together_are_routed_in_one_call_each_as_if_alone(
        self,
    ) -> None:
        acme, _, _ = await self.store.create_account("acme")
        a = await self.store.create_subscription(acme.id, "a.#", "http://a.test/", None)
        b = await self.store.create_subscription(acme.id, "#", "http://b.test/", None)
        stored = Event(type="a.x", source="/t", id="e1", account="acme")
        await self.store.insert_event(stored)
        taken = Event(type="a.x", source="/t", id="e2", account="acme")
        await self.store.insert_event(taken)
        # Routed once, then b deleted: its delivery is stale when the event comes again.
        again = Event(type="a.x", source="/t", id="e3", account="acme")
        first, _ = await self.store.route_event(again, lambda subs: subs)
        await self.store.delete_subscription(b.id, None)
        missing = Event(type="b.y", source="/t", id="e4", account="acme")
        foreign = Event(type="c.z", source="/t", id="e2", account="acme")  # e2 is another's
        nobody = Event(type="a.x", source="/t", id="e5", account="acme")
        sizes = self._count_calls("_route_many")

        def live(subs: list[Subscription]) -> list[Subscription]:
            return subs

        results = await DeferredList(
            [
                self.store.route_event(stored, live),
                self.store.route_event(missing, live),
                self.store.route_event(foreign, live),
                self.store.route_event(again, live),
                self.store.route_event(nobody, lambda subs: []),
                self.store.route_event(stored, live),  # the same event twice together
            ]
        )
        # All asked while the store's thread was busy (this runs in the callback of the
        # delete's commit): one call.
        assert sizes == [6]
        (stored_new, stored_subs), (missing_new, _), (foreign_new, foreign_subs) = [
            value for _, value in results[:3]
        ]
        assert [d.subscription_id for d in stored_new] == [a.id]
        assert [s.id for s in stored_subs] == [a.id]
        assert [d.subscription_id for d in missing_new] == [a.id]
        assert (await self.store.get_event("e4", None)).type == "b.y"
        assert foreign_new == [] and [s.id for s in foreign_subs] == [a.id]
        assert (await self.store.get_event("e2", None)).type == "a.x"
        again_new, _ = results[3][1]
        assert [d.id for d in again_new] == [d.id for d in first if d.subscription_id == a.id]
        cancelled = [
            d for d, _ in await self.store.deliveries_of_event("e3") if d.status != "pending"
        ]
        assert [(d.subscription_id, d.status) for d in cancelled] == [(b.id, "cancelled")]
        assert results[4][1] == ([], [])
        # Both routings of e1 hand out its one delivery (the worker attempts it once).
        assert [d.id for d in results[5][1][0]] == [d.id for d in stored_new]

    @inline
    async def test_attempts_recorded_together_go_in_one_call_and_keep_their_numbers(
        self,
    ) -> None:
        acme, _, _ = await self.store.create_account("acme")
        sub = await self.store.create_subscription(acme.id, "#", "http://x.test/", None)
        created = []
        for n in range(3):
            await self.store.insert_event(Event(type="a", source="/t", id=f"e{n}", account="acme"))
            created += await self.store.create_deliveries(f"e{n}", [sub.id])
        sizes = self._count_calls("_record_many")

        def record(delivery_id: str, outcome: str, code: int) -> Deferred[None]:
            return self.store.record_attempt(
                delivery_id,
                started_at=1,
                duration=0.1,
                outcome=outcome,
                status_code=code,
                detail=None if code == 200 else f"HTTP {code}",
                new_status="delivered" if code == 200 else "pending",
                next_attempt_at=None if code == 200 else 60,
                failed=code != 200,
            )

        one, two, three = (d.id for d in created)
        results: list[Any] = await DeferredList(
            [
                record(one, "retry", 503),
                record(two, "delivered", 200),
                record(three, "retry", 503),
                record("dlv_missing", "delivered", 200),
                record(three, "delivered", 200),
            ],
            consumeErrors=True,
        )
        assert [ok for ok, _ in results] == [True, True, True, False, True]
        assert results[3][1].check(NotFound)
        assert sizes == [5, 1, 1, 1, 1, 1]  # together, then each alone for the missing one
        # The same delivery twice in one call: numbered one after the other.
        await DeferredList([record(one, "retry", 503), record(one, "delivered", 200)])
        assert sizes[6:] == [2]
        history = {
            d.id: (d.status, d.attempts, d.failures, [(a.n, a.status_code) for a in attempts])
            for n in range(3)
            for d, attempts in await self.store.deliveries_of_event(f"e{n}")
        }
        assert history == {
            one: ("delivered", 3, 2, [(1, 503), (2, 503), (3, 200)]),
            two: ("delivered", 1, 0, [(1, 200)]),
            three: ("delivered", 2, 1, [(1, 503), (2, 200)]),
        }

    @inline
    async def test_a_received_message_is_indexed_with_its_event_or_not_at_all(self) -> None:
        from twisted.internet.defer import succeed

        from gehirn_ts.edj.publisher import Publisher
        from gehirn_ts.store.db import MailStore, Received

        await self.store.create_account("acme")
        mail = MailStore(self.store)
        on_bus: list[tuple[str, bool]] = []

        class Bus:
            def publish_many(bus, events: list[Event]) -> Any:
                # What a node routing the event reads: the index row is there already.
                indexed = sqlite3.connect(self.db).execute("SELECT id FROM received").fetchall()
                on_bus.extend((e.id, (e.subject,) in indexed) for e in events)
                return succeed(None)

        publisher = Publisher(self.store, Bus())  # type: ignore[arg-type]
        runs: list[Any] = []
        run = self.store._db.run_merged
        self.store._db.run_merged = lambda fn, item: runs.append(fn) or run(fn, item)  # type: ignore[method-assign]

        def received(qid: str) -> Received:
            return Received(qid, "acme", f"{qid}.eml", "s@x.test", ["u@a.test"], 10, 1.0, {})

        def event(qid: str, type_: str = "mail.received") -> Event:
            return Event(
                type=type_,
                source="/t",
                id=f"received.{qid}",
                time="2026-01-02T03:04:05.000Z",
                account="acme",
                subject=qid,
            )

        await publisher.publish(event("q1"), with_store=mail.received_tx(received("q1")))
        assert len(runs) == 1, "not one interaction"
        assert on_bus == [("received.q1", True)]
        assert (await mail.get_received("q1", None)).id == "q1"
        # A repeat (after a crash) changes nothing and goes on the bus again.
        await publisher.publish(event("q1"), with_store=mail.received_tx(received("q1")))
        assert on_bus[-1] == ("received.q1", True)

        def broken(cursor: Any) -> None:
            mail.received_tx(received("q2"))(cursor)
            raise sqlite3.OperationalError("disk I/O error")

        with pytest.raises(sqlite3.OperationalError):
            await publisher.publish(event("q2"), with_store=broken)
        with pytest.raises(NotFound):
            await mail.get_received("q2", None)
        with pytest.raises(NotFound):
            await self.store.get_event("received.q2", None)
        # An id taken by another event: a Conflict, and nothing on the bus.
        with pytest.raises(Conflict):
            await publisher.publish(
                event("q1", "mail.other"), with_store=mail.received_tx(received("q3"))
            )
        assert [e for e, _ in on_bus] == ["received.q1", "received.q1"]

    @inline
    async def test_routing_again_cancels_the_deliveries_of_a_deleted_subscription(self) -> None:
        account, _, _ = await self.store.create_account("acme")
        kept = await self.store.create_subscription(account.id, "#", "http://a.test/", None)
        gone = await self.store.create_subscription(account.id, "#", "http://b.test/", None)
        event = Event(type="a.x", source="/t", id="e1", account="acme")
        first, _ = await self.store.route_event(event, lambda subs: subs)
        assert sorted(d.subscription_id for d in first) == sorted([kept.id, gone.id])
        # Not attempted (a crash), and one subscription deleted before the event is
        # routed again: its delivery is not handed out, and no longer pending.
        await self.store.delete_subscription(gone.id, None)
        again, subs = await self.store.route_event(event, lambda subs: subs)
        assert [d.subscription_id for d in again] == [kept.id]
        assert [s.id for s in subs] == [kept.id]
        history = await self.store.deliveries_of_event("e1")
        assert {d.subscription_id: d.status for d, _ in history} == {
            kept.id: "pending",
            gone.id: "cancelled",
        }

    @inline
    async def test_the_event_paths_read_an_accounts_id_once(self) -> None:
        await self.store.create_account("acme")
        statements: list[str] = []
        self.store._db._connection().set_trace_callback(statements.append)

        def lookups() -> int:
            return sum("FROM accounts WHERE name" in s for s in statements)

        await self.store.insert_event(Event(type="a", source="/t", id="e1", account="acme"))
        await self.store.insert_event(Event(type="a", source="/t", id="e2", account="acme"))
        await self.store.route_event(
            Event(type="a", source="/t", id="e3", account="acme"), lambda subs: subs
        )
        assert lookups() == 1
        # A conflict fails no write: the others of its interaction are committed.
        with pytest.raises(Conflict):
            await self.store.insert_event(Event(type="b", source="/t", id="e1", account="acme"))
        assert lookups() == 1
        # A failed write forgets what was read (its transaction may not have committed).
        with pytest.raises(NotFound):
            await self.store.insert_event(Event(type="a", source="/t", id="e5", account="nobody"))
        await self.store.insert_event(Event(type="a", source="/t", id="e4", account="acme"))
        assert lookups() == 3  # "nobody" once, then "acme" again

    @inline
    async def test_replay_only_dead(self) -> None:
        account, _, _ = await self.store.create_account("acme")
        sub = await self.store.create_subscription(account.id, "#", "http://x.test/", None)
        await self.store.insert_event(Event(type="a", source="/t", id="e1", account="acme"))
        (created,) = await self.store.create_deliveries("e1", [sub.id])
        dlv = created.id
        with pytest.raises(Conflict):
            await self.store.replay_delivery(dlv, None)
        await self.store.record_attempt(
            dlv,
            started_at=1,
            duration=0.1,
            outcome="failed",
            status_code=410,
            detail="HTTP 410",
            new_status="dead",
            next_attempt_at=None,
            failed=True,
        )
        other, _, _ = await self.store.create_account("other")
        with pytest.raises(NotFound):
            await self.store.replay_delivery(dlv, other.id)
        d = await self.store.replay_delivery(dlv, account.id)
        assert (d.status, d.failures, d.attempts) == ("pending", 0, 1)


def test_split_token():
    from hypothesis import given
    from hypothesis import strategies as st

    from gehirn_ts.store.db import split_token

    assert split_token("gts_abc_s3_cr-et") == ("abc", "s3_cr-et")
    for bad in ("", "gts_", "gts_abc", "gts__x", "xyz_abc_def", "gts_abc_"):
        assert split_token(bad) is None

    @given(st.text(max_size=60))
    def never_crashes(text: str) -> None:
        parts = split_token(text)
        assert parts is None or f"gts_{parts[0]}_{parts[1]}" == text

    never_crashes()


class RouteAndRetentionTests(unittest.TestCase):
    def setUp(self) -> None:
        path = Path(self.mktemp())
        path.mkdir()
        migrate(path / "db.sqlite")
        self.clock = __import__("twisted.internet.task", fromlist=["Clock"]).Clock()
        self.store = Store(path / "db.sqlite", self.clock)
        self.addCleanup(self.store.close)

    @inline
    async def test_resolution_order(self) -> None:
        from gehirn_ts.store.db import MailStore, RouteStore

        account, _, _ = await self.store.create_account("acme")
        mail, routes = MailStore(self.store), RouteStore(self.store)
        await mail.add_domain("a.test", "acme")
        assert await routes.resolve("x@a.test") == ("acme", None)  # catch-all by default
        assert await routes.resolve("x@b.test") is None  # not served
        await routes.create(account.id, "sales@a.test", "store", [])
        assert await routes.resolve("x@a.test") is None  # the domain lists its addresses
        owner, route = await routes.resolve("sales@a.test")
        assert owner == "acme" and route.action == "store"
        await routes.create(account.id, "@a.test", "reject", [])
        assert (await routes.resolve("x@a.test"))[1].action == "reject"
        assert (await routes.resolve("sales@a.test"))[1].match == "sales@a.test"

    def _count_reads(self) -> list[int]:
        reads = [0]
        real = self.store._read

        def counted(fn: Any, *args: Any) -> Any:
            reads[0] += 1
            return real(fn, *args)

        self.patch(self.store, "_read", counted)
        return reads

    @inline
    async def test_owners_and_routes_are_kept_a_few_seconds(self) -> None:
        from gehirn_ts.recent import LOOKUP_SECONDS
        from gehirn_ts.store.db import MailStore, RouteStore

        await self.store.create_account("acme")
        mail, routes = MailStore(self.store), RouteStore(self.store)
        await mail.add_domain("a.test", "acme")
        reads = self._count_reads()
        for _ in range(3):
            assert await routes.resolve("x@a.test") == ("acme", None)
            assert await mail.domain_owner("A.test") == "acme"
            assert await routes.resolve("y@b.test") is None  # unknown answers too
        assert reads == [3]
        # Another process (the CLI) removes the domain: seen once the answers are old.
        other = Store(self.store.path, self.clock)
        self.addCleanup(other.close)
        await MailStore(other).remove_domain("a.test")
        assert await routes.resolve("x@a.test") == ("acme", None)
        self.clock.advance(LOOKUP_SECONDS)
        assert await routes.resolve("x@a.test") is None
        assert await mail.domain_owner("a.test") is None
        assert reads == [5]

    @inline
    async def test_a_valid_api_key_is_kept_a_few_seconds_and_only_for_its_secret(
        self,
    ) -> None:
        from gehirn_ts.recent import LOOKUP_SECONDS

        _account, key_id, token = await self.store.create_account("acme")
        _, other_token = await self.store.create_key("acme")
        reads = self._count_reads()
        for _ in range(3):
            principal = await self.store.authenticate(token)
            assert principal is not None and principal.key_id == key_id
        assert reads == [1]
        # A wrong secret for the same key finds nothing kept, and is never kept itself.
        prefix, kid, secret = token.split("_", 2)
        wrong = f"{prefix}_{kid}_{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"
        for _ in range(2):
            assert await self.store.authenticate(wrong) is None
        assert reads == [3]
        # Revoked by another process (the CLI): refused once the answer is old.
        other = Store(self.store.path, self.clock)
        self.addCleanup(other.close)
        await other.revoke_key(key_id)
        assert await self.store.authenticate(token) is not None
        self.clock.advance(LOOKUP_SECONDS)
        assert await self.store.authenticate(token) is None
        # Revoked here: refused at once.
        assert await self.store.authenticate(other_token) is not None
        await self.store.revoke_key(other_token.split("_")[1])
        assert await self.store.authenticate(other_token) is None

    @inline
    async def test_signing_keys_are_kept_a_few_seconds_and_dropped_on_a_change_here(
        self,
    ) -> None:
        from gehirn_ts.mta.dkim import SigningKey, generate
        from gehirn_ts.recent import LOOKUP_SECONDS
        from gehirn_ts.store.db import MailStore
        from gehirn_ts.store.keys import DkimKeyStore

        await self.store.create_account("acme")
        await MailStore(self.store).add_domain("a.test", "acme")
        keys = DkimKeyStore(self.store)
        private, _ = generate("ed25519")
        await keys.add(SigningKey("a.test", "s1", "ed25519", private))
        reads = self._count_reads()
        for domain in ("a.test", "A.test", "a.test"):
            assert [k.selector for k in await keys.keys_for(domain)] == ["s1"]
        assert reads == [1]
        # Added here: used by the next message.
        await keys.add(SigningKey("a.test", "s2", "ed25519", private))
        assert [k.selector for k in await keys.keys_for("a.test")] == ["s1", "s2"]
        # Removed by another process (the CLI): dropped once the answer is old.
        other = Store(self.store.path, self.clock)
        self.addCleanup(other.close)
        await DkimKeyStore(other).remove("a.test", "s1")
        assert [k.selector for k in await keys.keys_for("a.test")] == ["s1", "s2"]
        self.clock.advance(LOOKUP_SECONDS)
        assert [k.selector for k in await keys.keys_for("a.test")] == ["s2"]
        await keys.remove("a.test", "s2")
        assert await keys.keys_for("a.test") == []
        assert reads == [4]

    @inline
    async def test_a_change_made_here_is_seen_at_once(self) -> None:
        from gehirn_ts.store.db import MailStore, RouteStore

        account, _, _ = await self.store.create_account("acme")
        mail, routes = MailStore(self.store), RouteStore(self.store)
        assert await routes.resolve("sales@a.test") is None
        assert await mail.domain_owner("a.test") is None
        await mail.add_domain("a.test", "acme")
        assert await routes.resolve("sales@a.test") == ("acme", None)
        assert await mail.domain_owner("a.test") == "acme"
        route = await routes.create(account.id, "@a.test", "reject", [])
        assert (await routes.resolve("sales@a.test"))[1].action == "reject"
        await routes.delete(route.id, None)
        assert await routes.resolve("sales@a.test") == ("acme", None)
        routes.set_static(["sales@a.test forward boss@b.test"])
        assert (await routes.resolve("sales@a.test"))[1].action == "forward"
        await mail.remove_domain("a.test")
        assert await routes.resolve("sales@a.test") is None

    async def _received(self, *rows: tuple[str, str | None, float]) -> tuple[Any, Any]:
        """Accounts acme and beta, and received mail (queue id, account, time)."""
        from gehirn_ts.store.db import MailStore, Received, RouteStore

        await self.store.create_account("acme")
        await self.store.create_account("beta")
        mail, routes = MailStore(self.store), RouteStore(self.store)
        for qid, account, when in rows:
            await mail.record_received(
                Received(qid, account, f"{qid}.eml", "s@x.test", ["u@a.test"], 10, when, {})
            )
        return mail, routes

    @inline
    async def test_retention_forgets_old_mail_and_frees_unused_objects(self) -> None:
        mail, routes = await self._received(
            ("q1", "acme", 100.0), ("q1", "beta", 100.0), ("q2", "acme", 900.0)
        )
        assert await routes.expire_received(500.0) == (2, ["q1.eml"])
        with pytest.raises(NotFound):
            await mail.get_received("q1", None)
        assert (await mail.get_received("q2", None)).id == "q2"

    @inline
    async def test_retention_goes_a_batch_a_transaction_oldest_first(self) -> None:
        # q1 is stored for two accounts (one object); the postmaster's has no account.
        mail, routes = await self._received(
            ("q1", "acme", 100.0),
            ("q1", "beta", 101.0),
            ("q2", None, 102.0),
            ("q3", "acme", 103.0),
            ("q4", "acme", 900.0),
        )
        # q1's object is still used by beta's row after the first batch.
        assert await routes.expire_received(500.0, 1) == (1, [])
        assert await routes.expire_received(500.0, 2) == (2, ["q1.eml", "q2.eml"])
        assert await routes.expire_received(500.0, 2) == (1, ["q3.eml"])
        assert await routes.expire_received(500.0, 2) == (0, [])
        assert (await mail.get_received("q4", None)).id == "q4"

    @inline
    async def test_the_retention_service_deletes_kvs_objects(self) -> None:
        from gehirn_ts.store.db import MailStore, Received, RouteStore
        from gehirn_ts.tap import _Retention

        await self.store.create_account("acme")
        kvs = Path(self.mktemp())
        kvs.mkdir()
        (kvs / "old.eml").write_bytes(b"x")
        (kvs / "new.eml").write_bytes(b"y")
        mail = MailStore(self.store)
        await mail.record_received(Received("old", "acme", "old.eml", "", [], 1, 0.0, {}))
        self.clock.advance(10_000)
        await mail.record_received(Received("new", "acme", "new.eml", "", [], 1, 9_990.0, {}))
        retention = _Retention(RouteStore(self.store), kvs, 1000.0, self.clock)
        assert await retention.expire() == 1
        assert sorted(p.name for p in kvs.iterdir()) == ["new.eml"]

    @inline
    async def test_the_retention_service_repeats_until_a_batch_is_not_full(self) -> None:
        from gehirn_ts import tap
        from gehirn_ts.store.db import MailStore, Received, RouteStore

        await self.store.create_account("acme")
        kvs = Path(self.mktemp())
        kvs.mkdir()
        mail = MailStore(self.store)
        for n in range(7):
            (kvs / f"m{n}.eml").write_bytes(b"x")
            await mail.record_received(Received(f"m{n}", "acme", f"m{n}.eml", "", [], 1, 0.0, {}))
        self.clock.advance(10_000)
        self.patch(tap, "EXPIRE_BATCH", 3)  # 3 + 3 + 1
        retention = tap._Retention(RouteStore(self.store), kvs, 1000.0, self.clock)
        assert await retention.expire() == 7
        assert list(kvs.iterdir()) == []


class StaticRouteTests(unittest.TestCase):
    @inline
    async def test_config_routes_come_first(self) -> None:
        from gehirn_ts.store.db import MailStore, RouteStore

        path = Path(self.mktemp())
        path.mkdir()
        migrate(path / "db.sqlite")
        store = Store(path / "db.sqlite", reactor)
        self.addCleanup(store.close)
        account, _, _ = await store.create_account("acme")
        await MailStore(store).add_domain("a.test", "acme")
        routes = RouteStore(store, ["sales@a.test forward boss@b.test,vp@b.test", "@a.test reject"])
        await routes.create(account.id, "info@a.test", "store", [])
        owner, route = await routes.resolve("sales@a.test")
        assert (owner, route.action, route.forward_to) == (
            "acme",
            "forward",
            ["boss@b.test", "vp@b.test"],
        )
        # The config's "@a.test reject" outranks the API's info@ route.
        assert (await routes.resolve("info@a.test"))[1].action == "reject"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sales@a.test",
        "sales@a.test bounce",
        "sales@a.test forward",
        "sales@a.test store x@y.test",
        "not-an-address store",
        "@a.test forward bad address",
        "a b c d",
    ],
)
def test_bad_config_routes(bad):
    from gehirn_ts.config import ConfigError, from_mapping

    with pytest.raises(ConfigError) as e:
        from_mapping({"smtp": {"routes": [bad]}})
    assert e.value.errors[0].startswith("smtp.routes: ")


def test_generated_smtp_passwords_are_letters_and_digits() -> None:
    # A password starting with "-" broke swaks' command line (read as an option).
    passwords = [new_password() for _ in range(500)]
    assert all(len(p) == 32 and p.isascii() and p.isalnum() for p in passwords)
    assert len(set(passwords)) == 500
