"""Layer 3, internal: populate coordination across the processes of a fleet. Not part of
the public API."""
