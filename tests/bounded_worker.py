"""One writer of the bounded-table fleet test, as its own OS process
(``test_bounded_table.py``).

Usage: ``bounded_worker.py URL PREFIX COUNT MAX_ENTRIES``: writes COUNT distinct keys
(``PREFIX<n>``) into a Postgres store bounded to MAX_ENTRIES, one after another, then
prints how many it wrote and exits.
"""

from __future__ import annotations

import asyncio
import sys
import time

from fleetcache.stores.base import Entry, Key
from fleetcache.stores.postgres import PostgresStore


async def main(url: str, prefix: str, count: int, max_entries: int) -> None:
    """Write the keys; print how many were written."""
    store = PostgresStore(url, max_size=2, max_entries=max_entries)
    await store.open()
    written = 0
    try:
        for n in range(count):
            entry = Entry(Key("fleet", f"{prefix}{n}"), n, created_at=int(time.time() * 1000))
            written += await store.write(entry)
    finally:
        await store.close()
    print(written, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
