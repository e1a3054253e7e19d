"""Populate coordination among the processes of one machine on a sqlite file, through the
lock file's byte locks (``FileLockCoordinator``): real processes on one file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import fleetcache
from fleetcache import Key, Produced
from fleetcache.coordination.base import WakeReason
from fleetcache.coordination.filelock import FileLockCoordinator
from fleetcache.errors import CoordinationError
from waiting import eventually

WORKER = Path(__file__).with_name("filelock_worker.py")
NS = "filelock"


def _computations(folder: Path) -> list[tuple[str, str, int]]:
    log = folder / "computations.log"
    lines = log.read_text().split("\n") if log.exists() else []
    return [(pid, key, int(attempt)) for pid, key, attempt in (ln.split() for ln in lines if ln)]


def _start(url: str, folder: Path, role: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), url, str(folder), role, *extra],
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.processes
def test_four_processes_compute_each_cold_key_once(tmp_path: Path) -> None:
    """4 processes x 4 tasks getting the same 8 cold keys on one sqlite file compute each
    key exactly once, and every caller gets the one computed value."""
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    keys = 8
    workers = [_start(url, tmp_path, "fanout", str(keys)) for _ in range(4)]
    try:
        asyncio.run(eventually(lambda: len(list(tmp_path.glob("ready-*"))) == 4))
        (tmp_path / "go").touch()
        outputs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert all(w.returncode == 0 for w in workers)
    counts = Counter(key for _, key, _ in _computations(tmp_path))
    assert counts == {f"k{i}": 1 for i in range(keys)}
    got = [json.loads(out) for out in outputs]
    for i in range(keys):
        assert len({task[i] for process in got for task in process}) == 1


async def _wait_for_holder(url: str, folder: Path) -> subprocess.Popen[str]:
    holder = _start(url, folder, "hold")
    await eventually((folder / "computing-1").exists)
    return holder


async def _lose_and_wait(cache: fleetcache.Fleetcache, computed: list[str]) -> asyncio.Task[object]:
    """A get of the held key that loses its lock and parks (its produce records itself)."""

    async def produce(key: Key) -> Produced[str]:
        computed.append(key.name)
        return Produced("here")

    task = asyncio.create_task(cache.get_value(Key(NS, "held"), produce))
    await eventually(lambda: cache.stats()["coordinator"]["lock_lost"] >= 1)
    return task


@pytest.mark.processes
@pytest.mark.parametrize("how", ["sigkill", "raise"])
async def test_a_dead_or_failing_winner_wakes_its_waiter_who_computes(
    tmp_path: Path, how: str
) -> None:
    """A waiter whose winner is killed with SIGKILL, or whose winner's produce raises, is
    woken by the kernel's release of the byte (not by its 60 s wait timeout) and computes
    the key itself: two computations in all."""
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    holder = await _wait_for_holder(url, tmp_path)
    try:
        async with fleetcache.open(url, wait_timeout=60.0, max_rounds=1) as cache:
            computed: list[str] = []
            task = await _lose_and_wait(cache, computed)
            assert not task.done()
            if how == "sigkill":
                holder.send_signal(signal.SIGKILL)
            else:
                (tmp_path / "fail").touch()
                (tmp_path / "release-1").touch()
            assert await asyncio.wait_for(task, 20) == "here"
            assert computed == ["held"]
            assert cache.stats()["coordinator"]["woken_notify"] == 1
    finally:
        holder.kill()
        holder.communicate()
    assert len(_computations(tmp_path)) == 1  # the holder's one, never finished


@pytest.mark.processes
async def test_an_invalidation_during_the_winners_computation_is_not_undone(
    tmp_path: Path,
) -> None:
    """An invalidation of a dependency while another process computes: that write is
    refused, the winner computes again, and the waiting process gets the second value."""
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    holder = await _wait_for_holder(url, tmp_path)
    try:
        async with fleetcache.open(url, wait_timeout=60.0, max_rounds=1) as cache:
            computed: list[str] = []
            task = await _lose_and_wait(cache, computed)
            await cache.invalidate(NS, ["dep"])
            (tmp_path / "release-1").touch()
            await eventually((tmp_path / "computing-2").exists)
            (tmp_path / "release-2").touch()
            assert await asyncio.wait_for(task, 20) == 2
            assert computed == []
    finally:
        holder.kill()
        holder.communicate()
    assert [attempt for _, _, attempt in _computations(tmp_path)] == [1, 2]


async def test_close_wakes_the_waiters(tmp_path: Path) -> None:
    """Closing a coordinator wakes its parked waiters at once with CLOSE."""
    path = tmp_path / "c.locks"
    holder, waiter = FileLockCoordinator(path), FileLockCoordinator(path)
    await holder.start()
    await waiter.start()
    try:
        async with holder.lock("k") as held:
            assert held.won
            async with waiter.lock("k") as lost:
                assert not lost.won
                waiting = asyncio.create_task(lost.wait(60.0))
                await asyncio.sleep(0)
                await waiter.close()
                assert await asyncio.wait_for(waiting, 20) is WakeReason.CLOSE
    finally:
        await waiter.close()
        await holder.close()


async def test_lock_ids_sharing_a_byte_only_take_turns(tmp_path: Path) -> None:
    """Two keys on one byte (one slot): while one is held, the other is lost, in this
    coordinator and in another one on the file; the release wakes the other coordinator's
    waiter (through the kernel), and the other key is then won."""
    path = tmp_path / "c.locks"
    one, other = FileLockCoordinator(path, slots=1), FileLockCoordinator(path, slots=1)
    await one.start()
    await other.start()
    try:
        holding = contextlib.AsyncExitStack()
        held = await holding.enter_async_context(one.lock("a"))
        assert held.won
        async with one.lock("b") as lost_here:
            assert not lost_here.won
        async with other.lock("b") as lost_there:
            assert not lost_there.won
            waiting = asyncio.create_task(lost_there.wait(60.0))
            await asyncio.sleep(0)
            assert not waiting.done()
            await holding.aclose()  # the release of "a" frees the byte
            assert await asyncio.wait_for(waiting, 20) is WakeReason.NOTIFY
        async with other.lock("b") as won:
            assert won.won
    finally:
        await one.close()
        await other.close()


async def test_open_on_sqlite_coordinates_by_default_and_can_opt_out(tmp_path: Path) -> None:
    """``fleetcache.open("sqlite:///...")`` builds a file-lock coordinator beside the
    database; ``coordinate=False`` builds none."""
    db = tmp_path / "c.db"
    async with fleetcache.open(f"sqlite:///{db}") as cache:
        assert isinstance(cache.coordinator, FileLockCoordinator)
        assert cache.coordinator.path == f"{db}.locks"
        await cache.get_value(Key(NS, "k"), lambda key: _value())
        assert cache.stats()["coordinator"]["lock_won"] == 1
    async with fleetcache.open(f"sqlite:///{db}", coordinate=False) as cache:
        assert cache.coordinator is None


async def _value() -> Produced[int]:
    return Produced(1)


def _lock_in_child(coordinator: FileLockCoordinator, out: Any) -> None:
    async def attempt() -> str:
        try:
            async with coordinator.lock("k"):
                return "locked"
        except CoordinationError as exc:
            return str(exc)

    out.put(asyncio.run(attempt()))


@pytest.mark.processes
async def test_a_forked_child_is_refused_the_parents_lock_file(tmp_path: Path) -> None:
    """A child forked after the coordinator opened its lock file shares the parent's locks
    (one open file), so it would not be excluded: its lock() raises CoordinationError."""
    coordinator = FileLockCoordinator(tmp_path / "c.locks")
    await coordinator.start()
    try:
        context = multiprocessing.get_context("fork")
        out = context.Queue()
        child = context.Process(target=_lock_in_child, args=(coordinator, out))
        child.start()
        said = await asyncio.to_thread(out.get, True, 20)
        await asyncio.to_thread(child.join, 20)
        assert "before a fork" in said
    finally:
        await coordinator.close()
