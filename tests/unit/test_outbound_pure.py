"""Pure parts of sending: the retry schedule, the per-recipient decision, DSN reports,
the send request parser and MIME builder, and the client's dot-stuffing."""

from __future__ import annotations

import email
import email.policy
import json
import random
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from gehirn_ts.interfaces import Parcel, ParcelRecipient, RcptOutcome
from gehirn_ts.mta.compose import FieldError, add_content, build, parse_send
from gehirn_ts.mta.dsn import FULL_RETURN_LIMIT, RecipientStatus, build_report, wants_report
from gehirn_ts.mta.mimepolicy import SMTP
from gehirn_ts.mta.queue import decide
from gehirn_ts.mta.relay import ClientProtocol, MxCourier, ServerReply, Settings, _dot_stuffer
from gehirn_ts.mta.schedule import MailRetry
from gehirn_ts.store.queue import QueuedMessage, RecipientState

# --- the schedule ---


def test_retry_waits_double_up_to_the_maximum_and_stop_at_the_lifetime() -> None:
    r = MailRetry(jitter=0)
    waits = [r.next_attempt(n, 0, 0) for n in range(1, 9)]
    assert waits == [300, 600, 1200, 2400, 3600, 3600, 3600, 3600]
    # The last try is at the end of the lifetime, then none.
    assert r.next_attempt(50, 0, r.lifetime - 10) == r.lifetime
    assert r.next_attempt(50, 0, r.lifetime) is None


@given(st.integers(1, 60), st.floats(0, 5 * 86400 - 1))
def test_retry_jitter_stays_within_its_bounds(attempts: int, now: float) -> None:
    r = MailRetry()
    nxt = r.next_attempt(attempts, 0, now, random.Random(attempts))
    assert nxt is not None
    base = min(300 * 2 ** (attempts - 1), 3600)
    assert now < nxt <= min(now + base * 1.1 + 1e-6, r.lifetime)
    assert nxt >= min(now + base * 0.9 - 1e-6, r.lifetime)


def test_delay_notice_once_at_the_threshold_then_per_interval() -> None:
    r = MailRetry()
    h = 3600
    assert not r.delay_notice_due(0, None, 4 * h - 1)
    assert r.delay_notice_due(0, None, 4 * h)
    assert not r.delay_notice_due(0, 4 * h, 7 * h)
    assert r.delay_notice_due(0, 4 * h, 8 * h)


def _msg(created: float = 0) -> QueuedMessage:
    return QueuedMessage(
        "Q1",
        "acme",
        "api",
        "a@x.test",
        10,
        None,
        None,
        None,
        None,
        None,
        [],
        {},
        created,
        False,
        1,
    )


def _rcpt(attempts: int = 0, last_notice: float | None = None) -> RecipientState:
    return RecipientState(
        "Q1",
        0,
        "b@y.test",
        "y.test",
        None,
        None,
        "queued",
        attempts,
        0,
        0,
        last_notice,
        None,
        None,
        None,
        None,
        None,
        0,
    )


@pytest.mark.parametrize(
    ("kind", "status", "report"),
    [
        ("delivered", "delivered", "delivered"),
        ("relayed", "relayed", "relayed"),
        ("failed", "failed", "failed"),
    ],
)
def test_final_outcomes_are_final_and_reported(kind: str, status: str, report: str) -> None:
    u = decide(MailRetry(jitter=0), _msg(), _rcpt(), RcptOutcome(0, kind, "x", "2.0.0"), 10)
    assert (u.status, u.report, u.next_attempt_at) == (status, report, None)


def test_a_deferral_is_retried_and_warned_of_once_late() -> None:
    retry = MailRetry(jitter=0)
    deferred = RcptOutcome(0, "deferred", "451 4.4.1 no answer", "4.4.1")
    early = decide(retry, _msg(), _rcpt(1), deferred, 600)
    assert (early.status, early.next_attempt_at, early.report) == ("queued", 1200, None)
    late = decide(retry, _msg(), _rcpt(9), deferred, 5 * 3600)
    assert (late.report, late.delay_notice) == ("delayed", True)
    again = decide(retry, _msg(), _rcpt(10, last_notice=5 * 3600), deferred, 6 * 3600)
    assert again.report is None
    expired = decide(retry, _msg(), _rcpt(99), deferred, retry.lifetime)
    assert (expired.status, expired.report, expired.smtp_status) == ("failed", "failed", "4.4.1")


