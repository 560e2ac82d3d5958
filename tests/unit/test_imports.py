"""What the daemon leaves unimported until it is used (RSS, docs/performance.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _fresh(probe: str) -> str:
    """What ``probe`` prints in a fresh interpreter: this one has imported everything
    the other tests use."""
    return subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_the_daemon_on_the_embedded_bus_imports_neither_txamqp_nor_the_irc_client():
    probe = (
        "import sys, gehirn_ts.tap\n"
        "print(sorted(m for m in sys.modules if m.startswith("
        "('txamqp', 'gehirn_ts.bus.amqp', 'twisted.words.protocols'))))\n"
    )
    assert _fresh(probe) == "[]"


def test_a_bot_brings_its_irc_client_in():
    probe = (
        "import sys\n"
        "from twisted.internet import reactor\n"
        "from gehirn_ts.edj.destinations.irc import IrcBot, parse_irc_url\n"
        "from gehirn_ts.edj.netguard import AddressPolicy\n"
        "IrcBot(parse_irc_url('irc://bot@irc.example.org/#x'), reactor=reactor,"
        " policy=AddressPolicy(()), rate=1, burst=1)\n"
        "print('twisted.words.protocols.irc' in sys.modules)\n"
    )
    assert _fresh(probe) == "True"
