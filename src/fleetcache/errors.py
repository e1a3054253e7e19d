"""The one exception tree of fleetcache.

::

    FleetcacheError
    ├── ConfigurationError          bad URL, bad option, bad argument
    ├── NotOpenError                an object used before ``open()`` / after ``close()``
    ├── InvalidInputError           a key or value refused before any I/O (NUL, lone
    │   │                           surrogate, too deep, too large)
    │   └── SerializationError      a value, error or diagnostics cannot be serialized
    │                               (not JSON; for the pickle codec, not picklable)
    ├── StoreError                  a store operation failed (driver errors are wrapped here)
    │   ├── DatabaseConnectError    the database cannot be reached or refuses us (``cause``)
    │   ├── SchemaVersionError      the database holds a newer schema than this release knows
    │   └── SchemaMissingError      the database holds no schema of this release (inspection)
    ├── ComputationTimeoutError     a computation outlived its ``compute_timeout``
    ├── ComputationInterruptedError the sync API's thread computing a key was interrupted
    ├── CachedError                 ``get_value`` met a cached error entry (``error`` holds it)
    ├── CoordinationError           cross-process populate coordination failed
    │   └── CoordinationGaveUpError another process held the key past the waiting budget
    └── NotificationError           LISTEN/NOTIFY failed (publishing is best effort and logs)
        └── SessionLostError        the session connection (LISTEN, the fleet's locks) was
                                    lost: whatever it held is gone

A domain built on the cache adds its own branch under the root.

Callers never need to import a driver to catch a fleetcache failure: every driver
exception is translated at the boundary (``fleetcache._pg.translate``) with
``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any, Literal

#: Why a database could not be reached: permanent causes are raised at once, transient
#: ones after the connect budget ran out.
ConnectCause = Literal[
    "authentication",  # the role does not exist, or its password was refused (permanent)
    "database-missing",  # the database does not exist (permanent)
    "refused",  # nothing listens at that address (permanent)
    "unresolvable",  # the host name does not resolve (permanent)
    "starting",  # the server is starting up or shutting down (transient)
    "too-many-connections",  # the server refused for lack of slots (transient)
    "timeout",  # no answer within connect_timeout (transient)
    "other",  # anything else (transient)
]


class FleetcacheError(Exception):
    """Root of every error fleetcache raises on purpose."""


class ConfigurationError(FleetcacheError, ValueError):
    """An argument, option or URL is not acceptable."""


class NotOpenError(FleetcacheError, RuntimeError):
    """An object was used before ``open()`` or after ``close()``."""


class InvalidInputError(FleetcacheError, ValueError):
    """A key or a value was refused before any I/O: it holds a NUL character or a lone
    surrogate, nests deeper than the limit, or is larger than the limit."""


class SerializationError(InvalidInputError, TypeError):
    """A value that must be stored as JSON is not JSON (a set, NaN, a non-string key...)."""


class StoreError(FleetcacheError):
    """A store operation failed; ``__cause__`` holds the driver's exception."""


class DatabaseConnectError(StoreError):
    """The database could not be reached or refused the connection; ``cause`` says why
    (one of :data:`ConnectCause`)."""

    def __init__(self, message: str, cause: ConnectCause) -> None:
        super().__init__(message)
        self.cause: ConnectCause = cause


class SchemaVersionError(StoreError):
    """The database schema is newer than this release of fleetcache understands."""

    def __init__(self, where: str, found: int, known: int) -> None:
        super().__init__(
            f"{where} holds fleetcache schema version {found}, but this release of "
            f"fleetcache knows versions up to {known}: upgrade fleetcache"
        )
        self.found = found
        self.known = known


class SchemaMissingError(StoreError):
    """The database holds no fleetcache schema (``found`` 0), or an older version not yet
    migrated: raised by what only reads a database (inspection), never creates one.
    ``detail`` replaces the default wording after ``where``."""

    def __init__(self, where: str, found: int, known: int, *, detail: str | None = None) -> None:
        if detail is None and found == 0:
            detail = "holds no fleetcache schema (no table fleetcache_schema)"
        elif detail is None:
            detail = (
                f"holds fleetcache schema version {found}, older than this release's "
                f"{known}: run `fleetcache migrate` first"
            )
        super().__init__(f"{where} {detail}")
        self.found = found
        self.known = known


class ComputationTimeoutError(FleetcacheError, TimeoutError):
    """A computation ran past its ``compute_timeout`` (``seconds``); it was cancelled and
    nothing stored. Or, with ``waited`` set, a caller's own bound ran out first: it waited
    ``waited`` seconds, ``bound`` saying what that bound is made of, and the computation
    goes on without it."""

    def __init__(
        self,
        coalesce_key: str,
        seconds: float,
        *,
        waited: float | None = None,
        bound: str | None = None,
    ) -> None:
        if waited is None:
            message = (
                f"the computation of key {coalesce_key} did not finish within "
                f"compute_timeout={seconds:g} s; it was cancelled and nothing was stored"
            )
        else:
            message = (
                f"gave up on key {coalesce_key} after waiting {waited:.1f} s for its "
                f"computation, which had not answered within this caller's bound ({bound}); "
                f"it goes on without this caller"
            )
        super().__init__(message)
        self.coalesce_key = coalesce_key
        self.seconds = seconds
        self.waited = waited


class ComputationInterruptedError(FleetcacheError):
    """The thread running a sync ``produce`` for a computation (the sync API's caller that
    started it) was interrupted (``KeyboardInterrupt``, ``SystemExit``) before it answered:
    the callers sharing that computation get this error; the interrupt itself goes on in
    the interrupted thread."""

    def __init__(self, coalesce_key: str, interrupt: BaseException) -> None:
        super().__init__(
            f"the thread computing key {coalesce_key} was interrupted "
            f"({type(interrupt).__name__}) before it answered"
        )
        self.coalesce_key = coalesce_key


class CachedError(FleetcacheError):
    """``get_value`` found (or produced) an error entry; ``error`` is its error document."""

    def __init__(self, coalesce_key: str, error: Any) -> None:
        super().__init__(f"key {coalesce_key} holds a cached error: {error!r:.300}")
        self.coalesce_key = coalesce_key
        self.error = error


class CoordinationError(FleetcacheError):
    """Cross-process populate coordination failed."""


class CoordinationGaveUpError(CoordinationError):
    """Another process held a key's lock for the whole waiting budget."""

    def __init__(self, coalesce_key: str, waited: float, rounds: int, cause: str) -> None:
        super().__init__(
            f"gave up on key {coalesce_key} after waiting {waited:.1f} s "
            f"({rounds} round(s)) for another process's computation: {cause}"
        )
        self.coalesce_key = coalesce_key
        self.waited = waited
        self.rounds = rounds


class NotificationError(FleetcacheError):
    """LISTEN/NOTIFY failed."""


class SessionLostError(NotificationError):
    """The process's session connection was lost before or while a statement ran on it;
    what the session held (LISTENs, advisory locks) went with it."""
