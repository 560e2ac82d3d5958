"""Keep destinations off private addresses (SSRF protection).

A name is resolved first; only the addresses the policy allows are then handed to
HostnameEndpoint, so what was checked is what is connected to (no second lookup
that DNS rebinding could answer differently).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from gehirn_ts.netaddr import Networks, parse_ip
from gehirn_ts.sendnow import no_delay

Address = IPv4Address | IPv6Address


class ForbiddenAddress(Exception):
    """Every address of the destination is private, loopback, link-local or reserved."""

    def __init__(self, host: str, addresses: Sequence[str]) -> None:
        self.host = host
        self.addresses = list(addresses)
        shown = ", ".join(self.addresses) or "none"
        super().__init__(
            f"{host} resolves only to non-public addresses ({shown}); "
            "allow them in edj.allow_networks if this is intended"
        )


class AddressPolicy:
    """Public unicast addresses are allowed; others only inside ``allow_networks``."""

    def __init__(self, allow_networks: Sequence[str] = ()) -> None:
        self._allowed = Networks(allow_networks)

    def allows(self, host: str) -> bool:
        ip = parse_ip(host)
        if ip is None:
            return False
        if ip in self._allowed:
            return True
        return ip.is_global and not ip.is_multicast

    def check_literal(self, host: str) -> None:
        """Refuse a URL whose host is a literal address the policy forbids."""
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a name: checked at delivery time, after resolution
        if not self.allows(host):
            raise ForbiddenAddress(host, [host])


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self) -> None:
        self.addresses: list[Address] = []
        self.done: Deferred[list[Address]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class _FixedResolver:
    def __init__(self, addresses: Sequence[Address]) -> None:
        self._addresses = addresses

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self._addresses:
            resolutionReceiver.addressResolved(address)
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IReactorPluggableNameResolver)
class _PinnedReactor:
    """The reactor, but names resolve to the addresses already checked."""

    def __init__(self, reactor: Any, addresses: Sequence[Address]) -> None:
        self._reactor = reactor
        self.nameResolver = _FixedResolver(addresses)

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _literal(host: str, port: int) -> list[Address] | None:
    """An IP literal needs no lookup (and no trip to the resolver's thread)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 4:
        return [IPv4Address("TCP", host, port)]
    return [IPv6Address("TCP", host, port)]


@implementer(IStreamClientEndpoint)
class GuardedEndpoint:
    def __init__(
        self, reactor: Any, host: str, port: int, policy: AddressPolicy, timeout: float = 30
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._policy = policy
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        found = _literal(self._host, self._port)
        if found is None:
            collector = _Collector()
            self._reactor.nameResolver.resolveHostName(collector, self._host, self._port)
            found = await collector.done
        allowed = [a for a in found if self._policy.allows(a.host)]
        if not allowed:
            if not found:
                from twisted.internet.error import DNSLookupError

                raise DNSLookupError(f"no address found for {self._host}")
            raise ForbiddenAddress(self._host, [a.host for a in found])
        endpoint = HostnameEndpoint(
            _PinnedReactor(self._reactor, allowed), self._host, self._port, self._timeout
        )
        protocol: IProtocol = await endpoint.connect(factory)
        # twisted.web writes a request's head and body in separate writes: with Nagle's
        # algorithm the body waits for the receiver's delayed ACK.
        no_delay(getattr(protocol, "transport", None))
        return protocol


@implementer(IAgentEndpointFactory)
class GuardedEndpointFactory:
    def __init__(
        self,
        reactor: Any,
        policy: AddressPolicy,
        tls_policy: IPolicyForHTTPS | None = None,
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._tls = tls_policy or BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        endpoint: IStreamClientEndpoint = GuardedEndpoint(
            self._reactor, host, uri.port, self._policy
        )
        if uri.scheme == b"https":
            creator: IOpenSSLClientConnectionCreator = self._tls.creatorForNetloc(
                uri.host, uri.port
            )
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint


def guarded_agent(reactor: Any, policy: AddressPolicy, pool: HTTPConnectionPool) -> IAgent:
    """An Agent that connects only to addresses ``policy`` allows."""
    agent: IAgent = Agent.usingEndpointFactory(
        reactor, GuardedEndpointFactory(reactor, policy), pool=pool
    )
    return agent
