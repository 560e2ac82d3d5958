"""SMTP replies with their RFC 3463 enhanced status codes.

Every reply the server sends after the greeting and EHLO carries an enhanced code
(RFC 2034 section 3: not in the greeting nor in the EHLO response).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def lines(self) -> list[bytes]:
        """Wire lines without CRLF: every line carries the code and the enhanced code."""
        texts = self.text.split("\n") or [""]
        out = []
        for i, text in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            prefix = f"{self.code}{sep}{self.enhanced} " if self.enhanced else f"{self.code}{sep}"
            out.append((prefix + text).encode("utf-8", "replace"))
        return out

    @cached_property
    def wire(self) -> bytes:
        """The reply as sent, each line CRLF-terminated (made once: most are constants)."""
        return b"".join(line + b"\r\n" for line in self.lines())

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


class SmtpError(Exception):
    """A command is refused with ``reply``."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def r(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, text)


OK = r(250, "2.0.0", "OK")
SENDER_OK = r(250, "2.1.0", "Sender OK")
RECIPIENT_OK = r(250, "2.1.5", "Recipient OK")
RESET_OK = r(250, "2.0.0", "Reset OK")
NOOP_OK = r(250, "2.0.0", "OK")
BYE = r(221, "2.0.0", "Bye")
START_DATA = r(354, "", "End data with <CR><LF>.<CR><LF>")
READY_TLS = r(220, "2.0.0", "Ready to start TLS")
AUTH_OK = r(235, "2.7.0", "Authentication succeeded")
VRFY_CANNOT = r(252, "2.5.0", "Cannot VRFY user; try RCPT to attempt delivery")

# 4xx: try again later
TIMEOUT = r(421, "4.4.2", "Idle timeout, closing connection")
TOO_MANY_CONNECTIONS = r(421, "4.7.0", "Too many connections from your address, try later")
LOCAL_ERROR = r(451, "4.3.0", "Local error in processing, try again later")
TOO_MANY_RECIPIENTS = r(452, "4.5.3", "Too many recipients")
AUTH_RATE = r(454, "4.7.0", "Too many failed authentication attempts, try later")
TLS_UNAVAILABLE = r(454, "4.7.0", "TLS not available")

# 5xx: permanent
UNRECOGNIZED = r(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = r(500, "5.5.6", "Line too long")
SYNTAX = r(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = r(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = r(503, "5.5.1", "Bad sequence of commands")
HELO_FIRST = r(503, "5.5.1", "Send EHLO or HELO first")
NESTED_MAIL = r(503, "5.5.1", "Sender already given")
NEED_MAIL = r(503, "5.5.1", "Need MAIL before RCPT")
NEED_RCPT = r(503, "5.5.1", "Need RCPT before DATA")
NEED_MAIL_DATA = r(503, "5.5.1", "Need MAIL and RCPT before DATA")
ALREADY_AUTHENTICATED = r(503, "5.5.1", "Already authenticated")
AUTH_MECHANISM = r(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_REQUIRED = r(530, "5.7.0", "Authentication required")
TLS_REQUIRED = r(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_FAILED = r(535, "5.7.8", "Authentication credentials invalid")
AUTH_CANCELLED = r(501, "5.0.0", "Authentication cancelled")
AUTH_MALFORMED = r(501, "5.5.2", "Cannot decode the AUTH response")
NO_SUCH_USER = r(550, "5.1.1", "No such user here")
RELAY_DENIED = r(554, "5.7.1", "Relay access denied")
ROUTING_DENIED = r(554, "5.7.1", "Sender-specified routing is not allowed")
MESSAGE_TOO_BIG = r(552, "5.3.4", "Message size exceeds the fixed maximum")
BAD_RECIPIENT_SYNTAX = r(501, "5.1.3", "Bad recipient address syntax")
BAD_SENDER_SYNTAX = r(501, "5.1.7", "Bad sender address syntax")
PARAM_UNKNOWN = r(555, "5.5.4", "MAIL FROM/RCPT TO parameter not recognized or not implemented")
NON_ASCII = r(553, "5.6.7", "Non-ASCII addresses need SMTPUTF8, which is not offered")
