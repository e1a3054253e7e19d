"""The ``fleet`` scenario: a large fleet through PgBouncer on a stock server.

P processes x C tasks over K keys (64 x 2 x 10,000 by default, computations of a few ms)
on a dedicated embedded PostgreSQL with ``max_connections = 100``, behind a PgBouncer in
transaction mode: each process's pool goes through the pooler, and its one direct
connection (fleetcache's session; the minimal design's LISTEN) to the server. Two phases,
each a fleet job (the workers open their cache again for the second):

1. **cold**: every key is asked for by ``overlap`` tasks of different processes, each task
   walking its keys in a seeded random order: exactly K computations must happen;
2. **warm**: every task reads random keys for ``warm_seconds``: hits/s, hit p50/p99.

Meanwhile the parent samples ``pg_stat_activity`` every 50 ms (the peak of server
backends: the processes' direct connections, the pooler's server connections, the
parent's own two) and LISTENs on the design's populated channel, so notifies per fill is
what the server delivered: NOTIFYs received / computations.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

import fleetcache
from fleetcache.coordination.postgres import POPULATED_CHANNEL
from fleetcache.errors import FleetcacheError
from fleetcache.notifications.hub import DEFAULT_APPLICATION_NAME
from fleetcache_cli.bench import minimal
from fleetcache_cli.bench.config import BenchConfig
from fleetcache_cli.bench.minimal import LISTEN_APPLICATION_NAME, MinimalCache
from fleetcache_cli.shared import Fleet, WorkerContext, WorkerError, command_database, percentile

DATABASE = "fleetcache_fleet"
#: The parent's own connections, told apart by application_name.
SAMPLER_NAME = "bench-fleet-sampler"
LISTENER_NAME = "bench-fleet-listener"
#: Direct backends of the workers: fleetcache's sessions, the minimal design's LISTENs.
DIRECT_NAMES = (DEFAULT_APPLICATION_NAME, LISTEN_APPLICATION_NAME)
CHANNELS = {"fleetcache": POPULATED_CHANNEL, "minimal": minimal.CHANNEL}
_BACKENDS = (
    "SELECT application_name, count(*) FROM pg_stat_activity"
    " WHERE backend_type = 'client backend' GROUP BY application_name"
)
_DELETE = {
    "fleetcache": "DELETE FROM fleetcache_entries WHERE namespace = %(ns)s",
    "minimal": "DELETE FROM bench_minimal_entries WHERE namespace = %(ns)s",
}


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """What one worker runs in one phase (pickled to the worker)."""

    design: str  # "fleetcache" or "minimal"
    phase: str  # "cold" or "warm"
    pooled_url: str
    direct_url: str
    pool_size: int
    tasks: int
    keys: int
    compute_ms: float
    overlap: int
    warm_seconds: float
    namespace: str
    seed: str


def task_keys(task: int, tasks_in_all: int, keys: int, overlap: int) -> list[int]:
    """The keys task ``task`` (of ``tasks_in_all``, numbered across the fleet) asks for in
    the cold phase: those whose residue modulo ``tasks_in_all`` is one of the task's
    ``overlap`` residues, spread evenly, so every key is asked for by ``overlap`` tasks
    that are ``tasks_in_all / overlap`` apart (of different processes when that is at
    least the tasks per process).

    >>> sorted(task_keys(0, 4, 8, 2))
    [0, 2, 4, 6]
    """
    stride = max(1, tasks_in_all // overlap)
    residues = {(task + j * stride) % tasks_in_all for j in range(overlap)}
    return [key for key in range(keys) if key % tasks_in_all in residues]


async def fleet_phase_worker(ctx: WorkerContext, spec: FleetSpec) -> dict[str, Any]:
    """One worker's part of one phase (a :class:`~fleetcache_cli.shared.Fleet` job):
    opens its design through the pooler (its direct connection to the server), warms its
    pool, waits for the release, runs the phase, and returns raw figures."""
    names = [f"key-{i}" for i in range(spec.keys)]
    computed = 0

    async def compute(name: str) -> dict[str, Any]:
        nonlocal computed
        computed += 1
        await asyncio.sleep(spec.compute_ms / 1000)
        return {"key": name, "worker": ctx.index}

    get: Callable[[int], Any]
    close: Callable[[], Awaitable[None]]
    if spec.design == "fleetcache":
        cache = await fleetcache.open(
            spec.pooled_url, session_url=spec.direct_url, pool_size=spec.pool_size
        )
        pool = cache.store.pool  # type: ignore[attr-defined]
        keys = [fleetcache.Key(spec.namespace, name) for name in names]

        async def produce(key: fleetcache.Key) -> fleetcache.Produced[Any]:
            return fleetcache.Produced(await compute(key.name))

        async def get_fleetcache(i: int) -> Any:
            entry = await cache.get(keys[i], produce)
            return None if entry is None else entry.value

        async def close_fleetcache() -> None:
            await cache.close()

        get, close = get_fleetcache, close_fleetcache
    else:
        contender = MinimalCache(
            spec.pooled_url,
            pool_size=spec.pool_size,
            listen_url=spec.direct_url,
            prepared_statements=False,
        )
        await contender.open()
        pool = contender.pool

        async def produce_minimal(key: tuple[str, str]) -> Any:
            return await compute(key[1])

        async def get_minimal(i: int) -> Any:
            return await contender.get((spec.namespace, names[i]), produce_minimal)

        get, close = get_minimal, contender.close
    latencies: list[float] = []
    errors: list[str] = []
    ends: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        try:
            value = await get(i)
            if not (isinstance(value, dict) and value.get("key") == names[i]):
                errors.append(f"{names[i]}: unexpected value {value!r:.100}")
        except (FleetcacheError, psycopg.Error, TimeoutError) as exc:
            errors.append(f"{names[i]}: {type(exc).__name__}: {exc}")
        latencies.append(time.perf_counter() - started)

    async def cold(task: int) -> None:
        order = task_keys(ctx.index * spec.tasks + task, ctx.size * spec.tasks, spec.keys,
                          spec.overlap)  # fmt: skip
        random.Random(f"{spec.seed}:{task}").shuffle(order)
        for i in order:
            await one(i)
        ends.append(time.time())

    async def warm(task: int, until: float) -> None:
        pick = random.Random(f"{spec.seed}:warm:{task}")
        while time.time() < until:
            await one(pick.randrange(spec.keys))
        ends.append(time.time())

    try:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(close)
            await _warm_pool(pool, spec.pool_size)
            release_at = await ctx.ready()
            cpu = time.process_time()
            if spec.phase == "cold":
                await asyncio.gather(*(cold(t) for t in range(spec.tasks)))
            else:
                until = release_at + spec.warm_seconds
                await asyncio.gather(*(warm(t, until) for t in range(spec.tasks)))
            cpu = time.process_time() - cpu
    except (FleetcacheError, psycopg.Error) as exc:
        raise FleetcacheError(f"worker {ctx.index} ({spec.design}, {spec.phase}): {exc}") from exc
    return {
        "worker": ctx.index,
        "pid": os.getpid(),
        "release_at": release_at,
        "end": max(ends, default=release_at),
        "cpu_s": cpu,
        "computed": computed,
        "latencies": latencies,
        "errors": errors[:20],
        "error_count": len(errors),
    }


async def _warm_pool(pool: Any, connections: int) -> None:
    async def hold() -> None:
        async with pool.connection(timeout=60.0) as conn:
            await conn.execute("SELECT 1", prepare=False)
            await asyncio.sleep(0.05)

    await asyncio.gather(*(hold() for _ in range(connections)))


class _Watch:
    """The parent's two connections during a phase: one samples the server's backends
    every 50 ms, one LISTENs on the design's populated channel and counts what comes."""

    def __init__(self, direct_url: str, channel: str) -> None:
        self._url = direct_url
        self._channel = channel
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        # Written by the sampling and listening tasks, read after stop().
        self.peak: dict[str, int] = {"total": 0, "direct": 0, "pooled": 0, "own": 0}
        self.notifies = 0
        self.samples = 0

    async def __aenter__(self) -> _Watch:
        self._tasks = [asyncio.create_task(self._sample()), asyncio.create_task(self._listen())]
        await asyncio.wait_for(self._ready.wait(), 30)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _sample(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, application_name=SAMPLER_NAME
        ) as conn:
            while not self._stop.is_set():
                rows = await (await conn.execute(_BACKENDS)).fetchall()
                counts = {str(name): int(count) for name, count in rows}
                own = sum(counts.get(name, 0) for name in (SAMPLER_NAME, LISTENER_NAME))
                direct = sum(counts.get(name, 0) for name in DIRECT_NAMES)
                total = sum(counts.values())
                now = {"total": total, "direct": direct, "pooled": total - direct - own, "own": own}
                self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
                self.samples += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.05)

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, application_name=LISTENER_NAME
        ) as conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self._ready.set()
            while not self._stop.is_set():
                async for _ in conn.notifies(timeout=0.1):
                    self.notifies += 1


