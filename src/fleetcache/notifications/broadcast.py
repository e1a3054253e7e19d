"""The invalidation broadcast (layer 4): payload format, strict parser, publisher.

After an invalidation's delete commits, the process that ran it tells its peers on the
``module_cache_invalidated`` channel, so they bump the same generations and discard work
in flight. Payloads are compact JSON with keys in this order::

    {"k":"module","r":<namespace>,"m":[<name>, ...]}   names in one namespace
    {"k":"realm","r":<namespace>}                        a whole namespace
    {"k":"global"}                                       everything

Postgres refuses a NOTIFY payload of 8000 bytes or more, so name lists are split into
several payloads, each under a budget (7000 bytes by default). The broadcast is a hint on
top of the store's own generation check: publishing is best effort, logs its failures and
never fails the invalidation.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from psycopg_pool import AsyncConnectionPool

logger = logging.getLogger("fleetcache.notifications")

#: The channel invalidations are broadcast on.
INVALIDATED_CHANNEL = "module_cache_invalidated"
# Bound on echoes awaited at once; past it they are forgotten (a replay is harmless).
_MAX_PENDING_ECHOES = 10_000
#: Default byte budget of one payload (Postgres refuses 8000 bytes and more).
PAYLOAD_BUDGET = 7000

# Sends one payload. pg_notify (not NOTIFY) because the channel and payload are values,
# bound as parameters.
_PUBLISH = "SELECT pg_notify(%s, %s)"

#: The three kinds of invalidation.
InvalidationKind: TypeAlias = Literal["module", "realm", "global"]


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One parsed broadcast: ``names`` in ``namespace`` (kind ``module``), the whole
    ``namespace`` (``realm``), or everything (``global``: namespace is None)."""

    kind: InvalidationKind
    namespace: str | None = None
    names: tuple[str, ...] = ()


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def encode_module_payloads(
    namespace: str, names: Sequence[str], *, budget: int = PAYLOAD_BUDGET
) -> list[str]:
    """Payloads invalidating ``names`` in ``namespace``, each smaller than ``budget``
    UTF-8 bytes, names in order, each exactly once. No names: no payloads.

    A name too big to fit under the budget even alone gets a payload of its own, over
    budget; sending it may fail, and the publisher logs that.
    """
    # Build each payload from pre-encoded pieces so sizes add up exactly:
    # {"k":"module","r":<ns>,"m":[<n1>,<n2>]}
    head = '{"k":"module","r":' + _dumps(namespace) + ',"m":['
    tail = "]}"
    fixed = len(head.encode()) + len(tail.encode())
    payloads: list[str] = []
    chunk: list[str] = []
    size = fixed
    for name in names:
        piece = _dumps(name)
        piece_size = len(piece.encode()) + (1 if chunk else 0)  # the comma before it
        if chunk and size + piece_size >= budget:
            payloads.append(head + ",".join(chunk) + tail)
            chunk, size = [], fixed
            piece_size -= 1
        chunk.append(piece)
        size += piece_size
    if chunk:
        payloads.append(head + ",".join(chunk) + tail)
    return payloads


def encode_realm_payload(namespace: str) -> str:
    """The payload invalidating a whole namespace."""
    return '{"k":"realm","r":' + _dumps(namespace) + "}"


def encode_global_payload() -> str:
    """The payload invalidating everything."""
    return '{"k":"global"}'


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _reject(payload: str, reason: str) -> None:
    shown = payload if len(payload) <= 200 else payload[:200] + "..."
    logger.warning("ignoring malformed invalidation payload (%s): %r", reason, shown)


def parse_invalidation(payload: str) -> Invalidation | None:
    """Parse a broadcast strictly; on anything malformed log a warning and return None.

    ``module`` needs a non-empty string ``r`` and a non-empty list of non-empty strings
    ``m``; ``realm`` needs a non-empty string ``r``; ``global`` needs nothing. Keys this
    version does not know are ignored, so a newer peer's additions do not silence an
    invalidation. Never raises.
    """
    try:
        data = json.loads(payload)
    except (ValueError, TypeError, RecursionError) as exc:
        _reject(str(payload), f"not JSON: {exc}")
        return None
    if not isinstance(data, dict):
        _reject(payload, f"not a JSON object but {type(data).__name__}")
        return None
    kind = data.get("k")
    if kind == "global":
        return Invalidation("global")
    if kind not in ("module", "realm"):
        _reject(payload, f"unknown kind {kind!r}")
        return None
    namespace = data.get("r")
    if not _nonempty_str(namespace):
        _reject(payload, "'r' is not a non-empty string")
        return None
    if kind == "realm":
        return Invalidation("realm", namespace)
    names = data.get("m")
    if not isinstance(names, list) or not names:
        _reject(payload, "'m' is not a non-empty list")
        return None
    if not all(_nonempty_str(name) for name in names):
        _reject(payload, "'m' holds something other than non-empty strings")
        return None
    return Invalidation("module", namespace, tuple(names))


class PostgresInvalidationPublisher:
    """Broadcasts invalidations with ``pg_notify`` on a pooled connection.

    The generic cache calls these methods after its delete has committed. Best effort:
    a failure is logged with the payload's size and never raised, because the store's
    generation check, not this hint, is what keeps stale results out. The pool belongs to
    the caller and is never closed here.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        channel: str = INVALIDATED_CHANNEL,
        budget: int = PAYLOAD_BUDGET,
    ) -> None:
        self._pool = pool
        self._channel = channel
        self._budget = budget
        # Payloads this process sent whose echo has not come back through LISTEN yet.
        # Written by _publish (before sending, so the echo can never arrive first) and by
        # take_echo/forget_echoes, all on the event loop; no lock needed.
        self._echoes: Counter[str] = Counter()

    async def names_invalidated(self, namespace: str, names: Sequence[str]) -> None:
        """Tell peers that ``names`` in ``namespace`` were invalidated (chunked)."""
        for payload in encode_module_payloads(namespace, names, budget=self._budget):
            await self._publish(payload)

    async def namespace_cleared(self, namespace: str) -> None:
        """Tell peers that the whole ``namespace`` was invalidated."""
        await self._publish(encode_realm_payload(namespace))

    async def all_cleared(self) -> None:
        """Tell peers that everything was invalidated."""
        await self._publish(encode_global_payload())

    def take_echo(self, payload: str) -> bool:
        """Whether ``payload`` is the echo of one this publisher sent (consumes it), so a
        listener in the same process can skip replaying what this process already did."""
        if self._echoes[payload] <= 0:
            return False
        self._echoes[payload] -= 1
        if not self._echoes[payload]:
            del self._echoes[payload]
        return True

    def forget_echoes(self) -> None:
        """Drop the echoes still expected (after a LISTEN gap they may never arrive)."""
        self._echoes.clear()

    async def _publish(self, payload: str) -> None:
        # One connection checkout per payload: a payload Postgres refuses (too big) must
        # not take the other chunks down with it. The pool's context commits on exit, so
        # this also works on a pool whose connections are not autocommit.
        if len(self._echoes) >= _MAX_PENDING_ECHOES:  # echoes that never came back
            self._echoes.clear()
        self._echoes[payload] += 1
        try:
            async with self._pool.connection() as conn:
                await conn.execute(_PUBLISH, (self._channel, payload))
        except Exception as exc:  # noqa: BLE001 - best effort by contract: log, never raise
            self.take_echo(payload)
            logger.warning(
                "publishing an invalidation on channel %r failed (payload %d bytes, "
                "budget %d): %s: %s",
                self._channel,
                len(payload.encode()),
                self._budget,
                type(exc).__name__,
                exc,
            )
