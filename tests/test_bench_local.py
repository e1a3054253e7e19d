"""``fleetcache bench --scenarios local``: the embedded sqlite file beside diskcache, with
no Postgres. Timings are reported, never asserted; correctness is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetcache_cli import main

pytestmark = pytest.mark.processes


def test_the_local_scenario_reports_each_cold_key_computed_once_and_a_takeover(
    tmp_path: Path,
) -> None:
    """The local scenario runs without a server: fleetcache computes each of the 20 cold
    keys once across 4 processes x 4 tasks, diskcache's designs are measured beside it,
    a waiter takes over from a SIGKILLed winner, and issue 23's targets are judged."""
    out = tmp_path / "report.json"
    status = main(
        ["bench", "--scenarios", "local", "--micro-iterations", "200", "--json", str(out)]
    )
    report = json.loads(out.read_text())
    assert status == 0
    local = report["local"]
    assert local["fleetcache"]["computations"] == local["params"]["keys"] == 20
    assert local["fleetcache"]["max_per_key"] == 1
    assert local["fleetcache"]["failed_workers"] == 0
    for design in ("diskcache_stampede", "diskcache_barrier"):
        assert local[design]["computations"] >= 20
        assert local[design]["failed_workers"] == 0
    assert local["takeover"]["waiter_exit"] == 0
    assert local["takeover"]["kill_to_compute_ms"] > 0
    names = {t["name"] for t in report["targets"] if t["name"].startswith("local:")}
    assert len(names) == 5
    assert all(t["value"] is not None for t in report["targets"] if t["name"].startswith("local:"))
