"""``fleetcache demo``: a fleet of processes coalescing on a real Postgres.

What it does, with no arguments:

1. starts an embedded PostgreSQL (or uses ``--database-url``/``DATABASE_URL``) and a
   simulated prerender server with a module graph (40 modules in a public and a private
   realm, with imports between them, a few requested without extension, two that fail);
2. spawns 4 worker processes that all look up every module's definitions at the same
   moment on a cold cache — once with cross-process coordination off, once with it on,
   and once more on the embedded default (one sqlite file, no server, coordinated by
   file locks) — and prints the three runs side by side;
3. one process edits a leaf module and invalidates it while the others keep reading, with
   the near tier on (hits served from process memory, kept coherent by the invalidation
   broadcast): every process ends with the new version, the dependents are rendered again
   exactly once, no stale row remains, and no read that began after its process had heard
   of the invalidation returned the old version;
4. one process changes a row of an application table and invalidates the value computed
   from it *in the same transaction* (``invalidate(..., conn=)``), several times, while
   the other processes read that value: no read that began after a commit returns a value
   from before it.

It exits 1 if the coordinated run rendered any module more than once, or if the
invalidation act found a process with an old version, a stale read or a stale row, or the
transaction act a stale read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql as psycopg_sql
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import fleetcache
from fleetcache.contrib import prometheus
from fleetcache.definitions import (
    CachingDefinitionLookup,
    HttpPrerenderer,
    ModuleDefinitions,
    Realm,
)
from fleetcache.definitions.testing import (
    ModuleSpec,
    SimulatedPrerenderControl,
    SimulatedPrerenderServer,
)
from fleetcache.definitions.urls import trim_executable_extension
from fleetcache.errors import FleetcacheError
from fleetcache_cli.shared import Fleet, WorkerContext, command_database, percentile

DEFAULT_PROCESSES = 4
DEFAULT_MODULES = 40
DEFAULT_LATENCY_MS = 250
# How long the invalidation act lets the readers read, and when the editor edits.
ACT_SECONDS = 3.0
EDIT_AT_SECONDS = 0.8
#: How many entries each process's near tier keeps during the act (more than the demo has).
NEAR_ENTRIES = 10_000
# The transaction act: how long the processes read, how many commits the editor makes.
TXN_ACT_SECONDS = 1.5
TXN_EDITS = 10
#: The namespace and name of the value the transaction act computes from its row.
TXN_NAMESPACE = "fleetcache-demo-prices"
TXN_NAME = "price:1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    parser.add_argument(
        "--processes", type=_at_least(2), default=DEFAULT_PROCESSES, help="worker processes"
    )
    parser.add_argument(
        "--modules", type=_at_least(4), default=DEFAULT_MODULES, help="modules in the graph"
    )
    parser.add_argument(
        "--latency-ms",
        type=_at_least(0),
        default=DEFAULT_LATENCY_MS,
        help="simulated prerender time per module",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="Postgres to use (default: $DATABASE_URL, else an embedded server)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")


def _at_least(low: int) -> Any:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


# ------------------------------------------------------------------ the module graph


@dataclass(frozen=True, slots=True)
class Graph:
    """The demo's realms and modules: ``files`` are the URLs the prerenderer knows,
    ``requests`` the URLs the workers look up (some without extension)."""

    realms: tuple[Realm, ...]
    files: dict[str, ModuleSpec]
    requests: tuple[str, ...]
    failing: tuple[str, ...]
    leaf: str

    def dependents_of(self, url: str) -> set[str]:
        """Every file that imports ``url``, transitively."""
        found: set[str] = set()
        frontier = {url}
        while frontier:
            frontier = {
                file
                for file, spec in self.files.items()
                if file not in found and frontier.intersection(spec.imports)
            }
            found |= frontier
        return found


def build_graph(modules: int, run_id: str, seed: int = 4645) -> Graph:
    """A realistic graph: two realms, each module importing up to two recent ones of its
    realm, every fifth module a ``.ts`` file requested without extension, and one failing
    module per realm."""
    rng = random.Random(seed)
    base = f"https://demo.fleetcache.example/{run_id}/"
    realms = (
        Realm(base + "public/", "public", "@demo-owner"),
        Realm(base + "private/", "private", "@demo-owner"),
    )
    files: dict[str, ModuleSpec] = {}
    requests: list[str] = []
    failing: list[str] = []
    for r, realm in enumerate(realms):
        count = modules // 2 + (modules % 2 if r == 0 else 0)
        urls: list[str] = []
        for i in range(count):
            extension = ".ts" if i % 5 == 4 else ".gts"
            url = f"{realm.url}card-{i:02d}{extension}"
            window = urls[max(0, i - 6) : i]
            imports = rng.sample(window, k=min(len(window), rng.choice((0, 1, 2, 2))))
            fail = None
            if i == count - 3:  # late in the realm, so few modules import it
                fail = f"SyntaxError: unexpected token in {url.rsplit('/', 1)[1]}"
                failing.append(url)
            elif i == count - 1 and failing[-1] not in imports:  # one that fails through it
                imports.append(failing[-1])
            files[url] = ModuleSpec([f"Card{i:02d}", f"Card{i:02d}Embedded"], imports, fail)
            requests.append(trim_executable_extension(url) if extension == ".ts" else url)
            urls.append(url)
    graph = Graph(realms, files, tuple(requests), tuple(failing), leaf="")
    public = [u for u in files if u.startswith(realms[0].url) and u.endswith(".gts")]
    leaf = max(
        (u for u in public if not graph.dependents_of(u).intersection(failing)),
        key=lambda u: len(graph.dependents_of(u)),
    )
    return Graph(realms, files, tuple(requests), tuple(failing), leaf)


# ------------------------------------------------------------------ worker jobs


@dataclass(frozen=True, slots=True)
class Job:
    """What a worker process needs: where everything is and what to do."""

    database_url: str
    prerender_url: str
    realms: tuple[Realm, ...]
    requests: tuple[str, ...]
    coordinate: bool
    seed: int
    leaf: str = ""
    editor: bool = False
    edited_spec: ModuleSpec | None = None
    pool_size: int = 16
    near: int | None = None
    table: str = ""


def demo_auth(realm_url: str, user_id: str) -> str:
    """The prerender auth token the demo sends (the simulated server only checks that one
    is there; the seed's system mints a signed token for the user here)."""
    return f"demo-token:{user_id}"


async def _open(
    job: Job,
) -> tuple[fleetcache.Fleetcache, CachingDefinitionLookup, HttpPrerenderer, CollectorRegistry]:
    cache = await fleetcache.open(
        job.database_url, coordinate=job.coordinate, pool_size=job.pool_size, near=job.near
    )
    # The table's figures come from the cache's Prometheus metrics, scraped at the end.
    registry = CollectorRegistry()
    prometheus.register(cache, name="demo", registry=registry)
    prerenderer = HttpPrerenderer(job.prerender_url, auth=demo_auth)
    lookup = CachingDefinitionLookup(cache, prerenderer)
    for realm in job.realms:
        lookup.register_realm(realm)
    return cache, lookup, prerenderer, registry


async def _look_up(lookup: CachingDefinitionLookup, url: str) -> tuple[str, str, float]:
    """One lookup: (url, outcome, seconds); outcome ok / error (a cached render error) /
    none (no such module) / raised (an exception reached the caller)."""
    url, outcome, seconds, _ = await _look_up_version(lookup, url)
    return url, outcome, seconds


async def _look_up_version(
    lookup: CachingDefinitionLookup, url: str
) -> tuple[str, str, float, list[int]]:
    """As :func:`_look_up`, plus the versions of the definitions the lookup returned."""
    started = time.perf_counter()
    module = None
    try:
        module = await lookup.get_cached_definitions(url)
    except FleetcacheError:
        outcome = "raised"
    else:
        outcome = "none" if module is None else ("error" if module.error else "ok")
    return url, outcome, time.perf_counter() - started, versions_of(module)


def versions_of(module: ModuleDefinitions | None) -> list[int]:
    """The versions the simulated prerenderer stamped on a module's definitions."""
    if module is None:
        return []
    return sorted(
        {
            d["definition"]["version"]
            for d in module.definitions.values()
            if d["type"] == "definition"
        }
    )


async def fan_out(ctx: WorkerContext, job: Job) -> dict[str, Any]:
    """Look up every module at once on a cold cache; report outcomes and counters."""
    cache, lookup, prerenderer, registry = await _open(job)
    try:
        order = list(job.requests)
        random.Random(job.seed).shuffle(order)
        await ctx.ready()
        results = await asyncio.gather(*(_look_up(lookup, url) for url in order))
        finished = time.time()
        return {
            "results": results,
            "finished": finished,
            "stats": cache.stats(),
            "metrics": generate_latest(registry).decode(),
        }
    finally:
        await prerenderer.aclose()
        await cache.close()


async def keep_reading(ctx: WorkerContext, job: Job) -> dict[str, Any]:
    """Read every module over and over for the act's duration; the editor edits the leaf
    and invalidates it part way. Report the leaf version this process ends up with, every
    read of the leaf (when it began, which versions it returned) and when this process
    heard of the invalidation (the editor: when its own ``invalidate`` returned; a peer:
    when its listener applied the broadcast)."""
    cache, lookup, prerenderer, registry = await _open(job)
    heard: list[float] = []
    hear = cache.lookup.on_names_invalidated

    def heard_names(namespace: str, names: Sequence[str]) -> None:
        hear(namespace, names)  # evicts first: a read that begins after this sees it
        if job.leaf in names:
            heard.append(time.time())

    # The listener calls the lookup's on_names_invalidated for every peer broadcast; this
    # wrapper (an instance attribute, so only this process's lookup) notes when.
    cache.lookup.on_names_invalidated = heard_names  # type: ignore[method-assign]
    leaf_reads: list[tuple[float, list[int]]] = []

    async def read(url: str) -> None:
        started = time.time()
        _, _, _, versions = await _look_up_version(lookup, url)
        if url == job.leaf:
            leaf_reads.append((started, versions))

    try:
        release = await ctx.ready()
        invalidated: list[str] = []
        invalidated_at: float | None = None
        if job.editor:
            assert job.edited_spec is not None
            await asyncio.sleep(max(0.0, release + EDIT_AT_SECONDS - time.time()))
            async with SimulatedPrerenderControl(job.prerender_url) as control:
                await control.set_module(job.leaf, job.edited_spec)
            invalidated = await lookup.invalidate(job.leaf)
            invalidated_at = time.time()
            heard.append(invalidated_at)
        reads = 0
        while time.time() < release + ACT_SECONDS:
            await asyncio.gather(*(read(url) for url in job.requests))
            reads += len(job.requests)
        final = await lookup.get_cached_definitions(job.leaf)
        return {
            "reads": reads,
            "leaf_versions": versions_of(final),
            "leaf_reads": leaf_reads,
            "heard_at": min(heard, default=None),
            "invalidated": invalidated,
            "invalidated_at": invalidated_at,
            "stats": cache.stats(),
            "metrics": generate_latest(registry).decode(),
        }
    finally:
        await prerenderer.aclose()
        await cache.close()


async def read_while_committing(ctx: WorkerContext, job: Job) -> dict[str, Any]:
    """The transaction act in one process: read the value computed from the row over and
    over; the editor instead updates the row and invalidates the value in one transaction
    ``TXN_EDITS`` times, noting in the row's ``committed`` column, once each commit has
    returned, the version committed. A read is stale if it returns a version older than
    the ``committed`` it saw before it began."""
    table = psycopg_sql.Identifier(job.table)
    data = await psycopg.AsyncConnection.connect(job.database_url, autocommit=True)
    cache = await fleetcache.open(job.database_url, pool_size=4)
    key = fleetcache.Key(TXN_NAMESPACE, TXN_NAME)

    async def produce(_key: fleetcache.Key) -> fleetcache.Produced[int]:
        query = psycopg_sql.SQL("SELECT version FROM {} WHERE id = 1").format(table)
        row = await (await data.execute(query)).fetchone()
        assert row is not None
        await asyncio.sleep(random.uniform(0, 0.005))  # widens the race with the editor
        return fleetcache.Produced(value=row[0])

    reads = stale = 0
    try:
        release = await ctx.ready()
        if job.editor:
            rng = random.Random(job.seed)
            app = await psycopg.AsyncConnection.connect(job.database_url)
            try:
                for version in range(1, TXN_EDITS + 1):
                    await asyncio.sleep(rng.uniform(0, TXN_ACT_SECONDS / TXN_EDITS))
                    async with app.transaction():  # the change and its invalidation commit together
                        update = psycopg_sql.SQL("UPDATE {} SET version = %s WHERE id = 1")
                        await app.execute(update.format(table), (version,))
                        await cache.invalidate(TXN_NAMESPACE, [TXN_NAME], conn=app)
                    mark = psycopg_sql.SQL("UPDATE {} SET committed = %s WHERE id = 1")
                    await data.execute(mark.format(table), (version,))
            finally:
                await app.close()
            return {"reads": 0, "stale": 0}
        seen = psycopg_sql.SQL("SELECT committed FROM {} WHERE id = 1").format(table)
        while time.time() < release + TXN_ACT_SECONDS:
            row = await (await data.execute(seen)).fetchone()
            assert row is not None
            value = await cache.get_value(key, produce)
            reads += 1
            # None: overtaken by a commit on every attempt, so it answered with what the
            # store holds, nothing yet (a documented limit, never a stale value).
            stale += value is not None and value < row[0]
        return {"reads": reads, "stale": stale}
    finally:
        await cache.close()
        await data.close()


# ------------------------------------------------------------------ the parent


@dataclass(slots=True)
class Outcome:
    """What the demo found, for the table, the JSON and the exit code."""

    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    act: dict[str, Any] = field(default_factory=dict)
    txn_act: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def summarise_fan_out(
    answers: Sequence[dict[str, Any]], renders: dict[str, int], release: float
) -> dict[str, Any]:
    """One run's row of the table."""
    latencies = [seconds for answer in answers for _, _, seconds in answer["results"]]
    outcomes = Counter(outcome for answer in answers for _, outcome, _ in answer["results"])
    total = sum(renders.values())
    return {
        "prerenders": total,
        "max_per_module": max(renders.values(), default=0),
        "modules_rendered": len(renders),
        "duplicates": total - len(renders),
        "rendered_more_than_once": {url: n for url, n in sorted(renders.items()) if n > 1},
        "wall_s": round(max(a["finished"] for a in answers) - release, 3),
        "latency_p50_ms": round((percentile(latencies, 50) or 0) * 1000, 1),
        "latency_p99_ms": round((percentile(latencies, 99) or 0) * 1000, 1),
        "woken_notify": scraped(answers, "fleetcache_waits_total", woken_by="notify"),
        "woken_timeout": scraped(answers, "fleetcache_waits_total", woken_by="timeout"),
        "woken_probe": scraped(answers, "fleetcache_waits_total", woken_by="probe"),
        "coalesced_in_process": scraped(answers, "fleetcache_gets_total", outcome="coalesced"),
        "waited_for_another_process": scraped(answers, "fleetcache_gets_total", outcome="waited"),
        "computations": scraped(answers, "fleetcache_computations_total", outcome="ok")
        + scraped(answers, "fleetcache_computations_total", outcome="error_cached"),
        "lookups": dict(outcomes),
        "errors": outcomes.get("raised", 0),
    }


async def run_demo(args: argparse.Namespace, url: str, console: Console) -> Outcome:
    """Both fan-out runs and the invalidation act."""
    run_id = uuid.uuid4().hex[:8]
    graph = build_graph(args.modules, run_id)
    outcome = Outcome()
    server = SimulatedPrerenderServer(graph.files, latency=args.latency_ms / 1000)
    async with (
        contextlib.AsyncExitStack() as stack,
        server,
        fleetcache.open(url, coordinate=False) as admin,
    ):
        definitions = CachingDefinitionLookup(
            admin, HttpPrerenderer(server.base_url, auth=demo_auth)
        )
        fleet: Fleet[Job, dict[str, Any]] = Fleet(args.processes, name="fleetcache-demo")
        with (
            fleet,
            Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} prerenders"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
                disable=args.json,
            ) as progress,
        ):
            # The same fleet on the embedded default: one sqlite file, no server (its
            # processes coordinate through the lock file beside it).
            where = tempfile.TemporaryDirectory(prefix="fleetcache-demo-")
            stack.callback(where.cleanup)
            sqlite_url = f"sqlite:///{Path(where.name) / 'demo.db'}"
            for mode, coordinate, database in (
                ("uncoordinated", False, url),
                ("coordinated", True, url),
                ("sqlite", True, sqlite_url),
            ):
                for realm in graph.realms if database == url else ():
                    # Cold on Postgres; the sqlite file is new (and Postgres stays warm
                    # for the act that follows).
                    await definitions.clear_realm_definitions(realm.url)
                server.reset_renders()
                jobs = [
                    Job(database, server.base_url, graph.realms, graph.requests, coordinate, seed=i)
                    for i in range(args.processes)
                ]
                task = progress.add_task(
                    f"{args.processes} processes x {len(graph.requests)} modules, {mode}",
                    total=len(graph.requests) * (1 if coordinate else args.processes),
                )
                release: list[float] = []
                answers = await _with_progress(
                    fleet.run(fan_out, jobs, on_release=release.append), server, progress, task
                )
                outcome.runs[mode] = summarise_fan_out(answers, server.render_counts(), release[0])
                progress.remove_task(task)
            outcome.act = await _invalidation_act(
                args, url, graph=graph, server=server, fleet=fleet, progress=progress
            )
            outcome.txn_act = await _transaction_act(args, url, run_id, fleet=fleet)
        await definitions.prerenderer.aclose()  # type: ignore[attr-defined]
        for realm in graph.realms:  # leave nothing behind in a database we were given
            await definitions.clear_realm_definitions(realm.url)
    for mode in ("coordinated", "sqlite"):
        if outcome.runs[mode]["max_per_module"] > 1:
            outcome.problems.extend(
                f"the {mode} run rendered {url} {n} times"
                for url, n in outcome.runs[mode]["rendered_more_than_once"].items()
            )
    for mode, row in outcome.runs.items():
        if row["errors"]:
            outcome.problems.append(f"{row['errors']} lookups raised in the {mode} run")
    outcome.problems.extend(outcome.act["problems"])
    if outcome.txn_act["stale_reads"]:
        outcome.problems.append(
            f"{outcome.txn_act['stale_reads']} reads in the transaction act returned a value "
            "from before a commit that had returned when they began"
        )
    return outcome


