"""The v1 HTTP API: events, subscriptions, deliveries, health."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.web.server import Site

from gehirn_ts.edj import registry
from gehirn_ts.edj.netguard import AddressPolicy
from gehirn_ts.edj.publisher import Publisher
from gehirn_ts.edj.render import TemplateError, check_template
from gehirn_ts.edj.worker import EdjService
from gehirn_ts.events import (
    RESERVED_PREFIXES,
    Event,
    EventError,
    PatternError,
    event_from_dict,
    validate_account_name,
    validate_pattern,
)
from gehirn_ts.interfaces import BusUnavailable
from gehirn_ts.metrics import CONTENT_TYPE, Metrics
from gehirn_ts.mta.address import parse_path
from gehirn_ts.mta.compose import (
    FieldError,
    Head,
    build,
    envelope_address,
    parse_dsn,
    parse_send,
    parse_tags_metadata,
)
from gehirn_ts.mta.inbound import Inbound
from gehirn_ts.mta.outbound import Outbound, message_id_header, rfc5322_date
from gehirn_ts.mta.replies import SmtpError
from gehirn_ts.mta.spool import new_queue_id
from gehirn_ts.redact import redact_secret
from gehirn_ts.store.db import (
    ROUTE_ACTIONS,
    Attempt,
    Conflict,
    Delivery,
    MailStore,
    NotFound,
    Principal,
    Received,
    RouteStore,
    Store,
    Subscription,
)
from gehirn_ts.store.db import Route as MailRoute
from gehirn_ts.store.queue import AttemptRecord, NewRecipient, QueueStore, RecipientState
from gehirn_ts.web.accesslog import LoggingSite
from gehirn_ts.web.http import (
    ApiError,
    Call,
    JsonApi,
    Response,
    Route,
    bad_request,
    request_factory,
)

DELIVERY_STATUSES = ("pending", "delivered", "dead", "cancelled")
SEND_STATUSES = (202, 400, 401, 403, 409, 413, 415)
RAW_FIELDS = ("from", "to", "message", "message_base64", "dsn", "tags", "metadata")
_IDEMPOTENCY_KEY = re.compile(r"^[!-~]{1,255}$")
MAX_LIST = 1000
# CloudEvents' batched content mode (HTTP protocol binding, section 3.3), and how many
# events one request may carry (each is checked before any is published).
BATCH_TYPE = "application/cloudevents-batch+json"
MAX_BATCH = 100


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def subscription_json(sub: Subscription) -> dict[str, Any]:
    return {
        "id": sub.id,
        "account": sub.account,
        "pattern": sub.pattern,
        "url": registry.redact(sub.url),
        "secret": redact_secret(sub.secret),
        "template": sub.template,
        "batch": sub.batch,
        "created_at": iso(sub.created_at),
    }


def delivery_json(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "event_id": d.event_id,
        "subscription_id": d.subscription_id,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at": iso(d.next_attempt_at) if d.status == "pending" else None,
        "last_error": d.last_error,
        "created_at": iso(d.created_at),
        "updated_at": iso(d.updated_at),
    }


def attempt_json(a: Attempt) -> dict[str, Any]:
    return {
        "n": a.n,
        "started_at": iso(a.started_at),
        "duration_ms": round(a.duration * 1000, 1),
        "outcome": a.outcome,
        "status_code": a.status_code,
        "detail": a.detail,
    }


def _principal(call: Call) -> Principal:
    assert call.principal is not None
    return call.principal


class Api:
    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        edj: EdjService,
        policy: AddressPolicy,
        mail: MailStore,
        inbound: Inbound,
        routes: RouteStore,
        outbound: Outbound | None = None,
        queue: QueueStore | None = None,
        clock: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._outbound = outbound
        self._queue = queue
        self._clock = clock
        self._routes = routes
        self._store = store
        self._publisher = publisher
        self._edj = edj
        self._policy = policy
        self._mail = mail
        self._inbound = inbound

    def routes(self) -> list[Route]:
        return [
            Route("GET", "/healthz", self.healthz, (200, 503), auth=False),
            Route("GET", "/metrics", self.metrics, (200,), auth=False),
            Route("POST", "/v1/events", self.publish, (202, 400, 401, 403, 409, 413, 415, 503)),
            Route("GET", "/v1/events/{id}", self.get_event, (200, 401, 404)),
            Route(
                "POST",
                "/v1/subscriptions",
                self.create_subscription,
                (201, 400, 401, 403, 413, 415),
            ),
            Route("GET", "/v1/subscriptions", self.list_subscriptions, (200, 401)),
            Route("GET", "/v1/subscriptions/{id}", self.get_subscription, (200, 401, 404)),
            Route("DELETE", "/v1/subscriptions/{id}", self.delete_subscription, (204, 401, 404)),
            Route("GET", "/v1/deliveries", self.list_deliveries, (200, 400, 401)),
            Route("POST", "/v1/deliveries/{id}/replay", self.replay, (202, 401, 404, 409)),
            Route("GET", "/v1/received/{id}", self.received, (200, 401, 404)),
            Route("GET", "/v1/received/{id}/raw", self.received_raw, (200, 401, 404)),
            Route("POST", "/v1/routes", self.create_route, (201, 400, 401, 403, 409, 413, 415)),
            Route("GET", "/v1/routes", self.list_routes, (200, 401)),
            Route("DELETE", "/v1/routes/{id}", self.delete_route, (204, 401, 404)),
            Route("POST", "/v1/messages", self.send, SEND_STATUSES),
            Route("POST", "/v1/messages/raw", self.send_raw, SEND_STATUSES),
            Route("GET", "/v1/messages/{id}", self.get_message, (200, 401, 404)),
        ]

    # --- handlers ---

    async def metrics(self, call: Call) -> Response:
        """Prometheus text format; no secrets in it, so no key (as exporters are)."""
        await self._metrics.refresh()
        return Response(200, raw=self._metrics.render(), headers={"content-type": CONTENT_TYPE})

    async def healthz(self, call: Call) -> Response:
        try:
            await self._store.list_accounts()
        except Exception:
            return Response(503, {"status": "unavailable", "store": "error"})
        return Response(200, {"status": "ok"})

    async def _account_for(self, principal: Principal, requested: Any) -> str | None:
        """The account a request acts for: an account key's own; an admin names one (or none)."""
        if requested is not None:
            try:
                validate_account_name(requested)
            except EventError as e:
                raise bad_request("account", e.message)
        if not principal.is_admin:
            if requested is not None and requested != principal.account:
                raise ApiError(
                    403, "forbidden", "an account key acts only for its own account", "account"
                )
            return principal.account
        if requested is not None and await self._store.account_by_name(requested) is None:
            raise bad_request("account", f"no account named {requested!r}")
        return requested  # type: ignore[no-any-return]

    async def publish(self, call: Call) -> Response:
        principal = _principal(call)
        if call.media_type() == BATCH_TYPE:
            return await self._publish_batch(call, principal)
        body = call.json()
        if not isinstance(body, dict):
            raise bad_request("body", "must be a JSON object (a structured CloudEvent)")
        event = await self._event_in(principal, body)
        await self._publish_all([event])
        return Response(202, {"id": event.id})

    async def _publish_batch(self, call: Call, principal: Principal) -> Response:
        """CloudEvents' batched content mode (HTTP binding, section 3.3): a JSON array of
        structured events. All are checked before any is published; a field in error
        is named with its index (``[2].type``)."""
        body = call.json((BATCH_TYPE,))
        if not isinstance(body, list) or not body:
            raise bad_request("body", "must be a non-empty JSON array of structured CloudEvents")
        if len(body) > MAX_BATCH:
            raise bad_request("body", f"at most {MAX_BATCH} events a request")
        events = []
        for n, item in enumerate(body):
            where = f"[{n}]"
            if not isinstance(item, dict):
                raise bad_request(where, "must be a JSON object (a structured CloudEvent)")
            try:
                events.append(await self._event_in(principal, item))
            except ApiError as e:
                e.field = f"{where}.{e.field}" if e.field else where
                raise
        await self._publish_all(events, batch=True)
        return Response(202, {"ids": [event.id for event in events]})

    async def _event_in(self, principal: Principal, body: dict[str, Any]) -> Event:
        """One structured event from a request, checked for this principal."""
        account = await self._account_for(principal, body.get("account"))
        if account is not None:
            body = {**body, "account": account}
        try:
            event = event_from_dict(body, default_source=f"/gehirn-ts/api/{account or 'admin'}")
        except EventError as e:
            raise bad_request(e.field, e.message)
        if event.type.startswith(RESERVED_PREFIXES):
            raise bad_request("type", "mail.* and edj.* events are published by gehirn-ts only")
        if account is None and not principal.is_admin:
            raise ApiError(403, "forbidden", "only the admin key publishes broadcasts", "account")
        return event

    async def _publish_all(self, events: list[Event], batch: bool = False) -> None:
        """Publish together, all durable before this returns; the first id taken by
        another event is answered with 409 (the others are published)."""
        try:
            conflicts = await self._publisher.publish_many(events)
        except BusUnavailable as e:
            raise ApiError(
                503,
                "unavailable",
                f"the event bus is unavailable: {e}",
                headers={"Retry-After": "5"},
            )
        for n, conflict in enumerate(conflicts):
            if conflict is not None:
                where = f"[{n}]." if batch else ""
                raise ApiError(409, "conflict", conflict.message, where + conflict.field)

    async def get_event(self, call: Call) -> Response:
        principal = _principal(call)
        try:
            event = await self._store.get_event(call.params["id"], principal.account_id)
        except NotFound:
            raise ApiError(404, "not_found", "no such event", "id")
        deliveries = await self._store.deliveries_of_event(event.id)
        return Response(
            200,
            {
                "event": event.to_dict(),
                "deliveries": [
                    {**delivery_json(d), "attempt_log": [attempt_json(a) for a in attempts]}
                    for d, attempts in deliveries
                ],
            },
        )

    async def create_subscription(self, call: Call) -> Response:
        principal = _principal(call)
        body = call.json_object(
            ("pattern", "url", "secret", "account", "template", "batch"), ("pattern", "url")
        )
        account = await self._account_for(principal, body.get("account"))
        if account is None:
            raise bad_request("account", "required with the admin key")
        try:
            pattern = validate_pattern(body["pattern"])
        except PatternError as e:
            raise bad_request("pattern", str(e))
        try:
            registry.check(body["url"], body.get("secret"), self._policy)
        except registry.DestinationError as e:
            raise bad_request(e.field, e.message)
        template = body.get("template")
        if template is not None:
            try:
                check_template(template)
            except TemplateError as e:
                raise bad_request("template", str(e))
        try:
            batch = registry.check_batch(body.get("batch", 1), body["url"])
        except registry.DestinationError as e:
            raise bad_request(e.field, e.message)
        acct = await self._store.account_by_name(account)
        assert acct is not None
        sub = await self._store.create_subscription(
            acct.id, pattern, body["url"], body.get("secret"), template, batch
        )
        return Response(201, subscription_json(sub), {"Location": f"/v1/subscriptions/{sub.id}"})

    async def list_subscriptions(self, call: Call) -> Response:
        subs = await self._store.list_subscriptions(_principal(call).account_id)
        return Response(200, {"subscriptions": [subscription_json(s) for s in subs]})

    async def _own_subscription(self, call: Call) -> Subscription:
        principal = _principal(call)
        try:
            sub = await self._store.get_subscription(call.params["id"])
        except NotFound:
            sub = None
        if (
            sub is None
            or sub.deleted_at is not None
            or (not principal.is_admin and sub.account_id != principal.account_id)
        ):
            raise ApiError(404, "not_found", "no such subscription", "id")
        return sub

    async def get_subscription(self, call: Call) -> Response:
        return Response(200, subscription_json(await self._own_subscription(call)))

    async def delete_subscription(self, call: Call) -> Response:
        sub = await self._own_subscription(call)
        await self._store.delete_subscription(sub.id, _principal(call).account_id)
        return Response(204)

    async def list_deliveries(self, call: Call) -> Response:
        status = call.query("status")
        if status is not None and status not in DELIVERY_STATUSES:
            raise bad_request("status", f"must be one of {', '.join(DELIVERY_STATUSES)}")
        raw_limit = call.query("limit") or "100"
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIST:
            raise bad_request("limit", f"must be a whole number from 1 to {MAX_LIST}")
        deliveries = await self._store.list_deliveries(
            _principal(call).account_id, status, int(raw_limit)
        )
        return Response(200, {"deliveries": [delivery_json(d) for d in deliveries]})

    async def replay(self, call: Call) -> Response:
        try:
            delivery = await self._edj.replay(call.params["id"], _principal(call).account_id)
        except NotFound:
            raise ApiError(404, "not_found", "no such delivery", "id")
        except Conflict as e:
            raise ApiError(409, "conflict", e.message, e.field)
        return Response(202, delivery_json(delivery))

    async def _received(self, call: Call) -> Received:
        try:
            return await self._mail.get_received(call.params["id"], _principal(call).account_id)
        except NotFound:
            raise ApiError(404, "not_found", "no such received message", "id")

    async def received(self, call: Call) -> Response:
        item = await self._received(call)
        return Response(
            200,
            {
                "id": item.id,
                "account": item.account,
                "sender": item.sender,
                "recipients": item.recipients,
                "size": item.size,
                "received_at": iso(item.received_at),
                **item.meta,
            },
        )

    async def received_raw(self, call: Call) -> Response:
        item = await self._received(call)
        path = self._inbound.object_path(item.object)
        data = await deferToThread(path.read_bytes)
        # Our Authentication-Results field on top (kept with the index row; objects
        # stored before that have it in the file).
        field = item.meta.get("authentication_results", "")
        return Response(200, raw=field.encode() + data, headers={"content-type": "message/rfc822"})

    async def create_route(self, call: Call) -> Response:
        principal = _principal(call)
        body = call.json_object(("match", "action", "forward_to", "account"), ("match",))
        account = await self._account_for(principal, body.get("account"))
        if account is None:
            raise bad_request("account", "required with the admin key")
        match = _route_match(body["match"])
        action = body.get("action", "store")
        if action not in ROUTE_ACTIONS:
            raise bad_request("action", f"must be one of {', '.join(ROUTE_ACTIONS)}")
        forward_to = body.get("forward_to", [])
        if action == "forward":
            if not isinstance(forward_to, list) or not forward_to or len(forward_to) > 50:
                raise bad_request("forward_to", "a forward route needs 1 to 50 addresses")
            forward_to = [_address(a, "forward_to") for a in forward_to]
        elif forward_to:
            raise bad_request("forward_to", "only a forward route has addresses")
        acct = await self._store.account_by_name(account)
        assert acct is not None
        try:
            route = await self._routes.create(acct.id, match, action, forward_to)
        except Conflict as e:
            status = 409 if "exists" in e.message else 403
            raise ApiError(status, "conflict" if status == 409 else "forbidden", e.message, e.field)
        return Response(201, route_json(route), {"Location": f"/v1/routes/{route.id}"})

    async def list_routes(self, call: Call) -> Response:
        routes = await self._routes.list_routes(_principal(call).account_id)
        return Response(200, {"routes": [route_json(r) for r in routes]})

    async def delete_route(self, call: Call) -> Response:
        try:
            await self._routes.delete(call.params["id"], _principal(call).account_id)
        except NotFound:
            raise ApiError(404, "not_found", "no such route", "id")
        return Response(204)

    # --- sending mail ---

    async def _sender_account(self, call: Call, address: str, field: str) -> int:
        """The account sending: an account key's, whose domain the sender's must be; the
        admin key sends for the account that owns the sender's domain."""
        principal = _principal(call)
        domain = address.rpartition("@")[2].lower()
        owner = await self._mail.domain_owner(domain)
        if principal.is_admin or principal.account_id is None:
            account_id = await self._mail.account_id(owner) if owner else None
            if account_id is None:
                raise ApiError(403, "forbidden", f"the domain {domain} is not served here", field)
            return account_id
        if owner != principal.account:
            raise ApiError(
                403,
                "forbidden",
                f"the domain {domain} is not one of account {principal.account}'s domains",
                field,
            )
        return principal.account_id

    def _idempotency(self, call: Call) -> str | None:
        key = call.request.getHeader("idempotency-key")
        if key is not None and not _IDEMPOTENCY_KEY.match(key):
            raise bad_request("Idempotency-Key", "1 to 255 printable ASCII characters")
        return key

    async def _queue_message(self, call: Call, request: dict[str, Any], **kw: Any) -> Response:
        assert self._outbound is not None
        key = self._idempotency(call)
        # What a repeat with the same Idempotency-Key is compared by (only then needed).
        digest = (
            hashlib.sha256(
                (call.request.path.decode() + json.dumps(request, sort_keys=True)).encode()
            ).hexdigest()
            if key is not None
            else None
        )
        try:
            mid, _ = await self._outbound.submit(idempotency_key=key, request_hash=digest, **kw)
        except Conflict as e:
            raise ApiError(409, "conflict", e.message, e.field)
        return Response(202, {"id": mid}, {"Location": f"/v1/messages/{mid}"})

    async def send(self, call: Call) -> Response:
        body = call.json()
        if not isinstance(body, dict):
            raise bad_request("body", "must be a JSON object")
        try:
            req = parse_send(body)
        except FieldError as e:
            raise bad_request(e.field, e.message)
        account_id = await self._sender_account(call, req.sender.addr_spec, "from")
        qid = new_queue_id()
        data = build(
            req,
            message_id=message_id_header(qid, self._outbound.hostname if self._outbound else ""),
            now=self._clock.seconds(),
        )
        return await self._queue_message(
            call,
            body,
            sender=req.sender.addr_spec,
            recipients=[NewRecipient(a, req.dsn.notify) for a in req.recipients],
            account_id=account_id,
            origin="api",
            data=data,
            queue_id=qid,
            fresh=True,
            ret=req.dsn.ret,
            envid=req.dsn.envid,
            tags=req.tags,
            metadata=req.metadata,
        )

    async def send_raw(self, call: Call) -> Response:
        body = call.json_object(RAW_FIELDS, ("from", "to"))
        try:
            sender = envelope_address(body["from"], "from")
            to = body["to"] if isinstance(body["to"], list) else [body["to"]]
            if not to or len(to) > 1000:
                raise FieldError("to", "1 to 1000 recipient addresses")
            rcpts = list(dict.fromkeys(envelope_address(a, f"to[{i}]") for i, a in enumerate(to)))
            dsn = parse_dsn(body.get("dsn"))
            tags, metadata = parse_tags_metadata(body)
        except FieldError as e:
            raise bad_request(e.field, e.message)
        if ("message" in body) == ("message_base64" in body):
            raise bad_request("message", "give message (text) or message_base64, not both")
        if "message" in body:
            if not isinstance(body["message"], str):
                raise bad_request("message", "must be a string (the RFC 5322 message)")
            data = body["message"].encode()
        else:
            try:
                data = base64.b64decode(body["message_base64"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise bad_request("message_base64", "must be base64")
        data = _crlf(data)
        if b"\r\n\r\n" not in data and not data.endswith(b"\r\n"):
            data += b"\r\n"
        head = Head(data)
        from_header = head.addresses("From")
        if len(from_header) != 1:
            raise bad_request("message", "needs exactly one address in its From header field")
        account_id = await self._sender_account(call, sender, "from")
        await self._sender_account(call, from_header[0], "message")
        qid = new_queue_id()
        # Like Postfix's cleanup for local submissions: Date and Message-ID when missing.
        extra = b""
        if head.value("Date") is None:
            extra += f"Date: {rfc5322_date(self._clock.seconds())}\r\n".encode()
        if head.value("Message-ID") is None:
            assert self._outbound is not None
            extra += f"Message-ID: {message_id_header(qid, self._outbound.hostname)}\r\n".encode()
        data = extra + data
        return await self._queue_message(
            call,
            body,
            sender=sender,
            recipients=[NewRecipient(a, dsn.notify) for a in rcpts],
            account_id=account_id,
            origin="api",
            data=data,
            queue_id=qid,
            fresh=True,
            body="8BITMIME" if any(b > 127 for b in data) else None,
            ret=dsn.ret,
            envid=dsn.envid,
            tags=tags,
            metadata=metadata,
        )

    async def get_message(self, call: Call) -> Response:
        assert self._queue is not None
        try:
            msg, rcpts, attempts = await self._queue.get(
                call.params["id"], _principal(call).account_id
            )
        except NotFound:
            raise ApiError(404, "not_found", "no such message", "id")
        return Response(
            200,
            {
                "id": msg.id,
                "account": msg.account,
                "origin": msg.origin,
                "from": msg.sender,
                "subject": msg.subject,
                "message_id": msg.header_message_id,
                "size": msg.size,
                "queued_at": iso(msg.created_at),
                "held": msg.held,
                "tags": msg.tags,
                "metadata": msg.metadata,
                "recipients": [
                    recipient_json(r, [a for a in attempts if a.n == r.n]) for r in rcpts
                ],
            },
        )


def recipient_json(r: RecipientState, attempts: list[AttemptRecord]) -> dict[str, Any]:
    return {
        "address": r.address,
        "status": r.status,
        "attempts": r.attempts,
        "next_attempt_at": iso(r.next_attempt_at) if r.status == "queued" else None,
        "reply": r.reply,
        "status_code": r.smtp_status,
        "remote_mta": r.remote_mta,
        "tls": r.tls,
        "updated_at": iso(r.updated_at),
        "attempt_log": [
            {
                "started_at": iso(a.started_at),
                "duration_ms": round(a.duration * 1000, 1),
                "outcome": a.outcome,
                "reply": a.reply,
                "remote_mta": a.remote_mta,
                "tls": a.tls,
            }
            for a in attempts
        ],
    }


def _crlf(data: bytes) -> bytes:
    """Line ends as CRLF (RFC 5322 section 2.1), whatever the client sent."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def route_json(route: MailRoute) -> dict[str, Any]:
    return {
        "id": route.id,
        "account": route.account,
        "match": route.match,
        "action": route.action,
        "forward_to": route.forward_to,
        "created_at": iso(route.created_at),
    }


def _address(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) > 254:
        raise bad_request(field, "must be an e-mail address")
    try:
        mailbox, rest = parse_path(f"<{value}>".encode(), kind="recipient")
    except SmtpError:
        raise bad_request(field, f"{value!r} is not an e-mail address")
    if mailbox is None or rest or mailbox.is_routed:
        raise bad_request(field, f"{value!r} is not an e-mail address")
    return str(mailbox)


def _route_match(value: Any) -> str:
    """ "user@domain" or "@domain" (every address of the domain)."""
    if isinstance(value, str) and value.startswith("@"):
        return "@" + _address("postmaster" + value, "match").split("@", 1)[1]
    return _address(value, "match")


def make_site(api: Api, store: Store, max_body: int) -> Site:
    root = JsonApi(api.routes(), store.authenticate)
    site = LoggingSite(root, requestFactory=request_factory(max_body))
    site.displayTracebacks = False
    return site
