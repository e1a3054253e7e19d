"""The invalidation broadcast (layer 4): the strict parser, and a publisher.

Every invalidation is announced on the invalidated channel, so peers discard work in
flight and near copies. The Postgres store sends the payloads itself, with ``pg_notify``
inside the invalidation's own transaction: they are delivered exactly when it commits
and never after a rollback, so a caller cancelled after the commit cannot lose them.
:func:`~fleetcache.stores.payloads.invalidation_payloads` builds them (re-exported here
with the older encoders); the format::

    {"k":"module","r":<namespace>,"m":[<name>, ...],"o":<origin>}   names in one namespace
    {"k":"realm","r":<namespace>,"o":<origin>}                        a whole namespace
    {"k":"global","o":<origin>}                                       everything

``o`` is the sender's *origin*, a short random id per process, so a listener can skip the
echoes of its own process's invalidations without mistaking a peer's identical payload
for one (comparing payloads would). A payload without ``o`` comes from an older peer and
counts as foreign. Name lists are chunked so each payload stays under a byte budget (7000
by default; Postgres refuses 8000 bytes and more).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import psycopg
from psycopg_pool import AsyncConnectionPool

from fleetcache._pg import pooled
from fleetcache.errors import ConfigurationError, NotificationError
from fleetcache.logcontext import get_logger
from fleetcache.notifications.hub import check_channel
from fleetcache.stores.payloads import (
    INVALIDATED_CHANNEL,
    MAX_ORIGIN_CHARS,
    PAYLOAD_BUDGET,
    invalidation_payloads,
    is_origin,
    is_sendable,
    new_origin,
)

__all__ = [
    "INVALIDATED_CHANNEL",
    "PAYLOAD_BUDGET",
    "Invalidation",
    "InvalidationKind",
    "PostgresInvalidationPublisher",
    "encode_global_payload",
    "encode_module_payloads",
    "encode_realm_payload",
    "invalidation_payloads",
    "is_sendable",
    "new_origin",
    "parse_invalidation",
]

logger = get_logger("fleetcache.notifications")

# Postgres delivers at most 7999 bytes, hence characters: anything longer is not a NOTIFY
# payload, and is refused before any parsing work.
_MAX_PAYLOAD_CHARS = 8000

# Sends one payload. pg_notify (not NOTIFY) because the channel and payload are values,
# bound as parameters.
_PUBLISH = "SELECT pg_notify(%s, %s)"

#: The three kinds of invalidation.
InvalidationKind: TypeAlias = Literal["module", "realm", "global"]


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One parsed broadcast: ``names`` in ``namespace`` (kind ``module``), the whole
    ``namespace`` (``realm``), or everything (``global``: namespace is None), sent by the
    publisher ``origin`` (None: an older peer that sends none)."""

    kind: InvalidationKind
    namespace: str | None = None
    names: tuple[str, ...] = ()
    origin: str | None = None


def encode_module_payloads(
    namespace: str,
    names: Sequence[str],
    *,
    origin: str | None = None,
    budget: int = PAYLOAD_BUDGET,
) -> list[str]:
    """Payloads invalidating ``names`` in ``namespace``: ``invalidation_payloads(namespace,
    names, ...)`` (chunked under ``budget``; the realm payload when a name cannot travel
    by name; no names, no payloads)."""
    return invalidation_payloads(namespace, names, origin=origin, budget=budget)


def encode_realm_payload(namespace: str, *, origin: str | None = None) -> str:
    """The payload invalidating a whole namespace (the global one if it cannot travel)."""
    return invalidation_payloads(namespace, origin=origin)[0]


def encode_global_payload(*, origin: str | None = None) -> str:
    """The payload invalidating everything."""
    return invalidation_payloads(None, origin=origin)[0]


def _reject(payload: str, reason: str) -> None:
    shown = payload if len(payload) <= 200 else payload[:200] + "..."
    logger.warning("ignoring malformed invalidation payload (%s): %r", reason, shown)


