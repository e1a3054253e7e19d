"""The sync API (``fleetcache.open_sync``): the async verbs and guarantees for threads —
single flight across threads and processes, produce on the caller's own thread, near hits
on the calling thread, usable from sync code inside a running event loop."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import fleetcache
from fleetcache import MISSING, Key, Produced, SyncFleetcache
from fleetcache.errors import CachedError, ConfigurationError, NotOpenError

NS = "https://realm.example/"
WORKER = Path(__file__).with_name("sync_worker.py")


def eventually(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Return once ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of each kind of store, empty."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cache.db'}"
    return str(request.getfixturevalue("database_url"))


@pytest.fixture
def cache(url: str) -> Iterator[SyncFleetcache]:
    """An open sync cache, closed after the test."""
    with fleetcache.open_sync(url) as opened:
        yield opened


def test_the_verbs(cache: SyncFleetcache) -> None:
    """get, get_value, peek, set, delete, invalidate (with dependents), clear_namespace and
    clear_all behave as the async ones."""
    calls: list[str] = []

    def produce(key: Key) -> Produced[Any] | fleetcache.Missing:
        calls.append(key.name)
        if key.name == "gone":
            return MISSING
        if key.name == "bad":
            return Produced({}, error={"message": "boom"})
        return Produced({"name": key.name}, deps=["base"] if key.name == "card" else ())

    entry = cache.get(Key(NS, "card"), produce)
    assert entry is not None
    assert entry.value == {"name": "card"}
    assert cache.get_value(Key(NS, "card"), produce) == {"name": "card"}
    assert cache.get_value(Key(NS, "gone"), produce) is None
    with pytest.raises(CachedError):
        cache.get_value(Key(NS, "bad"), produce)
    assert calls == ["card", "gone", "bad"]
    peeked = cache.peek(Key(NS, "card"))
    assert peeked is not None
    assert peeked.deps == ("base",)
    assert cache.invalidate(NS, ["base"]) == ["base", "card"]
    assert cache.peek(Key(NS, "card")) is None
    assert cache.set(Key(NS, "s"), [1, 2]) == ["s"]
    assert cache.get_value(Key(NS, "s"), produce) == [1, 2]
    assert cache.delete(Key(NS, "s")) == ["s"]
    assert cache.peek(Key(NS, "s")) is None
    cache.set(Key(NS, "a"), 1)
    cache.set(Key("other", "b"), 2)
    cache.clear_namespace(NS)
    assert cache.peek(Key(NS, "a")) is None
    assert cache.peek(Key("other", "b")) is not None
    cache.clear_all()
    assert cache.peek(Key("other", "b")) is None
    assert cache.stats()["lookup"]["computations"] == 3


def test_many_threads_share_one_computation_run_on_a_callers_thread(
    cache: SyncFleetcache,
) -> None:
    """16 threads asking for one cold key run produce once, on the thread of one of the
    callers (not the loop's, not a pool's), and all get its value."""
    ran_on: list[int] = []
    release = threading.Event()

    def produce(key: Key) -> Produced[str]:
        ran_on.append(threading.get_ident())
        release.wait(20)
        return Produced("computed")

    got: list[Any] = []
    threads = [
        threading.Thread(target=lambda: got.append(cache.get_value(Key(NS, "k"), produce)))
        for _ in range(16)
    ]
    for thread in threads:
        thread.start()
    eventually(lambda: cache.stats()["lookup"]["coalesced"] >= 15)
    release.set()
    for thread in threads:
        thread.join()
    assert got == ["computed"] * 16
    assert len(ran_on) == 1
    assert ran_on[0] in {thread.ident for thread in threads}


def test_an_exception_from_produce_reaches_every_caller_and_nothing_is_stored(
    cache: SyncFleetcache,
) -> None:
    """A produce that raises raises in every thread sharing the computation; nothing is
    stored, and the next call computes again."""
    release = threading.Event()

    def failing(key: Key) -> Produced[Any]:
        release.wait(20)
        raise LookupError("upstream down")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            cache.get(Key(NS, "f"), failing)
        except LookupError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    eventually(lambda: cache.stats()["lookup"]["coalesced"] >= 3)
    release.set()
    for thread in threads:
        thread.join()
    assert len(errors) == 4
    assert cache.peek(Key(NS, "f")) is None
    assert cache.get_value(Key(NS, "f"), lambda key: Produced("ok")) == "ok"


def test_sync_code_inside_a_running_event_loop(cache: SyncFleetcache) -> None:
    """Sync code called from a coroutine (a sync helper inside an async application) uses
    the cache without "event loop already running": it never runs a loop there."""

    async def handler() -> Any:
        return cache.get_value(Key(NS, "in-loop"), lambda key: Produced({"ok": True}))

    assert asyncio.run(handler()) == {"ok": True}


def test_produce_must_be_a_sync_function(cache: SyncFleetcache) -> None:
    """An async produce (or something not callable) is refused naming the key, before any
    I/O; the async API is for those."""

    async def produce(key: Key) -> Produced[int]:
        return Produced(1)

    with pytest.raises(ConfigurationError, match="async function"):
        cache.get(Key(NS, "x"), produce)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not a str"):
        cache.get(Key(NS, "x"), "nope")  # type: ignore[arg-type]


def test_close_is_idempotent_and_refuses_later_calls(url: str) -> None:
    """After close (or leaving the with block), every verb raises NotOpenError; closing
    again does nothing."""
    cache = fleetcache.open_sync(url)
    cache.set(Key(NS, "a"), 1)
    cache.close()
    cache.close()
    with pytest.raises(NotOpenError):
        cache.peek(Key(NS, "a"))
    with pytest.raises(NotOpenError):
        cache.get(Key(NS, "a"), lambda key: Produced(1))


def test_the_decorator_on_a_sync_function(cache: SyncFleetcache) -> None:
    """@cache.cached on a sync function: computed once per arguments (positional and
    keyword calls share an entry), peek never computes, invalidate and refresh work; an
    async function is refused."""
    calls: list[tuple[str, str]] = []

    @cache.cached(namespace="prices")
    def price(symbol: str, currency: str = "EUR") -> float:
        calls.append((symbol, currency))
        return 42.0

    assert price("ACME") == 42.0
    assert price(symbol="ACME") == 42.0
    assert calls == [("ACME", "EUR")]
    assert price.peek("ACME") == 42.0
    assert price.peek("OTHER") is None
    assert price.invalidate("ACME") == ['{"currency":"EUR","symbol":"ACME"}']
    assert price.peek("ACME") is None
    assert price.refresh("ACME") == 42.0
    assert price.peek("ACME") == 42.0
    assert calls == [("ACME", "EUR"), ("ACME", "EUR")]

    async def not_sync() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="sync functions"):
        cache.cached()(not_sync)


@pytest.mark.postgres
def test_near_hits_are_served_on_the_calling_thread(database_url: str) -> None:
    """With a near tier, a hit is answered on the calling thread without the core's loop:
    it returns while that loop is blocked."""
    with fleetcache.open_sync(database_url, near=100) as cache:
        cache.get_value(Key(NS, "hot"), lambda key: Produced({"v": 1}))
        loop_blocked = threading.Event()
        unblock = threading.Event()

        def block_the_loop() -> None:
            loop_blocked.set()
            unblock.wait(20)

        cache.call_soon(block_the_loop)
        assert loop_blocked.wait(20)
        try:
            got: list[Any] = []
            reader = threading.Thread(
                target=lambda: got.append(cache.get_value(Key(NS, "hot"), lambda key: None))  # type: ignore[arg-type,return-value]
            )
            reader.start()
            reader.join(10)
            assert got == [{"v": 1}]
            got[0]["v"] = 2  # a fresh copy: the next caller is unaffected
            assert cache.get_value(Key(NS, "hot"), lambda key: None) == {"v": 1}  # type: ignore[arg-type,return-value]
        finally:
            unblock.set()
        assert cache.stats()["lookup"]["near_hits"] == 2


@pytest.mark.processes
@pytest.mark.postgres
def test_threads_of_four_processes_compute_a_cold_key_once(
    database_url: str, tmp_path: Path
) -> None:
    """16 threads in each of 4 OS processes asking for one cold key with a slow produce:
    exactly one computation in the fleet, and all 64 callers get its value."""
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), database_url, str(tmp_path), "16"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        eventually(lambda: len(list(tmp_path.glob("ready-*"))) == 4, timeout=60)
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
    assert len((tmp_path / "computations.log").read_text().split()) == 1
    assert len(got) == 64
    assert all(value == got[0] for value in got)
    assert os.getpid() != got[0]["computed_by"]
