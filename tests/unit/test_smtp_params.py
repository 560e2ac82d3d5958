import pytest
from hypothesis import given
from hypothesis import strategies as st

from gehirn_ts.mta.address import Mailbox, parse_path
from gehirn_ts.mta.params import (
    MailParams,
    RcptParams,
    XtextError,
    parse_mail,
    parse_rcpt,
    xtext_decode,
    xtext_encode,
)
from gehirn_ts.mta.replies import SmtpError

ALL_MAIL = frozenset({"SIZE", "BODY", "RET", "ENVID", "AUTH"})
ALL_RCPT = frozenset({"NOTIFY", "ORCPT"})


def code(exc: pytest.ExceptionInfo[SmtpError]) -> tuple[int, str]:
    return exc.value.reply.code, exc.value.reply.enhanced


# --- xtext (RFC 3461 section 4) ---


def test_xtext_examples():
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    for bad in ("a+2b", "a+", "a=b", "a b", "+G1"):
        with pytest.raises(XtextError):
            xtext_decode(bad)


@given(st.text(max_size=40))
def test_xtext_round_trips(text):
    assert xtext_decode(xtext_encode(text)) == text


@given(st.text(max_size=40))
def test_xtext_decoder_never_crashes(text):
    try:
        xtext_decode(text)
    except XtextError:
        pass


# --- MAIL parameters ---


def test_mail_parameters():
    params = parse_mail(
        b"SIZE=1000 BODY=8bitmime RET=hdrs ENVID=QQ+2B1 AUTH=<>", size_limit=5000, allowed=ALL_MAIL
    )
    assert params == MailParams(size=1000, body="8BITMIME", ret="HDRS", envid="QQ+1", auth="<>")
    assert parse_mail(b"", size_limit=1, allowed=ALL_MAIL) == MailParams()


def test_declared_size_over_the_limit_is_552_534():
    with pytest.raises(SmtpError) as e:
        parse_mail(b"SIZE=5001", size_limit=5000, allowed=ALL_MAIL)
    assert code(e) == (552, "5.3.4")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"SIZE=abc", (555, "5.5.4")),
        (b"SIZE", (555, "5.5.4")),
        (b"BODY=BINARYMIME", (555, "5.5.4")),
        (b"RET=ALL", (555, "5.5.4")),
        (b"ENVID=a+zz", (555, "5.5.4")),
        (b"ENVID=" + b"x" * 101, (555, "5.5.4")),
        (b"SMTPUTF8", (555, "5.5.4")),
        (b"X-UNKNOWN=1", (555, "5.5.4")),
        (b"=1", (501, "5.5.4")),
        (b"SIZE=1=2", (501, "5.5.4")),
        (b"-SIZE=1", (501, "5.5.4")),
        (b"SIZE=1 SIZE=2", (501, "5.5.4")),
        (b"SIZE=\x01", (501, "5.5.4")),
    ],
)
def test_bad_mail_parameters(raw, expected):
    with pytest.raises(SmtpError) as e:
        parse_mail(raw, size_limit=10**9, allowed=ALL_MAIL)
    assert code(e) == expected


def test_parameters_not_advertised_are_refused():
    # After HELO nothing is advertised: any parameter is unknown.
    with pytest.raises(SmtpError) as e:
        parse_mail(b"SIZE=10", size_limit=100, allowed=frozenset())
    assert code(e) == (555, "5.5.4")


@given(st.binary(max_size=60))
def test_mail_parameter_parser_never_crashes(raw):
    try:
        parse_mail(raw, size_limit=10**6, allowed=ALL_MAIL)
    except SmtpError as e:
        assert e.reply.code in (501, 552, 555)


# --- RCPT parameters ---


def test_rcpt_parameters():
    params = parse_rcpt(b"NOTIFY=delay,Success ORCPT=rfc822;bob+40example.com", allowed=ALL_RCPT)
    assert params == RcptParams(notify=("SUCCESS", "DELAY"), orcpt=("rfc822", "bob@example.com"))
    assert parse_rcpt(b"NOTIFY=NEVER", allowed=ALL_RCPT).notify == ("NEVER",)


@pytest.mark.parametrize(
    "raw",
    [
        b"NOTIFY=NEVER,SUCCESS",
        b"NOTIFY=",
        b"NOTIFY=SOMETIMES",
        b"NOTIFY=DELAY,DELAY",
        b"ORCPT=bob@example.com",
        b"ORCPT=rfc822;a+zz",
        b"ORCPT=r f;x",
        b"NOTIFY",
    ],
)
def test_bad_rcpt_parameters(raw):
    with pytest.raises(SmtpError) as e:
        parse_rcpt(raw, allowed=ALL_RCPT)
    assert e.value.reply.code in (501, 555)


