"""The received-message summary (mta/summary.py): examples, and properties on any input."""

from __future__ import annotations

import email.policy
from email import message_from_bytes
from email.header import Header
from email.parser import BytesHeaderParser, BytesParser
from email.utils import formataddr, getaddresses, parseaddr
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gehirn_ts.mta.summary import (
    BODY_BYTES,
    EXCERPT_CHARS,
    FIELD_CHARS,
    _summarize_parsed,
    excerpt,
    header_fields,
    header_message,
    plain_addresses,
    summarize_bytes,
)


def test_a_plain_message() -> None:
    got = summarize_bytes(
        b"From: <sender@example.org>\r\nTo: <user@bench.test>\r\n"
        b"Date: Thu, 26 Nov 2026 21:00:00 +0000\r\nMessage-Id: <123@client.test>\r\n"
        b"Subject: smtp-source test\r\n\r\n" + b"La de da.\r\n" * 50
    )
    assert got["from"] == "sender@example.org" and got["to"] == "user@bench.test"
    assert got["cc"] is None and got["subject"] == "smtp-source test"
    assert got["message_id"] == "<123@client.test>"
    assert got["date"] == "Thu, 26 Nov 2026 21:00:00 +0000"
    assert got["excerpt"].startswith("La de da. La de da.")
    assert len(got["excerpt"]) == EXCERPT_CHARS and got["loop_hops"] == 0


def test_encoded_words_folding_and_quoted_names() -> None:
    got = summarize_bytes(
        b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org>\r\n"
        b'To: "Doe, John" <john@bench.test>,\r\n other@bench.test\r\n'
        b"Cc: =?utf-8?q?A=2C_B?= <ab@x.test>\r\n"
        b"Subject: a long\r\n subject =?iso-8859-1?q?caf=E9?= here\r\n\r\nbody\r\n"
    )
    assert got["from"] == "Jörg <j@example.org>"
    assert got["to"] == '"Doe, John" <john@bench.test>, other@bench.test'
    # A decoded name with a special in it is quoted again (RFC 5322 section 3.2.3).
    assert got["cc"] == '"A, B" <ab@x.test>'
    assert got["subject"] == "a long subject café here"


def test_the_plain_part_is_preferred_and_attachments_are_skipped() -> None:
    alternative = summarize_bytes(
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/html\r\n\r\n<p>the html</p>\r\n"
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nHall=C3=B6 Welt\r\n--b--\r\n"
    )
    assert alternative["excerpt"] == "Hallö Welt"
    mixed = summarize_bytes(
        b"Content-Type: multipart/mixed; boundary=z\r\n\r\n"
        b"--z\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=a\r\n"
        b"\r\nattached\r\n--z\r\nContent-Type: text/plain\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\ndGhlIGJvZHk=\r\n--z--\r\n"
    )
    assert mixed["excerpt"] == "the body"


def test_html_only_loses_its_tags_and_keeps_its_charset() -> None:
    got = summarize_bytes(
        b"Content-Type: text/html; charset=iso-8859-1\r\n\r\n"
        b"<html><b>caf\xe9</b>\r\n  ok</html>\r\n"
    )
    assert got["excerpt"] == "café ok"


def test_eight_bit_headers_are_read_as_utf8_and_unknown_charsets_do_not_fail() -> None:
    got = summarize_bytes(
        b"From: J\xc3\xb6rg <j@x.test>\r\nSubject: Gr\xc3\xbc\xc3\x9fe \xff\r\n"
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe aus dem Test.\r\n"
    )
    assert got["from"] == "Jörg <j@x.test>"
    assert got["subject"] == "Grüße \ufffd"
    assert got["excerpt"] == "Grüße aus dem Test."


def test_groups_and_garbage_are_shown_as_written() -> None:
    got = summarize_bytes(
        b"To: undisclosed-recipients:;\r\nFrom: not an address\r\n"
        b"Subject: =?bogus?q?x?=\r\nX-Gehirn-Loop: 3\r\nX-Gehirn-Loop: 12\r\n\r\n"
    )
    assert got["to"] == "undisclosed-recipients:;"
    assert got["from"] == "not an address"
    assert got["subject"] == "=?bogus?q?x?="
    assert got["loop_hops"] == 12


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_any_bytes_give_a_summary_of_valid_text(raw: bytes) -> None:
    got = summarize_bytes(raw)
    for name in ("from", "to", "cc", "subject", "message_id", "date"):
        value = got[name]
        assert value is None or (isinstance(value, str) and len(value) <= FIELD_CHARS)
        if value is not None:
            value.encode("utf-8")  # no lone surrogates: the event is JSON in UTF-8
    assert len(got["excerpt"]) <= EXCERPT_CHARS
    got["excerpt"].encode("utf-8")
    assert 0 <= got["loop_hops"] < 1000


