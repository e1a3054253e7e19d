"""fleetcache: a fleet of processes computes each missing cache entry once."""
