"""The one lifecycle idiom of every component with background work: :class:`Service`."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal

from fleetcache.errors import NotOpenError
from fleetcache.logcontext import get_logger

logger = get_logger("fleetcache.lifecycle")

#: How long ``close()`` waits for background tasks by default (seconds).
DEFAULT_CLOSE_TIMEOUT = 10.0

_State = Literal["new", "started", "closed"]


class Service:
    """A component with background work: built without I/O, started with ``await start()``
    (or ``async with``) and ended with ``await close()``.

    * ``start()`` is idempotent and shared: concurrent callers wait for one start, a caller
      cancelled while waiting does not cancel it for the others, and a start that failed
      may be tried again. After ``close()`` it raises
      :class:`~fleetcache.errors.NotOpenError`.
    * ``close()`` is idempotent and bounded: it cancels a start still under way, runs the
      subclass's ``_on_close``, then (even if that raised) cancels every task started with
      :meth:`spawn` and waits for them at most ``timeout`` seconds. A task that ignores its
      cancellation is logged and left behind, never waited for forever. Concurrent callers
      share one close and all return when it is done; a caller cancelled while waiting
      does not cancel it for the others.
    * Background tasks are started only through :meth:`spawn`, so none is fire-and-forget:
      each is tracked until it ends, and a failure is logged.

    Subclasses implement ``_on_start`` (the I/O of starting) and ``_on_close`` (releasing
    what it acquired; it must also cope with a start that was cancelled half-way).
    """

    def __init__(self) -> None:
        # Written by start()/_run_start() (new -> started) and close() (-> closed); read by
        # everyone. All on the event loop, never across an await: no lock.
        self._state: _State = "new"
        self._start_task: asyncio.Task[None] | None = None
        # The close under way or done; created by the first close(), awaited by every one.
        self._close_task: asyncio.Task[None] | None = None
        # Tracked background tasks; spawn() adds, each task's done callback removes.
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ subclass hooks

    async def _on_start(self) -> None:
        """Acquire what the service needs (connections, subscriptions, tasks)."""

    async def _on_close(self) -> None:
        """Release what ``_on_start`` acquired (also after a cancelled start)."""

    # ------------------------------------------------------------------ public

    @property
    def started(self) -> bool:
        """Whether ``start()`` finished and ``close()`` has not been called."""
        return self._state == "started"

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has been called."""
        return self._state == "closed"

    async def start(self) -> None:
        """Start once; see the class docstring."""
        if self._state == "closed":
            raise NotOpenError(f"{type(self).__name__} is closed; it cannot be started again")
        if self._state == "started":
            return
        if self._start_task is not None and self._start_task.done():
            # A start that failed while every caller had been cancelled: retrieve its
            # error (it was nobody's to raise) and try again rather than re-raise it.
            self._start_task.exception()
            self._start_task = None
        if self._start_task is None:
            self._start_task = asyncio.create_task(
                self._run_start(), name=f"fleetcache {type(self).__name__} start"
            )
        task = self._start_task
        await asyncio.wait({task})  # not shield: a cancelled caller leaves the start alone
        if task.cancelled() or self.closed:
            raise NotOpenError(f"{type(self).__name__} was closed while it was starting")
        exc = task.exception()
        if exc is not None:
            if self._start_task is task:
                self._start_task = None  # a later start() may try again
            raise exc

    async def _run_start(self) -> None:
        await self._on_start()
        if self._state == "new":
            self._state = "started"

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Stop everything; see the class docstring. Idempotent."""
        closing = self._close_task
        # Close again only if something was started after the last close finished.
        if closing is None or (closing.done() and (self._start_task or self._tasks)):
            self._state = "closed"
            closing = self._close_task = asyncio.create_task(
                self._run_close(timeout), name=f"fleetcache {type(self).__name__} close"
            )
        # Shielded: a second caller must not return before the first close is done, and
        # a caller cancelled while waiting must not cancel the close for the others.
        await asyncio.shield(closing)

    async def _run_close(self, timeout: float) -> None:
        start, self._start_task = self._start_task, None
        if start is not None and not start.done():
            start.cancel()
            await asyncio.wait({start}, timeout=timeout)
            if not start.done():
                logger.error(
                    "the start of %s ignored its cancellation for %.1f s; left behind",
                    type(self).__name__,
                    timeout,
                )
                start.add_done_callback(_retrieve)
        if start is not None and start.done() and not start.cancelled():
            start.exception()  # retrieved: it was raised to start()'s callers
        try:
            await asyncio.wait_for(self._on_close(), timeout)
        except TimeoutError:
            logger.error("%s did not close within %.1f s", type(self).__name__, timeout)
        finally:
            # Even when _on_close raised: no background task may outlive close().
            await self._cancel_tasks(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a tracked background task (cancelled by ``close()``)."""
        task = asyncio.create_task(coro, name=f"fleetcache {name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def check_started(self, what: str) -> None:
        """Raise :class:`NotOpenError` naming ``what`` unless the service is started."""
        if self._state == "started":
            return
        if self._state == "closed":
            raise NotOpenError(f"{type(self).__name__} is closed: {what} refused")
        raise NotOpenError(f"{type(self).__name__} is not started: await start() before {what}")

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ internals

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "background task %s of %s failed",
                task.get_name(),
                type(self).__name__,
                exc_info=task.exception(),
            )

    async def _cancel_tasks(self, timeout: float) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            logger.error(
                "background task %s of %s ignored its cancellation for %.1f s; left behind",
                task.get_name(),
                type(self).__name__,
                timeout,
            )


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a left-behind task's outcome as retrieved (nobody is left to raise it to)."""
    if not task.cancelled():
        task.exception()
