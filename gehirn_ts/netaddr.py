"""IP addresses and networks, as the relay policy and the destination guard read them."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(host: str) -> IPAddress | None:
    """An address (a zone suffix dropped, an IPv4-mapped IPv6 address as IPv4), or None."""
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

    def __contains__(self, host: str | IPAddress) -> bool:
        ip = parse_ip(host) if isinstance(host, str) else host
        return ip is not None and any(ip.version == n.version and ip in n for n in self._nets)
