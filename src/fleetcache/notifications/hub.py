"""One LISTEN connection per process, shared by every subscriber (layer 2).

:class:`NotificationHub` owns a dedicated, autocommit ``psycopg.AsyncConnection`` (never
a pooled one: a pool would hand the session, and its LISTENs, to someone else) and
multiplexes Postgres channels to in-process subscribers.

How the one connection does three jobs
--------------------------------------
A psycopg connection runs one operation at a time (``conn.notifies()`` holds the
connection's lock while it waits). A single background task, the *runner*, therefore owns
the connection and loops:

1. apply pending LISTEN/UNLISTEN changes (asked for by ``subscribe``/``unsubscribe``);
2. wait for notifications with ``conn.notifies(timeout=liveness_interval)`` in a child
   task, dispatching each one to the channel's callbacks as it arrives;
3. when that wait times out with the connection idle, run ``SELECT 1`` so a terminated or
   half-open connection is noticed within seconds, not at the next NOTIFY.

A subscriber that needs a LISTEN *now* sets the ``_kick`` event: the runner cancels the
waiting child (safe: it is parked on socket readability, so no data has been consumed and
anything already received stays in psycopg's backlog), runs the LISTEN and resumes.

When any step fails, the runner closes the connection, reconnects with capped exponential
backoff plus jitter, re-LISTENs every channel, and only then calls every subscriber's
``on_gap()``: notifications sent while it was down are lost, and NOTIFY is a hint, never
the only signal.

A half-open TCP connection is noticed when ``SELECT 1`` does not answer within
``max(5 s, 2 x liveness_interval)``; psycopg then spends up to a few more seconds trying to
cancel the query before the connection is dropped. Put ``keepalives``/``tcp_user_timeout``
in the conninfo to tighten this further on a lossy network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from fleetcache.errors import ConfigurationError, NotificationError, NotOpenError

logger = logging.getLogger("fleetcache.notifications")

_Conn = psycopg.AsyncConnection[TupleRow]

# The hub's statements. Channel names are identifiers, so they are composed with
# sql.Identifier (quoted), never formatted in as text.
_LISTEN = sql.SQL("LISTEN {}")
_UNLISTEN = sql.SQL("UNLISTEN {}")
_LIVENESS_PROBE = "SELECT 1"

#: Shown in ``pg_stat_activity`` unless the conninfo names an application already.
DEFAULT_APPLICATION_NAME = "fleetcache-notifications"
# A connect that hangs (unreachable host) must not stall start() or a reconnect forever.
_DEFAULT_CONNECT_TIMEOUT = 10
# Postgres identifiers (channel names) hold at most NAMEDATALEN - 1 bytes.
_MAX_CHANNEL_BYTES = 63


class Subscription:
    """One subscriber's registration on one channel; end it with :meth:`unsubscribe`."""

    __slots__ = ("_active", "_hub", "callback", "channel", "on_gap")

    def __init__(
        self,
        hub: NotificationHub,
        channel: str,
        callback: Callable[[str], None],
        on_gap: Callable[[], None] | None,
    ) -> None:
        self._hub = hub
        self._active = True
        #: The Postgres channel this subscription listens on.
        self.channel = channel
        #: Called with each payload, on the event loop, in arrival order.
        self.callback = callback
        #: Called after a reconnect: notifications may have been missed meanwhile.
        self.on_gap = on_gap

    @property
    def active(self) -> bool:
        """Whether this subscription still receives notifications."""
        return self._active

    def unsubscribe(self) -> None:
        """Stop delivery to this subscriber at once (idempotent). When a channel's last
        subscriber leaves, the hub UNLISTENs it soon after (best effort)."""
        if not self._active:
            return
        self._active = False
        # The hub and its subscriptions are one unit, hence the private call.
        self._hub._remove(self)

    def __repr__(self) -> str:
        state = "active" if self._active else "ended"
        return f"<Subscription channel={self.channel!r} {state}>"


