"""The ``local`` scenario: the embedded default (one sqlite file shared by the processes of
one machine, no server) beside diskcache, the sqlite-backed cache Python users pick.

* fan-out: P processes x C tasks (threads for diskcache) x K cold keys, D ms computations,
  on one file: computations counted for fleetcache, diskcache's ``memoize_stampede`` and
  its ``barrier`` recipe (a cross-process ``diskcache.Lock`` around ``memoize``);
* takeover: a winner killed with SIGKILL while another process waits for its key: how long
  from the kill until the waiter starts computing;
* one process: warm-hit p50 (sync API and async API) and miss p50 (compute nothing +
  store), beside diskcache's ``memoize_stampede`` hit and miss.

Worker processes run ``python -m fleetcache_cli.bench.local ROLE ...`` and log every
computation as one line (``O_APPEND``) in a file of the run's folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
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

NS = "bench-local"
DESIGNS = ("fleetcache", "diskcache_stampede", "diskcache_barrier")
#: Targets of issue 23.
HIT_SYNC_RATIO = 1.5
HIT_ASYNC_RATIO = 2.5
MISS_RATIO = 2.0
TAKEOVER_MS = 1000.0


def _log(folder: Path, name: str) -> None:
    with (folder / "computations.log").open("a") as out:
        out.write(f"{os.getpid()} {name}\n")


def _await_file(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.002)


# ---------------------------------------------------------------------- worker roles


def _fanout_worker(design: str, folder: Path, tasks: int, keys: int, compute_ms: float) -> None:
    """One process of the fan-out: ready file, go file, then every task gets every key."""
    if design == "fleetcache":
        asyncio.run(_fanout_fleetcache(folder, tasks, keys, compute_ms))
        return
    import diskcache  # noqa: PLC0415 - an optional bench dependency
    from diskcache.recipes import barrier, memoize_stampede  # noqa: PLC0415

    cache = diskcache.Cache(str(folder / "diskcache"))

    def compute(name: str) -> str:
        _log(folder, name)
        time.sleep(compute_ms / 1000)
        return name

    if design == "diskcache_stampede":
        fn = memoize_stampede(cache, expire=3600)(compute)
    else:
        fn = barrier(cache, diskcache.Lock)(cache.memoize(expire=3600)(compute))
    (folder / f"ready-{os.getpid()}").touch()
    _await_file(folder / "go")
    threads = [
        threading.Thread(target=lambda: [fn(f"k{i}") for i in range(keys)]) for _ in range(tasks)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.close()


async def _fanout_fleetcache(folder: Path, tasks: int, keys: int, compute_ms: float) -> None:
    async def produce(key: Key) -> Produced[str]:
        _log(folder, key.name)
        await asyncio.sleep(compute_ms / 1000)
        return Produced(key.name)

    async with fleetcache.open(f"sqlite:///{folder / 'cache.db'}", wait_timeout=60.0) as cache:
        (folder / f"ready-{os.getpid()}").touch()
        await asyncio.to_thread(_await_file, folder / "go")

        async def task() -> None:
            for i in range(keys):
                await cache.get_value(Key(NS, f"k{i}"), produce)

        await asyncio.gather(*(task() for _ in range(tasks)))


async def _takeover_worker(role: str, folder: Path) -> None:
    """``hold``: compute the key forever (the parent kills us). ``wait``: get the key once
    ``held`` exists; say when the lock was lost (``lost``); log the time our own
    computation started (``computed``)."""

    async def produce(key: Key) -> Produced[str]:
        if role == "hold":
            (folder / "held").touch()
            await asyncio.sleep(3600)
        (folder / "computed").write_text(repr(time.time()))
        return Produced(role)

    async with fleetcache.open(
        f"sqlite:///{folder / 'cache.db'}", wait_timeout=30.0, compute_timeout=600.0
    ) as cache:
        if role == "hold":
            await cache.get_value(Key(NS, "victim"), produce)
            return
        await asyncio.to_thread(_await_file, folder / "held")
        got = asyncio.create_task(cache.get_value(Key(NS, "victim"), produce))
        while not got.done() and cache.stats()["coordinator"]["lock_lost"] < 1:  # noqa: ASYNC110 - a counter, no event to await
            await asyncio.sleep(0.001)
        (folder / "lost").touch()
        await got


# ---------------------------------------------------------------------- the parent


def _computations(folder: Path) -> dict[str, int]:
    log = folder / "computations.log"
    counts: dict[str, int] = {}
    for line in log.read_text().split("\n") if log.exists() else ():
        if line:
            name = line.split()[1]
            counts[name] = counts.get(name, 0) + 1
    return counts


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fleetcache_cli.bench.local", *args])


def fanout(design: str, processes: int, tasks: int, keys: int, compute_ms: float) -> dict[str, Any]:
    """One fan-out run of ``design`` on a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="fleetcache-local-") as where:
        folder = Path(where)
        workers = [
            _spawn("fanout", design, where, str(tasks), str(keys), str(compute_ms))
            for _ in range(processes)
        ]
        try:
            deadline = time.monotonic() + 60
            while len(list(folder.glob("ready-*"))) < processes:
                if time.monotonic() > deadline or any(w.poll() for w in workers):
                    raise RuntimeError(f"the {design} fan-out workers did not get ready")
                time.sleep(0.005)
            started = time.perf_counter()
            (folder / "go").touch()
            codes = [w.wait(timeout=300) for w in workers]
            wall_ms = (time.perf_counter() - started) * 1000
        finally:
            for w in workers:
                w.kill()
                w.wait()
        counts = _computations(folder)
    return {
        "computations": sum(counts.values()),
        "max_per_key": max(counts.values(), default=0),
        "wall_ms": round(wall_ms, 1),
        "failed_workers": sum(1 for code in codes if code != 0),
    }


