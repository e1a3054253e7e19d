"""One bench invocation: the fleet scenarios, the near scenario, the xmin probe and the
micro-benchmarks, in that order, into one JSON report."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from fleetcache.errors import FleetcacheError
from fleetcache.stores.migrations import migrate
from fleetcache_cli.bench import expiry, minimal, near, pooled_fleet, sync
from fleetcache_cli.bench.bounded import measure_bounded
from fleetcache_cli.bench.config import DESIGNS, BenchConfig, Scenario
from fleetcache_cli.bench.fleet_run import WorkerSpec, analyse_run, fleet_worker, summarise
from fleetcache_cli.bench.local import local_benchmarks
from fleetcache_cli.bench.micro import fill_entries, micro_benchmarks
from fleetcache_cli.bench.probes import MachineCpu
from fleetcache_cli.bench.targets import evaluate_targets
from fleetcache_cli.bench.xmin import probe_xmin
from fleetcache_cli.shared import Fleet, WorkerError, percentile

_FACTS = (
    "SELECT current_setting('server_version'), current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int"
)
_DELETE = {
    "fleetcache": "DELETE FROM fleetcache_entries WHERE namespace = %(ns)s",
    "minimal": "DELETE FROM bench_minimal_entries WHERE namespace = %(ns)s",
    "versions": "DELETE FROM bench_near_versions WHERE namespace = %(ns)s",
    "django": "DELETE FROM bench_django_cache WHERE starts_with(cache_key, %(ns)s || ':')",
}

NOTES = {
    "machine": "2 shared, noisy cores (the workplace's machine): every process of the fleet "
    "and the Postgres server share them, so absolute times are high and vary run to run; "
    "ratios inside one run are what the targets judge",
    "fresh_cache": "every run uses its own namespace, empty when it starts and deleted after",
    "release": "workers open their caches and warm their pools (up to tasks + 1 connections), "
    "say ready, and are released at one wall-clock instant chosen by the parent",
    "budget": "in the fleet scenarios both designs get the same backends per process: a pool "
    "of pool_size, plus one direct connection (fleetcache's session, carrying LISTEN and the "
    "fleet's locks; the minimal design's LISTEN connection); options.pool_size + 1 in all",
    "fleet": "see fleetcache_cli/bench/pooled_fleet.py: a dedicated server with "
    "max_connections = 100 behind PgBouncer in transaction mode; pools through the pooler, "
    "the one direct connection per process to the server; a cold phase (every key asked for "
    "by `overlap` tasks of different processes) then a warm phase of random reads; peak "
    "backends sampled from pg_stat_activity every 50 ms (own = the parent's sampler and "
    "listener); notifies per fill = NOTIFYs a listener received during the cold phase / "
    "computations",
    "wall_ms": "from the release to the last request's return",
    "cpu_per_request": "time.process_time() of each worker from the release to its last "
    "request, summed over the workers, / requests (the Postgres server's CPU is not in it)",
    "machine_cpu": "the whole machine's busy CPU (/proc/stat: all cores, less idle and "
    "iowait) from the release to the last request's return, sampled every 5 ms by the "
    "parent: the workers, the Postgres server and whatever else runs (on a shared machine, "
    "noise for both designs alike)",
    "hit_latency": "requests that began after their key's commit and neither computed nor "
    "waited: a warm hit while the rest of the fleet is still busy",
    "wake_latency": "per waiter: its request's return minus the key's commit. fleetcache's "
    "commit time is when the winner's computation returned, its write committed (the write "
    "carries the NOTIFY, delivered at that commit; the lock's release comes after); the "
    "minimal design's is when its COMMIT (which delivers the NOTIFY) returned. Includes the "
    "waiter's re-read. wake_from_compute: the same from the end of the key's computation (so it "
    "includes the winner's write and NOTIFY)",
    "statements": "client side: psycopg.AsyncCursor.execute wrapped in the process, BEGIN "
    "and COMMIT included (both designs send them as statements); a statement in a pipeline "
    "counts as one though it shares a round trip. Per coordinated miss: one process, fresh "
    "keys, nothing contended; the LISTEN connection's liveness probe left out",
    "notifies_per_fill": "fleetcache's coordinator counts every NOTIFY a winner sends for its "
    "key (in its write, or at its release when no write sent one) and every lock won; the "
    "sum over the workers of one by the other (the minimal design sends one per COMMIT)",
    "waiter_connections": "exact, client side: each worker wraps its pool's getconn/putconn "
    "to know which task holds which connection, and records it for the waiting task at "
    "each wait's start and end (fleetcache) or end (minimal); the max over all waits",
    "near": "see fleetcache_cli/bench/near.py: stale = began after the n-th invalidation "
    "returned and after this process applied it, yet returned a version < n",
    "bounded": "see fleetcache_cli/bench/bounded.py: one process, PostgresStore.write timed "
    "per call; the table counted with count(*) after every max_entries/20 writes; p50 at 1x "
    "over the first max_entries writes, at 10x over the last max_entries",
    "xmin": "see fleetcache_cli/bench/xmin.py: every backend of the database sampled while "
    "one winner computes; the minimal design's winner is idle in its transaction for the "
    "whole computation (what idle_in_transaction_session_timeout kills); fleetcache's "
    "holds a session lock on an idle connection, outside any transaction",
}


def _local_facts() -> dict[str, Any]:
    """The machine, when no server is involved."""
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


@dataclass(slots=True)
class Bench:
    """One bench invocation on ``url``."""

    config: BenchConfig
    url: str
    run_id: str
    progress: Callable[[str], None]
    failures: list[str] = field(default_factory=list)

    async def run(self) -> dict[str, Any]:
        """Everything selected; the report."""
        started = time.time()
        facts = await self._facts() if self.config.postgres else _local_facts()
        if self.config.postgres:
            await self._tables()
        report: dict[str, Any] = {
            "command_line": shlex.join(sys.argv),
            "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
            "run_id": self.run_id,
            "machine": facts,
            "options": asdict(self.config),
        }
        report["scenarios"] = await self._scenarios(facts) if self.config.postgres else {}
        if self.config.local:
            report["local"] = await asyncio.to_thread(
                local_benchmarks, self.config.micro_iterations, self.progress
            )
        if self.config.near:
            report["near"] = await self._near()
        if self.config.expiry:
            report["expiry"] = await self._expiry()
        if self.config.xmin:
            self.progress(f"xmin probe ({self.config.xmin_compute_s:g} s computation)")
            report["xmin"] = await probe_xmin(
                self.url, f"bench:{self.run_id}:xmin", self.config.xmin_compute_s
            )
            await self._delete(f"bench:{self.run_id}:xmin", "fleetcache", "minimal")
        if self.config.bounded:
            limit = self.config.bounded_max_entries
            self.progress(f"bounded table (max_entries={limit}, {10 * limit} keys written)")
            report["bounded"] = await measure_bounded(self.url, self.run_id, limit)
        if self.config.fleet:
            report["fleet"] = await self._fleet()
        if self.config.micro:
            self.progress("micro-benchmarks")
            report["micro"] = await micro_benchmarks(
                self.url, self.run_id, self.config.micro_iterations
            )
        if self.config.sync:
            report["sync"] = await self._sync()
        report["duration_s"] = round(time.time() - started, 1)
        report["targets"] = evaluate_targets(report)
        report["failures"] = self.failures
        report["ok"] = not self.failures
        report["notes"] = NOTES
        return report

    async def _facts(self) -> dict[str, Any]:
        """The machine and the server."""
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            row = await (await conn.execute(_FACTS)).fetchone()
        assert row is not None  # a SELECT without FROM returns one row
        version, max_connections, reserved = row
        return {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "psycopg": psycopg.__version__,
            "postgres": version,
            "max_connections": max_connections,
            "usable_connections": max_connections - reserved,
        }

    async def _tables(self) -> None:
        """The fleetcache schema (as a deploy would migrate it) and the bench's own tables."""
        await migrate(self.url)
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            await conn.execute(minimal.CREATE_TABLE)
            await conn.execute(near.CREATE_TABLE)

    async def _delete(self, namespace: str, *tables: str) -> None:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            for table in tables:
                await conn.execute(_DELETE[table], {"ns": namespace})

    # -------------------------------------------------------------- fleet scenarios

    async def _scenarios(self, facts: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        by_size: dict[int, list[Scenario]] = {}
        for scenario in config.scenario_list():
            need = scenario.processes * config.budget + 5
            if need > facts["usable_connections"]:
                self.failures.append(
                    f"{scenario.name} skipped: it needs about {need} connections "
                    f"({scenario.processes} processes x (pool {config.pool_size} + 1)) and "
                    f"the server allows {facts['usable_connections']}"
                )
                continue
            by_size.setdefault(scenario.processes, []).append(scenario)
        for size, scenarios in by_size.items():
            fleet: Fleet[WorkerSpec, dict[str, Any]] = Fleet(size, name="fleetcache-bench")
            try:
                for rep in range(config.repetitions):
                    for number, scenario in enumerate(scenarios):
                        # Alternate which design goes first, so neither always runs on a
                        # warmer (or more tired) server.
                        order = DESIGNS if (rep + number) % 2 == 0 else DESIGNS[::-1]
                        for design in order:
                            run = await self._one_run(fleet, scenario, design, rep)
                            runs.setdefault((scenario.name, design), []).append(run)
            finally:
                fleet.close()
        report: dict[str, Any] = {}
        for scenario in config.scenario_list():
            if (scenario.name, "fleetcache") not in runs:
                continue
            report[scenario.name] = {
                "params": {
                    "processes": scenario.processes,
                    "tasks": scenario.tasks,
                    "keys": scenario.keys,
                    "compute_ms": scenario.compute_ms,
                    "repetitions": config.repetitions,
                    "pool_size": config.pool_size,
                    "budget_per_process": config.budget,
                },
                **{d: summarise(runs.get((scenario.name, d), [])) for d in DESIGNS},
            }
        return report

    async def _one_run(
        self,
        fleet: Fleet[WorkerSpec, dict[str, Any]],
        scenario: Scenario,
        design: str,
        rep: int,
    ) -> dict[str, Any]:
        config = self.config
        label = f"{scenario.name} {design} {rep + 1}/{config.repetitions}"
        namespace = f"bench:{self.run_id}:{scenario.name}:{design}:{rep}"
        specs = [
            WorkerSpec(
                design=design,
                url=self.url,
                pool_size=config.pool_size,
                tasks=scenario.tasks,
                keys=scenario.keys,
                compute_ms=scenario.compute_ms,
                namespace=namespace,
                seed=f"{config.seed}:{rep}:{worker}",
                timeout=config.run_timeout,
            )
            for worker in range(scenario.processes)
        ]
        started = time.monotonic()
        try:
            with MachineCpu() as machine:
                results = await fleet.run(fleet_worker, specs, run_timeout=config.run_timeout + 15)
        except WorkerError as exc:
            self.failures.append(f"{label}: {exc}")
            self.progress(f"{label}: FAILED (workers killed): {str(exc).splitlines()[0]}")
            return {"error": str(exc)}
        finally:
            await self._delete(namespace, design)
            await self._delete(f"{namespace}:warm", design)
        run = analyse_run(results, keys=scenario.keys, machine=machine)
        if run["failed_requests"]:
            self.failures.append(f"{label}: {run['failed_requests']} request(s) failed")
        self.progress(
            f"{label}: {run['computations_total']} computations, wall {run['wall_ms']:.0f} ms"
            f" ({time.monotonic() - started:.1f} s)"
        )
        return run

    # ------------------------------------------------------------------------ sync

    async def _sync(self) -> dict[str, Any]:
        """The sync API and the Django backend (:mod:`.sync`), in a process of its own."""
        namespace = f"bench:{self.run_id}:sync"
        self.progress("sync API and Django backend: hits sync vs async, stampedes")
        try:
            return await asyncio.to_thread(
                sync.run_apart,
                self.url,
                self.config.micro_iterations,
                namespace,
                self.config.run_timeout + 60,
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            self.failures.append(f"sync: {exc}")
            self.progress(f"sync: FAILED: {str(exc).splitlines()[0]}")
            return {"error": str(exc)}
        finally:
            await self._delete(namespace, "fleetcache")
            await self._delete(f"{namespace}:django", "fleetcache")
            await self._delete_django(namespace)

    async def _delete_django(self, prefix: str) -> None:
        """The DatabaseCache rows of the sync scenario (its table may not exist yet)."""
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            exists = await (
                await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (sync.DJANGO_TABLE,))
            ).fetchone()
            if exists is not None and exists[0]:
                await conn.execute(_DELETE["django"], {"ns": prefix})

    # ------------------------------------------------------------------- large fleet

    async def _fleet(self) -> dict[str, Any]:
        config = self.config
        self.progress(
            f"fleet: {config.fleet_processes} processes x {config.fleet_tasks} tasks x "
            f"{config.fleet_keys} keys through PgBouncer (a dedicated server, max_connections "
            f"{config.fleet_max_connections})"
        )
        try:
            with pooled_fleet.dedicated_server(config) as (direct, pooled):
                section = await pooled_fleet.run_fleet(
                    config, direct, pooled, self.run_id, self.progress
                )
        except (FleetcacheError, psycopg.Error, OSError) as exc:
            self.failures.append(f"fleet: {exc}")
            self.progress(f"fleet: FAILED: {exc}")
            return {"error": str(exc)}
        self.failures.extend(section["failures"])
        return section

    # ---------------------------------------------------------------------- expiry

    async def _expiry(self) -> dict[str, Any]:
        config = self.config
        runs: list[dict[str, Any]] = []
        fleet: Fleet[expiry.ExpirySpec, dict[str, Any]] = Fleet(
            config.processes, name="fleetcache-expiry"
        )
        try:
            for rep in range(config.repetitions):
                namespace = f"bench:{self.run_id}:expiry:{rep}"
                specs = [
                    expiry.ExpirySpec(
                        url=self.url,
                        pool_size=config.pool_size,
                        tasks=config.tasks,
                        keys=config.expiry_keys,
                        compute_ms=config.expiry_compute_ms,
                        ttl=config.expiry_ttl,
                        stale_ttl=config.expiry_stale_ttl,
                        warm_seconds=config.expiry_seconds / 2,
                        seconds=config.expiry_seconds,
                        namespace=namespace,
                        seed=f"{config.seed}:{rep}:{worker}",
                    )
                    for worker in range(config.processes)
                ]
                label = f"expiry {rep + 1}/{config.repetitions}"
                try:
                    results = await fleet.run(
                        expiry.expiry_worker, specs, run_timeout=config.run_timeout + 15
                    )
                except WorkerError as exc:
                    self.failures.append(f"{label}: {exc}")
                    self.progress(f"{label}: FAILED: {str(exc).splitlines()[0]}")
                    continue
                finally:
                    await self._delete(namespace, "fleetcache")
                    await self._delete(f"{namespace}:warm", "fleetcache")
                run = expiry.analyse_expiry(results, config.expiry_ttl)
                runs.append(run)
                self.progress(
                    f"{label}: {run['refreshes_per_expiry']} refreshes per expiry, "
                    f"{run['stale_served']} stale values served"
                )
        finally:
            fleet.close()
        medians = {
            metric: percentile([r[metric] for r in runs if r[metric] is not None], 50)
            for metric in ("warm_hit_ms_p99", "stale_ms_p50", "stale_ms_p99", "request_ms_p99")
        }
        return {
            "params": {
                "processes": config.processes,
                "tasks": config.tasks,
                "keys": config.expiry_keys,
                "ttl": config.expiry_ttl,
                "stale_ttl": config.expiry_stale_ttl,
                "compute_ms": config.expiry_compute_ms,
                "seconds": config.expiry_seconds,
            },
            **medians,
            "refreshes_per_expiry_worst": max(
                (r["refreshes_per_expiry"] for r in runs if r["refreshes_per_expiry"]),
                default=None,
            ),
            "computations_total": sum(r["computations"] for r in runs),
            "expiries_total": sum(r["expiries"] for r in runs),
            "stale_served_total": sum(r["stale_served"] for r in runs),
            "waited_total": sum(r["waited_for_a_computation"] for r in runs),
            "refresh_failures_total": sum(r["refresh_failures"] for r in runs),
            "runs": runs,
        }

    # ----------------------------------------------------------------- near tier

    async def _near(self) -> dict[str, Any]:
        config = self.config
        processes = config.processes
        interval = 1 / config.near_invalidations_per_s
        count = int(config.near_seconds / interval) + 1
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        fleet: Fleet[near.NearSpec, dict[str, Any]] = Fleet(processes, name="fleetcache-near")
        try:
            for rep in range(config.repetitions):
                for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                    namespace = f"bench:{self.run_id}:near:{mode}:{rep}"
                    seed = f"{config.seed}:{rep}"
                    await fill_entries(
                        self.url, namespace, config.near_keys, {"v": 0}, minimal=False
                    )
                    async with await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True
                    ) as conn:
                        await conn.execute(
                            near.FILL_VERSIONS, {"ns": namespace, "keys": config.near_keys}
                        )
                    specs = [
                        near.NearSpec(
                            url=self.url,
                            near=2 * config.near_keys if mode == "on" else None,
                            pool_size=config.pool_size,
                            tasks=config.tasks,
                            keys=config.near_keys,
                            seconds=config.near_seconds,
                            namespace=namespace,
                            seed=f"{seed}:{worker}",
                            invalidations=near.invalidation_plan(seed, config.near_keys, count),
                            invalidation_interval=interval,
                            invalidator=worker == 0,
                        )
                        for worker in range(processes)
                    ]
                    label = f"near tier {mode} {rep + 1}/{config.repetitions}"
                    try:
                        results = await fleet.run(
                            near.near_worker, specs, run_timeout=config.run_timeout + 15
                        )
                    except WorkerError as exc:
                        self.failures.append(f"{label}: {exc}")
                        self.progress(f"{label}: FAILED: {str(exc).splitlines()[0]}")
                        continue
                    finally:
                        await self._delete(namespace, "fleetcache", "versions")
                    run = near.analyse_near(results)
                    runs[mode].append(run)
                    self.progress(
                        f"{label}: {run['reads_per_s']:.0f} reads/s, "
                        f"{run['stale_reads']} stale, {run['invalidations']} invalidations"
                    )
        finally:
            fleet.close()
        summary: dict[str, Any] = {
            "params": {
                "processes": processes,
                "tasks": config.tasks,
                "keys": config.near_keys,
                "seconds": config.near_seconds,
                "invalidations_per_s": config.near_invalidations_per_s,
                "near_entries": 2 * config.near_keys,
            }
        }
        for mode, mode_runs in runs.items():
            # Counts stay integers (a median of an even number of runs is rounded down).
            counts = {
                metric: int(percentile([r[metric] for r in mode_runs], 50) or 0)
                for metric in ("near_hits", "invalidations")
            }
            summary[mode] = {
                **{
                    metric: percentile([r[metric] for r in mode_runs if r[metric] is not None], 50)
                    for metric in (
                        "reads_per_s",
                        "window_ms_p50",
                        "window_ms_p99",
                    )
                },
                **counts,
                "stale_reads_total": sum(r["stale_reads"] for r in mode_runs),
                "stale_reads_each_run": [r["stale_reads"] for r in mode_runs],
                "runs": mode_runs,
            }
        return summary
