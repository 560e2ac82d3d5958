"""SMTP receiving benchmark (make bench): messages/s accepted, 20 sessions, 1 KiB and
100 KiB, load from Postfix's smtp-source, beside two stock servers that write and
fsync each message and do nothing else (aiosmtpd; twisted.mail's ESMTP, the stack
gehirn-ts is built on) and a Postfix instance accepting into its own queue, all in one
run. Also the
gehirn-ts daemon's peak RSS, and its RSS with 100 sessions open. gehirn-ts runs twice a
round: as one process (the default), and with one SMTP worker process (``[smtp]
workers = 1``, docs/operations.md).

They take turns, ``BENCH_ROUNDS`` times (3): on a shared machine the rate of one
run moves by a third from one minute to the next, and a peer measured minutes apart
compares the minutes, not the servers. The table has each column's median; the
ratios to Postfix are given round by round. After a part that deleted many files the
next waits (``settle``), and the run's directories are removed at its end.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dnstest import dns_server  # noqa: E402
from tests.support import child_processes, free_port  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SESSIONS = 20
RUNS = [
    (1024, int(os.environ.get("BENCH_SMALL", "3000"))),
    (100 * 1024, int(os.environ.get("BENCH_LARGE", "600"))),
]
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
WORKERS_ROW = "  1 SMTP worker"
TWISTED_ROW = "twisted.mail (fsync)"
# A row: 1 KiB rate, 100 KiB rate, CPU ms a 1 KiB message, peak RSS, RSS with 100
# sessions; None where not measured.
Row = list[float | None]
WORK: list[Path] = []  # this run's directories, removed at its end


def workdir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    WORK.append(path)
    return path


def remove_workdirs() -> None:
    for path in WORK:
        shutil.rmtree(path, ignore_errors=True)
    WORK.clear()


def _skips_freed_inodes() -> bool:
    """Whether the temporary directory's file system is ext4 without a journal: its
    inode allocator steps over every inode freed in the last 35 seconds one by one
    (fs/ext4/ialloc.c, find_inode_bit and recently_deleted)."""
    st = os.stat(tempfile.gettempdir())
    try:
        device = os.readlink(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    except OSError:
        return False
    name = os.path.basename(device)
    return os.path.isdir(f"/proc/fs/ext4/{name}") and not glob.glob(f"/proc/fs/jbd2/{name}-*")


def settle() -> None:
    """Wait until the files deleted so far no longer slow the creation of new ones.

    On ext4 without a journal (the machines of sessions 12 to 14), right after Postfix's
    round had deleted its 3,600 queue files, gehirn-ts received 27% fewer messages a
    second: each new file's inode was found past thousands of freed ones
    (docs/performance.md, session 14). The window is the kernel's dirty-expiry time
    plus 5 seconds."""
    if not _skips_freed_inodes():
        return
    expire = int(Path("/proc/sys/vm/dirty_expire_centisecs").read_text()) / 100
    time.sleep(expire + 6)


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


def processes(pid: int) -> list[int]:
    """A process and its children (the daemon and its SMTP workers)."""
    return [pid, *child_processes(pid)]


def start_gehirn(work: Path) -> subprocess.Popen[bytes]:
    """The daemon on ``work/c.toml``, its output in ``work/twistd.log``."""
    log = (work / "twistd.log").open("wb")
    return subprocess.Popen(
        [
            str(BIN / "gehirn-tsd"),
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


def gehirn(workers: int = 0) -> Row:
    """The daemon's row; with ``workers``, SMTP worker processes take the sessions, and
    the CPU and RSS figures are those of all its processes added up."""
    work = workdir("bench-gehirn-")
    port, http = free_port(), free_port()
    dns = dns_server()
    (work / "c.toml").write_text(
        f'[http]\nlisten = "tcp:{http}:interface=127.0.0.1"\n'
        f'[smtp]\nlisten = "tcp:{port}:interface=127.0.0.1"\nsubmission = ""\n'
        f'submissions = ""\nbootstrap_domain = "bench.test"\nmax_connections_per_ip = 200\n'
        f"workers = {workers}\n"
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\n'
    )
    proc = start_gehirn(work)
    try:
        wait_port(port)
        pids = processes(proc.pid)
        deadline = time.monotonic() + 30
        while len(pids) < 1 + workers and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = processes(proc.pid)

        def cpu_now() -> float:
            return sum(cpu_seconds(pid) for pid in pids)

        def rss(field: str) -> float:
            return sum(rss_mb(pid, field) for pid in pids)

        row: Row = []
        done = 0
        cpu = None
        for size, count in RUNS:
            before = cpu_now()
            row.append(smtp_source(port, size, count))
            # Everything accepted is also stored and published (the event, durably).
            done += count
            start = time.monotonic()
            while len(list((work / "var" / "kvs").glob("*.eml"))) < done:
                if time.monotonic() - start > 300:
                    raise RuntimeError("not all messages were processed")
                time.sleep(0.1)
            if size == RUNS[0][0]:
                cpu = (cpu_now() - before) / count * 1000
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
        rss100 = rss("VmRSS")
        for s in socks:
            s.close()
        return [*row, cpu, rss("VmHWM"), rss100]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def aiosmtpd() -> Row:
    return sink("aiosmtpd_sink.py")


def twisted_mail() -> Row:
    return sink("twisted_sink.py")


def sink(script: str) -> Row:
    """A peer that writes and fsyncs each message and does nothing else."""
    work = workdir("bench-sink-")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / script), str(port), str(work)],
        stdout=subprocess.PIPE,
        env=ENV,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        row: Row = []
        cpu = None
        for size, count in RUNS:
            before = cpu_seconds(proc.pid)
            row.append(smtp_source(port, size, count))
            if size == RUNS[0][0]:
                cpu = (cpu_seconds(proc.pid) - before) / count * 1000
        return [*row, cpu, rss_mb(proc.pid, "VmHWM"), None]
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
        work = workdir("bench-postfix-")
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


def postfix() -> Row | None:
    if shutil.which("postfix") is None:
        return None
    port = free_port()
    with PostfixInstance(port):
        return [*(smtp_source(port, size, count) for size, count in RUNS), None, None, None]


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def main() -> None:
    rounds: dict[str, list[Row]] = {
        "gehirn-ts": [],
        WORKERS_ROW: [],
        "aiosmtpd (fsync)": [],
        TWISTED_ROW: [],
        "Postfix (queue)": [],
    }
    settle()  # after whatever ran before (make bench: the event benchmark)
    for _ in range(ROUNDS):
        rounds["gehirn-ts"].append(gehirn())
        rounds[WORKERS_ROW].append(gehirn(workers=1))
        rounds["aiosmtpd (fsync)"].append(aiosmtpd())
        rounds[TWISTED_ROW].append(twisted_mail())
        settle()
        peer = postfix()
        if peer is not None:
            rounds["Postfix (queue)"].append(peer)
            settle()  # Postfix deleted every message it accepted
    remove_workdirs()
    print(
        f"\nSMTP receiving, messages/s accepted with {SESSIONS} sessions (smtp-source), "
        f"{RUNS[0][1]} x 1 KiB and {RUNS[1][1]} x 100 KiB; {os.cpu_count()} cores; "
        f"medians of {ROUNDS} rounds taken in turn"
    )
    print(f"{'':18}{'1 KiB':>8}{'100 KiB':>8}{'CPU ms':>9}{'peak RSS':>9}{'RSS@100':>9}")
    formats = ("8.0f", "8.0f", "9.2f", "9.1f", "9.1f")
    widths = (8, 8, 9, 9, 9)
    for name, rows in rounds.items():
        if not rows:
            print(f"{name:18}{'n/a':>8}{'n/a':>8}")
            continue
        medians = [_median([row[i] for row in rows]) for i in range(len(formats))]
        print(
            f"{name:18}"
            + "".join(
                format(m, f) if m is not None else " " * w
                for m, f, w in zip(medians, formats, widths, strict=True)
            )
        )
    if rounds["Postfix (queue)"]:
        for name in ("gehirn-ts", WORKERS_ROW, TWISTED_ROW):
            for i, label in enumerate(("1 KiB", "100 KiB")):
                ratios = [
                    f"{(ours[i] or 0.0) / (theirs[i] or 1.0):.0%}"
                    for ours, theirs in zip(rounds[name], rounds["Postfix (queue)"], strict=True)
                ]
                print(f"{name} / Postfix at {label}, round by round: {', '.join(ratios)}")
    print(
        "gehirn-ts: each 250 after the spool fsync; the run waits until every message is "
        "also in the KVS with its mail.received event. CPU ms: the process's CPU time per "
        "1 KiB message (Postfix runs many processes: not measured). RSS in MB. "
        f"{WORKERS_ROW.strip()}: [smtp] workers = 1, CPU and RSS of its two processes "
        "added up. aiosmtpd and twisted.mail: the stock servers writing and fsyncing each "
        "message before the 250, and nothing else."
    )


if __name__ == "__main__":
    main()
