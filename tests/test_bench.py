"""``fleetcache bench``: the report's shape and correctness metrics, and the fleet plumbing.

Timings are never asserted here; the bench reports them, the tests only check that the
report is complete and that coordination was correct while it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from fleetcache.cli import main
from fleetcache.cli._fleet import Fleet, WorkerError
from fleetcache.cli.bench import WorkerSpec, add_arguments, bench_worker, percentile, resolve_config

pytestmark = [pytest.mark.postgres, pytest.mark.processes]

SCENARIOS = ("default", "hotkey", "fast")
MODE_METRICS = {
    "computations_total",
    "computations_max_per_key_worst",
    "computations_each_run",
    "wall_ms",
    "request_ms_p50",
    "request_ms_p99",
    "wake_ms_p50",
    "wake_ms_p99",
    "hit_ms_p50",
    "waiter_connections_max",
    "blocked_on_lock_max",
    "wake_reasons",
    "failed_requests",
    "failed_runs",
    "runs",
}


def _spec(url: str, **overrides: Any) -> WorkerSpec:
    values: dict[str, Any] = {
        "url": url,
        "coordinate": True,
        "pool_size": 3,
        "tasks": 1,
        "keys": 1,
        "compute_ms": 1.0,
        "namespace": "bench:test",
        "seed": "0",
        "app_name": "fleetcache-bench-test",
        "timeout": 60.0,
    }
    values.update(overrides)
    return WorkerSpec(**values)


def test_smallest_bench_reports_every_metric_and_coordinates_correctly(
    database_url: str, tmp_path: Path
) -> None:
    """A minimal bench run exits 0 and writes a complete report in which every coordinated
    run computed each key exactly once and no waiter held a pool connection."""
    out = tmp_path / "bench.json"
    status = main(
        [
            "bench",
            "--processes",
            "2",
            "--tasks",
            "2",
            "--keys",
            "3",
            "--compute-ms",
            "10",
            "--repetitions",
            "1",
            "--micro-iterations",
            "20",
            "--database-url",
            database_url,
            "--json",
            str(out),
        ]
    )
    assert status == 0
    report = json.loads(out.read_text())

    assert report["ok"] is True
    assert report["failures"] == []
    assert {"cpu_count", "python", "postgres"} <= report["machine"].keys()
    assert report["command_line"]
    assert report["notes"]["wake_latency"]
    assert report["options"]["processes"] == 2
    assert set(report["scenarios"]) == set(SCENARIOS)
    for name in SCENARIOS:
        scenario = report["scenarios"][name]
        keys = scenario["params"]["keys"]
        assert keys == (1 if name == "hotkey" else 3)
        for mode in ("uncoordinated", "coordinated"):
            assert scenario[mode].keys() >= MODE_METRICS, (name, mode)
            assert scenario[mode]["failed_runs"] == 0
            assert scenario[mode]["failed_requests"] == 0
            assert len(scenario[mode]["runs"]) == 1
        coordinated = scenario["coordinated"]
        assert coordinated["computations_each_run"] == [keys], name
        assert coordinated["computations_max_per_key_worst"] == 1, name
        assert coordinated["waiter_connections_max"] == 0, name
        assert coordinated["blocked_on_lock_max"] == 0, name
        # Without coordination every process computes what it misses: at least K in all.
        assert scenario["uncoordinated"]["computations_total"] >= keys
        assert scenario["uncoordinated"]["waiter_connections_max"] is None

    micro = report["micro"]
    assert micro["warm_hit"]["iterations"] == 20
    assert micro["warm_hit"]["produce_calls"] == 0
    assert isinstance(micro["warm_hit"]["ratio"], float)
    assert isinstance(micro["uncontended_miss"]["extra_ms"], float)
    assert isinstance(micro["closure"]["populate_extra_ms"], float)
    assert isinstance(micro["closure"]["invalidation_extra_ms"], float)

    targets = {t["name"]: t for t in report["targets"]}
    for name in SCENARIOS:
        assert targets[f"{name}: computations == K"]["met"] is True
        assert targets[f"{name}: waiter connections"]["met"] is True
        assert isinstance(targets[f"{name}: wall time"]["met"], bool)
    assert {"default: wake p99", "warm hit vs raw SELECT", "uncontended miss overhead"} <= set(
        targets
    )
    assert multiprocessing.active_children() == []


def test_quick_flag_yields_to_explicit_sizes() -> None:
    """``--quick`` picks the reduced sizes, but a size given explicitly wins over it."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = resolve_config(parser.parse_args(["--quick", "--processes", "3"]))
    assert (config.processes, config.tasks, config.keys, config.compute_ms) == (3, 2, 10, 50.0)
    assert config.repetitions == 1
    assert config.fast_compute_ms == 5.0
    full = resolve_config(parser.parse_args([]))
    assert (full.processes, full.tasks, full.keys, full.compute_ms) == (8, 4, 50, 200.0)
    assert full.fast_compute_ms == 20.0


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
            asyncio.run(fleet.run(bench_worker, specs, ready_timeout=60, run_timeout=60))
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
            asyncio.run(fleet.run(bench_worker, specs, ready_timeout=60, run_timeout=1.0))
        assert not fleet.running
    finally:
        fleet.close()
    assert multiprocessing.active_children() == []


def test_quick_bench_runs_as_a_command(database_url: str, tmp_path: Path) -> None:
    """``fleetcache bench --quick`` runs as users run it and writes a report in which every
    coordinated scenario computed each key once and no waiter held a connection."""
    import subprocess
    import sys

    report_path = tmp_path / "quick.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetcache",
            "bench",
            "--quick",
            "--database-url",
            database_url,
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    for name in SCENARIOS:
        coordinated = report["scenarios"][name]["coordinated"]
        assert coordinated["computations_max_per_key_worst"] == 1
        assert coordinated["waiter_connections_max"] == 0
