"""One fleet scenario run: the worker job (either design) and the run's metrics.

Every worker opens its design's cache, warms it up, waits for the common release, then
runs C tasks that each request every one of the K keys once, in a seeded random order. A
miss computes for D ms (``asyncio.sleep``). Both designs get the same processes, keys,
orders and timing; only the cache differs.

The warm-up measures a fleet in its steady state, not its first second. Each pooled
connection is made and used; then the C tasks compute :data:`OWN_WARM_PER_CONNECTION` keys
per pooled connection that only this worker asks for (every miss statement, the write
included, then runs about that many times on each connection: the pool hands its
connections out in turn), and request :data:`WARM_KEYS` keys shared by the workers twice
(so some wait for others), all in the run's ``:warm`` namespace. What a server connection
does its first few times (catalog caches, PL/pgSQL compilation, the custom plans the server
makes for a statement's first five runs, psycopg preparing a statement at its fifth) is
then outside the measured window, for both designs alike; nothing of the warm-up is
recorded. Measured on one connection: a fleetcache write costs the server about 2.2 ms the
first time, 0.45 ms the next five, 0.24 ms from then on.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fleetcache
from fleetcache.errors import FleetcacheError
from fleetcache_cli.bench.minimal import MinimalCache
from fleetcache_cli.bench.probes import (
    ConnectionLedger,
    MachineCpu,
    RecordingCoordinator,
    StatementCounter,
    Wait,
    backend_cpu,
    backend_cpu_between,
)
from fleetcache_cli.shared import WorkerContext, percentile

#: Keys shared by the workers that each worker's tasks request (twice) in the warm-up.
WARM_KEYS = 8
#: Keys per pooled connection that each worker computes alone in the warm-up: past the
#: server's five custom plans and psycopg's prepare threshold of five.
OWN_WARM_PER_CONNECTION = 8
#: How long a warm-up computation takes (ms).
WARM_COMPUTE_MS = 1.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker runs in one scenario run (pickled to the worker)."""

    design: str  # "fleetcache" or "minimal"
    url: str
    pool_size: int
    tasks: int
    keys: int
    compute_ms: float
    namespace: str
    seed: str
    timeout: float


async def _warm_pool(pool: Any, connections: int) -> None:
    """Check out ``connections`` pooled connections at once, so every one is made and
    used before the release (both designs alike)."""

    async def hold() -> None:
        async with pool.connection(timeout=30.0) as conn:
            await conn.execute("SELECT 1")
            await asyncio.sleep(0.05)

    await asyncio.gather(*(hold() for _ in range(connections)))