def parse_invalidation(payload: str) -> Invalidation | None:
    """Parse a broadcast strictly; on anything malformed log a warning and return None.

    ``module`` needs a string ``r`` and a non-empty list of strings ``m``; ``realm`` needs
    a string ``r``; ``global`` needs nothing; ``o`` may be absent (an older peer). Each
    string must be :func:`is_sendable`. Keys this version does not know are ignored, so a
    newer peer's additions do not silence an invalidation. Never raises, whatever the
    input: larger than any NOTIFY, nested too deep, huge numbers, escapes of NUL or lone
    surrogates.
    """
    if len(payload) > _MAX_PAYLOAD_CHARS:
        _reject(payload, f"{len(payload)} characters, more than any NOTIFY payload")
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # ValueError covers too many int digits
        _reject(payload, f"not JSON: {exc}")
        return None
    if not isinstance(data, dict):
        _reject(payload, f"not a JSON object but {type(data).__name__}")
        return None
    origin = data.get("o")
    if "o" in data and not is_sendable(origin):
        _reject(payload, "'o' is not a non-empty string")
        return None
    kind = data.get("k")
    if kind == "global":
        return Invalidation("global", origin=origin)
    if kind not in ("module", "realm"):
        _reject(payload, f"unknown kind {kind!r:.50}")
        return None
    namespace = data.get("r")
    if not is_sendable(namespace):
        _reject(payload, "'r' is not a non-empty string")
        return None
    if kind == "realm":
        return Invalidation("realm", namespace, origin=origin)
    names = data.get("m")
    if not isinstance(names, list) or not names:
        _reject(payload, "'m' is not a non-empty list")
        return None
    if not all(is_sendable(name) for name in names):
        _reject(payload, "'m' holds something other than non-empty strings")
        return None
    return Invalidation("module", namespace, tuple(names), origin)


class PostgresInvalidationPublisher:
    """Broadcasts invalidations with ``pg_notify`` on a pooled connection, each payload
    carrying this publisher's :attr:`origin`.

    For invalidations made outside the Postgres store (which sends its own broadcast in
    the invalidation's transaction; ``fleetcache.open`` uses no publisher): called after
    the invalidation committed, so a caller cancelled in between loses it. Best effort: a
    failure is logged with the payload's size and never raised, because the store's
    stale-write check, not this hint, is what keeps stale results out. The pool belongs to
    the caller and is never closed here.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        channel: str = INVALIDATED_CHANNEL,
        origin: str | None = None,
        budget: int = PAYLOAD_BUDGET,
    ) -> None:
        if origin is not None and not is_origin(origin):
            raise ConfigurationError(
                f"origin must be a string of 1 to {MAX_ORIGIN_CHARS} characters without "
                f"NUL or lone surrogates, got {origin!r:.100}"
            )
        if not 1 <= budget <= _MAX_PAYLOAD_CHARS:
            raise ConfigurationError(
                f"budget must be 1 to {_MAX_PAYLOAD_CHARS} bytes, got {budget}"
            )
        self._pool = pool
        self._channel = check_channel(channel)
        self._origin = new_origin() if origin is None else origin
        self._budget = budget

    @property
    def origin(self) -> str:
        """This publisher's id, sent as ``o`` in every payload; give it to this process's
        :class:`~fleetcache.notifications.listener.InvalidationListener`."""
        return self._origin

    async def names_invalidated(self, namespace: str, names: Sequence[str]) -> None:
        """Tell peers that ``names`` in ``namespace`` were invalidated (chunked).

        Names no store can hold (empty, NUL, lone surrogate) are left out with a warning:
        peers would refuse the whole payload, and with it its valid names.
        """
        if not is_sendable(namespace):
            self._log_unsendable(f"namespace {namespace!r:.200}")
            return
        sendable = [name for name in names if is_sendable(name)]
        if len(sendable) < len(names):
            self._log_unsendable(f"{len(names) - len(sendable)} name(s) in {namespace!r:.200}")
        payloads = encode_module_payloads(
            namespace, sendable, origin=self._origin, budget=self._budget
        )
        for payload in payloads:
            await self._publish(payload)

    async def namespace_cleared(self, namespace: str) -> None:
        """Tell peers that the whole ``namespace`` was invalidated."""
        if not is_sendable(namespace):
            self._log_unsendable(f"namespace {namespace!r:.200}")
            return
        await self._publish(encode_realm_payload(namespace, origin=self._origin))

    async def all_cleared(self) -> None:
        """Tell peers that everything was invalidated."""
        await self._publish(encode_global_payload(origin=self._origin))

    def _log_unsendable(self, what: str) -> None:
        logger.warning(
            "not broadcasting the invalidation of %s: empty, or holding NUL or a lone "
            "surrogate (no store holds such a key, and peers would refuse the payload)",
            what,
        )

    async def _publish(self, payload: str) -> None:
        # One connection checkout per payload: a payload Postgres refuses (too big) must
        # not take the other chunks down with it. The pool's context commits on exit, so
        # this also works on a pool whose connections are not autocommit.
        async def publish(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(_PUBLISH, (self._channel, payload))

        try:
            # A dead pooled connection (server restart) is replaced and the NOTIFY sent
            # once more; a duplicate notice is harmless, a lost one only delays a peer.
            await pooled(self._pool, "publishing an invalidation", publish, error=NotificationError)
        except Exception as exc:  # noqa: BLE001 - best effort by contract: log, never raise
            logger.warning(
                "publishing an invalidation on channel %r failed (payload %d bytes, "
                "budget %d): %s: %s",
                self._channel,
                len(payload.encode("utf-8", "surrogatepass")),
                self._budget,
                type(exc).__name__,
                exc,
            )
