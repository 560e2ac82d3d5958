"""write_now against real TCP connections on loopback (the reactor's own transports)."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from gehirn_ts.sendnow import _idle, no_delay, write_now
from tests.support import inline, until


class _Server(Protocol):
    def connectionMade(self) -> None:
        self.factory.servers.append(self)  # type: ignore[attr-defined]


class _Client(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class WriteNowTests(TestCase):
    timeout = 30

    async def _pair(self) -> tuple[Any, _Client]:
        factory = Factory.forProtocol(_Server)
        factory.servers = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = _Client()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await connectProtocol(endpoint, client)
        self.addCleanup(client.transport.loseConnection)
        await until(lambda: factory.servers)  # type: ignore[attr-defined]
        server = factory.servers[0]  # type: ignore[attr-defined]
        self.addCleanup(server.transport.loseConnection)
        return server.transport, client

    @inline
    async def test_an_idle_connection_is_written_at_once(self) -> None:
        transport, client = await self._pair()
        assert _idle(transport)  # the attributes read are there, on the reactor's transport
        write_now(transport, b"250 2.0.0 OK\r\n")
        # Sent already: the reactor was never asked to watch for room to write.
        assert transport not in reactor.getWriters()
        await until(lambda: client.received == b"250 2.0.0 OK\r\n")

    @inline
    async def test_no_delay_sets_the_option_where_there_is_one(self) -> None:
        import socket

        transport, _client = await self._pair()
        sock = transport.getHandle()
        assert not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        no_delay(transport)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        no_delay(StringTransport())  # no such option: nothing happens
        no_delay(None)

    @inline
    async def test_bytes_already_waiting_keep_their_place(self) -> None:
        transport, client = await self._pair()
        transport.write(b"first ")
        assert not _idle(transport)
        write_now(transport, b"second")
        await until(lambda: client.received == b"first second")

    @inline
    async def test_what_the_socket_does_not_take_is_buffered_in_order(self) -> None:
        transport, client = await self._pair()
        client.transport.pauseProducing()  # the peer stops reading: the socket fills
        big = bytes(range(256)) * 40_000  # 10 MB: more than loopback's buffers hold
        write_now(transport, big)
        assert not _idle(transport)  # the rest waits in Twisted's buffer
        write_now(transport, b"end")
        client.transport.resumeProducing()
        await until(lambda: len(client.received) == len(big) + 3, timeout=20)
        assert client.received == big + b"end"

    @inline
    async def test_a_closing_connection_and_other_transports_get_write(self) -> None:
        transport, _client = await self._pair()
        transport.loseConnection()
        assert not _idle(transport)
        write_now(transport, b"ignored")  # as transport.write: dropped once closing
        string = StringTransport()
        assert not _idle(string)
        write_now(string, b"250 OK\r\n")
        assert string.value() == b"250 OK\r\n"
        transport.TLS = True  # as startTLS sets it: bytes must go through TLS
        assert not _idle(transport)
