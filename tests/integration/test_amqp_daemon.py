"""Daemons on RabbitMQ: a broker restart mid-stream, two nodes sharing work, a node killed."""

from __future__ import annotations

import collections
import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import rabbitmq
from tests.integration.procs import Daemon, wait_for
from tests.integration.test_daemon import delivered, setup_account


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Daemon]]:
    """Daemons on one broker namespace, sharing one state directory (one store)."""
    url = rabbitmq.rabbitmq_url()
    namespace = "it-" + secrets.token_hex(4)
    shared = tmp_path / "state"
    made: list[Daemon] = []

    def make() -> Daemon:
        workdir = tmp_path / f"node{len(made)}"
        workdir.mkdir()
        daemon = Daemon(
            workdir, bus={"url": url, "namespace": namespace}, state={"dir": str(shared)}
        )
        made.append(daemon)
        return daemon

    made.append(make)  # type: ignore[arg-type]
    yield made
    for daemon in made[1:]:
        daemon.stop()


def publish_stream(
    daemon: Daemon, token: str, count: int, threads: int = 4
) -> tuple[list[str], collections.Counter[int], threading.Event, list[threading.Thread]]:
    acknowledged: list[str] = []
    statuses: collections.Counter[int] = collections.Counter()
    started = threading.Event()
    per_thread = count // threads

    def run() -> None:
        for n in range(per_thread):
            try:
                status, body = daemon.call(
                    "POST", "/v1/events", {"type": "notice.fault", "data": {"n": n}}, token
                )
            except OSError:
                statuses[0] += 1
                continue
            statuses[status] += 1
            if status == 202:
                acknowledged.append(body["id"])
                started.set()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    return acknowledged, statuses, started, workers


def test_broker_restart_in_the_middle_of_1000_events(nodes, receiver) -> None:
    make = nodes[0]
    daemon = make().start()
    token = setup_account(daemon, receiver)
    acknowledged, statuses, _, workers = publish_stream(daemon, token, 1000)
    wait_for(lambda: len(acknowledged) >= 200, timeout=120)
    rabbitmq.restart()
    for t in workers:
        t.join(600)
    wanted = set(acknowledged)
    wait_for(lambda: wanted <= set(receiver.ids()), timeout=300)
    counts = collections.Counter(receiver.ids())
    duplicated = sum(1 for i in wanted if counts[i] > 1)
    assert statuses[202] == len(wanted)
    assert set(statuses) <= {202, 503}, statuses
    print(
        f"\n1000 published: {statuses[202]} acknowledged (202), {statuses[503]} refused "
        f"(503) during the restart; every acknowledged event delivered; "
        f"{duplicated} delivered more than once"
    )


def _delivered_by(daemon: Daemon) -> int:
    return len(
        re.findall(
            r"edj\.worker#info\] delivery \S+ of event \S+ to .*: delivered", daemon.output()
        )
    )


def test_two_daemons_share_the_deliveries(nodes, receiver) -> None:
    make = nodes[0]
    first = make().start()
    second = make().start()
    token = setup_account(first, receiver)
    ids = []
    for n in range(200):
        target = (first, second)[n % 2]
        status, body = target.call("POST", "/v1/events", {"type": "notice.fault"}, token)
        assert status == 202
        ids.append(body["id"])
    wait_for(lambda: set(ids) <= set(receiver.ids()), timeout=120)
    for event_id in ids[::20]:
        assert delivered(second, token, event_id)
    a, b = _delivered_by(first), _delivered_by(second)
    assert a + b >= 200
    assert a > 0 and b > 0, (a, b)
    print(f"\n200 events: node 1 delivered {a}, node 2 delivered {b}")


def test_a_killed_node_s_unacked_deliveries_go_to_the_other(nodes, receiver) -> None:
    make = nodes[0]
    first = make().start()
    second = make().start()
    token = setup_account(first, receiver)
    receiver.hold = threading.Event()
    ids = []
    for _ in range(20):
        status, body = first.call("POST", "/v1/events", {"type": "notice.fault"}, token)
        assert status == 202
        ids.append(body["id"])
    # Both nodes hold deliveries they have started and not acked.
    wait_for(lambda: len(receiver.hits) >= 10)
    first.kill()
    receiver.hold.set()
    receiver.hold = None
    wait_for(lambda: all(delivered(second, token, i) for i in ids), timeout=120)
    assert set(ids) <= set(receiver.ids())
