"""The DNS resolver that pyspf and dkimpy use (blocking; called in threads only).

Configurable (``[dns]``) so that tests, and operators with a local validating
resolver, choose the server; empty ``nameservers`` means the system's resolv.conf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dns.resolver


def make_resolver(nameservers: Sequence[str], port: int, timeout: float) -> dns.resolver.Resolver:
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = list(nameservers)
        resolver.port = port
    else:
        resolver = dns.resolver.Resolver()
    resolver.lifetime = timeout
    resolver.timeout = timeout
    # Answers are kept for their TTL (as a local caching resolver would): a busy MX asks
    # for the same SPF and DKIM records again and again.
    resolver.cache = dns.resolver.LRUCache(50_000)
    return resolver


def make_async_resolver(nameservers: Sequence[str], port: int, timeout: float, reactor: Any) -> Any:
    """The twisted.names resolver for MX and address lookups (on the reactor)."""
    from twisted.names import client

    servers = [(ns, port) for ns in nameservers] or _system_nameservers()
    # Given servers, not the resolv.conf path: twisted.names would re-read the file on
    # a timer of its own; the system's list is read once, at start.
    return client.Resolver(servers=servers, timeout=(timeout,), reactor=reactor)


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
