"""The IRC destination against a real ngircd, through the running daemon: events
published over the API reach a second client in the channel."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from twisted.trial.unittest import TestCase

from gehirn_ts.edj.destinations.irc import budget_for
from tests.harness import Daemon
from tests.ngircd import NGIRCD, Ngircd, listen
from tests.support import inline, until

pytestmark = pytest.mark.skipif(
    shutil.which("ngircd") is None and not __import__("os").path.exists(NGIRCD),
    reason="make test installs ngircd",
)


class IrcTests(TestCase):
    timeout = 90

    def _server(self) -> Ngircd:
        server = Ngircd().start()
        self.addCleanup(server.stop)
        return server

    async def _daemon(self, **edj: Any) -> tuple[Daemon, str]:
        settings = {"irc_rate": 20, "irc_burst": 5, "irc_reconnect": "200ms", **edj}
        d = await Daemon(self, edj=settings).start()
        return d, await d.account("acme")

    async def _publish(self, d: Daemon, token: str, subject: str, **data: Any) -> str:
        status, body = await d.call(
            "POST",
            "/v1/events",
            {"type": "notice.fault", "source": "/ops", "subject": subject, "data": data},
            token=token,
        )
        assert status == 202, body
        return str(body["id"])

    @inline
    async def test_bot_joins_posts_and_splits_long_utf8_text(self) -> None:
        server = self._server()
        listener = await listen(self, server, "watcher", "#ops")
        d, token = await self._daemon()
        url = f"irc://gehirnbot@127.0.0.1:{server.port}/#ops"
        await d.subscribe(token, "notice.#", url, template="{data.text}")
        text = "Grüße aus Köln — ünïcödé " * 40  # about 1,100 bytes, multi-byte characters
        event_id = await self._publish(d, token, "db-1", text=text[:300])
        await d.wait_status(token, event_id, "delivered")
        await until(lambda: len(listener.heard) >= 2)
        kinds = {h[0] for h in listener.heard}
        assert kinds == {"PRIVMSG"} and listener.heard[0][1] == "#ops"
        assert listener.heard[0][2] == "[info] notice.fault: db-1"
        # The body came through whole: the lines, joined again, are the text.
        body_lines = listener.texts()[1:]
        assert " ".join(body_lines) == " ".join(text[:300].split())
        # A long text is cut into lines that fit the 512-byte limit, on UTF-8 boundaries.
        sent = await self._publish(d, token, "long", text="x")
        await d.wait_status(token, sent, "delivered")
        budget = budget_for("PRIVMSG", "#ops")
        from gehirn_ts.edj.destinations.irc import split_text

        lines = split_text(text * 3, budget)
        assert len(lines) > 3 and all(len(line.encode()) <= budget for line in lines)
        assert " ".join(lines) == " ".join((text * 3).split())

    @inline
    async def test_notice_nick_in_use_injection_and_flood_control(self) -> None:
        server = self._server()
        # The bot's nick is taken: it becomes gehirn_ and still delivers.
        listener = await listen(self, server, "gehirn", "#alerts")
        d, token = await self._daemon(irc_rate=4, irc_burst=2)
        url = f"irc://gehirn@127.0.0.1:{server.port}/%23alerts?notice=1"
        await d.subscribe(token, "notice.#", url, template="{data.a}\n{data.b}\n{data.c}")
        first = await self._publish(
            d, token, "x\r\nQUIT :injected", a="line 1\r\nPRIVMSG #alerts :fake", b="2", c="3"
        )
        await d.wait_status(token, first, "delivered")
        await until(lambda: len(listener.heard) >= 5)
        assert {h[0] for h in listener.heard} == {"NOTICE"}
        # CR/LF never ended an IRC line: the would-be commands arrived as text.
        assert listener.texts()[:3] == [
            "[info] notice.fault: x QUIT :injected",
            "line 1",
            "PRIVMSG #alerts :fake",
        ]
        second = await self._publish(d, token, "after", a="4", b="5", c="6")
        await d.wait_status(token, second, "delivered")
        await until(lambda: len(listener.heard) >= 9)
        assert listener.texts()[5:9] == ["[info] notice.fault: after", "4", "5", "6"]
        # 4 lines a second after a burst of 2: of the first event's 5 lines, the last 3
        # came 0.25 s apart; of the second's 4 (the bucket full again), the last 2 (the
        # server relays the lines as they come).
        times = [h[3] for h in listener.heard]
        assert times[4] - times[1] >= 3 * 0.25 * 0.8
        assert times[8] - times[6] >= 2 * 0.25 * 0.8

    @inline
    async def test_ngircd_restart_mid_stream_then_queued_events_arrive(self) -> None:
        server = self._server()
        listener = await listen(self, server, "watcher", "#ops")
        # Retries come often enough, and are enough, to bridge the restart.
        d, token = await self._daemon(retry_schedule=["300ms"] * 30)
        url = f"irc://gehirnbot@127.0.0.1:{server.port}/#ops"
        await d.subscribe(token, "notice.#", url, template="{data.n}")
        before = await self._publish(d, token, "before", n="event 1")
        await d.wait_status(token, before, "delivered")
        server.stop()
        await until(lambda: listener.lost)
        during = [await self._publish(d, token, f"during {n}", n=f"event {n}") for n in (2, 3)]
        server.start()
        listener = await listen(self, server, "watcher2", "#ops")
        for event_id in during:
            await d.wait_status(token, event_id, "delivered")
        await until(lambda: {"event 2", "event 3"} <= set(listener.texts()))

    @inline
    async def test_server_password(self) -> None:
        server = Ngircd(password="s3cret").start()
        self.addCleanup(server.stop)
        listener = await listen(self, server, "watcher", "#ops", password="s3cret")
        d, token = await self._daemon()
        sub = await d.subscribe(
            token, "notice.#", f"irc://gehirnbot:s3cret@127.0.0.1:{server.port}/#ops"
        )
        assert "s3cret" not in sub["url"]
        event_id = await self._publish(d, token, "with a password", n="1")
        await d.wait_status(token, event_id, "delivered")
        await until(lambda: listener.texts())
        assert listener.texts()[0] == "[info] notice.fault: with a password"

    @inline
    async def test_tls_and_nickserv_identify(self) -> None:
        from tests.support import free_port

        server = Ngircd(tls_port=free_port()).start()
        self.addCleanup(server.stop)
        listener = await listen(self, server, "watcher", "#ops")
        # A client may take the nick NickServ on a server without services: it hears
        # what the bot sends there.
        nickserv = await listen(self, server, "NickServ")
        d, token = await self._daemon()
        url = f"ircs://gehirnbot:idpass@127.0.0.1:{server.tls_port}/%23ops?auth=nickserv&verify=0"
        await d.subscribe(token, "notice.#", url)
        event_id = await self._publish(d, token, "over TLS", n="1")
        await d.wait_status(token, event_id, "delivered")
        await until(lambda: listener.texts() and nickserv.texts())
        assert listener.texts()[0] == "[info] notice.fault: over TLS"
        assert nickserv.texts() == ["IDENTIFY idpass"]

    @inline
    async def test_ircs_verifies_the_certificate_unless_told_not_to(self) -> None:
        from tests.support import free_port

        server = Ngircd(tls_port=free_port()).start()  # a self-signed certificate
        self.addCleanup(server.stop)
        listener = await listen(self, server, "watcher", "#ops")
        d, token = await self._daemon(irc_timeout="1s")
        await d.subscribe(token, "notice.#", f"ircs://strict@127.0.0.1:{server.tls_port}/%23ops")
        event_id = await self._publish(d, token, "must not arrive", n="1")

        async def dead() -> Any:
            body = await d.event(token, event_id)
            found = body["deliveries"]
            return body if found and found[0]["status"] == "dead" else None

        body = await until(dead, timeout=30)
        assert "not connected" in body["deliveries"][0]["last_error"]
        assert listener.texts() == []

    @inline
    async def test_the_bot_answers_the_servers_ping_and_stays_connected(self) -> None:
        from tests.support import sleep

        # ngircd PINGs a client idle for PingTimeout seconds (5 here) and drops it when
        # no PONG comes within PongTimeout (3). (With 2 s it did not ping within 7 s, so a
        # bot that never answered passed: hence 5 s and 14 s of idling.)
        server = Ngircd(ping=5, pong=3).start()
        self.addCleanup(server.stop)
        listener = await listen(self, server, "watcher", "#ops")
        d, token = await self._daemon()
        await d.subscribe(token, "notice.#", f"irc://pingbot@127.0.0.1:{server.port}/#ops")
        first = await self._publish(d, token, "before the pings", n="1")
        await d.wait_status(token, first, "delivered")
        (bot,) = d.service.getServiceNamed("irc").bots.values()
        connection = bot._proto
        assert connection is not None
        await sleep(14)  # PING rounds while idle
        second = await self._publish(d, token, "after the pings", n="2")
        await d.wait_status(token, second, "delivered")
        assert bot._proto is connection  # the same connection: it answered every PING
        await until(lambda: len(listener.texts()) >= 2)
