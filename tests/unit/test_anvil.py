"""Per-IP limits counted over all SMTP workers (gehirn_ts/mta/anvil.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gehirn_ts.mta import anvil as anvil_module
from gehirn_ts.mta.anvil import (
    NOTICES,
    REPORTS,
    Anvil,
    Limits,
    SharedLimits,
    line,
    parse,
    shareable,
)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _anvil(clock: _Clock, connections: int = 2) -> Anvil:
    return Anvil(Limits(connections, 3, 600.0), clock)


def test_sessions_are_added_up_over_the_workers() -> None:
    anvil = _anvil(_Clock())
    assert anvil.opened(1, "smtp", "192.0.2.1") == b""
    # The second session, in another worker: the IP is at the limit for everyone.
    assert anvil.opened(2, "smtp", "192.0.2.1") == b"full smtp 192.0.2.1\n"
    assert anvil.opened(2, "smtp", "192.0.2.1") == b""  # said once
    # Another listener and another address are counted apart.
    assert anvil.opened(1, "submission", "192.0.2.1") == b""
    assert anvil.opened(1, "smtp", "2001:db8::1") == b""
    assert anvil.closed(2, "smtp", "192.0.2.1") == b""  # still 2
    assert anvil.closed(1, "smtp", "192.0.2.1") == b"room smtp 192.0.2.1\n"


def test_a_worker_that_ends_takes_its_sessions_with_it() -> None:
    anvil = _anvil(_Clock())
    anvil.opened(1, "smtp", "192.0.2.1")
    assert anvil.opened(1, "smtp", "192.0.2.1") == b"full smtp 192.0.2.1\n"
    anvil.opened(2, "smtp", "192.0.2.9")
    assert anvil.worker_gone(1) == b"room smtp 192.0.2.1\n"
    assert anvil.state() == b""
    # A close the new process reports for a session it never opened counts nothing.
    assert anvil.closed(1, "smtp", "192.0.2.1") == b""
    assert anvil.opened(2, "smtp", "192.0.2.9") == b"full smtp 192.0.2.9\n"


def test_auth_failures_over_the_workers_block_the_ip_for_what_is_left_of_the_window() -> None:
    clock = _Clock()
    anvil = _anvil(clock)
    assert anvil.auth_failed("submission", "192.0.2.1") == b""
    clock.now += 100
    assert anvil.auth_failed("submission", "192.0.2.1") == b""
    clock.now += 100
    # The third within 600 s: blocked until the first leaves the window (400 s more).
    assert anvil.auth_failed("submission", "192.0.2.1") == b"block submission 192.0.2.1 400.000\n"
    clock.now += 10
    assert anvil.state() == b"block submission 192.0.2.1 390.000\n"
    # Failures that left the window count no more.
    clock.now += 1000
    assert anvil.state() == b""
    assert anvil.auth_failed("submission", "192.0.2.1") == b""


def test_a_started_worker_is_told_what_is_in_force() -> None:
    clock = _Clock()
    anvil = _anvil(clock, connections=1)
    anvil.opened(1, "smtp", "192.0.2.1")
    for _ in range(3):
        anvil.auth_failed("submission", "192.0.2.7")
    shared = SharedLimits(clock)
    for notice in anvil.state().splitlines():
        assert shared.notice(notice)
    assert shared.full("smtp", "192.0.2.1") and not shared.full("submission", "192.0.2.1")
    assert shared.blocked("submission", "192.0.2.7")
    assert not shared.blocked("smtp", "192.0.2.7")
    clock.now += 601
    assert not shared.blocked("submission", "192.0.2.7")


def test_a_reload_changes_the_limit_at_the_next_change() -> None:
    anvil = _anvil(_Clock(), connections=3)
    anvil.opened(1, "smtp", "192.0.2.1")
    anvil.opened(1, "smtp", "192.0.2.1")
    anvil.limits = Limits(2, 3, 600.0)
    assert anvil.opened(2, "smtp", "192.0.2.1") == b"full smtp 192.0.2.1\n"


def test_reports_from_a_worker_and_anything_else() -> None:
    anvil = _anvil(_Clock(), connections=1)
    assert anvil.report(1, b"open smtp 192.0.2.1") == b"full smtp 192.0.2.1\n"
    assert anvil.report(1, b"close smtp 192.0.2.1") == b"room smtp 192.0.2.1\n"
    for junk in (
        b"",
        b"open",
        b"open smtp",
        b"open pop3 192.0.2.1",
        b"full smtp 192.0.2.1",
        b"open smtp 192.0.2.1 5",
        b"open smtp a b",
        b"authfail smtp \xff",
    ):
        assert anvil.report(1, junk) is None


def test_a_worker_keeps_the_longest_block() -> None:
    clock = _Clock()
    shared = SharedLimits(clock)
    assert shared.notice(b"block smtp 192.0.2.1 100.000")
    assert shared.notice(b"block smtp 192.0.2.1 10.000")
    clock.now += 50
    assert shared.blocked("smtp", "192.0.2.1")
    assert not shared.notice(b"block smtp 192.0.2.1")  # no seconds: no notice
    assert not shared.notice(b"open smtp 192.0.2.1")  # a report, not a notice
    assert shared.notice(b"full smtp 192.0.2.1") and shared.full("smtp", "192.0.2.1")
    assert shared.notice(b"room smtp 192.0.2.1") and not shared.full("smtp", "192.0.2.1")


_ips = st.one_of(
    st.ip_addresses().map(str), st.from_regex(r"[0-9A-Za-z.:%_-]{1,64}", fullmatch=True)
)
_listeners = st.sampled_from(["smtp", "submission", "submissions"])


@given(st.binary(max_size=200))
def test_parse_takes_any_bytes(data: bytes) -> None:
    for kinds in (REPORTS, NOTICES):
        found = parse(data, kinds)
        assert found is None or found.kind in kinds


@given(st.sampled_from((*REPORTS, "full", "room")), _listeners, _ips)
def test_lines_read_back(kind: str, listener: str, ip: str) -> None:
    kinds = REPORTS if kind in REPORTS else NOTICES
    found = parse(line(kind, listener, ip).rstrip(b"\n"), kinds)
    assert found is not None and (found.kind, found.listener, found.ip) == (kind, listener, ip)


@given(_listeners, _ips, st.floats(min_value=0.001, max_value=10**8))
def test_blocks_read_back(listener: str, ip: str, seconds: float) -> None:
    found = parse(line("block", listener, ip, seconds).rstrip(b"\n"), NOTICES)
    assert found is not None and abs(found.seconds - seconds) < 0.001


def test_what_ran_out_is_forgotten_when_many_addresses_are_known(monkeypatch) -> None:
    monkeypatch.setattr(anvil_module, "FORGET_AT", 4)
    clock = _Clock()
    anvil, shared = _anvil(clock), SharedLimits(clock)
    for n in range(4):
        for _ in range(3):
            notice = anvil.auth_failed("smtp", f"192.0.2.{n}")
        assert shared.notice(notice.rstrip(b"\n"))
    clock.now += 601
    # New addresses come; a sweep drops the old ones when there are twice as many as
    # the last sweep left (the first came at four), not at every failure.
    for n in range(100, 105):
        anvil.auth_failed("smtp", f"192.0.2.{n}")
        shared.notice(f"block smtp 192.0.2.{n} 10.000".encode())
    assert sorted(anvil._failures) == [("smtp", f"192.0.2.{n}") for n in range(100, 105)]
    assert sorted(shared._blocked) == [("smtp", f"192.0.2.{n}") for n in range(100, 105)]


def test_only_an_ip_address_is_counted_over_the_workers() -> None:
    assert shareable("192.0.2.1") and shareable("2001:db8::1") and shareable("fe80::1%eth0")
    assert not shareable("UNIXAddress('/run/smtp.sock')") and not shareable("")
