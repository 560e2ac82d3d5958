"""``gehirn-tsd``: twistd with gehirn-ts's plugin alone, and one malloc arena.

It takes twistd's options and runs the same service as ``twistd gehirn-ts`` does
(`twisted/plugins/gehirn_ts_plugin.py`, which stays for twistd users). The reactor is
gehirn-ts's (``gehirn_ts/reactor.py``) unless ``--reactor`` names one, and two things
differ for memory (docs/decisions.md, "Memory"):
- twistd finds its commands by loading every plugin in ``twisted.plugins``. Twisted's
  own are among them, and trial's name interfaces whose module imports ``unittest``
  (1 MB the daemon never uses). Here the one plugin is named directly.
- glibc gives each thread that allocates an arena of its own (up to eight a core).
  The daemon's threads mostly wait for the interpreter lock, so one arena costs them
  no waiting, and it keeps about 0.5-1 MB less memory.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from typing import Any

from twisted.application import app
from twisted.scripts.twistd import ServerOptions, runApp  # type: ignore[attr-defined]

from gehirn_ts import reactor as gehirn_reactor
from twisted.plugins.gehirn_ts_plugin import gehirnTs

M_ARENA_MAX = -8  # glibc's malloc.h


def one_malloc_arena() -> bool:
    """Ask glibc for one malloc arena; False where there is no glibc (musl, macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, 1))


class Options(ServerOptions):  # type: ignore[misc]
    """twistd's options, with gehirn-ts as the one command."""

    @staticmethod
    def _getPlugins(interface: Any, package: Any = None) -> Iterator[Any]:
        yield gehirnTs


def names_a_reactor(argv: list[str]) -> bool:
    """Whether twistd's arguments choose a reactor (``-r``/``--reactor``)."""
    return any(a in ("-r", "--reactor") or a.startswith(("-r", "--reactor=")) for a in argv)


def main() -> None:
    # Before any thread exists: an arena is made when a thread first allocates.
    one_malloc_arena()
    if not names_a_reactor(sys.argv[1:]):
        gehirn_reactor.install()
    app.run(runApp, Options)


if __name__ == "__main__":
    main()
