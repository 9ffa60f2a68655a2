"""Faults under steady load, through the chart's collector pod (tests/pipeline.py `ChartPod`: the
real collector v0.161.0 running the chart's rendered config, `betrace serve` with the chart's
args, a Redis store): the sidecar killed with SIGKILL and restarted; the Redis store stopped for
20 s; two collectors and their sidecars sharing one Redis. Across each fault the collector's
sending queue and retries deliver every span, and every violating trace is signalled exactly
once (counted by signal_id), none of the clean ones.

The rule counts spans, `count(cart.item) > 3`, and each trace's items end ITEM_GAP apart (more
than the collector's 200 ms batch timeout), so the item that makes a trace violate reaches the
sidecar in a later export than the trace's first spans: no single request shows the violation.
A count rather than a missing follow-up span because retries deliver queued batches out of
order, seconds apart: a rule on an absence would be judged on part of a trace whenever a retry
comes later than the decision wait (what `decision_wait` means, not a loss), while a partial
trace never exceeds a count and a whole one always does, however its parts arrive.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from chart import render
from opentelemetry import trace
from opentelemetry.sdk.trace import Tracer
from pipeline import ChartPod, Process, http_get
from processes import closed_at_end
from redis_servers import RedisServer

from sidecar.stores.redis.store import SHARDS

# A cold cache builds the collector first (minutes; tests/otelcol.py).
pytestmark = pytest.mark.timeout(1800)

RULE_ID = "cart-over-limit"
RULES = {"faults.yaml": f"""\
rules:
  - id: {RULE_ID}
    name: A checkout holds at most three cart items
    severity: high
    condition: count(cart.item) > 3
    signal:
      message: more than three items in one checkout
