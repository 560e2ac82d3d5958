"""Answers kept a few seconds (recent.py)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from gehirn_ts.recent import Recent


def _answer(d: Deferred[str]) -> str:
    out: list[str] = []
    d.addCallback(out.append)
    return out[0]


def test_an_answer_is_kept_until_it_is_old() -> None:
    clock, reads = Clock(), []

    def read() -> Deferred[str]:
        reads.append(clock.seconds())
        return succeed(f"answer {len(reads)}")

    recent = Recent(clock.seconds, seconds=5)
    assert _answer(recent.lookup("k", read)) == "answer 1"
    clock.advance(4.9)
    assert _answer(recent.lookup("k", read)) == "answer 1"
    assert _answer(recent.lookup("other", read)) == "answer 2"
    clock.advance(0.1)
    assert _answer(recent.lookup("k", read)) == "answer 3"
    assert reads == [0, 4.9, 5.0]


def test_a_change_drops_the_answers_and_those_of_reads_under_way() -> None:
    clock = Clock()
    recent = Recent(clock.seconds, seconds=5)
    assert _answer(recent.lookup("k", lambda: succeed("old"))) == "old"
    running: Deferred[str] = Deferred()
    recent.changed()
    late = recent.lookup("k", lambda: running)
    started_before: Deferred[str] = Deferred()
    recent.lookup("j", lambda: started_before)
    recent.changed()  # a write landed while both reads ran
    running.callback("read before the change")
    started_before.callback("also")
    assert _answer(late) == "read before the change"
    assert _answer(recent.lookup("k", lambda: succeed("new"))) == "new"
    assert _answer(recent.lookup("j", lambda: succeed("new j"))) == "new j"


def test_the_answers_are_bounded() -> None:
    clock = Clock()
    recent = Recent(clock.seconds, seconds=5, size=3)
    for key in "abcd":
        recent.lookup(key, lambda key=key: succeed(key))
    # The fourth answer found three kept: they went, and it stayed.
    assert _answer(recent.lookup("d", lambda: succeed("read"))) == "d"
    assert _answer(recent.lookup("a", lambda: succeed("read"))) == "read"
