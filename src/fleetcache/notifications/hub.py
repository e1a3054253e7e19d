"""One LISTEN connection per process, for channels fixed when it is built (layer 2).

:class:`NotificationHub` owns a dedicated, autocommit connection made by
:func:`fleetcache._pg.connect` (never a pooled one: a pool would hand the session, and
its LISTENs, to someone else), LISTENs every channel it was built with, and calls the
handlers registered for each channel with every payload.

A psycopg connection runs one operation at a time, so a single background task, the
*runner*, owns the connection and loops: it waits for notifications, dispatching each as
it arrives, and whenever nothing at all has come for ``liveness_interval`` it runs
``SELECT 1``, which must answer within ``liveness_timeout``. Notifications that arrive
while ``SELECT 1`` runs are kept by psycopg (3.2.4+) for the next wait, so none is lost.

So a connection that goes silent — closed, terminated, or a frozen network path that
never says so (TCP keepalives cannot tell: a frozen proxy or a stopped peer's kernel
still acknowledges them) — is declared dead within ``liveness_interval +
liveness_timeout`` (1.5 s by default) of the last thing it delivered. The runner then
marks the hub disconnected and counts a gap at once (``connected`` is False and ``gaps``
grows before it reconnects: the near tier stops serving from memory right then), then
closes the connection (cutting short psycopg's attempt to cancel an unanswered probe,
which would take up to 10 s more on a dead path), reconnects with capped exponential
backoff plus jitter, LISTENs every channel again, and only then calls every gap handler:
notifications sent while it was down are lost, and NOTIFY is a hint, never the only
signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from fleetcache import _pg
from fleetcache._lifecycle import Service
from fleetcache.errors import ConfigurationError, NotificationError, NotOpenError
from fleetcache.logcontext import get_logger

logger = get_logger("fleetcache.notifications")

_Conn = psycopg.AsyncConnection[Any]

# Channel names are identifiers, so they are composed with sql.Identifier (quoted), never
# formatted in as text.
_LISTEN = sql.SQL("LISTEN {}")
_LIVENESS_PROBE = "SELECT 1"

#: How long (seconds) the connection may deliver nothing before it is probed.
LIVENESS_INTERVAL = 0.5
#: How long (seconds) the probe may go unanswered before the connection counts as dead.
LIVENESS_TIMEOUT = 1.0
#: How long (seconds) an unanswered probe gets to end by a polite cancel before psycopg
#: is made to close its connection (it would otherwise wait up to 10 s on a dead path).
_STOP_PATIENCE = 0.5

#: Shown in ``pg_stat_activity`` unless the conninfo names an application already.
DEFAULT_APPLICATION_NAME = "fleetcache-notifications"
# Postgres identifiers (channel names) hold at most NAMEDATALEN - 1 bytes.
_MAX_CHANNEL_BYTES = 63


class _SilentConnectionError(Exception):
    """The liveness probe went unanswered; ``probe`` is still waiting for its answer."""

    def __init__(self, probe: asyncio.Future[Any], timeout: float) -> None:
        super().__init__(f"no answer to the liveness probe within {timeout:g} s")
        self.probe = probe


def check_channel(channel: object) -> str:
    """``channel`` if Postgres can LISTEN on it exactly as given; else ConfigurationError.

    Postgres silently truncates a longer name in LISTEN while ``pg_notify`` refuses it, so
    such a channel could never receive anything.
    """
    if isinstance(channel, str) and "\x00" not in channel:
        try:
            size = len(channel.encode())
        except UnicodeEncodeError:  # a lone surrogate: no connection can send it
            size = 0
        if 1 <= size <= _MAX_CHANNEL_BYTES:
            return channel
    raise ConfigurationError(
        f"a channel must be a string of 1 to {_MAX_CHANNEL_BYTES} UTF-8 bytes without NUL, "
        f"got {channel!r}"
    )


class NotificationHub(Service):
    """A process's single LISTEN connection for a fixed set of channels.

    Register handlers with :meth:`add_handler` and :meth:`add_gap_handler` (before or
    after ``start()``); ``start()`` connects and LISTENs, ``close()`` ends everything and
    leaves nothing listening, even when called while ``start()`` is still running. After
    a dropped or silent connection the hub reconnects by itself and calls every gap
    handler; a silent one is noticed within ``liveness_interval + liveness_timeout``
    seconds (see the module docstring). Use it as ``async with NotificationHub(url,
    [channel]) as hub`` or call ``start()`` and ``close()`` yourself; a closed hub cannot
    be started again.

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
        # A LISTEN that takes this long means a dead connection (a LISTEN takes a lock, so
        # it gets more time than the probe).
        self._command_timeout = max(5.0, 2.0 * liveness_timeout)

        # Shared state. Everything runs on one event loop and none of it is changed across
        # an await by two tasks, so no lock is needed.
        # - _handlers, _gap_handlers: appended by add_handler()/add_gap_handler() (anyone,
        #   any time before close); read by the runner, which iterates over a copy.
        # - _conn: the live connection. Set by the start task, then owned by the runner,
        #   which replaces it on reconnect and closes it when cancelled; whatever is left
        #   is closed by _on_close(). Read by backend_pid.
        # - _connected, _gaps, _reconnects: written by the start task, the runner and
        #   _on_close(); read by anyone through the properties.
        self._handlers: dict[str, list[Callable[[str], None]]] = {ch: [] for ch in self._channels}
        self._gap_handlers: list[Callable[[], None]] = []
        self._conn: _Conn | None = None
        self._connected = False
        self._gaps = 0
        self._reconnects = 0

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
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection, or None while disconnected
        (for diagnostics and tests, e.g. ``pg_terminate_backend``)."""
        conn = self._conn
        if conn is None or not self._connected or conn.closed:
            return None
        return conn.info.backend_pid

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
        notifications may have been missed meanwhile. Same rules as :meth:`add_handler`."""
        self._check_open("add_gap_handler")
        self._gap_handlers.append(callback)

    # ------------------------------------------------------------------ lifecycle

    async def _on_start(self) -> None:
        self._conn = await self._open(self._connect_budget)
        self._connected = True
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

    async def _open(self, budget: float) -> _Conn:
        """Connect and LISTEN every channel: DatabaseConnectError if the connection fails
        (transient causes retried for ``budget`` seconds), NotificationError if a LISTEN
        does; nothing is left open either way."""
        conn = await self._connect(budget)
        try:
            async with asyncio.timeout(self._command_timeout):
                for channel in self._channels:
                    await conn.execute(_LISTEN.format(sql.Identifier(channel)))
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
        self._connected = False
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
                    logger.warning("LISTEN connection silent (%s); reconnecting", exc)
                except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                    logger.warning(
                        "LISTEN connection lost (%s: %s); reconnecting", type(exc).__name__, exc
                    )
                # Declared dead: before any await, so the near tier knows at once.
                self._connected = False
                self._gaps += 1
                self._conn = None
                try:
                    if unanswered is not None:
                        await _pg.stop_query(unanswered, patience=_STOP_PATIENCE)
                finally:
                    await conn.close()
                lived = time.monotonic() - born
                short_lived = short_lived + 1 if lived < self._reconnect_max_delay else 0
                self._conn = await self._reconnect(first_attempt=short_lived)
                self._reconnects += 1
                self._connected = True
                logger.info(
                    "LISTEN connection re-established (reconnect #%d) on %d channel(s)",
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
            await asyncio.sleep(random.uniform(cap / 2, cap))
            attempt += 1
            try:
                # One connection try per round (budget 0): this loop is the retry.
                return await self._open(0.0)
            except Exception as exc:  # noqa: BLE001 - logged; retrying is the handling
                logger.warning(
                    "reconnecting the LISTEN connection failed (attempt %d): %s",
                    attempt - first_attempt,
                    exc,
                )

    async def _serve(self, conn: _Conn) -> None:
        """Dispatch notifications, and probe the connection whenever it has delivered
        nothing for ``liveness_interval``, until it fails or goes silent (this only
        returns by raising)."""
        heard = time.monotonic()  # when the connection last delivered anything
        while True:
            quiet = time.monotonic() - heard
            if quiet >= self._liveness_interval:
                await self._probe(conn)
                heard = time.monotonic()
                continue
            try:
                # aclosing: the generator holds the connection's lock until it is closed.
                async with contextlib.aclosing(
                    conn.notifies(timeout=self._liveness_interval - quiet)
                ) as notifies:
                    async for notify in notifies:
                        heard = time.monotonic()
                        self._dispatch(notify.channel, notify.payload)
            except UnicodeDecodeError as exc:
                # A payload the client encoding cannot decode (a SQL_ASCII database takes
                # any bytes). The connection is fine, but psycopg dropped the notifications
                # it was decoding with it: report a gap instead of reconnecting.
                heard = time.monotonic()
                logger.warning("undecodable notification dropped (%s); reporting a gap", exc)
                self._gaps += 1
                self._fire_gap()

    async def _probe(self, conn: _Conn) -> None:
        """``SELECT 1``, answered within ``liveness_timeout`` or :class:`_SilentConnectionError`
        (which carries the unanswered probe). Not ``asyncio.timeout``: cancelling psycopg
        mid-query makes it try to cancel the query on the server first, which on a
        frozen path takes it up to 10 s more; the runner declares the connection dead
        first and stops the probe afterwards."""
        probe = asyncio.ensure_future(conn.execute(_LIVENESS_PROBE))
        try:
            done, _ = await asyncio.wait({probe}, timeout=self._liveness_timeout)
        except asyncio.CancelledError:  # close(): the probe must not outlive the runner
            await _pg.stop_query(probe, patience=_STOP_PATIENCE)
            raise
        if not done:
            raise _SilentConnectionError(probe, self._liveness_timeout)
        probe.result()  # a driver error: the connection failed

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
