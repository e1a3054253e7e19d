"""The invalidation broadcast's payloads, built where the invalidation commits.

An invalidating store sends them with ``pg_notify`` inside the invalidation's own
transaction (only it knows the closure, and NOTIFY is delivered exactly at commit);
:mod:`fleetcache.notifications.broadcast` parses them strictly on the listening side.
One function builds every payload: :func:`invalidation_payloads`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import TypeGuard

from fleetcache._json import compact

#: The generic core's invalidation channel.
INVALIDATED_CHANNEL = "fleetcache_invalidated_v1"
#: Default byte budget of one payload (Postgres refuses 8000 bytes and more).
PAYLOAD_BUDGET = 7000
#: The longest origin (characters): it is repeated in every payload.
MAX_ORIGIN_CHARS = 64

# A NUL or a lone surrogate: no connection can send a lone surrogate and no store holds a
# key with either, so the parser refuses a string holding one.
_UNSENDABLE = re.compile("[\x00\ud800-\udfff]")


def new_origin() -> str:
    """A fresh origin (a process's broadcasts carry it, so its listener can skip their
    echoes): 16 random hex digits."""
    return secrets.token_hex(8)


def is_sendable(value: object) -> bool:
    """Whether ``value`` may be a namespace, name or origin in a payload: a non-empty
    string without NUL or lone surrogates (the parser refuses anything else)."""
    return isinstance(value, str) and value != "" and not _UNSENDABLE.search(value)


def is_origin(value: object) -> bool:
    """Whether ``value`` is a usable origin: sendable and at most :data:`MAX_ORIGIN_CHARS`."""
    return is_sendable(value) and len(str(value)) <= MAX_ORIGIN_CHARS


def _size(text: str) -> int:
    # surrogatepass: measuring never raises (unsendable strings are refused before sending).
    return len(text.encode("utf-8", "surrogatepass"))


def invalidation_payloads(
    namespace: str | None,
    names: Sequence[str] | None = None,
    *,
    origin: str | None = None,
    budget: int = PAYLOAD_BUDGET,
) -> list[str]:
    """The payloads announcing one invalidation, compact JSON with keys in this order::

        {"k":"module","r":<namespace>,"m":[<name>, ...],"o":<origin>}   names of a namespace
        {"k":"realm","r":<namespace>,"o":<origin>}                       a whole namespace
        {"k":"global","o":<origin>}                                      everything

    (the kinds' words are the seed's wire format, spoken by its servers on its channel).
    ``namespace`` None: the payload for everything; ``names`` None: the namespace's; else
    names payloads, names in order and each once, chunked so each payload is under
    ``budget`` UTF-8 bytes (origin included); no names, no payloads. Without ``origin``
    there is no ``o`` (an older peer's form).

    It never under-reports and every payload can be sent: a name that cannot travel by
    name (empty, NUL, lone surrogate, or too big for a payload of its own) turns the whole
    announcement into the namespace's payload, and a namespace that cannot, into the one
    for everything.
    """
    tail = "}" if origin is None else ',"o":' + compact(origin) + "}"
    everything = ['{"k":"global"' + tail]
    if namespace is None or not is_sendable(namespace):
        return everything
    whole_namespace = ['{"k":"realm","r":' + compact(namespace) + tail]
    if _size(whole_namespace[0]) >= budget:
        return everything
    if names is None:
        return whole_namespace
    # Built from pre-encoded pieces so sizes add up exactly.
    head = '{"k":"module","r":' + compact(namespace) + ',"m":['
    tail = "]" + tail
    fixed = _size(head) + _size(tail)
    payloads: list[str] = []
    chunk: list[str] = []
    size = fixed
    for name in names:
        piece = compact(name)
        piece_size = _size(piece)
        if not is_sendable(name) or fixed + piece_size >= budget:
            return whole_namespace
        if chunk and size + 1 + piece_size >= budget:  # 1: the comma before it
            payloads.append(head + ",".join(chunk) + tail)
            chunk, size = [], fixed
        size += piece_size + (1 if chunk else 0)
        chunk.append(piece)
    if chunk:
        payloads.append(head + ",".join(chunk) + tail)
    return payloads


def is_channel(value: object) -> TypeGuard[str]:
    """Whether Postgres can LISTEN and ``pg_notify`` on ``value`` exactly as given: 1 to
    63 UTF-8 bytes without NUL (a longer name is truncated by LISTEN, refused by NOTIFY)."""
    if not isinstance(value, str) or "\x00" in value or _UNSENDABLE.search(value):
        return False
    return 1 <= len(value.encode()) <= 63
