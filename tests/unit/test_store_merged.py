"""The store's merged interactions do what the same interactions one by one would.

``Store._route_many``, ``_record_many`` and ``_insert_many`` run the routings, the
attempts and the event writes that arrive together in one call (docs/decisions.md,
"Group commit"). Here each is run over random items once merged and once an item at
a time, on two copies of one database, and the answers and the rows they leave must
be the same.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from gehirn_ts.edj.router import route
from gehirn_ts.events import Event
from gehirn_ts.store.db import NotFound, Store
from gehirn_ts.store.schema import configure, migrate

TIME = "2026-11-28T00:00:00Z"
# (id, account, pattern, deleted)
SUBSCRIPTIONS = [
    ("sub_a", 1, "a.#", False),
    ("sub_all", 1, "#", False),
    ("sub_gone", 1, "#", True),
    ("sub_other", 2, "#", False),
]
IDS = ["e1", "e2", "e3", "e4"]


def stored_event(event_id: str) -> Event:
    return Event(type="a.x", source="/t", id=event_id, account="acme", time=TIME, data=0)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """accounts, subscriptions (one deleted), and e1 routed once before sub_gone went."""
    path = tmp_path_factory.mktemp("merged") / "template.sqlite"
    migrate(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "INSERT INTO accounts (id, name, created_at) VALUES (1, 'acme', 0), (2, 'other', 0)"
    )
    for sub_id, account, pattern, deleted in SUBSCRIPTIONS:
        conn.execute(
            "INSERT INTO subscriptions (id, account_id, pattern, url, created_at, deleted_at) "
            "VALUES (?,?,?,'http://x.test/',0,?)",
            (sub_id, account, pattern, 1.0 if deleted else None),
        )
    conn.close()
    return path


@contextmanager
def two_copies(template: Path, stored: set[str]) -> Iterator[list[tuple[Store, sqlite3.Cursor]]]:
    """Two stores on copies of ``template`` with the events ``stored`` in it (e1, if
    stored, has a pending delivery to the deleted subscription)."""
    with tempfile.TemporaryDirectory() as work:
        pairs = []
        for name in ("merged", "single"):
            path = Path(work, f"{name}.sqlite")
            shutil.copy(template, path)
            conn = sqlite3.connect(path, isolation_level=None)
            configure(conn)
            for event_id in sorted(stored):
                event = stored_event(event_id)
                conn.execute(
                    "INSERT INTO events (id, account_id, type, body, received_at) "
                    "VALUES (?,1,?,?,0)",
                    (event.id, event.type, event.to_json()),
                )
            if "e1" in stored:
                conn.execute(
                    "INSERT INTO deliveries (id, event_id, subscription_id, status, "
                    "created_at, updated_at) VALUES ('dlv_old','e1','sub_gone','pending',0,0)"
                )
            conn.execute("BEGIN IMMEDIATE")
            pairs.append((Store(path, Clock()), conn.cursor()))
        try:
            yield pairs
        finally:
            for _, cur in pairs:
                cur.connection.close()


def rows(cur: sqlite3.Cursor) -> tuple[list[Any], list[Any], list[Any]]:
    """What the database holds, without the random delivery ids."""
    events = cur.execute("SELECT id, account_id, type, body FROM events ORDER BY id").fetchall()
    deliveries = cur.execute(
        "SELECT event_id, subscription_id, status, attempts, failures, next_attempt_at, "
        "last_error FROM deliveries ORDER BY event_id, subscription_id"
    ).fetchall()
    attempts = cur.execute(
        "SELECT d.event_id, d.subscription_id, a.n, a.outcome, a.status_code, a.detail "
        "FROM attempts a JOIN deliveries d ON d.id = a.delivery_id ORDER BY 1, 2, 3"
    ).fetchall()
    return events, deliveries, attempts


events = st.builds(
    lambda event_id, type_, account, n: Event(
        type=type_, source="/t", id=event_id, account=account, time=TIME, data=n
    ),
    st.sampled_from(IDS),
    st.sampled_from(["a.x", "b.y"]),
    st.sampled_from(["acme", "other", None]),
    st.sampled_from([0, 1]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(events, min_size=1, max_size=10), st.sets(st.sampled_from(IDS[:3])))
def test_routing_merged_is_routing_one_by_one(
    template: Path, batch: list[Event], stored: set[str]
) -> None:
    with two_copies(template, stored) as ((merged, mcur), (single, scur)):
        items = [(event, lambda subs, e=event: route(e, subs), 5.0) for event in batch]
        together = merged._route_many(mcur, items)
        alone = [single._route_many(scur, [item])[0] for item in items]

        def shown(results: list[Any]) -> list[Any]:
            return [
                (
                    # Ordered by id, and the ids end in random bits: compared as sets.
                    sorted((d.event_id, d.subscription_id, d.status, d.attempts) for d in new),
                    [s.id for s in picked],
                )
                for new, picked in results
            ]

        assert shown(together) == shown(alone)
        assert rows(mcur) == rows(scur)


# An attempt: which delivery (by its event; "e9" has none), its outcome.
attempts = st.tuples(
    st.sampled_from(["e1", "e2", "e3", "e9"]),
    st.sampled_from([(200, "delivered"), (503, "pending"), (410, "dead")]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(attempts, min_size=1, max_size=8))
def test_recording_merged_is_recording_one_by_one(
    template: Path, batch: list[tuple[str, tuple[int, str]]]
) -> None:
    with two_copies(template, {"e1", "e2", "e3"}) as ((merged, mcur), (single, scur)):
        for store, cur in ((merged, mcur), (single, scur)):
            for event_id in ("e1", "e2", "e3"):
                store._route_many(cur, [(stored_event(event_id), lambda subs: subs[:1], 1.0)])
        ids = {
            event_id: delivery_id
            for event_id, delivery_id in mcur.execute(
                "SELECT event_id, id FROM deliveries WHERE status = 'pending' AND "
                "subscription_id != 'sub_gone'"
            )
        }

        def items(cur: sqlite3.Cursor) -> list[Any]:
            out = []
            for event_id, (code, status) in batch:
                row = cur.execute(
                    "SELECT id FROM deliveries WHERE event_id = ? AND subscription_id = 'sub_a'",
                    (event_id,),
                ).fetchone()
                delivery_id = row[0] if row else "dlv_missing"
                failed = code != 200
                detail = f"HTTP {code}" if failed else None
                out.append(
                    (
                        (
                            int(failed),
                            status,
                            60.0 if status == "pending" else None,
                            detail,
                            2.0,
                            delivery_id,
                        ),
                        (1.5, 0.1, status, code, detail, delivery_id),
                    )
                )
            return out

        assert ids  # the routing above made the deliveries
        if any(event_id == "e9" for event_id, _ in batch):
            # A delivery that is not there fails the merged call (each then runs alone).
            with pytest.raises(NotFound):
                merged._record_many(mcur, items(mcur))
            return
        assert merged._record_many(mcur, items(mcur)) == [None] * len(batch)
        for item in items(scur):
            single._record_many(scur, [item])
        assert rows(mcur) == rows(scur)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(events, min_size=1, max_size=4), min_size=1, max_size=6),
    st.sets(st.sampled_from(IDS[:3])),
)
def test_storing_merged_is_storing_one_by_one(
    template: Path, requests: list[list[Event]], stored: set[str]
) -> None:
    with two_copies(template, stored) as ((merged, mcur), (single, scur)):

        def before(cur: sqlite3.Cursor, n: int) -> None:
            # What a received message writes with its event (its row in the KVS index).
            cur.execute(
                "INSERT INTO received (id, account_id, object, sender, recipients, size, "
                "received_at, meta) VALUES (?, 1, 'o', '', '[]', 0, 0, '{}')",
                (f"q{n}",),
            )

        items = [
            ([(e, e.to_json()) for e in request], lambda cur, n=n: before(cur, n), 3.0)
            for n, request in enumerate(requests)
        ]
        together = merged._insert_many(mcur, items)
        alone = [single._insert_many(scur, [item])[0] for item in items]

        def shown(results: list[list[Any]]) -> list[list[Any]]:
            return [[o if isinstance(o, bool) else o.field for o in r] for r in results]

        assert shown(together) == shown(alone)
        assert rows(mcur) == rows(scur)
        received = "SELECT id FROM received ORDER BY id"
        assert mcur.execute(received).fetchall() == scur.execute(received).fetchall()
