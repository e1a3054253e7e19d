"""How an entry ages: time to live, stale-while-revalidate, and early refresh (XFetch).

::

    created_at          expires_at                     stale_until
        |---- fresh (ttl) ----|---- stale (stale_ttl) ----|---- dead ---->
        hit                    served at once, while one    a miss: callers wait
        (may refresh early)    process of the fleet         for the computation
                               refreshes it

* **fresh**: a hit. With ``early_refresh=beta`` a hit may also start a refresh before
  expiry, with a probability that grows as expiry nears (XFetch: Vattani, Chierichetti and
  Lowenstein, "Optimal Probabilistic Cache Stampede Prevention", VLDB 2015): refresh when
  ``now - compute_ms * beta * ln(u) >= expires_at`` for ``u`` uniform in (0, 1]; the longer
  the value took to compute, the earlier. A hot key is thus refreshed once, before it
  expires, and nobody ever waits for it.
* **stale**: served to the caller at once; one refresh runs in the background, and across
  the fleet only the process that wins the key's lock runs it (the others keep serving
  the stale value). A refresh that fails leaves the stale value until the window ends.
* **dead**: a miss.

An invalidated name is gone, not stale: invalidation deletes the entry, and a refresh that
began before the invalidation is refused by the store like any computation.

Expiry is decided by each reader's clock against times written by the writer's clock: a
fleet's clocks must agree to well within the TTLs used.
"""

from __future__ import annotations

import enum
import math
import numbers
import reprlib
import sys
from collections.abc import Callable

from fleetcache.errors import ConfigurationError
from fleetcache.stores.base import Entry


class Freshness(enum.Enum):
    """Where an entry is in its life."""

    FRESH = "fresh"
    STALE = "stale"
    DEAD = "dead"


def freshness(entry: Entry, now_ms: float) -> Freshness:
    """Where ``entry`` is at ``now_ms`` (ms since the epoch)."""
    if entry.expires_at is None or now_ms < entry.expires_at:
        return Freshness.FRESH
    if entry.stale_until is not None and now_ms < entry.stale_until:
        return Freshness.STALE
    return Freshness.DEAD


def deadlines(
    created_at: int, ttl: float | None, stale_ttl: float | None
) -> tuple[int | None, int | None]:
    """``(expires_at, stale_until)`` in ms for an entry created at ``created_at``."""
    if ttl is None:
        return None, None
    expires_at = created_at + round(ttl * 1000)
    return expires_at, expires_at + round((stale_ttl or 0.0) * 1000)


def refresh_early(
    entry: Entry, now_ms: float, beta: float | None, uniform: Callable[[], float]
) -> bool:
    """Whether a hit on a fresh ``entry`` should refresh it now (XFetch; see the module
    docstring). ``uniform`` returns a float in [0, 1)."""
    if beta is None or entry.expires_at is None or not entry.compute_ms:
        return False
    u = 1.0 - uniform()  # in (0, 1]: ln(u) is finite and <= 0
    return now_ms - entry.compute_ms * beta * math.log(u) >= entry.expires_at


#: The longest ttl or stale_ttl, in seconds (100 years): far past any useful expiry, and
#: far inside the 64-bit milliseconds a store keeps. ``None`` is "never expires".
MAX_SECONDS = 100 * 365 * 86_400
#: The shortest ttl, in seconds: expiry is kept in whole milliseconds, so a shorter one
#: would expire as it is written.
MIN_TTL = 0.001


def check_expiry(ttl: float | None, stale_ttl: float | None, early_refresh: float | None) -> None:
    """Refuse expiry options that make no sense, naming them: anything but a real number
    (a bool or a str included), NaN, an infinity, a ttl outside [:data:`MIN_TTL`,
    :data:`MAX_SECONDS`], a stale_ttl outside [0, :data:`MAX_SECONDS`], a beta that is
    not > 0 and finite; and a stale window or early refresh without a ttl."""
    # Each check is written so that NaN fails it (every comparison with NaN is False).
    if ttl is not None:
        _check_number("ttl", ttl)
        if not MIN_TTL <= ttl <= MAX_SECONDS:
            raise ConfigurationError(
                f"ttl must be between {MIN_TTL} s (expiry is kept in milliseconds) and "
                f"{MAX_SECONDS} s (100 years), or None (never expires); got {ttl!r}"
            )
    if stale_ttl is not None:
        _check_number("stale_ttl", stale_ttl)
        if not 0 <= stale_ttl <= MAX_SECONDS:
            raise ConfigurationError(
                f"stale_ttl must be between 0 and {MAX_SECONDS} s (100 years), or None; "
                f"got {stale_ttl!r}"
            )
        if ttl is None:
            raise ConfigurationError(
                "stale_ttl needs a ttl: a value that never expires is never stale"
            )
    if early_refresh is not None:
        _check_number("early_refresh (beta)", early_refresh)
        if not 0 < early_refresh <= sys.float_info.max:
            raise ConfigurationError(
                f"early_refresh (beta) must be > 0 and finite, got {early_refresh!r}"
            )
        if ttl is None:
            raise ConfigurationError(
                "early_refresh needs a ttl: there is no expiry to refresh before"
            )


def _check_number(what: str, value: object) -> None:
    # bool is an int, but True is not "1 second"; a str is never a duration. (A plain int
    # or float, the common case, skips the slower check against the numbers ABC.)
    if type(value) not in (int, float) and (
        isinstance(value, bool) or not isinstance(value, numbers.Real)
    ):
        raise ConfigurationError(
            f"{what} must be a number or None, got {type(value).__name__} {reprlib.repr(value)}"
        )
