"""Short replies sent at once, instead of at the reactor's next turn.

Twisted's TCP transport never writes in ``write()``: it buffers the bytes, asks epoll to
watch the socket for room (a system call), writes when the reactor's next turn finds
room, and asks epoll to stop watching (another). For an SMTP reply, which always fits
the socket's empty buffer, that is two ``epoll_ctl`` calls and a reactor turn per reply;
an SMTP transaction has seven replies (docs/performance.md). ``write_now`` sends on a
plain TCP connection whose buffer is empty, and hands whatever the socket did not take
(and everything else: TLS, a full buffer, a closing connection) to ``transport.write``,
so the order of the bytes never changes.

This reads four attributes of ``twisted.internet.abstract.FileDescriptor`` that are not
documented (``dataBuffer``, ``offset``, ``_tempDataLen``, ``_writeDisconnected``);
tests/unit/test_sendnow.py checks them against a real connection, and anything that
does not look like that transport gets ``write``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def _idle(transport: Any) -> bool:
    """A plain (not TLS) TCP connection, open, with no byte waiting to be written."""
    try:
        return bool(
            isinstance(transport, tcp.Connection)
            and not transport.TLS
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and transport._tempDataLen == 0
            and len(transport.dataBuffer) == transport.offset
        )
    except AttributeError:  # not the transport this was written for
        return False


def no_delay(transport: Any) -> None:
    """TCP_NODELAY, where the transport has it (TLS wrappers pass it on; test transports
    have none): writes that are whole messages gain nothing from Nagle's wait."""
    set_nodelay = getattr(transport, "setTcpNoDelay", None)
    if set_nodelay is not None:
        set_nodelay(True)


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once where that is safe."""
    if data and _idle(transport):
        sent = transport.writeSomeData(data)
        # An int is what the socket took (0 when it was full); anything else is the
        # connection's loss, which the reactor reports when ``write`` tries again.
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
