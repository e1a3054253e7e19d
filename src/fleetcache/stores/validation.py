"""What a store accepts, checked before any I/O (so a bad value never leaves a transaction
open or a row half written), and the bytes and text it stores: names without NUL or lone
surrogates and of bounded size, JSON of bounded depth with finite numbers, times that fit
in 64 bits, and lists of names that are never a lone ``str``. The errors name the key and,
for values, the path of the offending part."""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetcache._json import compact
from fleetcache.errors import InvalidInputError, SerializationError

if TYPE_CHECKING:
    from fleetcache.stores.base import Entry, Key
    from fleetcache.stores.codecs import ValueCodec

#: The longest namespace, name, scope, user, alias or dep, in UTF-8 bytes. (Postgres
#: indexes a dep in a GIN index, whose entries must stay under a third of a page.)
MAX_NAME_BYTES = 2048
#: The deepest nesting of dicts and lists a value may have.
MAX_JSON_DEPTH = 100
#: The most deps one entry may have.
MAX_DEPS = 10_000
#: The most decimal digits an integer in a value may have: Python's default limit on
#: converting an int to and from text, so every process of a fleet can read it back.
MAX_INT_DIGITS = 4300
_INT_LIMIT = 10**MAX_INT_DIGITS
#: Below this many bits an int has fewer than MAX_INT_DIGITS digits (10**4300 > 2**14284):
#: the common case is decided without comparing against the limit.
_INT_SAFE_BITS = 14_000
#: Times (ms) are stored as 64-bit integers (Postgres ``bigint``, sqlite ``INTEGER``).
_INT64 = range(-(2**63), 2**63)
#: What iterates as characters or bytes: never a list of names.
_NOT_NAMES = (str, bytes, bytearray, memoryview)


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


def is_plain_name(text: object) -> bool:
    """Whether ``text`` is a storable name of the common kind (ASCII, no NUL, short): the
    hit path's check, which builds no message; anything else goes to :func:`check_name`."""
    return (
        type(text) is str and text.isascii() and len(text) <= MAX_NAME_BYTES and "\x00" not in text
    )


def check_names(what: str, names: object) -> tuple[str, ...]:
    """``names`` (any iterable of names) as a tuple, in order, each checked with
    :func:`check_name`. A ``str`` or ``bytes`` is refused rather than taken apart into
    its characters (``invalidate(ns, "abc")`` would otherwise invalidate ``a``, ``b`` and
    ``c``), and so is anything that is not iterable (None included)."""
    if isinstance(names, _NOT_NAMES):
        raise InvalidInputError(
            f"{what} must be a list of names, not a {type(names).__name__}: {reprlib.repr(names)} "
            "(a single name goes in a list: [name])"
        )
    if not isinstance(names, Iterable):
        raise InvalidInputError(f"{what} must be a list of names, not a {type(names).__name__}")
    given = tuple(names)
    for i, name in enumerate(given):
        if not is_plain_name(name):
            check_name(f"item {i} of {what}", name)
    return given


def stamped_names(key: Key, names: Iterable[str]) -> tuple[str, ...]:
    """The canonical (sorted, unique) names a stamp for ``key`` covers, each checked."""
    validate_key(key)
    return tuple(sorted(set(check_names(f"the stamped names of key {key.coalesce_key}", names))))


def names_to_invalidate(namespace: str, names: object, expand: object) -> list[str]:
    """The names an invalidation of ``namespace`` starts from (each once, in order), after
    checking the namespace, every name and that ``expand`` is callable (or None): what
    every store's ``invalidate`` checks before any I/O."""
    check_name("the namespace to invalidate", namespace, allow_empty=False)
    given = check_names(f"the names to invalidate in namespace {namespace!r}", names)
    if expand is not None and not callable(expand):
        raise InvalidInputError(
            f"expand (invalidating names in namespace {namespace!r}) must be a function of "
            f"a name or None, not a {type(expand).__name__}"
        )
    return list(dict.fromkeys(given))


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


def encode_entry(entry: Entry, values: ValueCodec) -> EncodedEntry:
    """Validate every part of ``entry`` and return its columns, the value encoded by
    ``values`` (the store's codec); raises :class:`InvalidInputError` /
    :class:`SerializationError` naming the key and the part."""
    key = entry.key
    validate_key(key)
    where = key.coalesce_key
    if entry.alias is not None:
        check_name(f"the alias of key {where}", entry.alias)
    deps = check_names(f"the deps of key {where}", entry.deps)
    if len(deps) > MAX_DEPS:
        raise InvalidInputError(f"key {where} has {len(deps)} deps; the limit is {MAX_DEPS}")
    for what in ("created_at", "expires_at", "stale_until", "compute_ms"):
        moment = getattr(entry, what)
        if moment is not None and (isinstance(moment, bool) or not isinstance(moment, int)):
            raise InvalidInputError(f"the {what} of key {where} must be an int or None")
        if moment is not None and moment not in _INT64:
            raise InvalidInputError(
                f"the {what} of key {where} is {moment}: out of the 64-bit range a store keeps"
            )
    value, codec = values.encode(f"the value of key {where}", entry.value)
    return EncodedEntry(
        value=value,
        codec=codec,
        deps=deps,
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
    check_json(what, value)
    try:
        return compact(value)
    except ValueError as exc:  # an int past a limit this process set lower than ours
        raise SerializationError(f"{what} cannot be written as JSON: {exc}") from None


def check_json(what: str, value: Any) -> None:
    """Refuse ``value`` unless it is storable JSON (see the module docstring), with an
    :class:`InvalidInputError` naming ``what`` and the path of the offending part."""
    # Iterative, so a hostile depth fails with our error and not a RecursionError. Each
    # stack item is (node, depth, parent item, step) so a path is built only on failure.
    stack: list[tuple[Any, int, Any, str]] = [(value, 0, None, "")]
    while stack:
        item = stack.pop()
        node, depth, _, _ = item
        if isinstance(node, str):
            _check_string(what, node, item)
        elif node is None or isinstance(node, bool):
            continue
        elif isinstance(node, int):
            if node.bit_length() > _INT_SAFE_BITS and abs(node) >= _INT_LIMIT:
                raise SerializationError(
                    f"{what} holds an integer of more than {MAX_INT_DIGITS} digits at "
                    f"{_path(item)}: too large to be read back as JSON"
                )
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
