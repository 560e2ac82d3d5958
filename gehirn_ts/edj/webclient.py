"""Destination POSTs on twisted.web's Agent, without treq's per-request layers.

treq's ``HTTPClient.request`` parses the URL with hyperlink and IDNA-encodes its host,
and wraps the agent in cookie, redirect and gzip agents, on every request: in the event
benchmark that was 13% of the reactor thread (docs/performance.md). A delivery needs
none of it: no cookies, no redirects (a 3xx is an answer, DESIGN.md), no compressed
answers (only the first 4 KiB are kept, for the attempt log). This client keeps treq's
call shape (``post(url, data=, headers=, auth=, timeout=)``) so the destinations take
either; treq stays in the stack as the tests' client (docs/decisions.md).
"""

from __future__ import annotations

import base64
from functools import lru_cache
from typing import Any

from hyperlink import EncodedURL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer


@lru_cache(maxsize=4096)
def request_target(url: str) -> bytes:
    """The URL as the request line wants it: an IDN host in its ASCII form (RFC 5891),
    the rest percent-encoded. Made once per destination URL."""
    parsed = EncodedURL.from_text(url)
    if ":" in parsed.host:
        # An IPv6 literal (RFC 3986 section 3.2.2) is no name for IDNA, which refuses
        # its colons: the rest is encoded without it.
        return parsed.replace(host="").to_uri().replace(host=parsed.host).to_text().encode()
    return parsed.to_uri().to_text().encode("ascii")


@lru_cache(maxsize=4096)
def host_header(url: str) -> bytes:
    """The Host field for a request to ``url`` (RFC 9110 section 7.2), as twisted.web's
    Agent writes it: the port only when it is not the scheme's, an IPv6 address in
    brackets. Made once per destination URL; the Agent makes it for every request."""
    uri = URI.fromBytes(request_target(url))
    host: bytes = b"[" + uri.host + b"]" if b":" in uri.host else uri.host
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, uri.port)


def basic_auth(user: str, password: str) -> bytes:
    """The Authorization value of HTTP Basic (RFC 7617 section 2; UTF-8, section 2.1)."""
    token = base64.b64encode(f"{user}:{password}".encode())
    return b"Basic " + token


@implementer(IBodyProducer)
class _Body:
    """A body already in memory, written at once (no cooperator task per request)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class WebClient:
    def __init__(self, agent: IAgent, clock: IReactorTime) -> None:
        self._agent = agent
        self._clock = clock

    def post(
        self,
        url: str,
        *,
        data: bytes,
        headers: dict[str, list[str]],
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Deferred[IResponse]:
        """POST ``data``; the Deferred is cancelled after ``timeout`` seconds."""
        if allow_redirects:
            raise ValueError("redirects are not followed")
        raw = Headers(
            {k.encode("ascii"): [v.encode("utf-8") for v in vs] for k, vs in headers.items()}
        )
        raw.setRawHeaders(b"host", [host_header(url)])
        if auth is not None:
            raw.setRawHeaders(b"authorization", [basic_auth(*auth)])
        d = self._agent.request(b"POST", request_target(url), raw, _Body(data))
        if timeout:
            call = self._clock.callLater(timeout, d.cancel)

            def done(result: Any) -> Any:
                if call.active():
                    call.cancel()
                return result

            d.addBoth(done)
        return d
