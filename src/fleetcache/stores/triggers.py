"""The DDL of a trigger that invalidates, in the changing transaction, what a row maps to."""

from __future__ import annotations

from psycopg import sql

from fleetcache.errors import InvalidInputError
from fleetcache.stores import queries as q
from fleetcache.stores.payloads import INVALIDATED_CHANNEL
from fleetcache.stores.validation import check_name

# Postgres truncates longer identifiers (bytes); a generated name is cut to fit.
_MAX_IDENTIFIER_BYTES = 63


def invalidation_trigger(
    table: str,
    namespace: str,
    names: str,
    *,
    name: str | None = None,
    channel: str = INVALIDATED_CHANNEL,
) -> sql.Composed:
    """``CREATE OR REPLACE`` a trigger function and an ``AFTER INSERT OR UPDATE OR DELETE
    ... FOR EACH ROW`` trigger on ``table`` (``"schema.table"`` or ``"table"``) calling
    ``fleetcache_invalidate(namespace, <names>)`` for every changed row.

    ``names`` is SQL the operator writes (it is spliced into the function's body as it is,
    so it must come from the operator, never from a user): an expression of type
    ``text[]`` over the row ``r`` — OLD for a delete, NEW for an insert, both for an
    update — e.g. ``ARRAY['product:' || r.id]``. The table, the generated names and
    ``namespace`` are quoted (identifiers and a literal). ``name``: the trigger's and its
    function's name (default ``fleetcache_<table>_invalidate``, in the table's schema)."""
    parts = table.split(".")
    if len(parts) > 2 or not all(parts):
        raise InvalidInputError(
            f"the table must be 'schema.table' or 'table' (unquoted names), got {table!r}"
        )
    check_name("the namespace the trigger invalidates", namespace, allow_empty=False)
    if "$fleetcache$" in names or not names.strip():
        raise InvalidInputError(
            f"the names expression must be a non-empty SQL expression without the "
            f"'$fleetcache$' quote that encloses it, got {names!r:.200}"
        )
    if name is None:
        name = f"fleetcache_{parts[-1]}_invalidate"
        while len(name.encode()) > _MAX_IDENTIFIER_BYTES:
            name = name[:-1]
    elif not name or len(name.encode()) > _MAX_IDENTIFIER_BYTES:
        raise InvalidInputError(f"the trigger's name must be 1 to 63 bytes, got {name!r}")
    function = sql.Identifier(*parts[:-1], name)
    return sql.SQL(q.PG_INVALIDATION_TRIGGER).format(
        function=function,
        table=sql.Identifier(*parts),
        trigger=sql.Identifier(name),
        names=sql.SQL(names),  # the operator's SQL, by design (see the docstring)
        namespace=sql.Literal(namespace),
        channel=sql.Literal(channel),
    )
