"""The closure of an invalidation, grown round by round; shared by the three stores.

Each store finds, per round, the entries of the namespace named or aliased by a name of
the frontier or whose deps meet it (with its own index), and hands their names and aliases
to :meth:`Closure.add`, which expands them and returns what is new: the next frontier.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from fleetcache.stores.base import Expand
from fleetcache.stores.validation import check_names, is_plain_name


class Closure:
    """The names an invalidation reaches: the given names first (each once, as given),
    then their expansions and everything found, each once, in the order found."""

    def __init__(self, given: Sequence[str], expand: Expand | None) -> None:
        self._expand = expand
        self.names: list[str] = list(dict.fromkeys(given))
        self._seen = set(self.names)
        self.names.extend(self._new(self.names))

    def _new(self, found: Iterable[str | None]) -> list[str]:
        new: list[str] = []
        seen = self._seen
        if self._expand is None:  # names a store holds, or given ones: checked already
            for name in found:
                if name is not None and name not in seen:
                    seen.add(name)
                    new.append(name)
            return new
        for name in found:
            if name is None:
                continue
            variants = self._expand(name)
            # expand is the caller's code: what it returns is input like any other (a str
            # is refused, not taken apart into its characters). The message is built only
            # when the common case (a list or tuple of plain names) fails.
            if type(variants) not in (list, tuple) or not all(map(is_plain_name, variants)):
                variants = check_names(f"what expand returned for {name!r}", variants)
            for variant in variants:
                if variant not in self._seen:
                    self._seen.add(variant)
                    new.append(variant)
        return new

    def add(self, found: Iterable[str | None]) -> list[str]:
        """Add names and aliases found in a round (None ignored), expanded; return the
        names that are new (the next round's frontier)."""
        new = self._new(found)
        self.names.extend(new)
        return new
