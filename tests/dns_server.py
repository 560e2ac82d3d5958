"""A DNS server for the tests (twisted.names), answering from a JSON zone file.

    python tests/dns_server.py PORT ZONE.json

The file maps names to record sets, e.g. {"example.org": {"TXT": ["v=spf1 -all"],
"A": ["192.0.2.1"], "MX": [[10, "mx.example.org"]]}, "www.example.org": {"CNAME":
["example.org"]}}. It is read again for every query, so a test changes the zone by
rewriting the file. A name that is absent is NXDOMAIN; a present name without the
asked type is an empty answer with the SOA of its zone (the name's last two labels).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.names import common, dns, error, server


class JsonZone(common.ResolverBase):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:
        zone = json.loads(self.path.read_text()) if self.path.exists() else {}
        key = name.decode().lower().rstrip(".")
        if key not in zone:
            return defer.fail(error.DomainError(name))
        records = zone[key]
        answers = []
        if "CNAME" in records and type != dns.CNAME:
            # An alias: the CNAME and the target's records, as a server that has both
            # answers (RFC 1034 section 4.3.2, step 3a).
            target = records["CNAME"][0]
            alias = dns.Record_CNAME(target.encode(), ttl=60)
            answers.append(dns.RRHeader(name, dns.CNAME, dns.IN, 60, alias, auth=True))
            name, records = target.encode(), zone.get(target.lower(), {})
        for rtype, values in records.items():
            code = dns.REV_TYPES.get(rtype)
            if code is None or (type != dns.ALL_RECORDS and code != type):
                continue
            for value in values:
                if rtype == "TXT":
                    # Long strings are split into 255-octet chunks (RFC 7208 3.3).
                    data = value.encode()
                    payload = dns.Record_TXT(
                        *[data[i : i + 255] for i in range(0, len(data), 255)] or [b""], ttl=60
                    )
                elif rtype == "A":
                    payload = dns.Record_A(value, ttl=60)
                elif rtype == "AAAA":
                    payload = dns.Record_AAAA(value, ttl=60)
                elif rtype == "MX":
                    payload = dns.Record_MX(value[0], value[1].encode(), ttl=60)
                else:
                    continue
                answers.append(dns.RRHeader(name, code, dns.IN, 60, payload, auth=True))
        if answers:
            return defer.succeed((answers, [], []))
        # No record of the type: the zone's SOA goes in the authority section, as an
        # authoritative server's must (RFC 2308 section 3), so resolvers may keep the
        # empty answer for the SOA's MINIMUM.
        zone_name = b".".join(name.rstrip(b".").split(b".")[-2:])
        soa = dns.Record_SOA(
            mname=b"ns." + zone_name, rname=b"hostmaster." + zone_name, minimum=60, ttl=60
        )
        return defer.succeed(([], [dns.RRHeader(zone_name, dns.SOA, dns.IN, 60, soa)], []))


def main() -> None:
    port, zone = int(sys.argv[1]), Path(sys.argv[2])
    factory = server.DNSServerFactory(authorities=[JsonZone(zone)])
    factory.noisy = False
    protocol = dns.DNSDatagramProtocol(factory)
    protocol.noisy = False
    reactor.listenUDP(port, protocol, interface="127.0.0.1")
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
