"""A client of the simulated server's control endpoints, for drivers in another process."""

from __future__ import annotations

from typing import Any

import httpx

from fleetcache.definitions.testing._errors import SimulatedServerError
from fleetcache.definitions.testing._graph import ModuleSpec


class SimulatedPrerenderControl:
    """An HTTP client for a simulated server's control endpoints (counts, graph edits), for
    drivers in another process than the server. ``async with`` or :meth:`aclose` it."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SimulatedServerError(
                f"{method} {self.base_url}{path} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not response.is_success:
            raise SimulatedServerError(
                f"{method} {self.base_url}{path} answered HTTP {response.status_code}: "
                f"{response.text[:200]}"
            )
        return response.json()

    async def render_counts(self) -> dict[str, int]:
        """``GET /renders``."""
        counts: dict[str, int] = await self._call("GET", "/renders")
        return counts

    async def priorities(self) -> dict[str, int | None]:
        """``GET /priorities``."""
        seen: dict[str, int | None] = await self._call("GET", "/priorities")
        return seen

    async def reset_renders(self) -> None:
        """``POST /renders/reset``."""
        await self._call("POST", "/renders/reset")

    async def attempt_counts(self) -> dict[str, int]:
        """``GET /attempts``."""
        counts: dict[str, int] = await self._call("GET", "/attempts")
        return counts

    async def requests(self) -> list[dict[str, Any]]:
        """``GET /requests``: every render request, as :meth:`RecordedRequest.to_json`."""
        recorded: list[dict[str, Any]] = await self._call("GET", "/requests")
        return recorded

    async def fail_next(
        self, url: str, times: int = 1, *, status: int = 503, draining_header: bool = False
    ) -> None:
        """``POST /faults``: see :meth:`SimulatedPrerenderServer.fail_next`."""
        await self._call(
            "POST",
            "/faults",
            json={"url": url, "times": times, "status": status, "drainingHeader": draining_header},
        )

    async def set_module(self, url: str, spec: ModuleSpec) -> int:
        """``PUT /modules``; returns the module's new version."""
        doc = await self._call("PUT", "/modules", json={"url": url, "spec": spec.to_json()})
        return int(doc["version"])

    async def remove_module(self, url: str) -> bool:
        """``DELETE /modules?url=...``; False if the module was not there."""
        doc = await self._call("DELETE", "/modules", params={"url": url})
        return bool(doc["removed"])

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def __aenter__(self) -> SimulatedPrerenderControl:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
