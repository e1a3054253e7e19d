"""Layers 2 and 4: the LISTEN connection hub and the invalidation broadcast on top of it.

- :class:`NotificationHub`: one dedicated LISTEN connection per process, multiplexing
  channels to subscribers, reconnecting after a drop and reporting the gap.
- :class:`PostgresInvalidationPublisher`, :func:`parse_invalidation` and the encoders:
  the ``module_cache_invalidated`` payload format.
- :class:`InvalidationListener`: replays peers' invalidations on a
  :class:`GenerationTarget`.
"""

from fleetcache.notifications.broadcast import (
    INVALIDATED_CHANNEL,
    PAYLOAD_BUDGET,
    Invalidation,
    InvalidationKind,
    PostgresInvalidationPublisher,
    encode_global_payload,
    encode_module_payloads,
    encode_realm_payload,
    parse_invalidation,
)
from fleetcache.notifications.hub import NotificationHub, Subscription
from fleetcache.notifications.listener import GenerationTarget, InvalidationListener

__all__ = [
    "INVALIDATED_CHANNEL",
    "PAYLOAD_BUDGET",
    "GenerationTarget",
    "Invalidation",
    "InvalidationKind",
    "InvalidationListener",
    "NotificationHub",
    "PostgresInvalidationPublisher",
    "Subscription",
    "encode_global_payload",
    "encode_module_payloads",
    "encode_realm_payload",
    "parse_invalidation",
]
