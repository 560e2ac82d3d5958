"""The daemon as users run it: twistd -n gehirn-ts, in its own process."""

from __future__ import annotations

import base64
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from gehirn_ts.recent import LOOKUP_SECONDS
from tests.integration.procs import BIN, ENV, ROOT, Daemon, Receiver, http, wait_for

SECRET = "whsec_" + base64.b64encode(b"integration-secret-bytes-32long!").decode()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[type[Daemon]]:
    started: list[Daemon] = []

    def factory(**sections: dict[str, object]) -> Daemon:
        workdir = tmp_path / f"d{len(started)}"
        workdir.mkdir()
        daemon = Daemon(workdir, **sections)
        started.append(daemon)
        return daemon

    yield factory  # type: ignore[misc]
    for daemon in started:
        daemon.stop()


def setup_account(daemon: Daemon, receiver: Receiver, pattern: str = "#") -> str:
    token = str(daemon.cli("account", "create", "acme")["api_key"])
    status, body = daemon.call(
        "POST",
        "/v1/subscriptions",
        {"pattern": pattern, "url": receiver.url + "/hook", "secret": SECRET},
        token,
    )
    assert status == 201, body
    return token


def delivered(daemon: Daemon, token: str, event_id: str) -> dict[str, object] | None:
    status, body = daemon.call("GET", f"/v1/events/{event_id}", token=token)
    if (
        status == 200
        and body["deliveries"]
        and all(d["status"] == "delivered" for d in body["deliveries"])
    ):
        return dict(body)
    return None


def test_twistd_lists_the_installed_plugin(tmp_path: Path) -> None:
    # The installed package (make test runs pip install .), not the work tree.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(BIN / "twistd"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "gehirn-ts" in out.stdout


def test_publish_signed_delivery_after_two_503s(make_daemon, receiver) -> None:
    daemon = make_daemon().start()
    receiver.plan = [503, 503]
    token = setup_account(daemon, receiver)
    status, body = daemon.call(
        "POST", "/v1/events", {"type": "notice.maintenance", "data": {"window": "02:00"}}, token
    )
    assert status == 202
    event_id = body["id"]
    result = wait_for(lambda: delivered(daemon, token, event_id))
    attempts = result["deliveries"][0]["attempt_log"]
    assert [a["status_code"] for a in attempts] == [503, 503, 200]
    assert len(receiver.hits) == 3
    for hit in receiver.hits:
        payload = Webhook(SECRET).verify(hit.body, hit.headers)
        assert payload["id"] == event_id
        assert payload["data"] == {"window": "02:00"}


def test_kill_right_after_202_loses_nothing(make_daemon, receiver) -> None:
    daemon = make_daemon().start()
    token = setup_account(daemon, receiver)
    receiver.hold = threading.Event()  # nothing can complete before the kill
    status, body = daemon.call("POST", "/v1/events", {"type": "notice.fault"}, token)
    assert status == 202
    daemon.kill()
    receiver.hold.set()
    receiver.hold = None
    daemon.start()
    wait_for(lambda: delivered(daemon, token, body["id"]))
    assert body["id"] in receiver.ids()


def test_kill_during_an_attempt_and_during_a_retry_wait(make_daemon, receiver) -> None:
    daemon = make_daemon(edj={"retry_schedule": ["3s"]}).start()
    token = setup_account(daemon, receiver)
    # 1: killed while the receiver holds the request open.
    receiver.hold = threading.Event()
    _, first = daemon.call("POST", "/v1/events", {"type": "notice.fault"}, token)
    wait_for(lambda: receiver.hits)
    daemon.kill()
    receiver.hold.set()
    receiver.hold = None
    # 2: killed while waiting for a retry (the receiver answered 503).
    daemon.start()
    wait_for(lambda: delivered(daemon, token, first["id"]))
    receiver.plan = [503]
    seen = len(receiver.hits)
    _, second = daemon.call("POST", "/v1/events", {"type": "notice.fault"}, token)
    wait_for(lambda: len(receiver.hits) > seen)
    daemon.kill()
    daemon.start()
    wait_for(lambda: delivered(daemon, token, second["id"]))
    ids = receiver.ids()
    assert ids.count(first["id"]) >= 2  # attempted, killed, attempted again
    assert ids.count(second["id"]) == 2  # 503, then 200 after the restart


def test_kill_in_the_middle_of_a_stream(make_daemon, receiver) -> None:
    daemon = make_daemon().start()
    token = setup_account(daemon, receiver)
    acknowledged: list[str] = []
    stop = threading.Event()

    def publish() -> None:
        for n in range(1000):
            if stop.is_set():
                return
            try:
                status, body = daemon.call(
                    "POST", "/v1/events", {"type": "notice.fault", "data": {"n": n}}, token
                )
            except OSError:
                return  # the daemon is gone: this event was never acknowledged
            if status == 202:
                acknowledged.append(body["id"])

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acknowledged) >= 200, timeout=120)
    daemon.kill()
    stop.set()
    for t in threads:
        t.join(30)
    daemon.start()
    wanted = set(acknowledged)
    wait_for(lambda: wanted <= set(receiver.ids()), timeout=120)
    counts = collections.Counter(receiver.ids())
    duplicated = sum(1 for i in wanted if counts[i] > 1)
    print(f"\n{len(wanted)} acknowledged, all delivered, {duplicated} delivered more than once")


