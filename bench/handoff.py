"""Thread hand-off cost: CPU and wall time per round trip (reactor -> thread -> reactor)
through Twisted's ThreadPool (deferToThreadPool) and through gehirn_ts.threads.Workers,
each measured twice in turns in one process. Not part of make bench; see
docs/decisions.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from gehirn_ts.threads import Workers

ROUNDS = 20_000


def job(x: int) -> int:
    return x


@defer.inlineCallbacks
def main() -> Any:
    pool = ThreadPool(1, 1)
    pool.start()
    workers = Workers(reactor, "bench")
    ways = {
        "Twisted ThreadPool": lambda: deferToThreadPool(reactor, pool, job, 1),
        "gehirn_ts Workers": lambda: workers.run(job, 1),
    }
    for _ in range(2):
        for name, call in ways.items():
            cpu, wall = time.process_time(), time.monotonic()
            for _ in range(ROUNDS):
                yield call()
            cpu_us = (time.process_time() - cpu) / ROUNDS * 1e6
            wall_us = (time.monotonic() - wall) / ROUNDS * 1e6
            print(f"{name:20} {cpu_us:6.1f} us CPU {wall_us:6.1f} us wall per round trip")
    pool.stop()
    workers.stop()
    reactor.stop()


if __name__ == "__main__":
    reactor.callWhenRunning(main)
    reactor.run()
