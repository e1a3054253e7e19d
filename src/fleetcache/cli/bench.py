"""``fleetcache bench``: what fleet-wide coordination costs and what it saves, in one run.

Scenarios. P worker processes (real OS processes) x C asyncio tasks each, all released at
once; every task requests each of K keys once, in its own seeded random order, through
``cache.lookup.get``; a miss computes for D ms. Each scenario runs *uncoordinated* and
*coordinated*, each time in a fresh namespace (an empty cache), R times; the report shows
medians over the repetitions.

=========  ==========================================
default    P=8 C=4 K=50 D=200
hotkey     K=1, otherwise as default
fast       D=20, otherwise as default
=========  ==========================================

Micro-benchmarks, in the parent process: a warm hit through fleetcache against the same
``PG_READ`` SELECT run raw on a pooled connection; an uncontended miss, coordinated against
uncoordinated.

The report is JSON (``--json PATH``, or stdout) plus tables drawn with rich, each target
marked met or missed. The exit status is 1 only when something *failed* (a worker, a
request, a deadline); a missed performance target is reported, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from math import floor
from typing import Any, TypeVar

import psycopg

from fleetcache.cli._database import command_database, redacted
from fleetcache.cli._fleet import Fleet, WorkerContext, WorkerError
from fleetcache.coordination.base import Acquired, NotAcquired, PopulateCoordinator, WakeReason
from fleetcache.errors import ConfigurationError, FleetcacheError
from fleetcache.factory import open_cache
from fleetcache.lookup.caching import Produced
from fleetcache.stores import queries as q
from fleetcache.stores.base import Entry, Key
from fleetcache.stores.postgres import PostgresStore

T = TypeVar("T")

# ----------------------------------------------------------------------------- SQL
# The bench's own statements (the cache's are in fleetcache.stores.queries).

#: One sample, taken by the parent, of what this run's pooled worker connections are doing:
#: the backends of this database whose application_name is the run's (the workers set it
#: through PGAPPNAME; the LISTEN hub names itself, and the sampler is excluded by pid).
#: ``holders`` hold a coordinator lock (a granted one-bigint advisory lock, objsubid 1):
#: each is one computation's winner, idle in its transaction while it computes.
#: ``blocked`` wait for a lock without holding a coordinator lock: what a waiter that
#: blocks in a lock acquire (holding its connection all along) looks like.
#: ``winners_blocked`` hold a coordinator lock and wait for another lock: winners queueing
#: for Postgres's one NOTIFY queue lock at COMMIT (wait_event ``object``), information only.
_SAMPLE_ACTIVITY = """
    SELECT
        count(*) FILTER (WHERE a.state <> 'idle') AS busy,
        count(*) FILTER (WHERE a.state <> 'idle' AND h.pid IS NOT NULL) AS holders,
        count(*) FILTER (WHERE a.wait_event_type = 'Lock' AND h.pid IS NULL) AS blocked,
        count(*) FILTER (WHERE a.wait_event_type = 'Lock' AND h.pid IS NOT NULL)
            AS winners_blocked
    FROM pg_stat_activity AS a
    LEFT JOIN (
        SELECT DISTINCT pid FROM pg_locks
        WHERE locktype = 'advisory' AND objsubid = 1 AND granted
    ) AS h ON h.pid = a.pid
    WHERE a.datname = current_database()
      AND a.application_name = %(app)s
      AND a.pid <> pg_backend_pid()
"""
#: Machine facts for the report.
_SERVER_FACTS = (
    "SELECT current_setting('server_version'), current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int"
)
#: Makes the worker pools open their connections before the release.
_WARM_UP = "SELECT 1"
#: The bench's database on the embedded server.
_EMBEDDED_DATABASE = "fleetcache_bench"

# ----------------------------------------------------------------------- targets

#: A warm hit may cost at most this many times one raw indexed SELECT.
HIT_RATIO_TARGET = 1.1
#: Coordination may add at most this many ms to an uncontended miss.
MISS_OVERHEAD_TARGET_MS = 1.0
#: Wake latency p99 in ``default`` must stay under this (ms).
WAKE_P99_TARGET_MS = 20.0
#: "No worse than uncoordinated" for wall time, with this allowance for run-to-run noise
#: on a shared machine (the raw ratio is reported beside it).
WALL_TOLERANCE = 0.05

_MODES = ("uncoordinated", "coordinated")
_APP_NAME_PREFIX = "fleetcache-bench"


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True, slots=True)
class Scenario:
    """One fleet shape: P processes x C tasks over K keys computing D ms each."""

    name: str
    processes: int
    tasks: int
    keys: int
    compute_ms: float


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Every effective option of one bench run (what the JSON calls ``options``)."""

    processes: int
    tasks: int
    keys: int
    compute_ms: float
    fast_compute_ms: float
    repetitions: int
    micro_iterations: int
    pool_size: int
    scenarios: tuple[str, ...]
    seed: int
    run_timeout: float
    sample_interval_ms: float
    quick: bool

    def scenario_list(self) -> list[Scenario]:
        """The selected scenarios, in order."""
        every = {
            "default": Scenario("default", self.processes, self.tasks, self.keys, self.compute_ms),
            "hotkey": Scenario("hotkey", self.processes, self.tasks, 1, self.compute_ms),
            "fast": Scenario("fast", self.processes, self.tasks, self.keys, self.fast_compute_ms),
        }
        return [every[name] for name in self.scenarios]