"""}
EXPORTER = "otlp_grpc/betrace"
ITEM_GAP = 0.3  # seconds between a trace's spans ending (the collector batches every 0.2 s)
RETRYING = "Exporting failed. Will retry the request after interval."  # the collector's log
DUE = [f"bt:{{q{shard}}}:due" for shard in range(SHARDS)]  # deadlines, or leases once claimed


@pytest.fixture
def start(redis_factory: Callable[..., RedisServer]) -> Iterator[Callable[..., Process]]:
    """`start(args, log, env=None, stdout=None)`: a Process, stopped at the end of the test,
    before the Redis it uses."""
    yield from closed_at_end(Process)


@dataclass(frozen=True)
class Checkout:
    trace_id: str
    violating: bool


class SteadyShop(threading.Thread):
    """The app: `rate` checkout traces a second for `seconds`. Each is a `checkout` root span
    with three `cart.item` children (four in every fourth trace: it violates), ending ITEM_GAP
    apart, the root last. The root goes out through the first tracer, the items through the
    tracers in turn, so with two collectors each trace is split across them, and which one
    carries the item that makes a trace violate changes from trace to trace."""

    def __init__(self, tracers: Sequence[Tracer], rate: float, seconds: float) -> None:
        super().__init__(name="steady-shop", daemon=True)
        self.tracers, self.rate, self.seconds = tracers, rate, seconds
        self.sent: list[Checkout] = []
        self.spans = [0] * len(tracers)  # spans ended, per tracer
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # noqa: BLE001 - raised again by finish()
            self.error = error

    def _run(self) -> None:
        ending: list[tuple[float, int, int, trace.Span]] = []  # (when, order, tracer, span)
        order = itertools.count()
        began = time.monotonic()
        for n in itertools.count():
            at = began + n / self.rate
            if at - began >= self.seconds:
                break
            self._end_due(ending, until=at)
            root = self.tracers[0].start_span("checkout")
            parent = trace.set_span_in_context(root)
            items = 4 if n % 4 == 3 else 3
            for k in range(items):
                tracer = (k + n // 4) % len(self.tracers)  # the last item on either side
                item = self.tracers[tracer].start_span("cart.item", context=parent,
                                                       attributes={"sku": f"sku-{k}"})
                heapq.heappush(ending, (at + k * ITEM_GAP, next(order), tracer, item))
            heapq.heappush(ending, (at + items * ITEM_GAP, next(order), 0, root))
            self.sent.append(Checkout(format(root.get_span_context().trace_id, "032x"),
                                      violating=items > 3))
        self._end_due(ending, until=max((when for when, *_ in ending), default=0.0))

    def _end_due(self, ending: list[tuple[float, int, int, trace.Span]], until: float) -> None:
        """End the spans due by `until`, each at its time; return at `until`."""
        while ending and ending[0][0] <= until:
            when, _, tracer, span = heapq.heappop(ending)
            time.sleep(max(0.0, when - time.monotonic()))
            span.end()
            self.spans[tracer] += 1
        time.sleep(max(0.0, until - time.monotonic()))

    def finish(self, timeout: float = 60.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the app did not finish sending"
        if self.error is not None:
            raise self.error

    @property
    def violating(self) -> set[str]:
        return {c.trace_id for c in self.sent if c.violating}

    @property
    def clean(self) -> set[str]:
        return {c.trace_id for c in self.sent if not c.violating}


def pending_decisions(client: redis.Redis) -> int:
    """Traces in the Redis store awaiting a decision or held under a claim lease."""
    with client.pipeline(transaction=False) as pipeline:
        for key in DUE:
            pipeline.zcard(key)
        return sum(pipeline.execute())


def under_lease(client: redis.Redis) -> int:
    """Traces a decider has claimed and not finished: their entry is the lease's expiry, later
    than any deadline (at most the decision wait, 1 s, ahead)."""
    after = int((time.time() + 2.0) * 1000)
    with client.pipeline(transaction=False) as pipeline:
        for key in DUE:
            pipeline.zcount(key, after, "+inf")
        return sum(pipeline.execute())


def collector(scrape: Callable[[int], Any], pod: ChartPod) -> dict[str, float]:
    """The collector's own counts: spans its OTLP receiver accepted, and what its exporter to
    the sidecar sent, failed for good, and holds in its queue."""
    metrics = scrape(pod.telemetry)
    return {"accepted": metrics.value("otelcol_receiver_accepted_spans_total", receiver="otlp"),
            "refused": metrics.value("otelcol_receiver_refused_spans_total", receiver="otlp"),
            "sent": metrics.value("otelcol_exporter_sent_spans_total", exporter=EXPORTER),
            "failed": metrics.value("otelcol_exporter_send_failed_spans_total",
                                    exporter=EXPORTER),
            "queued": metrics.value("otelcol_exporter_queue_size", exporter=EXPORTER)}


def retries_since(pod: ChartPod, offset: int) -> int:
    """Exports the collector failed and is retrying, logged after byte `offset` of its log
    (it also retries at start, until the sidecar listens). Its log is sampled (10 a second of
    one message, then 1 in 100), so this is a lower bound; it has no metric of retries."""
    return pod.collector.log.read_bytes()[offset:].count(RETRYING.encode())


def delivered(counts: dict[str, float]) -> bool:
    """Everything the collector accepted went to the sidecar; nothing waits for a retry."""
    return counts["queued"] == 0 and counts["sent"] == counts["accepted"]


def signal_ids_by_trace(signals: list[dict[str, Any]]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for signal in signals:
        assert signal["rule_id"] == RULE_ID, signal
        found.setdefault(signal["trace_id"], set()).add(signal["signal_id"])
    return found


def assert_signalled_once(signals: list[dict[str, Any]], shop: SteadyShop) -> None:
    """One signal_id per violating trace, none for a clean one."""
    by_trace = signal_ids_by_trace(signals)
    missed = shop.violating - set(by_trace)
    false_alarms = set(by_trace) & shop.clean
    assert not missed, f"{len(missed)} violating trace(s) not signalled: {sorted(missed)[:5]}"
    assert not false_alarms, f"{len(false_alarms)} clean trace(s) signalled"
    assert set(by_trace) == shop.violating, "signals for traces the app never sent"
    several = {t: ids for t, ids in by_trace.items() if len(ids) > 1}
    assert not several, f"several signal_ids for one trace: {several}"


def settle(pod: ChartPod, client: redis.Redis, shop: SteadyShop, app_spans: int,
           unsure_lines: int, scrape: Callable[[int], Any], wait_until: Callable[..., Any]
           ) -> tuple[dict[str, float], list[dict[str, Any]], int]:
    """Wait until the collector delivered every span, Redis holds no trace to decide, and the
    violation spans of all signal lines but the first `unsure_lines` came back through the
    collector (the sidecar drops them as its own); check each violating trace was signalled
    once. The collector's counts, the signals, and how many lines repeat a signal_id."""
    def settled() -> dict[str, float]:
        counts = collector(scrape, pod)
        echoed = counts["accepted"] - app_spans
        return counts if (delivered(counts) and pending_decisions(client) == 0
                          and echoed >= len(pod.signals()) - unsure_lines) else {}

    counts = wait_until(settled, timeout=60, interval=0.5,
                        what=f"every span delivered and every trace decided\n{pod.logs}")
    signals = pod.signals()
    assert_signalled_once(signals, shop)
    assert counts["failed"] == 0 and counts["refused"] == 0, counts
    return counts, signals, len(signals) - len({s["signal_id"] for s in signals})


