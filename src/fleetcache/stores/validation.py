"""What a store accepts, checked before any I/O, and the bytes and text it stores.

Every store refuses the same inputs with the same typed errors, before it touches a file,
a connection or a transaction, so one bad value can never leave a transaction open or a
half-written row behind:

* key fields, aliases and deps: strings without NUL (Postgres ``text`` cannot hold it)
  and without lone surrogates (they have no UTF-8 form), at most :data:`MAX_NAME_BYTES`
  UTF-8 bytes each; namespace and name non-empty;
* values, error documents and diagnostics: JSON made of dicts with string keys, lists
  (tuples come back as lists), strings, finite numbers, booleans and None, nested at most
  :data:`MAX_JSON_DEPTH` deep, with the same rules for every string.

:class:`~fleetcache.errors.InvalidInputError` (or its subclass
:class:`~fleetcache.errors.SerializationError` for what is not JSON at all) names the key
and, for values, the path of the offending part.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetcache.errors import InvalidInputError, SerializationError, StoreError

if TYPE_CHECKING:
    from fleetcache.stores.base import Entry, Key

#: The longest namespace, name, scope, user, alias or dep, in UTF-8 bytes. (Postgres
#: indexes a dep in a GIN index, whose entries must stay under a third of a page.)
MAX_NAME_BYTES = 2048
#: The deepest nesting of dicts and lists a value may have.
MAX_JSON_DEPTH = 100
#: The most deps one entry may have.
MAX_DEPS = 10_000


def check_name(what: str, text: object, *, allow_empty: bool = True) -> None:
    """Refuse a key field, alias or dep that is not a storable string."""
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a string, got {type(text).__name__}")
    if not text and not allow_empty:
        raise InvalidInputError(f"{what} must not be empty")
    if "\x00" in text:
        raise InvalidInputError(f"{what} contains a NUL character: {text[:80]!r}")
    try:
        # ASCII (the common case, and the hit path's) needs no encoding to be measured.
        size = len(text) if text.isascii() else len(text.encode())
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} contains a lone surrogate at index {exc.start}: {text[:80]!r}"
        ) from None
    if size > MAX_NAME_BYTES:
        raise InvalidInputError(
            f"{what} is {size} bytes long; the limit is {MAX_NAME_BYTES} bytes (UTF-8)"
        )


def stamped_names(key: Key, names: Iterable[str]) -> tuple[str, ...]:
    """The canonical (sorted, unique) names a stamp for ``key`` covers, each checked."""
    validate_key(key)
    stamped = tuple(sorted(set(names)))
    for name in stamped:
        check_name(f"a stamped name of key {key.coalesce_key}", name)
    return stamped


def validate_key(key: Key) -> None:
    """Refuse a key whose fields a store could not hold (see the module docstring)."""
    # The hit path's check: plain ASCII strings of a storable size pass without a message
    # being built; anything else goes through the checks that say what is wrong.
    fields = (key.namespace, key.name, key.scope, key.user)
    if (
        key.namespace
        and key.name
        and all(
            type(field) is str
            and field.isascii()
            and len(field) <= MAX_NAME_BYTES
            and "\x00" not in field
            for field in fields
        )
    ):
        return
    check_name("the namespace of a key", key.namespace, allow_empty=False)
    check_name(f"the name of a key in namespace {key.namespace!r}", key.name, allow_empty=False)
    check_name(f"the scope of key {key.coalesce_key}", key.scope)
    check_name(f"the user of key {key.coalesce_key}", key.user)


#: The codec of every value this release writes: compact JSON text, UTF-8. A row's codec
#: says how its value's bytes decode, so another codec (pickle, a compressed form) can be
#: added without a schema change; a codec a release does not know is refused on read.
JSON_CODEC = "json"


@dataclass(frozen=True, slots=True)
class EncodedEntry:
    """An entry's columns as a store writes them: the value as the bytes ``codec`` made
    (kept verbatim, so a read decodes exactly what was written: key order, number forms),
    error and diagnostics as JSON text (verbatim too)."""

    value: bytes
    codec: str
    deps: tuple[str, ...]
    error: str | None
    diagnostics: str | None
    created_at: int | None
    alias: str | None
    expires_at: int | None
    stale_until: int | None
    compute_ms: int | None

    def columns(self) -> dict[str, Any]:
        """The columns by name (what every store binds; deps as a tuple)."""
        return {field: getattr(self, field) for field in self.__slots__}


def encode_entry(entry: Entry) -> EncodedEntry:
    """Validate every part of ``entry`` and return its columns; raises
    :class:`InvalidInputError` / :class:`SerializationError` naming the key and the part."""
    key = entry.key
    validate_key(key)
    where = key.coalesce_key
    if entry.alias is not None:
        check_name(f"the alias of key {where}", entry.alias)
    if len(entry.deps) > MAX_DEPS:
        raise InvalidInputError(f"key {where} has {len(entry.deps)} deps; the limit is {MAX_DEPS}")
    for dep in entry.deps:
        check_name(f"a dep of key {where}", dep)
    for what in ("created_at", "expires_at", "stale_until", "compute_ms"):
        moment = getattr(entry, what)
        if moment is not None and (isinstance(moment, bool) or not isinstance(moment, int)):
            raise InvalidInputError(f"the {what} of key {where} must be an int or None")
    return EncodedEntry(
        value=encode_json(f"the value of key {where}", entry.value).encode(),
        codec=JSON_CODEC,
        deps=tuple(entry.deps),
        error=None
        if entry.error is None
        else encode_json(f"the error of key {where}", entry.error),
        diagnostics=(
            None
            if entry.diagnostics is None
            else encode_json(f"the diagnostics of key {where}", entry.diagnostics)
        ),
        created_at=entry.created_at,
        alias=entry.alias,
        expires_at=entry.expires_at,
        stale_until=entry.stale_until,
        compute_ms=entry.compute_ms,
    )


def encode_json(what: str, value: Any) -> str:
    """``value`` as compact JSON text, after checking it is storable JSON."""
    _check_json(what, value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def decode_value(key: Key, codec: str, data: bytes) -> Any:
    """The value a row of ``key`` holds: ``data`` decoded by ``codec``. Raises
    :class:`~fleetcache.errors.StoreError` naming the key for a codec this release does not
    know (a row written by a newer one) or bytes that do not decode."""
    try:
        if codec == JSON_CODEC:
            # UTF-8 by construction: decoding first skips json's encoding detection.
            return json.loads(data.decode())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StoreError(
            f"the value stored for key {key.coalesce_key} ({len(data)} bytes) is not "
            f"{codec!r} data: {exc}"
        ) from exc
    raise StoreError(
        f"the value stored for key {key.coalesce_key} has codec {codec!r}, which this release "
        f"cannot decode (it reads {JSON_CODEC!r}): was it written by a newer fleetcache?"
    )


def _check_json(what: str, value: Any) -> None:
    # Iterative, so a hostile depth fails with our error and not a RecursionError. Each
    # stack item is (node, depth, parent item, step) so a path is built only on failure.
    stack: list[tuple[Any, int, Any, str]] = [(value, 0, None, "")]
    while stack:
        item = stack.pop()
        node, depth, _, _ = item
        if isinstance(node, str):
            _check_string(what, node, item)
        elif node is None or isinstance(node, bool | int):
            continue
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise SerializationError(f"{what} holds {node!r} at {_path(item)}: not JSON")
        elif isinstance(node, dict):
            if depth >= MAX_JSON_DEPTH:
                _too_deep(what, item)
            for k, v in node.items():
                if not isinstance(k, str):
                    raise SerializationError(
                        f"{what} has a {type(k).__name__} key {k!r} at {_path(item)}: "
                        "JSON keys are strings"
                    )
                _check_string(what, k, item)
                stack.append((v, depth + 1, item, f".{k}"))
        elif isinstance(node, list | tuple):
            if depth >= MAX_JSON_DEPTH:
                _too_deep(what, item)
            stack.extend((v, depth + 1, item, f"[{i}]") for i, v in enumerate(node))
        else:
            raise SerializationError(
                f"{what} holds a {type(node).__name__} at {_path(item)}: not JSON"
            )


def _check_string(what: str, text: str, item: tuple[Any, int, Any, str]) -> None:
    if "\x00" in text:
        raise InvalidInputError(f"{what} has a string with a NUL character at {_path(item)}")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"{what} has a string with a lone surrogate at {_path(item)}"
        ) from None


def _too_deep(what: str, item: tuple[Any, int, Any, str]) -> None:
    raise InvalidInputError(
        f"{what} nests deeper than {MAX_JSON_DEPTH} levels (at {_path(item)[:200]})"
    )


def _path(item: tuple[Any, int, Any, str] | None) -> str:
    steps: list[str] = []
    while item is not None:
        _, _, parent, step = item
        steps.append(step)
        item = parent
    return "$" + "".join(reversed(steps))
