"""Waiting in tests without asserting a speed: poll a condition under a generous bound.

The one waiting helper of the suite: tests wait by condition (``eventually``) or on an
event, never by sleeping an amount of time that is assumed to be enough."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

import pytest

#: A bound that keeps a broken build from hanging; never an assertion about speed.
PROMPT = 20.0


async def eventually(
    predicate: Callable[[], object | Awaitable[object]], timeout: float = PROMPT
) -> None:
    """Return once ``predicate()`` (a plain or an async function) is true; fail the test
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        holds = predicate()
        if inspect.isawaitable(holds):
            holds = await holds
        if holds:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
