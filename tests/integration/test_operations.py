"""Operating the daemon: SIGHUP reloads, JSON logs, and no secret in any log line."""

from __future__ import annotations

import hashlib
import json
import signal
import smtplib
import ssl
import time
from pathlib import Path

import pytest

from gehirn_ts.mta.tls import make_self_signed
from tests.integration.procs import Daemon, Receiver, wait_for


def _fingerprint(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=ssl._create_unverified_context())
        der = s.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    return hashlib.sha256(der).hexdigest()


def _relay_allowed(port: int) -> bool:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("legacy.lan")
        s.mail("scanner@legacy.lan")
        return s.rcpt("someone@far.example")[0] == 250


@pytest.mark.parametrize("workers", [0, 2])
def test_sighup_reloads_the_certificate_and_the_relay_policy(tmp_path: Path, workers: int) -> None:
    """In the main process, or in each SMTP worker (the main process passes SIGHUP on):
    every session after the reload has the new settings, whichever worker takes it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed(cert, key, "mx.ops.test")
    d = Daemon(
        tmp_path, smtp={"tls_cert": str(cert), "tls_key": str(key), "workers": workers}
    ).start()
    try:
        first = _fingerprint(d.submission_port)
        assert not any(_relay_allowed(d.smtp_port) for _ in range(6))
        # A renewed certificate and a trusted network, then SIGHUP.
        cert.unlink()
        key.unlink()
        make_self_signed(cert, key, "mx.ops.test")
        text = d.config.read_text().replace(
            "[smtp]\n", '[smtp]\ntrusted_networks = ["127.0.0.0/8"]\n', 1
        )
        d.config.write_text(text)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(_fingerprint(d.submission_port) != first for _ in range(6)))
        wait_for(lambda: all(_relay_allowed(d.smtp_port) for _ in range(6)))
        # A config with an error is refused whole: nothing changes, the daemon runs on.
        d.config.write_text(text.replace("[smtp]\n", "[smtp]\nmax_recipients = -1\n", 1))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "smtp.max_recipients" in d.output())
        assert "not reloaded" in d.output()
        assert all(_relay_allowed(d.smtp_port) for _ in range(6)) and d.proc.poll() is None
    finally:
        d.stop()


def test_json_logs_carry_fields_and_no_secret(tmp_path: Path) -> None:
    receiver = Receiver(plan=[500])
    d = Daemon(tmp_path, twistd_args=("--logger", "gehirn_ts.logs.json_observer")).start()
    try:
        token = d.cli("account", "create", "acme")["api_key"]
        d.cli("domain", "add", "ops.test", "acme")
        password = d.cli("smtp-user", "create", "acme", "app")["password"]
        secret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
        status, sub = d.call(
            "POST",
            "/v1/subscriptions",
            {
                "pattern": "#",
                "url": receiver.url.replace("http://", "http://user:hunter2@"),
                "secret": secret,
            },
            token,
        )
        assert status == 201, sub
        status, body = d.call("POST", "/v1/events", {"type": "notice.fault", "source": "/x"}, token)
        assert status == 202
        with smtplib.SMTP("127.0.0.1", d.submission_port, timeout=10) as s:
            s.starttls(context=ssl._create_unverified_context())
            try:
                s.login("app", "not-" + password)
            except smtplib.SMTPAuthenticationError:
                pass
            s.login("app", password)
            s.sendmail("app@ops.test", ["x@ops.test"], b"Subject: x\r\n\r\nhi\r\n")
        wait_for(lambda: len(receiver.hits) >= 2)  # the 500, then the retry
        time.sleep(0.5)
        lines = [line for line in d.output().splitlines() if line.startswith("{")]
        records = [json.loads(line) for line in lines]
        assert records and all({"time", "level", "message"} <= set(r) for r in records)
        attempts = [r for r in records if r.get("delivery_id") and r.get("outcome")]
        assert attempts and attempts[0]["event_id"] == body["id"]
        assert "hunter2" not in attempts[0]["destination"]
        received = [r for r in records if r.get("qid") and "received" in r["message"]]
        assert received
        log_text = d.output()
        for secret_text in (
            token,
            token.split("_", 2)[2],  # the secret part (it may itself contain "_")
            password,
            "not-" + password,
            "hunter2",
            secret[6:],
        ):
            assert secret_text not in log_text, secret_text
    finally:
        d.stop()
        receiver.close()
