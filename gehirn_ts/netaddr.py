"""IP addresses and networks, as the relay policy and the destination guard read them."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@lru_cache(maxsize=1024)
def parse_ip(host: str) -> IPAddress | None:
    """An address (a zone suffix dropped, an IPv4-mapped IPv6 address as IPv4), or None."""
    # Kept: the relay policy asks about the same client at MAIL and at every RCPT, and
    # the ipaddress module parses in Python. The answers are immutable.
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Networks:
    def __init__(self, networks: Sequence[str]) -> None:
        self._nets = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._answers: dict[str | IPAddress, bool] = {}

    def __contains__(self, host: str | IPAddress) -> bool:
        known = self._answers.get(host)
        if known is not None:
            return known
        ip = parse_ip(host) if isinstance(host, str) else host
        inside = ip is not None and any(ip.version == n.version and ip in n for n in self._nets)
        if len(self._answers) >= 1024:
            self._answers.clear()
        self._answers[host] = inside
        return inside
