"""The admin CLI: ``gehirn-ts [--config PATH] [--json] COMMAND ...``.

It works on the same database as the daemon (SQLite in WAL mode allows both).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from twisted.internet import task

from gehirn_ts.config import ConfigError, domain_name, load
from gehirn_ts.events import EventError, validate_account_name
from gehirn_ts.mta import dkim
from gehirn_ts.store.db import Conflict, MailStore, NotFound, Store
from gehirn_ts.store.keys import DkimKeyStore
from gehirn_ts.store.queue import QueueStore
from gehirn_ts.store.schema import SchemaError, migrate


class CliError(Exception):
    pass


_config: Any = None  # the loaded configuration (main sets it)


def _parser() -> argparse.ArgumentParser:
    # --json and --config are accepted before or after the command words.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        default=argparse.SUPPRESS,
        help="TOML configuration file (default: embedded defaults)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    p = argparse.ArgumentParser(
        prog="gehirn-ts", description="gehirn-ts administration", parents=[common]
    )
    sub = p.add_subparsers(dest="group", required=True)

    account = sub.add_parser("account", help="accounts").add_subparsers(dest="cmd", required=True)
    create = account.add_parser(
        "create", parents=[common], help="create an account and print its API key"
    )
    create.add_argument("name")
    account.add_parser("list", parents=[common], help="list accounts")

    key = sub.add_parser("key", help="API keys").add_subparsers(dest="cmd", required=True)
    kc = key.add_parser("create", parents=[common], help="create an API key and print it")
    who = kc.add_mutually_exclusive_group(required=True)
    who.add_argument("account", nargs="?", help="the account the key acts for")
    who.add_argument("--admin", action="store_true", help="an admin key")
    kr = key.add_parser("revoke", parents=[common], help="revoke an API key")
    kr.add_argument("key_id", help="the key id (the part after gts_)")
    key.add_parser("list", parents=[common], help="list API keys (never their secrets)")

    domain = sub.add_parser("domain", help="mail domains served").add_subparsers(
        dest="cmd", required=True
    )
    da = domain.add_parser("add", parents=[common], help="serve a domain for an account")
    da.add_argument("name")
    da.add_argument("account")
    dr = domain.add_parser("remove", parents=[common], help="stop serving a domain")
    dr.add_argument("name")
    domain.add_parser("list", parents=[common], help="list served domains")

    smtp_user = sub.add_parser("smtp-user", help="SMTP AUTH credentials").add_subparsers(
        dest="cmd", required=True
    )
    sc = smtp_user.add_parser(
        "create", parents=[common], help="create SMTP credentials and print the password"
    )
    sc.add_argument("account")
    sc.add_argument("username")
    sr = smtp_user.add_parser("revoke", parents=[common], help="revoke SMTP credentials")
    sr.add_argument("username")
    smtp_user.add_parser("list", parents=[common], help="list SMTP users (never passwords)")

    subs = sub.add_parser("subscription", help="event subscriptions").add_subparsers(
        dest="cmd", required=True
    )
    uc = subs.add_parser("create", parents=[common], help="send an account's events somewhere")
    uc.add_argument("account")
    uc.add_argument("pattern", help='event types, AMQP-style: "mail.*", "notice.#"')
    uc.add_argument("url", help="destination URL (docs/destinations.md)")
    uc.add_argument("--secret", help="Standard Webhooks secret (whsec_...), webhooks only")
    uc.add_argument("--template", help="message body template (docs/destinations.md)")
    uc.add_argument(
        "--batch", type=int, default=1, help="webhooks: up to this many events a request (1-100)"
    )
    ul = subs.add_parser("list", parents=[common], help="list subscriptions (URLs redacted)")
    ul.add_argument("--account")
    ud = subs.add_parser("delete", parents=[common], help="delete a subscription")
    ud.add_argument("id")

    dlv = sub.add_parser("delivery", help="event deliveries and dead letters").add_subparsers(
        dest="cmd", required=True
    )
    dl = dlv.add_parser("list", parents=[common], help="recent deliveries")
    dl.add_argument("--status", choices=("pending", "delivered", "dead", "cancelled"))
    dl.add_argument("--limit", type=int, default=50)
    dr = dlv.add_parser("replay", parents=[common], help="deliver a dead letter again (daemon)")
    dr.add_argument("id")

    pub = sub.add_parser("publish", parents=[common], help="publish an event (through the daemon)")
    pub.add_argument("type")
    pub.add_argument("--account", help="the account (none: a broadcast)")
    pub.add_argument("--subject")
    pub.add_argument("--severity", choices=("info", "warning", "critical"), default="info")
    pub.add_argument("--data", help="JSON data", default=None)
    snd = sub.add_parser("send", parents=[common], help="send a test mail (through the daemon)")
    snd.add_argument("--from", dest="sender", required=True)
    snd.add_argument("--to", required=True, action="append")
    snd.add_argument("--subject", default="gehirn-ts test")
    snd.add_argument("--text", default="A test message sent with gehirn-ts send.\n")

    dkim = sub.add_parser("dkim", help="DKIM signing keys").add_subparsers(
        dest="cmd", required=True
    )
    kg = dkim.add_parser(
        "keygen",
        parents=[common],
        help="make a signing key for a served domain and print the DNS record to publish",
    )
    kg.add_argument("domain")
    kg.add_argument("selector")
    kg.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    dkim.add_parser("list", parents=[common], help="list signing keys (never the private keys)")
    kd = dkim.add_parser("remove", parents=[common], help="stop signing with a key")
    kd.add_argument("domain")
    kd.add_argument("selector")

    spool = sub.add_parser("spool", help="received mail not processed yet").add_subparsers(
        dest="cmd", required=True
    )
    spool.add_parser("list", parents=[common], help="messages in spool/incoming, oldest first")

    queue = sub.add_parser("queue", help="the outbound queue").add_subparsers(
        dest="cmd", required=True
    )
    queue.add_parser("list", parents=[common], help="messages with recipients still queued")
    qs = queue.add_parser("show", parents=[common], help="one message: recipients, attempts")
    qs.add_argument("id")
    for name, doc in (
        ("flush", "try now"),
        ("delete", "stop delivering, without a bounce"),
        ("hold", "keep queued but do not try"),
        ("release", "undo hold"),
    ):
        q = queue.add_parser(name, parents=[common], help=f"{doc}: one message, or --all")
        which = q.add_mutually_exclusive_group(required=True)
        which.add_argument("id", nargs="?")
        which.add_argument("--all", action="store_true")
    return p


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


async def _run(args: argparse.Namespace, store: Store) -> tuple[Any, str]:
    """Carry out a command: (JSON result, text for a person)."""
    if args.group == "account" and args.cmd == "create":
        try:
            validate_account_name(args.name, "NAME")
        except EventError as e:
            raise CliError(str(e))
        account, key_id, token = await store.create_account(args.name)
        return (
            {"account": account.name, "key_id": key_id, "api_key": token},
            f"account {account.name} created\nAPI key (shown once, keep it): {token}",
        )
    if args.group == "account" and args.cmd == "list":
        accounts = await store.list_accounts()
        rows = [{"name": a.name, "created_at": _iso(a.created_at)} for a in accounts]
        return rows, "\n".join(f"{r['name']}\t{r['created_at']}" for r in rows) or "no accounts"
    if args.group == "key" and args.cmd == "create":
        key_id, token = await store.create_key(None if args.admin else args.account)
        return {"key_id": key_id, "api_key": token}, f"API key (shown once, keep it): {token}"
    if args.group == "key" and args.cmd == "revoke":
        await store.revoke_key(args.key_id)
        return {"revoked": args.key_id}, f"key {args.key_id} revoked"
    if args.group == "key" and args.cmd == "list":
        keys = await store.list_keys()
        for k in keys:
            k["created_at"], k["revoked_at"] = _iso(k["created_at"]), _iso(k["revoked_at"])
        lines = []
        for k in keys:
            owner = "admin" if k["admin"] else k["account"]
            revoked = f"\trevoked {k['revoked_at']}" if k["revoked_at"] else ""
            lines.append(f"{k['id']}\t{owner}\t{k['created_at']}{revoked}")
        text = "\n".join(lines)
        return keys, text or "no keys"
    mail = MailStore(store)
    if args.group == "domain" and args.cmd == "add":
        try:
            name = domain_name(args.name)
        except ValueError as e:
            raise CliError(f"NAME: {e}")
        await mail.add_domain(name, args.account)
        return {"domain": name, "account": args.account}, f"{name} served for {args.account}"
    if args.group == "domain" and args.cmd == "remove":
        await mail.remove_domain(args.name)
        return {"removed": args.name.lower()}, f"{args.name.lower()} no longer served"
    if args.group == "domain" and args.cmd == "list":
        domains = await mail.list_domains()
        rows = [{"domain": d, "account": a} for d, a in domains]
        return rows, "\n".join(f"{d}\t{a}" for d, a in domains) or "no domains"
    if args.group == "smtp-user" and args.cmd == "create":
        password = await mail.create_credential(args.account, args.username)
        return (
            {"username": args.username, "account": args.account, "password": password},
            f"SMTP user {args.username} for {args.account}\npassword (shown once): {password}",
        )
    if args.group == "smtp-user" and args.cmd == "list":
        users = await mail.list_credentials()
        for u in users:
            u["created_at"], u["revoked_at"] = _iso(u["created_at"]), _iso(u["revoked_at"])
        text = "\n".join(
            f"{u['username']}\t{u['account']}"
            + (f"\trevoked {u['revoked_at']}" if u["revoked_at"] else "")
            for u in users
        )
        return users, text or "no SMTP users"
    if args.group == "smtp-user" and args.cmd == "revoke":
        await mail.revoke_credential(args.username)
        return {"revoked": args.username}, f"SMTP user {args.username} revoked"
    if args.group == "dkim":
        return await _dkim(args, store)
    if args.group == "subscription":
        return await _subscriptions(args, store)
    if args.group == "delivery" and args.cmd == "list":
        deliveries = await store.list_deliveries(None, args.status, max(1, min(args.limit, 1000)))
        out = [
            {
                "id": x.id,
                "event_id": x.event_id,
                "subscription_id": x.subscription_id,
                "status": x.status,
                "attempts": x.attempts,
                "last_error": x.last_error,
                "updated_at": _iso(x.updated_at),
            }
            for x in deliveries
        ]
        text = "\n".join(
            f"{r['id']}\t{r['status']}\t{r['attempts']} tries\t{r['last_error'] or ''}" for r in out
        )
        return out, text or "no deliveries"
    if args.group in ("delivery", "publish", "send"):
        return await _through_daemon(args)
    if args.group == "queue":
        return await _queue(args, store)
    if args.group == "spool":
        return _spool_list()
    raise CliError(f"unknown command {args.group} {args.cmd}")


async def _subscriptions(args: argparse.Namespace, store: Store) -> tuple[Any, str]:
    from gehirn_ts.edj import registry
    from gehirn_ts.edj.netguard import AddressPolicy
    from gehirn_ts.edj.render import TemplateError, check_template
    from gehirn_ts.events import PatternError, validate_pattern

    if args.cmd == "create":
        account = await store.account_by_name(args.account)
        if account is None:
            raise CliError(f"no account {args.account!r} (see: gehirn-ts account list)")
        try:
            pattern = validate_pattern(args.pattern)
            registry.check(args.url, args.secret, AddressPolicy(_config.edj.allow_networks))
            if args.template is not None:
                check_template(args.template)
            batch = registry.check_batch(args.batch, args.url)
        except (PatternError, TemplateError) as e:
            raise CliError(str(e))
        except registry.DestinationError as e:
            raise CliError(f"{e.field}: {e.message}")
        sub = await store.create_subscription(
            account.id, pattern, args.url, args.secret, args.template, batch
        )
        shown = {
            "id": sub.id,
            "account": sub.account,
            "pattern": sub.pattern,
            "url": registry.redact(sub.url),
            "batch": sub.batch,
        }
        return shown, f"subscription {sub.id}: {sub.pattern} -> {shown['url']}"
    if args.cmd == "list":
        account_id = None
        if args.account:
            account = await store.account_by_name(args.account)
            if account is None:
                raise CliError(f"no account {args.account!r}")
            account_id = account.id
        rows = [
            {
                "id": s.id,
                "account": s.account,
                "pattern": s.pattern,
                "url": registry.redact(s.url),
                "batch": s.batch,
                "created_at": _iso(s.created_at),
            }
            for s in await store.list_subscriptions(account_id)
        ]
        text = "\n".join(f"{r['id']}\t{r['account']}\t{r['pattern']}\t{r['url']}" for r in rows)
        return rows, text or "no subscriptions"
    await store.delete_subscription(args.id, None)
    return {"deleted": args.id}, f"subscription {args.id} deleted"


async def _through_daemon(args: argparse.Namespace) -> tuple[Any, str]:
    """Commands the running daemon carries out (the bus is its own): over its HTTP API,
    with the admin key it wrote at first start."""
    if args.group == "delivery":
        _, body = await _api("POST", f"/v1/deliveries/{args.id}/replay", None)
        return body, f"delivery {args.id} queued again ({body.get('status')})"
    if args.group == "publish":
        event: dict[str, Any] = {
            "type": args.type,
            "source": "/gehirn-ts/cli",
            "severity": args.severity,
        }
        if args.account:
            event["account"] = args.account
        if args.subject:
            event["subject"] = args.subject
        if args.data is not None:
            try:
                event["data"] = json.loads(args.data)
            except ValueError:
                raise CliError("--data: not valid JSON")
        _, body = await _api("POST", "/v1/events", event)
        return body, f"event {body['id']} published"
    message = {"from": args.sender, "to": args.to, "subject": args.subject, "text": args.text}
    _, body = await _api("POST", "/v1/messages", message)
    return body, f"message {body['id']} queued (gehirn-ts queue show {body['id']})"


async def _api(method: str, path: str, body: Any) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    from twisted.internet.threads import deferToThread

    listen = _config.http.listen
    port = listen.split(":")[1]
    host = "127.0.0.1"
    for part in listen.split(":")[2:]:
        if part.startswith("interface="):
            host = part.split("=", 1)[1] or host
    if host in ("0.0.0.0", "::"):  # noqa: S104 - where the daemon listens, not us
        host = "127.0.0.1"
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    key_file = _config.state_dir / "admin.key"
    try:
        admin = key_file.read_text().strip()
    except OSError:
        raise CliError(f"cannot read the admin key {key_file} (run as the daemon's user)")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)  # noqa: S310 - http:// to the daemon, built above
    request.add_header("authorization", f"Bearer {admin}")
    request.add_header("content-type", "application/json")

    def call() -> tuple[int, Any]:
        try:
            # The URL is built above from the config: http:// to the daemon only.
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            error = json.loads(e.read() or b"{}").get("error", {})
            raise CliError(f"{error.get('field', '')}: {error.get('message', e.reason)}")
        except OSError as e:
            raise CliError(f"cannot reach the daemon at {base} ({e}); is it running?")

    result: tuple[int, Any] = await deferToThread(call)
    return result


async def _dkim(args: argparse.Namespace, store: Store) -> tuple[Any, str]:
    keys = DkimKeyStore(store)
    if args.cmd == "keygen":
        try:
            domain = domain_name(args.domain)
        except ValueError as e:
            raise CliError(f"DOMAIN: {e}")
        try:
            selector = domain_name(args.selector)
        except ValueError as e:
            raise CliError(f"SELECTOR: {e}")
        private, public = dkim.generate(args.algorithm)
        await keys.add(dkim.SigningKey(domain, selector, args.algorithm, private))
        name, value = dkim.dns_record(domain, selector, args.algorithm, public)
        strings = " ".join(f'"{part}"' for part in dkim.txt_strings(value))
        return (
            {
                "domain": domain,
                "selector": selector,
                "algorithm": args.algorithm,
                "dns_name": name,
                "dns_txt": value,
            },
            f"{args.algorithm} key {selector} stored for {domain}; mail From {domain} is "
            f"signed with it from now on.\nPublish this DNS record:\n"
            f"{name}. IN TXT ( {strings} )",
        )
    if args.cmd == "list":
        rows = await keys.list_keys()
        for r in rows:
            r["created_at"] = _iso(r["created_at"])
        text = "\n".join(f"{r['domain']}\t{r['selector']}\t{r['algorithm']}" for r in rows)
        return rows, text or "no DKIM keys"
    await keys.remove(args.domain.lower(), args.selector.lower())
    return {"removed": f"{args.selector}._domainkey.{args.domain}"}, "key removed"


def _spool_list() -> tuple[Any, str]:
    """Received mail in the spool: normally there for milliseconds; what stays was not
    processed (the log says why) and is tried again every smtp.spool_retry."""
    from gehirn_ts.mta.spool import spooled

    rows: list[dict[str, Any]] = []
    for m in spooled(_config.spool_dir):
        env = m.envelope
        rows.append(
            {
                "id": m.queue_id,
                "written_at": _iso(m.written),
                "size": m.size,
                "sender": env.sender if env else None,
                "recipients": [r.address for r in env.recipients] if env else None,
                "client_ip": env.client_ip if env else None,
                "listener": env.listener if env else None,
            }
        )
    lines = [
        f"{r['id']}\t{r['written_at']}\t{r['size']} bytes\t"
        + (
            f"<{r['sender']}>\t{len(r['recipients'])} rcpt\t{r['client_ip']}"
            if r["recipients"] is not None
            else "no envelope (yet)"
        )
        for r in rows
    ]
    return rows, "\n".join(lines) or "the spool is empty"


async def _queue(args: argparse.Namespace, store: Store) -> tuple[Any, str]:
    queue = QueueStore(store)
    now = store._now()
    if args.cmd == "list":
        rows = await queue.list_queued()
        for r in rows:
            r["queued_at"], r["next_attempt_at"] = _iso(r["queued_at"]), _iso(r["next_attempt_at"])
        lines = [
            f"{r['id']}\t{r['sender'] or '<>'}\t{r['recipients']} rcpt\t"
            f"{'held' if r['held'] else 'next ' + str(r['next_attempt_at'])}\t"
            f"{r['last_reply'] or ''}"
            for r in rows
        ]
        return rows, "\n".join(lines) or "the queue is empty"
    if args.cmd == "show":
        try:
            msg, rcpts, attempts = await queue.get(args.id)
        except NotFound:
            raise CliError(f"no message {args.id} (see: gehirn-ts queue list)")
        result: dict[str, Any] = {
            "id": msg.id,
            "account": msg.account,
            "origin": msg.origin,
            "sender": msg.sender,
            "size": msg.size,
            "queued_at": _iso(msg.created_at),
            "held": msg.held,
            "recipients": [
                {
                    "address": r.address,
                    "status": r.status,
                    "attempts": r.attempts,
                    "next_attempt_at": _iso(r.next_attempt_at),
                    "reply": r.reply,
                    "attempt_log": [
                        {"at": _iso(a.started_at), "outcome": a.outcome, "reply": a.reply}
                        for a in attempts
                        if a.n == r.n
                    ],
                }
                for r in rcpts
            ],
        }
        lines = [f"{msg.id} from <{msg.sender}> ({msg.origin}, {msg.size} bytes)"]
        for r in result["recipients"]:
            lines.append(
                f"  {r['address']}\t{r['status']}\t{r['attempts']} tries\t{r['reply'] or ''}"
            )
        return result, "\n".join(lines)
    target = None if args.all else args.id
    if args.cmd == "flush":
        n = await queue.flush(target, now)
        verb = "to be tried now (within a few seconds)"
    elif args.cmd == "delete":
        n = await queue.delete(target, now)
        verb = "deleted"
    else:
        n = await queue.hold(target, args.cmd == "hold")
        verb = "held" if args.cmd == "hold" else "released"
    if n == 0 and target is not None:
        raise CliError(f"no queued message {target} (see: gehirn-ts queue list)")
    what = "messages" if args.cmd in ("hold", "release") else "recipients"
    return {args.cmd: n}, f"{n} {what} {verb}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Shared option actions keep SUPPRESS as default (set_defaults would change it for
    # every parser that shares them), so fill in the absent ones here.
    args.json = getattr(args, "json", False)
    args.config = getattr(args, "config", None)
    global _config
    try:
        config = _config = load(args.config)
        db = config.state_dir / "gehirn-ts.sqlite"
        migrate(db)
    except (ConfigError, SchemaError) as e:
        print(f"gehirn-ts: {e}", file=sys.stderr)
        return 2
    outcome: dict[str, Any] = {}

    async def go(reactor: Any) -> None:
        store = Store(db, reactor)
        try:
            outcome["result"] = await _run(args, store)
        except (Conflict, NotFound, CliError) as e:
            outcome["error"] = e.message if isinstance(e, Conflict) else str(e)
        finally:
            await store.close()

    _react(go)
    if "error" in outcome:
        print(f"gehirn-ts: {outcome['error']}", file=sys.stderr)
        return 1
    result, text = outcome["result"]
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def _react(go: Any) -> None:
    from twisted.internet.defer import Deferred

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(go(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise


if __name__ == "__main__":
    sys.exit(main())
