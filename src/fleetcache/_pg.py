"""Everything fleetcache does with the Postgres driver that is not a query: translating
driver errors (the one place it happens), classifying why a connection failed, and
connecting (one connection or a pool's first ones) with a bounded budget.

Why classify by message: libpq reports a failed connection as an ``OperationalError``
without a SQLSTATE (no server result exists yet), so the cause is only in its text. The
patterns below are libpq's and the server's English messages; an unrecognised message is
treated as transient ("other") and retried within the budget, then raised with its text.
A connection string libpq refuses as invalid (a port that is not a number, an unknown
``sslmode``...) is a :class:`~fleetcache.errors.ConfigurationError`, raised at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Self, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from fleetcache.errors import (
    ConfigurationError,
    ConnectCause,
    DatabaseConnectError,
    FleetcacheError,
    NotificationError,
    StoreError,
)
from fleetcache.logcontext import get_logger

T = TypeVar("T")

logger = get_logger("fleetcache.pg")

#: How long (seconds) one connection attempt may take before it counts as a timeout.
CONNECT_TIMEOUT = 5
#: How long (seconds) transient connection failures are retried before giving up.
CONNECT_BUDGET = 10.0

# Retry jitter has a generator of its own: the library never draws from (and so never
# disturbs) the application's global random state, which it may have seeded.
_JITTER = random.Random()

_PERMANENT: frozenset[ConnectCause] = frozenset(
    {"authentication", "database-missing", "refused", "unresolvable"}
)

# (pattern, cause), first match wins; matched against the lower-cased message.
_PATTERNS: tuple[tuple[str, ConnectCause], ...] = (
    (
        r"password authentication failed|role \".*\" does not exist|no pg_hba\.conf entry"
        r"|authentication failed|fe_sendauth|peer authentication",
        "authentication",
    ),
    (r"database \".*\" does not exist", "database-missing"),
    (r"connection refused|no such file or directory", "refused"),
    (
        r"could not translate host name|failed to resolve host|name or service not known"
        r"|nodename nor servname",
        "unresolvable",
    ),
    (
        r"the database system is (starting up|shutting down|in recovery mode)"
        r"|not yet accepting connections",
        "starting",
    ),
    (
        r"too many clients|too many connections|remaining connection slots",
        "too-many-connections",
    ),
    (r"timeout expired|timed out|connection timeout", "timeout"),
)
_CAUSES = tuple((re.compile(pattern), cause) for pattern, cause in _PATTERNS)

# libpq's messages for a connection string it refuses before trying anything (a bad
# option value, ports that do not match the hosts); no retry can change them.
_INVALID_CONNINFO = re.compile(
    r"invalid integer value .* for connection option|invalid port number"
    r"|invalid \"?[a-z_]+\"? value|could not match \d+ (port numbers|host names|host addresses)"
    r"|invalid connection option|may not be used with|invalid .* when ssl support is not"
)


def check_conninfo(conninfo: str) -> dict[str, Any]:
    """``conninfo``'s parameters, or :class:`ConfigurationError` when it cannot be parsed
    or names a port that is not a number from 1 to 65535 (libpq would refuse it only when
    connecting, and some paths report it as a failed host lookup)."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise ConfigurationError(f"invalid connection string: {one_line(exc)}") from exc
    port = params.get("port")
    if port is not None:
        for part in str(port).split(","):
            text = part.strip()
            if text and not (text.isdigit() and 1 <= int(text) <= 65535):
                raise ConfigurationError(
                    f"port {str(port)!r} in the connection string is not a number from 1 to 65535"
                )
    return params


def invalid_conninfo(conninfo: str, exc: BaseException) -> ConfigurationError | None:
    """The configuration error ``exc`` reports (libpq refused the connection string
    itself), or None when it is about reaching the server."""
    if not _INVALID_CONNINFO.search(str(exc).lower()):
        return None
    return ConfigurationError(
        f"invalid connection string for {describe_target(conninfo)}: {one_line(exc)}"
    )


