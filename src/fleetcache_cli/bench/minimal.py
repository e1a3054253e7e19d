"""The minimal design (issue 11): the contender fleetcache is measured against.

About 120 lines of what a careful engineer would write without fleetcache:

* in-process single flight: callers of a key being loaded here join that load;
* a hit is one autocommit ``SELECT`` by primary key;
* a miss runs one short transaction on a pooled connection: ``BEGIN``;
  ``pg_try_advisory_xact_lock``; re-read; compute; ``INSERT``; ``pg_notify``; ``COMMIT``.
  The NOTIFY is delivered at the COMMIT, when the row is visible;
* a loser waits on the process's one LISTEN connection, holding no pooled connection,
  until the NOTIFY or a timeout, then reads again (at most ``max_rounds`` times).

What it does not do (and fleetcache does): refuse stale writes after an invalidation,
wake waiters of a holder that died, reconnect LISTEN, bound a computation, keep the
transaction short (the winner holds it open, idle, for the whole computation). Its table
is the bench's own, ``bench_minimal_entries``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

CHANNEL = "bench_minimal_populated"
CREATE_TABLE = """
    CREATE TABLE IF NOT EXISTS bench_minimal_entries (
        namespace text NOT NULL, name text NOT NULL, value jsonb NOT NULL,
        PRIMARY KEY (namespace, name))
"""
_SELECT = "SELECT value FROM bench_minimal_entries WHERE namespace = %(ns)s AND name = %(name)s"
_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(%(id)s)"
_INSERT = """
    INSERT INTO bench_minimal_entries (namespace, name, value)
    VALUES (%(ns)s, %(name)s, %(value)s) ON CONFLICT DO NOTHING
"""
_NOTIFY = "SELECT pg_notify(%(channel)s, %(payload)s)"

Key = tuple[str, str]  # (namespace, name)
Produce = Callable[[Key], Awaitable[Any]]


def lock_id(key: Key) -> int:
    """The key's advisory-lock id: 8 bytes of sha256 over its fields, as a signed int64."""
    digest = hashlib.sha256(json.dumps(list(key)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


#: The LISTEN connection's application_name (the bench counts it as a direct backend).
LISTEN_APPLICATION_NAME = "bench-minimal-listen"


class MinimalCache:
    """The minimal design over ``url``. ``on_commit(key)`` is called when a winner's COMMIT
    returned; ``on_wait(key, started, ended, reason)`` after each wait (in the waiting
    task). ``listen_url``: where the LISTEN connection goes (default ``url``: give the
    database itself when ``url`` is a transaction pooler, with ``prepared_statements``
    off). Use between ``await open()`` and ``await close()``."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int,
        listen_url: str | None = None,
        prepared_statements: bool = True,
        wait_timeout: float = 10.0,
        max_rounds: int = 4,
        on_commit: Callable[[Key], None] | None = None,
        on_wait: Callable[[Key, float, float, str], None] | None = None,
    ) -> None:
        self.url = url
        self.listen_url = url if listen_url is None else listen_url
        kwargs: dict[str, Any] = {"autocommit": True}
        if not prepared_statements:
            kwargs["prepare_threshold"] = None
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url, min_size=pool_size, max_size=pool_size, kwargs=kwargs, open=False
        )
        self._wait_timeout = wait_timeout
        self._max_rounds = max_rounds
        self._on_commit = on_commit
        self._on_wait = on_wait
        # Event loop only: loads under way by key, and waiting futures by lock id.
        self._flights: dict[Key, asyncio.Future[Any]] = {}
        self._waiters: dict[int, set[asyncio.Future[None]]] = {}
        self._listen: psycopg.AsyncConnection[Any] | None = None
        self._listener: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open the pool (every connection) and the LISTEN connection."""
        await self.pool.open(wait=True)
        self._listen = await psycopg.AsyncConnection.connect(
            self.listen_url, autocommit=True, application_name=LISTEN_APPLICATION_NAME
        )
        await self._listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
        self._listener = asyncio.create_task(self._listen_loop(self._listen))

    @property
    def listen_pid(self) -> int | None:
        """The server process id of the LISTEN connection (None before ``open()``)."""
        return None if self._listen is None else self._listen.info.backend_pid

    async def close(self) -> None:
        """Stop listening and close everything."""
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._listen is not None:
            await self._listen.close()
        await self.pool.close()

    async def _listen_loop(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async for note in conn.notifies():
            for future in self._waiters.pop(int(note.payload), ()):
                if not future.done():
                    future.set_result(None)

    async def get(self, key: Key, produce: Produce) -> Any:
        """The value of ``key``, computed once in the fleet on a miss."""
        flight = self._flights.get(key)
        if flight is None:
            value = await self._select(key)
            if value is not None:
                return value
            flight = self._flights.get(key)
            if flight is None:
                flight = asyncio.ensure_future(self._miss(key, produce))
                self._flights[key] = flight
                flight.add_done_callback(lambda f: self._forget(key, f))
        return await asyncio.shield(flight)

    def _forget(self, key: Key, flight: asyncio.Future[Any]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    async def _select(self, key: Key) -> Any:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(_SELECT, {"ns": key[0], "name": key[1]})).fetchone()
        return None if row is None else row[0]

    async def _miss(self, key: Key, produce: Produce) -> Any:
        lid = lock_id(key)
        params: dict[str, Any] = {"ns": key[0], "name": key[1], "id": lid}
        for _ in range(self._max_rounds):
            # Registered before the try-lock, so a NOTIFY right after a lost try is not missed.
            woken = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(lid, set()).add(woken)
            try:
                async with self.pool.connection() as conn:
                    await conn.execute("BEGIN")
                    try:
                        won = await (await conn.execute(_TRY_LOCK, params)).fetchone()
                        if won is not None and won[0]:
                            row = await (await conn.execute(_SELECT, params)).fetchone()
                            value = row[0] if row is not None else await produce(key)
                            if row is None:
                                await conn.execute(_INSERT, {**params, "value": Jsonb(value)})
                            payload = {"channel": CHANNEL, "payload": str(lid)}
                            await conn.execute(_NOTIFY, payload)
                        await conn.execute("COMMIT")
                    except BaseException:
                        await conn.execute("ROLLBACK")
                        raise
                if won is not None and won[0]:
                    if self._on_commit is not None:
                        self._on_commit(key)
                    return value
                started = time.time()
                try:
                    await asyncio.wait_for(asyncio.shield(woken), self._wait_timeout)
                    reason = "notify"
                except TimeoutError:
                    reason = "timeout"
                if self._on_wait is not None:
                    self._on_wait(key, started, time.time(), reason)
            finally:
                self._waiters.get(lid, set()).discard(woken)
            value = await self._select(key)
            if value is not None:
                return value
        raise TimeoutError(f"minimal design: gave up on {key} after {self._max_rounds} rounds")
