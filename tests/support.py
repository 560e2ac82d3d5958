"""Helpers shared by the tests."""

from __future__ import annotations

import functools
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater


def inline(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Deferred[Any]]:
    """Let a trial test be an ``async def``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(fn(*args, **kwargs))

    return wrapper


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def until(
    predicate: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, step: float = 0.02
) -> Any:
    """Wait (on the reactor) until ``predicate`` is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Deferred) or hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await sleep(step)


# Below Linux's ephemeral range (32768-60999 by default): a port the kernel hands out
# for bind(0) is also one it may give an outgoing connection before the test's server
# binds it (a clean-clone run once failed so: "Couldn't listen on 127.0.0.1:44343").
# Ports are handed out in turn from a random start, so that two calls made before
# either port is bound never return the same one (random picks did, once in a run).
_PORTS = range(20_000, 32_000)
_next_port = random.randrange(len(_PORTS))


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc), in pid order."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def free_port() -> int:
    """A loopback TCP port nothing listens on, outside the ephemeral range, not handed
    out before by this process."""
    global _next_port
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port % len(_PORTS)]
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def recording_workers(testcase: Any, name: str = "io") -> tuple[Any, list[tuple[str, str]]]:
    """Workers (gehirn_ts.threads) that record each job as it runs: (the function's
    name, the thread's name). Stopped at the test's cleanup."""
    import threading

    from gehirn_ts.threads import Workers

    workers = Workers(reactor, name)
    testcase.addCleanup(workers.stop)
    jobs: list[tuple[str, str]] = []
    run = workers.run

    def recorded(fn: Any, *args: Any) -> Any:
        label = getattr(fn, "__name__", "?")

        def job() -> Any:
            jobs.append((label, threading.current_thread().name))
            return fn(*args)

        return run(job)

    workers.run = recorded  # type: ignore[method-assign]
    return workers, jobs


def spooled_envelope(incoming: Any) -> Any:
    """The envelope of a message being spooled, from a@x.test to b@y.test."""
    from gehirn_ts.mta.spool import Envelope, Recipient

    return Envelope(
        incoming.queue_id,
        "a@x.test",
        [Recipient("b@y.test")],
        incoming.size,
        0.0,
        "192.0.2.1",
        "x.test",
        "smtp",
        False,
    )
