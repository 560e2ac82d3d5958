"""Who may send what to whom (RFC 5321 section 3.9: no open relay).

- A recipient in a served domain (or the bare <postmaster>, RFC 5321 section 4.5.1)
  is local: accepted on every listener.
- Any other recipient is relayed only for an authenticated session or a client in
  ``trusted_networks`` (the legacy hosts); everybody else gets 554 5.7.1.
- Sender-specified routing (source routes, '%', '!', a quoted '@') from a client that is
  neither authenticated nor trusted is refused, as Postfix does with
  allow_untrusted_routing = no: such forms have relayed through MTAs that read them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gehirn_ts.mta import replies
from gehirn_ts.mta.address import Mailbox
from gehirn_ts.mta.esmtp import Session
from gehirn_ts.mta.replies import Reply, SmtpError
from gehirn_ts.mta.spf import SpfChecker, SpfResult
from gehirn_ts.netaddr import Networks

LOCAL = "local"
RELAY = "relay"

OwnerLookup = Callable[[str], Awaitable[str | None]]
# address -> (owner, route or None for the default) or None when unknown
RouteLookup = Callable[[str], Awaitable[Any]]
Authenticator = Callable[[str, str], Awaitable[str | None]]


class RelayPolicy:
    def __init__(
        self,
        owner: OwnerLookup,
        authenticator: Authenticator,
        trusted_networks: Sequence[str],
        spf: SpfChecker | None = None,
        spf_fail: str = "reject",
        routes: RouteLookup | None = None,
    ) -> None:
        self._routes = routes
        self._owner = owner
        self._authenticate = authenticator
        self._trusted = Networks(trusted_networks)
        self._spf = spf
        self._spf_fail = spf_fail

    def reconfigure(self, trusted_networks: Sequence[str], spf_fail: str) -> None:
        """New settings from a reloaded config (SIGHUP); sessions check them from now on."""
        self._trusted = Networks(trusted_networks)
        self._spf_fail = spf_fail

    async def check_sender(self, sender: Mailbox | None, session: Session) -> SpfResult | None:
        """SPF for clients that are neither authenticated nor trusted (RFC 7208)."""
        if self._spf is None or self.trusted(session):
            return None
        verdict = await self._spf.check(
            session.client_ip, str(sender) if sender else "", session.helo or ""
        )
        if verdict.result == "fail" and self._spf_fail == "reject":
            # RFC 7372 section 3.2: 5.7.23, SPF validation failed.
            text = f"SPF validation failed: {verdict.explanation}"[:300]
            raise SmtpError(Reply(550, "5.7.23", text))
        return verdict

    def trusted(self, session: Session) -> bool:
        return session.account is not None or session.client_ip in self._trusted

    async def recipient(self, mailbox: Mailbox, session: Session) -> str:
        trusted = self.trusted(session)
        if mailbox.is_routed and not trusted:
            raise SmtpError(replies.ROUTING_DENIED)
        if mailbox.domain == "":
            return LOCAL  # the bare <postmaster>
        if self._routes is not None and not mailbox.is_postmaster:
            # The route lookup names the domain's owner too: for a known address (most
            # RCPTs) one store read, and the owner alone only when it finds nothing.
            found = await self._routes(f"{mailbox.local_text}@{mailbox.domain}")
            if found is not None:
                if found[1] is not None and found[1].action == "reject":
                    raise SmtpError(replies.NO_SUCH_USER)
                return LOCAL
            if await self._owner(mailbox.domain) is not None:
                raise SmtpError(replies.NO_SUCH_USER)  # a served domain, an unknown address
        elif await self._owner(mailbox.domain) is not None:
            # RFC 5321 section 4.5.1: postmaster exists in every domain.
            return LOCAL
        if trusted:
            return RELAY
        raise SmtpError(replies.RELAY_DENIED)

    async def authenticate(self, username: str, password: str) -> str | None:
        return await self._authenticate(username, password)
