"""MAIL and RCPT parameters (pure): SIZE, BODY, RET, ENVID, AUTH, NOTIFY, ORCPT.

- esmtp-param = esmtp-keyword ["=" esmtp-value] (RFC 5321 section 4.1.2); a parameter
  string that does not fit this is a syntax error: 501 5.5.4.
- A keyword the server does not know, or a known one with a bad value: 555 5.5.4
  (RFC 5321 section 4.1.1.11; RFC 3461 section 4 for the DSN ones).
- A declared SIZE over the limit: 552 5.3.4 (RFC 1870 section 6.1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gehirn_ts.mta import replies
from gehirn_ts.mta.replies import Reply, SmtpError

_KEYWORD = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9-]*$")
_VALUE = re.compile(rb"^[\x21-\x3c\x3e-\x7e]+$")
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+$")

MAX_ENVID = 100  # RFC 3461 section 4.4
MAX_ORCPT = 500  # RFC 3461 section 4.2
NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")


class XtextError(ValueError):
    pass


def xtext_decode(text: str) -> str:
    """RFC 3461 section 4: '+' followed by two upper-case hex digits is one octet."""
    if not _XTEXT.match(text):
        raise XtextError("not xtext")
    octets = bytearray()
    for part in re.split(r"(\+[0-9A-F]{2})", text):
        if part.startswith("+"):
            octets.append(int(part[1:], 16))
        else:
            octets.extend(part.encode("ascii"))
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        raise XtextError("the octets are not UTF-8")


def xtext_encode(text: str) -> str:
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if code > 0x7E:
            out.extend(f"+{b:02X}" for b in ch.encode())
        elif code < 0x21 or ch in "+=":
            out.append(f"+{code:02X}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class MailParams:
    size: int | None = None
    body: str | None = None  # 7BIT | 8BITMIME
    ret: str | None = None  # FULL | HDRS
    envid: str | None = None  # decoded
    auth: str | None = None  # decoded AUTH= mailbox, "<>" when empty


@dataclass(frozen=True)
class RcptParams:
    notify: tuple[str, ...] | None = None  # ("NEVER",) or a subset of NOTIFY_VALUES
    orcpt: tuple[str, str] | None = None  # (addr-type, decoded address)


def _split(raw: bytes) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for token in raw.split(b" "):
        if not token:
            continue
        keyword, eq, value = token.partition(b"=")
        if not _KEYWORD.match(keyword) or (eq and not _VALUE.match(value)):
            raise SmtpError(replies.SYNTAX)
        name = keyword.decode().upper()
        if name in params:
            raise SmtpError(Reply(501, "5.5.4", f"Parameter {name} given twice"))
        params[name] = value.decode() if eq else None
    return params


def _unknown(name: str, why: str) -> SmtpError:
    return SmtpError(Reply(555, "5.5.4", f"{name} parameter {why}"))


def parse_mail(raw: bytes, *, size_limit: int, allowed: frozenset[str]) -> MailParams:
    """The parameters of MAIL FROM; ``allowed`` is what this session advertised."""
    values: dict[str, object] = {}
    for name, value in _split(raw).items():
        if name not in allowed:
            raise _unknown(name, "not recognized")
        if name == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise _unknown(name, "needs a number of octets")
            size = int(value)
            if size > size_limit:
                raise SmtpError(replies.MESSAGE_TOO_BIG)
            values["size"] = size
        elif name == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME"):
                raise _unknown(name, "must be 7BIT or 8BITMIME")
            values["body"] = body
        elif name == "RET":
            ret = (value or "").upper()
            if ret not in ("FULL", "HDRS"):
                raise _unknown(name, "must be FULL or HDRS")
            values["ret"] = ret
        elif name == "ENVID":
            if value is None or len(value) > MAX_ENVID:
                raise _unknown(name, f"needs an xtext value of at most {MAX_ENVID} characters")
            try:
                values["envid"] = xtext_decode(value)
            except XtextError:
                raise _unknown(name, "is not valid xtext")
        elif name == "AUTH":
            if value is None:
                raise _unknown(name, "needs a mailbox or <>")
            try:
                values["auth"] = xtext_decode(value)
            except XtextError:
                raise _unknown(name, "is not valid xtext")
    return MailParams(**values)  # type: ignore[arg-type]


def parse_rcpt(raw: bytes, *, allowed: frozenset[str]) -> RcptParams:
    values: dict[str, object] = {}
    for name, value in _split(raw).items():
        if name not in allowed:
            raise _unknown(name, "not recognized")
        if name == "NOTIFY":
            items = (value or "").upper().split(",")
            if items == ["NEVER"]:
                values["notify"] = ("NEVER",)
            elif (
                not items
                or any(i not in NOTIFY_VALUES for i in items)
                or len(set(items)) != len(items)
            ):
                raise _unknown(name, "must be NEVER, or SUCCESS, FAILURE and/or DELAY")
            else:
                values["notify"] = tuple(v for v in NOTIFY_VALUES if v in items)
        elif name == "ORCPT":
            if value is None or len(value) > MAX_ORCPT or ";" not in value:
                raise _unknown(name, "needs addr-type;xtext")
            addr_type, _, addr = value.partition(";")
            if not _ADDR_TYPE.match(addr_type):
                raise _unknown(name, "has a bad address type")
            try:
                values["orcpt"] = (addr_type.lower(), xtext_decode(addr))
            except XtextError:
                raise _unknown(name, "is not valid xtext")
    return RcptParams(**values)  # type: ignore[arg-type]
