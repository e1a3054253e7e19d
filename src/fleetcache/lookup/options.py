"""A caching lookup's policy as one value, every option checked when it is made."""

from __future__ import annotations

import math
import numbers
import reprlib
from dataclasses import dataclass, field

from fleetcache.errors import ConfigurationError
from fleetcache.lookup.expiry import MAX_SECONDS, Expiry
from fleetcache.stores.base import MAX_STAMP_AGE

DEFAULT_ERROR_TTL = 30.0
DEFAULT_COMPUTE_TIMEOUT = 300.0
DEFAULT_WAIT_TIMEOUT = 180.0
DEFAULT_MAX_ROUNDS = 4
#: The most rounds a caller may wait for other processes (far past any useful setting).
MAX_ROUNDS = 1_000_000


@dataclass(frozen=True, slots=True)
class LookupOptions:
    """How a :class:`~fleetcache.lookup.caching.CachingLookup` behaves.

    ``expiry``: how values age unless a call says otherwise (default: they never expire).
    ``error_ttl``: seconds an error entry counts as a hit. ``compute_timeout``: seconds one
    computation (all its candidates and restarts) may take; its callers are answered then
    even if ``produce`` ignores its cancellation. ``wait_timeout`` and ``max_rounds``: a
    caller waits for another process's computation at most ``wait_timeout`` seconds at a
    time and ``max_rounds * wait_timeout`` in all.

    Every option is checked here, before anything is opened or computed: a value that is
    not a number of the right kind (a bool, a str, NaN, an infinity) or is out of range
    raises :class:`~fleetcache.errors.ConfigurationError` naming the option and the value.
    """

    expiry: Expiry = field(default_factory=Expiry)
    error_ttl: float = DEFAULT_ERROR_TTL
    compute_timeout: float = DEFAULT_COMPUTE_TIMEOUT
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT
    max_rounds: int = DEFAULT_MAX_ROUNDS

    def __post_init__(self) -> None:
        if not isinstance(self.expiry, Expiry):
            raise ConfigurationError(
                f"expiry must be an Expiry, not a {type(self.expiry).__name__}"
            )
        _seconds("error_ttl", self.error_ttl, 0.0, MAX_SECONDS, low_open=False)
        _seconds(
            "compute_timeout",
            self.compute_timeout,
            0.0,
            MAX_STAMP_AGE,
            why=" (a computation older than that is refused by the store)",
        )
        _seconds("wait_timeout", self.wait_timeout, 0.0, MAX_SECONDS)
        rounds = self.max_rounds
        if type(rounds) is not int or not 1 <= rounds <= MAX_ROUNDS:
            raise ConfigurationError(
                f"max_rounds must be a whole number from 1 to {MAX_ROUNDS}, got "
                f"{type(rounds).__name__} {reprlib.repr(rounds)}"
            )
        # As floats: a Fraction or a numpy number would otherwise reach the stored times.
        for name in ("error_ttl", "compute_timeout", "wait_timeout"):
            object.__setattr__(self, name, float(getattr(self, name)))


def _seconds(
    name: str, value: object, low: float, high: float, *, low_open: bool = True, why: str = ""
) -> None:
    """ConfigurationError unless ``value`` is a real number of seconds in ``(low, high]``
    (``[low, high]`` when not ``low_open``); NaN and the infinities fail every comparison
    or the finiteness check."""
    if type(value) not in (int, float) and (
        isinstance(value, bool) or not isinstance(value, numbers.Real)
    ):
        raise ConfigurationError(
            f"{name} must be a number of seconds, got {type(value).__name__} {reprlib.repr(value)}"
        )
    number = float(value)  # type: ignore[arg-type]  # a numbers.Real
    above = low < number if low_open else low <= number
    if not (math.isfinite(number) and above and number <= high):
        bound = "> " if low_open else ">= "
        raise ConfigurationError(
            f"{name} must be {bound}{low:g} and at most {high:g} seconds{why}, got {value!r}"
        )
