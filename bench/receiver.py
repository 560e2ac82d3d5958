"""A webhook receiver for the benchmarks: records each event's publish-to-arrival time.

GET /stats answers {"count", "unique", "first", "last", "latencies_ms"}; POST /reset clears.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class Receiver(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.ids: set[str] = set()
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.latencies: list[float] = []

    def render_POST(self, request):  # type: ignore[no-untyped-def]
        now = time.time()
        if request.path == b"/reset":
            self.reset()
            return b"{}"
        event = json.loads(request.content.read())
        self.count += 1
        if event["id"] not in self.ids:
            self.ids.add(event["id"])
            sent = (event.get("data") or {}).get("t")
            if sent:
                self.latencies.append((now - sent) * 1000)
        self.first = self.first or now
        self.last = now
        return b"ok"

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        request.setHeader("content-type", "application/json")
        return json.dumps(
            {
                "count": self.count,
                "unique": len(self.ids),
                "first": self.first,
                "last": self.last,
                "latencies_ms": self.latencies,
            }
        ).encode()


class Quiet(Site):
    def log(self, request):  # type: ignore[no-untyped-def]
        pass


reactor.listenTCP(int(sys.argv[1]), Quiet(Receiver()), interface="127.0.0.1")
reactor.run()