async def fleet_worker(ctx: WorkerContext, spec: WorkerSpec) -> dict[str, Any]:
    """One worker's part of a run (a :class:`~fleetcache_cli.shared.Fleet` job). Returns
    raw records for the parent: requests ``(key, start, end, ok)``, computations ``(key,
    start, end)``, waits ``(key, start, end, reason, connections held)``, won locks'
    commits ``(key, time)``, process CPU seconds, statements and error texts."""
    names = [f"key-{i}" for i in range(spec.keys)]
    index = {name: i for i, name in enumerate(names)}
    spans: list[tuple[int, float, float]] = []
    waits: list[Wait] = []
    commits: list[tuple[int, float]] = []
    counter = StatementCounter(labels=False)
    counter.install()
    warm_namespace = f"{spec.namespace}:warm"
    warm_names = [f"warm-{i}" for i in range(WARM_KEYS)]
    own_names = [f"own-{ctx.index}-{i}" for i in range(OWN_WARM_PER_CONNECTION * spec.pool_size)]

    async def warm_compute(name: str) -> dict[str, Any]:
        await asyncio.sleep(WARM_COMPUTE_MS / 1000)
        return {"key": name, "worker": ctx.index}

    async def compute(name: str) -> dict[str, Any]:
        started = time.time()
        await asyncio.sleep(spec.compute_ms / 1000)
        spans.append((index[name], started, time.time()))
        return {"key": name, "worker": ctx.index}

    if spec.design == "fleetcache":
        cache = await fleetcache.open(spec.url, pool_size=spec.pool_size)
        if cache.lookup.coordinator is None:
            await cache.close()
            raise FleetcacheError(f"the bench needs a Postgres URL, got {spec.url!r}")
        pool = cache.store.pool  # type: ignore[attr-defined]
        ledger = ConnectionLedger(pool)
        keys = [fleetcache.Key(spec.namespace, name) for name in names]
        recorder = RecordingCoordinator(
            cache.lookup.coordinator, {k.coalesce_key: i for i, k in enumerate(keys)}, ledger
        )

        async def produce(key: fleetcache.Key) -> fleetcache.Produced[Any]:
            return fleetcache.Produced(await compute(key.name))

        async def get(i: int) -> Any:
            entry = await cache.get(keys[i], produce)
            return None if entry is None else entry.value

        async def produce_warm(key: fleetcache.Key) -> fleetcache.Produced[Any]:
            return fleetcache.Produced(await warm_compute(key.name))

        async def warm_get(name: str) -> Any:
            return await cache.get_value(fleetcache.Key(warm_namespace, name), produce_warm)

        async def close() -> None:
            await cache.close()

        def direct_pid() -> int | None:
            return None if cache.hub is None else cache.hub.backend_pid

    else:
        ledger_box: list[ConnectionLedger] = []

        def on_commit(key: tuple[str, str]) -> None:
            if key[0] == spec.namespace:  # not the warm-up's
                commits.append((index[key[1]], time.time()))

        def on_wait(key: tuple[str, str], started: float, ended: float, reason: str) -> None:
            if key[0] == spec.namespace:
                held = ledger_box[0].held_by(asyncio.current_task())
                waits.append((index[key[1]], started, ended, reason, held))

        minimal = MinimalCache(
            spec.url, pool_size=spec.pool_size, on_commit=on_commit, on_wait=on_wait
        )
        await minimal.open()
        pool = minimal.pool
        ledger = ConnectionLedger(pool)
        ledger_box.append(ledger)

        async def produce_minimal(key: tuple[str, str]) -> Any:
            return await compute(key[1])

        async def get(i: int) -> Any:
            return await minimal.get((spec.namespace, names[i]), produce_minimal)

        async def produce_minimal_warm(key: tuple[str, str]) -> Any:
            return await warm_compute(key[1])

        async def warm_get(name: str) -> Any:
            return await minimal.get((warm_namespace, name), produce_minimal_warm)

        close = minimal.close

        def direct_pid() -> int | None:
            return minimal.listen_pid

    records: list[tuple[int, float, float, bool]] = []
    errors: list[str] = []

    async def requester(task: int) -> None:
        order = list(range(spec.keys))
        random.Random(f"{spec.seed}:{task}").shuffle(order)
        for i in order:
            started = time.time()
            try:
                value = await get(i)
                ok = isinstance(value, dict) and value.get("key") == names[i]
                if not ok:
                    errors.append(f"{names[i]}: unexpected value {value!r}")
            except (FleetcacheError, TimeoutError) as exc:
                ok = False
                errors.append(f"{names[i]}: {type(exc).__name__}: {exc}")
            records.append((i, started, time.time(), ok))

    async def warm_up(task: int) -> None:
        for name in own_names[task :: spec.tasks]:
            await warm_get(name)
        order = warm_names * 2
        random.Random(f"{spec.seed}:warm:{task}").shuffle(order)
        for name in order:
            await warm_get(name)

    locks_before: dict[str, int] = {}
    try:
        await _warm_pool(pool, min(spec.pool_size, spec.tasks + 1))
        await asyncio.gather(*(warm_up(t) for t in range(spec.tasks)))
        if spec.design == "fleetcache":
            # From now on the bench watches the miss path from inside: the populator takes
            # locks through the recorder.
            locks_before = recorder.stats()
            cache.lookup._populator.coordinator = recorder
        release_at = await ctx.ready()
        cpu = time.process_time()
        direct = {pid} if (pid := direct_pid()) is not None else set()
        server_before = (backend_cpu(ledger.backends), backend_cpu(direct))
        counter.enabled = True
        async with asyncio.timeout(spec.timeout):
            await asyncio.gather(*(requester(t) for t in range(spec.tasks)))
        counter.enabled = False
        cpu = time.process_time() - cpu
        server_pooled = backend_cpu_between(server_before[0], backend_cpu(ledger.backends))
        server_direct = backend_cpu_between(server_before[1], backend_cpu(direct))
    finally:
        await close()
        counter.uninstall()
    fills = notifies = None
    if spec.design == "fleetcache":
        waits, commits = recorder.waits, recorder.commits
        locks = recorder.stats()
        fills = locks["lock_won"] - locks_before.get("lock_won", 0)
        notifies = locks["notifies"] - locks_before.get("notifies", 0)
    return {
        "worker": ctx.index,
        "pid": os.getpid(),
        "release_at": release_at,
        "cpu_s": cpu,
        "server_pooled_cpu_s": server_pooled,
        "server_direct_cpu_s": server_direct,
        "statements": counter.total,
        "records": records,
        "spans": spans,
        "waits": waits,
        "commits": commits,
        "fills": fills,
        "notifies": notifies,
        "errors": errors,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _sum_known(values: Iterable[float | None]) -> float | None:
    """The sum, or None if any value is unknown."""
    known = list(values)
    return None if None in known else sum(x for x in known if x is not None)


def analyse_run(
    results: Sequence[dict[str, Any]], *, keys: int, machine: MachineCpu | None = None
) -> dict[str, Any]:
    """One run's metrics from the workers' raw records (and the machine's CPU over the
    run, from the release to the last request's return, when sampled)."""
    release_at = min(r["release_at"] for r in results)
    per_key: Counter[int] = Counter()
    commit: dict[int, float] = {}  # the key's first winner's commit (NOTIFY) time
    computed_end: dict[int, float] = {}  # the end of the key's first computation
    for result in results:
        for index, _, ended in result["spans"]:
            per_key[index] += 1
            computed_end[index] = min(computed_end.get(index, ended), ended)
        for index, committed in result["commits"]:
            commit[index] = min(commit.get(index, committed), committed)
    latencies: list[float] = []
    wakes: list[float] = []
    wakes_from_compute: list[float] = []
    hits: list[float] = []
    failed = 0
    reasons: Counter[str] = Counter()
    held_by_waiters = 0
    for result in results:
        spans, waits = result["spans"], result["waits"]
        for _, _, _, reason, held in waits:
            reasons[reason] += 1
            held_by_waiters = max(held_by_waiters, held)
        for index, started, ended, ok in result["records"]:
            latencies.append(ended - started)
            failed += not ok
            computed = any(k == index and started <= s and e <= ended for k, s, e in spans)
            waited = any(k == index and started <= we <= ended for k, _, we, _, _ in waits)
            if waited and not computed and index in commit:
                wakes.append(ended - commit[index])
                wakes_from_compute.append(ended - computed_end[index])
            elif not computed and not waited and index in commit and started >= commit[index]:
                hits.append(ended - started)
    requests = len(latencies)
    cpu = sum(r["cpu_s"] for r in results)
    # The server processes of the workers' connections, each over its worker's window (None
    # unless the server runs on this machine).
    pooled_s = _sum_known(r.get("server_pooled_cpu_s") for r in results)
    direct_s = _sum_known(r.get("server_direct_cpu_s") for r in results)
    # NOTIFYs the winners sent (in a write or at a release) per lock won: fleetcache only.
    fills = sum(r.get("fills") or 0 for r in results)
    notifies = sum(r.get("notifies") or 0 for r in results)
    ends = [end for r in results for _, _, end, _ in r["records"]]
    return {
        "computations_total": sum(per_key.values()),
        "computations_max_per_key": max(per_key.values(), default=0),
        "keys_computed": len(per_key),
        "keys": keys,
        "requests": requests,
        "failed_requests": failed,
        "wall_ms": _ms(max(ends) - release_at) if ends else None,
        "cpu_s": round(cpu, 4),
        "cpu_per_request_ms": _ms(cpu / requests) if requests else None,
        "machine_cpu_ms": _ms(machine.busy_between(release_at, max(ends)))
        if machine is not None and ends
        else None,
        "server_cpu_ms": None if pooled_s is None or direct_s is None else _ms(pooled_s + direct_s),
        "server_direct_cpu_ms": _ms(direct_s),
        "statements_per_request": round(sum(r["statements"] for r in results) / requests, 3)
        if requests
        else None,
        "request_ms_p50": _ms(percentile(latencies, 50)),
        "request_ms_p99": _ms(percentile(latencies, 99)),
        "notifies_per_fill": round(notifies / fills, 3) if fills else None,
        "waiters": len(wakes),
        "wake_ms_p50": _ms(percentile(wakes, 50)),
        "wake_ms_p99": _ms(percentile(wakes, 99)),
        "wake_from_compute_ms_p50": _ms(percentile(wakes_from_compute, 50)),
        "wake_from_compute_ms_p99": _ms(percentile(wakes_from_compute, 99)),
        "wake_reasons": dict(sorted(reasons.items())),
        "hits": len(hits),
        "hit_ms_p50": _ms(percentile(hits, 50)),
        "waiter_connections_max": held_by_waiters,
        "errors": [e for r in results for e in r["errors"]][:20],
    }


_MEDIAN_METRICS = (
    "computations_total",
    "wall_ms",
    "cpu_per_request_ms",
    "machine_cpu_ms",
    "server_cpu_ms",
    "server_direct_cpu_ms",
    "statements_per_request",
    "notifies_per_fill",
    "request_ms_p50",
    "request_ms_p99",
    "wake_ms_p50",
    "wake_ms_p99",
    "wake_from_compute_ms_p50",
    "wake_from_compute_ms_p99",
    "hit_ms_p50",
)


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return percentile(present, 50)


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions of one scenario and design, and the worst case of the
    correctness metrics (they must hold in every run, not in the median one)."""
    good = [r for r in runs if "error" not in r]
    summary: dict[str, Any] = {m: _median(r[m] for r in good) for m in _MEDIAN_METRICS}
    summary["computations_each_run"] = [r["computations_total"] for r in good]
    summary["computations_max_per_key_worst"] = max(
        (r["computations_max_per_key"] for r in good), default=None
    )
    summary["waiter_connections_max"] = max(
        (r["waiter_connections_max"] for r in good), default=None
    )
    reasons: Counter[str] = Counter()
    for run in good:
        reasons.update(run["wake_reasons"])
    summary["wake_reasons"] = dict(sorted(reasons.items()))
    summary["failed_requests"] = sum(r["failed_requests"] for r in good)
    summary["failed_runs"] = len(runs) - len(good)
    summary["runs"] = list(runs)
    return summary