async def _transaction_act(
    args: argparse.Namespace, url: str, run_id: str, *, fleet: Fleet[Job, dict[str, Any]]
) -> dict[str, Any]:
    """A row change and its invalidation commit together while the fleet reads."""
    name = f"fleetcache_demo_rows_{run_id}"
    table = psycopg_sql.Identifier(name)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        create = "CREATE TABLE {} (id int PRIMARY KEY, version int, committed int)"
        await conn.execute(psycopg_sql.SQL(create).format(table))
        await conn.execute(psycopg_sql.SQL("INSERT INTO {} VALUES (1, 0, 0)").format(table))
        try:
            jobs = [
                Job(url, "", (), (), coordinate=True, seed=i, editor=i == 0, table=name)
                for i in range(args.processes)
            ]
            answers = await fleet.run(read_while_committing, jobs)
        finally:
            await conn.execute(psycopg_sql.SQL("DROP TABLE {}").format(table))
        async with fleetcache.open(url) as cache:
            await cache.clear_namespace(TXN_NAMESPACE)
    return {
        "commits": TXN_EDITS,
        "readers": args.processes - 1,
        "reads": sum(a["reads"] for a in answers),
        "stale_reads": sum(a["stale"] for a in answers),
    }


async def _with_progress(
    work: Any, server: SimulatedPrerenderServer, progress: Progress, task: Any
) -> list[dict[str, Any]]:
    """Await ``work`` while showing the prerenders the server has received."""
    pending = asyncio.ensure_future(work)
    while not pending.done():
        progress.update(task, completed=sum(server.render_counts().values()))
        await asyncio.wait({pending}, timeout=0.1)
    result: list[dict[str, Any]] = pending.result()
    return result