# --- DSN ---


@pytest.mark.parametrize(
    ("sender", "notify", "action", "want"),
    [
        ("a@x", None, "failed", True),
        ("a@x", None, "delayed", False),
        ("a@x", None, "relayed", False),
        ("a@x", ["NEVER"], "failed", False),
        ("a@x", ["SUCCESS"], "relayed", True),
        ("a@x", ["success", "delay"], "delayed", True),
        ("a@x", ["DELAY"], "failed", False),
        ("", ["SUCCESS", "FAILURE", "DELAY"], "failed", False),  # never to <>
    ],
)
def test_who_gets_a_report(sender: str, notify: Any, action: str, want: bool) -> None:
    assert wants_report(sender, notify, action) is want


ORIGINAL = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: s\r\nMessage-ID: <o@x.test>\r\n\r\nbody\r\n"


def _report(**kw: Any) -> email.message.EmailMessage:
    args: dict[str, Any] = {
        "reporting_mta": "mta.x.test",
        "to": "a@x.test",
        "original": ORIGINAL,
        "arrival": 1_000_000_000,
        "now": 1_000_000_100,
        "statuses": [RecipientStatus("b@y.test", "failed", "5.1.1", "550 5.1.1 no", "mx.y.test")],
    }
    args.update(kw)
    raw = build_report(**args)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_failure_report_returns_the_message_unless_hdrs_or_large() -> None:
    parts = list(_report().iter_parts())
    assert parts[2].get_content_type() == "message/rfc822"
    hdrs = list(_report(ret="HDRS").iter_parts())[2]
    assert hdrs.get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <o@x.test>" in hdrs.get_content() and "body" not in hdrs.get_content()
    big = ORIGINAL + b"x" * FULL_RETURN_LIMIT + b"\r\n"
    assert list(_report(original=big).iter_parts())[2].get_content_type() == ("text/rfc822-headers")


def test_delay_report_fields() -> None:
    status = RecipientStatus(
        "b@y.test",
        "delayed",
        "4.4.1",
        "451 4.4.1 later",
        None,
        ("rfc822", "B@y.test"),
        last_attempt=1_000_000_050,
        will_retry_until=1_000_400_000,
    )
    msg = _report(statuses=[status], envid="E-1")
    per_message, per_rcpt = list(msg.iter_parts())[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "E-1"
    assert per_rcpt["Action"] == "delayed" and per_rcpt["Status"] == "4.4.1"
    assert per_rcpt["Original-Recipient"] == "rfc822;B@y.test"
    assert per_rcpt["Will-Retry-Until"] and per_rcpt["Last-Attempt-Date"]
    assert per_rcpt["Remote-MTA"] is None
    assert list(msg.iter_parts())[2].get_content_type() == "text/rfc822-headers"


# --- the send request ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "from",
                "to",
                "cc",
                "bcc",
                "subject",
                "text",
                "html",
                "headers",
                "attachments",
                "tags",
                "metadata",
                "dsn",
                "reply_to",
                "other",
            ]
        ),
        json_values,
    )
)
def test_any_json_is_parsed_or_refused_with_a_field(body: dict[str, Any]) -> None:
    try:
        req = parse_send(body)
    except FieldError as e:
        assert e.field and e.message
        return
    raw = build(req, message_id="<x@y.test>", now=0)
    assert b"\n" not in raw.replace(b"\r\n", b"")


@settings(max_examples=200)
@given(
    st.text(max_size=80),
    st.text(max_size=200),
    st.dictionaries(st.from_regex(r"\AX-[A-Za-z]{1,10}\Z"), st.text(max_size=50), max_size=3),
)
def test_no_input_adds_a_header_field(subject: str, text: str, headers: dict[str, str]) -> None:
    body = {
        "from": "a@x.test",
        "to": "b@y.test",
        "subject": subject,
        "text": text,
        "headers": headers,
    }
    try:
        req = parse_send(body)
    except FieldError:
        return
    msg = email.message_from_bytes(
        build(req, message_id="<m@x.test>", now=0), policy=email.policy.default
    )
    names = sorted(k.lower() for k in msg.keys())
    expected = [
        "content-transfer-encoding",
        "content-type",
        "date",
        "from",
        "message-id",
        "mime-version",
        "subject",
        "to",
        *(h.lower() for h in headers),
    ]
    assert names == sorted(expected)


