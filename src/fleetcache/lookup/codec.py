"""How a typed value becomes the JSON a store keeps, and back."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

V = TypeVar("V")


class Codec(Protocol[V]):
    """Turns values of type ``V`` into JSON documents and back. ``decode(encode(v))``
    must equal ``v``; ``decode`` may raise for a document it does not recognise."""

    def encode(self, value: V) -> Any:
        """``value`` as JSON (dicts, lists, strings, finite numbers, booleans, None)."""

    def decode(self, document: Any) -> V:
        """The value a JSON document stands for."""
