"""Drive fleet members (``fleet_worker.py``) as real OS processes from async tests."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("fleet_worker.py")


class Worker:
    """One fleet member process; ``call`` sends a command and waits for its answer."""

    def __init__(self, process: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path
        self.pid = process.pid

    @classmethod
    async def start(cls, *args: str, ready_timeout: float = 60.0, script: Path = WORKER) -> Worker:
        """Start a worker (``script``, by default ``fleet_worker.py``) with ``args`` and
        wait until it says it is ready."""
        stderr_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the worker
            prefix="fleet-worker-", suffix=".log", delete=False
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr_file,
        )
        stderr_file.close()
        worker = cls(process, Path(stderr_file.name))
        try:
            ready = await worker.receive(ready_timeout)
        except BaseException:
            await worker.kill()
            raise
        assert ready.get("ready"), ready
        return worker

    def stderr(self) -> str:
        """What the worker wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    async def send(self, op: str, **fields: Any) -> None:
        """Send one command without waiting for its answer."""
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
        await self.process.stdin.drain()

    async def receive(self, timeout: float = 60.0) -> dict[str, Any]:
        """The next answer line (fails with the worker's stderr if none comes in time)."""
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError as exc:
            message = f"worker {self.pid} silent for {timeout}s:\n{self.stderr()}"
            raise AssertionError(message) from exc
        if not line:
            raise AssertionError(f"worker {self.pid} exited:\n{self.stderr()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def call(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """Send one command and return its answer."""
        await self.send(op, **fields)
        return await self.receive(timeout)

    async def kill(self) -> None:
        """SIGKILL the worker (no cleanup runs in it) and reap it."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self._close_pipes()

    async def stop(self, timeout: float = 20.0) -> None:
        """Ask the worker to exit cleanly; kill it if it does not."""
        if self.process.returncode is None:
            try:
                await self.send("exit")
                await asyncio.wait_for(self.process.wait(), timeout)
            except (TimeoutError, ConnectionError):
                await self.kill()
        self._close_pipes()
        self.stderr_path.unlink(missing_ok=True)

    def _close_pipes(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        transport = getattr(self.process, "_transport", None)
        if transport is not None:
            transport.close()


@asynccontextmanager
async def fleet() -> AsyncIterator[list[Worker]]:
    """A list to put started workers in; all are stopped (or killed) on exit."""
    workers: list[Worker] = []
    try:
        yield workers
    finally:
        await asyncio.gather(*(worker.stop() for worker in workers), return_exceptions=True)
