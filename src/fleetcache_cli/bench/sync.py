"""The sync scenario: the sync API and the Django backend, measured against their baselines.

``fleetcache bench --scenarios sync`` runs it (in a process of its own: it configures
Django); ``python -m fleetcache_cli.bench.sync [--database-url URL] [--json PATH]
[--iterations N] [--namespace NS]`` runs it alone (an embedded PostgreSQL when no URL is
given). Every ratio is taken in one run, the two sides interleaved in batches:

* sync warm hit through Postgres vs the async one (the same cache, pool and loop: the
  async hits are timed on the core's loop, the sync ones on the calling thread);
* sync near hit on the calling thread (p50/p99);
* 16 threads x 4 processes on one cold key (1 s produce): computations;
* Django: ``cache.get`` on a warm key, fleetcache's backend vs Django's ``DatabaseCache``
  on the same Postgres; ``get_or_set`` under a cold stampede of 4 processes x 8 threads
  (1 s callable), computations for each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fleetcache
from fleetcache import Key, Produced
from fleetcache_cli.shared import command_database, percentile

_DATABASE = "fleetcache_bench_sync"
#: The namespace of the standalone run's keys (the bench gives one per run).
NAMESPACE = "bench:sync"
#: The DatabaseCache table of the Django comparison (one of the bench's own tables).
DJANGO_TABLE = "bench_django_cache"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 4)


def _produce(key: Key) -> Produced[dict[str, Any]]:
    return Produced({"name": key.name, "rows": list(range(10))})


def hits(url: str, iterations: int, namespace: str = NAMESPACE) -> dict[str, Any]:
    """Sync vs async warm hits through Postgres, and sync near hits, in this process."""
    batch = 100
    sync_times: list[float] = []
    async_times: list[float] = []
    with fleetcache.open_sync(url, pool_size=2) as cache:
        key = Key(namespace, "warm")
        cache.get(key, _produce)
        lookup = cache.lookup

        async def produce_async(key: Key) -> Produced[Any]:
            return _produce(key)

        async def async_batch() -> list[float]:
            times = []
            for _ in range(batch):
                started = time.perf_counter()
                await lookup.get(key, produce_async)
                times.append(time.perf_counter() - started)
            return times

        for round_ in range(max(1, iterations // batch) + 1):
            got_async = cache.call(async_batch)
            got_sync = []
            for _ in range(batch):
                started = time.perf_counter()
                cache.get(key, _produce)
                got_sync.append(time.perf_counter() - started)
            if round_:  # the first round warms up
                async_times += got_async
                sync_times += got_sync
    near_times: list[float] = []
    with fleetcache.open_sync(url, pool_size=2, near=1000) as cache:
        key = Key(namespace, "near")
        cache.get(key, _produce)
        cache.get(key, _produce)
        for _ in range(iterations + iterations // 10):
            started = time.perf_counter()
            cache.get(key, _produce)
            near_times.append(time.perf_counter() - started)
        near_hits = cache.stats()["lookup"]["near_hits"]
    near_times = near_times[-iterations:]
    sync_p50 = percentile(sync_times, 50) or 0.0
    async_p50 = percentile(async_times, 50) or 0.0
    return {
        "iterations": len(sync_times),
        "sync_warm_hit_ms_p50": _ms(sync_p50),
        "async_warm_hit_ms_p50": _ms(async_p50),
        "sync_over_async": round(sync_p50 / async_p50, 3) if async_p50 else None,
        "sync_near_hit_ms_p50": _ms(percentile(near_times, 50)),
        "sync_near_hit_ms_p99": _ms(percentile(near_times, 99)),
        "near_hits": near_hits,
    }


def _django(url: str, namespace: str) -> None:
    """Configure Django in this process: ``fleet`` (fleetcache, its keys in namespace
    ``<namespace>:django``) and ``db`` (Django's DatabaseCache, its keys prefixed with
    ``namespace``) on the same Postgres."""
    import django  # noqa: PLC0415 - the django extra
    from django.conf import settings  # noqa: PLC0415
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    params = conninfo_to_dict(url)
    settings.configure(
        USE_TZ=True,
        CACHES={
            "fleet": {
                "BACKEND": "fleetcache.contrib.django.FleetcacheCache",
                "LOCATION": url,
                "OPTIONS": {"NAMESPACE": f"{namespace}:django"},
            },
            "db": {
                "BACKEND": "django.core.cache.backends.db.DatabaseCache",
                "LOCATION": DJANGO_TABLE,
                "KEY_PREFIX": namespace,
            },
        },
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": params["dbname"],
                "USER": params.get("user", ""),
                "PASSWORD": params.get("password", ""),
                "HOST": params.get("host", ""),
                "PORT": params.get("port", ""),
            }
        },
    )
    django.setup()


def django_gets(url: str, iterations: int) -> dict[str, Any]:
    """Django ``cache.get`` on a warm key: fleetcache's backend vs DatabaseCache."""
    from django.core.cache import caches  # noqa: PLC0415
    from django.core.management import call_command  # noqa: PLC0415

    call_command("createcachetable", verbosity=0)
    fleet, db = caches["fleet"], caches["db"]
    value = {"name": "warm", "rows": list(range(10))}
    fleet.set("warm", value, None)
    db.set("warm", value, None)
    times: dict[str, list[float]] = {"fleet": [], "db": []}
    batch = 100
    for round_ in range(max(1, iterations // batch) + 1):
        for name, backend in (("fleet", fleet), ("db", db)):
            for _ in range(batch):
                started = time.perf_counter()
                backend.get("warm")
                if round_:
                    times[name].append(time.perf_counter() - started)
    fleet_p50 = percentile(times["fleet"], 50) or 0.0
    db_p50 = percentile(times["db"], 50) or 0.0
    return {
        "iterations": len(times["fleet"]),
        "fleetcache_get_ms_p50": _ms(fleet_p50),
        "databasecache_get_ms_p50": _ms(db_p50),
        "fleetcache_over_databasecache": round(fleet_p50 / db_p50, 3) if db_p50 else None,
    }


def stampede(
    url: str, kind: str, processes: int, threads: int, namespace: str = NAMESPACE
) -> dict[str, Any]:
    """``processes`` OS processes x ``threads`` threads on one cold key with a 1 s
    computation; ``kind`` is ``sync`` (the sync API), ``django-fleet`` or ``django-db``."""
    with tempfile.TemporaryDirectory() as folder:
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fleetcache_cli.bench.sync",
                    "--worker",
                    kind,
                    url,
                    folder,
                    str(threads),
                    namespace,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(processes)
        ]
        deadline = time.monotonic() + 120
        while len(list(Path(folder).glob("ready-*"))) < processes:
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                for worker in workers:
                    worker.kill()
                raise RuntimeError(f"the {kind} stampede's workers did not start")
            time.sleep(0.01)
        (Path(folder) / "go").touch()
        answers = 0
        for worker in workers:
            out, err = worker.communicate(timeout=180)
            if worker.returncode != 0:
                raise RuntimeError(f"a {kind} stampede worker failed: {err}")
            answers += len(json.loads(out))
        log = Path(folder) / "computations.log"
        computations = len(log.read_text().split()) if log.exists() else 0
    return {
        "processes": processes,
        "threads": threads,
        "callers": answers,
        "computations": computations,
    }


def _worker(kind: str, url: str, folder: Path, threads: int, namespace: str) -> None:
    """One stampede process (see :func:`stampede`)."""

    def compute() -> dict[str, Any]:
        with (folder / "computations.log").open("a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return {"computed_by": os.getpid()}

    call: Callable[[], Any]
    closer: Callable[[], None] = lambda: None  # noqa: E731
    if kind == "sync":
        cache = fleetcache.open_sync(url)
        closer = cache.close
        call = lambda: cache.get_value(Key(namespace, "cold"), lambda _: Produced(compute()))  # noqa: E731
    else:
        _django(url, namespace)
        from django.core.cache import caches  # noqa: PLC0415

        backend = caches["fleet" if kind == "django-fleet" else "db"]
        backend.get("warm-up")
        call = lambda: backend.get_or_set("cold", compute, None)  # noqa: E731
    (folder / f"ready-{os.getpid()}").touch()
    while not (folder / "go").exists():
        time.sleep(0.002)
    got: list[Any] = []
    workers = [threading.Thread(target=lambda: got.append(call())) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    closer()
    print(json.dumps(got))


def measure(url: str, iterations: int, namespace: str) -> dict[str, Any]:
    """The whole scenario on ``url`` (configures Django in this process), its keys in
    ``namespace`` and ``<namespace>:django``, DatabaseCache's prefixed with it."""
    report: dict[str, Any] = {"hits": hits(url, iterations, namespace)}
    report["stampede_sync_16x4"] = stampede(url, "sync", 4, 16, namespace)
    _django(url, namespace)
    report["django_get"] = django_gets(url, iterations)
    from fleetcache.contrib.django import close_all  # noqa: PLC0415 - the django extra

    close_all()
    report["django_get_or_set_fleetcache_8x4"] = stampede(url, "django-fleet", 4, 8, namespace)
    report["django_get_or_set_databasecache_8x4"] = stampede(url, "django-db", 4, 8, namespace)
    return report


def run_apart(url: str, iterations: int, namespace: str, timeout: float) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter (Django's settings are per process; the
    bench's own process keeps none); its report, or RuntimeError with its output."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "sync.json"
        done = subprocess.run(
            [
                sys.executable, "-m", "fleetcache_cli.bench.sync", "--database-url", url,
                "--iterations", str(iterations), "--namespace", namespace, "--json", str(out),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"the sync scenario failed: {done.stderr.strip()[-2000:]}")
        report: dict[str, Any] = json.loads(out.read_text())
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the sync scenario; print (or write) its JSON report."""
    parser = argparse.ArgumentParser(prog="python -m fleetcache_cli.bench.sync")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--namespace", default=NAMESPACE)
    parser.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        kind, url, folder, threads, namespace = args.worker
        _worker(kind, url, Path(folder), int(threads), namespace)
        return 0
    with command_database(args.database_url, _DATABASE, max_connections=200) as (url, _):
        report = measure(url, args.iterations, args.namespace)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