_FULL = {"processes": 8, "tasks": 4, "keys": 50, "compute_ms": 200.0, "repetitions": 3}
_QUICK = {"processes": 4, "tasks": 2, "keys": 10, "compute_ms": 50.0, "repetitions": 1}
_FULL_MICRO = 2000
_QUICK_MICRO = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="Postgres to bench on (default: $DATABASE_URL, else an embedded server that is "
        "started and stopped here). Only namespaces named bench:<run id>:... are written, "
        "and they are deleted after each run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a reduced run (P=4 C=2 K=10 D=50, R=1, 300 micro iterations) for under a minute",
    )
    sizes = parser.add_argument_group("fleet shape (the default scenario; others derive)")
    sizes.add_argument("--processes", "-P", type=_positive_int, help="worker processes (8)")
    sizes.add_argument("--tasks", "-C", type=_positive_int, help="asyncio tasks per process (4)")
    sizes.add_argument("--keys", "-K", type=_positive_int, help="distinct keys (50)")
    sizes.add_argument(
        "--compute-ms", "-D", type=_non_negative_float, help="one computation, ms (200)"
    )
    sizes.add_argument(
        "--fast-compute-ms",
        type=_non_negative_float,
        help="the fast scenario's computation, ms (default: compute-ms / 10)",
    )
    sizes.add_argument(
        "--scenarios",
        default="default,hotkey,fast",
        help="comma-separated subset of default,hotkey,fast (default: all)",
    )
    runs = parser.add_argument_group("repetition and output")
    runs.add_argument(
        "--repetitions", "-R", type=_positive_int, help="runs per scenario and mode (3)"
    )
    runs.add_argument(
        "--micro-iterations",
        type=_positive_int,
        help="timed iterations of each micro-benchmark (2000; misses use a quarter)",
    )
    runs.add_argument(
        "--pool-size",
        type=_positive_int,
        help="each worker's pool size (default: tasks + 2)",
    )
    runs.add_argument("--seed", type=int, default=0, help="seed of the request orders (0)")
    runs.add_argument(
        "--run-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds one scenario run may take before its workers are killed (120)",
    )
    runs.add_argument(
        "--sample-interval-ms",
        type=_positive_float,
        default=10.0,
        help="how often pg_stat_activity is sampled during a run, ms (10)",
    )
    runs.add_argument(
        "--json",
        metavar="PATH",
        help="write the JSON report here ('-' for stdout). Without it the JSON goes to "
        "stdout and the tables to stderr.",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    """The effective options: explicit flags win over ``--quick``, which wins over the
    full run's defaults."""
    base = _QUICK if args.quick else _FULL

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return base[name] if value is None else value

    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = [s for s in scenarios if s not in {"default", "hotkey", "fast"}]
    if unknown or not scenarios:
        raise ConfigurationError(
            f"--scenarios takes a comma-separated subset of default,hotkey,fast; got "
            f"{args.scenarios!r}"
        )
    compute_ms = float(pick("compute_ms"))
    tasks = int(pick("tasks"))
    return BenchConfig(
        processes=int(pick("processes")),
        tasks=tasks,
        keys=int(pick("keys")),
        compute_ms=compute_ms,
        fast_compute_ms=(
            compute_ms / 10 if args.fast_compute_ms is None else float(args.fast_compute_ms)
        ),
        repetitions=int(pick("repetitions")),
        micro_iterations=(
            args.micro_iterations
            if args.micro_iterations is not None
            else (_QUICK_MICRO if args.quick else _FULL_MICRO)
        ),
        pool_size=args.pool_size if args.pool_size is not None else tasks + 2,
        scenarios=scenarios,
        seed=args.seed,
        run_timeout=args.run_timeout,
        sample_interval_ms=args.sample_interval_ms,
        quick=args.quick,
    )


# ------------------------------------------------------------------------ worker


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker process runs in one scenario run (pickled to the worker)."""

    url: str
    coordinate: bool
    pool_size: int
    tasks: int
    keys: int
    compute_ms: float
    namespace: str
    seed: str
    app_name: str
    timeout: float


class _ConnectionLedger:
    """Which asyncio task has which of a pool's connections checked out.

    Installed on one worker's pool by wrapping its ``getconn``/``putconn`` (``connection()``
    goes through both), so every checkout, by the store or by the coordinator, is
    attributed to the task that made it.
    """

    def __init__(self, pool: Any) -> None:
        # Written by the wrappers, read by held_by(); all on the worker's one event loop.
        self._owner: dict[int, asyncio.Task[Any] | None] = {}
        self._held: Counter[asyncio.Task[Any] | None] = Counter()
        getconn, putconn = pool.getconn, pool.putconn

        async def tracked_getconn(timeout: float | None = None) -> Any:
            conn = await getconn(timeout)
            task = asyncio.current_task()
            self._owner[id(conn)] = task
            self._held[task] += 1
            return conn

        async def tracked_putconn(conn: Any) -> None:
            if id(conn) in self._owner:
                task = self._owner.pop(id(conn))
                self._held[task] -= 1
                if not self._held[task]:
                    del self._held[task]
            await putconn(conn)

        pool.getconn = tracked_getconn
        pool.putconn = tracked_putconn

    def held_by(self, task: asyncio.Task[Any] | None) -> int:
        """How many connections ``task`` has checked out now."""
        return self._held.get(task, 0)


class _RecordingCoordinator:
    """A :class:`PopulateCoordinator` that forwards to the real one and records every
    wait: (key index, start, end, wake reason, connections the waiting task held).

    A loser's wait runs in its computation's task, which can take no connection while it
    is parked; so the connections that task holds when its wait starts and ends are
    exactly the connections held by that waiter (the bench swaps this into the lookup).
    """

    def __init__(
        self, inner: PopulateCoordinator, key_index: dict[str, int], ledger: _ConnectionLedger
    ) -> None:
        self._inner = inner
        self._key_index = key_index
        self._ledger = ledger
        # Appended by wait_for_key / try_acquire_and_run on the worker's one event loop;
        # read after the run.
        self.waits: list[tuple[int, float, float, str, int]] = []
        self.commits: list[tuple[int, float]] = []

    async def try_acquire_and_run(
        self, coalesce_key: str, fn: Callable[[object], Awaitable[T]]
    ) -> Acquired[T] | NotAcquired:
        """Forward to the real coordinator; record when a won lock's transaction ended."""
        outcome = await self._inner.try_acquire_and_run(coalesce_key, fn)
        if isinstance(outcome, Acquired):
            # The coordinator returns right after its COMMIT (which delivers the NOTIFY):
            # the closest this process can see to the moment the waiters are told.
            self.commits.append((self._key_index.get(coalesce_key, -1), time.time()))
        return outcome

    async def wait_for_key(self, coalesce_key: str, timeout: float) -> WakeReason:
        """Forward to the real coordinator and record the wait."""
        task = asyncio.current_task()
        held = self._ledger.held_by(task)
        started = time.time()
        reason = await self._inner.wait_for_key(coalesce_key, timeout)
        ended = time.time()
        held = max(held, self._ledger.held_by(task))
        self.waits.append(
            (self._key_index.get(coalesce_key, -1), started, ended, reason.value, held)
        )
        return reason


