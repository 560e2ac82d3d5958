"""Delivery status notifications: RFC 3464 ``multipart/report`` messages (pure).

Who gets one (RFC 3461 section 4.1 and 5.2): NOTIFY=NEVER asks for none; without NOTIFY
a failure is reported (DELAY only when asked: our decision, DESIGN.md); SUCCESS covers
both "delivered" and "relayed" (section 4.2: the next hop did not offer DSN). Nothing is
ever reported to the null reverse-path (RFC 5321 section 6.1).
"""

from __future__ import annotations

import email.policy
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from email.utils import format_datetime, make_msgid

from gehirn_ts.mta.mimepolicy import SMTP

# Above this size a failure report carries the headers only (Postfix: bounce_size_limit).
FULL_RETURN_LIMIT = 50_000

NOTIFY_OF_ACTION = {
    "failed": "FAILURE",
    "delayed": "DELAY",
    "delivered": "SUCCESS",
    "relayed": "SUCCESS",
}


def wants_report(sender: str, notify: list[str] | None, action: str) -> bool:
    if not sender:
        return False
    if notify is None:
        return action == "failed"
    return NOTIFY_OF_ACTION[action] in [n.upper() for n in notify]


@dataclass(frozen=True)
class RecipientStatus:
    recipient: str
    action: str  # failed | delayed | delivered | relayed
    status: str  # RFC 3463, e.g. 5.1.1
    diagnostic: str | None = None  # the remote reply, e.g. "550 5.1.1 no such user"
    remote_mta: str | None = None
    orcpt: tuple[str, str] | None = None  # (addr-type, address)
    last_attempt: float | None = None
    will_retry_until: float | None = None


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _fields(pairs: list[tuple[str, str]]) -> Message:
    block = Message()
    for name, value in pairs:
        block[name] = value
    return block


_SUMMARY = {
    "failed": "could not be delivered to",
    "delayed": "has not yet been delivered to",
    "delivered": "was delivered to",
    "relayed": "was relayed (no further reports will follow) to",
}


def build_report(
    *,
    reporting_mta: str,
    to: str,
    original: bytes,
    arrival: float,
    now: float,
    statuses: list[RecipientStatus],
    envid: str | None = None,
    ret: str | None = None,
    message_id: str | None = None,
) -> bytes:
    """The report as bytes with CRLF line ends, ready for the queue (sender ``<>``)."""
    action = statuses[0].action
    report = EmailMessage(policy=SMTP)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = to
    report["Subject"] = {
        "failed": "Undelivered Mail Returned to Sender",
        "delayed": "Delayed Mail (still being retried)",
        "delivered": "Successful Mail Delivery Report",
        "relayed": "Mail Relay Report",
    }[action]
    report["Date"] = _date(now)
    report["Message-ID"] = message_id or make_msgid(domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: never answered automatically
    report["MIME-Version"] = "1.0"
    report.set_type("multipart/report")
    report.set_param("report-type", "delivery-status")

    lines = [f"This is the mail system at {reporting_mta}.", ""]
    lines.append(f"Your message {_SUMMARY[action]} the following recipients:")
    lines.append("")
    for s in statuses:
        detail = f": {s.diagnostic}" if s.diagnostic else ""
        lines.append(f"  <{s.recipient}>{detail}")
    if action == "delayed" and statuses[0].will_retry_until is not None:
        lines += ["", f"Delivery will be retried until {_date(statuses[0].will_retry_until)}."]
    text = EmailMessage(policy=SMTP)
    text.set_content("\n".join(lines) + "\n", charset="utf-8")
    del text["MIME-Version"]

    # RFC 3464 section 2.2: per-message fields, then one block per recipient (2.3).
    per_message = [("Reporting-MTA", f"dns; {reporting_mta}")]
    if envid:
        per_message.append(("Original-Envelope-Id", envid))
    per_message.append(("Arrival-Date", _date(arrival)))
    blocks = [_fields(per_message)]
    for s in statuses:
        pairs: list[tuple[str, str]] = []
        if s.orcpt:
            pairs.append(("Original-Recipient", f"{s.orcpt[0]};{s.orcpt[1]}"))
        pairs += [
            ("Final-Recipient", f"rfc822;{s.recipient}"),
            ("Action", s.action),
            ("Status", s.status),
        ]
        if s.remote_mta:
            pairs.append(("Remote-MTA", f"dns; {s.remote_mta}"))
        if s.diagnostic:
            pairs.append(("Diagnostic-Code", f"smtp; {s.diagnostic}"))
        if s.last_attempt is not None:
            pairs.append(("Last-Attempt-Date", _date(s.last_attempt)))
        if s.will_retry_until is not None:
            pairs.append(("Will-Retry-Until", _date(s.will_retry_until)))
        blocks.append(_fields(pairs))
    status_part = Message()
    status_part.set_type("message/delivery-status")
    status_part.set_payload(blocks)  # type: ignore[arg-type]
    del status_part["MIME-Version"]

    # RFC 3461 section 4.3: RET=HDRS returns the headers only; a failure returns the whole
    # message unless it is large. Delay and success reports carry the headers only.
    full = action == "failed" and (ret or "").upper() != "HDRS"
    returned = Message()
    if full and len(original) <= FULL_RETURN_LIMIT:
        returned.set_type("message/rfc822")
        inner = BytesParser(policy=email.policy.compat32).parsebytes(original)
        returned.set_payload([inner])  # type: ignore[arg-type]
    else:
        returned.set_type("text/rfc822-headers")
        headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(original)
        returned.set_payload("".join(f"{k}: {v}\n" for k, v in headers.items()), charset=None)
    del returned["MIME-Version"]
    report.set_payload([text, status_part, returned])  # type: ignore[arg-type]
    return report.as_bytes(policy=SMTP)
