"""A webhook receiver for the benchmarks: records each event's publish-to-arrival time.

GET /stats answers {"count", "requests", "unique", "first", "last", "latencies_ms"}; POST /reset
clears; any other POST is an event (CloudEvents structured mode) or an array of them
(batched mode).

It reads HTTP/1.1 itself (request line, Content-Length, keep-alive) and nothing more:
it shares the machine's two cores with the daemon it measures, and twisted.web's server
cost about 0.5 ms of CPU a request here, a third of what the daemon spends on an event
(docs/performance.md). Its only client is the daemon under test.
"""

from __future__ import annotations

import gc
import json
import sys
import time

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

MAX_HEAD = 65536


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ids: set[str] = set()
        self.count = 0
        self.requests = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies: list[float] = []

    def request(self, body: bytes) -> None:
        """One event, or a batch of them (CloudEvents' batched mode: an array)."""
        parsed = json.loads(body)
        self.requests += 1
        for event in parsed if isinstance(parsed, list) else [parsed]:
            self.event(event)

    def event(self, event: dict) -> None:  # type: ignore[type-arg]
        now = time.time()
        self.count += 1
        if event["id"] not in self.ids:
            self.ids.add(event["id"])
            sent = (event.get("data") or {}).get("t")
            if sent:
                self.latencies.append((now - sent) * 1000)
        self.first = self.first or now
        self.last = now

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "count": self.count,
                "requests": self.requests,
                "unique": len(self.ids),
                "first": self.first,
                "last": self.last,
                "latencies_ms": self.latencies,
            }
        ).encode()


class Hook(Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.transport.loseConnection()
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            method, path = head[0].split(" ")[:2]
            self.transport.write(self.answer(method, path, body))

    def answer(self, method: str, path: str, body: bytes) -> bytes:
        content = b"ok"
        if method == "GET":
            content = self.stats.as_json()
        elif path == "/reset":
            self.stats.reset()
            content = b"{}"
        else:
            self.stats.request(body)
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(content), content)


class HookFactory(Factory):
    def __init__(self) -> None:
        self.stats = Stats()

    def buildProtocol(self, addr: object) -> Hook:
        return Hook(self.stats)


if __name__ == "__main__":
    # No cyclic garbage collection: what a request leaves is freed by reference counting,
    # and a full collection (44 ms here, over the ids of tens of thousands of events)
    # would stamp the events arriving meanwhile late, in the daemon's latency figures.
    gc.disable()
    reactor.listenTCP(int(sys.argv[1]), HookFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
