"""The HTTP load generator of the benchmarks: nghttp2's h2load (C), over HTTP/1.1.

It plays for the HTTP API what smtp-source plays for SMTP. A Python client on the same
two cores cost the daemon's own budget: about 0.9 ms of CPU a request in the event
benchmark (docs/performance.md).
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def h2load(url: str, token: str, body: Path, ctype: str, count: int, clients: int) -> None:
    """POST ``body`` to ``url`` ``count`` times over ``clients`` connections; raises
    unless every request was answered 2xx."""
    out = subprocess.run(
        [
            "h2load",
            "--h1",
            "-n",
            str(count),
            "-c",
            str(clients),
            "-d",
            str(body),
            "-H",
            f"content-type: {ctype}",
            "-H",
            f"authorization: Bearer {token}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    ).stdout
    # "status codes: N 2xx, 0 3xx, 0 4xx, 0 5xx"
    codes = next(line for line in out.splitlines() if line.startswith("status codes:"))
    if not codes.startswith(f"status codes: {count} 2xx"):
        raise RuntimeError(f"h2load: not every request was accepted: {codes}")
