"""``[smtp] workers``: SMTP sessions in worker processes, the rest in the main process."""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.procs import BIN, ENV, Daemon, wait_for
from tests.integration.test_smtp_daemon import (
    insecure,
    message,
    queue_id,
    submit_for_relay,
    wire,
)
from tests.support import child_processes


def workers_of(d: Daemon) -> list[int] | None:
    """The daemon's two workers, once both run."""
    assert d.proc is not None
    found = child_processes(d.proc.pid)
    return found if len(found) == 2 else None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, smtp={"workers": 2}).start()
    d.token = d.cli("account", "create", "acme")["api_key"]
    d.cli("domain", "add", "mail.test", "acme")
    d.password = d.cli("smtp-user", "create", "acme", "app")["password"]
    wait_for(lambda: workers_of(d))
    yield d
    d.stop()


def counter(d: Daemon, name: str, listener: str) -> float:
    return metric(d, f'{name}{{listener="{listener}"}}')


def metric(d: Daemon, sample: str) -> float:
    with urllib.request.urlopen(d.base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(f"{sample} "):
            return float(line.split()[-1])
    return 0.0


def stored(d: Daemon, qid: str) -> bool:
    return d.call("GET", f"/v1/received/{qid}", token=d.token)[0] == 200


def test_workers_take_the_sessions_and_the_main_process_stores_and_relays(daemon) -> None:
    assert daemon.proc is not None
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as s:
        s.ehlo("remote-mx.test")
        s.mail("someone@example.org")
        assert s.rcpt("victim@elsewhere.example") == (554, b"5.7.1 Relay access denied")
        # The domain was added (by the CLI) after the workers started: they read the store.
        assert s.rcpt("user@mail.test")[0] == 250
        code, reply = s.data(wire(message()))
        assert code == 250
    qid = queue_id(reply)
    wait_for(lambda: stored(daemon, qid))
    status, event = daemon.call("GET", f"/v1/events/received.{qid}.acme", token=daemon.token)
    assert status == 200 and "Hello" in json.dumps(event)
    # Submission: STARTTLS and AUTH in the worker, the outbound queue in the main process.
    relayed = submit_for_relay(daemon)
    wait_for(lambda: daemon.call("GET", f"/v1/messages/{relayed}", token=daemon.token)[0] == 200)
    # The workers' counters reach the main process's /metrics.
    wait_for(lambda: counter(daemon, "gehirn_mail_received_total", "smtp") == 1.0, timeout=10)
    wait_for(lambda: counter(daemon, "gehirn_smtp_sessions_total", "submission") == 1.0)
    assert counter(daemon, "gehirn_smtp_tls_sessions_total", "submission") == 1.0
    # The main process logs what a worker accepted; the workers' own lines are in its
    # log too, marked with the worker.
    wait_for(lambda: f"received {qid} from 127.0.0.1: " in daemon.output())
    lines = daemon.output().splitlines()
    assert any("[smtp-worker-1] EsmtpFactory starting on" in x for x in lines)
    assert any("[smtp-worker-2] EsmtpFactory starting on" in x for x in lines)
    assert "Traceback" not in daemon.output()


def test_a_killed_worker_starts_again_and_nothing_acknowledged_is_lost(daemon) -> None:
    assert daemon.proc is not None
    before = child_processes(daemon.proc.pid)
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        for i in range(200):
            if stop.is_set():
                return
            try:
                with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as s:
                    s.ehlo("client.test")
                    s.mail("sender@example.org")
                    s.rcpt("user@mail.test")
                    code, reply = s.data(wire(message(f"{n}-{i}")))
                    if code == 250:
                        with lock:
                            accepted.append(queue_id(reply))
            except (OSError, smtplib.SMTPException):
                continue  # the session's worker was killed: nothing was acknowledged

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(accepted) >= 60, timeout=120)
    os.kill(before[0], signal.SIGKILL)
    count_at_kill = len(accepted)
    wait_for(lambda: len(accepted) >= count_at_kill + 60, timeout=120)
    stop.set()
    for t in threads:
        t.join(30)
    after = wait_for(lambda: workers_of(daemon))
    assert before[0] not in after and before[1] in after
    wait_for(lambda: all(stored(daemon, q) for q in accepted), timeout=120)
    assert "SMTP worker 1 ended" in daemon.output() or "SMTP worker 2 ended" in daemon.output()


def test_the_workers_end_with_the_main_process(daemon) -> None:
    assert daemon.proc is not None
    workers = child_processes(daemon.proc.pid)
    assert daemon.terminate() in (0, -signal.SIGTERM)
    assert "Server Shut Down." in daemon.output()
    assert not any(alive(pid) for pid in workers)
    # Killed, the main process leaves its workers a closed pipe, and they end too.
    daemon.start()
    assert daemon.proc is not None
    workers = wait_for(lambda: workers_of(daemon))
    daemon.kill()
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=15)
    # And the next start binds the listeners again and takes mail.
    daemon.start()
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("sender@example.org")
        s.rcpt("user@mail.test")
        code, reply = s.data(wire(message()))
    assert code == 250
    wait_for(lambda: stored(daemon, queue_id(reply)))
    time.sleep(0.1)


