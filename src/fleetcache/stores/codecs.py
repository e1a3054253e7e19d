"""How a value becomes the bytes a store keeps, and which stored bytes a process decodes.

Every row carries its codec's name beside its bytes (``json``, ``pickle``, either with
``+zlib``), and a row is always decoded by *its* name, never by what this process writes:
a fleet moving from json to pickle, or rows compressed and not, read correctly side by side.
"""

from __future__ import annotations

import json
import pickle
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fleetcache._json import compact
from fleetcache.errors import ConfigurationError, SerializationError, StoreError
from fleetcache.stores.validation import encode_json

if TYPE_CHECKING:
    from fleetcache.stores.base import Key

#: The codec names a row may carry (a ``+zlib`` suffix says its bytes are compressed).
JSON_CODEC = "json"
PICKLE_CODEC = "pickle"
ZLIB_SUFFIX = "+zlib"
#: zlib's level: 6 (its default) is within a few percent of 9's size at a fraction of its
#: time; decompression costs the same at every level.
ZLIB_LEVEL = 6


@dataclass(frozen=True, slots=True)
class ValueCodec:
    """How a store encodes values: ``serializer`` ``"json"`` (the default: compact UTF-8
    JSON text, readable by any process and any language) or ``"pickle"`` (any picklable
    Python value), and, with ``compress_above`` (bytes), a zlib step for every value whose
    serialized form is longer than that (kept only when it is shorter compressed).

    **pickle is for a database you trust.** Unpickling runs code named in the bytes, so
    whoever can write the cache's table can run code in every process that unpickles it. A
    process therefore decodes ``pickle`` rows only when it opted in: ``serializer="pickle"``,
    or ``unpickle=True`` (which lets a json process read a pickle fleet's rows while it
    migrates). Without it, such a row is a :class:`~fleetcache.errors.StoreError` naming the
    key, never unpickled.

    zlib (standard library) is the compression step because it needs no dependency, every
    Python has it, and it decompresses at hundreds of MB/s; zstd compresses better and
    faster but is a third-party package before Python 3.14.
    """

    serializer: Literal["json", "pickle"] = "json"
    compress_above: int | None = None
    unpickle: bool | None = None

    def __post_init__(self) -> None:
        if self.serializer not in (JSON_CODEC, PICKLE_CODEC):
            raise ConfigurationError(
                f"serializer must be 'json' or 'pickle', got {self.serializer!r}"
            )
        limit = self.compress_above
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise ConfigurationError(
                f"compress_above must be a number of bytes (an int) or None, got {limit!r}"
            )
        if limit is not None and limit < 0:
            raise ConfigurationError(f"compress_above must be >= 0 bytes, got {limit}")
        if self.unpickle is not None and not isinstance(self.unpickle, bool):
            raise ConfigurationError(f"unpickle must be True, False or None, got {self.unpickle!r}")

    @property
    def reads_pickle(self) -> bool:
        """Whether this process decodes ``pickle`` rows (see the class docstring)."""
        return self.serializer == PICKLE_CODEC if self.unpickle is None else self.unpickle

    # ------------------------------------------------------------------ writing

    def dumps(self, value: Any) -> bytes:
        """``value`` serialized, unchecked and never compressed (the near tier's copy of
        what a store already accepted); raises what json or pickle raise."""
        if self.serializer == JSON_CODEC:
            return compact(value).encode()
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def encode(self, what: str, value: Any) -> tuple[bytes, str]:
        """The bytes a store keeps for ``value``, and their codec's name. JSON values are
        checked as stores check them; a value pickle refuses raises
        :class:`~fleetcache.errors.SerializationError` from pickle's own error. ``what``
        names the value in messages."""
        if self.serializer == JSON_CODEC:
            data = encode_json(what, value).encode()
        else:
            try:
                data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
            except (pickle.PickleError, TypeError, AttributeError, RecursionError) as exc:
                raise SerializationError(f"{what} cannot be pickled: {exc!r}") from exc
        limit = self.compress_above
        if limit is not None and len(data) > limit:
            packed = zlib.compress(data, ZLIB_LEVEL)
            if len(packed) < len(data):
                return packed, self.serializer + ZLIB_SUFFIX
        return data, self.serializer

    # ------------------------------------------------------------------ reading

    def loads(self, data: bytes) -> Any:
        """What :meth:`dumps` made, decoded (the near tier's copy on every hit)."""
        if self.serializer == JSON_CODEC:
            return json.loads(data.decode())
        return pickle.loads(data)  # noqa: S301 - this process's own bytes, kept in memory

    def decode(self, key: Key, codec: str, data: bytes) -> Any:
        """The value a row of ``key`` holds: ``data`` decoded by the row's own ``codec``.
        Raises :class:`~fleetcache.errors.StoreError` naming the key for a codec this
        release does not know (a newer writer's), a pickle row this process does not
        unpickle, or bytes that do not decode."""
        if codec == JSON_CODEC:  # the hit path's case, first
            try:
                # UTF-8 by construction: decoding first skips json's encoding detection.
                return json.loads(data.decode())
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise _undecodable(key, codec, data, exc) from exc
        base, suffix = codec, ""
        if codec.endswith(ZLIB_SUFFIX):
            base, suffix = codec[: -len(ZLIB_SUFFIX)], ZLIB_SUFFIX
        if base not in (JSON_CODEC, PICKLE_CODEC):
            raise StoreError(
                f"the value stored for key {key.coalesce_key} has codec {codec!r}, which this "
                f"release cannot decode (it reads 'json' and 'pickle', each optionally "
                f"'+zlib'): was it written by a newer fleetcache?"
            )
        if base == PICKLE_CODEC and not self.reads_pickle:
            raise StoreError(
                f"the value stored for key {key.coalesce_key} has codec {codec!r}, and this "
                f"process does not unpickle (it was opened with serializer "
                f"{self.serializer!r}): unpickling runs code, so only a process that opted in "
                "(ValueCodec('pickle'), or unpickle=True while a fleet migrates) reads it"
            )
        try:
            raw = zlib.decompress(data) if suffix else data
            if base == JSON_CODEC:
                return json.loads(raw.decode())
            return pickle.loads(raw)  # noqa: S301 - opted in: the database is trusted
        except Exception as exc:
            raise _undecodable(key, codec, data, exc) from exc


def _undecodable(key: Key, codec: str, data: bytes, exc: BaseException) -> StoreError:
    return StoreError(
        f"the value stored for key {key.coalesce_key} ({len(data)} bytes) is not "
        f"{codec!r} data: {exc}"
    )


#: The default: compact JSON, never compressed, pickle rows refused.
JSON_VALUES = ValueCodec()
