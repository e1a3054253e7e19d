"""How an entry ages: time to live, stale-while-revalidate and early refresh (XFetch), as
one :class:`Expiry` value; and where an entry is in its life (:func:`freshness`). The
lifecycle is drawn in the README ("Values that age") and argued in ``docs/design.md``.
"""

from __future__ import annotations

import enum
import math
import numbers
import reprlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from fleetcache.errors import ConfigurationError
from fleetcache.stores.base import Entry


class _Default:
    """The type of :data:`DEFAULT`: "use the lookup's setting" (None means "none")."""

    def __repr__(self) -> str:
        return "DEFAULT"


#: Passed for ``ttl``/``stale_ttl``/``early_refresh``: the lookup's own setting.
DEFAULT: Final = _Default()
#: An expiry option of one call: seconds (or beta), None (none), or DEFAULT.
Setting: TypeAlias = float | _Default | None


class Freshness(enum.Enum):
    """Where an entry is in its life."""

    FRESH = "fresh"
    STALE = "stale"
    DEAD = "dead"


def freshness(entry: Entry, now_ms: float, error_ttl: float) -> Freshness:
    """Where ``entry`` is at ``now_ms`` (ms since the epoch); an error entry lives for
    ``error_ttl`` seconds (and is dead without a creation time)."""
    if entry.error is not None:
        created = entry.created_at
        alive = created is not None and now_ms - created <= error_ttl * 1000
        return Freshness.FRESH if alive else Freshness.DEAD
    if entry.expires_at is None or now_ms < entry.expires_at:
        return Freshness.FRESH
    if entry.stale_until is not None and now_ms < entry.stale_until:
        return Freshness.STALE
    return Freshness.DEAD


def refresh_early(
    entry: Entry, now_ms: float, beta: float | None, uniform: Callable[[], float]
) -> bool:
    """Whether a hit on a fresh ``entry`` should refresh it now (the
    XFetch rule: refresh when ``now - compute_ms * beta * ln(u) >= expires_at`` for ``u``
    uniform in (0, 1], so the longer the value took to compute, the earlier).
    ``uniform`` returns a float in [0, 1)."""
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


@dataclass(frozen=True, slots=True)
class Expiry:
    """How a computed value ages: fresh for ``ttl`` seconds (None: it never expires), then
    served stale for ``stale_ttl`` seconds while one refresh runs, and with
    ``early_refresh`` (a beta > 0) refreshed early, with a probability that grows as expiry
    nears (XFetch: Vattani, Chierichetti and Lowenstein, VLDB 2015). Checked when made:
    anything else raises :class:`~fleetcache.errors.ConfigurationError` naming it."""

    ttl: float | None = None
    stale_ttl: float | None = None
    early_refresh: float | None = None

    def __post_init__(self) -> None:
        check_expiry(self.ttl, self.stale_ttl, self.early_refresh)
        # As floats: a Fraction or a numpy number would otherwise reach the stored times.
        for name in ("ttl", "stale_ttl", "early_refresh"):
            value = getattr(self, name)
            if value is not None and type(value) is not float:
                object.__setattr__(self, name, float(value))

    def deadlines(self, created_at: int) -> tuple[int | None, int | None]:
        """``(expires_at, stale_until)`` in ms for a value created at ``created_at``."""
        if self.ttl is None:
            return None, None
        expires_at = created_at + round(self.ttl * 1000)
        return expires_at, expires_at + round((self.stale_ttl or 0.0) * 1000)

    def of_call(self, ttl: Setting, stale_ttl: Setting, early_refresh: Setting) -> Expiry:
        """A call's expiry: the options it gives over these (its lookup's), checked."""
        if (
            isinstance(ttl, _Default)
            and isinstance(stale_ttl, _Default)
            and isinstance(early_refresh, _Default)
        ):
            return self
        ttl_ = self.ttl if isinstance(ttl, _Default) else ttl
        if ttl_ is None:
            # Never expires, so never stale: only options given in this call can contradict
            # that (the lookup's own were checked together when they were made).
            return Expiry(None, _given(stale_ttl), _given(early_refresh))
        return Expiry(
            ttl_,
            self.stale_ttl if isinstance(stale_ttl, _Default) else stale_ttl,
            self.early_refresh if isinstance(early_refresh, _Default) else early_refresh,
        )


#: Values never expire.
NEVER = Expiry()


def _given(setting: Setting) -> float | None:
    """An expiry option as given in a call (None where left out)."""
    return None if isinstance(setting, _Default) else setting
