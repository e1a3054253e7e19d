"""The coalesce key of the work in progress, on every log record fleetcache emits
(``record.coalesce_key``, ``"-"`` outside per-key work): a ``ContextVar`` set by
:func:`key_context` and a :class:`CoalesceKeyFilter` on every fleetcache logger."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar

#: The coalesce key of the per-key work this context is doing, or None.
current_key: ContextVar[str | None] = ContextVar("fleetcache_coalesce_key", default=None)

#: What ``record.coalesce_key`` says outside per-key work.
NO_KEY = "-"


class CoalesceKeyFilter(logging.Filter):
    """Sets ``record.coalesce_key`` from the context (keeps one given with ``extra=``).
    Every fleetcache logger carries it; add it to your own handler to give the records of
    other libraries the field too: ``handler.addFilter(CoalesceKeyFilter())``."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the field; never drops a record."""
        if not hasattr(record, "coalesce_key"):
            record.coalesce_key = current_key.get() or NO_KEY
        return True


_FILTER = CoalesceKeyFilter()


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (under ``fleetcache.``) with :class:`CoalesceKeyFilter` on it."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


@contextlib.contextmanager
def key_context(coalesce_key: str) -> Iterator[None]:
    """Records logged inside (and in tasks started inside) carry ``coalesce_key``."""
    token = current_key.set(coalesce_key)
    try:
        yield
    finally:
        current_key.reset(token)
