"""Layers 2 and 4, internal: the LISTEN connection hub (``hub``), the invalidation
broadcast's strict parser (``broadcast``) and the listener that replays peers'
invalidations on this process's cache (``listener``). Not part of the public API."""
