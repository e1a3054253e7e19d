"""The Django cache backend: Django's documented cache semantics case by case (ported from
Django's own ``BaseCacheTests`` where they apply), a real project's view through the test
client, the async variants, and what Django's backends do not give: ``get_or_set`` computed
once across threads and processes, and a ``delete`` no older computation undoes."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import django
import pytest
from psycopg.conninfo import conninfo_to_dict

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")
django.setup()

from django.core.cache import CacheKeyWarning, cache, caches  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

from django_project import views  # noqa: E402
from fleetcache.contrib.django import FleetcacheCache, close_all  # noqa: E402
from fleetcache.embedded import PgBouncer  # noqa: E402
from fleetcache.stores.postgres import PostgresStore  # noqa: E402

BACKEND = "fleetcache.contrib.django.FleetcacheCache"
WORKER = Path(__file__).with_name("django_worker.py")


def custom_key_func(key: str, key_prefix: str, version: int) -> str:
    """A customized key function (Django's test suite has the same)."""
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


def caches_for(url: str) -> dict[str, dict[str, Any]]:
    """Django's test aliases (default, prefix, v2, custom_key, custom_key2) on ``url``."""
    base = {"BACKEND": BACKEND, "LOCATION": url}
    return {
        "default": dict(base),
        "prefix": {**base, "KEY_PREFIX": f"cacheprefix{os.getpid()}"},
        "v2": {**base, "VERSION": 2},
        "custom_key": {**base, "KEY_FUNCTION": custom_key_func},
        "custom_key2": {**base, "KEY_FUNCTION": "test_django.custom_key_func"},
    }


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'django-cache.db'}"
    return str(request.getfixturevalue("database_url"))


@pytest.fixture
def project(url: str) -> Iterator[str]:
    """The test project's caches pointed at ``url``; closed after the test."""
    with override_settings(CACHES=caches_for(url)):
        try:
            yield url
        finally:
            close_all()


class Unpicklable:
    """A value pickle refuses."""

    def __getstate__(self) -> Any:
        raise pickle.PickleError()


# ---------------------------------------------------------------- Django's own semantics


def test_simple_set_get_and_none_is_a_value(project: str) -> None:
    """set/get round-trips, a missing key gives the default, and a stored None is returned
    instead of the default."""
    cache.set("key", "value")
    assert cache.get("key") == "value"
    assert cache.get("does_not_exist") is None
    assert cache.get("does_not_exist", "bang!") == "bang!"
    cache.set("key_default_none", None)
    assert cache.get("key_default_none", default="default") is None


def test_add(project: str) -> None:
    """add stores only when the key is absent, and says whether it stored."""
    assert cache.add("addkey1", "value") is True
    assert cache.add("addkey1", "newvalue") is False
    assert cache.get("addkey1") == "value"


def test_prefix_and_key_functions_keep_caches_apart(project: str) -> None:
    """KEY_PREFIX and KEY_FUNCTION make distinct keys on one LOCATION; two aliases with the
    same key function (a callable and its dotted path) see each other's keys."""
    cache.set("somekey", "value")
    assert caches["prefix"].has_key("somekey") is False
    caches["prefix"].set("somekey", "value2")
    assert cache.get("somekey") == "value"
    assert caches["prefix"].get("somekey") == "value2"
    cache.set("answer1", 42)
    assert caches["custom_key"].get("answer1") is None
    assert caches["custom_key2"].get("answer1") is None
    caches["custom_key"].set("answer2", 42)
    assert cache.get("answer2") is None
    assert caches["custom_key2"].get("answer2") == 42


def test_get_many_set_many_delete_many(project: str) -> None:
    """get_many returns only stored keys (None values included, any iterable of keys);
    set_many returns [] and honours its timeout; delete_many deletes only those keys."""
    assert cache.set_many({"a": "a", "b": "b", "c": "c", "d": "d"}) == []
    assert cache.get_many(["a", "c", "d"]) == {"a": "a", "c": "c", "d": "d"}
    assert cache.get_many(iter(["a", "b", "e"])) == {"a": "a", "b": "b"}
    cache.set_many({"x": None, "y": 1})
    assert cache.get_many(["x", "y"]) == {"x": None, "y": 1}
    assert cache.set_many({}) == []
    cache.delete_many(["a", "b"])
    assert cache.get_many(["a", "b", "c"]) == {"c": "c"}
    assert cache.delete_many([]) is None


