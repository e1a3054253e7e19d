"""``fleetcache bench``: the report's shape and correctness metrics, the minimal design,
and the fleet plumbing.

Timings are never asserted here; the bench reports them, the tests only check that the
report is complete and that both designs were correct while it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from fleetcache_cli import main
from fleetcache_cli.bench.config import add_arguments, resolve_config
from fleetcache_cli.bench.fleet_run import WorkerSpec, fleet_worker
from fleetcache_cli.bench.minimal import CREATE_TABLE, MinimalCache
from fleetcache_cli.bench.pooled_fleet import run_fleet, task_keys
from fleetcache_cli.bench.probes import MachineCpu, backend_cpu, backend_cpu_between
from fleetcache_cli.bench.targets import evaluate_targets
from fleetcache_cli.shared import Fleet, WorkerError, percentile

if TYPE_CHECKING:
    from fleetcache.embedded import PgBouncer

pytestmark = [pytest.mark.postgres, pytest.mark.processes]

SCENARIOS = ("default", "fast", "hotkey", "p16")
DESIGN_METRICS = {
    "computations_each_run",
    "computations_max_per_key_worst",
    "wall_ms",
    "cpu_per_request_ms",
    "machine_cpu_ms",
    "server_cpu_ms",
    "server_direct_cpu_ms",
    "hit_ms_p50",
    "wake_ms_p50",
    "wake_ms_p99",
    "statements_per_request",
    "waiter_connections_max",
    "failed_requests",
    "failed_runs",
    "runs",
}


def _spec(url: str, **overrides: Any) -> WorkerSpec:
    values: dict[str, Any] = {
        "design": "fleetcache",
        "url": url,
        "pool_size": 3,
        "tasks": 1,
        "keys": 1,
        "compute_ms": 1.0,
        "namespace": "bench:test",
        "seed": "0",
        "timeout": 60.0,
    }
    values.update(overrides)
    return WorkerSpec(**values)


def _assert_correct(report: dict[str, Any]) -> None:
    """Both designs computed each key once and no waiter held a connection, the near tier
    served no stale read, each expiry was refreshed once across the fleet (nobody waited
    for a computation), and fleetcache held no transaction while computing."""
    for name, scenario in report["scenarios"].items():
        keys = scenario["params"]["keys"]
        for design in ("minimal", "fleetcache"):
            cell = scenario[design]
            assert cell["computations_each_run"] == [keys] * len(cell["runs"]), (name, design)
            assert cell["computations_max_per_key_worst"] == 1, (name, design)
            assert cell["waiter_connections_max"] == 0, (name, design)
            assert cell["failed_requests"] == 0, (name, design)
    for mode in ("off", "on"):
        assert report["near"][mode]["stale_reads_total"] == 0, mode
    assert report["near"]["on"]["near_hits"] > 0
    expiring = report["expiry"]
    assert expiring["expiries_total"] > 0
    assert expiring["refreshes_per_expiry_worst"] == 1.0
    assert expiring["computations_total"] == expiring["expiries_total"]
    assert expiring["stale_served_total"] > 0
    assert expiring["waited_total"] == 0
    fleet_xmin = report["xmin"]["fleetcache"]
    assert fleet_xmin["samples"] > 0
    assert fleet_xmin["xmin_holders_max"] == 0
    assert fleet_xmin["idle_in_transaction_max"] == 0


def test_smallest_bench_reports_every_metric_and_both_designs_are_correct(
    database_url: str, tmp_path: Path
) -> None:
    """A tiny bench run exits 0 and writes a complete report: every scenario with both
    designs, the near tier off and on, expiry, the xmin probe, the micro-benchmarks with statements
    counted per miss, and a target table in which the correctness targets are met."""
    out = tmp_path / "bench.json"
    # fmt: off
    status = main([
        "bench", "--processes", "2", "--tasks", "2", "--keys", "3", "--compute-ms", "10",
        "--repetitions", "1", "--micro-iterations", "20", "--near-keys", "20",
        "--near-seconds", "0.6", "--xmin-compute-s", "0.3", "--expiry-keys", "2",
        "--expiry-seconds", "1.5", "--bounded-max-entries", "100",
        "--database-url", database_url, "--json", str(out),
        "--scenarios", "default,fast,hotkey,p16,near,expiry,xmin,bounded,micro",  # not fleet
    ])
    # fmt: on
    assert status == 0
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["failures"] == []
    assert {"cpu_count", "python", "postgres"} <= report["machine"].keys()
    assert report["notes"]["statements"]
    assert set(report["scenarios"]) == set(SCENARIOS)
    assert report["scenarios"]["p16"]["params"]["processes"] == 4
    local_server = _server_is_local(database_url)
    for scenario in report["scenarios"].values():
        for design in ("minimal", "fleetcache"):
            assert scenario[design].keys() >= DESIGN_METRICS
            if local_server:  # the embedded server's backends are read on this machine
                server = scenario[design]["server_cpu_ms"]
                assert server > scenario[design]["server_direct_cpu_ms"] > 0
    _assert_correct(report)

    micro = report["micro"]
    assert micro["warm_hit_50"]["rows_in_namespace"] == 50
    assert micro["warm_hit_20000"]["rows_in_namespace"] == 20_000
    statements = micro["uncontended_miss"]["statements"]
    for design in ("fleetcache", "fleetcache_uncoordinated", "minimal"):
        assert statements[design]["per_miss"] >= 2, design  # at least a read and a write
    assert micro["near_hit"]["near_hits"] >= micro["near_hit"]["iterations"]
    # Metrics on vs off, on one cache: exactly the "on" half of the timed hits was counted
    # (with its warm-up, and the priming hit), none of the "off" half.
    metrics = micro["metrics"]
    timed = metrics["iterations"] + max(10, metrics["iterations"] // 10)
    assert metrics["warm_hit"]["gets_counted"] == timed + 1
    assert metrics["near_hit"]["gets_counted"] == timed + 1

    targets = {t["name"]: t for t in report["targets"]}
    for name in SCENARIOS:
        for design in ("minimal", "fleetcache"):
            assert targets[f"{name}: {design} computations - K"]["met"] is True
            assert targets[f"{name}: {design} waiter connections"]["met"] is True
        assert isinstance(targets[f"{name}: wall"]["met"], bool)
    assert targets["near: stale reads (tier on)"]["met"] is True
    assert targets["expiry: refreshes per expiry"]["met"] is True
    assert targets["xmin during a long computation"]["met"] is True
    bounded = report["bounded"]
    assert (bounded["max_entries"], bounded["keys_written"]) == (100, 1000)
    assert bounded["samples"] == 200
    assert 0.9 <= bounded["table_max_ratio"] <= 1.1
    assert targets["bounded: table max / max_entries"]["met"] is True
    assert bounded["write_ms_p50_1x"] > 0
    assert bounded["write_ms_p50_10x"] > 0
    assert {"one process: warm hit, 50 rows", "statements per coordinated miss"} <= set(targets)
    assert multiprocessing.active_children() == []
    with psycopg.connect(database_url, autocommit=True) as conn:
        left = conn.execute(  # the runs' namespaces and their warm-ups' are deleted
            "SELECT (SELECT count(*) FROM fleetcache_entries WHERE namespace LIKE 'bench:%'),"
            " (SELECT count(*) FROM bench_minimal_entries WHERE namespace LIKE 'bench:%')"
        ).fetchone()
    assert left == (0, 0)


def test_quick_bench_runs_as_a_command(database_url: str, tmp_path: Path) -> None:
    """``fleetcache bench --quick`` runs as users run it (a fresh interpreter) and writes a
    report in which both designs were correct."""
    report_path = tmp_path / "quick.json"
    done = subprocess.run(
        [sys.executable, "-m", "fleetcache_cli", "bench", "--quick",
         "--database-url", database_url, "--json", str(report_path)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] is True
    _assert_correct(report)


async def test_minimal_design_computes_a_key_once_for_concurrent_callers(
    database_url: str,
) -> None:
    """The contender's own single flight and lock: ten concurrent callers of one key in one
    process get one value from one computation, and a later caller reads it."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(CREATE_TABLE)
    calls = 0

    async def produce(key: tuple[str, str]) -> Any:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {"key": key[1]}

    cache = MinimalCache(database_url, pool_size=3)
    await cache.open()
    try:
        values = await asyncio.gather(*(cache.get(("ns", "k"), produce) for _ in range(10)))
        assert values == [{"key": "k"}] * 10
        assert await cache.get(("ns", "k"), produce) == {"key": "k"}
    finally:
        await cache.close()
    assert calls == 1


