"""The process's one session connection (layer 2): LISTEN on channels fixed when it is
built, calling their handlers with every payload, and the few statements that need a
session of their own (the fleet's advisory locks, :meth:`NotificationHub.execute`) run
between its waits. It probes the connection when it goes quiet, reconnects after a loss
and tells gap handlers that notifications (and session locks) may have been lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import pq, sql

from fleetcache import _pg
from fleetcache._lifecycle import Service
from fleetcache.errors import (
    ConfigurationError,
    NotificationError,
    NotOpenError,
    SessionLostError,
)
from fleetcache.logcontext import get_logger
from fleetcache.stores.payloads import is_channel

logger = get_logger("fleetcache.notifications")

_Conn = psycopg.AsyncConnection[Any]
#: Run on the first connection before anything is set on it (e.g. refusing a transaction
#: pooler); raises to refuse the connection.
SessionCheck = Callable[[_Conn], Awaitable[None]]

# Channel names are identifiers, so they are composed with sql.Identifier (quoted), never
# formatted in as text.
_LISTEN = sql.SQL("LISTEN {}")
_LIVENESS_PROBE = "SELECT 1"
#: Set on every connection once a bound is asked for: the server ends the session (and
#: frees what it holds) when it has been idle this long, e.g. '10000ms' (PostgreSQL 14+).
_SET_IDLE_TIMEOUT = "SELECT set_config('idle_session_timeout', %(timeout)s, false)"

#: How long (seconds) the connection may deliver nothing before it is probed.
LIVENESS_INTERVAL = 0.5
#: How long (seconds) the probe may go unanswered before the connection counts as dead.
LIVENESS_TIMEOUT = 1.0
#: How long (seconds) an unanswered probe gets to end by a polite cancel before psycopg
#: is made to close its connection (it would otherwise wait up to 10 s on a dead path).
_STOP_PATIENCE = 0.5

#: Shown in ``pg_stat_activity`` unless the conninfo names an application already.
DEFAULT_APPLICATION_NAME = "fleetcache-session"


class _SilentConnectionError(Exception):
    """The liveness probe went unanswered; ``probe`` is still waiting for its answer."""

    def __init__(self, probe: asyncio.Future[Any], timeout: float) -> None:
        super().__init__(f"no answer to the liveness probe within {timeout:g} s")
        self.probe = probe


def check_channel(channel: object) -> str:
    """``channel`` if Postgres can LISTEN on it exactly as given (:func:`is_channel`);
    else ConfigurationError: a longer name, truncated by LISTEN and refused by
    ``pg_notify``, could never receive anything."""
    if is_channel(channel):
        return channel
    raise ConfigurationError(
        f"a channel must be a string of 1 to 63 UTF-8 bytes without NUL, got {channel!r}"
    )


class NotificationHub(Service):
    """A process's session connection: LISTEN for a fixed set of channels, and the
    statements that need a session (:meth:`execute`), on one dedicated connection.

    Register handlers with :meth:`add_handler` and :meth:`add_gap_handler` (before or
    after ``start()``); ``start()`` connects and LISTENs, ``close()`` ends everything and
    leaves nothing listening, even when called while ``start()`` is still running. Use it
    as ``async with NotificationHub(url, [channel]) as hub`` or call ``start()`` and
    ``close()`` yourself; a closed hub cannot be started again.

    The connection is made by :func:`fleetcache._pg.connect`, never taken from a pool (a
    pool would hand the session, its LISTENs and its locks, to someone else).
    ``session_check`` runs on the first connection before anything is set on it (the
    factory's refuses a transaction pooler there). A psycopg connection runs one operation
    at a time: statements take turns (``_turn``), and between them one background task,
    the *runner*, waits for the connection's socket to be readable — holding nothing, so
    a statement never waits for it — then reads what came and dispatches each
    notification. Notifications that arrive while a statement runs are dispatched by
    psycopg as it reads them (a notify handler), and those that came with a statement's
    answer right after it: every notification is dispatched as soon as it is read, in
    arrival order.

    Whenever nothing at all (no notification, no statement's answer) has come for
    ``liveness_interval`` the runner sends ``SELECT 1``, which must answer within
    ``liveness_timeout``; once :meth:`bound_idleness` is asked for, it also sends one
    whenever no statement went out for a third of that bound. So a connection that goes
    silent — closed, terminated, or a frozen network path that never says so (TCP
    keepalives cannot tell: a frozen proxy or a stopped peer's kernel still acknowledges
    them) — is declared dead within ``liveness_interval + liveness_timeout`` (1.5 s by
    default) of the last thing it delivered. The runner then marks the hub disconnected
    and counts a gap at once (``connected`` is False and ``gaps`` grows before it
    reconnects: the near tier stops serving from memory right then), closes the
    connection (a statement under way then fails), reconnects with capped exponential
    backoff plus jitter, LISTENs every channel again, and only then calls every gap
    handler: notifications sent meanwhile are lost, and NOTIFY is a hint, never the only
    signal.
    What the lost session held (advisory locks) is gone too: :attr:`generation` counts the
    connections, and :meth:`holds_session` says whether a given one is still the live one.

    ``start()`` raises :class:`~fleetcache.errors.DatabaseConnectError` (with its
    ``cause``) when the database cannot be reached, and
    :class:`~fleetcache.errors.NotificationError` when the first LISTEN fails; a failed
    start may be retried.
    """

    def __init__(
        self,
        conninfo: str,
        channels: Sequence[str],
        *,
        liveness_interval: float = LIVENESS_INTERVAL,
        liveness_timeout: float = LIVENESS_TIMEOUT,
        connect_budget: float = _pg.CONNECT_BUDGET,
        reconnect_min_delay: float = 0.05,
        reconnect_max_delay: float = 5.0,
        application_name: str = DEFAULT_APPLICATION_NAME,
        session_check: SessionCheck | None = None,
    ) -> None:
        super().__init__()
        if isinstance(channels, str):  # a str is a Sequence[str]: LISTEN on each letter
            raise ConfigurationError(f"channels must be a sequence of names, got {channels!r}")
        # dict.fromkeys: duplicates dropped, order kept (the LISTEN order).
        self._channels = tuple(dict.fromkeys(check_channel(ch) for ch in channels))
        if not self._channels:
            raise ConfigurationError("a NotificationHub needs at least one channel")
        for name, value in (
            ("liveness_interval", liveness_interval),
            ("liveness_timeout", liveness_timeout),
        ):
            if not (isinstance(value, int | float) and 0 < value < math.inf):  # NaN fails too
                raise ConfigurationError(f"{name} must be a finite number > 0, got {value!r}")
        if reconnect_min_delay <= 0 or reconnect_max_delay < reconnect_min_delay:
            raise ConfigurationError(
                "need 0 < reconnect_min_delay <= reconnect_max_delay, got "
                f"{reconnect_min_delay} and {reconnect_max_delay}"
            )
        self._conninfo = conninfo
        self._application_name = application_name
        self._liveness_interval = liveness_interval
        self._liveness_timeout = liveness_timeout
        self._connect_budget = connect_budget
        self._reconnect_min_delay = reconnect_min_delay
        self._reconnect_max_delay = reconnect_max_delay
        self._session_check = session_check
        # A LISTEN that takes this long means a dead connection (a LISTEN takes a lock, so
        # it gets more time than the probe).
        self._command_timeout = max(5.0, 2.0 * liveness_timeout)

        # Shared state. Everything runs on one event loop; what is changed across an
        # await by two tasks is guarded by _turn.
        # - _handlers, _gap_handlers: appended by add_handler()/add_gap_handler() (anyone,
        #   any time before close); read by the runner, which iterates over a copy.
        # - _conn, _generation: the live connection and how many have been made. Set by
        #   the start task, then by the runner, which replaces the connection on reconnect
        #   and closes it when cancelled; whatever is left is closed by _on_close(). Read
        #   by execute(), holds_session() and backend_pid.
        # - _connected, _gaps, _reconnects: written by the start task, the runner and
        #   _on_close(); read by anyone through the properties. _up mirrors _connected
        #   for execute() to wait on (also set by close, to release those waits).
        # - _turn: who uses the connection now: one statement of execute(), the runner's
        #   probe, or the runner reading what came while nothing ran. Held across awaits;
        #   FIFO.
        # - _readable, _waiting_on: the runner's wait for the socket to be readable (True,
        #   set by the reader callback or by _wake_runner; False: its deadline came) and
        #   the connection it watches; set and cleared by the runner. _watched: the
        #   socket our reader is registered on, or None; changed by _watch()/_unwatch()
        #   only (a statement unwatches while psycopg waits on the socket itself, and
        #   watches again after).
        # - _heard, _sent: when the connection last delivered anything, and when a
        #   statement last went out (time.monotonic()); written by the runner and by
        #   execute(), read by the runner to decide when to probe.
        # - _poisoned: a connection execute() found in an unknown state (the runner drops
        #   it). _idle_timeout: the bound asked for (bound_idleness), applied to every
        #   connection; read by _open() and the runner.
        self._handlers: dict[str, list[Callable[[str], None]]] = {ch: [] for ch in self._channels}
        self._gap_handlers: list[Callable[[], None]] = []
        self._conn: _Conn | None = None
        self._generation = 0
        self._connected = False
        self._up = asyncio.Event()
        self._gaps = 0
        self._reconnects = 0
        self._turn = asyncio.Lock()
        self._readable: asyncio.Future[bool] | None = None
        self._waiting_on: _Conn | None = None
        self._watched: int | None = None
        self._heard = self._sent = 0.0
        self._poisoned: _Conn | None = None
        self._idle_timeout: float | None = None

    # ------------------------------------------------------------------ public API

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels this hub LISTENs on, in LISTEN order."""
        return self._channels

    @property
    def connected(self) -> bool:
        """Whether the connection is up with every channel LISTENed: False from the moment
        the runner notices a loss until the re-LISTEN after the reconnect is done."""
        return self._connected

    @property
    def gaps(self) -> int:
        """How many losses the runner has noticed; incremented at once, before the
        reconnect. Compare two readings: if it changed (or ``connected`` is False),
        notifications may have been missed in between."""
        return self._gaps

    @property
    def reconnects(self) -> int:
        """How many times the hub has reconnected (and re-LISTENed) after a loss."""
        return self._reconnects

    @property
    def generation(self) -> int:
        """How many connections the hub has made (1 once started): what a session
        statement took (an advisory lock) lives as long as this number stays the same
        and the hub stays connected (see :meth:`holds_session`)."""
        return self._generation

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the session connection, or None while disconnected
        (for diagnostics and tests, e.g. ``pg_terminate_backend``)."""
        conn = self._conn
        if conn is None or not self._connected or conn.closed:
            return None
        return conn.info.backend_pid

    def holds_session(self, generation: int) -> bool:
        """Whether connection number ``generation`` is still the live one, so what was
        taken on it (an advisory lock) is still held."""
        conn = self._conn
        return (
            self._connected
            and generation == self._generation
            and conn is not None
            and not conn.closed
            and not conn.broken
            and conn is not self._poisoned
        )

    def add_handler(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(payload)`` for every notification on ``channel`` (one of the
        hub's), from the next one received on. Before or after ``start()``; several per
        channel are fine. Callbacks are synchronous and must be cheap: they run on the
        event loop, in arrival order, and an exception in one is logged and ignored."""
        self._check_open("add_handler")
        handlers = self._handlers.get(channel)
        if handlers is None:
            raise ConfigurationError(
                f"channel {channel!r} is not one of this hub's channels {list(self._channels)}"
            )
        handlers.append(callback)

    def add_gap_handler(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every reconnect, once every channel is LISTENed again:
        notifications may have been missed meanwhile, and session locks were lost. Same
        rules as :meth:`add_handler`."""
        self._check_open("add_gap_handler")
        self._gap_handlers.append(callback)

    async def execute(
        self,
        query: str,
        params: Mapping[str, Any] | None = None,
        *,
        wait: float | None = None,
        binary: bool = False,
    ) -> tuple[tuple[Any, ...] | None, int]:
        """Run one short statement on the session connection, between the hub's waits for
        notifications; return its first row (None if it has none; in binary format with
        ``binary``) and the :attr:`generation` of the connection it ran on.

        While the hub reconnects, waits for the new connection at most ``wait`` seconds
        (default: the connect budget). Raises :class:`~fleetcache.errors.SessionLostError`
        when the connection is lost before or while the statement runs (the runner
        reconnects and reports a gap), and :class:`~fleetcache.errors.NotificationError`
        when the statement itself fails.
        """
        try:
            return await self._execute(query, params, wait=wait, binary=binary)
        except psycopg.Error as exc:
            raise NotificationError(f"a session statement failed: {_pg.one_line(exc)}") from exc

    async def bound_idleness(self, seconds: float) -> None:
        """Have the server end this session, and free whatever it holds, once it has been
        idle for ``seconds`` — now and after every reconnect — while the runner sends a
        statement at least every third of it, so a healthy session is never idle that
        long. A process that stops (SIGSTOP, an event loop blocked that long) or whose
        network path freezes sends nothing, so its session and its locks end within
        ``seconds``, which TCP keepalives could not do. Asked for twice, the shorter
        bound wins. PostgreSQL 14 or later (older servers: logged once, no bound)."""
        current = self._idle_timeout
        if current is not None and current <= seconds:
            return
        self._idle_timeout = seconds
        self._wake_runner()  # its heartbeat is due sooner now
        try:
            await self._execute(_SET_IDLE_TIMEOUT, {"timeout": _milliseconds(seconds)}, wait=None)
        except psycopg.errors.UndefinedObject:  # PostgreSQL < 14: no such setting
            _log_no_idle_timeout()
        except psycopg.Error as exc:
            raise NotificationError(
                f"setting idle_session_timeout on the session connection: {_pg.one_line(exc)}"
            ) from exc

    # ------------------------------------------------------------------ lifecycle

    async def _on_start(self) -> None:
        self._conn = await self._open(self._connect_budget, first=True)
        self._generation += 1
        self._connected = True
        self._up.set()
        self.spawn(self._run(), "notification hub runner")

    async def _on_close(self) -> None:
        # The runner closes its connection when cancelled; a runner cancelled before its
        # first step never ran at all, hence the second close of whatever is left.
        runners = list(self._tasks)
        for task in runners:
            task.cancel()
        if runners:
            await asyncio.wait(runners)
        await self._drop_connection()
        self._up.set()  # execute() calls waiting for a connection see that it is closed

    # ------------------------------------------------------------------ connection

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise NotOpenError(f"NotificationHub is closed: {what} refused")

    async def _connect(self, budget: float) -> _Conn:
        attempt = asyncio.create_task(
            _pg.connect(self._conninfo, application_name=self._application_name, budget=budget),
            name="fleetcache notification hub connect",
        )
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # Cancelling psycopg's connect half way leaves the libpq connection, and its
            # server backend, open until garbage collection. Let the attempt end (bounded
            # by connect_timeout and the budget) and close what it made, so close() really
            # leaves nothing behind.
            with contextlib.suppress(Exception):
                await (await attempt).close()
            raise

    async def _open(self, budget: float, *, first: bool = False) -> _Conn:
        """Connect, check the first connection, bound its idleness if asked, and LISTEN
        every channel: DatabaseConnectError if the connection fails (transient causes
        retried for ``budget`` seconds), ConfigurationError if the check refuses it,
        NotificationError if a LISTEN does; nothing is left open either way."""
        conn = await self._connect(budget)
        try:
            if first and self._session_check is not None:
                await self._session_check(conn)
            # From now on psycopg hands every notification it reads during a statement
            # to the hub at once (the check above may use notifies(), which a handler
            # would make unreliable).
            conn.add_notify_handler(self._on_notify)
            async with asyncio.timeout(self._command_timeout):
                if self._idle_timeout is not None:
                    try:
                        await conn.execute(
                            _SET_IDLE_TIMEOUT, {"timeout": _milliseconds(self._idle_timeout)}
                        )
                    except psycopg.errors.UndefinedObject:
                        _log_no_idle_timeout()
                for channel in self._channels:
                    await conn.execute(_LISTEN.format(sql.Identifier(channel)))
        except (ConfigurationError, NotificationError):  # the check refused or failed
            await conn.close()
            raise
        except Exception as exc:  # a driver error, an encoding error, a LISTEN timeout
            await conn.close()
            raise NotificationError(
                f"LISTEN on {list(self._channels)} failed at "
                f"{_pg.describe_target(self._conninfo)}: {type(exc).__name__}: {exc}"
            ) from exc
        except BaseException:  # cancelled by close(): leave nothing listening
            await conn.close()
            raise
        return conn

    async def _drop_connection(self) -> None:
        self._unwatch()
        self._connected = False
        self._up.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _run(self) -> None:
        """Serve the connection; on any failure reconnect, re-LISTEN, then report a gap."""
        # Connections that died young in a row: a connection that keeps dropping right
        # after it is made must not be re-made (and a gap reported) at full speed.
        short_lived = 0
        try:
            while True:
                conn = self._conn
                assert conn is not None
                born = time.monotonic()
                unanswered: asyncio.Future[Any] | None = None
                try:
                    await self._serve(conn)
                except _SilentConnectionError as exc:
                    unanswered = exc.probe
                    logger.warning("session connection silent (%s); reconnecting", exc)
                except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                    logger.warning(
                        "session connection lost (%s: %s); reconnecting", type(exc).__name__, exc
                    )
                # Declared dead: before any await, so the near tier and the lock holders
                # know at once.
                self._connected = False
                self._up.clear()
                self._gaps += 1
                self._conn = None
                try:
                    if unanswered is not None:
                        await _pg.stop_query(unanswered, patience=_STOP_PATIENCE)
                finally:
                    # A statement stuck on the dead path fails as the connection closes.
                    await conn.close()
                lived = time.monotonic() - born
                short_lived = short_lived + 1 if lived < self._reconnect_max_delay else 0
                new = await self._reconnect(first_attempt=short_lived)
                self._conn = new
                self._generation += 1
                self._reconnects += 1
                self._connected = True
                self._up.set()
                logger.info(
                    "session connection re-established (reconnect #%d) on %d channel(s)",
                    self._reconnects,
                    len(self._channels),
                )
                self._fire_gap()
        finally:
            if not self.closed:  # the runner died of a bug: nobody listens any more
                self._gaps += 1
            await self._drop_connection()

    async def _reconnect(self, *, first_attempt: int) -> _Conn:
        """Connect and LISTEN again, retrying with capped exponential backoff plus jitter
        that starts at ``first_attempt`` (non-zero when the last connections died young)."""
        attempt = first_attempt
        while True:
            # The exponent is capped so a long outage cannot overflow the float.
            cap = min(self._reconnect_max_delay, self._reconnect_min_delay * 2 ** min(attempt, 30))
            # Jitter spreads a fleet's reconnects after a server restart.
            await asyncio.sleep(_pg.jittered(cap))
            attempt += 1
            try:
                # One connection try per round (budget 0): this loop is the retry.
                return await self._open(0.0)
            except Exception as exc:  # noqa: BLE001 - logged; retrying is the handling
                logger.warning(
                    "reconnecting the session connection failed (attempt %d): %s",
                    attempt - first_attempt,
                    exc,
                )

    async def _serve(self, conn: _Conn) -> None:
        """Dispatch notifications and probe the connection whenever it has delivered
        nothing for ``liveness_interval`` (or sent nothing for a third of the idle bound),
        until it fails or goes silent (this only returns by raising)."""
        self._heard = self._sent = time.monotonic()
        while True:
            if (
                conn.closed
                or conn.broken
                or conn is self._poisoned
                or conn.pgconn.status != pq.ConnStatus.OK
            ):
                raise SessionLostError("the connection failed")
            now = time.monotonic()
            due = self._heard + self._liveness_interval
            if self._idle_timeout is not None:
                due = min(due, self._sent + self._idle_timeout / 3)
            if now >= due:
                await self._probe(conn)
                continue
            await self._wait(conn, due)

    async def _wait(self, conn: _Conn, due: float) -> None:
        """Wait until the socket is readable or ``due`` (``time.monotonic()``), holding
        nothing; then read what came and dispatch its notifications, under the turn. If
        statements hold the turn until ``due``, return: the probe comes next. Driver
        errors (the connection is gone) propagate."""
        loop = asyncio.get_running_loop()
        readable = self._readable = loop.create_future()
        self._waiting_on = conn
        if not self._turn.locked():
            self._watch()  # else the statement watches when it is done
        # The deadline settles the same future (False) that the reader settles (True), and
        # the runner awaits it directly: a notification wakes the runner in one turn of the
        # loop (asyncio.wait would take two: its own callback, then the runner).
        deadline = loop.call_later(max(0.0, due - time.monotonic()), _settle, readable, False)
        try:
            came = await readable
        finally:
            deadline.cancel()
            self._readable = self._waiting_on = None
            self._unwatch()
        if not came:
            return
        if self._turn.locked():  # a statement runs: wait for it, but not past due
            try:
                async with asyncio.timeout(max(0.0, due - time.monotonic())):
                    await self._turn.acquire()
            except TimeoutError:
                return
        else:
            await self._turn.acquire()  # free: taken without suspending
        try:
            conn.pgconn.consume_input()  # raises when the connection is gone
            self._drain(conn)
        finally:
            self._turn.release()

    def _watch(self) -> None:
        """Have the event loop tell the runner's wait when the socket is readable."""
        conn, readable = self._waiting_on, self._readable
        if (
            self._watched is not None
            or conn is None
            or readable is None
            or readable.done()
            or conn.closed
        ):
            return
        fd = conn.pgconn.socket
        asyncio.get_running_loop().add_reader(fd, self._on_readable)
        self._watched = fd

    def _unwatch(self) -> None:
        if self._watched is not None:
            asyncio.get_running_loop().remove_reader(self._watched)
            self._watched = None

    def _on_readable(self) -> None:
        self._unwatch()  # one shot: the runner reads, then waits (and watches) again
        self._wake_runner()

    def _wake_runner(self) -> None:
        """End the runner's wait now (it reads, then looks at its deadlines again)."""
        readable = self._readable
        if readable is not None:
            _settle(readable, True)

    def _on_notify(self, notify: psycopg.Notify) -> None:
        """psycopg's notify handler: a notification read during a statement."""
        self._heard = time.monotonic()
        self._dispatch(notify.channel, notify.payload)

    def _drain(self, conn: _Conn) -> None:
        """Dispatch the notifications libpq has read but not handed out: what the runner
        just read, or what came with a statement's answer after psycopg last looked. A
        payload the client encoding cannot decode (a SQL_ASCII database takes any bytes)
        is dropped and reported as a gap: the connection is fine."""
        pgconn = conn.pgconn
        encoding = conn.info.encoding
        while (notify := pgconn.notifies()) is not None:
            self._heard = time.monotonic()
            try:
                channel, payload = notify.relname.decode(encoding), notify.extra.decode(encoding)
            except UnicodeDecodeError as exc:
                logger.warning("undecodable notification dropped (%s); reporting a gap", exc)
                self._gaps += 1
                self._fire_gap()
                continue
            self._dispatch(channel, payload)

    async def _execute(
        self,
        query: str,
        params: Mapping[str, Any] | None,
        *,
        wait: float | None,
        binary: bool = False,
    ) -> tuple[tuple[Any, ...] | None, int]:
        """:meth:`execute` with driver errors raised as they are."""
        deadline = time.monotonic() + (self._connect_budget if wait is None else wait)
        while True:
            await self._wait_until_up(deadline)
            async with self._turn:
                conn, generation = self._conn, self._generation
                if conn is None or not self.holds_session(generation):
                    continue  # lost while we waited: wait for the next connection
                self._unwatch()  # psycopg waits on the socket itself now
                try:
                    self._sent = time.monotonic()
                    row = await self._run_statement(conn, query, params, binary)
                    self._heard = time.monotonic()
                    self._drain(conn)
                finally:
                    self._watch()
                return row, generation

    async def _wait_until_up(self, deadline: float) -> None:
        """Return once a live connection is there; SessionLostError at ``deadline``."""
        while not self.holds_session(self._generation):
            if self.closed:
                raise NotOpenError("NotificationHub is closed: a session statement refused")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionLostError(
                    f"the session connection to {_pg.describe_target(self._conninfo)} has "
                    "been down too long for a statement to wait for it"
                )
            if self._connected:  # broken, and the runner has not noticed yet: tell it
                self._wake_runner()
                await asyncio.sleep(min(0.01, remaining))
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._up.wait()
        self._check_open("a session statement")

    async def _run_statement(
        self, conn: _Conn, query: str, params: Mapping[str, Any] | None, binary: bool
    ) -> tuple[Any, ...] | None:
        """Run ``query`` on ``conn`` (the caller holds the turn)."""
        try:
            cursor = await conn.execute(query, params, binary=binary)
            # Whether it returned rows, from the result's status: cursor.description would
            # build a Column object per field (14 for a try-and-read) just to say so.
            result = cursor.pgresult
            if result is None or result.status != pq.ExecStatus.TUPLES_OK:
                return None
            return await cursor.fetchone()
        except UnicodeDecodeError as exc:
            # A notification the client cannot decode came with the answer: psycopg gave
            # up reading it half way, so the connection's state is unknown.
            self._poisoned = conn
            self._wake_runner()
            raise SessionLostError(f"an undecodable notification broke a statement: {exc}") from exc
        except psycopg.Error as exc:
            if _pg.is_connection_lost(exc, conn):
                self._wake_runner()  # the runner notices the broken connection now
                raise SessionLostError(
                    f"the session connection was lost: {_pg.one_line(exc)}"
                ) from exc
            raise

    async def _probe(self, conn: _Conn) -> None:
        """``SELECT 1``, answered within ``liveness_timeout`` (the wait for the turn
        included: a statement stuck on a dead path makes the probe wait too) or
        :class:`_SilentConnectionError`, which carries the unanswered probe. Not
        ``asyncio.timeout``: cancelling psycopg mid-query makes it try to cancel the query
        on the server first, which on a frozen path takes it up to 10 s more; the runner
        declares the connection dead first and stops the probe afterwards."""
        probe = asyncio.ensure_future(self._probe_statement(conn))
        try:
            done, _ = await asyncio.wait({probe}, timeout=self._liveness_timeout)
        except asyncio.CancelledError:  # close(): the probe must not outlive the runner
            await _pg.stop_query(probe, patience=_STOP_PATIENCE)
            raise
        if not done:
            raise _SilentConnectionError(probe, self._liveness_timeout)
        probe.result()  # a driver error: the connection failed

    async def _probe_statement(self, conn: _Conn) -> None:
        async with self._turn:
            self._sent = time.monotonic()
            await conn.execute(_LIVENESS_PROBE)
            self._heard = time.monotonic()
            self._drain(conn)

    def _dispatch(self, channel: str, payload: str) -> None:
        # A copy: a callback may add handlers while we iterate.
        for callback in tuple(self._handlers.get(channel, ())):
            try:
                callback(payload)
            except Exception:
                logger.exception(
                    "notification handler %r failed on channel %r (payload %d characters)",
                    callback,
                    channel,
                    len(payload),
                )

    def _fire_gap(self) -> None:
        for callback in tuple(self._gap_handlers):
            try:
                callback()
            except Exception:
                logger.exception("gap handler %r failed", callback)


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    """Give ``future`` its result unless it has one (or was cancelled) already."""
    if not future.done():
        future.set_result(value)


def _milliseconds(seconds: float) -> str:
    """A duration as the server's ``idle_session_timeout`` takes it ('10000ms')."""
    return f"{max(1, round(seconds * 1000))}ms"


# Written once a server refuses idle_session_timeout (older than 14): warned only once.
_no_idle_timeout_logged = False


def _log_no_idle_timeout() -> None:
    global _no_idle_timeout_logged  # noqa: PLW0603 - one warning per process, by design
    if not _no_idle_timeout_logged:
        _no_idle_timeout_logged = True
        logger.warning(
            "the server has no idle_session_timeout (PostgreSQL < 14): a frozen or "
            "partitioned process keeps its session, and the keys it locked, until its "
            "connection dies"
        )
