"""The targets of issues 9, 11, 12, 13, 19 and 23, judged on one report.

Each target is a ratio fleetcache / minimal (or an absolute figure) from the same run,
with its threshold, whether it was met, and by how much it was missed. A target whose
figure was not measured (scenario not selected, a run failed) has ``met`` None.
"""

from __future__ import annotations

from typing import Any

from fleetcache_cli.bench.local import local_targets

WALL_RATIO = 1.05
CPU_RATIO = 1.2
HIT_UNDER_LOAD_RATIO = 1.1
ONE_PROCESS_HIT_RATIO = 1.1
NEAR_HIT_MS = 0.01
#: Metrics on (the Prometheus collector registered, no tracer): at most this much slower a
#: warm hit (percent), and a near hit (ms, absolute).
METRICS_HIT_PCT = 5.0
METRICS_NEAR_HIT_MS = 0.005
NEAR_THROUGHPUT_RATIO = 10.0
EXTRA_STATEMENTS = 1
EXPIRY_P99_RATIO = 2.0
#: A bounded table (issue 18): at most this many times max_entries at every sample, and
#: the write p50 with the table full and evicting at most this many times the p50 while
#: it fills ("flat").
BOUNDED_TABLE_RATIO = 1.1
BOUNDED_WRITE_RATIO = 1.25
#: The sync API and the Django backend (issue 19): a sync warm hit through Postgres at most
#: this many times the async one, a sync near hit at most this long (ms), Django's get at
#: most this many times DatabaseCache's.
SYNC_HIT_RATIO = 1.2
SYNC_NEAR_HIT_MS = 0.02
DJANGO_GET_RATIO = 1.2


def _ratio(ours: Any, theirs: Any) -> float | None:
    if ours is None or theirs is None or theirs <= 0:
        return None
    return round(float(ours) / float(theirs), 3)


