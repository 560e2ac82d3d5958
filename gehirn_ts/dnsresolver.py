"""The daemon's DNS resolver: twisted.names, with answers kept for their TTL. MX and
address lookups ask it on the reactor; pyspf and dkimpy ask it from their threads
(`threaddns.py`).

Configurable (``[dns]``) so that tests, and operators with a local validating
resolver, choose the server; empty ``nameservers`` means the system's resolv.conf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.names.common import ResolverBase
from twisted.names.dns import SOA


def make_async_resolver(nameservers: Sequence[str], port: int, timeout: float, reactor: Any) -> Any:
    """The twisted.names resolver, with its cache."""
    from twisted.names import client

    servers = [(ns, port) for ns in nameservers] or _system_nameservers()
    # Given servers, not the resolv.conf path: twisted.names would re-read the file on
    # a timer of its own; the system's list is read once, at start.
    upstream = client.Resolver(servers=servers, timeout=(timeout,), reactor=reactor)
    return CachingResolver(upstream, reactor)


class CachingResolver(ResolverBase):
    """Answers kept for their smallest TTL, as a local caching resolver would: every
    delivery to a domain asked for its MX and addresses again (three queries per
    message to one destination), every received message for its sender's SPF. An
    empty answer (no record of the type, as for the AAAA of an IPv4-only MX host) is
    kept as RFC 2308 says, by its SOA; errors are not kept. No timers: an entry is
    checked when it is read, and a full cache drops its expired entries (or, if none,
    all)."""

    def __init__(self, upstream: Any, clock: Any, size: int = 10_000) -> None:
        super().__init__()
        self._upstream = upstream
        self._clock = clock
        self._size = size
        self._entries: dict[tuple[bytes, int, int], tuple[float, Any]] = {}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        key = (name.lower(), cls, type)
        now = self._clock.seconds()
        found = self._entries.get(key)
        if found is not None:
            if found[0] > now:
                return succeed(found[1])
            del self._entries[key]
        d: Deferred[Any] = self._upstream._lookup(name, cls, type, timeout)
        d.addCallback(self._keep, key, now)
        return d

    def _keep(self, result: Any, key: tuple[bytes, int, int], now: float) -> Any:
        if result[0]:
            ttl = min(r.ttl for r in [*result[0], *result[1], *result[2]])
        else:
            ttl = negative_ttl(result[1])
        if ttl > 0:
            if len(self._entries) >= self._size:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if len(self._entries) >= self._size:
                    self._entries.clear()
            self._entries[key] = (now + ttl, result)
        return result


def _system_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    out.append((words[1], 53))
    except OSError:
        pass
    return out or [("127.0.0.1", 53)]


def negative_ttl(authority: Sequence[Any]) -> int:
    """How long an answer without records may be kept (RFC 2308 section 5): the smaller
    of the SOA record's TTL and its MINIMUM field; 0, never, without an SOA."""
    for rr in authority:
        if rr.type == SOA:
            return int(min(rr.ttl, rr.payload.minimum))
    return 0
