"""Module URL rules: canonical form, executable extensions, candidates and variants.

Every function here first puts its URL(s) in canonical form (no query, no fragment), so
callers may pass what a user typed.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urljoin, urlsplit, urlunsplit

from fleetcache.definitions.models import (
    CodeRef,
    ModuleErrorEntry,
    ModuleRenderResponse,
    error_deps,
)

__all__ = [
    "EXECUTABLE_EXTENSIONS",
    "absolute_deps",
    "candidates",
    "canonicalize",
    "has_executable_extension",
    "internal_key_for",
    "invalidation_variants",
    "is_missing_module",
    "trim_executable_extension",
]

#: The extensions a module may be written with, in the order candidates are tried.
EXECUTABLE_EXTENSIONS: tuple[str, ...] = (".gts", ".ts", ".gjs", ".js")

# A declaration file ends in ".ts" but holds no code to run.
_DECLARATION_EXTENSION = ".d.ts"

_MISSING_STATUS = 404


def canonicalize(url: str) -> str:
    """The URL without its query and fragment (a module is the same module whatever they say)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _extension_of(canonical_url: str) -> str | None:
    if canonical_url.endswith(_DECLARATION_EXTENSION):
        return None
    for ext in EXECUTABLE_EXTENSIONS:
        if canonical_url.endswith(ext):
            return ext
    return None


def has_executable_extension(url: str) -> bool:
    """Whether the URL ends in ``.gts``, ``.ts``, ``.gjs`` or ``.js`` (``.d.ts`` does not count)."""
    return _extension_of(canonicalize(url)) is not None


def trim_executable_extension(url: str) -> str:
    """The module's alias: its canonical URL without its executable extension, if it has one."""
    canonical = canonicalize(url)
    ext = _extension_of(canonical)
    return canonical[: -len(ext)] if ext else canonical


def internal_key_for(code_ref: CodeRef) -> str:
    """The key the seed's system files a definition under in a module's ``definitions``:
    the module's canonical URL without its executable extension, ``/``, the export name
    (``https://r/a/person.gts`` + ``Person`` -> ``https://r/a/person/Person``), so a bare
    module URL and one with an extension name the same definition."""
    return f"{trim_executable_extension(code_ref.module)}/{code_ref.name}"


def candidates(url: str) -> list[str]:
    """The URLs a module may be produced under, in the order to try them.

    A URL with an executable extension is its own only candidate; a bare one ``x`` gives
    ``[x.gts, x.ts, x.gjs, x.js, x]``. A URL ending in ``/`` names no file, so it is
    its own only candidate too.
    """
    canonical = canonicalize(url)
    if _extension_of(canonical) is not None or canonical.endswith("/"):
        return [canonical]
    return [canonical + ext for ext in EXECUTABLE_EXTENSIONS] + [canonical]


def invalidation_variants(url: str) -> list[str]:
    """Every URL an entry for this module may be stored under: the URL, its alias, and the
    alias with each executable extension (only the URL itself when it ends in ``/``)."""
    canonical = canonicalize(url)
    if canonical.endswith("/"):
        return [canonical]
    alias = trim_executable_extension(canonical)
    return _unique([canonical, alias, *(alias + ext for ext in EXECUTABLE_EXTENSIONS)])


def is_missing_module(response: ModuleRenderResponse | ModuleErrorEntry | None, url: str) -> bool:
    """Whether the answer for ``url`` means "there is no such module".

    That is a module-error with status 404 whose deps are empty or only variants of the
    module itself; a 404 that names another module is that module's absence, which makes
    this one an ordinary error. Accepts a render response or a bare error entry.
    """
    entry = response.error if isinstance(response, ModuleRenderResponse) else response
    # As the seed's system decides it: only a "module-error" entry can mean "missing".
    if entry is None or entry.get("type") != "module-error":
        return False
    if entry["error"].get("status") != _MISSING_STATUS:
        return False
    own = trim_executable_extension(url)
    return all(trim_executable_extension(urljoin(url, dep)) == own for dep in error_deps(entry))


def absolute_deps(deps: Iterable[str], base_url: str) -> list[str]:
    """Deps resolved against the module URL, canonical, without executable extensions,
    without duplicates, in their first-seen order."""
    return _unique(trim_executable_extension(urljoin(base_url, dep)) for dep in deps)


def _unique(urls: Iterable[str]) -> list[str]:
    # dict keeps insertion order, so this de-duplicates and keeps the first position.
    return list(dict.fromkeys(urls))
