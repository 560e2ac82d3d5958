"""HTTP webhooks: CloudEvents structured mode (or batched mode, for a subscription that
asks for batches), signed the Standard Webhooks way."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web.iweb import IResponse
from zope.interface import implementer

from gehirn_ts import __version__
from gehirn_ts.edj import signature
from gehirn_ts.edj.netguard import ForbiddenAddress
from gehirn_ts.edj.retry import parse_retry_after
from gehirn_ts.events import Event
from gehirn_ts.interfaces import Delivered, IDestination, PermFail, Result, TempFail
from gehirn_ts.redact import redact_url

CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
# CloudEvents' HTTP binding, "batched content mode": a JSON array of structured events.
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json; charset=utf-8"
# What is read of a receiver's answer, for the attempt log; the rest is discarded.
MAX_RESPONSE_READ = 4096
# 408 Request Timeout and 429 Too Many Requests are the 4xx worth retrying.
RETRYABLE_4XX = (408, 429)


def classify(status: int, retry_after: float | None) -> Result:
    """The outcome of an HTTP status code (DESIGN.md: 4xx other than 408/429 is permanent)."""
    if 200 <= status < 300:
        return Delivered(status_code=status)
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        return PermFail(f"HTTP {status}", status_code=status)
    return TempFail(f"HTTP {status}", retry_after=retry_after, status_code=status)


class _Reader(Protocol):
    """Reads the first bytes of a response body and drops the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += data[:room]

    def connectionLost(self, reason: Failure = webclient.ResponseDone) -> None:  # type: ignore[assignment]
        self.done.callback(self.data)


def read_some(response: IResponse, limit: int = MAX_RESPONSE_READ) -> Deferred[bytes]:
    reader = _Reader(limit)
    response.deliverBody(reader)
    return reader.done


@implementer(IDestination)
class WebhookDestination:
    kind = "webhook"

    def __init__(
        self,
        url: str,
        secret: str | None,
        *,
        http: Any,
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self.url = url
        # Credentials in the URL become HTTP Basic auth (RFC 7617); the request URL
        # itself carries none, so they never reach a log or an error message.
        parts = urlsplit(url)
        self._auth: tuple[str, str] | None = None
        if parts.username is not None:
            self._auth = (unquote(parts.username), unquote(parts.password or ""))
            host = parts.netloc.rsplit("@", 1)[1]
            parts = parts._replace(netloc=host)
        self._target = urlunsplit(parts)
        self._secret = secret
        self._http = http
        self._clock = clock
        self._timeout = timeout

    def redacted_url(self) -> str:
        return redact_url(self.url)

    def deliver(self, event: Event, rendered: bytes, delivery_id: str) -> Deferred[Result]:
        # webhook-id is the event id: the same on every retry and replay, so a receiver
        # can drop duplicates (Standard Webhooks, "webhook-id").
        return Deferred.fromCoroutine(self._post(event.id, rendered, CONTENT_TYPE))

    def deliver_batch(self, events: Sequence[Event], rendered: Sequence[bytes]) -> Deferred[Result]:
        """One request with every event, in CloudEvents' batched mode (a JSON array of
        the structured events); its result is each event's."""
        body = b"[" + b",".join(rendered) + b"]"
        return Deferred.fromCoroutine(self._post(batch_id(events), body, BATCH_CONTENT_TYPE))

    async def _post(self, msg_id: str, body: bytes, content_type: str) -> Result:
        now = self._clock.seconds()
        headers = signature.headers(self._secret, msg_id, int(now), body)
        headers["content-type"] = content_type
        reply = await post(
            self._http, self._clock, self._target, body, headers, self._auth, self._timeout
        )
        if isinstance(reply, Result):
            return reply
        return classify(reply.status, reply.retry_after)


def batch_id(events: Sequence[Event]) -> str:
    """A batch's webhook-id: the event's own id for a batch of one, else a digest of
    the events' ids, the same whenever the same events go together. A receiver drops
    duplicates by each event's ``id`` (docs/api.md)."""
    if len(events) == 1:
        return events[0].id
    digest = hashlib.sha256("\n".join(e.id for e in events).encode()).hexdigest()
    return f"batch_{digest[:32]}"


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes  # the first MAX_RESPONSE_READ bytes
    retry_after: float | None


async def post(
    http: Any,
    clock: IReactorTime,
    url: str,
    body: bytes,
    headers: dict[str, str],
    auth: tuple[str, str] | None,
    timeout: float,
) -> HttpReply | Result:
    """One POST; a transport failure is already a Result (TempFail or PermFail)."""
    headers = {"user-agent": f"gehirn-ts/{__version__}", **headers}
    try:
        response = await http.post(
            url,
            auth=auth,
            data=body,
            headers={k: [v] for k, v in headers.items()},
            timeout=timeout,
            allow_redirects=False,
        )
    except ForbiddenAddress as e:
        return PermFail(str(e))
    except (CancelledError, neterror.TimeoutError):
        return TempFail(f"no response within {timeout:g}s")
    except webclient.ResponseNeverReceived as e:
        # The client's timeout cancels the request, which surfaces as this error.
        if any(f.check(CancelledError, neterror.TimeoutError) for f in e.reasons):
            return TempFail(f"no response within {timeout:g}s")
        return TempFail("connection lost before a response")
    except neterror.DNSLookupError as e:
        return TempFail(f"DNS lookup failed: {e}")
    except (neterror.ConnectError, neterror.ConnectionLost, OSError) as e:
        return TempFail(f"connection failed: {type(e).__name__}")
    except Exception as e:
        # A TLS verification failure and the like: retry; the reason tells the user.
        return TempFail(f"request failed: {type(e).__name__}: {e}")
    retry_after = parse_retry_after(
        (response.headers.getRawHeaders(b"retry-after") or [None])[0], clock.seconds()
    )
    try:
        data = await read_some(response)
    except Exception:
        data = b""
    return HttpReply(response.code, data, retry_after)


async def post_form(
    http: Any,
    clock: IReactorTime,
    url: str,
    form: dict[str, str],
    auth: tuple[str, str] | None,
    timeout: float,
) -> HttpReply | Result:
    """A form POST (application/x-www-form-urlencoded), as Pushover and Twilio take."""
    return await post(
        http,
        clock,
        url,
        urlencode(form).encode(),
        {"content-type": "application/x-www-form-urlencoded"},
        auth,
        timeout,
    )
