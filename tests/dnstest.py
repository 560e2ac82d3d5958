"""The tests' DNS server (tests/dns_server.py), one per session, and its zone file."""

from __future__ import annotations

import atexit
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]


class DnsServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.zone_file = Path(tempfile.mkdtemp(prefix="gehirn-dns-")) / "zone.json"
        self.zone: dict[str, dict[str, list[Any]]] = {}
        self.write()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "dns_server.py"),
                str(self.port),
                str(self.zone_file),
            ],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"ready"
        atexit.register(self.proc.kill)

    def write(self) -> None:
        tmp = self.zone_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.zone))
        tmp.replace(self.zone_file)

    def set(self, name: str, rtype: str, *values: Any) -> None:
        self.zone.setdefault(name.lower(), {})[rtype] = list(values)
        self.write()

    def mx(self, domain: str, address: str, host: str | None = None) -> None:
        """``domain`` served by one MX host (``mx.DOMAIN``) at ``address``."""
        host = host or f"mx.{domain}"
        self.set(domain, "MX", [10, host])
        self.set(host, "A", address)

    def config(self) -> dict[str, Any]:
        return {"nameservers": ["127.0.0.1"], "port": self.port, "timeout": "2s"}


@functools.cache
def dns_server() -> DnsServer:
    return DnsServer()
