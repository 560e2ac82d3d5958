"""The send API's request: validation (naming the bad field) and the MIME message (pure).

The message is built as Python's ``email`` package writes it (policy SMTP: CRLF,
encoded words for non-ASCII headers; a body as 7bit, 8bit (sent with BODY=8BITMIME),
quoted-printable or base64, by the package's own choice).
"""

from __future__ import annotations

import base64
import binascii
import email.contentmanager
import email.policy
import re
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import getaddresses, parseaddr
from typing import Any

from gehirn_ts.mta.address import parse_path
from gehirn_ts.mta.mimepolicy import SMTP
from gehirn_ts.mta.replies import SmtpError
from gehirn_ts.mta.summary import header_message, plain_addresses
from gehirn_ts.stamps import date_text

MAX_RECIPIENTS = 1000
MAX_TAGS = 10
MAX_ATTACHMENTS = 100
NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")
# Fields the builder writes itself; ``headers`` cannot set them.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "From",
        "To",
        "Cc",
        "Bcc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "DKIM-Signature",
        "Received",
        "Return-Path",
        "Sender",
    )
)
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 section 2.2: ftext
_ENVID = re.compile(r"^[!-~]{1,100}$")


# Every character str.splitlines() breaks on: the email package refuses them in a
# header value, and a header must stay one logical line.
_LINE_BREAKS = frozenset("\r\n\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029")


def _one_line(value: str) -> bool:
    return not _LINE_BREAKS.intersection(value)


class FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Dsn:
    notify: list[str] | None = None
    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    content_type: str


@dataclass(frozen=True)
class SendRequest:
    sender: Address
    to: list[Address]
    cc: list[Address]
    bcc: list[Address]
    reply_to: list[Address]
    subject: str
    text: str | None
    html: str | None
    attachments: list[Attachment]
    headers: list[tuple[str, str]]
    tags: list[str]
    metadata: dict[str, str]
    dsn: Dsn = field(default_factory=Dsn)

    @property
    def recipients(self) -> list[str]:
        seen: dict[str, None] = {}
        for a in [*self.to, *self.cc, *self.bcc]:
            seen.setdefault(a.addr_spec, None)
        return list(seen)


def mailbox(value: Any, name: str) -> Address:
    """One address, bare or with a display name ("Ann <ann@example.org>")."""
    if not isinstance(value, str) or not value.strip() or len(value) > 998:
        raise FieldError(name, "must be an e-mail address")
    if not _one_line(value):
        raise FieldError(name, "must not contain line breaks")
    plain = plain_addresses(value)
    display, addr = plain[0] if plain is not None and len(plain) == 1 else parseaddr(value)
    checked = envelope_address(addr, name) if addr else None
    if checked is None:
        raise FieldError(name, f"{value!r} is not an e-mail address")
    local, _, domain = checked.rpartition("@")
    try:
        return Address(display_name=display, username=local, domain=domain)
    except (ValueError, IndexError) as e:
        raise FieldError(name, f"{value!r} is not an e-mail address: {e}")


def envelope_address(value: Any, name: str) -> str:
    """An RFC 5321 mailbox (no source route, no %-hack), as in RCPT TO."""
    if not isinstance(value, str) or not value or len(value) > 254:
        raise FieldError(name, "must be an e-mail address")
    try:
        box, rest = parse_path(f"<{value}>".encode(), kind="recipient")
    except (SmtpError, UnicodeEncodeError):
        raise FieldError(name, f"{value!r} is not an e-mail address")
    if box is None or rest or box.is_routed or "@" not in str(box):
        raise FieldError(name, f"{value!r} is not an e-mail address")
    return str(box)


def _mailboxes(value: Any, name: str) -> list[Address]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise FieldError(name, "must be an address or a list of addresses")
    return [
        mailbox(v, f"{name}[{i}]" if not isinstance(value, str) else name)
        for i, v in enumerate(items)
    ]