_LINES = st.lists(
    st.sampled_from(
        [
            b"From: a@b.test",
            b"To: x <y@z.test>, w@v.test",
            b"Subject: =?utf-8?b?w7w=?=",
            b"Content-Type: multipart/mixed; boundary=q",
            b"Content-Type: text/html; charset=utf-16",
            b"Content-Transfer-Encoding: base64",
            b"Content-Transfer-Encoding: quoted-printable",
            b"--q",
            b"--q--",
            b"",
            b" folded",
            b"<p>x=3D=C3</p>",
            b"\xff\xfe garbage",
        ]
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(_LINES)
def test_any_mime_shaped_input_gives_a_summary(lines: list[bytes]) -> None:
    got = summarize_bytes(b"\r\n".join(lines))
    got["excerpt"].encode("utf-8")
    assert all(got[n] is None or isinstance(got[n], str) for n in ("from", "to", "subject"))


_NAME = (
    st.text(
        st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters='\\"'),
        min_size=1,
        max_size=30,
    )
    .map(lambda s: " ".join(s.split()))
    .filter(bool)
)
_ADDR = st.from_regex(r"\A[a-z][a-z0-9.+-]{0,15}@[a-z0-9]{1,10}\.test\Z")


@settings(max_examples=300, deadline=None)
@given(_NAME, _ADDR, _NAME)
def test_fields_read_as_the_email_packages_default_policy_reads_them(
    name: str, addr: str, subject: str
) -> None:
    """Names and subjects in any script, encoded as mail clients encode them, come out
    as the `email` package's header objects show them."""
    raw = (
        f"From: {formataddr((name, addr), charset='utf-8')}\r\n"
        f"Subject: {Header(subject, 'utf-8').encode()}\r\n\r\nbody\r\n"
    ).encode("ascii")
    reference = BytesParser(policy=email.policy.default).parsebytes(raw)
    got = summarize_bytes(raw)
    assert got["from"] == str(reference["from"])
    assert got["subject"] == str(reference["subject"])


def test_only_the_start_of_a_large_body_is_read() -> None:
    line = b"La de da de da. " * 4 + b"\r\n"
    single = summarize_bytes(b"Subject: big\r\n\r\n" + line * 20_000)
    assert single["excerpt"].startswith("La de da de da. La de da")
    assert len(single["excerpt"]) == EXCERPT_CHARS
    encoded = summarize_bytes(
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b"aGVsbG8gd29ybGQ=\r\n" + b"x" * 100_000
    )
    assert encoded["excerpt"].startswith("hello world")
    # A text part after BODY_BYTES of attachment is not reached (text comes first in
    # the mail clients' own messages).
    late = summarize_bytes(
        b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n"
        + b"A" * (BODY_BYTES + 10)
        + b"\r\n--z\r\nContent-Type: text/plain\r\n\r\nlate text\r\n--z--\r\n"
    )
    assert late["excerpt"] == ""


# What a header section is made of: ordinary fields and folds, and now and then an odd
# line. The quick reading of ordinary sections must be the email package's reading, or
# step aside.
_TEXT = st.text(st.characters(min_codepoint=1, max_codepoint=126), max_size=20)
_FIELD_LINE = st.one_of(
    st.builds(lambda name, value: f"{name}:{value}", st.from_regex(r"\A[!-9;-~]{1,12}\Z"), _TEXT),
    st.sampled_from(
        ["Subject:", "Subject:   ", "X-Empty:\t", "To: a \t", "Subject: caf\udcc3\udca9"]
    ),
)
_FOLD_LINE = st.builds(lambda blank, text: blank + text, st.sampled_from([" ", "\t", "  "]), _TEXT)
_ODD_LINE = st.one_of(
    st.sampled_from(
        [
            "From a@b.test Fri Nov 27 2026",
            ": no name",
            "no colon here",
            "Bad Name: value",
            "X-\udcff: 8-bit name",
            "To: x\ry",
            "To: x\ny",
            "",
        ]
    ),
    _TEXT,
)


@st.composite
def _header_lines(draw: st.DrawFn) -> list[str]:
    lines = [draw(_FIELD_LINE)]
    for _ in range(draw(st.integers(0, 8))):
        lines.append(draw(st.one_of(_FIELD_LINE, _FOLD_LINE)))
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(_ODD_LINE))
    return lines


