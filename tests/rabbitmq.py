"""The isolated RabbitMQ node the tests use (scripts/rabbitmq-node), started once."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "rabbitmq-node"
PORT = int(os.environ.get("GEHIRN_RMQ_PORT", "16672"))
URL = f"amqp://guest:guest@127.0.0.1:{PORT}/"
started_here = False


def _run(command: str, timeout: float = 180) -> None:
    subprocess.run([str(SCRIPT), command], check=True, timeout=timeout, stdout=subprocess.DEVNULL)


@functools.cache
def rabbitmq_url() -> str:
    """Start the node if it is not running (make test installs rabbitmq-server)."""
    global started_here
    if shutil.which("rabbitmqctl") is None and not Path("/usr/lib/rabbitmq/bin").exists():
        raise RuntimeError("rabbitmq-server is not installed: run `make test`")
    if subprocess.run([str(SCRIPT), "status"], check=False).returncode != 0:
        _run("start")
        started_here = True
    return URL


def ctl(*args: str) -> None:
    subprocess.run([str(SCRIPT), "ctl", *args], check=True, timeout=60, stdout=subprocess.DEVNULL)


def restart() -> None:
    """Stop the whole node and start it again (connections drop, durable data stays)."""
    _run("stop")
    _run("start")


def stop_if_started() -> None:
    if started_here:
        _run("stop")