def test_bcc_is_an_envelope_recipient_only() -> None:
    req = parse_send({"from": "a@x.test", "to": "b@y.test", "bcc": ["c@z.test", "b@y.test"]})
    assert req.recipients == ["b@y.test", "c@z.test"]
    assert b"c@z.test" not in build(req, message_id="<m@x.test>", now=0)


# --- the client ---


@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=20))
def test_dot_stuffing_survives_any_chunking(data: bytes, cuts: list[int]) -> None:
    data = data.replace(b"\r", b"").replace(b"\n", b"\r\n")
    transform = _dot_stuffer()
    out, pos = b"", 0
    for cut in cuts:
        out += transform(data[pos : pos + cut])
        pos += cut
    out += transform(data[pos:])
    lines = out.split(b"\r\n")
    # Every line that starts with a dot was doubled; removing one gives back the data.
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines)
    assert b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines) == data


def test_reply_enhanced_codes() -> None:
    assert ServerReply(550, ("5.1.1 no such user",)).enhanced == "5.1.1"
    assert ServerReply(550, ("no such user",)).enhanced == "5.0.0"
    assert ServerReply(451, ("5.1.1 mismatched class",)).enhanced == "4.0.0"
    assert str(ServerReply(250, ("first", "second"))) == "250 first second"


def test_json_roundtrip_of_metadata() -> None:
    req = parse_send({"from": "a@x.test", "to": "b@y.test", "metadata": {"k": "v"}})
    assert json.loads(json.dumps(req.metadata)) == {"k": "v"}


def test_openssl_rsa_signatures_equal_dkimpys_own() -> None:
    import hashlib

    import dkim.crypto

    from gehirn_ts.mta.dkim import _openssl_rsa_sign, generate

    private, _ = generate("rsa")
    key = dkim.crypto.parse_pem_private_key(private.encode())
    for data in (b"", b"a message", bytes(range(256)) * 10):
        digest = hashlib.sha256(data)
        assert _openssl_rsa_sign(digest, key) == dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, key)


def test_each_dkim_key_is_parsed_once() -> None:
    import dkim as dkimpy

    from gehirn_ts.mta.dkim import SigningKey, generate, sign

    private, _ = generate("rsa")
    key = SigningKey("x.test", "s1", "rsa", private)
    message = b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n"
    before = dkimpy.parse_pem_private_key.cache_info()  # type: ignore[attr-defined]
    first, second = sign(message, [key]), sign(message, [key])
    after = dkimpy.parse_pem_private_key.cache_info()  # type: ignore[attr-defined]
    assert after.misses == before.misses + 1 and after.hits == before.hits + 1
    assert first.split(b"t=")[0] == second.split(b"t=")[0]  # the same key signed both


def test_the_mime_policy_makes_each_header_class_once() -> None:
    registry = SMTP.header_factory
    assert registry["Subject"] is registry["subject"]  # type: ignore[index]
    assert registry["To"] is not registry["Subject"]  # type: ignore[index]


def _reference_build(req: Any, message_id: str, now: float) -> bytes:
    """The message as the email package writes it with every field set through the stock
    SMTP policy (how compose.build made it before it wrote plain fields itself); the
    content is added the same way in both."""
    from datetime import UTC, datetime
    from email.message import EmailMessage
    from email.utils import format_datetime

    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = req.sender
    if req.to:
        msg["To"] = req.to
    if req.cc:
        msg["Cc"] = req.cc
    if req.reply_to:
        msg["Reply-To"] = req.reply_to
    msg["Subject"] = req.subject
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    msg["Message-ID"] = message_id
    for name, value in req.headers:
        msg[name] = value
    add_content(msg, req)
    return msg.as_bytes()


_WORDS = st.text(st.sampled_from("abc XYZ09.,;:<>()@\"'\t-_=?ä日\u00a0"), max_size=120)
_TO = ["b@y.test", "Ann <c@y.test>", "Dr. No <n@y.test>", "Jörg <j@y.test>"]
_NAMES = ["X-Tag", "X-Long-Header-Name-For-Folding", "List-Id"]