async def _warm_pool(pool: Any, connections: int) -> None:
    """Open ``connections`` pooled connections now, so the measured run never waits for
    a connection to be established (both modes alike)."""

    async def hold() -> None:
        async with pool.connection(timeout=30.0) as conn:
            await conn.execute(_WARM_UP)
            await asyncio.sleep(0.05)

    await asyncio.gather(*(hold() for _ in range(connections)))


async def bench_worker(ctx: WorkerContext, spec: WorkerSpec) -> dict[str, Any]:
    """One worker process's part of a scenario run (a :class:`Fleet` job).

    Opens its own cache, warms its pool, waits for the common release, runs
    ``spec.tasks`` tasks that each request every key once in a seeded random order, and
    returns raw records for the parent to aggregate: requests ``(key, start, end, ok)``,
    computations ``(key, start, end)``, waits ``(key, start, end, reason, connections
    held)``, won locks' commits ``(key, time)``, error texts and the cache's counters.
    Times are ``time.time()``, comparable across processes on one machine.
    """
    # libpq reads PGAPPNAME for the pool's connections, so the parent's sampler can find
    # exactly this run's backends (the LISTEN hub names itself).
    os.environ["PGAPPNAME"] = spec.app_name
    cache = await open_cache(spec.url, coordinate=spec.coordinate, pool_size=spec.pool_size)
    try:
        names = [f"key-{i}" for i in range(spec.keys)]
        keys = [Key(spec.namespace, name) for name in names]
        if not isinstance(cache.store, PostgresStore):
            raise ConfigurationError(f"the bench needs a Postgres URL, got {spec.url!r}")
        ledger = _ConnectionLedger(cache.store.pool)
        recorder: _RecordingCoordinator | None = None
        if cache.lookup.coordinator is not None:
            recorder = _RecordingCoordinator(
                cache.lookup.coordinator, {k.coalesce_key: i for i, k in enumerate(keys)}, ledger
            )
            cache.lookup.coordinator = recorder
        await _warm_pool(cache.store.pool, min(spec.pool_size, spec.tasks + 1))

        spans: list[tuple[int, float, float]] = []
        records: list[tuple[int, float, float, bool]] = []
        errors: list[str] = []

        def producer(index: int) -> Callable[[str], Awaitable[Produced]]:
            async def produce(name: str) -> Produced:
                started = time.time()
                await asyncio.sleep(spec.compute_ms / 1000)
                spans.append((index, started, time.time()))
                return Produced({"key": name, "worker": ctx.index})

            return produce

        async def requester(task: int) -> None:
            order = list(range(spec.keys))
            random.Random(f"{spec.seed}:{task}").shuffle(order)
            for index in order:
                started = time.time()
                try:
                    entry = await cache.lookup.get(keys[index], producer(index))
                    ok = entry is not None and entry.value.get("key") == names[index]
                    if not ok:
                        errors.append(f"{names[index]}: unexpected entry {entry!r}")
                except FleetcacheError as exc:
                    ok = False
                    errors.append(f"{names[index]}: {type(exc).__name__}: {exc}")
                records.append((index, started, time.time(), ok))

        release_at = await ctx.ready()
        async with asyncio.timeout(spec.timeout):
            await asyncio.gather(*(requester(t) for t in range(spec.tasks)))
        stats = cache.stats()
    finally:
        await cache.close()
    return {
        "worker": ctx.index,
        "pid": os.getpid(),
        "release_at": release_at,
        "records": records,
        "spans": spans,
        "waits": recorder.waits if recorder is not None else [],
        "commits": recorder.commits if recorder is not None else [],
        "errors": errors,
        "stats": stats,
    }


# ----------------------------------------------------------------------- sampler


