"""Measure one large invalidation on Postgres and what it does to another process's reads.

Process A fills namespace ``big`` with ``--entries`` entries that all depend on one name,
and namespace ``other`` with 200 entries; process B (``fleetcache.open`` with a small
pool) then writes to ``big`` from ``--writers`` tasks and reads (hits) ``other`` from
``--readers`` tasks, while A invalidates the shared name (the whole fan-out). Printed: how
long A's invalidation took (its lock is held for about that long) and the latency of B's
reads of the unrelated namespace that started while it ran.

    PYTHONPATH=src python scripts/measure_big_invalidation.py --entries 20000

Without ``--url`` an embedded PostgreSQL is started for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

import fleetcache
from fleetcache import Key, Produced
from fleetcache.stores.base import Entry
from fleetcache.stores.postgres import PostgresStore

BIG = "https://big.example/"
OTHER = "https://other.example/"
HUB = BIG + "hub.gts"


async def produce(key: Key) -> Produced[Any]:
    """Never called for the prefilled keys the reader reads."""
    return Produced(value={"computed": key.name})


async def child(url: str, pool_size: int, writers: int, readers: int) -> None:
    """Process B: write to ``big`` and read ``other`` between "go" and "stop" (stdin)."""
    cache = await fleetcache.open(url, pool_size=pool_size, coordinate=False)
    loop = asyncio.get_running_loop()
    keys = [Key(OTHER, f"{OTHER}o{i}") for i in range(200)]
    for key in keys:  # warm: every read below is a hit
        await cache.get(key, produce)
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    stop = asyncio.Event()
    samples: list[tuple[float, float]] = []
    writes = 0

    async def write(task: int) -> None:
        nonlocal writes
        n = 0
        while not stop.is_set():
            key = Key(BIG, f"{BIG}w{task}-{n % 50}")
            await cache.store.write(Entry(key, {"n": n}, created_at=int(time.time() * 1000)))
            writes += 1
            n += 1

    async def read(task: int) -> None:
        n = task
        while not stop.is_set():
            started = time.time()
            entry = await cache.get(keys[n % len(keys)], produce)
            samples.append((started, time.time() - started))
            assert entry is not None
            n += readers

    tasks = [asyncio.create_task(write(i)) for i in range(writers)]
    tasks += [asyncio.create_task(read(i)) for i in range(readers)]
    await loop.run_in_executor(None, sys.stdin.readline)
    stop.set()
    await asyncio.gather(*tasks)
    print(json.dumps({"samples": samples, "writes": writes}), flush=True)
    await cache.close()


async def fill(url: str, entries: int) -> PostgresStore:
    """A's store, with the fan-out in ``big`` and the unrelated entries in ``other``."""
    store = PostgresStore(url, max_size=8)
    await store.open()
    gate = asyncio.Semaphore(8)

    async def put(entry: Entry) -> None:
        async with gate:
            await store.write(entry)

    await asyncio.gather(
        *(
            put(Entry(Key(BIG, f"{BIG}c{i}.gts"), {"i": i}, deps=(HUB,), alias=f"{BIG}c{i}"))
            for i in range(entries)
        ),
        *(put(Entry(Key(OTHER, f"{OTHER}o{i}"), {"i": i})) for i in range(200)),
    )
    async with store.pool.connection() as conn:
        await conn.execute("ANALYZE fleetcache_entries")
    return store


async def measure(url: str, args: argparse.Namespace) -> None:
    """Run A here and B as a child process; print the figures."""
    began = time.perf_counter()
    store = await fill(url, args.entries)
    print(f"filled {args.entries} entries in {time.perf_counter() - began:.1f} s")
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, __file__, "--child", url, "--pool-size", str(args.pool_size)],
        *["--writers", str(args.writers), "--readers", str(args.readers)],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=1 << 30,  # the samples come back on one line
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        assert (await proc.stdout.readline()).strip() == b"ready"
        proc.stdin.write(b"go\n")
        await asyncio.sleep(1.0)
        started = time.time()
        names = await store.invalidate(BIG, [HUB])
        ended = time.time()
        await asyncio.sleep(1.0)
        proc.stdin.write(b"stop\n")
        result = json.loads(await proc.stdout.readline())
    finally:
        await asyncio.wait_for(proc.wait(), 60)
        await store.close()
    during = sorted(lat for at, lat in result["samples"] if started <= at <= ended)
    everything = sorted(lat for _, lat in result["samples"])
    print(
        f"invalidation: {len(names)} names in {ended - started:.2f} s "
        f"(B: pool_size={args.pool_size}, {args.writers} writers to {BIG}, "
        f"{args.readers} readers of {OTHER})"
    )
    if during:
        print(
            f"B's reads of {OTHER} started during it: {len(during)}, "
            f"median {during[len(during) // 2] * 1000:.1f} ms, max {during[-1] * 1000:.1f} ms"
        )
    else:
        print(f"B's reads of {OTHER} started during it: none")
    print(
        f"B overall: {len(everything)} reads, max {everything[-1] * 1000:.1f} ms; "
        f"{result['writes']} writes"
    )


def main() -> None:
    """Parse the arguments; run A (with an embedded server unless --url) or B."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--child", metavar="URL")
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child, args.pool_size, args.writers, args.readers))
        return
    server = None
    base = args.url
    if base is None:
        from fleetcache.embedded import start_embedded_postgres  # noqa: PLC0415 - optional

        server = start_embedded_postgres()
        base = server.conninfo
    name = f"fleetcache_measure_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        asyncio.run(measure(make_conninfo(base, dbname=name), args))
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
