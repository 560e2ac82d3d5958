"""An SMTP worker process (``[smtp] workers``), started by the main process.

    python -m gehirn_ts.smtpworker --index N [--config PATH] --listener NAME:FD:FAMILY ...

Its listeners are sockets the main process bound and handed down; it reports to the
main process on stdout, logs to stderr (one JSON object a line), and ends when its
stdin closes (the main process ended) or at SIGTERM (gehirn_ts/mta/workers.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import globalLogBeginner
from zope.interface import implementer

from gehirn_ts import gc_tuning
from gehirn_ts.config import ConfigError, load
from gehirn_ts.launcher import one_malloc_arena
from gehirn_ts.logs import Logger, WorkerLineObserver
from gehirn_ts.mta.anvil import LINE, SharedLimits

log = Logger()


def _listener(text: str) -> tuple[str, int, int]:
    name, fd, family = text.split(":")
    return name, int(fd), int(family)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gehirn_ts.smtpworker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--listener", type=_listener, action="append", default=[])
    return parser.parse_args(argv)


@implementer(IReadDescriptor)
class _MainProcess:
    """The worker's stdin: the per-IP limits in force over all workers, a line each
    (mta/anvil.py); its end means the main process ended."""

    def __init__(self, reactor: Any, shared: SharedLimits) -> None:
        self._reactor = reactor
        self._shared = shared
        self._partial = b""
        os.set_blocking(0, False)

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "main-process"

    def doRead(self) -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.connectionLost(None)
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if not self._shared.notice(line):
                log.warn("the main process wrote a line that is no notice")
        if len(self._partial) > LINE:
            self._partial = b""

    def connectionLost(self, reason: Any) -> None:
        self._reactor.removeReader(self)
        if self._reactor.running:
            self._reactor.stop()


def main(argv: Sequence[str] | None = None) -> int:
    one_malloc_arena()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"gehirn-ts SMTP worker {args.index}: {e}", file=sys.stderr)
        return 2
    globalLogBeginner.beginLoggingTo([WorkerLineObserver(sys.stderr)], redirectStandardIO=False)
    from gehirn_ts import reactor as our_reactor

    our_reactor.install()
    from twisted.internet import reactor

    from gehirn_ts.tap import build_smtp_worker

    shared = SharedLimits(reactor.seconds)
    service = build_smtp_worker(config, reactor, args.index, args.listener, args.config, shared)
    reactor.addReader(_MainProcess(reactor, shared))
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(gc_tuning.tune)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
