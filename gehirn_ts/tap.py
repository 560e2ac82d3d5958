"""twistd plugin: options and makeService. The only place that picks concrete classes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool

from gehirn_ts import gc_tuning, logs
from gehirn_ts.bus.local import LocalBus
from gehirn_ts.config import Config, ConfigError, load
from gehirn_ts.dnsresolver import make_async_resolver
from gehirn_ts.edj import registry
from gehirn_ts.edj.destinations.irc import IrcNetwork
from gehirn_ts.edj.httppool import DestinationPool
from gehirn_ts.edj.netguard import AddressPolicy, guarded_agent
from gehirn_ts.edj.publisher import Publisher
from gehirn_ts.edj.webclient import WebClient
from gehirn_ts.edj.worker import ATTEMPTS_AT_ONCE, EdjService, RetryPolicy
from gehirn_ts.logs import Logger
from gehirn_ts.metrics import Metrics
from gehirn_ts.mta.dkim import verify as dkim_verify
from gehirn_ts.mta.esmtp import EsmtpFactory, Settings
from gehirn_ts.mta.inbound import Inbound
from gehirn_ts.mta.outbound import Outbound, Reporter
from gehirn_ts.mta.policy import RelayPolicy
from gehirn_ts.mta.queue import MailQueue
from gehirn_ts.mta.relay import Host, MxCourier
from gehirn_ts.mta.relay import Settings as RelaySettings
from gehirn_ts.mta.schedule import MailRetry
from gehirn_ts.mta.spf import SpfChecker
from gehirn_ts.mta.spool import Spool
from gehirn_ts.mta.tls import ReloadableTLS, make_self_signed, server_options
from gehirn_ts.store.db import (
    EXPIRE_BATCH,
    MailStore,
    RouteStore,
    Store,
    bootstrap_admin_key,
    bootstrap_domain,
)
from gehirn_ts.store.keys import DkimKeyStore, bootstrap_dkim_key
from gehirn_ts.store.queue import QueueStore
from gehirn_ts.store.schema import SchemaError, migrate
from gehirn_ts.threaddns import ThreadDNS
from gehirn_ts.threads import Workers
from gehirn_ts.web.api import Api, make_site

if TYPE_CHECKING:
    from gehirn_ts.bus.amqp import AmqpBus

DB_FILE = "gehirn-ts.sqlite"
BUS_FILE = "bus.sqlite"
IO_THREADS = 10
ADMIN_KEY_FILE = "admin.key"
DEV_CERT = "tls/dev-cert.pem"
DEV_KEY = "tls/dev-key.pem"

log = Logger()


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded defaults)"],
    ]


class OrderedService(MultiService):
    """Starts children in order and stops them in reverse, each after the previous one
    has finished stopping (MultiService stops them all at once): the listener closes
    first, the bus drains, and the store closes last."""

    def stopService(self) -> Any:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=child.name)


class _Closer(Service):
    """Closes shared resources after every other service has stopped."""

    def __init__(self, store: Store, pool: HTTPConnectionPool, threads: Workers) -> None:
        self._store = store
        self._pool = pool
        self._threads = threads

    def stopService(self) -> Any:
        super().stopService()
        self._threads.stop()  # nothing is left to hand them: every other service stopped
        return defer.gatherResults([self._store.close(), self._pool.closeCachedConnections()])


def prepare_state(config: Config, now: float) -> Path:
    """Create the state directory, migrate the database, make the admin key on first start."""
    state = config.state_dir
    state.mkdir(parents=True, exist_ok=True)
    db = state / DB_FILE
    migrate(db)
    if not (config.smtp.tls_cert or config.smtp.tls_key):
        if not (state / DEV_CERT).exists():
            make_self_signed(state / DEV_CERT, state / DEV_KEY, config.smtp.hostname)
    elif not (config.smtp.tls_cert and config.smtp.tls_key):
        raise ConfigError(["smtp.tls_cert, smtp.tls_key: give both, or neither"])
    if config.smtp.bootstrap_domain and bootstrap_domain(db, config.smtp.bootstrap_domain, now):
        # The development DKIM key, as the dev TLS pair: mail from the bootstrap domain
        # leaves signed from the first start (gehirn-ts dkim list / dkim keygen).
        bootstrap_dkim_key(db, config.smtp.bootstrap_domain, now)
    token = bootstrap_admin_key(db, now)
    if token is not None:
        key_file = state / ADMIN_KEY_FILE
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        # Shown once, and only on a terminal (make run), like a first-run setup token.
        # Never through the logger, and not to a pipe or file either: under systemd
        # stderr is the journal, which is a log. The file stays readable by root.
        if sys.stderr.isatty():
            shown = f"created the admin API key (also in {key_file}):\n  {token}"
        else:
            shown = f"created the admin API key; it is in {key_file}"
        print(f"gehirn-ts: {shown}", file=sys.stderr)
    return db


def build(config: Config, reactor: Any, config_path: str | None = None) -> MultiService:
    logs.set_level(config.log.level)
    db = prepare_state(config, reactor.seconds())
    top = OrderedService()
    store = Store(db, reactor)
    policy = AddressPolicy(config.edj.allow_networks)
    pool = DestinationPool(reactor, persistent=True)
    # Keep-alive connections per destination host: enough for the requests that a
    # busy webhook receives at once (Twisted's default is 2).
    pool.maxPersistentPerHost = ATTEMPTS_AT_ONCE
    http = WebClient(guarded_agent(reactor, policy, pool), reactor)
    # What the mail paths must not do on the reactor (fsyncs, SPF and DKIM checks, DKIM
    # signatures, large copies): as many threads as Twisted's own pool, a cheaper
    # hand-off (docs/decisions.md).
    threads = Workers(reactor, "io", IO_THREADS)
    _Closer(store, pool, threads).setServiceParent(top)

    bus: LocalBus | AmqpBus
    if config.bus.url == "local:":
        bus = LocalBus(config.state_dir / BUS_FILE, reactor, prefetch=config.bus.prefetch)
    else:
        # Imported here: txamqp, its spec and the decimal and XML modules it loads are
        # 1.3 MB of a daemon that runs on the embedded bus (docs/performance.md).
        from gehirn_ts.bus.amqp import AmqpBus

        bus = AmqpBus(
            config.bus.url,
            reactor,
            namespace=config.bus.namespace,
            prefetch=config.bus.prefetch,
            publish_timeout=config.bus.publish_timeout,
        )
    bus.setServiceParent(top)
    metrics = Metrics()
    publisher = Publisher(store, bus, metrics)
    mail = MailStore(store)
    names = make_async_resolver(
        config.dns.nameservers, config.dns.port, config.dns.timeout, reactor
    )
    queue, outbound = _outbound(config, reactor, names, store, publisher, metrics, threads)
    irc_bots = IrcNetwork(
        reactor,
        policy,
        rate=config.edj.irc_rate,
        burst=config.edj.irc_burst,
        initial_delay=config.edj.irc_reconnect,
    )
    irc_bots.setServiceParent(top)
    edj = EdjService(
        store=store,
        bus=bus,
        publisher=publisher,
        context=registry.Context(
            http,
            reactor,
            policy,
            config.edj.http_timeout,
            outbound=outbound,
            mail_from=config.edj.mail_from or f"notifications@{config.smtp.hostname}",
            account_id=mail.account_id,
            slack_url=config.edj.slack_url,
            pushover_url=config.edj.pushover_url,
            twilio_url=config.edj.twilio_url,
            irc=irc_bots,
            mail_loop_limit=config.edj.mail_loop_limit,
            irc_timeout=config.edj.irc_timeout,
        ),
        retry=RetryPolicy(
            config.edj.retry_schedule, config.edj.retry_jitter, config.edj.max_retry_after
        ),
        clock=reactor,
        metrics=metrics,
    )
    edj.setServiceParent(top)
    queue.setServiceParent(top)

    routes = RouteStore(store, config.smtp.routes)
    spool = Spool(config.spool_dir, threads)
    resolver = ThreadDNS(names, reactor, config.dns.timeout)
    inbound = Inbound(
        spool=spool,
        kvs=config.state_dir / "kvs",
        mail=mail,
        publisher=publisher,
        owner=mail.domain_owner,
        hostname=config.smtp.hostname,
        dkim_verify=lambda message: dkim_verify(message, resolver),
        routes=routes.resolve,
        outbound=outbound,
        account_id=mail.account_id,
        forward_sender=config.outbound.forward_sender,
    )
    _Resume(inbound).setServiceParent(top)
    if config.smtp.retention > 0:
        _Retention(
            routes, config.state_dir / "kvs", config.smtp.retention, reactor
        ).setServiceParent(top)

    api = Api(
        store,
        publisher,
        edj,
        policy,
        mail,
        inbound,
        routes,
        outbound,
        queue.store,
        reactor,
        metrics,
    )
    site = make_site(api, store, config.http.max_body)
    web = StreamServerEndpointService(serverFromString(reactor, config.http.listen), site)
    web._raiseSynchronously = True
    web.setServiceParent(top)

    smtp = config.smtp
    tls = ReloadableTLS(_tls_options(config))
    relay = RelayPolicy(
        mail.domain_owner,
        mail.smtp_authenticate,
        smtp.trusted_networks,
        spf=SpfChecker(resolver, smtp.hostname, reactor, threads),
        spf_fail=smtp.spf_fail,
        routes=routes.resolve,
    )
    settings = _smtp_settings(config)
    factories: list[EsmtpFactory] = []
    for listener, description in (
        ("smtp", smtp.listen),
        ("submission", smtp.submission),
        ("submissions", smtp.submissions),
    ):
        if not description:
            continue
        implicit = listener == "submissions"
        factory: Any = EsmtpFactory(
            settings=settings,
            listener=listener,
            policy=relay,
            spool=spool,
            accepted=inbound.accepted,
            clock=reactor,
            tls=tls,
            implicit_tls=implicit,
            metrics=metrics,
        )
        factories.append(factory)
        if implicit:
            factory = TLSMemoryBIOFactory(tls, False, factory)
        service = StreamServerEndpointService(serverFromString(reactor, description), factory)
        service._raiseSynchronously = True
        service.setServiceParent(top)

    def apply(new: Config) -> None:
        """What a SIGHUP changes: the TLS certificate, the SMTP limits and relay policy,
        the config's routes; the rest is read at start only."""
        tls.options = _tls_options(new)
        for factory in factories:
            factory.settings = _smtp_settings(new)
        relay.reconfigure(new.smtp.trusted_networks, new.smtp.spf_fail)
        routes.set_static(new.smtp.routes)
        logs.set_level(new.log.level)
        fixed = _restart_only_changes(config, new)
        if fixed:
            log.warn(
                "reloaded; these changed keys take effect at the next start: {keys}",
                keys=", ".join(fixed),
            )
        else:
            log.info("reloaded the configuration and the TLS certificate")

    _Reloader(config_path, apply, reactor).setServiceParent(top)
    return top