async def _invalidation_act(
    args: argparse.Namespace,
    url: str,
    *,
    graph: Graph,
    server: SimulatedPrerenderServer,
    fleet: Fleet[Job, dict[str, Any]],
    progress: Progress,
) -> dict[str, Any]:
    """Edit the leaf while every process reads; check versions, renders and rows."""
    server.reset_renders()
    old = graph.files[graph.leaf]
    edited = ModuleSpec([*old.exports, "CardExtra"], old.imports)
    jobs = [
        Job(
            url,
            server.base_url,
            graph.realms,
            graph.requests,
            coordinate=True,
            seed=i,
            leaf=graph.leaf,
            editor=i == 0,
            edited_spec=edited,
            near=NEAR_ENTRIES,
        )
        for i in range(args.processes)
    ]
    task = progress.add_task("one process edits a leaf module while all keep reading", total=None)
    answers = await _with_progress(fleet.run(keep_reading, jobs), server, progress, task)
    progress.remove_task(task)
    new_version = server.module_version(graph.leaf)
    editor = answers[0]
    expected = {graph.leaf} | graph.dependents_of(graph.leaf)
    # Requests without extension first probe the missing x.gts candidate: those renders
    # are of URLs that are not files, and are reported apart.
    renders = {u: n for u, n in server.render_counts().items() if u in graph.files}
    problems = [
        f"process {i} ended with leaf versions {a['leaf_versions']}, not [{new_version}]"
        for i, a in enumerate(answers)
        if a["leaf_versions"] != [new_version]
    ]
    rerendered = {u: renders.get(u, 0) for u in sorted(expected)}
    problems += [
        f"{u} was rendered {n} times after the edit" for u, n in rerendered.items() if n != 1
    ]
    problems += [f"{u} was rendered though not invalidated" for u in set(renders) - expected]
    rows = await _rows(url, [realm.url for realm in graph.realms])
    invalidated_ms = editor["invalidated_at"] * 1000
    stale = [u for u in expected if u in rows and (rows[u] or 0) < invalidated_ms]
    problems += [f"stale row left for {u}" for u in sorted(stale)]
    stale_reads = count_stale_reads(answers, editor["invalidated_at"], new_version)
    problems += [
        f"process {i} read an old version of {graph.leaf} {n} time(s) after it had heard of "
        f"the invalidation"
        for i, n in enumerate(stale_reads)
        if n
    ]
    return {
        "leaf": graph.leaf,
        "failing": list(graph.failing),
        "new_version": new_version,
        "dependents": len(expected) - 1,
        "rerendered": rerendered,
        "reads": sum(a["reads"] for a in answers),
        "versions_seen": [a["leaf_versions"] for a in answers],
        "stale_rows": stale,
        "near_hits": scraped(answers, "fleetcache_gets_total", outcome="near_hit"),
        "leaf_reads": sum(len(a["leaf_reads"]) for a in answers),
        "stale_reads": sum(stale_reads),
        "problems": problems,
    }


