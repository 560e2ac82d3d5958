"""The SMTP server in the daemon process, with real clients: smtplib and swaks."""

from __future__ import annotations

import email.policy
import json
import shutil
import smtplib
import sqlite3
import ssl
import subprocess
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.integration.procs import Daemon, wait_for


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path).start()
    d.token = d.cli("account", "create", "acme")["api_key"]
    d.cli("domain", "add", "mail.test", "acme")
    d.password = d.cli("smtp-user", "create", "acme", "app")["password"]
    yield d
    d.stop()


def insecure() -> ssl.SSLContext:
    # The development certificate is self-signed.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def queue_id(reply: bytes) -> str:
    assert reply.startswith(b"2.0.0 Ok: queued as "), reply
    return reply.rsplit(b" ", 1)[1].decode()


def message(subject: str = "Hello", to: str = "user@mail.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.org"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = "<m1@example.org>"
    msg.set_content("Grüße aus dem Test.\n")
    return msg


def wire(msg: EmailMessage) -> bytes:
    # CRLF line ends: the server refuses bare LF (docs/mta.md).
    return msg.as_bytes(policy=email.policy.SMTP)


def test_submission_with_starttls_auth_and_dsn_parameters(daemon, receiver) -> None:
    status, _ = daemon.call(
        "POST", "/v1/subscriptions", {"pattern": "mail.*", "url": receiver.url}, daemon.token
    )
    assert status == 201
    with smtplib.SMTP("127.0.0.1", daemon.submission_port, timeout=10) as s:
        s.ehlo("client.test")
        assert not s.has_extn("auth")  # not before TLS
        s.starttls(context=insecure())
        s.ehlo("client.test")
        assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"]
        s.login("app", daemon.password)
        code, _ = s.mail(
            "sender@example.org", ["RET=HDRS", "ENVID=env+2B1", "BODY=8BITMIME", "SIZE=500"]
        )
        assert code == 250
        code, _ = s.rcpt(
            "user@mail.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;user@mail.test"]
        )
        assert code == 250
        code, reply = s.data(wire(message()))
        assert code == 250
    qid = queue_id(reply)
    # Stored right after the 250 (the spool already holds it durably).
    wait_for(lambda: daemon.call("GET", f"/v1/received/{qid}", token=daemon.token)[0] == 200)
    _, meta = daemon.call("GET", f"/v1/received/{qid}", token=daemon.token)
    assert meta["subject"] == "Hello" and meta["recipients"] == ["user@mail.test"]
    assert meta["dsn"] == {"ret": "HDRS", "envid": "env+1"}
    assert meta["client"]["tls"] is True and meta["client"]["authenticated"] == "acme"
    assert "Grüße aus dem Test." in meta["excerpt"]
    wait_for(lambda: receiver.hits)
    event = json.loads(receiver.hits[0].body)
    assert event["type"] == "mail.received" and event["account"] == "acme"
    assert event["data"]["envelope"]["recipients"] == [
        {
            "address": "user@mail.test",
            "notify": ["SUCCESS", "FAILURE"],
            "orcpt": ["rfc822", "user@mail.test"],
        }
    ]
    assert event["data"]["envelope"]["ret"] == "HDRS"


def test_implicit_tls_and_auth_login(daemon) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", daemon.submissions_port, context=insecure(), timeout=10
    ) as s:
        s.ehlo("client.test")
        s.login("app", daemon.password)  # smtplib picks CRAM-MD5, PLAIN, LOGIN in turn
        s.send_message(message("via 465"))


def test_smtp_users_are_listed_without_secrets(daemon) -> None:
    listed = daemon.cli("smtp-user", "list")
    assert listed == [
        {
            "username": "app",
            "account": "acme",
            "created_at": listed[0]["created_at"],
            "revoked_at": None,
        }
    ]
    assert daemon.password not in json.dumps(listed)


def test_wrong_password_is_535(daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.submission_port, timeout=10) as s:
        s.starttls(context=insecure())
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("app", "wrong")
        assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")


