"""Layer 1, internal: the store contract (``base``) and its backends. Not part of the
public API: import what a user needs from :mod:`fleetcache`."""
