"""URL scheme -> destination class; checks a URL when a subscription is created."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime

from gehirn_ts.edj import signature
from gehirn_ts.edj.destinations.chat import (
    PushoverDestination,
    SlackDestination,
    pushover_settings,
    slack_path,
)
from gehirn_ts.edj.destinations.email import EmailDestination, parse_mailto
from gehirn_ts.edj.destinations.http import WebhookDestination
from gehirn_ts.edj.destinations.irc import IrcDestination, parse_irc_url
from gehirn_ts.edj.destinations.sms import SmsDestination, twilio_settings
from gehirn_ts.edj.netguard import AddressPolicy, ForbiddenAddress
from gehirn_ts.interfaces import IDestination
from gehirn_ts.redact import redact_url

MAX_URL_LENGTH = 2048


class DestinationError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Context:
    """What destinations need from the daemon, injected by tap.py (tests pass fakes)."""

    http: Any
    clock: IReactorTime
    policy: AddressPolicy
    http_timeout: float = 10.0
    # The e-mail destination's outbound queue (mta.outbound.Outbound), its From address,
    # and the account name -> id lookup.
    outbound: Any = None
    mail_from: str = ""
    account_id: Any = None
    # Base URLs of the hosted APIs (configurable for tests and compatible providers).
    slack_url: str = "https://hooks.slack.com"
    pushover_url: str = "https://api.pushover.net"
    twilio_url: str = "https://api.twilio.com"
    irc: Any = None  # the IRC bots (edj.destinations.irc.IrcNetwork)
    mail_loop_limit: int = 3
    irc_timeout: float = 10.0


SLACK_HOST = "hooks.slack.com"


def _is_slack(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" and (parts.hostname or "") == SLACK_HOST


def _webhook(url: str, secret: str | None, ctx: Context) -> IDestination:
    if _is_slack(url):
        return _slack(url, secret, ctx)
    return WebhookDestination(url, secret, http=ctx.http, clock=ctx.clock, timeout=ctx.http_timeout)


def _slack(url: str, secret: str | None, ctx: Context) -> IDestination:
    return SlackDestination(
        url, http=ctx.http, clock=ctx.clock, timeout=ctx.http_timeout, base=ctx.slack_url
    )


def _pushover(url: str, secret: str | None, ctx: Context) -> IDestination:
    return PushoverDestination(
        url, http=ctx.http, clock=ctx.clock, timeout=ctx.http_timeout, base=ctx.pushover_url
    )


def _twilio(url: str, secret: str | None, ctx: Context) -> IDestination:
    return SmsDestination(
        url, http=ctx.http, clock=ctx.clock, timeout=ctx.http_timeout, base=ctx.twilio_url
    )


def _irc(url: str, secret: str | None, ctx: Context) -> IDestination:
    return IrcDestination(url, network=ctx.irc, timeout=ctx.irc_timeout)


def _check_irc(url: str, secret: str | None, policy: AddressPolicy) -> None:
    try:
        settings = parse_irc_url(url)
    except ValueError as e:
        raise DestinationError("url", str(e))
    try:
        policy.check_literal(settings.host)
    except ForbiddenAddress as e:
        raise DestinationError("url", str(e))
    _no_secret("IRC", secret)


def _no_secret(scheme: str, secret: str | None) -> None:
    if secret is not None:
        raise DestinationError("secret", f"a {scheme} destination takes no secret")


def _checker(parse: Callable[[str], Any], scheme: str) -> Checker:
    def check(url: str, secret: str | None, policy: AddressPolicy) -> None:
        try:
            parse(url)
        except ValueError as e:
            raise DestinationError("url", str(e))
        _no_secret(scheme, secret)

    return check


def _check_http(url: str, secret: str | None, policy: AddressPolicy) -> None:
    if _is_slack(url):
        _checker(slack_path, "Slack")(url, secret, policy)
        return
    parts = urlsplit(url)
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise DestinationError("url", "has an invalid port")
    if not host:
        raise DestinationError("url", "has no host")
    if parts.fragment:
        raise DestinationError("url", "must not have a #fragment")
    try:
        policy.check_literal(host)
    except ForbiddenAddress as e:
        raise DestinationError("url", str(e))
    if secret is not None:
        try:
            signature.parse_secret(secret)
        except signature.SecretError as e:
            raise DestinationError("secret", str(e))


def _email(url: str, secret: str | None, ctx: Context) -> IDestination:
    return EmailDestination(
        url,
        outbound=ctx.outbound,
        account_id=ctx.account_id,
        sender=ctx.mail_from,
        clock=ctx.clock,
        loop_limit=ctx.mail_loop_limit,
    )


def _check_email(url: str, secret: str | None, policy: AddressPolicy) -> None:
    try:
        parse_mailto(url)
    except ValueError as e:
        raise DestinationError("url", str(e))
    if secret is not None:
        raise DestinationError("secret", "a mailto: destination takes no secret")


MAX_BATCH = 100  # events in one webhook request (CloudEvents' batched mode)


def check_batch(batch: Any, url: str) -> int:
    """A subscription's ``batch``: 1 to MAX_BATCH; above 1 only for a plain webhook (an
    http(s) URL that is not Slack's: it is sent the CloudEvents themselves).
    DestinationError (field ``batch``) says why not."""
    if isinstance(batch, bool) or not isinstance(batch, int):
        raise DestinationError("batch", "must be an integer")
    if not 1 <= batch <= MAX_BATCH:
        raise DestinationError("batch", f"must be from 1 to {MAX_BATCH}")
    if batch > 1:
        if urlsplit(url).scheme.lower() not in ("http", "https") or _is_slack(url):
            raise DestinationError("batch", "only an HTTP webhook takes events in batches")
    return batch


Builder = Callable[[str, str | None, Context], IDestination]
Checker = Callable[[str, str | None, AddressPolicy], None]

SCHEMES: dict[str, tuple[Builder, Checker]] = {
    "http": (_webhook, _check_http),
    "https": (_webhook, _check_http),
    "mailto": (_email, _check_email),
    "slack": (_slack, _checker(slack_path, "Slack")),
    "pushover": (_pushover, _checker(pushover_settings, "Pushover")),
    "twilio": (_twilio, _checker(twilio_settings, "Twilio")),
    "irc": (_irc, _check_irc),
    "ircs": (_irc, _check_irc),
}


def check(url: Any, secret: Any, policy: AddressPolicy) -> None:
    """Raise DestinationError naming the field when a subscription's destination is bad."""
    if not isinstance(url, str) or not url:
        raise DestinationError("url", "required, a destination URL such as https://...")
    if len(url) > MAX_URL_LENGTH or any(c.isspace() or ord(c) < 32 for c in url):
        raise DestinationError("url", f"must be at most {MAX_URL_LENGTH} characters, no spaces")
    if secret is not None and not isinstance(secret, str):
        raise DestinationError("secret", "must be a string")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise DestinationError(
            "url", f"unsupported scheme {scheme!r} (supported: {', '.join(sorted(SCHEMES))})"
        )
    SCHEMES[scheme][1](url, secret, policy)


def build(url: str, secret: str | None, ctx: Context) -> IDestination:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise DestinationError("url", f"unsupported scheme {scheme!r}")
    return SCHEMES[scheme][0](url, secret, ctx)


@functools.lru_cache(maxsize=1024)
def redact(url: str) -> str:
    """The URL as logs and API answers show it: each destination hides its own secrets
    (Slack's token, Pushover's keys, Twilio's credentials, an IRC password), the rest
    as redact_url does (as Apprise does). A pure function of the URL, kept per URL:
    every delivery's log line asks for it."""
    scheme = urlsplit(url).scheme.lower()
    try:
        if scheme in SCHEMES:
            blank = Context(http=None, clock=None, policy=None)  # type: ignore[arg-type]
            return build(url, None, blank).redacted_url()
    except Exception:  # noqa: S110 - an unusable URL is shown as redact_url shows it
        pass
    return redact_url(url)