def _text(body: dict[str, Any], name: str, limit: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise FieldError(name, "must be a string")
    if limit is not None and len(value) > limit:
        raise FieldError(name, f"longer than {limit} characters")
    return value


def parse_dsn(value: Any) -> Dsn:
    if value is None:
        return Dsn()
    if not isinstance(value, dict):
        raise FieldError("dsn", "must be an object with notify, ret, envid")
    for key in value:
        if key not in ("notify", "ret", "envid"):
            raise FieldError(f"dsn.{key}", "unknown field (allowed: notify, ret, envid)")
    notify = value.get("notify")
    if notify is not None:
        if isinstance(notify, str):
            notify = [notify]
        if (
            not isinstance(notify, list)
            or not notify
            or not all(isinstance(n, str) for n in notify)
        ):
            raise FieldError("dsn.notify", "must be a list of SUCCESS, FAILURE, DELAY, or NEVER")
        notify = [n.upper() for n in notify]
        # RFC 3461 section 4.1: NEVER alone, or any of the others.
        if notify != ["NEVER"] and (
            not set(notify) <= set(NOTIFY_WORDS) or len(set(notify)) != len(notify)
        ):
            raise FieldError("dsn.notify", "NEVER alone, or any of SUCCESS, FAILURE, DELAY")
    ret = value.get("ret")
    if ret is not None and (not isinstance(ret, str) or ret.upper() not in ("FULL", "HDRS")):
        raise FieldError("dsn.ret", "must be FULL or HDRS")
    envid = value.get("envid")
    if envid is not None and (not isinstance(envid, str) or not _ENVID.match(envid)):
        raise FieldError("dsn.envid", "1 to 100 printable ASCII characters")
    return Dsn(notify, ret.upper() if ret else None, envid)


def parse_tags_metadata(body: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    tags = body.get("tags", [])
    if (
        not isinstance(tags, list)
        or len(tags) > MAX_TAGS
        or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tags)
    ):
        raise FieldError("tags", f"a list of at most {MAX_TAGS} strings of 1 to 64 characters")
    metadata = body.get("metadata", {})
    if (
        not isinstance(metadata, dict)
        or len(metadata) > 50
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 1024
            for k, v in metadata.items()
        )
    ):
        raise FieldError(
            "metadata",
            "an object of at most 50 string values (keys up to 64, values up to 1024 characters)",
        )
    return tags, metadata


SEND_FIELDS = (
    "from",
    "to",
    "cc",
    "bcc",
    "reply_to",
    "subject",
    "text",
    "html",
    "attachments",
    "headers",
    "tags",
    "metadata",
    "dsn",
)


