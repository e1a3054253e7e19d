"""Compact JSON text, as every store, payload and key string writes it.

One encoder made once: ``json.dumps`` with any keyword argument builds a new
``JSONEncoder`` on each call, which a miss would pay half a dozen times."""

from __future__ import annotations

import json
from typing import Any

_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def compact(value: Any) -> str:
    """``value`` as JSON text without spaces, non-ASCII kept as is; NaN and the infinities
    refused (``ValueError``), as no reader of ours would take them back."""
    return _COMPACT.encode(value)
