"""Event delivery benchmark (make bench): API publish -> bus -> webhook, per bus.

Figures, side by side in one run on this machine:
- end-to-end events/s (published over the HTTP API by h2load with 32 requests in
  flight, one event a request and then batches of 50, delivered to a local webhook
  receiver) on the embedded bus and on RabbitMQ, and on RabbitMQ with two daemons
  sharing the broker and the store (scaled out on the same two cores), each taking
  half of the requests;
- the ceiling of the client: a bare txamqp publish (with confirms) / consume (with
  acks) loop on the same broker, through txamqp's own channel methods, and the same
  loop through gehirn-ts's AMQP layer (bus/amqp.py on bus/txamqp_compat.py, which packs
  and reads the frames of every message itself);
- the same with batches both ways: published 50 a request and delivered to a
  subscription that takes batches of 50 (CloudEvents' batched mode);
- latency from publish to delivery, p50 and p99, at a steady 200 events/s.
"""

from __future__ import annotations

import gc
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web.client import Agent, HTTPConnectionPool
from txamqp.content import Content
from txamqp.protocol import AMQClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.h2load import h2load as run_h2load  # noqa: E402
from bench.smtp import cpu_seconds, start_gehirn  # noqa: E402
from gehirn_ts.bus import txamqp_compat as compat  # noqa: E402
from gehirn_ts.bus.amqp import AmqpBus, AmqpUrl  # noqa: E402
from gehirn_ts.interfaces import BusMessage  # noqa: E402
from tests.rabbitmq import rabbitmq_url, stop_if_started  # noqa: E402
from tests.support import free_port  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TOTAL = int(os.environ.get("BENCH_EVENTS", "10000"))
CONCURRENCY = 32
STEADY_RATE = 200
# The batched phase: CloudEvents batches of BATCH events, BATCH_FLIGHT requests in flight.
BATCH = 50
BATCH_FLIGHT = 4
STEADY_SECONDS = 10
# Which parts to run (all by default): embedded, rabbitmq, two (RabbitMQ with two
# daemons), bare.
ONLY = os.environ.get("BENCH_ONLY", "embedded,rabbitmq,two,bare").split(",")


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class Http:
    def __init__(self) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = CONCURRENCY
        self.client = HTTPClient(Agent(reactor, pool=pool))

    async def call(
        self, method: str, url: str, body: Any = None, token: str = "", ctype: str = ""
    ) -> Any:
        headers = {"content-type": [ctype or "application/json"]}
        if token:
            headers["authorization"] = [f"Bearer {token}"]
        data = json.dumps(body).encode() if body is not None else None
        response = await self.client.request(method, url, data=data, headers=headers)
        content = await response.content()
        return response.code, (json.loads(content) if content else None)


def h2load(
    url: str, token: str, body: Path, ctype: str, count: int, clients: int
) -> defer.Deferred[None]:
    """POST ``body`` ``count`` times over ``clients`` connections (nghttp2's h2load)."""
    return threads.deferToThread(run_h2load, url, token, body, ctype, count, clients)


async def wait_until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        await sleep(0.05)


