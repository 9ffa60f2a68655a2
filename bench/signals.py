"""Benchmark: the signal database's investigation queries over N stored signals (default 1M), on
SQLite and on a real PostgreSQL (started here, as the tests do: tests/postgres_servers.py).

    .venv/bin/python bench/signals.py [--signals N] [--repeat R] [--only sqlite|postgresql]

Generates N deterministic signals (12 rules, 20 services with 5 versions each, 90 days of
violation times, a context of order_id / payment_intent_id / attempt), stores them with
`SignalDB.upsert` in batches of 500 (the sidecar's dispatcher batch), then times each query R
times (median):

  baseline       SELECT count(*) over the whole table: one full scan, the reference
  group-by       one rule, a 30-day range, grouped by service.version: the whitepaper's
                 "filter by date range, group by service.version" (target < 1 s)
  group-context  one rule, grouped by a context attribute (attempt)
  where-context  one context value (order_id=...) anywhere in the table: a JSON scan
  newest-100     one severity, the newest 100 rows

and prints each time, its ratio to the baseline of the same run, and the target's result.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sidecar.model.signals import Signal, rfc3339, signal_id  # noqa: E402
from sidecar.signaldb import SignalDB, SignalQuery, open_signal_db  # noqa: E402

DAY_NS = 86400 * 10**9
START_NS = 1_790_000_000 * 10**9
RULES = [f"rule-{n:02d}" for n in range(12)]
SEVERITIES = ("critical", "high", "medium", "low")


def signals(count: int, seed: int = 7) -> list[Signal]:
    r = random.Random(seed)
    out = []
    for i in range(count):
        rule = RULES[i % len(RULES)]
        service = f"svc-{r.randrange(20):02d}"
        at = START_NS + r.randrange(90 * DAY_NS)
        out.append(Signal(
            signal_id=signal_id(rule, f"{i:032x}"), rule_id=rule, rule_name=rule,
            severity=SEVERITIES[i % 4], trace_id=f"{i:032x}", span_ids=[f"{i:016x}"],
            message="an invariant was broken",
            context={"order_id": f"ord_{i}", "payment_intent_id": [f"pi_{i}a", f"pi_{i}b"],
                     "attempt": 1 + r.randrange(3)},
            mode="replay", detected_at=rfc3339(START_NS + 91 * DAY_NS),
            violation_time=rfc3339(at), service=service,
            service_version=f"{service}-1.{r.randrange(5)}", rule_digest="d" * 16))
    return out


def timed(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(name: str, db: SignalDB, rows: list[Signal], repeat: int) -> None:
    db.connect()
    started = time.perf_counter()
    for i in range(0, len(rows), 500):
        db.upsert(rows[i:i + 500])
    load = time.perf_counter() - started
    with db._transaction() as cursor:  # (as autovacuum or PRAGMA optimize would in time)
        cursor.execute("ANALYZE signals")
    since, until = rfc3339(START_NS + 30 * DAY_NS), rfc3339(START_NS + 60 * DAY_NS)
    middle = len(rows) // 2
    queries: dict[str, Callable[[], object]] = {
        "baseline": lambda: db.count(),
        "group-by": lambda: db.groups(SignalQuery(rules=("rule-03",), since=since,
                                                  until=until), "service.version"),
        "group-context": lambda: db.groups(SignalQuery(rules=("rule-03",)), "attempt"),
        "where-context": lambda: list(db.signals(SignalQuery(
            where=(("order_id", f"ord_{middle}"),)))),
        "newest-100": lambda: list(db.signals(SignalQuery(severities=("high",), limit=100))),
    }
    groups = db.groups(SignalQuery(rules=("rule-03",), since=since, until=until),
                       "service.version")
    found = list(db.signals(SignalQuery(where=(("order_id", f"ord_{middle}"),))))
    assert len(found) == 1 and found[0].trace_id == f"{middle:032x}", found
    print(f"\n{name}: {len(rows):,} signals stored in {load:.1f}s "
          f"({len(rows) / load:,.0f}/s, batches of 500); rule-03 over 30 days: "
          f"{sum(g.count for g in groups):,} signals in {len(groups)} versions")
    times = {label: timed(run, repeat) for label, run in queries.items()}
    print(f"{'query':<15}{'median':>10}{'x baseline':>12}   target")
    for label, seconds in times.items():
        target = ""
        if label == "group-by":
            target = f"< 1 s: {'met' if seconds < 1 else 'NOT met'}"
        print(f"{label:<15}{seconds * 1000:>8.1f}ms{seconds / times['baseline']:>11.2f}x   "
              f"{target}")
    db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    args = parser.parse_args()
    started = time.perf_counter()
    rows = signals(args.signals)
    print(f"{len(rows):,} signals generated in {time.perf_counter() - started:.1f}s; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="betrace-bench-signals-") as tmp:
        if args.only in (None, "sqlite"):
            measure("sqlite", open_signal_db(f"sqlite:///{tmp}/signals.db"), rows, args.repeat)
        if args.only in (None, "postgresql"):
            from postgres_servers import PASSWORD, PostgresServer

            server = PostgresServer().start()
            try:
                url = server.create_database("bench")
                measure("postgresql", open_signal_db(url, PASSWORD), rows, args.repeat)
            finally:
                server.cleanup()
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
