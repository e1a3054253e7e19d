"""The bench's tables, drawn with rich from the JSON report (nothing is computed here)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

_ROWS = (
    ("wall ms", "wall_ms"),
    ("CPU per request ms (process)", "cpu_per_request_ms"),
    ("machine CPU ms (all cores)", "machine_cpu_ms"),
    ("server CPU ms (the fleet's backends)", "server_cpu_ms"),
    ("  of which its direct connections", "server_direct_cpu_ms"),
    ("warm-hit p50 ms under load", "hit_ms_p50"),
    ("wake p50 ms (commit -> return)", "wake_ms_p50"),
    ("wake p99 ms", "wake_ms_p99"),
    ("wake p50 ms from compute end", "wake_from_compute_ms_p50"),
    ("request p50 ms", "request_ms_p50"),
    ("request p99 ms", "request_ms_p99"),
    ("statements per request", "statements_per_request"),
    ("NOTIFYs per fill (fleetcache)", "notifies_per_fill"),
    ("computations (each run)", "computations_each_run"),
    ("computations max per key", "computations_max_per_key_worst"),
    ("waiter connections held (max)", "waiter_connections_max"),
    ("wake reasons (all runs)", "wake_reasons"),
    ("failed requests", "failed_requests"),
)


def fmt(value: Any) -> str:
    """A cell."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, dict):
        return " ".join(f"{k} {v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return "/".join(str(v) for v in value)
    return str(value)


def _ratio(ours: Any, theirs: Any) -> str:
    if not isinstance(ours, int | float) or not isinstance(theirs, int | float) or theirs <= 0:
        return ""
    return f"{ours / theirs:.2f}x"


def render(report: dict[str, Any], console: Console) -> None:
    """Print every table of ``report``."""
    if not console.is_terminal:
        console.width = 160  # a file or a pipe: don't wrap the wide tables
    options = report["options"]
    scenarios: dict[str, Any] = report.get("scenarios", {})
    if scenarios:
        table = Table(
            title=f"fleet scenarios: medians of {options['repetitions']} run(s); "
            f"M = minimal design, F = fleetcache, F/M = ratio",
            title_justify="left",
        )
        table.add_column("metric", no_wrap=True)
        for name, scenario in scenarios.items():
            p = scenario["params"]
            head = f"{name}\nP={p['processes']} C={p['tasks']} K={p['keys']} D={p['compute_ms']:g}"
            table.add_column(f"{head}\nM", justify="right")
            table.add_column("\nF", justify="right")
            table.add_column("\nF/M", justify="right")
        for label, metric in _ROWS:
            cells = []
            for scenario in scenarios.values():
                ours, theirs = scenario["fleetcache"].get(metric), scenario["minimal"].get(metric)
                cells += [fmt(theirs), fmt(ours), _ratio(ours, theirs)]
            table.add_row(label, *cells)
        console.print(table)
    _render_micro(report.get("micro", {}), console)
    _render_near(report.get("near"), console)
    _render_expiry(report.get("expiry"), console)
    _render_xmin(report.get("xmin"), console)
    _render_local(report.get("local"), console)
    _render_fleet(report.get("fleet"), console)
    _render_bounded(report.get("bounded"), console)
    _render_sync(report.get("sync"), console)
    targets = Table(title="targets", title_justify="left")
    for column in ("target", "value", "threshold", "met", "missed by"):
        targets.add_column(column)
    for target in report["targets"]:
        met = target["met"]
        mark = "[green]met[/]" if met else ("[red]MISSED[/]" if met is False else "-")
        targets.add_row(
            target["name"], fmt(target["value"]), target["threshold"], mark,
            target["missed_by"] or "",
        )  # fmt: skip
    console.print(targets)
    for failure in report["failures"]:
        console.print(f"[red]failure:[/] {failure}")


def _render_micro(micro: dict[str, Any], console: Console) -> None:
    if not micro or "error" in micro:
        return
    table = Table(title="one process (medians, ms)", title_justify="left")
    for column in ("measure", "fleetcache", "raw SELECT", "minimal", "fleetcache / raw"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for rows in (50, 20_000):
        hit = micro[f"warm_hit_{rows}"]
        table.add_row(
            f"warm hit, {rows} rows in the namespace",
            fmt(hit["fleetcache_ms_p50"]),
            fmt(hit["raw_select_ms_p50"]),
            fmt(hit["minimal_ms_p50"]),
            f"{hit['ratio']:.2f}x",
        )
    miss = micro["uncontended_miss"]
    table.add_row(
        "uncontended miss (uncoordinated in the raw column)",
        fmt(miss["coordinated_ms_p50"]),
        fmt(miss["uncoordinated_ms_p50"]),
        fmt(miss["minimal_ms_p50"]),
        f"+{fmt(miss['extra_ms'])} ms",
    )
    statements = miss["statements"]
    table.add_row(
        "statements per miss (uncoordinated in the raw column)",
        fmt(statements["fleetcache"]["per_miss"]),
        fmt(statements["fleetcache_uncoordinated"]["per_miss"]),
        fmt(statements["minimal"]["per_miss"]),
        "",
    )
    near = micro["near_hit"]
    table.add_row(
        "near hit p50 / p99",
        f"{fmt(near['near_hit_ms_p50'])} / {fmt(near['near_hit_ms_p99'])}",
        "",
        "",
        "",
    )
    metrics = micro.get("metrics")
    if metrics is not None:
        for tier, what in (("warm_hit", "warm hit"), ("near_hit", "near hit")):
            row = metrics[tier]
            table.add_row(
                f"{what}, metrics on (metrics off in the raw column)",
                fmt(row["on_ms_p50"]),
                fmt(row["off_ms_p50"]),
                "",
                f"{row['extra_ms']:+g} ms",
            )
    console.print(table)


def _render_near(near: dict[str, Any] | None, console: Console) -> None:
    if near is None:
        return
    p = near["params"]
    table = Table(
        title=f"read-heavy (P={p['processes']} C={p['tasks']}, {p['keys']} warm keys, Zipf-like, "
        f"{p['invalidations_per_s']:g} invalidations/s, {p['seconds']:g} s; medians)",
        title_justify="left",
    )
    for column in ("near tier", "reads/s", "near hits", "invalidations", "stale reads (all runs)",
                   "window p50 ms", "window p99 ms"):  # fmt: skip
        table.add_column(column, justify="left" if column == "near tier" else "right")
    for mode in ("off", "on"):
        row = near[mode]
        table.add_row(
            mode,
            fmt(row["reads_per_s"]),
            fmt(row["near_hits"]),
            fmt(row["invalidations"]),
            fmt(row["stale_reads_total"]),
            fmt(row["window_ms_p50"]),
            fmt(row["window_ms_p99"]),
        )
    console.print(table)


def _render_expiry(expiring: dict[str, Any] | None, console: Console) -> None:
    if expiring is None:
        return
    p = expiring["params"]
    table = Table(
        title=f"expiry (P={p['processes']} C={p['tasks']}, {p['keys']} hot keys, ttl "
        f"{p['ttl']:g} s, stale window {p['stale_ttl']:g} s, computation {p['compute_ms']:g} ms, "
        f"{p['seconds']:g} s; medians, totals over runs)",
        title_justify="left",
    )
    columns = ("refreshes per expiry (worst)", "computations / expiries", "stale served",
               "waited", "refresh failures", "warm-hit p99 ms", "stale p50 / p99 ms")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(
        fmt(expiring["refreshes_per_expiry_worst"]),
        f"{expiring['computations_total']} / {expiring['expiries_total']}",
        fmt(expiring["stale_served_total"]),
        fmt(expiring["waited_total"]),
        fmt(expiring["refresh_failures_total"]),
        fmt(expiring["warm_hit_ms_p99"]),
        f"{fmt(expiring['stale_ms_p50'])} / {fmt(expiring['stale_ms_p99'])}",
    )
    console.print(table)


def _render_xmin(xmin: dict[str, Any] | None, console: Console) -> None:
    if xmin is None:
        return
    table = Table(
        title=f"during one {xmin['fleetcache']['computation_s']:g} s computation "
        f"(pg_stat_activity, every 50 ms)",
        title_justify="left",
    )
    for column in ("design", "xmin holders max", "age(backend_xmin) max", "idle in xact max",
                   "idle in xact s max", "xid holders max", "samples"):  # fmt: skip
        table.add_column(column, justify="left" if column == "design" else "right")
    for design in ("minimal", "fleetcache"):
        row = xmin[design]
        table.add_row(
            design,
            fmt(row["xmin_holders_max"]),
            fmt(row["xmin_age_max"]),
            fmt(row["idle_in_transaction_max"]),
            fmt(row["idle_in_transaction_s_max"]),
            fmt(row["xid_holders_max"]),
            fmt(row["samples"]),
        )
    console.print(table)


def _render_local(local: dict[str, Any] | None, console: Console) -> None:
    """The embedded sqlite file beside diskcache (the ``local`` scenario)."""
    if local is None:
        return
    p = local["params"]
    table = Table(
        title=f"local: one sqlite file, {p['processes']} processes x {p['tasks']} tasks x "
        f"{p['keys']} cold keys, D={p['compute_ms']:g} ms",
        title_justify="left",
    )
    for column in ("design", "computations", "max per key", "wall ms"):
        table.add_column(column, justify="right")
    for design in ("fleetcache", "diskcache_stampede", "diskcache_barrier"):
        cell = local[design]
        table.add_row(
            design, fmt(cell["computations"]), fmt(cell["max_per_key"]), fmt(cell["wall_ms"])
        )
    console.print(table)
    one = local["one_process"]
    console.print(
        f"SIGKILLed winner -> waiter computes: {local['takeover']['kill_to_compute_ms']} ms; "
        f"one process p50 (ms): hit sync {one['sync_hit_ms_p50']}, async "
        f"{one['async_hit_ms_p50']}, diskcache {one['diskcache_hit_ms_p50']}; miss async "
        f"{one['async_miss_ms_p50']}, sync {one['sync_miss_ms_p50']}, diskcache "
        f"{one['diskcache_miss_ms_p50']}"
    )


_FLEET_ROWS = (
    ("computations (each run)", "computations_each_run"),
    ("failed requests (all runs)", "errors_total"),
    ("computations in the warm phase", "warm_computations_total"),
    ("cold phase wall s", "cold_wall_s"),
    ("cold request p50 / p99 ms", ("cold_request_ms_p50", "cold_request_ms_p99")),
    ("notifies per fill", "notifies_per_fill"),
    ("warm hits/s", "hits_per_s"),
    ("warm hit p50 / p99 ms", ("hit_ms_p50", "hit_ms_p99")),
    ("process CPU per warm hit ms", "warm_cpu_per_hit_ms"),
)


def _render_fleet(fleet: dict[str, Any] | None, console: Console) -> None:
    if fleet is None or "error" in fleet:
        return
    p = fleet["params"]
    table = Table(
        title=f"fleet through PgBouncer (P={p['processes']} C={p['tasks']} K={p['keys']} "
        f"D={p['compute_ms']:g} ms, overlap {p['overlap']}, warm {p['warm_seconds']:g} s; "
        f"max_connections {p['max_connections']}, pooler pool {p['pooler_pool']}; "
        f"{p['budget']}; medians of {p['repetitions']})",
        title_justify="left",
    )
    for column in ("metric", "minimal", "fleetcache", "F/M"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for label, metric in _FLEET_ROWS:
        if isinstance(metric, tuple):
            designs = ("minimal", "fleetcache")
            cells = [" / ".join(fmt(fleet[d][m]) for m in metric) for d in designs]
            table.add_row(label, *cells, "")
            continue
        theirs, ours = fleet["minimal"][metric], fleet["fleetcache"][metric]
        table.add_row(label, fmt(theirs), fmt(ours), _ratio(ours, theirs))
    for part in ("total", "direct", "pooled", "own"):
        table.add_row(
            f"peak backends: {part}",
            fmt(fleet["minimal"]["peak_backends"][part]),
            fmt(fleet["fleetcache"]["peak_backends"][part]),
            "",
        )


def _render_bounded(bounded: dict[str, Any] | None, console: Console) -> None:
    if bounded is None:
        return
    table = Table(
        title=f"bounded table (max_entries={bounded['max_entries']}, "
        f"{bounded['keys_written']} distinct keys written by one process)",
        title_justify="left",
    )
    columns = ("write p50 1x ms", "write p50 10x ms", "10x / 1x", "write p99 1x ms",
               "write p99 10x ms", "table max", "max / max_entries", "samples")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(
        fmt(bounded["write_ms_p50_1x"]),
        fmt(bounded["write_ms_p50_10x"]),
        fmt(bounded["write_p50_ratio"]),
        fmt(bounded["write_ms_p99_1x"]),
        fmt(bounded["write_ms_p99_10x"]),
        fmt(bounded["table_max"]),
        fmt(bounded["table_max_ratio"]),
        fmt(bounded["samples"]),
    )
    console.print(table)


def _render_sync(synced: dict[str, Any] | None, console: Console) -> None:
    """The sync API and the Django backend (the ``sync`` scenario)."""
    if synced is None or "error" in synced:
        return
    hits, get = synced["hits"], synced["django_get"]
    table = Table(title="sync API and Django backend (p50 ms)", title_justify="left")
    for column in ("measure", "fleetcache", "baseline", "ratio"):
        table.add_column(column, justify="right")
    table.add_row(
        "warm hit: sync vs async get",
        fmt(hits["sync_warm_hit_ms_p50"]),
        fmt(hits["async_warm_hit_ms_p50"]),
        fmt(hits["sync_over_async"]),
    )
    table.add_row("near hit, sync", fmt(hits["sync_near_hit_ms_p50"]), "", "")
    table.add_row(
        "Django get vs DatabaseCache",
        fmt(get["fleetcache_get_ms_p50"]),
        fmt(get["databasecache_get_ms_p50"]),
        fmt(get["fleetcache_over_databasecache"]),
    )
    console.print(table)
    fleet = synced["django_get_or_set_fleetcache_8x4"]["computations"]
    theirs = synced["django_get_or_set_databasecache_8x4"]["computations"]
    console.print(
        f"one cold key, computations: sync API 16 threads x 4 processes "
        f"{synced['stampede_sync_16x4']['computations']}; Django get_or_set 8 threads x 4 "
        f"processes: fleetcache {fleet}, DatabaseCache {theirs}"
    )
