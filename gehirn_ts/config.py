"""TOML configuration -> frozen dataclasses.

Every option is declared once, here, with its parser and its documentation; the
sample file ``etc/gehirn-ts.toml`` is rendered from these declarations
(``render_sample``) and a test keeps the two identical. Loading reports every
bad key at once, each with its dotted path.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gehirn_ts.durations import format_duration, format_size, parse_duration, parse_size
from gehirn_ts.logs import LEVELS


class ConfigError(Exception):
    """The configuration has one or more bad keys; ``errors`` lists them all."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))


Parser = Callable[[Any], Any]


def opt(default: Any, parse: Parser, doc: str, show: Callable[[Any], Any] | None = None) -> Any:
    """Declare an option: its default, how a raw TOML value becomes a typed one, its doc,
    and (``show``) how the sample writes the default when not as the value itself."""
    return field(default=default, metadata={"parse": parse, "doc": doc, "show": show})


# --- value parsers: raise ValueError with a message that fits after "key: " ---


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _nonempty_str(value: Any) -> str:
    text = _str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {type(value).__name__}")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _workers(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_WORKERS:
        raise ValueError(f"expected a whole number from 0 to {MAX_WORKERS}")
    return value


def _duration(value: Any) -> float:
    return parse_duration(value)


def _size(value: Any) -> int:
    return parse_size(value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError("expected a number from 0 up to (not including) 1")
    return float(value)


def _schedule(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of durations")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(parse_duration(item))
        except ValueError as e:
            raise ValueError(f"item {i}: {e}") from None
    return tuple(out)


def _networks(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError('expected a list of networks such as "127.0.0.0/8"')
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(_str(item), strict=False)))
        except ValueError as e:
            raise ValueError(f"{item!r} is not a network: {e}") from None
    return tuple(out)


_ENDPOINT_KINDS = ("tcp", "tcp6", "ssl", "unix", "systemd")
MAX_WORKERS = 64


def _endpoint(value: Any) -> str:
    text = _nonempty_str(value)
    kind = text.split(":", 1)[0]
    if kind not in _ENDPOINT_KINDS or ":" not in text:
        raise ValueError(
            f'expected a Twisted endpoint string like "tcp:8025:interface=127.0.0.1" '
            f"(one of {', '.join(_ENDPOINT_KINDS)})"
        )
    return text


def _choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        text = _str(value)
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def _keywords(value: Any) -> tuple[str, ...]:
    known = ("DSN", "8BITMIME", "PIPELINING")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of {', '.join(known)}")
    out = tuple(v.upper() for v in value)
    for v in out:
        if v not in known:
            raise ValueError(f"{v!r}: only {', '.join(known)} can be left out")
    return out


def _routes(value: Any) -> tuple[str, ...]:
    from gehirn_ts.store.db import parse_static_route

    if not isinstance(value, list):
        raise ValueError("expected a list of strings")
    for item in value:
        parse_static_route(_str(item))
    return tuple(value)


def _bus_url(value: Any) -> str:
    text = _nonempty_str(value)
    if text == "local:":
        return text
    from gehirn_ts.bus.amqp import AmqpUrl

    try:
        AmqpUrl.parse(text)
    except ValueError as e:
        raise ValueError(f'expected "local:" or amqp[s]://user:password@host:port/vhost: {e}')
    return text


def _namespace(value: Any) -> str:
    text = _nonempty_str(value)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", text):
        raise ValueError("1-64 lowercase letters, digits, '.', '_' or '-'")
    return text


# --- the schema ---


@dataclass(frozen=True)
class StateConfig:
    """Where gehirn-ts keeps its files."""

    dir: str = opt(
        "var",
        _nonempty_str,
        "Directory for the database, the embedded bus and generated keys; relative paths "
        "are taken from the working directory.",
    )
    spool: str = opt(
        "",
        _str,
        'Directory for mail in transit (received, and the outbound queue); "" means '
        "DIR/spool. The Debian package uses /var/spool/gehirn-ts.",
    )


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP API."""

    listen: str = opt(
        "tcp:8025:interface=127.0.0.1",
        _endpoint,
        "Twisted endpoint the HTTP API listens on.",
    )
    max_body: int = opt(
        1024 * 1024, _size, 'Largest request body accepted (bytes, or "1MiB").', format_size
    )


@dataclass(frozen=True)
class BusConfig:
    """The event bus."""

    url: str = opt(
        "local:",
        _bus_url,
        '"local:" for the embedded durable bus (one machine), or '
        '"amqp://user:password@host:5672/vhost" (amqps:// for TLS) for RabbitMQ, which '
        "several gehirn-ts nodes can share.",
    )
    namespace: str = opt(
        "gehirn-ts",
        _namespace,
        "RabbitMQ only: prefix of the exchange and queue names, so that several "
        "deployments can share one broker.",
    )
    publish_timeout: float = opt(
        5.0,
        _duration,
        "RabbitMQ only: how long a publish waits for a lost broker connection to come "
        "back before it fails (the HTTP API then answers 503).",
        format_duration,
    )
    prefetch: int = opt(
        512,
        _positive_int,
        "Messages a consumer works on at once (RabbitMQ: also the events of batches, which"
        " travel up to 100 a message).",
    )


def _optional_address(value: Any) -> str:
    text = _str(value).strip()
    if text and (text.count("@") != 1 or not text.split("@")[0]):
        raise ValueError(f"{text!r} is not an e-mail address")
    if text:
        domain_name(text.split("@")[1])
    return text


def _positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError("expected a number above 0")
    return float(value)


def _base_url(value: Any) -> str:
    text = _str(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError(f"{text!r}: expected an http(s):// base URL")
    return text


@dataclass(frozen=True)
class EdjConfig:
    """Event delivery."""

    retry_schedule: tuple[float, ...] = opt(
        (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0),
        _schedule,
        "Delay before each retry of a failed delivery; after the last one the delivery is "
        'dead-lettered. Durations: seconds or "5s", "5m", "2h", "1d".',
        lambda v: [format_duration(x) for x in v],
    )
    retry_jitter: float = opt(
        0.2, _fraction, "Random spread applied to each retry delay (0.2 = +-20%)."
    )
    max_retry_after: float = opt(
        86400.0,
        _duration,
        "Longest Retry-After from a destination that is honoured.",
        format_duration,
    )
    http_timeout: float = opt(10.0, _duration, "Timeout of one webhook request.", format_duration)
    mail_from: str = opt(
        "",
        _optional_address,
        'From (and envelope sender) of the e-mail destination\'s messages; "" means '
        "notifications@ the smtp.hostname.",
    )
    slack_url: str = opt(
        "https://hooks.slack.com", _base_url, "Base URL of Slack incoming webhooks."
    )
    pushover_url: str = opt("https://api.pushover.net", _base_url, "Base URL of Pushover's API.")
    twilio_url: str = opt(
        "https://api.twilio.com", _base_url, "Base URL of the Twilio-compatible SMS API."
    )
    irc_rate: float = opt(
        1.0, _positive_float, "Lines a second an IRC bot sends (flood control) ..."
    )
    irc_burst: int = opt(4, _positive_int, "... after a burst of this many lines.")
    irc_timeout: float = opt(
        10.0,
        _duration,
        "How long an IRC delivery waits for its bot to be connected and in the channel.",
        format_duration,
    )
    irc_reconnect: float = opt(
        1.0,
        _duration,
        "First wait before an IRC bot reconnects; it doubles up to 60 s.",
        format_duration,
    )
    mail_loop_limit: int = opt(
        3,
        _positive_int,
        "E-mail destinations send nothing for mail that has come back through them this "
        "many times (X-Gehirn-Loop).",
    )
    allow_networks: tuple[str, ...] = opt(
        (),
        _networks,
        "Private, loopback or link-local networks that destinations may nevertheless reach "
        "(by default only public addresses are allowed).",
    )


def _listener(value: Any) -> str:
    """An endpoint string, or "" for a listener that is off."""
    text = _str(value)
    return text if text == "" else _endpoint(text)


def domain_name(value: Any) -> str:
    text = _str(value).lower()
    if text and not re.fullmatch(
        r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", text
    ):
        raise ValueError(f"{text!r} is not a domain name")
    return text


@dataclass(frozen=True)
class SmtpConfig:
    """The SMTP server."""

    hostname: str = opt(
        "localhost", domain_name, "Name in the greeting, EHLO reply and Received headers."
    )
    listen: str = opt(
        "tcp:2525:interface=127.0.0.1",
        _listener,
        'Inbound MX listener (port 25 in production); "" turns it off.',
    )
    submission: str = opt(
        "tcp:2587:interface=127.0.0.1",
        _listener,
        "Submission listener (port 587): STARTTLS, then AUTH before MAIL.",
    )
    submissions: str = opt(
        "tcp:2465:interface=127.0.0.1",
        _listener,
        "Submission with implicit TLS (port 465); the endpoint is plain TCP, TLS is added.",
    )
    tls_cert: str = opt(
        "",
        _str,
        "PEM certificate chain; with tls_key empty too, a self-signed pair is made under "
        "state.dir on first start (for development only).",
    )
    tls_key: str = opt("", _str, "PEM private key of tls_cert.")
    trusted_networks: tuple[str, ...] = opt(
        (),
        _networks,
        "Clients allowed to relay without AUTH (legacy hosts). Empty: nobody, not even loopback.",
    )
    bootstrap_domain: str = opt(
        "localhost",
        domain_name,
        "On a first start with no domain served yet, serve this one for an account named "
        '"local" (created if needed). "" to skip.',
    )
    max_message_size: int = opt(
        25 * 1024 * 1024, _size, "Largest message accepted (advertised as SIZE).", format_size
    )
    max_recipients: int = opt(1000, _positive_int, "Recipients per message.")
    max_line: int = opt(16 * 1024, _size, "Longest command or message line.", format_size)
    idle_timeout: float = opt(
        300.0, _duration, "A session idle this long is closed (421).", format_duration
    )
    max_connections_per_ip: int = opt(
        20, _positive_int, "Concurrent sessions per client IP on a listener (over all workers)."
    )
    auth_failures: int = opt(
        5,
        _positive_int,
        "Failed AUTH attempts per client IP within auth_failure_window (over all workers) ...",
    )
    auth_failure_window: float = opt(
        600.0, _duration, "... after which AUTH is refused (454) for that IP.", format_duration
    )
    discard_ehlo_keywords: tuple[str, ...] = opt(
        (),
        _keywords,
        "EHLO extensions not offered, of DSN, 8BITMIME, PIPELINING (Postfix: "
        "smtpd_discard_ehlo_keywords).",
    )
    workers: int = opt(
        0,
        _workers,
        "Processes that take the SMTP sessions, beside the main one, for more cores (the "
        "main process then binds the listeners and processes what they spool); 0: the "
        "main process takes them.",
    )
    routes: tuple[str, ...] = opt(
        (),
        _routes,
        'Routes of received mail, before those made over the API: "MATCH ACTION [TO]" '
        'with MATCH an address or "@domain", ACTION store, forward or reject, and TO the '
        'comma-separated addresses of a forward route, e.g. "sales@example.com forward '
        'a@example.net,b@example.net".',
    )
    retention: float = opt(
        30 * 86400.0,
        _duration,
        "Received mail older than this is deleted from the KVS and the index (0: keep it "
        "for ever).",
        format_duration,
    )
    spool_retry: float = opt(
        300.0,
        _duration,
        "How often received mail still in the spool a minute after it was written (its "
        "processing failed, or an SMTP worker died before handing it on) is processed "
        "again, as Postfix's queue_run_delay (0: only at start).",
        format_duration,
    )
    spf_fail: str = opt(
        "reject",
        _choice("reject", "tag"),
        'SPF "fail" at MAIL (clients neither authenticated nor trusted): "reject" answers '
        '550 5.7.23; "tag" accepts and records the verdict.',
    )


def _addresses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of IP addresses")
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_address(_str(item))))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address") from None
    return tuple(out)


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("expected a port number from 1 to 65535")
    return value


@dataclass(frozen=True)
class DnsConfig:
    """The DNS resolver: MX and addresses for deliveries, SPF and DKIM records."""

    nameservers: tuple[str, ...] = opt(
        (), _addresses, "Resolver addresses; empty: the system's /etc/resolv.conf."
    )
    port: int = opt(53, _port, "Port of the nameservers above.")
    timeout: float = opt(5.0, _duration, "Timeout of one lookup.", format_duration)


def _hostport(value: Any) -> str:
    text = _str(value).strip()
    if not text:
        return ""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
        raise ValueError(f"{text!r}: expected host:port, e.g. smtp.example.net:587")
    if not host.startswith("["):
        domain_name(host)
    return text


@dataclass(frozen=True)
class OutboundConfig:
    """Sending mail: the queue and its delivery."""

    port: int = opt(25, _port, "Port of the remote MX hosts (25; tests point it elsewhere).")
    smarthost: str = opt(
        "",
        _hostport,
        'Send everything through this relay ("host:port") instead of looking up MX records.',
    )
    smarthost_username: str = opt("", _str, "AUTH PLAIN user for the smarthost (over TLS only).")
    smarthost_password: str = opt("", _str, "Its password.")
    concurrency: int = opt(20, _positive_int, "Delivery attempts at once, in all.")
    per_domain: int = opt(5, _positive_int, "Delivery attempts at once to one domain.")
    retry_first: float = opt(
        300.0, _duration, "Wait before the first retry; each next wait doubles ...", format_duration
    )
    retry_max: float = opt(3600.0, _duration, "... up to this long between tries.", format_duration)
    lifetime: float = opt(
        5 * 86400.0,
        _duration,
        "Give up (mail.failed, bounce) this long after queueing (Postfix: maximal_queue_lifetime).",
        format_duration,
    )
    delay_warning: float = opt(
        4 * 3600.0,
        _duration,
        "mail.delayed (and a DELAY report where asked) once a message is this late, then "
        "at most once per this interval.",
        format_duration,
    )
    timeout: float = opt(
        300.0, _duration, "Timeout waiting for one reply of a remote server.", format_duration
    )
    connect_timeout: float = opt(30.0, _duration, "Timeout of one TCP connect.", format_duration)
    forward_sender: str = opt(
        "",
        _optional_address,
        "Envelope sender of mail sent on by forward routes, so that bounces come back here "
        '"" means postmaster@ the smtp.hostname).',
    )


@dataclass(frozen=True)
class LogConfig:
    """Logging."""

    level: str = opt(
        "info",
        _choice(*LEVELS),
        "Lowest level written: debug (one line per step of each message and event), "
        "info (one per delivery, per received message and per API request), warn, error.",
    )


@dataclass(frozen=True)
class Config:
    state: StateConfig = field(default_factory=StateConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    edj: EdjConfig = field(default_factory=EdjConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def state_dir(self) -> Path:
        return Path(self.state.dir)

    @property
    def spool_dir(self) -> Path:
        return Path(self.state.spool) if self.state.spool else self.state_dir / "spool"


def _sections() -> list[tuple[str, type[Any]]]:
    return [(f.name, f.default_factory) for f in dataclasses.fields(Config)]  # type: ignore[misc]


def from_mapping(raw: Mapping[str, Any]) -> Config:
    """Build a Config from parsed TOML; raise ConfigError listing every problem."""
    errors: list[str] = []
    sections: dict[str, Any] = {}
    known = dict(_sections())
    for name in raw:
        if name not in known:
            errors.append(f"{name}: unknown section (known: {', '.join(known)})")
    for name, cls in known.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            errors.append(f"{name}: expected a table [{name}]")
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in fields:
                errors.append(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
                continue
            try:
                values[key] = fields[key].metadata["parse"](value)
            except ValueError as e:
                errors.append(f"{name}.{key}: {e}")
        sections[name] = cls(**values)
    if errors:
        raise ConfigError(errors)
    return Config(**sections)


def load(path: str | Path | None) -> Config:
    """Read a TOML file (None: the embedded defaults)."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    return from_mapping(raw)


def toml_value(value: Any) -> str:
    """Render a default as TOML (the few types the schema uses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r}")


def render_sample() -> str:
    """The documented sample configuration: every option, set to its default."""
    lines = [
        "# gehirn-ts configuration. Every option is shown with its default value;",
        "# delete what you do not change. Rendered from gehirn_ts/config.py (make sample).",
    ]
    for name, cls in _sections():
        lines += ["", f"# {cls.__doc__}", f"[{name}]"]
        for f in dataclasses.fields(cls):
            show = f.metadata["show"]
            default = show(f.default) if show else f.default
            lines.append("")
            lines += [f"# {line}" for line in _wrap(f.metadata["doc"])]
            lines.append(f"{f.name} = {toml_value(default)}")
    return "\n".join(lines) + "\n"


OPTIONS_BEGIN = "<!-- options: rendered from gehirn_ts/config.py by `make sample` -->"
OPTIONS_END = "<!-- end of options -->"


def render_options_table() -> str:
    """Every option as Markdown tables, one per section (for docs/operations.md)."""
    lines = [OPTIONS_BEGIN]
    for name, cls in _sections():
        lines += [
            "",
            f"`[{name}]`: {cls.__doc__}",
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        for f in dataclasses.fields(cls):
            show = f.metadata["show"]
            default = toml_value(show(f.default) if show else f.default).replace("|", "\\|")
            doc = " ".join(f.metadata["doc"].split()).replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{default}` | {doc} |")
    lines.append(OPTIONS_END)
    return "\n".join(lines)


def replace_options_table(text: str) -> str:
    head, _, rest = text.partition(OPTIONS_BEGIN)
    _, _, tail = rest.partition(OPTIONS_END)
    return head + render_options_table() + tail


def _wrap(text: str, width: int = 88) -> list[str]:
    out: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*out, line] if line else out