def test_a_sidecar_killed_under_load_and_restarted_loses_no_violation(
        start: Callable[..., Process], tmp_path: Path,
        sdk_client: Callable[..., Any], wait_until: Callable[..., Any],
        scrape: Callable[[int], Any], redis_factory: Callable[..., RedisServer]) -> None:
    """`kill -9` of the sidecar mid-stream, a new one 3 s later with the same args. What it
    acknowledged is in Redis; what it had not, the collector retries. The traces it had claimed
    return to the pool after `claimLease` (5 s here, 30 s by default, so the test stays short). A
    signal written just before the kill, but not yet recorded as sent in Redis, is written again
    by the new process under the same signal_id: the log is counted by signal_id. (Duplicate
    lines seen: 0 in each of our runs; the window is one Redis round trip.)"""
    store = redis_factory()
    pod = ChartPod(render({"rules": RULES, "redis": {"url": store.url},
                           "sidecar": {"decisionWait": "1s", "claimLease": "5s"}}),
                   tmp_path / "pod").start(start)
    client = redis.Redis(port=store.port)
    app = sdk_client(pod.otlp_grpc, service="shop", batch=True, schedule_delay_millis=100)
    shop = SteadyShop([app.tracer], rate=40, seconds=20)
    began = time.monotonic()
    shop.start()

    wait_until(lambda: len(shop.sent) >= 200 and len(pod.signals()) >= 10, timeout=30,
               interval=0.1, what=f"5 s of traffic and signals before the kill\n{pod.logs}")
    # Killed mid-decision if we catch one within 10 s (a decision takes milliseconds): the
    # traces it claimed are then left to the next process, after the lease
    looking = time.monotonic() + 10.0
    while under_lease(client) == 0 and time.monotonic() < looking:
        pass
    pod.sidecar.kill()
    killed_at, log_at = time.monotonic(), pod.collector.log.stat().st_size
    left_leased = under_lease(client)
    before_restart = len(pod.signals())
    # The collector holds what it cannot deliver (spans ending meanwhile are batched every
    # 0.2 s, and every batch fails)
    wait_until(lambda: collector(scrape, pod)["queued"] > 0, timeout=30, interval=0.1,
               what="the collector queueing for the dead sidecar")
    time.sleep(max(0.0, killed_at + 3.0 - time.monotonic()))
    pod.sidecar.restart()
    pod.wait_sidecar_ready()
    assert shop.is_alive(), "the stream ended before the new sidecar came: no load after it"
    shop.finish()
    app.flush()
    app_spans = sum(shop.spans)

    # The killed process's last violation spans may have died in its export queue (0.5 s
    # batches): only the new process's lines are sure to come back.
    counts, signals, duplicates = settle(pod, client, shop, app_spans, before_restart, scrape,
                                         wait_until)
    assert app_spans <= counts["accepted"] <= app_spans + len(signals), (app_spans, counts)
    retries = retries_since(pod, log_at)
    assert retries > 0, pod.collector.output
    print(f"\nkill: {len(shop.sent)} traces, {app_spans} app spans, {len(shop.violating)} "
          f"violating; {left_leased} trace(s) left claimed by the killed sidecar; "
          f"{counts['sent']:.0f} spans sent to the sidecar, {retries} retries logged, "
          f"{duplicates} duplicate signal line(s); {time.monotonic() - began:.1f}s")


