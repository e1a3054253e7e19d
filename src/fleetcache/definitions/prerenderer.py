"""The prerenderer contract, and its HTTP client.

A prerenderer turns a module URL into its definitions (a :class:`ModuleRenderResponse`).
It is slow (seconds to minutes), which is why the caching lookup exists. A module that
fails to render is a normal answer (``status: "error"``); only failing to get an answer at
all raises.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx

from fleetcache.definitions.errors import MalformedRenderResponseError, PrerenderError
from fleetcache.definitions.models import ModuleRenderResponse
from fleetcache.errors import ConfigurationError, NotOpenError

__all__ = ["HttpPrerenderer", "Prerenderer"]

# How much of a non-2xx body to quote in the error: enough to see the cause, not a page.
_BODY_EXCERPT_CHARS = 200


@runtime_checkable
class Prerenderer(Protocol):
    """Renders one module and returns its definitions, deps and error."""

    async def prerender_module(
        self, *, url: str, realm_url: str, user_id: str, priority: int | None
    ) -> ModuleRenderResponse:
        """Render ``url`` (a module in ``realm_url``) as ``user_id``.

        ``priority`` is passed to the prerender service untouched (None means "its default").
        Raises :class:`PrerenderError` when no answer could be had and
        :class:`MalformedRenderResponseError` when the answer is not a render response.
        """
        ...


class HttpPrerenderer:
    """A :class:`Prerenderer` that calls ``POST {base_url}/prerender/module``.

    The body is ``{"url", "realm_url", "user_id", "priority"}``; the answer is a render
    response as JSON. Creating one does no I/O; close it with :meth:`aclose` or use
    ``async with``.
    """

    def __init__(self, base_url: str, *, timeout: float = 60.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(
                f"prerenderer base URL must be http(s)://host...: {base_url!r}"
            )
        if timeout <= 0:
            raise ConfigurationError(f"prerenderer timeout must be > 0 seconds, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.endpoint = f"{self.base_url}/prerender/module"
        self.timeout = timeout
        # httpx opens connections lazily, so creating the client here does no I/O.
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout))

    async def prerender_module(
        self, *, url: str, realm_url: str, user_id: str, priority: int | None
    ) -> ModuleRenderResponse:
        """Render ``url`` over HTTP; see :meth:`Prerenderer.prerender_module`."""
        if self._client.is_closed:
            raise NotOpenError(f"HttpPrerenderer for {self.endpoint} is closed")
        payload = {"url": url, "realm_url": realm_url, "user_id": user_id, "priority": priority}
        try:
            response = await self._client.post(self.endpoint, json=payload)
        except httpx.TimeoutException as exc:
            raise PrerenderError(
                url,
                f"no answer within {self.timeout:g} s ({type(exc).__name__})",
                endpoint=self.endpoint,
            ) from exc
        except httpx.HTTPError as exc:
            raise PrerenderError(
                url, f"{type(exc).__name__}: {exc}", endpoint=self.endpoint
            ) from exc
        if not response.is_success:
            excerpt = response.text[:_BODY_EXCERPT_CHARS].strip()
            raise PrerenderError(
                url,
                f"HTTP {response.status_code} {response.reason_phrase}"
                + (f": {excerpt}" if excerpt else ""),
                endpoint=self.endpoint,
                status=response.status_code,
            )
        try:
            document = json.loads(response.content)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise MalformedRenderResponseError(
                f"body is not JSON ({exc})", url=url, endpoint=self.endpoint
            ) from exc
        try:
            return ModuleRenderResponse.from_json(document)
        except MalformedRenderResponseError as exc:
            raise MalformedRenderResponseError(
                exc.problem, url=url, endpoint=self.endpoint
            ) from exc

    async def aclose(self) -> None:
        """Close the HTTP client and its connections; safe to call twice."""
        await self._client.aclose()

    async def __aenter__(self) -> HttpPrerenderer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
