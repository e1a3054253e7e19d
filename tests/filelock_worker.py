"""One process of the sqlite file-lock coordination tests: opens ``fleetcache.open(URL)``
and runs one role; every computation appends ``<pid> <key> <attempt>`` to
``computations.log`` in ``DIR``.

Usage: python filelock_worker.py URL DIR ROLE [KEYS]

Roles: ``fanout``: once ``go`` exists, 4 tasks get each of KEYS cold keys (50 ms
computations) and it prints the values got, as JSON. ``hold``: computes key ``held``,
touching ``computing`` and blocking until ``release`` exists, then raises if ``fail``
exists (else returns the attempt number; its deps are ``dep``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import fleetcache
from fleetcache import Key, Produced

NS = "filelock"


def log(folder: Path, key: Key, attempt: int) -> None:
    """One line per computation (O_APPEND: lines of several processes never interleave)."""
    with (folder / "computations.log").open("a") as out:
        out.write(f"{os.getpid()} {key.name} {attempt}\n")


def appears(path: Path) -> None:
    """Return once ``path`` exists (the test's signal; no bound: the test kills us)."""
    while not path.exists():
        time.sleep(0.005)


async def fanout(url: str, folder: Path, keys: int) -> None:
    """Wait for the go file, then 4 tasks get every key once each."""

    async def produce(key: Key) -> Produced[int]:
        log(folder, key, 1)
        await asyncio.sleep(0.05)
        return Produced(os.getpid())

    async with fleetcache.open(url, wait_timeout=60.0) as cache:
        (folder / f"ready-{os.getpid()}").touch()
        await asyncio.to_thread(appears, folder / "go")

        async def task() -> list[object]:
            return [await cache.get_value(Key(NS, f"k{i}"), produce) for i in range(keys)]

        got = await asyncio.gather(*(task() for _ in range(4)))
        print(json.dumps(got))


async def hold(url: str, folder: Path) -> None:
    """Compute key ``held`` slowly (see the module docstring)."""
    attempts = 0

    async def produce(key: Key) -> Produced[int]:
        nonlocal attempts
        attempts += 1
        log(folder, key, attempts)
        (folder / f"computing-{attempts}").touch()
        await asyncio.to_thread(appears, folder / f"release-{attempts}")
        if (folder / "fail").exists():
            raise RuntimeError("the holder failed on purpose")
        return Produced(attempts, deps=["dep"])

    async with fleetcache.open(url, compute_timeout=120.0) as cache:
        print(json.dumps(await cache.get_value(Key(NS, "held"), produce)))


if __name__ == "__main__":
    url, where, role = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    if role == "fanout":
        asyncio.run(fanout(url, where, int(sys.argv[4])))
    else:
        asyncio.run(hold(url, where))
