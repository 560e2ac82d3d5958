"""Slots (gehirn_ts/slots.py): a bound on work in hand, handed over in turn."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred

from gehirn_ts.slots import Slots


def _take(slots: Slots, got: list[int], n: int) -> Deferred[None]:
    async def take() -> None:
        await slots.take()
        got.append(n)

    return Deferred.fromCoroutine(take())


def test_at_most_n_hold_a_slot_and_the_rest_get_theirs_in_turn() -> None:
    slots = Slots(2)
    got: list[int] = []
    for n in range(5):
        _take(slots, got, n)
    assert got == [0, 1]
    slots.release()
    assert got == [0, 1, 2]
    slots.release()
    slots.release()
    assert got == [0, 1, 2, 3, 4]
    # The two holders left give theirs back: two are free, and no more.
    slots.release()
    slots.release()
    for n in range(5, 8):
        _take(slots, got, n)
    assert got == [0, 1, 2, 3, 4, 5, 6]


def test_a_waiter_cancelled_while_it_waits_is_passed_over() -> None:
    slots = Slots(1)
    got: list[int] = []
    _take(slots, got, 0)
    gone = _take(slots, got, 1)
    _take(slots, got, 2)
    gone.cancel()
    gone.addErrback(lambda f: f.trap(CancelledError))
    slots.release()
    assert got == [0, 2]
    slots.release()
    _take(slots, got, 3)
    assert got == [0, 2, 3]
