"""Waiting in tests without asserting a speed: poll a condition under a generous bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

#: A bound that keeps a broken build from hanging; never an assertion about speed.
PROMPT = 20.0


async def eventually(predicate: Callable[[], object], timeout: float = PROMPT) -> None:
    """Return once ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