async def run_daemon_bench(
    http: Http, bus_url: str, receiver: str, nodes: int = 1
) -> dict[str, float]:
    """The phases on one daemon, or on ``nodes`` daemons sharing one broker namespace
    and one state directory (RabbitMQ's competing consumers), each taking its share of
    the requests, as behind a load balancer."""
    workdir = Path(tempfile.mkdtemp(prefix="gehirn-bench-"))
    namespace = "bench-" + secrets.token_hex(3)
    ports = [free_port() for _ in range(nodes)]
    procs = []
    for n, port in enumerate(ports):
        home = workdir / f"node{n}"
        home.mkdir()
        (home / "c.toml").write_text(
            f'[state]\ndir = "{workdir / "state"}"\n'
            f'[http]\nlisten = "tcp:{port}:interface=127.0.0.1"\nmax_body = "1MiB"\n'
            f'[smtp]\nlisten = "tcp:{free_port()}:interface=127.0.0.1"\n'
            'submission = ""\nsubmissions = ""\n'
            f'[bus]\nurl = "{bus_url}"\nnamespace = "{namespace}"\n'
            '[edj]\nallow_networks = ["127.0.0.0/8"]\n'
        )
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    base = bases[0]
    try:

        async def up() -> bool:
            try:
                return (await http.call("GET", base + "/healthz"))[0] == 200
            except Exception:
                return False

        for n in range(nodes):
            # One at a time: the first one creates the store.
            procs.append(start_gehirn(workdir / f"node{n}"))
            base = bases[n]
            await wait_until(up, 30)
        base = bases[0]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "gehirn_ts.cli",
                "-c",
                "c.toml",
                "--json",
                "account",
                "create",
                "bench",
            ],
            cwd=workdir / "node0",
            env=ENV,
            capture_output=True,
            check=True,
        )
        token = json.loads(out.stdout)["api_key"]
        _, sub = await http.call(
            "POST", base + "/v1/subscriptions", {"pattern": "#", "url": receiver + "/hook"}, token
        )

        async def delivered(n: int) -> bool:
            stats = (await http.call("GET", receiver + "/stats"))[1]
            return bool(stats["unique"] >= n)

        def cpu() -> float:
            return sum(cpu_seconds(p.pid) for p in procs)

        async def load(events: Any, ctype: str, requests: int, clients: int) -> tuple:
            """POST ``events`` ``requests`` times from h2load, until all are delivered:
            the seconds to the last 202 and to the last delivery, and CPU ms an event."""
            share, flight = requests // nodes, clients // nodes
            count = share * nodes * (len(events) if isinstance(events, list) else 1)
            body = workdir / "load.json"
            body.write_text(json.dumps(events))
            await http.call("POST", receiver + "/reset")
            cpu_before = cpu()
            start = time.monotonic()
            await defer.gatherResults(
                [h2load(b + "/v1/events", token, body, ctype, share, flight) for b in bases]
            )
            published = time.monotonic() - start
            await wait_until(lambda: delivered(count), 600)
            done = time.monotonic() - start
            return published, done, (cpu() - cpu_before) / count * 1000

        # Throughput: TOTAL events, CONCURRENCY requests in flight, from h2load (C), as
        # smtp-source loads the SMTP benchmark: a Python client cost about 0.9 ms of
        # CPU a request on the same two cores (docs/performance.md).
        one = {"type": "notice.fault", "data": {"n": 0}}
        published, done, cpu_per_event = await load(one, "application/json", TOTAL, CONCURRENCY)
        # Throughput again, the events published in batches (one request per BATCH).
        batch = [{"type": "notice.fault", "data": {"n": n}} for n in range(BATCH)]
        batched_type = "application/cloudevents-batch+json"
        _, took, batched_cpu = await load(batch, batched_type, TOTAL // BATCH, BATCH_FLIGHT)
        batched_rate = TOTAL // BATCH * BATCH / took
        # Batches both ways: the same load to a subscription that takes batches too.
        await http.call("DELETE", base + f"/v1/subscriptions/{sub['id']}", token=token)
        _, sub = await http.call(
            "POST",
            base + "/v1/subscriptions",
            {"pattern": "#", "url": receiver + "/hook", "batch": BATCH},
            token,
        )
        _, took, both_cpu = await load(batch, batched_type, TOTAL // BATCH, BATCH_FLIGHT)
        both_rate = TOTAL // BATCH * BATCH / took
        await http.call("DELETE", base + f"/v1/subscriptions/{sub['id']}", token=token)
        await http.call(
            "POST", base + "/v1/subscriptions", {"pattern": "#", "url": receiver + "/hook"}, token
        )

        # Latency at a steady rate. This process is the load's client: a full collection
        # of its garbage (about 60 ms here, with the objects of the phases before) held
        # every request behind it and was counted as the daemon's latency, the p99 itself
        # when it came (docs/performance.md, session 15). Its collector is off for the
        # phase; reference counting frees what the requests leave.
        await http.call("POST", receiver + "/reset")
        gc.collect()
        gc.disable()
        count = STEADY_RATE * STEADY_SECONDS
        calls = []
        t0 = time.monotonic()
        for n in range(count):
            target = t0 + n / STEADY_RATE
            wait = target - time.monotonic()
            if wait > 0:
                await sleep(wait)
            calls.append(
                defer.Deferred.fromCoroutine(
                    http.call(
                        "POST",
                        bases[n % nodes] + "/v1/events",
                        {"type": "notice.fault", "data": {"n": n, "t": time.time()}},
                        token,
                    )
                )
            )
        await defer.gatherResults(calls)
        await wait_until(lambda: delivered(count), 300)
        gc.enable()
        latencies = sorted((await http.call("GET", receiver + "/stats"))[1]["latencies_ms"])
        rss = max(_rss_mb(p.pid) for p in procs)
        return {
            "publish_rate": TOTAL / published,
            "delivery_rate": TOTAL / done,
            "p50": statistics.median(latencies),
            "p99": latencies[int(len(latencies) * 0.99) - 1],
            "rss_mb": rss,
            "cpu_ms": cpu_per_event,
            "batched_rate": batched_rate,
            "batched_cpu_ms": batched_cpu,
            "both_rate": both_rate,
            "both_cpu_ms": both_cpu,
        }
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def bare_txamqp(url: str) -> float:
    """The same broker through txamqp alone: publish with confirms, consume with acks."""
    bus = AmqpBus(url, reactor, namespace="bare-" + secrets.token_hex(3), prefetch=64, heartbeat=0)
    bus.startService()
    while not bus.connected():
        await sleep(0.05)
    conn = bus._conn
    assert conn is not None
    queue = bus.queue_name("bare")
    await bus._declare(conn, queue)
    got = 0
    finished: defer.Deferred[None] = defer.Deferred()

    async def handler(message: BusMessage) -> None:
        nonlocal got
        got += 1
        if got == TOTAL and not finished.called:
            finished.callback(None)

    start = time.monotonic()
    bus.consume("bare", handler)
    body = json.dumps({"type": "notice.fault", "data": {"n": 0}}).encode()
    in_flight: list[defer.Deferred[None]] = []
    for _ in range(TOTAL):
        in_flight.append(bus.send("bare", body))
        if len(in_flight) >= CONCURRENCY:
            await in_flight.pop(0)
    await defer.gatherResults(in_flight)
    await finished
    rate = TOTAL / (time.monotonic() - start)
    await bus.stopService()
    assert compat.PROTOCOL_HEADER  # the same client layer as the daemon
    return rate


class StockClient(AMQClient):  # type: ignore[misc]
    """txamqp's own client, with only what it needs to talk to RabbitMQ: the 0-9-1
    header (the spec file and the binary body and table decoders come with importing
    txamqp_compat). Frames go through txamqp's queues, encoder and decoder."""

    def send_init_string(self) -> None:
        self.transport.write(compat.PROTOCOL_HEADER)


async def bare_stock_txamqp(url: str) -> float:
    """txamqp alone: basic_publish with confirms, basic_consume and basic_ack, each
    through txamqp's channel methods."""
    parsed = AmqpUrl.parse(url)
    delegate = compat.BusDelegate()
    client = StockClient(delegate, parsed.vhost, compat.load_spec(), heartbeat=0)
    await connectProtocol(TCP4ClientEndpoint(reactor, parsed.host, parsed.port), client)
    client.transport.setTcpNoDelay(True)
    await client.start(
        b"\0" + parsed.user.encode() + b"\0" + parsed.password.encode(), mechanism="PLAIN"
    )
    publish = await client.channel(1)
    await publish.channel_open()
    await publish.confirm_select()
    consume = await client.channel(2)
    await consume.channel_open()
    await consume.basic_qos(prefetch_count=64)
    queue = "bare-stock-" + secrets.token_hex(3)
    await publish.queue_declare(queue=queue, durable=True, auto_delete=True)
    pending: dict[int, defer.Deferred[None]] = {}
    got = 0
    finished: defer.Deferred[None] = defer.Deferred()

    def confirmed(channel: int, tag: int, multiple: bool, ack: bool) -> None:
        for t in [t for t in pending if t <= tag] if multiple else [tag]:
            d = pending.pop(t, None)
            if d is not None:
                d.callback(None)

    def delivered(channel: Any, msg: Any) -> None:
        nonlocal got
        got += 1
        consume.basic_ack(delivery_tag=msg.delivery_tag)
        if got == TOTAL and not finished.called:
            finished.callback(None)

    delegate.on_confirm = confirmed
    delegate.on_deliver = delivered
    await consume.basic_consume(queue=queue, consumer_tag="bare")
    body = json.dumps({"type": "notice.fault", "data": {"n": 0}}).encode()
    start = time.monotonic()
    in_flight: list[defer.Deferred[None]] = []
    for tag in range(1, TOTAL + 1):
        d: defer.Deferred[None] = defer.Deferred()
        pending[tag] = d
        publish.basic_publish(
            exchange="",
            routing_key=queue,
            content=Content(body, properties={"delivery-mode": 2}),
        )
        in_flight.append(d)
        if len(in_flight) >= CONCURRENCY:
            await in_flight.pop(0)
    await defer.gatherResults(in_flight)
    await finished
    rate = TOTAL / (time.monotonic() - start)
    client.transport.loseConnection()
    return rate


async def main(_: Any) -> None:
    # The broker only for the parts that use it; one started here is stopped at the end
    # (make bench starts and stops its own around all three benchmarks).
    url = rabbitmq_url() if {"rabbitmq", "two", "bare"} & set(ONLY) else ""
    rport = free_port()
    receiver_proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "receiver.py"), str(rport)]
    )
    receiver = f"http://127.0.0.1:{rport}"
    http = Http()
    try:
        await sleep(1.0)
        results = {}
        if "embedded" in ONLY:
            results["embedded bus"] = await run_daemon_bench(http, "local:", receiver)
        if "rabbitmq" in ONLY:
            results["RabbitMQ bus"] = await run_daemon_bench(http, url, receiver)
        if "two" in ONLY:
            results["RabbitMQ, 2 nodes"] = await run_daemon_bench(http, url, receiver, nodes=2)
        bare = await bare_txamqp(url) if "bare" in ONLY else 0.0
        stock = await bare_stock_txamqp(url) if "bare" in ONLY else 0.0
    finally:
        receiver_proc.terminate()
        stop_if_started()
    print(
        f"\nEvent delivery, {TOTAL} events, {CONCURRENCY} API requests in flight (h2load); "
        f"latency at {STEADY_RATE} events/s for {STEADY_SECONDS} s ({os.cpu_count()} cores)"
    )
    print(
        f"{'':16}{'API 202/s':>12}{'delivered/s':>13}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'peak RSS MB':>13}{'CPU ms/event':>14}"
    )
    for name, r in results.items():
        print(
            f"{name:16}{r['publish_rate']:12.0f}{r['delivery_rate']:13.0f}{r['p50']:9.1f}"
            f"{r['p99']:9.1f}{r['rss_mb']:13.1f}{r['cpu_ms']:14.2f}"
        )
    print(
        f"{'bare txamqp':16}{'':12}{stock:13.0f}   (publish+confirm, consume+ack, same broker; "
        "txamqp's own methods)"
    )
    print(f"{'bare bus':16}{'':12}{bare:13.0f}   (the same through gehirn-ts's AMQP layer)")
    print(f"Published in batches of {BATCH} ({BATCH_FLIGHT} requests in flight):")
    for name, r in results.items():
        print(f"{name:16}{'':12}{r['batched_rate']:13.0f}{'':31}{r['batched_cpu_ms']:14.2f}")
    print(f"Published and delivered in batches of {BATCH} (a subscription with batch {BATCH}):")
    for name, r in results.items():
        print(f"{name:16}{'':12}{r['both_rate']:13.0f}{'':31}{r['both_cpu_ms']:14.2f}")


if __name__ == "__main__":
    task.react(lambda r: defer.Deferred.fromCoroutine(main(r)))
