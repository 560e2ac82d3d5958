"""Networks and parse_ip keep their answers; kept answers must be the same answers."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from gehirn_ts.netaddr import Networks, parse_ip

NETS = ["10.0.0.0/8", "192.0.2.128/25", "2001:db8::/32", "::1/128"]
_PARSED = [ipaddress.ip_network(n) for n in NETS]
ADDRESSES = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.sampled_from(["10.1.2.3", "192.0.2.200", "192.0.2.1", "::1", "fe80::1%eth0", "x", ""]),
    st.text(max_size=20),
)


def _expected(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in _PARSED)


@given(st.lists(ADDRESSES, max_size=20))
def test_membership_asked_again_gives_the_first_answer(hosts: list[str]) -> None:
    networks = Networks(NETS)
    for _ in range(2):
        for host in hosts:
            assert (host in networks) == _expected(host)
            ip = parse_ip(host)
            if ip is not None:
                assert (ip in networks) == _expected(host)


def test_the_kept_answers_are_bounded() -> None:
    networks = Networks(NETS)
    for n in range(3000):
        assert f"10.0.{n // 256 % 256}.{n % 256}" in networks
        assert f"11.0.{n // 256 % 256}.{n % 256}" not in networks
    assert len(networks._answers) <= 1024
