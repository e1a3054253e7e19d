"""The invalidation broadcast's strict parser (layer 4).

Every invalidation is announced on the invalidated channel, so peers discard work in
flight and near copies. The Postgres store sends the payloads itself, with ``pg_notify``
inside the invalidation's own transaction: they are delivered exactly when it commits
and never after a rollback, so a caller cancelled after the commit cannot lose them.
:func:`~fleetcache.stores.payloads.invalidation_payloads` builds them; the format::

    {"k":"module","r":<namespace>,"m":[<name>, ...],"o":<origin>}   names in one namespace
    {"k":"realm","r":<namespace>,"o":<origin>}                        a whole namespace
    {"k":"global","o":<origin>}                                       everything

The kinds' words on the wire are the seed's (its servers send and parse them on its
channel, so they stay); parsed, they are :data:`InvalidationKind`'s generic ones. ``o`` is
the sender's *origin*, a short random id per process, so a listener can skip the echoes
of its own process's invalidations without mistaking a peer's identical payload for one
(comparing payloads would). A payload without ``o`` comes from an older peer and counts
as foreign.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, TypeAlias

from fleetcache.logcontext import get_logger
from fleetcache.stores.payloads import is_sendable

__all__ = ["Invalidation", "InvalidationKind", "parse_invalidation"]

logger = get_logger("fleetcache.notifications")

# Postgres delivers at most 7999 bytes, hence characters: anything longer is not a NOTIFY
# payload, and is refused before any parsing work.
_MAX_PAYLOAD_CHARS = 8000

#: The three kinds of invalidation: names in a namespace, a whole namespace, everything.
InvalidationKind: TypeAlias = Literal["names", "namespace", "all"]


@dataclass(frozen=True, slots=True)
class Invalidation:
    """One parsed broadcast: ``names`` in ``namespace`` (kind ``names``), the whole
    ``namespace`` (``namespace``), or everything (``all``: namespace is None), sent by the
    process ``origin`` (None: an older peer that sends none)."""

    kind: InvalidationKind
    namespace: str | None = None
    names: tuple[str, ...] = ()
    origin: str | None = None


def _reject(payload: str, reason: str) -> None:
    shown = payload if len(payload) <= 200 else payload[:200] + "..."
    logger.warning("ignoring malformed invalidation payload (%s): %r", reason, shown)


def parse_invalidation(payload: str) -> Invalidation | None:
    """Parse a broadcast strictly; on anything malformed log a warning and return None.

    Wire kind ``module`` needs a string ``r`` and a non-empty list of strings ``m``;
    ``realm`` needs a string ``r``; ``global`` needs nothing; ``o`` may be absent (an
    older peer). Each string must be :func:`~fleetcache.stores.payloads.is_sendable`.
    Keys this version does not know are ignored, so a newer peer's additions do not
    silence an invalidation. Never raises, whatever the input: larger than any NOTIFY,
    nested too deep, huge numbers, escapes of NUL or lone surrogates.
    """
    if len(payload) > _MAX_PAYLOAD_CHARS:
        _reject(payload, f"{len(payload)} characters, more than any NOTIFY payload")
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # ValueError covers too many int digits
        _reject(payload, f"not JSON: {exc}")
        return None
    if not isinstance(data, dict):
        _reject(payload, f"not a JSON object but {type(data).__name__}")
        return None
    origin = data.get("o")
    if "o" in data and not is_sendable(origin):
        _reject(payload, "'o' is not a non-empty string")
        return None
    kind = data.get("k")
    if kind == "global":
        return Invalidation("all", origin=origin)
    if kind not in ("module", "realm"):
        _reject(payload, f"unknown kind {kind!r:.50}")
        return None
    namespace = data.get("r")
    if not is_sendable(namespace):
        _reject(payload, "'r' is not a non-empty string")
        return None
    if kind == "realm":
        return Invalidation("namespace", namespace, origin=origin)
    names = data.get("m")
    if not isinstance(names, list) or not names:
        _reject(payload, "'m' is not a non-empty list")
        return None
    if not all(is_sendable(name) for name in names):
        _reject(payload, "'m' holds something other than non-empty strings")
        return None
    return Invalidation("names", namespace, tuple(names), origin)