def test_delete_and_has_key(project: str) -> None:
    """delete says whether the key was there; has_key and ``in`` see stored Nones and keys
    stored forever, not missing keys."""
    cache.set_many({"key1": "spam", "key2": "eggs"})
    assert cache.delete("key1") is True
    assert cache.get("key1") is None
    assert cache.get("key2") == "eggs"
    assert cache.delete("nonexistent_key") is False
    cache.set("no_expiry", "here", None)
    cache.set("null", None)
    assert cache.has_key("no_expiry") is True
    assert cache.has_key("null") is True
    assert "null" in cache
    assert cache.has_key("goodbye1") is False


def test_incr_and_decr(project: str) -> None:
    """incr/decr add and subtract, raise ValueError for a missing key and TypeError for a
    value that cannot be added to, and keep the key's expiry."""
    cache.set("answer", 41, 100)
    assert cache.incr("answer") == 42
    assert cache.get("answer") == 42
    assert cache.incr("answer", 10) == 52
    assert cache.incr("answer", -10) == 42
    assert cache.decr("answer") == 41
    assert cache.decr("answer", -11) == 52
    for operation in (cache.incr, cache.decr):
        with pytest.raises(ValueError, match="not found"):
            operation("does_not_exist")
    cache.set("null", None)
    with pytest.raises(TypeError):
        cache.incr("null")
    backend = caches["default"]
    assert isinstance(backend, FleetcacheCache)
    entry = backend.core.peek(backend._key("answer", None))
    assert entry is not None
    assert entry.expires_at is not None  # still the 100 s given to set


def test_data_types_come_back_as_they_were(project: str) -> None:
    """Any picklable value comes back equal and of its own type (tuples stay tuples, sets,
    Decimals and datetimes survive): values are pickled, not JSON."""
    values: dict[str, Any] = {
        "string": "this is a string",
        "int": 42,
        "bool": True,
        "list": [1, 2, 3, 4],
        "tuple": (1, 2, 3, 4),
        "dict": {"A": 1, "B": 2},
        "set": {1, 2},
        "decimal": Decimal("1.10"),
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "function": custom_key_func,
        "class": Unpicklable,
        "bytes": b"\x00\xff",
        "unicode": "Iñtërnâtiônàlizætiøn",
    }
    for key, value in values.items():
        cache.set(key, value)
        got = cache.get(key)
        assert got == value
        assert type(got) is type(value)
    cache.set("Iñtërnâtiônàlizætiøn", {"x": 1})
    assert cache.get("Iñtërnâtiônàlizætiøn") == {"x": 1}


def test_unpicklable_values_raise_pickle_errors(project: str) -> None:
    """set, add and get_or_set of a value pickle refuses raise pickle.PickleError, as
    Django's backends do, and store nothing."""
    with pytest.raises(pickle.PickleError):
        cache.set("unpicklable", Unpicklable())
    with pytest.raises(pickle.PickleError):
        cache.add("unpicklable", Unpicklable())
    with pytest.raises(pickle.PickleError):
        cache.get_or_set("unpicklable", Unpicklable)
    assert cache.has_key("unpicklable") is False


def test_clear_empties_this_caches_namespace_only(project: str) -> None:
    """clear deletes every key of the cache (every prefix and version of its NAMESPACE), and
    nothing of a cache with another NAMESPACE on the same database."""
    other = FleetcacheCache(project, {"OPTIONS": {"NAMESPACE": "other"}})
    other.set("kept", 1)
    cache.set_many({"key1": "spam", "key2": "eggs"})
    caches["v2"].set("key3", "ham")
    cache.clear()
    assert cache.get("key1") is None
    assert cache.get("key2") is None
    assert caches["v2"].get("key3") is None
    assert other.get("kept") == 1


