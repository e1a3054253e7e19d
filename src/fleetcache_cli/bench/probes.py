"""What the bench watches inside a process, without changing what it measures.

* :class:`StatementCounter` counts the statements psycopg sends from this process, by
  wrapping ``psycopg.AsyncCursor.execute`` (``AsyncConnection.execute`` goes through it, so
  every statement of the store, the coordinator, the hub and the minimal design is seen,
  ``BEGIN`` and ``COMMIT`` included when they are sent as statements, as both designs do).
  A statement in a pipeline counts as one statement though it shares a round trip.
* :class:`ConnectionLedger` knows which asyncio task has which pooled connection checked
  out (it wraps the pool's ``getconn``/``putconn``, which ``connection()`` goes through),
  and the server process of each; :func:`backend_cpu` reads what those processes (and a
  design's direct connection) have spent on the CPU, when the server runs on this machine.
* :class:`MachineCpu` samples the whole machine's busy CPU (``/proc/stat``) in a thread, so a
  run's machine CPU (workers, the Postgres server, everything else) is known for any window.
* :class:`RecordingCoordinator` forwards to fleetcache's coordinator and records each won
  lock's computation end (right after its write, which carries the NOTIFY) and each wait,
  with the connections the waiting task held when the wait began and ended.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Any

import psycopg

from fleetcache.coordination.base import Found, KeyLock, PopulateCoordinator, Reading, WakeReason


class MachineCpu:
    """Samples the machine's busy CPU time (all cores; ``/proc/stat``'s total less idle and
    iowait) every ``interval`` seconds in a daemon thread while the ``with`` block runs;
    :meth:`busy_between` then gives the CPU seconds spent between two ``time.time()``
    instants (interpolated between samples; the counters tick in 1/``SC_CLK_TCK`` s, so a
    window of a few hundred ms is known to a few percent). None where there is no
    ``/proc/stat`` (not Linux)."""

    def __init__(self, interval: float = 0.005) -> None:
        self._interval = interval
        self._times: list[float] = []
        self._busy: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01

    def __enter__(self) -> MachineCpu:
        if self._read() is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _read(self) -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        # guest and guest_nice are already counted in user and nice.
        return (sum(fields[:8]) - idle) * self._tick

    def _sample_loop(self) -> None:
        while True:
            busy = self._read()
            if busy is not None:
                self._times.append(time.time())
                self._busy.append(busy)
            if self._stop.wait(self._interval):
                return

    def _at(self, when: float) -> float | None:
        times, busy = self._times, self._busy
        i = bisect.bisect_left(times, when)
        if not times or i == 0 or i == len(times):
            return None  # outside what was sampled
        t0, t1 = times[i - 1], times[i]
        share = (when - t0) / (t1 - t0) if t1 > t0 else 0.0
        return busy[i - 1] + share * (busy[i] - busy[i - 1])

    def busy_between(self, start: float, end: float) -> float | None:
        """Busy CPU seconds of the whole machine between ``start`` and ``end``."""
        first, last = self._at(start), self._at(end)
        return None if first is None or last is None else max(0.0, last - first)


def backend_cpu(pids: Iterable[int]) -> dict[int, float] | None:
    """The CPU seconds each server process of ``pids`` has spent so far (its
    ``/proc/<pid>/schedstat``), for those that are a ``postgres`` process of this machine
    now; None if none is (the server runs elsewhere, or this is not Linux). A backend that
    has ended is left out."""
    spent: dict[int, float] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as comm:
                if comm.read().strip() != "postgres":
                    continue
            with open(f"/proc/{pid}/schedstat", encoding="ascii") as stat:
                spent[pid] = int(stat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return spent or None


def backend_cpu_between(
    before: dict[int, float] | None, after: dict[int, float] | None
) -> float | None:
    """The CPU seconds the backends of ``after`` spent since ``before`` (a backend missing
    from ``before`` was made since: all of its CPU counts); None if either is None."""
    if before is None or after is None:
        return None
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


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
    """Which asyncio task has how many of a pool's connections checked out, and the server
    process ids (``backends``) of every connection the pool has handed out."""

    def __init__(self, pool: Any) -> None:
        # Written by the wrappers, read by held_by(); all on the process's one event loop.
        self._owner: dict[int, asyncio.Task[Any] | None] = {}
        self._held: Counter[asyncio.Task[Any] | None] = Counter()
        self.backends: set[int] = set()
        getconn, putconn = pool.getconn, pool.putconn

        async def tracked_getconn(timeout: float | None = None) -> Any:
            conn = await getconn(timeout)
            self.backends.add(conn.info.backend_pid)
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
    async def lock(
        self, coalesce_key: str, reading: Reading | None = None
    ) -> AsyncIterator[KeyLock]:
        """Forward; a winner's commit is when its block ends (its write, which carries the
        NOTIFY, has returned), before the lock's release; a loser's waits are recorded."""
        index = self._key_index.get(coalesce_key, -1)
        async with self._inner.lock(coalesce_key, reading) as lock:
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

    def found(self) -> Found | None:
        """Forward."""
        return self._inner.found()

    async def wait(self, timeout: float) -> WakeReason:
        """Forward the wait and record it."""
        task = asyncio.current_task()
        held = self._owner.ledger.held_by(task)
        started = time.time()
        reason: WakeReason = await self._inner.wait(timeout)
        held = max(held, self._owner.ledger.held_by(task))
        self._owner.waits.append((self._index, started, time.time(), reason.value, held))
        return reason
