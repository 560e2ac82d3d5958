"""Trace and result header fields the server adds (RFC 8601 via the authres library)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

import authres

from gehirn_ts.mta.dkim import DkimResult
from gehirn_ts.mta.spf import SpfResult

_dates: dict[tuple[int, bool], str] = {}


def date_text(seconds: float, gmt: bool = True) -> str:
    """An RFC 5322 section 3.3 date-time in UTC as the ``email`` package writes it: zone
    ``GMT`` (``formatdate``, for a Received field) or ``+0000`` (``format_datetime`` of
    an aware time, for a Date field; ``-0000`` would say the zone is unknown)."""
    # The second formatdate shows: datetime rounds the time to the microsecond first.
    frac, whole = math.modf(seconds)
    key = (int(whole) + (round(frac * 1e6) >= 1_000_000), gmt)
    text = _dates.get(key)
    if text is None:
        # Made once a second: formatdate was 1.4% of receiving's interpreter time.
        if len(_dates) >= 4:
            _dates.clear()
        text = _dates[key] = (
            formatdate(key[0], usegmt=True)
            if gmt
            else format_datetime(datetime.fromtimestamp(key[0], UTC))
        )
    return text


def authentication_results(
    authserv_id: str, spf: SpfResult | None, dkim: list[DkimResult]
) -> bytes:
    """An Authentication-Results field (RFC 8601), CRLF-terminated."""
    results: list[authres.AuthenticationResult] = []
    if spf is not None:
        if spf.identity == "mailfrom":
            results.append(
                authres.SPFAuthenticationResult(result=spf.result, smtp_mailfrom=spf.domain)
            )
        else:
            results.append(authres.SPFAuthenticationResult(result=spf.result, smtp_helo=spf.domain))
    for d in dkim:
        results.append(
            authres.DKIMAuthenticationResult(
                result=d.result, header_d=d.domain, header_s=d.selector
            )
        )
    if not dkim:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    return str(header).encode("utf-8", "replace") + b"\r\n"
