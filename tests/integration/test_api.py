"""The HTTP API and the delivery path, on a daemon built by tap.build in this process."""

from __future__ import annotations

import base64
import json
import sqlite3
from typing import Any

from standardwebhooks.webhooks import Webhook
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from gehirn_ts.tap import DB_FILE
from tests.harness import Daemon, Receiver
from tests.support import inline, sleep, until

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


def count(daemon: Daemon, table: str) -> int:
    conn = sqlite3.connect(daemon.state / DB_FILE)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


class ApiTests(unittest.TestCase):
    timeout = 60

    @inline
    async def test_health_needs_no_key_and_the_rest_does(self) -> None:
        d = await Daemon(self).start()
        assert await d.call("GET", "/healthz") == (200, {"status": "ok"})
        status, body = await d.call("GET", "/v1/subscriptions")
        assert status == 401 and body["error"]["code"] == "unauthorized"
        assert d.last_headers.getRawHeaders("www-authenticate")
        status, body = await d.call("GET", "/v1/subscriptions", token="gts_abc_wrong")
        assert status == 401
        status, _ = await d.call("GET", "/v1/subscriptions", token=d.admin)
        assert status == 200

    @inline
    async def test_unknown_path_and_method_are_json_errors(self) -> None:
        d = await Daemon(self).start()
        status, body = await d.call("GET", "/v1/nothing", token=d.admin)
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body = await d.call("PUT", "/v1/events", token=d.admin)
        assert status == 405 and body["error"]["code"] == "method_not_allowed"

    @inline
    async def test_publish_delivers_a_signed_cloudevent(self) -> None:
        d = await Daemon(self).start()
        receiver = Receiver()
        url = receiver.listen(self) + "/hook"
        token = await d.account("acme")
        await d.subscribe(token, "notice.#", url, secret=SECRET)
        await d.subscribe(token, "payment.*", url + "/other")
        status, body = await d.call(
            "POST",
            "/v1/events",
            {"type": "notice.fault", "subject": "db1", "data": {"text": "disk füll"}},
            token=token,
        )
        assert status == 202, body
        event_id = body["id"]
        await until(lambda: receiver.hits)
        await sleep(0.2)
        assert len(receiver.hits) == 1
        hit = receiver.hits[0]
        assert hit.path == "/hook"
        assert hit.headers["content-type"].startswith("application/cloudevents+json")
        assert hit.headers["webhook-id"] == event_id
        payload = Webhook(SECRET).verify(hit.body, hit.headers)
        assert payload["id"] == event_id
        assert payload["type"] == "notice.fault"
        assert payload["account"] == "acme"
        assert payload["data"] == {"text": "disk füll"}
        assert payload["specversion"] == "1.0"
        result = await d.wait_status(token, event_id, "delivered")
        (delivery,) = result["deliveries"]
        assert delivery["attempts"] == 1
        assert delivery["attempt_log"][0]["status_code"] == 200

    @inline
    async def test_a_batch_is_checked_whole_then_published(self) -> None:
        d = await Daemon(self).start()
        receiver = Receiver()
        token = await d.account("acme")
        await d.subscribe(token, "#", receiver.listen(self))

        async def batch(events: Any) -> tuple[int, Any]:
            return await d.call(
                "POST",
                "/v1/events",
                raw=json.dumps(events).encode(),
                token=token,
                headers={"content-type": "application/cloudevents-batch+json"},
            )

        when = "2026-11-27T05:00:00Z"
        first = [
            {"type": "notice.fault", "id": "b1", "time": when},
            {"type": "notice.info", "data": {"n": 2}},
        ]
        status, body = await batch(first)
        assert status == 202 and body["ids"][0] == "b1" and len(body["ids"]) == 2
        await until(lambda: len(receiver.hits) == 2)
        assert sorted(json.loads(h.body)["id"] for h in receiver.hits) == sorted(body["ids"])
        for event_id in body["ids"]:
            got, stored = await d.call("GET", f"/v1/events/{event_id}", token=token)
            assert got == 200 and stored["event"]["account"] == "acme"
        refused: list[tuple[Any, int, str]] = [
            ([{"type": "notice.fault", "id": "c1"}, {"type": "Bad"}], 400, "[1].type"),
            ([{"type": "a.b", "id": "c2"}, {"type": "a.b", "account": "beta"}], 403, "[1].account"),
            ([{"type": "a.b", "id": "c3"}, 7], 400, "[1]"),
            ([{"type": "mail.received"}], 400, "[0].type"),
            ([], 400, "body"),
            ({"type": "a.b"}, 400, "body"),
            ([{"type": "a.b"}] * 101, 400, "body"),
        ]
        for events, want, field in refused:
            got, answer = await batch(events)
            assert (got, answer["error"]["field"]) == (want, field), (events, answer)
        assert count(d, "events") == 2  # nothing of a refused batch
        # An id taken by another event: 409 naming it; a repeat of a batch publishes
        # nothing twice.
        got, answer = await batch([{"type": "a.b", "id": "c4"}, {"type": "a.b", "id": "b1"}])
        assert (got, answer["error"]["field"]) == (409, "[1].id")
        got, answer = await batch([{"type": "a.b", "id": "b1"}])
        assert (got, answer["error"]["field"]) == (409, "[0].id")
        status, body = await batch(first[:1])
        assert (status, body["ids"]) == (202, ["b1"])
        assert count(d, "events") == 3  # b1, the one without an id, c4
        await sleep(0.3)
        assert len(receiver.hits) == 3

    @inline
    async def test_a_batch_subscription_gets_signed_arrays_and_settles_each_event(self) -> None:
        d = await Daemon(self).start()
        receiver = Receiver(plan=[503])
        token = await d.account("acme")
        sub = await d.subscribe(token, "#", receiver.listen(self), batch=10, secret=SECRET)
        status, shown = await d.call("GET", f"/v1/subscriptions/{sub['id']}", token=token)
        assert status == 200 and sub["batch"] == shown["batch"] == 10
        events = [{"type": "notice.fault", "id": f"n{i}"} for i in range(25)]
        status, _ = await d.call(
            "POST",
            "/v1/events",
            raw=json.dumps(events).encode(),
            token=token,
            headers={"content-type": "application/cloudevents-batch+json"},
        )
        assert status == 202
        logs = {}
        for i in range(25):
            stored = await d.wait_status(token, f"n{i}", "delivered")
            (delivery,) = stored["deliveries"]
            logs[f"n{i}"] = [a["status_code"] for a in delivery["attempt_log"]]
        hits = receiver.hits
        for hit in hits:
            assert hit.headers["content-type"].startswith("application/cloudevents-batch+json")
            Webhook(SECRET).verify(hit.body, hit.headers)
        requests = [[e["id"] for e in json.loads(h.body)] for h in hits]
        assert all(1 <= len(r) <= 10 for r in requests)
        assert len(requests) < 25  # the events went together, not one a request
        # The first request was refused: its events, and only they, were tried again (in
        # an array again) and each keeps its own attempt log.
        failed = requests[0]
        assert {i: log for i, log in logs.items() if i in failed} == {i: [503, 200] for i in failed}
        assert all(log == [200] for i, log in logs.items() if i not in failed)
        assert sorted(i for r in requests[1:] for i in r) == sorted(logs)
        # Only plain webhooks take batches, of 1 to 100.
        for url, batch in (
            (receiver.listen(self), 0),
            (receiver.listen(self), 101),
            (receiver.listen(self), "5"),
            (receiver.listen(self), True),
            ("https://hooks.slack.com/services/T0/B0/XYZ", 2),
            ("mailto:ops@example.org", 2),
        ):
            status, answer = await d.call(
                "POST",
                "/v1/subscriptions",
                {"pattern": "#", "url": url, "batch": batch},
                token=token,
            )
            assert (status, answer["error"]["field"]) == (400, "batch"), (url, batch, answer)

    @inline
    async def test_retries_503_twice_then_delivered_on_the_third_attempt(self) -> None:
        d = await Daemon(self).start()
        receiver = Receiver(plan=[503, 503])
        token = await d.account("acme")
        await d.subscribe(token, "#", receiver.listen(self))
        _, body = await d.call("POST", "/v1/events", {"type": "notice.fault"}, token=token)
        result = await d.wait_status(token, body["id"], "delivered")
        (delivery,) = result["deliveries"]
        assert [a["status_code"] for a in delivery["attempt_log"]] == [503, 503, 200]
        assert [a["outcome"] for a in delivery["attempt_log"]] == ["retry", "retry", "delivered"]
        assert len(receiver.hits) == 3
        assert len({h.headers["webhook-id"] for h in receiver.hits}) == 1

    @inline
    async def test_retry_after_is_honoured(self) -> None:
        d = await Daemon(self).start()
        receiver = Receiver(plan=[(429, {"Retry-After": "2"})])
        token = await d.account("acme")
        await d.subscribe(token, "#", receiver.listen(self))
        await d.call("POST", "/v1/events", {"type": "notice.fault"}, token=token)
        await until(lambda: receiver.hits)
        # The schedule says 100 ms; the receiver asked for 2 s.
        await sleep(1.0)
        assert len(receiver.hits) == 1
        await until(lambda: len(receiver.hits) == 2, timeout=5)

    @inline
    async def test_permanent_failure_dead_letters_reports_and_replays(self) -> None:
        d = await Daemon(self).start()
        failing = Receiver(plan=[410])
        watcher = Receiver()
        token = await d.account("acme")
        sub = await d.subscribe(token, "notice.*", failing.listen(self))
        await d.subscribe(token, "edj.delivery.failed", watcher.listen(self))
        _, body = await d.call("POST", "/v1/events", {"type": "notice.fault"}, token=token)
        event_id = body["id"]
        result = await d.wait_status(token, event_id, "dead")
        (delivery,) = result["deliveries"]
        assert delivery["attempts"] == 1 and delivery["last_error"] == "HTTP 410"
        status, dead = await d.call("GET", "/v1/deliveries?status=dead", token=token)
        assert status == 200 and [x["id"] for x in dead["deliveries"]] == [delivery["id"]]
        await until(lambda: watcher.hits)
        report = json.loads(watcher.hits[0].body)
        assert report["type"] == "edj.delivery.failed"
        assert report["data"]["event_id"] == event_id
        assert report["data"]["subscription_id"] == sub["id"]
        assert report["data"]["status_code"] == 410
        # Replay: the receiver now answers 200.
        status, replayed = await d.call(
            "POST", f"/v1/deliveries/{delivery['id']}/replay", token=token
        )
        assert status == 202 and replayed["status"] == "pending"
        result = await d.wait_status(token, event_id, "delivered")
        assert result["deliveries"][0]["attempts"] == 2
        status, body = await d.call("POST", f"/v1/deliveries/{delivery['id']}/replay", token=token)
        assert status == 409
        status, _ = await d.call("POST", "/v1/deliveries/dlv_nope/replay", token=token)
        assert status == 404

    @inline
    async def test_schedule_exhausted_dead_letters(self) -> None:
        d = await Daemon(self).start()
        receiver = Receiver(default=500)
        token = await d.account("acme")
        await d.subscribe(token, "#", receiver.listen(self))
        _, body = await d.call("POST", "/v1/events", {"type": "notice.fault"}, token=token)
        result = await d.wait_status(token, body["id"], "dead")
        # One attempt plus one per entry of the schedule (three in this config).
        assert result["deliveries"][0]["attempts"] == 4
        types = [json.loads(h.body)["type"] for h in receiver.hits]
        assert types[:4] == ["notice.fault"] * 4
        # The '#' subscription also gets the failure report; when that delivery dies too,
        # no report of the report follows (no loop).
        await until(lambda: len(receiver.hits) == 8)
        await sleep(1.0)
        types = [json.loads(h.body)["type"] for h in receiver.hits]
        assert types == ["notice.fault"] * 4 + ["edj.delivery.failed"] * 4

    @inline
    async def test_bad_input_names_the_field_and_stores_nothing(self) -> None:
        d = await Daemon(self).start(), None
        daemon = d[0]
        token = await daemon.account("acme")
        cases: list[tuple[str, Any, int, str]] = [
            ("/v1/events", b"{not json", 400, "body"),
            ("/v1/events", [1, 2], 400, "body"),
            ("/v1/events", {"data": {}}, 400, "type"),
            ("/v1/events", {"type": "Bad Type"}, 400, "type"),
            ("/v1/events", {"type": "a.b", "colour": 1}, 400, "colour"),
            ("/v1/events", {"type": "a.b", "severity": "meh"}, 400, "severity"),
            ("/v1/events", {"type": "mail.received"}, 400, "type"),
            ("/v1/events", {"type": "a.b", "account": "other"}, 403, "account"),
            ("/v1/subscriptions", {"url": "https://example.com/"}, 400, "pattern"),
            ("/v1/subscriptions", {"pattern": "a..b", "url": "https://x.example/"}, 400, "pattern"),
            ("/v1/subscriptions", {"pattern": "#", "url": "ftp://x.example/"}, 400, "url"),
            (
                "/v1/subscriptions",
                {"pattern": "#", "url": "https://x.example/", "secret": "hunter2"},
                400,
                "secret",
            ),
            ("/v1/subscriptions", {"pattern": "#", "url": "https://x.example/", "x": 1}, 400, "x"),
            ("/v1/subscriptions", {"pattern": "#"}, 400, "url"),
        ]
        for path, body, status, field in cases:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            got, answer = await daemon.call("POST", path, raw=raw, token=token)
            assert (got, answer["error"].get("field")) == (status, field), (path, body, answer)
            assert answer["error"]["message"]
        big = json.dumps({"type": "a.b", "data": "x" * 2_000_000}).encode()
        got, answer = await daemon.call("POST", "/v1/events", raw=big, token=token)
        assert got == 413 and answer["error"]["field"] == "body"
        got, answer = await daemon.call(
            "POST", "/v1/events", raw=b"{}", token=token, headers={"content-type": "text/plain"}
        )
        assert got == 415
        got, answer = await daemon.call("GET", "/v1/deliveries?status=weird", token=token)
        assert got == 400 and answer["error"]["field"] == "status"
        assert count(daemon, "events") == 0
        assert count(daemon, "subscriptions") == 0

    @inline
    async def test_private_destinations_are_refused_unless_allowed(self) -> None:
        d = await Daemon(self, edj={"allow_networks": []}).start()
        token = await d.account("acme")
        for url in (
            "http://127.0.0.1:9/x",
            "http://10.1.2.3/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest",
        ):
            status, body = await d.call(
                "POST", "/v1/subscriptions", {"pattern": "#", "url": url}, token=token
            )
            assert status == 400 and body["error"]["field"] == "url", (url, body)
        # A name that resolves to loopback passes creation but is refused at delivery.
        receiver = Receiver()
        url = receiver.listen(self).replace("127.0.0.1", "localhost")
        await d.subscribe(token, "#", url)
        _, body = await d.call("POST", "/v1/events", {"type": "notice.fault"}, token=token)
        result = await d.wait_status(token, body["id"], "dead")
        assert "non-public" in result["deliveries"][0]["last_error"]
        assert receiver.hits == []

    @inline
    async def test_secrets_are_redacted_in_responses_and_logs(self) -> None:
        logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            from twisted.logger import formatEvent

            logged.append(formatEvent(event) + repr(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        d = await Daemon(self).start()
        receiver = Receiver(plan=[503])
        base = receiver.listen(self)
        url = base.replace("http://", "http://bob:Pa55word@") + "/h?token=T0psecret"
        token = await d.account("acme")
        sub = await d.subscribe(token, "#", url, secret=SECRET)
        texts = [json.dumps(sub)]
        for path in ("/v1/subscriptions", f"/v1/subscriptions/{sub['id']}"):
            texts.append(json.dumps((await d.call("GET", path, token=token))[1]))
        _, body = await d.call("POST", "/v1/events", {"type": "notice.fault"}, token=token)
        await d.wait_status(token, body["id"], "delivered")
        assert (
            receiver.hits[0].headers["authorization"]
            == "Basic " + base64.b64encode(b"bob:Pa55word").decode()
        )
        texts.append(json.dumps(await d.event(token, body["id"])))
        for secret in ("Pa55word", "T0psecret", SECRET[6:]):
            for text in texts + logged:
                assert secret not in text, (secret, text)
        assert sub["url"].startswith("http://bob:****@127.0.0.1:")
        assert sub["secret"] == "whsec_****"

    @inline
    async def test_subscriptions_are_per_account(self) -> None:
        d = await Daemon(self).start()
        a = await d.account("alpha")
        b = await d.account("beta")
        receiver = Receiver()
        url = receiver.listen(self)
        sub_a = await d.subscribe(a, "#", url + "/a")
        await d.subscribe(b, "#", url + "/b")
        status, listed = await d.call("GET", "/v1/subscriptions", token=a)
        assert [s["id"] for s in listed["subscriptions"]] == [sub_a["id"]]
        assert (await d.call("GET", f"/v1/subscriptions/{sub_a['id']}", token=b))[0] == 404
        assert (await d.call("DELETE", f"/v1/subscriptions/{sub_a['id']}", token=b))[0] == 404
        # An event of alpha reaches alpha's subscription only.
        _, body = await d.call("POST", "/v1/events", {"type": "notice.fault"}, token=a)
        await until(lambda: receiver.hits)
        await sleep(0.3)
        assert [h.path for h in receiver.hits] == ["/a"]
        assert (await d.call("GET", f"/v1/events/{body['id']}", token=b))[0] == 404
        # The admin key sees every account and can publish a broadcast.
        _, all_subs = await d.call("GET", "/v1/subscriptions", token=d.admin)
        assert len(all_subs["subscriptions"]) == 2
        status, _ = await d.call(
            "POST", "/v1/events", {"type": "notice.maintenance"}, token=d.admin
        )
        assert status == 202
        await until(lambda: len(receiver.hits) == 3)
        assert sorted(h.path for h in receiver.hits[1:]) == ["/a", "/b"]
        # Deleted: no longer listed, no longer delivered to.
        assert (await d.call("DELETE", f"/v1/subscriptions/{sub_a['id']}", token=a))[0] == 204
        _, listed = await d.call("GET", "/v1/subscriptions", token=a)
        assert listed["subscriptions"] == []

    @inline
    async def test_same_event_id_is_idempotent_and_conflicts_on_other_content(self) -> None:
        d = await Daemon(self).start()
        receiver = Receiver()
        token = await d.account("acme")
        await d.subscribe(token, "#", receiver.listen(self))
        event = {
            "type": "notice.fault",
            "id": "fixed-1",
            "source": "/x",
            "time": "2026-01-01T00:00:00Z",
        }
        assert (await d.call("POST", "/v1/events", event, token=token))[0] == 202
        assert (await d.call("POST", "/v1/events", event, token=token))[0] == 202
        status, body = await d.call(
            "POST", "/v1/events", {**event, "subject": "changed"}, token=token
        )
        assert status == 409 and body["error"]["field"] == "id"
        await until(lambda: receiver.hits)
        await sleep(0.5)
        assert len(receiver.hits) == 1

    @inline
    async def test_an_event_refused_with_409_is_not_routed(self) -> None:
        # The store and the bus are written at once: the refused event reaches the bus,
        # and routing must see that its id belongs to another event.
        d = await Daemon(self).start()
        receiver = Receiver()
        token = await d.account("acme")
        await d.subscribe(token, "b.#", receiver.listen(self))
        first = {"type": "a.x", "id": "taken-1", "source": "/x", "time": "2026-01-01T00:00:00Z"}
        assert (await d.call("POST", "/v1/events", first, token=token))[0] == 202
        status, _ = await d.call("POST", "/v1/events", {**first, "type": "b.y"}, token=token)
        assert status == 409
        status, later = await d.call("POST", "/v1/events", {"type": "b.z"}, token=token)
        assert status == 202
        await until(lambda: receiver.hits)
        await sleep(0.5)
        assert [json.loads(h.body)["id"] for h in receiver.hits] == [later["id"]]
        _, shown = await d.call("GET", "/v1/events/taken-1", token=token)
        assert shown["event"]["type"] == "a.x" and shown["deliveries"] == []
