"""Layer 5, internal: the generic caching lookup. Not part of the public API: import what
a user needs from :mod:`fleetcache`."""
