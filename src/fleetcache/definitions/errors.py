"""The definitions domain's errors, all under :class:`fleetcache.errors.DefinitionsError`.

::

    DefinitionsError                        (fleetcache.errors)
    ├── FilterRefersToNonexistentTypeError  a code ref names a type that does not exist
    ├── PrerenderError                      the prerenderer could not be reached or refused
    └── MalformedRenderResponseError        the prerenderer answered, but not a render response
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleetcache.errors import DefinitionsError

if TYPE_CHECKING:
    # Only for annotations: models imports this module, so a runtime import would be a cycle.
    from fleetcache.definitions.models import CodeRef

__all__ = [
    "DefinitionsError",
    "FilterRefersToNonexistentTypeError",
    "MalformedRenderResponseError",
    "PrerenderError",
]


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

    ``endpoint`` is the address that was called and ``status`` the HTTP status when the
    server answered at all (None for connection errors and timeouts).
    """

    def __init__(
        self,
        url: str,
        detail: str,
        *,
        endpoint: str | None = None,
        status: int | None = None,
    ) -> None:
        where = f" at {endpoint}" if endpoint else ""
        super().__init__(f"prerender of {url!r} failed{where}: {detail}")
        self.url = url
        self.detail = detail
        self.endpoint = endpoint
        self.status = status


class MalformedRenderResponseError(DefinitionsError):
    """A render response does not have the expected shape; ``problem`` says what is wrong.

    ``url`` and ``endpoint`` are set when the response came from a prerender call.
    """

    def __init__(
        self, problem: str, *, url: str | None = None, endpoint: str | None = None
    ) -> None:
        context = ""
        if url is not None:
            context += f" for {url!r}"
        if endpoint is not None:
            context += f" from {endpoint}"
        super().__init__(f"malformed render response{context}: {problem}")
        self.problem = problem
        self.url = url
        self.endpoint = endpoint