@given(st.binary(max_size=60))
def test_rcpt_parameter_parser_never_crashes(raw):
    try:
        parse_rcpt(raw, allowed=ALL_RCPT)
    except SmtpError as e:
        assert e.reply.code in (501, 555)


@given(st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1, unique=True))
def test_notify_any_combination(items):
    params = parse_rcpt(b"NOTIFY=" + ",".join(items).encode(), allowed=ALL_RCPT)
    assert set(params.notify or ()) == set(items)


# --- paths (RFC 5321 section 4.1.2) ---


@pytest.mark.parametrize(
    ("arg", "mailbox", "rest"),
    [
        (b"<a@example.com>", Mailbox("a", "example.com"), b""),
        (b"<A.B@Example.COM.> SIZE=10", Mailbox("A.B", "example.com"), b"SIZE=10"),
        (b' <"john doe"@example.com>', Mailbox('"john doe"', "example.com"), b""),
        (b'<"a>b"@example.com>', Mailbox('"a>b"', "example.com"), b""),
        (
            b"<@relay.example,@b.example:u@c.example>",
            Mailbox("u", "c.example", ("relay.example", "b.example")),
            b"",
        ),
        (b"<u@[192.0.2.1]>", Mailbox("u", "[192.0.2.1]"), b""),
    ],
)
def test_paths(arg, mailbox, rest):
    assert parse_path(arg, kind="recipient") == (mailbox, rest)


def test_null_sender_and_postmaster():
    assert parse_path(b"<>", kind="sender") == (None, b"")
    with pytest.raises(SmtpError):
        parse_path(b"<>", kind="recipient")
    assert parse_path(b"<Postmaster>", kind="recipient", allow_postmaster=True)[0] == Mailbox(
        "Postmaster", ""
    )
    with pytest.raises(SmtpError):
        parse_path(b"<postmaster>", kind="recipient")


@pytest.mark.parametrize(
    "arg",
    [
        b"a@example.com",
        b"<a@example.com",
        b"<a@@example.com>",
        b"<a@example..com>",
        b"<a..b@example.com>",
        b"<.a@example.com>",
        b"<a@-x.com>",
        b"<a@example.com>x",
        b"<a>",
        b'<"a@example.com>',
        b"<@x:>",
        b"<@x,y:a@b.c>",
        b"<a@[300.1.1.1]>",
        b"<" + b"x" * 65 + b"@example.com>",
        b"<a@" + b"x." * 130 + b"com>",
        b"<a b@c.d>",
    ],
)
def test_bad_paths(arg):
    with pytest.raises(SmtpError) as e:
        parse_path(arg, kind="recipient")
    assert (e.value.reply.code, e.value.reply.enhanced) == (501, "5.1.3")


def test_non_ascii_needs_smtputf8():
    with pytest.raises(SmtpError) as e:
        parse_path("<jörg@example.com>".encode(), kind="recipient")
    assert e.value.reply.code == 553


def test_sender_routing_is_detected():
    routed = [
        b"<a%b@local.example>",
        b"<a!b@local.example>",
        b'<"a@b"@local.example>',
        b"<@x.example:a@local.example>",
    ]
    for arg in routed:
        mailbox, _ = parse_path(arg, kind="recipient")
        assert mailbox is not None and mailbox.is_routed, arg
    assert not parse_path(b"<a.b+c@local.example>", kind="recipient")[0].is_routed


@given(st.binary(max_size=80))
def test_path_parser_never_crashes(arg):
    try:
        mailbox, _rest = parse_path(arg, kind="recipient", allow_postmaster=True)
    except SmtpError as e:
        assert e.reply.code in (501, 553)
        return
    assert mailbox is not None
    # The decisive domain is never empty unless this is the bare postmaster.
    assert mailbox.domain or mailbox.is_postmaster
    assert not mailbox.domain.endswith(".")


ATOM = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789!#$&'*+/=?^_`{|}~-", min_size=1, max_size=10
)
LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)


@given(st.lists(ATOM, min_size=1, max_size=3), st.lists(LABEL, min_size=1, max_size=4))
def test_valid_addresses_parse_to_their_parts(atoms, labels):
    local, domain = ".".join(atoms), ".".join(labels)
    mailbox, _ = parse_path(f"<{local}@{domain}>".encode(), kind="recipient")
    assert mailbox == Mailbox(local, domain)