def test_the_redis_store_stopped_for_20s_under_load_loses_no_violation(
        start: Callable[..., Process], tmp_path: Path,
        sdk_client: Callable[..., Any], wait_until: Callable[..., Any],
        scrape: Callable[[int], Any], redis_factory: Callable[..., RedisServer]) -> None:
    """Redis stopped (SIGTERM) for 20 s mid-stream, then started again on the same port and
    directory. It runs as the chart's bundled Redis does, with an append-only file and
    `appendfsync always`: a store that forgets what it acknowledged loses spans whatever the
    sidecar does (README, "What a Redis without persistence loses"), so a real stop and start
    with persistence is the fair reading of "the store stopped", and a stronger one than
    pausing clients (`CLIENT PAUSE`), which keeps connections and state. While it is down the
    sidecar answers UNAVAILABLE, stays up, counts the store errors, and the collector queues
    and retries."""
    store = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    pod = ChartPod(render({"rules": RULES, "redis": {"url": store.url},
                           "sidecar": {"decisionWait": "1s", "claimLease": "5s"}}),
                   tmp_path / "pod").start(start)
    sidecar = pod.sidecar.process
    app = sdk_client(pod.otlp_grpc, service="shop", batch=True, schedule_delay_millis=100)
    shop = SteadyShop([app.tracer], rate=40, seconds=28)
    began = time.monotonic()
    shop.start()

    wait_until(lambda: len(shop.sent) >= 160 and len(pod.signals()) >= 10, timeout=30,
               interval=0.1, what=f"4 s of traffic and signals before the outage\n{pod.logs}")
    store.stop()
    stopped_at, log_at = time.monotonic(), pod.collector.log.stat().st_size

    def refusing() -> bool:
        metrics = scrape(pod.metrics)
        return metrics.value("betrace_export_requests_rejected_total", transport="grpc",
                             reason="unavailable") > 0 and \
            collector(scrape, pod)["queued"] > 0

    wait_until(refusing, timeout=15, interval=0.2,
               what=f"the sidecar refusing and the collector queueing\n{pod.logs}")
    status, body = http_get(f"http://127.0.0.1:{pod.metrics}/readyz")
    assert status == 503 and "redis unreachable" in body, (status, body)
    time.sleep(max(0.0, stopped_at + 20.0 - time.monotonic()))
    assert sidecar.poll() is None, pod.logs
    store.start()
    pod.wait_sidecar_ready()
    assert shop.is_alive(), "the stream ended before Redis came back: no load after it"
    shop.finish()
    app.flush()
    app_spans = sum(shop.spans)

    client = redis.Redis(port=store.port)

    counts, signals, duplicates = settle(pod, client, shop, app_spans, 0, scrape, wait_until)
    assert counts["accepted"] == app_spans + len(signals), (app_spans, len(signals), counts)

    assert sidecar is pod.sidecar.process and sidecar.poll() is None, pod.logs
    metrics = scrape(pod.metrics)
    refused = metrics.value("betrace_export_requests_rejected_total", transport="grpc",
                            reason="unavailable")
    assert metrics.value("betrace_store_errors_total", operation="append") == refused > 0
    assert metrics.value("betrace_export_requests_rejected_total", reason="internal") == 0
    assert metrics.value("betrace_spans_received_total") == counts["sent"], counts
    retries = retries_since(pod, log_at)
    assert retries > 0, pod.collector.output
    print(f"\nredis: {len(shop.sent)} traces, {app_spans} app spans, {len(shop.violating)} "
          f"violating; {counts['sent']:.0f} spans sent to the sidecar, {refused:.0f} requests "
          f"refused, {retries} retries logged, {duplicates} duplicate signal line(s); "
          f"{time.monotonic() - began:.1f}s")


def test_two_collectors_and_sidecars_on_one_redis_signal_each_violation_once(
        start: Callable[..., Process], tmp_path: Path,
        sdk_client: Callable[..., Any], wait_until: Callable[..., Any],
        scrape: Callable[[int], Any], redis_factory: Callable[..., RedisServer]) -> None:
    """Two collector pods, each with its sidecar, one Redis. The app's two tracers export to
    the two collectors, the second's spans children of the first's root: every trace is split
    across the pods (a violating one two items each side), so only the shared store sees the
    whole trace, and one of the two sidecars signals it."""
    store = redis_factory()
    rendered = render({"rules": RULES, "redis": {"url": store.url},
                       "sidecar": {"decisionWait": "1s"}})
    pods = [ChartPod(rendered, tmp_path / f"pod-{n}").start(start) for n in (0, 1)]
    apps = [sdk_client(pod.otlp_grpc, service=service, batch=True, schedule_delay_millis=100)
            for pod, service in zip(pods, ("checkout", "cart"))]
    shop = SteadyShop([app.tracer for app in apps], rate=40, seconds=15)
    began = time.monotonic()
    shop.start()
    shop.finish()
    for app in apps:
        app.flush()

    client = redis.Redis(port=store.port)

    def settled() -> list[dict[str, float]]:
        counts = [collector(scrape, pod) for pod in pods]
        done = all(delivered(c) and c["accepted"] - sent >= len(pod.signals())
                   for c, sent, pod in zip(counts, shop.spans, pods))
        return counts if done and pending_decisions(client) == 0 else []

    counts = wait_until(settled, timeout=60, interval=0.5,
                        what=f"every span delivered and every trace decided\n"
                             f"{pods[0].logs}\n{pods[1].logs}")
    signals = [s for pod in pods for s in pod.signals()]
    assert_signalled_once(signals, shop)
    assert len(signals) == len(shop.violating), Counter(s["signal_id"] for s in signals)
    for count, sent, pod in zip(counts, shop.spans, pods):
        assert count["failed"] == 0 and count["refused"] == 0, count
        assert count["accepted"] == sent + len(pod.signals()), (sent, count)
        assert scrape(pod.metrics).value("betrace_spans_received_total") == count["sent"]
    print(f"\ntwo pods: {len(shop.sent)} traces, {shop.spans} app spans per collector, "
          f"{len(shop.violating)} violating; signals {[len(p.signals()) for p in pods]} per "
          f"sidecar; {time.monotonic() - began:.1f}s")
