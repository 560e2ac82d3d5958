"""The garbage collector's settings for the daemon (set once it runs).

CPython collects its youngest generation every 700 container allocations, and every
collection walks the objects allocated since. A request, a message or an event makes
a few hundred such objects, nearly all freed by reference counting soon after: at 700
the collector runs every request or two and walks objects that would have gone anyway.
The modules, classes and functions loaded at start (about 200,000 objects) sit in the
oldest generation and were walked at every full collection.

Measured (docs/performance.md, session 10; two daemons at once, one of each, four
pairs): freezing what exists at start took 4% off an event's CPU with batches both
ways; a first threshold of 10,000 another 5%; together 7% one event a request and 2%
receiving mail. The RSS did not move (the benchmark's peak and 100-session figures).
Session 22 raised the threshold to 50,000: received mail 2.42 -> 2.34 ms of CPU a
message (-3%, two daemons at once, five rounds), the most there was to take (with the
collector off, -3% too); RSS with 100 sessions after 3,600 messages 62.3 -> 62.5 MB.
"""

from __future__ import annotations

import gc

# First-generation threshold: container allocations (less deallocations) between young
# collections. The older generations keep CPython's defaults.
YOUNG_THRESHOLD = 50_000


def tune() -> None:
    """Collect what start-up left, move every object alive now out of the collector's
    sight (``gc.freeze``), and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
