"""``@cache.cached(...)``: an async function whose results are cached by its arguments;
see :class:`CachedFunction`."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast

from fleetcache.errors import ConfigurationError, InvalidInputError
from fleetcache.lookup.expiry import DEFAULT
from fleetcache.lookup.populate import Produced
from fleetcache.stores.base import Key
from fleetcache.stores.validation import check_json, check_name

if TYPE_CHECKING:
    from fleetcache.lookup.caching import CachingLookup
    from fleetcache.lookup.expiry import Setting

P = ParamSpec("P")
R = TypeVar("R")


class KeyMaker:
    """The entry keys of a decorated function's calls (see :class:`CachedFunction`); shared by
    the async decorator and the sync one (:mod:`fleetcache.sync`)."""

    def __init__(
        self, fn: Callable[..., Any], *, namespace: str | None, key: Callable[..., str] | None
    ) -> None:
        if namespace is not None:
            check_name(f"the namespace of cached({fn.__qualname__})", namespace, allow_empty=False)
        if key is not None and not callable(key):
            raise ConfigurationError(
                f"cached(key=...) of {fn.__qualname__} must be a function returning the "
                f"entry's name, not a {type(key).__name__}"
            )
        self._fn = fn
        self._signature = inspect.signature(fn)
        self._key = key
        self.namespace = namespace or f"{fn.__module__}.{fn.__qualname__}"

    def key_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Key:
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
            # The rule of values, for the same reasons. A dict key that is not a str is
            # refused rather than encoded: JSON turns {1: "x"}, {True: "x"}, {None: "x"} and
            # {1.5: "x"} into {"1": "x"}, {"true": "x"}, ..., which would share an entry with
            # the str-keyed dict; and a type tag would have to escape every str-keyed dict
            # too to stay unambiguous, renaming every existing entry and hiding the
            # readable JSON name. key= is there for arguments that are not JSON.
            try:
                check_json(f"argument {argument!r} of {self._fn.__qualname__}", value)
            except InvalidInputError as exc:
                raise type(exc)(
                    f"{exc}; it cannot be part of a cache key (pass cached(key=...) to build "
                    "the key yourself)"
                ) from None
        name = json.dumps(
            bound.arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return Key(self.namespace, name)


class CachedFunction(Generic[P, R]):
    """An async function whose results live in a cache::

        @cache.cached(namespace="prices", ttl=60, stale_ttl=300)
        async def price(symbol: str, currency: str = "EUR") -> float:
            return await fetch_price(symbol, currency)

        await price("ACME")                 # computed once across the fleet, then cached
        await price.invalidate("ACME")      # gone (and whatever depended on it)
        await price.refresh("ACME")         # computed again now, and stored
        await price.peek("ACME")            # the cached value or None; never computes

    The function's return value is the cached value (JSON; a tuple comes back as a list).
    The entry's name is made from the arguments, bound to the function's signature with
    defaults applied, as canonical JSON (``{"currency":"EUR","symbol":"ACME"}``), so
    ``price("ACME")`` and ``price(symbol="ACME")`` share an entry. An argument that a value
    could not be (not JSON, NaN, a dict with a key that is not a str, too deep, an int of
    more than 4300 digits) raises :class:`~fleetcache.errors.InvalidInputError` naming it,
    before anything is read or computed (give ``key=`` to build names yourself). The
    namespace defaults to the function's module and qualified name.
    """

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
        self._keys = KeyMaker(fn, namespace=namespace, key=key)
        # Refused when decorating, not at the first call (nor after a refresh computed).
        lookup.expiry(ttl=ttl, stale_ttl=stale_ttl, early_refresh=early_refresh)
        self._lookup = lookup
        self._fn = fn
        self.namespace = self._keys.namespace
        self._options: dict[str, Any] = {
            "ttl": ttl,
            "stale_ttl": stale_ttl,
            "early_refresh": early_refresh,
        }
        functools.update_wrapper(self, fn)

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> Key:
        """The cache key of a call with these arguments."""
        return self._keys.key_for(args, kwargs)

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
    """A decorator caching an async function's results in ``lookup``; see
    :class:`CachedFunction`. Expiry options left out are the lookup's (``open(ttl=...)``)."""

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