def connect_cause(exc: BaseException) -> ConnectCause:
    """Why a connection attempt failed, from the driver's exception."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    message = str(exc).lower()
    for pattern, cause in _CAUSES:
        if pattern.search(message):
            return cause
    return "other"


def is_permanent(cause: ConnectCause) -> bool:
    """Whether retrying a connection that failed for ``cause`` is pointless."""
    return cause in _PERMANENT


def describe_target(conninfo: str) -> str:
    """Where ``conninfo`` points, for messages (never its password)."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "<unparseable connection string>"
    host = params.get("host") or "localhost (default socket)"
    port = params.get("port") or "5432"
    return f"database {params.get('dbname') or '<default>'!r} at {host}:{port}"


async def connect(
    conninfo: str,
    *,
    application_name: str,
    autocommit: bool = True,
    budget: float = CONNECT_BUDGET,
    connect_timeout: int = CONNECT_TIMEOUT,
    prepare_threshold: int | None = 5,
) -> psycopg.AsyncConnection[Any]:
    """One connection outside any pool (LISTEN, locks, a first check before a pool opens).

    Permanent failures (authentication, missing database, refused, unresolvable host)
    raise :class:`DatabaseConnectError` at once; transient ones are retried with jittered
    backoff until ``budget`` seconds have passed, then raised the same way (``budget=0``:
    one attempt). An invalid connection string raises :class:`ConfigurationError` at once.
    ``prepare_threshold`` is psycopg's (None: no server-side prepared statements, as a
    connection through a transaction pooler needs).
    """
    params = check_conninfo(conninfo)
    params.setdefault("application_name", application_name)
    params.setdefault("connect_timeout", connect_timeout)
    final = make_conninfo("", **params)
    deadline = time.monotonic() + budget
    delay = 0.05
    while True:
        try:
            return await psycopg.AsyncConnection.connect(
                final, autocommit=autocommit, prepare_threshold=prepare_threshold
            )
        except psycopg.Error as exc:
            invalid = invalid_conninfo(conninfo, exc)
            if invalid is not None:
                raise invalid from exc
            cause = connect_cause(exc)
            if is_permanent(cause) or time.monotonic() + delay > deadline:
                raise connect_error(conninfo, exc, cause) from exc
        await asyncio.sleep(jittered(delay))
        delay = min(delay * 2, 1.0)


def jittered(delay: float) -> float:
    """A random wait between half ``delay`` and ``delay``: retries of a fleet spread out."""
    return _JITTER.uniform(delay / 2, delay)


class ConnectFailures:
    """Records why a pool's connection attempts fail: give :attr:`connection_class` to
    the pool, whose background workers otherwise only log the failures. Read by
    :func:`open_pool` and by :func:`pooled` (to say why no connection could be had)."""

    def __init__(self) -> None:
        # Written by the pool's connection attempts, read by open_pool() and pooled();
        # event loop only.
        self.last: psycopg.Error | None = None
        self.at = 0.0  # time.monotonic() of ``last``
        self.succeeded_at = 0.0  # time.monotonic() of the last connection made
        failures = self

        class _Recorded(psycopg.AsyncConnection[Any]):
            fleetcache_failures = failures  # found by pooled() through pool.connection_class

            @classmethod
            async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
                try:
                    conn = await super().connect(conninfo, **kwargs)
                except psycopg.Error as exc:
                    failures.last, failures.at = exc, time.monotonic()
                    raise
                failures.succeeded_at = time.monotonic()
                return conn

        self.connection_class: type[psycopg.AsyncConnection[Any]] = _Recorded

    def since(self, moment: float) -> psycopg.Error | None:
        """The last failure if it happened after ``moment`` (``time.monotonic()``)."""
        return self.last if self.last is not None and self.at >= moment else None

    def standing(self) -> psycopg.Error | None:
        """The last failure unless a connection was made after it."""
        return self.since(self.succeeded_at)


