"""One process of the Django stampede test: once ``go`` exists, ``threads`` threads call
``cache.get_or_set`` on one cold key with a slow callable (each computation appends a line
to ``log``); prints the values the threads got, as JSON.

Usage: python django_worker.py URL BACKEND DIR THREADS
(BACKEND: fleetcache, or django-db for Django's own DatabaseCache on the same Postgres).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def main(url: str, backend: str, folder: Path, threads: int) -> None:
    """Configure Django, wait for the go file, stampede, print what each thread got."""
    import django
    from django.conf import settings

    if backend == "fleetcache":
        caches = {
            "default": {"BACKEND": "fleetcache.contrib.django.FleetcacheCache", "LOCATION": url}
        }
        databases: dict[str, object] = {}
    else:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(url)
        caches = {
            "default": {
                "BACKEND": "django.core.cache.backends.db.DatabaseCache",
                "LOCATION": "django_cache_table",
            }
        }
        databases = {
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": params["dbname"],
                "USER": params.get("user", ""),
                "PASSWORD": params.get("password", ""),
                "HOST": params.get("host", ""),
                "PORT": params.get("port", ""),
            }
        }
    settings.configure(CACHES=caches, DATABASES=databases, USE_TZ=True)
    django.setup()
    from django.core.cache import cache

    def compute() -> dict[str, object]:
        with (folder / "computations.log").open("a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # slow: every caller arrives while it runs
        return {"computed_by": os.getpid()}

    cache.get("warm-up")  # opened before the stampede
    (folder / f"ready-{os.getpid()}").touch()
    while not (folder / "go").exists():
        time.sleep(0.005)
    got: list[object] = []

    def call() -> None:
        got.append(cache.get_or_set("cold-key", compute, timeout=None))

    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps(got))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