def takeover() -> dict[str, Any]:
    """A winner killed with SIGKILL while another process waits: kill -> waiter computes."""
    with tempfile.TemporaryDirectory(prefix="fleetcache-local-") as where:
        folder = Path(where)
        holder = _spawn("hold", where)
        waiter = _spawn("wait", where)
        try:
            _await_file(folder / "lost")
            killed = time.time()
            holder.send_signal(signal.SIGKILL)
            code = waiter.wait(timeout=60)
            computed = float((folder / "computed").read_text())
        finally:
            for process in (holder, waiter):
                process.kill()
                process.wait()
    return {"kill_to_compute_ms": round((computed - killed) * 1000, 2), "waiter_exit": code}


def _p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 4)


def _timed(fn: Callable[[int], object], iterations: int) -> list[float]:
    samples = []
    for i in range(iterations):
        began = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - began)
    return samples


async def _timed_async(fn: Callable[[int], Any], iterations: int) -> list[float]:
    samples = []
    for i in range(iterations):
        began = time.perf_counter()
        await fn(i)
        samples.append(time.perf_counter() - began)
    return samples


def one_process(iterations: int, warm_keys: int = 200) -> dict[str, Any]:
    """Warm-hit and miss p50 of fleetcache (sync and async) and diskcache, one process."""
    import diskcache  # noqa: PLC0415 - an optional bench dependency
    from diskcache.recipes import memoize_stampede  # noqa: PLC0415

    misses = max(50, iterations // 4)
    with tempfile.TemporaryDirectory(prefix="fleetcache-local-") as where:
        cache = diskcache.Cache(str(Path(where) / "diskcache"))
        stamped = memoize_stampede(cache, expire=3600)(lambda x: {"v": x})
        for i in range(warm_keys):
            stamped(i)
        dc_hit = _timed(lambda i: stamped(i % warm_keys), iterations)
        dc_miss = _timed(lambda i: stamped(warm_keys + i), misses)
        cache.close()

        def sprod(key: Key) -> Produced[dict[str, str]]:
            return Produced({"v": key.name})

        with fleetcache.open_sync(f"sqlite:///{where}/sync.db") as sync_cache:
            for i in range(warm_keys):
                sync_cache.get_value(Key(NS, f"k{i}"), sprod)
            sync_hit = _timed(
                lambda i: sync_cache.get_value(Key(NS, f"k{i % warm_keys}"), sprod), iterations
            )
            sync_miss = _timed(lambda i: sync_cache.get_value(Key(NS, f"m{i}"), sprod), misses)

        async def measure() -> tuple[list[float], list[float]]:
            async def prod(key: Key) -> Produced[dict[str, str]]:
                return Produced({"v": key.name})

            async with fleetcache.open(f"sqlite:///{where}/async.db") as c:
                for i in range(warm_keys):
                    await c.get_value(Key(NS, f"k{i}"), prod)
                hit = await _timed_async(
                    lambda i: c.get_value(Key(NS, f"k{i % warm_keys}"), prod), iterations
                )
                miss = await _timed_async(lambda i: c.get_value(Key(NS, f"m{i}"), prod), misses)
            return hit, miss

        async_hit, async_miss = asyncio.run(measure())
    return {
        "iterations": iterations,
        "diskcache_hit_ms_p50": _p50_ms(dc_hit),
        "diskcache_miss_ms_p50": _p50_ms(dc_miss),
        "sync_hit_ms_p50": _p50_ms(sync_hit),
        "async_hit_ms_p50": _p50_ms(async_hit),
        "sync_miss_ms_p50": _p50_ms(sync_miss),
        "async_miss_ms_p50": _p50_ms(async_miss),
    }


def local_benchmarks(
    iterations: int,
    progress: Callable[[str], None],
    *,
    processes: int = 4,
    tasks: int = 4,
    keys: int = 20,
    compute_ms: float = 50.0,
) -> dict[str, Any]:
    """The whole ``local`` scenario (blocking: run it in a thread from a loop)."""
    report: dict[str, Any] = {
        "params": {"processes": processes, "tasks": tasks, "keys": keys, "compute_ms": compute_ms}
    }
    for design in DESIGNS:
        progress(f"local: fan-out {design} ({processes} x {tasks} x {keys} keys)")
        report[design] = fanout(design, processes, tasks, keys, compute_ms)
    progress("local: SIGKILLed winner")
    report["takeover"] = takeover()
    progress("local: one process, warm hits and misses")
    report["one_process"] = one_process(iterations)
    return report


def local_targets(local: dict[str, Any]) -> list[tuple[str, str, float | None, float, str]]:
    """Issue 23's targets: (name, description, value, limit, unit), each at most ``limit``."""
    one = local["one_process"]

    def ratio(ours: str, theirs: str) -> float | None:
        return round(one[ours] / one[theirs], 3) if one[theirs] > 0 else None

    keys = local["params"]["keys"]
    return [
        (
            "local: computations - K",
            "fleetcache computations for the cold keys minus keys (each computed once)",
            local["fleetcache"]["computations"] - keys,
            0,
            "",
        ),
        (
            "local: SIGKILLed winner -> waiter computes",
            "ms from the kill to the waiting process's computation",
            local["takeover"]["kill_to_compute_ms"],
            TAKEOVER_MS,
            " ms",
        ),
        (
            "local: sync warm hit / diskcache",
            "p50 of open_sync get_value hits / memoize_stampede hits",
            ratio("sync_hit_ms_p50", "diskcache_hit_ms_p50"),
            HIT_SYNC_RATIO,
            "x",
        ),
        (
            "local: async warm hit / diskcache",
            "p50 of await get_value hits / memoize_stampede hits",
            ratio("async_hit_ms_p50", "diskcache_hit_ms_p50"),
            HIT_ASYNC_RATIO,
            "x",
        ),
        (
            "local: miss / diskcache",
            "p50 of an async miss (instant compute + store) / memoize_stampede miss",
            ratio("async_miss_ms_p50", "diskcache_miss_ms_p50"),
            MISS_RATIO,
            "x",
        ),
        (
            "local: sync miss / diskcache",
            "p50 of an open_sync miss (instant compute + store) / memoize_stampede miss",
            ratio("sync_miss_ms_p50", "diskcache_miss_ms_p50"),
            MISS_RATIO,
            "x",
        ),
    ]


def main(argv: list[str]) -> None:
    """A worker process's entry point (see the module docstring)."""
    role, rest = argv[0], argv[1:]
    if role == "fanout":
        design, folder, tasks, keys, compute_ms = rest
        _fanout_worker(design, Path(folder), int(tasks), int(keys), float(compute_ms))
    elif role in ("hold", "wait"):
        asyncio.run(_takeover_worker(role, Path(rest[0])))
    else:  # the parent, by hand: print the scenario's report
        print(json.dumps(local_benchmarks(2000, print), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
