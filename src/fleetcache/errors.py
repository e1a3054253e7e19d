"""The one exception tree of fleetcache.

::

    FleetcacheError
    ├── ConfigurationError          bad URL, bad option, bad argument
    ├── NotOpenError                an object used before ``open()`` / after ``close()``
    ├── StoreError                  a store operation failed (driver errors are wrapped here)
    │   └── SchemaVersionError      the database holds a newer schema than this release knows
    ├── SerializationError          a value, deps, error or diagnostics is not JSON
    ├── CoordinationError           cross-process populate coordination failed
    │   └── CoordinationGaveUpError a key was still not populated after the last round
    ├── NotificationError           LISTEN/NOTIFY failed (publishing is best effort and logs)
    └── DefinitionsError            the definitions domain (its subclasses live in
                                    ``fleetcache.definitions.errors``)

Callers never need to import a driver to catch a fleetcache failure: every driver
exception is translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class FleetcacheError(Exception):
    """Root of every error fleetcache raises on purpose."""


class ConfigurationError(FleetcacheError, ValueError):
    """An argument, option or URL is not acceptable."""


class NotOpenError(FleetcacheError, RuntimeError):
    """An object was used before ``open()`` or after ``close()``."""


class StoreError(FleetcacheError):
    """A store operation failed; ``__cause__`` holds the driver's exception."""


class SchemaVersionError(StoreError):
    """The database schema is newer than this release of fleetcache understands."""


class SerializationError(FleetcacheError, TypeError):
    """A value that must be stored as JSON is not JSON-serialisable."""


class CoordinationError(FleetcacheError):
    """Cross-process populate coordination failed."""


class CoordinationGaveUpError(CoordinationError):
    """A key was still not populated after the last coordination round."""

    def __init__(self, coalesce_key: str, rounds: int, wait_seconds: float, cause: str) -> None:
        super().__init__(
            f"gave up on key {coalesce_key!r} after {rounds} rounds "
            f"({wait_seconds:.1f} s each): {cause}"
        )
        self.coalesce_key = coalesce_key
        self.rounds = rounds
        self.wait_seconds = wait_seconds


class NotificationError(FleetcacheError):
    """LISTEN/NOTIFY failed."""


class DefinitionsError(FleetcacheError):
    """Root of the definitions domain's errors."""
