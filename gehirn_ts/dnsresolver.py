"""The DNS resolver that pyspf and dkimpy use (blocking; called in threads only).

Configurable (``[dns]``) so that tests, and operators with a local validating
resolver, choose the server; empty ``nameservers`` means the system's resolv.conf.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    return resolver