def test_inbound_mx_accepts_local_mail_and_is_no_open_relay(daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as s:
        s.ehlo("remote-mx.test")
        s.mail("someone@example.org")
        code, reply = s.rcpt("victim@elsewhere.example")
        assert (code, reply) == (554, b"5.7.1 Relay access denied")
        assert s.rcpt("user@mail.test")[0] == 250
        assert s.rcpt("postmaster")[0] == 250
        code, reply = s.data(wire(message()))
        assert code == 250
    wait_for(
        lambda: daemon.call("GET", f"/v1/received/{queue_id(reply)}", token=daemon.token)[0] == 200
    )


def submit_for_relay(daemon: Daemon) -> str:
    """Submission with STARTTLS and AUTH, to an outside address: the queue id."""
    with smtplib.SMTP("127.0.0.1", daemon.submission_port, timeout=10) as s:
        s.starttls(context=insecure())
        s.login("app", daemon.password)
        s.mail("app@mail.test")
        assert s.rcpt("friend@elsewhere.example")[0] == 250
        code, reply = s.data(wire(message(to="friend@elsewhere.example")))
        assert code == 250
    return queue_id(reply)


def test_authenticated_relay_goes_into_the_outbound_queue(daemon) -> None:
    qid = submit_for_relay(daemon)
    _, queued = wait_for(
        lambda: (r := daemon.call("GET", f"/v1/messages/{qid}", token=daemon.token))[0] == 200 and r
    )
    assert queued["origin"] == "submission" and queued["from"] == "app@mail.test"
    assert [r["address"] for r in queued["recipients"]] == ["friend@elsewhere.example"]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="make test installs swaks")
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_tls_auth(daemon, mechanism) -> None:
    out = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{daemon.submission_port}",
            "--tls",
            "--auth",
            mechanism,
            "--auth-user",
            "app",
            "--auth-password",
            daemon.password,
            "--from",
            "app@mail.test",
            "--to",
            "user@mail.test",
            "--header",
            "Subject: swaks",
            "--body",
            "hello from swaks",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "235 2.7.0 Authentication succeeded" in out.stdout
    assert "250 2.0.0 Ok: queued as" in out.stdout


def test_kill_in_the_middle_of_500_messages_loses_and_duplicates_nothing(daemon) -> None:
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as s:
                s.ehlo("client.test")
                for i in range(125):
                    if stop.is_set():
                        return
                    s.mail("sender@example.org")
                    s.rcpt("user@mail.test")
                    code, reply = s.data(wire(message(f"{n}-{i}")))
                    if code == 250:
                        with lock:
                            accepted.append(queue_id(reply))
        except (OSError, smtplib.SMTPException):
            return  # the daemon is gone: what was not answered 250 was never accepted

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(accepted) >= 150, timeout=120)
    daemon.kill()
    stop.set()
    for t in threads:
        t.join(30)
    daemon.start()

    def stored(qid: str) -> bool:
        return daemon.call("GET", f"/v1/received/{qid}", token=daemon.token)[0] == 200

    wait_for(lambda: all(stored(q) for q in accepted), timeout=120)
    for qid in accepted:
        status, _ = daemon.call("GET", f"/v1/events/received.{qid}.acme", token=daemon.token)
        assert status == 200, qid
    db = sqlite3.connect(daemon.state / "gehirn-ts.sqlite")
    dupes = db.execute("SELECT id FROM received GROUP BY id HAVING count(*) > 1").fetchall()
    assert dupes == []
    kvs = list((daemon.state / "kvs").iterdir())
    assert len(kvs) == len({p.name for p in kvs}) >= len(accepted)
    print(
        f"\n{len(accepted)} messages got a 250 before the kill; all stored with their "
        f"event after the restart; {len(kvs)} objects in the KVS, none duplicated"
    )


