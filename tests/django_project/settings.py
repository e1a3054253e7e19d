"""Settings of the test project: the default cache is fleetcache at FLEETCACHE_DJANGO_URL
(the tests point it at a fresh database per test with override_settings)."""

from __future__ import annotations

import os

SECRET_KEY = "fleetcache-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
ROOT_URLCONF = "django_project.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
CACHES = {
    "default": {
        "BACKEND": "fleetcache.contrib.django.FleetcacheCache",
        "LOCATION": os.environ.get("FLEETCACHE_DJANGO_URL", "sqlite:///django-cache.db"),
        "TIMEOUT": 300,
    }
}
