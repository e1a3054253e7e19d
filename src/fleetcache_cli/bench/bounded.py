"""A bounded table (issue 18, item 3): one process writes ``multiple`` x ``max_entries``
distinct keys, one after another, into a Postgres store bounded to ``max_entries``.

Every write is timed (``PostgresStore.write``: the write function and, every
``check_every`` writes, the look at the size that may start a background eviction). The
table is counted (``count(*)``, not the store's own counts) after every twentieth of
``max_entries`` writes: ``table_max`` is the largest count. "Write p50 at 1x" is over the
first ``max_entries`` writes (the table filling, nothing evicted), "at 10x" over the last
``max_entries`` (the table full, evicting all along; "at 2x", the second
``max_entries``, shows whether the cost grows with what was written); all after a warm-up
of 200 writes (deleted before the timed ones).

It runs in a schema of its own (created and dropped here), so it never evicts anything
of the database's own fleetcache table.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from fleetcache.stores.base import Entry, Key
from fleetcache.stores.postgres import PostgresStore
from fleetcache_cli.shared import percentile

_COUNT = "SELECT count(*) FROM {}"
_WARM_UP = 200


def _ms(values: list[float], pct: float) -> float | None:
    found = percentile(values, pct)
    return None if found is None else round(found * 1000, 3)


async def measure_bounded(
    url: str, run_id: str, max_entries: int, multiple: int = 10
) -> dict[str, Any]:
    """The figures of one bounded run (see the module)."""
    schema = f"fleetcache_bench_bounded_{run_id.replace('-', '')[:16]}"
    table = sql.Identifier(schema, "fleetcache_entries")
    count = sql.SQL(_COUNT).format(table)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            # The triggers keeping the counts name their table unqualified: this session's
            # deletes must count in the bench's schema, not the database's own.
            await admin.execute("SELECT set_config('search_path', %s, false)", [schema])
            store = PostgresStore(
                make_conninfo(url, options=f"-c search_path={schema}"),
                max_size=4,
                max_entries=max_entries,
                invalidated_channel=None,
            )
            await store.open()
            try:
                every = max(1, max_entries // 20)
                pad = "x" * 200
                timings: list[float] = []
                samples: list[int] = []
                namespace = f"bench:{run_id}:bounded"
                # Warm-up (connections, plans), then deleted: the timed writes start on an
                # empty table, as warm as they will be.
                for n in range(_WARM_UP):
                    await store.write(Entry(Key(namespace, f"warm{n}"), n, created_at=0))
                await admin.execute(sql.SQL("DELETE FROM {}").format(table))
                began = time.perf_counter()
                for n in range(multiple * max_entries):
                    entry = Entry(
                        Key(namespace, f"k{n}"),
                        {"n": n, "pad": pad},
                        created_at=int(time.time() * 1000),
                    )
                    start = time.perf_counter()
                    await store.write(entry)
                    timings.append(time.perf_counter() - start)
                    if (n + 1) % every == 0:
                        row = await (await admin.execute(count)).fetchone()
                        samples.append(int(row[0]) if row else 0)
                took = time.perf_counter() - began
                await store.close()  # ends a background eviction
                row = await (await admin.execute(count)).fetchone()
                final = int(row[0]) if row else 0
            finally:
                await store.close()
        finally:
            await admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    first, second, last = (
        timings[:max_entries],
        timings[max_entries : 2 * max_entries],
        timings[-max_entries:],
    )
    p50_1x, p50_10x = _ms(first, 50), _ms(last, 50)
    table_max = max(samples, default=0)
    return {
        "max_entries": max_entries,
        "keys_written": len(timings),
        "writes_per_s": round(len(timings) / took, 1) if took > 0 else None,
        "write_ms_p50_1x": p50_1x,
        "write_ms_p99_1x": _ms(first, 99),
        "write_ms_p50_2x": _ms(second, 50),
        "write_ms_p50_10x": p50_10x,
        "write_ms_p99_10x": _ms(last, 99),
        "write_p50_ratio": (round(p50_10x / p50_1x, 3) if p50_1x and p50_10x is not None else None),
        "samples": len(samples),
        "table_max": table_max,
        "table_max_ratio": round(table_max / max_entries, 4),
        "table_final": final,
    }