class _ActivitySampler:
    """Samples ``pg_stat_activity`` from the parent during one scenario run."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], app_name: str, interval: float) -> None:
        self._conn = conn
        self._params = {"app": app_name}
        self._interval = interval
        #: (time, busy, holders, blocked, winners_blocked) per sample.
        self.samples: list[tuple[float, int, int, int, int]] = []
        self.errors: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def begin(self, release_at: float) -> None:
        """Start sampling at ``release_at`` (the fleet's ``on_release`` callback)."""
        self._task = asyncio.create_task(self._loop(release_at), name="bench-sampler")

    async def _loop(self, release_at: float) -> None:
        await asyncio.sleep(max(0.0, release_at - time.time()))
        while True:
            taken = time.time()
            try:
                cursor = await self._conn.execute(_SAMPLE_ACTIVITY, self._params)
                row = await cursor.fetchone()
            except psycopg.Error as exc:
                self.errors.append(f"sampling pg_stat_activity failed: {exc}")
                return
            if row is not None:
                busy, holders, blocked, winners_blocked = (int(v) for v in row)
                self.samples.append((taken, busy, holders, blocked, winners_blocked))
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# ----------------------------------------------------------------------- analysis


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The ``pct`` percentile of ``values`` by linear interpolation; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * pct / 100
    low = floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _max(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def analyse_run(
    results: Sequence[dict[str, Any]],
    *,
    scenario: Scenario,
    coordinate: bool,
    samples: Sequence[tuple[float, int, int, int, int]],
) -> dict[str, Any]:
    """One scenario run's metrics from the workers' raw records and the activity samples
    ``(time, busy, holders, blocked, winners_blocked)``."""
    release_at = min(r["release_at"] for r in results)
    per_key: Counter[int] = Counter()
    # Commit time of each key. Coordinated: when the first won lock's try_acquire_and_run
    # returned, right after its COMMIT. Uncoordinated: when the first request that computed
    # the key returned, right after its write committed.
    commit: dict[int, float] = {}
    for result in results:
        for index, started, ended in result["spans"]:
            per_key[index] += 1
            if coordinate:
                continue
            ends = [
                end
                for key, start, end, _ in result["records"]
                if key == index and start <= started and end >= ended
            ]
            done = min(ends) if ends else ended
            commit[index] = min(commit.get(index, done), done)
        for index, committed in result.get("commits", ()):
            commit[index] = min(commit.get(index, committed), committed)

    latencies: list[float] = []
    wakes: list[float] = []
    notified: list[float] = []  # the waiters every one of whose waits ended on a NOTIFY
    hits: list[float] = []
    failed = 0
    reasons: Counter[str] = Counter()
    late: Counter[str] = Counter()
    held_by_waiters = 0
    for result in results:
        spans = result["spans"]
        waits = result["waits"]
        for index, wait_started, _, reason, held in waits:
            reasons[reason] += 1
            held_by_waiters = max(held_by_waiters, held)
            # A wait that begins after the key's winner had already returned (so after its
            # COMMIT and NOTIFY) can only be woken by a later holder, the probe or its
            # timeout: the signature of a NOTIFY lost between try-lock and wait.
            if index in commit and wait_started > commit[index]:
                late[reason] += 1
        for index, started, ended, ok in result["records"]:
            latencies.append(ended - started)
            failed += not ok
            computed = any(key == index and started <= s and e <= ended for key, s, e in spans)
            woken_by = [
                reason for key, _, we, reason, _ in waits if key == index and started <= we <= ended
            ]
            waited = bool(woken_by)
            if waited and not computed and index in commit:
                wakes.append(ended - commit[index])
                if all(reason == WakeReason.NOTIFY.value for reason in woken_by):
                    notified.append(ended - commit[index])
            elif not computed and not waited and index in commit and started >= commit[index]:
                hits.append(ended - started)
    stats = _sum_stats(r["stats"]["lookup"] for r in results)
    errors = [e for r in results for e in r["errors"]]
    # With one key, from a quarter to three quarters into the computation every request
    # has parked behind the winner, so nothing but the winner's own connection may be busy:
    # the brief's "non-idle minus computations running", without in-flight statements.
    quiet = (
        [
            busy - holders
            for taken, busy, holders, _, _ in samples
            if scenario.keys == 1
            and release_at + scenario.compute_ms / 4000
            <= taken
            <= release_at + 3 * scenario.compute_ms / 4000
        ]
        if scenario.compute_ms >= 20
        else []
    )
    return {
        "computations_total": sum(per_key.values()),
        "computations_max_per_key": max(per_key.values(), default=0),
        "keys_computed": len(per_key),
        "requests": len(latencies),
        "failed_requests": failed,
        "wall_ms": _ms(max(end for r in results for _, _, end, _ in r["records"]) - release_at)
        if latencies
        else None,
        "request_ms_p50": _ms(percentile(latencies, 50)),
        "request_ms_p99": _ms(percentile(latencies, 99)),
        "waiters": len(wakes),
        "wake_ms_p50": _ms(percentile(wakes, 50)),
        "wake_ms_p99": _ms(percentile(wakes, 99)),
        "wake_ms_max": _ms(max(wakes, default=None)),
        "wake_ms_p99_notified": _ms(percentile(notified, 99)),
        "wake_reasons": dict(sorted(reasons.items())),
        "waits_begun_after_commit": dict(sorted(late.items())),
        "hits": len(hits),
        "hit_ms_p50": _ms(percentile(hits, 50)),
        "waiter_connections_max": held_by_waiters if coordinate else None,
        "blocked_on_lock_max": max((s[3] for s in samples), default=None),
        "quiet_busy_without_lock_max": max(quiet, default=None),
        "busy_without_lock_max": max((s[1] - s[2] for s in samples), default=None),
        "lock_holders_max": max((s[2] for s in samples), default=None),
        "winners_blocked_max": max((s[4] for s in samples), default=None),
        "activity_samples": len(samples),
        "lookup_stats": stats,
        "coordinator_stats": _sum_stats(r["stats"].get("coordinator", {}) for r in results),
        "errors": errors[:20],
    }


def _sum_stats(stats: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for one in stats:
        total.update(one)
    return dict(sorted(total.items()))


_MEDIAN_METRICS = (
    "computations_total",
    "computations_max_per_key",
    "wall_ms",
    "request_ms_p50",
    "request_ms_p99",
    "wake_ms_p50",
    "wake_ms_p99",
    "wake_ms_max",
    "wake_ms_p99_notified",
    "hit_ms_p50",
)


def summarise(runs: Sequence[dict[str, Any]], *, coordinate: bool) -> dict[str, Any]:
    """Medians over the repetitions of one scenario and mode, plus the worst case of the
    correctness metrics (they must hold in every run, not in the median one)."""
    good = [r for r in runs if "error" not in r]
    summary: dict[str, Any] = {m: _median(r[m] for r in good) for m in _MEDIAN_METRICS}
    summary["computations_each_run"] = [r["computations_total"] for r in good]
    summary["computations_max_per_key_worst"] = max(
        (r["computations_max_per_key"] for r in good), default=None
    )
    for worst in (
        "waiter_connections_max",
        "blocked_on_lock_max",
        "quiet_busy_without_lock_max",
        "busy_without_lock_max",
        "lock_holders_max",
        "winners_blocked_max",
    ):
        summary[worst] = _max(r[worst] for r in good)
    summary["wake_reasons"] = _sum_stats(r["wake_reasons"] for r in good)
    summary["waits_begun_after_commit"] = _sum_stats(r["waits_begun_after_commit"] for r in good)
    summary["failed_requests"] = sum(r["failed_requests"] for r in good)
    summary["failed_runs"] = len(runs) - len(good)
    summary["runs"] = list(runs)
    return summary


# ------------------------------------------------------------------------ micro


async def micro_benchmarks(url: str, iterations: int, run_id: str) -> dict[str, Any]:
    """Warm hit vs raw SELECT, and uncontended miss coordinated vs uncoordinated, timed
    in this process with ``perf_counter`` and interleaved (ABAB, then BABA) so drift on a
    noisy machine hits both sides alike."""
    coordinated = await open_cache(url, coordinate=True, pool_size=2)
    try:
        plain = await open_cache(url, coordinate=False, pool_size=2)
        try:
            return await _micro(coordinated, plain, iterations, run_id)
        finally:
            await plain.close()
    finally:
        await coordinated.close()


async def _micro(coordinated: Any, plain: Any, iterations: int, run_id: str) -> dict[str, Any]:
    hit_ns = f"bench:{run_id}:micro-hit"
    closure_ns = f"bench:{run_id}:micro-closure"
    miss_ns = {True: f"bench:{run_id}:micro-miss-c", False: f"bench:{run_id}:micro-miss-u"}
    hit_produced = 0

    async def produce(name: str) -> Produced:
        return Produced({"key": name})

    async def produce_on_hit(name: str) -> Produced:
        # A warm hit must never compute; counted so the report would show it if it did.
        nonlocal hit_produced
        hit_produced += 1
        return Produced({"key": name})

    key = Key(hit_ns, "warm")
    await coordinated.lookup.get(key, produce)
    pool = coordinated.store.pool
    params = {"ns": key.namespace, "scope": key.scope, "user": key.user, "name": key.name}

    async def hit() -> float:
        started = time.perf_counter()
        await coordinated.lookup.get(key, produce_on_hit)
        return time.perf_counter() - started

    async def raw() -> float:
        started = time.perf_counter()
        async with pool.connection() as conn:
            await (await conn.execute(q.PG_READ, params)).fetchone()
        return time.perf_counter() - started

    try:
        hits, raws = await _interleaved(hit, raw, iterations, warm_up=max(10, iterations // 10))
        misses = max(10, iterations // 4)
        counter = iter(range(10**9))

        def miss(cache: Any, coordinate: bool) -> Callable[[], Awaitable[float]]:
            async def timed() -> float:
                fresh = Key(miss_ns[coordinate], f"miss-{next(counter)}")
                started = time.perf_counter()
                await cache.lookup.get(fresh, produce)
                return time.perf_counter() - started

            return timed

        coord_ms, plain_ms = await _interleaved(
            miss(coordinated, True), miss(plain, False), misses, warm_up=max(5, misses // 10)
        )
        closure = await _closure_cost(plain.store, closure_ns, misses)
    finally:
        for namespace in (hit_ns, closure_ns, *miss_ns.values()):
            await coordinated.store.delete_namespace(namespace)
    hit_p50, raw_p50 = percentile(hits, 50), percentile(raws, 50)
    coord_p50, plain_p50 = percentile(coord_ms, 50), percentile(plain_ms, 50)
    # Never None: every list holds at least one timing (iterations >= 1).
    assert hit_p50 is not None
    assert raw_p50 is not None
    assert coord_p50 is not None
    assert plain_p50 is not None
    return {
        "warm_hit": {
            "iterations": iterations,
            "fleetcache_ms_p50": _ms(hit_p50),
            "raw_select_ms_p50": _ms(raw_p50),
            "fleetcache_ms_p99": _ms(percentile(hits, 99)),
            "raw_select_ms_p99": _ms(percentile(raws, 99)),
            "ratio": round(hit_p50 / raw_p50, 3),
            "produce_calls": hit_produced,
        },
        "uncontended_miss": {
            "iterations": misses,
            "coordinated_ms_p50": _ms(coord_p50),
            "uncoordinated_ms_p50": _ms(plain_p50),
            "extra_ms": _ms(coord_p50 - plain_p50),
            "paired_extra_ms_p50": _ms(
                percentile([c - p for c, p in zip(coord_ms, plain_ms, strict=True)], 50)
            ),
        },
        "closure": closure,
    }


async def _closure_cost(store: Any, namespace: str, iterations: int) -> dict[str, Any]:
    """What store-enforced closure costs: a populate's stamp plus guarded write against a
    plain upsert, and an invalidation (locks, generation bump, delete in one transaction)
    against a plain DELETE of the same rows."""
    numbers = iter(range(10**9))

    def entry() -> Entry:
        return Entry(Key(namespace, f"c-{next(numbers)}"), {"v": 1}, created_at=0)

    async def guarded() -> float:
        fresh = entry()
        started = time.perf_counter()
        stamp = await store.stamp(namespace, [fresh.key.name])
        await store.write(fresh, stamp=stamp)
        return time.perf_counter() - started

    async def unguarded() -> float:
        fresh = entry()
        started = time.perf_counter()
        await store.write(fresh)
        return time.perf_counter() - started

    async def invalidation() -> float:
        fresh = entry()
        await store.write(fresh)
        started = time.perf_counter()
        await store.delete_names(namespace, [fresh.key.name])
        return time.perf_counter() - started

    async def plain_delete() -> float:
        fresh = entry()
        await store.write(fresh)
        started = time.perf_counter()
        async with store.pool.connection() as conn:
            await conn.execute(q.PG_DELETE_NAMES, {"ns": namespace, "names": [fresh.key.name]})
        return time.perf_counter() - started

    warm_up = max(5, iterations // 10)
    populate, upsert = await _interleaved(guarded, unguarded, iterations, warm_up=warm_up)
    invalidate, delete = await _interleaved(invalidation, plain_delete, iterations, warm_up=warm_up)
    medians = [percentile(xs, 50) or 0.0 for xs in (populate, upsert, invalidate, delete)]
    return {
        "iterations": iterations,
        "populate_ms_p50": _ms(medians[0]),
        "plain_upsert_ms_p50": _ms(medians[1]),
        "populate_extra_ms": _ms(medians[0] - medians[1]),
        "invalidation_ms_p50": _ms(medians[2]),
        "plain_delete_ms_p50": _ms(medians[3]),
        "invalidation_extra_ms": _ms(medians[2] - medians[3]),
    }


async def _interleaved(
    first: Callable[[], Awaitable[float]],
    second: Callable[[], Awaitable[float]],
    iterations: int,
    *,
    warm_up: int,
) -> tuple[list[float], list[float]]:
    """Time ``first`` and ``second`` alternately, swapping which goes first each round."""
    a: list[float] = []
    b: list[float] = []
    for i in range(warm_up + iterations):
        if i % 2:
            tb, ta = await second(), await first()
        else:
            ta, tb = await first(), await second()
        if i >= warm_up:
            a.append(ta)
            b.append(tb)
    return a, b


# ------------------------------------------------------------------------ driver


@dataclass(slots=True)
class _Bench:
    """One bench invocation: the scenario runs on one fleet, then the micro-benchmarks."""

    config: BenchConfig
    url: str
    run_id: str
    progress: Callable[[str], None]
    failures: list[str] = field(default_factory=list)

    async def run(self) -> dict[str, Any]:
        started = time.time()
        facts = await self._facts()
        cleaner = PostgresStore(self.url, max_size=2)
        await cleaner.open()
        try:
            async with await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, application_name=f"{_APP_NAME_PREFIX}-sampler"
            ) as sampler_conn:
                scenarios = await self._scenarios(sampler_conn, cleaner)
            self.progress("micro-benchmarks")
            try:
                micro: dict[str, Any] = await micro_benchmarks(
                    self.url, self.config.micro_iterations, self.run_id
                )
            except FleetcacheError as exc:
                self.failures.append(f"micro-benchmarks failed: {exc}")
                micro = {"error": str(exc)}
            else:
                if micro["warm_hit"]["produce_calls"]:
                    self.failures.append("micro-benchmarks: a warm hit computed")
        finally:
            await cleaner.close()
        report: dict[str, Any] = {
            "command_line": shlex.join(sys.argv),
            "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
            "duration_s": round(time.time() - started, 1),
            "run_id": self.run_id,
            "machine": facts,
            "options": asdict(self.config),
            "scenarios": scenarios,
            "micro": micro,
        }
        report["targets"] = evaluate_targets(report)
        report["failures"] = self.failures
        report["ok"] = not self.failures
        report["notes"] = NOTES
        return report

    async def _facts(self) -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            row = await (await conn.execute(_SERVER_FACTS)).fetchone()
        assert row is not None  # a SELECT without FROM returns one row
        version, max_connections, reserved = row
        need = self.config.processes * (self.config.pool_size + 1) + 4
        if need > max_connections - reserved:
            raise ConfigurationError(
                f"the bench needs up to {need} connections ({self.config.processes} processes "
                f"x (pool {self.config.pool_size} + 1 LISTEN) + 4) but the server allows "
                f"{max_connections - reserved}; lower --processes or --pool-size"
            )
        return {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "psycopg": psycopg.__version__,
            "postgres": version,
            "max_connections": max_connections,
        }

    async def _scenarios(
        self, sampler_conn: psycopg.AsyncConnection[Any], cleaner: PostgresStore
    ) -> dict[str, Any]:
        config = self.config
        runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
        fleet: Fleet[WorkerSpec, dict[str, Any]] = Fleet(config.processes, name="fleetcache-bench")
        try:
            for rep in range(config.repetitions):
                for number, scenario in enumerate(config.scenario_list()):
                    # Alternate which mode goes first, so neither always runs on a warmer
                    # server.
                    order = (False, True) if (rep + number) % 2 == 0 else (True, False)
                    for coordinate in order:
                        run = await self._one_run(
                            fleet,
                            sampler_conn,
                            cleaner,
                            scenario=scenario,
                            coordinate=coordinate,
                            rep=rep,
                        )
                        runs.setdefault((scenario.name, coordinate), []).append(run)
        finally:
            fleet.close()
        report: dict[str, Any] = {}
        for scenario in config.scenario_list():
            report[scenario.name] = {
                "params": {
                    "processes": scenario.processes,
                    "tasks": scenario.tasks,
                    "keys": scenario.keys,
                    "compute_ms": scenario.compute_ms,
                    "repetitions": config.repetitions,
                },
                **{
                    _MODES[c]: summarise(runs.get((scenario.name, c), []), coordinate=c)
                    for c in (False, True)
                },
            }
        return report

    async def _one_run(
        self,
        fleet: Fleet[WorkerSpec, dict[str, Any]],
        sampler_conn: psycopg.AsyncConnection[Any],
        cleaner: PostgresStore,
        *,
        scenario: Scenario,
        coordinate: bool,
        rep: int,
    ) -> dict[str, Any]:
        config = self.config
        mode = _MODES[coordinate]
        label = f"{scenario.name} {mode} {rep + 1}/{config.repetitions}"
        namespace = f"bench:{self.run_id}:{scenario.name}:{mode}:{rep}"
        app_name = f"{_APP_NAME_PREFIX}-{self.run_id}"
        specs = [
            WorkerSpec(
                url=self.url,
                coordinate=coordinate,
                pool_size=config.pool_size,
                tasks=scenario.tasks,
                keys=scenario.keys,
                compute_ms=scenario.compute_ms,
                namespace=namespace,
                seed=f"{config.seed}:{rep}:{worker}",
                app_name=app_name,
                timeout=config.run_timeout,
            )
            for worker in range(scenario.processes)
        ]
        sampler = _ActivitySampler(sampler_conn, app_name, config.sample_interval_ms / 1000)
        started = time.monotonic()
        try:
            results = await fleet.run(
                bench_worker,
                specs,
                run_timeout=config.run_timeout + 15,  # the workers' own timeout fires first
                on_release=sampler.begin,
            )
        except WorkerError as exc:
            self.failures.append(f"{label}: {exc}")
            self.progress(f"{label}: FAILED (workers killed): {str(exc).splitlines()[0]}")
            return {"error": str(exc)}
        finally:
            await sampler.stop()
            await cleaner.delete_namespace(namespace)
        run = analyse_run(
            results, scenario=scenario, coordinate=coordinate, samples=sampler.samples
        )
        if run["failed_requests"]:
            self.failures.append(f"{label}: {run['failed_requests']} request(s) failed")
        self.failures.extend(f"{label}: {e}" for e in sampler.errors)
        self.progress(
            f"{label}: {run['computations_total']} computations, wall {run['wall_ms']:.0f} ms"
            f" ({time.monotonic() - started:.1f} s)"
        )
        return run


NOTES = {
    "fresh_cache": "every scenario run uses its own namespace, which is empty when the run "
    "starts and deleted after it: a cold cache without touching other data in the database",
    "release": "workers open their caches and warm their pools (tasks + 1 connections), say "
    "ready, and are all released at one wall-clock instant chosen by the parent",
    "wall_ms": "from the release to the last request's return",
    "computations": "calls of the produce function (which sleeps D ms), counted in the "
    "workers; max_per_key is the most any single key was computed",
    "wake_latency": "per waiter: its get() return time minus the key's commit time. The "
    "commit time is when the winner's try_acquire_and_run returned (recorded by a thin "
    "wrapper around the coordinator), which is right after its COMMIT, the moment the NOTIFY "
    "is delivered; it is a little late, so wake latency is slightly underestimated, and can "
    "even be negative when a waiter's process is scheduled before the winner's. Clocks are "
    "time.time() on one machine. A waiter is a request during which its process's "
    "wait_for_key for that key ended (so in-process callers coalesced onto a waiting "
    "computation count too) and that did not compute the key itself. It includes the "
    "waiter's re-read of the row.",
    "waits_begun_after_commit": "waits (by wake reason, summed over runs) that began after "
    "the key's winner had returned, i.e. after its COMMIT and NOTIFY: such a waiter missed "
    "the NOTIFY and is woken only by a later holder, the crash probe (about probe_interval, "
    "1 s, later) or its timeout",
    "wake_ms_p99_notified": "wake p99 over the waiters woken by a NOTIFY only (leaving out "
    "those woken by the crash probe or a timeout after a missed NOTIFY): the latency of the "
    "NOTIFY path itself; the target is judged on wake_ms_p99, over all waiters",
    "hit_latency": "requests that started after their key's commit time (so their first read "
    "found the row) and neither computed nor waited. Uncoordinated, the commit time is the "
    "return of the first request that computed the key",
    "waiter_connections": "Three views, all must be 0 in a coordinated run. "
    "(1) waiter_connections_max, exact, client side: each worker wraps its pool's "
    "getconn/putconn to know which asyncio task holds which connection, and records, when "
    "each wait_for_key starts and ends, how many connections the waiting computation's task "
    "holds (a parked task cannot take one in between); the max over all waits. "
    "(2) blocked_on_lock_max, server side: the parent samples pg_stat_activity every "
    "sample_interval_ms over this run's pool backends (application_name via PGAPPNAME; the "
    "LISTEN connections and the sampler excluded) and counts backends waiting for a lock "
    "while holding no coordinator lock, which is what a waiter blocking in a lock acquire "
    "looks like. (Uncoordinated runs show some: concurrent INSERTs of one key wait for each "
    "other's transaction.) winners_blocked_max counts coordinator-lock holders waiting for "
    "a lock: winners queueing for Postgres's single NOTIFY queue lock at COMMIT. "
    "(3) quiet_busy_without_lock_max, the brief's method, hotkey only: non-idle backends "
    "minus those holding a coordinator lock (a granted one-bigint advisory lock, i.e. a "
    "winner, which holds exactly one connection, idle in transaction) in the samples taken "
    "from D/4 to 3D/4 after the release, when every other request is parked. "
    "busy_without_lock_max is the same count over all samples of all scenarios; it also "
    "sees statements and try-lock transactions in flight, so it is above 0 in a correct "
    "run and is information only. A waiter keeping an idle connection checked out without "
    "a transaction is caught by (1), not by (2) or (3).",
    "micro": "run in the parent process, timed with perf_counter, the two sides interleaved "
    "and warmed up; medians. warm_hit: lookup.get on a cached key vs the same PG_READ SELECT "
    "on a connection from the same pool. uncontended_miss: lookup.get of a fresh key whose "
    "produce returns at once, with and without coordination; extra_ms is the difference of "
    "the medians, paired_extra_ms_p50 the median of the paired differences.",
    "wall_tolerance": f"coordinated wall time counts as no worse than uncoordinated when "
    f"within {WALL_TOLERANCE:.0%} (run-to-run noise on a shared machine); the raw ratio is "
    f"reported",
}


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its value, threshold and whether it was met (None: not measured)."""
    targets: list[dict[str, Any]] = []
    scenarios: dict[str, Any] = report["scenarios"]

    def add(name: str, description: str, value: Any, threshold: str, met: bool | None) -> None:
        targets.append(
            {
                "name": name,
                "description": description,
                "value": value,
                "threshold": threshold,
                "met": met,
            }
        )

    for name, scenario in scenarios.items():
        coord = scenario["coordinated"]
        keys = scenario["params"]["keys"]
        each = coord["computations_each_run"]
        add(
            f"{name}: computations == K",
            "every coordinated run computed each key exactly once",
            each,
            f"== {keys} in every run",
            bool(each)
            and all(c == keys for c in each)
            and not coord["failed_runs"]
            and coord["computations_max_per_key_worst"] == 1,
        )
        views = [
            coord[m]
            for m in (
                "waiter_connections_max",
                "blocked_on_lock_max",
                "quiet_busy_without_lock_max",
            )
        ]
        worst = _max(views)
        add(
            f"{name}: waiter connections",
            "pool connections held by waiters: the worst of the client-side ledger, "
            "backends blocked on a lock and (hotkey) busy backends while all wait",
            worst,
            "== 0",
            None if coord["waiter_connections_max"] is None or worst is None else worst == 0,
        )
        unc_wall, coord_wall = scenario["uncoordinated"]["wall_ms"], coord["wall_ms"]
        ratio = round(coord_wall / unc_wall, 3) if unc_wall and coord_wall else None
        add(
            f"{name}: wall time",
            "coordinated wall time / uncoordinated (medians)",
            ratio,
            f"<= 1 (+{WALL_TOLERANCE:.0%} noise)",
            None if ratio is None else ratio <= 1 + WALL_TOLERANCE,
        )
    if "default" in scenarios:
        p99 = scenarios["default"]["coordinated"]["wake_ms_p99"]
        add(
            "default: wake p99",
            "winner's commit to each waiter's return, p99 (median over runs), ms",
            p99,
            f"< {WAKE_P99_TARGET_MS:g} ms",
            None if p99 is None else p99 < WAKE_P99_TARGET_MS,
        )
    micro = report["micro"]
    if "warm_hit" in micro:
        ratio = micro["warm_hit"]["ratio"]
        add(
            "warm hit vs raw SELECT",
            "median lookup.get on a cached key / median raw PG_READ on a pooled connection",
            ratio,
            f"<= {HIT_RATIO_TARGET:g}",
            ratio <= HIT_RATIO_TARGET,
        )
        extra = micro["uncontended_miss"]["extra_ms"]
        add(
            "uncontended miss overhead",
            "median coordinated miss - median uncoordinated miss, ms",
            extra,
            f"< {MISS_OVERHEAD_TARGET_MS:g} ms",
            extra < MISS_OVERHEAD_TARGET_MS,
        )
    return targets


# ------------------------------------------------------------------------ output


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    if isinstance(value, dict):
        return " ".join(f"{k} {v}" for k, v in value.items()) or "-"
    return str(value)


_ROWS = (
    ("computations (total)", "computations_total"),
    ("computations max/key", "computations_max_per_key_worst"),
    ("wall ms", "wall_ms"),
    ("request p50 ms", "request_ms_p50"),
    ("request p99 ms", "request_ms_p99"),
    ("wake p50 ms", "wake_ms_p50"),
    ("wake p99 ms", "wake_ms_p99"),
    ("wake max ms", "wake_ms_max"),
    ("wake p99 ms, NOTIFY only", "wake_ms_p99_notified"),
    ("wake reasons (all runs)", "wake_reasons"),
    ("waits begun after commit", "waits_begun_after_commit"),
    ("hit p50 ms", "hit_ms_p50"),
    ("waiter conns (ledger max)", "waiter_connections_max"),
    ("blocked on lock (max)", "blocked_on_lock_max"),
    ("busy w/o lock, all parked", "quiet_busy_without_lock_max"),
    ("busy w/o lock (info)", "busy_without_lock_max"),
    ("lock holders (max, info)", "lock_holders_max"),
    ("winners blocked (max, info)", "winners_blocked_max"),
    ("failed requests", "failed_requests"),
    ("failed runs", "failed_runs"),
)


def render(report: dict[str, Any], *, stderr: bool) -> None:
    """Print the scenario, micro-benchmark and target tables with rich."""
    from rich.console import Console  # noqa: PLC0415 - workers import this module; keep them light
    from rich.table import Table  # noqa: PLC0415

    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.width = 150  # a file or a pipe: don't wrap the wide table at 80 columns
    options = report["options"]
    table = Table(
        title=f"fleetcache bench: medians of {options['repetitions']} run(s) per cell "
        f"(U = uncoordinated, C = coordinated)",
        title_justify="left",
    )
    table.add_column("metric", no_wrap=True)
    scenarios: dict[str, Any] = report["scenarios"]
    for name, scenario in scenarios.items():
        p = scenario["params"]
        head = f"{name}\nP={p['processes']} C={p['tasks']} K={p['keys']} D={p['compute_ms']:g}"
        table.add_column(f"{head}\nU", justify="right")
        table.add_column("\nC", justify="right")
    for label, metric in _ROWS:
        cells = []
        for scenario in scenarios.values():
            cells += [_fmt(scenario[mode].get(metric)) for mode in _MODES]
        table.add_row(label, *cells)
    console.print(table)

    micro = report["micro"]
    if "warm_hit" in micro:
        hit, miss = micro["warm_hit"], micro["uncontended_miss"]
        mt = Table(title="micro-benchmarks (medians, ms)", title_justify="left")
        for column in ("measure", "fleetcache", "baseline", "result"):
            mt.add_column(column, justify="left" if column == "measure" else "right")
        closure = micro["closure"]
        rows = [
            (
                f"warm hit vs raw SELECT ({hit['iterations']} each)",
                hit["fleetcache_ms_p50"],
                hit["raw_select_ms_p50"],
                f"x{hit['ratio']:.2f}",
            ),
            (
                f"uncontended miss, coordinated vs not ({miss['iterations']} each)",
                miss["coordinated_ms_p50"],
                miss["uncoordinated_ms_p50"],
                f"+{miss['extra_ms']:.3f} ms",
            ),
            (
                f"populate: stamp + guarded write vs plain upsert ({closure['iterations']} each)",
                closure["populate_ms_p50"],
                closure["plain_upsert_ms_p50"],
                f"+{closure['populate_extra_ms']:.3f} ms",
            ),
            (
                f"invalidation: marks + delete vs plain DELETE ({closure['iterations']} each)",
                closure["invalidation_ms_p50"],
                closure["plain_delete_ms_p50"],
                f"+{closure['invalidation_extra_ms']:.3f} ms",
            ),
        ]
        for label, ours, baseline, result in rows:
            mt.add_row(label, _fmt(ours), _fmt(baseline), result)
        console.print(mt)

    tt = Table(title="targets", title_justify="left")
    for column in ("target", "value", "threshold", "met"):
        tt.add_column(column)
    for target in report["targets"]:
        met = target["met"]
        mark = "[green]met[/]" if met else ("[red]MISSED[/]" if met is False else "-")
        tt.add_row(target["name"], _fmt(target["value"]), target["threshold"], mark)
    console.print(tt)
    for failure in report["failures"]:
        console.print(f"[red]failure:[/] {failure}")


# ------------------------------------------------------------------------ entry


def run(args: argparse.Namespace) -> int:
    """Run the bench described by ``args``; 0 unless something failed (missed performance
    targets are reported, not failures)."""

    def progress(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    try:
        report = _run_report(args, progress)
    except (FleetcacheError, psycopg.Error) as exc:
        # A bench that could not run at all (bad options, no database): one clear line.
        progress(f"error: {exc}")
        return 1
    to_stdout = args.json in (None, "-")
    render(report, stderr=to_stdout)  # keep stdout pure JSON when the JSON goes there
    text = json.dumps(report, indent=2, default=str)
    if to_stdout:
        sys.stdout.write(text + "\n")
    else:
        with open(args.json, "w", encoding="utf-8") as out:
            out.write(text + "\n")
        progress(f"report written to {args.json}")
    return 0 if report["ok"] else 1


def _run_report(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    config = resolve_config(args)
    if args.database_url is None:
        progress("starting an embedded PostgreSQL")
    with command_database(args.database_url, _EMBEDDED_DATABASE) as (url, embedded):
        bench = _Bench(config, url, uuid.uuid4().hex[:8], progress)
        report = asyncio.run(bench.run())
    report["machine"]["database"] = "embedded" if embedded else "external"
    if not embedded:
        report["machine"]["database_url"] = redacted(url)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bench`` on its own (``python -m fleetcache.cli.bench``)."""
    parser = argparse.ArgumentParser(prog="fleetcache bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