async def open_pool(
    pool: AsyncConnectionPool[Any], failures: ConnectFailures, conninfo: str, *, budget: float
) -> None:
    """Open ``pool`` (made with ``failures.connection_class``) and wait for its
    ``min_size`` connections, with :func:`connect`'s rules: a permanent cause raises
    :class:`DatabaseConnectError` at once, a transient one once ``budget`` seconds have
    passed (the pool retries meanwhile), each naming the cause (``too-many-connections``,
    not "pool initialization incomplete"). A failed open leaves the pool closed."""
    began = time.monotonic()
    deadline = began + budget
    await pool.open(wait=False)
    ready = asyncio.ensure_future(pool.wait(timeout=budget + CONNECT_TIMEOUT))
    try:
        while not ready.done():
            await asyncio.wait({ready}, timeout=0.02)
            exc = failures.since(began)
            if exc is None or ready.done():
                continue
            invalid = invalid_conninfo(conninfo, exc)
            if invalid is not None:
                raise invalid from exc
            cause = connect_cause(exc)
            if is_permanent(cause) or time.monotonic() >= deadline:
                raise connect_error(conninfo, exc, cause) from exc
        try:
            ready.result()
        except PoolTimeout as exc:  # no attempt failed: each one hung
            raise connect_error(conninfo, exc, "timeout") from exc
    except BaseException:
        ready.cancel()
        await pool.close()
        raise


async def stop_query(task: asyncio.Future[Any], *, patience: float) -> None:
    """End ``task``, a statement on a connection that stopped answering: cancelled,
    psycopg asks the server to cancel the query and waits for it to end (up to 10 s on a
    dead path); cancelled again meanwhile, it closes the connection at once. So this takes
    about ``patience`` seconds at most, and the task's outcome is consumed."""
    for wait in (patience, 1.0):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=wait)
    if not task.done():
        logger.warning("a statement on a dead connection ignored its cancellation")
    elif not task.cancelled():
        task.exception()  # a driver error on a connection already given up


#: The backend serving a connection right now (through a pooler: the server connection
#: it was given for this statement).
_BACKEND_PID = "SELECT pg_backend_pid()"
#: The session check's NOTIFY to a channel only the checked connection LISTENs on.
_NOTIFY_CHECK = "SELECT pg_notify(%(channel)s, 'check')"


async def refuse_transaction_pooler(
    conn: psycopg.AsyncConnection[Any],
    pin: Callable[[], contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]],
    *,
    conninfo: str,
    same_address: bool,
    rounds: int = 3,
    patience: float = 5.0,
) -> None:
    """Raise :class:`ConfigurationError` naming the fix if ``conn`` (connected to
    ``conninfo``: the session) reaches the server through a pooler that gives its server
    connections to other clients between transactions (PgBouncer in transaction or
    statement mode), where LISTEN and session locks would land on a server connection
    that is then lent to someone else. ``pin()`` lends a pooled connection to the same
    database; ``same_address``: whether the pool connects where the session does.

    First, ``rounds`` times: read ``conn``'s backend pid; begin a transaction on the pin
    and read its pid; read ``conn``'s again while the pin's transaction keeps its backend
    busy. A direct connection has one backend for its whole life, which no other client
    ever has: the pids are ``a, b, a`` with ``b != a``. Through a transaction pooler the
    pool shares, either the pin got ``conn``'s backend (poolers hand out the most recently
    released server connection first, PgBouncer's default: ``b == a``), or ``conn``'s
    second statement ran elsewhere (it could not have the backend the pin holds), or it
    waited for the pin's transaction (a pool of one). Only pids are read, so nothing is
    left on a pooled server connection.

    When the pool connects elsewhere (it may be direct while the session is pooled, which
    the first test cannot see), then: ``conn`` LISTENs on a channel of its own and the pin
    NOTIFYs it. A direct session hears it at once; through a transaction pooler the
    LISTEN stayed on a server connection that went back to the pool, and nothing arrives
    within ``patience`` seconds. (That LISTEN is then left on the pooler's server
    connection, on a channel nobody uses.)

    It costs a few round trips at open, no connection of its own, and no access to the
    pooler's console; a pooler in session mode (one server connection per client), or a
    plain TCP proxy, passes, as it should.
    """
    target = describe_target(conninfo)
    try:
        evidence = await _shared_backend(conn, pin, rounds=rounds, patience=patience)
        if evidence is None and not same_address:
            evidence = await _deaf_listen(conn, pin, patience=patience)
    except psycopg.Error as exc:
        raise NotificationError(
            f"checking that {target} gives a session of its own failed: {one_line(exc)}"
        ) from exc
    if evidence is not None:
        raise ConfigurationError(
            f"the session connection to {target} goes through a transaction pooler "
            f"({evidence}): LISTEN and the fleet's locks need a session of their own. "
            "Pass session_url= a connection string that reaches PostgreSQL directly (the "
            "pooler may stay as the url, for pooled statements), or run the pooler in "
            "session mode"
        )


