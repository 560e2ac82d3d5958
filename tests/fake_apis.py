"""Local stand-ins for the hosted APIs (Slack incoming webhooks, Pushover, Twilio SMS):
each checks a request the way the API's documentation describes it and answers as the
API does, including its documented errors, which a test can plan."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class _Quiet(Site):
    def log(self, request: Any) -> None:
        pass


@dataclass
class Planned:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeApi(Resource):
    """Records every request; answers the next planned reply, else checks and accepts."""

    plan: list[Planned] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def listen(self, testcase: Any) -> str:
        port = reactor.listenTCP(0, _Quiet(self), interface="127.0.0.1")
        testcase.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def render_POST(self, request: Any) -> bytes:
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        raw = request.content.read()
        entry = {"path": request.path.decode(), "headers": headers, "raw": raw}
        self.requests.append(entry)
        reply = self.plan.pop(0) if self.plan else self.check(entry)
        request.setResponseCode(reply.status)
        for k, v in reply.headers.items():
            request.setHeader(k, v)
        if isinstance(reply.body, bytes):
            return reply.body
        request.setHeader("content-type", "application/json")
        return json.dumps(reply.body).encode()

    def check(self, entry: dict[str, Any]) -> Planned:
        raise NotImplementedError


class FakeSlack(FakeApi):
    """Slack incoming webhooks: POST /services/T/B/X, application/json, a "text" (or
    "blocks"); answers 200 "ok", or 400 invalid_payload / 404 no_service as Slack does."""

    def check(self, entry: dict[str, Any]) -> Planned:
        if not re.match(r"^/services/[A-Za-z0-9]+/[A-Za-z0-9]+/[A-Za-z0-9]+$", entry["path"]):
            return Planned(404, b"no_service")
        if not entry["headers"].get("content-type", "").startswith("application/json"):
            return Planned(400, b"invalid_payload")
        try:
            payload = json.loads(entry["raw"])
        except ValueError:
            return Planned(400, b"invalid_payload")
        text, blocks = payload.get("text"), payload.get("blocks")
        if not (isinstance(text, str) and text) and not blocks:
            return Planned(400, b"no_text")
        if blocks is not None and not (
            isinstance(blocks, list) and all(isinstance(b, dict) and "type" in b for b in blocks)
        ):
            return Planned(400, b"invalid_blocks")
        self.accepted.append(payload)
        return Planned(200, b"ok")


PUSHOVER_KEY = re.compile(r"^[A-Za-z0-9]{30}$")


class FakePushover(FakeApi):
    """Pushover: POST /1/messages.json, form fields token, user, message (required),
    title, url, url_title, priority, sound, device, retry/expire (required for
    priority 2); 200 {"status": 1} or 4xx {"status": 0, "errors": [...]}."""

    def check(self, entry: dict[str, Any]) -> Planned:
        if entry["path"] != "/1/messages.json":
            return Planned(404, {"status": 0, "errors": ["not found"]})
        ctype = entry["headers"].get("content-type", "")
        if not ctype.startswith("application/x-www-form-urlencoded"):
            return Planned(400, {"status": 0, "errors": ["send form fields"]})
        form = {k: v[0] for k, v in parse_qs(entry["raw"].decode(), strict_parsing=True).items()}
        errors = []
        if not PUSHOVER_KEY.match(form.get("token", "")):
            errors.append("application token is invalid")
        if not PUSHOVER_KEY.match(form.get("user", "")):
            errors.append("user identifier is not a valid user, group, or subscribed user key")
        message = form.get("message", "")
        if not message or len(message) > 1024:
            errors.append("message cannot be blank (and at most 1024 characters)")
        if len(form.get("title", "")) > 250:
            errors.append("title is too long")
        priority = form.get("priority", "0")
        if priority not in ("-2", "-1", "0", "1", "2"):
            errors.append("priority is invalid")
        if priority == "2":
            if not form.get("retry", "").isdigit() or int(form["retry"]) < 30:
                errors.append("retry is invalid (at least 30 seconds)")
            if not form.get("expire", "").isdigit() or int(form["expire"]) > 10800:
                errors.append("expire is invalid (at most 10800 seconds)")
        if errors:
            return Planned(400, {"status": 0, "request": "r", "errors": errors})
        self.accepted.append(form)
        return Planned(200, {"status": 1, "request": f"req-{len(self.accepted)}"})


class FakeTwilio(FakeApi):
    """Twilio Messages: POST /2010-04-01/Accounts/{sid}/Messages.json with Basic auth
    (sid:token), form To, From, Body; 201 with the message resource, or the documented
    errors: 401 code 20003, 400 code 21211 (invalid To), 21617 (Body over 1600)."""

    def __init__(self, sid: str, token: str) -> None:
        super().__init__()
        self.sid = sid
        self.token = token

    def check(self, entry: dict[str, Any]) -> Planned:
        expected = f"/2010-04-01/Accounts/{self.sid}/Messages.json"
        auth = entry["headers"].get("authorization", "")
        good = "Basic " + base64.b64encode(f"{self.sid}:{self.token}".encode()).decode()
        if entry["path"] != expected or auth != good:
            return Planned(401, {"code": 20003, "message": "Authenticate", "status": 401})
        if (
            not entry["headers"]
            .get("content-type", "")
            .startswith("application/x-www-form-urlencoded")
        ):
            return Planned(400, {"code": 20001, "message": "Bad request", "status": 400})
        form = {k: v[0] for k, v in parse_qs(entry["raw"].decode()).items()}
        if not re.match(r"^\+[1-9][0-9]{6,14}$", form.get("To", "")):
            return Planned(
                400, {"code": 21211, "message": "Invalid 'To' Phone Number", "status": 400}
            )
        if "From" not in form or not form.get("Body"):
            return Planned(
                400, {"code": 21602, "message": "Message body is required.", "status": 400}
            )
        if len(form["Body"]) > 1600:
            return Planned(
                400,
                {
                    "code": 21617,
                    "message": "The concatenated message body exceeds the 1600 character limit",
                    "status": 400,
                },
            )
        self.accepted.append(form)
        return Planned(
            201,
            {
                "sid": f"SM{len(self.accepted):032x}",
                "status": "queued",
                "to": form["To"],
                "body": form["Body"],
            },
        )
