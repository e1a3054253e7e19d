"""The process harness (``fleetcache_cli.shared.Fleet``) as the cross-process tests use it:
a worker serving commands, its failures, killing one worker, closing the fleet."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from fleetcache_cli.shared import Fleet, WorkerContext, WorkerError

pytestmark = pytest.mark.processes


async def echo(ctx: WorkerContext, done_file: str) -> None:
    """Answer each command with its op, this worker's index and pid; ``raise`` raises; on
    the way out (the fleet closing) write ``done_file``."""
    try:
        while (command := await ctx.command()) is not None:
            if command["op"] == "raise":
                raise RuntimeError(f"asked to fail by {command}")
            ctx.answer({"op": command["op"], "index": ctx.index, "pid": os.getpid()})
    finally:
        await asyncio.to_thread(Path(done_file).write_text, "closed")


async def test_serving_workers_answer_their_own_commands_in_order(tmp_path: Path) -> None:
    """Each serving worker answers the commands sent to it, in the order sent, whether they
    are called one at a time or sent ahead and received later."""
    with Fleet[Any, Any](2, name="test-harness") as fleet:
        members = [fleet.serve(i, echo, str(tmp_path / f"done-{i}")) for i in range(2)]
        first = await members[0].call("a")
        assert first == {"op": "a", "index": 0, "pid": members[0].pid}
        for op in ("b", "c", "d"):
            members[1].send(op)
        assert [(await members[1].receive())["op"] for _ in range(3)] == ["b", "c", "d"]
        assert (await members[1].call("e"))["index"] == 1


async def test_a_serving_job_that_raises_is_reported_with_its_traceback(tmp_path: Path) -> None:
    """A job that raises surfaces on the next receive as WorkerError naming the worker and
    carrying the job's traceback."""
    with Fleet[Any, Any](1, name="test-harness") as fleet:
        member = fleet.serve(0, echo, str(tmp_path / "done"))
        with pytest.raises(WorkerError, match=r"worker 0 failed(.|\n)*asked to fail"):
            await member.call("raise")


async def test_a_killed_worker_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    """Killing one worker ends its process for real (no cleanup runs in it); waiting for
    its answer is a WorkerError saying it exited, and the other worker still answers."""
    with Fleet[Any, Any](2, name="test-harness") as fleet:
        victim, survivor = (fleet.serve(i, echo, str(tmp_path / f"done-{i}")) for i in range(2))
        await victim.call("warm")
        victim.kill()
        with pytest.raises(ProcessLookupError):
            os.kill(victim.pid, 0)
        with pytest.raises(WorkerError, match=r"worker 0 .* exited with code -9"):
            await victim.call("after")
        assert (await survivor.call("still"))["op"] == "still"
    assert not (tmp_path / "done-0").exists()
    assert (tmp_path / "done-1").read_text() == "closed"


async def test_closing_the_fleet_ends_serving_jobs_cleanly(tmp_path: Path) -> None:
    """Closing the fleet tells each serving job to stop: its cleanup runs, and no worker
    process is left."""
    with Fleet[Any, Any](2, name="test-harness") as fleet:
        members = [fleet.serve(i, echo, str(tmp_path / f"done-{i}")) for i in range(2)]
        await asyncio.gather(*(member.call("x") for member in members))
    assert [(tmp_path / f"done-{i}").read_text() for i in range(2)] == ["closed"] * 2
    assert multiprocessing.active_children() == []