@settings(max_examples=500, deadline=None)
@given(_header_lines(), st.sampled_from(["\r\n\r\n", "\r\n\r\n", "\r\n", "\n\n"]))
def test_header_fields_are_the_parsers_fields(lines: list[str], end: str) -> None:
    section = "\r\n".join(lines) + end
    fields = header_fields(section)
    if fields is not None:
        parsed = message_from_bytes(section.encode("ascii", "surrogateescape"))
        assert fields == list(parsed.raw_items())


@settings(max_examples=300, deadline=None)
@given(_header_lines(), st.sampled_from(["\r\n\r\n", "\r\n", "\n\n"]), st.binary(max_size=40))
def test_a_header_message_is_the_header_parsers_reading(
    lines: list[str], end: str, body: bytes
) -> None:
    data = ("\r\n".join(lines) + end).encode("ascii", "surrogateescape") + body
    quick = header_message(data)
    if quick is not None:
        parsed = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
        assert list(quick.raw_items()) == list(parsed.raw_items())


def test_ordinary_header_sections_take_the_quick_reading() -> None:
    section = (
        "Received: from client.test ([127.0.0.1])\r\n\tby mx (gehirn-ts) with ESMTP id Q\r\n"
        "From: A <a@b.test>\r\nSubject:  two\r\n  lines\r\nX-Empty:\r\n"
        "To: caf\udcc3\udca9 <c@d.test>\r\n\r\n"
    )
    assert header_fields(section) == [
        ("Received", "from client.test ([127.0.0.1])\r\n\tby mx (gehirn-ts) with ESMTP id Q"),
        ("From", "A <a@b.test>"),
        ("Subject", "two\r\n  lines"),
        ("X-Empty", ""),
        ("To", "caf\udcc3\udca9 <c@d.test>"),
    ]
    assert header_fields("From: a\r\n\r\nbody") is None  # the section only
    assert header_fields("From a Fri\r\nTo: b\r\n\r\n") is None


_MAILBOX = st.one_of(
    _ADDR,
    _ADDR.map(lambda a: f"<{a}>"),
    st.builds(
        lambda name, addr, gap: f"{name}{gap}<{addr}>",
        st.from_regex(r"\A[A-Za-z0-9]{1,8}( {1,2}[A-Za-z0-9]{1,8}){0,2}\Z"),
        _ADDR,
        st.sampled_from(["", " ", "  "]),
    ),
    st.sampled_from(["", " ", "a..b@x.test", "a@x..test", "<a@x.test", '"A B" <a@x.test>']),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=15),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_MAILBOX, min_size=1, max_size=4), st.sampled_from([",", ", ", " ,"]))
def test_plain_mailboxes_read_as_getaddresses_reads_them(items: list[str], sep: str) -> None:
    value = sep.join(items)
    pairs = plain_addresses(value)
    if pairs is not None:
        assert pairs == getaddresses([value])
        if len(pairs) == 1:  # compose.mailbox's reading of one address
            assert pairs[0] == parseaddr(value)


@settings(max_examples=200, deadline=None)
@given(st.lists(_MAILBOX, min_size=1, max_size=3), st.lists(_MAILBOX, max_size=2))
def test_a_heads_addresses_are_the_email_packages(to: list[str], cc: list[str]) -> None:
    from gehirn_ts.mta.compose import Head

    raw = f"To: {', '.join(to)}\r\n" + "".join(f"Cc: {c}\r\n" for c in cc) + "\r\nbody"
    data = raw.encode()
    head = Head(data)
    parsed = BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    for name in ("To", "Cc"):
        want = [a for _, a in getaddresses(parsed.get_all(name, [])) if a]
        assert head.addresses(name) == want


def test_plain_mailboxes_take_the_quick_reading() -> None:
    value = "<a@b.test>, Jo Smith <j.s@x.test> ,c+d@e.test"
    assert plain_addresses(value) == [
        ("", "a@b.test"),
        ("Jo Smith", "j.s@x.test"),
        ("", "c+d@e.test"),
    ]
    assert plain_addresses('"Smith, Jo" <j@x.test>') is None
    assert plain_addresses("=?utf-8?q?J=C3=B6rg?= <j@x.test>") is None


_WHITESPACE = st.sampled_from(
    [" ", "  ", "\t", "\r\n", "\n\n ", "\xa0", "\u2003", "\x1c", " " * 500, "\r\n" * 700]
)


