"""Start and stop a simulated prerender server in another OS process."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Mapping

from fleetcache.definitions.testing._errors import SimulatedServerError
from fleetcache.definitions.testing._graph import ModuleSpec, graph_to_json


def start_in_subprocess(
    graph: Mapping[str, ModuleSpec],
    latency: float = 0.0,
    *,
    port: int = 0,
    startup_timeout: float = 30.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server in a new OS process; return the process and its base URL.

    Blocks until the server listens (at most ``startup_timeout`` seconds). End it with
    :func:`stop_subprocess`, which also closes its pipes.
    """
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetcache.definitions.testing",
            "--graph",
            "-",
            "--latency-ms",
            repr(latency * 1000),
            "--port",
            str(port),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    stdin, stdout = process.stdin, process.stdout
    if stdin is None or stdout is None:  # pragma: no cover - PIPE always gives both
        stop_subprocess(process)
        raise SimulatedServerError("subprocess pipes were not created")
    # readline() has no timeout, so read in a thread and give up after the deadline.
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    try:
        # A child that dies at once closes its stdin; its exit code is reported below.
        with contextlib.suppress(BrokenPipeError):
            stdin.write(json.dumps(graph_to_json(graph)).encode())
            stdin.close()
        reader.start()
        reader.join(startup_timeout)
        if reader.is_alive():
            raise SimulatedServerError(
                f"simulated prerender server did not print its URL within {startup_timeout} s"
            )
        base_url = lines[0].decode().strip() if lines else ""
        if not base_url.startswith("http://"):
            process.wait(startup_timeout)
            raise SimulatedServerError(
                f"simulated prerender server failed to start "
                f"(exit code {process.returncode}, first line {base_url!r})"
            )
    except BaseException:
        stop_subprocess(process)
        if reader.is_alive():
            reader.join()  # the child is gone, so readline() returns at once
        raise
    return process, base_url


def stop_subprocess(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """Terminate a server started by :func:`start_in_subprocess` (SIGKILL if it does not
    stop within ``timeout`` seconds), close its pipes, and return its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            # Closing stdin flushes it, which fails if the child died before reading.
            with contextlib.suppress(BrokenPipeError):
                pipe.close()
    return process.returncode
