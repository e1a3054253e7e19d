"""A lookup's options as one checked value: every option refused when it is made, with a
typed error, before anything is opened or computed."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest

import fleetcache
from fleetcache.errors import ConfigurationError
from fleetcache.lookup.caching import CachingLookup
from fleetcache.lookup.expiry import DEFAULT, Expiry
from fleetcache.lookup.options import LookupOptions
from fleetcache.stores.memory import MemoryStore

NAN = float("nan")
INF = float("inf")

# Each option with values that are not what it means: (option, value, words the error says).
REFUSED: list[tuple[str, Any, str]] = [
    ("error_ttl", NAN, "error_ttl"),
    ("error_ttl", 1e300, "error_ttl"),
    ("error_ttl", INF, "error_ttl"),
    ("error_ttl", -1, "error_ttl"),
    ("error_ttl", "30", "error_ttl"),
    ("error_ttl", True, "error_ttl"),
    ("compute_timeout", "5", "compute_timeout"),
    ("compute_timeout", NAN, "compute_timeout"),
    ("compute_timeout", 0, "compute_timeout"),
    ("compute_timeout", 3600, "compute_timeout"),  # past the store's oldest stamp
    ("compute_timeout", None, "compute_timeout"),
    ("wait_timeout", NAN, "wait_timeout"),
    ("wait_timeout", INF, "wait_timeout"),
    ("wait_timeout", -1, "wait_timeout"),
    ("wait_timeout", b"1", "wait_timeout"),
    ("max_rounds", 1.5, "max_rounds"),
    ("max_rounds", 0, "max_rounds"),
    ("max_rounds", True, "max_rounds"),
    ("max_rounds", "4", "max_rounds"),
    ("max_rounds", 10**400, "max_rounds"),
]


@pytest.mark.parametrize(("option", "value", "named"), REFUSED)
def test_every_option_is_refused_when_the_options_are_made(
    option: str, value: Any, named: str
) -> None:
    """An option that is not a number of the right kind or is out of range raises
    ConfigurationError naming it when the options are made (error_ttl=nan used to be
    accepted and fail untyped after produce ran; compute_timeout="5" raised TypeError)."""
    with pytest.raises(ConfigurationError, match=named):
        LookupOptions(**{option: value})


@pytest.mark.parametrize(("option", "value", "named"), REFUSED)
def test_open_refuses_every_option_before_it_opens_anything(
    option: str, value: Any, named: str
) -> None:
    """fleetcache.open refuses the same options at the call, before any connection is
    tried (the URL points nowhere: a connection attempt would fail otherwise)."""
    with pytest.raises(ConfigurationError, match=named):
        fleetcache.open("postgresql://127.0.0.1:9/nowhere", **{option: value})


def test_expiry_is_checked_when_made_and_kept_as_floats() -> None:
    """An Expiry refuses what is not a duration (NaN, an infinity, a str, a bool, a
    stale window or beta without a ttl) and keeps its numbers as floats."""
    for bad in (
        {"ttl": NAN},
        {"ttl": INF},
        {"ttl": "60"},
        {"ttl": True},
        {"stale_ttl": 5},
        {"early_refresh": 1.0},
        {"ttl": 1, "early_refresh": 0},
    ):
        with pytest.raises(ConfigurationError):
            Expiry(**bad)
    expiry = Expiry(Fraction(1, 2), 2, 1)
    assert (expiry.ttl, expiry.stale_ttl, expiry.early_refresh) == (0.5, 2.0, 1.0)
    assert all(type(v) is float for v in (expiry.ttl, expiry.stale_ttl, expiry.early_refresh))
    assert expiry.deadlines(1000) == (1500, 3500)
    assert Expiry().deadlines(1000) == (None, None)


def test_a_calls_expiry_overrides_the_lookups() -> None:
    """A call's options override the lookup's; left out, the lookup's apply; a call that
    says "never expires" drops the lookup's stale window, and one that gives a stale
    window without a ttl is refused."""
    lookup = Expiry(60, 600, 1.0)
    assert lookup.of_call(DEFAULT, DEFAULT, DEFAULT) is lookup
    assert lookup.of_call(10, DEFAULT, DEFAULT) == Expiry(10, 600, 1.0)
    assert lookup.of_call(None, DEFAULT, DEFAULT) == Expiry()
    with pytest.raises(ConfigurationError, match="stale_ttl needs a ttl"):
        lookup.of_call(None, 5, DEFAULT)


def test_options_are_normalised_and_reach_the_lookup() -> None:
    """Valid options are kept (numbers as floats) and are what the lookup uses; the
    lookup refuses anything but a LookupOptions."""
    options = LookupOptions(
        expiry=Expiry(60), error_ttl=Fraction(3, 2), compute_timeout=5, max_rounds=2
    )
    assert options.error_ttl == 1.5
    assert type(options.compute_timeout) is float
    assert math.isclose(options.wait_timeout, 180.0)
    lookup: CachingLookup[Any] = CachingLookup(MemoryStore(), options=options)
    assert lookup.options is options
    assert lookup.expiry() == Expiry(60)
    with pytest.raises(ConfigurationError, match="LookupOptions"):
        CachingLookup(MemoryStore(), options={"error_ttl": 1})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="expiry"):
        LookupOptions(expiry=60)  # type: ignore[arg-type]
