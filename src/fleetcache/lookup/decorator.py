"""``@cache.cached(...)``: an async function whose results are cached by its arguments.

::

    @cache.cached(namespace="prices", ttl=60, stale_ttl=300)
    async def price(symbol: str, currency: str = "EUR") -> float:
        return await fetch_price(symbol, currency)

    await price("ACME")                 # computed once across the fleet, then cached
    await price.invalidate("ACME")      # gone (and whatever depended on it)
    await price.refresh("ACME")         # computed again now, and stored
    await price.peek("ACME")            # the cached value or None; never computes

The function's return value is the cached value (JSON; a tuple comes back as a list). The
entry's name is made from the arguments, bound to the function's signature with defaults
applied, as canonical JSON (``{"currency":"EUR","symbol":"ACME"}``), so ``price("ACME")``
and ``price(symbol="ACME")`` share an entry; an argument that is not JSON raises
:class:`~fleetcache.errors.InvalidInputError` naming it (give ``key=`` to build names
yourself: ``key=lambda symbol, currency="EUR": symbol``). The namespace defaults to the
function's module and qualified name.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast

from fleetcache.errors import ConfigurationError, InvalidInputError
from fleetcache.lookup.caching import DEFAULT
from fleetcache.lookup.populate import Produced
from fleetcache.stores.base import Key

if TYPE_CHECKING:
    from fleetcache.lookup.caching import CachingLookup, Setting

P = ParamSpec("P")
R = TypeVar("R")


class CachedFunction(Generic[P, R]):
    """An async function whose results live in a cache; see the module docstring."""

    def __init__(
        self,
        lookup: CachingLookup[Any],
        fn: Callable[P, Awaitable[R]],
        *,
        namespace: str | None,
        key: Callable[P, str] | None,
        ttl: Setting,
        stale_ttl: Setting,
        early_refresh: Setting,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                f"cached() decorates async functions; {fn.__qualname__} is not one"
            )
        self._lookup = lookup
        self._fn = fn
        self._signature = inspect.signature(fn)
        self._key = key
        self.namespace = namespace or f"{fn.__module__}.{fn.__qualname__}"
        self._options: dict[str, Any] = {
            "ttl": ttl,
            "stale_ttl": stale_ttl,
            "early_refresh": early_refresh,
        }
        functools.update_wrapper(self, fn)

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> Key:
        """The cache key of a call with these arguments."""
        if self._key is not None:
            name = self._key(*args, **kwargs)
            if not isinstance(name, str):
                raise InvalidInputError(
                    f"the key function of {self._fn.__qualname__} returned "
                    f"{type(name).__name__}, not a string"
                )
            return Key(self.namespace, name)
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidInputError(f"{self._fn.__qualname__}: {exc}") from None
        bound.apply_defaults()
        for argument, value in bound.arguments.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                raise InvalidInputError(
                    f"argument {argument!r} of {self._fn.__qualname__} "
                    f"({type(value).__name__}) cannot be part of a cache key: it is not JSON; "
                    "pass cached(key=...) to build the key yourself"
                ) from None
        name = json.dumps(
            bound.arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return Key(self.namespace, name)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """The cached result for these arguments, computed on a miss."""

        async def produce(_: Key) -> Produced[R]:
            return Produced(value=await self._fn(*args, **kwargs))

        value = await self._lookup.get_value(
            self.key_for(*args, **kwargs), produce, **self._options
        )
        return cast(R, value)  # what the function returned (None included), as stored

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> list[str]:
        """Invalidate the cached result for these arguments (and what depended on it)."""
        return await self._lookup.delete(self.key_for(*args, **kwargs))

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Compute the result for these arguments now, store it, and return it."""
        key = self.key_for(*args, **kwargs)
        value = await self._fn(*args, **kwargs)
        await self._lookup.set(
            key, value, ttl=self._options["ttl"], stale_ttl=self._options["stale_ttl"]
        )
        return value

    async def peek(self, *args: P.args, **kwargs: P.kwargs) -> R | None:
        """The cached result for these arguments, or None; never computes."""
        entry = await self._lookup.peek(self.key_for(*args, **kwargs))
        if entry is None:
            return None
        value: R = entry.value
        return value


def cached(
    lookup: CachingLookup[Any],
    *,
    namespace: str | None = None,
    key: Callable[..., str] | None = None,
    ttl: Setting = DEFAULT,
    stale_ttl: Setting = DEFAULT,
    early_refresh: Setting = DEFAULT,
) -> Callable[[Callable[P, Awaitable[R]]], CachedFunction[P, R]]:
    """A decorator caching an async function's results in ``lookup``; see the module
    docstring. Expiry options left out are the lookup's (``fleetcache.open(ttl=...)``)."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> CachedFunction[P, R]:
        return CachedFunction(
            lookup,
            fn,
            namespace=namespace,
            key=key,
            ttl=ttl,
            stale_ttl=stale_ttl,
            early_refresh=early_refresh,
        )

    return decorate
