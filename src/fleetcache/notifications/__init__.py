"""Layers 2 and 4: the LISTEN connection hub and the invalidation broadcast on top of it.

- :class:`NotificationHub`: the process's one session connection: LISTEN for channels
  fixed when it is built, calling registered handlers, and the statements that need a
  session (the fleet's locks) between its waits; reconnecting after a drop and reporting
  the gap.
- :class:`PostgresInvalidationPublisher`, :func:`parse_invalidation` and the encoders:
  the invalidation payload format, each payload carrying its publisher's origin.
- :class:`InvalidationListener`: replays peers' invalidations on an
  :class:`InvalidationTarget`, skipping this process's own by origin.
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
    is_sendable,
    new_origin,
    parse_invalidation,
)
from fleetcache.notifications.hub import DEFAULT_APPLICATION_NAME, NotificationHub
from fleetcache.notifications.listener import InvalidationListener, InvalidationTarget

__all__ = [
    "DEFAULT_APPLICATION_NAME",
    "INVALIDATED_CHANNEL",
    "PAYLOAD_BUDGET",
    "Invalidation",
    "InvalidationKind",
    "InvalidationListener",
    "InvalidationTarget",
    "NotificationHub",
    "PostgresInvalidationPublisher",
    "encode_global_payload",
    "encode_module_payloads",
    "encode_realm_payload",
    "is_sendable",
    "new_origin",
    "parse_invalidation",
]
