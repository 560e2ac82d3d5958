"""The daemon as a real process (gehirn-tsd -n gehirn-ts), and a webhook receiver thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.dnstest import dns_server
from tests.harness import Hit
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def http(
    method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 10
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else None


def wait_for(predicate: Any, timeout: float = 20.0, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)


class Daemon:
    """One gehirn-ts process on a temp directory; restartable on the same state."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str] | None = None,
        twistd_args: tuple[str, ...] = ("--logger", "gehirn_ts.logs.text_observer"),
        **sections: dict[str, Any],
    ) -> None:
        self.twistd_args = twistd_args
        self.workdir = workdir
        self.env = ENV if env is None else env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.smtp_port, self.submission_port, self.submissions_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        config: dict[str, dict[str, Any]] = {
            "http": {"listen": f"tcp:{self.port}:interface=127.0.0.1"},
            "smtp": {
                "listen": f"tcp:{self.smtp_port}:interface=127.0.0.1",
                "submission": f"tcp:{self.submission_port}:interface=127.0.0.1",
                "submissions": f"tcp:{self.submissions_port}:interface=127.0.0.1",
                "bootstrap_domain": "",
            },
            "dns": dns_server().config(),
            "edj": {
                "retry_schedule": ["200ms", "200ms"],
                "retry_jitter": 0,
                "allow_networks": ["127.0.0.0/8"],
                "http_timeout": "3s",
            },
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        self.state = Path(config.get("state", {}).get("dir", workdir / "var"))
        self.config = workdir / "gehirn-ts.toml"
        self.config.write_text(_toml(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> Daemon:
        self.runs += 1
        self.log = (self.workdir / f"twistd-{self.runs}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(BIN / "gehirn-tsd"),
                *self.twistd_args,
                "--nodaemon",
                "--pidfile=",
                "gehirn-ts",
                "--config",
                str(self.config),
            ],
            cwd=self.workdir,
            env=ENV,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._healthy)
        self.admin = (self.state / "admin.key").read_text().strip()
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.output()}")
        try:
            return http("GET", self.base + "/healthz", timeout=1)[0] == 200
        except OSError:
            return False

    def output(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.workdir.glob("twistd-*.log"))
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def cli(self, *args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "gehirn_ts.cli", "--config", str(self.config), "--json", *args],
            cwd=self.workdir,
            env=ENV,
            capture_output=True,
            check=True,
            timeout=60,
        )
        return json.loads(out.stdout)

    def cli_error(self, *args: str) -> str:
        """A CLI command that must fail (exit status 1): its message, with no traceback."""
        out = subprocess.run(
            [sys.executable, "-m", "gehirn_ts.cli", "--config", str(self.config), *args],
            cwd=self.workdir,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1, (out.returncode, out.stderr)
        assert "Traceback" not in out.stderr
        return out.stderr

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        return http(method, self.base + path, body, token)


def _toml(config: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@dataclass
class Receiver:
    """A webhook receiver in a thread: answers with the planned statuses, then 200.

    ``hold`` (a threading.Event) makes it keep each request open until it is set.
    """

    plan: list[int] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    hold: threading.Event | None = None

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with lock:
                    receiver.hits.append(
                        Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    status = receiver.plan.pop(0) if receiver.plan else 200
                if receiver.hold is not None:
                    receiver.hold.wait(30)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        lock = threading.Lock()

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the daemon hung up (killed on purpose): nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ids(self) -> list[str]:
        return [json.loads(h.body)["id"] for h in list(self.hits)]

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()