def test_spf_fail_is_refused_and_dkim_verdicts_are_recorded(daemon, receiver) -> None:
    import base64

    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.dnstest import dns_server

    dns = dns_server()
    dns.set("spf-fail.example", "TXT", "v=spf1 -all")
    dns.set("signer.example", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    dns.set(
        "k1._domainkey.signer.example",
        "TXT",
        "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode(),
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    daemon.call(
        "POST", "/v1/subscriptions", {"pattern": "mail.*", "url": receiver.url}, daemon.token
    )
    body = wire(message())
    signed = dkim.sign(body, b"k1", b"signer.example", pem) + body
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        code, reply = s.mail("forger@spf-fail.example")
        assert code == 550 and reply.startswith(b"5.7.23 SPF validation failed")
        assert s.mail("news@signer.example")[0] == 250
        assert s.rcpt("user@mail.test")[0] == 250
        code, reply = s.data(signed)
        assert code == 250
    qid = queue_id(reply)
    wait_for(lambda: receiver.hits)
    event = json.loads(receiver.hits[0].body)
    assert event["data"]["auth"]["spf"]["result"] == "pass"
    assert event["data"]["auth"]["dkim"] == [
        {"result": "pass", "domain": "signer.example", "selector": "k1"}
    ]
    raw = subprocess.run(
        [
            "curl",
            "-s",
            "-H",
            f"Authorization: Bearer {daemon.token}",
            f"{daemon.base}/v1/received/{qid}/raw",
        ],
        capture_output=True,
        check=True,
    ).stdout
    assert raw.startswith(
        b"Authentication-Results: localhost; spf=pass "
        b"smtp.mailfrom=signer.example; dkim=pass header.d=signer.example "
        b"header.s=k1\r\nReceived-SPF: Pass "
    )


def test_routes_reject_unknown_and_forward(daemon) -> None:
    token = daemon.token
    # A route in a domain the account does not own is refused.
    status, body = daemon.call("POST", "/v1/routes", {"match": "x@other.test"}, token)
    assert status == 403 and body["error"]["field"] == "match"
    status, body = daemon.call("POST", "/v1/routes", {"match": "bad address"}, token)
    assert status == 400 and body["error"]["field"] == "match"
    status, body = daemon.call(
        "POST", "/v1/routes", {"match": "fwd@mail.test", "action": "forward"}, token
    )
    assert status == 400 and body["error"]["field"] == "forward_to"
    for route in (
        {"match": "sales@mail.test"},
        {"match": "spam@mail.test", "action": "reject"},
        {"match": "fwd@mail.test", "action": "forward", "forward_to": ["boss@elsewhere.example"]},
    ):
        status, body = daemon.call("POST", "/v1/routes", route, token)
        assert status == 201, body
    status, _ = daemon.call("POST", "/v1/routes", {"match": "sales@mail.test"}, token)
    assert status == 409
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("someone@example.org")
        assert s.rcpt("sales@mail.test")[0] == 250
        # The domain now lists its addresses: others are unknown.
        assert s.rcpt("nobody@mail.test") == (550, b"5.1.1 No such user here")
        assert s.rcpt("spam@mail.test") == (550, b"5.1.1 No such user here")
        assert s.rcpt("postmaster@mail.test")[0] == 250  # RFC 5321 4.5.1
        assert s.rcpt("fwd@mail.test")[0] == 250
        code, reply = s.data(wire(message(to="fwd@mail.test")))
        assert code == 250
    # Forwarded through the outbound queue, with an envelope sender of our own.
    fwd = f"{queue_id(reply)}.fwd0"
    _, queued = wait_for(
        lambda: (r := daemon.call("GET", f"/v1/messages/{fwd}", token=token))[0] == 200 and r
    )
    assert queued["origin"] == "forward" and queued["from"] == "postmaster@localhost"
    assert [r["address"] for r in queued["recipients"]] == ["boss@elsewhere.example"]
    # A catch-all route makes every address known again.
    status, _ = daemon.call("POST", "/v1/routes", {"match": "@mail.test"}, token)
    assert status == 201
    _, listed = daemon.call("GET", "/v1/routes", token=token)
    assert len(listed["routes"]) == 4
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("someone@example.org")
        assert s.rcpt("nobody@mail.test")[0] == 250


def test_raw_socket_pipelining_starttls_and_smuggling(daemon) -> None:
    """Item 5 over a real socket: pipelined commands in order, STARTTLS discarding what
    follows it in clear, and a bare-LF 'end of data' that ends nothing."""
    import socket

    def read_replies(sock: socket.socket, count: int) -> list[bytes]:
        data = b""
        while data.count(b"\r\n") < count or not _complete(data, count):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return [line for line in data.split(b"\r\n") if line[3:4] == b" "]

    def _complete(data: bytes, count: int) -> bool:
        return sum(1 for line in data.split(b"\r\n") if line[3:4] == b" ") >= count

    with socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=10) as sock:
        assert read_replies(sock, 1)[0].startswith(b"220 ")
        sock.sendall(
            b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<user@mail.test>\r\n"
            b"RCPT TO:<x@elsewhere.example>\r\nNOOP\r\nDATA\r\n"
            b"Subject: s\r\n\r\nline\n.\nMAIL FROM:<evil@example.org>\r\n.\r\n"
            b"NOOP\r\n"
        )
        replies = read_replies(sock, 8)
        assert [r[:9] for r in replies] == [
            b"250 START",
            b"250 2.1.0",
            b"250 2.1.5",
            b"554 5.7.1",
            b"250 2.0.0",
            b"354 End d",
            b"554 5.6.0",
            b"250 2.0.0",
        ]
    with socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=10) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO c.test\r\n")
        read_replies(sock, 1)
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
        assert read_replies(sock, 1) == [b"220 2.0.0 Ready to start TLS"]
        tls = insecure().wrap_socket(sock, server_hostname="localhost")
        tls.sendall(b"MAIL FROM:<a@example.org>\r\n")
        # The clear-text MAIL was dropped and the session starts over.
        assert read_replies(tls, 1) == [b"503 5.5.1 Send EHLO or HELO first"]


def test_received_mail_is_per_account(daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("someone@example.org")
        s.rcpt("user@mail.test")
        code, reply = s.data(wire(message()))
        assert code == 250
    qid = queue_id(reply)
    wait_for(lambda: daemon.call("GET", f"/v1/received/{qid}", token=daemon.token)[0] == 200)
    other = daemon.cli("account", "create", "other")["api_key"]
    assert daemon.call("GET", f"/v1/received/{qid}", token=other)[0] == 404
    assert daemon.call("GET", f"/v1/received/{qid}/raw", token=other)[0] == 404
    assert daemon.call("GET", f"/v1/received/{qid}", token=daemon.admin)[0] == 200
