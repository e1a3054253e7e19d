"""Single flight: concurrent callers of one key share one computation (the shape of Go's
``singleflight.Group``, with asyncio's cancellation and bounded waits added)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from functools import partial
from typing import Any, Generic, TypeVar

from fleetcache.errors import NotOpenError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class WaitTimeout(Exception):  # noqa: N818 - a signal, not a failure of the flight
    """A caller's own bound on waiting ran out; the flight goes on. (Not a TimeoutError,
    so it is never mistaken for a TimeoutError the flight itself raised.)"""


class SingleFlight(Generic[K, V]):
    """One computation per key among concurrent callers: :meth:`do` runs a function once per
    key among the callers that overlap, and every one of them gets its result or its
    exception; :meth:`forget` makes later callers start afresh. A caller's cancellation
    never cancels the shared computation (the others still want it), a caller may bound
    its own wait even if the computation ignores cancellation, and :meth:`close` cancels
    everything still running, boundedly."""

    def __init__(self) -> None:
        # The flights callers join, by key. Written by do() (insert), by a flight's done
        # callback (remove, only if the map still holds that very task: a newer flight
        # may have replaced a forgotten one) and by forget()/close(); read by do() and
        # running(). One event loop, no mutation across an await: no lock.
        self._flights: dict[K, asyncio.Task[V]] = {}
        # Every flight still running, forgotten ones included; close() cancels them.
        self._running: set[asyncio.Task[V]] = set()
        self._closed = False
        #: Flights started, and callers that joined one already running.
        self.started = 0
        self.joined = 0

    def running(self, key: K) -> asyncio.Task[V] | None:
        """The flight callers of ``key`` would join now, if any."""
        return self._flights.get(key)

    async def do(
        self,
        key: K,
        fn: Callable[[], Coroutine[Any, Any, V]],
        *,
        timeout: float | None = None,
    ) -> V:
        """``fn()``'s result, computed once for the callers of ``key`` that overlap; its
        exception reaches each of them. ``timeout`` bounds this caller's wait
        (:class:`WaitTimeout`); the flight itself goes on."""
        return await self.wait(self.start(key, fn), timeout)

    def start(self, key: K, fn: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        """The flight of ``key``: the one running, or ``fn()`` started now (not awaited:
        for work nobody waits for, like a refresh in the background)."""
        if self._closed:
            raise NotOpenError("this SingleFlight is closed")
        task = self._flights.get(key)
        if task is not None:
            self.joined += 1
            return task
        task = asyncio.create_task(fn(), name=f"fleetcache flight {key!r:.200}")
        self._flights[key] = task
        self._running.add(task)
        task.add_done_callback(partial(self._finished, key))
        self.started += 1
        return task

    async def wait(self, task: asyncio.Task[V], timeout: float | None = None) -> V:
        """Join a flight (see :meth:`running`); as :meth:`do`, without starting one."""
        try:
            # asyncio.wait, not wait_for: neither this caller's cancellation nor its timeout
            # cancels what the others share (one waiter, where wait_for(shield()) stacks
            # three layers of futures, each a turn of the loop once the flight ends).
            await asyncio.wait((task,), timeout=timeout)
            if not task.done():
                raise WaitTimeout
            return task.result()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                # The flight was cancelled by close(), not this caller.
                raise NotOpenError("closed while a computation was under way") from None
            raise

    def forget(self, matches: Callable[[K], bool]) -> int:
        """Let later callers of the matching keys start afresh (running flights go on and
        still answer their callers); return how many were forgotten."""
        keys = [key for key in self._flights if matches(key)]
        for key in keys:
            del self._flights[key]
        return len(keys)

    def detach(self, key: K) -> None:
        """Called from inside a flight: from now on callers of ``key`` start afresh (the
        flight still answers those who joined it). Identity-checked, so a newer flight of
        the same key is never removed."""
        current = asyncio.current_task()
        if current is not None and self._flights.get(key) is current:
            del self._flights[key]

    async def close(self, timeout: float = 10.0) -> None:
        """Refuse new calls and cancel every flight still running; wait for them at most
        ``timeout`` seconds (a flight that ignores its cancellation is left behind)."""
        self._closed = True
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self._flights.clear()

    def _finished(self, key: K, task: asyncio.Task[V]) -> None:
        self._running.discard(task)
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: it was raised to the callers still waiting
