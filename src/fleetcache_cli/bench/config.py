"""The bench's options: scenarios, sizes, repetitions, and how ``--quick`` shrinks them."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from fleetcache.errors import ConfigurationError

#: The designs every fleet scenario runs, in the report's column order.
DESIGNS = ("minimal", "fleetcache")
SCENARIOS = ("default", "fast", "hotkey", "p16")


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
    near_keys: int
    near_seconds: float
    near_invalidations_per_s: float
    xmin_compute_s: float
    expiry_keys: int
    expiry_seconds: float
    quick: bool
    # The bounded-table scenario: max_entries, and 10x as many keys written.
    bounded_max_entries: int = 1_000
    # The expiry scenario's shape: a value lives EXPIRY_TTL s, then is served stale for
    # EXPIRY_STALE_TTL s while one process refreshes it (its computation EXPIRY_COMPUTE_MS).
    expiry_ttl: float = 0.5
    expiry_stale_ttl: float = 5.0
    expiry_compute_ms: float = 50.0
    # The fleet scenario (fleetcache_cli/bench/pooled_fleet.py): P x C x K through PgBouncer
    # on a dedicated server with max_connections = FLEET_MAX_CONNECTIONS.
    fleet_processes: int = 64
    fleet_tasks: int = 2
    fleet_keys: int = 10_000
    fleet_compute_ms: float = 5.0
    fleet_overlap: int = 2
    fleet_warm_seconds: float = 5.0
    fleet_repetitions: int = 1
    fleet_pool_size: int = 2
    fleet_pooler_pool: int = 20
    fleet_max_connections: int = 100

    @property
    def budget(self) -> int:
        """Backends per process, the same for both designs in the fleet scenarios: the
        pool, plus fleetcache's one session or the minimal design's LISTEN connection."""
        return self.pool_size + 1

    def scenario_list(self) -> list[Scenario]:
        """The selected fleet scenarios, in order."""
        p, c, k, d = self.processes, self.tasks, self.keys, self.compute_ms
        every = {
            "default": Scenario("default", p, c, k, d),
            "fast": Scenario("fast", p, c, k, self.fast_compute_ms),
            "hotkey": Scenario("hotkey", p, c, 1, d),
            "p16": Scenario("p16", 2 * p, c, k, d),
        }
        return [every[name] for name in self.scenarios if name in every]

    @property
    def near(self) -> bool:
        """Whether the read-heavy near-tier scenario runs."""
        return "near" in self.scenarios

    @property
    def expiry(self) -> bool:
        """Whether the expiry (stale-while-revalidate) scenario runs."""
        return "expiry" in self.scenarios

    @property
    def xmin(self) -> bool:
        """Whether the long-computation xmin probe runs."""
        return "xmin" in self.scenarios

    @property
    def local(self) -> bool:
        """Whether the embedded sqlite scenario (beside diskcache) runs."""
        return "local" in self.scenarios

    @property
    def postgres(self) -> bool:
        """Whether anything selected needs Postgres (all but ``local`` do)."""
        return any(name != "local" for name in self.scenarios)

    @property
    def bounded(self) -> bool:
        """Whether the bounded-table scenario runs."""
        return "bounded" in self.scenarios

    @property
    def micro(self) -> bool:
        """Whether the one-process micro-benchmarks run."""
        return "micro" in self.scenarios

    @property
    def sync(self) -> bool:
        """Whether the sync API and Django backend scenario runs."""
        return "sync" in self.scenarios

    @property
    def fleet(self) -> bool:
        """Whether the large fleet scenario through PgBouncer runs."""
        return "fleet" in self.scenarios


_ALL = (*SCENARIOS, "near", "expiry", "xmin", "bounded", "micro", "sync", "local", "fleet")
#: What --quick runs unless --scenarios says otherwise: everything but the large fleet.
_QUICK_SCENARIOS = tuple(s for s in _ALL if s != "fleet")
_FULL: dict[str, Any] = {
    "processes": 8,
    "tasks": 4,
    "keys": 50,
    "compute_ms": 200.0,
    "repetitions": 3,
    "micro_iterations": 2000,
    "near_keys": 1000,
    "near_seconds": 5.0,
    "xmin_compute_s": 2.0,
    "expiry_keys": 5,
    "expiry_seconds": 4.0,
    "bounded_max_entries": 10_000,
}
_QUICK: dict[str, Any] = {
    "processes": 4,
    "tasks": 2,
    "keys": 10,
    "compute_ms": 50.0,
    "repetitions": 1,
    "micro_iterations": 300,
    "near_keys": 200,
    "near_seconds": 1.5,
    "xmin_compute_s": 1.0,
    "expiry_keys": 3,
    "expiry_seconds": 2.0,
    "bounded_max_entries": 500,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="Postgres to bench on (default: $DATABASE_URL, else an embedded server started "
        "and stopped here). Only namespaces named bench:<run id>:... and the bench's own "
        "tables are written; the namespaces are deleted after each run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a reduced run (P=4 C=2 K=10 D=50, 1 repetition, short near and xmin phases, "
        "no fleet scenario)",
    )
    sizes = parser.add_argument_group("fleet shape (the default scenario; the others derive)")
    sizes.add_argument("--processes", "-P", type=_positive_int, help="worker processes (8)")
    sizes.add_argument("--tasks", "-C", type=_positive_int, help="asyncio tasks per process (4)")
    sizes.add_argument("--keys", "-K", type=_positive_int, help="distinct keys (50)")
    sizes.add_argument("--compute-ms", "-D", type=_non_negative, help="one computation, ms (200)")
    sizes.add_argument(
        "--fast-compute-ms", type=_non_negative, help="the fast scenario's D (default: D / 10)"
    )
    sizes.add_argument(
        "--scenarios",
        help=f"comma-separated subset of {','.join(_ALL)} (default: all; with --quick, all "
        "but fleet)",
    )
    big = parser.add_argument_group(
        "the fleet scenario (through PgBouncer, on its own server with max_connections = 100)"
    )
    big.add_argument("--fleet-processes", type=_positive_int, help="processes (64)")
    big.add_argument("--fleet-tasks", type=_positive_int, help="tasks per process (2)")
    big.add_argument("--fleet-keys", type=_positive_int, help="distinct keys (10000)")
    big.add_argument("--fleet-compute-ms", type=_non_negative, help="one computation, ms (5)")
    big.add_argument(
        "--fleet-overlap", type=_positive_int, help="tasks (of different processes) per key (2)"
    )
    big.add_argument(
        "--fleet-repetitions",
        type=_positive_int,
        help="runs per design (1: its targets are exact counts, and one run takes minutes)",
    )
    big.add_argument(
        "--fleet-warm-seconds", type=_positive, help="how long the warm phase reads (5)"
    )
    big.add_argument(
        "--fleet-pool-size", type=_positive_int, help="pool per process, through the pooler (2)"
    )
    big.add_argument(
        "--fleet-pooler-pool", type=_positive_int, help="PgBouncer's default_pool_size (20)"
    )
    runs = parser.add_argument_group("repetition and output")
    runs.add_argument("--repetitions", "-R", type=_positive_int, help="runs per cell (3)")
    runs.add_argument(
        "--micro-iterations", type=_positive_int, help="timed iterations per micro-benchmark"
    )
    runs.add_argument(
        "--pool-size",
        type=_positive_int,
        help="pool per process in the fleet scenarios, both designs (default: tasks); each "
        "design adds one connection (fleetcache's session, the minimal design's LISTEN), so "
        "the budget of backends per process is pool + 1 for both",
    )
    runs.add_argument("--seed", type=int, default=0, help="seed of request orders (0)")
    runs.add_argument(
        "--run-timeout", type=_positive, default=120.0, help="seconds one run may take (120)"
    )
    runs.add_argument("--near-keys", type=_positive_int, help="warm keys of the near scenario")
    runs.add_argument("--near-seconds", type=_positive, help="how long the near scenario reads")
    runs.add_argument(
        "--near-invalidations-per-s",
        type=_positive,
        default=5.0,
        help="invalidations per second in the near scenario (5)",
    )
    runs.add_argument("--xmin-compute-s", type=_positive, help="the xmin probe's computation")
    runs.add_argument("--expiry-keys", type=_positive_int, help="hot keys of the expiry scenario")
    runs.add_argument("--expiry-seconds", type=_positive, help="how long the expiry scenario reads")
    runs.add_argument(
        "--bounded-max-entries",
        type=_positive_int,
        help="max_entries of the bounded scenario (10 x as many keys are written)",
    )
    runs.add_argument(
        "--json", metavar="PATH", help="write the JSON report here ('-' or unset: stdout)"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    """The effective options: explicit flags win over ``--quick``, which wins over the full
    run's defaults."""
    base = _QUICK if args.quick else _FULL

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return base[name] if value is None else value

    if args.scenarios is None:
        scenarios = _QUICK_SCENARIOS if args.quick else _ALL
    else:
        scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = [s for s in scenarios if s not in _ALL]
    if unknown or not scenarios:
        raise ConfigurationError(
            f"--scenarios takes a comma-separated subset of {','.join(_ALL)}; got "
            f"{args.scenarios!r}"
        )
    fleet = {
        name: getattr(args, name)
        for name in (
            "fleet_processes",
            "fleet_tasks",
            "fleet_keys",
            "fleet_compute_ms",
            "fleet_overlap",
            "fleet_warm_seconds",
            "fleet_pool_size",
            "fleet_pooler_pool",
            "fleet_repetitions",
        )
        if getattr(args, name, None) is not None
    }
    compute_ms = float(pick("compute_ms"))
    tasks = int(pick("tasks"))
    return BenchConfig(
        processes=int(pick("processes")),
        tasks=tasks,
        keys=int(pick("keys")),
        compute_ms=compute_ms,
        fast_compute_ms=compute_ms / 10 if args.fast_compute_ms is None else args.fast_compute_ms,
        repetitions=int(pick("repetitions")),
        micro_iterations=int(pick("micro_iterations")),
        pool_size=args.pool_size if args.pool_size is not None else tasks,
        scenarios=scenarios,
        seed=args.seed,
        run_timeout=args.run_timeout,
        near_keys=int(pick("near_keys")),
        near_seconds=float(pick("near_seconds")),
        near_invalidations_per_s=args.near_invalidations_per_s,
        xmin_compute_s=float(pick("xmin_compute_s")),
        expiry_keys=int(pick("expiry_keys")),
        expiry_seconds=float(pick("expiry_seconds")),
        quick=args.quick,
        **fleet,
        bounded_max_entries=int(pick("bounded_max_entries")),
    )
