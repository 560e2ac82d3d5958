"""The outbound queue in the daemon process: kill -9 with messages queued, and the CLI."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.dnstest import dns_server
from tests.integration.procs import Daemon, Receiver, wait_for
from tests.sink import Sink
from tests.support import free_port


@pytest.fixture
def sink_port() -> int:
    return free_port()


@pytest.fixture
def daemon(tmp_path: Path, sink_port: int) -> Iterator[Daemon]:
    zone = dns_server()
    zone.mx("far.test", "127.0.0.2")
    d = Daemon(
        tmp_path,
        outbound={"port": sink_port, "retry_first": "1s", "retry_max": "1s", "timeout": "10s"},
    ).start()
    d.token = d.cli("account", "create", "acme")["api_key"]
    d.cli("domain", "add", "near.test", "acme")
    yield d
    d.stop()


def send(daemon: Daemon, n: int) -> str:
    status, body = daemon.call(
        "POST",
        "/v1/messages",
        {"from": "app@near.test", "to": f"user{n}@far.test", "subject": f"n{n}", "text": "hi"},
        daemon.token,
    )
    assert status == 202, body
    return str(body["id"])


def test_kill_9_with_200_messages_queued_delivers_each_exactly_once(
    daemon: Daemon, sink_port: int
) -> None:
    # The remote MX is down: every message stays queued (each try fails to connect).
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda n: send(daemon, n), range(200)))
    assert len(set(ids)) == 200
    daemon.kill()
    sink = Sink("127.0.0.2", port=sink_port)
    try:
        daemon.start()
        wait_for(lambda: len(sink.captured()) >= 200, timeout=120)
        time.sleep(3)  # long enough for a duplicate to show (retries are 1 s apart)
        subjects = Counter(str(c.message["Subject"]) for c in sink.captured())
        duplicated = sum(n - 1 for n in subjects.values())
        print(
            f"\n200 messages queued before kill -9: {len(subjects)} delivered, "
            f"{duplicated} duplicated"
        )
        assert set(subjects) == {f"n{n}" for n in range(200)}
        assert duplicated == 0
        statuses = Counter(
            r["status"]
            for mid in ids[:20]
            for r in daemon.call("GET", f"/v1/messages/{mid}", token=daemon.token)[1]["recipients"]
        )
        assert statuses == {"delivered": 20}
        wait_for(lambda: not list((daemon.state / "spool" / "queue").glob("*.eml")))
    finally:
        sink.stop()


def test_queue_cli_lists_holds_releases_flushes_and_deletes(daemon: Daemon, sink_port: int) -> None:
    mid = send(daemon, 1)
    listed = wait_for(
        lambda: [r for r in daemon.cli("queue", "list") if r["last_reply"]], timeout=20
    )
    assert listed[0]["id"] == mid and "connect" in listed[0]["last_reply"].lower()
    assert daemon.cli("queue", "hold", mid) == {"hold": 1}
    assert daemon.cli("queue", "list")[0]["held"] is True
    shown = daemon.cli("queue", "show", mid)
    assert shown["held"] and shown["recipients"][0]["status"] == "queued"
    attempts = len(shown["recipients"][0]["attempt_log"])
    time.sleep(2.5)  # held: not tried, although its retry time passed
    assert len(daemon.cli("queue", "show", mid)["recipients"][0]["attempt_log"]) == attempts
    assert daemon.cli("queue", "release", mid) == {"release": 1}
    assert daemon.cli("queue", "flush", "--all") == {"flush": 1}
    assert daemon.cli("queue", "delete", mid) == {"delete": 1}
    assert daemon.cli("queue", "show", mid)["recipients"][0]["status"] == "deleted"
    assert daemon.cli("queue", "list") == []
    assert "no queued message nope" in daemon.cli_error("queue", "flush", "nope")
    # DKIM keys: made, listed, refused for a domain not served, removed.
    made = daemon.cli("dkim", "keygen", "near.test", "s1", "--algorithm", "ed25519")
    assert made["dns_name"] == "s1._domainkey.near.test"
    assert made["dns_txt"].startswith("v=DKIM1; k=ed25519; p=")
    assert daemon.cli("dkim", "list")[0]["selector"] == "s1"
    assert "not a served domain" in daemon.cli_error("dkim", "keygen", "other.test", "s1")
    daemon.cli("dkim", "remove", "near.test", "s1")
    assert daemon.cli("dkim", "list") == []


def test_cli_subscriptions_publish_dead_letters_replay_and_send(
    daemon: Daemon, sink_port: int
) -> None:
    receiver = Receiver(plan=[400])
    sink = Sink("127.0.0.2", port=sink_port)
    try:
        made = daemon.cli("subscription", "create", "acme", "notice.#", receiver.url)
        assert daemon.cli("subscription", "list")[0]["id"] == made["id"]
        assert made["batch"] == 1
        assert "batch: must be from 1 to 100" in daemon.cli_error(
            "subscription", "create", "acme", "notice.#", receiver.url, "--batch", "101"
        )
        batched = daemon.cli(
            "subscription", "create", "acme", "other.#", receiver.url, "--batch", "5"
        )
        assert batched["batch"] == 5
        daemon.cli("subscription", "delete", batched["id"])
        published = daemon.cli(
            "publish", "notice.fault", "--account", "acme", "--data", '{"disk": "98%"}'
        )
        wait_for(lambda: receiver.hits)
        assert json.loads(receiver.hits[0].body)["data"] == {"disk": "98%"}
        # The 400 was permanent: a dead letter, listed, then replayed.
        dead = wait_for(lambda: daemon.cli("delivery", "list", "--status", "dead"))
        assert dead[0]["event_id"] == published["id"]
        daemon.cli("delivery", "replay", dead[0]["id"])
        wait_for(lambda: len(receiver.hits) == 2)
        wait_for(lambda: daemon.cli("delivery", "list", "--status", "delivered"))
        sent = daemon.cli("send", "--from", "app@near.test", "--to", "user@far.test")
        wait_for(lambda: sink.captured())
        assert sink.captured()[0].message["Subject"] == "gehirn-ts test"
        assert daemon.cli("queue", "show", sent["id"])["recipients"][0]["status"] == "delivered"
        daemon.cli("subscription", "delete", made["id"])
        assert daemon.cli("subscription", "list") == []
        daemon.kill()
        assert "is it running?" in daemon.cli_error("publish", "notice.x")
    finally:
        sink.stop()
        receiver.close()
