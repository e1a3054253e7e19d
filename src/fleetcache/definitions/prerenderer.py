"""The prerenderer contract, and its HTTP client speaking the seed system's protocol.

A module that fails to render is a normal answer (``status: "error"``); only failing to get
an answer at all raises.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeAlias, runtime_checkable
from urllib.parse import urlsplit

try:
    import httpx
    import tenacity
except ImportError as exc:  # pragma: no cover - depends on how fleetcache was installed
    raise ImportError(
        "fleetcache.definitions needs the 'definitions' extra: "
        "pip install 'fleetcache[definitions]'"
    ) from exc

from fleetcache.definitions.errors import (
    MalformedRenderResponseError,
    PrerenderError,
    PrerenderRequestInvalidError,
    PrerenderTimeoutError,
)
from fleetcache.definitions.models import ModuleRenderResponse
from fleetcache.errors import ConfigurationError, NotOpenError
from fleetcache.logcontext import get_logger

__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "JOB_PRIORITY_HEADER",
    "REQUEST_ID_HEADER",
    "SERVER_STATUS_HEADER",
    "AuthProvider",
    "HttpPrerenderer",
    "Prerenderer",
    "RetryPolicy",
    "request_timeout_from_env",
]

logger = get_logger("fleetcache.definitions.prerenderer")

#: The seed's ``PRERENDER_REQUEST_ID_HEADER``: one id per logical call, reused on retries.
REQUEST_ID_HEADER = "x-boxel-prerender-request-id"
#: The seed's ``X_BOXEL_JOB_PRIORITY_HEADER`` (runtime-common), which its remote prerenderer
#: sends as ``PRERENDER_JOB_PRIORITY_HEADER``.
JOB_PRIORITY_HEADER = "x-boxel-job-priority"
#: The seed's ``PRERENDER_SERVER_STATUS_HEADER``; the value ``draining`` means "retry".
SERVER_STATUS_HEADER = "X-Boxel-Prerender-Server-Status"
_DRAINING = "draining"
_DRAINING_STATUS = 410
_REQUEST_TYPE = "prerender-module-request"
_JSON_API = "application/vnd.api+json"
# The largest integer a JavaScript number holds exactly (Number.isSafeInteger).
_MAX_SAFE_INTEGER = 2**53 - 1

#: Render timeout (60 s) plus the seed's overhead for the hops around it (60 s).
DEFAULT_REQUEST_TIMEOUT = 120.0
_RENDER_TIMEOUT_OVERHEAD_MS = 60_000
# The seed's floors for its env settings, so 0 or nonsense cannot spin or abort at once.
_MIN_TIMEOUT_MS = 1_000
_MIN_DELAY_MS = 50
_MIN_MAX_DELAY_MS = 1_000
# Connecting is bounded apart (as Node's fetch does, 10 s) so that a host that does not
# answer is a retryable connect failure, not the whole request timeout spent at once.
_CONNECT_TIMEOUT = 10.0
# How much of a failed answer's body to quote: enough to see the cause, not a page.
_BODY_EXCERPT_CHARS = 1000

#: A bearer of the prerender ``auth`` token: a fixed token, or a function of
#: ``(realm_url, user_id)`` returning one (it may be async).
AuthProvider: TypeAlias = str | Callable[[str, str], str | Awaitable[str]]


@runtime_checkable
class Prerenderer(Protocol):
    """Renders one module and returns its definitions, deps and error."""

    async def prerender_module(
        self, *, url: str, realm_url: str, user_id: str, priority: int | None
    ) -> ModuleRenderResponse:
        """Render ``url`` (a module in ``realm_url``) on behalf of ``user_id``.

        ``priority`` is passed to the prerender service untouched (None means "its default").
        Raises :class:`PrerenderError` when no answer could be had and
        :class:`MalformedRenderResponseError` when the answer is not a render response.
        """
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a prerender call is retried: at most ``max_attempts`` attempts, waiting
    ``base_delay`` seconds after the first failure and doubling, at most ``max_delay``."""

    max_attempts: int = 12
    base_delay: float = 0.2
    max_delay: float = 180.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ConfigurationError(f"max_attempts must be an integer, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.base_delay <= self.max_delay:
            raise ConfigurationError(
                f"need 0 <= base_delay <= max_delay, got {self.base_delay} and {self.max_delay}"
            )

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failure (1 for the first)."""
        return min(self.base_delay * 2.0 ** (failed_attempts - 1), self.max_delay)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetryPolicy:
        """The policy the seed's env settings give (defaults where unset):
        ``PRERENDER_MANAGER_RETRY_ATTEMPTS`` (default 12, at least 1),
        ``PRERENDER_MANAGER_RETRY_DELAY_MS`` (default 200, at least 50) and
        ``PRERENDER_MANAGER_MAX_DELAY_MS`` (default 180000, at least 1000)."""
        env = os.environ if environ is None else environ
        attempts = _env_number(env, "PRERENDER_MANAGER_RETRY_ATTEMPTS", 12)
        delay_ms = _env_number(env, "PRERENDER_MANAGER_RETRY_DELAY_MS", 200)
        max_delay_ms = _env_number(env, "PRERENDER_MANAGER_MAX_DELAY_MS", 180_000)
        max_delay = max(_MIN_MAX_DELAY_MS, max_delay_ms) / 1000
        return cls(
            # The seed loops while attempts < N, so a fractional N rounds up.
            max_attempts=max(1, math.ceil(attempts)),
            base_delay=min(max(_MIN_DELAY_MS, delay_ms) / 1000, max_delay),
            max_delay=max_delay,
        )


def request_timeout_from_env(environ: Mapping[str, str] | None = None) -> float:
    """The per-attempt request timeout (seconds) the seed's env settings give:
    ``PRERENDER_MANAGER_REQUEST_TIMEOUT_MS``, else ``PRERENDER_REQUEST_TIMEOUT_MS``, else
    ``RENDER_TIMEOUT_MS`` + 60 s, else 120 s; never under 1 s."""
    env = os.environ if environ is None else environ
    render_ms = _env_number(env, "RENDER_TIMEOUT_MS", DEFAULT_REQUEST_TIMEOUT * 1000 - 60_000)
    fallback = _env_number(
        env, "PRERENDER_REQUEST_TIMEOUT_MS", max(_MIN_TIMEOUT_MS, render_ms) + 60_000
    )
    timeout_ms = _env_number(env, "PRERENDER_MANAGER_REQUEST_TIMEOUT_MS", fallback)
    return max(_MIN_TIMEOUT_MS, timeout_ms) / 1000


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        logger.warning("ignoring %s=%r: not a number; using %g", name, raw, default)
        return default
    return value


class _RetryableError(Exception):
    """One attempt failed in a way worth another attempt (never leaves this module)."""

    def __init__(self, detail: str, status: int | None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


class HttpPrerenderer:
    """A :class:`Prerenderer` that calls the seed system's ``POST {base_url}/prerender-module``.

    ``auth`` is the prerender token: a string, or a function ``(realm_url, user_id) ->
    token`` (sync or async) called for each render. ``retry`` defaults to
    :meth:`RetryPolicy.from_env` and ``request_timeout`` (seconds per attempt) to
    :func:`request_timeout_from_env`. ``transport`` (an ``httpx`` transport, e.g.
    ``httpx.MockTransport``) and ``sleep`` (how backoff waits) are for tests. Creating
    one does no I/O; close it with :meth:`aclose` or use ``async with``.

    It speaks to the seed system's prerender service (its manager or a prerender server)
    as that system's own ``remote-prerenderer`` does::

        POST {base}/prerender-module
        Content-Type: application/vnd.api+json          Accept: application/vnd.api+json
        x-boxel-prerender-request-id: <uuid4, one per call, the same on every retry>
        x-boxel-job-priority: <priority>                 (only a non-negative integer)

        {"data": {"type": "prerender-module-request", "attributes": {
            "affinityType": "realm", "affinityValue": <realm>, "realm": <realm>,
            "url": <module URL>, "auth": <token>, "renderOptions": {}, "priority"?: int}}}

        -> 201 {"data": {"type": "prerender-module-result", "id": <module URL>,
                         "attributes": <ModuleRenderResponse>}}

    Retried with exponential backoff: 410 or the ``X-Boxel-Prerender-Server-Status:
    draining`` header (a server going away), 503 and every other 5xx, and a connection that
    could not be made or was reset. Not retried: any other status, and an attempt that
    outlasted the request timeout (the server may still be rendering it).
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: AuthProvider,
        retry: RetryPolicy | None = None,
        request_timeout: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(
                f"prerenderer base URL must be http(s)://host...: {base_url!r}"
            )
        if not isinstance(auth, str) and not callable(auth):
            raise ConfigurationError(
                f"auth must be a token string or a function (realm_url, user_id) -> token, "
                f"got {type(auth).__name__}"
            )
        timeout = request_timeout_from_env() if request_timeout is None else request_timeout
        if timeout <= 0:
            raise ConfigurationError(f"request timeout must be > 0 seconds, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.endpoint = f"{self.base_url}/prerender-module"
        self.auth = auth
        self.retry = RetryPolicy.from_env() if retry is None else retry
        self.request_timeout = timeout
        self._sleep = sleep
        # httpx opens connections lazily, so creating the client here does no I/O. Only the
        # connect phase has an httpx timeout; the whole attempt is bounded by asyncio.timeout.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=min(_CONNECT_TIMEOUT, timeout)),
            transport=transport,
        )

    async def prerender_module(
        self, *, url: str, realm_url: str, user_id: str, priority: int | None
    ) -> ModuleRenderResponse:
        """Render ``url`` over HTTP; see :meth:`Prerenderer.prerender_module`.

        Raises :class:`PrerenderRequestInvalidError` (before any request) when the realm,
        the URL or the auth token is empty, :class:`PrerenderTimeoutError` when an attempt
        outlasts the request timeout, :class:`PrerenderError` for any other failure (after
        the retries the protocol allows) and :class:`MalformedRenderResponseError` when the
        answer is not a render response.
        """
        if self._client.is_closed:
            raise NotOpenError(f"HttpPrerenderer for {self.endpoint} is closed")
        attributes: dict[str, Any] = {
            "affinityType": "realm",
            "affinityValue": realm_url,
            "realm": realm_url,
            "url": url,
            "auth": await self._token(realm_url, user_id),
            "renderOptions": {},
        }
        if priority is not None:
            attributes["priority"] = priority
        missing = [
            name
            for name in ("affinityValue", "realm", "url", "auth")
            if not isinstance(attributes[name], str) or not attributes[name].strip()
        ]
        if missing:
            raise PrerenderRequestInvalidError(url, _REQUEST_TYPE, missing)
        request_id = str(uuid.uuid4())
        headers = {"Content-Type": _JSON_API, "Accept": _JSON_API, REQUEST_ID_HEADER: request_id}
        if _is_priority_header_value(priority):
            headers[JOB_PRIORITY_HEADER] = str(priority)
        body = json.dumps({"data": {"type": _REQUEST_TYPE, "attributes": attributes}}).encode()

        policy = self.retry

        def log_retry(state: tenacity.RetryCallState) -> None:
            failure = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            logger.warning(
                "prerender request %s for %r failed (attempt %d/%d), retrying in %.0f ms: %s",
                request_id,
                url,
                state.attempt_number,
                policy.max_attempts,
                wait * 1000,
                failure,
            )

        attempt = 0
        try:
            async for retrying in tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(policy.max_attempts),
                wait=lambda state: policy.delay(state.attempt_number),
                retry=tenacity.retry_if_exception_type(_RetryableError),
                before_sleep=log_retry,
                sleep=self._sleep,
                reraise=True,
            ):
                with retrying:
                    attempt = retrying.retry_state.attempt_number
                    return await self._attempt(
                        body=body,
                        headers=headers,
                        url=url,
                        realm_url=realm_url,
                        request_id=request_id,
                        attempt=attempt,
                    )
        except _RetryableError as exc:
            raise PrerenderError(
                url,
                f"{exc.detail} (gave up after {attempt} attempts, requestId={request_id})",
                endpoint=self.endpoint,
                status=exc.status,
                request_id=request_id,
                attempts=attempt,
            ) from exc.__cause__
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _token(self, realm_url: str, user_id: str) -> object:
        if isinstance(self.auth, str):
            return self.auth
        token = self.auth(realm_url, user_id)
        return await token if inspect.isawaitable(token) else token

    async def _attempt(
        self,
        *,
        body: bytes,
        headers: dict[str, str],
        url: str,
        realm_url: str,
        request_id: str,
        attempt: int,
    ) -> ModuleRenderResponse:
        """One HTTP attempt: the render response, or an exception saying whether to retry."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.request_timeout):
                response = await self._client.post(self.endpoint, content=body, headers=headers)
        except TimeoutError as exc:
            raise PrerenderTimeoutError(
                url,
                endpoint=self.endpoint,
                request_id=request_id,
                attempt=attempt,
                max_attempts=self.retry.max_attempts,
                realm_url=realm_url,
                timeout=self.request_timeout,
                elapsed=time.monotonic() - started,
            ) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout) as exc:
            # Refused, reset, or no connection in time: the server never got the request
            # (or went away under it); the seed retries these.
            raise _RetryableError(f"{type(exc).__name__}: {exc}", None) from exc
        except httpx.HTTPError as exc:
            raise PrerenderError(
                url,
                f"{type(exc).__name__}: {exc}",
                endpoint=self.endpoint,
                request_id=request_id,
                attempts=attempt,
            ) from exc
        status = response.status_code
        draining = (
            status == _DRAINING_STATUS or response.headers.get(SERVER_STATUS_HEADER) == _DRAINING
        )
        if not response.is_success or draining:
            excerpt = response.text[:_BODY_EXCERPT_CHARS]
            detail = f"Prerender request to {self.endpoint} failed with status {status}" + (
                f": {excerpt}" if excerpt else ""
            )
            if draining or 500 <= status < 600:
                raise _RetryableError(detail, status)
            raise PrerenderError(
                url,
                detail,
                endpoint=self.endpoint,
                status=status,
                request_id=request_id,
                attempts=attempt,
            )
        return self._parse(response.content, url)

    def _parse(self, content: bytes, url: str) -> ModuleRenderResponse:
        try:
            document = json.loads(content)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise MalformedRenderResponseError(
                f"body is not JSON ({exc})", url=url, endpoint=self.endpoint
            ) from exc
        data = document.get("data") if isinstance(document, dict) else None
        attributes = data.get("attributes") if isinstance(data, dict) else None
        if attributes is None:
            raise MalformedRenderResponseError(
                "the response has no data.attributes",
                path="data.attributes",
                url=url,
                endpoint=self.endpoint,
            )
        try:
            return ModuleRenderResponse.from_json(attributes)
        except MalformedRenderResponseError as exc:
            raise MalformedRenderResponseError(
                exc.problem, path=exc.path, url=url, endpoint=self.endpoint
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


def _is_priority_header_value(priority: object) -> bool:
    """Whether the seed would send ``priority`` as the job priority header: a safe
    non-negative integer (a bool is not one)."""
    return (
        isinstance(priority, int)
        and not isinstance(priority, bool)
        and 0 <= priority <= _MAX_SAFE_INTEGER
    )