def scraped(answers: Sequence[dict[str, Any]], name: str, **labels: str) -> int:
    """A series summed over the processes' scrapes (their exposition texts, parsed back
    with prometheus_client's parser)."""
    total = 0.0
    for answer in answers:
        for family in text_string_to_metric_families(answer["metrics"]):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
    return round(total)


def count_stale_reads(
    answers: Sequence[dict[str, Any]], invalidated_at: float, new_version: int
) -> list[int]:
    """Per process, the reads of the leaf that began after the editor's ``invalidate``
    returned *and* after this process heard of it, yet returned another version than the
    new one. (A process that never heard of it has every read after the return counted:
    the broadcast reaching every process is part of the guarantee.)"""
    counts = []
    for answer in answers:
        since = max(invalidated_at, answer["heard_at"] or invalidated_at)
        counts.append(
            sum(
                1
                for started, versions in answer["leaf_reads"]
                if started > since and versions != [new_version]
            )
        )
    return counts


#: When each cached row of the demo's realms was written (to find stale rows).
_ROWS_WRITTEN = "SELECT name, created_at FROM fleetcache_entries WHERE namespace = ANY(%(realms)s)"


async def _rows(url: str, realms: list[str]) -> dict[str, int | None]:
    """created_at of every row of the demo's realms, by module URL."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(_ROWS_WRITTEN, {"realms": realms})
        return {row[0]: row[1] for row in await cursor.fetchall()}


# ------------------------------------------------------------------ output


def render(outcome: Outcome, args: argparse.Namespace, console: Console) -> None:
    """The side-by-side table, the act's result and what the numbers mean."""
    plain, coord = outcome.runs["uncoordinated"], outcome.runs["coordinated"]
    local = outcome.runs["sqlite"]
    table = Table(title=f"{args.processes} processes look up {args.modules} modules at once")
    table.add_column("")
    table.add_column("coordination off", justify="right")
    table.add_column("coordination on", justify="right")
    table.add_column("sqlite file (no server)", justify="right")
    rows = [
        ("prerenders in total", "prerenders"),
        ("most prerenders of one module", "max_per_module"),
        ("duplicate prerenders", "duplicates"),
        ("wall time (s)", "wall_s"),
        ("lookup latency p50 (ms)", "latency_p50_ms"),
        ("lookup latency p99 (ms)", "latency_p99_ms"),
        ("waiters woken by NOTIFY", "woken_notify"),
        ("waiters woken by timeout", "woken_timeout"),
        ("waiters woken by crash probe", "woken_probe"),
        ("callers coalesced in process", "coalesced_in_process"),
        ("lookups that waited for another process", "waited_for_another_process"),
        ("computations stored (ok or error)", "computations"),
        ("lookups that raised", "errors"),
    ]
    for label, key in rows:
        table.add_row(label, str(plain[key]), str(coord[key]), str(local[key]))
        if key == "duplicates":
            avoided = plain["prerenders"] - coord["prerenders"]
            table.add_row(
                "prerenders avoided by coordination",
                "-",
                str(avoided),
                str(plain["prerenders"] - local["prerenders"]),
            )
    table.add_row(
        "lookups answered with a render error",
        str(plain["lookups"].get("error", 0)),
        str(coord["lookups"].get("error", 0)),
        str(local["lookups"].get("error", 0)),
    )
    act = outcome.act
    table.add_row(
        "act: reads served from memory (near tier) / stale reads",
        "-",
        f"{act['near_hits']:,} of {act['reads']:,} / {act['stale_reads']} stale",
        "-",
    )
    console.print(table)
    console.print(
        f"Invalidation act: one process edited [bold]{act['leaf']}[/] (now version "
        f"{act['new_version']}) and invalidated it while {args.processes} processes made "
        f"{act['reads']} reads. Every process ended on version(s) "
        f"{sorted({v for vs in act['versions_seen'] for v in vs})}; the module and its "
        f"{act['dependents']} dependents were rendered again "
        f"{sorted(set(act['rerendered'].values()))} time(s) each; stale rows left: "
        f"{len(act['stale_rows'])}. With the near tier on, {act['near_hits']} of the "
        f"{act['reads']} reads were served from process memory, and of the "
        f"{act['leaf_reads']} reads of the edited module, {act['stale_reads']} that began "
        f"after its process had heard of the invalidation returned the old version."
    )
    avoided = plain["prerenders"] - coord["prerenders"]
    console.print(
        f"\nWhat it means: without coordination each of the {args.processes} processes asked "
        f"the prerenderer for every module itself ({plain['prerenders']} prerenders for "
        f"{plain['modules_rendered']} URLs). With coordination one process rendered each "
        f"module while the others waited on LISTEN, holding no database connection, and "
        f"read its row when NOTIFY said it was committed: {coord['prerenders']} prerenders, "
        f"{avoided} avoided. The render errors are the {len(act['failing'])} broken modules "
        f"and the modules importing them, cached for 30 s like any entry. An invalidation "
        f"reaches every process, and a computation that started before it can never write "
        f"its stale result back. On the embedded sqlite file, with no server, the same "
        f"processes rendered {local['prerenders']} times for {local['modules_rendered']} "
        f"URLs: a waiting process blocks on the winner's byte of a lock file beside the "
        f"database and the kernel wakes it when the winner lets go (or dies). The near "
        f"tier keeps copies in each process's memory and "
        f"drops them the moment the invalidation's broadcast arrives (or empties itself if "
        f"its LISTEN connection drops), so reads skip the database without going stale."
    )
    txn = outcome.txn_act
    console.print(
        f"\nTransaction act: one process changed a row and invalidated the value computed "
        f"from it in the same transaction, {txn['commits']} times, while {txn['readers']} "
        f"processes made {txn['reads']} reads of that value: {txn['stale_reads']} stale "
        f"reads (a read is stale if it returned a value older than a commit that had "
        f"returned before the read began). The invalidation commits with the change, so "
        f"a read that begins after the commit never gets the old value (this act reads "
        f"through the store; a near tier adds its broadcast window)."
    )
    for problem in outcome.problems:
        console.print(f"[bold red]problem:[/] {problem}")


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when coordination rendered each module once and the act held."""
    console = Console(stderr=args.json)
    try:
        with command_database(args.database_url, "fleetcache_demo") as (url, embedded):
            if not args.json:
                where = "an embedded PostgreSQL" if embedded else "the given database"
                console.print(f"fleetcache demo on {where}; prerender latency {args.latency_ms} ms")
            outcome = asyncio.run(run_demo(args, url, console))
    except (FleetcacheError, psycopg.Error) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 2
    if args.json:
        doc = {
            "runs": outcome.runs,
            "act": outcome.act,
            "txn_act": outcome.txn_act,
            "problems": outcome.problems,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        render(outcome, args, console)
    return 1 if outcome.problems else 0