async def _shared_backend(
    conn: psycopg.AsyncConnection[Any],
    pin: Callable[[], contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]],
    *,
    rounds: int,
    patience: float,
) -> str | None:
    """What shows ``conn`` shares its backend with other clients, or None."""
    for _ in range(rounds):
        first = await _backend_pid(conn)
        async with pin() as other:
            await other.execute("BEGIN", prepare=False)
            try:
                theirs = await _backend_pid(other)
                again = asyncio.ensure_future(_backend_pid(conn))
                done, _ = await asyncio.wait({again}, timeout=patience)
            finally:
                await other.execute("ROLLBACK", prepare=False)
            second = await again
        if theirs == first:
            return f"another client's transaction ran on this connection's backend {first}"
        if second != first:
            return f"two statements of one connection ran on backends {first} and {second}"
        if not done:
            return f"a statement waited {patience:g} s for another client's transaction"
    return None


async def _deaf_listen(
    conn: psycopg.AsyncConnection[Any],
    pin: Callable[[], contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]],
    *,
    patience: float,
) -> str | None:
    """What shows a LISTEN on ``conn`` does not hear, or None."""
    channel = f"fleetcache_session_check_{secrets.token_hex(8)}"
    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)), prepare=False)
    async with pin() as other:
        await other.execute(_NOTIFY_CHECK, {"channel": channel}, prepare=False)
    heard = False
    async for notify in conn.notifies(timeout=patience, stop_after=1):
        heard = heard or notify.channel == channel
    if not heard:
        return f"a NOTIFY to this connection's LISTEN did not arrive within {patience:g} s"
    await conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)), prepare=False)
    return None


async def _backend_pid(conn: psycopg.AsyncConnection[Any]) -> int:
    # prepare=False: the check must not leave a prepared statement on a pooled server
    # connection (a pooler would hand it to someone else).
    row = await (await conn.execute(_BACKEND_PID, prepare=False)).fetchone()
    assert row is not None  # SELECT without FROM returns one row
    return int(row[0])


