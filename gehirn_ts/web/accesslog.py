"""The HTTP API's access log: twisted.web's combined-format line, through gehirn_ts.logs.

twisted.web's Site writes each request's line to the legacy log (``log.msg``), which
bridges it to twisted.logger as text without fields, after escaping every field with
``repr``: about 80 us a request, a twentieth of publishing an event. Here the same
line is written through ``gehirn_ts.logs.Logger`` with its parts as fields (``ip``,
``method``, ``uri``, ``status``, ``length``...), so the JSON observer ships them as
such; the escaping takes a plain field as it is and gives any other the escape
twisted.web gives it (property-tested against it).
"""

from __future__ import annotations

import re
import time

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.http import Request, datetimeToLogString
from twisted.web.server import Site

from gehirn_ts.logs import Logger

log = Logger()

# Printable ASCII without the characters the escape changes.
_PLAIN = re.compile(rb"[\x20-\x21\x23-\x5b\x5d-\x7e]*")
_LINE = '"{ip}" - - {when} "{method} {uri} {protocol}" {status} {length} "{referrer}" "{agent}"'


def escape(value: bytes) -> str:
    """A field as twisted.web's access log writes it: like ``repr``, always as if
    between double quotes."""
    if _PLAIN.fullmatch(value):
        return value.decode("ascii")
    text = repr(value)[1:]
    if text.startswith("'"):
        return text[1:-1].replace('"', '\\"').replace("\\'", "'")
    return text[1:-1]


class LoggingSite(Site):
    """A Site whose access log goes through gehirn_ts.logs with fields."""

    _when: tuple[int, str] = (-1, "")

    def _timestamp(self) -> str:
        # The combined format's time, to the second: made once a second.
        now = int(time.time())
        if self._when[0] != now:
            self._when = (now, datetimeToLogString(now))
        return self._when[1]

    def log(self, request: Request) -> None:
        client = request.getClientAddress()
        ip = client.host if isinstance(client, IPv4Address | IPv6Address) else "-"
        log.info(
            _LINE,
            ip=escape(ip.encode()),
            when=self._timestamp(),
            method=escape(request.method),
            uri=escape(request.uri),
            protocol=escape(request.clientproto),
            status=request.code,
            length=request.sentLength or "-",
            referrer=escape(request.getHeader(b"referer") or b"-"),
            agent=escape(request.getHeader(b"user-agent") or b"-"),
        )
