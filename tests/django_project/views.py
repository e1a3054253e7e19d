"""A view using the cache as Django applications do: ``cache.get_or_set`` around a slow
computation (counted, so the tests can tell a hit from a computation)."""

from __future__ import annotations

import threading

from django.core.cache import cache
from django.http import HttpRequest, JsonResponse

#: How many times each report was computed in this process (guarded by _lock).
computed: dict[str, int] = {}
_lock = threading.Lock()


def build_report(name: str) -> dict[str, object]:
    """The slow part of the page."""
    with _lock:
        computed[name] = computed.get(name, 0) + 1
        runs = computed[name]
    return {"name": name, "rows": [name.upper(), len(name)], "run": runs}


def report(request: HttpRequest, name: str) -> JsonResponse:
    """The report for ``name``, from the cache (computed once, then served)."""
    body = cache.get_or_set(f"report:{name}", lambda: build_report(name), timeout=60)
    return JsonResponse(body)
