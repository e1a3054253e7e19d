"""The definitions domain's errors (each class says when it is raised).

::

    DefinitionsError (a FleetcacheError)
    ├── FilterRefersToNonexistentTypeError, MalformedRenderResponseError
    └── PrerenderError ── PrerenderRequestInvalidError, PrerenderTimeoutError
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleetcache.errors import FleetcacheError

if TYPE_CHECKING:
    # Only for annotations: models imports this module, so a runtime import would be a cycle.
    from fleetcache.definitions.models import CodeRef

__all__ = [
    "DefinitionsError",
    "FilterRefersToNonexistentTypeError",
    "MalformedRenderResponseError",
    "PrerenderError",
    "PrerenderRequestInvalidError",
    "PrerenderTimeoutError",
]


class DefinitionsError(FleetcacheError):
    """Root of the definitions domain's errors."""


class FilterRefersToNonexistentTypeError(DefinitionsError):
    """A lookup (e.g. a query filter) refers to a type that has no definition.

    ``code_ref`` is the reference that was looked up; ``cause`` says why it does not exist
    (the module is missing, failed to render, or has no such export).
    """

    def __init__(self, code_ref: CodeRef, cause: str) -> None:
        super().__init__(
            f"filter refers to a nonexistent type: {code_ref.module}/{code_ref.name}: {cause}"
        )
        self.code_ref = code_ref
        self.cause = cause


class PrerenderError(DefinitionsError):
    """The prerenderer could not render ``url``: unreachable, timed out, or a non-2xx answer.

    ``endpoint`` is the address that was called, ``status`` the HTTP status when the server
    answered at all (None for connection errors and timeouts), ``request_id`` the
    ``x-boxel-prerender-request-id`` every attempt of the call carried and ``attempts``
    how many were made (both None when no request was sent).
    """

    def __init__(
        self,
        url: str,
        detail: str,
        *,
        endpoint: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        attempts: int | None = None,
    ) -> None:
        # The protocol's own messages already name the endpoint; say it only once.
        where = f" at {endpoint}" if endpoint and endpoint not in detail else ""
        super().__init__(f"prerender of {url!r} failed{where}: {detail}")
        self.url = url
        self.detail = detail
        self.endpoint = endpoint
        self.status = status
        self.request_id = request_id
        self.attempts = attempts


class PrerenderRequestInvalidError(PrerenderError):
    """A prerender request lacks required attributes; it was refused before any network call.

    ``missing`` names them (wire names, e.g. ``auth``), in the protocol's order.
    """

    def __init__(self, url: str, request_type: str, missing: Sequence[str]) -> None:
        super().__init__(url, f"Missing prerender {request_type} attributes: {', '.join(missing)}")
        self.missing = tuple(missing)


class PrerenderTimeoutError(PrerenderError):
    """One attempt of a prerender call outlasted the request timeout.

    A hard failure, not retried: the prerender server may still be rendering, and a retry
    would queue the same work again. ``attempt`` of ``max_attempts`` is the attempt that
    timed out, ``realm_url`` the realm (the request's affinity) and ``elapsed`` the seconds
    that attempt ran.
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint: str,
        request_id: str,
        attempt: int,
        max_attempts: int,
        realm_url: str,
        timeout: float,
        elapsed: float,
    ) -> None:
        super().__init__(
            url,
            f"Prerender request to {endpoint} aborted after {timeout * 1000:.0f}ms "
            f"(requestId={request_id}, attempt={attempt}/{max_attempts}, "
            f"affinity=realm:{realm_url}, elapsed={elapsed * 1000:.0f}ms; "
            f"grep the prerender manager/server logs for requestId={request_id})",
            endpoint=endpoint,
            request_id=request_id,
            attempts=attempt,
        )
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.realm_url = realm_url
        self.timeout = timeout
        self.elapsed = elapsed


class MalformedRenderResponseError(DefinitionsError):
    """A render response does not have the expected shape; ``problem`` says what is wrong.

    ``path`` is the field at fault (e.g. ``definitions['https://r/a/person/Person'].types``,
    ``data.attributes``), when one is; ``url`` and ``endpoint`` are set when the response
    came from a prerender call.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | None = None,
        url: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        context = ""
        if url is not None:
            context += f" for {url!r}"
        if endpoint is not None:
            context += f" from {endpoint}"
        super().__init__(f"malformed render response{context}: {problem}")
        self.problem = problem
        self.path = path
        self.url = url
        self.endpoint = endpoint
