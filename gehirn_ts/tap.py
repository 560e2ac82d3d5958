"""twistd plugin: options and makeService. The only place that picks concrete classes."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
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
from twisted.python.failure import Failure

from gehirn_ts import gc_tuning, logs
from gehirn_ts.config import Config, ConfigError, load
from gehirn_ts.dnsresolver import make_async_resolver
from gehirn_ts.logs import Logger
from gehirn_ts.metrics import Metrics
from gehirn_ts.mta.anvil import Anvil, Limits, SharedLimits
from gehirn_ts.mta.esmtp import EsmtpFactory, Settings, log_received
from gehirn_ts.mta.policy import RelayPolicy
from gehirn_ts.mta.spf import SpfChecker
from gehirn_ts.mta.spool import Spool
from gehirn_ts.mta.tls import ReloadableTLS, make_self_signed, server_options
from gehirn_ts.mta.workers import (
    Listening,
    MainChannel,
    NoAccept,
    WorkerProcesses,
    smtp_reports,
)
from gehirn_ts.store.db import (
    EXPIRE_BATCH,
    MailStore,
    RouteStore,
    Store,
    bootstrap_admin_key,
    bootstrap_domain,
)
from gehirn_ts.store.keys import bootstrap_dkim_key
from gehirn_ts.store.schema import SchemaError, migrate
from gehirn_ts.threaddns import ThreadDNS
from gehirn_ts.threads import Workers

if TYPE_CHECKING:
    from twisted.web.client import HTTPConnectionPool

    from gehirn_ts.bus.amqp import AmqpBus
    from gehirn_ts.bus.local import LocalBus
    from gehirn_ts.edj.publisher import Publisher
    from gehirn_ts.mta.inbound import Inbound
    from gehirn_ts.mta.outbound import Outbound
    from gehirn_ts.mta.queue import MailQueue

DB_FILE = "gehirn-ts.sqlite"
BUS_FILE = "bus.sqlite"
IO_THREADS = 10
# A spooled message this old is looked at again if still there: a message being
# processed, or committed and not yet handed on (by an SMTP worker), is younger.
STALE_AFTER = 60.0
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

    def __init__(self, store: Store, pool: HTTPConnectionPool | None, threads: Workers) -> None:
        self._store = store
        self._pool = pool
        self._threads = threads

    def stopService(self) -> Any:
        super().stopService()
        self._threads.stop()  # nothing is left to hand them: every other service stopped
        closing = [self._store.close()]
        if self._pool is not None:
            closing.append(self._pool.closeCachedConnections())
        return defer.gatherResults(closing)


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
    # The main process's parts, imported here: an SMTP worker imports this module for
    # build_smtp_worker and needs none of them (5.4 MB of its memory; docs/decisions.md,
    # "SMTP worker processes").
    from gehirn_ts.bus.local import LocalBus
    from gehirn_ts.edj import registry
    from gehirn_ts.edj.destinations.irc import IrcNetwork
    from gehirn_ts.edj.httppool import DestinationPool
    from gehirn_ts.edj.netguard import AddressPolicy, guarded_agent
    from gehirn_ts.edj.publisher import Publisher
    from gehirn_ts.edj.webclient import WebClient
    from gehirn_ts.edj.worker import ATTEMPTS_AT_ONCE, EdjService, RetryPolicy
    from gehirn_ts.mta.dkim import verify as dkim_verify
    from gehirn_ts.mta.inbound import Inbound
    from gehirn_ts.web.api import Api, make_site

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
        metrics=metrics,
    )
    _Resume(inbound, config.smtp.spool_retry, reactor).setServiceParent(top)
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
    relay = _relay_policy(config, mail, routes, resolver, reactor, threads)
    factories: list[EsmtpFactory] = []
    workers: WorkerProcesses | None = None
    if smtp.workers:
        tls_ports = [d for d in _listeners(config).values() if d.startswith("ssl:")]
        if tls_ports:
            # A worker takes a bound socket, not the endpoint's TLS around it.
            raise ConfigError([f"smtp.workers: not with an ssl: listener ({', '.join(tls_ports)})"])

        # The main process binds the listeners, the workers take the sessions
        # (mta/workers.py); the messages they spool are processed here.
        def spooled(qid: str) -> None:
            envelope = spool.load(qid)
            if envelope is None:
                log.error("an SMTP worker reported {qid}, which is not spooled", qid=qid)
            else:
                log_received(envelope)
                inbound.accepted(envelope)

        # The per-IP limits counted over all workers, as Postfix's anvil(8).
        anvil = Anvil(_anvil_limits(config), reactor.seconds)

        def broadcast(data: bytes) -> None:
            assert workers is not None
            workers.broadcast(data)

        workers = WorkerProcesses(
            reactor=reactor,
            count=smtp.workers,
            name="SMTP worker",
            listen=lambda: _listen_for_workers(config, reactor),
            command=lambda index, listening: worker_command(config_path, index, listening),
            on_line=smtp_reports(spooled, metrics, anvil, broadcast),
            greeting=anvil.state,
            on_end=lambda index: broadcast(anvil.worker_gone(index)),
        )
        workers.setServiceParent(top)
    else:
        for listener, factory, wrapped in _smtp_factories(
            config, reactor, relay, spool, inbound.accepted, tls, metrics
        ):
            factories.append(factory)
            service = StreamServerEndpointService(
                serverFromString(reactor, _listeners(config)[listener]), wrapped
            )
            service._raiseSynchronously = True
            service.setServiceParent(top)

    def apply(new: Config) -> None:
        """What a SIGHUP changes: the TLS certificate, the SMTP limits and relay policy,
        the config's routes; the rest is read at start only."""
        _apply_smtp(new, tls, factories, relay, routes)
        if workers is not None:
            anvil.limits = _anvil_limits(new)
            workers.hangup()
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