RELOADABLE = frozenset(
    {
        "smtp.tls_cert",
        "smtp.tls_key",
        "smtp.trusted_networks",
        "smtp.spf_fail",
        "smtp.routes",
        "smtp.max_message_size",
        "smtp.max_recipients",
        "smtp.max_line",
        "smtp.idle_timeout",
        "smtp.max_connections_per_ip",
        "smtp.auth_failures",
        "smtp.auth_failure_window",
        "smtp.discard_ehlo_keywords",
        "log.level",
    }
)


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    import dataclasses

    changed = []
    for section in dataclasses.fields(old):
        a, b = getattr(old, section.name), getattr(new, section.name)
        for f in dataclasses.fields(a):
            key = f"{section.name}.{f.name}"
            if getattr(a, f.name) != getattr(b, f.name) and key not in RELOADABLE:
                changed.append(key)
    return changed


def _smtp_settings(config: Config) -> Settings:
    smtp = config.smtp
    return Settings(
        hostname=smtp.hostname,
        max_message_size=smtp.max_message_size,
        max_recipients=smtp.max_recipients,
        max_line=smtp.max_line,
        idle_timeout=smtp.idle_timeout,
        max_connections_per_ip=smtp.max_connections_per_ip,
        auth_failures=smtp.auth_failures,
        auth_failure_window=smtp.auth_failure_window,
        discard_ehlo_keywords=frozenset(smtp.discard_ehlo_keywords),
    )


