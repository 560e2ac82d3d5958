from collections.abc import Iterator

import pytest

from tests.integration.procs import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver in a thread (tests/integration/procs.py)."""
    r = Receiver()
    yield r
    r.close()