def _listeners(config: Config) -> dict[str, str]:
    """The SMTP listeners that are on, by name, with their endpoint descriptions."""
    smtp = config.smtp
    named = (
        ("smtp", smtp.listen),
        ("submission", smtp.submission),
        ("submissions", smtp.submissions),
    )
    return {name: description for name, description in named if description}


def _relay_policy(
    config: Config,
    mail: MailStore,
    routes: RouteStore,
    resolver: ThreadDNS,
    reactor: Any,
    threads: Workers,
) -> RelayPolicy:
    smtp = config.smtp
    return RelayPolicy(
        mail.domain_owner,
        mail.smtp_authenticate,
        smtp.trusted_networks,
        spf=SpfChecker(resolver, smtp.hostname, reactor, threads),
        spf_fail=smtp.spf_fail,
        routes=routes.resolve,
    )


def _smtp_factories(
    config: Config,
    reactor: Any,
    relay: RelayPolicy,
    spool: Spool,
    accepted: Any,
    tls: ReloadableTLS,
    metrics: Metrics,
    names: Sequence[str] | None = None,
    log_received: bool = True,
) -> list[tuple[str, EsmtpFactory, Any]]:
    """For each listener that is on (or each of ``names``): its name, its ESMTP factory
    and the factory to listen with (TLS around it for implicit TLS)."""
    settings = _smtp_settings(config)
    out = []
    for listener in _listeners(config) if names is None else names:
        implicit = listener == "submissions"
        factory = EsmtpFactory(
            settings=settings,
            listener=listener,
            policy=relay,
            spool=spool,
            accepted=accepted,
            clock=reactor,
            tls=tls,
            implicit_tls=implicit,
            metrics=metrics,
            log_received=log_received,
        )
        wrapped: Any = TLSMemoryBIOFactory(tls, False, factory) if implicit else factory
        out.append((listener, factory, wrapped))
    return out


def _anvil_limits(config: Config) -> Limits:
    smtp = config.smtp
    return Limits(smtp.max_connections_per_ip, smtp.auth_failures, smtp.auth_failure_window)


def _apply_smtp(
    new: Config,
    tls: ReloadableTLS,
    factories: Sequence[EsmtpFactory],
    relay: RelayPolicy,
    routes: RouteStore,
) -> None:
    """What a SIGHUP changes of the SMTP sessions (in the main process or a worker)."""
    tls.options = _tls_options(new)
    for factory in factories:
        factory.settings = _smtp_settings(new)
    relay.reconfigure(new.smtp.trusted_networks, new.smtp.spf_fail)
    routes.set_static(new.smtp.routes)
    logs.set_level(new.log.level)


def _listen_for_workers(config: Config, reactor: Any) -> list[Listening]:
    """Bind every SMTP listener that is on, for the workers: the ports never accept
    here. Raises at once when one cannot be bound, as the listeners do without
    workers (an endpoint's listen has its port, or its error, when it returns)."""
    out: list[Listening] = []
    for name, description in _listeners(config).items():
        result: list[Any] = []
        serverFromString(reactor, description).listen(NoAccept()).addBoth(result.append)
        if not result:
            raise ConfigError([f"smtp: the listener {description!r} did not bind at once"])
        if isinstance(result[0], Failure):
            for done in out:
                done.port.stopListening()
            result[0].raiseException()
        port = result[0]
        port.stopReading()
        out.append(Listening(name, port.fileno(), port.socket.family, port))
    return out


def worker_command(
    config_path: str | None, index: int, listening: Sequence[Listening]
) -> list[str]:
    """The command line of SMTP worker ``index``; its listeners are descriptors 3, 4..."""
    argv = [sys.executable, "-m", "gehirn_ts.smtpworker", "--index", str(index)]
    if config_path is not None:
        argv += ["--config", os.path.abspath(config_path)]
    for n, item in enumerate(listening):
        argv += ["--listener", f"{item.name}:{3 + n}:{item.family}"]
    return argv


