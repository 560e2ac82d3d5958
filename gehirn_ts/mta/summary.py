"""The summary of a received message for its event: a few header fields and an excerpt.

Pure (no I/O). The message is parsed with the ``compat32`` policy and the six fields are
decoded here, instead of through the ``email`` package's header objects: those parse
every address with the full RFC 5322 grammar and cost 0.7 ms for a plain message and
3.8 ms for a small multipart/alternative one (measured; docs/performance.md), on every
message received. What the event needs is display text: RFC 2047 words decoded
(section 6), folding removed (RFC 5322 section 2.2.3), addresses as ``Name <addr>``.
"""

from __future__ import annotations

import codecs
import quopri
import re
from collections.abc import Iterable
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses
from typing import Any

LOOP_HEADER = "X-Gehirn-Loop"  # the e-mail destination's loop marker (edj/destinations/email.py)
EXCERPT_CHARS = 300
# What of the body is parsed: enough for the first text part of ordinary mail (text
# parts come before attachments); a whole 100 KiB message took a quarter of the
# receiving time in bench/smtp.py. And what of a text part is read for the excerpt.
BODY_BYTES = 16 * 1024
EXCERPT_SCAN = 8 * 1024
FIELD_CHARS = 998  # RFC 5322 section 2.1.1: no line is longer
_ADDRESS_FIELDS = ("from", "to", "cc")
_SUMMARY_FIELDS = tuple(
    (name, name.replace("_", "-")) for name in ("from", "to", "cc", "subject", "message_id", "date")
)
_LOOP_KEY = LOOP_HEADER.lower()
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_TAG = re.compile(r"<[^>]*>")
# A byte over 127 as the parser keeps it: a surrogate escape (PEP 383).
_EIGHT_BIT = re.compile("[\udc80-\udcff]")
# RFC 5322 section 3.2.3 "specials": a display name holding one is written as a
# quoted-string.
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


def _text(raw: str) -> str:
    """A header value as text: unfolded, encoded words decoded, 8-bit bytes as UTF-8."""
    value = _FOLD.sub("", raw)
    if _EIGHT_BIT.search(value):
        # Raw 8-bit bytes (the parser keeps them as surrogate escapes): UTF-8 as sent
        # by SMTPUTF8 clients (RFC 6532), anything else replaced.
        return value.encode("ascii", "surrogateescape").decode("utf-8", "replace").strip()
    if "=?" not in value:
        return value.strip()
    try:
        return str(make_header(decode_header(value))).strip()
    except (LookupError, UnicodeError, ValueError):
        # An unknown charset or a broken word: shown as written.
        return value.strip()


def _display_name(name: str) -> str:
    if _SPECIALS.search(name):
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return name


# The common forms of a mailbox: ``addr``, ``<addr>`` and ``Plain Name <addr>``, with a
# dot-atom local part and domain (RFC 5322 section 3.4.1). Anything else (quotes,
# comments, encoded words, groups) goes to the email package's address reader.
_ATOMS = r"[A-Za-z0-9_%+\-]+(?:\.[A-Za-z0-9_%+\-]+)*"
_PLAIN_MAILBOX = re.compile(
    rf" *(?:(?P<name>[A-Za-z0-9]+(?: [A-Za-z0-9]+)*) *)?<(?P<addr>{_ATOMS}@{_ATOMS})> *"
    rf"| *(?P<bare>{_ATOMS}@{_ATOMS}) *"
)


def plain_addresses(value: str) -> list[tuple[str, str]] | None:
    """``getaddresses([value])`` for a list of plain mailboxes only; None otherwise."""
    pairs = []
    for item in value.split(","):
        m = _PLAIN_MAILBOX.fullmatch(item)
        if m is None:
            return None
        bare = m["bare"]
        pairs.append(("", bare) if bare else (m["name"] or "", m["addr"]))
    return pairs


def _addresses(raw: str) -> str:
    """An address field as ``Name <addr>, addr``; as written when it is no plain list."""
    unfolded = _FOLD.sub("", raw)
    pairs = plain_addresses(unfolded)
    if pairs is None:
        pairs = getaddresses([unfolded])
    if not pairs or any(not addr or "@" not in addr for _, addr in pairs):
        # Groups, bare names, garbage: the decoded text is more useful than a guess.
        return _text(raw)
    out = []
    for name, addr in pairs:
        name = _text(name) if name else ""
        out.append(f"{_display_name(name)} <{addr}>" if name else addr)
    return ", ".join(out)