def test_quick_flag_yields_to_explicit_sizes() -> None:
    """``--quick`` picks the reduced sizes, but a size given explicitly wins over it."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = resolve_config(parser.parse_args(["--quick", "--processes", "3"]))
    assert (config.processes, config.tasks, config.keys, config.compute_ms) == (3, 2, 10, 50.0)
    assert config.repetitions == 1
    assert config.fast_compute_ms == 5.0
    assert [s.processes for s in config.scenario_list()] == [3, 3, 3, 6]
    full = resolve_config(parser.parse_args([]))
    assert (full.processes, full.tasks, full.keys, full.compute_ms) == (8, 4, 50, 200.0)
    assert full.repetitions == 3
    assert [s.name for s in full.scenario_list()] == list(SCENARIOS)
    assert (full.near, full.expiry, full.xmin, full.micro) == (True, True, True, True)
    # The same budget of backends for both designs: the pool plus one direct connection.
    assert (full.pool_size, full.budget) == (4, 5)
    # The large fleet runs in the full bench, not in --quick (unless asked for).
    assert full.fleet
    assert (full.fleet_processes, full.fleet_tasks, full.fleet_keys) == (64, 2, 10_000)
    assert not config.fleet
    assert resolve_config(parser.parse_args(["--quick", "--scenarios", "fleet"])).fleet
    assert full.bounded


def test_percentile_interpolates() -> None:
    """Percentiles interpolate linearly between ranks and are None for no data."""
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_failing_worker_is_reported_and_the_fleet_killed(database_url: str) -> None:
    """A job that raises in one worker surfaces as WorkerError naming it, and no worker
    process is left running."""
    fleet: Fleet[WorkerSpec, dict[str, Any]] = Fleet(2, name="bench-test")
    specs = [_spec(database_url), _spec("memory://")]  # the bench refuses a non-Postgres URL
    try:
        with pytest.raises(WorkerError, match=r"worker 1 failed(.|\n)*needs a Postgres URL"):
            asyncio.run(fleet.run(fleet_worker, specs, ready_timeout=60, run_timeout=60))
        assert not fleet.running
    finally:
        fleet.close()
    assert multiprocessing.active_children() == []


def test_hung_worker_is_killed_at_the_deadline(database_url: str) -> None:
    """Workers still computing when the run deadline passes are killed, and the fleet says
    so instead of waiting for them."""
    fleet: Fleet[WorkerSpec, dict[str, Any]] = Fleet(2, name="bench-test")
    specs = [_spec(database_url, compute_ms=600_000.0, namespace="bench:hung") for _ in range(2)]
    try:
        with pytest.raises(WorkerError, match=r"sent no 'result' within"):
            asyncio.run(fleet.run(fleet_worker, specs, ready_timeout=60, run_timeout=1.0))
        assert not fleet.running
    finally:
        fleet.close()
    assert multiprocessing.active_children() == []


def test_fleet_scenario_through_pgbouncer_is_exact_in_a_small_run(
    database_url: str, pgbouncer: PgBouncer
) -> None:
    """The fleet scenario, shrunk to 4 processes x 2 tasks x 200 keys through the test
    PgBouncer (transaction mode): both designs compute each key exactly once with no
    failed request, their direct backends peak at one per process, and the report has
    hits, latencies and NOTIFYs per fill for both."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # fmt: off
    config = resolve_config(parser.parse_args([
        "--scenarios", "fleet", "--fleet-processes", "4", "--fleet-tasks", "2",
        "--fleet-keys", "200", "--fleet-compute-ms", "2", "--fleet-warm-seconds", "0.5",
    ]))
    # fmt: on
    pooled = pgbouncer.conninfo_for(str(conninfo_to_dict(database_url)["dbname"]))
    section = asyncio.run(run_fleet(config, database_url, pooled, "test", print))
    assert section["failures"] == []
    for design in ("minimal", "fleetcache"):
        cell = section[design]
        assert cell["computations_each_run"] == [200], design
        assert cell["errors_total"] == 0, design
        assert cell["warm_computations_total"] == 0, design
        assert cell["peak_backends"]["direct"] == 4, design
        assert cell["hits_per_s"] > 0, design
        assert cell["hit_ms_p99"] is not None, design
        assert cell["notifies_per_fill"] >= 1, design
    targets = {t["name"]: t for t in evaluate_targets({"fleet": section})}
    for design in ("minimal", "fleetcache"):
        assert targets[f"fleet: {design} computations - K"]["met"] is True
        assert targets[f"fleet: {design} errors"]["met"] is True
        assert targets[f"fleet: {design} peak direct backends - P"]["met"] is True
    assert multiprocessing.active_children() == []


