"""An in-process gehirn-ts (built by tap.build, as twistd would) and a webhook receiver."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from gehirn_ts.config import from_mapping
from gehirn_ts.store.db import Store
from gehirn_ts.tap import ADMIN_KEY_FILE, DB_FILE, build
from tests.openapi import documented
from tests.support import free_port, until


class _QuietSite(Site):
    """The receiver is the outside world: its access log is not gehirn-ts's log."""

    def log(self, request: Any) -> None:
        pass


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver(Resource):
    """Answers each POST with the next planned status (then ``default``) and records it."""

    plan: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    default: int = 200
    hits: list[Hit] = field(default_factory=list)
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render_POST(self, request: Any) -> bytes:
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.hits.append(Hit(request.path.decode(), headers, request.content.read()))
        step = self.plan.pop(0) if self.plan else self.default
        status, extra = step if isinstance(step, tuple) else (step, {})
        request.setResponseCode(status)
        for k, v in extra.items():
            request.setHeader(k, v)
        return b"ok"

    def listen(self, testcase: Any, interface: str = "127.0.0.1") -> str:
        port = reactor.listenTCP(0, _QuietSite(self), interface=interface)
        testcase.addCleanup(port.stopListening)
        host = f"[{interface}]" if ":" in interface else interface
        return f"http://{host}:{port.getHost().port}"


class Daemon:
    def __init__(self, testcase: Any, **sections: dict[str, Any]) -> None:
        self.testcase = testcase
        self.state = Path(testcase.mktemp())
        self.port = free_port()
        raw: dict[str, Any] = {
            "state": {"dir": str(self.state)},
            "http": {"listen": f"tcp:{self.port}:interface=127.0.0.1"},
            "smtp": {
                "listen": f"tcp:{free_port()}:interface=127.0.0.1",
                "submission": "",
                "submissions": "",
            },
            "edj": {
                "retry_schedule": ["100ms", "100ms", "100ms"],
                "retry_jitter": 0,
                "allow_networks": ["127.0.0.0/8"],
            },
        }
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        self.config = from_mapping(raw)
        self.base = f"http://127.0.0.1:{self.port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    async def start(self) -> Daemon:
        self.service = build(self.config, reactor)
        # Registered first: a start that fails half way (a port taken) still stops
        # what it started, instead of leaving timers for the next test to trip on.
        self.testcase.addCleanup(self.service.stopService)
        self.service.startService()
        self.admin = (self.state / ADMIN_KEY_FILE).read_text().strip()
        self.store = Store(self.state / DB_FILE, reactor)
        self.testcase.addCleanup(self.store.close)
        await until(self._healthy)
        return self

    async def _healthy(self) -> bool:
        try:
            status, _ = await self.call("GET", "/healthz")
        except Exception:
            return False
        return status == 200

    async def account(self, name: str) -> str:
        _, _, token = await self.store.create_account(name)
        return token

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        hdrs = {"content-type": "application/json"}
        if token:
            hdrs["authorization"] = f"Bearer {token}"
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = await self.http.request(
            method, self.base + path, data=data, headers={k: [v] for k, v in hdrs.items()}
        )
        content = await response.content()
        self.last_headers = response.headers
        # Every answer the API gives must be one docs/openapi.yaml documents.
        assert documented(method, path, response.code) in (True, None), (
            f"{method} {path} answered {response.code}, not in docs/openapi.yaml"
        )
        try:
            parsed = json.loads(content) if content else None
        except ValueError:
            parsed = content
        return response.code, parsed

    async def subscribe(self, token: str, pattern: str, url: str, **extra: Any) -> dict[str, Any]:
        status, body = await self.call(
            "POST", "/v1/subscriptions", {"pattern": pattern, "url": url, **extra}, token=token
        )
        assert status == 201, body
        return dict(body)

    async def event(self, token: str, event_id: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/v1/events/{event_id}", token=token)
        assert status == 200, body
        return dict(body)

    async def wait_status(
        self, token: str, event_id: str, status: str, check: Callable[[Any], bool] | None = None
    ) -> dict[str, Any]:
        async def done() -> Any:
            body = await self.event(token, event_id)
            ds = body["deliveries"]
            return body if ds and all(d["status"] == status for d in ds) else None

        result: dict[str, Any] = await until(done)
        return result