def connect_error(conninfo: str, exc: BaseException, cause: ConnectCause) -> DatabaseConnectError:
    """The typed error for a failed connection to ``conninfo``."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseConnectError(
        f"cannot connect to {describe_target(conninfo)} ({cause}): {first_line}", cause
    )


def is_connection_lost(
    exc: BaseException, conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any] | None
) -> bool:
    """Whether ``exc`` means the connection itself is gone (server restart, terminated
    backend, network), so the same statement may succeed on a fresh connection.

    A pool's own failures (no connection within its timeout, a closed pool) are not: a
    second try would only wait as long again."""
    if isinstance(exc, PoolTimeout | PoolClosed):
        return False
    if conn is not None and (conn.closed or conn.broken):
        return True
    return isinstance(exc, psycopg.OperationalError) and getattr(exc, "sqlstate", None) in (
        None,
        "57P01",  # admin_shutdown (pg_terminate_backend, server shutdown)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "08000",
        "08003",
        "08006",
    )


@contextlib.contextmanager
def translate(what: str, error: type[FleetcacheError] = StoreError) -> Iterator[None]:
    """Turn a driver error raised inside into ``error("<what> failed: ...")`` (from it)."""
    try:
        yield
    except psycopg.Error as exc:
        raise error(f"{what} failed: {one_line(exc)}") from exc


def log_lost_connection(what: str, exc: BaseException) -> None:
    """Say that ``what`` lost its pooled connection and is tried once more."""
    logger.warning(
        "%s: the pooled connection was lost (%s); checking the pool and trying once more "
        "on a fresh connection",
        what,
        one_line(exc),
    )


def one_line(exc: BaseException) -> str:
    """A driver error's message on one line (what our errors quote)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def pooled(
    pool: AsyncConnectionPool[Any],
    what: str,
    fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]],
    *,
    error: type[FleetcacheError] = StoreError,
    retry: bool = True,
) -> T:
    """Run ``fn`` on a connection of ``pool``; driver errors leave as ``error`` naming
    ``what``.

    If the connection turns out to be dead (a server restart or a terminated backend
    leaves every idle pooled connection dead, and nothing notices until it is used),
    ``pool.check()`` discards the pool's other dead connections and ``fn`` runs once more
    on a fresh one, so a restart costs no caller a failure. Only pass ``retry=True``
    (the default) for an ``fn`` that may safely run twice: one that only reads, or whose
    second run leaves the database as one run would (the first may have committed before
    its connection died). Any exception inside ``fn`` leaves the connection to the pool,
    which rolls back whatever transaction it left open (or discards the connection).
    """
    attempt = 1
    while True:
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            async with pool.connection() as conn:
                return await fn(conn)
        except PoolTimeout as exc:
            raise error(f"{what} failed: {one_line(exc)}{_growth_note(pool)}") from exc
        except psycopg.Error as exc:
            if not (retry and attempt == 1 and conn is not None and is_connection_lost(exc, conn)):
                raise error(f"{what} failed: {one_line(exc)}") from exc
            log_lost_connection(what, exc)
        attempt += 1
        try:
            await pool.check()
        except psycopg.Error as exc:  # the pool could not even be checked: report that
            raise error(f"{what} failed: checking the pool: {one_line(exc)}") from exc


def _growth_note(pool: AsyncConnectionPool[Any]) -> str:
    """Why ``pool`` cannot grow, if its last attempt to connect failed."""
    failures = getattr(pool.connection_class, "fleetcache_failures", None)
    exc = failures.standing() if isinstance(failures, ConnectFailures) else None
    if exc is None:
        return ""
    return f" (the pool could not grow: {connect_cause(exc)}: {one_line(exc)})"


@contextlib.asynccontextmanager
async def pipelined_transaction(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    """A transaction whose ``BEGIN``, statements and ``COMMIT`` go to the server in one
    pipeline, on an autocommit connection: one round trip in all unless a result is
    fetched inside (each fetch costs one). psycopg's own ``conn.transaction()`` syncs after
    ``BEGIN`` and again around ``COMMIT``, three round trips more.

    Any exception inside (or a failed statement, raised when the pipeline syncs) rolls the
    transaction back before it propagates; a connection that cannot even roll back is
    closed, so the pool discards it instead of lending it out in a transaction.
    """
    try:
        async with conn.pipeline():
            await conn.execute("BEGIN")
            yield
            await conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                await conn.execute("ROLLBACK")
            except psycopg.Error:  # the original exception is the one to report
                await conn.close()
            except BaseException:  # e.g. cancelled while rolling back
                await conn.close()
                raise
        raise
