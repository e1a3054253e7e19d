"""The coordinated loop: one process of the fleet computes a key, the others wait.

Rounds of: read the store (from the second round on); try the key's fleet-wide lock and,
if won, compute as its winner; if lost, wait for the winner without holding a connection.

Waiting is bounded by **time**, not by how many times a waiter was woken: the budget is
``max_rounds * wait_timeout`` seconds, and no single wait exceeds ``wait_timeout``. A wake
is only a hint — a NOTIFY can be forged or stale, a probe can race a new holder — so every
wake just leads to another read and another try; none of them ends the loop by itself.
When the budget is spent the loop reads and tries once more (the holder may have finished
or died at the last moment: a free lock is won, and the caller computes instead of giving
up), and only then raises :class:`~fleetcache.errors.CoordinationGaveUpError`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from fleetcache.coordination.base import Acquired, PopulateCoordinator, WakeReason
from fleetcache.errors import CoordinationGaveUpError
from fleetcache.logcontext import get_logger
from fleetcache.lookup.populate import Overtaken
from fleetcache.lookup.stats import LookupStats
from fleetcache.stores.base import Entry

logger = get_logger("fleetcache.lookup")


async def run_coordinated(
    coordinator: PopulateCoordinator,
    *,
    coalesce_key: str,
    lock_key: str,
    read: Callable[[], Awaitable[Entry | None]],
    compute: Callable[[], Awaitable[Entry | Overtaken | None]],
    wait_timeout: float,
    max_rounds: int,
    stats: LookupStats,
) -> Entry | Overtaken | None:
    """The entry for ``coalesce_key``: read (a usable entry or None), else computed under
    the fleet-wide lock of ``lock_key`` (or :class:`Overtaken`, returned once the lock is
    released), else what the lock's holder stored."""
    started = time.monotonic()
    deadline = started + max_rounds * wait_timeout
    reasons: list[WakeReason] = []
    while True:
        if reasons:  # the caller read the store just before the first round
            entry = await read()
            if entry is not None:
                return entry
        outcome = await coordinator.try_acquire_and_run(lock_key, compute)
        if isinstance(outcome, Acquired):
            stats.lock_won += 1
            return outcome.value
        stats.lock_lost += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            outcome.cancel()
            break
        reason = await outcome.wait(min(wait_timeout, remaining))
        reasons.append(reason)
        stats.waited(reason)
        logger.debug(
            "round %d for key %s: lost the lock, woken by %s", len(reasons), coalesce_key, reason
        )
    stats.gave_up += 1
    raise CoordinationGaveUpError(
        coalesce_key, time.monotonic() - started, len(reasons), likely_cause(reasons)
    )


def likely_cause(reasons: Sequence[WakeReason]) -> str:
    """A sentence on why a coordinated caller gave up, from how its waits ended."""
    if reasons and all(reason is WakeReason.TIMEOUT for reason in reasons):
        return (
            "its holder never finished: the computation outlasted every wait, or "
            "notifications are not reaching this process"
        )
    if WakeReason.CLOSE in reasons:
        return "the coordinator was closing"
    if WakeReason.PROBE in reasons:
        return "the key's lock kept changing hands without a usable result"
    return (
        "each time its holder finished, another process took the lock before this one "
        "and no usable result was stored (the computation may keep failing)"
    )