def test_timeouts_none_zero_float_and_long(project: str) -> None:
    """TIMEOUT None caches forever, 0 (or less) caches nothing (set, add, set_many and
    touch), a float works, and a timeout past 30 days is relative (not memcached's
    absolute time)."""
    backend = caches["default"]
    assert isinstance(backend, FleetcacheCache)
    cache.set("forever", "eggs", None)
    entry = backend.core.peek(backend._key("forever", None))
    assert entry is not None
    assert entry.expires_at is None
    assert cache.add("forever", "new eggs", None) is False
    cache.set("key1", "eggs", 0)
    assert cache.get("key1") is None
    cache.set("key1", "old")
    cache.set("key1", "eggs", -1)
    assert cache.get("key1") is None  # an expired set removes the older value too
    assert cache.add("key2", "ham", 0) is True
    assert cache.get("key2") is None
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 0)
    assert cache.get_many(["key3", "key4"]) == {}
    cache.set("key5", "belgian fries", timeout=5)
    assert cache.touch("key5", timeout=0) is True
    assert cache.get("key5") is None
    cache.set("float", "spam", 100.2)
    assert cache.get("float") == "spam"
    month = 60 * 60 * 24 * 30 + 1
    cache.set("long", "eggs", month)
    assert cache.get("long") == "eggs"
    assert cache.add("long2", "ham", month) is True
    assert cache.get("long2") == "ham"


def test_the_default_timeout_is_300_seconds(project: str) -> None:
    """Without TIMEOUT a value lives 300 s; a TIMEOUT setting replaces it."""
    backend = caches["default"]
    assert isinstance(backend, FleetcacheCache)
    assert backend.default_timeout == 300
    cache.set("k", 1)
    entry = backend.core.peek(backend._key("k", None))
    assert entry is not None
    assert entry.created_at is not None
    assert entry.expires_at == entry.created_at + 300_000
    short = FleetcacheCache(project, {"TIMEOUT": 7})
    short.set("k7", 1)
    entry = short.core.peek(short._key("k7", None))
    assert entry is not None
    assert entry.created_at is not None
    assert entry.expires_at == entry.created_at + 7_000


def test_expiration(project: str) -> None:
    """A value past its timeout is gone for get, has_key and add (waited for by
    condition, never by a fixed sleep)."""
    cache.set("expire1", "very quickly", 0.2)
    cache.set("expire2", "very quickly", 0.2)
    cache.set("expire3", "very quickly", 0.2)
    cache.set("last", "very quickly", 0.2)
    _eventually(lambda: cache.get("last") is None)  # the others expired before it
    assert cache.get("expire1") is None
    assert cache.add("expire2", "newvalue") is True
    assert cache.get("expire2") == "newvalue"
    assert cache.has_key("expire3") is False


def test_touch(project: str) -> None:
    """touch gives a stored key a new timeout from now (None: forever) and says whether the
    key was there."""
    backend = caches["default"]
    assert isinstance(backend, FleetcacheCache)
    cache.set("expire1", "very quickly", timeout=1)
    assert cache.touch("expire1", timeout=400) is True
    entry = backend.core.peek(backend._key("expire1", None))
    assert entry is not None
    assert entry.created_at is not None
    assert entry.expires_at == entry.created_at + 400_000
    assert cache.touch("expire1", timeout=None) is True
    entry = backend.core.peek(backend._key("expire1", None))
    assert entry is not None
    assert entry.expires_at is None
    assert cache.get("expire1") == "very quickly"
    assert cache.touch("expire1") is True  # the default timeout
    assert cache.touch("nonexistent") is False