class NotificationHub:
    """A process's single LISTEN connection, multiplexing channels to subscribers.

    ``start()`` connects and LISTENs; ``subscribe()`` works before or after it; ``close()``
    ends everything. After a dropped connection the hub reconnects by itself and calls
    every subscriber's ``on_gap()``. Use it as ``async with NotificationHub(url) as hub``
    or call ``start()``/``close()`` yourself. A closed hub cannot be started again.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        liveness_interval: float = 2.0,
        reconnect_min_delay: float = 0.05,
        reconnect_max_delay: float = 5.0,
    ) -> None:
        if liveness_interval <= 0:
            raise ConfigurationError(f"liveness_interval must be > 0, got {liveness_interval}")
        if reconnect_min_delay <= 0 or reconnect_max_delay < reconnect_min_delay:
            raise ConfigurationError(
                "need 0 < reconnect_min_delay <= reconnect_max_delay, got "
                f"{reconnect_min_delay} and {reconnect_max_delay}"
            )
        self._conninfo = conninfo
        self._liveness_interval = liveness_interval
        self._reconnect_min_delay = reconnect_min_delay
        self._reconnect_max_delay = reconnect_max_delay
        # A LISTEN, UNLISTEN or liveness probe that takes this long means a dead connection.
        self._command_timeout = max(5.0, 2.0 * liveness_interval)

        # Shared state. Everything runs on one event loop, so no lock is needed: state
        # changes only between awaits.
        # - _subs: written by subscribe() and Subscription.unsubscribe() (and cleared by
        #   close()); read by the runner to decide what to LISTEN and to dispatch. It only
        #   holds channels with at least one subscriber; lists keep subscription order.
        # - _listening: the channels LISTENed on the current connection. Written only by
        #   the task that owns the connection (the start task, then the runner), which
        #   clears it when the connection is lost; read by subscribe() to know whether it
        #   must wait for a LISTEN.
        # - _waiters: futures of subscribe() calls waiting for their channel's LISTEN.
        #   Added by subscribe(); resolved by the connection owner after the LISTEN, and by
        #   whoever drops the connection or closes the hub, so no subscribe() waits on a
        #   connection that no longer exists.
        # - _kick: set by subscribe()/unsubscribe()/close() to wake the runner, cleared by
        #   the runner before it applies the pending changes.
        # - _conn: the live connection. Set by the start task, replaced by the runner on
        #   reconnect, and closed by the runner or, finally, by close().
        # - _connected, _reconnects, _start_task, _runner, _closed: written by start(),
        #   close() and the runner; read by anyone.
        self._subs: dict[str, list[Subscription]] = {}
        self._listening: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._kick = asyncio.Event()
        self._connected = False
        self._reconnects = 0
        self._conn: _Conn | None = None
        self._start_task: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """Whether the LISTEN connection is up (as far as the hub knows right now)."""
        return self._connected

    @property
    def reconnects(self) -> int:
        """How many times the hub has reconnected after losing its connection."""
        return self._reconnects

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the LISTEN connection, or None while disconnected
        (for tests and diagnostics, e.g. ``pg_terminate_backend``)."""
        conn = self._conn
        if conn is None or not self._connected or conn.closed:
            return None
        return conn.info.backend_pid

    @property
    def channels(self) -> frozenset[str]:
        """The channels that currently have at least one subscriber."""
        return frozenset(self._subs)

    async def start(self) -> None:
        """Connect and LISTEN every subscribed channel, then keep the connection alive in
        the background. Idempotent; concurrent calls share one start.

        Raises :class:`~fleetcache.errors.NotificationError` if the first connection or
        LISTEN fails (later drops are handled by reconnecting, never raised), and
        :class:`~fleetcache.errors.NotOpenError` if the hub is closed, before or while
        starting.
        """
        if self._closed:
            raise NotOpenError("NotificationHub is closed; create a new one")
        if self._start_task is None or _failed(self._start_task):
            # A failed start may be retried. The start runs in its own tracked task so
            # close() can cancel it wherever it is, and a caller cancelled while waiting
            # does not abort it for the others.
            self._start_task = asyncio.create_task(self._start(), name="fleetcache-hub-start")
        task = self._start_task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._closed:
                raise NotOpenError("NotificationHub was closed while it was starting") from None
            raise

    async def close(self) -> None:
        """Stop listening and close the connection (idempotent). Cancels and awaits every
        background task, including a ``start()`` still in progress, so nothing is left
        listening and no task outlives this call."""
        self._closed = True
        self._kick.set()
        # A loop, in case a task started another before it saw its cancellation.
        while tasks := [
            t for t in (self._start_task, self._runner) if t is not None and not t.done()
        ]:
            for task in tasks:
                task.cancel()
            # Their outcome (a failed start's error, the cancellation) is not close()'s
            # to raise; _failed() marks a stored exception as retrieved.
            await asyncio.wait(tasks)
            for task in tasks:
                _failed(task)
        await self._drop_connection()
        self._resolve_waiters()
        for subs in self._subs.values():
            for sub in subs:
                sub._active = False
        self._subs.clear()

    async def subscribe(
        self,
        channel: str,
        callback: Callable[[str], None],
        *,
        on_gap: Callable[[], None] | None = None,
    ) -> Subscription:
        """Register ``callback(payload)`` for ``channel``; ``on_gap()`` runs after every
        reconnect. Works before or after ``start()``.

        If the hub is connected (or starting), this returns once the channel's LISTEN has
        run, so a NOTIFY sent after it returns is delivered. While the hub is reconnecting
        it returns at once; the LISTEN follows the reconnect, and so does ``on_gap()``.
        Callbacks are synchronous and must be cheap: they run on the event loop, in
        arrival order, and an exception in one is logged and otherwise ignored.
        """
        if self._closed:
            raise NotOpenError("NotificationHub is closed; cannot subscribe")
        if not channel or len(channel.encode()) > _MAX_CHANNEL_BYTES:
            # Postgres would silently truncate a longer name in LISTEN, and pg_notify
            # refuses it, so such a subscription could never receive anything.
            raise ConfigurationError(
                f"channel must be 1 to {_MAX_CHANNEL_BYTES} bytes long, got {channel!r}"
            )
        sub = Subscription(self, channel, callback, on_gap)
        self._subs.setdefault(channel, []).append(sub)
        starting = self._start_task is not None and not self._start_task.done()
        if channel in self._listening or not (self._connected or starting):
            return sub
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(waiter)
        self._kick.set()
        try:
            await waiter
        except asyncio.CancelledError:
            # The caller never gets the Subscription, so it could never unsubscribe.
            sub.unsubscribe()
            raise
        return sub

    async def __aenter__(self) -> NotificationHub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ subscriptions

    def _remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is None:
            return
        with contextlib.suppress(ValueError):
            subs.remove(sub)
        if not subs:
            del self._subs[sub.channel]
            self._kick.set()  # the runner UNLISTENs it on its next round

    def _resolve_waiters(self, channel: str | None = None) -> None:
        if channel is None:
            waiters = [w for ws in self._waiters.values() for w in ws]
            self._waiters.clear()
        else:
            waiters = self._waiters.pop(channel, [])
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _dispatch(self, channel: str, payload: str) -> None:
        # A copy: a callback may unsubscribe (itself or others) while we iterate.
        for sub in list(self._subs.get(channel, ())):
            if not sub.active:
                continue
            try:
                sub.callback(payload)
            except Exception:
                logger.exception(
                    "notification callback %r failed on channel %r (payload %d bytes)",
                    sub.callback,
                    channel,
                    len(payload.encode()),
                )

    def _fire_gap(self) -> None:
        for sub in [s for subs in self._subs.values() for s in subs]:
            if not sub.active or sub.on_gap is None:
                continue
            try:
                sub.on_gap()
            except Exception:
                logger.exception("on_gap callback %r failed on channel %r", sub.on_gap, sub.channel)

    # ------------------------------------------------------------------ connection

    async def _connect(self) -> _Conn:
        params = conninfo_to_dict(self._conninfo)
        params.setdefault("application_name", DEFAULT_APPLICATION_NAME)
        params.setdefault("connect_timeout", _DEFAULT_CONNECT_TIMEOUT)
        connecting = asyncio.create_task(
            psycopg.AsyncConnection.connect(make_conninfo("", **params), autocommit=True),
            name="fleetcache-hub-connect",
        )
        try:
            conn = await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # Cancelling psycopg's connect half way leaves the libpq connection, and its
            # server backend, open until garbage collection. Let the attempt finish
            # (bounded by connect_timeout) and close what it made, so close() really
            # leaves nothing listening.
            with contextlib.suppress(Exception):
                await (await connecting).close()
            raise
        try:
            await self._sync_channels(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _sync_channels(self, conn: _Conn) -> None:
        """LISTEN what has subscribers and UNLISTEN what has none, until both agree."""
        while True:
            to_listen = [ch for ch in self._subs if ch not in self._listening]
            to_unlisten = [ch for ch in self._listening if ch not in self._subs]
            if not to_listen and not to_unlisten:
                return
            async with asyncio.timeout(self._command_timeout):
                for channel in to_unlisten:
                    # Forget it *before* the await: a subscribe() arriving meanwhile must
                    # wait for a fresh LISTEN, not trust one that is being undone.
                    self._listening.discard(channel)
                    await conn.execute(_UNLISTEN.format(sql.Identifier(channel)))
                for channel in to_listen:
                    await conn.execute(_LISTEN.format(sql.Identifier(channel)))
                    self._listening.add(channel)
                    self._resolve_waiters(channel)

    async def _start(self) -> None:
        try:
            conn = await self._connect()
        except Exception as exc:  # a driver error, or a LISTEN that timed out
            self._resolve_waiters()
            self._listening.clear()
            raise NotificationError(
                f"NotificationHub could not connect and LISTEN on {sorted(self._subs)}: {exc}"
            ) from exc
        except BaseException:
            self._resolve_waiters()
            self._listening.clear()
            raise
        self._conn = conn
        self._connected = True
        # The runner takes the connection over. If close() cancels it before its first
        # step its body never runs, so close() itself closes self._conn.
        self._runner = asyncio.create_task(self._run(), name="fleetcache-hub-runner")

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
                try:
                    await self._serve(conn)
                except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                    logger.warning(
                        "LISTEN connection lost (%s: %s); reconnecting",
                        type(exc).__name__,
                        exc,
                    )
                self._connected = False
                self._listening.clear()
                self._resolve_waiters()
                self._conn = None
                await conn.close()
                lived = time.monotonic() - born
                short_lived = short_lived + 1 if lived < self._reconnect_max_delay else 0
                self._conn = await self._reconnect(first_attempt=short_lived)
                self._reconnects += 1
                self._connected = True
                logger.info(
                    "LISTEN connection re-established (reconnect #%d) on %d channel(s)",
                    self._reconnects,
                    len(self._listening),
                )
                self._fire_gap()
        finally:
            # Reached only by cancellation (close()): leave nothing listening.
            await self._drop_connection()

    async def _drop_connection(self) -> None:
        self._connected = False
        self._listening.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _reconnect(self, *, first_attempt: int = 0) -> _Conn:
        """Connect again (and re-LISTEN), retrying with capped exponential backoff that
        starts at ``first_attempt`` (non-zero when the last connections died young)."""
        attempt = first_attempt
        while True:
            # The exponent is capped so a long outage cannot overflow the float.
            cap = min(self._reconnect_max_delay, self._reconnect_min_delay * 2 ** min(attempt, 30))
            # Jitter spreads a fleet's reconnects after a server restart.
            await asyncio.sleep(random.uniform(cap / 2, cap))
            attempt += 1
            try:
                return await self._connect()
            except Exception as exc:  # noqa: BLE001 - logged; retrying is the handling
                self._listening.clear()
                logger.warning(
                    "reconnecting the LISTEN connection failed (attempt %d: %s: %s)",
                    attempt - first_attempt,
                    type(exc).__name__,
                    exc,
                )

    async def _serve(self, conn: _Conn) -> None:
        """Apply subscription changes, dispatch notifications and probe liveness until the
        connection fails (this only returns by raising)."""
        last_alive = time.monotonic()
        while True:
            self._kick.clear()
            await self._sync_channels(conn)
            kicked = await self._wait_for_notifies(conn)
            if not kicked or time.monotonic() - last_alive >= self._liveness_interval:
                async with asyncio.timeout(self._command_timeout):
                    await conn.execute(_LIVENESS_PROBE)
                last_alive = time.monotonic()

    async def _wait_for_notifies(self, conn: _Conn) -> bool:
        """Dispatch notifications for up to ``liveness_interval`` seconds; return True if
        the wait was cut short by a kick. Connection errors propagate."""
        reader = asyncio.create_task(self._read_notifies(conn), name="fleetcache-hub-reader")
        kick = asyncio.create_task(self._kick.wait(), name="fleetcache-hub-kick")
        try:
            await asyncio.wait({reader, kick}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # The reader is parked on socket readability when cancelled, so nothing it
            # has not dispatched yet has been read: it stays for the next wait.
            for task in (reader, kick):
                task.cancel()
            await asyncio.wait({reader, kick})
        if not reader.cancelled():
            reader.result()  # re-raise a connection error
            return False
        return True

    async def _read_notifies(self, conn: _Conn) -> None:
        # aclosing: the generator holds the connection's lock until it is closed.
        async with contextlib.aclosing(conn.notifies(timeout=self._liveness_interval)) as gen:
            async for notify in gen:
                self._dispatch(notify.channel, notify.payload)


def _failed(task: asyncio.Task[None]) -> bool:
    """Whether a finished task ended with an exception (other than cancellation)."""
    return task.done() and not task.cancelled() and task.exception() is not None
