"""Per-key exponential backoff after failures, in bounded memory (for failed refreshes)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: Seconds a key is left alone after its first failure; doubled after each further one.
FIRST_DELAY = 1.0
#: The longest a key is left alone after failures.
MAX_DELAY = 60.0
#: How many failing keys are remembered; past it the oldest failure is forgotten.
MAX_KEYS = 10_000


class Backoff(Generic[K]):
    """Which keys failed recently and must be left alone for now.

    After a key's failure it is blocked for ``first`` seconds, doubling after each further
    failure up to ``cap``; a success forgets it. At most ``max_keys`` keys are remembered
    (the oldest failure goes first: that key may then be tried again sooner). ``clock``
    gives seconds; a clock that goes back unblocks a key rather than blocking it longer.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        first: float = FIRST_DELAY,
        cap: float = MAX_DELAY,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._clock = clock
        self._first = first
        self._cap = cap
        self._max_keys = max_keys
        # key -> (time of its last failure, its delay), oldest failure first. Written by
        # failed()/succeeded(), read by blocked(); event loop only, no lock.
        self._failed: OrderedDict[K, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failed)

    def blocked(self, key: K) -> bool:
        """Whether ``key`` failed less than its delay ago."""
        last = self._failed.get(key)
        if last is None:
            return False
        failed_at, delay = last
        return failed_at <= self._clock() < failed_at + delay

    def failed(self, key: K) -> float:
        """Record a failure of ``key``; return how long it is now left alone."""
        last = self._failed.pop(key, None)
        delay = self._first if last is None else min(self._cap, last[1] * 2)
        self._failed[key] = (self._clock(), delay)
        while len(self._failed) > self._max_keys:
            self._failed.popitem(last=False)
        return delay

    def succeeded(self, key: K) -> None:
        """Forget ``key``'s failures."""
        self._failed.pop(key, None)
