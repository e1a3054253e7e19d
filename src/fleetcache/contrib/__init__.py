"""Integrations with frameworks (each an optional extra): :mod:`fleetcache.contrib.django`."""
