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


def test_pyspf_and_dkimpy_come_without_dnspython_pynacl_and_lookups_of_their_own():
    # Their lookups go through twisted.names (gehirn_ts/threaddns.py), Ed25519 through
    # cryptography (gehirn_ts/mta/libs.py): dnspython and PyNaCl would be 4.7 MB of
    # memory for nothing, and a default lookup of theirs must not reach the network
    # behind the daemon's resolver.
    probe = (
        "import sys, gehirn_ts.tap\n"
        "from gehirn_ts.mta.libs import dkim, spf\n"
        "from gehirn_ts.mta.dkim import generate\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'dns', 'DNS', 'nacl'}))\n"
        "key, p = generate('ed25519')\n"
        "m = b'From: a@e.test\\r\\n\\r\\nHi\\r\\n'\n"
        "m = dkim.sign(m, b's', b'e.test', key.encode(),"
        " signature_algorithm=b'ed25519-sha256') + m\n"
        "print(dkim.verify(m, dnsfunc=lambda n, timeout=5: b'k=ed25519; p=' + p.encode()))\n"
        "for ask in (lambda: spf.DNSLookup_pydns('example.org', 'TXT'),"
        " lambda: dkim.dnsplug.get_txt(b'example.org')):\n"
        "    try:\n"
        "        ask()\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__)\n"
    )
    assert _fresh(probe).splitlines() == ["[]", "True", "NoDefaultLookups", "NoDefaultLookups"]


def test_with_dnspython_already_loaded_both_still_import():
    probe = (
        "import dns.resolver\n"
        "from gehirn_ts.mta.libs import dkim, spf\n"
        "print(spf.DNSLookup is spf.DNSLookup_dnspython, callable(dkim.verify))\n"
    )
    assert _fresh(probe) == "True True"


def test_gehirn_tsd_names_its_one_plugin_and_leaves_unittest_out():
    # twistd loads every plugin's cached interfaces, among them twisted.trial's, which
    # import unittest (1 MB): checked here against twistd's own options.
    probe = (
        "import sys\n"
        "from twisted.scripts.twistd import ServerOptions\n"
        "from gehirn_ts.launcher import Options, one_malloc_arena\n"
        "names = [c[0] for c in Options().subCommands]\n"
        "print(names, 'unittest' in sys.modules, one_malloc_arena())\n"
        "everything = [c[0] for c in ServerOptions().subCommands]\n"
        "print('gehirn-ts' in everything, len(everything) > 1, 'unittest' in sys.modules)\n"
    )
    assert _fresh(probe).splitlines() == ["['gehirn-ts'] False True", "True True True"]
