"""Attempts to a batch subscription, gathered per reactor turn (edj/batching.py)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from gehirn_ts.edj.batching import Batches
from gehirn_ts.events import Event
from gehirn_ts.interfaces import Delivered, Result, TempFail


class Sender:
    """Records each request's events and answers with ``result`` (or a pending one)."""

    def __init__(self, result: Result | None = Delivered(status_code=200)) -> None:
        self.result = result
        self.requests: list[list[str]] = []
        self.pending: list[Deferred[Result]] = []

    def __call__(self, events: Sequence[Event], bodies: Sequence[bytes]) -> Deferred[Result]:
        assert [e.to_json() for e in events] == list(bodies)
        self.requests.append([e.id for e in events])
        if self.result is None:
            d: Deferred[Result] = Deferred()
            self.pending.append(d)
            return d
        return succeed(self.result)


def _events(n: int) -> list[Event]:
    return [Event(type="t", source="/s", id=f"e{i}") for i in range(n)]


def _ask(batches: Batches, key: str, size: int, send: Sender, events: list[Event]) -> list:
    got: list = []
    for e in events:
        batches.attempt(key, size, send, e, e.to_json()).addBoth(got.append)
    return got


def test_the_attempts_of_one_turn_go_in_one_request_with_one_result() -> None:
    clock, send = Clock(), Sender()
    batches = Batches(clock)
    got = _ask(batches, "sub_a", 10, send, _events(4))
    assert send.requests == [] and got == []  # nothing leaves before the turn ends
    clock.advance(0)
    assert send.requests == [["e0", "e1", "e2", "e3"]]
    assert got == [Delivered(status_code=200)] * 4
    # The next turn's attempts are the next request.
    got = _ask(batches, "sub_a", 10, send, _events(1))
    clock.advance(0)
    assert send.requests[1:] == [["e0"]] and len(got) == 1


def test_a_full_batch_leaves_at_once_and_the_rest_at_the_turns_end() -> None:
    clock, send = Clock(), Sender()
    batches = Batches(clock)
    got = _ask(batches, "sub_a", 3, send, _events(7))
    assert send.requests == [["e0", "e1", "e2"], ["e3", "e4", "e5"]]
    assert len(got) == 6
    clock.advance(0)
    assert send.requests[2:] == [["e6"]] and len(got) == 7
    assert clock.getDelayedCalls() == []


def test_subscriptions_are_never_mixed() -> None:
    clock, a, b = Clock(), Sender(), Sender(TempFail("HTTP 503", status_code=503))
    batches = Batches(clock)
    events = _events(4)
    got_a = _ask(batches, "sub_a", 10, a, events[:2])
    got_b = _ask(batches, "sub_b", 10, b, events[2:])
    clock.advance(0)
    assert a.requests == [["e0", "e1"]] and b.requests == [["e2", "e3"]]
    assert got_a == [Delivered(status_code=200)] * 2
    assert got_b == [TempFail("HTTP 503", status_code=503)] * 2


def test_every_attempt_waits_for_the_answer_and_shares_a_failure() -> None:
    clock, send = Clock(), Sender(result=None)
    batches = Batches(clock)
    got = _ask(batches, "sub_a", 10, send, _events(3))
    clock.advance(0)
    assert got == []
    send.pending[0].errback(RuntimeError("boom"))
    assert len(got) == 3 and all(f.check(RuntimeError) for f in got)
    for f in got:
        f.trap(RuntimeError)


def test_a_sender_that_raises_fails_its_attempts() -> None:
    def broken(events: Sequence[Event], bodies: Sequence[bytes]) -> Deferred[Result]:
        raise ValueError("unusable")

    clock = Clock()
    batches = Batches(clock)
    got = _ask(batches, "sub_a", 10, broken, _events(2))  # type: ignore[arg-type]
    clock.advance(0)
    assert len(got) == 2 and all(f.check(ValueError) for f in got)
    for f in got:
        f.trap(ValueError)
    # The subscription can batch again afterwards.
    send = Sender()
    _ask(batches, "sub_a", 10, send, _events(1))
    clock.advance(0)
    assert send.requests == [["e0"]]


@pytest.mark.parametrize("size", [1, 2, 5])
def test_any_size_sends_each_event_once_in_order(size: int) -> None:
    clock, send = Clock(), Sender()
    batches = Batches(clock)
    got = _ask(batches, "sub_a", size, send, _events(11))
    clock.advance(0)
    assert [i for r in send.requests for i in r] == [f"e{i}" for i in range(11)]
    assert all(len(r) <= size for r in send.requests) and len(got) == 11