def parse_send(body: dict[str, Any]) -> SendRequest:
    for name in body:
        if name not in SEND_FIELDS:
            raise FieldError(name, f"unknown field (allowed: {', '.join(SEND_FIELDS)})")
    if "from" not in body:
        raise FieldError("from", "required")
    sender = mailbox(body["from"], "from")
    to, cc, bcc = (_mailboxes(body.get(n), n) for n in ("to", "cc", "bcc"))
    if not (to or cc or bcc):
        raise FieldError("to", "at least one recipient in to, cc or bcc")
    total = len(to) + len(cc) + len(bcc)
    if total > MAX_RECIPIENTS:
        raise FieldError("to", f"at most {MAX_RECIPIENTS} recipients in all")
    subject = _text(body, "subject", 998) or ""
    if not _one_line(subject):
        raise FieldError("subject", "must not contain line breaks")
    text, html = _text(body, "text"), _text(body, "html")
    attachments = []
    raw_attachments = body.get("attachments", [])
    if not isinstance(raw_attachments, list) or len(raw_attachments) > MAX_ATTACHMENTS:
        raise FieldError("attachments", f"a list of at most {MAX_ATTACHMENTS} objects")
    for i, item in enumerate(raw_attachments):
        where = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise FieldError(where, "must be an object with filename, content, content_type")
        for key in item:
            if key not in ("filename", "content", "content_type"):
                raise FieldError(f"{where}.{key}", "unknown field")
        filename = item.get("filename")
        if (
            not isinstance(filename, str)
            or not filename
            or len(filename) > 255
            or any(c in filename for c in "\0/\\")
            or not _one_line(filename)
        ):
            raise FieldError(f"{where}.filename", "a file name without path or line breaks")
        try:
            content = base64.b64decode(item.get("content", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise FieldError(f"{where}.content", "must be base64")
        ctype = item.get("content_type", "application/octet-stream")
        if not isinstance(ctype, str) or not re.match(r"^[\w.+-]+/[\w.+-]+$", ctype):
            raise FieldError(f"{where}.content_type", "a MIME type such as application/pdf")
        attachments.append(Attachment(filename, content, ctype.lower()))
    headers = []
    raw_headers = body.get("headers", {})
    if not isinstance(raw_headers, dict) or len(raw_headers) > 50:
        raise FieldError("headers", "an object of at most 50 header fields")
    for name, value in raw_headers.items():
        if not _HEADER_NAME.match(name) or name.lower() in RESERVED_HEADERS:
            raise FieldError(f"headers.{name}", "not a header field that can be set here")
        if not isinstance(value, str) or not _one_line(value) or len(value) > 998:
            raise FieldError(f"headers.{name}", "a string without line breaks")
        headers.append((name, value))
    tags, metadata = parse_tags_metadata(body)
    return SendRequest(
        sender=sender,
        to=to,
        cc=cc,
        bcc=bcc,
        reply_to=_mailboxes(body.get("reply_to"), "reply_to"),
        subject=subject,
        text=text,
        html=html,
        attachments=attachments,
        headers=headers,
        tags=tags,
        metadata=metadata,
        dsn=parse_dsn(body.get("dsn")),
    )


# A header line written as it is: printable ASCII words separated by single spaces,
# short enough not to be folded (RFC 5322 section 2.1.1: 78 characters).
_PLAIN_VALUE = re.compile(r"[!-~]+(?: [!-~]+)*")
_FOLD_AT = 78


def _header(name: str, value: str) -> bytes:
    """One header field, CRLF-terminated. A short plain ASCII value is written as the
    SMTP policy would write it; anything else (non-ASCII, long, odd spacing) is folded
    and encoded by the policy itself. The policy parses every value it is given, which
    was the larger part of building a message (docs/performance.md)."""
    if len(name) + 2 + len(value) <= _FOLD_AT and _PLAIN_VALUE.fullmatch(value):
        return f"{name}: {value}\r\n".encode("ascii")
    return SMTP.fold_binary(*SMTP.header_store_parse(name, value))


def _addresses(addresses: list[Address]) -> str:
    return ", ".join(str(a) for a in addresses)


def build(req: SendRequest, *, message_id: str, now: float) -> bytes:
    """The RFC 5322 message (Bcc is never written: RFC 5322 section 3.6.3)."""
    head = [_header("From", _addresses([req.sender]))]
    if req.to:
        head.append(_header("To", _addresses(req.to)))
    if req.cc:
        head.append(_header("Cc", _addresses(req.cc)))
    if req.reply_to:
        head.append(_header("Reply-To", _addresses(req.reply_to)))
    head.append(_header("Subject", req.subject))
    head.append(_header("Date", date_text(now, gmt=False)))
    head.append(_header("Message-ID", message_id))
    for name, value in req.headers:
        head.append(_header(name, value))
    if not req.attachments and (req.text is None or req.html is None):
        head.append(
            _single_part(req.text, "plain") if req.html is None else _single_part(req.html, "html")
        )
        return b"".join(head)
    # The MIME structure (MIME-Version, Content-Type, the body encodings) is the email
    # package's, written after the fields above.
    msg = EmailMessage(policy=SMTP)
    add_content(msg, req)
    return b"".join(head) + msg.as_bytes()


# The email package's choice of a text body's transfer encoding (7bit, 8bit,
# quoted-printable or base64, by line length and content) and the encoding itself.
_encode_text = getattr(email.contentmanager, "_encode_text", None)
# Its generator writes every line ending of a body as the policy's CRLF.
_LINE_END = re.compile(r"\r\n|\r|\n")


def _single_part(text: str | None, subtype: str) -> bytes:
    """A message's one text part (MIME fields and body), as ``EmailMessage.set_content``
    and the SMTP policy's generator write it; a property test holds the two equal.
    Through ``EmailMessage``, which parses back each field it sets, a 1 KiB message
    took 0.41 ms to build; so, 0.04 ms (docs/performance.md)."""
    if _encode_text is None:  # not in this Python: the email package does all of it
        msg = EmailMessage(policy=SMTP)
        msg.set_content(text or "", subtype=subtype)
        return msg.as_bytes()
    cte, payload = _encode_text(text or "", "utf-8", None, SMTP)
    fields = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\nMIME-Version: 1.0\r\n\r\n"
    )
    # An 8bit payload carries its bytes as surrogate escapes (the email package's way).
    return (fields + _LINE_END.sub("\r\n", payload)).encode("ascii", "surrogateescape")


def add_content(msg: EmailMessage, req: SendRequest) -> None:
    """The text, HTML and attachments of a request, as the message's MIME content."""
    if req.text is not None:
        msg.set_content(req.text)
        if req.html is not None:
            msg.add_alternative(req.html, subtype="html")
    elif req.html is not None:
        msg.set_content(req.html, subtype="html")
    else:
        msg.set_content("")
    for att in req.attachments:
        maintype, _, subtype = att.content_type.partition("/")
        msg.add_attachment(att.content, maintype=maintype, subtype=subtype, filename=att.filename)


class Head:
    """The header section of a raw message, parsed once for all the fields asked."""

    def __init__(self, message: bytes) -> None:
        # An ordinary header section is split here (as the parser splits it, property-
        # tested in mta/summary.py); anything else goes to the parser.
        start = message[: 256 * 1024]
        self._head = header_message(start) or BytesHeaderParser(
            policy=email.policy.compat32
        ).parsebytes(start)

    def addresses(self, name: str) -> list[str]:
        """The addr-specs of one address field."""
        values = self._head.get_all(name, [])
        plain = [plain_addresses(str(v)) for v in values]
        if all(p is not None for p in plain):
            return [addr for p in plain if p is not None for _, addr in p if addr]
        return [addr for _, addr in getaddresses(values) if addr]

    def value(self, name: str) -> str | None:
        value = self._head.get(name)
        return None if value is None else str(value)