class _Targets:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def at_most(self, name: str, what: str, value: float | None, limit: float, unit: str) -> None:
        """A figure that must not exceed ``limit``."""
        met = None if value is None else value <= limit
        missed_by = None
        if met is False and value is not None:
            missed_by = (
                f"{(value / limit - 1) * 100:.0f}% over"
                if unit == "x"
                else f"{value - limit:g} over"
            )
        self.rows.append(
            {
                "name": name,
                "description": what,
                "value": value,
                "threshold": f"<= {limit:g}{unit}",
                "met": met,
                "missed_by": missed_by,
            }
        )

    def at_least(self, name: str, what: str, value: float | None, limit: float, unit: str) -> None:
        """A figure that must reach ``limit``."""
        met = None if value is None else value >= limit
        missed_by = None
        if met is False and value is not None:
            missed_by = f"{(1 - value / limit) * 100:.0f}% short"
        self.rows.append(
            {
                "name": name,
                "description": what,
                "value": value,
                "threshold": f">= {limit:g}{unit}",
                "met": met,
                "missed_by": missed_by,
            }
        )


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its value, threshold and verdict."""
    t = _Targets()
    scenarios: dict[str, Any] = report.get("scenarios", {})
    for name, scenario in scenarios.items():
        ours, theirs = scenario["fleetcache"], scenario["minimal"]
        t.at_most(
            f"{name}: wall",
            "fleetcache / minimal wall time (medians)",
            _ratio(ours["wall_ms"], theirs["wall_ms"]),
            WALL_RATIO,
            "x",
        )
        t.at_most(
            f"{name}: CPU per request",
            "fleetcache / minimal process CPU per request (medians)",
            _ratio(ours["cpu_per_request_ms"], theirs["cpu_per_request_ms"]),
            CPU_RATIO,
            "x",
        )
        t.at_most(
            f"{name}: machine CPU",
            "fleetcache / minimal busy CPU of the whole machine over the run (medians)",
            _ratio(ours.get("machine_cpu_ms"), theirs.get("machine_cpu_ms")),
            CPU_RATIO,
            "x",
        )
        if name != "hotkey":  # one key: hardly any request starts after its commit
            t.at_most(
                f"{name}: warm-hit p50 under load",
                "fleetcache / minimal p50 of requests that found the row",
                _ratio(ours["hit_ms_p50"], theirs["hit_ms_p50"]),
                HIT_UNDER_LOAD_RATIO,
                "x",
            )
        t.at_most(
            f"{name}: wake p99",
            "fleetcache / minimal p99 of commit -> waiter returns",
            _ratio(ours["wake_ms_p99"], theirs["wake_ms_p99"]),
            1.0,
            "x",
        )
        keys = scenario["params"]["keys"]
        for design in ("minimal", "fleetcache"):
            each = scenario[design]["computations_each_run"]
            t.at_most(
                f"{name}: {design} computations - K",
                "computations in the worst run minus keys (every key computed once)",
                None if not each else max(each) - keys,
                0,
                "",
            )
            t.at_most(
                f"{name}: {design} waiter connections",
                "pooled connections held by a waiting task, max over all waits",
                scenario[design]["waiter_connections_max"],
                0,
                "",
            )
    micro = report.get("micro", {})
    for rows in (50, 20_000):
        hit = micro.get(f"warm_hit_{rows}")
        t.at_most(
            f"one process: warm hit, {rows} rows",
            "fleetcache get / the same SELECT sent raw (medians)",
            None if hit is None else hit["ratio"],
            ONE_PROCESS_HIT_RATIO,
            "x",
        )
    miss = micro.get("uncontended_miss")
    if miss is not None:
        ours = miss["statements"]["fleetcache"]["per_miss"]
        theirs = miss["statements"]["minimal"]["per_miss"]
        t.at_most(
            "statements per coordinated miss",
            f"fleetcache minus minimal ({ours:g} - {theirs:g})",
            round(ours - theirs, 2),
            EXTRA_STATEMENTS,
            "",
        )
    near_hit = micro.get("near_hit")
    t.at_most(
        "one process: near hit p50",
        "get served by the near tier, ms",
        None if near_hit is None else near_hit["near_hit_ms_p50"],
        NEAR_HIT_MS,
        " ms",
    )
    metrics = micro.get("metrics")
    t.at_most(
        "one process: warm hit, metrics on",
        "Prometheus collector registered vs none, extra time of the median, %",
        None if metrics is None else metrics["warm_hit"]["overhead_pct"],
        METRICS_HIT_PCT,
        " %",
    )
    t.at_most(
        "one process: near hit, metrics on",
        "Prometheus collector registered vs none, extra time of the median, ms",
        None if metrics is None else metrics["near_hit"]["extra_ms"],
        METRICS_NEAR_HIT_MS,
        " ms",
    )
    near = report.get("near")
    if near is not None:
        t.at_least(
            "near: throughput on / off",
            "reads per second, near tier on / off (medians)",
            _ratio(near["on"]["reads_per_s"], near["off"]["reads_per_s"]),
            NEAR_THROUGHPUT_RATIO,
            "x",
        )
        t.at_most(
            "near: stale reads (tier on)",
            "reads after the invalidation returned and was applied here, old value",
            near["on"]["stale_reads_total"],
            0,
            "",
        )
    expiring = report.get("expiry")
    if expiring is not None:
        t.at_most(
            "expiry: refreshes per expiry",
            "computations / expiries across the fleet, worst run (exactly 1.0 is the goal)",
            expiring["refreshes_per_expiry_worst"],
            1.0,
            "",
        )
        t.at_most(
            "expiry: caller p99 in refresh windows / warm-hit p99",
            "requests answered with a stale value vs the same load without expiry (medians)",
            _ratio(expiring["stale_ms_p99"], expiring["warm_hit_ms_p99"]),
            EXPIRY_P99_RATIO,
            "x",
        )
    local = report.get("local")
    if local is not None:
        for name, what, value, limit, unit in local_targets(local):
            t.at_most(name, what, value, limit, unit)
    fleet = report.get("fleet")
    if fleet is not None and "error" not in fleet:
        params = fleet["params"]
        keys = params["keys"]
        for design in ("minimal", "fleetcache"):
            each = fleet[design]["computations_each_run"]
            t.at_most(
                f"fleet: {design} computations - K",
                "most distance of a run's computations from the number of keys (exactly K)",
                None if not each else max(abs(c - keys) for c in each),
                0,
                "",
            )
            t.at_most(
                f"fleet: {design} errors",
                "failed requests, all runs",
                fleet[design]["errors_total"],
                0,
                "",
            )
            peak = fleet[design]["peak_backends"]
            t.at_most(
                f"fleet: {design} peak backends",
                f"server backends at the peak; the bound is 1 direct per process + the "
                f"pooler's pool + the bench's own {peak['own']}",
                peak["total"],
                params["processes"] + params["pooler_pool"] + (peak["own"] or 0),
                "",
            )
            t.at_most(
                f"fleet: {design} peak direct backends - P",
                "direct connections of the workers at the peak, minus one per process",
                None if peak["direct"] is None else peak["direct"] - params["processes"],
                0,
                "",
            )
    bounded = report.get("bounded")
    if bounded is not None:
        t.at_most(
            "bounded: table max / max_entries",
            f"count(*) sampled every max_entries/20 writes, {bounded['keys_written']} keys "
            f"into max_entries={bounded['max_entries']}",
            bounded["table_max_ratio"],
            BOUNDED_TABLE_RATIO,
            "x",
        )
        t.at_most(
            "bounded: write p50 at 10x / at 1x",
            f"write p50 {bounded['write_ms_p50_10x']} ms (last max_entries writes) / "
            f"{bounded['write_ms_p50_1x']} ms (first max_entries writes)",
            bounded["write_p50_ratio"],
            BOUNDED_WRITE_RATIO,
            "x",
        )
    synced = report.get("sync")
    if synced is not None and "error" not in synced:
        _sync_targets(t, synced)
    xmin = report.get("xmin")
    if xmin is not None:
        held = xmin["fleetcache"]
        t.at_most(
            "xmin during a long computation",
            "fleetcache: backends holding an xmin or idle in transaction while it computes",
            held["xmin_holders_max"] + held["idle_in_transaction_max"],
            0,
            "",
        )
    return t.rows


def _sync_targets(t: _Targets, synced: dict[str, Any]) -> None:
    """The targets of issue 19 (the ``sync`` scenario)."""
    hits = synced["hits"]
    t.at_most(
        "sync: warm hit sync / async",
        f"p50 of a sync get through Postgres ({hits['sync_warm_hit_ms_p50']} ms) / the "
        f"async get's ({hits['async_warm_hit_ms_p50']} ms), one cache, interleaved",
        hits["sync_over_async"],
        SYNC_HIT_RATIO,
        "x",
    )
    t.at_most(
        "sync: near hit p50",
        "a sync get served by the near tier on the calling thread, ms",
        hits["sync_near_hit_ms_p50"],
        SYNC_NEAR_HIT_MS,
        " ms",
    )
    cold = synced["stampede_sync_16x4"]
    t.at_most(
        "sync: 16 threads x 4 processes, one cold key",
        f"computations ({cold['callers']} callers, a 1 s computation)",
        cold["computations"],
        1,
        "",
    )
    get = synced["django_get"]
    t.at_most(
        "django: get fleetcache / DatabaseCache",
        f"p50 of cache.get on a warm key ({get['fleetcache_get_ms_p50']} ms / "
        f"{get['databasecache_get_ms_p50']} ms), same Postgres, interleaved",
        get["fleetcache_over_databasecache"],
        DJANGO_GET_RATIO,
        "x",
    )
    theirs = synced["django_get_or_set_databasecache_8x4"]
    t.at_most(
        "django: get_or_set 8 threads x 4 processes, one cold key",
        f"fleetcache's computations (DatabaseCache's: {theirs['computations']} for "
        f"{theirs['callers']} callers)",
        synced["django_get_or_set_fleetcache_8x4"]["computations"],
        1,
        "",
    )
