"""Replays peers' invalidation broadcasts on this process's generations (layer 4).

Each payload on the invalidated channel becomes the same generation bump the publishing
process made, so work in flight here that began before the invalidation is discarded
instead of persisted. A gap (the LISTEN connection dropped, so broadcasts may have been
missed) is treated as a global invalidation: the conservative answer costs some discarded
work, the other one could let a stale computation persist. A process also hears its own
broadcasts; given its publisher (``own``), the listener skips those echoes, since replaying
them would drop in-flight work that began after the invalidation and so is fresh, making
later callers compute the same key a second time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from fleetcache.notifications.broadcast import INVALIDATED_CHANNEL, parse_invalidation
from fleetcache.notifications.hub import NotificationHub, Subscription

logger = logging.getLogger("fleetcache.notifications")


class GenerationTarget(Protocol):
    """What an invalidation is replayed on (the generic caching lookup provides it).
    The methods are synchronous and cheap: they run inside the hub's callback."""

    def bump_names(self, namespace: str, names: Sequence[str]) -> None:
        """Invalidate ``names`` in ``namespace``."""

    def bump_namespace(self, namespace: str) -> None:
        """Invalidate the whole ``namespace``."""

    def bump_global(self) -> None:
        """Invalidate everything."""


class EchoSource(Protocol):
    """The publisher of this process, which knows which payloads it sent."""

    def take_echo(self, payload: str) -> bool:
        """Whether ``payload`` is the echo of one this process sent (consumed once)."""

    def forget_echoes(self) -> None:
        """Stop expecting echoes (after a gap they may never arrive)."""


class InvalidationListener:
    """Subscribes to the invalidated channel on a hub and replays each broadcast on a
    :class:`GenerationTarget`, skipping the echoes of ``own`` (this process's publisher)
    when given. ``start()`` and ``close()`` are idempotent; the hub is the caller's and is
    not started or closed here."""

    def __init__(
        self,
        hub: NotificationHub,
        target: GenerationTarget,
        *,
        channel: str = INVALIDATED_CHANNEL,
        own: EchoSource | None = None,
    ) -> None:
        self._hub = hub
        self._target = target
        self._channel = channel
        self._own = own
        # Written by start()/close(), which the lock serialises; read by nobody else.
        self._subscription: Subscription | None = None
        self._lock = asyncio.Lock()
        # Counters: written only by the hub callbacks below (on the event loop, so no
        # guard is needed); read by stats().
        self._applied = 0
        self._rejected = 0
        self._failed = 0
        self._gaps = 0
        self._echoes = 0

    async def start(self) -> None:
        """Subscribe to the channel (idempotent)."""
        async with self._lock:
            if self._subscription is None:
                self._subscription = await self._hub.subscribe(
                    self._channel, self._on_payload, on_gap=self._on_gap
                )

    async def close(self) -> None:
        """Unsubscribe (idempotent); broadcasts arriving afterwards are not replayed."""
        async with self._lock:
            if self._subscription is not None:
                self._subscription.unsubscribe()
                self._subscription = None

    async def __aenter__(self) -> InvalidationListener:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def stats(self) -> dict[str, int]:
        """Counters since creation: payloads ``applied``, ``rejected`` as malformed,
        ``failed`` (the target raised), ``echoes`` of this process's own broadcasts
        skipped, and ``gaps`` (replayed as a global bump)."""
        return {
            "applied": self._applied,
            "rejected": self._rejected,
            "failed": self._failed,
            "echoes": self._echoes,
            "gaps": self._gaps,
        }

    def _on_payload(self, payload: str) -> None:
        if self._own is not None and self._own.take_echo(payload):
            self._echoes += 1
            return
        invalidation = parse_invalidation(payload)  # logs what it rejects
        if invalidation is None:
            self._rejected += 1
            return
        try:
            if invalidation.kind == "module":
                assert invalidation.namespace is not None  # the parser guarantees it
                self._target.bump_names(invalidation.namespace, invalidation.names)
            elif invalidation.kind == "realm":
                assert invalidation.namespace is not None
                self._target.bump_namespace(invalidation.namespace)
            else:
                self._target.bump_global()
        except Exception:
            self._failed += 1
            logger.exception("replaying invalidation %r failed", invalidation)
            return
        self._applied += 1

    def _on_gap(self) -> None:
        self._gaps += 1
        if self._own is not None:
            self._own.forget_echoes()
        try:
            self._target.bump_global()
        except Exception:
            logger.exception("replaying a notification gap as a global invalidation failed")
