"""A fleet member for the application-transaction tests, run as its own OS process.

``reader URL NS``: reads ``price:1`` through ``fleetcache.open(URL)`` (computed from the
application's row ``txn_app_rows``) until ``txn_app_marker.stop``; before each read it
notes the version the writer last saw committed (``txn_app_marker.committed``, set right
after each commit returns), and counts a read that returns an older version as stale.
Prints one JSON line: reads, reads that began after a commit, stale, and reads answered
None (overtaken by invalidations on every attempt: answered with what the store holds).

``hold URL NS NAME``: opens an application transaction, invalidates NAME in it, prints
``ready`` and waits to be killed (never commits).

``sql-writer URL MODE NS TRIALS SEED``: plain psycopg, no fleetcache imported: TRIALS
times, updates the row in one transaction that calls ``fleetcache_invalidate`` (MODE
``function``) or fires the table's trigger (MODE ``trigger``), then sets the marker;
prints ``done``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

import psycopg


async def reader(url: str, ns: str) -> None:
    import fleetcache
    from fleetcache.lookup.populate import Produced
    from fleetcache.stores.base import Key

    data = await psycopg.AsyncConnection.connect(url, autocommit=True)
    key = Key(ns, "price:1")

    async def produce(_key: Key) -> Any:
        row = await (await data.execute("SELECT version FROM txn_app_rows WHERE id = 1")).fetchone()
        assert row is not None
        # A pause after reading widens the window in which the row may change.
        await asyncio.sleep(random.uniform(0, 0.005))
        return Produced(value={"version": row[0]})

    reads = after_commit = stale = overtaken = 0
    async with await fleetcache.open(url) as cache:
        marker = await psycopg.AsyncConnection.connect(url, autocommit=True)
        while True:
            row = await (
                await marker.execute("SELECT committed, stop FROM txn_app_marker")
            ).fetchone()
            assert row is not None
            committed, stop = row
            if stop:
                break
            value = await cache.get_value(key, produce)
            reads += 1
            if value is None:
                # Overtaken by an invalidation on each of its attempts: it answers with what
                # the store holds, here nothing (a documented limit; never a stale value).
                overtaken += 1
                continue
            if committed >= 0:
                after_commit += 1
                if value["version"] < committed:
                    stale += 1
        await marker.close()
    await data.close()
    result = {"reads": reads, "after_commit": after_commit, "stale": stale, "none": overtaken}
    print(json.dumps(result), flush=True)


async def hold(url: str, ns: str, name: str) -> None:
    from fleetcache.stores.postgres import PostgresStore

    store = PostgresStore(url)
    await store.open()
    conn = await psycopg.AsyncConnection.connect(url)
    async with conn.transaction():
        await conn.execute("UPDATE txn_app_rows SET version = version + 1 WHERE id = 1")
        await store.invalidate(ns, [name], conn=conn)
        print("ready", flush=True)
        await asyncio.sleep(3600)  # killed before this ends: the transaction never commits


def sql_writer(url: str, mode: str, ns: str, trials: int, seed: int) -> None:
    # Plain psycopg: the invalidation is the SQL function's (or the trigger's) alone.
    rng = random.Random(seed)
    with psycopg.connect(url, autocommit=True) as marker, psycopg.connect(url) as conn:
        for trial in range(1, trials + 1):
            time.sleep(rng.uniform(0, 0.03))
            with conn.transaction():
                conn.execute("UPDATE txn_app_rows SET version = %s WHERE id = 1", (trial,))
                time.sleep(rng.uniform(0, 0.01))
                if mode == "function":
                    conn.execute("SELECT fleetcache_invalidate(%s, ARRAY['price:1'])", (ns,))
                time.sleep(rng.uniform(0, 0.01))
            marker.execute("UPDATE txn_app_marker SET committed = %s", (trial,))
    assert not any(m.startswith("fleetcache") for m in sys.modules)
    print("done", flush=True)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "reader":
        asyncio.run(reader(sys.argv[2], sys.argv[3]))
    elif command == "hold":
        asyncio.run(hold(sys.argv[2], sys.argv[3], sys.argv[4]))
    elif command == "sql-writer":
        sql_writer(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        raise SystemExit(f"unknown command {command!r}")
