"""RFC 5321 paths: the argument of MAIL FROM and RCPT TO (pure).

Grammar (RFC 5321 section 4.1.2): Path = "<" [ A-d-l ":" ] Mailbox ">", Mailbox =
Local-part "@" ( Domain / address-literal ), Local-part = Dot-string / Quoted-string.
Parsing is strict where a loose reading could relay by accident: the domain that
decides local or remote is the one after the last unquoted '@' of the mailbox, a
trailing dot is removed from it (``a@example.com.`` is ``a@example.com``), and the
sender-routing forms (source routes, '%', '!', a quoted '@') are reported so that
policy can refuse them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gehirn_ts.mta import replies
from gehirn_ts.mta.replies import Reply, SmtpError

ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"^{ATEXT}+(\.{ATEXT}+)*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_SUBDOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_SUBDOMAIN}(\.{_SUBDOMAIN})*$")
_IPV4 = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}"
_LITERAL = re.compile(rf"^\[({_IPV4}|IPv6:[0-9A-Fa-f:.]+)\]$")

MAX_LOCAL = 64  # RFC 5321 section 4.5.3.1.1
MAX_DOMAIN = 255  # 4.5.3.1.2
MAX_PATH = 256  # 4.5.3.1.3


@dataclass(frozen=True)
class Mailbox:
    local: str  # as written: a dot-string, or a quoted string with its quotes
    domain: str  # lowercased, no trailing dot; "" for the bare <postmaster>
    route: tuple[str, ...] = ()  # source route domains (obsolete; kept to refuse them)

    @property
    def local_text(self) -> str:
        """The local part with quoting removed."""
        if self.local.startswith('"'):
            return re.sub(r"\\(.)", r"\1", self.local[1:-1])
        return self.local

    @property
    def is_routed(self) -> bool:
        """Sender-specified routing: a source route, or '%', '!' or '@' in the local part."""
        text = self.local_text
        return bool(self.route) or "%" in text or "!" in text or "@" in text

    @property
    def is_postmaster(self) -> bool:
        return self.local_text.lower() == "postmaster"

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local


def _error(kind: str) -> SmtpError:
    reply: Reply = replies.BAD_SENDER_SYNTAX if kind == "sender" else replies.BAD_RECIPIENT_SYNTAX
    return SmtpError(reply)


def _split_path(arg: str) -> tuple[str, str]:
    """'<...>' and the rest of the argument; '>' inside a quoted string does not end it."""
    if not arg.startswith("<"):
        raise ValueError("no <")
    quoted = escaped = False
    for i, ch in enumerate(arg[1:], start=1):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return arg[1:i], arg[i + 1 :]
    raise ValueError("no >")


def _domain(text: str) -> str:
    if text.endswith("."):
        text = text[:-1]
    if len(text) > MAX_DOMAIN:
        raise ValueError("domain too long")
    if _LITERAL.match(text):
        return (
            text.lower() if not text.lower().startswith("[ipv6:") else "[IPv6:" + text[6:].lower()
        )
    if not _DOMAIN.match(text):
        raise ValueError("bad domain")
    return text.lower()


def _mailbox(text: str, allow_postmaster: bool) -> Mailbox:
    route: tuple[str, ...] = ()
    if text.startswith("@"):
        adl, sep, text = text.partition(":")
        if not sep:
            raise ValueError("source route without ':'")
        domains = []
        for part in adl.split(","):
            if not part.startswith("@"):
                raise ValueError("bad source route")
            domains.append(_domain(part[1:]))
        route = tuple(domains)
    if text.startswith('"'):
        end = _split_quoted(text)
        local, rest = text[:end], text[end:]
        if not _QUOTED.match(local):
            raise ValueError("bad quoted local part")
        if not rest.startswith("@"):
            raise ValueError("no domain")
        domain_text = rest[1:]
    else:
        local, at, domain_text = text.rpartition("@")
        if not at:
            if allow_postmaster and text.lower() == "postmaster" and not route:
                return Mailbox(text, "")
            raise ValueError("no domain")
        if not _DOT_STRING.match(local):
            raise ValueError("bad local part")
    if len(local.encode()) > MAX_LOCAL:
        raise ValueError("local part too long")
    return Mailbox(local, _domain(domain_text), route)


def _split_quoted(text: str) -> int:
    escaped = False
    for i, ch in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return i + 1
    raise ValueError("unterminated quoted string")


def parse_path(
    arg: bytes, *, kind: str, allow_postmaster: bool = False
) -> tuple[Mailbox | None, bytes]:
    """Parse '<path> params...' into (mailbox or None for '<>', the parameter bytes).

    ``kind`` is "sender" (MAIL FROM: '<>' allowed) or "recipient" (RCPT TO).
    """
    try:
        text = arg.decode("ascii")
    except UnicodeDecodeError:
        raise SmtpError(replies.NON_ASCII)
    text = text.lstrip(" ")  # lenient: "MAIL FROM: <a@b>" is common
    try:
        path, rest = _split_path(text)
    except ValueError:
        raise _error(kind)
    if rest and not rest.startswith(" "):
        raise _error(kind)
    if len(path) + 2 > MAX_PATH:
        raise _error(kind)
    if path == "":
        if kind != "sender":
            raise _error(kind)
        return None, rest.strip(" ").encode()
    try:
        mailbox = _mailbox(path, allow_postmaster and kind == "recipient")
    except ValueError:
        raise _error(kind)
    return mailbox, rest.strip(" ").encode()