@settings(max_examples=300, deadline=None)
@given(
    _WORDS,
    _WORDS,
    st.lists(
        st.sampled_from(["b@y.test", "Ann <c@y.test>", "Dr. No <n@y.test>", "Jörg <j@y.test>"]),
        min_size=1,
        max_size=12,
    ),
    st.dictionaries(
        st.sampled_from(["X-Tag", "X-Long-Header-Name-For-Folding", "List-Id"]), _WORDS, max_size=2
    ),
    st.one_of(st.none(), st.text(max_size=100)),
    st.booleans(),
)
def test_messages_are_the_same_as_the_email_packages_own(
    name: str, subject: str, to: list[str], headers: dict[str, str], text: str | None, html: bool
) -> None:
    try:
        req = parse_send(
            {
                "from": f"{json.dumps(name)} <a@x.test>",
                "to": to,
                "cc": to[:2],
                "subject": subject,
                "headers": headers,
                **({"text": text} if text is not None else {}),
                **({"html": f"<p>{text}</p>"} if html else {}),
            }
        )
    except FieldError:
        return
    ours = build(req, message_id="<m@x.test>", now=0)
    stock = _reference_build(req, "<m@x.test>", 0)
    # The multipart boundary is random: compare with it taken out.
    boundary = re.compile(rb"={15}\d+==")
    assert boundary.sub(b"B", ours) == boundary.sub(b"B", stock)


# Bodies that take each of the email package's transfer encodings: short ASCII lines
# (7bit), non-ASCII (8bit), lines over 78 characters (quoted-printable or base64,
# whichever is shorter), and every kind of line ending.
_PIECES = ["a", "b", " ", "=", ".", "\t", "\r", "\n", "\r\n", "ä", "日本", "\x00", "x" * 90]
_BODY = st.lists(
    st.one_of(st.sampled_from(_PIECES), st.characters(blacklist_categories=("Cs",))),
    max_size=200,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(_BODY, st.booleans())
def test_a_single_text_part_is_written_as_the_email_package_writes_it(
    text: str, html: bool
) -> None:
    body = {"html": text} if html else {"text": text}
    req = parse_send({"from": "a@x.test", "to": ["b@y.test"], "subject": "s", **body})
    assert build(req, message_id="<m@x.test>", now=0) == _reference_build(req, "<m@x.test>", 0)


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("plain words\n", b"7bit"),
        ("Grüße\n", b"8bit"),
        ("x" * 100, b"quoted-printable"),
        ("日本語" * 40, b"base64"),
    ],
)
def test_each_transfer_encoding_of_a_single_part(text: str, encoding: bytes) -> None:
    req = parse_send({"from": "a@x.test", "to": ["b@y.test"], "subject": "s", "text": text})
    ours = build(req, message_id="<m@x.test>", now=0)
    assert b"Content-Transfer-Encoding: " + encoding + b"\r\n" in ours
    assert ours == _reference_build(req, "<m@x.test>", 0)
    parsed = email.message_from_bytes(ours, policy=email.policy.default)
    assert parsed.get_content().replace("\r\n", "\n").rstrip("\n") == text.rstrip("\n")


class _Writes(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def test_a_pipelined_group_of_commands_is_one_write() -> None:
    proto = ClientProtocol()
    t = _Writes()
    proto.makeConnection(t)
    proto.send_lines([b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>", b"RCPT TO:<c@y.test>"])
    assert t.writes == [b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\n"]


@pytest.mark.parametrize(
    ("text", "sent"),
    [
        (b"Subject: x\r\n\r\n.dot\r\nend\r\n", b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\n"),
        (b"Subject: x\r\n\r\nno newline", b"Subject: x\r\n\r\nno newline\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
    ],
)
def test_a_small_message_is_sent_whole_in_one_write(
    tmp_path: Any, text: bytes, sent: bytes
) -> None:
    from twisted.internet.task import Clock

    path = tmp_path / "m.eml"
    path.write_bytes(text)
    parcel = Parcel(
        "Q", "a@x.test", "y.test", [ParcelRecipient(0, "b@y.test")], str(path), len(text)
    )
    courier = MxCourier(Clock(), None, Settings(helo="mta.test"))
    proto = ClientProtocol()
    t = _Writes()
    proto.makeConnection(t)
    done = Deferred.fromCoroutine(courier._data(proto, parcel, "mx.y.test"))
    proto.dataReceived(b"354 go ahead\r\n")
    assert t.writes == [b"DATA\r\n", sent]  # the text, its ending and the final dot at once
    proto.dataReceived(b"250 2.0.0 queued\r\n")
    assert done.result.code == 250