def test_versions(project: str) -> None:
    """version= and VERSION select distinct keys; incr_version and decr_version move a
    value between versions (ValueError for a missing key; None values move too)."""
    cache.set("answer1", 42)
    assert cache.get("answer1", version=1) == 42
    assert cache.get("answer1", version=2) is None
    assert caches["v2"].get("answer1") is None
    assert caches["v2"].get("answer1", version=1) == 42
    cache.set("answer2", 42, version=2)
    assert cache.get("answer2") is None
    assert caches["v2"].get("answer2") == 42
    assert cache.add("answer3", 42, version=2) is True
    assert cache.add("answer3", 37, version=2) is False
    assert cache.add("answer3", 37, version=1) is True
    assert cache.get("answer3", version=1) == 37
    assert cache.get("answer3", version=2) == 42
    cache.set("answer4", 37, version=1)
    cache.set("answer4", 42, version=2)
    assert cache.delete("answer4") is True
    assert cache.get("answer4", version=2) == 42
    assert cache.incr("answer4", version=2) == 43
    assert cache.has_key("answer4", version=2) is True
    cache.set("answer", 42, version=2)
    assert cache.incr_version("answer", version=2) == 3
    assert cache.get("answer", version=2) is None
    assert cache.get("answer", version=3) == 42
    assert caches["v2"].decr_version("answer", version=3) == 2
    assert caches["v2"].get("answer") == 42
    with pytest.raises(ValueError, match="not found"):
        cache.incr_version("does_not_exist")
    cache.set("null", None)
    assert cache.incr_version("null") == 2
    assert cache.get_many(["answer2"], version=2) == {"answer2": 42}


def test_get_or_set(project: str) -> None:
    """get_or_set stores and returns the default (called if callable), None included, and
    later returns the stored value; version= applies; default is required."""
    assert cache.get("projector") is None
    assert cache.get_or_set("projector", 42) == 42
    assert cache.get("projector") == 42
    assert cache.get_or_set("null", None) is None
    assert cache.get("null", "default") is None  # None was stored
    assert cache.get_or_set("mykey", lambda: "value") == "value"
    assert cache.get_or_set("mykey", "other") == "value"
    assert cache.get_or_set("brian", 1979, version=2) == 1979
    with pytest.raises(TypeError, match="default"):
        cache.get_or_set("brian")  # type: ignore[call-arg]
    assert cache.get("brian", version=1) is None
    assert cache.get_or_set("brian", 42, version=1) == 42
    assert cache.get_or_set("brian", 0, version=2) == 1979
    assert cache.get_or_set("zero", "now", timeout=0) == "now"
    assert cache.has_key("zero") is False


def _keys_warned(operation: str, args: list[Any], expected: str) -> None:
    with pytest.warns(CacheKeyWarning) as record:
        getattr(cache, operation)(*args)
    assert str(record[0].message) == expected, operation


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "key with spaces and 清",
            "Cache key contains characters that will cause errors if used with memcached: %r",
        ),
        (
            ("a" * 250) + "清",
            "Cache key will cause errors if used with memcached: %r (longer than 250)",
        ),
    ],
    ids=["characters", "length"],
)
def test_keys_memcached_refuses_warn_as_in_django(project: str, key: str, expected: str) -> None:
    """Every operation warns CacheKeyWarning with Django's own message for a key memcached
    would refuse (and still works)."""
    backend = caches["default"]
    previous = backend.key_func
    backend.key_func = lambda key, *args: key
    try:
        for operation, args in [
            ("add", [key, 1]),
            ("get", [key]),
            ("set", [key, 1]),
            ("incr", [key]),
            ("decr", [key]),
            ("touch", [key]),
            ("delete", [key]),
            ("get_many", [[key, "b"]]),
            ("set_many", [{key: 1, "b": 2}]),
            ("delete_many", [[key, "b"]]),
        ]:
            _keys_warned(operation, args, expected % key)
    finally:
        backend.key_func = previous


def test_unknown_options_are_refused(tmp_path: Path) -> None:
    """An OPTIONS key the backend does not read is ImproperlyConfigured naming it (a typo
    never silently changes nothing); MAX_ENTRIES and CULL_FREQUENCY are accepted."""
    with pytest.raises(ImproperlyConfigured, match="NAER"):
        FleetcacheCache(f"sqlite:///{tmp_path}/c.db", {"OPTIONS": {"NAER": 10}})
    made = FleetcacheCache(
        f"sqlite:///{tmp_path}/c.db", {"OPTIONS": {"MAX_ENTRIES": 30, "CULL_FREQUENCY": 0}}
    )
    assert (made._max_entries, made._cull_frequency) == (30, 0)
    assert made._options["max_entries"] == 30
    # Without MAX_ENTRIES, Django's default of 300 is not imposed on a shared table.
    assert "max_entries" not in FleetcacheCache(f"sqlite:///{tmp_path}/c.db", {})._options


