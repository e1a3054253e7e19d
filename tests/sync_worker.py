"""One process of the sync API's stampede test: opens ``fleetcache.open_sync(URL)``, and
once ``go`` exists, ``threads`` threads call ``get_value`` on one cold key with a slow
produce (each computation appends a line to ``computations.log``); prints the values the
threads got, as JSON.

Usage: python sync_worker.py URL DIR THREADS
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import fleetcache
from fleetcache import Key, Produced


def main(url: str, folder: Path, threads: int) -> None:
    """Open, wait for the go file, stampede, print what each thread got."""

    def produce(key: Key) -> Produced[dict[str, object]]:
        with (folder / "computations.log").open("a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # slow: every caller arrives while it runs
        return Produced({"computed_by": os.getpid(), "name": key.name})

    with fleetcache.open_sync(url) as cache:
        (folder / f"ready-{os.getpid()}").touch()
        while not (folder / "go").exists():
            time.sleep(0.005)
        got: list[object] = []

        def call() -> None:
            got.append(cache.get_value(Key("stampede", "cold-key"), produce))

        workers = [threading.Thread(target=call) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    print(json.dumps(got))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
