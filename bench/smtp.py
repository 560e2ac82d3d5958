"""SMTP receiving benchmark (make bench): messages/s accepted, 20 sessions, 1 KiB and
100 KiB, load from Postfix's smtp-source, beside aiosmtpd (write + fsync per message)
and a Postfix instance accepting into its own queue, all in one run. Also the
gehirn-ts daemon's peak RSS, and its RSS with 100 sessions open.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dnstest import dns_server  # noqa: E402
from tests.support import free_port  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SESSIONS = 20
RUNS = [
    (1024, int(os.environ.get("BENCH_SMALL", "3000"))),
    (100 * 1024, int(os.environ.get("BENCH_LARGE", "600"))),
]


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def smtp_source(port: int, size: int, count: int, sessions: int = SESSIONS) -> float:
    start = time.monotonic()
    subprocess.run(
        [
            "smtp-source",
            "-s",
            str(sessions),
            "-m",
            str(count),
            "-l",
            str(size),
            "-f",
            "sender@example.org",
            "-t",
            "user@bench.test",
            "-M",
            "client.test",
            f"127.0.0.1:{port}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=900,
    )
    return count / (time.monotonic() - start)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_gehirn(work: Path) -> subprocess.Popen[bytes]:
    """The daemon on ``work/c.toml``, its output in ``work/twistd.log``."""
    log = (work / "twistd.log").open("wb")
    return subprocess.Popen(
        [
            str(BIN / "twistd"),
            "--logger",
            "gehirn_ts.logs.text_observer",
            "-n",
            "--pidfile=",
            "gehirn-ts",
            "--config",
            "c.toml",
        ],
        cwd=work,
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def gehirn(results: dict[str, list[str]]) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-gehirn-"))
    port, http = free_port(), free_port()
    dns = dns_server()
    (work / "c.toml").write_text(
        f'[http]\nlisten = "tcp:{http}:interface=127.0.0.1"\n'
        f'[smtp]\nlisten = "tcp:{port}:interface=127.0.0.1"\nsubmission = ""\n'
        f'submissions = ""\nbootstrap_domain = "bench.test"\nmax_connections_per_ip = 200\n'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\n'
    )
    proc = start_gehirn(work)
    try:
        wait_port(port)
        row = []
        done = 0
        cpu = ""
        for size, count in RUNS:
            before = cpu_seconds(proc.pid)
            accepted = smtp_source(port, size, count)
            row.append(f"{accepted:8.0f}")
            # Everything accepted is also stored and published (the event, durably).
            done += count
            start = time.monotonic()
            while len(list((work / "var" / "kvs").glob("*.eml"))) < done:
                if time.monotonic() - start > 300:
                    raise RuntimeError("not all messages were processed")
                time.sleep(0.1)
            if size == RUNS[0][0]:
                cpu = f"{(cpu_seconds(proc.pid) - before) / count * 1000:9.2f}"
        req = urllib.request.Request(f"http://127.0.0.1:{http}/healthz")
        urllib.request.urlopen(req, timeout=5).read()
        # 100 concurrent sessions, idle after EHLO, for the RSS figure.
        import socket

        socks = []
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", port))
            s.recv(100)
            s.sendall(b"EHLO c.test\r\n")
            socks.append(s)
        time.sleep(1)
        rss100 = rss_mb(proc.pid, "VmRSS")
        for s in socks:
            s.close()
        results["gehirn-ts"] = [
            *row,
            cpu,
            f"{rss_mb(proc.pid, 'VmHWM'):9.1f}",
            f"{rss100:9.1f}",
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def aiosmtpd(results: dict[str, list[str]]) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-aiosmtpd-"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "aiosmtpd_sink.py"), str(port), str(work)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        row = []
        cpu = ""
        for size, count in RUNS:
            before = cpu_seconds(proc.pid)
            row.append(f"{smtp_source(port, size, count):8.0f}")
            if size == RUNS[0][0]:
                cpu = f"{(cpu_seconds(proc.pid) - before) / count * 1000:9.2f}"
        results["aiosmtpd (fsync)"] = [
            *row,
            cpu,
            f"{rss_mb(proc.pid, 'VmHWM'):9.1f}",
            "",
        ]
    finally:
        proc.terminate()
        proc.wait(30)


POSTFIX_MAIN = """
compatibility_level = 3.6
queue_directory = {q}
data_directory = {d}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.bench
mydestination = bench.test
alias_maps =
alias_database =
local_recipient_maps =
mynetworks = 127.0.0.0/8
local_transport = discard:
default_transport = discard:
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
message_size_limit = 67108864
default_process_limit = 100
maillog_file_prefixes = {d}
maillog_file = {d}/maillog
"""


class PostfixInstance:
    """A Postfix of its own in a temporary directory, smtpd on ``port`` (loopback);
    ``extra`` is appended to main.cf. Services run without chroot (the queue directory
    is temporary)."""

    def __init__(self, port: int, extra: str = "", relay: bool = False) -> None:
        work = Path(tempfile.mkdtemp(prefix="bench-postfix-"))
        self.etc, queue, data = work / "etc", work / "queue", work / "data"
        for d in (self.etc, queue, data):
            d.mkdir()
        os.chmod(work, 0o755)
        main = POSTFIX_MAIN.format(q=queue, d=data)
        if relay:
            main = main.replace("mydestination = bench.test", "mydestination =")
            main = main.replace("default_transport = discard:", "default_transport = smtp")
        (self.etc / "main.cf").write_text(main + extra)
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            if line.startswith("smtp      inet"):
                line = f"127.0.0.1:{port} inet n - n - - smtpd"
            fields = line.split()
            if len(fields) >= 8 and not line.startswith("#") and fields[4] == "y":
                fields[4] = "n"
                line = " ".join(fields)
            lines.append(line)
        if not any(line.startswith("postlog") for line in lines):
            lines.append("postlog   unix-dgram n  -       n       -       1       postlogd")
        (self.etc / "master.cf").write_text("\n".join(lines) + "\n")
        shutil.chown(data, "postfix")
        self.env = {**os.environ, "MAIL_CONFIG": str(self.etc)}
        self.port = port

    def _postfix(self, command: str, check: bool) -> None:
        subprocess.run(
            ["postfix", "-c", str(self.etc), command],
            env=self.env,
            check=check,
            capture_output=True,
        )

    def __enter__(self) -> PostfixInstance:
        self._postfix("set-permissions", False)
        self._postfix("start", True)
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._postfix("stop", False)


def postfix(results: dict[str, list[str]]) -> None:
    if shutil.which("postfix") is None:
        results["Postfix"] = ["n/a", "n/a", "", "", ""]
        return
    port = free_port()
    with PostfixInstance(port):
        row = [f"{smtp_source(port, size, count):8.0f}" for size, count in RUNS]
        results["Postfix (queue)"] = [*row, "", "", ""]


def main() -> None:
    results: dict[str, list[str]] = {}
    gehirn(results)
    aiosmtpd(results)
    postfix(results)
    print(
        f"\nSMTP receiving, messages/s accepted with {SESSIONS} sessions (smtp-source), "
        f"{RUNS[0][1]} x 1 KiB and {RUNS[1][1]} x 100 KiB; {os.cpu_count()} cores"
    )
    print(f"{'':18}{'1 KiB':>8}{'100 KiB':>8}{'CPU ms':>9}{'peak RSS':>9}{'RSS@100':>9}")
    for name, row in results.items():
        print(f"{name:18}" + "".join(row))
    print(
        "gehirn-ts: each 250 after the spool fsync; the run waits until every message is "
        "also in the KVS with its mail.received event. CPU ms: the process's CPU time per "
        "1 KiB message (Postfix runs many processes: not measured). RSS in MB."
    )


if __name__ == "__main__":
    main()
