"""Replays peers' invalidation broadcasts on this process's cache (layer 4).

Each payload on the invalidated channel becomes the same invalidation the publishing
process made, so work in flight here that began before it is discarded instead of
persisted, and near copies are dropped. A hub gap (the LISTEN connection dropped, so
broadcasts may have been missed) becomes ``on_notifications_lost()``: the target must act
conservatively, since the other answer could let a stale copy live on.

A process also hears its own broadcasts. Given its store's origin, the listener skips
those echoes (the process already applied them; replaying them would drop in-flight work
that began after the invalidation and so is fresh). The origin, not the payload, decides:
a peer's payload identical to one of ours is still applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from fleetcache._lifecycle import Service
from fleetcache.errors import ConfigurationError
from fleetcache.logcontext import get_logger
from fleetcache.notifications.broadcast import Invalidation, parse_invalidation
from fleetcache.notifications.hub import NotificationHub
from fleetcache.stores.payloads import INVALIDATED_CHANNEL

logger = get_logger("fleetcache.notifications")


class InvalidationTarget(Protocol):
    """What invalidations are replayed on (the generic caching lookup provides it). The
    methods are synchronous and cheap: they run inside the hub's dispatch."""

    def on_names_invalidated(self, namespace: str, names: Sequence[str]) -> None:
        """A peer invalidated ``names`` in ``namespace``."""

    def on_namespace_cleared(self, namespace: str) -> None:
        """A peer invalidated the whole ``namespace``."""

    def on_all_cleared(self) -> None:
        """A peer invalidated everything."""

    def on_notifications_lost(self) -> None:
        """Broadcasts may have been missed (the hub reconnected): act conservatively."""


class InvalidationListener(Service):
    """Replays every broadcast on ``channel`` whose origin is not ``origin`` (this
    process's store's) on ``target``, and hub gaps as
    ``on_notifications_lost()``.

    ``on_heard``, when given, is called with the namespace of every valid broadcast heard
    (None for a global one, and for a gap), this process's own included: the Postgres
    store's :meth:`~fleetcache.stores.postgres.PostgresStore.lock_released`, so writes
    waiting for an invalidation's lock retry as soon as it commits.

    ``start()`` registers its handlers on the hub (the caller's: never started or closed
    here); after ``close()`` they do nothing. A target exception is logged and counted in
    :meth:`stats`, never raised.
    """

    def __init__(
        self,
        hub: NotificationHub,
        target: InvalidationTarget,
        *,
        channel: str = INVALIDATED_CHANNEL,
        origin: str | None = None,
        on_heard: Callable[[str | None], None] | None = None,
    ) -> None:
        super().__init__()
        if channel not in hub.channels:
            raise ConfigurationError(
                f"the hub does not LISTEN on {channel!r} (its channels: {list(hub.channels)})"
            )
        self._hub = hub
        self._target = target
        self._channel = channel
        self._origin = origin
        self._on_heard = on_heard
        # Counters: written only by the hub's dispatch into the handlers below (on the
        # event loop, one at a time: no guard needed); read by stats().
        self._applied = 0
        self._rejected = 0
        self._failed = 0
        self._own = 0
        self._gaps = 0

    async def _on_start(self) -> None:
        self._hub.add_handler(self._channel, self._on_payload)
        self._hub.add_gap_handler(self._on_gap)

    def stats(self) -> dict[str, int]:
        """Counters since creation: payloads ``applied``, ``rejected`` as malformed,
        ``failed`` (the target raised, on a payload or a gap), ``own`` echoes skipped,
        and ``gaps`` reported to the target."""
        return {
            "applied": self._applied,
            "rejected": self._rejected,
            "failed": self._failed,
            "own": self._own,
            "gaps": self._gaps,
        }

    def _on_payload(self, payload: str) -> None:
        if self.closed:  # the hub cannot unregister a handler: it goes quiet instead
            return
        invalidation = parse_invalidation(payload)  # logs what it rejects
        if invalidation is None:
            self._rejected += 1
            return
        self._heard(invalidation.namespace)
        if self._origin is not None and invalidation.origin == self._origin:
            self._own += 1
            return
        try:
            _replay(invalidation, self._target)
        except Exception:
            self._failed += 1
            logger.exception("replaying invalidation %r failed", invalidation)
            return
        self._applied += 1

    def _heard(self, namespace: str | None) -> None:
        if self._on_heard is None:
            return
        try:
            self._on_heard(namespace)
        except Exception:
            self._failed += 1
            logger.exception("on_heard(%r) failed", namespace)

    def _on_gap(self) -> None:
        if self.closed:
            return
        self._heard(None)
        self._gaps += 1
        try:
            self._target.on_notifications_lost()
        except Exception:
            self._failed += 1
            logger.exception("reporting lost notifications to %r failed", self._target)


def _replay(invalidation: Invalidation, target: InvalidationTarget) -> None:
    if invalidation.kind == "all":
        target.on_all_cleared()
        return
    assert invalidation.namespace is not None  # the parser guarantees it
    if invalidation.kind == "namespace":
        target.on_namespace_cleared(invalidation.namespace)
    else:
        target.on_names_invalidated(invalidation.namespace, invalidation.names)