def build_smtp_worker(
    config: Config,
    reactor: Any,
    index: int,
    listeners: Sequence[tuple[str, int, int]],
    config_path: str | None,
    shared: SharedLimits | None = None,
    channel_fd: int = 1,
) -> MultiService:
    """An SMTP worker process's services: the sessions on the listeners it was handed
    (name, descriptor, address family), its own spool directory for messages being
    received, and its reports to the main process on ``channel_fd``."""
    logs.set_level(config.log.level)
    top = OrderedService()
    store = Store(config.state_dir / DB_FILE, reactor)
    threads = Workers(reactor, "io", IO_THREADS)
    _Closer(store, None, threads).setServiceParent(top)
    metrics = Metrics()
    mail = MailStore(store)
    routes = RouteStore(store, config.smtp.routes)
    names = make_async_resolver(
        config.dns.nameservers, config.dns.port, config.dns.timeout, reactor
    )
    resolver = ThreadDNS(names, reactor, config.dns.timeout)
    spool = Spool(config.spool_dir, threads, tmp=f"tmp-{index}")
    channel = MainChannel(channel_fd, metrics, reactor, gone=reactor.stop)
    channel.setServiceParent(top)
    tls = ReloadableTLS(_tls_options(config))
    relay = _relay_policy(config, mail, routes, resolver, reactor, threads)
    fds = {name: (fd, family) for name, fd, family in listeners}
    made = _smtp_factories(
        config,
        reactor,
        relay,
        spool,
        channel.accepted,
        tls,
        metrics,
        names=list(fds),
        log_received=False,  # the main process logs it when it is told
    )
    for listener, factory, wrapped in made:
        # The per-IP limits over all workers (mta/anvil.py).
        factory.shared = shared
        factory.report = channel.report
        fd, family = fds[listener]
        _Adopted(reactor, fd, family, wrapped).setServiceParent(top)
    factories = [factory for _, factory, _ in made]

    def apply(new: Config) -> None:
        _apply_smtp(new, tls, factories, relay, routes)
        log.info("reloaded the configuration and the TLS certificate")

    _Reloader(config_path, apply, reactor).setServiceParent(top)
    return top


class _Adopted(Service):
    """A listening socket handed over by the main process, taken by this reactor."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family
        self._factory = factory
        self._port: Any = None

    def startService(self) -> None:
        super().startService()
        # adoptStreamPort takes a duplicate: the inherited descriptor is closed here.
        self._port = self._reactor.adoptStreamPort(self._fd, self._family, self._factory)
        os.close(self._fd)

    def stopService(self) -> Any:
        super().stopService()
        if self._port is not None:
            return self._port.stopListening()
        return None


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
    from gehirn_ts.mta.outbound import Outbound, Reporter
    from gehirn_ts.mta.queue import MailQueue
    from gehirn_ts.mta.relay import Host, MxCourier
    from gehirn_ts.mta.relay import Settings as RelaySettings
    from gehirn_ts.mta.schedule import MailRetry
    from gehirn_ts.store.keys import DkimKeyStore
    from gehirn_ts.store.queue import QueueStore

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


class _Periodic(Service):
    """A service with a coroutine run every so often on its clock, from ``_every`` on
    until the service stops."""

    _loop: LoopingCall | None = None

    def _every(
        self,
        interval: float,
        job: Callable[[], Coroutine[Any, Any, Any]],
        clock: Any,
        now: bool,
        what: str,
    ) -> None:
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(job()))
        self._loop.clock = clock
        self._loop.start(interval, now=now).addErrback(
            lambda f: log.failure("{what} stopped", f, what=what)
        )

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class _Resume(_Periodic):
    """At start, processes the received mail a previous run left in the spool; then,
    every ``interval`` seconds, what is still there ``STALE_AFTER`` seconds after it
    was written (docs/mta.md, "Durability")."""

    def __init__(self, inbound: Inbound, interval: float, clock: Any) -> None:
        self._inbound = inbound
        self._interval = interval
        self._clock = clock

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._resume())
        d.addErrback(lambda f: log.failure("resuming the spool failed", f))
        # The first look again after the start's resume, never beside it.
        d.addBoth(lambda _: self._start_loop())

    def _start_loop(self) -> None:
        if self.running and self._interval > 0:
            self._every(self._interval, self.retry, self._clock, False, "looking through the spool")

    async def _resume(self) -> None:
        n = await self._inbound.resume()
        if n:
            log.info("resumed {n} spooled messages", n=n)

    async def retry(self) -> int:
        try:
            n = await self._inbound.retry(self._clock.seconds() - STALE_AFTER)
        except Exception:
            log.failure("looking through the spool failed")
            return 0
        if n:
            log.info("processed {n} messages left in the spool", n=n)
        return n


class _Retention(_Periodic):
    """Deletes received mail past its retention, hourly."""

    def __init__(self, routes: RouteStore, kvs: Path, retention: float, clock: Any) -> None:
        self._routes = routes
        self._kvs = kvs
        self._retention = retention
        self._clock = clock

    def startService(self) -> None:
        super().startService()
        self._every(3600, self.expire, self._clock, True, "retention")

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