def _start_fails(tmp_path: Path, smtp: dict[str, object]) -> str:
    """Start a daemon that must refuse to run; its output."""
    tmp_path.mkdir()
    d = Daemon(tmp_path, smtp=smtp)
    out = subprocess.run(
        [
            str(BIN / "gehirn-tsd"),
            "--nodaemon",
            "--pidfile=",
            "gehirn-ts",
            "--config",
            str(d.config),
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    return out.stdout + out.stderr


def test_workers_refuse_an_ssl_listener_and_a_port_that_is_taken(tmp_path: Path) -> None:
    text = _start_fails(
        tmp_path / "a",
        {"workers": 1, "submissions": "ssl:0:privateKey=key.pem:certKey=cert.pem"},
    )
    assert "smtp.workers" in text and "ssl:" in text
    # A port another process holds: the start fails, as it does without workers.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = _start_fails(
            tmp_path / "b", {"workers": 1, "listen": f"tcp:{port}:interface=127.0.0.1"}
        )
    assert "Address already in use" in text or "CannotListenError" in text or str(port) in text


def test_a_message_a_worker_spooled_and_never_reported_is_processed_without_a_restart(
    tmp_path: Path,
) -> None:
    from gehirn_ts.mta.spool import ENVELOPE_ATTRIBUTE, Envelope, Recipient

    d = Daemon(tmp_path, smtp={"workers": 1, "spool_retry": "1s"}).start()
    try:
        token = d.cli("account", "create", "acme")["api_key"]
        d.cli("domain", "add", "mail.test", "acme")
        # What a worker killed between its commit and its report leaves: the message in
        # incoming/ with its envelope, and no 250 sent (so never handed on).
        qid = "1A2B3C4D5E6F7A8B9C0D1"
        incoming = d.state / "spool" / "incoming"
        envelope = Envelope(
            qid,
            "sender@example.org",
            [Recipient("user@mail.test")],
            0,
            time.time() - 120,
            "192.0.2.7",
            "client.test",
            "smtp",
            False,
        )
        data = wire(message("left behind"))
        envelope.size = len(data)
        partial = incoming / f".{qid}.part"
        partial.write_bytes(data)
        os.setxattr(partial, ENVELOPE_ATTRIBUTE, envelope.to_json())
        os.replace(partial, incoming / f"{qid}.eml")
        # Written just now: left alone for a minute (it could be on its way), and seen
        # by the CLI and the gauge meanwhile.
        [listed] = d.cli("spool", "list")
        assert (listed["id"], listed["sender"], listed["recipients"]) == (
            qid,
            "sender@example.org",
            ["user@mail.test"],
        )
        assert listed["size"] == len(data) and listed["client_ip"] == "192.0.2.7"
        assert metric(d, "gehirn_spool_messages") == 1.0
        os.utime(incoming / f"{qid}.eml", (time.time() - 120, time.time() - 120))
        wait_for(lambda: d.call("GET", f"/v1/received/{qid}", token=token)[0] == 200)
        status, event = d.call("GET", f"/v1/events/received.{qid}.acme", token=token)
        assert status == 200 and "left behind" in json.dumps(event)
        wait_for(lambda: not (incoming / f"{qid}.eml").exists())
        assert "processed 1 messages left in the spool" in d.output()
        assert d.cli("spool", "list") == [] and metric(d, "gehirn_spool_messages") == 0.0
    finally:
        d.stop()


def test_the_per_ip_limits_hold_over_all_workers(tmp_path: Path) -> None:
    d = Daemon(
        tmp_path, smtp={"workers": 2, "max_connections_per_ip": 2, "auth_failures": 3}
    ).start()
    try:
        one, other = wait_for(lambda: workers_of(d))

        def only(pid: int) -> None:
            """Sessions from now on go to worker ``pid``: the other is stopped, after
            ``pid`` had a moment to read the notices the main process sent it."""
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.3)
            os.kill(other if pid == one else one, signal.SIGSTOP)

        def session() -> tuple[bytes, socket.socket]:
            sock = socket.create_connection(("127.0.0.1", d.smtp_port), timeout=10)
            return sock.makefile("rb").readline()[:3], sock

        def auth(password: bytes) -> int:
            with smtplib.SMTP_SSL(
                "127.0.0.1", d.submissions_port, context=insecure(), timeout=10
            ) as s:
                s.ehlo("client.test")
                plain = base64.b64encode(b"\0someone\0" + password).decode()
                return s.docmd("AUTH", "PLAIN " + plain)[0]

        # Two sessions in one worker: the other, which has none, refuses a third.
        only(one)
        first, second = session(), session()
        assert (first[0], second[0]) == (b"220", b"220")
        only(other)
        third = session()
        assert third[0] == b"421"
        for _, sock in (first, second, third):
            sock.close()
        # Three failed AUTH attempts in one worker: the other refuses AUTH too.
        only(one)
        assert [auth(b"wrong") for _ in range(3)] == [535] * 3
        only(other)
        assert auth(b"wrong") == 454

        # A limit changed by SIGHUP holds over the workers too.
        for pid in (one, other):
            os.kill(pid, signal.SIGCONT)
        assert d.proc is not None
        d.config.write_text(
            d.config.read_text().replace("max_connections_per_ip = 2", "max_connections_per_ip = 1")
        )
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.output().count("reloaded the configuration") == 3)  # and workers
        only(one)
        held = session()
        assert held[0] == b"220"
        only(other)
        assert session()[0] == b"421"
        held[1].close()
    finally:
        for pid in workers_of(d) or []:
            os.kill(pid, signal.SIGCONT)
        d.stop()