def _body_part(message: Message) -> Message | None:
    """The first text/plain part that is not an attachment, else the first text/html."""
    html = None
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        # str(): an 8-bit value comes as a Header object (compat32).
        if str(part.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
            continue
        subtype = part.get_content_subtype()
        if subtype == "plain":
            return part
        if subtype == "html" and html is None:
            html = part
    return html


def _content(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "us-ascii"
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    return payload.decode(charset, "replace")


# RFC 5322 section 3.6.8 field names, as the email package's parser takes them.
_FIELD = re.compile(r"[\041-\071\073-\176]+:")


def header_fields(section: str) -> list[tuple[str, str]] | None:
    """The fields of a header section (decoded as the parser decodes bytes, ending with
    its empty line) as the email package's ``compat32`` parser stores them, for the
    ordinary case: CRLF line ends, every line a field or its continuation. None for
    anything else (bare CR or LF, a continuation first, an envelope ``From `` line, a
    line that is no field), which the parser itself then reads."""
    bare = section.replace("\r\n", "")
    if not section.endswith("\r\n\r\n") or "\n" in bare or "\r" in bare:
        return None
    lines = section[:-4].split("\r\n")
    fields: list[tuple[str, str]] = []
    name = None
    value: list[str] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if name is None:
                return None
            value.append(line)
            continue
        m = _FIELD.match(line)
        if m is None:
            return None  # an empty line inside, a line without a name, ``From `` ...
        if name is not None:
            fields.append((name, "\r\n".join(value)))
        name = line[: m.end() - 1]
        # compat32's header_source_parse: blanks after the colon go, the folding stays.
        value = [line[m.end() :].lstrip(" \t")]
    if name is not None:
        fields.append((name, "\r\n".join(value)))
    return fields


def _fields_message(fields: list[tuple[str, str]]) -> Message:
    """``header_fields``' fields as a ``Message`` with no body, as compat32 stores them."""
    message = Message()
    for name, value in fields:
        message.set_raw(name, value)
    return message


def header_message(data: bytes) -> Message | None:
    """The header section at the start of ``data`` (a message, or its start) as a
    ``Message`` with no body, as the compat32 parser reads it; None unless it is an
    ordinary one (``header_fields``), for the parser to read."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    fields = header_fields(data[: end + 4].decode("ascii", "surrogateescape"))
    return None if fields is None else _fields_message(fields)


def summarize_bytes(head: bytes) -> dict[str, Any]:
    """From, To, Cc, Subject, Message-ID, Date, a text excerpt and the loop count."""
    end = head.find(b"\r\n\r\n")
    fields = None
    if end >= 0:
        fields = header_fields(head[: end + 4].decode("ascii", "surrogateescape"))
        if fields is not None:
            first, hops = _first_values(fields)
            text = _one_part_excerpt(first, head[end + 4 : end + 4 + BODY_BYTES])
            if text is not None:
                out = _header_summary(first, hops)
                out["excerpt"] = text
                return out
    return _summarize_parsed(head, fields)


def _summarize_parsed(head: bytes, fields: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """``summarize_bytes`` by the email package's parser: any structure, any line ends.
    ``fields``: the header section's, when ``header_fields`` read it already."""
    end, gap = head.find(b"\r\n\r\n"), 4
    if end < 0:
        end, gap = head.find(b"\n\n"), 2
    body = head[end + gap : end + gap + BODY_BYTES] if end >= 0 else b""
    if fields is not None:
        message = _fields_message(fields)
    else:
        message = message_from_bytes(head[: end + gap] if end >= 0 else head)
    if message.get_content_maintype() == "multipart":
        # The parts and their boundaries need the parser.
        message = message_from_bytes(head[: end + gap] + body)
    else:
        # A single part: its body as it is (bytes kept as the parser keeps them).
        message.set_payload(body.decode("ascii", "surrogateescape"))
    # The stored values (raw_items): compat32's get() turns 8-bit values into Header
    # objects.
    out = _header_summary(*_first_values(message.raw_items()))
    part = _body_part(message)
    if part is not None:
        out["excerpt"] = _excerpt_of(_content(part), part.get_content_subtype())
    return out


def _first_values(items: Iterable[tuple[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """Each field's first value by its lower-cased name (what compat32's ``get``
    gives), and the loop marker's values, from a message's stored fields."""
    first: dict[str, str] = {}
    hops = []
    for name, value in items:
        key, raw = name.lower(), str(value)
        if key == _LOOP_KEY:
            hops.append(raw.strip())
        first.setdefault(key, raw)
    return first, hops


def _header_summary(first: dict[str, str], hops: list[str]) -> dict[str, Any]:
    """The summary's header fields and loop count; the excerpt empty."""
    out: dict[str, Any] = {
        "from": None,
        "to": None,
        "cc": None,
        "subject": None,
        "message_id": None,
        "date": None,
        "excerpt": "",
        "loop_hops": max((int(h) for h in hops if h.isdigit() and len(h) < 4), default=0),
    }
    for name, key in _SUMMARY_FIELDS:
        found = first.get(key)
        if found is None:
            continue
        value = _addresses(found) if name in _ADDRESS_FIELDS else _text(found)
        out[name] = value[:FIELD_CHARS]
    return out


def _excerpt_of(text: str, subtype: str) -> str:
    text = text[:EXCERPT_SCAN]
    if subtype == "html":
        text = _TAG.sub(" ", text)
    return excerpt(text)


# The Content-Type fields read without the parser: a type and simple parameters (RFC
# 2045 section 5.1 tokens, values plain or quoted without escapes), on one line. Any
# other form (RFC 2231 parameters, comments, escapes, folding) goes to the parser.
_WORD = r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+"
_SIMPLE_TYPE = re.compile(
    rf"[ \t]*(?P<type>{_WORD}/{_WORD})[ \t]*"
    rf"(?P<params>(?:;[ \t]*[A-Za-z0-9-]+=(?:\"[^\"\\\r\n]*\"|{_WORD})[ \t]*)*)"
)
_PARAM = re.compile(rf";[ \t]*([A-Za-z0-9-]+)=(?:\"([^\"\\\r\n]*)\"|({_WORD}))")
# Content-Transfer-Encodings whose payload compat32 decodes with more than a copy.
_ENCODED = frozenset({"base64", "x-uuencode", "uuencode", "uue", "x-uue"})


def _one_part_excerpt(first: dict[str, str], body: bytes) -> str | None:
    """The excerpt of a message of one part, as ``_summarize_parsed`` makes it, read
    from its fields without the ``email`` package's objects (a third of a plain
    message's summary); None for any other message, which the parser then reads.
    The rules are compat32's: no Content-Type is text/plain (RFC 2045 section 5.2), a
    part marked attachment gives no excerpt, and the charset is the type's
    ``charset`` parameter, US-ASCII without one."""
    ctype = first.get("content-type")
    disposition = first.get("content-disposition", "")
    cte = first.get("content-transfer-encoding", "")
    if not (disposition.isascii() and cte.isascii()):
        return None  # 8-bit values: compat32 makes Header objects of them
    charset = "us-ascii"
    if ctype is None:
        maintype, subtype = "text", "plain"
    else:
        m = _SIMPLE_TYPE.fullmatch(ctype)
        if m is None:
            return None
        maintype, _, subtype = m["type"].lower().partition("/")
        if maintype == "multipart":
            return None
        for name, quoted, plain in _PARAM.findall(m["params"]):
            if name.lower() == "charset":
                charset = (quoted if quoted or not plain else plain).lower() or "us-ascii"
                break
    if maintype != "text" or disposition.strip().lower().startswith("attachment"):
        return ""
    if subtype not in ("plain", "html"):
        return ""
    encoding = cte.lower()
    if encoding in _ENCODED:
        return None
    payload = quopri.decodestring(body) if encoding == "quoted-printable" else body
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    return _excerpt_of(payload.decode(charset, "replace"), subtype)


def excerpt(text: str) -> str:
    """The start of ``text`` with its whitespace runs made single spaces, at most
    EXCERPT_CHARS long: ``" ".join(text.split())[:EXCERPT_CHARS]``."""
    # A prefix of the text gives a prefix of that (a word cut at the end is the start
    # of the whole word), so the text is read only as far as the excerpt needs:
    # splitting all 8 KiB was a third of a small message's summary. Most text needs
    # little more than the excerpt's length (splitting 600 characters of short words
    # took 14 us, 375 took 9).
    size = EXCERPT_CHARS + EXCERPT_CHARS // 4
    while True:
        short = " ".join(text[:size].split())
        if len(short) >= EXCERPT_CHARS or size >= len(text):
            return short[:EXCERPT_CHARS]
        size *= 4
