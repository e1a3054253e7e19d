"""A fleet member for the connection-fault tests, and :func:`start` to run one.

Run as a script (a real OS process) it opens ``fleetcache.open(url, **options)`` and says
``{"ready": true, "pid": ...}``, or — if opening fails — ``{"ready": false, "error": <type>,
"message": ..., "cause": ..., "elapsed": <seconds the open took>}`` and exits. Then it
reads one JSON command per stdin line and answers one JSON line:

- ``{"op": "get", "ns", "name", "compute_s", "tag"}``: ``get`` with a producer that sleeps
  ``compute_s`` (0.1 s when it runs again for the same command) and returns ``{"pid",
  "tag", "began"}`` (``began``: ``time.time()`` when it began); answers ``{"value": ...}``
- ``{"op": "gets", "ns", "names", "compute_s", "tag"}``: those gets concurrently; answers
  ``{"values": [...], "errors": [...]}``
- ``{"op": "invalidate", "ns", "names"}``, ``{"op": "peek", "ns", "name"}``,
  ``{"op": "stats"}`` (``{"stats": cache.stats(), "computed": <computations so far>}``),
  ``{"op": "exit"}``
Every answer carries ``t_end`` (``time.time()``); a failed command answers ``{"raised"}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fleetcache
from fleet import Worker
from fleetcache import Key, Produced


async def start(
    url: str, *, ready_timeout: float = 60.0, **options: Any
) -> tuple[Worker, dict[str, Any]]:
    """Start a member opening ``url`` with ``options``; return it and its first answer
    (``ready`` true, or false with the error; a member that failed to open has exited)."""
    stderr_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the worker
        prefix="conn-worker-", suffix=".log", delete=False
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__)),
        url,
        json.dumps(options),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr_file,
    )
    stderr_file.close()
    worker = Worker(process, Path(stderr_file.name))
    try:
        first = await worker.receive(ready_timeout)
    except BaseException:
        await worker.kill()
        raise
    return worker, first


def say(doc: dict[str, Any]) -> None:
    """Write one JSON line to stdout."""
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


#: How many computations this process ran (written by produce, read by "stats").
COMPUTED = [0]


async def run(command: dict[str, Any], cache: Any) -> dict[str, Any]:
    """Carry out one command."""
    op = command["op"]
    if op in ("get", "gets"):
        delays = [float(command.get("compute_s", 0))]

        async def produce(key: Key) -> Produced[Any]:
            COMPUTED[0] += 1
            began = time.time()
            delay = delays[0]
            delays[0] = min(delay, 0.1)  # a computation run again (refused) is quick
            await asyncio.sleep(delay)
            return Produced(value={"pid": os.getpid(), "tag": command.get("tag"), "began": began})

        async def one(name: str) -> Any:
            entry = await cache.get(Key(command["ns"], name), produce)
            return None if entry is None else entry.value

        if op == "get":
            return {"value": await one(command["name"])}
        outcomes = await asyncio.gather(
            *(one(name) for name in command["names"]), return_exceptions=True
        )
        return {
            "values": [o for o in outcomes if not isinstance(o, BaseException)],
            "errors": [
                f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)
            ],
        }
    if op == "invalidate":
        return {"names": await cache.invalidate(command["ns"], command["names"])}
    if op == "stats":
        return {"stats": cache.stats(), "computed": COMPUTED[0]}
    if op == "peek":
        entry = await cache.peek(Key(command["ns"], command["name"]))
        return {"value": None if entry is None else entry.value}
    raise ValueError(f"unknown op {op!r}")


async def serve(url: str, options: dict[str, Any]) -> None:
    """Open, say whether that worked, then answer commands until exit or EOF."""
    began = time.monotonic()
    try:
        cache = await fleetcache.open(url, **options)
    except Exception as exc:  # reported to the test, which judges it
        say(
            {
                "ready": False,
                "error": type(exc).__name__,
                "message": str(exc),
                "cause": getattr(exc, "cause", None),
                "elapsed": time.monotonic() - began,
            }
        )
        return
    say({"ready": True, "pid": os.getpid(), "elapsed": time.monotonic() - began})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            if command["op"] == "exit":
                break
            try:
                answer = await run(command, cache)
            except Exception as exc:  # report, keep serving
                answer = {"raised": f"{type(exc).__name__}: {exc}"}
            answer["t_end"] = time.time()
            say(answer)
    finally:
        await cache.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], json.loads(sys.argv[2])))
