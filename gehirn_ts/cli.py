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
from gehirn_ts.store.db import Conflict, MailStore, NotFound, Store
from gehirn_ts.store.schema import SchemaError, migrate


class CliError(Exception):
    pass


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
    if args.group == "smtp-user" and args.cmd == "revoke":
        await mail.revoke_credential(args.username)
        return {"revoked": args.username}, f"SMTP user {args.username} revoked"
    raise CliError(f"unknown command {args.group} {args.cmd}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Shared option actions keep SUPPRESS as default (set_defaults would change it for
    # every parser that shares them), so fill in the absent ones here.
    args.json = getattr(args, "json", False)
    args.config = getattr(args, "config", None)
    try:
        config = load(args.config)
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