@given(
    st.lists(
        st.one_of(st.text(min_size=1, max_size=40), _WHITESPACE, st.just("x" * 700)),
        max_size=120,
    )
)
# Whitespace longer than the first part read, then words: the excerpt reads on.
@example([" " * 500, "a b", "\r\n" * 700, "c " * 400])
def test_the_excerpt_is_the_start_of_the_whole_text_made_plain(pieces: list[str]) -> None:
    text = "".join(pieces)
    assert excerpt(text) == " ".join(text.split())[:EXCERPT_CHARS]


# A message of one part is read without the email package's objects
# (``_one_part_excerpt``): its summary must be the parser's, or it steps aside.
_CONTENT_TYPE = st.one_of(
    st.sampled_from(
        [
            "text/plain",
            "TEXT/Plain",
            "text/plain; charset=utf-8",
            'text/plain; charset="ISO-8859-1"',
            "text/plain;charset=us-ascii; format=flowed",
            'text/html; charset="utf-8"',
            "text/html",
            'text/plain; charset=""',
            "text/plain; charset=no-such-charset",
            'text/plain; charset="a;b"',
            "text/plain; charset*=utf-8''x",
            "text/plain; charset = utf-8",
            "text/plain;",
            "text/plain (comment)",
            "text/enriched",
            "application/octet-stream",
            "image/png; name=a.png",
            "text",
            "text/plain/x",
            "multipart/mixed; boundary=b",
            "text/plain; charset=caf\udcc3\udca9",
            "  text/plain  ;  charset=utf-8  ",
            "text/plain;\r\n charset=utf-8",
        ]
    ),
    st.from_regex(r"\A[a-zA-Z/; =\"\-0-9]{0,30}\Z"),
)
_TRANSFER = st.sampled_from(
    ["", "7bit", "8bit", "binary", "quoted-printable", "Quoted-Printable", "base64", "x-uue"]
)
_DISPOSITION = st.sampled_from(
    ["", "inline", "attachment", "Attachment; filename=a.txt", " attachment", "caf\udcc3\udca9"]
)
_BODY = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"caf=C3=A9 =\r\nsoft break\r\n", b"<p>Hello <b>you</b></p>\r\n", b""]),
    st.text(max_size=200).map(lambda t: t.encode("utf-8")),
)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(st.none(), _CONTENT_TYPE),
    _TRANSFER,
    _DISPOSITION,
    _BODY,
    st.sampled_from(["From: A <a@b.test>\r\nSubject: hi\r\n", "Subject: x\r\n", ""]),
)
def test_a_message_of_one_part_is_summarized_as_the_parser_reads_it(
    ctype: str | None, cte: str, disposition: str, body: bytes, other: str
) -> None:
    head = other
    if ctype is not None:
        head += f"Content-Type: {ctype}\r\n"
    if cte:
        head += f"Content-Transfer-Encoding: {cte}\r\n"
    if disposition:
        head += f"Content-Disposition: {disposition}\r\n"
    data = (head + "X-End: 1\r\n\r\n").encode("ascii", "surrogateescape") + body
    assert summarize_bytes(data) == _summarize_parsed(data)


def test_a_plain_message_is_summarized_without_the_parser(monkeypatch: Any) -> None:
    import gehirn_ts.mta.summary as summary

    def refused(*args: Any) -> Any:
        raise AssertionError("the parser was used")

    monkeypatch.setattr(summary, "_summarize_parsed", refused)
    message = (
        b"Received: from client.test ([127.0.0.1])\r\n\tby mx (gehirn-ts) with ESMTP id Q\r\n"
        b"From: <sender@example.org>\r\nTo: <user@bench.test>\r\nSubject: hi\r\n"
        b"Content-Type: text/plain; charset=utf-8; format=flowed\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9  au\r\n  lait\r\n"
    )
    got = summarize_bytes(message)
    assert got["excerpt"] == "café au lait"
    assert (got["from"], got["to"], got["subject"]) == (
        "sender@example.org",
        "user@bench.test",
        "hi",
    )
    # A multipart message needs the parser, and takes it.
    with pytest.raises(AssertionError, match="the parser was used"):
        summarize_bytes(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b--\r\n")


def test_an_eight_bit_disposition_does_not_lose_the_summary() -> None:
    # compat32 gives an 8-bit value as a Header object, which has no strip(): the
    # summary raised, and the message was published without one.
    got = summarize_bytes(
        "Subject: hi\r\nContent-Disposition: caf\udcc3\udca9\r\n\r\nthe text\r\n".encode(
            "ascii", "surrogateescape"
        )
    )
    assert (got["subject"], got["excerpt"]) == ("hi", "the text")