def test_max_entries_bounds_the_table(url: str) -> None:
    """OPTIONS MAX_ENTRIES bounds the cache's table: ten times as many keys set, it never
    holds more than 1.1 x MAX_ENTRIES (counted after every tenth), the most recent keys are
    kept and the oldest evicted."""
    limit = 50
    made = FleetcacheCache(url, {"OPTIONS": {"MAX_ENTRIES": limit, "CULL_FREQUENCY": 3}})
    try:
        store = made.core.store
        for n in range(10 * limit):
            made.set(f"k{n}", n, timeout=None)
            if n % (limit // 10) == 0:
                entries, _ = made.core.call(store.table_size)  # type: ignore[attr-defined]
                assert entries <= 1.1 * limit, f"{entries} entries after {n + 1} sets"
        assert made.get(f"k{10 * limit - 1}") == 10 * limit - 1
        assert made.get("k0") is None
    finally:
        close_all()


def test_close_keeps_the_shared_cache_open(project: str) -> None:
    """close() (Django calls it after every request) leaves the process's cache usable."""
    cache.set("k", 1)
    cache.close()
    assert cache.get("k") == 1


# ---------------------------------------------------------------- a real project


def test_a_view_through_the_test_client_computes_once(project: str) -> None:
    """The project's view, requested twice through Django's test client, computes its page
    once and serves the same body; after a delete it computes again."""
    views.computed.clear()
    client = Client()
    first = client.get("/report/alpha")
    second = client.get("/report/alpha")
    assert first.status_code == second.status_code == 200
    assert (
        json.loads(first.content)
        == json.loads(second.content)
        == {
            "name": "alpha",
            "rows": ["ALPHA", 5],
            "run": 1,
        }
    )
    assert views.computed == {"alpha": 1}
    assert cache.delete("report:alpha") is True
    assert json.loads(client.get("/report/alpha").content)["run"] == 2


# ---------------------------------------------------------------- the async variants


async def test_async_variants_are_served_by_the_async_core(project: str) -> None:
    """aset/aget/aadd/ahas_key/aincr/adecr/atouch/aget_many/aset_many/adelete/adelete_many/
    aget_or_set/aclear do what their sync forms do, awaited on the caller's loop (a
    callable default runs on that loop's thread)."""
    loop_thread = threading.get_ident()
    ran_on: list[int] = []
    await cache.aset("a", 1)
    assert await cache.aget("a") == 1
    assert await cache.aget("missing", "dflt") == "dflt"
    assert await cache.aadd("a", 2) is False
    assert await cache.aadd("b", 2) is True
    assert await cache.ahas_key("b") is True
    assert await cache.aincr("a", 5) == 6
    assert await cache.adecr("a") == 5
    assert await cache.atouch("a", None) is True
    assert await cache.aset_many({"c": 3, "d": 4}) == []
    assert await cache.aget_many(["a", "c", "d", "e"]) == {"a": 5, "c": 3, "d": 4}

    def default() -> str:
        ran_on.append(threading.get_ident())
        return "computed"

    assert await cache.aget_or_set("g", default) == "computed"
    assert await cache.aget_or_set("g", default) == "computed"
    assert ran_on == [loop_thread]
    assert await cache.adelete("a") is True
    assert await cache.adelete("a") is False
    await cache.adelete_many(["c", "d"])
    assert await cache.aget_many(["c", "d"]) == {}
    assert await cache.aincr_version("b") == 2
    await cache.aclear()
    assert await cache.aget("g") is None
    await cache.aclose()


# ---------------------------------------------------------------- beyond Django's backends


def test_get_or_set_computes_once_across_threads(project: str) -> None:
    """16 threads calling get_or_set on one cold key run the callable once (on one of the
    callers' own threads) and all get its value."""
    computed: list[int] = []
    release = threading.Event()

    def slow() -> str:
        computed.append(threading.get_ident())
        release.wait(20)
        return "the value"

    got: list[Any] = []
    threads = [
        threading.Thread(target=lambda: got.append(cache.get_or_set("cold", slow)))
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    _eventually(lambda: computed)
    backend = caches["default"]
    assert isinstance(backend, FleetcacheCache)
    # Every thread has joined the computation before it ends (counted by the core).
    _eventually(lambda: backend.core.stats()["lookup"]["coalesced"] >= 15)
    release.set()
    for thread in threads:
        thread.join()
    assert got == ["the value"] * 16
    assert len(computed) == 1
    assert computed[0] in {thread.ident for thread in threads}


def test_a_delete_is_never_undone_by_an_older_computation(project: str) -> None:
    """A get_or_set whose computation began before a delete never stores that older value:
    after the delete the key holds only a value computed after it (Django's own backends
    store the older one)."""
    started = threading.Event()
    release = threading.Event()
    versions = iter(["computed before the delete", "computed after the delete"])

    def compute() -> str:
        value = next(versions)
        started.set()
        if value.endswith("before the delete"):
            release.wait(20)
        return value

    got: list[Any] = []
    caller = threading.Thread(target=lambda: got.append(cache.get_or_set("k", compute)))
    caller.start()
    assert started.wait(20)
    cache.delete("k")
    release.set()
    caller.join(30)
    assert got == ["computed after the delete"]
    assert cache.get("k") == "computed after the delete"


def _stampede(url: str, tmp_path: Path, processes: int, threads: int) -> tuple[int, list[Any]]:
    """Run the worker in ``processes`` OS processes of ``threads`` threads each; return how
    many computations ran and every value the callers got."""
    env = dict(os.environ)
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url, "fleetcache", str(tmp_path), str(threads)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(processes)
    ]
    try:
        _eventually(lambda: len(list(tmp_path.glob("ready-*"))) == processes, timeout=60)
        (tmp_path / "go").touch()
        got: list[Any] = []
        for worker in workers:
            out, err = worker.communicate(timeout=120)
            assert worker.returncode == 0, err
            got.extend(json.loads(out))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    log = (tmp_path / "computations.log").read_text().split()
    return len(log), got


@pytest.mark.processes
@pytest.mark.postgres
def test_get_or_set_computes_once_across_processes_on_postgres(
    database_url: str, tmp_path: Path
) -> None:
    """4 OS processes x 8 threads calling get_or_set on one cold key with a slow callable
    run it exactly once on Postgres, and every caller gets that one value."""
    computations, got = _stampede(database_url, tmp_path, processes=4, threads=8)
    assert computations == 1
    assert len(got) == 32
    assert all(value == got[0] for value in got)


@pytest.mark.processes
def test_get_or_set_on_sqlite_computes_once_across_processes(tmp_path: Path) -> None:
    """On sqlite the processes sharing the file coordinate through its lock file: 4
    processes x 8 threads run the callable once, and all 32 callers get its value."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    computations, got = _stampede(url, tmp_path, processes=4, threads=8)
    assert computations == 1
    assert len(got) == 32
    assert all(value == got[0] for value in got)


def _eventually(predicate: Any, timeout: float = 20.0) -> None:
    """Return once ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)


