"""The HTTP connection pool for destinations, with HTTP/1.0 persistence done right.

twisted.web's client keeps a connection for reuse unless the response says
``Connection: close``, whatever the response's HTTP version. An HTTP/1.0 server closes
the connection after its response unless it says ``keep-alive`` (RFC 9112 section
9.3, "HTTP/1.0 keep-alive"); reusing such a connection sends the next request into a
socket the server is closing, and the request fails with "connection lost before a
response". Webhook receivers built on Python's http.server answer HTTP/1.0. This pool
does not keep those connections. It reads the response's version from the protocol's
parser (a private attribute of twisted.web's HTTP11ClientProtocol); without one, it
behaves as the stock pool.
"""

from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool


def _closes_after_response(connection: Any) -> bool:
    parser = getattr(connection, "_parser", None)
    response = getattr(parser, "response", None)
    version = getattr(response, "version", None)
    if parser is None or version is None or tuple(version[1:]) >= (1, 1):
        return False
    options = b",".join(parser.connHeaders.getRawHeaders(b"connection", ())).lower()
    return b"keep-alive" not in options


class DestinationPool(HTTPConnectionPool):
    def _putConnection(self, key: Any, connection: Any) -> None:
        if _closes_after_response(connection):
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)