@contextlib.contextmanager
def dedicated_server(config: BenchConfig) -> Iterator[tuple[str, str]]:
    """A fresh embedded PostgreSQL with ``max_connections`` as configured (100: a stock
    server) and a PgBouncer in transaction mode in front of it; yields (direct URL, URL
    through the pooler) of the bench's database, and stops both."""
    from fleetcache.embedded import start_pgbouncer  # noqa: PLC0415 - optional extra

    with command_database(None, DATABASE, max_connections=config.fleet_max_connections) as (
        direct,
        _,
    ):
        bouncer = start_pgbouncer(
            direct, default_pool_size=config.fleet_pooler_pool, max_client_conn=4000
        )
        try:
            yield direct, bouncer.conninfo_for(DATABASE)
        finally:
            bouncer.stop()


async def run_fleet(
    config: BenchConfig,
    direct_url: str,
    pooled_url: str,
    run_id: str,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Both designs, ``config.fleet_repetitions`` times each (alternating which goes first), on
    the given server and pooler; the report's ``fleet`` section. Failures are reported in
    it (``failures``), not raised."""
    from fleetcache.stores.migrations import migrate  # noqa: PLC0415 - see the runner

    await migrate(direct_url)
    async with await psycopg.AsyncConnection.connect(direct_url, autocommit=True) as conn:
        await conn.execute(minimal.CREATE_TABLE)
        row = await (await conn.execute("SHOW max_connections")).fetchone()
    max_connections = int(row[0]) if row else None
    runs: dict[str, list[dict[str, Any]]] = {"minimal": [], "fleetcache": []}
    failures: list[str] = []
    fleet: Fleet[FleetSpec, dict[str, Any]] = Fleet(config.fleet_processes, name="fleetcache-fleet")
    try:
        for rep in range(config.fleet_repetitions):
            order = ("minimal", "fleetcache") if rep % 2 == 0 else ("fleetcache", "minimal")
            for design in order:
                label = f"fleet {design} {rep + 1}/{config.fleet_repetitions}"
                try:
                    run = await _one_run(
                        fleet,
                        config,
                        design=design,
                        rep=rep,
                        direct_url=direct_url,
                        pooled_url=pooled_url,
                        run_id=run_id,
                    )
                except WorkerError as exc:
                    failures.append(f"{label}: {exc}")
                    progress(f"{label}: FAILED: {str(exc).splitlines()[0]}")
                    continue
                runs[design].append(run)
                if run["errors"]:
                    failures.append(f"{label}: {run['errors']} request(s) failed")
                progress(
                    f"{label}: {run['computations']} computations, {run['errors']} errors, "
                    f"cold {run['cold_wall_s']:.1f} s, {run['hits_per_s']:.0f} hits/s, peak "
                    f"{run['peak_backends']['total']} backends"
                )
    finally:
        fleet.close()
    return {
        "params": {
            "processes": config.fleet_processes,
            "tasks": config.fleet_tasks,
            "keys": config.fleet_keys,
            "compute_ms": config.fleet_compute_ms,
            "overlap": config.fleet_overlap,
            "warm_seconds": config.fleet_warm_seconds,
            "pool_size": config.fleet_pool_size,
            "pooler_pool": config.fleet_pooler_pool,
            "max_connections": max_connections,
            "repetitions": config.fleet_repetitions,
            "budget": f"{config.fleet_pool_size} pooled (through PgBouncer) + 1 direct per "
            "process, both designs",
        },
        **{design: _summarise(design_runs) for design, design_runs in runs.items()},
        "failures": failures,
    }


async def _one_run(
    fleet: Fleet[FleetSpec, dict[str, Any]],
    config: BenchConfig,
    *,
    design: str,
    rep: int,
    direct_url: str,
    pooled_url: str,
    run_id: str,
) -> dict[str, Any]:
    namespace = f"bench:{run_id}:fleet:{design}:{rep}"

    def specs(phase: str) -> list[FleetSpec]:
        return [
            FleetSpec(
                design=design,
                phase=phase,
                pooled_url=pooled_url,
                direct_url=direct_url,
                pool_size=config.fleet_pool_size,
                tasks=config.fleet_tasks,
                keys=config.fleet_keys,
                compute_ms=config.fleet_compute_ms,
                overlap=config.fleet_overlap,
                warm_seconds=config.fleet_warm_seconds,
                namespace=namespace,
                seed=f"{config.seed}:{rep}:{worker}",
            )
            for worker in range(config.fleet_processes)
        ]

    async def phase(name: str) -> tuple[list[dict[str, Any]], _Watch]:
        async with _Watch(direct_url, CHANNELS[design]) as watch:
            results = await fleet.run(
                fleet_phase_worker,
                specs(name),
                ready_timeout=300,
                run_timeout=config.run_timeout * 3,
                release_delay=1.0,
            )
            # NOTIFYs of the last fills are delivered as they commit, before the workers
            # answer: nothing more is owed; a moment for the listener to read them.
            await asyncio.sleep(0.2)
        return results, watch

    try:
        cold, cold_watch = await phase("cold")
        warm, warm_watch = await phase("warm")
    finally:
        async with await psycopg.AsyncConnection.connect(direct_url, autocommit=True) as conn:
            await conn.execute(_DELETE[design], {"ns": namespace})
    computations = sum(r["computed"] for r in cold)
    warm_computations = sum(r["computed"] for r in warm)
    release = min(r["release_at"] for r in cold)
    hits = [lat for r in warm for lat in r["latencies"]]
    warm_wall = max(r["end"] for r in warm) - min(r["release_at"] for r in warm)
    peak = {k: max(cold_watch.peak[k], warm_watch.peak[k]) for k in cold_watch.peak}
    return {
        "computations": computations,
        "warm_computations": warm_computations,
        "errors": sum(r["error_count"] for r in cold) + sum(r["error_count"] for r in warm),
        "error_samples": [e for r in (*cold, *warm) for e in r["errors"]][:10],
        "cold_requests": sum(len(r["latencies"]) for r in cold),
        "cold_wall_s": round(max(r["end"] for r in cold) - release, 3),
        "cold_request_ms_p50": _ms(percentile([x for r in cold for x in r["latencies"]], 50)),
        "cold_request_ms_p99": _ms(percentile([x for r in cold for x in r["latencies"]], 99)),
        "notifies": cold_watch.notifies,
        "notifies_per_fill": round(cold_watch.notifies / computations, 3) if computations else None,
        "hits": len(hits),
        "hits_per_s": round(len(hits) / warm_wall, 1) if warm_wall > 0 else 0.0,
        "hit_ms_p50": _ms(percentile(hits, 50)),
        "hit_ms_p99": _ms(percentile(hits, 99)),
        "warm_cpu_per_hit_ms": _ms(sum(r["cpu_s"] for r in warm) / len(hits)) if hits else None,
        "peak_backends": peak,
        "samples": cold_watch.samples + warm_watch.samples,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


_MEDIANS = (
    "cold_wall_s",
    "cold_request_ms_p50",
    "cold_request_ms_p99",
    "notifies_per_fill",
    "hits_per_s",
    "hit_ms_p50",
    "hit_ms_p99",
    "warm_cpu_per_hit_ms",
)


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the timings; the correctness figures of every run (they must hold in
    each, not in the median one); peaks as the worst run's."""
    summary: dict[str, Any] = {
        metric: percentile([r[metric] for r in runs if r[metric] is not None], 50)
        for metric in _MEDIANS
    }
    summary["computations_each_run"] = [r["computations"] for r in runs]
    summary["warm_computations_total"] = sum(r["warm_computations"] for r in runs)
    summary["errors_total"] = sum(r["errors"] for r in runs)
    summary["peak_backends"] = {
        k: max((r["peak_backends"][k] for r in runs), default=None)
        for k in ("total", "direct", "pooled", "own")
    }
    summary["runs"] = runs
    return summary