def test_sigterm_stops_cleanly_and_keeps_work_queued(make_daemon, receiver) -> None:
    daemon = make_daemon(edj={"http_timeout": "1s", "retry_schedule": ["1s"]}).start()
    token = setup_account(daemon, receiver)
    receiver.hold = threading.Event()  # an attempt is in flight at SIGTERM
    _, body = daemon.call("POST", "/v1/events", {"type": "notice.fault"}, token)
    wait_for(lambda: receiver.hits)
    started = time.monotonic()
    # twistd re-raises SIGTERM after a clean shutdown, so the status is "killed by SIGTERM",
    # which systemd counts as a clean stop.
    assert daemon.terminate() in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 20
    assert "Main loop terminated." in daemon.output()
    assert "Traceback" not in daemon.output()
    receiver.hold.set()
    receiver.hold = None
    daemon.start()
    wait_for(lambda: delivered(daemon, token, body["id"]))


def test_bad_config_lists_every_bad_key_and_exits_nonzero(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[http]\nlisten = "carrier-pigeon"\nmax_body = -1\n[edj]\nretry_jitter = 5\n[nonsense]\n'
    )
    out = subprocess.run(
        [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "gehirn-ts", "--config", str(config)],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    for path in ("http.listen", "http.max_body", "edj.retry_jitter", "nonsense"):
        assert path in out.stderr, out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_embedded_defaults_without_a_config(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(BIN / "twistd"), "--nodaemon", "--pidfile=", "gehirn-ts"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                return http("GET", "http://127.0.0.1:8025/healthz", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(up)
        assert (tmp_path / "var" / "gehirn-ts.sqlite").exists()
        assert (tmp_path / "var" / "tls" / "dev-cert.pem").exists()  # made on first start
        # ... and the development DKIM key of the bootstrap domain.
        keys = subprocess.run(
            [sys.executable, "-m", "gehirn_ts.cli", "--json", "dkim", "list"],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            check=True,
            text=True,
        )
        assert [(k["domain"], k["selector"]) for k in json.loads(keys.stdout)] == [
            ("localhost", "dev")
        ]
        admin = (tmp_path / "var" / "admin.key").read_text().strip()
        assert oct((tmp_path / "var" / "admin.key").stat().st_mode & 0o777) == "0o600"
        assert http("GET", "http://127.0.0.1:8025/v1/subscriptions", token=admin)[0] == 200
        # make run's SMTP: mail for localhost on 2525, owned by the account "local".
        import smtplib

        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as s:
            s.ehlo("client.test")
            s.mail("someone@example.org")
            assert s.rcpt("anyone@localhost")[0] == 250
            assert s.rcpt("other@example.net")[0] == 554
            code, reply = s.data(b"Subject: hi\r\n\r\nhello\r\n")
            assert code == 250
        qid = reply.rsplit(b" ", 1)[1].decode()
        wait_for(
            lambda: http("GET", f"http://127.0.0.1:8025/v1/received/{qid}", token=admin)[0] == 200
        )
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # Not a terminal: the key is not shown (under systemd stderr is the journal), only
    # where it is.
    assert admin not in err.decode() and "var/admin.key" in err.decode()


def test_cli_accounts_and_keys(make_daemon) -> None:
    daemon = make_daemon().start()
    created = daemon.cli("account", "create", "acme")
    assert created["account"] == "acme" and created["api_key"].startswith("gts_")
    assert [a["name"] for a in daemon.cli("account", "list")] == ["acme"]
    extra = daemon.cli("key", "create", "acme")
    assert daemon.call("GET", "/v1/subscriptions", token=extra["api_key"])[0] == 200
    assert daemon.cli("key", "revoke", extra["key_id"]) == {"revoked": extra["key_id"]}
    # The daemon keeps a valid key's answer a few seconds (docs/decisions.md, "API
    # keys"): a key revoked by another process is refused within them.
    wait_for(
        lambda: daemon.call("GET", "/v1/subscriptions", token=extra["api_key"])[0] == 401,
        timeout=LOOKUP_SECONDS + 5,
    )
    assert daemon.call("GET", "/v1/subscriptions", token=created["api_key"])[0] == 200
    keys = daemon.cli("key", "list")
    assert {k["id"] for k in keys} >= {created["key_id"], extra["key_id"]}
    assert all("api_key" not in k and "hash" not in k for k in keys)
    assert "exists already" in daemon.cli_error("account", "create", "acme")


def test_root_has_no_plugins_init() -> None:
    # twisted/plugins must stay a namespace: an __init__.py there would shadow Twisted's.
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "__init__.py").exists()