class _Reloader(Service):
    """SIGHUP: read the config file again and apply what can change while running. A
    config with errors is refused whole (logged, every bad key named); nothing changes."""

    def __init__(self, path: str | None, apply: Any, reactor: Any) -> None:
        self._path = path
        self._apply = apply
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._on_hup)

    def stopService(self) -> Any:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        try:
            new = load(self._path)
            self._apply(new)
        except ConfigError as e:
            log.error("SIGHUP: the configuration was not reloaded: {errors}", errors=str(e))
        except Exception:
            log.failure("SIGHUP: the configuration was not reloaded")


def _outbound(
    config: Config,
    reactor: Any,
    names: Any,
    store: Store,
    publisher: Publisher,
    metrics: Metrics,
    threads: Workers,
) -> tuple[MailQueue, Outbound]:
    ob = config.outbound
    hostname = config.smtp.hostname
    smarthost = None
    if ob.smarthost:
        host, _, port = ob.smarthost.rpartition(":")
        smarthost = Host(host.strip("[]"), int(port))
    courier = MxCourier(
        reactor,
        names,
        RelaySettings(
            helo=hostname,
            port=ob.port,
            timeout=ob.timeout,
            connect_timeout=ob.connect_timeout,
            smarthost=smarthost,
            username=ob.smarthost_username,
            password=ob.smarthost_password,
        ),
    )
    queue_store = QueueStore(store)
    queue = MailQueue(
        store=queue_store,
        courier=courier,
        directory=config.spool_dir / "queue",
        clock=reactor,
        retry=MailRetry(
            first=ob.retry_first,
            max_interval=ob.retry_max,
            lifetime=ob.lifetime,
            delay_warning=ob.delay_warning,
        ),
        concurrency=ob.concurrency,
        per_domain=ob.per_domain,
        metrics=metrics,
        threads=threads,
    )
    outbound = Outbound(
        store=queue_store,
        queue=queue,
        keys=DkimKeyStore(store).keys_for,
        clock=reactor,
        hostname=hostname,
    )
    queue.reporter = Reporter(
        outbound=outbound, publisher=publisher, queue=queue, hostname=hostname, clock=reactor
    )
    return queue, outbound


