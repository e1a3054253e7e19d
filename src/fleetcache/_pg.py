"""Everything fleetcache does with the Postgres driver that is not a query: translating
driver errors (the one place it happens), classifying why a connection failed, and
connecting with a bounded budget.

Why classify by message: libpq reports a failed connection as an ``OperationalError``
without a SQLSTATE (no server result exists yet), so the cause is only in its text. The
patterns below are libpq's and the server's English messages; an unrecognised message is
treated as transient ("other") and retried within the budget, then raised with its text.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from fleetcache.errors import ConnectCause, DatabaseConnectError, FleetcacheError, StoreError
from fleetcache.logcontext import get_logger

T = TypeVar("T")

logger = get_logger("fleetcache.pg")

#: How long (seconds) one connection attempt may take before it counts as a timeout.
CONNECT_TIMEOUT = 5
#: How long (seconds) transient connection failures are retried before giving up.
CONNECT_BUDGET = 10.0

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
) -> psycopg.AsyncConnection[Any]:
    """One connection outside any pool (LISTEN, locks, a first check before a pool opens).

    Permanent failures (authentication, missing database, refused, unresolvable host)
    raise :class:`DatabaseConnectError` at once; transient ones are retried with jittered
    backoff until ``budget`` seconds have passed, then raised the same way.
    """
    params = conninfo_to_dict(conninfo)
    params.setdefault("application_name", application_name)
    params.setdefault("connect_timeout", connect_timeout)
    final = make_conninfo("", **params)
    deadline = time.monotonic() + budget
    delay = 0.05
    while True:
        try:
            return await psycopg.AsyncConnection.connect(final, autocommit=autocommit)
        except psycopg.Error as exc:
            cause = connect_cause(exc)
            if is_permanent(cause) or time.monotonic() + delay > deadline:
                raise connect_error(conninfo, exc, cause) from exc
        await asyncio.sleep(random.uniform(delay / 2, delay))
        delay = min(delay * 2, 1.0)


def connect_error(conninfo: str, exc: BaseException, cause: ConnectCause) -> DatabaseConnectError:
    """The typed error for a failed connection to ``conninfo``."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseConnectError(
        f"cannot connect to {describe_target(conninfo)} ({cause}): {first_line}", cause
    )


def is_connection_lost(exc: BaseException, conn: psycopg.AsyncConnection[Any] | None) -> bool:
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
        except psycopg.Error as exc:
            if not (retry and attempt == 1 and conn is not None and is_connection_lost(exc, conn)):
                raise error(f"{what} failed: {one_line(exc)}") from exc
            log_lost_connection(what, exc)
        attempt += 1
        try:
            await pool.check()
        except psycopg.Error as exc:  # the pool could not even be checked: report that
            raise error(f"{what} failed: checking the pool: {one_line(exc)}") from exc


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
