"""Redaction of secrets in URLs, in the spirit of Apprise's privacy mode.

Kept: scheme, host, port, and the shape of the path. Hidden: passwords, query values,
and path segments long enough to be tokens (Slack and similar services put the secret
in the path).
"""

from __future__ import annotations

from urllib.parse import SplitResult, quote, unquote, urlsplit

MASK = "****"
TOKEN_LENGTH = 12


def _segment(segment: str) -> str:
    if len(unquote(segment)) >= TOKEN_LENGTH:
        return segment[:2] + MASK
    return segment


def redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return MASK
    netloc = ""
    if parts.username is not None:
        netloc = quote(unquote(parts.username), safe="")
        if parts.password is not None:
            netloc += ":" + MASK
        netloc += "@"
    netloc += f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    path = "/".join(_segment(s) for s in parts.path.split("/"))
    query = "&".join(
        (item.split("=", 1)[0] + "=" + MASK) if "=" in item else MASK
        for item in parts.query.split("&")
        if item
    )
    return SplitResult(parts.scheme, netloc, path, query, "").geturl()


def redact_secret(secret: str | None) -> str | None:
    if not secret:
        return None
    return secret[: len("whsec_")] + MASK if secret.startswith("whsec_") else MASK