def test_async_caller_from_another_loop_does_not_block_it(project: str) -> None:
    """aget_or_set awaited by several tasks of one application loop computes once, and the
    loop keeps running other tasks while they wait (the await does not block it)."""

    async def main() -> tuple[list[Any], int]:
        release = asyncio.Event()
        ticks = 0
        computed: list[int] = []

        def slow() -> str:
            computed.append(1)
            return "v"

        async def ticker() -> None:
            nonlocal ticks
            while not release.is_set():
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        got = await asyncio.gather(*(cache.aget_or_set("ak", slow) for _ in range(8)))
        release.set()
        await tick_task
        return [*got, len(computed)], ticks

    got, ticks = asyncio.run(main())
    assert got == ["v"] * 8 + [1]
    assert ticks > 0


@pytest.mark.postgres
def test_an_incr_reaches_a_peers_near_tier(database_url: str) -> None:
    """On Postgres an incr (a rewrite in place, not an invalidation) is announced by its own
    write: a peer cache whose near tier holds the old value drops it and reads the new one,
    even when the cache that wrote keeps no near tier itself."""
    writer = FleetcacheCache(database_url, {"OPTIONS": {}})
    peer = FleetcacheCache(database_url, {"OPTIONS": {"NEAR": 100}})
    try:
        writer.set("counter", 1)
        assert peer.get_or_set("counter", 0) == 1  # a coalescing get: fills the near tier
        near = peer.core.lookup.near
        assert near is not None
        assert peer.get("counter") == 1
        assert near.stats()["near_hits"] == 1  # served from the peer's memory
        assert writer.incr("counter") == 2
        deadline = time.monotonic() + 20
        while peer.get("counter") != 2:
            assert time.monotonic() < deadline, "the peer kept serving the old value"
            time.sleep(0.01)
    finally:
        close_all()  # close() leaves a Django cache open (Django calls it per request)


