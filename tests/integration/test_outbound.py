"""Sending mail end to end: the HTTP send API and SMTP submission -> DKIM -> the queue ->
MX lookup (a twisted.names server on loopback) -> Postfix's smtp-sink or gehirn-ts's own
inbound server -> status events and RFC 3464 reports."""

from __future__ import annotations

import base64
import email
import email.policy
import smtplib
import ssl
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gehirn_ts.dnsresolver import make_async_resolver
from gehirn_ts.mta.dkim import SigningKey, dns_record, generate, verify
from gehirn_ts.store.db import MailStore
from gehirn_ts.store.keys import DkimKeyStore
from gehirn_ts.threaddns import ThreadDNS
from tests.dnstest import dns_server
from tests.harness import Daemon, Receiver
from tests.sink import Sink
from tests.support import free_port, inline, until

ROOT = Path(__file__).resolve().parents[2]


def events_of(receiver: Receiver, etype: str) -> list[dict[str, Any]]:
    import json

    out = []
    for hit in receiver.hits:
        event = json.loads(hit.body)
        if event["type"] == etype:
            out.append(event)
    return out


class OutboundTests(TestCase):
    timeout = 60

    async def _daemon(self, port: int, **sections: Any) -> Daemon:
        sections.setdefault("outbound", {})["port"] = port
        return await Daemon(self, dns=dns_server().config(), **sections).start()

    def _sink(self, port: int, *flags: str, ip: str = "127.0.0.2") -> Sink:
        sink = Sink(ip, *flags, port=port)
        self.addCleanup(sink.stop)
        return sink

    @inline
    async def test_send_api_signs_delivers_and_reports_each_recipient(self) -> None:
        zone = dns_server()
        port = free_port()
        sink = self._sink(port)
        zone.mx("dest1.test", "127.0.0.2", host="mx1.dest1.test")
        d = await self._daemon(port, smtp={"hostname": "mta.sender1.test"})
        token = await d.account("acme")
        await MailStore(d.store).add_domain("sender1.test", "acme")
        keys = DkimKeyStore(d.store)
        for algorithm, selector in (("rsa", "r1"), ("ed25519", "e1")):
            private, public = generate(algorithm)
            await keys.add(SigningKey("sender1.test", selector, algorithm, private))
            name, value = dns_record("sender1.test", selector, algorithm, public)
            zone.set(name, "TXT", value)
        receiver = Receiver()
        await d.subscribe(token, "mail.#", receiver.listen(self))

        request = {
            "from": "Acme Billing <billing@sender1.test>",
            "to": ["Bob <bob@dest1.test>"],
            "cc": "carol@dest1.test",
            "bcc": ["dave@dest1.test"],
            "subject": "Grüße: your invoice",
            "text": "Hello Bob,\n.\nA line with a lone dot above.\n",
            "html": "<p>Hello <b>Bob</b></p>",
            "attachments": [
                {
                    "filename": "invoice.pdf",
                    "content": base64.b64encode(b"%PDF-1.4 \x00\xff").decode(),
                    "content_type": "application/pdf",
                }
            ],
            "headers": {"X-Campaign": "nov"},
            "tags": ["invoice"],
            "metadata": {"customer": "42"},
            "dsn": {"notify": ["SUCCESS", "FAILURE"], "ret": "HDRS", "envid": "ENV-1"},
        }
        idem = {"Idempotency-Key": "invoice-42"}
        status, body = await d.call("POST", "/v1/messages", request, token=token, headers=idem)
        assert status == 202, body
        mid = body["id"]
        # The same request again: the same message, nothing queued twice.
        status, again = await d.call("POST", "/v1/messages", request, token=token, headers=idem)
        assert (status, again["id"]) == (202, mid)
        status, other = await d.call(
            "POST", "/v1/messages", {**request, "subject": "x"}, token=token, headers=idem
        )
        assert status == 409 and other["error"]["field"] == "Idempotency-Key"

        await until(lambda: len(sink.captured()) >= 1)
        await until(lambda: len(events_of(receiver, "mail.delivered")) == 3)
        (cap,) = sink.captured()
        assert "RET=HDRS" in cap.mail_args and "ENVID=ENV-1" in cap.mail_args
        assert cap.mail_args.startswith("<billing@sender1.test>")
        assert sorted(cap.rcpt_args) == [
            f"<{a}@dest1.test> NOTIFY=SUCCESS,FAILURE" for a in ("bob", "carol", "dave")
        ]
        msg = cap.message
        assert msg["Subject"] == "Grüße: your invoice"
        assert msg["Message-ID"] == f"<{mid}@mta.sender1.test>"
        assert msg["Bcc"] is None and "dave" not in str(msg["To"]) + str(msg["Cc"])
        assert msg["X-Campaign"] == "nov"
        text = msg.get_body(preferencelist=("plain",))
        assert text is not None and "\n.\nA line with a lone dot" in text.get_content()
        (attachment,) = list(msg.iter_attachments())
        assert attachment.get_filename() == "invoice.pdf"
        assert attachment.get_content() == b"%PDF-1.4 \x00\xff"

        # DKIM: an independent verifier (Perl's Mail::DKIM) for RSA; Debian 12's
        # Mail::DKIM predates Ed25519 (RFC 8463), which dkimpy's verifier checks.
        perl = await deferToThread(
            subprocess.run,
            ["perl", str(ROOT / "tests" / "dkim_verify.pl"), str(zone.port)],
            input=cap.raw,
            capture_output=True,
            check=True,
        )
        lines = perl.stdout.decode().splitlines()
        assert "pass sender1.test r1 rsa-sha256" in lines, (lines, perl.stderr)
        resolver = ThreadDNS(
            make_async_resolver(["127.0.0.1"], zone.port, 2.0, reactor), reactor, 2.0
        )
        results = await deferToThread(verify, cap.raw, resolver)
        assert sorted((r.result, r.selector) for r in results) == [("pass", "e1"), ("pass", "r1")]
        signature = str(msg["DKIM-Signature"])
        assert "c=relaxed/relaxed" in signature
        h = signature.replace("\n", "").replace(" ", "").split("h=")[1].split(";")[0].split(":")
        assert h.count("from") == 2  # From oversigned

        status, shown = await d.call("GET", f"/v1/messages/{mid}", token=token)
        assert status == 200
        assert [r["status"] for r in shown["recipients"]] == ["delivered"] * 3
        first = shown["recipients"][0]
        assert first["remote_mta"] == "mx1.dest1.test" and first["reply"].startswith("250")
        assert len(first["attempt_log"]) == 1 and shown["tags"] == ["invoice"]
        delivered = events_of(receiver, "mail.delivered")
        assert {e["data"]["recipient"] for e in delivered} == {
            "bob@dest1.test",
            "carol@dest1.test",
            "dave@dest1.test",
        }
        assert all(e["data"]["message_id"] == mid and not e["data"]["relayed"] for e in delivered)
        assert all(e["data"]["metadata"] == {"customer": "42"} for e in delivered)
        # Another account cannot see it.
        other_token = await d.account("other")
        status, _ = await d.call("GET", f"/v1/messages/{mid}", token=other_token)
        assert status == 404

    @inline
    async def test_bad_send_requests_name_the_field_and_queue_nothing(self) -> None:
        port = free_port()
        d = await self._daemon(port)
        token = await d.account("acme")
        await MailStore(d.store).add_domain("sender3.test", "acme")
        good = {"from": "a@sender3.test", "to": "b@dest3.test", "text": "x"}
        cases = [
            ({**good, "from": "a@not-ours.test"}, 403, "from"),
            ({**good, "to": "not an address"}, 400, "to"),
            ({**good, "to": []}, 400, "to"),
            ({**good, "cc": ["ok@x.test", "@@"]}, 400, "cc[1]"),
            ({**good, "subject": "a\r\nBcc: x@y.test"}, 400, "subject"),
            ({**good, "headers": {"Bcc": "x@y.test"}}, 400, "headers.Bcc"),
            ({**good, "headers": {"X-A": "1\r\nBcc: x@y"}}, 400, "headers.X-A"),
            (
                {**good, "attachments": [{"filename": "a", "content": "!!"}]},
                400,
                "attachments[0].content",
            ),
            ({**good, "dsn": {"notify": ["NEVER", "SUCCESS"]}}, 400, "dsn.notify"),
            ({**good, "dsn": {"ret": "ALL"}}, 400, "dsn.ret"),
            ({**good, "frm": "x"}, 400, "frm"),
            ({**good, "tags": "x"}, 400, "tags"),
        ]
        for request, want_status, field in cases:
            status, body = await d.call("POST", "/v1/messages", request, token=token)
            assert (status, body["error"]["field"]) == (want_status, field), (request, body)
        # The admin key sends for the domain's owner; not for a domain served by nobody.
        status, body = await d.call(
            "POST", "/v1/messages", {**good, "from": "a@nobody.test"}, token=d.admin
        )
        assert (status, body["error"]["field"]) == (403, "from")
        raw = {"from": "a@sender3.test", "to": ["b@dest3.test"], "message": "Subject: x\n\nhi\n"}
        status, body = await d.call("POST", "/v1/messages/raw", raw, token=token)
        assert (status, body["error"]["field"]) == (400, "message")
        queue = d.state / "spool" / "queue"
        assert not list(queue.glob("*.eml"))
        status, body = await d.call(
            "POST",
            "/v1/messages/raw",
            {**raw, "message": "From: <a@sender3.test>\nSubject: x\n\nhi\n"},
            token=token,
        )
        assert status == 202
        assert len(list(queue.glob("*.eml"))) == 1

    @inline
    async def test_remote_550_fails_and_bounces_a_multipart_report_to_the_sender(self) -> None:
        zone = dns_server()
        port = free_port()
        self._sink(port, "-f", "RCPT", "-B", "550 5.1.1 <x>: Recipient address rejected")
        zone.mx("dest2.test", "127.0.0.2")
        # The sender's domain is served here: its MX is this daemon's own inbound listener.
        zone.mx("sender2.test", "127.0.0.3")
        submission = free_port()
        d = await self._daemon(
            port,
            smtp={
                "hostname": "mta.sender2.test",
                "listen": f"tcp:{port}:interface=127.0.0.3",
                "submission": f"tcp:{submission}:interface=127.0.0.1",
            },
        )
        token = await d.account("acme")
        mail = MailStore(d.store)
        await mail.add_domain("sender2.test", "acme")
        password = await mail.create_credential("acme", "alice")
        receiver = Receiver()
        await d.subscribe(token, "mail.#", receiver.listen(self))

        def submit() -> str:
            with smtplib.SMTP("127.0.0.1", submission, timeout=10) as s:
                s.starttls(context=ssl._create_unverified_context())
                s.login("alice", password)
                s.mail("alice@sender2.test", ["RET=FULL", "ENVID=QQ-7", "SIZE=200"])
                code, _ = s.rcpt(
                    "who@dest2.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;Who@Dest2.test"]
                )
                assert code == 250
                code, reply = s.data(
                    b"From: Alice <alice@sender2.test>\r\nTo: who@dest2.test\r\n"
                    b"Subject: hello\r\nMessage-ID: <m1@sender2.test>\r\n\r\nbody\r\n"
                )
                assert code == 250
                return str(reply.decode().split()[-1])

        await deferToThread(submit)
        await until(lambda: events_of(receiver, "mail.failed"))
        (failed,) = events_of(receiver, "mail.failed")
        assert failed["data"]["recipient"] == "who@dest2.test"
        assert failed["data"]["status"] == "5.1.1"
        assert failed["data"]["diagnostic"].startswith("550 5.1.1")
        # The bounce arrives at our own MX for sender2.test, as received mail.
        await until(lambda: events_of(receiver, "mail.received"))
        (received,) = events_of(receiver, "mail.received")
        assert received["data"]["envelope"]["sender"] == ""
        status, raw = await d.call(
            "GET", f"/v1/received/{received['data']['kvs_key']}/raw", token=token
        )
        assert status == 200
        report = email.message_from_bytes(raw, policy=email.policy.default)
        assert report.get_content_type() == "multipart/report"
        assert report.get_param("report-type") == "delivery-status"
        parts = list(report.iter_parts())
        assert [p.get_content_type() for p in parts] == [
            "text/plain",
            "message/delivery-status",
            "message/rfc822",
        ]
        per_message, per_rcpt = parts[1].get_payload()
        assert per_message["Reporting-MTA"] == "dns; mta.sender2.test"
        assert per_message["Original-Envelope-Id"] == "QQ-7"
        assert per_rcpt["Final-Recipient"] == "rfc822;who@dest2.test"
        assert per_rcpt["Original-Recipient"] == "rfc822;Who@Dest2.test"
        assert per_rcpt["Action"] == "failed"
        assert per_rcpt["Status"] == "5.1.1"
        assert per_rcpt["Remote-MTA"] == "dns; mx.dest2.test"
        assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
        returned = parts[2].get_payload()[0]
        assert returned["Message-ID"] == "<m1@sender2.test>"  # RET=FULL: the whole message
        assert report["Auto-Submitted"] == "auto-replied"
        # The report's own delivery is not an account event, and there is no report of it.
        assert len(events_of(receiver, "mail.delivered")) == 0

    @inline
    async def test_email_destination_queues_a_readable_message_once(self) -> None:
        zone = dns_server()
        port = free_port()
        sink = self._sink(port)
        zone.mx("ops.test", "127.0.0.2")
        d = await self._daemon(port, smtp={"hostname": "mta.edj.test"})
        token = await d.account("acme")
        status, body = await d.call(
            "POST",
            "/v1/subscriptions",
            {"pattern": "notice.#", "url": "mailto:oncall@ops.test,bad"},
            token=token,
        )
        assert (status, body["error"]["field"]) == (400, "url")
        sub = await d.subscribe(token, "notice.#", "mailto:oncall@ops.test,lead@ops.test")
        assert sub["url"].startswith("mailto:")
        status, body = await d.call(
            "POST",
            "/v1/events",
            {
                "type": "notice.fault",
                "source": "/billing",
                "subject": "db-1",
                "severity": "critical",
                "data": {"disk": "98%"},
            },
            token=token,
        )
        assert status == 202
        await until(lambda: sink.captured())
        (cap,) = sink.captured()
        assert sorted(cap.rcpt_args) == ["<lead@ops.test>", "<oncall@ops.test>"]
        assert cap.mail_args.startswith("<notifications@mta.edj.test>")
        msg = cap.message
        assert msg["Subject"] == "[critical] notice.fault db-1"
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["X-Gehirn-Event"] == body["id"]
        content = msg.get_content()
        assert "Event:    notice.fault" in content and '"disk": "98%"' in content
        event = await d.wait_status(token, body["id"], "delivered")
        (delivery,) = event["deliveries"]
        assert delivery["attempt_log"][0]["detail"].startswith("queued as edj.")

    @inline
    async def test_trusted_network_relay_and_smarthost_with_auth(self) -> None:
        # Node B: the smarthost, a gehirn-ts taking authenticated submission.
        port = free_port()
        submission = free_port()
        b = await self._daemon(
            port,
            smtp={
                "hostname": "smarthost.test",
                "submission": f"tcp:{submission}:interface=127.0.0.1",
            },
        )
        await b.account("relay")
        b_mail = MailStore(b.store)
        await b_mail.add_domain("legacy.test", "relay")
        password = await b_mail.create_credential("relay", "node-a")
        # Node A: relays for a legacy host on a trusted network, through B.
        a_smtp = free_port()
        a = await self._daemon(
            port,
            smtp={
                "listen": f"tcp:{a_smtp}:interface=127.0.0.1",
                "trusted_networks": ["127.0.0.0/8"],
            },
            outbound={
                "smarthost": f"127.0.0.1:{submission}",
                "smarthost_username": "node-a",
                "smarthost_password": password,
            },
        )
        await a.account("acme")

        def legacy_host() -> bytes:
            with smtplib.SMTP("127.0.0.1", a_smtp, timeout=10) as s:
                s.ehlo("printer.lan")
                s.mail("scanner@legacy.test", ["ENVID=scan-9"])
                assert s.rcpt("someone@far-away.test", ["NOTIFY=NEVER"])[0] == 250
                code, reply = s.data(b"From: scanner@legacy.test\r\nSubject: scan\r\n\r\npdf\r\n")
                assert code == 250
                return reply

        reply = await deferToThread(legacy_host)
        qid = reply.decode().split()[-1]

        async def relayed() -> Any:
            status, m = await a.call("GET", f"/v1/messages/{qid}", token=a.admin)
            return m if status == 200 and m["recipients"][0]["status"] != "queued" else None

        shown = await until(relayed)
        assert shown["origin"] == "relay"  # a trusted network's legacy host, no AUTH
        (rcpt,) = shown["recipients"]
        assert rcpt["status"] == "delivered" and rcpt["tls"] is True
        assert rcpt["remote_mta"] == "127.0.0.1"
        # B took it as an authenticated submission with the DSN parameters.
        mid = rcpt["reply"].split()[-1]

        async def at_b_queue() -> Any:
            # B queues it once its inbound processing (after its 250) is done.
            status, m = await b.call("GET", f"/v1/messages/{mid}", token=b.admin)
            return m if status == 200 else None

        at_b = await until(at_b_queue)
        assert at_b["origin"] == "submission"
        assert at_b["from"] == "scanner@legacy.test"

    @inline
    async def test_own_inbound_without_dsn_gets_the_mail_and_the_sender_a_relayed_report(
        self,
    ) -> None:
        zone = dns_server()
        port = free_port()
        # B: the remote, gehirn-ts's inbound server with DSN not offered.
        zone.mx("dest4.test", "127.0.0.4")
        b = await self._daemon(
            port,
            smtp={
                "hostname": "mx.dest4.test",
                "listen": f"tcp:{port}:interface=127.0.0.4",
                "discard_ehlo_keywords": ["DSN"],
            },
        )
        b_token = await b.account("dest")
        await MailStore(b.store).add_domain("dest4.test", "dest")
        b_events = Receiver()
        await b.subscribe(b_token, "mail.received", b_events.listen(self))
        # A: the sender; its own inbound is the MX of sender4.test.
        zone.mx("sender4.test", "127.0.0.3")
        a = await self._daemon(
            port,
            smtp={"hostname": "mx.sender4.test", "listen": f"tcp:{port}:interface=127.0.0.3"},
        )
        a_token = await a.account("acme")
        await MailStore(a.store).add_domain("sender4.test", "acme")
        a_events = Receiver()
        await a.subscribe(a_token, "mail.#", a_events.listen(self))
        status, _ = await a.call(
            "POST",
            "/v1/messages",
            {
                "from": "app@sender4.test",
                "to": "ann@dest4.test",
                "subject": "track me",
                "text": "hello",
                "dsn": {"notify": ["SUCCESS", "FAILURE"], "envid": "T-1"},
            },
            token=a_token,
        )
        assert status == 202
        await until(lambda: events_of(b_events, "mail.received"))
        (got,) = events_of(b_events, "mail.received")
        assert got["data"]["subject"] == "track me"
        # No DSN offered: nothing was passed on for the recipient.
        assert got["data"]["envelope"]["recipients"][0]["notify"] is None
        assert got["data"]["envelope"]["envid"] is None
        await until(lambda: events_of(a_events, "mail.received"))
        (delivered,) = events_of(a_events, "mail.delivered")
        assert delivered["data"]["relayed"] is True
        (report_event,) = events_of(a_events, "mail.received")
        status, raw = await a.call(
            "GET", f"/v1/received/{report_event['data']['kvs_key']}/raw", token=a_token
        )
        report = email.message_from_bytes(raw, policy=email.policy.default)
        parts = list(report.iter_parts())
        per_message, per_rcpt = parts[1].get_payload()
        assert per_rcpt["Action"] == "relayed" and per_rcpt["Status"].startswith("2.")
        assert per_message["Original-Envelope-Id"] == "T-1"
        assert parts[2].get_content_type() == "text/rfc822-headers"
        assert report["Subject"] == "Mail Relay Report"