class _Resume(Service):
    """At start, processes the received mail a previous run left in the spool."""

    def __init__(self, inbound: Inbound) -> None:
        self._inbound = inbound

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._resume())
        d.addErrback(lambda f: log.failure("resuming the spool failed", f))

    async def _resume(self) -> None:
        n = await self._inbound.resume()
        if n:
            log.info("resumed {n} spooled messages", n=n)


class _Retention(Service):
    """Deletes received mail past its retention, hourly."""

    def __init__(self, routes: RouteStore, kvs: Path, retention: float, clock: Any) -> None:
        self._routes = routes
        self._kvs = kvs
        self._retention = retention
        self._clock = clock
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.expire()))
        self._loop.clock = self._clock
        d = self._loop.start(3600, now=True)
        d.addErrback(lambda f: log.failure("retention stopped", f))

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _unlink(self, objects: list[str]) -> None:
        for obj in objects:
            (self._kvs / obj).unlink(missing_ok=True)

    async def expire(self) -> int:
        before = self._clock.seconds() - self._retention
        freed = 0
        try:
            # A batch a transaction: the writes of mail and events go in between.
            while True:
                count, unused = await self._routes.expire_received(before, EXPIRE_BATCH)
                await deferToThread(self._unlink, unused)
                freed += len(unused)
                if count < EXPIRE_BATCH:
                    break
        except Exception:
            log.failure("expiring received mail failed")
        if freed:
            log.info("retention: deleted {n} received messages", n=freed)
        return freed


def _tls_options(config: Config) -> Any:
    smtp = config.smtp
    if smtp.tls_cert or smtp.tls_key:
        return server_options(Path(smtp.tls_cert), Path(smtp.tls_key))
    return server_options(config.state_dir / DEV_CERT, config.state_dir / DEV_KEY)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    try:
        config = load(options["config"])
        service = build(config, reactor, options["config"])
    except (ConfigError, SchemaError) as e:
        print(f"gehirn-ts: {e}", file=sys.stderr)
        raise SystemExit(2)
    # Once the services have started (their objects made), not in tests' processes.
    reactor.callWhenRunning(gc_tuning.tune)
    return service
