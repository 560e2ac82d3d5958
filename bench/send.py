"""Sending benchmark (make bench): messages/s from `POST /v1/messages` (h2load, 20
connections) to a remote MX played by Postfix's smtp-sink, beside a Postfix instance relaying
the same load (smtp-source, 20 sessions, 1 KiB) to the same sink, in one run. The clock
runs from the first request until the sink has recorded every message. The two take
turns ``BENCH_ROUNDS`` times (3, as bench/smtp.py): the table has the medians, the
ratio is given round by round.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.h2load import h2load  # noqa: E402
from bench.smtp import (  # noqa: E402
    ENV,
    PostfixInstance,
    cpu_seconds,
    remove_workdirs,
    settle,
    smtp_source,
    start_gehirn,
    workdir,
)
from tests.dnstest import dns_server  # noqa: E402
from tests.sink import Sink  # noqa: E402
from tests.support import free_port  # noqa: E402

CLIENTS = 20
COUNT = int(os.environ.get("BENCH_SEND", "2000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
TEXT = ("All work and no play makes Jack a dull boy. " * 23)[:1000]


def wait_sink(sink: Sink, count: int, start: float, timeout: float = 600) -> float:
    while True:
        n = sum(1 for _ in sink.dir.iterdir())
        if n >= count:
            # Files are complete once smtp-sink has the final dot; allow the last one.
            time.sleep(0.05)
            return count / (time.monotonic() - start)
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"the sink has {n} of {count} messages")
        time.sleep(0.05)


def gehirn() -> tuple[float, float, float]:
    work = workdir("bench-send-")
    port = free_port()
    sink = Sink("127.0.0.2", port=port)
    zone = dns_server()
    zone.mx("bench-dest.test", "127.0.0.2")
    api = free_port()
    (work / "c.toml").write_text(
        f'[http]\nlisten = "tcp:{api}:interface=127.0.0.1"\n'
        f'[smtp]\nlisten = ""\nsubmission = ""\nsubmissions = ""\n'
        f'bootstrap_domain = "bench-src.test"\n'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {zone.port}\n'
        f"[outbound]\nport = {port}\nconcurrency = 20\nper_domain = 20\n"
    )
    proc = start_gehirn(work)
    try:
        deadline = time.monotonic() + 30
        while not (work / "var" / "admin.key").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)
        key = subprocess.run(
            [
                sys.executable,
                "-m",
                "gehirn_ts.cli",
                "-c",
                "c.toml",
                "--json",
                "key",
                "create",
                "local",
            ],
            cwd=work,
            env=ENV,
            capture_output=True,
            check=True,
        )
        token = json.loads(key.stdout)["api_key"]
        body = {
            "from": "app@bench-src.test",
            "to": "user@bench-dest.test",
            "subject": "bench",
            "text": TEXT,
        }

        message = work / "message.json"
        message.write_text(json.dumps(body))
        cpu_before = cpu_seconds(proc.pid)
        start = time.monotonic()
        # h2load (C) as the client, as smtp-source is Postfix's (bench/h2load.py).
        h2load(
            f"http://127.0.0.1:{api}/v1/messages",
            token,
            message,
            "application/json",
            COUNT,
            CLIENTS,
        )
        accepted = COUNT
        api_rate = accepted / (time.monotonic() - start)
        rate = wait_sink(sink, accepted, start)
        cpu_ms = (cpu_seconds(proc.pid) - cpu_before) / max(accepted, 1) * 1000
        return rate, api_rate, cpu_ms
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        sink.stop()


def postfix() -> tuple[float, float] | None:
    if shutil.which("postfix") is None:
        return None
    port = free_port()
    sink = Sink("127.0.0.2", port=port)
    smtpd = free_port()
    relay = (
        f"relayhost = [127.0.0.2]:{port}\nsmtp_tls_security_level = may\n"
        "default_destination_concurrency_limit = 20\n"
    )
    try:
        with PostfixInstance(smtpd, relay, relay=True):
            start = time.monotonic()
            accepted = smtp_source(smtpd, 1024, COUNT, CLIENTS)
            return wait_sink(sink, COUNT, start), accepted
    finally:
        sink.stop()


def main() -> None:
    ours: list[tuple[float, float, float]] = []
    theirs: list[tuple[float, float]] = []
    # Each part deletes the files of the messages it delivered, and the run before it
    # (make bench: the receiving benchmark) removed its directories: each starts settled.
    for _ in range(ROUNDS):
        settle()
        ours.append(gehirn())
        settle()
        peer = postfix()
        if peer is not None:
            theirs.append(peer)
    remove_workdirs()
    print(
        f"\nSending, messages/s delivered to smtp-sink ({COUNT} x ~1 KiB, {CLIENTS} parallel "
        f"clients: h2load / smtp-source, {os.cpu_count()} cores), from the first request "
        f"until the sink has them all; medians of {ROUNDS} rounds taken in turn"
    )
    rate, api_rate, cpu_ms = (statistics.median(column) for column in zip(*ours, strict=True))
    print(
        f"{'gehirn-ts (HTTP API)':22}{rate:8.0f}   (API accepted {api_rate:.0f}/s; "
        f"daemon CPU {cpu_ms:.2f} ms per message)"
    )
    if not theirs:
        print(f"{'Postfix (relay)':22}{'n/a':>8}")
        return
    peer_rate, accepted = (statistics.median(column) for column in zip(*theirs, strict=True))
    print(f"{'Postfix (relay)':22}{peer_rate:8.0f}   (smtpd accepted {accepted:.0f}/s)")
    ratios = ", ".join(f"{a[0] / b[0]:.0%}" for a, b in zip(ours, theirs, strict=True))
    print(f"gehirn-ts / Postfix, round by round: {ratios}")


if __name__ == "__main__":
    main()
