"""gehirn_ts/eager.py: a coroutine run at once, as far as it goes without waiting."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, succeed

from gehirn_ts.eager import run_eagerly


def test_a_coroutine_that_does_not_wait_is_done_at_once() -> None:
    seen: list[int] = []

    async def work() -> None:
        seen.append(await succeed(1))
        seen.append(2)

    assert run_eagerly(work()) is None
    assert seen == [1, 2]


def test_its_exception_is_raised_to_the_caller() -> None:
    async def work() -> None:
        await succeed(None)
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        run_eagerly(work())


def test_a_coroutine_that_waits_goes_on_when_what_it_waits_for_fires() -> None:
    first: Deferred[int] = Deferred()
    second: Deferred[int] = Deferred()
    seen: list[object] = []

    async def work() -> None:
        seen.append("started")
        seen.append(await first)
        seen.append(await second)

    d = run_eagerly(work())
    assert isinstance(d, Deferred)
    assert seen == ["started"]  # run up to its first wait, here
    first.callback(1)
    assert seen == ["started", 1] and not d.called
    second.callback(2)
    assert seen == ["started", 1, 2]
    assert d.called and d.result is None


def test_a_failure_after_a_wait_fails_the_deferred() -> None:
    gate: Deferred[None] = Deferred()

    async def work() -> None:
        await gate
        raise ValueError("later")

    d = run_eagerly(work())
    assert isinstance(d, Deferred)
    failures: list[BaseException] = []
    d.addErrback(lambda f: failures.append(f.value))
    gate.callback(None)
    assert len(failures) == 1 and str(failures[0]) == "later"


def test_what_it_waits_for_may_fire_before_the_rest_is_started() -> None:
    # Fired between the first step and fromCoroutine's start (a callback of the
    # Deferred that fires it may run anything).
    gate: Deferred[int] = Deferred()
    seen: list[int] = []

    async def work() -> None:
        seen.append(await gate)

    coro = work()
    coro.send(None)
    gate.callback(5)
    d = Deferred.fromCoroutine(coro)
    assert seen == [5] and d.called
