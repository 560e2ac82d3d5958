"""A small JSON routing layer over twisted.web.

Routes are declared with the status codes they can answer; the OpenAPI file is
checked against that table (tests/unit/test_openapi.py). Errors are always JSON:
``{"error": {"code": ..., "message": ..., "field": ...}}``; no traceback reaches a client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from gehirn_ts.logs import Logger
from gehirn_ts.store.db import Principal

log = Logger()


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


JSON_TYPES = ("application/json", "application/cloudevents+json")
# Made once: json.dumps with options makes an encoder for every call.
_ENCODER = json.JSONEncoder(ensure_ascii=False)


def bad_request(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid", message, field)


@dataclass
class Response:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # sent as is (with headers' content-type) instead of JSON


@dataclass
class Call:
    """One API request as a handler sees it."""

    request: Request
    params: dict[str, str]
    principal: Principal | None = None

    def query(self, name: str) -> str | None:
        values = self.request.args.get(name.encode())
        return values[0].decode("utf-8", "replace") if values else None

    def media_type(self) -> str:
        """The body's media type, lowercased, without parameters (JSON when unnamed)."""
        ctype = self.request.getHeader("content-type") or "application/json"
        return ctype.split(";")[0].strip().lower()

    def json(self, media_types: tuple[str, ...] = JSON_TYPES) -> Any:
        if getattr(self.request, "too_large", False):
            raise ApiError(413, "too_large", "the request body is larger than the limit", "body")
        if self.media_type() not in media_types:
            raise ApiError(415, "unsupported_media_type", "send application/json", "body")
        assert self.request.content is not None
        raw = self.request.content.read()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise bad_request("body", "is not valid JSON")

    def json_object(
        self, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        body = self.json()
        if not isinstance(body, dict):
            raise bad_request("body", "must be a JSON object")
        for name in body:
            if name not in allowed:
                raise bad_request(name, f"unknown field (allowed: {', '.join(allowed)})")
        for name in required:
            if name not in body:
                raise bad_request(name, "required")
        return body


Handler = Callable[[Call], Awaitable[Response]]
Authenticator = Callable[[str], Deferred[Principal | None]]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    handler: Handler
    statuses: tuple[int, ...]
    auth: bool = True

    @property
    def pattern(self) -> re.Pattern[str]:
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)
        return re.compile(f"^{regex}$")


class JsonApi(Resource):
    isLeaf = True

    def __init__(self, routes: list[Route], authenticate: Authenticator) -> None:
        super().__init__()
        self.routes = routes
        self._authenticate = authenticate
        self._compiled = [(r, r.pattern) for r in routes]

    def render(self, request: Request) -> Any:  # type: ignore[override]
        d = Deferred.fromCoroutine(self._handle(request))
        d.addErrback(lambda f: log.failure("API response failed", f))
        return NOT_DONE_YET

    async def _handle(self, request: Request) -> None:
        try:
            response = await self._dispatch(request)
        except ApiError as e:
            response = Response(e.status, e.body(), e.headers)
        except Exception:
            log.failure(
                "API handler failed for {method} {path}",
                method=request.method.decode(),
                path=request.path.decode("latin-1"),
            )
            response = Response(500, ApiError(500, "internal", "internal error").body())
        self._write(request, response)

    async def _dispatch(self, request: Request) -> Response:
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        allowed = []
        for route, pattern in self._compiled:
            match = pattern.match(path)
            if not match:
                continue
            allowed.append(route.method)
            if route.method != method:
                continue
            call = Call(request, match.groupdict())
            if route.auth:
                call.principal = await self._check_key(request)
            return await route.handler(call)
        if allowed:
            raise ApiError(
                405,
                "method_not_allowed",
                f"use {', '.join(allowed)}",
                headers={"Allow": ", ".join(allowed)},
            )
        raise ApiError(404, "not_found", "no such resource")

    async def _check_key(self, request: Request) -> Principal:
        header = request.getHeader("authorization") or ""
        scheme, _, token = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="gehirn-ts"'}
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401, "unauthorized", "send 'Authorization: Bearer <API key>'", headers=challenge
            )
        principal = await self._authenticate(token.strip())
        if principal is None:
            raise ApiError(401, "unauthorized", "the API key is not valid", headers=challenge)
        return principal

    @staticmethod
    def _write(request: Request, response: Response) -> None:
        if request.finished or request._disconnected:
            return
        request.setResponseCode(response.status)
        for name, value in response.headers.items():
            request.setHeader(name, value)
        if response.raw is not None:
            request.setHeader("content-length", str(len(response.raw)))
            request.write(response.raw)
        elif response.body is not None and response.status != 204:
            payload = _ENCODER.encode(response.body).encode() + b"\n"
            request.setHeader("content-type", "application/json; charset=utf-8")
            request.setHeader("content-length", str(len(payload)))
            request.write(payload)
        request.finish()


class LimitedRequest(Request):
    """A request that keeps at most ``max_body`` bytes of its body, in memory."""

    max_body = 1024 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Every body is JSON: the form parsing twisted.web does for a POST (through the
        # email package, for each request) would only cost time.
        self._parsePOSTFormSubmission = False

    def gotLength(self, length: int | None) -> None:
        self.too_large = length is not None and length > self.max_body
        self._received = 0
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            return
        assert self.content is not None
        self.content.write(data)


def request_factory(max_body: int) -> type[Request]:
    class Limited(LimitedRequest):
        pass

    Limited.max_body = max_body
    return Limited