@pytest.mark.postgres
def test_get_reads_on_the_calling_thread_and_fills_the_near_tier(database_url: str) -> None:
    """On Postgres ``get``, ``has_key`` and ``get_many`` read on the request's thread (they
    answer while the core's loop is blocked); with NEAR, ``get`` keeps what it read in the
    near tier and the next ``get`` is a near hit."""
    backend = FleetcacheCache(database_url, {"OPTIONS": {"NEAR": 100}})
    try:
        backend.set("k", {"b": 1, "a": 2})
        backend.set("other", 3)
        core = backend.core
        near = core.lookup.near
        assert near is not None
        near.clear()
        blocked, release = threading.Event(), threading.Event()
        core.call_soon(lambda: (blocked.set(), release.wait(20)))
        assert blocked.wait(20)
        got: list[Any] = []
        try:
            reader = threading.Thread(
                target=lambda: got.append(
                    (
                        backend.get("k"),
                        backend.has_key("other"),
                        backend.get_many(["k", "other", "absent"]),
                        backend.get("absent", "default"),
                    )
                ),
                daemon=True,
            )
            reader.start()
            reader.join(10)
        finally:
            release.set()
        assert got == [({"b": 1, "a": 2}, True, {"k": {"b": 1, "a": 2}, "other": 3}, "default")]
        assert list(got[0][0]) == ["b", "a"]
        hits = near.stats()["near_hits"]
        assert backend.get("k") == {"b": 1, "a": 2}
        assert near.stats()["near_hits"] == hits + 1
    finally:
        backend.core.close()


@pytest.mark.postgres
def test_session_url_and_prepared_statements_behind_pgbouncer(
    pgbouncer: PgBouncer, database_url: str
) -> None:
    """LOCATION a transaction pooler and OPTIONS SESSION_URL the server: the backend opens
    (its session direct), its statements and its reads go through the pooler without
    prepared statements (the default there; PREPARED_STATEMENTS=False says it too), and
    get_or_set computes once for 8 threads."""
    pooled = pgbouncer.conninfo_for(str(conninfo_to_dict(database_url)["dbname"]))
    backend = FleetcacheCache(
        pooled, {"OPTIONS": {"SESSION_URL": database_url, "PREPARED_STATEMENTS": False}}
    )
    try:
        calls: list[int] = []
        release = threading.Event()

        def compute() -> str:
            calls.append(1)
            release.wait(20)
            return "computed"

        got: list[Any] = []
        threads = [
            threading.Thread(target=lambda: got.append(backend.get_or_set("cold", compute)))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        _eventually(lambda: backend.core.stats()["lookup"]["coalesced"] >= 7)
        release.set()
        for thread in threads:
            thread.join()
        assert got == ["computed"] * 8
        assert calls == [1]
        for _ in range(12):  # psycopg would prepare after 5 runs
            assert backend.get("cold") == "computed"
        store = backend.core.store
        assert isinstance(store, PostgresStore)
        assert store.read_pool is not None
        with store.read_pool.connection() as conn:
            assert conn.prepare_threshold is None
            assert conn.info.port == pgbouncer.port
    finally:
        backend.core.close()