def test_fleet_scenario_asks_for_every_key_from_different_processes() -> None:
    """Every key is asked for by exactly ``overlap`` tasks, of as many different processes
    (2 tasks per process, 128 tasks in all)."""
    tasks_in_all, keys, overlap = 128, 1000, 2
    askers: dict[int, list[int]] = {}
    for task in range(tasks_in_all):
        for key in task_keys(task, tasks_in_all, keys, overlap):
            askers.setdefault(key, []).append(task)
    assert sorted(askers) == list(range(keys))
    for tasks in askers.values():
        assert len(tasks) == overlap
        assert len({task // 2 for task in tasks}) == overlap


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the machine CPU is read on Linux")
def test_machine_cpu_counts_at_least_the_cpu_this_process_spent() -> None:
    """The machine's busy CPU over a window holds at least what this process spent in it
    (everything else on the machine only adds), and nothing outside what was sampled."""
    with MachineCpu(interval=0.002) as machine:
        time.sleep(0.05)
        start, cpu = time.time(), time.process_time()
        while time.process_time() - cpu < 0.3:
            pass
        spent, end = time.process_time() - cpu, time.time()
        time.sleep(0.05)
    busy = machine.busy_between(start, end)
    assert busy is not None
    assert busy >= spent * 0.9  # the counters tick in 10 ms: a tick or two either way
    assert machine.busy_between(start - 3600, end) is None


def _server_is_local(database_url: str) -> bool:
    with psycopg.connect(database_url) as conn:
        return backend_cpu([conn.info.backend_pid]) is not None


def test_backend_cpu_reads_what_a_backend_spends_and_only_postgres_processes(
    database_url: str,
) -> None:
    """``backend_cpu`` reads a local server process's CPU, which grows as it works; a pid
    that is not a postgres process (this one) is left out, and ``backend_cpu_between``
    counts a backend missing before in full and gives None without a reading."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        pid = conn.info.backend_pid
        before = backend_cpu([pid])
        if before is None:
            pytest.skip("the test database's server runs on another machine")
        for _ in range(300):
            conn.execute("SELECT count(*) FROM generate_series(1, 1000)")
        after = backend_cpu([pid, os.getpid()])
    assert after is not None
    assert set(after) == {pid}  # this process is not a backend
    spent = backend_cpu_between(before, after)
    assert spent is not None
    assert spent > 0.001
    assert backend_cpu_between({}, after) == after[pid]  # made since: counted in full
    assert backend_cpu_between(None, after) is None
    assert backend_cpu([os.getpid()]) is None


def test_the_sync_scenario_judges_the_sync_and_django_targets(
    database_url: str, tmp_path: Path
) -> None:
    """``fleetcache bench --scenarios sync`` measures the sync API and the Django backend
    (in a process of its own): hits sync vs async and Django's get vs DatabaseCache's, one
    computation for each stampede and one per caller for DatabaseCache, the issue-19
    targets judged; it leaves none of its keys behind."""
    out = tmp_path / "sync.json"
    status = main(
        ["bench", "--scenarios", "sync", "--micro-iterations", "100",
         "--database-url", database_url, "--json", str(out)]
    )  # fmt: skip
    assert status == 0
    report = json.loads(out.read_text())
    synced = report["sync"]
    assert synced["hits"]["iterations"] == 100
    assert synced["hits"]["near_hits"] >= 100
    assert synced["stampede_sync_16x4"] == {
        "processes": 4, "threads": 16, "callers": 64, "computations": 1,
    }  # fmt: skip
    assert synced["django_get_or_set_fleetcache_8x4"]["computations"] == 1
    theirs = synced["django_get_or_set_databasecache_8x4"]
    assert theirs["computations"] == theirs["callers"] == 32
    targets = {t["name"]: t for t in report["targets"]}
    for name in (
        "sync: warm hit sync / async",
        "sync: near hit p50",
        "django: get fleetcache / DatabaseCache",
    ):
        assert targets[name]["value"] > 0
    assert targets["sync: 16 threads x 4 processes, one cold key"]["met"] is True
    assert targets["django: get_or_set 8 threads x 4 processes, one cold key"]["met"] is True
    with psycopg.connect(database_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT (SELECT count(*) FROM fleetcache_entries WHERE namespace LIKE 'bench:%'),"
            " (SELECT count(*) FROM bench_django_cache)"
        ).fetchone()
    assert left == (0, 0)
