"""A minimal Django project whose cache is fleetcache (used by tests/test_django.py)."""
