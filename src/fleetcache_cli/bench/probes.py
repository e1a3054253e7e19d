"""What the bench watches inside a process, without changing what it measures.

* :class:`StatementCounter` counts the statements psycopg sends from this process, by
  wrapping ``psycopg.AsyncCursor.execute`` (``AsyncConnection.execute`` goes through it, so
  every statement of the store, the coordinator, the hub and the minimal design is seen,
  ``BEGIN`` and ``COMMIT`` included when they are sent as statements, as both designs do).
  A statement in a pipeline counts as one statement though it shares a round trip.
* :class:`ConnectionLedger` knows which asyncio task has which pooled connection checked
  out (it wraps the pool's ``getconn``/``putconn``, which ``connection()`` goes through).
* :class:`RecordingCoordinator` forwards to fleetcache's coordinator and records each won
  lock's computation end (right after its write, which carries the NOTIFY) and each wait,
  with the connections the waiting task held when the wait began and ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import psycopg

from fleetcache.coordination.base import KeyLock, PopulateCoordinator, WakeReason

#: A wait as recorded: (key index, started, ended, reason, connections held by the task).
Wait = tuple[int, float, float, str, int]


def statement_label(query: Any) -> str:
    """A short, stable name for a statement: its first words, whitespace folded."""
    text = query if isinstance(query, str) else str(getattr(query, "_obj", query))
    return " ".join(text.split())[:70]


class StatementCounter:
    """Counts statements sent through ``psycopg.AsyncCursor.execute`` while enabled.

    :meth:`install` patches the class for this process (the bench's worker processes, or
    the parent during a micro-benchmark) and :meth:`uninstall` restores it.
    """

    def __init__(self, *, labels: bool = True) -> None:
        self.enabled = False
        self.total = 0
        self.by_label: Counter[str] = Counter()
        self._labels = labels
        self._original: Any = None

    def install(self) -> None:
        """Start seeing statements (counted only while ``enabled``)."""
        if self._original is not None:
            return
        original = psycopg.AsyncCursor.execute
        counter = self

        async def execute(cursor: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
            if counter.enabled:
                counter.total += 1
                if counter._labels:
                    counter.by_label[statement_label(query)] += 1
            return await original(cursor, query, params, **kwargs)

        self._original = original
        psycopg.AsyncCursor.execute = execute  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        """Restore psycopg's own method."""
        if self._original is not None:
            psycopg.AsyncCursor.execute = self._original  # type: ignore[method-assign]
            self._original = None

    def reset(self) -> None:
        """Forget what was counted."""
        self.total = 0
        self.by_label.clear()


class ConnectionLedger:
    """Which asyncio task has how many of a pool's connections checked out."""

    def __init__(self, pool: Any) -> None:
        # Written by the wrappers, read by held_by(); all on the process's one event loop.
        self._owner: dict[int, asyncio.Task[Any] | None] = {}
        self._held: Counter[asyncio.Task[Any] | None] = Counter()
        getconn, putconn = pool.getconn, pool.putconn

        async def tracked_getconn(timeout: float | None = None) -> Any:
            conn = await getconn(timeout)
            task = asyncio.current_task()
            self._owner[id(conn)] = task
            self._held[task] += 1
            return conn

        async def tracked_putconn(conn: Any) -> None:
            if id(conn) in self._owner:
                task = self._owner.pop(id(conn))
                self._held[task] -= 1
                if not self._held[task]:
                    del self._held[task]
            await putconn(conn)

        pool.getconn = tracked_getconn
        pool.putconn = tracked_putconn

    def held_by(self, task: asyncio.Task[Any] | None) -> int:
        """How many connections ``task`` has checked out now."""
        return self._held.get(task, 0)


class RecordingCoordinator:
    """Forwards to fleetcache's coordinator; records won locks and waits by key index."""

    def __init__(
        self, inner: PopulateCoordinator, key_index: dict[str, int], ledger: ConnectionLedger
    ) -> None:
        self._inner = inner
        self._key_index = key_index
        self.ledger = ledger
        # Appended on the worker's one event loop; read after the run.
        self.waits: list[Wait] = []
        self.commits: list[tuple[int, float]] = []

    @contextlib.asynccontextmanager
    async def lock(self, coalesce_key: str) -> AsyncIterator[KeyLock]:
        """Forward; a winner's commit is when its block ends (its write, which carries the
        NOTIFY, has returned), before the lock's release; a loser's waits are recorded."""
        index = self._key_index.get(coalesce_key, -1)
        async with self._inner.lock(coalesce_key) as lock:
            if not lock.won:
                yield _RecordingLock(lock, self, index)
                return
            yield lock
            self.commits.append((index, time.time()))

    def stats(self) -> dict[str, int]:
        """Forward."""
        return self._inner.stats()


class _RecordingLock(KeyLock):
    """A lost lock whose waits are recorded (see :class:`RecordingCoordinator`)."""

    def __init__(self, inner: KeyLock, owner: RecordingCoordinator, index: int) -> None:
        super().__init__(inner.coalesce_key, won=False)
        self._inner = inner
        self._owner = owner
        self._index = index

    async def wait(self, timeout: float) -> WakeReason:
        """Forward the wait and record it."""
        task = asyncio.current_task()
        held = self._owner.ledger.held_by(task)
        started = time.time()
        reason: WakeReason = await self._inner.wait(timeout)
        held = max(held, self._owner.ledger.held_by(task))
        self._owner.waits.append((self._index, started, time.time(), reason.value, held))
        return reason
